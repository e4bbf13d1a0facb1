"""Work that needs other namespaces, done in a throwaway thread.

Linux keeps the net, ipc and uts namespaces per thread: a thread may enter or
unshare them without moving the rest of the daemon. Each call gets a fresh
thread that exits afterwards, so a namespace can never leak into a pool
thread or the event loop, even if returning to the host's fails.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def in_fresh_thread(fn: Callable[[], T], name: str) -> T:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()

    def settle(outcome: tuple[bool, Any]) -> None:
        if done.done():  # the awaiting coroutine was cancelled
            return
        ok, value = outcome
        if ok:
            done.set_result(value)
        else:
            done.set_exception(value)

    def run() -> None:
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome = (False, exc)
        loop.call_soon_threadsafe(settle, outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await done
