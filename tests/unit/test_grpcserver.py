"""criopy's HTTP/2 gRPC transport, driven frame by frame by an independent HTTP/2 client (python-hyper's h2)."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.transport.grpcserver import GrpcServer, Limits, Route, RpcError

BIG = 200_000  # well above the 65,535-byte default window and the 16,384-byte frame
MAX_MESSAGE = 64 * 1024


@dataclass
class Handlers:
    """Routes whose behaviour the tests can see: what was cancelled, what is waiting."""

    loop: asyncio.AbstractEventLoop | None = None
    release: asyncio.Event | None = None
    started: list[str] = field(default_factory=list)
    kept: pb.VersionResponse = field(default_factory=lambda: pb.VersionResponse(runtime_name="first"))
    cancelled: list[str] = field(default_factory=list)

    async def version(self, request: pb.VersionRequest) -> pb.VersionResponse:
        return pb.VersionResponse(runtime_name="x" * (BIG if request.version == "big" else 4))

    async def kept_answer(self, request: pb.VersionRequest) -> pb.VersionResponse:
        return self.kept

    async def fail(self, request: pb.VersionRequest) -> pb.VersionResponse:
        raise RpcError(grpc.StatusCode.NOT_FOUND, "container 50% gone: ü")

    async def wait(self, request: pb.VersionRequest) -> pb.VersionResponse:
        assert self.release is not None
        self.started.append(request.version)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(request.version)
            raise
        return pb.VersionResponse(runtime_name="released")

    async def feed(self, request: pb.VersionRequest) -> AsyncIterator[pb.VersionResponse]:
        await self.wait(request)
        yield pb.VersionResponse()

    async def stream(self, request: pb.StreamContainersRequest) -> AsyncIterator[pb.StreamContainersResponse]:
        for i in range(3):
            yield pb.StreamContainersResponse(containers=[pb.Container(id=str(i) * 1000)])
        if request.filter.id == "fail":
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "went away")


@dataclass
class Served:
    path: str
    handlers: Handlers
    server: GrpcServer
    loop: asyncio.AbstractEventLoop

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    handlers = Handlers()
    routes = {
        "/t.S/Version": Route(parse=pb.VersionRequest.FromString, unary=handlers.version),
        "/t.S/Kept": Route(parse=pb.VersionRequest.FromString, unary=handlers.kept_answer),
        "/t.S/Fail": Route(parse=pb.VersionRequest.FromString, unary=handlers.fail),
        "/t.S/Wait": Route(parse=pb.VersionRequest.FromString, unary=handlers.wait),
        "/t.S/Stream": Route(parse=pb.StreamContainersRequest.FromString, stream=handlers.stream),
        "/t.S/Feed": Route(parse=pb.VersionRequest.FromString, stream=handlers.feed, subscription=True),
    }
    server = GrpcServer(routes, Limits(max_receive_bytes=MAX_MESSAGE))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    path = str(tmp_path / "g.sock")

    async def setup() -> None:
        handlers.release = asyncio.Event()
        await server.start(path)

    asyncio.run_coroutine_threadsafe(setup(), loop).result(10)
    served = Served(path, handlers, server, loop)
    try:
        yield served
    finally:
        served.run(server.stop(0.5))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def grpc_message(msg: Any, compressed: int = 0) -> bytes:
    body = msg.SerializeToString()
    return struct.pack(">BI", compressed, len(body)) + body


def request_headers(path: str, extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """The headers of a gRPC request, as grpc-go sends them."""
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *(extra or []),
    ]


def _fields(headers: Any) -> dict[str, str]:
    return {str(name): str(value) for name, value in headers}


class Client:
    """A blocking HTTP/2 client on the server's unix socket, recording every event per stream."""

    def __init__(self, path: str, window: int | None = None, max_frame: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        settings: dict[int, int] = {}
        if window is not None:
            settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] = window
        if max_frame is not None:
            settings[h2.settings.SettingCodes.MAX_FRAME_SIZE] = max_frame
        if settings:
            self.conn.update_settings(settings)
        self.auto_ack = window is None
        self.events: list[h2.events.Event] = []
        self.data: dict[int, bytearray] = {}
        self.frames: dict[int, list[int]] = {}
        self.trailers: dict[int, dict[str, str]] = {}
        self.headers: dict[int, dict[str, str]] = {}
        self.ended: set[int] = set()
        self.reset: dict[int, int] = {}
        self.closed = False
        self.flush()
        # The server's SETTINGS and connection window first, as a real client would wait for them.
        self.until(lambda: any(isinstance(e, h2.events.WindowUpdated) for e in self.events))

    def flush(self) -> None:
        out = self.conn.data_to_send()
        if out:
            self.sock.sendall(out)

    def call(self, path: str, body: bytes, extra: list[tuple[str, str]] | None = None, end: bool = True) -> int:
        sid: int = self.conn.get_next_available_stream_id()
        self.conn.send_headers(sid, request_headers(path, extra))
        while True:
            room = min(self.conn.max_outbound_frame_size, self.conn.local_flow_control_window(sid))
            piece, body = body[:room], body[room:]
            self.conn.send_data(sid, piece, end_stream=end and not body)
            self.flush()
            if not body:
                return sid
            self.until(lambda: self.conn.local_flow_control_window(sid) > 0)

    def pump(self) -> None:
        try:
            chunk = self.sock.recv(65536)
        except TimeoutError:
            raise AssertionError(f"no answer; events so far: {self.events}") from None
        if not chunk:
            self.closed = True
            return
        for ev in self.conn.receive_data(chunk):
            self._record(ev)
        self.flush()

    def _record(self, ev: h2.events.Event) -> None:
        self.events.append(ev)
        if isinstance(ev, h2.events.ResponseReceived):
            self.headers[ev.stream_id] = _fields(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            self.data.setdefault(ev.stream_id, bytearray()).extend(ev.data)
            self.frames.setdefault(ev.stream_id, []).append(len(ev.data))
            if self.auto_ack:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.TrailersReceived):
            self.trailers[ev.stream_id] = _fields(ev.headers)
        elif isinstance(ev, h2.events.StreamEnded):
            self.ended.add(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            self.reset[ev.stream_id] = ev.error_code

    def until(self, done: Any) -> None:
        while not done():
            if self.closed:
                raise AssertionError(f"connection closed; events: {self.events}")
            self.pump()

    def answer(self, sid: int) -> tuple[dict[str, str], bytes]:
        """(status fields, the message bytes) once the stream has ended."""
        self.until(lambda: sid in self.ended or sid in self.reset)
        status = self.trailers.get(sid) or self.headers.get(sid, {})
        return status, bytes(self.data.get(sid, b""))[5:]

    def close(self) -> None:
        self.sock.close()


def _eventually(check: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    c = Client(served.path)
    yield c
    c.close()


def test_unary_call_answers_with_status_ok(client: Client) -> None:
    status, body = client.answer(client.call("/t.S/Version", grpc_message(pb.VersionRequest())))
    assert status["grpc-status"] == "0"
    assert pb.VersionResponse.FromString(body).runtime_name == "xxxx"
    assert client.headers[1]["content-type"] == "application/grpc"


def test_a_returned_again_answer_is_reused_and_a_new_one_is_sent(served: Served, client: Client) -> None:
    def name() -> str:
        status, body = client.answer(client.call("/t.S/Kept", grpc_message(pb.VersionRequest())))
        assert status["grpc-status"] == "0"
        return pb.VersionResponse.FromString(body).runtime_name

    assert [name(), name()] == ["first", "first"]
    served.handlers.kept = pb.VersionResponse(runtime_name="second")
    assert name() == "second"


def test_large_answer_waits_for_the_clients_window(served: Served) -> None:
    """A 100-byte stream window: the answer comes in pieces as the client grants room, never beyond it."""
    c = Client(served.path, window=100)
    try:
        sid = c.call("/t.S/Version", grpc_message(pb.VersionRequest(version="big")))
        while sid not in c.ended:
            c.pump()
            assert all(n <= 100 for n in c.frames.get(sid, []))
            received = sum(c.frames.get(sid, []))
            if received and sid not in c.ended:
                c.conn.acknowledge_received_data(received - getattr(c, "_acked", 0), sid)
                c._acked = received  # type: ignore[attr-defined]
                c.flush()
        assert pb.VersionResponse.FromString(bytes(c.data[sid])[5:]).runtime_name == "x" * BIG
        assert c.trailers[sid]["grpc-status"] == "0"
    finally:
        c.close()


def test_data_frames_respect_the_clients_max_frame_size(client: Client) -> None:
    status, body = client.answer(client.call("/t.S/Version", grpc_message(pb.VersionRequest(version="big"))))
    assert status["grpc-status"] == "0" and len(body) > BIG
    assert max(client.frames[1]) <= 16_384


def test_concurrent_streams_on_one_connection(client: Client) -> None:
    sids = [client.call("/t.S/Version", grpc_message(pb.VersionRequest())) for _ in range(50)]
    for sid in sids:
        status, body = client.answer(sid)
        assert status["grpc-status"] == "0" and pb.VersionResponse.FromString(body).runtime_name == "xxxx"


def test_error_status_is_percent_encoded_in_a_trailers_only_answer(client: Client) -> None:
    sid = client.call("/t.S/Fail", grpc_message(pb.VersionRequest()))
    status, body = client.answer(sid)
    assert status["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
    assert status["grpc-message"] == "container 50%25 gone: %C3%BC"
    assert body == b"" and sid not in client.trailers  # trailers-only: one HEADERS frame


def test_unknown_method_is_unimplemented(client: Client) -> None:
    status, _ = client.answer(client.call("/t.S/Nope", grpc_message(pb.VersionRequest())))
    assert status["grpc-status"] == "12"
    assert "/t.S/Nope" in status["grpc-message"]


def test_malformed_and_compressed_requests_are_refused(client: Client) -> None:
    status, _ = client.answer(client.call("/t.S/Version", b"\x00\x00\x00\x00\x09abc"))
    assert status["grpc-status"] == "3"
    status, _ = client.answer(client.call("/t.S/Version", b"\x00\x00\x00\x00\x03\xff\xff\xff"))
    assert status["grpc-status"] == "3" and "not a valid message" in status["grpc-message"]
    sid = client.call("/t.S/Version", grpc_message(pb.VersionRequest(), compressed=1), [("grpc-encoding", "gzip")])
    status, _ = client.answer(sid)
    assert status["grpc-status"] == "12" and "gzip" in status["grpc-message"]


def test_request_over_the_limit_is_resource_exhausted(client: Client) -> None:
    big = grpc_message(pb.VersionRequest(version="v" * (MAX_MESSAGE + 10)))
    status, _ = client.answer(client.call("/t.S/Version", big))
    assert status["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    status, _ = client.answer(client.call("/t.S/Version", grpc_message(pb.VersionRequest())))
    assert status["grpc-status"] == "0"  # the connection goes on


def test_header_block_split_over_continuation_frames(client: Client) -> None:
    metadata = [(f"x-meta-{i}", "v" * 1000) for i in range(30)]  # ~30 kB: more than one 16 kB frame
    status, body = client.answer(client.call("/t.S/Version", grpc_message(pb.VersionRequest()), metadata))
    assert status["grpc-status"] == "0" and pb.VersionResponse.FromString(body).runtime_name == "xxxx"


def test_deadline_cancels_the_handler(served: Served, client: Client) -> None:
    sid = client.call("/t.S/Wait", grpc_message(pb.VersionRequest(version="slow")), [("grpc-timeout", "50m")])
    status, _ = client.answer(sid)
    assert status["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert served.handlers.cancelled == ["slow"]


def test_rst_stream_cancels_the_handler(served: Served, client: Client) -> None:
    sid = client.call("/t.S/Wait", grpc_message(pb.VersionRequest(version="abandoned")))
    _eventually(lambda: served.handlers.started == ["abandoned"])
    client.conn.reset_stream(sid)
    client.flush()
    client.answer(client.call("/t.S/Version", grpc_message(pb.VersionRequest())))
    _eventually(lambda: served.handlers.cancelled == ["abandoned"])


def test_ping_is_acknowledged_with_its_payload(client: Client) -> None:
    client.conn.ping(b"criopy!!")
    client.flush()
    client.until(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in client.events))
    (ack,) = [e for e in client.events if isinstance(e, h2.events.PingAckReceived)]
    assert ack.ping_data == b"criopy!!"


def test_server_stream_then_status(client: Client) -> None:
    sid = client.call("/t.S/Stream", grpc_message(pb.StreamContainersRequest()))
    client.answer(sid)
    raw = bytes(client.data[sid])
    ids = []
    while raw:
        (length,) = struct.unpack(">I", raw[1:5])
        ids.append(pb.StreamContainersResponse.FromString(raw[5 : 5 + length]).containers[0].id[:1])
        raw = raw[5 + length :]
    assert ids == ["0", "1", "2"] and client.trailers[sid]["grpc-status"] == "0"
    failing = pb.StreamContainersRequest(filter=pb.ContainerFilter(id="fail"))
    sid = client.call("/t.S/Stream", grpc_message(failing))
    client.answer(sid)
    assert client.trailers[sid]["grpc-status"] == str(grpc.StatusCode.UNAVAILABLE.value[0])
    assert len(client.data[sid]) > 3000  # the three messages came before the failure


def _wait_method(channel: grpc.Channel) -> Any:
    return channel.unary_unary(
        "/t.S/Wait",
        request_serializer=pb.VersionRequest.SerializeToString,
        response_deserializer=pb.VersionResponse.FromString,
    )


def test_stop_lets_a_running_call_finish_and_refuses_new_calls(served: Served) -> None:
    """grpcio as the client here: it follows GOAWAY as a real client does (h2 stops reading at GOAWAY)."""
    with grpc.insecure_channel(f"unix://{served.path}") as channel:
        wait = _wait_method(channel)
        running = wait.future(pb.VersionRequest(version="in-flight"))
        _eventually(lambda: served.handlers.started == ["in-flight"])
        stopping = asyncio.run_coroutine_threadsafe(served.server.stop(5), served.loop)
        time.sleep(0.2)
        assert not stopping.done()
        assert served.handlers.release is not None
        served.loop.call_soon_threadsafe(served.handlers.release.set)
        assert running.result(5).runtime_name == "released"
        stopping.result(10)
        with pytest.raises(grpc.RpcError) as refused:
            wait(pb.VersionRequest(version="late"), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert served.handlers.cancelled == []


def test_stop_cancels_what_outlives_the_grace_period(served: Served) -> None:
    with grpc.insecure_channel(f"unix://{served.path}") as channel:
        wait = _wait_method(channel)
        running = wait.future(pb.VersionRequest(version="stuck"))
        _eventually(lambda: served.handlers.started == ["stuck"])
        served.run(served.server.stop(0.1))
        assert served.handlers.cancelled == ["stuck"]
        with pytest.raises(grpc.RpcError) as cut:
            running.result(5)
        assert (cut.value.code(), cut.value.details()) == (grpc.StatusCode.UNAVAILABLE, "criopy is shutting down")


def test_stop_ends_a_subscription_at_once(served: Served) -> None:
    with grpc.insecure_channel(f"unix://{served.path}") as channel:
        feed = channel.unary_stream(
            "/t.S/Feed",
            request_serializer=pb.VersionRequest.SerializeToString,
            response_deserializer=pb.VersionResponse.FromString,
        )
        responses = feed(pb.VersionRequest(version="feed"))
        _eventually(lambda: served.handlers.started == ["feed"])
        stopping = asyncio.run_coroutine_threadsafe(served.server.stop(60), served.loop)
        with pytest.raises(grpc.RpcError) as cut:
            next(responses)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert served.handlers.cancelled == ["feed"]
        stopping.result(10)  # nothing else was running: no wait for the 60 s grace


def test_garbage_instead_of_the_preface_ends_the_connection(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(served.path)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := s.recv(4096):
            received += chunk
    kinds = []
    while received:
        length = int.from_bytes(received[:3], "big")
        kinds.append((received[3], received[9 : 9 + length]))
        received = received[9 + length :]
    assert kinds[-1][0] == 7  # GOAWAY
    assert struct.unpack(">I", kinds[-1][1][4:8])[0] == 1  # PROTOCOL_ERROR


def test_frame_larger_than_advertised_is_a_connection_error(client: Client) -> None:
    client.sock.sendall(struct.pack(">I", (20_000 << 8) | 0)[0:4] + b"\x00" + struct.pack(">I", 1) + b"\x00" * 20_000)
    client.until(lambda: any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events))
    (goaway,) = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == 6  # FRAME_SIZE_ERROR
