"""The Kubernetes remote command and port-forward protocols, on the SPDY and WebSocket clients.

Facts this follows (client-go tools/remotecommand v1..v5.go, errorstream.go,
spdy.go, websocket.go; tools/portforward/portforward.go; the kubelet's
pkg/kubelet/cri/streaming/{remotecommand,portforward}; apimachinery
pkg/util/remotecommand/constants.go):

- Every SPDY stream carries one header, ``streamType`` (on the wire
  ``streamtype``): ``error``, ``stdin``, ``stdout``, ``stderr``, ``resize``;
  port-forward streams carry ``streamType`` (``error`` or ``data``), ``port``
  and ``requestID``.
- Exec/attach streams are created one after the other, each waiting for its
  SYN_REPLY: error, stdin (if wanted), stdout (if wanted), stderr (if wanted
  and not a tty), resize (tty only, v3 and later).
- v1 (``channel.k8s.io``, also what an unnegotiated "" means) never half-closes
  stdin and the server closes its own side of stdin at once; v2 half-closes
  stdin when the input ends; v3 adds the resize stream; v4 puts a JSON
  metav1.Status on the error stream instead of plain text; v5 is v4 on SPDY and
  adds, on WebSocket, the CLOSE signal ``[255, channel]``.
- An empty error stream means success in every version. v4 on success writes
  ``{"metadata":{},"status":"Success"}``; on a non-zero exit status
  ``Failure`` with reason ``NonZeroExitCode`` and a cause ``{"reason":
  "ExitCode", "message": "<code>"}``; v1-v3 write nothing on success and the
  error's text otherwise.
- WebSocket exec: one binary message per write, its first byte the channel
  (0 stdin, 1 stdout, 2 stderr, 3 error, 4 resize); the kubelet first sends an
  empty message on the lowest writable channel. ``base64.`` variants send text
  messages: the channel as an ASCII digit, then base64.
- WebSocket port-forward (kubelet: subprotocol ``v4.channel.k8s.io``,
  ``v4.base64.channel.k8s.io`` or none; not ``portforward.k8s.io``, which is
  the SPDY one): channel 2i is data and 2i+1 error for the i-th port, and the
  server first writes the port, 2 bytes little-endian, on both. The CRI
  server takes the ports from the PortForwardRequest, not from ``?ports=``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import ssl
from collections import defaultdict, deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tests.streamclients import DEFAULT_TIMEOUT, ProtocolError, deadline, spdy, websocket
from tests.streamclients.spdy import ClientStream, SessionOptions, SpdyClient
from tests.streamclients.websocket import WsClient

__all__ = [
    "ExecResult",
    "ExecStreams",
    "PortForwardSession",
    "WsExecSession",
    "WsPortForward",
    "exec_spdy",
    "exec_websocket",
    "http_over",
    "open_exec_streams",
    "open_exec_websocket",
    "portforward_spdy",
    "portforward_websocket",
]

V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
V4_BASE64 = "v4.base64.channel.k8s.io"
BASE64 = "base64.channel.k8s.io"
PORT_FORWARD_V1 = "portforward.k8s.io"

STREAM_TYPE = "streamType"
PORT_HEADER = "port"
REQUEST_ID_HEADER = "requestID"

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4
STREAM_CLOSE = 255  # v5 WebSocket: [255, channel] half-closes channel

NON_ZERO_EXIT = "NonZeroExitCode"
EXIT_CODE_CAUSE = "ExitCode"

_JSON_STATUS_PROTOCOLS = (V4, V5, V4_BASE64)
_RESIZE_PROTOCOLS = (V3, V4, V5)


# --- results ----------------------------------------------------------------------------------------------------


@dataclass
class ExecResult:
    protocol: str
    stdout: bytes
    stderr: bytes
    status: dict[str, Any] | None  # the decoded metav1.Status (v4 and later), None if the error stream was empty
    error_text: str  # the error stream as text, whatever the version

    def client_go_error(self) -> str | None:
        """What client-go's stream() would fail with; None is success (errorDecoderV2/V4)."""
        if not self.error_text:
            return None
        if self.protocol not in _JSON_STATUS_PROTOCOLS:
            return f"error executing remote command: {self.error_text}"
        if self.status is None:
            return f"error stream protocol error: not JSON: {self.error_text!r}"
        return self._status_error(self.status)

    def _status_error(self, status: dict[str, Any]) -> str | None:
        kind = status.get("status")
        if kind == "Success":
            return None
        if kind != "Failure":
            return "error stream protocol error: unknown error"
        if status.get("reason") != NON_ZERO_EXIT:
            return str(status.get("message", ""))
        code = self.exit_code
        return "error stream protocol error: no valid ExitCode cause" if code is None else f"exit code {code}"

    @property
    def exit_code(self) -> int | None:
        """0 when client-go sees success; the ExitCode cause of a NonZeroExitCode status; else None."""
        if not self.error_text or (self.status or {}).get("status") == "Success":
            return 0
        if self.status is None or self.status.get("reason") != NON_ZERO_EXIT:
            return None
        causes = (self.status.get("details") or {}).get("causes") or []
        for cause in causes:
            if cause.get("reason") == EXIT_CODE_CAUSE:
                message = str(cause.get("message", ""))
                return int(message) if message.isdigit() and int(message) < 256 else None
        return None


