"""The content-addressed blob store: `<root>/blobs/<algorithm>/<hex>`.

A blob enters only through a Writer, which streams into `<root>/blobs/ingest/`,
checks the size and digest on commit, fsyncs, and renames into place. A blob
whose bytes do not match its digest never lands: the temp file is deleted and
DigestMismatch raised; a full file system likewise leaves no temp file, and
raises NoSpace naming the storage root. `ensure()` downloads a blob once even
when several pulls ask for it at the same time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import os
import re
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from cri.errors import no_space_in
from cri.images.reference import validate_digest
from cri.images.registry import DigestMismatch
from cri.log import event
from cri.system import offload
from cri.system.linux import fsync_dir

log = logging.getLogger(__name__)

# Chunks are gathered into writes of this size, each done in a worker thread.
WRITE_BUFFER = 1 << 20
_IOV_MAX = os.sysconf("SC_IOV_MAX")
_BLOB_NAME = re.compile(r"[a-f0-9]+")


T = TypeVar("T")


async def made_in_thread(make: Callable[[], T], undo: Callable[[T], None]) -> T:
    """`make()` in a worker thread, and if the caller is cancelled meanwhile, `undo()` what it made.

    A cancelled to_thread() only stops waiting: the thread goes on and creates its file or directory,
    which nobody would then remove (a cancelled pull must leave nothing behind).
    """
    made = asyncio.ensure_future(offload.to_thread(make))
    try:
        return await asyncio.shield(made)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):  # make() failed: nothing to undo
            await offload.to_thread(undo, await made)
        raise


def _writev_all(fd: int, chunks: list[bytes]) -> None:
    """Every byte of `chunks`, in order, at most IOV_MAX buffers per call; short writes continued."""
    views = [memoryview(chunk) for chunk in chunks if chunk]
    start = 0
    while start < len(views):
        batch = views[start : start + _IOV_MAX]
        written = os.writev(fd, batch)
        for view in batch:
            if written < len(view):
                views[start] = view[written:]
                break
            written -= len(view)
            start += 1


def _check_digest(digest: str) -> tuple[str, str]:
    problem = validate_digest(digest)
    if problem:
        raise ValueError(problem)
    algorithm, _, hexpart = digest.partition(":")
    return algorithm, hexpart


class Writer:
    """Streams one blob into the ingest directory; commit() verifies and moves it into place.

    Use it as `async with store.writer(digest, size) as w: await w.write(chunk)`: a
    clean exit commits, an exception aborts (the temp file is removed). `reset()`
    starts the blob over, for a download that is retried from the beginning.
    """

    def __init__(self, store: ContentStore, digest: str, size: int) -> None:
        self.algorithm, _ = _check_digest(digest)
        if size < 0:
            raise ValueError(f"blob {digest}: invalid size {size}")
        self.store = store
        self.digest = digest
        self.size = size
        self.written = 0
        self.on_disk = 0  # of those, the bytes in the temp file (readers of `path` may read that far)
        self._hash = hashlib.new(self.algorithm)
        # Chunks as they came, written with one writev per WRITE_BUFFER: appending them to one buffer
        # copied every byte once more, and again for each time the growing buffer was reallocated.
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._fd: int | None = None
        self._temp: Path | None = None
        self._done = False

    async def _open(self) -> None:
        def create() -> tuple[int, Path]:
            self.store.ingest_dir.mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix=self.digest.replace(":", "-") + ".", dir=self.store.ingest_dir)
            return fd, Path(name)

        def remove(made: tuple[int, Path]) -> None:
            os.close(made[0])
            made[1].unlink(missing_ok=True)

        with self._no_space():
            fd, temp = await made_in_thread(create, remove)
        self._fd, self._temp = fd, temp
        self.store._active.add(temp)

    async def write(self, chunk: bytes) -> None:
        if self._done:
            raise ValueError(f"blob {self.digest}: write after the writer was closed")
        if self.written + len(chunk) > self.size:
            raise DigestMismatch(
                f"blob {self.digest}: got more than the expected {self.size} bytes ({self.written + len(chunk)} so far)"
            )
        self.written += len(chunk)
        self._pending.append(chunk)
        self._pending_size += len(chunk)
        if self._pending_size >= WRITE_BUFFER:
            await self.flush()

    @property
    def path(self) -> Path:
        """The temp file the blob is written to (until commit() moves it into place)."""
        assert self._temp is not None, "the writer is not open"
        return self._temp

    async def flush(self) -> None:
        """Everything written so far into the temp file (on_disk == written)."""
        if not self._pending:
            return
        chunks = self._pending
        size = self._pending_size
        self._pending, self._pending_size = [], 0
        fd = self._fd
        assert fd is not None

        def write_all() -> None:
            # hashlib releases the GIL on large buffers: hashing here keeps the loop free too.
            for chunk in chunks:
                self._hash.update(chunk)
            _writev_all(fd, chunks)

        with self._no_space():
            await offload.to_thread(write_all)
        self.on_disk += size

    def _no_space(self) -> contextlib.AbstractContextManager[None]:
        return no_space_in(self.store.root, f"writing blob {self.digest} ({self.size} bytes)")

    async def reset(self) -> None:
        """Forget everything written so far (a retried download starts over)."""
        self._pending, self._pending_size = [], 0
        self.written = self.on_disk = 0
        self._hash = hashlib.new(self.algorithm)
        fd = self._fd
        assert fd is not None

        def truncate() -> None:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)

        await offload.to_thread(truncate)

    async def commit(self) -> Path:
        """Check size and digest, fsync, rename into place; DigestMismatch (and no blob) otherwise."""
        await self.flush()
        fd, temp = self._fd, self._temp
        assert fd is not None and temp is not None
        actual = f"{self.algorithm}:{self._hash.hexdigest()}"
        if self.written != self.size or actual != self.digest:
            await self.abort()
            if self.written != self.size:
                raise DigestMismatch(f"blob {self.digest}: expected {self.size} bytes, got {self.written}")
            raise DigestMismatch(f"blob content does not match its digest: expected {self.digest}, got {actual}")
        target = self.store.path(self.digest)

        def finish() -> None:
            try:
                os.fchmod(fd, 0o644)
                os.fsync(fd)
            finally:
                os.close(fd)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, target)
            fsync_dir(target.parent)

        self._fd = None
        self._done = True
        try:
            with self._no_space():  # an fsync can be where a full file system shows
                await offload.to_thread(finish)
        finally:
            self.store._active.discard(temp)
            temp.unlink(missing_ok=True)  # only still there when finishing failed
        event(log, logging.DEBUG, "content.committed", digest=self.digest, size=self.size)
        return target

    async def abort(self) -> None:
        """Drop the temp file; safe to call more than once."""
        self._done = True
        self._pending, self._pending_size = [], 0
        fd, temp, self._fd = self._fd, self._temp, None

        def remove() -> None:
            if fd is not None:
                os.close(fd)
            if temp is not None:
                temp.unlink(missing_ok=True)

        await offload.to_thread(remove)
        if temp is not None:
            self.store._active.discard(temp)

    async def __aenter__(self) -> Writer:
        await self._open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            await asyncio.shield(self.abort())
            return
        await self.commit()


@dataclass
class _Flight:
    task: asyncio.Task[Path]
    waiters: int = 0


class ContentStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.blobs_dir = self.root / "blobs"
        self.ingest_dir = self.blobs_dir / "ingest"
        self._active: set[Path] = set()
        self._inflight: dict[str, _Flight] = {}
        # How many times ensure() ran a fetch, per digest: single flight is observable.
        self.fetch_counts: collections.Counter[str] = collections.Counter()

    def path(self, digest: str) -> Path:
        """Where the blob lives (whether or not it is there); ValueError for a malformed digest."""
        algorithm, hexpart = _check_digest(digest)
        return self.blobs_dir / algorithm / hexpart

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def read(self, digest: str) -> bytes:
        """The whole blob; for small ones (manifests, configs). FileNotFoundError when absent."""
        path = self.path(digest)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(f"blob {digest} is not in the content store") from None

    def size(self, digest: str) -> int:
        return self.path(digest).stat().st_size

    def delete(self, digest: str) -> None:
        """Remove the blob; nothing happens when it is already gone."""
        self.path(digest).unlink(missing_ok=True)

    def list(self) -> list[str]:
        """Every stored digest, sorted."""
        out: list[str] = []
        if not self.blobs_dir.is_dir():
            return out
        for algo_dir in self.blobs_dir.iterdir():
            if algo_dir.name == "ingest" or not algo_dir.is_dir():
                continue
            for blob in algo_dir.iterdir():
                if _BLOB_NAME.fullmatch(blob.name):
                    digest = f"{algo_dir.name}:{blob.name}"
                    if validate_digest(digest) is None:
                        out.append(digest)
        return sorted(out)

    def cleanup_ingest(self) -> int:
        """Remove leftover temp files (from a crash); files of writers still open are kept. Returns the count."""
        removed = 0
        if not self.ingest_dir.is_dir():
            return removed
        for leftover in self.ingest_dir.iterdir():
            if leftover in self._active:
                continue
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
                removed += 1
        return removed

    def writer(self, digest: str, size: int) -> Writer:
        return Writer(self, digest, size)

    async def put_bytes(self, digest: str, data: bytes) -> Path:
        """Store a small blob held in memory (a manifest, a config) after checking its digest."""
        if self.has(digest):
            return self.path(digest)
        async with self.writer(digest, len(data)) as w:
            await w.write(data)
        return self.path(digest)

    async def ensure(self, digest: str, size: int, fetch: Callable[[Writer], Awaitable[None]]) -> Path:
        """The blob's path, downloading it with `fetch(writer)` unless present.

        Concurrent calls for one digest share one download and its outcome. The
        download runs in its own task; it is cancelled only when every caller
        waiting for it has been cancelled.
        """
        path = self.path(digest)
        if path.is_file():
            return path
        flight = self._inflight.get(digest)
        if flight is None:
            task = asyncio.create_task(self._download(digest, size, fetch), name=f"fetch {digest}")
            flight = _Flight(task)
            self._inflight[digest] = flight
            task.add_done_callback(lambda t: self._landed(digest, t))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.waiters == 1 and not flight.task.done():
                flight.task.cancel()
                await asyncio.wait([flight.task])  # its temp file is gone before this caller fails
            raise
        finally:
            flight.waiters -= 1

    def _landed(self, digest: str, task: asyncio.Task[Path]) -> None:
        if self._inflight.get(digest) is not None and self._inflight[digest].task is task:
            del self._inflight[digest]
        if not task.cancelled():
            task.exception()  # retrieved: every waiter may have gone

    async def _download(self, digest: str, size: int, fetch: Callable[[Writer], Awaitable[None]]) -> Path:
        self.fetch_counts[digest] += 1
        async with self.writer(digest, size) as w:
            await fetch(w)
        return self.path(digest)
