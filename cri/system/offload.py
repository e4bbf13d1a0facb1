"""Blocking calls run off the event loop in a pool of threads: asyncio.to_thread's contract, at less of the loop's time.

asyncio.to_thread goes through run_in_executor: per call a concurrent.futures Future (with a Condition and
its lock), wrap_future, an asyncio Future and two chained callbacks to copy the state across. That cost the
loop 60-80 us a call, and a pod's start and removal make a few dozen calls: 8% of the loop's time in a
50-pod burst (py-spy). Here a call is a tuple on a SimpleQueue and one call_soon_threadsafe back, 14 us.

Same contract: the call runs in the caller's contextvars context; cancelling the awaiting task only stops
the wait (the call runs to its end, as a running thread cannot be stopped); its exception is the awaiter's.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import queue
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

# asyncio's default executor allows min(32, cpus + 4) threads; calls beyond wait in the queue.
MAX_THREADS = 32

_Item = tuple[contextvars.Context, asyncio.AbstractEventLoop, "asyncio.Future[Any]", Callable[[], Any]]


class _Pool:
    """Threads made as calls need them (up to MAX_THREADS), each taking calls off one queue until the end."""

    def __init__(self, max_threads: int) -> None:
        self._max = max_threads
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._idle = 0

    def submit(self, item: _Item) -> None:
        self._queue.put(item)
        with self._lock:
            if self._idle > 0 or len(self._threads) >= self._max:
                return
            thread = threading.Thread(target=self._work, name=f"offload_{len(self._threads)}", daemon=True)
            self._threads.append(thread)
            self._idle += 1  # counted from now: the next submit does not start another for this call
        thread.start()

    def close(self, timeout: float) -> None:
        """Let every thread finish its call and what is queued, then end (the daemon is stopping)."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join(timeout)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            with self._lock:
                self._idle -= 1
            if item is None:
                return
            context, loop, future, call = item
            try:
                result = context.run(call)
            except BaseException as exc:  # the awaiter's to handle, whatever it is
                _deliver(loop, future, None, exc)
            else:
                _deliver(loop, future, result, None)
            finally:
                del item, future, call  # not kept alive until the next call arrives
            with self._lock:
                self._idle += 1


def _deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: BaseException | None
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():  # the awaiter was cancelled
        return
    if exc is None:
        future.set_result(result)
    elif isinstance(exc, StopIteration):  # a Future cannot carry it
        future.set_exception(RuntimeError(f"StopIteration raised in a thread: {exc!r}"))
    else:
        future.set_exception(exc)


_pool = _Pool(MAX_THREADS)


async def to_thread(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """func(*args, **kwargs) in a pool thread, awaited (as asyncio.to_thread)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    call = functools.partial(func, *args, **kwargs) if kwargs else functools.partial(func, *args)
    _pool.submit((contextvars.copy_context(), loop, future, call))
    return await future


def close(timeout: float = 10.0) -> None:
    """Wait for the calls under way and queued, then stop the threads (at the daemon's end)."""
    _pool.close(timeout)
