"""SPDY tunnelled through a WebSocket: port-forward as kubectl speaks it by default.

client-go's tunneling dialer (tools/portforward/tunneling_dialer.go, kubectl port-forward's default since 1.31)
asks for a WebSocket whose subprotocols are the SPDY protocols behind the prefix "SPDY/3.1+"
("SPDY/3.1+portforward.k8s.io"); the server answers with the prefixed protocol it chose, as the API server's
streamtunnel.go does. From then on the WebSocket is a net.Conn (tunneling_connection.go) carrying an ordinary
SPDY/3.1 session. Each Write of the peer is one binary message, and messages have nothing to do with SPDY frames:
spdystream's framer writes a frame field by field, so one frame arrives as several messages, and nothing stops a
message from carrying several frames. A text message is an error; the WebSocket's CLOSE is the end of the stream.

TunnelReader and TunnelWriter make the WebSocket the reader and writer a SpdySession works on, so the port-forward
served over it is exactly the one served over plain SPDY.
"""

from __future__ import annotations

import asyncio

from cri.streaming.spdy import SpdySession
from cri.streaming.websocket import WebSocket

PREFIX = "SPDY/3.1+"
# Unread bytes held before the WebSocket's read loop waits. Past this the socket goes unread: the TCP backpressure a
# plain SPDY connection gets, for the session stops reading while one of its streams holds too much unread data.
BUFFER_LIMIT = 256 * 1024


def tunnelled(protocols: tuple[str, ...]) -> tuple[str, ...]:
    """The WebSocket subprotocols that tunnel these SPDY protocols."""
    return tuple(PREFIX + p for p in protocols)


def is_tunnel(protocol: str) -> bool:
    return protocol.startswith(PREFIX)


class TunnelReader:
    """The payloads of the binary messages as one byte stream, read in whatever pieces the reader asks for."""

    def __init__(self, limit: int = BUFFER_LIMIT) -> None:
        self._buffer = bytearray()
        self._limit = limit
        self._ended = False
        self._arrived = asyncio.Event()
        self._taken = asyncio.Event()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    async def feed(self, data: bytes) -> None:
        """Append a payload; waits while more than `limit` bytes are unread. Dropped once the stream has ended."""
        while len(self._buffer) > self._limit and not self._ended:
            self._taken.clear()
            await self._taken.wait()
        if not self._ended:
            self._buffer += data
            self._arrived.set()

    def end(self) -> None:
        """Nothing more comes: what is buffered can still be read, then reads fail as at the end of a stream."""
        self._ended = True
        self._arrived.set()
        self._taken.set()

    async def readexactly(self, n: int, /) -> bytes:
        """n bytes, however the messages cut them; asyncio.IncompleteReadError when the stream ends first."""
        while len(self._buffer) < n and not self._ended:
            self._arrived.clear()
            await self._arrived.wait()
        if len(self._buffer) < n:
            partial = bytes(self._buffer)
            self._buffer.clear()
            raise asyncio.IncompleteReadError(partial, n)
        chunk = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._taken.set()
        return chunk


class TunnelWriter:
    """What a SpdySession writes: each write, one whole frame, goes out as one binary message."""

    def __init__(self, socket: WebSocket, reader: TunnelReader) -> None:
        self._socket = socket
        self._reader = reader

    @property
    def transport(self) -> asyncio.WriteTransport:
        """The TCP connection under the WebSocket: its buffer is the session's backlog, its abort the hard stop."""
        return self._socket.transport

    def write(self, data: bytes, /) -> None:
        self._socket.send_nowait(data)

    async def drain(self) -> None:
        await self._socket.drain()

    def is_closing(self) -> bool:
        return not self._socket.is_open

    def close(self) -> None:
        """The session is over: CLOSE (1000), as client-go's TunnelingConnection.Close sends, and the connection's end.
        The reader ends too, so a read loop waiting to feed it cannot hang on a session that reads no more."""
        self._reader.end()
        self._socket.shutdown()

    async def wait_closed(self) -> None:
        await self._socket.wait_closed()


def spdy_session(socket: WebSocket) -> SpdySession:
    """A SPDY server session over the byte stream `socket` carries; socket.serve() must run to feed it."""
    reader = TunnelReader()
    socket.carry(reader)
    return SpdySession(reader, TunnelWriter(socket, reader))
