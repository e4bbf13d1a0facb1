"""criopy against Debian's containerd 1.6 (its CRI plugin), same machine, one run (prints figures, asserts nothing).

    sudo .venv/bin/python -m bench.containers_vs_containerd [--iterations 15] [--containers 200 --pods 20]
        [--only criopy|containerd] [--skip-scale] [--scratch DIR]

Both daemons run at once and every figure is sampled in turns, one runtime
then the other, so the VM's noise falls on both alike. They get the same
client (the generated gRPC stubs), the same busybox image from a loopback
docker-registry, the same CNI bridge conflist (own bridge and /24 each) and the
same requests. Figures:

1. the pod lifecycle, step by step and in total (median of --iterations, after
   one warm-up): a pod with a PID namespace per container, one busybox
   `sleep 3600` container, stopped with timeout 0 (SIGKILL at once);
2. ListContainers / ListContainerStats / ListPodSandbox latency and response
   size with --containers running containers in --pods pods, and Version
   latency, the floor of the client and server stack under them;
3. memory: the daemon's RSS and PSS with those containers, and the PSS and RSS
   of a pod's monitor processes (conmon per container for criopy, one
   containerd-shim-runc-v2 per pod for containerd) for 10- and 1-container pods.

Both runtimes' roots are on a fresh journaled ext4 made for the run
(bench/scratch; `--scratch DIR` puts them in DIR instead). containerd is
installed with apt-get when missing and runs on a private root, state and
socket; its pause image is Debian's static catatonit (`/pause -P`) built here
and pushed to the loopback registry. Everything is removed at the
end, also after an error or Ctrl-C. Run as root.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import secrets
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import grpc

from api.runtime.v1 import api_pb2 as pb
from api.runtime.v1 import api_pb2_grpc
from bench.bytecode import compile_tree
from bench.containerd_harness import (
    CGROUP_ROOT,
    Containerd,
    containerd_version,
    delete_runc_containers,
    ensure_containerd,
    kill,
    processes,
    remove_empty_tree,
    unmount_under,
)
from bench.scratch import filesystem_of, roots_in
from tests.e2e.pods import PodNet, pod_config
from tests.support import image_builder as ib
from tests.support.daemon_harness import REPO, Daemon
from tests.support.registry_harness import Registry

T = TypeVar("T")

STEPS = (
    "RunPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "StopPodSandbox",
    "RemovePodSandbox",
)
RPC_TIMEOUT = 120.0
# A pause before each sample: work a runtime finishes after it answered (a shim delivering its events, processes
# being torn down) must not land on the other runtime's next sample.
SETTLE = 0.1
SCALE_CLIENTS = 4  # parallel clients that start and remove the pods of the scale section
CATATONIT = Path("/usr/bin/catatonit")
SUBNET_OCTETS = iter(random.sample(range(1, 255), 254))


class Unsupported(Exception):
    """The runtime answered UNIMPLEMENTED."""


def unimplemented(error: grpc.RpcError) -> bool:
    return bool(error.code() == grpc.StatusCode.UNIMPLEMENTED)


def describe(error: BaseException) -> str:
    """A gRPC error as its code and details (one line), anything else as its text."""
    if isinstance(error, grpc.RpcError):
        return f"{error.code().name}: {error.details()}"
    return str(error) or type(error).__name__


# -- the shared environment: a registry with the images both runtimes pull --


@dataclass
class Env:
    base: Path
    registry: Registry
    image: str  # busybox, what the containers run
    pause_image: str  # containerd's sandbox_image


def pause_image() -> ib.Image:
    """An image holding only Debian's static catatonit as /pause, run in pause mode."""
    layer = ib.Layer([ib.File("/pause", CATATONIT.read_bytes(), mode=0o755)], created_by="catatonit as /pause")
    return ib.Image(layers=[layer], config=ib.ImageConfig(entrypoint=["/pause", "-P"], cmd=None, env=[]))


@contextmanager
def bench_env(scratch: Path | None = None) -> Iterator[Env]:
    """The registry with both images, and a base directory for the runtimes' roots: in `scratch`, or on a
    fresh journaled ext4 when None (bench/scratch: this VM's own root file system makes figures move)."""
    with roots_in(scratch) as where:
        base = Path(tempfile.mkdtemp(prefix="cvc-", dir=where))
        try:
            with Registry() as registry:
                ib.push(registry.url, "bench/busybox", ib.busybox_image(), tag="v1")
                ib.push(registry.url, "bench/pause", pause_image(), tag="v1")
                yield Env(base, registry, f"{registry.host}/bench/busybox:v1", f"{registry.host}/bench/pause:v1")
        finally:
            shutil.rmtree(base, ignore_errors=True)


