"""cri/system/nsthread: a call in a thread of its own, started without holding up the event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cri.system import nsthread


def test_the_call_runs_in_a_fresh_named_thread_that_the_loop_did_not_wait_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    starters: list[int] = []  # who started the ns-x thread (the pool's own start on first use aside)
    original = threading.Thread.start

    def start(self: threading.Thread) -> None:
        if self.name == "ns-x":
            starters.append(threading.get_ident())
        original(self)

    monkeypatch.setattr(threading.Thread, "start", start)

    async def main() -> tuple[str, int]:
        return await nsthread.in_fresh_thread(lambda: (threading.current_thread().name, threading.get_ident()), "ns-x")

    name, ident = asyncio.run(main())
    loop_thread = threading.get_ident()
    assert name == "ns-x" and ident != loop_thread
    # Thread.start blocks until the new thread runs: never on the loop's thread.
    assert len(starters) == 1 and starters[0] != loop_thread


def test_the_exception_of_the_call_is_the_awaiters() -> None:
    def fails() -> None:
        raise PermissionError(1, "setns")

    async def main() -> None:
        await nsthread.in_fresh_thread(fails, "ns-fail")

    with pytest.raises(PermissionError, match="setns"):
        asyncio.run(main())


def test_a_cancelled_wait_leaves_no_unretrieved_outcome() -> None:
    release = threading.Event()

    def slow() -> None:
        release.wait(10)
        raise OSError("late")

    async def main() -> None:
        task = asyncio.ensure_future(nsthread.in_fresh_thread(slow, "ns-slow"))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        await asyncio.sleep(0.05)  # the thread's late outcome reaches a settled future and is dropped

    asyncio.run(main())
