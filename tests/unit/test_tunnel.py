"""SPDY tunnelled in a WebSocket (cri.streaming.tunnel), with no socket: the server's WebSocket, the adapter and a
SpdySession run over an in-memory connection, and a wsproto client on the other end sends client-go's frames cut
into messages at arbitrary points. The SPDY frames are built and parsed with the test clients' own codec
(tests/streamclients/spdy.py), not with the server's.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, CloseConnection, Message, Request, TextMessage

from cri.streaming import tunnel
from cri.streaming.spdy import SpdySession, SpdyStream
from cri.streaming.websocket import WebSocket
from tests.streamclients.spdy import (
    FLAG_FIN,
    GOAWAY,
    SYN_REPLY,
    SYN_STREAM,
    HeaderCompressor,
    control_frame,
    data_frame,
    encode_header_block,
)

PROTOCOL = "SPDY/3.1+portforward.k8s.io"
WAIT = 5.0


def run(coro: Any) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


# ---- the byte stream alone ------------------------------------------------------------------------------------


def test_reads_take_bytes_across_message_boundaries_and_the_end_is_an_incomplete_read() -> None:
    async def go() -> None:
        reader = tunnel.TunnelReader()
        for piece in (b"abc", b"d", b"", b"efgh"):
            await reader.feed(piece)
        assert await reader.readexactly(2) == b"ab"
        assert await reader.readexactly(5) == b"cdefg"
        waiting = asyncio.ensure_future(reader.readexactly(3))
        await asyncio.sleep(0)
        assert not waiting.done()  # 1 byte buffered, 3 wanted
        await reader.feed(b"ij")
        assert await asyncio.wait_for(waiting, WAIT) == b"hij"
        await reader.feed(b"k")
        reader.end()
        with pytest.raises(asyncio.IncompleteReadError) as short:
            await reader.readexactly(2)
        assert short.value.partial == b"k"

    run(go())


def test_a_full_buffer_holds_the_feeder_until_bytes_are_read_or_the_stream_ends() -> None:
    async def go() -> None:
        reader = tunnel.TunnelReader(limit=4)
        await reader.feed(b"12345")  # a payload is taken whole; only the next one waits
        blocked = asyncio.ensure_future(reader.feed(b"6"))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        assert await reader.readexactly(2) == b"12"
        await asyncio.wait_for(blocked, WAIT)
        assert reader.buffered == 4
        await reader.feed(b"7")
        blocked = asyncio.ensure_future(reader.feed(b"8"))
        await asyncio.sleep(0.01)
        reader.end()  # the session is done reading: the feeder goes on, its bytes dropped
        await asyncio.wait_for(blocked, WAIT)
        assert await reader.readexactly(5) == b"34567"

    run(go())


# ---- the whole server side over memory ------------------------------------------------------------------------


class MemoryTransport(asyncio.Transport):
    """The server's end of a connection without a socket: writes are kept; close() ends it as a socket's does."""

    def __init__(self, protocol: asyncio.StreamReaderProtocol) -> None:
        super().__init__()
        self.sent = bytearray()
        self._protocol = protocol
        self._closing = False

    def write(self, data: Any) -> None:
        if not self._closing:
            self.sent += data

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


@dataclass
class Received:
    binary: list[bytes] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    close: CloseConnection | None = None


@dataclass
class Tunnel:
    """A wsproto client on one end; the server's WebSocket, the adapter and a SpdySession on the other."""

    client: WSConnection
    incoming: asyncio.StreamReader  # what the server reads
    transport: MemoryTransport  # what the server wrote
    session: SpdySession
    compressor: HeaderCompressor = field(default_factory=HeaderCompressor)

    def send(self, stream: bytes, sizes: Sequence[int] | None) -> None:
        """The SPDY bytes as binary messages of these sizes in turn (None: all in one message)."""
        for piece in _cut(stream, sizes):
            self.incoming.feed_data(self.client.send(Message(data=piece)))

    def syn_stream(self, stream_id: int, headers: dict[str, str]) -> bytes:
        block = self.compressor.compress(encode_header_block(headers))
        return control_frame(SYN_STREAM, 0, struct.pack(">IIBB", stream_id, 0, 0, 0) + block)

    def received(self) -> Received:
        self.client.receive_data(bytes(self.transport.sent))
        self.transport.sent.clear()
        got = Received()
        for item in self.client.events():
            if isinstance(item, BytesMessage):
                assert item.message_finished
                got.binary.append(bytes(item.data))
            elif isinstance(item, TextMessage):
                got.text.append(item.data)
            elif isinstance(item, CloseConnection):
                got.close = item
        return got


def _cut(data: bytes, sizes: Sequence[int] | None) -> Iterator[bytes]:
    if sizes is None:
        yield data
        return
    start, turn = 0, 0
    while start < len(data):
        size = sizes[turn % len(sizes)]
        yield data[start : start + size]
        start, turn = start + size, turn + 1


