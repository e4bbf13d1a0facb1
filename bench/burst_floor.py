"""The floor of a pod burst: the runc, conmon and CNI work of criopy's pods, driven without a daemon.

What no runtime built on these binaries can beat on this machine. Plain Python threads (as many as the
burst's clients) do, for each pod, what starting and removing criopy's pod costs the machine at the least,
with no gRPC, no state database, no logging and no bookkeeping:

start
  - the pod's net, uts and ipc namespaces: a fresh thread unshares them, brings `lo` up, sets the hostname
    and bind-mounts them onto pin files (as criopy does; no exec, no pause process);
  - the sandbox files the container bind-mounts (hostname, resolv.conf, hosts) and its /dev/shm tmpfs;
  - CNI ADD of the bench's conflist: each plugin of the list (bridge, which execs host-local; portmap)
    exec'd with the CNI environment and its config on stdin, the previous result chained, as libcni does;
  - the container: criopy's exec set, `conmon` (criopy's command line, from cri.oci.conmon.conmon_argv)
    which runs `runc create` (and so `runc init`) and reports the pid on its sync pipe, then the start
    through runc's exec fifo, as criopy starts a runc container (cri.oci.exec_fifo: no `runc start` exec).
    The bundle's config.json is the one criopy writes for the bench's busybox container (capabilities,
    mounts, masked paths, the pod's namespaces by path, a cgroup under the same kind of parent); its root
    is an overlay of one prepared busybox directory, mounted for the container as criopy mounts it
    (cri.storage.rootfs: every CRI runtime on overlay mounts one per container, containerd too);

removal
  - SIGKILL to the container's init (criopy's StopContainer with timeout 0 signals it directly too), the
    wait for conmon to exit, `runc delete --force` (criopy's call; no `runc kill` exec);
  - CNI DEL of each plugin in reverse order, with the cached result;
  - the overlay unmounted, the shm unmount, the namespace pins released, the bundle and sandbox directories
    removed.

What criopy adds on top is its own: the daemon (RPCs, state commits, logs), and the execs and kernel work
the floor does not do (conmon moved into its own cgroups).

`Floor(..., overlay=False)` gives every container the prepared directory itself, as the floor did before
it mounted overlays: the figure without the overlay's mount, unmount and lookups.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import tarfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.containerd_harness import CGROUP_ROOT, delete_runc_containers, remove_empty_tree, unmount_under
from cri.oci import bundle, exec_fifo
from cri.oci.conmon import ConmonLaunch, conmon_argv
from cri.oci.conmon import Runtime as OciRuntime
from cri.storage import rootfs
from cri.system import linux
from podsandbox import nschild
from tests.e2e.pods import PodNet
from tests.support import image_builder as ib

TIMEOUT = 60.0  # seconds for any one helper process
PLUGIN_DIRS = ("/usr/lib/cni", "/opt/cni/bin")
SHM_SIZE = 64 * 1024 * 1024
CAPABILITIES = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_KILL",
]


class FloorError(Exception):
    """A helper of the floor failed; its stderr is in the message."""


def helper(argv: list[str], stdin: bytes = b"", env: dict[str, str] | None = None) -> bytes:
    """Run one helper to its end; its stdout, or FloorError with its stderr."""
    done = subprocess.run(argv, input=stdin, capture_output=True, env=env, timeout=TIMEOUT, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).decode(errors="replace").strip()
        raise FloorError(f"{' '.join(argv)}: exit status {done.returncode}: {said}")
    return done.stdout


@dataclass
class FloorPod:
    """One pod of the floor and what was made for it, so that removal (or clean-up) undoes just that."""

    index: int
    id: str
    dir: Path  # the sandbox files and the bundle
    pins: dict[str, str] = field(default_factory=dict)  # kind -> pin file
    shm: str = ""
    rootfs: str = ""  # the container's overlay, merged (empty: the shared directory, or not made yet)
    cni_results: list[tuple[dict[str, Any], dict[str, Any]]] = field(default_factory=list)  # (config, result)
    container_pid: int = 0
    conmon_pid: int = 0

    @property
    def bundle(self) -> Path:
        return self.dir / "bundle"


class Floor:
    """The driver: its own directory, bridge, cgroup parent and runc root; `stop` removes them all."""

    def __init__(self, base: Path, subnet: str, *, overlay: bool = True) -> None:
        self.base = base
        self.overlay = overlay
        self.net = PodNet(
            bridge=f"cbf{secrets.token_hex(4)}",
            subnet=subnet,
            ipam_dir=base / "ipam",
            conflist=base / "cni" / "10-bench.conflist",
        )
        self.cgroup_top = f"cvc-floor-{secrets.token_hex(4)}"
        self.runtime = OciRuntime(name="runc", binary=self._which("runc"), root=str(base / "runc"))
        self.conmon = self._which("conmon")
        self.rootfs = base / "rootfs"
        self.conflist: dict[str, Any] = {}  # the bench's bridge conflist, as written by prepare
        self._count = 0
        self._lock = threading.Lock()
        self._live: dict[str, FloorPod] = {}

    @staticmethod
    def _which(name: str) -> str:
        found = shutil.which(name)
        if found is None:
            raise FloorError(f"{name} not found")
        return found

    def prepare(self) -> None:
        """The busybox rootfs, the conflist (no loopback plugin, as the runtimes get) and the directories."""
        self.base.mkdir(parents=True, exist_ok=True)
        self.rootfs.mkdir()
        with tarfile.open(fileobj=io.BytesIO(ib.busybox_layer().tar)) as tar:
            tar.extractall(self.rootfs, filter="tar")
        self.net.write([])
        self.conflist = json.loads(self.net.conflist.read_text())

    def stop(self) -> None:
        """Everything the floor made, also after a failure half-way: pods, mounts, bridge, cgroups, files."""
        for pod in list(self._live.values()):
            self._remove_leftover(pod)
        delete_runc_containers(Path(self.runtime.root))
        unmount_under(self.base)
        self.net.remove()
        for hierarchy in CGROUP_ROOT.iterdir():
            remove_empty_tree(hierarchy / self.cgroup_top)
        shutil.rmtree(self.base, ignore_errors=True)

    # ---- bursts ---------------------------------------------------------------------------------

    def start_burst(self, pods: int, clients: int) -> list[FloorPod]:
        with ThreadPoolExecutor(clients) as pool:
            return list(pool.map(lambda _: self.start_pod(), range(pods)))

    def remove_burst(self, pods: list[FloorPod], clients: int) -> None:
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(self.remove_pod, pods))

    # ---- one pod --------------------------------------------------------------------------------

    def start_pod(self) -> FloorPod:
        with self._lock:
            self._count += 1
            index = self._count
        pod_id = secrets.token_hex(32)
        pod = FloorPod(index, pod_id, self.base / "pods" / pod_id)
        self._live[pod_id] = pod
        hostname = f"floor-{index}"
        pod.dir.mkdir(parents=True)
        self._namespaces(pod, hostname)
        self._files(pod, hostname)
        self._cni_add(pod)
        self._create(pod, hostname)
        asyncio.run(exec_fifo.start(exec_fifo.fifo_path(self.runtime.root, pod.id), pod.container_pid))
        return pod

    def remove_pod(self, pod: FloorPod) -> None:
        if pod.container_pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pod.container_pid, signal.SIGKILL)
            _wait_gone(pod.conmon_pid)
        helper(self.runtime.argv("delete", "--force", pod.id))
        pod.container_pid = 0
        self._cni_del(pod)
        self._release(pod)

    def _release(self, pod: FloorPod) -> None:
        """The pod's mounts, pins and files, once its container and network are gone."""
        if pod.rootfs:
            rootfs.remove(pod.dir / "rootfs")
        if pod.shm:
            linux.umount_if_mounted(pod.shm)
        for path in pod.pins.values():
            linux.umount_if_mounted(path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        shutil.rmtree(pod.dir, ignore_errors=True)
        self._live.pop(pod.id, None)

    def _remove_leftover(self, pod: FloorPod) -> None:
        """A pod a failure left: each step tried on its own (CNI DEL frees its address and veth even when the
        container was never made); the sweeps of `stop` catch what this misses."""
        if pod.container_pid > 0:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pod.container_pid, signal.SIGKILL)
        with contextlib.suppress(FloorError, subprocess.TimeoutExpired):
            helper(self.runtime.argv("delete", "--force", pod.id))
        with contextlib.suppress(FloorError, subprocess.TimeoutExpired, KeyError):
            self._cni_del(pod)
        with contextlib.suppress(OSError, rootfs.RootfsError):
            self._release(pod)

    def _namespaces(self, pod: FloorPod, hostname: str) -> None:
        pins = {kind: str(self.base / "ns" / kind / pod.id) for kind in ("net", "uts", "ipc")}

        def make() -> None:  # in a thread of its own, left in the new namespaces, which then exits
            nschild.unshare_and_configure(pins, hostname, {})
            for kind, path in pins.items():
                os.makedirs(os.path.dirname(path), exist_ok=True)
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444))
                pod.pins[kind] = path
                linux.mount(f"/proc/thread-self/ns/{kind}", path, None, linux.MS_BIND)

        _in_fresh_thread(make)

    def _files(self, pod: FloorPod, hostname: str) -> None:
        (pod.dir / "hostname").write_text(hostname + "\n")
        (pod.dir / "resolv.conf").write_text(Path("/etc/resolv.conf").read_text())
        (pod.dir / "hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n")
        shm = pod.dir / "shm"
        shm.mkdir()
        linux.mount("shm", str(shm), "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, f"size={SHM_SIZE}")
        pod.shm = str(shm)

    # ---- CNI ------------------------------------------------------------------------------------

    def _plugin(self, conf: dict[str, Any], command: str, pod: FloorPod) -> bytes:
        plugin = next((Path(d) / conf["type"] for d in PLUGIN_DIRS if (Path(d) / conf["type"]).exists()), None)
        if plugin is None:
            raise FloorError(f"CNI plugin {conf['type']} not found in {':'.join(PLUGIN_DIRS)}")
        env = {
            "CNI_COMMAND": command,
            "CNI_CONTAINERID": pod.id,
            "CNI_NETNS": pod.pins["net"],
            "CNI_IFNAME": "eth0",
            "CNI_ARGS": f"IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=floor-{pod.index}",
            "CNI_PATH": ":".join(PLUGIN_DIRS),
            "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        }
        return helper([str(plugin)], json.dumps(conf).encode(), env)

    def _plugin_conf(self, raw: dict[str, Any], prev: dict[str, Any] | None) -> dict[str, Any]:
        conf = {**raw, "name": self.conflist["name"], "cniVersion": self.conflist["cniVersion"]}
        if prev is not None:
            conf["prevResult"] = prev
        return conf

    def _cni_add(self, pod: FloorPod) -> None:
        prev: dict[str, Any] | None = None
        for raw in self.conflist["plugins"]:
            conf = self._plugin_conf(raw, prev)
            prev = json.loads(self._plugin(conf, "ADD", pod))
            pod.cni_results.append((raw, prev))

    def _cni_del(self, pod: FloorPod) -> None:
        result = pod.cni_results[-1][1] if pod.cni_results else None
        for raw, _ in reversed(pod.cni_results):
            self._plugin(self._plugin_conf(raw, result), "DEL", pod)
        pod.cni_results.clear()

    # ---- the container --------------------------------------------------------------------------

    def _create(self, pod: FloorPod, hostname: str) -> None:
        if self.overlay:
            pod.rootfs = str(rootfs.create(pod.dir / "rootfs", [self.rootfs], "overlay"))
        pod.bundle.mkdir()
        (pod.bundle / "config.json").write_text(json.dumps(self._spec(pod, hostname)))
        launch = ConmonLaunch(
            id=pod.id,
            name=f"k8s_sleep0_floor-{pod.index}",
            bundle=str(pod.bundle),
            log_path=str(pod.dir / "sleep0.log"),
            exit_dir=str(self.base / "exits"),
            persist_dir=str(pod.bundle / "persist"),
            socket_dir=str(self.base / "sockets"),
        )
        for directory in (launch.exit_dir, launch.persist_dir, launch.socket_dir):
            os.makedirs(directory, 0o700, exist_ok=True)
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        try:
            env = {**os.environ, "_OCI_SYNCPIPE": str(write_fd)}
            try:
                subprocess.run(
                    conmon_argv(self.conmon, self.runtime, launch),
                    env=env,
                    cwd=pod.bundle,
                    pass_fds=(write_fd,),
                    capture_output=True,
                    timeout=TIMEOUT,
                    check=True,
                )
            finally:
                os.close(write_fd)
            line = _read_line(read_fd)
        finally:
            os.close(read_fd)
        said = json.loads(line or b"{}")
        if int(said.get("data", -1)) <= 0:
            raise FloorError(f"conmon: runc create failed: {said.get('message', line)!r}")
        pod.container_pid = int(said["data"])
        pod.conmon_pid = int(Path(launch.monitor_pidfile).read_text())

    def _spec(self, pod: FloorPod, hostname: str) -> dict[str, Any]:
        """The config.json criopy writes for the bench's busybox container, with this pod's paths."""

        def bind(source: str, destination: str, *extra: str) -> dict[str, Any]:
            options = ["rbind", "rw", "nosuid", "nodev", *extra]
            return {"destination": destination, "type": "bind", "source": source, "options": options}

        # criopy's defaults, /dev/shm being the pod's (bound, as every container of a pod shares it)
        mounts = [
            bind(pod.shm, "/dev/shm", "noexec") if m["destination"] == "/dev/shm" else m
            for m in bundle.default_mounts()
        ]
        mounts += [
            bind(str(pod.dir / "hostname"), "/etc/hostname"),
            bind(str(pod.dir / "resolv.conf"), "/etc/resolv.conf"),
            bind(str(pod.dir / "hosts"), "/etc/hosts"),
        ]
        namespaces = [{"type": "network", "path": pod.pins["net"]}]
        namespaces += [{"type": kind, "path": pod.pins[kind]} for kind in ("uts", "ipc")]
        namespaces += [{"type": "mount"}, {"type": "pid"}]
        return {
            "ociVersion": "1.0.2",
            "process": {
                "terminal": False,
                "user": {"uid": 0, "gid": 0, "additionalGids": [0]},
                "args": ["/bin/sleep", "3600"],
                "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", f"HOSTNAME={hostname}"],
                "cwd": "/",
                "capabilities": {kind: CAPABILITIES for kind in ("bounding", "effective", "permitted")},
                "noNewPrivileges": False,
                "oomScoreAdj": 0,
            },
            "root": {"path": pod.rootfs or str(self.rootfs), "readonly": False},
            "mounts": mounts,
            "linux": {
                "resources": {"devices": [{"allow": False, "access": "rwm"}]},
                "namespaces": namespaces,
                "maskedPaths": list(bundle.MASKED_PATHS),
                "readonlyPaths": list(bundle.READONLY_PATHS),
                "cgroupsPath": f"/{self.cgroup_top}/pod{pod.index}/floor-{pod.id}",
            },
            "hostname": hostname,
        }


def _in_fresh_thread(fn: Callable[[], None]) -> None:
    """Run fn in a thread that exits afterwards (it may be left in other namespaces); its exception raised."""
    failed: list[BaseException] = []

    def run() -> None:
        try:
            fn()
        except BaseException as exc:  # handed to the caller
            failed.append(exc)

    thread = threading.Thread(target=run, name="floor-namespaces")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def _read_line(fd: int) -> bytes:
    """The first line on fd (conmon's sync pipe), b'' at EOF; gives up after TIMEOUT."""
    out = b""
    deadline = time.monotonic() + TIMEOUT
    while not out.endswith(b"\n"):
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise FloorError(f"conmon said nothing on its sync pipe within {TIMEOUT:g}s")
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        out += chunk
    return out.strip()


def _wait_gone(pid: int) -> None:
    """Until pid (conmon, not our child) has exited: its pidfd turns readable."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        if not select.select([pidfd], [], [], TIMEOUT)[0]:
            raise FloorError(f"conmon {pid} still runs {TIMEOUT:g}s after its container was killed")
    finally:
        os.close(pidfd)
