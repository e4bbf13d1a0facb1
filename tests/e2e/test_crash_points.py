"""Crash consistency, step by step: the daemon killed at each fault point, restarted, everything removed.

Each case runs a whole lifecycle (pull, pod, container started, stopped and
removed, a second container left running, pod stopped and removed, image
removed) with `CRIOPYTEST_FAULT_POINT` naming one step, so the daemon SIGKILLs
itself there. A restarted daemon must then let the kubelet remove everything
through the CRI, after which the node holds nothing of it: no mount, netns
pin, veth, address in host-local's store, cgroup, conmon, runc state, file
under root/runroot beyond the database, row.

The concurrent test kills the daemon at random instants while 12 pods with a
container each are being made (the address leak of issue 16 was found so).
"""

from __future__ import annotations

import contextlib
import random
import secrets
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.daemon.serve import SHUTDOWN_GRACE_SECONDS
from cri.system import faults, linux
from tests.e2e.containers import registries_yaml
from tests.e2e.pods import PodNet, add_plugin, pod_config
from tests.support.daemon_harness import Daemon
from tests.support.registry_harness import Registry
from tests.support.system import cgroup_dirs, conmon_pids, poll, process_gone, remove_cgroup_parent

# What a daemon keeps under its root and runroot when it holds no pod, container or image.
KEPT_FILES = {
    "root/state.db",
    "root/state.db-wal",
    "root/state.db-shm",
    "root/criopy.lock",
    "run/criopy.sock",
    "run/admin.sock",  # image import/export (criopy images)
}

STEPS = [
    "image.pull.fetched",
    "image.pull.unpacked",
    "sandbox.run.recorded",
    "sandbox.run.namespaces",
    "sandbox.run.cni-intent",
    "sandbox.run.cni-added",
    "sandbox.run.infra",
    "container.create.recorded",
    "container.create.bundle",
    "container.create.runtime",
    "container.start.started",
    "container.stop.signalled",
    "container.remove.runtime",
    "container.remove.files",
    "sandbox.stop.containers",
    "sandbox.stop.network",
    "sandbox.remove.stopped",
    "sandbox.remove.containers",
    "sandbox.remove.files",
    "image.remove.unindexed",
]


@dataclass
class Node:
    """One daemon on its own pod network and cgroup parent, and what it can leave on the node."""

    daemon: Daemon
    net: PodNet
    image: str
    cgroup_parent: str

    @property
    def rt(self):
        return self.daemon.runtime()

    def pod(self, shared_pid: bool = False) -> tuple[str, pb.PodSandboxConfig]:
        config = pod_config(shared_pid=shared_pid, log_directory=str(self.daemon.base / "logs"))
        config.linux.cgroup_parent = self.cgroup_parent
        return str(self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id), config

    def container(self, pod: tuple[str, pb.PodSandboxConfig], name: str, start: bool = True) -> str:
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name),
            image=pb.ImageSpec(image=self.image),
            command=["sleep", "3600"],
            log_path=f"{name}.log",
        )
        request = pb.CreateContainerRequest(pod_sandbox_id=pod[0], config=config, sandbox_config=pod[1])
        cid = str(self.rt.CreateContainer(request, timeout=60).container_id)
        if start:
            self.rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=30)
        return cid

    def pull(self) -> None:
        self.daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=self.image)), timeout=120)

    def remove_everything(self) -> None:
        """What the kubelet and its image GC do after a restart: remove every container, pod and image."""
        rt, images = self.rt, self.daemon.images()
        for c in rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers:
            rt.RemoveContainer(pb.RemoveContainerRequest(container_id=c.id), timeout=60)
        for p in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=p.id), timeout=60)
        for i in images.ListImages(pb.ListImagesRequest(), timeout=30).images:
            images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=i.id)), timeout=60)

    def leftovers(self) -> dict[str, object]:
        base = self.daemon.base
        runroot, root = self.daemon.runroot, self.daemon.root
        files = sorted(
            str(p.relative_to(base))
            for top in (root, runroot)
            for p in top.rglob("*")
            if not p.is_dir() and str(p.relative_to(base)) not in KEPT_FILES
        )
        images = self.daemon.images().ListImages(pb.ListImagesRequest(), timeout=30).images
        return {
            "mounts": [m.mount_point for m in linux.mounts_under(str(base))],
            "veths": self.net.bridge_ports(),
            "ips": self.net.allocations(),
            "cgroups": cgroup_dirs(self.cgroup_parent),
            "conmon": conmon_pids(str(base)),
            "files": files,
            "pods": [p.id for p in self.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items],
            "containers": [c.id for c in self.rt.ListContainers(pb.ListContainersRequest(), timeout=30).containers],
            "images": [i.id for i in images],
        }


