"""Checks of the stream clients' own wire format, against tiny loopback peers written here.

The peers decode what the clients send with independent code (plain zlib,
struct, hashlib) and answer with hand-built frames; they are not exec servers.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from tests.streamclients import ProtocolError, UpgradeRefused, spdy, websocket
from tests.streamclients import remotecommand as rc

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

# RFC 6455 section 1.3's worked example.
RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
SPDY3_DICTIONARY_ID = 0xE3C6A7C2  # adler32 of the SPDY/3 dictionary, as Chromium's kV3DictionaryId


@asynccontextmanager
async def loopback(handler: Handler) -> AsyncIterator[str]:
    """Serve handler on 127.0.0.1; yields a base URL. Handler failures surface in the test."""
    failures: list[BaseException] = []

    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except Exception as exc:
            failures.append(exc)
        finally:
            writer.close()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"
    if failures:
        raise failures[0]


async def read_request(reader: asyncio.StreamReader) -> tuple[str, list[tuple[str, str]]]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    request_line, *lines = head.rstrip("\r\n").split("\r\n")
    return request_line, [(k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lines)]


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 20))


# --- SPDY ---------------------------------------------------------------------------------------------------------


def test_dictionary_is_the_spdy3_dictionary() -> None:
    d = spdy.SPDY3_DICTIONARY
    assert len(d) == 1423
    assert zlib.adler32(d) == SPDY3_DICTIONARY_ID
    assert d.startswith(b"\x00\x00\x00\x07options\x00\x00\x00\x04head")
    assert b"\x00\x00\x00\x06status\x00\x00\x00\x06200 OK" in d
    assert d[839:858] == b"\x00\x00\x00\x06origin100101201"  # the last word, then the raw tail
    assert d.endswith(b",*,enq=0.")


def test_header_blocks_use_the_dictionary_and_one_context_per_direction() -> None:
    compressor = spdy.HeaderCompressor()
    first = compressor.compress(spdy.encode_header_block({"streamType": "error"}))
    second = compressor.compress(spdy.encode_header_block({"streamType": "stdout", "port": ["1", "2"]}))
    # zlib header: deflate, FDICT set, then the dictionary id (RFC 1950).
    cmf, flg, dict_id = first[0], first[1], struct.unpack(">I", first[2:6])[0]
    assert cmf & 0x0F == 8 and flg & 0x20 and (cmf * 256 + flg) % 31 == 0
    assert dict_id == SPDY3_DICTIONARY_ID
    assert first.endswith(b"\x00\x00\xff\xff")  # each block ends on a sync flush
    assert second[:2] != first[:2]  # the second block continues the stream: no new zlib header
    plain = zlib.decompressobj(zdict=spdy.SPDY3_DICTIONARY)
    assert plain.decompress(first) == b"\0\0\0\1\0\0\0\x0astreamtype\0\0\0\x05error"
    assert spdy.decode_header_block(plain.decompress(second)) == {"streamtype": ["stdout"], "port": ["1", "2"]}
    with pytest.raises(zlib.error):
        zlib.decompressobj().decompress(first)  # needs the dictionary


def test_header_block_decoder_rejects_garbage() -> None:
    with pytest.raises(ProtocolError):
        spdy.decode_header_block(b"\0\0\0\2\0\0\0\1a\0\0\0\1b")  # says 2 entries, has 1
    with pytest.raises(ProtocolError):
        spdy.decode_header_block(spdy.encode_header_block({"a": "b"}) + b"x")


class FakeSpdyPeer:
    """The server half of a SPDY/3 session, built from struct and zlib alone."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer
        self.inflate = zlib.decompressobj(zdict=spdy.SPDY3_DICTIONARY)
        self.deflate = zlib.compressobj(9, zdict=spdy.SPDY3_DICTIONARY)

    async def frame(self) -> tuple[bytes, int, bytes]:
        head = await self.reader.readexactly(8)
        length = struct.unpack(">I", head[4:])[0] & 0xFFFFFF
        return head, head[4], await self.reader.readexactly(length)

    def control(self, kind: int, flags: int, payload: bytes) -> None:
        self.writer.write(struct.pack(">HHI", 0x8003, kind, flags << 24 | len(payload)) + payload)

    def block(self, headers: dict[str, str]) -> bytes:
        raw = struct.pack(">I", len(headers))
        for name, value in headers.items():
            raw += struct.pack(">I", len(name)) + name.encode() + struct.pack(">I", len(value)) + value.encode()
        return self.deflate.compress(raw) + self.deflate.flush(zlib.Z_SYNC_FLUSH)

    def headers(self, block: bytes) -> dict[str, list[str]]:
        return spdy.decode_header_block(self.inflate.decompress(block))


