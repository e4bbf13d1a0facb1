"""The server side of a SPDY/3.1 session, as Kubernetes' exec, attach and port-forward streams use it.

The caller has already answered the HTTP/1.1 Upgrade with 101 (``Upgrade: SPDY/3.1``); from then on the
connection carries SPDY frames. The peers are Go programs built on github.com/moby/spdystream (kubectl through
the kubelet proxy, crictl), so where the draft and spdystream differ this module does what spdystream does.

Flow control, and what spdystream really does (kubernetes' vendor/github.com/moby/spdystream):
  * spdy/read.go parses WINDOW_UPDATE and SETTINGS frames, but connection.go ``Connection.frameHandler`` has no
    case for ``*spdy.WindowUpdateFrame`` or ``*spdy.SettingsFrame``: both fall to
    ``default: frameErr = fmt.Errorf("unhandled frame type: %T", frame)`` and are dropped;
  * nothing in connection.go or stream.go builds a WindowUpdateFrame or a SettingsFrame, and
    ``Stream.WriteData`` writes one DATA frame per ``Write`` call, of any size, without looking at a window.
So spdystream never sends WINDOW_UPDATE and ignores ours. Holding output to the default 64 KiB window would stall
every exec, attach or port-forward after 64 KiB. The windows are therefore always *accounted* from the first
byte, but only *enforced* once the peer has shown it does flow control: stream windows after any WINDOW_UPDATE or
a SETTINGS_INITIAL_WINDOW_SIZE, the session window only after a WINDOW_UPDATE for stream 0 (a SPDY/3 peer that
does stream but not session flow control would otherwise stall at 64 KiB for the whole connection). Because the
accounting starts at the first byte, a peer that starts flow control late gets a window that already counts what
it was sent, and its WINDOW_UPDATEs for those bytes bring the window back.

For what we receive, read() gives WINDOW_UPDATEs (stream, and session id 0) once half a window has been consumed,
for peers that honour windows. spdystream sends regardless, so the read loop stops reading the socket while one
stream holds more than RECV_BUFFER_LIMIT unread bytes: TCP backpressure, as spdystream's own blocking frame
workers give.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
import zlib
from collections import deque
from typing import Protocol

from cri.log import event

log = logging.getLogger(__name__)

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes.
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
CANCEL = 5
FLOW_CONTROL_ERROR = 7

# GOAWAY status codes.
GOAWAY_OK = 0
GOAWAY_PROTOCOL_ERROR = 1

SETTINGS_INITIAL_WINDOW_SIZE = 7

DEFAULT_WINDOW = 64 * 1024
MAX_WINDOW = 2**31 - 1
# Our receive window never changes (we send no SETTINGS), so half of it is when a WINDOW_UPDATE is due.
WINDOW_UPDATE_THRESHOLD = DEFAULT_WINDOW // 2
# spdystream sends one DATA frame per Write, so the kubelet's io.Copy sends 32 KiB frames; we do the same.
MAX_DATA_CHUNK = 32 * 1024
RECV_BUFFER_LIMIT = 1024 * 1024
# A peer flooding PINGs without reading must not grow our output buffer without bound.
CONTROL_BACKLOG_LIMIT = 1024 * 1024
MAX_HEADER_BLOCK = 256 * 1024
CLOSE_TIMEOUT = 5.0

# The SPDY/3 header compression dictionary, byte for byte spdystream's spdy/dictionary.go headerDictionary: 65
# words, each behind its 32-bit length, then one run of text. tests/unit/test_spdy.py pins its length (1423) and
# its adler32 (0xe3c6a7c2), the dictionary id zlib writes at the head of every SPDY/3 header stream.
# fmt: off
_DICTIONARY_WORDS = (
    "options", "head", "post", "put", "delete", "trace", "accept", "accept-charset", "accept-encoding",
    "accept-language", "accept-ranges", "age", "allow", "authorization", "cache-control", "connection",
    "content-base", "content-encoding", "content-language", "content-length", "content-location", "content-md5",
    "content-range", "content-type", "date", "etag", "expect", "expires", "from", "host", "if-match",
    "if-modified-since", "if-none-match", "if-range", "if-unmodified-since", "last-modified", "location",
    "max-forwards", "pragma", "proxy-authenticate", "proxy-authorization", "range", "referer", "retry-after",
    "server", "te", "trailer", "transfer-encoding", "upgrade", "user-agent", "vary", "via", "warning",
    "www-authenticate", "method", "get", "status", "200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie",
    "keep-alive", "origin",
)
# fmt: on
_DICTIONARY_TAIL = (
    b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    b"403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    b"Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    b"chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    b"text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
HEADER_DICTIONARY = b"".join(len(w).to_bytes(4, "big") + w.encode() for w in _DICTIONARY_WORDS) + _DICTIONARY_TAIL


class SpdyError(Exception):
    """A protocol violation by the peer."""


# What a session reads frames from and writes them to: an asyncio stream pair, or (cri.streaming.tunnel) the
# byte stream that the binary messages of a WebSocket carry.
class FrameSource(Protocol):
    async def readexactly(self, n: int, /) -> bytes:
        """n bytes; asyncio.IncompleteReadError once the stream ends before them."""


class WriteBuffer(Protocol):
    def get_write_buffer_size(self) -> int: ...

    def abort(self) -> None: ...


class FrameSink(Protocol):
    def write(self, data: bytes, /) -> None: ...

    async def drain(self) -> None: ...

    def is_closing(self) -> bool: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...

    @property
    def transport(self) -> WriteBuffer: ...


def _control_frame(frame_type: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, frame_type, flags << 24 | len(payload)) + payload


def _data_frame(stream_id: int, flags: int, payload: bytes | memoryview) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, flags << 24 | len(payload)) + payload


def _encode_header_block(headers: dict[str, str]) -> bytes:
    parts = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        for text in (name.lower().encode(), value.encode()):
            parts.append(struct.pack(">I", len(text)) + text)
    return b"".join(parts)


def _take_string(raw: bytes, pos: int) -> tuple[str, int]:
    if pos + 4 > len(raw):
        raise SpdyError("header block truncated")
    (length,) = struct.unpack_from(">I", raw, pos)
    end = pos + 4 + length
    if end > len(raw):
        raise SpdyError("header block truncated")
    return raw[pos + 4 : end].decode("utf-8", "replace"), end


def _parse_header_block(raw: bytes) -> dict[str, str]:
    if len(raw) < 4:
        raise SpdyError("header block truncated")
    (count,) = struct.unpack_from(">I", raw)
    if count > (len(raw) - 4) // 8:
        raise SpdyError(f"header block claims {count} headers")
    headers: dict[str, str] = {}
    pos = 4
    for _ in range(count):
        name, pos = _take_string(raw, pos)
        value, pos = _take_string(raw, pos)
        # Several values travel NUL-joined; the streaming protocols only ever use one.
        headers.setdefault(name.lower(), value.split("\0", 1)[0])
    if pos != len(raw):
        raise SpdyError("bytes after the header block")
    return headers


def _two_words(payload: bytes, what: str) -> tuple[int, int]:
    if len(payload) != 8:
        raise SpdyError(f"{what} frame of {len(payload)} bytes")
    first, second = struct.unpack(">II", payload)
    return first, second


class _Signal:
    """Wakes every coroutine waiting on it; each waiter re-checks its own condition."""

    def __init__(self) -> None:
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def notify(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)


class SpdyStream:
    """One stream the peer opened."""

    def __init__(self, session: SpdySession, stream_id: int, headers: dict[str, str], send_window: int) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self._session = session
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._remote_fin = False
        self._local_fin = False
        self._reset = False
        self._send_window = send_window
        self._recv_unacked = 0
        self._changed = _Signal()

    @property
    def remote_closed(self) -> bool:
        """The peer will send nothing more: it half-closed, the stream was reset or the session ended."""
        return self._remote_fin or self._reset or self._session.closed

    async def read(self) -> bytes:
        """The next chunk of data; b"" once the peer half-closed, the stream was reset or the session ended."""
        while not self._chunks:
            if self.remote_closed:
                return b""
            await self._changed.wait()
        chunk = self._chunks.popleft()
        self._buffered -= len(chunk)
        self._session._consumed(self, len(chunk))
        return chunk

    async def write(self, data: bytes) -> None:
        """Send data as DATA frames; ConnectionError once the stream was reset, closed or the session ended."""
        self._check_writable()
        view = memoryview(data)
        while view:
            n = await self._session._reserve(self, min(len(view), MAX_DATA_CHUNK))
            await self._session._send_data(self, view[:n], n)
            view = view[n:]

    async def close(self) -> None:
        """Half-close our side (an empty DATA frame with FLAG_FIN); idempotent."""
        if self._local_fin or self._reset or self._session.closed:
            return
        self._local_fin = True
        with contextlib.suppress(ConnectionError):  # the connection is gone: nobody is left to tell
            await self._session._send_fin(self)

    def reset(self, status: int = CANCEL) -> None:
        """Abort the stream with RST_STREAM; idempotent, and a no-op once the session is over."""
        if self._reset:
            return
        finished = self._local_fin and self._remote_fin
        self._abort()
        self._session._forget(self)
        if not finished:
            self._session._send_control(RST_STREAM, 0, struct.pack(">II", self.stream_id, status))

    def _check_writable(self) -> None:
        if self._session.closed:
            raise ConnectionError("SPDY session closed")
        if self._reset:
            raise ConnectionError(f"SPDY stream {self.stream_id} was reset")
        if self._local_fin:
            raise ConnectionError(f"SPDY stream {self.stream_id} is closed for writing")

    def _deliver(self, payload: bytes, fin: bool) -> bool:
        """Queue data from the peer; False if it was dropped because the peer had already half-closed."""
        if self._remote_fin or self._reset:
            return False
        if payload:
            self._chunks.append(payload)
            self._buffered += len(payload)
        self._remote_fin = fin
        self._changed.notify()
        return True

    def _abort(self) -> None:
        """Reset state: unread data is dropped (and credited to the session window), everyone waiting wakes."""
        self._reset = True
        dropped, self._buffered = self._buffered, 0
        self._chunks.clear()
        self._session._credit_session(dropped)
        self._changed.notify()
        self._session._window_signal.notify()
        self._session._drain_signal.notify()


class SpdySession:
    """A SPDY/3.1 server session over a connected stream pair."""

    def __init__(self, reader: FrameSource, writer: FrameSink) -> None:
        self._reader = reader
        self._writer = writer
        # One compression context per direction for the whole connection, as spdystream's Framer keeps them.
        self._deflate = zlib.compressobj(level=zlib.Z_BEST_COMPRESSION, zdict=HEADER_DICTIONARY)
        self._inflate = zlib.decompressobj(zdict=HEADER_DICTIONARY)
        self._streams: dict[int, SpdyStream] = {}
        self._accepted: asyncio.Queue[SpdyStream | None] = asyncio.Queue()
        self._last_stream_id = 0
        self._closed = False
        self._write_lock = asyncio.Lock()
        self._window_signal = _Signal()
        # The read loop waits on it while a stream holds too much unread data.
        self._drain_signal = _Signal()
        self._peer_initial_window = DEFAULT_WINDOW
        self._send_window = DEFAULT_WINDOW
        self._stream_flow = False
        self._session_flow = False
        self._recv_unacked = 0
        self.last_activity = time.monotonic()

    @property
    def closed(self) -> bool:
        return self._closed

    async def serve(self) -> None:
        """Read frames until EOF, GOAWAY or a protocol error (answered with GOAWAY PROTOCOL_ERROR)."""
        goaway: int | None = None
        try:
            while not self._closed and await self._read_frame():
                pass
        except SpdyError as exc:
            event(log, logging.WARNING, "spdy protocol error", error=str(exc))
            goaway = GOAWAY_PROTOCOL_ERROR
        except (asyncio.IncompleteReadError, OSError):
            pass  # the peer went away
        finally:
            self._finish(goaway)
        await self._wait_closed()

    async def accept(self) -> SpdyStream | None:
        """The next stream the peer opened (already answered with SYN_REPLY); None once the session is over."""
        if self._closed:
            return None
        stream = await self._accepted.get()
        if stream is None:
            self._accepted.put_nowait(None)
        return None if self._closed else stream

    async def close(self) -> None:
        """GOAWAY (OK) if still open, then close the transport; idempotent."""
        self._finish(GOAWAY_OK)
        await self._wait_closed()

    # -- the read loop -------------------------------------------------------------------------------------------

    async def _read_frame(self) -> bool:
        """Read and handle one frame; False once the peer sent GOAWAY."""
        word, flags_length = struct.unpack(">II", await self._reader.readexactly(8))
        flags, length = flags_length >> 24, flags_length & 0xFFFFFF
        control = bool(word & 0x80000000)
        if control and (word >> 16) & 0x7FFF != VERSION:
            raise SpdyError(f"control frame of SPDY version {(word >> 16) & 0x7FFF}")
        payload = await self._reader.readexactly(length) if length else b""
        self.last_activity = time.monotonic()
        if not control:
            await self._on_data(word & 0x7FFFFFFF, flags, payload)
            return True
        if word & 0xFFFF == GOAWAY:
            return self._on_goaway(payload)
        self._on_control(word & 0xFFFF, flags, payload)
        if self._writer.transport.get_write_buffer_size() > CONTROL_BACKLOG_LIMIT:
            await self._writer.drain()
        return True

    def _on_control(self, frame_type: int, flags: int, payload: bytes) -> None:
        if frame_type == SYN_STREAM:
            self._on_syn_stream(flags, payload)
        elif frame_type in (SYN_REPLY, HEADERS):
            self._on_headers(flags, payload)
        elif frame_type == RST_STREAM:
            self._on_rst_stream(payload)
        elif frame_type == SETTINGS:
            self._on_settings(payload)
        elif frame_type == PING:
            self._on_ping(payload)
        elif frame_type == WINDOW_UPDATE:
            self._on_window_update(payload)
        # The draft says to ignore control frame types one does not know (CREDENTIAL, ...).

    def _on_syn_stream(self, flags: int, payload: bytes) -> None:
        if len(payload) < 10:
            raise SpdyError("SYN_STREAM frame too short")
        stream_id = struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF
        # Inflate before any check: a refused stream's header block still advances the shared zlib context.
        headers = self._inflate_headers(payload[10:])
        if stream_id == 0:
            raise SpdyError("SYN_STREAM for stream 0")
        if stream_id % 2 == 0 or stream_id <= self._last_stream_id:
            # spdystream's checkStreamFrame/validateStreamId: refuse the stream, keep the session.
            self._send_rst(stream_id, PROTOCOL_ERROR)
            return
        self._last_stream_id = stream_id
        stream = SpdyStream(self, stream_id, headers, self._peer_initial_window)
        stream._remote_fin = bool(flags & FLAG_FIN)
        stream._local_fin = bool(flags & FLAG_UNIDIRECTIONAL)
        self._streams[stream_id] = stream
        self._forget_if_done(stream)
        reply = struct.pack(">I", stream_id) + self._deflate_headers({})
        self._send_control(SYN_REPLY, 0, reply)
        self._accepted.put_nowait(stream)

    def _on_headers(self, flags: int, payload: bytes) -> None:
        """HEADERS (and a stray SYN_REPLY): only the zlib context and a FIN matter to the streaming protocols."""
        if len(payload) < 4:
            raise SpdyError("HEADERS frame too short")
        self._inflate_headers(payload[4:])
        stream = self._streams.get(struct.unpack_from(">I", payload)[0] & 0x7FFFFFFF)
        if stream is not None and flags & FLAG_FIN:
            stream._deliver(b"", True)
            self._forget_if_done(stream)

    def _on_rst_stream(self, payload: bytes) -> None:
        stream_id, status = _two_words(payload, "RST_STREAM")
        stream_id &= 0x7FFFFFFF
        if stream_id == 0 or status == 0:
            raise SpdyError("RST_STREAM with stream 0 or status 0")  # spdystream's RstStreamFrame.read refuses both
        stream = self._streams.pop(stream_id, None)
        if stream is not None:
            event(log, logging.DEBUG, "spdy stream reset by peer", stream=stream_id, status=status)
            stream._abort()

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) < 4:
            raise SpdyError("SETTINGS frame too short")
        (count,) = struct.unpack_from(">I", payload)
        if count > (len(payload) - 4) // 8:
            raise SpdyError(f"SETTINGS frame claims {count} entries")
        for i in range(count):
            flags_id, value = struct.unpack_from(">II", payload, 4 + 8 * i)
            if flags_id & 0xFFFFFF == SETTINGS_INITIAL_WINDOW_SIZE:
                self._set_initial_window(value)

    def _set_initial_window(self, value: int) -> None:
        if value > MAX_WINDOW:
            raise SpdyError(f"initial window size {value}")
        delta, self._peer_initial_window = value - self._peer_initial_window, value
        for stream in self._streams.values():
            stream._send_window += delta
        self._stream_flow = True
        self._window_signal.notify()

    def _on_ping(self, payload: bytes) -> None:
        if len(payload) != 4:
            raise SpdyError(f"PING frame of {len(payload)} bytes")
        # Odd ids are the client's own pings; even ones would answer pings of ours, and we send none.
        if struct.unpack(">I", payload)[0] % 2 == 1:
            self._send_control(PING, 0, payload)

    def _on_goaway(self, payload: bytes) -> bool:
        if len(payload) < 4:
            raise SpdyError("GOAWAY frame too short")
        # spdystream stops reading once it sent GOAWAY, so nothing we could still send would be read.
        return False

    def _on_window_update(self, payload: bytes) -> None:
        stream_id, delta = _two_words(payload, "WINDOW_UPDATE")
        stream_id, delta = stream_id & 0x7FFFFFFF, delta & 0x7FFFFFFF
        self._stream_flow = True
        if stream_id == 0:
            self._session_flow = True
            self._send_window += delta
            if self._send_window > MAX_WINDOW:
                raise SpdyError("session window above 2^31-1")
        elif (stream := self._streams.get(stream_id)) is not None:
            stream._send_window += delta
            if stream._send_window > MAX_WINDOW:
                stream.reset(FLOW_CONTROL_ERROR)
        self._window_signal.notify()

    async def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id == 0:
            raise SpdyError("DATA frame for stream 0")
        stream = self._streams.get(stream_id)
        if stream is None:
            self._credit_session(len(payload))
            self._send_rst(stream_id, INVALID_STREAM)
            return
        if not stream._deliver(payload, bool(flags & FLAG_FIN)):
            self._credit_session(len(payload))  # after the peer's FIN: dropped, as spdystream drops it
        self._forget_if_done(stream)
        while stream._buffered > RECV_BUFFER_LIMIT and not stream._reset and not self._closed:
            await self._drain_signal.wait()

    def _inflate_headers(self, block: bytes) -> dict[str, str]:
        try:
            raw = self._inflate.decompress(block, MAX_HEADER_BLOCK)
        except zlib.error as exc:
            raise SpdyError(f"header block does not inflate: {exc}") from exc
        if self._inflate.unconsumed_tail or self._inflate.eof:
            raise SpdyError("header block too large, or the compression stream ended")
        return _parse_header_block(raw)

    # -- writing ---------------------------------------------------------------------------------------------------

    def _deflate_headers(self, headers: dict[str, str]) -> bytes:
        raw = _encode_header_block(headers)
        return self._deflate.compress(raw) + self._deflate.flush(zlib.Z_SYNC_FLUSH)

    def _emit(self, frame: bytes) -> None:
        """Queue one whole frame: a single synchronous write, so frames never interleave whoever sends them."""
        if self._closed or self._writer.is_closing():
            return
        self._writer.write(frame)
        self.last_activity = time.monotonic()

    def _send_control(self, frame_type: int, flags: int, payload: bytes) -> None:
        self._emit(_control_frame(frame_type, flags, payload))

    def _send_rst(self, stream_id: int, status: int) -> None:
        self._send_control(RST_STREAM, 0, struct.pack(">II", stream_id, status))

    def _send_window_update(self, stream_id: int, delta: int) -> None:
        self._send_control(WINDOW_UPDATE, 0, struct.pack(">II", stream_id, delta))

    def _allowance(self, stream: SpdyStream) -> int:
        allowed = MAX_DATA_CHUNK
        if self._stream_flow:
            allowed = min(allowed, stream._send_window)
        if self._session_flow:
            allowed = min(allowed, self._send_window)
        return allowed

    async def _reserve(self, stream: SpdyStream, want: int) -> int:
        """Take up to want bytes of send window, waiting while an enforced window is exhausted."""
        while True:
            stream._check_writable()
            allowed = self._allowance(stream)
            if allowed > 0:
                break
            await self._window_signal.wait()
        n = min(want, allowed)
        stream._send_window -= n
        self._send_window -= n
        return n

    async def _send_data(self, stream: SpdyStream, chunk: memoryview, reserved: int) -> None:
        # The lock keeps one writer at a time parked in drain(); frames are whole either way (see _emit).
        async with self._write_lock:
            try:
                stream._check_writable()
            except ConnectionError:
                self._send_window += reserved
                raise
            self._emit(_data_frame(stream.stream_id, 0, chunk))
            await self._writer.drain()

    async def _send_fin(self, stream: SpdyStream) -> None:
        async with self._write_lock:
            if stream._reset or self._closed:
                return
            self._emit(_data_frame(stream.stream_id, FLAG_FIN, b""))
            self._forget_if_done(stream)
            await self._writer.drain()

    # -- bookkeeping ---------------------------------------------------------------------------------------------

    def _consumed(self, stream: SpdyStream, n: int) -> None:
        """read() handed n bytes to the application: give the window back to a peer that counts it."""
        stream._recv_unacked += n
        if stream._recv_unacked >= WINDOW_UPDATE_THRESHOLD and not stream.remote_closed:
            self._send_window_update(stream.stream_id, stream._recv_unacked)
            stream._recv_unacked = 0
        self._credit_session(n)
        self._drain_signal.notify()

    def _credit_session(self, n: int) -> None:
        self._recv_unacked += n
        if self._recv_unacked >= WINDOW_UPDATE_THRESHOLD and not self._closed:
            self._send_window_update(0, self._recv_unacked)
            self._recv_unacked = 0

    def _forget_if_done(self, stream: SpdyStream) -> None:
        if stream._local_fin and stream._remote_fin:
            self._forget(stream)

    def _forget(self, stream: SpdyStream) -> None:
        if self._streams.get(stream.stream_id) is stream:
            del self._streams[stream.stream_id]

    def _finish(self, goaway: int | None) -> None:
        """End the session: GOAWAY if asked, wake every waiter, close the transport. Synchronous, idempotent."""
        if self._closed:
            return
        if goaway is not None:
            self._send_control(GOAWAY, 0, struct.pack(">II", self._last_stream_id, goaway))
        self._closed = True
        for stream in self._streams.values():
            stream._changed.notify()
        self._streams.clear()
        self._window_signal.notify()
        self._drain_signal.notify()
        self._accepted.put_nowait(None)
        self._writer.close()
        event(log, logging.DEBUG, "spdy session closed", last_stream=self._last_stream_id, goaway=goaway)

    async def _wait_closed(self) -> None:
        try:
            await asyncio.wait_for(self._writer.wait_closed(), CLOSE_TIMEOUT)
        except (TimeoutError, OSError):
            # A peer that stopped reading would keep the flush, and so the close, waiting for ever.
            self._writer.transport.abort()