def _result(protocol: str, stdout: bytes, stderr: bytes, error: bytes) -> ExecResult:
    text = error.decode("utf-8", "replace")
    status = None
    if error and protocol in _JSON_STATUS_PROTOCOLS:
        with contextlib.suppress(ValueError):
            decoded = json.loads(text)
            status = decoded if isinstance(decoded, dict) else None
    return ExecResult(protocol, stdout, stderr, status, text)


def _resize_message(width: int, height: int) -> bytes:
    # client-go: json.NewEncoder(stream).Encode(&TerminalSize{Width, Height}); no json tags, so
    # the keys are the Go field names, and Encode ends the value with a newline.
    return json.dumps({"Width": width, "Height": height}, separators=(",", ":")).encode() + b"\n"


async def _pause(after: float | Awaitable[object] | None) -> None:
    """Hold stdin open: for a number of seconds, or until an awaitable completes."""
    if after is None:
        return
    if isinstance(after, (int, float)):
        await asyncio.sleep(after)
    else:
        await after


# --- exec / attach over SPDY ------------------------------------------------------------------------------------


@dataclass
class ExecStreams:
    """An exec or attach session over SPDY, streams created the way client-go creates them."""

    client: SpdyClient
    protocol: str
    error: ClientStream
    stdin: ClientStream | None = None
    stdout: ClientStream | None = None
    stderr: ClientStream | None = None
    resize: ClientStream | None = None
    timeout: float = DEFAULT_TIMEOUT
    stdin_error: str | None = None  # why feeding stdin stopped early (client-go only logs it)

    async def send_resize(self, width: int, height: int) -> None:
        if self.resize is None:
            raise RuntimeError(f"no resize stream (tty off, or protocol {self.protocol!r} predates v3)")
        await self.resize.write(_resize_message(width, height), self.timeout)

    async def send_stdin(self, data: bytes, *, close: bool = False) -> None:
        if self.stdin is None:
            raise RuntimeError("no stdin stream was opened")
        if data:
            await self.stdin.write(data, self.timeout)
        if close:
            await self.close_stdin()

    async def close_stdin(self) -> None:
        """Half-close stdin, as v2 and later do when the input ends; v1 never does."""
        if self.stdin is not None and not self.stdin.local_closed:
            await self.stdin.close(self.timeout)

    async def run(
        self,
        *,
        stdin: bytes | None = None,
        resize: tuple[int, int] | None = None,
        stdin_after: float | Awaitable[object] | None = None,
    ) -> ExecResult:
        """Feed stdin and read stdout/stderr concurrently until they end, then the error stream."""
        error_reader = asyncio.create_task(self.error.read_all(self.timeout))
        feeder: asyncio.Task[None] | None = None
        try:
            if resize is not None and self.resize is not None:
                await self.send_resize(*resize)
            if stdin is not None and self.stdin is not None:
                feeder = asyncio.create_task(self._feed(stdin, stdin_after))
            async with asyncio.TaskGroup() as group:  # client-go copies stdout and stderr concurrently
                stdout = group.create_task(self._drain(self.stdout))
                stderr = group.create_task(self._drain(self.stderr))
            error = await error_reader
            if feeder is not None:
                await deadline(feeder, self.timeout, "stdin to be written")
        finally:
            for task in (error_reader, feeder):
                if task is not None and not task.done():
                    task.cancel()
        return _result(self.protocol, stdout.result(), stderr.result(), error)

    async def _feed(self, data: bytes, after: float | Awaitable[object] | None) -> None:
        try:
            await self.send_stdin(data)
            await _pause(after)
            if self.protocol not in (V1, ""):  # v1 leaves stdin open (issues.k8s.io/13394)
                await self.close_stdin()
        except ConnectionError as exc:  # e.g. the server reset stdin once the command ended
            self.stdin_error = str(exc)

    async def _drain(self, stream: ClientStream | None) -> bytes:
        return b"" if stream is None else await stream.read_all(self.timeout)

    async def close(self) -> None:
        await self.client.close(timeout=self.timeout)

    def abort(self, *, rst: bool = False) -> None:
        self.client.abort(rst=rst)


