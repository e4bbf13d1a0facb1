"""The SPDY/3.1 server session, driven over a socket pair by a client with its own frame codec.

The client side here builds and parses every frame by hand, with its own zlib contexts, so that a wrong encoding
in cri.streaming.spdy shows up as a failure instead of agreeing with itself. Only the dictionary is shared, and
test_dictionary_is_the_spdy3_one pins it to the checksum every SPDY/3 implementation writes on the wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest

from cri.streaming.spdy import HEADER_DICTIONARY, SpdySession, SpdyStream

# adler32 of the SPDY/3 dictionary: the DICTID after "78 xx" in SPDY/3 header blocks (Chromium's test frames).
SPDY3_DICTIONARY_ID = 0xE3C6A7C2

SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FIN = 0x01
CANCEL, INVALID_STREAM, PROTOCOL_ERROR = 5, 2, 1
STREAM_ID_FRAMES = {SYN_STREAM, SYN_REPLY, RST_STREAM, HEADERS, WINDOW_UPDATE}


def control(frame_type: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8003, frame_type, flags << 24 | len(payload)) + payload


def data(stream_id: int, payload: bytes, fin: bool = False) -> bytes:
    return struct.pack(">II", stream_id, (FIN if fin else 0) << 24 | len(payload)) + payload


def ping(ping_id: int) -> bytes:
    return control(PING, 0, struct.pack(">I", ping_id))


def rst(stream_id: int, status: int) -> bytes:
    return control(RST_STREAM, 0, struct.pack(">II", stream_id, status))


def window_update(stream_id: int, delta: int) -> bytes:
    return control(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))


def settings(entries: list[tuple[int, int]]) -> bytes:
    body = b"".join(struct.pack(">II", sid, value) for sid, value in entries)
    return control(SETTINGS, 0, struct.pack(">I", len(entries)) + body)


def goaway(last_stream_id: int, status: int) -> bytes:
    return control(GOAWAY, 0, struct.pack(">II", last_stream_id, status))


@dataclass
class Frame:
    control: bool
    type: int  # 0 for DATA
    flags: int
    stream_id: int
    payload: bytes

    def words(self) -> tuple[int, int]:
        first, second = struct.unpack(">II", self.payload)
        return first, second


class Peer:
    """The client end of the connection, as spdystream would drive it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.deflate = zlib.compressobj(zdict=HEADER_DICTIONARY)
        self.inflate = zlib.decompressobj(zdict=HEADER_DICTIONARY)
        self.ping_ids = itertools.count(1001, 2)

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    def header_block(self, pairs: list[tuple[str, str]]) -> bytes:
        raw = struct.pack(">I", len(pairs))
        for name, value in pairs:
            raw += struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(value)) + value.encode()
        return self.deflate.compress(raw) + self.deflate.flush(zlib.Z_SYNC_FLUSH)

    def syn_stream(self, stream_id: int, pairs: list[tuple[str, str]], flags: int = 0) -> bytes:
        return control(SYN_STREAM, flags, struct.pack(">IIBB", stream_id, 0, 0, 0) + self.header_block(pairs))

    async def frame(self, timeout: float = 5.0) -> Frame:
        first, second = struct.unpack(">II", await asyncio.wait_for(self.reader.readexactly(8), timeout))
        payload = await asyncio.wait_for(self.reader.readexactly(second & 0xFFFFFF), timeout)
        if not first & 0x80000000:
            return Frame(False, 0, second >> 24, first & 0x7FFFFFFF, payload)
        assert (first >> 16) & 0x7FFF == 3, "control frame of another SPDY version"
        frame_type = first & 0xFFFF
        stream_id = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF if frame_type in STREAM_ID_FRAMES else 0
        return Frame(True, frame_type, second >> 24, stream_id, payload)

    async def sync(self) -> None:
        """PING and expect the answer as the very next frame: nothing else was queued before it."""
        ping_id = next(self.ping_ids)
        self.send(ping(ping_id))
        frame = await self.frame()
        assert (frame.control, frame.type, frame.payload) == (True, PING, struct.pack(">I", ping_id)), frame

    async def collect(self, stream_id: int, size: int) -> bytes:
        """Read DATA for one stream until size bytes came; any other frame is a failure."""
        got = bytearray()
        while len(got) < size:
            frame = await self.frame()
            assert not frame.control and frame.stream_id == stream_id and frame.flags == 0, frame
            assert 0 < len(frame.payload) <= 64 * 1024
            got += frame.payload
        assert len(got) == size
        return bytes(got)


