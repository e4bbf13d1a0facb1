"""Waiting on the event loop for a raw file descriptor (a pidfd, a pty) to become readable or writable."""

from __future__ import annotations

import asyncio


async def ready(fd: int, *, write: bool = False) -> None:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not done.done():
            done.set_result(None)

    (loop.add_writer if write else loop.add_reader)(fd, wake)
    try:
        await done
    finally:
        (loop.remove_writer if write else loop.remove_reader)(fd)
