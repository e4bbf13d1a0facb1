"""A SPDY/3.1 client session that behaves like moby/spdystream under client-go.

Facts this mirrors (moby/spdystream connection.go, stream.go, spdy/*.go, as
vendored by kubernetes; apimachinery pkg/util/httpstream/spdy):

- The upgrade is ``Connection: Upgrade`` + ``Upgrade: SPDY/3.1``, but every
  frame carries version 3: spdystream's framer is SPDY/3 and has no SPDY/3.1
  session flow control.
- Header blocks are zlib streams primed with the SPDY/3 dictionary; one
  compression context per direction for the whole connection, each block
  ended with a sync flush. Header names go on the wire lower-cased (Go's
  ``streamType`` becomes ``streamtype``); values of one name are joined by NUL.
- The client's stream ids are odd (1, 3, 5, ...), its ping ids odd too; the
  server answers a ping whose parity differs from its own and vice versa.
- ``CreateStream`` sends SYN_STREAM (priority 0, no FIN) and client-go waits
  for the SYN_REPLY (``WaitTimeout``, 30 s); a RST_STREAM instead fails it.
- DATA frames that arrive before the SYN_REPLY are dropped; DATA after the
  stream's FIN is dropped. One ``Write`` is one DATA frame; client-go copies
  through ``io.Copy``, hence frames of at most 32 KiB.
- spdystream never sends WINDOW_UPDATE and ignores WINDOW_UPDATE and SETTINGS
  frames ("unhandled frame type"): it neither honours nor grants windows.
  Both are off here by default; ``send_window_updates`` and
  ``honour_send_window`` turn them on to exercise a server that does.
- On GOAWAY spdystream stops reading the connection and ends every stream,
  so data the server sends after its GOAWAY is never seen. The same here.
- Closing (client-go ``connection.Close``) resets every stream this side has
  not finished (``Reset`` after ``Close`` sends nothing), sends GOAWAY with
  status OK, then closes the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import struct
import time
import zlib
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from tests.streamclients import (
    DEFAULT_TIMEOUT,
    ProtocolError,
    deadline,
    open_http,
    read_response_head,
    refuse,
)

__all__ = [
    "SPDY3_DICTIONARY",
    "ClientStream",
    "Frame",
    "HeaderCompressor",
    "HeaderDecompressor",
    "SessionOptions",
    "SpdyClient",
    "StreamReset",
    "connect",
    "decode_header_block",
    "encode_header_block",
]

VERSION = 3

SYN_STREAM = 1
SYN_REPLY = 2
RST_STREAM = 3
SETTINGS = 4
PING = 6
GOAWAY = 7
HEADERS = 8
WINDOW_UPDATE = 9
FRAME_NAMES = {
    SYN_STREAM: "SYN_STREAM",
    SYN_REPLY: "SYN_REPLY",
    RST_STREAM: "RST_STREAM",
    SETTINGS: "SETTINGS",
    PING: "PING",
    GOAWAY: "GOAWAY",
    HEADERS: "HEADERS",
    WINDOW_UPDATE: "WINDOW_UPDATE",
}

FLAG_FIN = 0x01
FLAG_UNIDIRECTIONAL = 0x02

# RST_STREAM status codes (spdy/types.go).
PROTOCOL_ERROR = 1
INVALID_STREAM = 2
REFUSED_STREAM = 3
UNSUPPORTED_VERSION = 4
CANCEL = 5
INTERNAL_ERROR = 6
FLOW_CONTROL_ERROR = 7
STREAM_IN_USE = 8
STREAM_ALREADY_CLOSED = 9

GOAWAY_OK = 0
SETTINGS_INITIAL_WINDOW_SIZE = 7
DEFAULT_WINDOW = 64 * 1024  # SPDY/3 initial window, per stream
MAX_LENGTH = (1 << 24) - 1  # the 24-bit length field
COPY_CHUNK = 32 * 1024  # io.Copy's buffer: what one client-go DATA frame carries at most

# The SPDY/3 header compression dictionary (draft 3, section 2.6.10.1), as in
# spdystream's spdy/dictionary.go: 65 length-prefixed words, then a run of
# status codes, reason phrases, dates and media types. 1423 bytes; its
# adler32, the dictionary id in every header block's zlib header, is 0xe3c6a7c2.
_DICTIONARY_WORD_LIST = (
    "options,head,post,put,delete,trace,accept,accept-charset,accept-encoding,accept-language,accept-ranges,"
    "age,allow,authorization,cache-control,connection,content-base,content-encoding,content-language,"
    "content-length,content-location,content-md5,content-range,content-type,date,etag,expect,expires,from,"
    "host,if-match,if-modified-since,if-none-match,if-range,if-unmodified-since,last-modified,location,"
    "max-forwards,pragma,proxy-authenticate,proxy-authorization,range,referer,retry-after,server,te,trailer,"
    "transfer-encoding,upgrade,user-agent,vary,via,warning,www-authenticate,method,get,status,200 OK,"
    "version,HTTP/1.1,url,public,set-cookie,keep-alive,origin"
)
_DICTIONARY_TAIL = (
    b"100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    b"203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request"
    b"401 Unauthorized403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented"
    b"503 Service UnavailableJan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 "
    b"Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMTchunked,text/html,image/png,image/jpg,image/gif,"
    b"application/xml,application/xhtml+xml,text/plain,text/javascript,publicprivatemax-age="
    b"gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
_DICTIONARY_WORDS = [word.encode() for word in _DICTIONARY_WORD_LIST.split(",")]
SPDY3_DICTIONARY = b"".join(struct.pack(">I", len(word)) + word for word in _DICTIONARY_WORDS) + _DICTIONARY_TAIL


# --- header blocks ----------------------------------------------------------------------------------------------


def encode_header_block(headers: Mapping[str, str | Sequence[str]]) -> bytes:
    """The uncompressed name/value block: count, then length-prefixed lower-cased names and values."""
    out = [struct.pack(">I", len(headers))]
    for name, value in headers.items():
        joined = value if isinstance(value, str) else "\x00".join(value)
        raw_name, raw_value = name.lower().encode(), joined.encode()
        out += [struct.pack(">I", len(raw_name)), raw_name, struct.pack(">I", len(raw_value)), raw_value]
    return b"".join(out)


def decode_header_block(raw: bytes) -> dict[str, list[str]]:
    """Parse a decompressed name/value block; names are kept as sent (the server must lower-case them)."""
    view = memoryview(raw)
    pos = 0

    def take(n: int) -> bytes:
        nonlocal pos
        if pos + n > len(view):
            raise ProtocolError(f"header block truncated at byte {pos} (wanted {n} more)")
        chunk = bytes(view[pos : pos + n])
        pos += n
        return chunk

    def take_string() -> str:
        (length,) = struct.unpack(">I", take(4))
        return take(length).decode("utf-8", "replace")

    (count,) = struct.unpack(">I", take(4))
    headers: dict[str, list[str]] = {}
    for _ in range(count):
        name = take_string()
        if name in headers:
            raise ProtocolError(f"header {name!r} appears twice in one block")
        headers[name] = take_string().split("\x00")
    if pos != len(view):
        raise ProtocolError(f"{len(view) - pos} stray bytes after the header block")
    return headers


class HeaderCompressor:
    """One zlib stream for all the header blocks this side sends, like spdystream's Framer."""

    def __init__(self) -> None:
        # Go: zlib.NewWriterLevelDict(buf, zlib.BestCompression, headerDictionary).
        self._z = zlib.compressobj(zlib.Z_BEST_COMPRESSION, zlib.DEFLATED, zlib.MAX_WBITS, zdict=SPDY3_DICTIONARY)

    def compress(self, block: bytes) -> bytes:
        return self._z.compress(block) + self._z.flush(zlib.Z_SYNC_FLUSH)


