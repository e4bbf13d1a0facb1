"""criopy's HTTP/2 gRPC transport at the edges of RFC 9113, RFC 7541 and gRPC's PROTOCOL-HTTP2.md.

Frame-exact cases use `Raw`, a few-line HTTP/2 client over the unix socket with its own HPACK
encoder, so that a misbehaving peer can be played; the rest reuse test_grpcserver's h2 client.
The first group pins what a review found broken (now fixed); the rest, behaviour found correct.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import struct
import threading
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import hpack
import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.transport.grpcserver import GrpcServer, Limits, Route, RpcError
from cri.transport.grpcserver.calls import parse_timeout
from cri.transport.grpcserver.connection import Http2Connection
from tests.support.h2grpc import (
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    FLOW_CONTROL_ERROR,
    HEADERS,
    INITIAL_WINDOW_SIZE,
    MAX_MESSAGE,
    PADDED,
    PING,
    PROTOCOL_ERROR,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    STREAM_CLOSED,
    WINDOW_UPDATE,
    Client,
    Raw,
    Served,
    eventually,
    grpc_message,
    raw_frame,
)


def _connections(served: Served | Review) -> list[Http2Connection]:
    return list(served.server._connections)


# ---- a server with routes the shared fixture lacks -------------------------------------------------

CHUNK = 64 * 1024


@dataclass
class Review:
    path: str
    server: GrpcServer
    loop: asyncio.AbstractEventLoop
    produced: list[int] = field(default_factory=list)
    generator_closed: list[bool] = field(default_factory=list)

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)


@pytest.fixture
def review(tmp_path: Path) -> Iterator[Review]:
    loop = asyncio.new_event_loop()
    state = Review(str(tmp_path / "r.sock"), GrpcServer({}, Limits(max_receive_bytes=64 * 1024)), loop)

    async def flood(request: pb.VersionRequest) -> AsyncGenerator[pb.VersionResponse, None]:
        try:
            for i in range(10_000):
                state.produced.append(i)
                yield pb.VersionResponse(runtime_name="y" * CHUNK)
        finally:
            state.generator_closed.append(True)

    async def long_error(request: pb.VersionRequest) -> pb.VersionResponse:
        # e.g. Internal(f"starting container {id}: {exc}") with an OCI runtime's whole stderr in exc
        raise RpcError(grpc.StatusCode.INTERNAL, "runc: " + "e" * 20_000)

    routes = {
        "/r.S/Flood": Route(parse=pb.VersionRequest.FromString, stream=flood),
        "/r.S/LongError": Route(parse=pb.VersionRequest.FromString, unary=long_error),
    }
    state.server = GrpcServer(routes, Limits(max_receive_bytes=64 * 1024))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    state.run(state.server.start(state.path))
    try:
        yield state
    finally:
        state.run(state.server.stop(0.5))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


REQ = grpc_message(pb.VersionRequest())


# ---- bugs ------------------------------------------------------------------------------------------


def test_long_status_message_is_cut_and_split_within_the_clients_max_frame_size(review: Review) -> None:
    """A 20 kB error message: a single frame above the client's 16,384-byte SETTINGS_MAX_FRAME_SIZE would be
    a connection error for grpc-go (every call on the kubelet's connection fails). It is cut to 4 kB and
    header blocks are split into CONTINUATION frames."""
    with Raw(review.path) as raw:
        raw.request(1, "/r.S/LongError", REQ)
        raw.until(lambda: raw.ended(1))
        too_big = [len(fr.payload) for fr in raw.frames if len(fr.payload) > 16_384]
        assert too_big == [], f"frames above the peer's max frame size: {too_big}"


def test_unknown_long_path_is_answered_within_the_frame_size(client: Client) -> None:
    """The same with nothing but a long :path (the UNIMPLEMENTED message names it)."""
    sid = client.call("/t.S/" + "N" * 20_000, REQ)
    status, _ = client.answer(sid)  # raises h2.exceptions.FrameTooLargeError as reviewed
    assert status["grpc-status"] == "12"


def test_ping_flood_from_a_client_that_never_reads_is_not_buffered(served: Served) -> None:
    """pause_writing stops reading: without it the protocol would keep reading (and answering PINGs) whatever the
    transport's write buffer holds. A local client that sends PINGs and never reads makes the daemon
    buffer every PING ACK (CVE-2019-9512 'ping flood'); the same holds for SETTINGS (9515)."""
    with Raw(served.path) as raw:
        ping = raw_frame(PING, 0, 0, b"12345678") * 2048
        raw.sock.settimeout(1)
        sent = 0
        with contextlib.suppress(TimeoutError, BrokenPipeError, ConnectionResetError):
            while sent < 24 * 1024 * 1024:
                raw.sock.sendall(ping)
                sent += len(ping)
        time.sleep(0.5)

        async def buffered() -> int:
            return max((c._transport.get_write_buffer_size() for c in _connections(served) if c._transport), default=0)

        held = served.run(buffered())
        assert held < 4 * 1024 * 1024, f"{sent} bytes of PINGs sent: {held} bytes of PING ACKs held by the server"


def test_unfinished_request_bodies_are_bounded_per_connection(served: Served) -> None:
    """Flow control gives the window back as DATA arrives, so without a cap 1024 open streams x
    max_request_bytes (16 MiB in criopy) could be held per connection. Here 300 streams x 60 kB of
    unfinished requests: the connection is closed (ENHANCE_YOUR_CALM) once 4 requests' worth is held."""
    with Raw(served.path) as raw:
        body = b"\x00" * 15_000
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a fixed server may end it
            for i in range(300):
                sid = 2 * i + 1
                raw.request(sid, "/t.S/Version", None)
                for _ in range(4):
                    raw.send(DATA, 0, sid, body)
                if i % 50 == 0:
                    raw.quiet(0.05)  # take the WINDOW_UPDATEs off the socket

        with contextlib.suppress(ConnectionResetError):
            raw.quiet()

        async def held() -> int:
            return sum(len(s.body) for c in _connections(served) for s in c.streams.values())

        assert raw.goaway() == ENHANCE_YOUR_CALM
        assert served.run(held()) <= 4 * (MAX_MESSAGE + 5)  # the connection's bound: 4 requests' worth


def test_initial_window_size_overflowing_a_stream_window_is_a_flow_control_error(served: Served) -> None:
    """RFC 9113 6.9.2: a SETTINGS_INITIAL_WINDOW_SIZE that takes any stream window above 2^31-1 is a
    connection error FLOW_CONTROL_ERROR."""
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Wait", REQ)  # stays open: the handler waits
        raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", 2**31 - 1 - 65_535))  # stream window now 2^31-1
        raw.send(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE, 1_000_000))
        raw.quiet()
        assert raw.goaway() == FLOW_CONTROL_ERROR


