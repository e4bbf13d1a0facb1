"""A blocking call run in a pool thread, its outcome handed to the caller's event loop.

What asyncio's run_in_executor does, with the hand-over left to the embedding program (`Deliver`): by
default one call_soon_threadsafe per outcome; criopy passes its own, which wakes its loop once for all
the outcomes that arrive before the loop runs (cri.system.offload).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from concurrent.futures import Executor
from typing import Any, TypeVar

T = TypeVar("T")

# From a pool thread: settle the future (on its loop) with the result, or with the exception when not None.
Deliver = Callable[[asyncio.AbstractEventLoop, "asyncio.Future[Any]", Any, BaseException | None], None]


def in_pool(pool: Executor, call: Callable[[], T], deliver: Deliver | None = None) -> asyncio.Future[T]:
    """call() in a thread of `pool`; the future it settles, on the running loop. An outcome nobody awaits
    any more (the caller was cancelled) is retrieved, so that asyncio does not log it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    future.add_done_callback(_retrieved)
    pool.submit(run_and_deliver, call, loop, future, deliver or call_soon_threadsafe)
    return future


def run_and_deliver(
    call: Callable[[], Any], loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], deliver: Deliver
) -> None:
    """In the calling thread: call(), its result or exception delivered to `future`."""
    try:
        result = call()
    except BaseException as exc:  # the awaiter's to handle, whatever it is
        deliver(loop, future, None, exc)
    else:
        deliver(loop, future, result, None)


def call_soon_threadsafe(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: BaseException | None
) -> None:
    """The default hand-over: one wake-up of the loop per outcome."""
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(settle, future, result, exc)


def settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    """On the future's loop: its result or exception, unless its awaiter was cancelled meanwhile."""
    if future.done():
        return
    if exc is None:
        future.set_result(result)
    elif isinstance(exc, StopIteration):  # a Future cannot carry it
        future.set_exception(RuntimeError(f"StopIteration raised in a thread: {exc!r}"))
    else:
        future.set_exception(exc)


def _retrieved(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
