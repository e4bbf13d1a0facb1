"""A pod's CNI attachment: what the pod asks of the network, and the ADD/DEL calls for it.

ADD uses the network that is configured now; DEL uses the config cached by
ADD (as libcni does), so changing or removing the conflist later still lets
a pod's IP and veth be freed.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cni.cache import CacheEntry, ResultCache
from cni.conf import NetworkConfigError, NetworkConfigList, parse
from cni.invoke import CallHooks
from cni.network import CniNetwork
from cni.readiness import evaluate
from cri import metrics
from cri.config import NetworkConfig
from cri.log import event
from cri.system import faults, offload
from podsandbox import plugin_orphans
from podsandbox.spec import SandboxSpec

log = logging.getLogger(__name__)

IFNAME = "eth0"
INGRESS_ANNOTATION = "kubernetes.io/ingress-bandwidth"
EGRESS_ANNOTATION = "kubernetes.io/egress-bandwidth"
_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([kMGTPE]i?)?$")
MAX_BURST = 2**32 - 1  # containerd's choice: the bandwidth plugin needs a burst, the kubelet gives none
_SUFFIX = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


class NetworkNotReady(Exception):
    pass


@dataclass(frozen=True)
class Attachment:
    network: str
    ips: tuple[str, ...]  # primary first
    result: dict[str, Any]


def parse_quantity(text: str, where: str) -> int:
    """A Kubernetes quantity ('10M', '1Gi', '500k') in bits per second."""
    match = _QUANTITY.match(text.strip())
    if not match:
        raise ValueError(f"{where}: {text!r} is not a quantity like 10M or 1Gi")
    number, suffix = match.groups()
    scale = 1
    if suffix:
        scale = 1024 ** ("kMGTPE".index(suffix[0]) + 1) if suffix.endswith("i") else _SUFFIX[suffix]
    return int(float(number) * scale)


def bandwidth(annotations: dict[str, str]) -> dict[str, int]:
    """The bandwidth plugin's runtimeConfig from the pod annotations (burst as containerd sets it)."""
    out: dict[str, int] = {}
    for annotation, prefix in ((INGRESS_ANNOTATION, "ingress"), (EGRESS_ANNOTATION, "egress")):
        if annotation in annotations:
            out[f"{prefix}Rate"] = parse_quantity(annotations[annotation], f"annotations[{annotation}]")
            out[f"{prefix}Burst"] = MAX_BURST
    return out


def capabilities(spec: SandboxSpec) -> dict[str, Any]:
    caps: dict[str, Any] = {}
    ports = [
        {
            "hostPort": p.host_port,
            "containerPort": p.container_port,
            "protocol": p.protocol,
            **({"hostIP": p.host_ip} if p.host_ip else {}),
        }
        for p in spec.port_mappings
        if p.host_port > 0
    ]
    if ports:
        caps["portMappings"] = ports
    if bw := bandwidth(spec.annotations):
        caps["bandwidth"] = bw
    if spec.dns is not None:
        caps["dns"] = {
            "servers": list(spec.dns.servers),
            "searches": list(spec.dns.searches),
            "options": list(spec.dns.options),
        }
    return caps


def cni_args(sandbox_id: str, spec: SandboxSpec) -> dict[str, str]:
    meta = spec.metadata
    return {
        "IgnoreUnknown": "1",
        "K8S_POD_NAMESPACE": meta.namespace,
        "K8S_POD_NAME": meta.name,
        "K8S_POD_INFRA_CONTAINER_ID": sandbox_id,
        "K8S_POD_UID": meta.uid,
    }