Connected = tuple[SpdySession, Peer, "asyncio.Task[None]"]


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[Connected]:
    ours, theirs = socket.socketpair()
    session = SpdySession(*await asyncio.open_connection(sock=ours))
    peer = Peer(*await asyncio.open_connection(sock=theirs))
    serving = asyncio.create_task(session.serve())
    try:
        yield session, peer, serving
    finally:
        peer.writer.close()
        await asyncio.wait_for(serving, 10)
        await session.close()


async def open_stream(session: SpdySession, peer: Peer, stream_id: int, kind: str = "stdout") -> SpdyStream:
    peer.send(peer.syn_stream(stream_id, [("streamtype", kind)]))
    stream = await asyncio.wait_for(session.accept(), 5)
    assert stream is not None and stream.stream_id == stream_id
    reply = await peer.frame()
    assert (reply.type, reply.stream_id) == (SYN_REPLY, stream_id)
    assert peer.inflate.decompress(reply.payload[4:]) == b"\0\0\0\0"
    return stream


async def read_all(stream: SpdyStream) -> bytes:
    got = bytearray()
    while chunk := await stream.read():
        got += chunk
    return bytes(got)


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(test(), 30)

    asyncio.run(bounded())


def pattern(size: int) -> bytes:
    return (bytes(range(251)) * (size // 251 + 1))[:size]


def test_dictionary_is_the_spdy3_one() -> None:
    assert len(HEADER_DICTIONARY) == 1423
    assert zlib.adler32(HEADER_DICTIONARY) == SPDY3_DICTIONARY_ID
    assert HEADER_DICTIONARY.startswith(b"\0\0\0\x07options\0\0\0\x04head\0\0\0\x04post")
    assert HEADER_DICTIONARY.endswith(b"charset=iso-8859-1,utf-,*,enq=0.")


def test_stream_is_accepted_with_its_headers_and_a_syn_reply() -> None:
    async def body() -> None:
        async with connected() as (session, peer, _):
            pairs = [("streamtype", "error"), ("Port", "8080"), ("x-multi", "a\0b"), ("x-dup", "1"), ("x-dup", "2")]
            peer.send(peer.syn_stream(1, pairs))
            stream = await asyncio.wait_for(session.accept(), 5)
            assert stream is not None and stream.stream_id == 1
            assert stream.headers == {"streamtype": "error", "port": "8080", "x-multi": "a", "x-dup": "1"}
            reply = await peer.frame()
            assert (reply.control, reply.type, reply.flags, reply.stream_id) == (True, SYN_REPLY, 0, 1)
            block = reply.payload[4:]
            assert block[0] == 0x78 and block[1] & 0x20, "zlib header with FDICT set"
            assert struct.unpack(">I", block[2:6])[0] == SPDY3_DICTIONARY_ID
            assert peer.inflate.decompress(block) == b"\0\0\0\0"
            assert not stream.remote_closed

    run(body)


def test_data_both_ways_with_fin() -> None:
    async def body() -> None:
        async with connected() as (session, peer, _):
            stream = await open_stream(session, peer, 1, "stdin")
            peer.send(data(1, b"hello"), data(1, b"", fin=True))
            assert await stream.read() == b"hello"
            assert await stream.read() == b""
            assert stream.remote_closed
            await stream.write(b"world")
            await stream.close()
            await stream.close()
            frame = await peer.frame()
            assert (frame.control, frame.stream_id, frame.flags, frame.payload) == (False, 1, 0, b"world")
            frame = await peer.frame()
            assert (frame.control, frame.stream_id, frame.flags, frame.payload) == (False, 1, FIN, b"")
            await peer.sync()  # the second close() sent nothing
            with pytest.raises(ConnectionError):
                await stream.write(b"late")

    run(body)


def test_two_streams_interleaved_share_one_header_context() -> None:
    async def body() -> None:
        async with connected() as (session, peer, _):
            first = await open_stream(session, peer, 1, "stdout")
            second_syn = peer.syn_stream(3, [("streamtype", "stderr"), ("requestid", "7")])
            # The second block continues the first one's zlib stream: on its own it does not even have a header.
            with pytest.raises(zlib.error):
                zlib.decompressobj(zdict=HEADER_DICTIONARY).decompress(second_syn[18:])
            peer.send(second_syn)
            second = await asyncio.wait_for(session.accept(), 5)
            assert second is not None and second.headers == {"streamtype": "stderr", "requestid": "7"}
            reply = await peer.frame()
            assert (reply.type, reply.stream_id) == (SYN_REPLY, 3)
            assert peer.inflate.decompress(reply.payload[4:]) == b"\0\0\0\0"

            peer.send(data(1, b"a"), data(3, b"b"), data(1, b"c", fin=True), data(3, b"d", fin=True))
            assert [await first.read() for _ in range(3)] == [b"a", b"c", b""]
            assert [await second.read() for _ in range(3)] == [b"b", b"d", b""]

            big_one, big_two = pattern(300_000), b"xyz" * 100_000
            received: dict[int, bytearray] = {1: bytearray(), 3: bytearray()}

            async def drain_peer() -> None:
                while len(received[1]) < len(big_one) or len(received[3]) < len(big_two):
                    frame = await peer.frame()
                    assert not frame.control and frame.flags == 0, frame
                    received[frame.stream_id] += frame.payload

            await asyncio.gather(first.write(big_one), second.write(big_two), drain_peer())
            assert bytes(received[1]) == big_one and bytes(received[3]) == big_two

    run(body)


def test_ping_is_echoed_and_even_ids_are_not() -> None:
    async def body() -> None:
        async with connected() as (_, peer, _serving):
            peer.send(ping(1))
            frame = await peer.frame()
            assert (frame.type, frame.flags, frame.payload) == (PING, 0, b"\0\0\0\x01")
            peer.send(ping(2))  # an answer to a ping of ours: we sent none, so it is dropped
            await peer.sync()

    run(body)


def test_rst_from_the_peer_ends_read_and_fails_write() -> None:
    async def body() -> None:
        async with connected() as (session, peer, _):
            stream = await open_stream(session, peer, 1)
            reading = asyncio.create_task(stream.read())
            await asyncio.sleep(0.01)
            peer.send(rst(1, CANCEL))
            assert await asyncio.wait_for(reading, 5) == b""
            assert stream.remote_closed
            with pytest.raises(ConnectionError):
                await stream.write(b"x")
            stream.reset()  # already reset by the peer: nothing to send
            await stream.close()
            await peer.sync()
            peer.send(data(1, b"late"))  # the stream is gone now
            frame = await peer.frame()
            assert (frame.type, frame.words()) == (RST_STREAM, (1, INVALID_STREAM))

    run(body)


def test_reset_sends_rst_stream_once() -> None:
    async def body() -> None:
        async with connected() as (session, peer, _):
            stream = await open_stream(session, peer, 1)
            peer.send(data(1, b"never read"))
            await peer.sync()
            stream.reset()
            stream.reset()
            frame = await peer.frame()
            assert (frame.type, frame.words()) == (RST_STREAM, (1, CANCEL))
            await peer.sync()
            assert await stream.read() == b"", "a reset drops what was not read"
            with pytest.raises(ConnectionError):
                await stream.write(b"x")

    run(body)


def test_large_write_to_a_peer_that_never_sends_window_update() -> None:
    # What spdystream does: it never sends WINDOW_UPDATE, and the write must not stall at 64 KiB.
    async def body() -> None:
        async with connected() as (session, peer, _):
            stream = await open_stream(session, peer, 1)
            payload = pattern(2 * 1024 * 1024 + 123)
            writing = asyncio.create_task(stream.write(payload))
            assert await peer.collect(1, len(payload)) == payload
            await asyncio.wait_for(writing, 5)

    run(body)


def test_stream_window_is_held_once_the_peer_announces_flow_control() -> None:
    async def body() -> None:
        async with connected() as (session, peer, _):
            peer.send(settings([(7, 16384)]))  # SETTINGS_INITIAL_WINDOW_SIZE
            stream = await open_stream(session, peer, 1)
            payload = pattern(100_000)
            writing = asyncio.create_task(stream.write(payload))
            head = await peer.collect(1, 16384)
            await peer.sync()
            assert not writing.done()
            peer.send(window_update(1, len(payload) - 16384))
            assert head + await peer.collect(1, len(payload) - 16384) == payload
            await asyncio.wait_for(writing, 5)

    run(body)


def test_session_and_stream_windows_of_a_spdy31_peer_are_honoured() -> None:
    async def body() -> None:
        async with connected() as (session, peer, _):
            peer.send(window_update(0, 65536))  # session window: 128 KiB
            stream = await open_stream(session, peer, 1)
            payload = pattern(1024 * 1024)
            writing = asyncio.create_task(stream.write(payload))
            stream_window, session_window, got = 65536, 131072, bytearray()
            while len(got) < 65536:
                frame = await peer.frame()
                assert not frame.control and len(frame.payload) <= min(stream_window, session_window)
                stream_window -= len(frame.payload)
                session_window -= len(frame.payload)
                got += frame.payload
            await peer.sync()
            assert not writing.done() and stream_window == 0
            while len(got) < len(payload):
                if stream_window == 0:
                    peer.send(window_update(1, 32768), window_update(0, 32768))
                    stream_window, session_window = stream_window + 32768, session_window + 32768
                frame = await peer.frame()
                assert not frame.control and len(frame.payload) <= min(stream_window, session_window)
                stream_window -= len(frame.payload)
                session_window -= len(frame.payload)
                got += frame.payload
            assert bytes(got) == payload
            await asyncio.wait_for(writing, 5)

    run(body)


def test_session_window_binds_across_streams() -> None:
    async def body() -> None:
        async with connected() as (session, peer, _):
            peer.send(window_update(0, 16384))  # session window: 80 KiB, less than two streams' 64 KiB each
            one, three = await open_stream(session, peer, 1), await open_stream(session, peer, 3)
            payloads = {1: pattern(65536), 3: b"q" * 65536}
            writes = [asyncio.create_task(one.write(payloads[1])), asyncio.create_task(three.write(payloads[3]))]
            got: dict[int, bytearray] = {1: bytearray(), 3: bytearray()}

            async def take(total: int) -> None:
                while sum(map(len, got.values())) < total:
                    frame = await peer.frame()
                    assert not frame.control, frame
                    got[frame.stream_id] += frame.payload

            await take(81920)
            await peer.sync()
            assert sum(map(len, got.values())) == 81920 and not all(w.done() for w in writes)
            peer.send(window_update(0, 49152))
            await take(131072)
            await asyncio.wait_for(asyncio.gather(*writes), 5)
            assert {k: bytes(v) for k, v in got.items()} == payloads

    run(body)


def test_window_updates_follow_what_we_consume() -> None:
    # A peer that honours our 64 KiB windows must not stall on large stdin.
    async def body() -> None:
        async with connected() as (session, peer, _):
            stream = await open_stream(session, peer, 1, "stdin")
            payload = pattern(1024 * 1024)
            reading = asyncio.create_task(read_all(stream))
            windows, granted, sent = {1: 65536, 0: 65536}, {1: 0, 0: 0}, 0
            while sent < len(payload):
                while min(windows.values()) == 0:
                    frame = await peer.frame()
                    assert frame.type == WINDOW_UPDATE, frame
                    stream_id, delta = frame.words()
                    windows[stream_id] += delta
                    granted[stream_id] += delta
                n = min(16384, len(payload) - sent, *windows.values())
                peer.send(data(1, payload[sent : sent + n]))
                sent += n
                windows = {k: v - n for k, v in windows.items()}
            peer.send(data(1, b"", fin=True))
            assert await asyncio.wait_for(reading, 10) == payload
            assert granted[1] >= len(payload) - 65536 and granted[0] >= len(payload) - 65536

    run(body)


def test_unread_data_past_the_limit_pauses_the_read_loop() -> None:
    # spdystream ignores our windows; the read loop then stops reading the socket instead of buffering forever.
    async def body() -> None:
        async with connected() as (session, peer, _):
            stream = await open_stream(session, peer, 1, "stdin")
            payload = pattern(3 * 1024 * 1024)
            peer.send(*(data(1, payload[i : i + 32768]) for i in range(0, len(payload), 32768)))
            peer.send(data(1, b"", fin=True), ping(1))
            with pytest.raises(TimeoutError):
                await peer.frame(timeout=0.3)  # the PING sits behind data nobody reads yet
            assert await read_all(stream) == payload
            while (frame := await peer.frame()).type != PING:
                assert frame.type == WINDOW_UPDATE

    run(body)


def test_headers_frames_keep_the_zlib_context_in_sync() -> None:
    async def body() -> None:
        async with connected() as (session, peer, _):
            await open_stream(session, peer, 1)
            peer.send(control(HEADERS, 0, struct.pack(">I", 1) + peer.header_block([("x-extra", "1")])))
            stream = await open_stream(session, peer, 3, "data")
            assert stream.headers == {"streamtype": "data"}

    run(body)


def test_repeated_and_even_stream_ids_are_refused_and_the_session_goes_on() -> None:
    async def body() -> None:
        async with connected() as (session, peer, _):
            await open_stream(session, peer, 1)
            peer.send(peer.syn_stream(1, [("streamtype", "again")]))
            frame = await peer.frame()
            assert (frame.type, frame.words()) == (RST_STREAM, (1, PROTOCOL_ERROR))
            peer.send(peer.syn_stream(4, [("streamtype", "even")]))
            frame = await peer.frame()
            assert (frame.type, frame.words()) == (RST_STREAM, (4, PROTOCOL_ERROR))
            stream = await open_stream(session, peer, 5, "error")
            assert stream.headers == {"streamtype": "error"}
            assert not session.closed

    run(body)


def test_data_for_an_unknown_stream_gets_invalid_stream() -> None:
    async def body() -> None:
        async with connected() as (_, peer, _serving):
            peer.send(data(7, b"who?"))
            frame = await peer.frame()
            assert (frame.type, frame.words()) == (RST_STREAM, (7, INVALID_STREAM))

    run(body)


def test_goaway_ends_the_session() -> None:
    async def body() -> None:
        async with connected() as (session, peer, serving):
            stream = await open_stream(session, peer, 1)
            peer.send(goaway(1, 0))
            await asyncio.wait_for(serving, 5)
            assert session.closed
            assert await session.accept() is None
            assert await session.accept() is None
            assert await stream.read() == b""
            assert stream.remote_closed
            with pytest.raises(ConnectionError):
                await stream.write(b"x")
            stream.reset()  # a finished session: nothing to do
            assert await peer.reader.read() == b""

    run(body)


def test_eof_ends_the_session() -> None:
    async def body() -> None:
        async with connected() as (session, peer, serving):
            waiting = asyncio.create_task(session.accept())
            await asyncio.sleep(0.01)
            peer.writer.close()
            await asyncio.wait_for(serving, 5)
            assert await asyncio.wait_for(waiting, 5) is None
            assert session.closed

    run(body)


def test_garbage_is_a_protocol_error() -> None:
    async def body() -> None:
        async with connected() as (session, peer, serving):
            peer.send(b"\xff" * 16)
            await asyncio.wait_for(serving, 5)
            assert session.closed
            frame = await peer.frame()
            assert (frame.type, frame.words()) == (GOAWAY, (0, 1))  # PROTOCOL_ERROR
            assert await peer.reader.read() == b""

    run(body)


def test_close_sends_goaway_once() -> None:
    async def body() -> None:
        async with connected() as (session, peer, serving):
            await open_stream(session, peer, 3)
            before = session.last_activity
            await session.close()
            await session.close()
            frame = await peer.frame()
            assert (frame.type, frame.words()) == (GOAWAY, (3, 0))
            assert await peer.reader.read() == b""
            await asyncio.wait_for(serving, 5)
            assert session.closed and session.last_activity >= before
            assert await session.accept() is None

    run(body)
