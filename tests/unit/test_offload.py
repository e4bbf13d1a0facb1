"""cri/system/offload: asyncio.to_thread's contract (results, exceptions, context, cancellation), off the loop."""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time

import pytest

from cri.system import offload

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
