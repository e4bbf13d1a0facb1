"""A started process run to its exit: stdin fed, stdout and stderr read, the exit seen, in one poll().

What subprocess.Popen.communicate(stdin, timeout) does, without its wait: once the pipes end, it waits for
the exit in a loop of waitpid(WNOHANG) and sleeps of 1, 2, 4 ... 50 ms. A process closes its pipes as it
exits, a moment before its parent can reap it, so nearly every call paid a 1 ms sleep, and one more
wake-up to take the GIL back. Here a pidfd of the process is polled with its pipes: the thread sleeps
until one of them has something, the exit included (what CPython 3.14's Popen.wait does). libcni's raw
exec is where the CNI library runs its plugins; criopy's own helpers (conmon, runc) run through it too.
"""

from __future__ import annotations

import os
import select
import subprocess
import time
from collections.abc import Callable
from typing import IO

_READ_SIZE = 65536
_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR


class _Run:
    """One process's pipes and pidfd, polled until the pipes end and the process exits (or time is up)."""

    def __init__(self, proc: subprocess.Popen[bytes], stdin: bytes | None) -> None:
        self.proc = proc
        self.poller = select.poll()
        self.pidfd = os.pidfd_open(proc.pid)
        self.poller.register(self.pidfd, select.POLLIN)
        self.exited = False
        self.output: dict[int, list[bytes]] = {}
        self.streams = [pipe.fileno() if pipe is not None else -1 for pipe in (proc.stdout, proc.stderr)]
        for fd in self.streams:
            if fd >= 0:
                self.output[fd] = []
                self.poller.register(fd, select.POLLIN)
        self.reading = set(self.output)
        self.pending = memoryview(stdin or b"")
        if proc.stdin is not None:
            if self.pending:
                os.set_blocking(proc.stdin.fileno(), False)  # a write takes what the pipe has room for
                self.poller.register(proc.stdin.fileno(), select.POLLOUT)
            else:
                proc.stdin.close()

    def until(self, deadline: float) -> bool:
        """Polls until the process exited and its pipes ended (True) or `deadline` passed (False)."""
        while self.reading or not self.exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            for fd, events in self.poller.poll(remaining * 1000):
                self._handle(fd, events)
        return True

    def _handle(self, fd: int, events: int) -> None:
        stdin = self.proc.stdin
        if fd == self.pidfd:
            self.exited = True
            self.poller.unregister(fd)
        elif stdin is not None and not stdin.closed and fd == stdin.fileno():
            self._write(stdin, events)
        elif events & _READABLE:
            data = os.read(fd, _READ_SIZE)
            if data:
                self.output[fd].append(data)
            else:
                self.poller.unregister(fd)
                self.reading.discard(fd)

    def _write(self, stdin: IO[bytes], events: int) -> None:
        if events & select.POLLOUT:
            try:
                self.pending = self.pending[os.write(stdin.fileno(), self.pending) :]
            except BrokenPipeError:  # it exited without reading it all: its exit status says why
                self.pending = memoryview(b"")
            except BlockingIOError:
                return
        if self.pending and not events & (select.POLLERR | select.POLLHUP):
            return
        self.poller.unregister(stdin.fileno())
        stdin.close()

    def finish(self) -> tuple[bytes, bytes]:
        """Reaps the process (killed by then, if it had not exited) and closes everything; its output."""
        self.proc.wait()
        os.close(self.pidfd)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()
        out, err = (b"".join(self.output.get(fd, ())) for fd in self.streams)
        return out, err


def run_to_exit(
    proc: subprocess.Popen[bytes], stdin: bytes | None, timeout: float, kill: Callable[[], None], grace: float
) -> tuple[int | None, bytes, bytes]:
    """Feeds `proc` stdin and reads its stdout and stderr (pipes, or None) until it exits and they end.

    Past `timeout` seconds it is killed (`kill`), and what it wrote is read for `grace` seconds more: its
    exit status is then None. A pipe still held open after that (by a process outside what `kill` kills)
    is left unread."""
    try:
        run = _Run(proc, stdin)
    except OSError:  # no pidfd (out of file descriptors): the process is not left behind, unreaped
        kill()
        proc.communicate()
        raise
    if run.until(time.monotonic() + timeout):
        out, err = run.finish()
        return proc.returncode, out, err
    kill()
    run.until(time.monotonic() + grace)
    out, err = run.finish()
    return None, out, err
