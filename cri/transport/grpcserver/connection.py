"""One HTTP/2 server connection (RFC 9113) as an asyncio protocol: frames, streams, flow control.

It knows nothing of gRPC. A stream whose request is complete (headers and body, the
client's END_STREAM seen) goes to `on_request`; the call layer answers through
`respond`, `send_headers`, `send_data` and `finish`. Output is paced by the peer's
flow-control windows; what does not fit waits in the stream until WINDOW_UPDATE.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import hpack

from cri.log import event
from cri.transport.grpcserver import frames as f
from cri.transport.grpcserver.frames import ConnectionFailure, ErrorCode

log = logging.getLogger(__name__)

# Output a streaming call may queue beyond the peer's window before it has to wait.
HIGH_WATER = 256 * 1024
# Seconds a closing connection has to write what is queued before it is cut off: a client that reads
# nothing would otherwise keep it (and its buffers) forever.
FLUSH_SECONDS = 1.0
# Header blocks of indexed fields only whose decoding a connection keeps (a client's distinct calls).
INDEXED_BLOCKS_KEPT = 64
# The payload of the PING that follows the first GOAWAY of a graceful close.
GOAWAY_PING = b"criopy\x00\x01"


@dataclass(frozen=True)
class Limits:
    """What one client may make the server hold or do. The defaults are criopy's; tests shrink them."""

    # gRPC's max receive and send message lengths (grpcio's options of the same name).
    max_receive_bytes: int = 16 * 1024 * 1024
    max_send_bytes: int = 16 * 1024 * 1024
    # Server-wide: a connection above this many is closed at once (the ones open are still served).
    max_connections: int = 1024
    # Seconds a connection may have no open stream before it is closed (GOAWAY NO_ERROR); 0: never.
    idle_timeout: float = 300.0
    # Seconds a new connection has to send the HTTP/2 preface (grpc-go and grpc core allow 120 for a TLS
    # handshake; a local client sends it at once), so that silent sockets do not hold the connection cap.
    handshake_timeout: float = 10.0
    max_concurrent_streams: int = 1024
    max_header_list_bytes: int = 64 * 1024
    # A header block may come in this many CONTINUATION frames at most (nghttp2 allows 8): empty
    # ones would otherwise keep a connection busy without growing the block (CVE-2024-27316).
    max_continuations: int = 16
    # What we let the client send before it must wait for our WINDOW_UPDATE: large, so
    # that a request is rarely held up; requests are bounded by max_request_bytes anyway.
    initial_window: int = 4 * 1024 * 1024
    connection_window: int = 16 * 1024 * 1024
    # Token buckets (a burst, then so many a second) for frames that cost us work and the client
    # nothing: streams reset (the "rapid reset" attack, CVE-2023-44487; nghttp2's defaults, 1000
    # then 33/s), and PINGs and SETTINGS that need an answer (CVE-2019-9512, 9515).
    reset_burst: int = 1000
    resets_per_second: float = 33.0
    control_burst: int = 1000
    control_per_second: float = 100.0
    # The graceful GOAWAY's second step follows the PING ack, or this many seconds without one.
    goaway_ack_seconds: float = 1.0

    @property
    def max_request_bytes(self) -> int:
        """A request body: the message and its 5-byte gRPC prefix."""
        return self.max_receive_bytes + 5

    @property
    def max_buffered_bytes(self) -> int:
        """Unfinished request bodies one connection may hold before it is closed (ENHANCE_YOUR_CALM).
        Flow control gives each stream its window back as data arrives, so only this bounds them."""
        return 4 * self.max_request_bytes

    @property
    def max_held_output(self) -> int:
        """Answers one connection may hold unsent (the client's windows closed, or it does not read).
        Above it a call is answered RESOURCE_EXHAUSTED rather than queued: each stream's window bounds
        what it is sent, only this bounds what waits for the windows."""
        return 4 * (self.max_send_bytes + 5)


class Budget:
    """A token bucket: `burst` tokens at once, refilled at `rate` a second. `take` is False when empty."""

    __slots__ = ("_burst", "_rate", "_stamp", "_tokens")

    def __init__(self, burst: int, rate: float) -> None:
        self._burst = float(burst)
        self._rate = rate
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def refill(self) -> None:
        self._tokens = self._burst


