"""conmon's own cgroup, outside the daemon's.

conmon double-forks out of the daemon's process tree but would stay in its cgroup: under systemd that is
criopy.service's, and everything in it belongs to the unit (a `systemctl stop` with any KillMode but
`process`, `systemctl kill`, a MemoryMax on the unit). As cri-o moves conmon to its own cgroup, criopy
moves each conmon into `criopy-conmon` at the root of every mounted hierarchy (the root of the cgroup
namespace: a node container's own subtree), beside the pods rather than inside the daemon.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from cri.log import event

log = logging.getLogger(__name__)

MONITOR_CGROUP = "criopy-conmon"
MOUNTINFO = Path("/proc/self/mountinfo")


def hierarchy_roots(mountinfo: str) -> list[Path]:
    """One mount point per writable cgroup hierarchy (v1 and v2) whose mount shows the hierarchy's root.

    A read-only one is not ours to arrange: in a node container systemd keeps name=systemd read-only and
    tracks its units on cgroup2."""
    roots: dict[str, Path] = {}
    for line in mountinfo.splitlines():
        head, sep, tail = line.partition(" - ")
        fields, fs = head.split(), tail.split()
        if not (sep and len(fields) >= 6 and fs and fs[0] in ("cgroup", "cgroup2") and fields[3] == "/"):
            continue
        if "ro" not in fields[5].split(","):
            roots.setdefault(fields[2], Path(fields[4]))  # keyed by the device: a hierarchy mounted twice counts once
    return list(roots.values())


@dataclass
class _Known:
    """The monitors' cgroups of every hierarchy, once each took a conmon: later moves write only the pid,
    where looking again (the mount table, whole, with a full node's pod mounts in it; a mkdir and the cpuset
    files per hierarchy) cost a few milliseconds of every container's creation."""

    targets: tuple[Path, ...] | None = None


_known = _Known()


def move_monitor(pid: int, container_id: str) -> None:
    """Blocking: put conmon `pid` into the monitors' cgroup of every hierarchy. A hierarchy that refuses
    (read-only, not ours to write) is logged and skipped: the container runs either way."""
    known = _known.targets
    if known is not None:
        try:
            for target in known:
                _attach(target, pid)
            return
        except OSError:
            pass  # a hierarchy went or its cgroup was removed: look again, as the first time
    _known.targets = _move_looking(pid, container_id)


def _move_looking(pid: int, container_id: str) -> tuple[Path, ...] | None:
    """The move, the hierarchies read from the mount table; the targets, or None when one refused."""
    try:
        roots = hierarchy_roots(MOUNTINFO.read_text())
    except OSError as exc:
        event(log, logging.WARNING, "conmon cgroup move skipped", id=container_id, error=str(exc))
        return None
    targets: list[Path] = []
    for root in roots:
        target = root / MONITOR_CGROUP
        try:
            target.mkdir(exist_ok=True)
            _inherit_cpuset(root, target)
            _attach(target, pid)
            targets.append(target)
        except OSError as exc:
            event(
                log,
                logging.WARNING,
                "conmon left in the daemon cgroup",
                id=container_id,
                hierarchy=str(root),
                pid=pid,
                error=exc.strerror or str(exc),
            )
    return tuple(targets) if len(targets) == len(roots) else None


def _attach(cgroup: Path, pid: int) -> None:
    """Never creating the file: a path that is no longer a cgroup (its hierarchy unmounted) must fail."""
    fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, str(pid).encode())
    finally:
        os.close(fd)


def _inherit_cpuset(parent: Path, child: Path) -> None:
    """A new v1 cpuset cgroup starts with no CPUs and no memory nodes and takes no process until given some."""
    for name in ("cpuset.cpus", "cpuset.mems"):
        mine = child / name
        if mine.exists() and not mine.read_text().strip():
            mine.write_text((parent / name).read_text())