async def spdy_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request_line, headers = await read_request(reader)
    assert request_line == "POST /exec/tok?x=1 HTTP/1.1"
    assert [v for k, v in headers if k == "X-Stream-Protocol-Version"] == ["v4.channel.k8s.io", "channel.k8s.io"]
    assert ("Upgrade", "SPDY/3.1") in headers and ("Connection", "Upgrade") in headers
    assert ("Content-Length", "0") in headers
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
        b"X-Stream-Protocol-Version: v4.channel.k8s.io\r\n\r\n"
    )
    peer = FakeSpdyPeer(reader, writer)
    for expected_id, expected_type in ((1, "error"), (3, "stdout")):
        head, flags, payload = await peer.frame()
        assert head[:4] == b"\x80\x03\x00\x01" and flags == 0  # SYN_STREAM, version 3, no FIN
        stream_id, assoc, priority, slot = struct.unpack(">IIBB", payload[:10])
        assert (stream_id, assoc, priority, slot) == (expected_id, 0, 0, 0)
        assert peer.headers(payload[10:]) == {"streamtype": [expected_type]}
        peer.control(spdy.SYN_REPLY, 0, struct.pack(">I", stream_id) + peer.block({}))
    # Window frames spdystream ignores, a ping to echo, data, FIN.
    peer.control(spdy.SETTINGS, 0, struct.pack(">III", 1, spdy.SETTINGS_INITIAL_WINDOW_SIZE, 10))
    peer.control(spdy.WINDOW_UPDATE, 0, struct.pack(">II", 3, 100))
    peer.control(spdy.PING, 0, struct.pack(">I", 2))
    writer.write(struct.pack(">II", 3, 5) + b"hello" + struct.pack(">II", 3, 1 << 24))
    head, _, payload = await peer.frame()
    assert head == b"\x80\x03\x00\x06\x00\x00\x00\x04" and payload == struct.pack(">I", 2)
    # The client writes on stream 3, half-closes it, pings, and closes the session.
    head, flags, payload = await peer.frame()
    assert head[:4] == struct.pack(">I", 3) and flags == 0 and payload == b"input"
    head, flags, payload = await peer.frame()
    assert head == struct.pack(">II", 3, 1 << 24) and payload == b""  # empty DATA with FIN
    head, _, payload = await peer.frame()
    assert head[:4] == b"\x80\x03\x00\x06" and payload == struct.pack(">I", 1)  # client pings are odd
    peer.control(spdy.PING, 0, payload)
    head, _, payload = await peer.frame()
    assert head[:4] == b"\x80\x03\x00\x03" and struct.unpack(">II", payload) == (1, spdy.CANCEL)  # reset error
    head, _, payload = await peer.frame()
    assert head[:4] == b"\x80\x03\x00\x07" and struct.unpack(">II", payload) == (0, spdy.GOAWAY_OK)
    assert await reader.read() == b""


