"""Pulls that stream: layers downloaded in parallel (bounded by image.max_concurrent_downloads) and unpacked
by worker processes as their bytes arrive; a bad layer is refused mid-stream, a cancelled pull frees everything,
and a blob two pulls need at once is fetched once. Against the loopback registry through the fault proxy.
"""

from __future__ import annotations

import gzip
import os
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from tests.support import image_builder as ib
from tests.support.daemon_harness import Daemon
from tests.support.fault_proxy import FaultProxy
from tests.support.registry_harness import Registry
from tests.support.system import children_of, unpack_hosts


@pytest.fixture
def registry():
    with Registry() as r:
        yield r


def daemon_for(make_daemon: Callable[..., Daemon], host: str, extra: str = "") -> Daemon:
    return make_daemon(f'image:\n  registries: [{{"prefix": "{host}", "insecure": true}}]\n' + extra)


def pull(daemon: Daemon, ref: str, timeout: float = 120) -> str:
    request = pb.PullImageRequest(image=pb.ImageSpec(image=ref))
    return str(daemon.images().PullImage(request, timeout=timeout).image_ref)


def random_layers(count: int, mb: float, tag: str) -> list[ib.Layer]:
    """Layers of incompressible files (gzip level 0: fast to build), each with a marker file first."""
    size = int(mb * (1 << 20))
    return [
        ib.Layer(
            [
                ib.Dir(f"/{tag}{i}"),
                ib.File(f"/{tag}{i}/first", b"first\n"),
                ib.File(f"/{tag}{i}/data", os.urandom(size)),
            ],
            level=0,
        )
        for i in range(count)
    ]


def workers_of(daemon: Daemon) -> list[int]:
    """The daemon's unpack worker processes (busy or idle in its pool): the children of its unpack host."""
    assert daemon.proc is not None
    return [worker for host in unpack_hosts(daemon.proc.pid) for worker in children_of(host)]


def busy_workers(daemon: Daemon) -> list[int]:
    """Workers holding anything under the daemon's root: an unpack going on (idle ones hold nothing)."""
    busy = []
    for pid in workers_of(daemon):
        try:
            targets = [os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir()]
        except OSError:
            continue  # it exited meanwhile
        if any(t.startswith(str(daemon.root)) for t in targets):
            busy.append(pid)
    return busy


def nothing_stored(daemon: Daemon) -> bool:
    stored = daemon.stored()
    return stored["layers"] == [] and stored["temp"] == [] and stored["blobs"] == [] and not busy_workers(daemon)


