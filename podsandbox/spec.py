"""What a pod sandbox is asked to be: typed, validated, serializable.

The servicer turns a PodSandboxConfig into a SandboxSpec; everything below
the servicer works on this dataclass, never on protobuf messages. Validation
names the CRI field of the request, so a kubelet operator can find it.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from enum import Enum

from cri.errors import InvalidArgument
from cri.system.idmap import IdMapping


class NamespaceMode(Enum):
    """CRI NamespaceMode: where a pod or container gets a namespace from."""

    POD = "POD"
    CONTAINER = "CONTAINER"
    NODE = "NODE"
    TARGET = "TARGET"


@dataclass(frozen=True)
class Metadata:
    name: str
    uid: str
    namespace: str
    attempt: int = 0

    @property
    def reservation(self) -> str:
        """The name a sandbox reserves, unique per (name, namespace, uid, attempt) as the kubelet builds it."""
        return f"k8s_{self.name}_{self.namespace}_{self.uid}_{self.attempt}"


@dataclass(frozen=True)
class DnsConfig:
    servers: tuple[str, ...] = ()
    searches: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class PortMapping:
    protocol: str  # tcp, udp, sctp
    container_port: int
    host_port: int
    host_ip: str = ""


@dataclass(frozen=True)
class UserNamespace:
    """A pod's own user namespace (userns_options mode POD): one range each, container ID 0 mapped."""

    uids: IdMapping
    gids: IdMapping

    @property
    def root(self) -> tuple[int, int]:
        """The host (uid, gid) of root inside: the owner of what the pod must own."""
        return self.uids.host_id, self.gids.host_id


@dataclass(frozen=True)
class SandboxSpec:
    metadata: Metadata
    hostname: str = ""
    log_directory: str = ""
    dns: DnsConfig | None = None
    port_mappings: tuple[PortMapping, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    cgroup_parent: str = ""
    network_mode: NamespaceMode = NamespaceMode.POD
    pid_mode: NamespaceMode = NamespaceMode.CONTAINER
    ipc_mode: NamespaceMode = NamespaceMode.POD
    sysctls: dict[str, str] = field(default_factory=dict)
    runtime_handler: str = ""
    # Containers may only be privileged in a privileged pod (the kubelet's and containerd's rule).
    privileged: bool = False
    userns: UserNamespace | None = None  # None: the host's user namespace (mode NODE)

    @property
    def host_network(self) -> bool:
        return self.network_mode is NamespaceMode.NODE

    @property
    def host_ipc(self) -> bool:
        return self.ipc_mode is NamespaceMode.NODE

    @property
    def host_pid(self) -> bool:
        return self.pid_mode is NamespaceMode.NODE


# Sysctls that live in a namespace the pod owns, by namespace (runc's list).
_IPC_SYSCTLS = frozenset(
    {
        "kernel.msgmax",
        "kernel.msgmnb",
        "kernel.msgmni",
        "kernel.sem",
        "kernel.shmall",
        "kernel.shmmax",
        "kernel.shmmni",
        "kernel.shm_rmid_forced",
    }
)
_UTS_SYSCTLS = frozenset({"kernel.domainname", "kernel.hostname"})
_HOSTNAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,62}[A-Za-z0-9])?$")
_SYSCTL_NAME = re.compile(r"^[A-Za-z0-9_-]+([./][A-Za-z0-9_-]+)*$")
_MAX_SEARCHES = 32  # the kubelet's own limit (MaxDNSSearchPaths)
_MAX_SERVERS = 3  # what glibc's resolver reads


def sysctl_namespace(key: str) -> str | None:
    """'net', 'ipc' or 'uts' for a namespaced sysctl; None for one that would change the host."""
    dotted = key.replace("/", ".")
    if dotted.startswith("net."):
        return "net"
    if dotted in _IPC_SYSCTLS or dotted.startswith("fs.mqueue."):
        return "ipc"
    if dotted in _UTS_SYSCTLS:
        return "uts"
    return None


def _check_sysctls(spec: SandboxSpec) -> None:
    for key, value in spec.sysctls.items():
        where = f"config.linux.sysctls[{key}]"
        if not _SYSCTL_NAME.match(key):
            raise InvalidArgument(where, "not a valid sysctl name")
        if "\n" in value or "\x00" in value or not value:
            raise InvalidArgument(where, "the value must be one non-empty line")
        kind = sysctl_namespace(key)
        if kind is None:
            raise InvalidArgument(where, "not a namespaced sysctl: setting it would change the whole node")
        if kind == "net" and spec.host_network:
            raise InvalidArgument(where, "net.* sysctls cannot be set on a host-network pod")
        if kind == "ipc" and spec.host_ipc:
            raise InvalidArgument(where, "IPC sysctls cannot be set on a host-IPC pod")
        if kind == "uts" and spec.host_network:
            raise InvalidArgument(where, "UTS sysctls cannot be set on a host-network pod (it shares the host UTS)")


