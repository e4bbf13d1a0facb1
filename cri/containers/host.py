"""Facts about this host that shape every container spec, detected once at start."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from cri.containers import capabilities

CGROUP_ROOT = Path("/sys/fs/cgroup")
MOUNTINFO = Path("/proc/self/mountinfo")


@dataclass(frozen=True)
class HostFacts:
    bounding_caps: tuple[str, ...]  # what a privileged container gets
    oom_score_adj_floor: int  # lowest oom_score_adj a container may get (-1000 with CAP_SYS_RESOURCE)
    cgroup2: bool  # the unified hierarchy holds the controllers
    swap_accounting: bool
    hugetlb: bool
    apparmor: bool

    @classmethod
    def detect(cls) -> HostFacts:
        cgroup2 = (CGROUP_ROOT / "cgroup.controllers").exists()
        return cls(
            bounding_caps=tuple(capabilities.bounding_set()),
            oom_score_adj_floor=_oom_floor(),
            cgroup2=cgroup2,
            swap_accounting=_swap_accounting(cgroup2),
            hugetlb="hugetlb" in cgroup_v1_controllers(_read(MOUNTINFO)) or _v2_controller(cgroup2, "hugetlb"),
            apparmor=_read("/sys/module/apparmor/parameters/enabled").startswith("Y"),
        )


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def cgroup_v1_controllers(mountinfo: str) -> frozenset[str]:
    """The controllers of the cgroup v1 hierarchies mounted here, read from each cgroup mount's super options.

    A directory named after a controller proves nothing: a container's systemd, given the host's
    /sys/fs/cgroup, once made an empty `hugetlb` directory on the host, and limits passed for it then failed
    in runc. Only a mount of fstype `cgroup` whose options name the controller counts."""
    found: set[str] = set()
    for line in mountinfo.splitlines():
        _, sep, tail = line.partition(" - ")
        fields = tail.split()
        if sep and len(fields) >= 3 and fields[0] == "cgroup":
            found.update(opt for opt in fields[2].split(",") if opt not in _V1_MOUNT_OPTIONS and "=" not in opt)
    return frozenset(found)


# Super options of a v1 cgroup mount that are not controller names (`name=systemd` is dropped by its '=').
_V1_MOUNT_OPTIONS = frozenset({"rw", "ro", "noprefix", "clone_children", "cpuset_v2_mode", "xattr"})


def _oom_floor() -> int:
    """Without CAP_SYS_RESOURCE nothing below our own oom_score_adj is allowed (containerd's
    restrict_oom_score_adj): values under it are clamped, so containers never fail on it."""
    if capabilities.has_effective("CAP_SYS_RESOURCE"):
        return -1000
    try:
        return int(_read(f"/proc/{os.getpid()}/oom_score_adj") or 0)
    except ValueError:
        return 0


def _swap_accounting(cgroup2: bool) -> bool:
    if cgroup2:
        return _v2_controller(cgroup2, "memory") and bool(list(CGROUP_ROOT.glob("*/memory.swap.max")))
    return (CGROUP_ROOT / "memory" / "memory.memsw.limit_in_bytes").exists()


def _v2_controller(cgroup2: bool, name: str) -> bool:
    return cgroup2 and name in _read(CGROUP_ROOT / "cgroup.controllers").split()
