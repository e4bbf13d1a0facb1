"""The little HTTP/1.1 the streaming server needs: one request head, then an upgrade or a short answer."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

MAX_HEAD = 64 * 1024
HEAD_TIMEOUT = 30.0


class BadRequest(Exception):
    pass


@dataclass(frozen=True)
class RequestHead:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: list[tuple[str, str]]  # names lower-case, in order, repeats kept
    raw: bytes  # the head as received (wsproto parses it again for the handshake)

    def get(self, name: str) -> str:
        return next((v for k, v in self.headers if k == name), "")

    def values(self, name: str) -> list[str]:
        """Every value of a header, comma-separated lists split (X-Stream-Protocol-Version may come either way)."""
        return [item.strip() for k, v in self.headers if k == name for item in v.split(",") if item.strip()]

    def upgrade(self) -> str:
        return self.get("upgrade").lower()


async def read_head(reader: asyncio.StreamReader) -> RequestHead:
    try:
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
    except asyncio.LimitOverrunError as exc:
        raise BadRequest("request head too large") from exc
    except asyncio.IncompleteReadError as exc:
        raise BadRequest("connection closed before the request head ended") from exc
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadRequest(f"not an HTTP/1.1 request line: {lines[0][:100]!r}")
    headers = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep:
            raise BadRequest(f"malformed header line: {line[:100]!r}")
        headers.append((name.strip().lower(), value.strip()))
    url = urlsplit(parts[1])
    return RequestHead(parts[0], url.path, parse_qs(url.query), headers, raw)


def response(status: HTTPStatus, body: str = "", headers: dict[str, str] | None = None) -> bytes:
    payload = body.encode()
    lines = [f"HTTP/1.1 {status.value} {status.phrase}"]
    all_headers = {"Content-Type": "text/plain; charset=utf-8", "Content-Length": str(len(payload))}
    all_headers |= headers or {}
    all_headers["Connection"] = all_headers.get("Connection", "close")
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


def switching(headers: dict[str, str]) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()