async def open_exec_streams(
    url: str,
    *,
    stdin: bool = False,
    stdout: bool = True,
    stderr: bool = True,
    tty: bool = False,
    protocols: Sequence[str] = (V4, V3, V2, V1),
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    options: SessionOptions | None = None,
) -> ExecStreams:
    """Upgrade url and create the exec/attach streams; the flags must match the CRI request's."""
    client, protocol = await spdy.connect(url, protocols, ssl_context=ssl_context, timeout=timeout, options=options)
    try:
        streams = ExecStreams(client, protocol, await _open(client, "error", timeout), timeout=timeout)
        if stdin:
            streams.stdin = await _open(client, "stdin", timeout)
        if stdout:
            streams.stdout = await _open(client, "stdout", timeout)
        if stderr and not tty:  # client-go never asks for stderr with a tty
            streams.stderr = await _open(client, "stderr", timeout)
        if tty and protocol in _RESIZE_PROTOCOLS:
            streams.resize = await _open(client, "resize", timeout)
    except BaseException:
        await client.close(timeout=timeout)
        raise
    return streams


async def _open(client: SpdyClient, stream_type: str, timeout: float) -> ClientStream:
    return await client.open_stream({STREAM_TYPE: stream_type}, timeout=timeout)


async def exec_spdy(
    url: str,
    *,
    stdin: bytes | None = None,
    tty: bool = False,
    stdout: bool = True,
    stderr: bool = True,
    resize: tuple[int, int] | None = None,
    protocols: Sequence[str] = (V4, V3, V2, V1),
    stdin_after: float | Awaitable[object] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    options: SessionOptions | None = None,
) -> ExecResult:
    """Run an exec (or attach) URL to completion over SPDY, like client-go's SPDY executor.

    stdin None opens no stdin stream. stdin_after holds stdin open after the data is
    written (seconds, or an awaitable) before it is half-closed. Works for /attach/ too.
    """
    streams = await open_exec_streams(
        url,
        stdin=stdin is not None,
        stdout=stdout,
        stderr=stderr,
        tty=tty,
        protocols=protocols,
        ssl_context=ssl_context,
        timeout=timeout,
        options=options,
    )
    try:
        return await streams.run(stdin=stdin, resize=resize, stdin_after=stdin_after)
    finally:
        await streams.close()


# --- exec / attach over WebSocket -------------------------------------------------------------------------------


def _is_base64(protocol: str) -> bool:
    return protocol.startswith(BASE64) or protocol.endswith("." + BASE64)


def _encode_channel(protocol: str, channel: int, data: bytes) -> tuple[int, bytes]:
    if _is_base64(protocol):
        return websocket.TEXT, bytes([ord("0") + channel]) + base64.b64encode(data)
    return websocket.BINARY, bytes([channel]) + data


