"""Running helper binaries: always with a timeout, stderr always in the error.

The processes are started and waited for in threads of their own pool, not on the event loop: each
start (vfork and exec, the pipes) and each wait would otherwise hold the loop, and every RPC behind
it, for the whole start-up of a runc, conmon or CNI plugin; in a burst of pod starts that was a fifth
of the loop's time. The pool's threads sleep with the GIL released, in one poll() of the pipes and the
exit (cni.rawexec).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

from cni import handoff
from cni.rawexec import run_to_exit
from cri.system import offload

# Enough for every helper a burst of 110 pods runs at once; threads are made only when needed.
MAX_RUNNING = 64
# A killed process has this long to be reaped before its thread gives up on it.
KILL_GRACE = 5.0

_pool = ThreadPoolExecutor(max_workers=MAX_RUNNING, thread_name_prefix="helper")


class CommandError(Exception):
    def __init__(self, argv: Sequence[str], problem: str, stderr: str = "") -> None:
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{' '.join(argv)}: {problem}{detail}")
        self.argv = list(argv)
        self.stderr = stderr


@dataclass(frozen=True)
class Completed:
    stdout: bytes
    stderr: str


@dataclass(frozen=True)
class Outcome:
    """How a process ended: its exit status (None when it was killed for its timeout), stdout, stderr."""

    returncode: int | None
    stdout: bytes
    stderr: bytes


@dataclass(frozen=True)
class Spawn:
    """How to start a process (subprocess.Popen's arguments of the same names)."""

    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    pass_fds: Collection[int] = ()
    start_new_session: bool = False
    stdin_pipe: bool = False  # else /dev/null


class Child:
    """A process run by a pool thread, for the event loop to kill while the thread waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._given_up = False
        self._group = False

    def start(self, spawn: Spawn) -> subprocess.Popen[bytes] | None:
        """Starts it, unless the caller gave up meanwhile (None)."""
        with self._lock:
            if self._given_up:
                return None
            self._group = spawn.start_new_session
            self._proc = subprocess.Popen(
                list(spawn.argv),
                stdin=subprocess.PIPE if spawn.stdin_pipe else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=None if spawn.env is None else dict(spawn.env),
                cwd=spawn.cwd,
                pass_fds=tuple(spawn.pass_fds),
                start_new_session=spawn.start_new_session,
            )
            return self._proc

    def kill(self) -> None:
        """SIGKILL (its whole process group, when it leads one); one not started yet never is."""
        with self._lock:
            self._given_up = True
            proc = self._proc
            if proc is None or proc.returncode is not None:
                return
            if self._group:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()


def _run_blocking(child: Child, spawn: Spawn, stdin: bytes | None, timeout: float) -> Outcome:
    proc = child.start(spawn)
    if proc is None:
        return Outcome(None, b"", b"")
    return Outcome(*run_to_exit(proc, stdin, timeout, child.kill, KILL_GRACE))


async def communicate(
    spawn: Spawn, *, timeout: float, stdin: bytes | None = None, kill_when_cancelled: bool = True
) -> Outcome:
    """Runs `spawn` to its exit in a pool thread, feeding it stdin; killed after timeout (returncode None).

    When the caller is cancelled the process is killed, or with kill_when_cancelled=False left to
    finish (within its timeout): a runtime's delete half done is worse than one done late.
    OSError when it cannot be started."""
    child = Child()
    if stdin is not None:
        spawn = Spawn(spawn.argv, spawn.env, spawn.cwd, spawn.pass_fds, spawn.start_new_session, stdin_pipe=True)
    # Its outcome comes back as offload's do, a burst's many in one wake-up of the loop.
    running = handoff.in_pool(_pool, partial(_run_blocking, child, spawn, stdin, timeout), offload.deliver)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        if kill_when_cancelled:
            child.kill()
        raise


async def run(argv: Sequence[str], *, timeout: float, stdin: bytes | None = None) -> Completed:
    """Run argv to completion; raise CommandError on failure, non-zero exit or timeout."""
    try:
        done = await communicate(Spawn(argv), timeout=timeout, stdin=stdin, kill_when_cancelled=False)
    except OSError as exc:
        raise CommandError(argv, f"cannot start: {exc.strerror}") from exc
    stderr = done.stderr.decode(errors="replace")
    if done.returncode is None:
        raise CommandError(argv, f"timed out after {timeout:g}s", stderr)
    if done.returncode != 0:
        raise CommandError(argv, f"exited with status {done.returncode}", stderr)
    return Completed(done.stdout, stderr)