# -- processes and their memory --


def smaps_kib(pid: int) -> tuple[int, int]:
    """(Rss, Pss) of pid in KiB, from /proc/<pid>/smaps_rollup."""
    if pid == os.getpid():
        raise ValueError("the benchmark never measures itself")
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, _, rest = line.partition(":")
        fields[key] = int(rest.split()[0])
    return fields["Rss"], fields["Pss"]


def memory_mib(pids: list[int]) -> tuple[float, float]:
    """Summed (RSS, PSS) of pids in MiB."""
    pairs = [smaps_kib(pid) for pid in pids]
    return sum(r for r, _ in pairs) / 1024, sum(p for _, p in pairs) / 1024


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def argv_has(argv: str, *tokens: str) -> bool:
    words = argv.split("\0")
    return all(token in words for token in tokens)


# -- the runtimes --


@dataclass
class Pod:
    id: str
    config: pb.PodSandboxConfig
    containers: list[str] = field(default_factory=list)


class Runtime(ABC):
    """One CRI runtime under test: its endpoint, its daemon's PID and how to find a pod's monitor processes."""

    name = ""

    def __init__(self, env: Env) -> None:
        self.env = env
        self.base = env.base / self.name
        self.net = PodNet(
            bridge=f"cbb{secrets.token_hex(4)}",
            subnet=f"10.202.{next(SUBNET_OCTETS)}",  # distinct: both runtimes' bridges are up at once
            ipam_dir=self.base / "ipam",
            conflist=self.cni_dir / "10-bench.conflist",
        )
        self.cgroup_top = f"cvc-{self.name}-{secrets.token_hex(4)}"  # pods get /<top>/pod<uid>, as kubepods
        self.channel: grpc.Channel | None = None
        self.rs: Any = None  # RuntimeServiceStub, made once the daemon answers
        self.images: Any = None  # ImageServiceStub
        self.missing: str = ""  # the first container RPC that answered UNIMPLEMENTED

    @property
    def cni_dir(self) -> Path:
        """Both runtimes read the same bridge conflist from their own copy of this directory."""
        return self.base / "cni"

    @property
    @abstractmethod
    def socket(self) -> str: ...

    @abstractmethod
    def daemon_pid(self) -> int: ...

    @abstractmethod
    def monitor_pids(self, pod: Pod) -> list[int]: ...

    @abstractmethod
    def _start_daemon(self) -> None: ...

    @abstractmethod
    def _stop_daemon(self) -> None: ...

    @abstractmethod
    def version(self) -> str: ...

    @abstractmethod
    def crash_and_restart(self) -> None:
        """SIGKILL the daemon, its containers left running, and start it again: returns once it answers."""

    def start(self) -> None:
        self.base.mkdir(parents=True, exist_ok=True)
        # No loopback plugin: each runtime brings `lo` up itself (criopy when it makes the netns, containerd
        # through its built-in cni-loopback network), as the peers' example conflists assume.
        self.net.write([])
        self._start_daemon()
        self.channel = grpc.insecure_channel(f"unix://{self.socket}")
        self.rs = api_pb2_grpc.RuntimeServiceStub(self.channel)
        self.images = api_pb2_grpc.ImageServiceStub(self.channel)

    def stop(self) -> None:
        """Removes every pod through the daemon, stops it, and removes the bridge and the directory."""
        try:
            if self.channel is not None:
                remove_pods(self)
        except grpc.RpcError as error:
            print(f"{self.name}: removing the pods failed: {describe(error)}", flush=True)
        finally:
            if self.channel is not None:
                self.channel.close()
            self._stop_daemon()
            self.net.remove()
            for hierarchy in CGROUP_ROOT.iterdir():
                remove_empty_tree(hierarchy / self.cgroup_top)
            unmount_under(self.base)
            shutil.rmtree(self.base, ignore_errors=True)

    def log_dir(self, config: pb.PodSandboxConfig) -> str:
        return str(self.base / "logs" / config.metadata.uid)

    def infra_pids(self, pod: Pod) -> list[int]:
        """The pod's pause / catatonit processes: children of its monitors."""
        found = []
        for monitor in self.monitor_pids(pod):
            found += [c for c in children(monitor) if comm(c) in ("pause", "catatonit")]
        return found