def test_spdy_session_frames() -> None:
    async def scenario() -> None:
        async with loopback(spdy_peer) as base:
            client, protocol = await spdy.connect(f"{base}/exec/tok?x=1", ["v4.channel.k8s.io", "channel.k8s.io"])
            assert protocol == "v4.channel.k8s.io"
            error = await client.open_stream({"streamType": "error"})
            stdout = await client.open_stream({"streamType": "stdout"})
            assert await stdout.read_all(5) == b"hello" and stdout.fin_received
            await stdout.write(b"input")
            await stdout.close()
            await client.ping(5)
            assert client.pings_answered == 1 and client.pongs_received == 1
            assert client.window_updates_received == 1 and client.settings == {7: 10}
            assert not error.ended
            await client.close()
            assert client.protocol_error is None

    run(scenario())


def test_spdy_upgrade_refused_carries_status_and_body() -> None:
    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        body = b"unable to upgrade: unable to negotiate protocol"
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async def scenario() -> None:
        async with loopback(refuse) as base:
            with pytest.raises(UpgradeRefused) as refused:
                await spdy.connect(f"{base}/exec/x", ["v9.channel.k8s.io"])
        assert refused.value.status == 403
        assert refused.value.body == "unable to upgrade: unable to negotiate protocol"

    run(scenario())


# --- WebSocket ----------------------------------------------------------------------------------------------------


def test_accept_key_and_masking() -> None:
    assert websocket.accept_key(RFC_KEY) == RFC_ACCEPT
    key = b"\x37\xfa\x21\x3d"
    # RFC 6455 section 5.7: "Hello" masked with 37 fa 21 3d.
    assert websocket.mask(key, b"Hello") == bytes.fromhex("7f9f4d5158")
    assert websocket.encode_frame(websocket.TEXT, b"Hello", masking_key=key) == bytes.fromhex("818537fa213d7f9f4d5158")
    assert websocket.encode_frame(websocket.BINARY, b"x" * 256)[:4] == b"\x82\x7e\x01\x00"
    assert websocket.encode_frame(websocket.BINARY, b"x" * 70000)[:10] == b"\x82\x7f" + struct.pack(">Q", 70000)


async def ws_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, protocol: str) -> list[str]:
    request_line, headers = await read_request(reader)
    fields = dict(headers)
    assert request_line.startswith("GET ") and fields["Upgrade"] == "websocket" and fields["Connection"] == "Upgrade"
    assert fields["Sec-WebSocket-Version"] == "13" and len(base64.b64decode(fields["Sec-WebSocket-Key"])) == 16
    accept = base64.b64encode(hashlib.sha1((fields["Sec-WebSocket-Key"] + websocket.GUID).encode()).digest())
    writer.write(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: " + accept + b"\r\nSec-WebSocket-Protocol: " + protocol.encode() + b"\r\n\r\n"
    )
    return [p.strip() for p in fields["Sec-WebSocket-Protocol"].split(",")]


async def client_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    """(first byte, opcode, unmasked payload) of a client frame, which must be masked."""
    first, second = await reader.readexactly(2)
    assert second & 0x80, "client frames must be masked"
    size = second & 0x7F
    if size == 126:
        size = struct.unpack(">H", await reader.readexactly(2))[0]
    key = await reader.readexactly(4)
    data = await reader.readexactly(size)
    return first, first & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(data))


async def ws_peer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    assert await ws_accept(reader, writer, "v5.channel.k8s.io") == ["v5.channel.k8s.io", "v4.channel.k8s.io"]
    assert await client_frame(reader) == (0x82, 2, b"\x00abc")
    # A client message fragmented at 4 bytes: BINARY, CONTINUATION..., the last with FIN.
    fragments = [await client_frame(reader) for _ in range(3)]
    assert [(f[0], f[2]) for f in fragments] == [(0x02, b"\x00def"), (0x00, b"ghij"), (0x80, b"k")]
    # A fragmented message with a ping between its fragments, then a close.
    writer.write(b"\x02\x02\x01h" + b"\x89\x04ping" + b"\x80\x02el" + b"\x82\x02\x02!")
    assert await client_frame(reader) == (0x8A, 0xA, b"ping")
    writer.write(b"\x88\x05\x03\xe8bye")
    assert await client_frame(reader) == (0x88, 0x8, b"\x03\xe8")
    assert await reader.read() == b""


