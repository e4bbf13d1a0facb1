"""The unpack worker process, driven as the daemon drives it (UnpackProcess): following a blob file as it is
written, and from a complete one."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import stat
import sys
import time
from collections import deque
from pathlib import Path

import pytest

from cri.storage.unpack import UnpackError, UnpackResult, unpack_layer
from cri.storage.unpack_process import UnpackJob, UnpackPool, UnpackProcess, UnpackWorkerError
from cri.system.linux import proc_stat
from tests.support.layer_tar import MEDIA_TYPES, build_layer, directory, file, hardlink, symlink
from tests.support.system import children_of, process_gone

# Modes the worker (umask 0, no chmod where the creation mode is right) must give back exactly.
ENTRIES = [
    directory("etc", 0o755),
    directory("srv", 0o2775),
    directory("usr", 0o755),
    directory("usr/bin", 0o711),
    file("etc/plain", b"a\n", 0o644),
    file("etc/group-writable", b"b\n", 0o664),
    file("etc/secret", b"c\n", 0o400),
    file("etc/open", b"d\n", 0o777),
    file("usr/bin/setuid", b"#!/bin/sh\n", 0o4755),
    file("srv/sticky", b"e\n", 0o1644),
    file("srv/big", os.urandom(3 << 20), 0o640),
    symlink("bin", "usr/bin"),
    hardlink("etc/plain-again", "etc/plain"),
]


def tree(root: Path) -> dict[str, tuple[str, int, int, int, int, bytes]]:
    """path -> (kind, mode bits, uid, gid, mtime in ns, content or link target), as a user would compare them."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            kind = "symlink" if stat.S_ISLNK(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "file"
            data = os.readlink(path).encode() if kind == "symlink" else path.read_bytes() if kind == "file" else b""
            out[str(path.relative_to(root))] = (
                kind,
                stat.S_IMODE(st.st_mode),
                st.st_uid,
                st.st_gid,
                st.st_mtime_ns,
                data,
            )
    return out


