"""The daemon as a child subreaper: who waits for the processes it adopts.

`runc exec --detach` starts the command and exits, so the command is orphaned;
with the daemon a subreaper it comes to the daemon (not to init), which can
then wait for it and learn its exit status, as conmon and containerd's shim
do. Being a subreaper also brings conmon's daemonized monitors and any other
orphan of what the daemon starts: `Sweeper` reaps those once they exit.

asyncio reaps the children it started itself, within microseconds of the exit
(through a pidfd on the event loop: see `watch_children_with_pidfds`). A zombie that is still there after
`SWEEP_DELAY` is therefore an adopted one: the sweeper takes a zombie it has
seen in two sweeps in a row (so never one that asyncio is about to reap), and
leaves the pids `wait_child` is waiting for to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys

from cri.log import event
from cri.system import fdwait, linux

log = logging.getLogger(__name__)

SWEEP_DELAY = 1.0


def watch_children_with_pidfds() -> None:
    """Python 3.11's asyncio waits for each child in a thread of its own; a pidfd on the loop saves the
    thread's start and hand-over, about 0.2 ms of every runc, conmon and CNI plugin run here. From
    3.12 on, asyncio uses pidfds by itself."""
    if sys.version_info >= (3, 12):
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.get_event_loop_policy().set_child_watcher(watcher)


_awaited: set[int] = set()


def become_subreaper() -> None:
    linux.set_child_subreaper()


def _status(result: os.waitid_result) -> int:
    """An exit status as the CRI reports it: the code, or 128 + the signal that killed it."""
    if result.si_code == os.CLD_EXITED:
        return int(result.si_status)
    return 128 + int(result.si_status)


async def wait_child(pid: int) -> int:
    """Wait for `pid` (a child of ours, adopted or not) to exit, reap it, and return its status.

    A process that is not our child (the daemon is not a subreaper, or it was
    reaped elsewhere) is waited for all the same; its status is unknown: -1.
    """
    _awaited.add(pid)
    try:
        try:
            pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            return -1
        try:
            return await _wait_pidfd(pidfd)
        finally:
            os.close(pidfd)
    finally:
        _awaited.discard(pid)


async def _wait_pidfd(pidfd: int) -> int:
    while True:
        try:
            result = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Not ours to reap: the pidfd still turns readable when it exits.
            await fdwait.ready(pidfd)
            return -1
        if result is not None:
            return _status(result)
        await fdwait.ready(pidfd)


def _zombie_children() -> list[int]:
    me = os.getpid()
    found = []
    for tid in os.listdir(f"/proc/{me}/task"):
        try:
            with open(f"/proc/{me}/task/{tid}/children") as f:
                pids = [int(p) for p in f.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
        found += [pid for pid in pids if _is_zombie(pid)]
    return found


def _is_zombie(pid: int) -> bool:
    stat = linux.proc_stat(pid)
    return stat is not None and stat.state == "Z"


class Sweeper:
    """Reaps adopted orphans a moment after SIGCHLD says some child exited.

    The zombies are looked for in a thread: that reads the children of every thread of the daemon and
    the state of each child (a hundred conmons on a full node), milliseconds the event loop and every
    RPC would otherwise wait. The reaping itself stays on the loop, where `wait_child` marks the pids
    it waits for, so that a pid is never reaped under it."""

    def __init__(self, delay: float = SWEEP_DELAY) -> None:
        self._delay = delay
        self._pending: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._seen: set[int] = set()
        self._looking: asyncio.Future[list[int]] | None = None
        self._again = False  # SIGCHLD came while looking: look once more after

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop.add_signal_handler(signal.SIGCHLD, self._schedule)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_signal_handler(signal.SIGCHLD)
        if self._pending is not None:
            self._pending.cancel()
        if self._looking is not None:
            self._looking.cancel()

    def _schedule(self) -> None:
        if self._looking is not None:
            self._again = True
        elif self._pending is None and self._loop is not None:
            self._pending = self._loop.call_later(self._delay, self._look)

    def _look(self) -> None:
        assert self._loop is not None
        self._pending = None
        self._looking = self._loop.run_in_executor(None, _zombie_children)
        self._looking.add_done_callback(self._found)

    def _found(self, looking: asyncio.Future[list[int]]) -> None:
        self._looking = None
        if looking.cancelled():
            return
        error = looking.exception()
        if error is not None:
            event(log, logging.WARNING, "looking for exited children failed", error=str(error))
        else:
            self._sweep(looking.result())
        if self._again:
            self._again = False
            self._schedule()

    def _sweep(self, found: list[int]) -> None:
        zombies = {pid for pid in found if pid not in _awaited}
        for pid in zombies & self._seen:
            with contextlib.suppress(ChildProcessError):
                reaped, status = os.waitpid(pid, os.WNOHANG)
                if reaped:
                    event(log, logging.DEBUG, "reaped adopted process", pid=pid, status=status)
        self._seen = zombies - self._seen
        if self._seen:
            self._schedule()