class HeaderDecompressor:
    """One zlib stream for all the header blocks the server sends."""

    def __init__(self) -> None:
        self._z = zlib.decompressobj(zlib.MAX_WBITS, zdict=SPDY3_DICTIONARY)

    def decompress(self, data: bytes) -> bytes:
        try:
            return self._z.decompress(data)
        except zlib.error as exc:
            raise ProtocolError(f"header block does not decompress: {exc}") from None


# --- frames -----------------------------------------------------------------------------------------------------


def control_frame(kind: int, flags: int, payload: bytes) -> bytes:
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload


def data_frame(stream_id: int, flags: int, data: bytes) -> bytes:
    return struct.pack(">II", stream_id & 0x7FFFFFFF, (flags << 24) | len(data)) + data


@dataclass
class Frame:
    control: bool
    kind: int  # control frame type; 0 for DATA
    flags: int
    payload: bytes
    version: int = VERSION
    stream_id: int = 0  # DATA frames only; control frames carry it in the payload

    @property
    def name(self) -> str:
        return FRAME_NAMES.get(self.kind, f"type {self.kind}") if self.control else "DATA"


async def read_frame(reader: asyncio.StreamReader) -> Frame | None:
    """The next frame, or None at a clean EOF between frames."""
    try:
        head = await reader.readexactly(8)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError(f"connection closed inside a frame header ({len(exc.partial)} of 8 bytes)") from None
        return None
    first, second = struct.unpack(">II", head)
    flags, length = second >> 24, second & MAX_LENGTH
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"connection closed inside a frame ({len(exc.partial)} of {length} bytes)") from None
    if first & 0x80000000:
        return Frame(True, first & 0xFFFF, flags, payload, version=(first >> 16) & 0x7FFF)
    return Frame(False, 0, flags, payload, stream_id=first & 0x7FFFFFFF)


