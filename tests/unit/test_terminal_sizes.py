"""The resize stream read as terminal sizes: the first one awaited before a TTY exec starts, the rest followed."""

from __future__ import annotations

import asyncio

from cri.streaming.remotecommand import TerminalSizes

Seen = tuple[tuple[int, int] | None, list[tuple[int, int]]]


class Chunks:
    """An inbound stream fed by the test; b"" is its end."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def read(self) -> bytes:
        return await self.queue.get()


def sizes_seen(before: list[bytes], wait: float, after: list[bytes]) -> Seen:
    """What first() returned with `before` sent, and what follow() applied of the rest once `after` was sent."""

    async def go() -> Seen:
        inbound = Chunks()
        for chunk in before:
            inbound.queue.put_nowait(chunk)
        sizes = TerminalSizes(inbound)
        first = await sizes.first(wait)
        applied: list[tuple[int, int]] = []
        follower = asyncio.ensure_future(sizes.follow(lambda w, h: applied.append((w, h))))
        for chunk in after:
            inbound.queue.put_nowait(chunk)
        await asyncio.wait_for(follower, 5)
        return first, applied

    return asyncio.run(go())


def test_the_first_size_then_the_later_ones() -> None:
    before = [b'{"Width": 80, "Height": 2', b'4}{"Width": 100, "Height": 30}']  # an object split over two reads
    after = [b'{"Width": 120, "Height": 40}', b""]
    assert sizes_seen(before, 5, after) == ((80, 24), [(100, 30), (120, 40)])


def test_a_size_that_comes_after_the_wait_is_still_applied() -> None:
    assert sizes_seen([], 0.05, [b'{"Width": 90, "Height": 20}', b""]) == (None, [(90, 20)])


def test_a_resize_stream_that_ends_without_a_size() -> None:
    assert sizes_seen([b""], 5, []) == (None, [])


def test_close_drops_a_pending_read() -> None:
    async def go() -> bool:
        sizes = TerminalSizes(Chunks())
        assert await sizes.first(0.01) is None
        sizes.close()
        await asyncio.sleep(0)
        pending = sizes._pending
        return pending is not None and pending.cancelled()

    assert asyncio.run(go())
