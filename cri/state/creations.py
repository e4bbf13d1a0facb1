"""Name reservations and creations in flight, shared by pod sandboxes and containers (cri-o's in-flight store).

A creation runs in a task of its own, detached from the RPC that asked for it.
When the kubelet's deadline expires it abandons the call; the task goes on, and
the kubelet's retry (same name) gets that object back instead of a "name is
reserved" error: it joins the task if it still runs, or takes the finished
object, once, if nobody claimed it. The name is reserved before the first
await, so two concurrent calls can never make two objects.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from cri.errors import AlreadyExists
from cri.log import event

log = logging.getLogger(__name__)

T = TypeVar("T")


def new_id() -> str:
    """A 64-hex-character object ID, as the CRI's clients expect."""
    return secrets.token_hex(32)


class Creations(Generic[T]):
    def __init__(self, kind: str, id_of: Callable[[T], str], lookup: Callable[[str], T | None]) -> None:
        self._kind = kind  # "pod sandbox", "container": for messages
        self._id_of = id_of
        self._lookup = lookup  # a finished object by its exact ID
        self._names: dict[str, str] = {}  # reservation name -> object ID
        self._inflight: dict[str, asyncio.Task[T]] = {}
        self._unclaimed: set[str] = set()  # made for a caller that gave up; its retry takes it

    async def create(self, name: str, make: Callable[[str], Awaitable[T]]) -> T:
        """The object reserved as `name`: made by `make(new id)`, or the one a retry is owed."""
        task = self._inflight.get(name)
        if task is None:
            owner = self._names.get(name)
            if owner is not None:
                return self._hand_over(name, owner)
            object_id = new_id()
            self._names[name] = object_id
            task = asyncio.create_task(self._make(name, object_id, make), name=f"create-{name}")
            self._inflight[name] = task
            task.add_done_callback(lambda _t: self._inflight.pop(name, None))
        else:
            event(log, logging.INFO, f"{self._kind} retry joins the creation in flight", reservation=name)
        try:
            made = await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._abandoned)
            raise
        # A caller that gave up earlier marked it unclaimed when it finished; this caller has it now.
        self._unclaimed.discard(self._id_of(made))
        return made

    def _hand_over(self, name: str, owner: str) -> T:
        found = self._lookup(owner)
        if owner in self._unclaimed and found is not None:
            self._unclaimed.discard(owner)
            event(log, logging.INFO, f"{self._kind} handed to a retry", id=owner, reservation=name)
            return found
        raise AlreadyExists(f"{self._kind} name {name!r} is reserved for {owner}; remove that {self._kind} first")

    async def _make(self, name: str, object_id: str, make: Callable[[str], Awaitable[T]]) -> T:
        try:
            return await make(object_id)
        except BaseException:
            self._names.pop(name, None)  # nothing was made: the name is free again
            raise

    def _abandoned(self, task: asyncio.Task[T]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        object_id = self._id_of(task.result())
        self._unclaimed.add(object_id)
        event(log, logging.INFO, f"{self._kind} finished after its caller left", id=object_id)

    def reserve(self, name: str, object_id: str) -> None:
        """A name held by an object loaded at start-up."""
        self._names[name] = object_id

    def release(self, object_id: str) -> None:
        """The object is removed: its name is free, and no retry is owed it."""
        self._unclaimed.discard(object_id)
        for name, owner in list(self._names.items()):
            if owner == object_id:
                del self._names[name]