class BenchDaemon(Daemon):
    """The e2e harness's daemon in its own session: a Ctrl-C at the terminal reaches only the benchmark,
    which then removes the pods through the daemon before stopping it."""

    def _launch(self) -> None:
        compile_tree(REPO)
        self.cni_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv(), stdout=log, stderr=log, env=self.env, cwd=REPO, start_new_session=True
            )


class Criopy(Runtime):
    name = "criopy"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        config = self.base / "criopy.yaml"
        registries = json.dumps([{"prefix": env.registry.host, "insecure": True}])
        self.daemon = BenchDaemon(base=self.base, config_file=config, extra_args=["--log-level", "info"])
        self._config_text = f"image:\n  registries: {registries}\n"

    @property
    def socket(self) -> str:
        return self.daemon.socket

    def _start_daemon(self) -> None:
        self.daemon.config_file.write_text(self._config_text)
        self.daemon.start()

    def _stop_daemon(self) -> None:
        self.daemon.stop()
        for pid, argv in processes("conmon"):  # left behind only if the daemon could not remove its pods
            if str(self.daemon.runroot) + "/" in argv:
                kill(pid)
        delete_runc_containers(self.daemon.runroot / "runc")  # runc's --root: <runroot>/<handler>

    def daemon_pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def monitor_pids(self, pod: Pod) -> list[int]:
        ids = set(pod.containers)
        return [pid for pid, argv in processes("conmon") if ids & set(argv.split("\0"))]

    def version(self) -> str:
        v = self.rs.Version(pb.VersionRequest(), timeout=10)
        return f"{v.runtime_name} {v.runtime_version}"

    def crash_and_restart(self) -> None:
        assert self.daemon.proc is not None
        self.daemon.proc.kill()
        self.daemon.proc.wait(10)
        self.daemon.start()


class ContainerdRuntime(Runtime):
    name = "containerd"

    def __init__(self, env: Env) -> None:
        super().__init__(env)
        self.daemon = Containerd(
            base=self.base / "ctd",
            cni_dir=self.cni_dir,
            registry_host=env.registry.host,
            sandbox_image=env.pause_image,
        )

    @property
    def socket(self) -> str:
        return self.daemon.socket

    def _start_daemon(self) -> None:
        self.daemon.binary = ensure_containerd()
        self.daemon.start()

    def _stop_daemon(self) -> None:
        self.daemon.stop()

    def daemon_pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def monitor_pids(self, pod: Pod) -> list[int]:
        return [
            pid
            for pid, argv in processes("containerd-shim-runc-v2")
            if argv_has(argv, "-id", pod.id) and argv_has(argv, "-address", self.socket)
        ]

    def version(self) -> str:
        return containerd_version(self.daemon.binary)

    def crash_and_restart(self) -> None:
        self.daemon.crash_and_restart()


RUNTIMES: dict[str, Callable[[Env], Runtime]] = {"criopy": Criopy, "containerd": ContainerdRuntime}


# -- pods and containers --


def timed(times: dict[str, float], step: str, call: Callable[[], T]) -> T:
    started = time.perf_counter()
    out = call()
    times[step] = (time.perf_counter() - started) * 1000
    return out


def new_pod_config(rt: Runtime) -> pb.PodSandboxConfig:
    config = pod_config(namespace="bench")  # pid namespace per container, pod network
    config.linux.cgroup_parent = f"/{rt.cgroup_top}/pod{config.metadata.uid}"
    config.log_directory = rt.log_dir(config)
    Path(config.log_directory).mkdir(parents=True, exist_ok=True)  # the kubelet makes it
    return config


def container_config(rt: Runtime, index: int) -> pb.ContainerConfig:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=f"sleep{index}"),
        image=pb.ImageSpec(image=rt.env.image),
        command=["/bin/sleep", "3600"],
        log_path=f"sleep{index}.log",
        linux=pb.LinuxContainerConfig(
            security_context=pb.LinuxContainerSecurityContext(
                namespace_options=pb.NamespaceOption(network=pb.POD, pid=pb.CONTAINER, ipc=pb.POD)
            )
        ),
    )


