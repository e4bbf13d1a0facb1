"""Moving bytes: between a client's streams and a process's pipes, its pty, or a socket."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Awaitable, Callable

from cri.system import fdwait

Reader = Callable[[], Awaitable[bytes]]
Writer = Callable[[bytes], Awaitable[None]]
READ_SIZE = 65536


async def pump(read: Reader, write: Writer, at_end: Callable[[], Awaitable[None]] | None = None) -> None:
    """Copy until the reader ends (b"") or the writer's side is gone; then `at_end`."""
    try:
        while data := await read():
            await write(data)
    except (ConnectionError, BrokenPipeError):
        pass
    finally:
        if at_end is not None:
            with contextlib.suppress(ConnectionError, OSError):
                await at_end()


def stream_writer(writer: asyncio.StreamWriter) -> tuple[Writer, Callable[[], Awaitable[None]]]:
    """write() and close() of a process's stdin pipe."""

    async def write(data: bytes) -> None:
        writer.write(data)
        await writer.drain()

    async def close() -> None:
        writer.close()

    return write, close


def stream_reader(reader: asyncio.StreamReader) -> Reader:
    async def read() -> bytes:
        return await reader.read(READ_SIZE)

    return read


class Pty:
    """The master side of a pty, non-blocking on the event loop; EIO (every slave closed) reads as the end."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        os.set_blocking(fd, False)

    async def read(self) -> bytes:
        while True:
            try:
                return os.read(self._fd, READ_SIZE)
            except BlockingIOError:
                await fdwait.ready(self._fd)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    return b""
                raise

    async def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                await fdwait.ready(self._fd, write=True)
