"""Pod networks and pod requests for the sandbox e2e tests.

Each test network has its own bridge (cpb<hex>), its own /24 in 10.201.0.0/16
and host-local's dataDir under the daemon's directory, so tests never meet
each other or the host's own networks, and leave nothing behind.
"""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from api.runtime.v1 import api_pb2 as pb
from tests.support.daemon_harness import Daemon


def sh(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


@dataclass
class PodNet:
    bridge: str
    subnet: str  # "10.201.N"
    ipam_dir: Path
    conflist: Path

    @classmethod
    def make(cls, daemon: Daemon, extra_plugins: list[dict[str, object]] | None = None) -> PodNet:
        net = cls(
            bridge=f"cpb{secrets.token_hex(4)}",
            subnet=f"10.201.{random.randint(1, 254)}",
            ipam_dir=daemon.base / "ipam",
            conflist=daemon.cni_dir / "10-test.conflist",
        )
        net.write(extra_plugins or [])
        return net

    def plugins(self, extra: list[dict[str, object]]) -> list[dict[str, object]]:
        return [
            {
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(self.ipam_dir),
                    "ranges": [[{"subnet": f"{self.subnet}.0/24"}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
            *extra,
        ]

    def write(self, extra: list[dict[str, object]], bridge_type: str = "bridge", ipam_type: str = "host-local") -> None:
        plugins = self.plugins(extra)
        plugins[0]["type"] = bridge_type
        plugins[0]["ipam"]["type"] = ipam_type  # type: ignore[index]
        conf = {"cniVersion": "1.0.0", "name": f"net-{self.bridge}", "plugins": plugins}
        self.conflist.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.conflist.with_suffix(".tmp")
        tmp.write_text(json.dumps(conf))
        tmp.rename(self.conflist)

    @property
    def gateway(self) -> str:
        return f"{self.subnet}.1"

    def allocations(self) -> list[str]:
        return sorted(p.name for p in self.ipam_dir.rglob(f"{self.subnet}.*") if p.is_file())

    def bridge_ports(self) -> list[str]:
        out = sh("ip", "-j", "link", "show", "master", self.bridge, check=False)
        return [link["ifname"] for link in json.loads(out.stdout or "[]")]

    def remove(self) -> None:
        sh("ip", "link", "del", self.bridge, check=False)


def pod_config(
    name: str | None = None,
    *,
    uid: str | None = None,
    namespace: str = "e2e",
    attempt: int = 0,
    host_network: bool = False,
    shared_pid: bool = False,
    hostname: str = "",
    dns: pb.DNSConfig | None = None,
    ports: list[pb.PortMapping] | None = None,
    sysctls: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    log_directory: str = "",
) -> pb.PodSandboxConfig:
    name = name or f"pod-{secrets.token_hex(3)}"
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(
            name=name, uid=uid or secrets.token_hex(8), namespace=namespace, attempt=attempt
        ),
        hostname=hostname or name,
        log_directory=log_directory,
        dns_config=dns,
        port_mappings=ports or [],
        labels=labels or {},
        linux=pb.LinuxPodSandboxConfig(
            sysctls=sysctls or {},
            security_context=pb.LinuxSandboxSecurityContext(
                namespace_options=pb.NamespaceOption(
                    network=pb.NODE if host_network else pb.POD, pid=pb.POD if shared_pid else pb.CONTAINER
                )
            ),
        ),
    )


def info(daemon: Daemon, pod_id: str) -> dict[str, object]:
    resp = daemon.runtime().PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id, verbose=True))
    return dict(json.loads(resp.info["info"]))


def add_plugin(daemon: Daemon, name: str, script: str) -> None:
    """A CNI plugin of the test's own (a shell script, often a wrapper of Debian's), in a directory the daemon
    searches beside Debian's: call before the daemon starts."""
    plugins = daemon.base / "plugins"
    plugins.mkdir(exist_ok=True)
    plugin = plugins / name
    plugin.write_text(script)
    plugin.chmod(0o755)
    if str(plugins) not in daemon.extra_args:
        daemon.extra_args += ["--cni-plugin-dir", "/usr/lib/cni", "--cni-plugin-dir", str(plugins)]


def remove_all_pods(daemon: Daemon) -> None:
    """What a failed test left: stop and remove every pod through the daemon."""
    if daemon.proc is None or daemon.proc.poll() is not None:
        return
    rt = daemon.runtime()
    for pod in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)


SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(sys.argv[2].encode()); c.close()
"""


class PodServer:
    """A process in a pod's netns that answers every connection with a fixed word, then closes."""

    def __init__(self, netns: str, port: int, word: str) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={netns}", sys.executable, "-c", SERVER, str(port), word],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "listening", self.proc.stderr.read() if self.proc.stderr else ""

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def fetch(host: str, port: int, netns: str | None = None, timeout: float = 5) -> str:
    """Connect (from the host, or from inside netns) and read what the server says."""
    code = (
        "import socket, sys\n"
        "c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))\n"
        "print(c.recv(100).decode())\n"
    )
    argv = [sys.executable, "-c", code, host, str(port), str(timeout)]
    if netns:
        argv = ["nsenter", f"--net={netns}", *argv]
    deadline = time.monotonic() + timeout
    while True:
        out = sh(*argv, check=False, timeout=timeout + 5)
        if out.returncode == 0 or time.monotonic() > deadline:
            assert out.returncode == 0, out.stderr
            return out.stdout.strip()
        time.sleep(0.1)
