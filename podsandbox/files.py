"""The files a pod's containers mount: hostname, resolv.conf, hosts."""

from __future__ import annotations

import os
from pathlib import Path

from podsandbox.spec import DnsConfig

HOST_RESOLV_CONF = "/etc/resolv.conf"


Owner = tuple[int, int] | None  # (uid, gid) on the host; None: whoever writes (root)


def _write(path: Path, text: str, owner: Owner = None) -> None:
    """Write whole or not at all: containers bind-mount these files, a torn one is worse than none."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    if owner is not None:
        os.chown(tmp, *owner)
    os.replace(tmp, path)


def render_resolv_conf(dns: DnsConfig) -> str:
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n" if lines else ""


def write_resolv_conf(
    path: Path, dns: DnsConfig | None, host_resolv_conf: str = HOST_RESOLV_CONF, owner: Owner = None
) -> None:
    """From the pod's DNS config, or the host's resolv.conf when the kubelet gave none (host network)."""
    if dns is not None:
        _write(path, render_resolv_conf(dns), owner)
        return
    try:
        _write(path, Path(host_resolv_conf).read_text(), owner)
    except FileNotFoundError:
        _write(path, "", owner)


def write_hostname(path: Path, hostname: str, owner: Owner = None) -> None:
    _write(path, hostname + "\n", owner)


def render_hosts(hostname: str, ips: list[str]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{ip}\t{hostname}" for ip in ips if hostname]
    return "\n".join(lines) + "\n"


def write_hosts(path: Path, hostname: str, ips: list[str], owner: Owner = None) -> None:
    _write(path, render_hosts(hostname, ips), owner)
