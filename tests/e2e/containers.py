"""Containers through the daemon's socket: a pod, an image from a loopback registry, and what can be left behind.

Every pod of these tests gets its own cgroup parent (`/criopy-e2e-<hex>`), so
the check for leftover cgroups looks only at what this test made, and the
parent dirs (which the kubelet, not the runtime, owns in a real node) are
removed at the end.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from api.runtime.v1 import api_pb2 as pb
from cri.system import linux
from tests.e2e.pods import PodNet, pod_config
from tests.support import image_builder as ib
from tests.support.daemon_harness import Daemon
from tests.support.registry_harness import Registry
from tests.support.system import cgroup_dirs, conmon_pids, remove_cgroup_parent


def registries_yaml(host: str, extra: str = "") -> str:
    return f'image:\n  registries: [{{"prefix": "{host}", "insecure": true}}]\n' + extra


def push_image(
    registry: Registry, repo: str, config: ib.ImageConfig | None = None, layers: Iterable[ib.Layer] = ()
) -> str:
    image = ib.busybox_image(list(layers), config=config)
    ib.push(registry.url, repo, image, "latest")
    return f"{registry.host}/{repo}:latest"


@dataclass
class Env:
    daemon: Daemon
    net: PodNet
    image: str
    cgroup_parents: list[str] = field(default_factory=list)
    log_dirs: list[Path] = field(default_factory=list)

    @property
    def rt(self):
        return self.daemon.runtime()

    def pod(self, *, shared_pid: bool = False, **kwargs) -> tuple[str, pb.PodSandboxConfig]:
        return self.run_pod(self.pod_config(shared_pid=shared_pid, **kwargs))

    def pod_config(self, *, shared_pid: bool = False, **kwargs) -> pb.PodSandboxConfig:
        """A pod config with a log dir and cgroup parent of its own, both recorded for the clean-up."""
        log_dir = self.daemon.base / "logs" / secrets.token_hex(4)
        config = pod_config(shared_pid=shared_pid, log_directory=str(log_dir), **kwargs)
        parent = f"/criopy-e2e-{secrets.token_hex(4)}"
        config.linux.cgroup_parent = parent
        self.cgroup_parents.append(parent)
        self.log_dirs.append(log_dir)
        return config

    def run_pod(self, config: pb.PodSandboxConfig) -> tuple[str, pb.PodSandboxConfig]:
        resp = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60)
        return str(resp.pod_sandbox_id), config

    def container_config(
        self, name: str = "c", command: list[str] | None = None, image: str | None = None, **kwargs
    ) -> pb.ContainerConfig:
        return pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name),
            image=pb.ImageSpec(image=image or self.image),
            command=command or [],
            log_path=f"{name}.log",
            **kwargs,
        )

    def create(self, pod: tuple[str, pb.PodSandboxConfig], config: pb.ContainerConfig, timeout: float = 60) -> str:
        resp = self.rt.CreateContainer(
            pb.CreateContainerRequest(pod_sandbox_id=pod[0], config=config, sandbox_config=pod[1]), timeout=timeout
        )
        return str(resp.container_id)

    def start(self, cid: str) -> None:
        self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=30)

    def run(self, pod: tuple[str, pb.PodSandboxConfig], config: pb.ContainerConfig) -> str:
        cid = self.create(pod, config)
        self.start(cid)
        return cid

    def status(self, cid: str, verbose: bool = False) -> pb.ContainerStatusResponse:
        return self.rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid, verbose=verbose), timeout=10)

    def wait_exited(self, cid: str, timeout: float = 20) -> pb.ContainerStatus:
        status = self.wait_for(cid, lambda s: s.state == pb.CONTAINER_EXITED, timeout)
        assert status.state == pb.CONTAINER_EXITED, f"container {cid} still {status.state} after {timeout}s: {status}"
        return status

    def wait_for(self, cid: str, done: Callable[[pb.ContainerStatus], bool], timeout: float = 20) -> pb.ContainerStatus:
        deadline = time.monotonic() + timeout
        while True:
            current = self.status(cid).status
            if done(current) or time.monotonic() > deadline:
                return current
            time.sleep(0.02)

    def wait_released(self, cid: str, timeout: float = 10) -> bool:
        """Whether the daemon let go of an exited container's runc state and conmon (it does so in the background)."""
        state = self.daemon.runroot / "runc" / cid
        deadline = time.monotonic() + timeout
        while state.exists() or conmon_pids(cid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def stop(self, cid: str, timeout: int = 0, rpc_timeout: float = 60) -> None:
        self.rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=timeout), timeout=rpc_timeout)

    def remove(self, cid: str) -> None:
        self.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)

    def log_lines(self, pod: tuple[str, pb.PodSandboxConfig], name: str = "c") -> list[str]:
        path = Path(pod[1].log_directory) / f"{name}.log"
        return path.read_text().splitlines() if path.exists() else []

    def output(self, pod: tuple[str, pb.PodSandboxConfig], name: str = "c") -> str:
        """The container's output from its CRI log, partial lines joined."""
        text = ""
        for line in self.log_lines(pod, name):
            _, _, tag, rest = ([*line.split(" ", 3), "", "", ""])[:4]
            text += rest if tag == "P" else rest + "\n"
        return text

    def run_to_exit(self, pod: tuple[str, pb.PodSandboxConfig], config: pb.ContainerConfig) -> pb.ContainerStatus:
        return self.wait_exited(self.run(pod, config))

    def leftovers(self) -> dict[str, object]:
        """What containers could leave: mounts, conmon processes, cgroups, bundles, rootfs dirs, rows."""
        base = str(self.daemon.base)
        bundles = self.daemon.runroot / "containers"
        storage = self.daemon.root / "containers"
        return {
            "mounts": [m.mount_point for d in (storage, bundles) for m in linux.mounts_under(str(d))],
            "conmon": conmon_pids(base),
            "cgroups": [d for parent in self.cgroup_parents for d in cgroup_dirs(parent)],
            "bundles": sorted(os.listdir(bundles)) if bundles.exists() else [],
            "storage": sorted(os.listdir(storage)) if storage.exists() else [],
            "containers": list(self.rt.ListContainers(pb.ListContainersRequest()).containers),
        }

    def cleanup(self) -> None:
        for parent in self.cgroup_parents:
            remove_cgroup_parent(parent)


NOTHING: dict[str, object] = {"mounts": [], "conmon": [], "cgroups": [], "bundles": [], "storage": [], "containers": []}


@contextlib.contextmanager
def running_env(make_daemon: Callable[..., Daemon], registry: Registry, images: list[str], extra_yaml: str = ""):
    """A daemon on a fresh pod network with `images` pulled; every container, pod and the network removed after."""
    from tests.e2e.pods import remove_all_pods

    daemon = make_daemon(registries_yaml(registry.host, extra_yaml), start=False)
    net = PodNet.make(daemon)
    daemon.start()
    env = Env(daemon, net, images[0])
    try:
        for image in images:
            daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
        yield env
    finally:
        remove_all_containers(daemon)
        remove_all_pods(daemon)
        net.remove()
        env.cleanup()


def remove_all_containers(daemon: Daemon) -> None:
    if daemon.proc is None or daemon.proc.poll() is not None:
        return
    rt = daemon.runtime()
    for c in rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers:
        rt.RemoveContainer(pb.RemoveContainerRequest(container_id=c.id), timeout=60)