def _fields(frame: Frame, fmt: str) -> tuple[int, ...]:
    """Unpack a fixed-size control frame, insisting on its exact length."""
    if len(frame.payload) != struct.calcsize(fmt):
        raise ProtocolError(f"{frame.name} frame of {len(frame.payload)} bytes, expected {struct.calcsize(fmt)}")
    return struct.unpack(fmt, frame.payload)


# --- streams ----------------------------------------------------------------------------------------------------


class StreamReset(Exception):
    """The server reset a stream (RST_STREAM) before replying to it."""

    def __init__(self, stream_id: int, status: int):
        super().__init__(f"stream {stream_id} reset by the server with status {status}")
        self.stream_id = stream_id
        self.status = status


class _Inbox:
    """Received DATA payloads for one stream, then an end marker.

    With a limit the connection's reader waits for room, which stops it reading
    the socket: the backpressure spdystream's unbuffered data channel gives.
    """

    def __init__(self, limit: int | None):
        self._chunks: deque[bytes] = deque()
        self._limit = limit
        self._ended = False
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def _update(self) -> None:
        ready = bool(self._chunks) or self._ended
        (self._readable.set if ready else self._readable.clear)()
        room = self._ended or self._limit is None or len(self._chunks) < self._limit
        (self._room.set if room else self._room.clear)()

    async def put(self, data: bytes) -> None:
        await self._room.wait()  # unbounded on purpose: this is the backpressure itself
        if not self._ended:
            self._chunks.append(data)
        self._update()

    def end(self) -> None:
        self._ended = True
        self._update()

    @property
    def ended(self) -> bool:
        return self._ended

    async def get(self) -> bytes | None:
        await self._readable.wait()
        if not self._chunks:
            return None
        chunk = self._chunks.popleft()
        self._update()
        return chunk