def _decode_channel(protocol: str, opcode: int, message: bytes) -> tuple[int, bytes]:
    if not message:
        # client-go's readDemuxLoop fails the whole session on a message without its channel byte.
        raise ProtocolError("WebSocket message without a channel byte")
    if not _is_base64(protocol):
        if opcode != websocket.BINARY:
            raise ProtocolError(f"{opcode=} message on binary protocol {protocol!r} (client-go rejects it)")
        return message[0], message[1:]
    try:
        return message[0] - ord("0"), base64.b64decode(message[1:], validate=True)
    except binascii.Error as exc:
        raise ProtocolError(f"bad base64 on {protocol}: {exc}") from None


@dataclass
class WsExecSession:
    """An exec or attach session over WebSocket, channel-multiplexed."""

    ws: WsClient
    protocol: str
    timeout: float = DEFAULT_TIMEOUT
    empty_messages: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # channel -> count
    unknown_channels: list[int] = field(default_factory=list)
    stdin_error: str | None = None  # why feeding stdin stopped early

    async def send(self, channel: int, data: bytes) -> None:
        opcode, message = _encode_channel(self.protocol, channel, data)
        await self.ws.send_message(opcode, message, self.timeout)

    async def send_stdin(self, data: bytes) -> None:
        await self.send(STDIN, data)

    async def close_stdin(self) -> None:
        """v5's CLOSE signal for stdin. v4 and older have no way to end stdin but closing the connection."""
        if self.protocol != V5:
            raise RuntimeError(f"{self.protocol!r} cannot half-close stdin; only {V5} has the CLOSE signal")
        await self.ws.send_binary(bytes([STREAM_CLOSE, STDIN]), self.timeout)

    async def send_resize(self, width: int, height: int) -> None:
        await self.send(RESIZE, _resize_message(width, height))

    async def recv(self, timeout: float | None = None) -> tuple[int, bytes] | None:
        """The next (channel, payload), skipping the zero-length ones; None once the server closed."""
        while True:
            message = await self.ws.recv_message(timeout or self.timeout)
            if message is None:
                return None
            channel, payload = _decode_channel(self.protocol, *message)
            if channel not in (STDOUT, STDERR, ERROR):
                self.unknown_channels.append(channel)  # client-go logs and discards these
                continue
            if not payload:
                self.empty_messages[channel] += 1  # the kubelet's "connection established" message
                continue
            return channel, payload

    async def collect(self) -> ExecResult:
        """Read stdout, stderr and error until the server closes the connection."""
        buffers: dict[int, bytearray] = {STDOUT: bytearray(), STDERR: bytearray(), ERROR: bytearray()}

        async def until_closed() -> None:
            while (item := await self.recv(timeout=float("inf"))) is not None:
                buffers[item[0]] += item[1]

        await deadline(until_closed(), self.timeout, "the server to end the WebSocket exec session")
        return _result(self.protocol, bytes(buffers[STDOUT]), bytes(buffers[STDERR]), bytes(buffers[ERROR]))

    async def run(
        self,
        *,
        stdin: bytes | None = None,
        resize: tuple[int, int] | None = None,
        stdin_after: float | Awaitable[object] | None = None,
    ) -> ExecResult:
        if resize is not None:
            await self.send_resize(*resize)
        feeder = asyncio.create_task(self._feed(stdin, stdin_after)) if stdin is not None else None
        try:
            result = await self.collect()
            if feeder is not None:
                await deadline(feeder, self.timeout, "stdin to be written")
        finally:
            if feeder is not None and not feeder.done():
                feeder.cancel()
        return result

    async def _feed(self, data: bytes, after: float | Awaitable[object] | None) -> None:
        try:
            for start in range(0, len(data), spdy.COPY_CHUNK):  # io.Copy's chunks, one message each
                await self.send_stdin(data[start : start + spdy.COPY_CHUNK])
            await _pause(after)
            if self.protocol == V5:
                await self.close_stdin()
        except ConnectionError as exc:
            self.stdin_error = str(exc)

    async def close(self) -> None:
        await self.ws.close(timeout=self.timeout)

    def abort(self, *, rst: bool = False) -> None:
        self.ws.abort(rst=rst)


