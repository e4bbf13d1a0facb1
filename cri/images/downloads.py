"""Blob bodies received on an event loop of their own, in a thread of their own.

A layer's bytes pass through httpx, httpcore and h11 in 256 KiB reads, each copied about three times on
the way (the receive buffer, the extraction, the chunk handed out): 16% of the daemon's event loop during
a 150 MB pull beside a 50-pod burst (py-spy), time every RPC waited behind. Here a second loop, in a
thread, does the blob's HTTP exchange with a RegistryClient of its own (its own connections, tokens and
learnt challenges), and hands the body to the caller's loop in batches of `BATCH` bytes: one hand-over per
batch, to the same sink as before. The content store's writer and the unpack worker it feeds stay on the
caller's loop.

Same contract as RegistryClient.fetch_blob in the caller's loop: the same errors, retries from the start
(the sink is reset), progress timeout. A cancelled caller cancels the download and returns only once it
has ended, so no chunk reaches the sink after that.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any

from cri.system import offload

if TYPE_CHECKING:
    from cri.images.registry import BlobSink, Endpoint, RegistryClient

# The body reaches the sink in batches of this much (the content store writes 1 MiB at a time).
BATCH = 1 << 20
STOP_TIMEOUT = 10.0


class BlobDownloads:
    """The download thread and its loop, started with the first blob; `make_client` makes the thread's
    RegistryClient, on that thread."""

    def __init__(self, make_client: Callable[[], RegistryClient]) -> None:
        self._make_client = make_client
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._client: RegistryClient | None = None  # used on the download loop only

    async def fetch_blob(
        self, parent: RegistryClient, endpoint: Endpoint, descriptor: Mapping[str, Any], sink: BlobSink
    ) -> None:
        """`parent.fetch_blob`, its HTTP on the download loop; `parent`'s configuration applies (reloads too)."""
        caller = asyncio.get_running_loop()
        relay = _Relay(caller, sink)
        outcome: asyncio.Future[None] = caller.create_future()
        loop = self._started()
        tasks: list[asyncio.Task[None]] = []

        def launch() -> None:
            task = loop.create_task(self._fetch(parent, endpoint, descriptor, relay))
            tasks.append(task)
            task.add_done_callback(finished)

        def finished(download: asyncio.Task[None]) -> None:  # on the download loop: its end becomes outcome's
            exc = asyncio.CancelledError() if download.cancelled() else download.exception()
            offload.deliver(caller, outcome, None, exc)

        def cancel() -> None:  # queued after launch(): the loop runs them in order, so the task is there
            tasks[0].cancel()

        loop.call_soon_threadsafe(launch)
        try:
            await asyncio.shield(outcome)
        except asyncio.CancelledError:
            relay.closed = True
            loop.call_soon_threadsafe(cancel)
            await asyncio.wait([outcome])
            outcome.exception()  # retrieved: the caller's cancellation is what it gets
            raise

    async def _fetch(
        self, parent: RegistryClient, endpoint: Endpoint, descriptor: Mapping[str, Any], relay: _Relay
    ) -> None:
        if self._client is None:
            self._client = self._make_client()
        self._client.config = parent.config
        await self._client.fetch_blob(endpoint, descriptor, relay)
        await relay.flush()

    def _started(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="blob-downloads", daemon=True)
            thread.start()
            self._loop, self._thread = loop, thread
        return self._loop

    async def aclose(self) -> None:
        """Close the thread's connections and stop it (the daemon's end); a later blob starts it again."""
        loop, thread, client = self._loop, self._thread, self._client
        self._loop = self._thread = self._client = None
        if loop is None or thread is None:
            return
        if client is not None:
            closing = asyncio.run_coroutine_threadsafe(client.aclose(), loop)
            await asyncio.wait([asyncio.wrap_future(closing)], timeout=STOP_TIMEOUT)
        loop.call_soon_threadsafe(loop.stop)
        await offload.to_thread(thread.join, STOP_TIMEOUT)
        if not thread.is_alive():
            loop.close()


class _Relay:
    """The download loop's sink: batches chunks and hands each batch to the caller's loop, where it waits
    until the real sink took it (so a slow disk slows the download, as it did on one loop)."""

    def __init__(self, caller: asyncio.AbstractEventLoop, sink: BlobSink) -> None:
        self.caller = caller
        self._sink = sink
        self._batch: list[bytes] = []
        self._size = 0
        self.closed = False  # set on the caller's loop once the caller gave up: nothing more is written

    async def write(self, chunk: bytes) -> None:
        self._batch.append(chunk)
        self._size += len(chunk)
        if self._size >= BATCH:
            await self.flush()

    async def flush(self) -> None:
        if self._batch:
            batch, self._batch, self._size = self._batch, [], 0
            await self._on_caller(self._deliver(batch))

    async def reset(self) -> None:
        self._batch, self._size = [], 0
        await self._on_caller(self._sink.reset())

    async def _on_caller(self, work: Coroutine[Any, Any, None]) -> None:
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(work, self.caller))

    async def _deliver(self, batch: list[bytes]) -> None:
        for chunk in batch:
            if self.closed:
                raise asyncio.CancelledError
            await self._sink.write(chunk)
