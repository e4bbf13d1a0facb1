"""Where a pod burst's CPU goes, per kind of process: criopy's or the floor's (prints, asserts nothing).

    sudo .venv/bin/python -m bench.burst_cpu_split [--what criopy|floor] [--pods 110 --clients 16] [--rounds 3]

The same environment and bursts as bench/bursts_vs_containerd.py. `perf record -a` samples every CPU (cpu-clock,
999 Hz) over each burst's start and removal, with the fork events that tell a `runc create` (conmon's child)
and its init (runc's child) from a `runc delete` (the daemon's); the samples are summed per kind of process
(the daemon, the bench's own client or driver threads, conmon, each runc step, each CNI plugin, setpriv, kernel
threads), user and kernel apart, in CPU seconds per burst (mean over --rounds). Every process of the machine
counts, by its name: run it on a quiet machine (another runtime's runc or conmon would count as the burst's);
the processes of no kind listed are shown as `other: <comm>`. Needs perf (Debian's linux-perf).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from bench.burst_floor import Floor
from bench.bursts_vs_containerd import Burst, remove_burst, start_burst, stop_recorder
from bench.containers_vs_containerd import SUBNET_OCTETS, Criopy, bench_env, lifecycle_once, pull

T = TypeVar("T")
Seconds = dict[tuple[str, str, str], float]  # (phase, process kind, user | kernel) -> CPU seconds
FREQUENCY = 999  # samples per second and CPU
FORK = re.compile(r"comm=(\S+) pid=(\d+) child_comm=(\S+) child_pid=(\d+)")
SAMPLE = re.compile(r"^\s*(.+?)\s+(\d+)\s+(\d+\.\d+):\s+cpu-clock:\s+([0-9a-f]+)")
HELPERS = ("conmon", "bridge", "host-local", "portmap", "setpriv", "sleep")
KERNEL_THREADS = ("kworker", "ksoftirqd", "rcu", "migration", "kcompactd", "kdamond", "khugepaged", "kswapd")


@dataclass(frozen=True)
class Phase:
    name: str  # start | remove
    begin: float  # CLOCK_MONOTONIC seconds, as perf records them with -k CLOCK_MONOTONIC
    end: float


@dataclass(frozen=True)
class Sample:
    comm: str
    pid: int
    time: float
    kernel: bool


def parse(script: str) -> tuple[list[Sample], dict[int, str]]:
    """perf script's lines: the cpu-clock samples, and each forked pid's parent's comm."""
    samples: list[Sample] = []
    parents: dict[int, str] = {}
    for line in script.splitlines():
        fork = FORK.search(line)
        if fork:
            parents[int(fork.group(4))] = fork.group(1)
            continue
        found = SAMPLE.match(line)
        if found:
            comm, pid, at, ip = found.groups()
            samples.append(Sample(comm, int(pid), float(at), ip.startswith("ffff")))
    return samples, parents


def kind(sample: Sample, phase: str, daemon: int, parents: dict[int, str]) -> str:
    by_pid = {daemon: "daemon (python)", os.getpid(): "bench client / floor driver (python)"}
    if sample.pid in by_pid:
        return by_pid[sample.pid]
    if sample.comm == "runc":
        # conmon forks `runc create`, which forks its init (named "runc" until nsexec renames it); the daemon
        # (or the floor's driver) runs `runc delete`, and since the start through the exec fifo no runc in
        # the start phase
        parent = parents.get(sample.pid)
        if parent == "runc":
            return "runc init"
        step = "create" if parent == "conmon" else "(daemon's)" if phase == "start" else "delete"
        return f"runc {step}"
    if sample.comm.startswith("runc:["):
        return "runc init"
    if sample.comm in HELPERS:
        return sample.comm
    return "kernel threads" if sample.comm.startswith(KERNEL_THREADS) else f"other: {sample.comm}"