def test_headers_on_a_stream_id_below_the_last_is_answered(served: Served) -> None:
    """RFC 9113 5.1.1: a new stream id must be above every id the client opened before; a lower one is a
    closed stream. The block is decoded (HPACK stays in step) and the stream reset STREAM_CLOSED, so the
    client does not wait forever."""
    with Raw(served.path) as raw:
        raw.request(5, "/t.S/Version", REQ)
        raw.status(5)
        raw.request(3, "/t.S/Version", REQ)
        raw.quiet()
        assert raw.goaway() == PROTOCOL_ERROR or raw.ended(3)


def test_rst_stream_and_window_update_on_an_idle_stream_are_protocol_errors(served: Served) -> None:
    """RFC 9113 5.1 (idle): RST_STREAM or WINDOW_UPDATE on an idle stream is a connection error PROTOCOL_ERROR."""
    codes = []
    for frame in (raw_frame(RST_STREAM, 0, 7, struct.pack(">I", 8)), raw_frame(WINDOW_UPDATE, 0, 9, b"\0\0\0\1")):
        with Raw(served.path) as raw:
            raw.sock.sendall(frame)
            raw.quiet()
            codes.append(raw.goaway())
    assert codes == [PROTOCOL_ERROR, PROTOCOL_ERROR]


# ---- behaviour found correct -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1H", 3600.0),
        (b"2M", 120.0),
        (b"3S", 3.0),
        (b"4m", 4e-3),
        (b"5u", 5e-6),
        (b"6n", 6e-9),
        (b"99999999S", 99999999),
    ],
)
def test_grpc_timeout_units(value: bytes, seconds: float) -> None:
    assert parse_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"S", b"100", b"100x", b"123456789S", b"-1S", b"1.5S", b" 1S", b"\xd9\xa1S"])
def test_grpc_timeout_malformed(value: bytes) -> None:
    with pytest.raises(RpcError) as bad:
        parse_timeout(value)
    assert bad.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_malformed_grpc_timeout_is_answered_invalid_argument(client: Client) -> None:
    status, _ = client.answer(client.call("/t.S/Version", REQ, [("grpc-timeout", "soon")]))
    assert status["grpc-status"] == "3" and "grpc-timeout" in status["grpc-message"]


def test_zero_length_request_is_invalid_argument(served: Served) -> None:
    with Raw(served.path) as raw:
        raw.send(HEADERS, END_HEADERS | END_STREAM, 1, raw.block("/t.S/Version"))
        assert raw.status(1)["grpc-status"] == "3"