def container_rpc(rt: Runtime, step: str, call: Callable[[], T]) -> T:
    """Runs a container RPC; UNIMPLEMENTED becomes Unsupported and is remembered on the runtime."""
    try:
        return call()
    except grpc.RpcError as error:
        if not unimplemented(error):
            raise
        rt.missing = rt.missing or step
        raise Unsupported(step) from error


def run_pod(rt: Runtime, times: dict[str, float] | None = None) -> Pod:
    config = new_pod_config(rt)
    request = pb.RunPodSandboxRequest(config=config)
    resp = timed(
        times if times is not None else {}, "RunPodSandbox", lambda: rt.rs.RunPodSandbox(request, timeout=RPC_TIMEOUT)
    )
    return Pod(str(resp.pod_sandbox_id), config)


def start_container(rt: Runtime, pod: Pod, index: int, times: dict[str, float] | None = None) -> str:
    times = times if times is not None else {}
    request = pb.CreateContainerRequest(
        pod_sandbox_id=pod.id, config=container_config(rt, index), sandbox_config=pod.config
    )
    created = container_rpc(
        rt,
        "CreateContainer",
        lambda: timed(times, "CreateContainer", lambda: rt.rs.CreateContainer(request, timeout=RPC_TIMEOUT)),
    )
    cid = str(created.container_id)
    pod.containers.append(cid)
    start = pb.StartContainerRequest(container_id=cid)
    container_rpc(
        rt,
        "StartContainer",
        lambda: timed(times, "StartContainer", lambda: rt.rs.StartContainer(start, timeout=RPC_TIMEOUT)),
    )
    return cid


def end_container(rt: Runtime, cid: str, times: dict[str, float]) -> None:
    stop = pb.StopContainerRequest(container_id=cid, timeout=0)
    container_rpc(
        rt,
        "StopContainer",
        lambda: timed(times, "StopContainer", lambda: rt.rs.StopContainer(stop, timeout=RPC_TIMEOUT)),
    )
    remove = pb.RemoveContainerRequest(container_id=cid)
    container_rpc(
        rt,
        "RemoveContainer",
        lambda: timed(times, "RemoveContainer", lambda: rt.rs.RemoveContainer(remove, timeout=RPC_TIMEOUT)),
    )


def end_pod(rt: Runtime, pod_id: str, times: dict[str, float] | None = None) -> None:
    times = times if times is not None else {}
    stop = pb.StopPodSandboxRequest(pod_sandbox_id=pod_id)
    timed(times, "StopPodSandbox", lambda: rt.rs.StopPodSandbox(stop, timeout=RPC_TIMEOUT))
    remove = pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id)
    timed(times, "RemovePodSandbox", lambda: rt.rs.RemovePodSandbox(remove, timeout=RPC_TIMEOUT))


def remove_pods(rt: Runtime) -> None:
    """Every container and pod the runtime lists, removed (what an interrupted run left)."""
    try:
        for c in rt.rs.ListContainers(pb.ListContainersRequest(), timeout=60).containers:
            rt.rs.StopContainer(pb.StopContainerRequest(container_id=c.id, timeout=0), timeout=RPC_TIMEOUT)
            rt.rs.RemoveContainer(pb.RemoveContainerRequest(container_id=c.id), timeout=RPC_TIMEOUT)
    except grpc.RpcError as error:
        if not unimplemented(error):
            raise
    for pod in rt.rs.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=60).items:
        end_pod(rt, pod.id)


# -- the figures --


@dataclass
class Results:
    figures: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def pull(rt: Runtime) -> None:
    for ref in (rt.env.image, rt.env.pause_image):
        rt.images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=300)


def check_network(rt: Runtime, pod: Pod, res: Results) -> None:
    """That the pod got an address on the runtime's bridge (both runtimes did the same CNI work)."""
    status = rt.rs.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod.id), timeout=30).status
    if not status.network.ip.startswith(rt.net.subnet + "."):
        res.notes.append(f"{rt.name}: pod address {status.network.ip!r} is not in {rt.net.subnet}.0/24")


