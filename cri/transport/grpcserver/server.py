"""A gRPC server on a unix socket, on criopy's own HTTP/2 transport."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping

from cri.log import event
from cri.transport.grpcserver import frames as f
from cri.transport.grpcserver.calls import Dispatcher, Route
from cri.transport.grpcserver.connection import FLUSH_SECONDS, Http2Connection, Limits

log = logging.getLogger(__name__)

# At most one log line this often about connections refused over the cap, however many there are.
REFUSAL_LOG_SECONDS = 10.0


class Refused(asyncio.Protocol):
    """A connection over max_connections: our SETTINGS and a GOAWAY saying why, then closed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(f.settings_frame({}) + f.goaway(0, f.ErrorCode.ENHANCE_YOUR_CALM, "too many connections"))
        # A few bytes, well within the socket buffer: the close does not wait on the client.
        transport.close()


class GrpcServer:
    def __init__(self, routes: Mapping[str, Route], limits: Limits | None = None) -> None:
        self._limits = limits or Limits()
        self._dispatch = Dispatcher(routes, self._limits.max_send_bytes)
        self._connections: set[Http2Connection] = set()
        self._listener: asyncio.Server | None = None
        self._refused = 0  # connections refused since the last log line about them
        self._refusal_logged = float("-inf")

    def _connect(self) -> asyncio.Protocol:
        if len(self._connections) >= self._limits.max_connections:
            self._log_refusal()
            return Refused()
        conn = Http2Connection(self._dispatch, self._connections.discard, self._limits)
        self._connections.add(conn)
        return conn

    def _log_refusal(self) -> None:
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged < REFUSAL_LOG_SECONDS:
            return
        event(
            log,
            logging.WARNING,
            "connection refused",
            reason="too many connections",
            limit=self._limits.max_connections,
            refused=self._refused,
        )
        self._refused = 0
        self._refusal_logged = now

    async def start(self, socket_path: str) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_unix_server(self._connect, socket_path)

    async def stop(self, grace_seconds: float) -> None:
        """Stop accepting, answer the calls already made within the grace period, then cancel them."""
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._connections):
            conn.go_away()
        # Until its client acks the first GOAWAY a connection still takes new calls: they are waited for too.
        await self._until(self._drained, self._limits.goaway_ack_seconds)
        for feed in self._dispatch.subscriptions:
            feed.cancel()
        calls = self._dispatch.calls | self._dispatch.subscriptions
        if calls:
            _, late = await asyncio.wait(calls, timeout=grace_seconds)
            for call in late:
                call.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*late, return_exceptions=True)
        for conn in list(self._connections):
            conn.close()
        # close() lets the last answers out; a client that reads nothing would hold it (and, from
        # Python 3.12 on, wait_closed) forever.
        await self._until(lambda: not self._connections, FLUSH_SECONDS)
        for conn in list(self._connections):
            conn.abort()
        if self._listener is not None:
            await self._listener.wait_closed()

    def _drained(self) -> bool:
        return all(conn.drained or conn.closed for conn in self._connections)

    @staticmethod
    async def _until(done: Callable[[], bool], seconds: float) -> None:
        deadline = asyncio.get_running_loop().time() + seconds
        while not done() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
