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
from typing import TypeVar

from cri.system import offload

T = TypeVar("T")


async def in_fresh_thread(fn: Callable[[], T], name: str) -> T:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    thread = threading.Thread(target=offload.run_into, args=(loop, done, fn), name=name, daemon=True)
    # Thread.start waits until the new thread has run: on a busy daemon that is a wait for the GIL, which a
    # pool thread does instead of the event loop (it was 5% of the loop's samples in a 110-pod burst).
    try:
        await offload.to_thread(thread.start)
    except asyncio.CancelledError:
        done.cancel()  # the thread runs all the same; its outcome is nobody's
        raise
    return await done