def check_running(rt: Runtime, pod: Pod, res: Results) -> None:
    for cid in pod.containers:
        state = rt.rs.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=30).status.state
        if state != pb.CONTAINER_RUNNING:
            res.notes.append(f"{rt.name}: container state {pb.ContainerState.Name(state)} after StartContainer")


def lifecycle_once(rt: Runtime, check: Results | None = None) -> dict[str, float]:
    times: dict[str, float] = {}
    pod = run_pod(rt, times)
    try:
        if check is not None:
            check_network(rt, pod, check)
        if not rt.missing:
            cid = start_container(rt, pod, 0, times)
            if check is not None:
                check_running(rt, pod, check)
            end_container(rt, cid, times)
    except Unsupported:
        pass
    finally:
        end_pod(rt, pod.id, times)
    return times


class Run:
    """The runtimes still being measured and their results. A runtime that fails a step is dropped, with a
    note: a broken runtime must not cost the other one its figures."""

    def __init__(self, runtimes: list[Runtime]) -> None:
        self.live = list(runtimes)
        self.results = {rt.name: Results() for rt in runtimes}

    def res(self, rt: Runtime) -> Results:
        return self.results[rt.name]

    def guard(self, rt: Runtime, step: str, work: Callable[[], object]) -> bool:
        """Runs `work` for `rt` unless it was dropped; False (and `rt` dropped) when it fails."""

        def done() -> bool:
            work()
            return True

        return self.check(rt, step, done)

    def check(self, rt: Runtime, step: str, test: Callable[[], bool]) -> bool:
        """`test`'s answer for `rt`; False for a dropped runtime, and when it fails (then `rt` is dropped)."""
        if rt not in self.live:
            return False
        try:
            return test()
        except Exception as error:  # any failure of one runtime: note it, go on with the other
            traceback.print_exc()
            self.res(rt).notes.append(f"{rt.name}: stopped at {step}: {describe(error)}")
            self.live.remove(rt)
            return False

    def each(self, step: str, work: Callable[[Runtime], object], runtimes: list[Runtime] | None = None) -> None:
        for rt in list(self.live if runtimes is None else runtimes):
            self.guard(rt, step, functools.partial(work, rt))

    def interleaved(
        self, step: str, rounds: int, sample: Callable[[Runtime], T], runtimes: list[Runtime] | None = None
    ) -> dict[str, list[T]]:
        """`rounds` samples per runtime taken in turns (A, B, A, B, ...): both meet the same machine, so
        a noisy minute on this VM weighs on both figures alike."""
        chosen = list(self.live if runtimes is None else runtimes)
        samples: dict[str, list[T]] = {rt.name: [] for rt in chosen}

        def take(rt: Runtime) -> None:
            samples[rt.name].append(sample(rt))

        for _ in range(rounds):
            for rt in chosen:
                time.sleep(SETTLE)
                self.guard(rt, step, functools.partial(take, rt))
        return {rt.name: samples[rt.name] for rt in chosen if rt in self.live}


def time_call_ms(method: Callable[..., object], request: object) -> float:
    started = time.perf_counter()
    method(request, timeout=60)
    return (time.perf_counter() - started) * 1000


def lifecycle(run: Run, iterations: int) -> None:
    # Warm-up (caches, first CNI call, page cache) and a sanity check.
    run.each("the lifecycle warm-up", lambda rt: lifecycle_once(rt, check=run.res(rt)))
    for rt in list(run.live):
        if rt.missing:
            run.res(rt).notes.append(f"{rt.name}: {rt.missing} answered UNIMPLEMENTED: container steps not measured")
    for name, runs in run.interleaved("the pod lifecycle", iterations, lifecycle_once).items():
        figures = run.results[name].figures
        for step in STEPS:
            samples = [r[step] for r in runs if step in r]
            if samples:
                figures[f"{step} (ms)"] = statistics.median(samples)
        if runs and all(step in runs[0] for step in STEPS):
            figures["pod lifecycle total (ms)"] = statistics.median(sum(r[s] for s in STEPS) for r in runs)


