"""Container lifecycle events for GetContainerEvents: a broadcast to every open stream.

Each subscriber has a bounded queue; a subscriber that falls too far behind
(the kubelet stopped reading) loses its stream rather than holding the daemon's
memory: its iterator ends, and the kubelet reconnects and relists.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import Enum

from cri.log import event

log = logging.getLogger(__name__)

QUEUE_LIMIT = 10000


class EventType(Enum):
    CREATED = "created"
    STARTED = "started"
    STOPPED = "stopped"
    DELETED = "deleted"


@dataclass(frozen=True)
class ContainerEvent:
    container_id: str
    sandbox_id: str
    type: EventType
    created_at: int  # ns


_END = None


class EventBus:
    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[ContainerEvent | None]] = set()

    def publish(self, item: ContainerEvent) -> None:
        for queue in list(self._queues):
            try:
                queue.put_nowait(item)
            except asyncio.QueueFull:
                self._queues.discard(queue)
                queue.get_nowait()
                queue.put_nowait(_END)
                event(log, logging.WARNING, "container event subscriber too slow, dropped", limit=QUEUE_LIMIT)

    async def subscribe(self) -> AsyncIterator[ContainerEvent]:
        queue: asyncio.Queue[ContainerEvent | None] = asyncio.Queue(QUEUE_LIMIT)
        self._queues.add(queue)
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            self._queues.discard(queue)

    @property
    def subscribers(self) -> int:
        return len(self._queues)
