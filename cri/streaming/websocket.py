"""WebSocket connections with Kubernetes' channel framing (wsproto does the RFC 6455 part).

Every message starts with a channel number: a byte in the binary protocols
(`channel.k8s.io`, `v4.channel.k8s.io`, `v5.channel.k8s.io`), an ASCII digit
followed by base64 data in the text ones (`base64.channel.k8s.io`,
`v4.base64.channel.k8s.io`). v5 adds a close signal: the message
`[255, channel]` ends that channel's input.

A connection may instead `carry()` one byte stream and no channels: every
binary message is just the next bytes of it, cut anywhere. Port-forward
tunnels SPDY that way (cri.streaming.tunnel).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import time
from collections import deque
from typing import Protocol

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Ping,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from cri.log import event

log = logging.getLogger(__name__)

CLOSE_SIGNAL = 255
NORMAL_CLOSURE = 1000
UNSUPPORTED_DATA = 1003
READ_SIZE = 65536


class Inbound:
    """What the client sends on one channel; read() gives b"" once it ends (close signal or connection gone)."""

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._ended = False
        self._changed = asyncio.Event()

    def feed(self, data: bytes) -> None:
        if not self._ended and data:
            self._chunks.append(data)
            self._changed.set()

    def end(self) -> None:
        self._ended = True
        self._changed.set()

    async def read(self) -> bytes:
        while not self._chunks:
            if self._ended:
                return b""
            self._changed.clear()
            await self._changed.wait()
        return self._chunks.popleft()


class ByteSink(Protocol):
    """Where a carrying connection puts its binary messages' payloads; end() once the connection is over."""

    async def feed(self, data: bytes) -> None: ...

    def end(self) -> None: ...


class Outbound:
    """Writes to one channel."""

    def __init__(self, socket: WebSocket, channel: int) -> None:
        self._socket = socket
        self.channel = channel

    async def write(self, data: bytes) -> None:
        await self._socket.send(self.channel, data)

    async def close(self) -> None:
        """Channels have no end of their own: the connection's close ends them all."""


class WebSocket:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, text: bool) -> None:
        self._reader = reader
        self._writer = writer
        self._ws = WSConnection(ConnectionType.SERVER)
        self._text = text
        self._inbound: dict[int, Inbound] = {}
        self._partial: list[bytes | str] = []
        self._carried: ByteSink | None = None
        self._lock = asyncio.Lock()
        self.closed = False
        self.last_activity = time.monotonic()

    async def accept(self, head: bytes, subprotocol: str | None) -> None:
        """Answer the handshake whose request head is `head` (already read off the socket)."""
        self._ws.receive_data(head)
        for item in self._ws.events():
            if isinstance(item, Request):
                await self._send_raw(self._ws.send(AcceptConnection(subprotocol=subprotocol)))
                return
        raise ConnectionError("not a WebSocket handshake")

    @property
    def is_open(self) -> bool:
        """Messages can still be sent: no CLOSE either way yet, and the connection is up."""
        return not self.closed and self._ws.state is ConnectionState.OPEN and not self._writer.is_closing()

    @property
    def transport(self) -> asyncio.WriteTransport:
        return self._writer.transport

    def carry(self, sink: ByteSink) -> None:
        """From now on the binary messages are one byte stream: each payload (fragment) goes to `sink` as it comes,
        with no channel byte. A text message ends the connection; `sink` ends when the connection does."""
        self._carried = sink

    def inbound(self, channel: int) -> Inbound:
        return self._inbound.setdefault(channel, Inbound())

    def outbound(self, channel: int) -> Outbound:
        return Outbound(self, channel)

    async def send(self, channel: int, data: bytes) -> None:
        if self.closed:
            raise ConnectionError("WebSocket closed")
        message: BytesMessage | TextMessage
        if self._text:
            message = TextMessage(str(channel) + base64.b64encode(data).decode())
        else:
            message = BytesMessage(bytes([channel]) + data)
        await self._send_raw(self._ws.send(message))

    def send_nowait(self, data: bytes) -> None:
        """One binary message of `data` as it is (no channel), queued at once; dropped once the connection is
        closing, as a closed transport drops writes. Synchronous, so callers that write whole frames of their own
        protocol never see them interleave; drain() waits for the queue to go down."""
        if self.is_open:
            self._writer.write(self._ws.send(BytesMessage(data)))
            self.last_activity = time.monotonic()

    async def drain(self) -> None:
        await self._writer.drain()

    async def serve(self) -> None:
        """Read until the client closes or goes away; then every inbound channel ends."""
        try:
            while not self.closed:
                data = await self._reader.read(READ_SIZE)
                self.last_activity = time.monotonic()
                self._ws.receive_data(data or None)
                await self._handle_events()
                if not data:
                    break
        except (ConnectionError, RemoteProtocolError, LocalProtocolError) as exc:
            event(log, logging.DEBUG, "websocket ended", error=str(exc))
        finally:
            self.closed = True
            for inbound in self._inbound.values():
                inbound.end()
            if self._carried is not None:
                self._carried.end()

    async def _handle_events(self) -> None:
        for item in self._ws.events():
            if isinstance(item, Ping):
                await self._send_raw(self._ws.send(item.response()))
            elif isinstance(item, CloseConnection):
                with contextlib.suppress(LocalProtocolError):
                    await self._send_raw(self._ws.send(item.response()))
                self.closed = True
            elif self._carried is not None and isinstance(item, BytesMessage | TextMessage):
                await self._carry(self._carried, item)
            elif isinstance(item, BytesMessage | TextMessage):
                self._partial.append(item.data if isinstance(item.data, str) else bytes(item.data))
                if item.message_finished:
                    self._dispatch(self._partial)
                    self._partial = []

    async def _carry(self, sink: ByteSink, item: BytesMessage | TextMessage) -> None:
        if self.closed:
            return
        if isinstance(item, TextMessage):
            # client-go's TunnelingConnection fails its Read on one too ("invalid message type received").
            event(log, logging.INFO, "text message in a byte-stream websocket, closing", code=UNSUPPORTED_DATA)
            self.shutdown(UNSUPPORTED_DATA, "only binary messages carry the stream")
            return
        if item.data:
            await sink.feed(bytes(item.data))

    def _dispatch(self, parts: list[bytes | str]) -> None:
        if isinstance(parts[0], str):
            text = "".join(str(p) for p in parts)
            if not text:
                return
            channel, payload = int(text[0]) if text[0].isdigit() else -1, base64.b64decode(text[1:])
        else:
            raw = b"".join(p for p in parts if isinstance(p, bytes))
            if not raw:
                return
            channel, payload = raw[0], raw[1:]
        if channel == CLOSE_SIGNAL:
            if payload:
                self.inbound(payload[0]).end()
            return
        if channel in self._inbound:
            self._inbound[channel].feed(payload)

    async def close(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        self.shutdown(code, reason)
        await self.wait_closed()

    def shutdown(self, code: int = NORMAL_CLOSURE, reason: str = "") -> None:
        """CLOSE (once) and the end of the connection, without waiting: the transport sends what it holds first."""
        if not self.closed:
            self.closed = True
            with contextlib.suppress(LocalProtocolError):
                self._writer.write(self._ws.send(CloseConnection(code=code, reason=reason)))
        self._writer.close()

    async def wait_closed(self) -> None:
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()

    async def _send_raw(self, data: bytes) -> None:
        async with self._lock:
            self._writer.write(data)
            self.last_activity = time.monotonic()
            await self._writer.drain()
