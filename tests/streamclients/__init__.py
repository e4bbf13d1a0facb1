"""Wire-level clients for the CRI streaming server (exec, attach, port-forward).

These talk SPDY/3.1 and WebSocket on the socket themselves, written from the
protocol sources (moby/spdystream, client-go tools/remotecommand and
tools/portforward, the kubelet's streaming server, RFC 6455), and share no code
with ``cri.streaming``: a bug in the server cannot be mirrored by the client.

This module holds what the SPDY and WebSocket clients share: the error raised
when the server refuses the upgrade, the deadline helper every network wait
goes through, and the small HTTP/1.1 exchange both upgrades start with.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_TIMEOUT",
    "ProtocolError",
    "ResponseHead",
    "Target",
    "UpgradeRefused",
    "deadline",
    "open_http",
    "parse_url",
    "read_body",
    "read_response_head",
    "refuse",
]

T = TypeVar("T")

# Every network wait is bounded; 30 s is also client-go's stream creation timeout.
DEFAULT_TIMEOUT = 30.0

# A response head larger than this is a server bug, not something to buffer.
_MAX_HEAD = 64 * 1024


class UpgradeRefused(Exception):
    """The server answered the upgrade request with something other than 101."""

    def __init__(self, status: int, body: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(f"upgrade refused: HTTP {status}: {body.strip()[:500]}")
        self.status = status
        self.body = body
        self.headers = headers or []


class ProtocolError(Exception):
    """The server broke the protocol (bad handshake, malformed frame, ...)."""


async def deadline(aw: Awaitable[T], timeout: float | None, what: str) -> T:
    """Await aw for at most timeout seconds; the TimeoutError names what was awaited."""
    limit = DEFAULT_TIMEOUT if timeout is None else timeout
    if limit == math.inf:  # an inner wait whose caller bounds the whole
        return await aw
    try:
        return await asyncio.wait_for(aw, limit)
    except TimeoutError:
        raise TimeoutError(f"timed out after {limit:g} s waiting for {what}") from None


@dataclass(frozen=True)
class Target:
    """Where a URL points: how to connect, and what to put on the request line."""

    scheme: str
    host: str
    port: int
    request_target: str  # path and query, as sent on the request line

    @property
    def tls(self) -> bool:
        return self.scheme in ("https", "wss")

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls else 80
        return host if self.port == default else f"{host}:{self.port}"


def parse_url(url: str) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
        raise ValueError(f"not an http(s)/ws(s) URL: {url!r}")
    tls = parts.scheme in ("https", "wss")
    port = parts.port or (443 if tls else 80)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Target(parts.scheme, parts.hostname, port, target)


async def open_http(
    url: str, ssl_context: ssl.SSLContext | None, timeout: float | None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Target]:
    """Open the TCP (or TLS) connection a URL points to."""
    target = parse_url(url)
    tls: ssl.SSLContext | None = None
    if target.tls:
        tls = ssl_context or ssl.create_default_context()
    opening = asyncio.open_connection(
        target.host, target.port, ssl=tls, server_hostname=target.host if tls else None, limit=_MAX_HEAD
    )
    reader, writer = await deadline(opening, timeout, f"connecting to {target.host}:{target.port}")
    return reader, writer, target


@dataclass
class ResponseHead:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def get_all(self, name: str) -> list[str]:
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    def get(self, name: str) -> str | None:
        values = self.get_all(name)
        return values[0] if values else None

    def has_token(self, name: str, token: str) -> bool:
        """Whether a comma-separated header (Connection, Upgrade) lists token, case-insensitively."""
        tokens = (part.strip().lower() for value in self.get_all(name) for part in value.split(","))
        return token.lower() in tokens


async def read_response_head(reader: asyncio.StreamReader, timeout: float | None, what: str) -> ResponseHead:
    try:
        raw = await deadline(reader.readuntil(b"\r\n\r\n"), timeout, f"the response head to {what}")
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(f"connection closed before the response head to {what}: {exc.partial!r}") from None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"response head to {what} is larger than {_MAX_HEAD} bytes") from None
    status_line, *lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ProtocolError(f"bad status line in the response to {what}: {status_line!r}")
    head = ResponseHead(int(code), reason)
    for line in lines:
        if line:
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"bad header line in the response to {what}: {line!r}")
            head.headers.append((name.strip(), value.strip()))
    return head


async def read_body(reader: asyncio.StreamReader, head: ResponseHead, timeout: float | None) -> bytes:
    """The body of a (non-upgrade) response: by Content-Length, chunked, or until EOF."""
    length = head.get("Content-Length")
    if (head.get("Transfer-Encoding") or "").lower() == "chunked":
        return await deadline(_read_chunked(reader), timeout, "the chunked response body")
    if length is not None:
        return await deadline(reader.readexactly(int(length)), timeout, "the response body")
    return await deadline(reader.read(), timeout, "the response body (until EOF)")


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")  # no trailers expected from these servers
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


async def refuse(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, head: ResponseHead, timeout: float | None
) -> NoReturn:
    """Read the refusal's body, close the connection and raise UpgradeRefused."""
    try:
        body = await read_body(reader, head, timeout)
    except (asyncio.IncompleteReadError, ConnectionError) as exc:
        body = exc.partial if isinstance(exc, asyncio.IncompleteReadError) else b""
    finally:
        writer.close()
    raise UpgradeRefused(head.status, body.decode("utf-8", "replace"), head.headers)
