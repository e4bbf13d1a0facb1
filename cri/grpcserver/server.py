"""A gRPC server on a unix socket, on criopy's own HTTP/2 transport."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from cri.grpcserver.calls import Dispatcher, Route
from cri.grpcserver.connection import Http2Connection, Limits

FLUSH_SECONDS = 1.0


class GrpcServer:
    def __init__(self, routes: Mapping[str, Route], max_message_bytes: int) -> None:
        self._dispatch = Dispatcher(routes)
        # The 5-byte gRPC message prefix travels in the body too.
        self._limits = Limits(max_request_bytes=max_message_bytes + 5)
        self._connections: set[Http2Connection] = set()
        self._listener: asyncio.Server | None = None

    def _connect(self) -> Http2Connection:
        conn = Http2Connection(self._dispatch, self._connections.discard, self._limits)
        self._connections.add(conn)
        return conn

    async def start(self, socket_path: str) -> None:
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_unix_server(self._connect, socket_path)

    async def stop(self, grace_seconds: float) -> None:
        """Stop accepting, answer the calls already made within the grace period, then cancel them."""
        if self._listener is not None:
            self._listener.close()
        for conn in list(self._connections):
            conn.go_away()
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
        deadline = asyncio.get_running_loop().time() + FLUSH_SECONDS
        while self._connections and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self._connections):
            conn.abort()
        if self._listener is not None:
            await self._listener.wait_closed()