class Stream:
    """One request and its answer. `headers` are the decoded request headers, names and values raw."""

    __slots__ = (
        "block",
        "block_ends_stream",
        "body",
        "headers",
        "id",
        "local_closed",
        "pending",
        "recv_unacked",
        "remote_closed",
        "send_window",
        "task",
        "too_large",
        "trailers",
        "writable",
    )

    def __init__(self, stream_id: int, send_window: int) -> None:
        self.id = stream_id
        self.headers: dict[bytes, bytes] | None = None
        self.block = bytearray()
        self.block_ends_stream = False
        self.body = bytearray()
        self.remote_closed = False
        self.local_closed = False
        self.send_window = send_window
        self.recv_unacked = 0
        self.pending = bytearray()
        self.trailers: bytes | None = None
        self.task: asyncio.Task[None] | None = None
        self.writable: asyncio.Future[None] | None = None
        self.too_large = False


RequestHandler = Callable[["Http2Connection", Stream], None]


def _indexed_only(decoder: hpack.Decoder, block: bytearray) -> list[tuple[bytes, bytes]] | None:
    """The header list of a block made only of one-byte indexed fields (indexes 1 to 126), as a client
    sends a call it has made before (the same method, authority, timeout): table lookups that change
    nothing, the hpack decoder's answer at a fraction of its cost. None for any other block, and for
    one over the header list limit: hpack decodes and judges those."""
    if not block:
        return None
    table = decoder.header_table
    limit = decoder.max_header_list_size
    fields = []
    size = 0
    for byte in block:
        if byte <= 0x80 or byte == 0xFF:
            return None
        try:
            name, value = table.get_by_index(byte & 0x7F)
        except hpack.InvalidTableIndex:
            return None
        size += len(name) + len(value) + 32  # RFC 7541 4.1, as hpack counts the list
        if size > limit:
            return None
        fields.append((name, value))
    return fields


