"""cri/system/offload: asyncio.to_thread's contract (results, exceptions, context, cancellation), off the loop."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from cri.system import affinity, offload
from tests.support.system import two_cpus_or_skip

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


def test_a_call_runs_in_another_thread_and_gives_its_result_with_keywords():
    def where(a: int, *, b: int) -> tuple[int, int]:
        return a + b, threading.get_ident()

    async def main() -> tuple[int, int]:
        return await offload.to_thread(where, 1, b=2)

    total, ident = asyncio.run(main())
    assert total == 3 and ident != threading.get_ident()


def test_the_exception_is_the_awaiters_and_stopiteration_becomes_a_runtimeerror():
    def fails() -> None:
        raise FileNotFoundError(2, "gone", "/x")

    def stops() -> None:
        raise StopIteration

    async def main() -> None:
        with pytest.raises(FileNotFoundError, match="gone"):
            await offload.to_thread(fails)
        with pytest.raises(RuntimeError, match="StopIteration"):
            await offload.to_thread(stops)

    asyncio.run(main())


def test_the_call_sees_the_callers_context():
    async def main() -> str:
        REQUEST_ID.set("pod-1")
        return await offload.to_thread(REQUEST_ID.get)

    assert asyncio.run(main()) == "pod-1"


def test_a_cancelled_wait_leaves_the_call_to_finish_and_the_loop_free():
    finished = threading.Event()

    def slow() -> None:
        time.sleep(0.2)
        finished.set()

    async def main() -> None:
        task = asyncio.ensure_future(offload.to_thread(slow))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not finished.is_set()  # the wait ended, the call goes on
        await asyncio.sleep(0.4)  # its late result is dropped without an error

    asyncio.run(main())
    assert finished.is_set()


def test_many_calls_at_once_all_finish_and_close_waits_for_the_ones_under_way():
    done: list[int] = []

    def work(i: int) -> int:
        time.sleep(0.01)
        done.append(i)
        return i

    async def main() -> list[int]:
        return list(await asyncio.gather(*(offload.to_thread(work, i) for i in range(100))))

    assert asyncio.run(main()) == list(range(100))
    late = threading.Event()

    def outlives_its_loop() -> None:
        time.sleep(0.2)
        late.set()

    async def leave_one_running() -> None:
        running = asyncio.ensure_future(offload.to_thread(outlives_its_loop))
        await asyncio.sleep(0.05)
        assert not running.done()  # asyncio.run cancels it: the call goes on without its loop

    asyncio.run(leave_one_running())
    offload.close()
    assert late.is_set() and sorted(done) == list(range(100))


def test_calls_given_while_one_thread_is_idle_run_at_once_not_behind_each_other():
    both = threading.Barrier(2, timeout=5)  # broken, so failing, if the second call waited for the first

    async def main() -> None:
        await offload.to_thread(time.sleep, 0.3)  # a thread exists and goes idle
        await asyncio.sleep(0.05)
        await asyncio.gather(offload.to_thread(both.wait), offload.to_thread(both.wait))

    asyncio.run(main())


def test_outcomes_that_arrive_while_the_loop_is_busy_wake_it_once_and_all_settle():
    calls = 20  # within the pool's threads: every call waits at the barrier at once
    finished = threading.Barrier(calls + 1, timeout=5)

    def work(i: int) -> int:
        finished.wait()
        return i

    async def main() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        wakes = 0
        threadsafe = loop.call_soon_threadsafe

        def counted(*args: Any) -> asyncio.Handle:
            nonlocal wakes
            wakes += 1
            return threadsafe(*args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign,assignment]
        waits = [asyncio.ensure_future(offload.to_thread(work, i)) for i in range(calls)]
        await asyncio.sleep(0.05)  # every call started: each waits at the barrier
        finished.wait()  # the loop's thread busy (blocked here) while the calls end and hand back their results
        time.sleep(0.2)
        return list(await asyncio.gather(*waits)), wakes

    results, wakes = asyncio.run(main())
    assert results == list(range(calls))
    assert wakes == 1


@pytest.fixture
def unbound_after() -> Iterator[None]:
    """The pool as the other tests (and the daemon before its config) find it."""
    yield
    offload.bind(None)


def _cpus_of_calls(calls: int) -> list[set[int]]:
    """The CPUs each of `calls` concurrent calls could run on."""
    both = threading.Barrier(calls, timeout=5)  # each call in a thread of its own

    def where() -> set[int]:
        both.wait()
        return os.sched_getaffinity(0)

    async def main() -> list[set[int]]:
        # A pool broken by its threads' initializer would never answer: that fails here instead of hanging.
        return list(await asyncio.wait_for(asyncio.gather(*(offload.to_thread(where) for _ in range(calls))), 10))

    return asyncio.run(main())


def test_bound_calls_run_on_the_cpus_given_and_unbound_ones_anywhere(unbound_after: None):
    every = two_cpus_or_skip()
    home = {min(every)}
    offload.bind(home)
    assert _cpus_of_calls(3) == [home] * 3
    offload.bind(None)
    assert _cpus_of_calls(3) == [set(every)] * 3


def test_a_binding_the_kernel_refuses_leaves_the_calls_running_unbound_and_says_so_once(
    unbound_after: None, caplog: pytest.LogCaptureFixture
):
    missing = max(affinity.process_cpus()) + 4096  # no such CPU: sched_setaffinity says EINVAL
    offload.bind({missing})
    with caplog.at_level(logging.WARNING, logger=offload.log.name):
        assert _cpus_of_calls(3) == [set(affinity.process_cpus())] * 3
    warnings = [r for r in caplog.records if r.getMessage() == "blocking-call thread not bound"]
    assert len(warnings) == 1