def wait_until_nothing_stored(daemon: Daemon, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not nothing_stored(daemon):
        if time.monotonic() > deadline:
            raise AssertionError(
                f"still there after {timeout}s: {daemon.stored()}, busy workers {busy_workers(daemon)}"
            )
        time.sleep(0.05)


def test_layers_download_in_parallel_and_their_files_land_before_their_blobs(make_daemon, registry) -> None:
    image = ib.busybox_image(random_layers(3, 6, "par"))
    ib.push(registry.url, "e2e/parallel", image, tag="v1")
    big = [layer.digest for layer in image.layers[1:]]
    with FaultProxy(registry.url) as proxy:
        proxy.slow(4_000_000)  # each big layer takes ~1.5 s: long enough to watch
        daemon = daemon_for(make_daemon, proxy.host)
        seen_streaming: list[str] = []
        busy_at_once = [0]  # the most worker processes seen unpacking at the same time
        done = threading.Event()

        def watch() -> None:
            # A layer's first file in its unpack dir while its blob is not yet in the store: unpacked as it arrives.
            layers, blobs = daemon.root / "layers", daemon.root / "blobs" / "sha256"
            while not done.is_set():
                try:
                    firsts = list(layers.glob("tmp-*/diff/par*/first"))
                except OSError:
                    firsts = []  # a tmp dir renamed or removed while globbing
                for first in firsts:
                    layer = big[int(first.parent.name.removeprefix("par"))]
                    if not (blobs / layer.removeprefix("sha256:")).exists() and layer not in seen_streaming:
                        seen_streaming.append(layer)
                busy_at_once[0] = max(busy_at_once[0], len(busy_workers(daemon)))
                time.sleep(0.02)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            assert pull(daemon, f"{proxy.host}/e2e/parallel:v1") == image.image_id
        finally:
            done.set()
            watcher.join()
        assert sorted(seen_streaming) == sorted(big)
        assert busy_at_once[0] >= 2  # layers unpack in parallel, each in its own process
        assert proxy.max_concurrent_blob_gets() == 3  # the default image.max_concurrent_downloads
        assert all(proxy.blob_gets(d) == 1 for d in big)
        top = daemon.root / "layers"
        assert daemon.stored()["temp"] == []
        assert len(daemon.stored()["layers"]) == 4 and not busy_workers(daemon)
        assert 1 <= len(workers_of(daemon)) <= 3  # kept for the next pull, no more than the downloads at once
        assert [p.stat().st_size for p in top.glob("*/diff/par2/data")] == [6 << 20]


def test_max_concurrent_downloads_bounds_the_downloads(make_daemon, registry) -> None:
    image = ib.busybox_image(random_layers(3, 1, "one"))
    ib.push(registry.url, "e2e/serial", image, tag="v1")
    with FaultProxy(registry.url) as proxy:
        proxy.slow(4_000_000)
        daemon = daemon_for(make_daemon, proxy.host, "  max_concurrent_downloads: 1\n")
        assert pull(daemon, f"{proxy.host}/e2e/serial:v1") == image.image_id
        assert proxy.max_concurrent_blob_gets() == 1
        assert len(proxy.blob_records()) == 5  # the config, then the 4 layers one by one


def test_a_corrupt_layer_is_refused_mid_stream_and_nothing_becomes_visible(make_daemon, registry) -> None:
    # A blob the registry serves faithfully (its digest matches) but whose gzip breaks after 1 MiB of 24.
    tar = ib.build_tar([ib.Dir("/bad"), ib.File("/bad/data", os.urandom(1 << 20))])
    broken = ib.Layer.from_tar(tar)
    broken.__dict__["blob"] = gzip.compress(tar, 0) + os.urandom(23 << 20)  # garbage where a gzip member must be
    cut = ib.Layer.from_tar(tar, level=0)
    cut.__dict__["blob"] = cut.blob[: len(cut.blob) // 2]  # the gzip stream ends half-way
    corrupt_image = ib.busybox_image([broken], config=ib.ImageConfig(labels={"kind": "corrupt"}))
    cut_image = ib.busybox_image([cut], config=ib.ImageConfig(labels={"kind": "cut"}))
    ib.push(registry.url, "e2e/bad", corrupt_image, tag="corrupt")
    ib.push(registry.url, "e2e/bad", cut_image, tag="cut")
    with FaultProxy(registry.url) as proxy:
        proxy.slow(8_000_000, digest=broken.digest)  # the whole blob would take 3 s
        daemon = daemon_for(make_daemon, proxy.host)
        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, f"{proxy.host}/e2e/bad:corrupt")
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert broken.digest in (err.value.details() or "") and "corrupt" in (err.value.details() or "")
        (record,) = proxy.blob_records(broken.digest)
        assert record.sent < broken.size // 2  # given up while the registry was still sending
        wait_until_nothing_stored(daemon)

        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, f"{proxy.host}/e2e/bad:cut")
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert cut.digest in (err.value.details() or "") and "truncated" in (err.value.details() or "")
        wait_until_nothing_stored(daemon)
        images = daemon.images().ListImages(pb.ListImagesRequest(), timeout=30).images
        assert list(images) == []


def test_a_pull_given_up_by_its_client_frees_everything(make_daemon, registry) -> None:
    image = ib.busybox_image(random_layers(3, 8, "gone"))
    ib.push(registry.url, "e2e/gone", image, tag="v1")
    with FaultProxy(registry.url) as proxy:
        proxy.slow(2_000_000)  # ~4 s a layer: the deadline falls mid-download, workers busy
        daemon = daemon_for(make_daemon, proxy.host)
        ref = f"{proxy.host}/e2e/gone:v1"
        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, ref, timeout=1.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until_nothing_stored(daemon)
        assert "image pull failed" in daemon.log() and "cancelled" in daemon.log()
        proxy.clear()
        assert pull(daemon, ref) == image.image_id  # and a later pull starts afresh
        assert daemon.stored()["temp"] == []


