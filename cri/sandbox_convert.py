"""Translation between the CRI's pod sandbox messages and podsandbox's typed objects."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from google.protobuf import json_format

from api.runtime.v1 import api_pb2 as pb
from cri.errors import InvalidArgument
from podsandbox.sandbox import Sandbox, SandboxState
from podsandbox.spec import DnsConfig, Metadata, NamespaceMode, PortMapping, SandboxSpec

_MODES = {
    pb.POD: NamespaceMode.POD,
    pb.CONTAINER: NamespaceMode.CONTAINER,
    pb.NODE: NamespaceMode.NODE,
    pb.TARGET: NamespaceMode.TARGET,
}
_MODE_VALUES = {mode: value for value, mode in _MODES.items()}
_PROTOCOLS = {pb.TCP: "tcp", pb.UDP: "udp", pb.SCTP: "sctp"}
_STATES = {SandboxState.READY: pb.SANDBOX_READY, SandboxState.NOTREADY: pb.SANDBOX_NOTREADY}


def _mode(value: int, field: str) -> NamespaceMode:
    for known, mode in _MODES.items():
        if known == value:
            return mode
    raise InvalidArgument(field, f"unknown namespace mode {value}")


def spec_of(request: pb.RunPodSandboxRequest) -> SandboxSpec:
    config = request.config
    if not config.HasField("metadata"):
        raise InvalidArgument("config.metadata", "is required")
    meta = config.metadata
    ns = config.linux.security_context.namespace_options
    where = "config.linux.security_context.namespace_options"
    ports = []
    for i, port in enumerate(config.port_mappings):
        protocol = next((name for value, name in _PROTOCOLS.items() if value == port.protocol), None)
        if protocol is None:
            raise InvalidArgument(f"config.port_mappings[{i}].protocol", f"unknown protocol {port.protocol}")
        ports.append(PortMapping(protocol, port.container_port, port.host_port, port.host_ip))
    dns = None
    if config.HasField("dns_config"):
        d = config.dns_config
        dns = DnsConfig(tuple(d.servers), tuple(d.searches), tuple(d.options))
    return SandboxSpec(
        metadata=Metadata(meta.name, meta.uid, meta.namespace, meta.attempt),
        hostname=config.hostname,
        log_directory=config.log_directory,
        dns=dns,
        port_mappings=tuple(ports),
        labels=dict(config.labels),
        annotations=dict(config.annotations),
        cgroup_parent=config.linux.cgroup_parent,
        network_mode=_mode(ns.network, f"{where}.network"),
        pid_mode=_mode(ns.pid, f"{where}.pid"),
        ipc_mode=_mode(ns.ipc, f"{where}.ipc"),
        sysctls=dict(config.linux.sysctls),
        runtime_handler=request.runtime_handler,
        privileged=config.linux.security_context.privileged,
    )


def _metadata(sandbox: Sandbox) -> pb.PodSandboxMetadata:
    m = sandbox.spec.metadata
    return pb.PodSandboxMetadata(name=m.name, uid=m.uid, namespace=m.namespace, attempt=m.attempt)


def summary(sandbox: Sandbox) -> pb.PodSandbox:
    return pb.PodSandbox(
        id=sandbox.id,
        metadata=_metadata(sandbox),
        state=_STATES.get(sandbox.state, pb.SANDBOX_NOTREADY),
        created_at=sandbox.created_at,
        labels=sandbox.spec.labels,
        annotations=sandbox.spec.annotations,
        runtime_handler=sandbox.spec.runtime_handler,
    )


def status(sandbox: Sandbox) -> pb.PodSandboxStatus:
    spec = sandbox.spec
    network = pb.PodSandboxNetworkStatus()
    if sandbox.ips and sandbox.state is SandboxState.READY:
        network = pb.PodSandboxNetworkStatus(
            ip=sandbox.ips[0], additional_ips=[pb.PodIP(ip=ip) for ip in sandbox.ips[1:]]
        )
    options = pb.NamespaceOption(
        network=_MODE_VALUES[spec.network_mode], pid=_MODE_VALUES[spec.pid_mode], ipc=_MODE_VALUES[spec.ipc_mode]
    )
    return pb.PodSandboxStatus(
        id=sandbox.id,
        metadata=_metadata(sandbox),
        state=_STATES.get(sandbox.state, pb.SANDBOX_NOTREADY),
        created_at=sandbox.created_at,
        network=network,
        linux=pb.LinuxPodSandboxStatus(namespaces=pb.Namespace(options=options)),
        labels=spec.labels,
        annotations=spec.annotations,
        runtime_handler=spec.runtime_handler,
    )


def verbose_info(sandbox: Sandbox) -> dict[str, str]:
    """What `crictl inspectp` prints under info: where things are, and the config as received."""
    config = pb.PodSandboxConfig()
    config.ParseFromString(sandbox.config_blob)
    info = {
        "sandboxID": sandbox.id,
        "netNamespacePath": sandbox.pins.get("net", ""),
        "namespaces": sandbox.pins,
        "sandboxDir": sandbox.dir,
        "shm": sandbox.shm,
        "cgroupParent": sandbox.cgroup_parent,
        "infraPid": sandbox.infra_pid,
        "cniNetwork": sandbox.network,
        "cniResult": sandbox.cni_result,
        "config": json_format.MessageToDict(config),
    }
    return {"info": json.dumps(info)}


def _selected(sandbox: Sandbox, flt: pb.PodSandboxFilter) -> bool:
    if flt.id and not sandbox.id.startswith(flt.id):
        return False
    if flt.HasField("state") and _STATES.get(sandbox.state) != flt.state.state:
        return False
    return labels_match(sandbox.spec.labels, flt.label_selector)


def labels_match(labels: Mapping[str, str], selector: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def filtered(sandboxes: Iterable[Sandbox], flt: pb.PodSandboxFilter | None) -> list[pb.PodSandbox]:
    chosen = [s for s in sandboxes if flt is None or _selected(s, flt)]
    chosen.sort(key=lambda s: s.created_at)
    return [summary(s) for s in chosen]
