"""Kubernetes' remote-command protocol (exec and attach) over SPDY streams or WebSocket channels.

Versions, as the kubelet speaks them:
- `channel.k8s.io` (v1) and `v2.channel.k8s.io`: the error stream carries a text message, nothing on success;
- `v3.channel.k8s.io`: adds the `resize` stream, JSON `{"Width": w, "Height": h}` objects;
- `v4.channel.k8s.io`: the error stream carries a `metav1.Status` JSON, with the exit code as a
  `NonZeroExitCode` cause;
- `v5.channel.k8s.io`: v4 plus, on WebSocket, the close signal for stdin (over SPDY, a half-close does that).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from cri.streaming.spdy import SpdySession, SpdyStream
from cri.streaming.websocket import WebSocket

V1 = "channel.k8s.io"
V2 = "v2.channel.k8s.io"
V3 = "v3.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V5 = "v5.channel.k8s.io"
BASE64_V1 = "base64.channel.k8s.io"
BASE64_V4 = "v4.base64.channel.k8s.io"
SPDY_PROTOCOLS = (V5, V4, V3, V2, V1)
WEBSOCKET_PROTOCOLS = (V5, V4, BASE64_V4, V1, BASE64_V1)
STATUS_PROTOCOLS = (V4, V5, BASE64_V4)
STREAM_CREATION_TIMEOUT = 30.0

STDIN, STDOUT, STDERR, ERROR, RESIZE = 0, 1, 2, 3, 4


class Inbound(Protocol):
    async def read(self) -> bytes: ...


class Outbound(Protocol):
    async def write(self, data: bytes) -> None: ...
    async def close(self) -> None: ...


@dataclass(frozen=True)
class Wanted:
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool


@dataclass
class CommandStreams:
    protocol: str
    error: Outbound
    gone: Awaitable[None]  # done once the client's connection has ended
    stdin: Inbound | None = None
    stdout: Outbound | None = None
    stderr: Outbound | None = None
    resize: Inbound | None = None

    async def finish(self, exit_code: int | None, message: str = "") -> None:
        """Report how the command ended: exit code (None when it could not run, with `message`)."""
        with contextlib.suppress(ConnectionError):
            if self.protocol in STATUS_PROTOCOLS:
                await self.error.write(json.dumps(status(exit_code, message)).encode())
            elif exit_code != 0:
                await self.error.write((message or f"command terminated with non-zero exit code: {exit_code}").encode())
            await self.error.close()
            for out in (self.stdout, self.stderr):
                if out is not None:
                    await out.close()


def status(exit_code: int | None, message: str) -> dict[str, object]:
    """The metav1.Status the v4 clients decode from the error stream."""
    if exit_code == 0:
        return {"metadata": {}, "status": "Success"}
    if exit_code is None:
        return {
            "metadata": {},
            "status": "Failure",
            "message": message,
            "reason": "InternalError",
            "details": {"causes": [{"message": message}]},
            "code": 500,
        }
    return {
        "metadata": {},
        "status": "Failure",
        "message": f"command terminated with non-zero exit code: exit status {exit_code}",
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": str(exit_code)}]},
    }


def negotiate(offered: list[str], supported: tuple[str, ...]) -> str | None:
    """The first of the client's protocols we speak; "" when it offered none (legacy v1); None: no match."""
    if not offered:
        return ""
    return next((p for p in offered if p in supported), None)


def expected_streams(protocol: str, wanted: Wanted) -> set[str]:
    kinds = {"error"}
    if wanted.stdin:
        kinds.add("stdin")
    if wanted.stdout:
        kinds.add("stdout")
    if wanted.stderr and not wanted.tty:
        kinds.add("stderr")
    if wanted.tty and protocol in (V3, V4, V5):
        kinds.add("resize")
    return kinds


async def spdy_streams(
    session: SpdySession, served: asyncio.Task[None], protocol: str, wanted: Wanted
) -> CommandStreams:
    """Wait for the client to open the streams the request calls for."""
    expected = expected_streams(protocol, wanted)
    got: dict[str, SpdyStream] = {}
    async with asyncio.timeout(STREAM_CREATION_TIMEOUT):
        while not expected <= got.keys():
            stream = await session.accept()
            if stream is None:
                raise ConnectionError("the client went away before opening its streams")
            kind = stream.headers.get("streamtype", "")
            if kind not in expected or kind in got:
                stream.reset()
                raise ConnectionError(f"unexpected stream of type {kind!r}")
            got[kind] = stream
    return CommandStreams(
        protocol or V1,
        error=got["error"],
        gone=served,
        stdin=got.get("stdin"),
        stdout=got.get("stdout"),
        stderr=got.get("stderr"),
        resize=got.get("resize"),
    )


def websocket_streams(socket: WebSocket, served: asyncio.Task[None], protocol: str, wanted: Wanted) -> CommandStreams:
    return CommandStreams(
        protocol or V1,
        error=socket.outbound(ERROR),
        gone=served,
        stdin=socket.inbound(STDIN) if wanted.stdin else None,
        stdout=socket.outbound(STDOUT) if wanted.stdout else None,
        stderr=socket.outbound(STDERR) if wanted.stderr and not wanted.tty else None,
        resize=socket.inbound(RESIZE) if wanted.tty else None,
    )


async def resizes(inbound: Inbound) -> AsyncIterator[tuple[int, int]]:
    """(width, height) for each JSON object on the resize stream; objects may span reads."""
    decoder = json.JSONDecoder()
    buffer = ""
    while chunk := await inbound.read():
        buffer += chunk.decode(errors="replace")
        while True:
            buffer = buffer.lstrip()
            try:
                value, end = decoder.raw_decode(buffer)
            except ValueError:
                break
            buffer = buffer[end:]
            if isinstance(value, dict):
                yield int(value.get("Width", 0)), int(value.get("Height", 0))


class TerminalSizes:
    """The client's terminal size from the resize stream: the first one awaited before a TTY exec starts
    (runc gives the pty that size before the command runs, so a program that reads it at once, like
    `stty size`, sees the client's size and not 0x0), the later ones followed while the session lasts."""

    def __init__(self, inbound: Inbound) -> None:
        self._sizes = resizes(inbound)
        self._pending: asyncio.Future[tuple[int, int]] | None = None

    async def first(self, timeout: float) -> tuple[int, int] | None:
        """The first size, or None if the client sent none within `timeout` (it may still come later)."""
        self._pending = asyncio.ensure_future(anext(self._sizes))
        done, _ = await asyncio.wait({self._pending}, timeout=timeout)
        if not done or self._pending.cancelled() or self._pending.exception() is not None:
            return None  # still pending: follow() picks it up
        size, self._pending = self._pending.result(), None
        return size

    async def follow(self, apply: Callable[[int, int], None]) -> None:
        """Apply each size that arrives from now on (including one first() stopped waiting for)."""
        try:
            if self._pending is not None:
                apply(*await self._pending)
            async for width, height in self._sizes:
                apply(width, height)
        except StopAsyncIteration:
            pass  # the resize stream ended before a first size
        finally:
            self.close()

    def close(self) -> None:
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()
