"""Pod bursts, the unary floor and idle cost: criopy against Debian's containerd 1.6, one run (prints, asserts nothing).

    sudo .venv/bin/python -m bench.bursts_vs_containerd [--rounds 3] [--loaded-rounds 8] [--version-calls 2000]
        [--idle-containers 100 --idle-seconds 60] [--only criopy|containerd] [--profile-criopy /tmp/burst.svg]
        [--skip-floor] [--sections bursts,version,loaded,idle] [--scratch DIR]

Same environment as bench/containers_vs_containerd.py (its runtimes, registry, CNI bridge and requests), and
the same rule: both daemons run at once, every figure is sampled in turns. Figures (medians over --rounds):

1. bursts: 50 pods x 1 container started by 8 client threads, then removed by 8; 110 pods with 16 threads
   (a node's max pods, as after a reboot); each burst timed while the other runtime holds no pods;
   beside them, in the column "floor", the same bursts of the same runc/conmon/CNI work without a daemon
   (bench/burst_floor.py: Python threads exec'ing the binaries, what no runtime using them can beat here),
   one after each round of the runtimes; its "daemon CPU" is its driver's (the bench's own threads);
2. the unary floor: `Version` round trips, in blocks taken in turns, median and p99 per call;
3. `Version` while a 50-pod burst and a pull of a 150 MB image (bench/pulls_vs_containerd's large one,
   removed again after each round) run at once: one more client calling Version every 5 ms from a process
   of its own (bench/version_probe: in the bench's process it waited for the client threads' GIL), its
   p50 / p99 / max; in the floor column, the same from a second probe calling a server that answers
   Version and does nothing else (bench/version_floor_server: criopy's transport, its loop raised as
   criopy's is) during the first runtime's turns, the machine's own share of those figures; over
   --loaded-rounds rounds per runtime (a round gives about 400 calls, so the p99 of 3 rounds rests on the 12
   slowest: it moved 14-29 ms between runs, and 17-21 ms over 8 rounds);
4. idle cost: CPU seconds (user + system) of the daemon and its monitors (criopy: the daemon, its helper
   processes and one conmon per container; containerd: the daemon and one shim per pod) over
   --idle-seconds with --idle-containers idle containers (one per pod), both runtimes holding theirs at
   once and measured over the same window, each holding bench/pulls_vs_containerd's two images as well
   (52k files: a node keeps images, and walking them costs a runtime that measures its image store so).

`--profile-criopy out.svg` records criopy's daemon with py-spy (`pip install py-spy`) during its first
110-pod burst (start and removal): a flame graph, or for any other suffix collapsed stacks per thread.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from api.runtime.v1 import api_pb2 as pb
from bench.burst_floor import Floor
from bench.containers_vs_containerd import (
    RUNTIMES,
    SETTLE,
    SUBNET_OCTETS,
    Env,
    Pod,
    Results,
    Run,
    Runtime,
    children,
    end_pod,
    lifecycle_once,
    run_bench,
    run_pod,
    start_container,
)
from bench.pulls_vs_containerd import large_image, small_files_image
from bench.version_floor_server import FloorServer
from bench.version_probe import VersionProbe
from tests.support import image_builder as ib

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
FLOOR = "floor"  # the column of the bursts' floor
VERSION = pb.VersionRequest()
SECTIONS = ("bursts", "version", "loaded", "idle")  # figures 1, 2, 3 and 4 above


@dataclass(frozen=True)
class Burst:
    pods: int
    clients: int

    @property
    def label(self) -> str:
        return f"{self.pods} pods x 1 container, {self.clients} clients"


BURSTS = (Burst(50, 8), Burst(110, 16))


def start_burst(rt: Runtime, burst: Burst) -> list[Pod]:
    def one(_: int) -> Pod:
        pod = run_pod(rt)
        start_container(rt, pod, 0)
        return pod

    with ThreadPoolExecutor(burst.clients) as pool:
        return list(pool.map(one, range(burst.pods)))


def remove_burst(rt: Runtime, pods: list[Pod], clients: int) -> None:
    """As the kubelet removes a pod: its container stopped and removed, then the pod stopped and removed."""

    def one(pod: Pod) -> None:
        for cid in pod.containers:
            rt.rs.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=120)
            rt.rs.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=120)
        end_pod(rt, pod.id)

    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, pods))


class PySpy:
    """py-spy recording one process until stopped (SIGINT makes it write its flame graph)."""

    def __init__(self, pid: int, out: str) -> None:
        # A flame graph for out.svg; else collapsed stacks per thread, to be read as text.
        flame = out.endswith(".svg")
        options = ["--rate", "200", *(() if flame else ("--format", "raw", "--threads"))]
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--output", out, *options],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        stop_recorder(self.proc)


def stop_recorder(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT a recorder (py-spy, perf: it writes its output then), killed if it takes over a minute."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (not idle, not waiting for I/O) since boot, all CPUs."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICKS


@dataclass(frozen=True)
class BurstSample:
    start_s: float
    remove_s: float
    machine_cpu_s: float  # busy CPU of the whole machine over start and removal (helpers, plugins, kernel)
    daemon_cpu_s: float  # the daemon's own CPU (all its threads) over start and removal
    daemon_kernel_s: float  # of which in the kernel (namespaces, mounts, forks)


def time_burst(rt: Runtime, burst: Burst, profile: str | None) -> BurstSample:
    spy = PySpy(rt.daemon_pid(), profile) if profile else None
    daemon, machine = cpu_split(rt.daemon_pid()), machine_busy_seconds()
    try:
        started = time.perf_counter()
        pods = start_burst(rt, burst)
        start_s = time.perf_counter() - started
        started = time.perf_counter()
        remove_burst(rt, pods, burst.clients)
        remove_s = time.perf_counter() - started
    finally:
        if spy is not None:
            spy.stop()
    user, kernel = (after - before for after, before in zip(cpu_split(rt.daemon_pid()), daemon, strict=True))
    return BurstSample(start_s, remove_s, machine_busy_seconds() - machine, user + kernel, kernel)


def time_floor_burst(floor: Floor, burst: Burst) -> BurstSample:
    """The same burst through the floor's driver: its threads are the bench's own, so its CPU is ours."""
    machine, driver = machine_busy_seconds(), os.times()
    started = time.perf_counter()
    pods = floor.start_burst(burst.pods, burst.clients)
    start_s = time.perf_counter() - started
    started = time.perf_counter()
    floor.remove_burst(pods, burst.clients)
    remove_s = time.perf_counter() - started
    # os.times: this process's threads (user, system), not its children's
    after = os.times()
    user, kernel = after.user - driver.user, after.system - driver.system
    return BurstSample(start_s, remove_s, machine_busy_seconds() - machine, user + kernel, kernel)


def bursts(run: Run, rounds: int, profile: str | None, floor: Floor | None) -> None:
    for burst in BURSTS:
        print(f"bursts of {burst.label} x {rounds}, in turns" + (", then the floor" if floor else ""), flush=True)
        profiled = False

        def sample(rt: Runtime, burst: Burst = burst) -> BurstSample:
            nonlocal profiled
            want = profile if rt.name == "criopy" and burst.pods == 110 and not profiled else None
            profiled = profiled or want is not None
            return time_burst(rt, burst, want)

        collected: dict[str, list[BurstSample]] = {}
        for _ in range(rounds):
            for name, samples in run.interleaved(f"the {burst.label} burst", 1, sample).items():
                collected.setdefault(name, []).extend(samples)
            if floor is not None:
                floor = floor_sample(run, floor, burst, collected)
        live = {rt.name for rt in run.live} | {FLOOR}
        for name, samples in collected.items():
            if name in live:
                record_burst(run.results.setdefault(name, Results()), burst, samples)


def floor_sample(run: Run, floor: Floor, burst: Burst, collected: dict[str, list[BurstSample]]) -> Floor | None:
    """One floor burst after the runtimes' turn; None (no more floor) once it failed, with a note."""
    time.sleep(SETTLE)
    try:
        collected.setdefault(FLOOR, []).append(time_floor_burst(floor, burst))
    except Exception as error:  # the floor failing must not cost the runtimes their figures
        traceback.print_exc()
        run.results.setdefault(FLOOR, Results()).notes.append(f"floor: stopped at the {burst.label} burst: {error}")
        return None
    return floor