def test_two_images_sharing_a_layer_fetch_it_once(make_daemon, registry) -> None:
    shared = random_layers(1, 4, "shared")
    first = ib.busybox_image([*shared, *random_layers(1, 1, "a")])
    second = ib.busybox_image([*shared, *random_layers(1, 1, "b")])
    ib.push(registry.url, "e2e/first", first, tag="v1")
    ib.push(registry.url, "e2e/second", second, tag="v1")
    with FaultProxy(registry.url) as proxy:
        proxy.slow(4_000_000)  # both pulls are in the shared layer at once
        daemon = daemon_for(make_daemon, proxy.host)
        refs = [f"{proxy.host}/e2e/first:v1", f"{proxy.host}/e2e/second:v1"]
        with ThreadPoolExecutor(2) as pool:
            ids = list(pool.map(lambda ref: pull(daemon, ref), refs))
        assert ids == [first.image_id, second.image_id]
        assert proxy.blob_gets(shared[0].digest) == 1
        assert proxy.blob_gets(first.layers[0].digest) == 1  # busybox, shared too
        # One unpacked chain per layer: busybox and the shared layer once, each top layer once.
        assert len(daemon.stored()["layers"]) == 4
        assert daemon.stored()["temp"] == []


def test_the_vfs_driver_downloads_in_parallel_and_applies_each_layer_on_a_copy_of_its_parent(
    make_daemon, registry
) -> None:
    image = ib.whiteout_image()
    ib.push(registry.url, "e2e/vfs", image, tag="v1")
    with FaultProxy(registry.url) as proxy:
        # The layers' downloads overlap: the two small ones (a few hundred bytes) take a while too, else they
        # were over within 5 ms and overlapped each other by chance only.
        for layer in image.layers[1:]:
            proxy.slow(max(1, layer.size * 4), digest=layer.digest)
        proxy.slow(2_000_000)
        daemon = daemon_for(make_daemon, proxy.host, "storage:\n  driver: vfs\n")
        assert pull(daemon, f"{proxy.host}/e2e/vfs:v1") == image.image_id
        assert proxy.max_concurrent_blob_gets() == 3
    (top,) = [p for p in (daemon.root / "layers").glob("*/diff") if (p / "opq/new").exists()]
    assert (top / "data/keep").read_bytes() == b"keep" and (top / "data/replaced").read_bytes() == b"new"
    assert not (top / "data/gone").exists() and not (top / "data/dir").exists()
    assert sorted(os.listdir(top / "opq")) == ["new"]
    assert (top / "dir-then-file").read_bytes() == b"now a file"
    assert (top / "bin/sh").exists()  # the whole filesystem: busybox's layer copied up
    assert daemon.stored()["temp"] == [] and not busy_workers(daemon)


def test_a_layer_with_sparse_files_pulls_with_its_holes(make_daemon, registry, tmp_path) -> None:
    """A layer made by GNU tar --sparse (posix format: PAX sparse 1.0) pulls as containerd pulls it."""
    src = tmp_path / "src"
    src.mkdir()
    holes = src / "holes"
    with holes.open("wb") as f:
        f.truncate(16 << 20)
        f.seek(8 << 20)
        f.write(b"middle")
        f.seek((16 << 20) - 3)
        f.write(b"end")
    made = subprocess.run(
        ["tar", "--sparse", "--format=posix", "-C", str(src), "-cf", "-", "holes"],
        capture_output=True,
        check=True,
        timeout=60,
    )
    assert b"GNU.sparse" in made.stdout  # tar really wrote it sparse
    image = ib.busybox_image([ib.Layer.from_tar(made.stdout)])
    ib.push(registry.url, "e2e/sparse", image, tag="v1")
    daemon = daemon_for(make_daemon, registry.host)
    assert pull(daemon, f"{registry.host}/e2e/sparse:v1") == image.image_id
    [pulled] = list((daemon.root / "layers").glob("*/diff/holes"))
    assert pulled.read_bytes() == holes.read_bytes()
    assert pulled.stat().st_blocks * 512 < 1 << 20  # the holes stayed holes