class Http2Connection(asyncio.Protocol):
    def __init__(self, on_request: RequestHandler, on_lost: Callable[[Http2Connection], None], limits: Limits) -> None:
        self._on_request = on_request
        self._on_lost = on_lost
        self._limits = limits
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._preface_seen = False
        self._decoder = hpack.Decoder(max_header_list_size=limits.max_header_list_bytes)
        self._indexed_blocks: dict[bytes, dict[bytes, bytes]] = {}  # see _decoded
        self.streams: dict[int, Stream] = {}
        self.last_stream_id = 0
        self._continuing: Stream | None = None  # stream whose header block awaits CONTINUATION
        self._continuations = 0  # CONTINUATION frames of that block so far
        self._peer_initial_window = f.DEFAULT_WINDOW
        self._peer_max_frame = f.MIN_FRAME_SIZE
        self._send_window = f.DEFAULT_WINDOW
        self._recv_unacked = 0
        self._out: list[bytes] | None = None  # frames batched while one read is handled
        self._blocked: dict[int, Stream] = {}  # streams with output waiting for window
        self._write_paused = False
        self._buffered = 0  # bytes of request bodies received and not yet handed to a call
        self._resets = Budget(limits.reset_burst, limits.resets_per_second)
        self._control = Budget(limits.control_burst, limits.control_per_second)
        # Calls of this connection still running, those of reset streams included: they count against
        # max_concurrent_streams until they have returned (grpc-go's answer to CVE-2023-44487).
        self.tasks: set[asyncio.Task[None]] = set()
        self._idle_since = time.monotonic()  # when the last stream closed
        self._timers: dict[str, asyncio.TimerHandle] = {}
        self._going_away = False  # the first GOAWAY of a graceful close is out
        self.drained = False  # the second one too: new streams are refused
        self._goaway_reason = ""
        self._closing = False
        self.closed = False

    # ---- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        ours = {
            f.SETTINGS_ENABLE_PUSH: 0,
            f.SETTINGS_MAX_CONCURRENT_STREAMS: self._limits.max_concurrent_streams,
            f.SETTINGS_INITIAL_WINDOW_SIZE: self._limits.initial_window,
            f.SETTINGS_MAX_HEADER_LIST_SIZE: self._limits.max_header_list_bytes,
        }
        transport.write(f.settings_frame(ours) + f.window_update(0, self._limits.connection_window - f.DEFAULT_WINDOW))
        if self._limits.idle_timeout > 0:
            self._later("idle", self._limits.idle_timeout, self._idle_check)
        self._later("handshake", self._limits.handshake_timeout, self._no_preface)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._out = []
        try:
            self._consume(data)
        except ConnectionFailure as exc:
            if not self._closing:
                self._write(f.goaway(self.last_stream_id, exc.code, str(exc)))
                event(log, logging.WARNING, "http2 connection error", code=exc.code.name, reason=str(exc))
                self.close()
            return
        self._flush_batch()

    def eof_received(self) -> bool:
        return False

    def pause_writing(self) -> None:
        # The client is not reading: stop reading from it too, so that it cannot make us queue
        # answers to its PINGs and SETTINGS without end (CVE-2019-9512, 9515).
        self._write_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._transport is not None and not self.closed:
            self._transport.resume_reading()
        for stream in list(self.streams.values()):
            self._wake_writer(stream)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for stream in list(self.streams.values()):
            self._cancel(stream)
        self.streams.clear()
        self._blocked.clear()
        self._on_lost(self)

    # ---- what the call layer uses -------------------------------------------------------

    def respond(self, stream: Stream, headers: bytes, message: bytes, trailers: bytes) -> None:
        """A whole answer at once: headers, one DATA payload (may be empty), trailers."""
        if stream.local_closed:
            return
        outside_read = self._out is None
        if outside_read:  # one write (one syscall) for the whole answer
            self._out = []
        self._write(f.headers_frames(stream.id, headers, False, self._peer_max_frame))
        stream.pending += message
        stream.trailers = trailers
        self._pump(stream)
        if outside_read:
            self._flush_batch()

    def send_headers(self, stream: Stream, headers: bytes) -> None:
        if not stream.local_closed:
            self._write(f.headers_frames(stream.id, headers, False, self._peer_max_frame))

    def send_data(self, stream: Stream, data: bytes) -> None:
        if not stream.local_closed:
            stream.pending += data
            self._pump(stream)

    async def writable(self, stream: Stream) -> None:
        """Wait while the stream's unsent output is above the high-water mark."""
        while (len(stream.pending) > HIGH_WATER or self._write_paused) and not stream.local_closed and not self.closed:
            stream.writable = asyncio.get_running_loop().create_future()
            await stream.writable

    def finish(self, stream: Stream, trailers: bytes) -> None:
        """Trailers with END_STREAM, sent once every queued byte of the stream is out."""
        if not stream.local_closed:
            stream.trailers = trailers
            self._pump(stream)

    def go_away(self, reason: str = "server shutting down") -> None:
        """Graceful close, in two steps as grpc-go and nghttp2 do it (RFC 9113 6.8): a GOAWAY with the
        largest stream id and a PING; when the PING is acked (or after goaway_ack_seconds) a second GOAWAY
        with the last stream id taken. Streams the client opened before it saw the first are still taken
        and answered, so no request in flight is lost; later ones are refused. The connection closes once
        the second is out and no stream is open."""
        if self._going_away or self.closed:
            return
        self._going_away = True
        self._goaway_reason = reason
        self._write(f.goaway(f.MAX_STREAM_ID, ErrorCode.NO_ERROR, reason) + f.frame(f.PING, 0, 0, GOAWAY_PING))
        self._later("goaway", self._limits.goaway_ack_seconds, self._final_goaway)

    def _final_goaway(self) -> None:
        if self.drained or self.closed:
            return
        self.drained = True
        self._cancel_timer("goaway")
        self._write(f.goaway(self.last_stream_id, ErrorCode.NO_ERROR, self._goaway_reason))
        if not self.streams:
            self.close()

    def close(self) -> None:
        """Close once what is queued is written; a client that reads none of it is cut off after FLUSH_SECONDS."""
        if self._transport is None or self.closed or self._closing:
            return
        self._closing = True
        self._flush_batch()
        self._transport.close()
        self._later("flush", FLUSH_SECONDS, self.abort)

    def abort(self) -> None:
        """Close at once, dropping what the client has not read."""
        if self._transport is not None and not self.closed:
            self._transport.abort()

    def room_for(self, size: int) -> bool:
        """Whether an answer of `size` bytes may be queued within the connection's max_held_output."""
        return self.held_output() + size <= self._limits.max_held_output

    def held_output(self) -> int:
        """Bytes of answers queued and not yet read by the client: waiting for its windows, or in the transport."""
        held = sum(len(stream.pending) for stream in self._blocked.values())
        if self._transport is not None:
            held += self._transport.get_write_buffer_size()
        return held

    # ---- timers -------------------------------------------------------------------------

    def _later(self, name: str, delay: float, callback: Callable[[], None]) -> None:
        self._cancel_timer(name)
        self._timers[name] = asyncio.get_running_loop().call_later(delay, self._fire, name, callback)

    def _fire(self, name: str, callback: Callable[[], None]) -> None:
        self._timers.pop(name, None)
        callback()

    def _cancel_timer(self, name: str) -> None:
        timer = self._timers.pop(name, None)
        if timer is not None:
            timer.cancel()

    def _no_preface(self) -> None:
        if not self._preface_seen and not self.closed:
            event(
                log, logging.INFO, "http2 connection without a preface, closing", seconds=self._limits.handshake_timeout
            )
            self.abort()

    def _idle_check(self) -> None:
        """Closes the connection (gracefully) once it has had no open stream for idle_timeout seconds; an
        open call, such as the kubelet's GetContainerEvents feed, keeps it however long it lasts."""
        if self.closed or self._going_away:
            return
        idle = self._limits.idle_timeout
        left = idle if self.streams else self._idle_since + idle - time.monotonic()
        if left > 0:
            self._later("idle", left, self._idle_check)
            return
        event(log, logging.INFO, "http2 connection idle, closing", idle_seconds=idle)
        self.go_away("idle")

    # ---- reading ------------------------------------------------------------------------

    def _consume(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        if not self._preface_seen:
            if len(buf) < len(f.PREFACE):
                if not f.PREFACE.startswith(bytes(buf)):
                    raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 client preface")
                return
            if buf[: len(f.PREFACE)] != f.PREFACE:
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "not an HTTP/2 client preface")
            del buf[: len(f.PREFACE)]
            self._preface_seen = True
            self._cancel_timer("handshake")
        pos, end = 0, len(buf)
        try:
            while end - pos >= f.FRAME_HEADER_SIZE and not self._closing:
                length_kind, flags, stream_id = f.FRAME_HEADER.unpack_from(buf, pos)
                length = length_kind >> 8
                if length > f.MIN_FRAME_SIZE:
                    raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, f"frame of {length} bytes")
                if end - pos < f.FRAME_HEADER_SIZE + length:
                    break
                start = pos + f.FRAME_HEADER_SIZE
                payload = bytes(buf[start : start + length])
                pos = start + length
                self._frame(length_kind & 0xFF, flags, stream_id & 0x7FFFFFFF, payload)
        finally:
            del buf[:pos]

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self._continuing is not None and kind != f.CONTINUATION:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "header block interrupted before END_HEADERS")
        handler = self._handlers.get(kind)
        if handler is not None:  # unknown frame types are ignored (RFC 9113 section 4.1)
            handler(self, flags, stream_id, payload)

    def _on_ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) != 8:
            raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "PING must be 8 bytes on stream 0")
        if flags & f.ACK:
            if payload == GOAWAY_PING and self._going_away:
                self._final_goaway()
            return
        self._take_control()
        self._write(f.frame(f.PING, f.ACK, 0, payload))

    def _take_control(self) -> None:
        """A PING or SETTINGS to answer: a flood of them is work for us and none for the client (CVE-2019-9512,
        9515). A client that is sent data may ping as it likes, as grpc-go's BDP estimation does."""
        if not self._control.take():
            raise ConnectionFailure(ErrorCode.ENHANCE_YOUR_CALM, "too many PING or SETTINGS frames")

    def _take_reset(self) -> None:
        """A stream reset, by the client or by us for its fault: each may have started a call that must be
        unwound, and costs the client one frame ("rapid reset", CVE-2023-44487; "MadeYouReset")."""
        if not self._resets.take():
            raise ConnectionFailure(ErrorCode.ENHANCE_YOUR_CALM, "too many streams reset")

    def _on_rst_stream(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or len(payload) != 4:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "malformed RST_STREAM")
        if stream_id > self.last_stream_id:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        self._take_reset()
        stream = self.streams.get(stream_id)
        if stream is not None:
            self._drop(stream)
            self._cancel(stream)

    def _on_priority(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or len(payload) != 5:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "malformed PRIORITY")

    def _on_goaway(self, flags: int, stream_id: int, payload: bytes) -> None:
        """The client opens no more streams; the ones it has are still answered."""

    def _on_push_promise(self, flags: int, stream_id: int, payload: bytes) -> None:
        raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "clients cannot push")

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & f.PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "padding longer than the frame")
        return payload[1 : len(payload) - payload[0]]

    def _on_data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "DATA on stream 0")
        # Flow control counts the whole payload, padding included, whatever the stream's fate.
        self._recv_unacked += len(payload)
        if self._recv_unacked > self._limits.connection_window:
            raise ConnectionFailure(ErrorCode.FLOW_CONTROL_ERROR, "connection window exceeded")
        if self._recv_unacked >= self._limits.connection_window // 2:
            self._write(f.window_update(0, self._recv_unacked))
            self._recv_unacked = 0
        data = self._unpad(flags, payload)
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream we already reset or answered: frames in flight are dropped
        if stream.remote_closed or stream.headers is None:
            self._reset(stream, ErrorCode.STREAM_CLOSED)
            return
        stream.recv_unacked += len(payload)
        if stream.recv_unacked > self._limits.initial_window:
            self._reset(stream, ErrorCode.FLOW_CONTROL_ERROR)
            return
        stream.body += data
        self._buffered += len(data)
        if len(stream.body) > self._limits.max_request_bytes:
            # Answered now (RESOURCE_EXHAUSTED), not after the rest of an oversized body has arrived.
            stream.too_large = True
            self._drop_body(stream)
            self._dispatch(stream)
            return
        if self._buffered > self._limits.max_buffered_bytes:
            raise ConnectionFailure(ErrorCode.ENHANCE_YOUR_CALM, "too many unfinished request bodies")
        if flags & f.END_STREAM:
            stream.remote_closed = True
            self._buffered -= len(stream.body)  # the call owns it now
            self._dispatch(stream)
        elif stream.recv_unacked >= self._limits.initial_window // 2:
            self._write(f.window_update(stream_id, stream.recv_unacked))
            stream.recv_unacked = 0

    def _on_headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id == 0 or stream_id % 2 == 0:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        block = self._unpad(flags, payload)
        if flags & f.PRIORITY_FLAG:
            if len(block) < 5:
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "HEADERS too short for its priority")
            block = block[5:]
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id <= self.last_stream_id:
                # Trailers or a late block on a stream already finished: decode it all the same,
                # the HPACK table must stay in step with the client's.
                stream = Stream(stream_id, 0)
                stream.local_closed = stream.remote_closed = True
            else:
                self.last_stream_id = stream_id
                stream = Stream(stream_id, self._peer_initial_window)
                self.streams[stream_id] = stream
        elif stream.remote_closed:
            raise ConnectionFailure(ErrorCode.STREAM_CLOSED, f"HEADERS on half-closed stream {stream_id}")
        stream.block += block
        stream.block_ends_stream = bool(flags & f.END_STREAM)
        if flags & f.END_HEADERS:
            self._headers_complete(stream)
        else:
            self._continuing = stream
            self._continuations = 0

    def _on_continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        stream = self._continuing
        if stream is None or stream.id != stream_id:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "CONTINUATION without a header block to continue")
        stream.block += payload
        self._continuations += 1
        if len(stream.block) > 4 * self._limits.max_header_list_bytes:
            raise ConnectionFailure(ErrorCode.ENHANCE_YOUR_CALM, "header block too large")
        if self._continuations > self._limits.max_continuations:
            raise ConnectionFailure(ErrorCode.ENHANCE_YOUR_CALM, "header block in too many CONTINUATION frames")
        if flags & f.END_HEADERS:
            self._continuing = None
            self._headers_complete(stream)

    def _headers_complete(self, stream: Stream) -> None:
        try:
            headers = self._decoded(stream.block)
        except hpack.OversizedHeaderListError as exc:
            stream.block = bytearray()
            raise ConnectionFailure(ErrorCode.ENHANCE_YOUR_CALM, f"header list too large: {exc}") from exc
        except hpack.HPACKError as exc:
            raise ConnectionFailure(ErrorCode.COMPRESSION_ERROR, f"bad header block: {exc}") from exc
        stream.block = bytearray()
        if stream.local_closed and stream.remote_closed and stream.id not in self.streams:
            # Decoded only to keep the table in step: the stream is closed (answered, reset, or skipped
            # over by a higher id, RFC 9113 5.1.1).
            self._write(f.rst_stream(stream.id, ErrorCode.STREAM_CLOSED))
            return
        if stream.headers is not None:
            # Request trailers: gRPC clients send none that matter; they end the request.
            if not stream.block_ends_stream:
                self._reset(stream, ErrorCode.PROTOCOL_ERROR)
                return
        else:
            stream.headers = headers
            if self._refuses_streams():
                self._reset(stream, ErrorCode.REFUSED_STREAM)
                return
        if stream.block_ends_stream:
            stream.remote_closed = True
            self._dispatch(stream)

    def _decoded(self, block: bytearray) -> dict[bytes, bytes]:
        """A header block as names to values. A block of indexed fields only leaves the table as it was,
        so its answer is kept and reused until a block that may change the table: a client repeating a
        call sends the same few bytes each time."""
        key = bytes(block)
        known = self._indexed_blocks.get(key)
        if known is not None:
            return dict(known)
        fields = _indexed_only(self._decoder, block)
        if fields is None:
            self._indexed_blocks.clear()
            return {bytes(name): bytes(value) for name, value in self._decoder.decode(key, raw=True)}
        headers = dict(fields)
        if len(self._indexed_blocks) >= INDEXED_BLOCKS_KEPT:
            self._indexed_blocks.clear()
        self._indexed_blocks[key] = headers
        return dict(headers)

    def _refuses_streams(self) -> bool:
        """After the second GOAWAY, or at max_concurrent_streams: open streams (the new one among them), or
        calls still running, reset ones included, as grpc-go counts them since CVE-2023-44487."""
        most = self._limits.max_concurrent_streams
        return self.drained or len(self.streams) > most or len(self.tasks) >= most

    def _dispatch(self, stream: Stream) -> None:
        """The request is complete: the call layer takes it, and its task counts against the connection."""
        self._on_request(self, stream)
        task = stream.task
        if task is not None and not task.done():
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0:
            raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & f.ACK:
            if payload:
                raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if len(payload) % 6:
            raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "SETTINGS payload not a multiple of 6")
        self._take_control()
        for offset in range(0, len(payload), 6):
            ident, value = f.SETTING.unpack_from(payload, offset)
            if ident == f.SETTINGS_INITIAL_WINDOW_SIZE:
                if value > f.MAX_WINDOW:
                    raise ConnectionFailure(ErrorCode.FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE too large")
                delta = value - self._peer_initial_window
                self._peer_initial_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > f.MAX_WINDOW:
                        raise ConnectionFailure(ErrorCode.FLOW_CONTROL_ERROR, "a stream window went above 2^31-1")
            elif ident == f.SETTINGS_MAX_FRAME_SIZE:
                if not f.MIN_FRAME_SIZE <= value <= f.MAX_FRAME_SIZE:
                    raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "SETTINGS_MAX_FRAME_SIZE out of range")
                self._peer_max_frame = value
            elif ident == f.SETTINGS_ENABLE_PUSH and value > 1:
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "SETTINGS_ENABLE_PUSH must be 0 or 1")
            # HEADER_TABLE_SIZE: our header blocks never use the peer's dynamic table.
        self._write(f.frame(f.SETTINGS, f.ACK, 0))
        self._pump_blocked()

    def _on_window_update(self, flags: int, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ConnectionFailure(ErrorCode.FRAME_SIZE_ERROR, "WINDOW_UPDATE must be 4 bytes")
        increment = f.U32.unpack(payload)[0] & 0x7FFFFFFF
        if stream_id == 0:
            if increment == 0:
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, "WINDOW_UPDATE of 0 on the connection")
            self._send_window += increment
            if self._send_window > f.MAX_WINDOW:
                raise ConnectionFailure(ErrorCode.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            self._pump_blocked()
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.last_stream_id:
                raise ConnectionFailure(ErrorCode.PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # a stream already answered: its window no longer matters
        if increment == 0:
            self._reset(stream, ErrorCode.PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > f.MAX_WINDOW:
            self._reset(stream, ErrorCode.FLOW_CONTROL_ERROR)
            return
        self._pump(stream)

    # ---- writing ------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._closing:
            return
        if self._out is not None:
            self._out.append(data)
        elif self._transport is not None and not self.closed:
            self._transport.write(data)

    def _flush_batch(self) -> None:
        out, self._out = self._out, None
        if out and self._transport is not None and not self.closed:
            self._transport.write(b"".join(out))

    def _pump(self, stream: Stream) -> None:
        """Send what the windows allow of the stream's output; its trailers once all is out."""
        pending = stream.pending
        chunks: list[bytes] = []
        sent = 0
        while sent < len(pending):
            room = min(self._send_window, stream.send_window, self._peer_max_frame, len(pending) - sent)
            if room <= 0:
                break
            chunks.append(f.frame(f.DATA, 0, stream.id, bytes(pending[sent : sent + room])))
            sent += room
            self._send_window -= room
            stream.send_window -= room
        if sent:
            del pending[:sent]
            self._control.refill()  # the client may ping to measure what it is sent (grpc-go's BDP pings)
        if not pending and stream.trailers is not None:
            chunks.append(f.headers_frames(stream.id, stream.trailers, True, self._peer_max_frame))
            stream.trailers = None
            stream.local_closed = True
        if chunks:
            self._write(b"".join(chunks))
        if stream.local_closed:
            self._blocked.pop(stream.id, None)
            self._closed_locally(stream)
        elif pending:
            self._blocked[stream.id] = stream
        else:
            self._blocked.pop(stream.id, None)
        if len(pending) <= HIGH_WATER and not self._write_paused:
            self._wake_writer(stream)

    @staticmethod
    def _wake_writer(stream: Stream) -> None:
        if stream.writable is not None:
            if not stream.writable.done():
                stream.writable.set_result(None)
            stream.writable = None

    def _pump_blocked(self) -> None:
        for stream in list(self._blocked.values()):
            if self._send_window <= 0:
                break
            self._pump(stream)

    def _closed_locally(self, stream: Stream) -> None:
        if self.streams.get(stream.id) is not stream:
            return
        if not stream.remote_closed:
            # We answered before the request ended: tell the client to stop sending (RFC 9113 8.1).
            self._write(f.rst_stream(stream.id, ErrorCode.NO_ERROR))
        self._drop(stream)

    def _reset(self, stream: Stream, code: ErrorCode) -> None:
        """Resets a stream for the client's fault (or refuses it); counted as the client's own resets are."""
        self._write(f.rst_stream(stream.id, code))
        self._drop(stream)
        self._cancel(stream)
        self._take_reset()

    def _drop(self, stream: Stream) -> None:
        """The stream is closed: it no longer counts as open. The last one going starts the idle time, and
        ends a connection draining after its second GOAWAY."""
        if self.streams.get(stream.id) is not stream:
            return
        del self.streams[stream.id]
        if not self.streams:
            self._idle_since = time.monotonic()
            if self.drained:
                self.close()

    def _drop_body(self, stream: Stream) -> None:
        self._buffered -= len(stream.body)
        stream.body = bytearray()

    def _cancel(self, stream: Stream) -> None:
        if not stream.remote_closed:
            self._drop_body(stream)
        stream.local_closed = True
        stream.pending = bytearray()
        self._blocked.pop(stream.id, None)
        if stream.task is not None and not stream.task.done():
            stream.task.cancel()
        self._wake_writer(stream)

    _handlers: ClassVar[dict[int, Callable[[Http2Connection, int, int, bytes], None]]] = {
        f.DATA: _on_data,
        f.HEADERS: _on_headers,
        f.PRIORITY: _on_priority,
        f.RST_STREAM: _on_rst_stream,
        f.SETTINGS: _on_settings,
        f.PUSH_PROMISE: _on_push_promise,
        f.PING: _on_ping,
        f.GOAWAY: _on_goaway,
        f.WINDOW_UPDATE: _on_window_update,
        f.CONTINUATION: _on_continuation,
    }
