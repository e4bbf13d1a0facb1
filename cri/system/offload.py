"""Blocking calls run off the event loop in a pool of threads: asyncio.to_thread's contract, at less of the loop's time.

asyncio.to_thread goes through run_in_executor: per call a concurrent.futures Future (with a Condition and
its lock), wrap_future, an asyncio Future and two chained callbacks to copy the state across. That cost the
loop 60-80 us a call, and a pod's start and removal make a few dozen calls: 8% of the loop's time in a
50-pod burst (py-spy). Here the same executor's threads run the call and hand its result straight to an
asyncio Future with one call_soon_threadsafe: 28-31 us. Results that arrive before the loop has taken the
earlier ones share that call (see `_Inbox`).

Same contract: the call runs in the caller's contextvars context; cancelling the awaiting task only stops
the wait (the call runs to its end, as a running thread cannot be stopped); its exception is the awaiter's.

The daemon binds the pool's threads to the CPUs of its `offload_cpus` (one, by default): see
cri.system.affinity for why, and for starting a process from one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import threading
import weakref
from collections.abc import Callable, Set
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from cni import handoff
from cri.log import event
from cri.system import affinity

P = ParamSpec("P")
T = TypeVar("T")

log = logging.getLogger(__name__)

# asyncio's default executor allows min(32, cpus + 4) threads; calls beyond wait in the queue.
MAX_THREADS = 32


@dataclass
class _Binding:
    """The CPUs of one pool's threads (None: any of the daemon's)."""

    cpus: frozenset[int] | None = None
    refused: bool = False  # said once in the log, not by every thread

    def apply(self) -> None:
        """In each new thread. A binding the kernel refuses (the daemon's cpuset changed under it) leaves the
        thread free: an initializer that raised would break the pool, and every call with it."""
        if self.cpus is None:
            return
        try:
            affinity.bind_this_thread(self.cpus)
        except OSError as exc:
            if not self.refused:
                self.refused = True
                cpus = affinity.format_list(self.cpus)
                event(log, logging.WARNING, "blocking-call thread not bound", cpus=cpus, error=str(exc))


def _new_executor(binding: _Binding) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="offload", initializer=binding.apply)


class _Pool:
    """The executor and its threads' binding, replaced together."""

    def __init__(self) -> None:
        self.binding = _Binding()
        self.executor = _new_executor(self.binding)

    def bind(self, cpus: Set[int] | None) -> None:
        self.binding = _Binding(None if cpus is None else frozenset(cpus))
        old, self.executor = self.executor, _new_executor(self.binding)
        old.shutdown(wait=False)

    def close(self) -> None:
        closing, self.executor = self.executor, _new_executor(self.binding)
        closing.shutdown(wait=True)


_pool = _Pool()


def bind(cpus: Set[int] | None) -> None:
    """Run later calls in threads bound to `cpus` (None: unbound). The threads there now end once idle."""
    _pool.bind(cpus)


def run_into(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[Any],
    call: Callable[[], Any],
    context: contextvars.Context | None = None,
) -> None:
    """In the calling thread: call() (in `context` when given), its result or exception delivered to `future`."""
    handoff.run_and_deliver(call if context is None else functools.partial(context.run, call), loop, future, deliver)


def deliver(
    loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: BaseException | None
) -> None:
    """From any thread: settle `future` (on its loop) with `result`, or with `exc` when that is not None."""
    _inbox(loop).put(loop, future, result, exc)


class _Inbox:
    """Outcomes handed from threads to one loop, settled in batches: one wake-up of the loop for all the
    outcomes that arrive before it runs. A wake-up is a write to the loop's self-pipe, after which the
    writing thread must take the GIL back only to return to its queue: in a burst, where the GIL is
    contended, that hand-over cost each call more than the call's own bookkeeping."""

    def __init__(self) -> None:  # not holding its loop: the loop is the key of its entry in `_inboxes`
        self._lock = threading.Lock()
        self._outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._wake_pending = False

    def put(
        self, loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: BaseException | None
    ) -> None:
        with self._lock:
            self._outcomes.append((future, result, exc))
            if self._wake_pending:
                return
            self._wake_pending = True
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(self._settle_all)

    def _settle_all(self) -> None:
        with self._lock:
            outcomes, self._outcomes = self._outcomes, []
            self._wake_pending = False
        for future, result, exc in outcomes:
            handoff.settle(future, result, exc)


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Inbox] = weakref.WeakKeyDictionary()
_inboxes_lock = threading.Lock()


def _inbox(loop: asyncio.AbstractEventLoop) -> _Inbox:
    inbox = _inboxes.get(loop)
    if inbox is None:
        with _inboxes_lock:
            inbox = _inboxes.setdefault(loop, _Inbox())
    return inbox


async def to_thread(func: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
    """func(*args, **kwargs) in a pool thread, awaited (as asyncio.to_thread)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    call = functools.partial(func, *args, **kwargs)
    # The executor's own Future is left aside: the result comes back through `future` alone.
    _pool.executor.submit(run_into, loop, future, call, contextvars.copy_context())
    return await future


def close() -> None:
    """Wait for the calls under way and queued, then stop the threads (at the daemon's end); later calls get
    new ones."""
    _pool.close()