def test_padded_data_counts_against_the_window_and_padding_is_not_body(served: Served) -> None:
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Version", None)
        pad = 200
        raw.send(DATA, PADDED | END_STREAM, 1, bytes([pad]) + REQ + b"\x00" * pad)
        assert raw.status(1)["grpc-status"] == "0"
        conn = _connections(served)[0]
        assert conn._recv_unacked == len(REQ) + pad + 1


def test_request_trailers_end_the_request_and_others_reset_it(served: Served) -> None:
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Version", None)
        raw.send(DATA, 0, 1, REQ)
        raw.send(HEADERS, END_HEADERS | END_STREAM, 1, raw.enc.encode([("x-trailer", "1")]))
        assert raw.status(1)["grpc-status"] == "0"
        raw.request(3, "/t.S/Version", None)
        raw.send(HEADERS, END_HEADERS, 3, raw.enc.encode([("x-trailer", "1")]))
        raw.until(lambda: raw.ended(3))
        assert raw.rst(3) == PROTOCOL_ERROR


def test_data_after_end_stream_is_stream_closed(served: Served) -> None:
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Wait", REQ)
        eventually(lambda: len(served.handlers.started) == 1)
        raw.send(DATA, 0, 1, b"late")
        raw.until(lambda: raw.ended(1))
        assert raw.rst(1) == STREAM_CLOSED
        eventually(lambda: len(served.handlers.cancelled) == 1)


def test_window_update_overflow(served: Served) -> None:
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Wait", REQ)
        raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", 2**31 - 1))
        raw.until(lambda: raw.ended(1))
        assert raw.rst(1) == FLOW_CONTROL_ERROR
        raw.send(WINDOW_UPDATE, 0, 0, struct.pack(">I", 2**31 - 1))
        raw.quiet()
        assert raw.goaway() == FLOW_CONTROL_ERROR


def test_smaller_initial_window_mid_answer_makes_the_window_negative_then_resumes(served: Served) -> None:
    with Raw(served.path, {INITIAL_WINDOW_SIZE: 1000}, conn_window=10_000_000) as raw:
        raw.request(1, "/t.S/Version", grpc_message(pb.VersionRequest(version="big")))
        raw.until(lambda: raw.data(1) == 1000)
        raw.send(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE, 0))  # stream window: -1000
        raw.send(WINDOW_UPDATE, 0, 1, struct.pack(">I", 999))  # still -1: nothing may be sent
        raw.quiet()
        assert raw.data(1) == 1000 and not raw.ended(1)
        raw.send(SETTINGS, 0, 0, struct.pack(">HI", INITIAL_WINDOW_SIZE, 1_000_000))
        assert raw.status(1)["grpc-status"] == "0"
        assert raw.data(1) > 200_000
        assert all(len(fr.payload) <= 16_384 for fr in raw.frames)


def test_hpack_stays_in_step_across_reset_and_refused_streams(served: Served) -> None:
    """Blocks of a reset stream and of a refused one (after GOAWAY) still update the dynamic table."""
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Wait", None)
        raw.send(RST_STREAM, 0, 1, struct.pack(">I", 8))
        # trailers for the reset stream, adding entries the next request refers to by index
        raw.send(HEADERS, END_HEADERS | END_STREAM, 1, raw.enc.encode([("x-after-reset", "a" * 30)]))
        raw.request(3, "/t.S/Version", REQ, [("x-after-reset", "a" * 30)])
        assert raw.status(3)["grpc-status"] == "0"
        # table size update to 0 and back at the start of a block (RFC 7541 6.3)
        raw.enc.header_table_size = 0
        raw.enc.header_table_size = 4096
        raw.request(5, "/t.S/Version", REQ, [("x-again", "b")])
        assert raw.status(5)["grpc-status"] == "0"


def test_huge_continuation_sequence_is_enhance_your_calm(served: Served) -> None:
    with Raw(served.path) as raw:
        raw.send(HEADERS, 0, 1, raw.block("/t.S/Version"))
        for _ in range(16):  # the first block + 16 x 16 kB: just past the 4 x 64 kB the server accepts
            raw.send(CONTINUATION, 0, 1, b"\x00" * 16_384)
        raw.quiet()
        assert raw.goaway() == ENHANCE_YOUR_CALM


def test_streams_beyond_max_concurrent_are_refused(served: Served) -> None:
    with Raw(served.path) as raw:
        for i in range(1025):
            raw.request(2 * i + 1, "/t.S/Version", None)
        raw.until(lambda: raw.rst(2049) is not None)
        assert raw.rst(2049) == REFUSED_STREAM
        assert [fr.sid for fr in raw.frames if fr.kind == RST_STREAM] == [2049]


