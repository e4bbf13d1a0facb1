"""An RFC 6455 WebSocket client, behaving like gorilla/websocket as client-go uses it.

- The handshake is a GET with ``Upgrade: websocket``, ``Connection: Upgrade``,
  a random 16-byte ``Sec-WebSocket-Key``, ``Sec-WebSocket-Version: 13`` and the
  subprotocols in one ``Sec-WebSocket-Protocol`` line, comma separated (the
  kubelet's golang.org/x/net/websocket server reads only the first line).
  The server's ``Sec-WebSocket-Accept`` must be base64(SHA-1(key + GUID)).
- Client frames are masked with a fresh random key; server frames must not be.
- A data message may come in fragments, with control frames between them.
  A PING is answered with a PONG carrying its payload; a CLOSE is answered with
  a CLOSE (gorilla's default close handler), after which recv() returns None.
- client-go sends each stream write as one binary message; with
  ``max_frame_payload`` set, messages go out fragmented instead, to test a
  server's reassembly.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import socket
import ssl
import struct
from collections.abc import Sequence

from tests.streamclients import (
    DEFAULT_TIMEOUT,
    ProtocolError,
    deadline,
    open_http,
    read_response_head,
    refuse,
)

__all__ = ["GUID", "WsClient", "accept_key", "connect", "encode_frame", "mask"]

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

CONTINUATION = 0x0
TEXT = 0x1
BINARY = 0x2
CLOSE = 0x8
PING = 0x9
PONG = 0xA
DATA_OPCODES = (TEXT, BINARY)
CONTROL_OPCODES = (CLOSE, PING, PONG)

CLOSE_NORMAL = 1000
CLOSE_PROTOCOL_ERROR = 1002
CLOSE_NO_STATUS = 1005  # never on the wire: a CLOSE frame without a payload


def accept_key(key: str) -> str:
    """The Sec-WebSocket-Accept a server must answer key with (RFC 6455 section 4.2.2)."""
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def mask(key: bytes, payload: bytes) -> bytes:
    """XOR payload with the 4-byte masking key (the operation is its own inverse)."""
    if not payload:
        return b""
    repeated = (key * (len(payload) // 4 + 1))[: len(payload)]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(len(payload), "big")


def encode_frame(opcode: int, payload: bytes, *, fin: bool = True, masking_key: bytes | None = None) -> bytes:
    """One frame; masked when masking_key is given (always, from a client)."""
    head = bytes([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if masking_key is not None else 0
    size = len(payload)
    if size < 126:
        head += bytes([mask_bit | size])
    elif size < 1 << 16:
        head += bytes([mask_bit | 126]) + struct.pack(">H", size)
    else:
        head += bytes([mask_bit | 127]) + struct.pack(">Q", size)
    if masking_key is None:
        return head + payload
    return head + masking_key + mask(masking_key, payload)


class WsClient:
    """A client WebSocket connection.

    recv() is meant for one reader at a time, and reads the socket itself: control
    frames are answered while it runs. A recv() that times out in the middle of a
    frame leaves the connection unusable; that is a failed test anyway.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        subprotocol: str,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_frame_payload: int | None = None,
    ):
        self._reader = reader
        self._writer = writer
        self.subprotocol = subprotocol
        self.timeout = timeout
        self.max_frame_payload = max_frame_payload
        self.close_code: int | None = None  # from the server's CLOSE; CLOSE_NO_STATUS if it had none
        self.close_reason = ""
        self.close_received = False
        self.close_sent = False
        self.eof = False  # the connection ended (with or without a CLOSE)
        self.pongs: list[bytes] = []
        self.pings_answered = 0
        self.last_opcode: int | None = None  # of the last message recv() returned

    # -- sending --

    async def _write(self, data: bytes, what: str, timeout: float | None) -> None:
        if self._writer.is_closing():
            raise ConnectionError(f"cannot send {what}: the connection is closed")
        self._writer.write(data)
        await deadline(self._writer.drain(), timeout if timeout is not None else self.timeout, f"sending {what}")

    async def send_frame(self, opcode: int, payload: bytes, *, fin: bool = True, timeout: float | None = None) -> None:
        """One masked frame, exactly as given (for tests that build messages by hand)."""
        frame = encode_frame(opcode, payload, fin=fin, masking_key=os.urandom(4))
        await self._write(frame, f"a WebSocket frame (opcode {opcode})", timeout)

    async def send_message(self, opcode: int, payload: bytes, timeout: float | None = None) -> None:
        if self.close_sent:
            raise ConnectionError("cannot send a message after CLOSE")
        size = self.max_frame_payload
        if not size or len(payload) <= size:
            await self.send_frame(opcode, payload, timeout=timeout)
            return
        pieces = [payload[i : i + size] for i in range(0, len(payload), size)]
        frames = b"".join(
            encode_frame(opcode if i == 0 else CONTINUATION, piece, fin=i == len(pieces) - 1, masking_key=os.urandom(4))
            for i, piece in enumerate(pieces)
        )
        await self._write(frames, f"a message fragmented into {len(pieces)} frames", timeout)

    async def send_binary(self, payload: bytes, timeout: float | None = None) -> None:
        await self.send_message(BINARY, payload, timeout)

    async def send_text(self, text: str | bytes, timeout: float | None = None) -> None:
        await self.send_message(TEXT, text.encode() if isinstance(text, str) else text, timeout)

    async def send_ping(self, payload: bytes = b"", timeout: float | None = None) -> None:
        await self.send_frame(PING, payload, timeout=timeout)

    async def send_close(self, code: int | None = CLOSE_NORMAL, reason: str = "", timeout: float | None = None) -> None:
        """Send CLOSE (once); code None sends one without a status."""
        if self.close_sent:
            return
        self.close_sent = True
        payload = b"" if code is None else struct.pack(">H", code) + reason.encode()
        with contextlib.suppress(ConnectionError):
            await self.send_frame(CLOSE, payload, timeout=timeout)

    # -- receiving --

    async def recv(self, timeout: float | None = None) -> bytes | None:
        """The next data message's payload, or None once the connection is closed."""
        message = await self.recv_message(timeout)
        return None if message is None else message[1]

    async def recv_message(self, timeout: float | None = None) -> tuple[int, bytes] | None:
        """The next data message as (opcode, payload), or None after CLOSE or EOF."""
        if self.close_received or self.eof:
            return None
        message = await deadline(self._assemble(), timeout or self.timeout, "a WebSocket message")
        if message is not None:
            self.last_opcode = message[0]
        return message

    async def _assemble(self) -> tuple[int, bytes] | None:
        """Read frames until a whole data message, answering control frames on the way."""
        opcode: int | None = None
        parts: list[bytes] = []
        while True:
            frame = await self._read_frame()
            if frame is None:
                return None
            fin, op, payload = frame
            if op in CONTROL_OPCODES:
                if not await self._on_control(fin, op, payload):
                    return None
                continue
            opcode = self._next_opcode(opcode, op)
            parts.append(payload)
            if fin:
                data = b"".join(parts)
                if opcode == TEXT:
                    self._check_utf8(data)
                return opcode, data

    def _next_opcode(self, current: int | None, op: int) -> int:
        if op == CONTINUATION:
            if current is None:
                raise ProtocolError("continuation frame without a message to continue")
            return current
        if op not in DATA_OPCODES:
            raise ProtocolError(f"reserved opcode {op:#x}")
        if current is not None:
            raise ProtocolError("new data message started inside a fragmented one")
        return op

    @staticmethod
    def _check_utf8(data: bytes) -> None:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError(f"text message is not UTF-8: {exc}") from None

    async def _on_control(self, fin: bool, op: int, payload: bytes) -> bool:
        """Handle a control frame; False when it was the CLOSE."""
        if not fin or len(payload) > 125:
            raise ProtocolError(f"control frame {op:#x} fragmented or longer than 125 bytes")
        if op == PING:
            self.pings_answered += 1
            with contextlib.suppress(ConnectionError):
                await self.send_frame(PONG, payload)
            return True
        if op == PONG:
            self.pongs.append(payload)
            return True
        self._record_close(payload)
        await self.send_close(self.close_code if self.close_code != CLOSE_NO_STATUS else None)
        return False

    def _record_close(self, payload: bytes) -> None:
        self.close_received = True
        if len(payload) == 1:
            raise ProtocolError("CLOSE frame with a 1-byte payload")
        if not payload:
            self.close_code = CLOSE_NO_STATUS
            return
        (self.close_code,) = struct.unpack(">H", payload[:2])
        self.close_reason = payload[2:].decode("utf-8", "replace")

    async def _read_frame(self) -> tuple[bool, int, bytes] | None:
        """(fin, opcode, payload) of the next frame, or None at EOF."""
        try:
            first, second = await self._reader.readexactly(2)
            size = second & 0x7F
            if size == 126:
                (size,) = struct.unpack(">H", await self._reader.readexactly(2))
            elif size == 127:
                (size,) = struct.unpack(">Q", await self._reader.readexactly(8))
            if second & 0x80:
                raise ProtocolError("the server masked a frame (RFC 6455 section 5.1 forbids it)")
            if first & 0x70:
                raise ProtocolError(f"RSV bits {first & 0x70:#x} set without a negotiated extension")
            payload = await self._reader.readexactly(size)
        except (asyncio.IncompleteReadError, ConnectionError):
            self.eof = True
            return None
        return bool(first & 0x80), first & 0x0F, payload

    # -- closing --

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "", timeout: float | None = None) -> None:
        """The closing handshake: send CLOSE, read until the server's CLOSE or EOF, close the socket."""
        try:
            await self.send_close(code, reason, timeout)
            await deadline(self._drain_until_closed(), timeout or self.timeout, "the server's CLOSE")
        except (ConnectionError, TimeoutError, ProtocolError):
            pass  # closing anyway; the caller can look at close_received
        finally:
            await self._close_socket()

    async def _drain_until_closed(self) -> None:
        while not self.close_received and not self.eof:
            await self._assemble()

    async def _close_socket(self) -> None:
        self._writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError, ssl.SSLError):
            await deadline(self._writer.wait_closed(), 5, "the socket to close")

    def abort(self, *, rst: bool = False) -> None:
        """Drop the connection without a CLOSE; with rst the kernel sends a TCP RST."""
        if rst:
            sock = self._writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self._writer.transport.abort()
        self.eof = True


