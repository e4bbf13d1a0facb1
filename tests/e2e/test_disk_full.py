"""A full storage root, through the daemon's socket (root): pulls and state writes fail cleanly, nothing is left.

Each test mounts a small tmpfs as the daemon's storage root (the runroot and
the daemon's log stay on the host disk), so "the disk is full" is exact and
cheap: a layer bigger than the tmpfs fills it while downloading, a gzip of
zeros fills it while unpacking, and a ballast file the test writes leaves the
state database no room for a row. The answer is RESOURCE_EXHAUSTED (gRPC's
"the entire file system is out of space"), its message says there is no space
left and names the storage root, what the failed request wrote is gone, and
the daemon goes on serving.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import Env, registries_yaml, remove_all_containers
from tests.e2e.pods import PodNet, pod_config, remove_all_pods
from tests.support import image_builder as ib
from tests.support.daemon_harness import Daemon
from tests.support.registry_harness import Registry

MIB = 1 << 20
ROOT_SIZE = 24 * MIB  # holds the state database and busybox, not the big layers below
BALLAST = "ballast"  # the file that fills the root


# -- the small storage root --


def _unmount(path: Path) -> None:
    """Unmounts path and anything mounted below it; lazily if something still holds it."""
    if subprocess.run(["mountpoint", "-q", str(path)], check=False).returncode != 0:
        return
    done = subprocess.run(["umount", "--recursive", str(path)], capture_output=True, check=False)
    if done.returncode != 0:
        subprocess.run(["umount", "--recursive", "--lazy", str(path)], capture_output=True, check=False)


@pytest.fixture
def small_root(make_daemon: Callable[..., Daemon], registry: Registry) -> Iterator[Env]:
    """A daemon whose storage root is a ROOT_SIZE tmpfs; pods, the daemon and the mount are gone at the end."""
    daemon = make_daemon(registries_yaml(registry.host), start=False)
    env = Env(daemon, PodNet.make(daemon), image="")
    daemon.root.mkdir(parents=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={ROOT_SIZE},mode=0711", "criopy-e2e-full", str(daemon.root)], check=True
    )
    try:
        daemon.start()
        yield env
    finally:
        (daemon.root / BALLAST).unlink(missing_ok=True)  # removals write rows too
        with contextlib.suppress(grpc.RpcError):
            remove_all_containers(daemon)
        with contextlib.suppress(grpc.RpcError):
            remove_all_pods(daemon)
        daemon.stop()
        env.net.remove()
        env.cleanup()
        _unmount(daemon.root)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bfree * st.f_frsize


def fill(path: Path) -> None:
    """Writes `path` until the file system has not one byte left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (b"\xa5" * MIB, b"\xa5" * 4096, b"\xa5"):
            try:
                while os.write(fd, chunk):
                    pass
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(fd)
    assert free_bytes(path.parent) == 0


def pull(daemon: Daemon, ref: str) -> str:
    return str(daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=120).image_ref)


def assert_no_space(err: grpc.RpcError, daemon: Daemon) -> None:
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (err.code(), err.details())
    message = err.details() or ""
    assert "no space left" in message.lower(), message
    assert str(daemon.root) in message, message


def assert_serving(env: Env, images: list[str]) -> None:
    """Version and ListImages answer, with exactly `images`."""
    assert env.rt.Version(pb.VersionRequest(), timeout=10).runtime_name
    listed = env.daemon.images().ListImages(pb.ListImagesRequest(), timeout=10).images
    assert sorted(t for i in listed for t in i.repo_tags) == sorted(images)


def run_echo(env: Env, image: str, word: str) -> None:
    """A host-network pod and a container from `image` that prints `word`; both removed after."""
    pod = env.pod(host_network=True)
    cid = env.run(pod, env.container_config(command=["echo", word], image=image))
    assert env.wait_exited(cid).exit_code == 0
    assert env.output(pod) == word + "\n"
    env.remove(cid)
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)


# -- images --


@pytest.fixture(scope="module")
def small_image(registry: Registry) -> str:
    image = ib.busybox_image([ib.Layer([ib.File("/small", b"small\n")])])
    ib.push(registry.url, "e2e/small", image, "v1")
    return f"{registry.host}/e2e/small:v1"


def _big_file_image(name: str, content: bytes, level: int) -> ib.Image:
    return ib.busybox_image([ib.Layer([ib.Dir("/big"), ib.File(f"/big/{name}", content)], level=level)])


@pytest.mark.parametrize("where", ["download", "unpack"])
def test_a_pull_that_fills_the_root_fails_frees_what_it_wrote_and_the_daemon_serves_on(
    small_root: Env, registry: Registry, small_image: str, where: str
) -> None:
    env, daemon = small_root, small_root.daemon
    if where == "download":
        # Random bytes stored uncompressed: the blob itself does not fit.
        image = _big_file_image("random", os.urandom(ROOT_SIZE + 8 * MIB), level=0)
        assert image.layers[1].size > ROOT_SIZE
    else:
        # Zeros gzipped: a blob of some 50 KiB that unpacks to more than the whole root.
        image = _big_file_image("zeros", bytes(ROOT_SIZE + 8 * MIB), level=9)
        assert image.layers[1].size < MIB
    ib.push(registry.url, f"e2e/{where}-too-big", image, "v1")
    before, free_before = daemon.stored(), free_bytes(daemon.root)

    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, f"{registry.host}/e2e/{where}-too-big:v1")
    assert_no_space(err.value, daemon)
    # Layers stream into their blobs and unpacks at once, in parallel: whichever meets the full root
    # first is named (the big one, or busybox's when the big one filled the root under it).
    details = err.value.details() or ""
    assert re.search(r"(blob|layer) sha256:", details) and any(layer.digest in details for layer in image.layers)

    assert daemon.stored() == before  # no blob, no layer and no temp file of the failed pull
    assert free_bytes(daemon.root) == free_before
    assert_serving(env, [])
    assert pull(daemon, small_image)
    assert_serving(env, [small_image])
    run_echo(env, small_image, f"after a full {where}")


def test_a_state_database_on_a_full_root_refuses_rows_with_a_clear_error_and_stays_whole(
    small_root: Env, registry: Registry, small_image: str
) -> None:
    env, daemon = small_root, small_root.daemon
    pull(daemon, small_image)
    # The same image under a second tag: pulling it needs no blob and no layer, only rows in the database.
    other = small_image.replace(":v1", ":other")
    ib.push(registry.url, "e2e/small", ib.busybox_image([ib.Layer([ib.File("/small", b"small\n")])]), "other")
    config = pod_config(host_network=True)
    config.linux.cgroup_parent = f"/criopy-e2e-{secrets.token_hex(4)}"
    env.cgroup_parents.append(config.linux.cgroup_parent)
    stored_before = daemon.stored()
    ballast = daemon.root / BALLAST
    fill(ballast)

    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, other)
    assert_no_space(err.value, daemon)
    with pytest.raises(grpc.RpcError) as err:
        env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60)
    assert_no_space(err.value, daemon)

    # Nothing half-made, and the daemon answers, reads included.
    assert_serving(env, [small_image])
    assert env.daemon.images().ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=other))).image.id == ""
    assert list(env.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items) == []
    assert daemon.stored() == stored_before

    ballast.unlink()
    assert pull(daemon, other)
    assert_serving(env, [small_image, other])
    pod_id = env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id  # same name
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    run_echo(env, other, "after the ballast")

    assert daemon.stop() == 0
    db = sqlite3.connect(f"file:{daemon.root / 'state.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        db.close()