NOTHING: dict[str, object] = {
    "mounts": [],
    "veths": [],
    "ips": [],
    "cgroups": [],
    "conmon": [],
    "files": [],
    "pods": [],
    "containers": [],
    "images": [],
}


@pytest.fixture
def node(make_daemon, registry: Registry, busybox: str) -> Iterator[Node]:
    daemon = make_daemon(registries_yaml(registry.host), start=False)
    n = Node(daemon, PodNet.make(daemon), busybox, f"/criopy-e2e-{secrets.token_hex(4)}")
    try:
        yield n
    finally:
        # A test that failed between a kill and the restart left a dead daemon: a live one removes its pods.
        with contextlib.suppress(grpc.RpcError, AssertionError):
            if daemon.proc is not None and daemon.proc.poll() is not None:
                restart(daemon)
            if daemon.proc is not None:
                n.remove_everything()
        daemon.stop()
        n.net.remove()
        remove_cgroup_parent(n.cgroup_parent)


def lifecycle(node: Node, shared_pid: bool) -> None:
    node.pull()
    pod = node.pod(shared_pid)
    first = node.container(pod, "first")
    node.rt.StopContainer(pb.StopContainerRequest(container_id=first, timeout=0), timeout=60)
    node.rt.RemoveContainer(pb.RemoveContainerRequest(container_id=first), timeout=60)
    node.container(pod, "second")  # left running: the pod's stop and removal take it
    node.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)
    node.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)
    node.daemon.images().RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=node.image)), timeout=60)


def restart(daemon: Daemon) -> None:
    daemon.env.pop(faults.ENV, None)
    daemon.start()


@pytest.mark.parametrize("step", STEPS)
def test_killed_at_a_step_then_restarted_leaves_nothing_once_removed(node: Node, step: str) -> None:
    node.daemon.env[faults.ENV] = step
    node.daemon.start()
    with pytest.raises(grpc.RpcError) as err:
        lifecycle(node, shared_pid=step == "sandbox.run.infra")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    assert node.daemon.proc is not None and node.daemon.proc.wait(10) == -signal.SIGKILL
    assert f"step={step}" in node.daemon.log()

    restart(node.daemon)
    node.remove_everything()
    assert node.leftovers() == NOTHING


def test_the_whole_lifecycle_without_a_fault_leaves_nothing(node: Node) -> None:
    """The control: the same check passes on a lifecycle that ran to its end."""
    node.daemon.start()
    lifecycle(node, shared_pid=True)
    assert node.leftovers() == NOTHING


def _create_pod_with_container(node: Node) -> None:
    with contextlib.suppress(grpc.RpcError):  # the daemon dies under it
        node.container(node.pod(), "c")


def test_killed_at_random_instants_during_twelve_concurrent_creations_leaks_nothing(node: Node) -> None:
    rounds, rng = 20, random.Random(16)
    node.daemon.start()
    node.pull()
    for _ in range(rounds):
        with ThreadPoolExecutor(max_workers=12) as pool:
            for _ in range(12):
                pool.submit(_create_pod_with_container, node)
            time.sleep(rng.uniform(0.1, 2.0))
            assert node.daemon.proc is not None
            node.daemon.proc.kill()
            node.daemon.proc.wait(10)
        node.daemon.start()
        node.remove_everything()
        assert node.leftovers() == NOTHING
        node.pull()


# A bridge whose ADD has allocated the address and made the veth, then takes its time to answer: the
# instant between a plugin's allocation and the runtime caching its result.
SLOW_ANSWER = """\
#!/bin/sh
[ "$CNI_COMMAND" = ADD ] || exec /usr/lib/cni/bridge
out=$(/usr/lib/cni/bridge); rc=$?
echo $$ > {marker}
sleep {seconds}
echo "$out"; exit $rc
"""


# An IPAM plugin that waits before it allocates: bridge has made the veth in the pod's netns (and holds
# the netns open) when the daemon is killed; had the plugins lived on, host-local would allocate after the
# restarted daemon's DEL, and bridge would finish the ADD for a pod nobody knows of.
SLOW_IPAM = """\
#!/bin/sh
[ "$CNI_COMMAND" = ADD ] || exec /usr/lib/cni/host-local
echo $$ > {marker}
sleep {seconds}
exec /usr/lib/cni/host-local
"""


def _slow_plugin(node: Node, name: str, script: str, seconds: float) -> Path:
    """A plugin of the pod network's list, from a script (marker, seconds); the path it touches then."""
    marker = node.daemon.base / "allocated"
    add_plugin(node.daemon, name, script.format(marker=marker, seconds=seconds))
    return marker


def _slow_answering_bridge(node: Node, seconds: float) -> Path:
    """The pod network's bridge answers ADD `seconds` after allocating; the path it touches then."""
    marker = _slow_plugin(node, "slowbridge", SLOW_ANSWER, seconds)
    node.net.write([], bridge_type="slowbridge")
    return marker


