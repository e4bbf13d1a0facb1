"""The content-addressed blob store: verified writes, atomic landing, single flight."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from cri.images.content import WRITE_BUFFER, ContentStore, Writer, made_in_thread
from cri.images.registry import DigestMismatch


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def ingest_files(store: ContentStore) -> list[str]:
    return sorted(os.listdir(store.ingest_dir)) if store.ingest_dir.exists() else []


def test_put_read_list_delete(tmp_path):
    store = ContentStore(tmp_path)
    data = b'{"schemaVersion": 2}'
    d = digest_of(data)
    path = asyncio.run(store.put_bytes(d, data))
    assert path == tmp_path / "blobs" / "sha256" / d.split(":")[1]
    assert store.path(d) == path
    assert store.has(d)
    assert store.read(d) == data
    assert store.size(d) == len(data)
    assert store.list() == [d]
    assert ingest_files(store) == []
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    asyncio.run(store.put_bytes(d, data))  # again: nothing changes
    store.delete(d)
    store.delete(d)  # idempotent
    assert not store.has(d)
    assert store.list() == []
    with pytest.raises(FileNotFoundError, match=d):
        store.read(d)


def test_put_bytes_with_a_wrong_digest_lands_nothing(tmp_path):
    store = ContentStore(tmp_path)
    wrong = digest_of(b"something else")
    with pytest.raises(DigestMismatch) as info:
        asyncio.run(store.put_bytes(wrong, b"the real bytes"))
    assert wrong in str(info.value)
    assert digest_of(b"the real bytes") in str(info.value)
    assert not store.has(wrong)
    assert store.list() == []
    assert ingest_files(store) == []


@pytest.mark.parametrize("bad", ["sha256:../../etc/passwd", "sha256:abc", "md5:" + "a" * 32, "../x", ""])
def test_malformed_digests_are_refused(tmp_path, bad):
    store = ContentStore(tmp_path)
    with pytest.raises(ValueError):
        store.path(bad)
    with pytest.raises(ValueError):
        store.writer(bad, 1)


def test_sha512_blobs(tmp_path):
    store = ContentStore(tmp_path)
    data = b"x" * 10
    d = "sha512:" + hashlib.sha512(data).hexdigest()
    asyncio.run(store.put_bytes(d, data))
    assert store.path(d).parent.name == "sha512"
    assert store.list() == [d]


def test_streamed_write_of_many_chunks(tmp_path):
    store = ContentStore(tmp_path)
    data = os.urandom(3 * WRITE_BUFFER + 12345)

    async def run():
        async with store.writer(digest_of(data), len(data)) as w:
            for i in range(0, len(data), 65536):
                await w.write(data[i : i + 65536])
            assert ingest_files(store)  # in the ingest dir while being written
            assert not store.has(digest_of(data))

    asyncio.run(run())
    assert store.read(digest_of(data)) == data
    assert ingest_files(store) == []


def test_short_writes_and_more_chunks_than_one_writev_takes_are_continued(tmp_path, monkeypatch):
    """The kernel may write less than asked (a signal, a full disk's last block): the rest follows, in order."""
    store = ContentStore(tmp_path)
    chunks = [os.urandom(size) for size in [0, 1, 700, 5000, 3] * 500]  # 2500 chunks: more than IOV_MAX
    data = b"".join(chunks)
    real_writev = os.writev
    calls = []

    def short_writev(fd, buffers):
        calls.append(len(buffers))
        taken, budget = [], 999  # at most 999 bytes a call, often ending inside a chunk
        for buffer in buffers:
            taken.append(bytes(buffer)[:budget])
            budget -= len(taken[-1])
            if budget == 0:
                break
        return real_writev(fd, taken)

    monkeypatch.setattr(os, "writev", short_writev)

    async def run():
        async with store.writer(digest_of(data), len(data)) as w:
            for chunk in chunks:
                await w.write(chunk)

    asyncio.run(run())
    assert store.read(digest_of(data)) == data
    assert len(calls) > len(data) // 999


@pytest.mark.parametrize(
    ("declared", "sent", "message"),
    [
        (digest_of(b"abc"), b"abd", "does not match"),
        (digest_of(b"abc"), b"ab", "expected 3 bytes, got 2"),
    ],
)
def test_writer_mismatch_removes_the_temp_file(tmp_path, declared, sent, message):
    store = ContentStore(tmp_path)

    async def run():
        async with store.writer(declared, 3) as w:
            await w.write(sent)

    with pytest.raises(DigestMismatch, match=message):
        asyncio.run(run())
    assert store.list() == []
    assert ingest_files(store) == []


def test_writer_refuses_more_than_the_size_at_once(tmp_path):
    store = ContentStore(tmp_path)
    d = digest_of(b"abc")

    async def run():
        async with store.writer(d, 3) as w:
            await w.write(b"ab")
            await w.write(b"cd")

    with pytest.raises(DigestMismatch, match="more than the expected 3 bytes"):
        asyncio.run(run())
    assert ingest_files(store) == []


def test_an_exception_in_the_block_aborts(tmp_path):
    store = ContentStore(tmp_path)
    data = b"hello"

    async def run():
        async with store.writer(digest_of(data), len(data)) as w:
            await w.write(data)
            raise RuntimeError("download failed")

    with pytest.raises(RuntimeError):
        asyncio.run(run())
    assert not store.has(digest_of(data))
    assert ingest_files(store) == []


def test_reset_starts_the_blob_over(tmp_path):
    store = ContentStore(tmp_path)
    data = b"0123456789"

    async def run():
        async with store.writer(digest_of(data), len(data)) as w:
            await w.write(b"0123xx")
            await w.reset()
            await w.write(data)

    asyncio.run(run())
    assert store.read(digest_of(data)) == data


def test_cleanup_ingest_removes_leftovers_but_not_open_writers(tmp_path):
    store = ContentStore(tmp_path)
    store.ingest_dir.mkdir(parents=True)
    (store.ingest_dir / "sha256-dead.tmp").write_bytes(b"partial")
    data = b"live"

    async def run():
        async with store.writer(digest_of(data), len(data)) as w:
            await w.write(data)
            assert store.cleanup_ingest() == 1
            assert len(ingest_files(store)) == 1  # the open writer's file

    asyncio.run(run())
    assert store.has(digest_of(data))
    assert ingest_files(store) == []
    assert ContentStore(tmp_path / "fresh").cleanup_ingest() == 0


def test_concurrent_ensure_fetches_once(tmp_path):
    store = ContentStore(tmp_path)
    data = b"layer bytes" * 1000
    d = digest_of(data)
    calls = []

    async def fetch(w: Writer) -> None:
        calls.append(w)
        await asyncio.sleep(0.05)
        await w.write(data)

    async def run():
        return await asyncio.gather(store.ensure(d, len(data), fetch), store.ensure(d, len(data), fetch))

    first, second = asyncio.run(run())
    assert first == second == store.path(d)
    assert len(calls) == 1
    assert store.fetch_counts[d] == 1
    # Present now: no fetch at all.
    assert asyncio.run(store.ensure(d, len(data), fetch)) == store.path(d)
    assert store.fetch_counts[d] == 1


def test_concurrent_ensure_shares_the_failure_and_a_later_call_retries(tmp_path):
    store = ContentStore(tmp_path)
    data = b"good"
    d = digest_of(data)

    async def bad(w: Writer) -> None:
        await asyncio.sleep(0.02)
        await w.write(b"evil")

    async def run():
        return await asyncio.gather(store.ensure(d, 4, bad), store.ensure(d, 4, bad), return_exceptions=True)

    results = asyncio.run(run())
    assert all(isinstance(r, DigestMismatch) for r in results)
    assert store.fetch_counts[d] == 1
    assert ingest_files(store) == []

    async def good(w: Writer) -> None:
        await w.write(data)

    asyncio.run(store.ensure(d, 4, good))
    assert store.fetch_counts[d] == 2
    assert store.read(d) == data


def test_cancelling_one_waiter_keeps_the_shared_download(tmp_path):
    store = ContentStore(tmp_path)
    data = b"shared"
    d = digest_of(data)

    async def run():
        gate = asyncio.Event()

        async def fetch(w: Writer) -> None:
            await gate.wait()
            await w.write(data)

        first = asyncio.create_task(store.ensure(d, len(data), fetch))
        second = asyncio.create_task(store.ensure(d, len(data), fetch))
        await asyncio.sleep(0.01)
        first.cancel()
        await asyncio.sleep(0.01)
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        return await second

    assert asyncio.run(run()) == store.path(d)
    assert store.fetch_counts[d] == 1


def test_cancelling_every_waiter_cancels_the_download(tmp_path):
    store = ContentStore(tmp_path)
    d = digest_of(b"never")
    cancelled = []

    async def run():
        async def fetch(w: Writer) -> None:
            await w.write(b"nev")
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.append(True)
                raise

        waiter = asyncio.create_task(store.ensure(d, 5, fetch))
        await asyncio.sleep(0.02)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        await asyncio.sleep(0.02)

    asyncio.run(run())
    assert cancelled == [True]
    assert not store.has(d)
    assert ingest_files(store) == []


def test_what_a_thread_makes_after_its_caller_was_cancelled_is_undone(tmp_path):
    # A cancelled pull stops waiting for the thread creating its temp file; the file must not stay behind.
    made = tmp_path / "made"
    thread_started = threading.Event()

    def make() -> Path:
        thread_started.set()
        time.sleep(0.3)  # still creating when the caller is cancelled
        made.write_bytes(b"partial")
        return made

    async def main() -> None:
        task = asyncio.create_task(made_in_thread(make, lambda path: path.unlink()))
        await asyncio.to_thread(thread_started.wait)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert not made.exists()
    assert asyncio.run(made_in_thread(lambda: 42, lambda _n: None)) == 42