async def open_exec_websocket(
    url: str,
    *,
    subprotocols: Sequence[str] = (V5, V4),
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_frame_payload: int | None = None,
) -> WsExecSession:
    ws, protocol = await websocket.connect(
        url, subprotocols, ssl_context=ssl_context, timeout=timeout, max_frame_payload=max_frame_payload
    )
    return WsExecSession(ws, protocol, timeout)


async def exec_websocket(
    url: str,
    *,
    stdin: bytes | None = None,
    tty: bool = False,
    stdout: bool = True,
    stderr: bool = True,
    resize: tuple[int, int] | None = None,
    subprotocols: Sequence[str] = (V5, V4),
    stdin_after: float | Awaitable[object] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_frame_payload: int | None = None,
) -> ExecResult:
    """Run an exec (or attach) URL to completion over WebSocket.

    tty, stdout and stderr do not change the wire (the server's channels follow the CRI
    request); they are accepted for symmetry with exec_spdy. On v5 stdin is half-closed with
    the CLOSE signal; on v4 it stays open until the server ends the session.
    """
    del tty, stdout, stderr
    session = await open_exec_websocket(
        url, subprotocols=subprotocols, ssl_context=ssl_context, timeout=timeout, max_frame_payload=max_frame_payload
    )
    try:
        return await session.run(stdin=stdin, resize=resize, stdin_after=stdin_after)
    finally:
        await session.close()


# --- port-forward over SPDY -------------------------------------------------------------------------------------


@dataclass
class PortForwardSession:
    """A port-forward connection over SPDY; each open() is one forwarded connection, like client-go's."""

    client: SpdyClient
    protocol: str
    timeout: float = DEFAULT_TIMEOUT
    next_request_id: int = 0  # client-go counts from 0

    async def open(
        self, port: int, *, close_error_stream: bool = True, request_id: int | None = None
    ) -> tuple[ClientStream, ClientStream]:
        """Create the error stream, then the data stream, with the same port and requestID.

        client-go half-closes the error stream at once ("we're not writing to this stream").
        """
        if request_id is None:
            request_id = self.next_request_id
            self.next_request_id += 1
        headers = {STREAM_TYPE: "error", PORT_HEADER: str(port), REQUEST_ID_HEADER: str(request_id)}
        error = await self.client.open_stream(headers, timeout=self.timeout)
        if close_error_stream:
            await error.close(self.timeout)
        data = await self.client.open_stream({**headers, STREAM_TYPE: "data"}, timeout=self.timeout)
        return data, error

    async def close(self) -> None:
        await self.client.close(timeout=self.timeout)

    def abort(self, *, rst: bool = False) -> None:
        self.client.abort(rst=rst)


async def portforward_spdy(
    url: str,
    *,
    protocols: Sequence[str] = (PORT_FORWARD_V1,),
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    options: SessionOptions | None = None,
) -> PortForwardSession:
    client, protocol = await spdy.connect(url, protocols, ssl_context=ssl_context, timeout=timeout, options=options)
    return PortForwardSession(client, protocol, timeout)


# --- port-forward over WebSocket --------------------------------------------------------------------------------


class _Channel:
    """One port's data channel of a WsPortForward, as a readable/writable byte stream."""

    def __init__(self, owner: WsPortForward, index: int):
        self._owner = owner
        self._index = index

    async def write(self, data: bytes, timeout: float | None = None) -> None:
        await self._owner.send(self._index, data)

    async def read(self, timeout: float | None = None) -> bytes:
        return await self._owner.recv_data(self._index, timeout)