def exec_latency(run: Run, calls: int) -> None:
    """What a probe costs: ExecSync of `true` in a running container, round trip through the client."""
    pods: dict[str, Pod] = {}
    requests: dict[str, pb.ExecSyncRequest] = {}

    def prepare(rt: Runtime) -> None:
        pod = pods[rt.name] = run_pod(rt)
        request = pb.ExecSyncRequest(container_id=start_container(rt, pod, 0), cmd=["true"], timeout=10)
        if rt.rs.ExecSync(request, timeout=60).exit_code != 0:  # warm-up, and a sanity check
            run.res(rt).notes.append(f"{rt.name}: ExecSync of true did not exit 0")
        requests[rt.name] = request

    able = [rt for rt in run.live if not rt.missing]
    try:
        run.each("the ExecSync set-up", prepare, able)
        able = [rt for rt in able if rt.name in requests]
        sample = lambda rt: time_call_ms(rt.rs.ExecSync, requests[rt.name])  # noqa: E731
        for name, samples in run.interleaved("ExecSync", calls, sample, able).items():
            run.results[name].figures[f"ExecSync true, median of {calls} (ms)"] = statistics.median(samples)
    finally:
        run.each(
            "the ExecSync clean-up", lambda rt: end_pod(rt, pods[rt.name].id), [rt for rt in able if rt.name in pods]
        )


def start_pods(rt: Runtime, count: int, per_pod: int) -> list[Pod]:
    def one(_: int) -> Pod:
        pod = run_pod(rt)
        for index in range(per_pod):
            start_container(rt, pod, index)
        return pod

    with ThreadPoolExecutor(SCALE_CLIENTS) as pool:
        return list(pool.map(one, range(count)))


def end_pods(rt: Runtime, pods: list[Pod]) -> None:
    with ThreadPoolExecutor(SCALE_CLIENTS) as pool:
        list(pool.map(lambda pod: end_pod(rt, pod.id), pods))


@dataclass(frozen=True)
class ListProbe:
    method: str
    request: Any
    where: str  # "200 containers"
    expected: int  # items it should list
    items: str  # the response field that holds them


def probe_list(run: Run, probe: ListProbe, rt: Runtime) -> bool:
    """One warm-up call: its size, notes on what it lists; False when the runtime lacks the method."""
    try:
        response = getattr(rt.rs, probe.method)(probe.request, timeout=60)
    except grpc.RpcError as error:
        if not unimplemented(error):
            raise
        run.res(rt).notes.append(f"{rt.name}: {probe.method} answered UNIMPLEMENTED")
        return False
    listed = getattr(response, probe.items)
    if len(listed) != probe.expected:
        run.res(rt).notes.append(f"{rt.name}: {probe.method} listed {len(listed)}, expected {probe.expected}")
    if probe.items == "stats" and not all(s.memory.working_set_bytes.value for s in listed):
        run.res(rt).notes.append(f"{rt.name}: ListContainerStats has entries without a memory working set")
    run.res(rt).figures[f"{probe.method} response, {probe.where} (bytes)"] = response.ByteSize()
    return True


def list_latencies(run: Run, runtimes: list[Runtime], calls: int, pods: int, count: int) -> None:
    """Median latency of each List call, taken in turns, and of Version: the floor under them all, the
    smallest call through the same client and server stack."""
    probes = [
        ListProbe("ListContainers", pb.ListContainersRequest(), f"{count} containers", count, "containers"),
        ListProbe("ListContainerStats", pb.ListContainerStatsRequest(), f"{count} containers", count, "stats"),
        ListProbe("ListPodSandbox", pb.ListPodSandboxRequest(), f"{pods} pods", pods, "items"),
        ListProbe("Version", pb.VersionRequest(), "", 0, ""),
    ]
    for probe in probes:
        answering = [
            rt
            for rt in runtimes
            if not probe.items or run.check(rt, probe.method, functools.partial(probe_list, run, probe, rt))
        ]

        def sample(rt: Runtime, probe: ListProbe = probe) -> float:
            return time_call_ms(getattr(rt.rs, probe.method), probe.request)

        figure = f"{probe.method}, {probe.where} (ms)" if probe.where else f"{probe.method} (ms)"
        for name, samples in run.interleaved(probe.method, calls, sample, answering).items():
            run.results[name].figures[figure] = statistics.median(samples)


