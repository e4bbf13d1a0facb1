"""cri/images/downloads: blob bodies received on a loop of their own, against the loopback registry."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from cri.images.registry import BlobUnknown, Endpoint, RegistryClient
from tests.support import image_builder as ib
from tests.support.fault_proxy import FaultProxy
from tests.support.registry_harness import Registry

REPO = "downloads/blob"


@dataclass
class Served:
    proxy: FaultProxy
    data: bytes
    digest: str

    def endpoint(self) -> Endpoint:
        return Endpoint(host=self.proxy.host, repository=REPO, insecure=True)

    def descriptor(self) -> dict[str, object]:
        return {"digest": self.digest, "size": len(self.data), "mediaType": "application/octet-stream"}


@pytest.fixture
def served() -> Iterator[Served]:
    with Registry().start() as registry:
        data = os.urandom((3 << 20) + 12345)
        digest = ib.RegistryClient(registry.url).upload_blob(REPO, data)
        with FaultProxy(registry.url).start() as proxy:
            yield Served(proxy, data, digest)


@dataclass
class Sink:
    """Records what reached it, and on which thread; `gate` (when set) holds the second write."""

    data: bytearray = field(default_factory=bytearray)
    threads: set[str] = field(default_factory=set)
    resets: int = 0
    writes: int = 0
    gate: asyncio.Event | None = None

    async def write(self, chunk: bytes) -> None:
        self.threads.add(threading.current_thread().name)
        self.writes += 1
        if self.gate is not None and self.writes == 2:
            await self.gate.wait()
        self.data += chunk

    async def reset(self) -> None:
        self.threads.add(threading.current_thread().name)
        self.resets += 1
        self.data.clear()


def _download_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "blob-downloads"]


def test_the_body_comes_over_the_download_loop_and_reaches_the_sink_on_the_callers(served: Served) -> None:
    sink = Sink()

    async def main() -> dict[object, object]:
        client = RegistryClient(progress_timeout=30, blobs_off_loop=True)
        try:
            await client.fetch_blob(served.endpoint(), served.descriptor(), sink)
            return dict(client._clients)  # the caller's loop opened no connection of its own
        finally:
            await client.aclose()

    assert asyncio.run(main()) == {}
    assert hashlib.sha256(sink.data).hexdigest() == served.digest.split(":")[1]
    assert sink.threads == {threading.current_thread().name}
    assert not _download_threads()  # aclose stopped the thread


def test_a_body_cut_short_is_fetched_again_after_the_sink_was_reset(served: Served) -> None:
    served.proxy.cut_after(1 << 20, times=1)
    sink = Sink()

    async def main() -> None:
        async with RegistryClient(progress_timeout=30, backoff=0.01, blobs_off_loop=True) as client:
            await client.fetch_blob(served.endpoint(), served.descriptor(), sink)

    asyncio.run(main())
    assert sink.resets == 1
    assert bytes(sink.data) == served.data
    assert served.proxy.blob_gets(served.digest) == 2


def test_the_registrys_errors_are_the_callers(served: Served) -> None:
    missing = {"digest": "sha256:" + "0" * 64, "size": 10}

    async def main() -> None:
        async with RegistryClient(progress_timeout=30, blobs_off_loop=True) as client:
            await client.fetch_blob(served.endpoint(), missing, Sink())

    with pytest.raises(BlobUnknown, match="does not have it"):
        asyncio.run(main())


def test_a_cancelled_caller_returns_once_the_download_ended_and_nothing_reaches_the_sink_after(
    served: Served,
) -> None:
    async def main() -> tuple[int, int]:
        sink = Sink(gate=asyncio.Event())
        async with RegistryClient(progress_timeout=30, blobs_off_loop=True) as client:
            task = asyncio.ensure_future(client.fetch_blob(served.endpoint(), served.descriptor(), sink))
            while sink.writes < 2:  # the second write waits at the gate, a batch in hand
                await asyncio.sleep(0.01)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            at_cancel = sink.writes
            assert sink.gate is not None
            sink.gate.set()
            await asyncio.sleep(0.2)
            return at_cancel, sink.writes

    at_cancel, later = asyncio.run(main())
    assert later == at_cancel == 2


class DiskGone(Exception):
    pass


def test_a_sink_that_fails_fails_the_download_with_its_error_and_nothing_reaches_it_after(served: Served) -> None:
    """A sink that fails on the caller's loop (a full disk) ends the download on the other loop with its error."""

    class FailingSink(Sink):
        attempts = 0  # writes tried, the failed one included

        async def write(self, chunk: bytes) -> None:
            self.attempts += 1
            if len(self.data) + len(chunk) > (3 << 20) // 2:
                raise DiskGone("the disk went away")
            await super().write(chunk)

    sink = FailingSink()

    async def main() -> tuple[int, int]:
        async with RegistryClient(progress_timeout=30, blobs_off_loop=True) as client:
            with pytest.raises(DiskGone, match="went away"):
                await client.fetch_blob(served.endpoint(), served.descriptor(), sink)
            at_error = sink.attempts
            await asyncio.sleep(0.2)
            return at_error, sink.attempts

    at_error, later = asyncio.run(main())
    assert later == at_error == sink.writes + 1  # the failed write was the last one tried
    assert bytes(sink.data) == served.data[: len(sink.data)]
    assert len(sink.data) <= (3 << 20) // 2