class PodNetwork:
    """ADD and DEL for pods, against the network dirs of the current config."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = cache_dir
        self._hooks = CallHooks(
            observe=metrics.record_cni_call, env=plugin_orphans.mark(cache_dir), deliver=offload.deliver
        )

    def _cni(self, network: NetworkConfigList, config: NetworkConfig) -> CniNetwork:
        return CniNetwork(network, config.cni_plugin_dirs, self.cache_dir, config.cni_plugin_timeout, self._hooks)

    def current(self, config: NetworkConfig) -> NetworkConfigList:
        ready = evaluate(config.cni_config_dir, config.cni_plugin_dirs, config.cni_default_network)
        if not ready.ready or ready.network is None:
            raise NetworkNotReady(ready.message)
        return ready.network

    async def attach(self, sandbox_id: str, netns: str, spec: SandboxSpec, config: NetworkConfig) -> Attachment:
        network = self.current(config)
        cni = self._cni(network, config)
        args, caps = cni_args(sandbox_id, spec), capabilities(spec)
        # The intent before the plugins run: a crash during ADD leaves an entry without a result, and
        # recovery answers it with DEL (which CNI requires to succeed on what was never added), so an
        # address a plugin allocated just before the crash is freed.
        await offload.to_thread(self._record_intent, network, sandbox_id, args, caps)
        faults.point("sandbox.run.cni-intent")
        result = await cni.add(sandbox_id, netns, IFNAME, args, caps)
        ips = tuple(str(ip.address.ip) for ip in result.sandbox_ips(IFNAME))
        # IPv4 first: the kubelet takes the first IP as the pod's primary one.
        ordered = tuple(sorted(ips, key=lambda ip: ":" in ip))
        event(log, logging.INFO, "pod network attached", pod_id=sandbox_id, network=network.name, ips=",".join(ordered))
        return Attachment(network.name, ordered, result.raw)

    def _record_intent(
        self, network: NetworkConfigList, sandbox_id: str, args: dict[str, str], caps: dict[str, Any]
    ) -> None:
        entry = CacheEntry(network.name, sandbox_id, IFNAME, json.dumps(network.raw).encode(), args, caps)
        ResultCache(self.cache_dir).write(entry)

    def _network_for_delete(
        self, network_name: str, sandbox_id: str, config: NetworkConfig
    ) -> NetworkConfigList | None:
        entry = ResultCache(self.cache_dir).read(network_name, sandbox_id, IFNAME)
        if entry is not None:
            try:
                return parse(entry.config, self.cache_dir / "results", is_list=None)
            except NetworkConfigError as exc:
                event(log, logging.WARNING, "cached cni config unusable", pod_id=sandbox_id, error=str(exc))
        # Found by name even when its plugins are missing (evaluate reports it as not ready).
        return evaluate(config.cni_config_dir, config.cni_plugin_dirs, network_name).network

    def stop_plugins_left_running(self) -> None:
        """Before recovery's first DEL: a plugin a killed daemon left running must not finish an ADD after it."""
        plugin_orphans.kill_left_running(self.cache_dir)

    def remove_partial_writes(self) -> None:
        for path in ResultCache(self.cache_dir).remove_partial_writes():
            event(log, logging.INFO, "orphan removed", kind="cni cache temp file", path=path)

    def cached_networks(self, sandbox_id: str) -> list[str]:
        """Networks that hold a cached ADD result for this sandbox (what a crash may have left attached)."""
        suffix = f"-{sandbox_id}-{IFNAME}"
        results = self.cache_dir / "results"
        if not results.is_dir():
            return []
        return [p.name[: -len(suffix)] for p in results.iterdir() if p.name.endswith(suffix)]

    async def detach(self, sandbox_id: str, netns: str, network_name: str, config: NetworkConfig) -> None:
        """CNI DEL; works when the netns is gone (plugins then free only what they hold on the host)."""
        network = self._network_for_delete(network_name, sandbox_id, config)
        if network is None:
            event(
                log,
                logging.WARNING,
                "pod network config gone, nothing to delete with",
                pod_id=sandbox_id,
                network=network_name,
            )
            return
        cni = self._cni(network, config)
        await cni.delete(sandbox_id, netns, IFNAME)
        event(log, logging.INFO, "pod network detached", pod_id=sandbox_id, network=network_name)
