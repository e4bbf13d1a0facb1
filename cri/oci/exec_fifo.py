"""Starting a created runc container through its exec fifo, as `runc start` itself does.

`runc create` leaves the container's init (`runc init`) blocked in an open() of
`<root>/<id>/exec.fifo` for writing. `runc start` only opens that fifo for
reading, reads until end of file (the init writes one byte, then its write end
closes when it execs the user's process) and removes the fifo, which is how
`runc state` tells "created" from "running". That protocol has been the same
from runc 1.0 to today, and runc runs no hook in `runc start` (poststart hooks
run in `runc create`).

Exec'ing `runc start` costs a Go process per container, ~14 ms of CPU here: a
fifth of the CPU of a 110-pod burst's starts. Other runtimes (crun reverses the
fifo's direction) keep `<runtime> start`; `speaks_exec_fifo` asks the binary
once which it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import stat

from cri.system import fdwait
from cri.system.process import CommandError, run

FIFO_NAME = "exec.fifo"
VERSION_TIMEOUT = 10.0  # seconds for `<runtime> --version`

_dialects: dict[tuple[str, float], bool] = {}
# Asked and not yet answered: the starts of a burst that come meanwhile wait for the same answer.
_asking: dict[tuple[str, float], asyncio.Task[bool]] = {}


class ExecFifoError(Exception):
    """The container could not be started through its fifo; the message says why."""


class NoExecFifo(ExecFifoError):
    """The runtime holds no fifo for the container: it is unknown to it, or already started."""


async def speaks_exec_fifo(binary: str) -> bool:
    """Whether `binary` is runc (its first `--version` line says so), asked once per binary and mtime."""
    try:
        key = (binary, os.stat(binary).st_mtime)
    except OSError:
        return False
    known = _dialects.get(key)
    if known is not None:
        return known
    asking = _asking.get(key)
    if asking is None or asking.get_loop() is not asyncio.get_running_loop():
        asking = asyncio.create_task(_ask(binary, key), name=f"dialect of {binary}")
        _asking[key] = asking
    # Shielded: a start that gives up does not cancel the answer the others wait for.
    return await asyncio.shield(asking)


async def _ask(binary: str, key: tuple[str, float]) -> bool:
    try:
        done = await run([binary, "--version"], timeout=VERSION_TIMEOUT)
    except CommandError:
        known = False
    else:
        known = done.stdout.startswith(b"runc version ")
    finally:
        _asking.pop(key, None)  # answered or failed: a later start asks again only when nothing is known
    _dialects[key] = known
    return known


def fifo_path(root: str, container_id: str) -> str:
    return os.path.join(root, container_id, FIFO_NAME)


async def start(path: str, init_pid: int) -> None:
    """Let the init blocked on `path` exec the container's process; return once it has (or has died).

    Raises NoExecFifo when there is no fifo, ExecFifoError when the init died
    before it wrote (the runtime's "container process is already dead") or the
    fifo says the container already ran.
    """
    try:
        fifo = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise NoExecFifo(f"{path}: no exec fifo (the container is not in the created state)") from exc
    except OSError as exc:
        raise ExecFifoError(f"opening {path}: {exc.strerror}") from exc
    try:
        if not stat.S_ISFIFO(os.fstat(fifo).st_mode):
            raise ExecFifoError(f"{path}: not a fifo")
        data = await _read_to_end(fifo, init_pid)
    finally:
        os.close(fifo)
    if not data:
        raise ExecFifoError(f"{path}: the container process is already dead or has already been started")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def _read_to_end(fifo: int, init_pid: int) -> bytes:
    """All the fifo's bytes, up to the moment its writer closes it; what is there if the init dies first.

    A reader opened before any writer gets no hang-up until a writer has come
    and gone, so an init that died before opening the fifo is seen through its
    pidfd instead.
    """
    pidfd = _pidfd(init_pid)
    data = b""
    try:
        while True:
            chunk = _read(fifo)
            if chunk == b"":
                return data  # the writer is gone: it exec'd, or died after writing
            if chunk is not None:
                data += chunk
                continue
            if pidfd is None or await _first_ready(fifo, pidfd) == pidfd:
                return data + (_read(fifo) or b"")
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _read(fifo: int) -> bytes | None:
    """The bytes there; b"" at end of file; None when the writer is there but has not written (or none came)."""
    try:
        chunk = os.read(fifo, 4096)
    except BlockingIOError:
        return None
    if chunk == b"" and not _writer_came(fifo):
        return None
    return chunk


def _writer_came(fifo: int) -> bool:
    # read() returns 0 both before any writer opened the fifo and after the last closed it; only the
    # second raises POLLHUP for a reader that opened with no writer.
    poller = select.poll()
    poller.register(fifo, select.POLLIN)
    return any(events & select.POLLHUP for _, events in poller.poll(0))


def _pidfd(pid: int) -> int | None:
    """A pidfd for the init; None when it is already gone (or pid unknown)."""
    if pid <= 0:
        return None
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None


async def _first_ready(*fds: int) -> int:
    waits = {asyncio.ensure_future(fdwait.ready(fd)): fd for fd in fds}
    try:
        done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    return waits[next(iter(done))]
