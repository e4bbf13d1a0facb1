"""criopy's HTTP/2 gRPC transport against clients that abuse it: too many connections, streams reset in a
flood, idle or silent connections, answers nobody reads, header blocks that never end, oversized answers,
and the two-step GOAWAY at stop. Each test names the bound it pins; the server runs with limits shrunk so
that a bound is reached in milliseconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.transport.grpcserver import Limits
from tests.support.h2grpc import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ENHANCE_YOUR_CALM,
    GOAWAY,
    HEADERS,
    HUGE,
    INITIAL_WINDOW_SIZE,
    MAX_SEND,
    PING,
    PREFACE,
    REFUSED_STREAM,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Abused,
    Raw,
    eventually,
    grpc_message,
    raw_frame,
    serving,
)

REQ = grpc_message(pb.VersionRequest())
CANCEL = struct.pack(">I", 8)
RESOURCE_EXHAUSTED = str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])


Serve = Callable[..., Abused]


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Serve]:
    """serve(**limits): a server with these limits (and a 100 kB send limit) on a fresh socket."""
    with contextlib.ExitStack() as stack:
        count = iter(range(100))

        def start(**overrides: Any) -> Abused:
            limits = Limits(**{"max_receive_bytes": 64 * 1024, "max_send_bytes": MAX_SEND, **overrides})
            return stack.enter_context(serving(str(tmp_path / f"a{next(count)}.sock"), limits))

        yield start


def _parse(data: bytes) -> list[tuple[int, bytes]]:
    """(type, payload) of each whole frame in `data`."""
    out = []
    while len(data) >= 9:
        length = int.from_bytes(data[:3], "big")
        out.append((data[3], data[9 : 9 + length]))
        data = data[9 + length :]
    return out


def _goaways(raw: Raw) -> list[tuple[int, int]]:
    """(last stream id, error code) of every GOAWAY received."""
    return [struct.unpack(">II", fr.payload[:8]) for fr in raw.frames if fr.kind == GOAWAY]


def _drain(raw: Raw, seconds: float) -> None:
    """Reads until the server closes the connection, or `seconds` pass."""
    deadline = time.monotonic() + seconds
    while not raw.eof and time.monotonic() < deadline:
        raw.quiet(0.05)


def _status(raw: Raw, sid: int) -> str:
    return raw.status(sid).get("grpc-status", "")


# ---- (a) connections ---------------------------------------------------------------------------------


def test_a_connection_above_the_cap_is_closed_at_once_and_the_others_are_served(
    serve: Serve, caplog: pytest.LogCaptureFixture
) -> None:
    served = serve(max_connections=4)
    caplog.set_level(logging.INFO, logger="cri.transport.grpcserver")
    clients = [Raw(served.path) for _ in range(4)]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as extra:
            extra.settimeout(2)
            extra.connect(served.path)
            # The server may refuse it before it speaks: its GOAWAY is read all the same.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                extra.sendall(PREFACE + raw_frame(SETTINGS, 0, 0))
            received = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := extra.recv(4096):  # a timeout here: the fifth connection is served
                    received += chunk
        goaways = [payload for kind, payload in _parse(received) if kind == GOAWAY]
        assert [struct.unpack(">II", g[:8]) for g in goaways] == [(0, ENHANCE_YOUR_CALM)]
        refused = [r for r in caplog.records if r.getMessage() == "connection refused"]
        assert refused and refused[0].fields["limit"] == 4  # type: ignore[attr-defined]
        for i, raw in enumerate(clients):  # the ones already open go on
            raw.request(1, "/t.S/Version", REQ)
            assert _status(raw, 1) == "0", i
        clients.pop().close()
        eventually(lambda: served.connections() == 3)
        clients.append(Raw(served.path))  # room again
        clients[-1].request(1, "/t.S/Version", REQ)
        assert _status(clients[-1], 1) == "0"
    finally:
        for raw in clients:
            raw.close()


def test_a_thousand_connections_at_once_leave_the_server_within_its_cap(serve: Serve) -> None:
    served = serve(max_connections=50)
    socks = []
    try:
        for _ in range(1000):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(served.path)
            socks.append(s)
        time.sleep(0.3)
        assert served.connections() <= 50
    finally:
        for s in socks:
            s.close()
    eventually(lambda: served.connections() == 0)
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Version", REQ)
        assert _status(raw, 1) == "0"


# ---- (b) answers over the send limit ------------------------------------------------------------------


def test_an_answer_over_the_send_limit_is_resource_exhausted(serve: Serve) -> None:
    served = serve()
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Version", grpc_message(pb.VersionRequest(version="big")))  # a 200 kB answer
        status = raw.status(1)
        assert status["grpc-status"] == RESOURCE_EXHAUSTED, status
        assert raw.data(1) == 0
        raw.request(3, "/a.S/BigStream", REQ)  # the second message of a stream
        status = raw.status(3)
        assert status["grpc-status"] == RESOURCE_EXHAUSTED, status
        assert raw.data(3) < 100
        raw.request(5, "/t.S/Version", REQ)
        assert _status(raw, 5) == "0"


# ---- (c) floods ---------------------------------------------------------------------------------------


def test_rapid_reset_flood_is_enhance_your_calm(serve: Serve) -> None:
    """CVE-2023-44487: HEADERS then RST_STREAM, again and again; each starts a call the server must unwind."""
    served = serve(reset_burst=50, resets_per_second=10)
    with Raw(served.path) as raw:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for i in range(500):
                sid = 2 * i + 1
                raw.request(sid, "/t.S/Wait", REQ)
                raw.send(RST_STREAM, 0, sid, CANCEL)
        _drain(raw, 3)
        assert (_goaways(raw) or [(0, -1)])[-1][1] == ENHANCE_YOUR_CALM
        assert raw.eof
    assert len(served.handlers.started) <= 60
    with Raw(served.path) as other:  # the server itself goes on
        other.request(1, "/t.S/Version", REQ)
        assert _status(other, 1) == "0"


def test_resets_the_client_provokes_count_as_resets(serve: Serve) -> None:
    """'MadeYouReset': WINDOW_UPDATE of 0 on a stream makes the server reset (and cancel) it instead."""
    served = serve(reset_burst=50, resets_per_second=10)
    with Raw(served.path) as raw:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for i in range(500):
                sid = 2 * i + 1
                raw.request(sid, "/t.S/Wait", REQ)
                raw.send(WINDOW_UPDATE, 0, sid, struct.pack(">I", 0))
        _drain(raw, 3)
        assert (_goaways(raw) or [(0, -1)])[-1][1] == ENHANCE_YOUR_CALM


def test_a_few_resets_are_fine(serve: Serve) -> None:
    served = serve(reset_burst=50, resets_per_second=10)
    with Raw(served.path) as raw:
        for i in range(40):
            sid = 2 * i + 1
            raw.request(sid, "/t.S/Wait", REQ)
            raw.send(RST_STREAM, 0, sid, CANCEL)
        raw.request(81, "/t.S/Version", REQ)
        assert _status(raw, 81) == "0"
        assert _goaways(raw) == []


@pytest.mark.parametrize("kind", [PING, SETTINGS])
def test_ping_and_settings_floods_from_a_reading_client_are_enhance_your_calm(serve: Serve, kind: int) -> None:
    served = serve(control_burst=100, control_per_second=10)
    payload = b"12345678" if kind == PING else b""
    with Raw(served.path) as raw:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(20):
                raw.sock.sendall(raw_frame(kind, 0, 0, payload) * 50)
                raw.quiet(0.01)  # reading: the transport never pauses
        _drain(raw, 3)
        assert (_goaways(raw) or [(0, -1)])[-1][1] == ENHANCE_YOUR_CALM


def test_handlers_still_unwinding_count_against_max_concurrent_streams(serve: Serve) -> None:
    """grpc-go's fix for CVE-2023-44487: a reset stream's handler counts until it has returned."""
    served = serve(max_concurrent_streams=4)
    with Raw(served.path) as raw:
        for sid in (1, 3, 5, 7):
            raw.request(sid, "/a.S/Linger", REQ)
        eventually(lambda: served.lingering.running == 4)
        for sid in (1, 3, 5, 7):
            raw.send(RST_STREAM, 0, sid, CANCEL)
        raw.request(9, "/t.S/Version", REQ)
        raw.until(lambda: raw.ended(9))
        assert raw.rst(9) == REFUSED_STREAM
        assert served.lingering.running == 4
        assert served.lingering.done is not None
        served.loop.call_soon_threadsafe(served.lingering.done.set)
        eventually(lambda: served.lingering.running == 0)
        raw.request(11, "/t.S/Version", REQ)
        assert _status(raw, 11) == "0"


# ---- (d) idle connections -----------------------------------------------------------------------------


def test_an_idle_connection_is_sent_goaway_and_closed(serve: Serve) -> None:
    served = serve(idle_timeout=0.3, goaway_ack_seconds=0.1)
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Version", REQ)
        assert _status(raw, 1) == "0"
        started = time.monotonic()
        _drain(raw, 3)
        assert raw.eof and time.monotonic() - started < 2
        assert _goaways(raw)[-1] == (1, 0)  # NO_ERROR, and stream 1 was answered
    with Raw(served.path) as silent:  # never a stream at all
        _drain(silent, 3)
        assert silent.eof and _goaways(silent)[-1] == (0, 0)
    eventually(lambda: served.connections() == 0)


def test_a_connection_that_never_sends_the_preface_is_closed(serve: Serve) -> None:
    served = serve(handshake_timeout=0.2)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.settimeout(3)
        silent.connect(served.path)
        eventually(lambda: served.connections() == 1)
        with contextlib.suppress(ConnectionResetError):
            while silent.recv(4096):  # our SETTINGS, then the end (a timeout: it is kept)
                pass
    eventually(lambda: served.connections() == 0)


def test_an_open_event_feed_keeps_its_connection(serve: Serve) -> None:
    served = serve(idle_timeout=0.2, goaway_ack_seconds=0.1)
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Feed", REQ)
        raw.quiet(1.0)
        assert not raw.eof and _goaways(raw) == []
        assert served.connections() == 1


def test_a_client_that_never_reads_is_let_go(serve: Serve) -> None:
    """An idle connection whose client reads nothing: close() alone would wait for it forever."""
    served = serve(max_send_bytes=2 * HUGE, idle_timeout=0.2, goaway_ack_seconds=0.1)
    raw = Raw(served.path, {INITIAL_WINDOW_SIZE: 2**31 - 1}, conn_window=2**31 - 1 - 65_535)
    try:
        raw.request(1, "/a.S/Huge", REQ)  # 3 MB answered, not one byte read
        eventually(lambda: served.held() > 1_000_000)
        eventually(lambda: served.connections() == 0, 5)
    finally:
        raw.close()


# ---- (e) two-step GOAWAY ------------------------------------------------------------------------------


def test_stop_sends_the_two_step_goaway(serve: Serve) -> None:
    served = serve()
    with Raw(served.path) as raw:
        raw.request(1, "/t.S/Version", REQ)
        assert _status(raw, 1) == "0"
        stopping = asyncio.run_coroutine_threadsafe(served.server.stop(5), served.loop)
        raw.until(lambda: any(fr.kind == PING and not fr.flags & ACK for fr in raw.frames))
        assert _goaways(raw) == [(2**31 - 1, 0)]
        (ping,) = [fr for fr in raw.frames if fr.kind == PING]
        raw.request(3, "/t.S/Version", REQ)  # sent before the client saw the GOAWAY: still served
        raw.send(PING, ACK, 0, ping.payload)
        raw.until(lambda: len(_goaways(raw)) == 2)
        assert _goaways(raw)[1] == (3, 0)
        assert _status(raw, 3) == "0"
        stopping.result(10)


def test_the_second_goaway_does_not_wait_for_a_client_that_never_acks(serve: Serve) -> None:
    served = serve(goaway_ack_seconds=0.2)
    with Raw(served.path) as raw:
        stopping = asyncio.run_coroutine_threadsafe(served.server.stop(5), served.loop)
        _drain(raw, 3)
        assert [code for _, code in _goaways(raw)] == [0, 0]
        assert _goaways(raw)[1][0] == 0
        stopping.result(10)


# ---- header blocks ------------------------------------------------------------------------------------


def test_hpack_bomb_is_enhance_your_calm(serve: Serve) -> None:
    """One 4 kB entry in the dynamic table, then referred to by a one-byte index a thousand times: a 1 kB
    block that decodes to 4 MB. Bounded by SETTINGS_MAX_HEADER_LIST_SIZE, counted as it is decoded."""
    served = serve()
    with Raw(served.path) as raw:
        raw.send(HEADERS, END_HEADERS, 1, raw.block("/t.S/Version", [("x-bomb", "b" * 4000)]))
        newest = bytes([0x80 | 62])  # indexed field: the newest dynamic table entry, x-bomb
        raw.send(HEADERS, END_HEADERS | END_STREAM, 3, newest * 1000)
        _drain(raw, 3)
        assert (_goaways(raw) or [(0, -1)])[-1][1] == ENHANCE_YOUR_CALM


def test_header_list_over_the_limit_is_enhance_your_calm(serve: Serve) -> None:
    served = serve(max_header_list_bytes=8 * 1024)
    with Raw(served.path) as raw:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the server may close first
            raw.request(1, "/t.S/Version", REQ, [("x-big", "v" * 10_000)])
        _drain(raw, 3)
        assert (_goaways(raw) or [(0, -1)])[-1][1] == ENHANCE_YOUR_CALM


def test_continuation_flood_of_empty_frames_is_bounded(serve: Serve) -> None:
    """CVE-2024-27316 style: a header block that never ends, in frames too small to trip the size bound."""
    served = serve()
    with Raw(served.path) as raw:
        raw.send(HEADERS, 0, 1, raw.block("/t.S/Version"))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            raw.sock.sendall(raw_frame(CONTINUATION, 0, 1) * 10_000)
        _drain(raw, 3)
        assert (_goaways(raw) or [(0, -1)])[-1][1] == ENHANCE_YOUR_CALM


# ---- clients that do not read, or vanish ----------------------------------------------------------------


def test_answers_held_for_a_client_that_reads_nothing_are_bounded(serve: Serve) -> None:
    """Window 0: no answer can be sent. Without a bound, every call's answer would wait in memory."""
    served = serve(max_send_bytes=250_000)
    with Raw(served.path, {INITIAL_WINDOW_SIZE: 0}) as raw:
        big = grpc_message(pb.VersionRequest(version="big"))
        for i in range(40):  # 40 x 200 kB
            raw.request(2 * i + 1, "/t.S/Version", big)
        raw.until(lambda: sum(raw.ended(2 * i + 1) for i in range(40)) >= 30)
        assert served.held() <= 4 * 250_005 + 250_005
        assert _status(raw, 79) == RESOURCE_EXHAUSTED