def test_websocket_framing_fragmentation_ping_and_close() -> None:
    async def scenario() -> None:
        async with loopback(ws_peer) as base:
            ws, protocol = await websocket.connect(f"{base}/exec/t", ["v5.channel.k8s.io", "v4.channel.k8s.io"])
            assert protocol == "v5.channel.k8s.io"
            await ws.send_binary(b"\x00abc")
            ws.max_frame_payload = 4
            await ws.send_binary(b"\x00defghijk")
            assert await ws.recv(5) == b"\x01hel" and ws.pings_answered == 1
            assert await ws.recv(5) == b"\x02!"
            assert await ws.recv(5) is None
            assert (ws.close_code, ws.close_reason, ws.close_sent) == (1000, "bye", True)
            await ws.close()

    run(scenario())


def test_websocket_rejects_a_wrong_accept_key() -> None:
    async def bad_accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + RFC_ACCEPT.encode() + b"\r\n\r\n"
        )

    async def scenario() -> None:
        async with loopback(bad_accept) as base:
            with pytest.raises(ProtocolError, match="Sec-WebSocket-Accept"):
                await websocket.connect(f"{base}/x", ["v4.channel.k8s.io"])

    run(scenario())


def test_websocket_rejects_masked_server_frames() -> None:
    async def masking(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ws_accept(reader, writer, "v4.channel.k8s.io")
        writer.write(websocket.encode_frame(websocket.BINARY, b"\x01x", masking_key=b"abcd"))
        await reader.read()

    async def scenario() -> None:
        async with loopback(masking) as base:
            ws, _ = await websocket.connect(f"{base}/x", ["v4.channel.k8s.io"])
            with pytest.raises(ProtocolError, match="masked"):
                await ws.recv(5)
            ws.abort()

    run(scenario())


# --- the k8s layer's own decoding -----------------------------------------------------------------------------------


def test_port_prefix_is_checked_and_stripped() -> None:
    async def forwarder(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await ws_accept(reader, writer, "v4.channel.k8s.io")
        port = (8080).to_bytes(2, "little")
        for message in (b"\x00" + port, b"\x01" + port, b"\x00HTTP/1.0 200 OK\r\n\r\n", b"\x01oops"):
            writer.write(websocket.encode_frame(websocket.BINARY, message))
        assert await client_frame(reader) == (0x82, 2, b"\x00GET / HTTP/1.0\r\n\r\n")
        writer.write(b"\x88\x02\x03\xe8")
        await reader.read()

    async def scenario() -> None:
        async with loopback(forwarder) as base:
            pf = await rc.portforward_websocket(f"{base}/portforward/t", [8080])
            response = await rc.http_over(pf.channel(0), b"GET / HTTP/1.0\r\n\r\n", timeout=5)
            assert response == b"HTTP/1.0 200 OK\r\n\r\n"
            assert await pf.read_error_all(0, 5) == b"oops"
            assert pf.prefix_alone == {0: True, 1: True}
            await pf.close()

    run(scenario())


def test_exec_result_follows_client_go_decoding() -> None:
    success = rc.ExecResult(rc.V4, b"", b"", {"metadata": {}, "status": "Success"}, '{"status":"Success"}')
    assert success.client_go_error() is None and success.exit_code == 0
    failed = {
        "status": "Failure",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": "3"}]},
    }
    nonzero = rc.ExecResult(rc.V4, b"", b"", failed, "{...}")
    assert nonzero.exit_code == 3 and nonzero.client_go_error() == "exit code 3"
    assert rc.ExecResult(rc.V4, b"", b"", None, "").exit_code == 0  # an empty error stream is success
    legacy = rc.ExecResult(rc.V3, b"", b"", None, "command terminated")
    assert legacy.exit_code is None and legacy.client_go_error() == "error executing remote command: command terminated"
