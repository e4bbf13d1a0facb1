"""CPU % as crictl computes it: two stats answers a second apart, through the real daemon (root, runc, conmon).

crictl (`stats`, `statsp`) and tools built on the CRI client (a "top" asking ContainerStats twice) take
usage_core_nano_seconds from two answers `--seconds` apart and divide its growth by the growth of the cpu
timestamp; an unchanged timestamp with a non-zero usage is their error "cpu stat is not updated during sample".
Debian has no cri-tools package, so this file does crictl's arithmetic on the answers instead of running it.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import Env

BUSY = ["sh", "-c", "while true; do :; done"]
SAMPLE_SECONDS = 1.0  # crictl's default --seconds


class NotUpdated(AssertionError):
    """crictl's "cpu stat is not updated during sample"."""


def crictl_cpu_percent(old: pb.CpuUsage, new: pb.CpuUsage) -> float:
    """crictl's CPU %: no figure for a zero usage, an error for a usage whose timestamp did not move."""
    usage = new.usage_core_nano_seconds.value
    if usage == 0:
        return 0.0
    duration = new.timestamp - old.timestamp
    if duration == 0:
        raise NotUpdated(f"cpu stat is not updated during sample: {old} then {new}")
    return (usage - old.usage_core_nano_seconds.value) / duration * 100


def _readers(env: Env, pod_id: str, cid: str) -> dict[str, Callable[[], pb.CpuUsage]]:
    """Each way a client reads one container's or one pod's cpu figures."""
    rt = env.rt
    by_id = pb.ContainerStatsFilter(id=cid)
    pod_filter = pb.PodSandboxStatsFilter(id=pod_id)
    return {
        "ContainerStats": lambda: rt.ContainerStats(pb.ContainerStatsRequest(container_id=cid), timeout=10).stats.cpu,
        "ListContainerStats": lambda: (
            rt.ListContainerStats(pb.ListContainerStatsRequest(filter=by_id), timeout=10).stats[0].cpu
        ),
        "PodSandboxStats": lambda: (
            rt.PodSandboxStats(pb.PodSandboxStatsRequest(pod_sandbox_id=pod_id), timeout=10).stats.linux.cpu
        ),
        "ListPodSandboxStats": lambda: (
            rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(filter=pod_filter), timeout=10).stats[0].linux.cpu
        ),
    }


def _rounds(readers: dict[str, Callable[[], pb.CpuUsage]], count: int) -> list[dict[str, pb.CpuUsage]]:
    """`count` readings by every reader, SAMPLE_SECONDS apart, as crictl takes them."""
    out = []
    for i in range(count):
        if i:
            time.sleep(SAMPLE_SECONDS)
        out.append({name: read() for name, read in readers.items()})
    return out


def test_a_busy_container_has_a_cpu_percent_by_every_stats_call(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, env.container_config("busy", BUSY))
    # Three readings a second apart: whatever a background round does, two consecutive ones fall between rounds.
    rounds = _rounds(_readers(env, pod[0], cid), 3)
    for old, new in itertools.pairwise(rounds):
        for name in old:
            assert new[name].timestamp > old[name].timestamp, name
            assert new[name].usage_core_nano_seconds.value > old[name].usage_core_nano_seconds.value, name
            assert crictl_cpu_percent(old[name], new[name]) > 0, name


def test_an_exited_container_does_not_break_crictl_stats(env: Env) -> None:
    """crictl lists exited containers too (it skips only those with no cpu and no memory figures)."""
    pod = env.pod()
    cid = env.run(pod, env.container_config("busy", BUSY))
    time.sleep(0.5)
    ran = env.rt.ContainerStats(pb.ContainerStatsRequest(container_id=cid), timeout=10).stats
    assert ran.cpu.usage_core_nano_seconds.value > 0
    env.stop(cid, timeout=0)
    env.wait_exited(cid)
    rounds = _rounds(_readers(env, pod[0], cid), 2)
    for name in rounds[0]:
        old, new = rounds[0][name], rounds[1][name]
        assert crictl_cpu_percent(old, new) == 0, name  # no error, and nothing ran in between
        if name.startswith("Container") or name.startswith("ListContainer"):
            assert new.usage_nano_cores.value == 0, name