def _kill_during_pod_network_add(node: Node, marker: Path, allocated: int) -> tuple[int, float]:
    """SIGKILL the daemon once the slow plugin of a pod's ADD wrote its marker; the plugin's pid, and when
    the marker was seen (time.monotonic())."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(node.pod)
        assert _wait(marker.exists), node.daemon.log()
        seen_at = time.monotonic()
        assert len(node.net.allocations()) == allocated  # what the plugins hold; the runtime has no result
        assert node.daemon.proc is not None
        node.daemon.proc.kill()
        node.daemon.proc.wait(10)
        with pytest.raises(grpc.RpcError):
            pending.result(30)
    return int(marker.read_text()), seen_at


def test_killed_while_a_plugin_holds_an_allocated_address_frees_it(node: Node) -> None:
    marker = _slow_answering_bridge(node, 30)
    node.daemon.start()
    plugin, _ = _kill_during_pod_network_add(node, marker, allocated=1)
    node.daemon.start()
    assert process_gone(plugin), "the restarted daemon left the plugin running"
    node.remove_everything()
    assert node.leftovers() == NOTHING


def test_a_plugin_left_running_by_a_killed_daemon_never_allocates_after_recovery(node: Node) -> None:
    seconds = 4.0
    marker = _slow_plugin(node, "slowipam", SLOW_IPAM, seconds)
    node.net.write([], ipam_type="slowipam")
    node.daemon.start()
    plugin, sleeping_since = _kill_during_pod_network_add(node, marker, allocated=0)
    node.daemon.start()  # recovery: the plugin killed, then DEL for the attachment it was making
    assert process_gone(plugin), "the restarted daemon left the plugin running"
    node.remove_everything()
    # Past the instant the plugin would have allocated, had it lived: nothing holds an address.
    time.sleep(max(0.0, sleeping_since + seconds + 1.0 - time.monotonic()))
    assert node.net.allocations() == []
    assert node.leftovers() == NOTHING


def _wait(predicate: Callable[[], bool], timeout: float = 15) -> bool:
    return poll(predicate, timeout, interval=0.02)


def _forget_every_pod_and_container(daemon: Daemon) -> None:
    """What a lost or hand-edited database looks like: no row explains what is on the node."""
    with sqlite3.connect(daemon.root / "state.db") as db:
        db.execute("DELETE FROM containers")
        db.execute("DELETE FROM sandboxes")
        db.execute("DELETE FROM name_reservations")


def test_orphans_that_no_record_explains_are_removed_at_start(node: Node) -> None:
    node.daemon.start()
    node.pull()
    pod = node.pod(shared_pid=True)
    node.container(pod, "running")
    node.container(pod, "created", start=False)
    assert node.leftovers()["ips"] != []
    # Names criopy never makes, in its own dirs: not its to remove.
    strangers = [node.daemon.runroot / "containers" / "notes.txt", node.daemon.root / "containers" / "keep" / "file"]
    for path in strangers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("not criopy's")
    assert node.daemon.proc is not None
    node.daemon.proc.kill()
    node.daemon.proc.wait(10)
    _forget_every_pod_and_container(node.daemon)

    restart(node.daemon)
    assert "orphan removed" in node.daemon.log()
    node.remove_everything()
    left = node.leftovers()
    assert left["files"] == sorted(str(p.relative_to(node.daemon.base)) for p in strangers)
    assert {**left, "files": []} == NOTHING


@pytest.mark.parametrize("seconds", [2, 30], ids=["finishes-within-grace", "outlasts-grace"])
def test_sigterm_during_a_creation_finishes_it_or_undoes_it(node: Node, seconds: float) -> None:
    """A stop in the middle of RunPodSandbox: the pod is made if it can be within the grace period, and
    is otherwise undone; either way the daemon exits 0 and a restart finds nothing half-made."""
    marker = _slow_answering_bridge(node, seconds)
    node.daemon.start()
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(node.pod)
        assert _wait(marker.exists), node.daemon.log()
        node.daemon.signal(signal.SIGTERM)
        assert node.daemon.proc is not None and node.daemon.proc.wait(SHUTDOWN_GRACE_SECONDS + 10) == 0
        if seconds < SHUTDOWN_GRACE_SECONDS:
            pod_id, _config = pending.result(5)
        else:
            with pytest.raises(grpc.RpcError) as err:
                pending.result(5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    restart(node.daemon)
    pods = node.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items
    if seconds < SHUTDOWN_GRACE_SECONDS:
        assert [(p.id, p.state) for p in pods] == [(pod_id, pb.SANDBOX_READY)]
    else:
        assert pods == []
        assert node.net.allocations() == []  # undone at the stop, not only at the next start
    node.remove_everything()
    assert node.leftovers() == NOTHING