class GrowingBlob:
    """A blob file written piece by piece, as the daemon's content writer does while it downloads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.size = 0
        path.write_bytes(b"")

    def append(self, piece: bytes) -> int:
        with self.path.open("ab") as out:
            out.write(piece)
        self.size += len(piece)
        return self.size


async def following(blob: bytes, media_type: str, dest: Path, file: Path, piece: int = 65536) -> UnpackResult:
    pool = UnpackPool()
    growing = GrowingBlob(file)
    try:
        job = await pool.start(UnpackJob(media_type, dest, "overlay", label="sha256:feed"), file, follow=True)
        for i in range(0, len(blob), piece):
            await job.grown(growing.append(blob[i : i + piece]))
        return await job.finish()
    finally:
        await pool.close()


async def from_file(path: Path, media_type: str, dest: Path) -> UnpackResult:
    pool = UnpackPool()
    try:
        return await (await pool.start(UnpackJob(media_type, dest, "overlay", label="sha256:file"), path)).finish()
    finally:
        await pool.close()


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_the_worker_gives_the_tree_and_result_of_an_unpack_in_process(tmp_path, compression):
    layer = build_layer(ENTRIES, compression)
    blob = tmp_path / "blob"
    blob.write_bytes(layer.blob)
    for name in ("in-process", "followed", "file"):
        (tmp_path / name).mkdir()
    expected = unpack_layer(blob, layer.media_type, tmp_path / "in-process")
    followed = asyncio.run(following(layer.blob, layer.media_type, tmp_path / "followed", tmp_path / "growing"))
    assert followed == expected
    assert asyncio.run(from_file(blob, layer.media_type, tmp_path / "file")) == expected
    assert expected.diff_id == layer.diff_id
    reference = tree(tmp_path / "in-process")
    assert reference["srv/sticky"][1] == 0o1644 and reference["etc/group-writable"][1] == 0o664
    assert tree(tmp_path / "followed") == reference
    assert tree(tmp_path / "file") == reference
    for name in ("followed", "file"):
        assert (tmp_path / name / "usr/bin/setuid").stat().st_mode & 0o7777 == 0o4755


def test_a_corrupt_stream_is_refused_by_the_worker_while_it_is_fed(tmp_path):
    layer = build_layer([file("data", os.urandom(1 << 20))], "gzip")
    garbage = layer.blob + os.urandom(8 << 20)  # no gzip member where the next must start
    (tmp_path / "d").mkdir()
    growing = GrowingBlob(tmp_path / "blob")

    async def feed() -> int:
        pool = UnpackPool()
        try:
            job = UnpackJob(MEDIA_TYPES["gzip"], tmp_path / "d", "overlay", "sha256:bad")
            worker = await pool.start(job, growing.path, follow=True)
            fed = 0
            with pytest.raises(UnpackError, match=r"layer sha256:bad: corrupt or truncated archive") as err:
                for i in range(0, len(garbage), 65536):
                    await worker.grown(growing.append(garbage[i : i + 65536]))
                    fed += 65536
                    await asyncio.sleep(0.001)  # as a download gives the worker time between chunks
                await worker.finish()
            assert "sha256:bad" in str(err.value)
            assert pool.idle_pids() == []  # a worker that failed is not used again
            return fed
        finally:
            await pool.close()

    fed = asyncio.run(feed())
    assert fed < len(garbage)  # refused on a write, before the input ended


def test_a_worker_that_dies_is_reported_naming_the_layer(tmp_path):
    (tmp_path / "d").mkdir()

    async def killed() -> None:
        pool = UnpackPool()
        job = UnpackJob(MEDIA_TYPES["gzip"], tmp_path / "d", "overlay", "sha256:dies")
        worker = await pool.start(job, GrowingBlob(tmp_path / "blob").path, follow=True)
        os.kill(worker.pid, signal.SIGKILL)  # as the OOM killer would
        with pytest.raises(UnpackError, match=r"layer sha256:dies: the unpack worker"):
            await worker.finish()
        await pool.close()

    asyncio.run(killed())


def test_a_worker_serves_layer_after_layer_and_idle_ones_are_bounded(tmp_path):
    layers = [build_layer([file(f"f{i}", f"{i}\n".encode(), 0o640)], "gzip") for i in range(4)]

    async def main() -> None:
        pool = UnpackPool(keep=1)
        try:
            pids = []
            for i, layer in enumerate(layers):
                (tmp_path / str(i)).mkdir()
                growing = GrowingBlob(tmp_path / f"blob{i}")
                unpack = UnpackJob(layer.media_type, tmp_path / str(i), "overlay", f"sha256:{i}")
                job = await pool.start(unpack, growing.path, follow=True)
                await job.grown(growing.append(layer.blob))
                await job.grown(growing.append(bytes(4096)))  # zeros after the gzip stream: skipped to the end
                assert (await job.finish()).diff_id == layer.diff_id
                pids += pool.idle_pids()
            assert len(set(pids)) == 1 and len(pids) == 4  # one process, four layers
            again = tmp_path / "again"
            again.write_bytes(build_layer([file("again", b"x")], "gzip").blob)
            first = await pool.start(UnpackJob(layers[0].media_type, tmp_path / "0", "overlay", "sha256:a"), again)
            second = await pool.start(UnpackJob(layers[0].media_type, tmp_path / "1", "overlay", "sha256:b"), again)
            for job in (first, second):
                await job.finish()
            assert len(pool.idle_pids()) == 1  # the second worker went away: keep=1
        finally:
            await pool.close()
        assert pool.idle_pids() == []

    asyncio.run(main())
    for i in range(4):
        assert (tmp_path / str(i) / f"f{i}").stat().st_mode & 0o777 == 0o640


def test_a_blob_file_shorter_than_announced_fails_the_layer_and_nothing_waits_forever(tmp_path):
    layer = build_layer([file("data", os.urandom(1 << 20))], "gzip")
    (tmp_path / "d").mkdir()
    growing = GrowingBlob(tmp_path / "blob")

    async def main() -> None:
        pool = UnpackPool()
        try:
            job = UnpackJob(layer.media_type, tmp_path / "d", "overlay", "sha256:short")
            worker = await pool.start(job, growing.path, follow=True)
            growing.append(layer.blob[:1000])
            with pytest.raises(UnpackError, match=r"layer sha256:short: .*ends at 1000 bytes, 5000 were announced"):
                await worker.grown(5000)
                await worker.finish(timeout=60)
            assert pool.idle_pids() == []
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_worker_finds_criopy_where_the_daemon_did_from_any_directory(tmp_path, monkeypatch):
    # An installed daemon: its module path need not name the source tree (an editable install's finder
    # gives it the package instead, and the worker runs without site), nor is its directory the tree.
    root = Path(__file__).resolve().parents[2]
    monkeypatch.setattr("sys.path", [p for p in sys.path if p and Path(p).resolve() != root])
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.chdir(tmp_path)
    layer = build_layer(ENTRIES, "gzip")
    blob = tmp_path / "blob"
    blob.write_bytes(layer.blob)
    (tmp_path / "out").mkdir()
    result = asyncio.run(from_file(blob, layer.media_type, tmp_path / "out"))
    assert result.diff_id == layer.diff_id
    assert (tmp_path / "out/etc/plain").read_bytes() == b"a\n"


def job_into(dest: Path, label: str) -> UnpackJob:
    return UnpackJob(MEDIA_TYPES["gzip"], dest, "overlay", label)


async def warm_host(pool: UnpackPool) -> int:
    await pool.warm()
    assert pool.host.pid is not None
    return pool.host.pid


def parent_of(pid: int) -> int:
    found = proc_stat(pid)
    assert found is not None, f"process {pid} is gone"
    return found.ppid


async def until(check, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "not within the time"
        await asyncio.sleep(0.01)


def test_workers_are_forked_from_one_host_and_gone_with_it_once_the_pool_closes(tmp_path):
    layers = [build_layer([file(f"f{i}", os.urandom(1 << 20))], "gzip") for i in range(3)]
    for i, layer in enumerate(layers):
        (tmp_path / f"blob{i}").write_bytes(layer.blob)
        (tmp_path / str(i)).mkdir()

    async def main() -> tuple[int, list[int]]:
        pool = UnpackPool(keep=3)
        try:
            jobs = [
                await pool.start(job_into(tmp_path / str(i), f"sha256:{i}"), tmp_path / f"blob{i}") for i in range(3)
            ]
            host = pool.host.pid
            assert host is not None and parent_of(host) == os.getpid()
            assert Path(f"/proc/{host}/comm").read_text() == "unpack-host\n"
            workers = [job.pid for job in jobs]
            assert len(set(workers)) == 3
            for pid in workers:
                assert parent_of(pid) == host
                await until(lambda pid=pid: Path(f"/proc/{pid}/comm").read_text() == "unpack-worker\n")
            results = await asyncio.gather(*(job.finish() for job in jobs))
            assert [r.diff_id for r in results] == [layer.diff_id for layer in layers]
            assert sorted(pool.idle_pids()) == sorted(workers)
        finally:
            await pool.close()
        return host, workers

    host, workers = asyncio.run(main())
    for pid in [host, *workers]:
        assert process_gone(pid), f"process {pid} outlived the pool"


def test_a_host_that_dies_fails_the_layer_on_it_and_the_next_job_gets_a_new_host(tmp_path):
    layer = build_layer([file("data", os.urandom(1 << 20))], "gzip")
    (tmp_path / "blob").write_bytes(layer.blob)
    for name in ("d", "again"):
        (tmp_path / name).mkdir()

    async def main() -> None:
        pool = UnpackPool()
        try:
            growing = GrowingBlob(tmp_path / "growing")
            job = await pool.start(job_into(tmp_path / "d", "sha256:orphan"), growing.path, follow=True)
            host = pool.host.pid
            assert host is not None
            os.kill(host, signal.SIGKILL)
            await until(lambda: process_gone(job.pid))  # its worker dies with it
            with pytest.raises(UnpackError, match=r"sha256:orphan: the unpack worker was lost with the unpack host"):
                await job.grown(growing.append(layer.blob))
                await job.finish()
            await until(lambda: pool.host.pid is None)
            again = await pool.start(job_into(tmp_path / "again", "sha256:again"), tmp_path / "blob")
            assert (await again.finish()).diff_id == layer.diff_id
            assert pool.host.pid not in (None, host)
        finally:
            await pool.close()

    asyncio.run(main())
    assert (tmp_path / "again/data").stat().st_size == 1 << 20


def test_a_start_cancelled_while_the_host_forks_leaves_no_worker(tmp_path):
    (tmp_path / "d").mkdir()

    async def main() -> None:
        pool = UnpackPool()
        try:
            host = await warm_host(pool)
            start = asyncio.create_task(pool.start(job_into(tmp_path / "d", "sha256:c"), tmp_path / "blob"))
            for _ in range(3):  # as far as the wait for the host's answer: the request is on its way
                await asyncio.sleep(0)
            assert not start.done()
            start.cancel()
            with pytest.raises(asyncio.CancelledError):
                await start
            await until(lambda: children_of(host) == [] and pool.host._asked == deque())
            assert pool.idle_pids() == []
        finally:
            await pool.close()

    asyncio.run(main())


def test_the_pool_leaves_no_descriptor_open(tmp_path):
    good = build_layer([file("data", b"x\n")], "gzip")
    (tmp_path / "good").write_bytes(good.blob)
    (tmp_path / "bad").write_bytes(os.urandom(4096))

    async def main() -> None:
        pool = UnpackPool(keep=1)
        try:
            for i in range(4):  # layers that unpack, and layers that fail
                (tmp_path / f"d{i}").mkdir()
                blob = tmp_path / ("bad" if i % 2 else "good")
                job = await pool.start(job_into(tmp_path / f"d{i}", f"sha256:{i}"), blob)
                if i % 2:
                    with pytest.raises(UnpackError):
                        await job.finish()
                else:
                    await job.finish()
            killed = await pool.start(job_into(tmp_path / "d0", "sha256:k"), tmp_path / "good", follow=True)
            await killed.kill()
            # an idle worker lost with its host, then a job on a new host
            done = await pool.start(job_into(tmp_path / "d0", "sha256:idle"), tmp_path / "good")
            await done.finish()
            host = pool.host.pid
            assert host is not None
            os.kill(host, signal.SIGKILL)
            await until(lambda: pool.host.pid is None)
            await (await pool.start(job_into(tmp_path / "d2", "sha256:new"), tmp_path / "good")).finish()
            # starts cancelled while the host forks
            for i in range(3):
                start = asyncio.create_task(pool.start(job_into(tmp_path / "d0", f"sha256:c{i}"), tmp_path / "good"))
                for _ in range(i + 2):
                    await asyncio.sleep(0)
                start.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await (await start).finish()
            await until(lambda: children_of(pool.host.pid or 0) == [] or len(pool.idle_pids()) > 0)
        finally:
            await pool.close()

    before = sorted(os.listdir("/proc/self/fd"))
    asyncio.run(main())
    assert sorted(os.listdir("/proc/self/fd")) == before


def test_a_host_found_dead_when_a_worker_is_asked_for_is_replaced_at_once(tmp_path):
    layer = build_layer([file("data", b"x\n")], "gzip")
    (tmp_path / "blob").write_bytes(layer.blob)

    async def main() -> None:
        pool = UnpackPool()
        try:
            host = await warm_host(pool)
            os.kill(host, signal.SIGKILL)
            while not process_gone(host):  # without a turn of the loop: it has not read the host's end yet
                time.sleep(0.005)
            job = await pool.start(job_into(tmp_path, "sha256:after"), tmp_path / "blob")
            assert (await job.finish()).diff_id == layer.diff_id
            assert pool.host.pid not in (None, host)
        finally:
            await pool.close()

    asyncio.run(main())


def test_a_closed_pool_refuses_a_job_naming_the_layer(tmp_path):
    async def main() -> None:
        pool = UnpackPool()
        await pool.warm()
        await pool.close()
        with pytest.raises(UnpackWorkerError, match=r"layer sha256:late: the unpack pool is closed"):
            await pool.start(job_into(tmp_path, "sha256:late"), tmp_path / "blob")
        assert pool.host.pid is None

    asyncio.run(main())


def test_a_worker_that_crashes_is_reported_with_its_status_and_what_it_wrote_to_stderr(tmp_path):
    async def main() -> None:
        pool = UnpackPool()
        try:
            worker = await pool.host.worker()
            worker.stdin.write(b"not a job\n")  # what no daemon sends: the worker's loop fails on it
            job = UnpackProcess(pool, worker, job_into(tmp_path, "sha256:crash"), follow=False)
            with pytest.raises(UnpackWorkerError, match=r"(?s)sha256:crash: .*exited with status 1: Traceback.*JSON"):
                await job.finish()
        finally:
            await pool.close()

    asyncio.run(main())
