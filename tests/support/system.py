"""Host facts and clean-ups for tests of the real stack: the binaries, runc's view, cgroups, processes."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

RUNC = shutil.which("runc") or "/usr/sbin/runc"
CONMON = "/usr/bin/conmon"
BUSYBOX = "/bin/busybox"
CATATONIT = "/usr/bin/catatonit"
CGROUP_ROOT = Path("/sys/fs/cgroup")


def require_binaries(*paths: str) -> None:
    """Fail (not skip: CI installs them) when a binary the test drives is missing."""
    for path in paths:
        if not os.access(path, os.X_OK):
            pytest.fail(f"{path} missing: run `make test`, which installs Debian's runc, conmon, busybox, catatonit")


def runc_list(root: str | os.PathLike[str]) -> list[str]:
    """The container IDs runc holds state for under `root` (none when the root does not exist)."""
    if not os.path.isdir(root):
        return []
    done = subprocess.run(
        [RUNC, "--root", str(root), "list", "-q"], check=False, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def runc_delete_all(root: str | os.PathLike[str]) -> None:
    """What a failed test left under a runtime root, removed with runc itself."""
    for cid in runc_list(root):
        argv = [RUNC, "--root", str(root), "delete", "--force", cid]
        subprocess.run(argv, check=False, capture_output=True, timeout=30)


def cgroup_dirs(parent: str) -> list[str]:
    """Container cgroups (criopy-<id>) under a pod's cgroup parent, in every v1 hierarchy and v2."""
    found = []
    for hierarchy in CGROUP_ROOT.iterdir():
        base = hierarchy / parent.strip("/")
        if base.is_dir():
            found += [str(p) for p in base.iterdir() if p.is_dir() and p.name.startswith("criopy-")]
    return sorted(found)


def remove_cgroup_parent(parent: str) -> None:
    """rmdir a test's cgroup parent and anything left under it, in every v1/v2 hierarchy (deepest first)."""
    for hierarchy in CGROUP_ROOT.iterdir():
        base = hierarchy / parent.strip("/")
        if not base.is_dir():
            continue
        for child in sorted(base.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir():
                _rmdir(child)
        _rmdir(base)


def _rmdir(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def conmon_pids(marker: str) -> list[int]:
    """conmon processes whose command line mentions `marker` (a daemon's base dir, a container ID)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"conmon") and any(marker.encode() in arg for arg in cmdline):
            found.append(int(entry))
    return found


def children_of(pid: int) -> list[int]:
    """The children of every thread of `pid`; none when it is gone."""
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except FileNotFoundError:
        return []
    found = []
    for task in tasks:
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue  # the thread ended meanwhile
    return found


def unpack_hosts(daemon: int) -> list[int]:
    """The daemon's unpack host processes (cri.storage.unpack_host), among its children."""
    hosts = []
    for pid in children_of(daemon):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:  # a short-lived child, gone meanwhile
            continue
        if b"cri.storage.unpack_host" in argv:
            hosts.append(pid)
    return hosts


def cpus_allowed_in(status: str) -> str:
    """Cpus_allowed_list of a /proc/<pid>/status text: the kernel's CPU list, e.g. '0-1'."""
    for line in status.splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Cpus_allowed_list in {status!r}")


def cpus_allowed(pid: int, tid: int | None = None) -> str:
    """The CPUs a process (or one thread of it) may run on, as /proc lists them."""
    task = f"/proc/{pid}" if tid is None else f"/proc/{pid}/task/{tid}"
    return cpus_allowed_in(Path(task, "status").read_text())


def two_cpus_or_skip() -> frozenset[int]:
    """This process's CPUs; the test is skipped where there is one, as binding to it would change nothing."""
    cpus = frozenset(os.sched_getaffinity(os.getpid()))
    if len(cpus) < 2:
        pytest.skip("a binding to one CPU changes nothing on a machine with one CPU")
    return cpus


def process_gone(pid: int) -> bool:
    """No such process, or only its zombie (its parent has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X")


def wait_gone(pid: int, timeout: float = 10) -> bool:
    return poll(lambda: process_gone(pid), timeout, interval=0.02)


def poll(done: Callable[[], object], timeout: float = 10, interval: float = 0.05) -> bool:
    """Whether `done()` came true within `timeout` seconds, asked every `interval`."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def wait_until(check: Callable[[], T], timeout: float = 10, what: str = "condition", interval: float = 0.05) -> T:
    """The first true value of `check()`; an AssertionError naming `what` if none comes within `timeout`."""
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} not reached within {timeout:g}s"
        time.sleep(interval)
    return value