def _check_userns(spec: SandboxSpec) -> None:
    """A user namespace owns the pod's namespaces: none of them may be the host's (the kubelet's rule too)."""
    if spec.userns is None:
        return
    for name, shared in (("network", spec.host_network), ("ipc", spec.host_ipc), ("pid", spec.host_pid)):
        if shared:
            raise InvalidArgument(
                f"config.linux.security_context.namespace_options.{name}",
                "NODE cannot be combined with a user namespace of the pod (userns_options mode POD)",
            )


def _check_dns(dns: DnsConfig | None) -> None:
    if dns is None:
        return
    if len(dns.servers) > _MAX_SERVERS:
        raise InvalidArgument(
            "config.dns_config.servers", f"at most {_MAX_SERVERS} servers are used, got {len(dns.servers)}"
        )
    for i, server in enumerate(dns.servers):
        try:
            ipaddress.ip_address(server)
        except ValueError:
            raise InvalidArgument(f"config.dns_config.servers[{i}]", f"{server!r} is not an IP address") from None
    if len(dns.searches) > _MAX_SEARCHES:
        raise InvalidArgument("config.dns_config.searches", f"at most {_MAX_SEARCHES} search domains")
    for name, values in (("searches", dns.searches), ("options", dns.options)):
        for i, value in enumerate(values):
            if not value or any(c.isspace() for c in value):
                raise InvalidArgument(f"config.dns_config.{name}[{i}]", f"{value!r} must be one word")


def _check_ports(ports: tuple[PortMapping, ...]) -> None:
    for i, port in enumerate(ports):
        where = f"config.port_mappings[{i}]"
        if not 1 <= port.container_port <= 65535:
            raise InvalidArgument(f"{where}.container_port", f"{port.container_port} is not a port (1-65535)")
        if not 0 <= port.host_port <= 65535:
            raise InvalidArgument(f"{where}.host_port", f"{port.host_port} is not a port (0-65535)")
        if port.host_ip:
            try:
                ipaddress.ip_address(port.host_ip)
            except ValueError:
                raise InvalidArgument(f"{where}.host_ip", f"{port.host_ip!r} is not an IP address") from None


def _check_path(value: str, where: str) -> None:
    if value and (not value.startswith("/") or ".." in value.split("/")):
        raise InvalidArgument(where, f"{value!r} must be an absolute path without '..'")


def check_cgroup_parent(value: str, manager: str) -> None:
    where = "config.linux.cgroup_parent"
    if not value:
        return
    if manager == "systemd":
        name = value.rsplit("/", 1)[-1]
        if not name.endswith(".slice") or "/" in value.strip("/"):
            raise InvalidArgument(
                where, f"{value!r}: the systemd cgroup manager needs a slice name like 'kubepods.slice'"
            )
    else:
        _check_path(value, where)


def _check_nul(spec: SandboxSpec) -> None:
    """No NUL byte in what becomes a name, a path, a line of a pod file or a plugin's argument: none can hold one."""
    meta, dns = spec.metadata, spec.dns or DnsConfig()
    values = [
        ("config.metadata.name", meta.name),
        ("config.metadata.uid", meta.uid),
        ("config.metadata.namespace", meta.namespace),
        ("config.hostname", spec.hostname),
        ("config.log_directory", spec.log_directory),
        ("config.linux.cgroup_parent", spec.cgroup_parent),
        ("runtime_handler", spec.runtime_handler),
    ]
    for name in ("servers", "searches", "options"):
        values += [(f"config.dns_config.{name}[{i}]", v) for i, v in enumerate(getattr(dns, name))]
    values += [(f"config.port_mappings[{i}].host_ip", p.host_ip) for i, p in enumerate(spec.port_mappings)]
    for where, value in values:
        if "\x00" in value:
            raise InvalidArgument(where, f"{value!r} contains a NUL byte")


def validate(spec: SandboxSpec, cgroup_manager: str) -> None:
    """INVALID_ARGUMENT naming the field when the spec cannot be built; nothing is created before this."""
    _check_nul(spec)
    meta = spec.metadata
    for name in ("name", "uid", "namespace"):
        value = getattr(meta, name)
        if not value:
            raise InvalidArgument(f"config.metadata.{name}", "must not be empty")
    if meta.attempt < 0:
        raise InvalidArgument("config.metadata.attempt", "must not be negative")
    if spec.hostname and not _HOSTNAME.match(spec.hostname):
        raise InvalidArgument("config.hostname", f"{spec.hostname!r} is not a valid host name")
    _check_path(spec.log_directory, "config.log_directory")
    if spec.pid_mode is NamespaceMode.TARGET:
        raise InvalidArgument("config.linux.security_context.namespace_options.pid", "TARGET is only for containers")
    for name, mode in (("network", spec.network_mode), ("ipc", spec.ipc_mode)):
        if mode not in (NamespaceMode.POD, NamespaceMode.NODE):
            raise InvalidArgument(
                f"config.linux.security_context.namespace_options.{name}", f"{mode.value} is not POD or NODE"
            )
    _check_userns(spec)
    _check_dns(spec.dns)
    _check_ports(spec.port_mappings)
    _check_sysctls(spec)
    check_cgroup_parent(spec.cgroup_parent, cgroup_manager)