@dataclass
class WsPortForward:
    """The kubelet's WebSocket port-forward: channels 2i (data) and 2i+1 (error) per port."""

    ws: WsClient
    protocol: str
    ports: list[int]
    timeout: float = DEFAULT_TIMEOUT
    # Whether each channel's port prefix came as a message of its own (the kubelet's way).
    prefix_alone: dict[int, bool] = field(default_factory=dict)
    _pending: dict[int, deque[bytes]] = field(default_factory=lambda: defaultdict(deque))
    _unchecked: dict[int, bytes] = field(default_factory=dict)  # channel -> prefix bytes still expected
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _closed: bool = False

    def __post_init__(self) -> None:
        for index, port in enumerate(self.ports):
            prefix = port.to_bytes(2, "little")
            self._unchecked[2 * index] = prefix
            self._unchecked[2 * index + 1] = prefix

    def channel(self, port_index: int) -> _Channel:
        return _Channel(self, port_index)

    async def send(self, port_index: int, data: bytes) -> None:
        opcode, message = _encode_channel(self.protocol, 2 * port_index, data)
        await self.ws.send_message(opcode, message, self.timeout)

    async def recv_data(self, port_index: int, timeout: float | None = None) -> bytes:
        """The next data payload for the port; b"" once the server closed the connection."""
        return await self._recv(2 * port_index, timeout, f"data for port {self.ports[port_index]}")

    async def recv_error(self, port_index: int, timeout: float | None = None) -> bytes:
        return await self._recv(2 * port_index + 1, timeout, f"the error channel of port {self.ports[port_index]}")

    async def read_error_all(self, port_index: int, timeout: float | None = None) -> bytes:
        async def drain() -> bytes:
            parts = []
            while part := await self.recv_error(port_index, float("inf")):
                parts.append(part)
            return b"".join(parts)

        return await deadline(drain(), timeout or self.timeout, f"the end of port {self.ports[port_index]}'s errors")

    async def _recv(self, channel: int, timeout: float | None, what: str) -> bytes:
        async def wait() -> bytes:
            while not self._pending[channel]:
                if self._closed:
                    return b""
                async with self._lock:  # one reader of the socket; the others wait for their channel
                    if not self._pending[channel] and not self._closed:
                        await self._pull()
            return self._pending[channel].popleft()

        return await deadline(wait(), timeout or self.timeout, what)

    async def _pull(self) -> None:
        message = await self.ws.recv_message(float("inf"))
        if message is None:
            self._closed = True
            return
        channel, payload = _decode_channel(self.protocol, *message)
        payload = self._strip_prefix(channel, payload)
        if payload:
            self._pending[channel].append(payload)

    def _strip_prefix(self, channel: int, payload: bytes) -> bytes:
        """Check and remove the port the server writes first on every channel."""
        expected = self._unchecked.get(channel)
        if expected is None:
            return payload
        self.prefix_alone.setdefault(channel, len(payload) == len(expected))
        got, rest = payload[: len(expected)], payload[len(expected) :]
        if not expected.startswith(got):
            raise ProtocolError(f"channel {channel} starts with {got!r}, expected the port {expected!r}")
        remaining = expected[len(got) :]
        if remaining:
            self._unchecked[channel] = remaining
        else:
            del self._unchecked[channel]
        return rest

    async def close(self) -> None:
        await self.ws.close(timeout=self.timeout)

    def abort(self, *, rst: bool = False) -> None:
        self.ws.abort(rst=rst)


async def portforward_websocket(
    url: str,
    ports: Sequence[int],
    *,
    subprotocols: Sequence[str] = (V4,),
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> WsPortForward:
    """Open the kubelet-style WebSocket port-forward; ports in the order of the CRI request's."""
    ws, protocol = await websocket.connect(url, subprotocols, ssl_context=ssl_context, timeout=timeout)
    return WsPortForward(ws, protocol, list(ports), timeout)


# --- helpers ----------------------------------------------------------------------------------------------------


class ByteStream(Protocol):
    async def write(self, data: bytes, timeout: float | None = None) -> None: ...

    async def read(self, timeout: float | None = None) -> bytes: ...


async def http_over(stream: ByteStream, request: bytes, *, timeout: float = DEFAULT_TIMEOUT) -> bytes:
    """Write an HTTP request on a forwarded stream and read the response until the stream ends.

    Send ``Connection: close`` so the server ends the connection after its response.
    Works with a SPDY data stream and with WsPortForward.channel(i).
    """

    async def exchange() -> bytes:
        await stream.write(request, timeout)
        parts = []
        while chunk := await stream.read(float("inf")):
            parts.append(chunk)
        return b"".join(parts)

    return await deadline(exchange(), timeout, "the HTTP response over the forwarded stream")
