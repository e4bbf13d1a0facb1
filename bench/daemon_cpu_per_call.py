"""The daemon's own CPU per CRI call of a pod's life, one call at a time (prints, asserts nothing).

    sudo .venv/bin/python -m bench.daemon_cpu_per_call [--pods 100] [--settle-ms 40]

The environment of bench/containers_vs_containerd.py (criopy only). Each pod is the bursts' pod (one busybox
container), its seven calls made one after the other: RunPodSandbox, CreateContainer, StartContainer,
StopContainer (timeout 0), RemoveContainer, StopPodSandbox, RemovePodSandbox. Around each call, after
`--settle-ms` of quiet so that the work a call leaves behind (a reaped conmon, an exit recorded) counts for
it, the daemon's user and kernel CPU (/proc/<pid>/stat: every thread, the ended ones too; not its children)
is read; the idle daemon's own rate, measured over the same kind of window before the pods, is taken off.
Printed: the means per call over --pods pods, and the median of each call's own time (wall ms). With nothing
else running, this is what a call costs the daemon itself, with no contention: the part of a burst's CPU no
scheduling can hide. A burst's figure is in bench/bursts_vs_containerd.py; the other processes' CPU, in
bench/burst_cpu_split.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from api.runtime.v1 import api_pb2 as pb
from bench.bursts_vs_containerd import cpu_split
from bench.containers_vs_containerd import (
    RPC_TIMEOUT,
    STEPS,
    Criopy,
    bench_env,
    container_config,
    lifecycle_once,
    new_pod_config,
    pull,
)

T = TypeVar("T")


@dataclass
class Meter:
    """CPU seconds (user, kernel) of one process per named step, less its idle rate over each window."""

    pid: int
    settle: float
    idle_rate: tuple[float, float] = (0.0, 0.0)  # CPU seconds per second of an idle window
    totals: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(lambda: [0.0, 0.0]))
    walls: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))  # each call's seconds

    def measure_idle(self, seconds: float) -> None:
        user, kernel = cpu_split(self.pid)
        time.sleep(seconds)
        after = cpu_split(self.pid)
        self.idle_rate = ((after[0] - user) / seconds, (after[1] - kernel) / seconds)

    def step(self, name: str, call: Callable[[], T]) -> T:
        time.sleep(self.settle)
        user, kernel = cpu_split(self.pid)
        began = time.monotonic()
        out = call()
        self.walls[name].append(time.monotonic() - began)
        time.sleep(self.settle)
        window = time.monotonic() - began
        after = cpu_split(self.pid)
        self.totals[name][0] += after[0] - user - self.idle_rate[0] * window
        self.totals[name][1] += after[1] - kernel - self.idle_rate[1] * window
        return out


def one_pod(rt: Criopy, meter: Meter) -> None:
    config = new_pod_config(rt)
    ran = meter.step(
        "RunPodSandbox", lambda: rt.rs.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=RPC_TIMEOUT)
    )
    pod_id = ran.pod_sandbox_id
    create = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=container_config(rt, 0), sandbox_config=config)
    cid = meter.step("CreateContainer", lambda: rt.rs.CreateContainer(create, timeout=RPC_TIMEOUT)).container_id
    meter.step(
        "StartContainer", lambda: rt.rs.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=RPC_TIMEOUT)
    )
    stop = pb.StopContainerRequest(container_id=cid, timeout=0)
    meter.step("StopContainer", lambda: rt.rs.StopContainer(stop, timeout=RPC_TIMEOUT))
    remove = pb.RemoveContainerRequest(container_id=cid)
    meter.step("RemoveContainer", lambda: rt.rs.RemoveContainer(remove, timeout=RPC_TIMEOUT))
    stop_pod = pb.StopPodSandboxRequest(pod_sandbox_id=pod_id)
    meter.step("StopPodSandbox", lambda: rt.rs.StopPodSandbox(stop_pod, timeout=RPC_TIMEOUT))
    remove_pod = pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
    meter.step("RemovePodSandbox", lambda: rt.rs.RemovePodSandbox(remove_pod, timeout=RPC_TIMEOUT))


def table(meter: Meter, pods: int) -> str:
    lines = [f"{'call':18} {'user ms':>8} {'kernel ms':>9} {'total ms':>8} {'wall ms':>8}"]
    sums = [0.0, 0.0, 0.0]
    for name in STEPS:
        user, kernel = (value / pods * 1000 for value in meter.totals[name])
        wall = statistics.median(meter.walls[name]) * 1000
        sums = [sums[0] + user, sums[1] + kernel, sums[2] + wall]
        lines.append(f"{name:18} {user:8.2f} {kernel:9.2f} {user + kernel:8.2f} {wall:8.2f}")
    lines.append(f"{'a pod, all calls':18} {sums[0]:8.2f} {sums[1]:9.2f} {sums[0] + sums[1]:8.2f} {sums[2]:8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=100)
    parser.add_argument("--settle-ms", type=float, default=40.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root")
    if args.pods < 1 or args.settle_ms < 0:
        parser.error("need --pods >= 1 and --settle-ms >= 0")
    with bench_env() as env:
        rt = Criopy(env)
        rt.start()
        try:
            pull(rt)
            for _ in range(3):  # the first pods' one-off costs (imports, caches) are no call's
                lifecycle_once(rt)
            meter = Meter(rt.daemon_pid(), args.settle_ms / 1000)
            meter.measure_idle(5.0)
            for _ in range(args.pods):
                one_pod(rt, meter)
        finally:
            rt.stop()
    ticks = 1000 / os.sysconf("SC_CLK_TCK")
    print(f"the daemon's CPU per call, mean of {args.pods} pods one call at a time (clock tick {ticks:g} ms)")
    print(
        f"idle rate taken off: {meter.idle_rate[0] * 1000:.2f} ms user, {meter.idle_rate[1] * 1000:.2f} ms kernel per s"
    )
    print(table(meter, args.pods))


if __name__ == "__main__":
    main()