def split(data: Path, daemon: int, phases: list[Phase]) -> Seconds:
    """CPU seconds per (phase, kind, user|kernel); idle (pid 0) left out."""
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "comm,pid,time,event,ip,trace"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    samples, parents = parse(script)
    seconds: Seconds = defaultdict(float)
    for sample in samples:
        phase = next((p.name for p in phases if p.begin <= sample.time <= p.end), None)
        if phase is None or sample.pid == 0:
            continue
        mode = "kernel" if sample.kernel else "user"
        seconds[(phase, kind(sample, phase, daemon, parents), mode)] += 1 / FREQUENCY
    return seconds


class Perf:
    """perf record over the whole machine until stopped."""

    def __init__(self, out: Path) -> None:
        argv = ["perf", "record", "-a", "-q", "-F", str(FREQUENCY), "-k", "CLOCK_MONOTONIC", "-o", str(out)]
        self.proc = subprocess.Popen(
            [*argv, "-e", "cpu-clock", "-e", "sched:sched_process_fork"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.5)  # perf's own start-up is not the burst's

    def stop(self) -> None:
        stop_recorder(self.proc)


def timed_burst(start: Callable[[], T], remove: Callable[[T], None], data: Path) -> list[Phase]:
    perf = Perf(data)
    try:
        began = time.monotonic()
        pods = start()
        started = time.monotonic()
        remove(pods)
        removed = time.monotonic()
    finally:
        perf.stop()
    return [Phase("start", began, started), Phase("remove", started, removed)]


def measure(what: str, burst: Burst, rounds: int, work: Path) -> Seconds:
    total: Seconds = defaultdict(float)
    with bench_env() as env:
        if what == "criopy":
            rt = Criopy(env)
            rt.start()
            try:
                pull(rt)
                for _ in range(3):
                    lifecycle_once(rt)
                for i in range(rounds):
                    data = work / f"criopy-{i}.data"
                    phases = timed_burst(
                        lambda: start_burst(rt, burst),
                        lambda pods: remove_burst(rt, pods, burst.clients),
                        data,
                    )
                    add(total, split(data, rt.daemon_pid(), phases))
            finally:
                rt.stop()
        else:
            floor = Floor(env.base / "floor", f"10.202.{next(SUBNET_OCTETS)}")
            try:
                floor.prepare()
                for i in range(rounds):
                    data = work / f"floor-{i}.data"
                    phases = timed_burst(
                        lambda: floor.start_burst(burst.pods, burst.clients),
                        lambda pods: floor.remove_burst(pods, burst.clients),
                        data,
                    )
                    add(total, split(data, -1, phases))
            finally:
                floor.stop()
    return {key: value / rounds for key, value in total.items()}


def add(total: Seconds, more: Seconds) -> None:
    for key, value in more.items():
        total[key] += value


def table(seconds: Seconds) -> str:
    columns = [(phase, mode) for phase in ("start", "remove") for mode in ("user", "kernel")]
    kinds = sorted({k for _, k, _ in seconds}, key=lambda k: -sum(v for (_, kk, _), v in seconds.items() if kk == k))
    lines = [f"{'process kind':38} {'start usr':>9} {'start sys':>9} {'rm usr':>9} {'rm sys':>9} {'total':>8}"]
    for name in [*kinds, "all"]:
        cells = [
            sum(v for (p, k, m), v in seconds.items() if (p, m) == column and name in (k, "all")) for column in columns
        ]
        lines.append(f"{name:38} " + " ".join(f"{c:9.2f}" for c in cells) + f" {sum(cells):8.2f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", choices=("criopy", "floor"), default="criopy")
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("perf") is None:
        raise SystemExit("run as root, with perf installed (apt-get install linux-perf)")
    work = Path(tempfile.mkdtemp(prefix="burst-split-"))
    try:
        seconds = measure(args.what, Burst(args.pods, args.clients), args.rounds, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"CPU seconds per burst of {args.pods} pods, {args.clients} clients ({args.what}, mean of {args.rounds})")
    print(table(seconds))


if __name__ == "__main__":
    main()
