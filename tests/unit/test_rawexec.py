"""cni.rawexec: a started process's pipes and exit polled together, as Popen.communicate's contract."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess

import pytest

from cni.rawexec import run_to_exit


def _start(script: str, *, stdin: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["sh", "-c", script],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_stdout_stderr_and_status_come_back_and_nothing_stays_open():
    before = _open_fds()
    proc = _start("echo out; echo err >&2; exit 3")
    assert run_to_exit(proc, None, 10, lambda: _kill_group(proc), 2) == (3, b"out\n", b"err\n")
    assert proc.returncode == 3  # reaped
    assert _open_fds() == before


def test_a_megabyte_of_stdin_comes_back_through_cat_without_a_deadlock():
    data = os.urandom(1 << 20)  # 16 times a pipe's buffer, both ways at once
    proc = _start("cat", stdin=True)
    assert run_to_exit(proc, data, 10, lambda: _kill_group(proc), 2) == (0, data, b"")


def test_a_process_that_exits_without_reading_its_stdin_is_no_error():
    proc = _start("echo refused >&2; exit 1", stdin=True)
    status, out, err = run_to_exit(proc, b"x" * (1 << 20), 10, lambda: _kill_group(proc), 2)
    assert (status, out, err) == (1, b"", b"refused\n")


def test_a_process_that_closes_its_pipes_early_is_waited_for_until_it_exits():
    proc = _start("echo early; exec >&- 2>&-; sleep 0.3; exit 4")
    assert run_to_exit(proc, None, 10, lambda: _kill_group(proc), 2) == (4, b"early\n", b"")


def test_past_its_timeout_the_process_is_killed_and_what_it_wrote_kept():
    before = _open_fds()
    killed: list[int] = []

    def kill() -> None:
        killed.append(proc.pid)
        _kill_group(proc)

    proc = _start("echo started; echo why >&2; sleep 30")
    assert run_to_exit(proc, None, 0.3, kill, 2) == (None, b"started\n", b"why\n")
    assert killed == [proc.pid]
    assert proc.returncode == -signal.SIGKILL
    assert _open_fds() == before


def test_pipes_held_by_a_process_the_kill_misses_are_left_after_the_grace():
    # The grandchild leaves the group (setsid) with the pipes: as with Popen.communicate, the call ends
    # after the grace with what was read.
    proc = _start("echo before; setsid sleep 30 & echo $! >&2; exit 0")
    status, out, err = run_to_exit(proc, None, 0.3, lambda: _kill_group(proc), 0.3)
    os.kill(int(err), signal.SIGKILL)
    assert (status, out) == (None, b"before\n")
    assert proc.returncode == 0


def test_without_a_pidfd_the_process_is_killed_and_reaped_and_the_error_raised(monkeypatch):
    def no_pidfd(pid: int) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    before = _open_fds()
    proc = _start("sleep 30")
    with pytest.raises(OSError, match="Too many open files"):
        run_to_exit(proc, None, 10, lambda: _kill_group(proc), 2)
    assert proc.returncode == -signal.SIGKILL
    assert _open_fds() == before
