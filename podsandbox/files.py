"""The files a pod's containers mount: hostname, resolv.conf, hosts."""

from __future__ import annotations

import os
from pathlib import Path

from podsandbox.spec import DnsConfig

HOST_RESOLV_CONF = "/etc/resolv.conf"


def _write(path: Path, text: str) -> None:
    """Write whole or not at all: containers bind-mount these files, a torn one is worse than none."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def render_resolv_conf(dns: DnsConfig) -> str:
    lines = [f"nameserver {server}" for server in dns.servers]
    if dns.searches:
        lines.append("search " + " ".join(dns.searches))
    if dns.options:
        lines.append("options " + " ".join(dns.options))
    return "\n".join(lines) + "\n" if lines else ""


def write_resolv_conf(path: Path, dns: DnsConfig | None, host_resolv_conf: str = HOST_RESOLV_CONF) -> None:
    """From the pod's DNS config, or the host's resolv.conf when the kubelet gave none (host network)."""
    if dns is not None:
        _write(path, render_resolv_conf(dns))
        return
    try:
        _write(path, Path(host_resolv_conf).read_text())
    except FileNotFoundError:
        _write(path, "")


def write_hostname(path: Path, hostname: str) -> None:
    _write(path, hostname + "\n")


def render_hosts(hostname: str, ips: list[str]) -> str:
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    lines += [f"{ip}\t{hostname}" for ip in ips if hostname]
    return "\n".join(lines) + "\n"


def write_hosts(path: Path, hostname: str, ips: list[str]) -> None:
    _write(path, render_hosts(hostname, ips))