def record_burst(results: Results, burst: Burst, samples: list[BurstSample]) -> None:
    figures = results.figures
    figures[f"start {burst.label} (s)"] = statistics.median(s.start_s for s in samples)
    figures[f"remove {burst.label} (s)"] = statistics.median(s.remove_s for s in samples)
    figures[f"  machine CPU, {burst.pods}-pod start + removal (s)"] = statistics.median(
        s.machine_cpu_s for s in samples
    )
    # For the floor: its driver's threads (the bench's own), the part of the machine's that is no binary's.
    figures[f"  daemon CPU, {burst.pods}-pod start + removal (s)"] = statistics.median(s.daemon_cpu_s for s in samples)
    figures[f"    of which kernel, {burst.pods} pods (s)"] = statistics.median(s.daemon_kernel_s for s in samples)


def version_calls_ms(rt: Runtime, calls: int) -> list[float]:
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        rt.rs.Version(VERSION, timeout=10)
        out.append((time.perf_counter() - started) * 1000)
    return out


def percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def version_floor(run: Run, calls: int) -> None:
    blocks = 10
    for rt in run.live:
        version_calls_ms(rt, 200)  # warm-up: the channel's connection, caches
    collected = run.interleaved("Version", blocks, lambda rt: version_calls_ms(rt, max(1, calls // blocks)))
    for name, per_block in collected.items():
        samples = [s for block in per_block for s in block]
        figures = run.results[name].figures
        figures[f"Version round trip, median of {len(samples)} (ms)"] = statistics.median(samples)
        figures["Version round trip p99 (ms)"] = percentile(samples, 0.99)


def version_under_burst(run: Run, rounds: int, pull_ref: str, floor_socket: str) -> None:
    """Version p50/p99/max from one more client while a 50-pod burst and a pull of `pull_ref` run at once;
    in the floor column, a second probe's against a server answering Version and nothing else
    (bench/version_floor_server) during the first runtime's turns: what the loaded machine costs by itself."""
    burst = BURSTS[0]

    def sample(rt: Runtime) -> tuple[list[float], list[float]]:
        probe, floor_probe = VersionProbe(rt.socket), VersionProbe(floor_socket)
        try:
            with ThreadPoolExecutor(1) as puller:
                pulled = puller.submit(pull_images, rt, [pull_ref])
                pods = start_burst(rt, burst)
                remove_burst(rt, pods, burst.clients)
                pulled.result()
        finally:
            samples, floor_samples = probe.stop(), floor_probe.stop()
        # The next round pulls it again, from the registry, not from the store.
        rt.images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=pull_ref)), timeout=120)
        return samples, floor_samples

    print(f"Version during bursts of {burst.label} and a pull of {pull_ref} x {rounds}, in turns", flush=True)
    with FloorServer(floor_socket):
        collected = run.interleaved("Version under a burst and a pull", rounds, sample)
    where = f"during a {burst.pods}-pod burst + 150 MB pull"
    for name, per_round in collected.items():
        record_version_under_load(run.results[name], where, [s for r, _ in per_round for s in r])
    if collected:
        first, per_round = next(iter(collected.items()))
        floor = run.results.setdefault(FLOOR, Results())
        record_version_under_load(floor, where, [s for _, r in per_round for s in r])
        floor.notes.append(f"floor, Version {where}: a Version-only server beside {first}, in {first}'s turns")


