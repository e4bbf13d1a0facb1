"""Signalling a container's init process without running the OCI runtime.

`runc kill <id> <signal>` (without `--all`) is kill(2) on the container's
init: runc loads its state, makes sure the pid is still that process, and
signals it. That costs one start of the runtime binary, 6 to 9 ms here, on
every StopContainer. criopy knows the pid and the conmon above it: conmon is a
child subreaper, so the init is conmon's child. A pidfd pins one process, and
if that process's parent is the container's conmon it is the container's init
(a reused pid would have another parent); the signal then goes through the
pidfd to exactly that process. When a check fails the caller falls back to the
runtime, which has its own.
"""

from __future__ import annotations

import os
import select
import signal

from cri.system import linux


def number(name: str) -> int | None:
    """The number of a signal named as CRI, images or runc name them; None when unknown.

    Accepted: `SIGTERM`, `TERM`, `15`, `SIGRTMIN+3` (image STOPSIGNAL), `SIGRTMINPLUS3`
    and `SIGRTMAXMINUS2` (the CRI enum's names).
    """
    text = name.strip().upper()
    if text.isdigit():
        value = int(text)
        return value if 0 < value <= signal.SIGRTMAX else None
    text = text.removeprefix("SIG")
    if text in ("RTMIN", "RTMAX"):
        return int(signal.SIGRTMIN if text == "RTMIN" else signal.SIGRTMAX)
    realtime = _realtime(text)
    if realtime is not None:
        return realtime
    try:
        return int(signal.Signals[f"SIG{text}"])
    except KeyError:
        return None


def _realtime(text: str) -> int | None:
    for base, value in (("RTMIN", int(signal.SIGRTMIN)), ("RTMAX", int(signal.SIGRTMAX))):
        if not text.startswith(base):
            continue
        rest = text[len(base) :]
        for prefix, sign in (("PLUS", 1), ("+", 1), ("MINUS", -1), ("-", -1)):
            if rest.startswith(prefix) and rest[len(prefix) :].isdigit():
                result = value + sign * int(rest[len(prefix) :])
                return result if signal.SIGRTMIN <= result <= signal.SIGRTMAX else None
    return None


def send(pid: int, conmon_pid: int, signum: int) -> bool:
    """Signal the container init `pid` if it is still `conmon_pid`'s child; False (nothing sent) otherwise."""
    if pid <= 0 or conmon_pid <= 0:
        return False
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return False
    try:
        stat = linux.proc_stat(pid)
        # The pidfd turns readable once its process has exited. Still unreadable after the read, the
        # process lived all along, so /proc/<pid> was its entry, not one of a process given the pid since.
        if stat is None or stat.ppid != conmon_pid or _exited(pidfd):
            return False
        signal.pidfd_send_signal(pidfd, signum)
    except ProcessLookupError:
        return False
    finally:
        os.close(pidfd)
    return True


def _exited(pidfd: int) -> bool:
    readable, _, _ = select.select([pidfd], [], [], 0)
    return bool(readable)