def pod_memory(rt: Runtime, pods: list[Pod], label: str, res: Results) -> None:
    """Median over pods of the summed PSS / RSS of each pod's monitors (and of its pause process)."""
    per_pod = [memory_mib(rt.monitor_pids(pod)) for pod in pods]
    counts = [len(rt.monitor_pids(pod)) for pod in pods]
    res.figures[f"monitor PSS per {label} pod (MiB)"] = statistics.median(p for _, p in per_pod)
    res.figures[f"monitor RSS per {label} pod (MiB)"] = statistics.median(r for r, _ in per_pod)
    res.figures[f"monitor processes per {label} pod"] = statistics.median(counts)
    infra = [memory_mib(rt.infra_pids(pod)) for pod in pods]
    res.figures[f"pause process PSS per {label} pod (MiB)"] = statistics.median(p for _, p in infra)


def daemon_memory(rt: Runtime, res: Results, count: int) -> None:
    rss, pss = memory_mib([rt.daemon_pid()])
    res.figures[f"daemon RSS, {count} containers (MiB)"] = rss
    res.figures[f"daemon PSS, {count} containers (MiB)"] = pss
    helpers = children(rt.daemon_pid())
    if helpers:
        res.figures[f"daemon's child processes RSS, {count} containers (MiB)"] = memory_mib(helpers)[0]


def restart_time(rt: Runtime, res: Results, count: int) -> None:
    """From SIGKILL to a daemon that lists all `count` containers running again: what a node waits for
    after the runtime crashed, the containers having run on meanwhile."""
    started = time.perf_counter()
    rt.crash_and_restart()
    while True:
        listed = rt.rs.ListContainers(pb.ListContainersRequest(), timeout=60).containers
        if sum(c.state == pb.CONTAINER_RUNNING for c in listed) >= count:
            break
        time.sleep(0.01)
    res.figures[f"restart after SIGKILL, {count} containers running (ms)"] = (time.perf_counter() - started) * 1000


def time_bulk(run: Run, rt: Runtime, pods: int, per_pod: int) -> None:
    """Starting and removing all the scale pods with SCALE_CLIENTS clients, the other runtime holding none:
    timed with both holding theirs, whichever went first would have had the machine to itself."""
    started = time.perf_counter()
    made = start_pods(rt, pods, per_pod)
    figure = f"start {pods} pods x {per_pod} containers, {SCALE_CLIENTS} clients (ms)"
    run.res(rt).figures[figure] = (time.perf_counter() - started) * 1000
    started = time.perf_counter()
    end_pods(rt, made)
    run.res(rt).figures[f"remove {pods} pods, {SCALE_CLIENTS} clients (ms)"] = (time.perf_counter() - started) * 1000


def scale(run: Run, pods: int, containers: int, calls: int) -> None:
    """The bulk start and removal timed for each runtime alone; then both hold their containers at once, so
    the List calls can be timed in turns. The pods left when a step fails are removed by Runtime.stop()."""
    per_pod = containers // pods
    count = pods * per_pod
    able = [rt for rt in run.live if not rt.missing]
    for rt in run.live:
        if rt.missing:
            run.res(rt).notes.append(f"{rt.name}: scale section skipped ({rt.missing} is UNIMPLEMENTED)")
    run.each("timing the pods' start and removal", lambda rt: time_bulk(run, rt, pods, per_pod), able)
    made: dict[str, list[Pod]] = {rt.name: [] for rt in able}
    singles: dict[str, list[Pod]] = {}

    def start_all(rt: Runtime) -> None:
        made[rt.name] += start_pods(rt, pods, per_pod)

    def start_singles(rt: Runtime) -> None:
        singles[rt.name] = start_pods(rt, 5, 1)
        made[rt.name] += singles[rt.name]

    run.each("starting the scale pods", start_all, able)
    time.sleep(2)  # let the monitors and the daemons settle
    run.each("the daemon's memory", lambda rt: daemon_memory(rt, run.res(rt), count), able)
    list_latencies(run, [rt for rt in able if rt in run.live], calls, pods, count)
    run.each("restart after SIGKILL", lambda rt: restart_time(rt, run.res(rt), count), able)
    label = f"{per_pod}-container"
    run.each("the pods' memory", lambda rt: pod_memory(rt, made[rt.name], label, run.res(rt)), able)
    run.each("starting 1-container pods", start_singles, able)
    time.sleep(1)
    run.each(
        "the 1-container pods' memory", lambda rt: pod_memory(rt, singles[rt.name], "1-container", run.res(rt)), able
    )
    run.each("removing the scale pods", lambda rt: end_pods(rt, made[rt.name]), able)