def record_version_under_load(results: Results, where: str, samples: list[float]) -> None:
    results.figures[f"Version p50 {where} (ms)"] = statistics.median(samples)
    results.figures[f"Version p99 {where} (ms)"] = percentile(samples, 0.99)
    results.figures[f"Version max {where} (ms)"] = max(samples)


def cpu_split(pid: int) -> tuple[float, float]:
    """(utime, stime) of every thread of pid, in seconds (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of pid, in seconds (0 once it is gone)."""
    return sum(cpu_split(pid))


def overhead_pids(rt: Runtime, pods: list[Pod]) -> list[int]:
    """The daemon, its own helper processes (not monitors) and the monitors of pods."""
    daemon = rt.daemon_pid()
    monitors = {pid for pod in pods for pid in rt.monitor_pids(pod)}
    helpers = {c for c in children(daemon) if c not in monitors}
    return [daemon, *sorted(helpers), *sorted(monitors)]


def idle_cost(run: Run, containers: int, seconds: float, images: list[str]) -> None:
    print(f"{containers} idle containers on each runtime, CPU over {seconds:.0f} s", flush=True)
    held: dict[str, list[Pod]] = {}
    try:
        run.each("pulling the images held", lambda rt: pull_images(rt, images))
        run.each("starting the idle pods", lambda rt: held.setdefault(rt.name, start_burst(rt, Burst(containers, 8))))
        time.sleep(5)  # the burst's own tail (exits of helpers, late writes) is not idle cost
        pids = {rt.name: overhead_pids(rt, held[rt.name]) for rt in run.live if rt.name in held}
        before = {pid: cpu_seconds(pid) for group in pids.values() for pid in group}
        time.sleep(seconds)
        for name, group in pids.items():
            # A helper that ended in the window (criopy's idle unpack workers leave after 30 s) counts
            # nothing: its last figures went with it.
            after = {pid: cpu_seconds(pid) for pid in group if Path(f"/proc/{pid}").exists()}
            figures = run.results[name].figures
            figures[f"idle CPU, daemon + monitors, {containers} containers, {seconds:.0f} s (s)"] = sum(
                after[pid] - before[pid] for pid in after
            )
            figures[f"idle: processes counted, {containers} containers"] = len(after)
    finally:
        run.each("removing the idle pods", lambda rt: remove_burst(rt, held.get(rt.name, []), 8))