async def connect(
    url: str,
    subprotocols: Sequence[str],
    *,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    max_frame_payload: int | None = None,
) -> tuple[WsClient, str]:
    """Open a WebSocket to url (http(s) or ws(s)); returns the client and the chosen subprotocol.

    A status other than 101 raises UpgradeRefused; a 101 with a wrong accept key, missing
    upgrade headers, or a subprotocol that was not offered raises ProtocolError.
    """
    reader, writer, target = await open_http(url, ssl_context, timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [
        f"GET {target.request_target} HTTP/1.1",
        f"Host: {target.host_header}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    try:
        await deadline(writer.drain(), timeout, "sending the WebSocket handshake")
        head = await read_response_head(reader, timeout, f"the WebSocket handshake of {target.request_target}")
    except BaseException:
        writer.close()
        raise
    if head.status != 101:
        await refuse(reader, writer, head, timeout)
    chosen = head.get("Sec-WebSocket-Protocol") or ""
    problem = _handshake_problem(head.get("Sec-WebSocket-Accept"), accept_key(key), chosen, subprotocols)
    if problem is None and not (head.has_token("Upgrade", "websocket") and head.has_token("Connection", "upgrade")):
        problem = f"101 without Upgrade: websocket / Connection: Upgrade: {head.headers}"
    if problem is not None:
        writer.close()
        raise ProtocolError(problem)
    return WsClient(reader, writer, chosen, timeout=timeout, max_frame_payload=max_frame_payload), chosen


def _handshake_problem(accept: str | None, expected: str, chosen: str, offered: Sequence[str]) -> str | None:
    if accept != expected:
        return f"Sec-WebSocket-Accept is {accept!r}, expected {expected!r}"
    if chosen and chosen not in offered:
        return f"server chose subprotocol {chosen!r}, which was not offered ({list(offered)})"
    return None
