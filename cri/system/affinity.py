"""The CPUs of the daemon's blocking-call threads (cri.system.offload), and processes started from them.

CPython's threads take turns at one lock, the GIL, and a thread hands it over at every blocking call it
makes. When the offload pool's threads float over every core those hand-overs cross cores: a futex wake of
a thread on another CPU (an interrupt between cores; on a VM, an exit to the hypervisor), with the lock's
cache line moving along. In a 110-pod burst on a 2-core VM the daemon spent a fifth of its CPU in futex
calls. Bound to one CPU, the pool's threads still overlap their waits (fsync, mounts, the database) but hand
over on one core: the same burst cost the daemon 11-14% less CPU and ended 2-6% sooner (bench/README).

No process the daemon starts may inherit a binding: a conmon, a container or a CNI plugin held to one CPU
would be a fault. The threads that start processes (the event loop, the helper and CNI pools) are never
bound, and a bound thread that starts one does it inside `unbound()`. Threads a bound thread makes are
bound as well (nsthread's throwaway threads, linux.mount_in's): they start no process.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator, Set

AUTO = "auto"
ALL = "all"
SPEC_HELP = "'auto', 'all', or CPU numbers such as 0 or 0-3,8"
MAX_CPU = 8191  # the kernel's largest CPU number (NR_CPUS is at most 8192)


def check(spec: str) -> None:
    """ValueError unless `spec` is a value `resolve` takes (whatever CPUs the daemon has)."""
    if spec not in (AUTO, ALL):
        parse_list(spec)


def resolve(spec: str, allowed: Set[int]) -> frozenset[int] | None:
    """The CPUs `spec` binds the blocking-call threads to, within the daemon's `allowed` CPUs; None binds
    them to none. ValueError says what is wrong with `spec`."""
    if spec == ALL:
        return None
    if spec == AUTO:
        # The lowest-numbered CPU: the one a node keeps for its system daemons (the kubelet's reserved
        # CPUs usually start at 0), and never one the kubelet's CPU manager gives a pod for itself.
        return frozenset({min(allowed)}) if len(allowed) > 1 else None
    cpus = parse_list(spec)
    outside = cpus - allowed
    if outside:
        raise ValueError(f"CPU {format_list(outside)} is not one of the daemon's CPUs ({format_list(allowed)})")
    return None if cpus == allowed else frozenset(cpus)


def parse_list(text: str) -> set[int]:
    """The CPUs of a list in the kernel's cpulist format ('0', '0-3,8')."""
    cpus: set[int] = set()
    for part in text.split(","):
        bounds = re.fullmatch(r"([0-9]+)(?:-([0-9]+))?", part.strip())
        if bounds is None:
            raise ValueError(f"expected {SPEC_HELP}, got {text!r}")
        low = int(bounds[1])
        high = low if bounds[2] is None else int(bounds[2])
        if high > MAX_CPU:
            raise ValueError(f"CPU {high} is above {MAX_CPU}, the largest a Linux kernel numbers")
        if high < low:
            raise ValueError(f"the range {part.strip()!r} ends before it starts")
        cpus.update(range(low, high + 1))
    return cpus


def format_list(cpus: Iterable[int]) -> str:
    """The kernel's cpulist format: runs of CPUs as ranges ('0-3,8')."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)


def process_cpus() -> frozenset[int]:
    """The CPUs the daemon may run on: those of its main thread (the event loop's, which is never bound)."""
    return frozenset(os.sched_getaffinity(os.getpid()))


def bind_this_thread(cpus: Set[int]) -> None:
    os.sched_setaffinity(0, cpus)


@contextlib.contextmanager
def unbound() -> Iterator[None]:
    """The calling thread on all of the daemon's CPUs for the block, so that a process it starts there gets
    them all; its own binding again after."""
    own = os.sched_getaffinity(0)
    every = process_cpus()
    if own == every:
        yield
        return
    os.sched_setaffinity(0, every)
    try:
        yield
    finally:
        # Best effort: a refusal (the daemon's cpuset changed meanwhile) leaves the thread free, which harms
        # nothing, and must not replace what the block raised or returned.
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, own)