def test_a_client_gone_mid_request_and_mid_call_leaves_nothing(serve: Serve) -> None:
    served = serve()
    raw = Raw(served.path)
    raw.request(1, "/t.S/Wait", REQ)
    raw.request(3, "/t.S/Version", None)
    raw.send(DATA, 0, 3, REQ[:3])  # half a request
    eventually(lambda: served.handlers.started == [""])
    raw.close()
    eventually(lambda: served.connections() == 0 and not served.server._dispatch.calls)
    assert served.handlers.cancelled == [""]


def _answered(raw: Raw, sids: list[int]) -> None:
    raw.until(lambda: all(raw.ended(s) for s in sids))


def test_thousands_of_streams_one_after_another(serve: Serve) -> None:
    served = serve(max_concurrent_streams=100)
    with Raw(served.path) as raw:
        sid = 1
        for _ in range(30):
            batch = list(range(sid, sid + 200, 2))
            raw.sock.sendall(b"".join(raw_frame(HEADERS, END_HEADERS, s, raw.block("/t.S/Version")) for s in batch))
            raw.sock.sendall(b"".join(raw_frame(DATA, END_STREAM, s, REQ) for s in batch))
            _answered(raw, batch)
            sid += 200
        assert all(raw.rst(s) is None for s in range(1, sid, 2))
        conn = next(iter(served.server._connections))
        assert not conn.streams and not served.server._dispatch.calls
