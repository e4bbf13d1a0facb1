"""Translation between the CRI's pod sandbox messages and podsandbox's typed objects."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping

from google.protobuf import json_format

from api.runtime.v1 import api_pb2 as pb
from cri.containers import validate
from cri.errors import InvalidArgument
from cri.system.idmap import IdMapping
from podsandbox.resources import Limits, PodResources
from podsandbox.sandbox import Sandbox, SandboxState
from podsandbox.spec import DnsConfig, Metadata, NamespaceMode, PortMapping, SandboxSpec, UserNamespace

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
        userns=validate.userns_of(ns, where),
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
    if spec.userns is not None:
        options.userns_options.CopyFrom(_userns_message(spec.userns))
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


def _userns_message(userns: UserNamespace) -> pb.UserNamespace:
    def ranges(m: IdMapping) -> list[pb.IDMapping]:
        return [pb.IDMapping(host_id=m.host_id, container_id=m.container_id, length=m.length)]

    return pb.UserNamespace(mode=pb.POD, uids=ranges(userns.uids), gids=ranges(userns.gids))


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
        **_resources_info(sandbox, config.linux),
    }
    return {"info": json.dumps(info)}


# ---- pod-level resources (UpdatePodSandboxResources) ------------------------------------------


def pod_resources_of(request: pb.UpdatePodSandboxResourcesRequest) -> PodResources:
    """The request's resources and overhead, INVALID_ARGUMENT naming the field for values no cgroup takes."""
    out: dict[str, Limits | None] = {}
    for name in ("resources", "overhead"):
        if not request.HasField(name):
            out[name] = None
            continue
        res: pb.LinuxContainerResources = getattr(request, name)
        validate.resources(res, name)
        sizes = [page.page_size for page in res.hugepage_limits]
        for i, size in enumerate(sizes):
            if size in sizes[:i]:
                raise InvalidArgument(f"{name}.hugepage_limits[{i}].page_size", f"{size!r} is given twice")
        out[name] = _limits(res)
    return PodResources(resources=out["resources"], overhead=out["overhead"])


def _limits(res: pb.LinuxContainerResources) -> Limits:
    return Limits(
        cpu_period=res.cpu_period,
        cpu_quota=res.cpu_quota,
        cpu_shares=res.cpu_shares,
        memory_limit_in_bytes=res.memory_limit_in_bytes,
        memory_swap_limit_in_bytes=res.memory_swap_limit_in_bytes,
        oom_score_adj=res.oom_score_adj,
        cpuset_cpus=res.cpuset_cpus,
        cpuset_mems=res.cpuset_mems,
        hugepage_limits={page.page_size: page.limit for page in res.hugepage_limits},
        unified=dict(res.unified),
    )


def _message(limits: Limits) -> pb.LinuxContainerResources:
    return pb.LinuxContainerResources(
        cpu_period=limits["cpu_period"],
        cpu_quota=limits["cpu_quota"],
        cpu_shares=limits["cpu_shares"],
        memory_limit_in_bytes=limits["memory_limit_in_bytes"],
        memory_swap_limit_in_bytes=limits["memory_swap_limit_in_bytes"],
        oom_score_adj=limits["oom_score_adj"],
        cpuset_cpus=limits["cpuset_cpus"],
        cpuset_mems=limits["cpuset_mems"],
        hugepage_limits=[pb.HugepageLimit(page_size=k, limit=v) for k, v in limits["hugepage_limits"].items()],
        unified=limits["unified"],
    )


def _resources_info(sandbox: Sandbox, linux: pb.LinuxPodSandboxConfig) -> dict[str, object]:
    """The pod's current resources and overhead (PodSandboxStatus has no field for them): those of the
    last UpdatePodSandboxResources, else those of the config; in the CRI's JSON form, as `config` is."""
    current = sandbox.resources
    if current is None:
        current = PodResources(
            resources=_limits(linux.resources) if linux.HasField("resources") else None,
            overhead=_limits(linux.overhead) if linux.HasField("overhead") else None,
        )
    return {
        name: None if limits is None else json_format.MessageToDict(_message(limits))
        for name, limits in (("resources", current.resources), ("overhead", current.overhead))
    }


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
