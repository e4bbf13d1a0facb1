"""A test harness for criopy's HTTP/2 gRPC transport: servers with test handlers on their own loop, an h2
client that records every event, and a raw frame-level client that can play a misbehaving peer."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import threading
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack

from api.runtime.v1 import api_pb2 as pb
from cri.transport.grpcserver import Encoded, GrpcServer, Limits, Route, RpcError

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

    async def kept_answer(self, request: pb.VersionRequest) -> Encoded:
        return Encoded(self.kept.SerializeToString())

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

    async def feed(self, request: pb.VersionRequest) -> AsyncGenerator[pb.VersionResponse, None]:
        await self.wait(request)
        yield pb.VersionResponse()

    async def stream(self, request: pb.StreamContainersRequest) -> AsyncGenerator[pb.StreamContainersResponse, None]:
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


@contextlib.contextmanager
def serving_handlers(path: str) -> Iterator[Served]:
    """The Handlers' routes under /t.S/ on a GrpcServer at `path`, on a loop of its own thread."""
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


def eventually(check: Any, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED = 0x1, 0x1, 0x4, 0x8
INITIAL_WINDOW_SIZE = 0x4
PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, REFUSED_STREAM, ENHANCE_YOUR_CALM = 0x1, 0x3, 0x5, 0x7, 0xB


def raw_frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", sid) + payload


@dataclass
class Frame:
    kind: int
    flags: int
    sid: int
    payload: bytes


class Raw:
    """An HTTP/2 client that sends exactly the frames it is told to and records every frame received."""

    def __init__(self, path: str, settings: dict[int, int] | None = None, conn_window: int = 0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(path)
        self.enc = hpack.Encoder()
        self.dec = hpack.Decoder()
        self.frames: list[Frame] = []
        self.eof = False
        self._buf = b""
        payload = b"".join(struct.pack(">HI", k, v) for k, v in (settings or {}).items())
        out = PREFACE + raw_frame(SETTINGS, 0, 0, payload)
        if conn_window:
            out += raw_frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", conn_window))
        self.sock.sendall(out)
        self.until(lambda: any(fr.kind == SETTINGS and fr.flags & ACK for fr in self.frames))

    def send(self, kind: int, flags: int, sid: int, payload: bytes = b"") -> None:
        self.sock.sendall(raw_frame(kind, flags, sid, payload))

    def block(self, path: str, extra: list[tuple[str, str]] | None = None) -> bytes:
        encoded: bytes = self.enc.encode(request_headers(path, extra))
        return encoded

    def request(self, sid: int, path: str, body: bytes | None, extra: list[tuple[str, str]] | None = None) -> None:
        """HEADERS, then the body as one DATA with END_STREAM (None: HEADERS only, stream left open)."""
        self.send(HEADERS, END_HEADERS, sid, self.block(path, extra))
        if body is not None:
            self.send(DATA, END_STREAM, sid, body)

    def pump(self) -> None:
        try:
            chunk = self.sock.recv(1 << 16)
        except ConnectionResetError:
            chunk = b""
        except TimeoutError:
            raise AssertionError(
                f"no answer; frames so far: {[(x.kind, x.flags, x.sid) for x in self.frames]}"
            ) from None
        if not chunk:
            self.eof = True
            return
        self._buf += chunk
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if len(self._buf) < 9 + length:
                break
            kind, flags = self._buf[3], self._buf[4]
            sid = int.from_bytes(self._buf[5:9], "big") & 0x7FFFFFFF
            self.frames.append(Frame(kind, flags, sid, self._buf[9 : 9 + length]))
            self._buf = self._buf[9 + length :]

    def until(self, done: Callable[[], bool]) -> None:
        while not done():
            if self.eof:
                raise AssertionError(f"connection closed; frames: {[(x.kind, x.flags, x.sid) for x in self.frames]}")
            self.pump()

    def quiet(self, seconds: float = 0.3) -> None:
        """Reads whatever arrives within `seconds`."""
        self.sock.settimeout(seconds)
        with contextlib.suppress(AssertionError):
            while not self.eof:
                self.pump()
        self.sock.settimeout(5)

    def goaway(self) -> int | None:
        for fr in self.frames:
            if fr.kind == GOAWAY:
                code: int = struct.unpack(">I", fr.payload[4:8])[0]
                return code
        return None

    def rst(self, sid: int) -> int | None:
        for fr in self.frames:
            if fr.kind == RST_STREAM and fr.sid == sid:
                code: int = struct.unpack(">I", fr.payload)[0]
                return code
        return None

    def ended(self, sid: int) -> bool:
        return any(fr.sid == sid and (fr.kind == RST_STREAM or fr.flags & END_STREAM) for fr in self.frames)

    def status(self, sid: int) -> dict[str, str]:
        """The decoded fields of the stream's last HEADERS frame (trailers, or trailers-only)."""
        self.until(lambda: self.ended(sid))
        fields: dict[str, str] = {}
        for fr in self.frames:
            if fr.kind == HEADERS and fr.sid == sid:
                fields = {str(k): str(v) for k, v in self.dec.decode(fr.payload)}
        return fields

    def data(self, sid: int) -> int:
        return sum(len(fr.payload) for fr in self.frames if fr.kind == DATA and fr.sid == sid)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MAX_SEND = 100_000
HUGE = 3_000_000  # bytes of the /a.S/Huge answer: far more than a socket buffer holds


class Lingering:
    """A handler that, cancelled, still takes a while to clean up (as a call undoing its work does)."""

    def __init__(self) -> None:
        self.done: asyncio.Event | None = None
        self.running = 0

    async def __call__(self, request: pb.VersionRequest) -> pb.VersionResponse:
        self.running += 1
        try:
            await asyncio.Event().wait()
        finally:
            assert self.done is not None
            await self.done.wait()
            self.running -= 1
        return pb.VersionResponse()


def abuse_routes(handlers: Handlers, lingering: Lingering) -> dict[str, Route]:
    async def huge(request: pb.VersionRequest) -> pb.VersionResponse:
        return pb.VersionResponse(runtime_name="h" * HUGE)

    async def big_stream(request: pb.VersionRequest) -> AsyncGenerator[pb.VersionResponse, None]:
        yield pb.VersionResponse(runtime_name="small")
        yield pb.VersionResponse(runtime_name="b" * (MAX_SEND + 1))

    version = pb.VersionRequest.FromString
    return {
        "/t.S/Version": Route(parse=version, unary=handlers.version),
        "/t.S/Wait": Route(parse=version, unary=handlers.wait),
        "/t.S/Feed": Route(parse=version, stream=handlers.feed, subscription=True),
        "/a.S/Huge": Route(parse=version, unary=huge),
        "/a.S/BigStream": Route(parse=version, stream=big_stream),
        "/a.S/Linger": Route(parse=version, unary=lingering),
    }


class Abused(Served):
    lingering: Lingering

    def connections(self) -> int:
        return int(self.run(_count(lambda: len(self.server._connections))))

    def held(self) -> int:
        """Bytes of answers the server holds for its clients: queued in streams and in the transports."""

        def total() -> int:
            out = 0
            for conn in self.server._connections:
                out += sum(len(s.pending) for s in conn.streams.values())
                if conn._transport is not None:
                    out += conn._transport.get_write_buffer_size()
            return out

        return int(self.run(_count(total)))


async def _count(measure: Callable[[], int]) -> int:
    return measure()


@contextlib.contextmanager
def serving(path: str, limits: Limits) -> Iterator[Abused]:
    handlers, lingering = Handlers(), Lingering()
    server = GrpcServer(abuse_routes(handlers, lingering), limits)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def setup() -> None:
        handlers.release = asyncio.Event()
        lingering.done = asyncio.Event()
        await server.start(path)

    asyncio.run_coroutine_threadsafe(setup(), loop).result(10)
    served = Abused(path, handlers, server, loop)
    served.lingering = lingering
    try:
        yield served
    finally:
        assert lingering.done is not None
        loop.call_soon_threadsafe(lingering.done.set)
        served.run(server.stop(0.5))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