def test_server_stream_backpressure_then_client_cancel(review: Review) -> None:
    """Window 0: the generator stops at HIGH_WATER; RST_STREAM cancels the call and closes the generator."""
    with Raw(review.path, {INITIAL_WINDOW_SIZE: 0}) as raw:
        raw.request(1, "/r.S/Flood", REQ)
        eventually(lambda: len(review.produced) > 0)
        time.sleep(0.3)
        assert len(review.produced) <= 256 * 1024 // CHUNK + 2
        raw.send(RST_STREAM, 0, 1, struct.pack(">I", 8))
        eventually(lambda: review.generator_closed == [True])
        eventually(lambda: not review.server._dispatch.calls)
        assert not _connections(review)[0].streams


def test_connection_lost_while_waiting_for_window_leaks_nothing(review: Review) -> None:
    raw = Raw(review.path, {INITIAL_WINDOW_SIZE: 0})
    raw.request(1, "/r.S/Flood", REQ)
    eventually(lambda: len(review.produced) > 0)
    raw.close()
    eventually(lambda: not review.server._dispatch.calls and not review.server._connections)
    eventually(lambda: review.generator_closed == [True])


def test_stop_twice(served: Served) -> None:
    c = Client(served.path)
    try:
        served.run(served.server.stop(0.1))
        served.run(served.server.stop(0.1))
    finally:
        c.close()


# ---- header blocks of indexed fields only (the decoder's fast path) ---------------------------------

COMPRESSION_ERROR = 0x9


def test_a_request_repeated_as_indexed_fields_only_is_answered_like_the_first(served: Served) -> None:
    """A client's second identical call refers to every header by index: decoded from the table."""
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Version", REQ, [("grpc-timeout", "5S")])
        assert raw.status(1)["grpc-status"] == "0"
        block = raw.block("/t.S/Version", [("grpc-timeout", "5S")])
        assert block and all(0x80 < byte < 0xFF for byte in block)  # what this test is about
        raw.send(HEADERS, END_HEADERS, 3, block)
        raw.send(DATA, END_STREAM, 3, REQ)
        assert raw.status(3)["grpc-status"] == "0"
        raw.send(HEADERS, END_HEADERS, 5, raw.block("/t.S/Missing", [("grpc-timeout", "5S")]))
        raw.send(DATA, END_STREAM, 5, REQ)
        assert raw.status(5)["grpc-status"] == str(grpc.StatusCode.UNIMPLEMENTED.value[0])


def test_an_index_past_the_dynamic_table_is_a_compression_error(served: Served) -> None:
    with Raw(served.path) as raw:
        raw.send(HEADERS, END_HEADERS | END_STREAM, 1, bytes([0x80 | 126]))
        raw.quiet()
        assert raw.goaway() == COMPRESSION_ERROR


def test_indexed_fields_over_the_header_list_limit_are_enhance_your_calm(served: Served) -> None:
    """Each reference to a 4 kB table entry costs the client one byte: the list limit still holds."""
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Version", REQ, [("x-big", "a" * 4000)])  # the entry fills the table alone
        assert raw.status(1)["grpc-status"] == "0"
        raw.send(HEADERS, END_HEADERS | END_STREAM, 3, bytes([0x80 | 62]) * 17)  # 17 x 4037 > 64 kB
        raw.quiet()
        assert raw.goaway() == ENHANCE_YOUR_CALM


def test_a_kept_indexed_block_is_decoded_again_once_the_table_changed(served: Served) -> None:
    """The same indexed bytes after a block that added a table entry refer to other headers (every
    dynamic index moved by one): the server must read them so, not as it read them before."""
    with Raw(served.path) as raw:
        for sid in (1, 3):
            raw.request(sid, "/t.S/Version", REQ)
            assert raw.status(sid)["grpc-status"] == "0"
        repeated = raw.block("/t.S/Version")
        assert all(0x80 < byte < 0xFF for byte in repeated)
        raw.send(HEADERS, END_HEADERS, 5, repeated)
        raw.send(DATA, END_STREAM, 5, REQ)
        assert raw.status(5)["grpc-status"] == "0"
        raw.request(7, "/t.S/Version", REQ, [("x-new", "entry")])  # adds x-new: the dynamic indexes shift
        assert raw.status(7)["grpc-status"] == "0"
        mirror = hpack.Decoder()
        mirror.header_table = copy.deepcopy(raw.enc.header_table)
        assert {str(k): str(v) for k, v in mirror.decode(repeated)}.get(
            ":path"
        ) != "/t.S/Version"  # what the bytes now say
        raw.send(HEADERS, END_HEADERS, 9, repeated)
        raw.send(DATA, END_STREAM, 9, REQ)
        assert raw.status(9).get("grpc-status") != "0"