class ClientStream:
    """One SPDY stream of a SpdyClient session."""

    def __init__(self, client: SpdyClient, stream_id: int, headers: Mapping[str, str], limit: int | None):
        self.client = client
        self.id = stream_id
        self.headers = dict(headers)
        self.reply_headers: dict[str, list[str]] | None = None
        self.extra_headers: list[dict[str, list[str]]] = []  # HEADERS frames
        self.replied: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # The outcome may be nobody's business (no one waits for a reply after the connection ends).
        self.replied.add_done_callback(lambda f: f.cancelled() or f.exception())
        self.fin_received = False  # the server half-closed (FIN on DATA, SYN_REPLY or HEADERS)
        self.reset_status: int | None = None  # the server reset the stream
        self.local_closed = False  # we sent FIN (or reset): spdystream's "finished"
        self.bytes_received = 0
        self.data_after_fin = 0  # bytes the server sent after its FIN (dropped, as spdystream does)
        self.send_window = client.settings.get(SETTINGS_INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
        self._window_open = asyncio.Event()
        self._window_open.set()
        self._inbox = _Inbox(limit)

    def __repr__(self) -> str:
        return f"<ClientStream {self.id} {self.headers}>"

    @property
    def ended(self) -> bool:
        """Nothing more will arrive: FIN, reset, or the connection ended."""
        return self._inbox.ended

    def _describe(self) -> str:
        kind = self.headers.get("streamType") or self.headers.get("streamtype") or ""
        return f"SPDY stream {self.id}" + (f" ({kind})" if kind else "")

    async def read(self, timeout: float | None = None) -> bytes:
        """The next DATA payload; b"" once the stream has ended (FIN, reset or connection end)."""
        return await deadline(self._next(), timeout, f"data on {self._describe()}")

    async def read_all(self, timeout: float | None = None) -> bytes:
        """Everything until the stream ends; the timeout bounds the whole read."""

        async def drain() -> bytes:
            parts = []
            while chunk := await self._next():
                parts.append(chunk)
            return b"".join(parts)

        return await deadline(drain(), timeout, f"the end of {self._describe()}")

    async def _next(self) -> bytes:
        chunk = await self._inbox.get()
        if chunk is None:
            return b""
        await self.client._consumed(self, len(chunk))
        return chunk

    async def write(self, data: bytes, timeout: float | None = None) -> None:
        """Send data as DATA frames of at most 32 KiB each (io.Copy's chunks); b"" sends nothing."""
        if self.local_closed:
            raise ConnectionError(f"write on {self._describe()} after it was closed")
        view = memoryview(data)
        while view:
            size = await self._sendable(len(view), timeout)
            await self.client._send(data_frame(self.id, 0, bytes(view[:size])), f"DATA on {self._describe()}", timeout)
            view = view[size:]

    async def _sendable(self, wanted: int, timeout: float | None) -> int:
        size = min(wanted, COPY_CHUNK)
        if not self.client.options.honour_send_window:
            return size
        await deadline(self._window_open.wait(), timeout, f"send window on {self._describe()}")
        size = min(size, self.send_window)
        self.send_window -= size
        if self.send_window <= 0:
            self._window_open.clear()
        return size

    def _grow_window(self, delta: int) -> None:
        self.send_window += delta
        if self.send_window > 0:
            self._window_open.set()

    async def close(self, timeout: float | None = None) -> None:
        """Half-close: an empty DATA frame with FIN (spdystream's Stream.Close)."""
        if self.local_closed:
            raise ConnectionError(f"close of {self._describe()} twice")
        self.local_closed = True
        await self.client._send(data_frame(self.id, FLAG_FIN, b""), f"FIN on {self._describe()}", timeout)

    async def reset(self, status: int = CANCEL, timeout: float | None = None) -> None:
        """spdystream's Stream.Reset: RST_STREAM unless this side already finished, and stop reading."""
        self.client._streams.pop(self.id, None)
        self._inbox.end()
        if self.local_closed:
            return
        self.local_closed = True
        frame = control_frame(RST_STREAM, 0, struct.pack(">II", self.id, status))
        await self.client._send(frame, f"RST_STREAM on {self._describe()}", timeout)


# --- the session ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionOptions:
    """How a SpdyClient departs from spdystream's defaults; the defaults are spdystream's behaviour."""

    # Grant the server window: a per-stream WINDOW_UPDATE for what the application has read.
    send_window_updates: bool = False
    # With send_window_updates, also a stream-0 (SPDY/3.1 session) WINDOW_UPDATE.
    session_window_updates: bool = False
    # Never send more than the server's per-stream window (64 KiB, moved by SETTINGS and WINDOW_UPDATE).
    honour_send_window: bool = False
    # Send a PING this often and wait for its echo; client-go's RoundTripperFor pings every 5 s.
    ping_period: float | None = None
    # Per stream, how many unread DATA payloads to hold before the reader stops reading the
    # socket (the backpressure of spdystream's unbuffered data channel); None: unbounded.
    max_queued_frames: int | None = None


class SpdyClient:
    """A client SPDY session over an upgraded connection.

    Call ``start()`` (``connect`` does) before opening streams: a background
    task reads and dispatches the server's frames.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        options: SessionOptions | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self._reader = reader
        self._writer = writer
        self.options = options or SessionOptions()
        self.timeout = timeout
        self._compressor = HeaderCompressor()
        self._decompressor = HeaderDecompressor()
        self._streams: dict[int, ClientStream] = {}
        self._next_stream_id = 1
        self._next_ping_id = 1
        self._last_server_stream = 0
        self._pings: dict[int, asyncio.Future[None]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._ended = asyncio.Event()
        self._going_away = False
        # What the server did, for the tests to check.
        self.goaway: tuple[int, int] | None = None  # (last good stream id, status)
        self.settings: dict[int, int] = {}
        self.pushed_streams: list[ClientStream] = []
        self.pings_answered = 0  # server PINGs we echoed
        self.pongs_received = 0  # echoes of our PINGs
        self.window_updates_received = 0
        self.protocol_error: str | None = None
        self.connection_error: str | None = None
        self.warnings: list[str] = []  # tolerated oddities (frames spdystream silently drops)

    # -- lifecycle --

    def start(self) -> None:
        self._tasks.append(asyncio.create_task(self._read_loop(), name="spdy-read"))
        if self.options.ping_period:
            self._tasks.append(asyncio.create_task(self._ping_loop(self.options.ping_period), name="spdy-ping"))

    @property
    def ended(self) -> bool:
        """The read side is over: EOF, GOAWAY, a protocol error or a local close."""
        return self._ended.is_set()

    async def wait_ended(self, timeout: float | None = None) -> None:
        await deadline(self._ended.wait(), timeout, "the SPDY connection to end")

    async def close(self, *, reset_streams: bool = True, timeout: float | None = None) -> None:
        """client-go's connection.Close: reset unfinished streams, GOAWAY, close the socket."""
        try:
            if not self._writer.is_closing():
                if reset_streams:
                    for stream in list(self._streams.values()):
                        await stream.reset(timeout=timeout)
                if not self._going_away:
                    self._going_away = True
                    last_good = self._last_server_stream
                    frame = control_frame(GOAWAY, 0, struct.pack(">II", last_good, GOAWAY_OK))
                    await self._send(frame, "GOAWAY", timeout)
        except (ConnectionError, TimeoutError):
            pass  # the server may already be gone; closing is all that is left
        finally:
            await self._shutdown()

    def abort(self, *, rst: bool = False) -> None:
        """Drop the connection without GOAWAY; with rst the kernel sends a TCP RST."""
        if rst:
            sock = self._writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()
        self._end_all()
        for task in self._tasks:
            task.cancel()

    async def _shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
            await deadline(self._writer.wait_closed(), 5, "the socket to close")
        self._end_all()

    def _end_all(self) -> None:
        for stream in list(self._streams.values()):
            stream._inbox.end()
            if not stream.replied.done():
                stream.replied.set_exception(ConnectionError(f"connection ended before {stream._describe()} replied"))
        for ping in self._pings.values():
            if not ping.done():
                ping.set_exception(ConnectionError("connection ended before the PING echo"))
        self._ended.set()

    # -- sending --

    async def _send(self, frame: bytes, what: str, timeout: float | None = None) -> None:
        if self._writer.is_closing():
            raise ConnectionError(f"cannot send {what}: the connection is closed")
        self._writer.write(frame)
        await deadline(self._writer.drain(), timeout if timeout is not None else self.timeout, f"sending {what}")

    async def open_stream(
        self, headers: Mapping[str, str], *, fin: bool = False, wait_reply: bool = True, timeout: float | None = None
    ) -> ClientStream:
        """SYN_STREAM with the next odd id, then (like client-go) wait for the SYN_REPLY."""
        if self._going_away or self.ended:
            raise ConnectionError("cannot open a stream: the connection is going away")
        stream_id = self._next_stream_id
        self._next_stream_id += 2
        stream = ClientStream(self, stream_id, headers, self.options.max_queued_frames)
        self._streams[stream_id] = stream
        # Compress and write in one step: the zlib context's order must be the wire order.
        block = self._compressor.compress(encode_header_block(headers))
        payload = struct.pack(">IIBB", stream_id, 0, 0, 0) + block
        stream.local_closed = fin
        await self._send(control_frame(SYN_STREAM, FLAG_FIN if fin else 0, payload), f"SYN_STREAM {stream_id}", timeout)
        if wait_reply:
            # Shielded: a timeout here must not cancel the future a late SYN_REPLY resolves.
            reply = asyncio.shield(stream.replied)
            await deadline(reply, timeout or self.timeout, f"the SYN_REPLY to {stream._describe()}")
        return stream

    async def ping(self, timeout: float | None = None) -> float:
        """Send a PING (odd id) and wait for its echo; returns the round trip in seconds."""
        ping_id = self._next_ping_id
        self._next_ping_id = ping_id + 2 if ping_id <= 0x7FFFFFFD else 1
        echo = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = echo
        started = time.monotonic()
        try:
            await self._send(control_frame(PING, 0, struct.pack(">I", ping_id)), f"PING {ping_id}", timeout)
            await deadline(echo, timeout or self.timeout, f"the echo of PING {ping_id}")
        finally:
            self._pings.pop(ping_id, None)
        return time.monotonic() - started

    async def _ping_loop(self, period: float) -> None:
        while not self.ended:
            await asyncio.sleep(period)
            try:
                await self.ping()
            except (ConnectionError, TimeoutError) as exc:
                self.warnings.append(f"ping failed: {exc}")
                return

    async def _consumed(self, stream: ClientStream, size: int) -> None:
        """The application read size bytes: grant them back if asked to (spdystream never does)."""
        if not self.options.send_window_updates or self._writer.is_closing() or size == 0:
            return
        frames = [control_frame(WINDOW_UPDATE, 0, struct.pack(">II", stream.id, size))]
        if self.options.session_window_updates:
            frames.append(control_frame(WINDOW_UPDATE, 0, struct.pack(">II", 0, size)))
        for frame in frames:
            try:
                await self._send(frame, f"WINDOW_UPDATE for {stream._describe()}")
            except ConnectionError:
                return

    # -- receiving --

    async def _read_loop(self) -> None:
        try:
            while (frame := await read_frame(self._reader)) is not None:
                if not await self._dispatch(frame):
                    break
        except ProtocolError as exc:
            self.protocol_error = str(exc)
            self._writer.transport.abort()
        except (ConnectionError, TimeoutError, ssl.SSLError) as exc:  # TimeoutError: a reply we could not send
            self.connection_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._end_all()

    async def _dispatch(self, frame: Frame) -> bool:
        """Handle one frame; False stops reading (after GOAWAY, as spdystream does)."""
        if not frame.control:
            await self._on_data(frame)
            return True
        if frame.version != VERSION:
            self.warnings.append(f"{frame.name} frame with version {frame.version}")
        handlers = {
            SYN_STREAM: self._on_syn_stream,
            SYN_REPLY: self._on_syn_reply,
            RST_STREAM: self._on_rst_stream,
            SETTINGS: self._on_settings,
            PING: self._on_ping,
            HEADERS: self._on_headers,
            WINDOW_UPDATE: self._on_window_update,
        }
        if frame.kind == GOAWAY:
            last_good, status = _fields(frame, ">II")
            self.goaway = (last_good, status)
            self._going_away = True
            return False
        handler = handlers.get(frame.kind)
        if handler is None:
            # spdystream's framer fails on an unknown control frame type and the session ends.
            raise ProtocolError(f"unknown control frame type {frame.kind}")
        await handler(frame)
        return True

    def _headers_of(self, frame: Frame, offset: int) -> tuple[int, dict[str, list[str]]]:
        if len(frame.payload) < offset:
            raise ProtocolError(f"{frame.name} frame of {len(frame.payload)} bytes is too short")
        (stream_id,) = struct.unpack(">I", frame.payload[:4])
        block = self._decompressor.decompress(frame.payload[offset:])
        return stream_id & 0x7FFFFFFF, decode_header_block(block)

    async def _on_data(self, frame: Frame) -> None:
        stream = self._streams.get(frame.stream_id)
        if stream is None:
            self.warnings.append(f"DATA for unknown or closed stream {frame.stream_id}")
            return
        if not stream.replied.done():
            self.warnings.append(f"DATA on stream {frame.stream_id} before its SYN_REPLY (dropped)")
            return
        if stream.fin_received:
            stream.data_after_fin += len(frame.payload)
            self.warnings.append(f"DATA on stream {frame.stream_id} after its FIN (dropped)")
            return
        if frame.payload:
            stream.bytes_received += len(frame.payload)
            await stream._inbox.put(frame.payload)
        if frame.flags & FLAG_FIN:
            self._remote_finish(stream)

    def _remote_finish(self, stream: ClientStream) -> None:
        stream.fin_received = True
        stream._inbox.end()
        if stream.local_closed:
            self._streams.pop(stream.id, None)

    async def _on_syn_reply(self, frame: Frame) -> None:
        stream_id, headers = self._headers_of(frame, 4)
        stream = self._streams.get(stream_id)
        if stream is None:
            self.warnings.append(f"SYN_REPLY for unknown or closed stream {stream_id}")
            return
        if stream.replied.done():
            self.warnings.append(f"second SYN_REPLY for stream {stream_id} (ignored)")
            return
        stream.reply_headers = headers
        stream.replied.set_result(None)
        if frame.flags & FLAG_FIN:
            self._remote_finish(stream)

    async def _on_rst_stream(self, frame: Frame) -> None:
        stream_id, status = _fields(frame, ">II")
        stream = self._streams.pop(stream_id & 0x7FFFFFFF, None)
        if stream is None:
            return
        stream.reset_status = status
        stream.local_closed = True  # spdystream marks a reset stream finished
        stream._inbox.end()
        if not stream.replied.done():
            stream.replied.set_exception(StreamReset(stream.id, status))

    async def _on_headers(self, frame: Frame) -> None:
        stream_id, headers = self._headers_of(frame, 4)
        stream = self._streams.get(stream_id)
        if stream is None or not stream.replied.done():
            self.warnings.append(f"HEADERS for stream {stream_id} that is unknown or not replied")
            return
        stream.extra_headers.append(headers)
        if frame.flags & FLAG_FIN:
            self._remote_finish(stream)

    async def _on_syn_stream(self, frame: Frame) -> None:
        stream_id, headers = self._headers_of(frame, 10)  # always decompress: the zlib state moves on
        if stream_id % 2 or stream_id <= self._last_server_stream:
            rst = control_frame(RST_STREAM, 0, struct.pack(">II", stream_id, PROTOCOL_ERROR))
            await self._send(rst, f"RST_STREAM for the server's bad stream id {stream_id}")
            return
        self._last_server_stream = stream_id
        # client-go's client connection accepts server-initiated streams (NoOpNewStreamHandler).
        joined = {name: "\x00".join(values) for name, values in headers.items()}
        stream = ClientStream(self, stream_id, joined, self.options.max_queued_frames)
        stream.replied.set_result(None)
        self._streams[stream_id] = stream
        self.pushed_streams.append(stream)
        block = self._compressor.compress(encode_header_block({}))
        reply = control_frame(SYN_REPLY, 0, struct.pack(">I", stream_id) + block)
        await self._send(reply, f"SYN_REPLY to the server's stream {stream_id}")
        if frame.flags & FLAG_FIN:
            self._remote_finish(stream)

    async def _on_settings(self, frame: Frame) -> None:
        if len(frame.payload) < 4:
            raise ProtocolError("SETTINGS frame shorter than its count")
        (count,) = struct.unpack(">I", frame.payload[:4])
        if len(frame.payload) != 4 + 8 * count:
            raise ProtocolError(f"SETTINGS frame of {len(frame.payload)} bytes for {count} entries")
        for i in range(count):
            flag_id, value = struct.unpack(">II", frame.payload[4 + 8 * i : 12 + 8 * i])
            setting = flag_id & 0xFFFFFF
            if setting == SETTINGS_INITIAL_WINDOW_SIZE and self.options.honour_send_window:
                delta = value - self.settings.get(setting, DEFAULT_WINDOW)
                for stream in self._streams.values():
                    stream._grow_window(delta)
            self.settings[setting] = value

    async def _on_ping(self, frame: Frame) -> None:
        (ping_id,) = _fields(frame, ">I")
        if ping_id % 2 == 0:  # the server's: echo it
            self.pings_answered += 1
            await self._send(control_frame(PING, 0, frame.payload), f"the echo of the server's PING {ping_id}")
            return
        echo = self._pings.get(ping_id)
        if echo is not None and not echo.done():
            self.pongs_received += 1
            echo.set_result(None)

    async def _on_window_update(self, frame: Frame) -> None:
        stream_id, delta = _fields(frame, ">II")
        self.window_updates_received += 1
        stream = self._streams.get(stream_id & 0x7FFFFFFF)
        if self.options.honour_send_window and stream is not None:
            stream._grow_window(delta & 0x7FFFFFFF)


# --- the upgrade ------------------------------------------------------------------------------------------------


async def connect(
    url: str,
    protocols: Sequence[str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    options: SessionOptions | None = None,
) -> tuple[SpdyClient, str]:
    """POST-upgrade url to SPDY/3.1 offering protocols in order; returns the session and the chosen protocol.

    The chosen protocol is the response's X-Stream-Protocol-Version, "" when it has none
    (client-go then falls back to v1). Any status but 101 raises UpgradeRefused; a 101
    without the Connection/Upgrade headers client-go checks raises ProtocolError.
    """
    reader, writer, target = await open_http(url, ssl_context, timeout)
    lines = [
        f"POST {target.request_target} HTTP/1.1",
        f"Host: {target.host_header}",
        "Connection: Upgrade",
        "Upgrade: SPDY/3.1",
        *(f"X-Stream-Protocol-Version: {p}" for p in protocols),
        "Content-Length: 0",
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        await deadline(writer.drain(), timeout, "sending the SPDY upgrade request")
        head = await read_response_head(reader, timeout, f"the SPDY upgrade of {target.request_target}")
    except BaseException:
        writer.close()
        raise
    if head.status != 101:
        await refuse(reader, writer, head, timeout)
    if not head.has_token("Connection", "upgrade") or not head.has_token("Upgrade", "spdy/3.1"):
        writer.close()
        raise ProtocolError(f"101 without Connection: Upgrade / Upgrade: SPDY/3.1: {head.headers}")
    client = SpdyClient(reader, writer, options, timeout=timeout)
    client.start()
    return client, head.get("X-Stream-Protocol-Version") or ""
