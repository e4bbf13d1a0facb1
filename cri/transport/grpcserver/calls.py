"""gRPC calls over HTTP/2 (gRPC's PROTOCOL-HTTP2.md): routing, message framing, deadlines, status.

A complete request stream becomes one asyncio task running the route's handler; RST_STREAM
or a lost connection cancels it, as does the client's `grpc-timeout`. Handlers end a call
with a status by raising `RpcError`; anything else they raise is answered INTERNAL.
"""

from __future__ import annotations

import asyncio
import contextvars
import dis
import inspect
import logging
import struct
import urllib.parse
from collections.abc import AsyncGenerator, Awaitable, Callable, Coroutine, Mapping
from contextlib import aclosing
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from cri.log import event
from cri.transport.grpcserver import frames as f
from cri.transport.grpcserver.connection import Http2Connection, Stream

log = logging.getLogger(__name__)

T = TypeVar("T")

MESSAGE_PREFIX = struct.Struct(">BI")  # compressed flag, length


@dataclass(frozen=True)
class Encoded:
    """A response its handler has already serialized (a cache keeps answers so): sent as it is."""

    data: bytes


def encode(response: Message | Encoded) -> bytes:
    return response.data if isinstance(response, Encoded) else response.SerializeToString()


UnaryHandler = Callable[[Any], Awaitable[Message | Encoded]]
StreamHandler = Callable[[Any], AsyncGenerator[Message, None]]
InlineHandler = Callable[[Any], Message | Encoded]


@dataclass(frozen=True)
class Route:
    """One method: how to read its request, and the handler (unary, or server-streaming)."""

    parse: Callable[[bytes], Message]
    unary: UnaryHandler | None = None
    stream: StreamHandler | None = None
    # A unary handler that never waits, answered as the request arrives: no task, no deadline timer,
    # nothing scheduled. Preferred to `unary` when both are given.
    inline: InlineHandler | None = None
    # A stream that lasts as long as the client wants (an event feed): at stop it is ended
    # at once rather than waited for.
    subscription: bool = False


# What a coroutine's own bytecode holds where it may suspend (await, async for, async with).
_SUSPENDING = frozenset({"YIELD_VALUE", "SEND", "GET_AWAITABLE", "GET_ANEXT", "BEFORE_ASYNC_WITH"})


def never_waits(function: Callable[..., object]) -> bool:
    """Whether `function` is a coroutine function whose body has no await, async for or async with: a
    call of it then runs to its end in its first step, whatever it does (what it calls cannot suspend it)."""
    target = getattr(function, "__func__", function)
    code = getattr(target, "__code__", None)
    if code is None or not inspect.iscoroutinefunction(target):
        return False
    return not any(instruction.opname in _SUSPENDING for instruction in dis.get_instructions(code))


def runs_to_completion(coroutine: Awaitable[T]) -> T:
    """The result of a coroutine of a `never_waits` function, run in one step (no event loop turn)."""
    if not isinstance(coroutine, Coroutine):
        raise TypeError(f"not a coroutine: {coroutine!r}")
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coroutine.close()
    raise RuntimeError(f"{coroutine!r} suspended, although its function never waits")