def _frame(message: bytes) -> tuple[str, int, int, bytes]:
    """(kind, stream id, flags, payload) of the one whole SPDY frame a message must hold."""
    first, second = struct.unpack(">II", message[:8])
    flags, length = second >> 24, second & 0xFFFFFF
    assert length == len(message) - 8, f"a message of {len(message)} bytes holding a frame of {length} + 8"
    payload = message[8:]
    if first & 0x80000000:
        kind = {SYN_REPLY: "SYN_REPLY", GOAWAY: "GOAWAY"}.get(first & 0xFFFF, str(first & 0xFFFF))
        stream_id = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF if kind == "SYN_REPLY" else 0
        return kind, stream_id, flags, payload
    return "DATA", first & 0x7FFFFFFF, flags, payload


@contextlib.asynccontextmanager
async def tunnelled() -> AsyncIterator[Tunnel]:
    loop = asyncio.get_running_loop()
    incoming = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(incoming)
    transport = MemoryTransport(protocol)
    protocol.connection_made(transport)
    socket_ = WebSocket(incoming, asyncio.StreamWriter(transport, protocol, incoming, loop), text=False)
    client = WSConnection(ConnectionType.CLIENT)
    await socket_.accept(
        client.send(Request(host="criopy", target="/portforward/t", subprotocols=[PROTOCOL])), PROTOCOL
    )
    client.receive_data(bytes(transport.sent))
    transport.sent.clear()
    accepted = list(client.events())
    assert isinstance(accepted[0], AcceptConnection) and accepted[0].subprotocol == PROTOCOL
    session = tunnel.spdy_session(socket_)
    tasks = [asyncio.ensure_future(socket_.serve()), asyncio.ensure_future(session.serve())]
    try:
        yield Tunnel(client, incoming, transport, session)
    finally:
        await session.close()
        await asyncio.wait_for(asyncio.gather(*tasks), WAIT)


async def _read(stream: SpdyStream, size: int) -> bytes:
    got = b""
    while len(got) < size:
        chunk = await asyncio.wait_for(stream.read(), WAIT)
        assert chunk, got
        got += chunk
    return got


SPLITS = {"one byte each": (1,), "odd sizes": (3, 1, 8, 2, 300, 5), "all in one message": None}


@pytest.mark.parametrize("sizes", list(SPLITS.values()), ids=list(SPLITS))
def test_port_forward_frames_cut_anywhere_reach_the_session_and_its_frames_go_out_one_per_message(
    sizes: tuple[int, ...] | None,
) -> None:
    async def go() -> None:
        async with tunnelled() as t:
            error = {"streamType": "error", "port": "8080", "requestID": "0"}
            stream = (
                t.syn_stream(1, error)
                + data_frame(1, FLAG_FIN, b"")  # client-go half-closes the error stream at once
                + t.syn_stream(3, {**error, "streamType": "data"})
                + data_frame(3, 0, b"GET / HTTP/1.0\r\n\r\n")
            )
            t.send(stream, sizes)
            first = await asyncio.wait_for(t.session.accept(), WAIT)
            second = await asyncio.wait_for(t.session.accept(), WAIT)
            assert first is not None and second is not None
            assert first.headers == {"streamtype": "error", "port": "8080", "requestid": "0"}
            assert (second.stream_id, second.headers["streamtype"]) == (3, "data")
            assert await _read(second, 18) == b"GET / HTTP/1.0\r\n\r\n"
            assert await asyncio.wait_for(first.read(), WAIT) == b""  # its FIN came through too

            await second.write(b"HTTP/1.0 200 OK\r\n\r\n")
            frames = [_frame(m) for m in t.received().binary]
            assert [f[:2] for f in frames] == [("SYN_REPLY", 1), ("SYN_REPLY", 3), ("DATA", 3)]
            assert frames[2][3] == b"HTTP/1.0 200 OK\r\n\r\n"  # no channel byte: the payload is SPDY alone

            await t.session.close()
            got = t.received()
            assert [_frame(m)[0] for m in got.binary] == ["GOAWAY"]
            assert got.close is not None and got.close.code == 1000

    run(go())


def test_the_clients_close_ends_the_session() -> None:
    async def go() -> None:
        async with tunnelled() as t:
            t.send(t.syn_stream(1, {"streamType": "data", "port": "80", "requestID": "0"}), (5,))
            stream = await asyncio.wait_for(t.session.accept(), WAIT)
            assert stream is not None
            t.incoming.feed_data(t.client.send(CloseConnection(code=1000)))
            assert await asyncio.wait_for(t.session.accept(), WAIT) is None
            assert await asyncio.wait_for(stream.read(), WAIT) == b""
            assert t.received().close is not None  # the CLOSE was answered

    run(go())


def test_a_text_message_in_the_tunnel_closes_it() -> None:
    async def go() -> None:
        async with tunnelled() as t:
            t.incoming.feed_data(t.client.send(Message(data="not SPDY")))
            assert await asyncio.wait_for(t.session.accept(), WAIT) is None
            got = t.received()
            assert got.close is not None and got.close.code == 1003

    run(go())