def measure(runtimes: list[Runtime], args: argparse.Namespace) -> dict[str, Results]:
    run = Run(runtimes)
    floor = None
    if not args.skip_floor and "bursts" in args.sections:
        floor = Floor(runtimes[0].env.base / FLOOR, f"10.202.{next(SUBNET_OCTETS)}")
    try:
        if floor is not None:
            floor.prepare()
        for rt in runtimes:
            print(f"{rt.name}: starting", flush=True)
        run.each("start", start_and_pull(run))
        run.each("the warm-up", lambda rt: [lifecycle_once(rt, check=run.res(rt)) for _ in range(3)])
        if "version" in args.sections:
            print(f"Version x {args.version_calls}, in turns", flush=True)
            version_floor(run, args.version_calls)
        if "bursts" in args.sections:
            bursts(run, args.rounds, args.profile_criopy, floor)
        if "loaded" in args.sections:
            floor_socket = str(runtimes[0].env.base / "version-floor.sock")
            version_under_burst(run, args.loaded_rounds, push_large_image(runtimes[0].env), floor_socket)
        if "idle" in args.sections and args.idle_seconds > 0:
            env = runtimes[0].env
            idle_cost(run, args.idle_containers, args.idle_seconds, [push_large_image(env), push_small_image(env)])
    finally:
        for rt in runtimes:
            try:
                rt.stop()
            except Exception:  # a failed clean-up of one runtime must not skip the other's
                traceback.print_exc()
        if floor is not None:
            floor.stop()
    return run.results


def push_large_image(env: Env) -> str:
    """bench/pulls_vs_containerd's large image (150 MB in 9 layers) in the bench's registry; its ref."""
    ib.push(env.registry.url, "bench/large", large_image(), tag="v1")
    return f"{env.registry.host}/bench/large:v1"


def push_small_image(env: Env) -> str:
    """bench/pulls_vs_containerd's many-small-files image (40k files in 3 layers) in the bench's registry; its ref."""
    ib.push(env.registry.url, "bench/small", small_files_image(), tag="v1")
    return f"{env.registry.host}/bench/small:v1"


def pull_images(rt: Runtime, refs: list[str], timeout: float = 600) -> None:
    for ref in refs:
        rt.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=timeout)


def start_and_pull(run: Run) -> Callable[[Runtime], None]:
    def start(rt: Runtime) -> None:
        rt.start()
        run.res(rt).notes.append(f"{rt.name}: {rt.version()}")
        pull_images(rt, [rt.env.image, rt.env.pause_image], timeout=300)

    return start


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="bursts of each size per runtime (default 3)")
    parser.add_argument(
        "--loaded-rounds",
        type=int,
        default=8,
        help="rounds of Version under a burst and a pull per runtime (default 8)",
    )
    parser.add_argument("--version-calls", type=int, default=2000, help="Version calls per runtime (default 2000)")
    parser.add_argument("--idle-containers", type=int, default=100, help="idle containers (default 100)")
    parser.add_argument("--idle-seconds", type=float, default=60, help="idle window, 0 skips it (default 60)")
    parser.add_argument("--only", choices=sorted(RUNTIMES), help="measure one runtime")
    parser.add_argument("--scratch", type=Path, help="put the roots in this directory, not on a fresh ext4")
    parser.add_argument("--skip-floor", action="store_true", help="no floor row (the bursts without a daemon)")
    parser.add_argument(
        "--sections",
        type=lambda v: set(v.split(",")),
        default=set(SECTIONS),
        help=f"what to measure, of {','.join(SECTIONS)} (default all): 1-4 above",
    )
    parser.add_argument("--profile-criopy", metavar="SVG", help="py-spy flame graph of criopy's first 110 burst")
    args = parser.parse_args()
    if args.rounds < 1 or args.loaded_rounds < 1 or args.version_calls < 10:
        parser.error("need --rounds >= 1, --loaded-rounds >= 1 and --version-calls >= 10")
    if not args.sections <= set(SECTIONS):
        parser.error(f"--sections takes {','.join(SECTIONS)}")
    return args


def main() -> None:
    run_bench(parse_args(), measure)


if __name__ == "__main__":
    main()