class RpcError(Exception):
    """Ends a call with a gRPC status other than OK."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


# The running call's deadline (its asyncio.timeout), for `deadline_exceeded`.
_DEADLINE: contextvars.ContextVar[asyncio.Timeout | None] = contextvars.ContextVar("grpc_deadline", default=None)


def deadline_exceeded() -> bool:
    """In a handler being cancelled: whether by the client's deadline (else: client gone, or the server stops).
    The instrumentation logs and counts DEADLINE_EXCEEDED then, as the client is answered."""
    timeout = _DEADLINE.get()
    return timeout is not None and timeout.expired()


_TIMEOUT_UNITS = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}

_CONTENT_TYPE = f.literal(b"content-type", b"application/grpc")
RESPONSE_HEADERS = f.STATUS_200 + _CONTENT_TYPE + f.literal(b"grpc-accept-encoding", b"identity")
_OK_TRAILERS = f.literal(b"grpc-status", b"0")


# Clients limit the header list (gRPC C-core: 8 kB soft, 16 kB hard); a runtime's stderr quoted in
# an error must not take the whole connection down with it.
MAX_MESSAGE_HEADER = 4096


def _percent_encode(text: str, limit: int = MAX_MESSAGE_HEADER) -> bytes:
    """grpc-message encoding: printable ASCII except '%' as is, every other byte as %XX; cut at `limit`
    between two characters (a cut inside one leaves the client bytes that are not UTF-8)."""
    out = bytearray()
    for char in text:
        piece = b"".join(
            bytes([byte]) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte
            for byte in char.encode("utf-8", "backslashreplace")
        )
        if len(out) + len(piece) > limit:
            break
        out += piece
    return bytes(out)


def cut_details(text: str, limit: int = MAX_MESSAGE_HEADER) -> str:
    """The longest start of `text` whose grpc-message encoding fits in `limit` bytes, for a transport that
    encodes the message itself (grpcio's)."""
    return urllib.parse.unquote_to_bytes(_percent_encode(text, limit)).decode("utf-8", "backslashreplace")


def framed_message(payload: bytes) -> bytes:
    """One uncompressed gRPC message: the 5-byte prefix, then the bytes."""
    return MESSAGE_PREFIX.pack(0, len(payload)) + payload


def status_block(code: grpc.StatusCode, details: str) -> bytes:
    number: int = code.value[0]
    block = f.literal(b"grpc-status", str(number).encode())
    if details:
        block += f.literal(b"grpc-message", _percent_encode(details))
    return block


def trailers_only(code: grpc.StatusCode, details: str) -> bytes:
    return f.STATUS_200 + _CONTENT_TYPE + status_block(code, details)


def parse_timeout(value: bytes) -> float:
    """Seconds from a grpc-timeout header value ("100m", "5S", at most 8 digits)."""
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in _TIMEOUT_UNITS:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"grpc-timeout: malformed value {value!r}")
    return int(digits) * _TIMEOUT_UNITS[unit]


def _request_message(route: Route, headers: dict[bytes, bytes], body: bytearray, path: str) -> Message:
    if len(body) < MESSAGE_PREFIX.size:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: the request carries no message")
    compressed, length = MESSAGE_PREFIX.unpack_from(body)
    if len(body) != MESSAGE_PREFIX.size + length:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: a unary request carries exactly one message")
    if compressed:
        encoding = headers.get(b"grpc-encoding", b"identity").decode("latin-1")
        raise RpcError(grpc.StatusCode.UNIMPLEMENTED, f"grpc-encoding: compressed messages ({encoding}) unsupported")
    try:
        return route.parse(bytes(body[MESSAGE_PREFIX.size :]))
    except DecodeError as exc:
        raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{path}: the request is not a valid message: {exc}") from exc


def _http_refusal(status: bytes) -> bytes:
    return f.literal(b":status", status)


class Dispatcher:
    """Turns complete request streams into calls of the routes; keeps the running calls."""

    def __init__(self, routes: Mapping[str, Route], max_send_bytes: int) -> None:
        self._routes = {path.encode(): route for path, route in routes.items()}
        self._max_send = max_send_bytes
        self.calls: set[asyncio.Task[None]] = set()
        self.subscriptions: set[asyncio.Task[None]] = set()

    @staticmethod
    def _framed(response: Message | Encoded) -> bytes:
        return framed_message(encode(response))

    def __call__(self, conn: Http2Connection, stream: Stream) -> None:
        headers = stream.headers or {}
        if headers.get(b":method") != b"POST":
            conn.finish(stream, _http_refusal(b"405"))
            return
        if not headers.get(b"content-type", b"").startswith(b"application/grpc"):
            conn.finish(stream, _http_refusal(b"415"))
            return
        raw_path = headers.get(b":path", b"")
        path = raw_path.decode("latin-1")
        route = self._routes.get(raw_path)
        try:
            if route is None:
                raise RpcError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {path[:256]}")
            if stream.too_large:
                raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{path}: request larger than the limit")
            timeout = headers.get(b"grpc-timeout")
            deadline = parse_timeout(timeout) if timeout is not None else None
            request = _request_message(route, headers, stream.body, path)
        except RpcError as exc:
            event(log, logging.INFO, "rpc refused", method=path, code=exc.code.name, error=exc.details)
            conn.finish(stream, trailers_only(exc.code, exc.details))
            return
        stream.body = bytearray()
        if route.inline is not None:
            _inline(conn, stream, request, path, handler=route.inline, max_send=self._max_send)
            return
        check = partial(_sendable, conn, path, self._max_send)
        if route.unary is not None:
            run = _unary(
                conn, stream, request, handler=route.unary, framed=self._framed, check=check, deadline=deadline
            )
        else:
            run = _stream(conn, stream, route, request, check=check, deadline=deadline)
        task = asyncio.get_running_loop().create_task(run)
        stream.task = task
        running = self.subscriptions if route.subscription else self.calls
        running.add(task)
        task.add_done_callback(running.discard)


