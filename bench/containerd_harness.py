"""Runs Debian's containerd (1.6, its CRI plugin) on a private root, state and socket, for peer benchmarks.

Everything containerd keeps is under one temporary directory (root, state,
runc's state, registry hosts, CNI configs), except what containerd 1.6
hard-codes: shim sockets in /run/containerd/s and pod netns in /var/run/netns.
``stop()`` kills what is left (shims by PID, runc containers by ID), unmounts
what containerd mounted under its directories and removes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from api.runtime.v1 import api_pb2 as pb
from api.runtime.v1 import api_pb2_grpc

CRI = '[plugins."io.containerd.grpc.v1.cri"'
CGROUP_ROOT = Path("/sys/fs/cgroup")
SHIM_SOCKETS = Path("/run/containerd")
NETNS_DIR = Path("/var/run/netns")  # containerd 1.6 pins pod netns here as cni-<uuid>
NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin works in


def run(*argv: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check, stdin=subprocess.DEVNULL)


def ensure_containerd() -> str:
    """The containerd binary; installs Debian's package first when it is missing (says so)."""
    return ensure_binary("containerd", "containerd")


def ensure_binary(name: str, package: str) -> str:
    """The path of `name`; installs Debian's `package` first when it is missing (says so)."""
    found = shutil.which(name)
    if found:
        return found
    print(f"{name} is not on PATH: running `apt-get install -y {package}`", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", package], check=True, timeout=900, env=env)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"apt-get installed {package} but {name} is still not on PATH")
    return found


def containerd_version(binary: str) -> str:
    return run(binary, "--version", timeout=10).stdout.strip()


def toml(value: str) -> str:
    """A TOML basic string (JSON's escaping is a subset TOML accepts)."""
    return json.dumps(value)


@dataclass
class Containerd:
    base: Path  # private directory; keep it short: unix socket paths are limited to 108 bytes
    cni_dir: Path  # conf_dir: the caller writes the pod network's conflist there
    registry_host: str  # "127.0.0.1:<port>", pulled over plain HTTP
    sandbox_image: str
    binary: str = "containerd"
    proc: subprocess.Popen[bytes] | None = None
    _fresh_cgroups: list[Path] = field(default_factory=list)
    _shim_dir_existed: bool = True
    _netns_before: set[str] | None = None  # known once started

    @property
    def socket(self) -> str:
        return str(self.base / "containerd.sock")

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def state(self) -> Path:
        return self.base / "state"

    @property
    def runc_root(self) -> Path:
        return self.base / "runc"

    @property
    def config_file(self) -> Path:
        return self.base / "config.toml"

    @property
    def log_path(self) -> Path:
        return self.base / "containerd.log"

    @property
    def hosts_dir(self) -> Path:
        return self.base / "certs.d"

    def config_text(self) -> str:
        runc = shutil.which("runc") or "/usr/sbin/runc"
        return "\n".join(
            [
                "version = 2",
                f"root = {toml(str(self.root))}",
                f"state = {toml(str(self.state))}",
                'disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",'
                ' "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]',
                "[grpc]",
                f"  address = {toml(self.socket)}",
                "[ttrpc]",
                f"  address = {toml(self.socket + '.ttrpc')}",
                "[debug]",
                '  address = ""',
                '  level = "info"',
                "[metrics]",
                '  address = ""',
                '[plugins."io.containerd.internal.v1.opt"]',
                f"  path = {toml(str(self.base / 'opt'))}",
                f"{CRI}]",
                f"  sandbox_image = {toml(self.sandbox_image)}",
                '  stream_server_address = "127.0.0.1"',
                '  stream_server_port = "0"',
                # These machines withhold CAP_SYS_RESOURCE: the pause container's oom_score_adj -998 would make
                # runc's init die ("can't get final child's PID from pipe: EOF"); clamp it to containerd's own.
                "  restrict_oom_score_adj = true",
                f"{CRI}.containerd]",
                '  snapshotter = "overlayfs"',
                '  default_runtime_name = "runc"',
                f"{CRI}.containerd.runtimes.runc]",
                '  runtime_type = "io.containerd.runc.v2"',
                f"{CRI}.containerd.runtimes.runc.options]",
                "  SystemdCgroup = false",
                f"  BinaryName = {toml(runc)}",
                f"  Root = {toml(str(self.runc_root))}",
                f"{CRI}.cni]",
                '  bin_dir = "/usr/lib/cni"',
                f"  conf_dir = {toml(str(self.cni_dir))}",
                "  max_conf_num = 1",
                f"{CRI}.registry]",
                f"  config_path = {toml(str(self.hosts_dir))}",
                "",
            ]
        )

    def write_registry_hosts(self) -> None:
        """hosts.toml so that the loopback registry is resolved and pulled over plain HTTP."""
        directory = self.hosts_dir / self.registry_host
        directory.mkdir(parents=True, exist_ok=True)
        url = f"http://{self.registry_host}"
        (directory / "hosts.toml").write_text(
            f'server = {toml(url)}\n[host.{toml(url)}]\n  capabilities = ["pull", "resolve"]\n  skip_verify = true\n'
        )

    def start(self, timeout: float = 30) -> Containerd:
        self.base.mkdir(parents=True, exist_ok=True)
        self.cni_dir.mkdir(parents=True, exist_ok=True)
        self._fresh_cgroups = [d / NAMESPACE for d in CGROUP_ROOT.iterdir() if not (d / NAMESPACE).exists()]
        self._shim_dir_existed = SHIM_SOCKETS.exists()
        self._netns_before = set(os.listdir(NETNS_DIR)) if NETNS_DIR.exists() else set()
        self.write_registry_hosts()
        self.config_file.write_text(self.config_text())
        self._launch()
        self.wait_ready(timeout)
        return self

    def crash_and_restart(self, timeout: float = 60) -> None:
        """SIGKILL the daemon (shims and containers go on) and start it again on the same state."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self._launch()
        self.wait_ready(timeout)

    def _launch(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--config", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # a Ctrl-C at the terminal reaches the benchmark, which stops us in order
            )

    def wait_ready(self, timeout: float) -> None:
        """Until the CRI plugin answers Version and Status says the runtime is ready."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"containerd exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                status = self.runtime().Status(pb.StatusRequest(), timeout=2)
                if all(c.status for c in status.status.conditions):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"containerd's CRI plugin was not ready within {timeout}s:\n{self.log_tail()}")

    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        return api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{self.socket}"))

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def shim_pids(self) -> list[int]:
        """containerd-shim-runc-v2 processes serving this containerd (their -address is our socket)."""
        return [pid for pid, argv in processes("containerd-shim") if self.socket in argv]

    def stop(self) -> None:
        """Stops containerd and removes everything it left: shims, runc containers, mounts, directories."""
        self._stop_daemon()
        for pid in self.shim_pids():
            kill(pid)
        delete_runc_containers(self.runc_root / NAMESPACE)
        unmount_under(self.base)
        self._remove_netns()
        for cgroup in self._fresh_cgroups:
            remove_empty_tree(cgroup)
        if not self._shim_dir_existed:
            shutil.rmtree(SHIM_SOCKETS, ignore_errors=True)
        shutil.rmtree(self.base, ignore_errors=True)

    def _remove_netns(self) -> None:
        """The cni-* netns pins that appeared while we ran and outlived our pods (none when removal worked)."""
        if self._netns_before is None or not NETNS_DIR.exists():
            return
        for name in set(os.listdir(NETNS_DIR)) - self._netns_before:
            if name.startswith("cni-"):
                run("umount", str(NETNS_DIR / name), check=False)
                (NETNS_DIR / name).unlink(missing_ok=True)

    def _stop_daemon(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def processes(comm: str) -> list[tuple[int, str]]:
    """(pid, NUL-separated argv) of every process whose comm is comm (comm is cut at 15 bytes)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != comm[:15]:
                continue
            found.append((int(entry.name), (entry / "cmdline").read_bytes().decode(errors="replace")))
        except OSError:
            continue  # the process went away
    return found


def delete_runc_containers(root: Path) -> None:
    """`runc delete --force` every container runc keeps state for under root (a private --root)."""
    if not root.exists():
        return
    runc = shutil.which("runc") or "/usr/sbin/runc"
    listed = run(runc, "--root", str(root), "list", "--format", "json", check=False)
    for container in json.loads(listed.stdout or "null") or []:
        run(runc, "--root", str(root), "delete", "--force", container["id"], check=False)


def kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def unmount_under(base: Path) -> None:
    """Unmounts every mount point at or below base, deepest first (lazily when busy)."""
    prefix = str(base.resolve()).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                points.append(point)
    for point in sorted(set(points), key=lambda p: p.count("/"), reverse=True):
        if run("umount", point, check=False).returncode != 0:
            run("umount", "-l", point, check=False)


def remove_empty_tree(directory: Path) -> None:
    """rmdir a cgroup directory and its (empty) children, deepest first; busy ones stay."""
    if not directory.is_dir():
        return
    for child in sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            child.rmdir()
    with contextlib.suppress(OSError):
        directory.rmdir()