def start_runtime(run: Run, rt: Runtime) -> None:
    print(f"{rt.name}: starting", flush=True)
    rt.start()
    run.res(rt).notes.append(f"{rt.name}: {rt.version()}")
    pull(rt)


def measure(runtimes: list[Runtime], args: argparse.Namespace) -> dict[str, Results]:
    """Every figure, each taken from the runtimes in turns; every runtime stopped and cleaned at the end."""
    run = Run(runtimes)
    try:
        run.each("start", functools.partial(start_runtime, run))
        print(f"pod lifecycle x {args.iterations}, in turns", flush=True)
        lifecycle(run, args.iterations)
        print(f"ExecSync x {args.exec_calls}, in turns", flush=True)
        exec_latency(run, args.exec_calls)
        if not args.skip_scale:
            print(f"{args.containers} containers in {args.pods} pods on each runtime", flush=True)
            scale(run, args.pods, args.containers, args.list_calls)
    finally:
        for rt in runtimes:
            try:
                rt.stop()
            except Exception:  # a failed clean-up of one runtime must not skip the other's
                traceback.print_exc()
    return run.results


# -- output --


def cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}" if value < 100 else f"{value:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def table(results: dict[str, Results]) -> str:
    """criopy, containerd and their ratio; then any other column (a benchmark's floor) with its ratio to
    containerd's."""
    fullest_first = sorted(results.values(), key=lambda r: len(r.figures), reverse=True)
    names = list(dict.fromkeys(k for r in fullest_first for k in r.figures))
    width = max([len(n) for n in names] + [10])
    extra = [column for column in results if column not in ("criopy", "containerd")]
    head = "".join(f"  {column:>10}  {'ratio':>6}" for column in extra)
    lines = [f"{'step':<{width}}  {'criopy':>10}  {'containerd':>10}  {'ratio':>6}{head}"]
    for name in names:
        a = results.get("criopy", Results()).figures.get(name)
        b = results.get("containerd", Results()).figures.get(name)
        others = [results[column].figures.get(name) for column in extra]
        tail = "".join(f"  {cell(c):>10}  {ratio(c, b):>6}" for c in others)
        lines.append(f"{name:<{width}}  {cell(a):>10}  {cell(b):>10}  {ratio(a, b):>6}{tail}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=15, help="timed pod lifecycles per runtime (default 15)")
    parser.add_argument("--containers", type=int, default=200, help="running containers for the scale section")
    parser.add_argument("--pods", type=int, default=20, help="pods the scale section spreads them over")
    parser.add_argument("--list-calls", type=int, default=50, help="calls per List* latency figure (default 50)")
    parser.add_argument("--exec-calls", type=int, default=50, help="ExecSync calls for the probe figure (default 50)")
    parser.add_argument("--only", choices=sorted(RUNTIMES), help="measure one runtime")
    parser.add_argument("--scratch", type=Path, help="put the roots in this directory, not on a fresh ext4")
    parser.add_argument("--skip-scale", action="store_true", help="skip the List* latency and memory sections")
    args = parser.parse_args()
    if args.iterations < 1 or args.pods < 1 or args.containers < args.pods:
        parser.error("need --iterations >= 1 and --containers >= --pods >= 1")
    return args


def interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> None:
    run_bench(parse_args(), measure)


Measure = Callable[[list[Runtime], argparse.Namespace], dict[str, Results]]


def run_bench(args: argparse.Namespace, measure: Measure) -> None:
    """Both runtimes (or `--only` one) measured by `measure`, the table printed; an interrupt cleans up."""
    if os.geteuid() != 0:
        raise SystemExit("run as root: both runtimes make namespaces, mounts and bridges")
    signal.signal(signal.SIGTERM, interrupt_on_sigterm)
    names = [args.only] if args.only else ["criopy", "containerd"]
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1  # before we add our own
    try:
        with bench_env(args.scratch) as env:
            print(f"roots in {env.base} ({filesystem_of(env.base)})", flush=True)
            results = measure([RUNTIMES[name](env) for name in names], args)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: pods, daemons, bridges and directories removed") from None
    print()
    print(table(results))
    if load > cpus / 2:
        print(f"# load average {load:.1f} on {cpus} CPUs when the run began: figures may be noisy")
    for res in results.values():
        for note in res.notes:
            print(f"# {note}")


if __name__ == "__main__":
    main()