_STOPPED = (grpc.StatusCode.UNAVAILABLE, "criopy is shutting down")


def _sendable(conn: Http2Connection, path: str, max_send: int, message: bytes) -> None:
    """Refuses (RESOURCE_EXHAUSTED) an answer over the send limit, as grpcio's max_send_message_length
    does, and one the client has no room for: answers it has not read already fill the connection's share."""
    size = len(message) - MESSAGE_PREFIX.size
    if size > max_send:
        details = f"{path}: the answer ({size} bytes) is larger than the limit ({max_send} bytes)"
    elif not conn.room_for(len(message)):
        details = f"{path}: the client has not read the answers already sent ({conn.held_output()} bytes)"
    else:
        return
    event(log, logging.WARNING, "answer refused", method=path, code="RESOURCE_EXHAUSTED", error=details)
    raise RpcError(grpc.StatusCode.RESOURCE_EXHAUSTED, details)


def _end(conn: Http2Connection, stream: Stream, code: grpc.StatusCode, details: str, *, started: bool) -> None:
    """The call's status: in trailers after the answer's headers, or alone (trailers-only) before them."""
    conn.finish(stream, status_block(code, details) if started else trailers_only(code, details))


def _failure(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, RpcError):
        return exc.code, exc.details
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded"
    log.error("unexpected error in a call", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"


def _inline(
    conn: Http2Connection, stream: Stream, request: Message, path: str, *, handler: InlineHandler, max_send: int
) -> None:
    """A call that cannot wait, answered at once: it cannot outlive its deadline or be cancelled either.
    It runs in a context of its own, as a task would."""
    try:
        message = framed_message(encode(contextvars.copy_context().run(handler, request)))
        _sendable(conn, path, max_send, message)
    except Exception as exc:
        _end(conn, stream, *_failure(exc), started=False)
        return
    conn.respond(stream, RESPONSE_HEADERS, message, _OK_TRAILERS)


async def _unary(
    conn: Http2Connection,
    stream: Stream,
    request: Message,
    *,
    handler: UnaryHandler,
    framed: Callable[[Message | Encoded], bytes],
    check: Callable[[bytes], None],
    deadline: float | None,
) -> None:
    try:
        async with asyncio.timeout(deadline) as timeout:
            _DEADLINE.set(timeout)
            response = await handler(request)
        message = framed(response)
        check(message)
    except asyncio.CancelledError:
        # By the client (its stream is already closed: nothing is sent) or by the server's stop.
        _end(conn, stream, *_STOPPED, started=False)
        raise
    except Exception as exc:
        _end(conn, stream, *_failure(exc), started=False)
        return
    conn.respond(stream, RESPONSE_HEADERS, message, _OK_TRAILERS)


async def _stream(
    conn: Http2Connection,
    stream: Stream,
    route: Route,
    request: Message,
    *,
    check: Callable[[bytes], None],
    deadline: float | None,
) -> None:
    assert route.stream is not None
    started = False
    try:
        async with asyncio.timeout(deadline) as timeout:
            _DEADLINE.set(timeout)
            # Closed as the call ends, also when it is cancelled while a message waits to be sent.
            async with aclosing(route.stream(request)) as items:
                async for item in items:
                    message = framed_message(item.SerializeToString())
                    check(message)
                    if not started:
                        conn.send_headers(stream, RESPONSE_HEADERS)
                        started = True
                    conn.send_data(stream, message)
                    await conn.writable(stream)
    except asyncio.CancelledError:
        _end(conn, stream, *_STOPPED, started=started)
        raise
    except Exception as exc:
        _end(conn, stream, *_failure(exc), started=started)
        return
    _end(conn, stream, grpc.StatusCode.OK, "", started=started)
