"""Container and pod figures for the stats RPCs: cgroups read at the call, rates and layers kept between calls.

Every stats RPC reads the cgroups of the containers it answers for at the call (one thread hop for all of
them, a handful of small reads each), so two answers a second apart always carry two readings a second apart:
crictl computes CPU % from exactly that (usage growth over timestamp growth), and an answer
repeated from a cache is crictl's error "cpu stat is not updated during sample".

What a single reading cannot give is kept here. A background task reads every container every STATS_INTERVAL
seconds so that each one has a recent baseline, and usage_nano_cores is the usage growth from a baseline to
the reading over the true time between them (CpuRate). The writable layer is measured by the rounds every
LAYER_INTERVAL seconds (and at once for one never measured), since it walks a directory tree. An exited
container's cgroup is gone: its last figures are kept, its final cpu counter restamped at each call.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from cri.containers import cgroupstats
from cri.containers.cgroupstats import CgroupSample
from cri.containers.container import Container, ContainerState
from cri.log import event
from cri.storage import rootfs
from cri.system import offload

log = logging.getLogger(__name__)

STATS_INTERVAL = 2.0
LAYER_INTERVAL = 30.0
# The shortest window a rate is measured over: CPU time is charged in scheduler ticks, so a window of a few
# milliseconds (a ListContainerStats right after a ListPodSandboxStats) would read 0 or several cores.
MIN_RATE_INTERVAL_NS = 1_000_000_000


@dataclass(frozen=True)
class LayerUsage:
    timestamp_ns: int
    bytes: int
    inodes: int


@dataclass(frozen=True)
class Figures:
    sample: CgroupSample
    nano_cores: int | None
    layer: LayerUsage | None
    cpu_timestamp_ns: int  # the sample's time; for an exited container's final counter, the time of the call


@dataclass(frozen=True)
class NetworkFigures:
    timestamp_ns: int
    interfaces: dict[str, tuple[int, int, int, int]]  # name -> rx bytes, rx errors, tx bytes, tx errors


@dataclass(frozen=True)
class PodFigures:
    """A pod's containers with their figures (those that have any), and its network counters."""

    containers: list[Container]
    figures: dict[str, Figures]
    network: NetworkFigures | None


class CpuRate:
    """Nano cores of one container: each reading against a baseline at least MIN_RATE_INTERVAL_NS older.

    Two baselines are kept, `newer` and the `older` one before it (a full window apart), so a reading that
    comes soon after `newer` is measured from `older` instead of over a tiny window.
    """

    def __init__(self, first: CgroupSample) -> None:
        self.older: CgroupSample | None = None
        self.newer = first
        self.last = first  # the latest reading, the figures an exited container keeps

    def add(self, current: CgroupSample) -> int | None:
        if current.timestamp_ns >= self.last.timestamp_ns:
            self.last = current
        if current.timestamp_ns - self.newer.timestamp_ns >= MIN_RATE_INTERVAL_NS:
            nano = cgroupstats.nano_cores(self.newer, current)
            self.older, self.newer = self.newer, current
            return nano
        # Too soon after the newer baseline (or an earlier reading recorded after a later one): from the older.
        return cgroupstats.nano_cores(self.older, current) if self.older is not None else None


@dataclass(frozen=True)
class _Reading:
    container_id: str
    sample: CgroupSample | None
    layer: LayerUsage | None


class StatsCollector:
    def __init__(self, containers: Callable[[], Iterable[Container]]) -> None:
        self._containers = containers
        self._rates: dict[str, CpuRate] = {}
        self._layers: dict[str, LayerUsage] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="stats-collector")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def figures(self, containers: list[Container]) -> dict[str, Figures]:
        """The figures of each container, its cgroup read now; those with no cgroup and no past figures left out."""
        readings = await offload.to_thread(self._read_all, self._to_read(containers), False)
        nano = {r.container_id: self._record(r) for r in readings}
        fresh = {r.container_id: r.sample for r in readings if r.sample is not None}
        now = time.time_ns()
        out = {}
        for container in containers:
            layer = self._layers.get(container.id)
            sample = fresh.get(container.id)
            if sample is not None:
                out[container.id] = Figures(sample, nano[container.id], layer, sample.timestamp_ns)
            elif (rate := self._rates.get(container.id)) is not None:
                # Exited, its cgroup gone: the cpu counter is final, so it holds now and nothing was used since.
                out[container.id] = Figures(rate.last, 0, layer, now)
        return out

    async def collect(self, measure_layers: bool) -> None:
        """One background round: a baseline for every live container, and their layers when `measure_layers`."""
        live = [c for c in self._containers() if c.state is not ContainerState.CREATING]
        for reading in await offload.to_thread(self._read_all, self._to_read(live), measure_layers):
            self._record(reading)
        known = {c.id for c in self._containers()}
        for table in (self._rates, self._layers):
            for gone in set(table) - known:
                del table[gone]

    async def _loop(self) -> None:
        last_layers = 0.0
        while True:
            measure_layers = time.monotonic() - last_layers >= LAYER_INTERVAL
            try:
                await self.collect(measure_layers)
            except Exception as exc:  # a bad round must not end the collector
                event(log, logging.ERROR, "stats round failed", error=str(exc))
            if measure_layers:
                last_layers = time.monotonic()
            await asyncio.sleep(STATS_INTERVAL)

    def _to_read(self, containers: Iterable[Container]) -> list[Container]:
        # An exited container's cgroup is gone (or frozen in time): once it has figures, they are its last.
        return [c for c in containers if c.state is not ContainerState.EXITED or c.id not in self._rates]

    def _record(self, reading: _Reading) -> int | None:
        """Takes a reading in on the event loop (readings are made in threads, the tables change here only)."""
        if reading.layer is not None:
            self._layers[reading.container_id] = reading.layer
        if reading.sample is None:
            return None
        rate = self._rates.get(reading.container_id)
        if rate is None:
            self._rates[reading.container_id] = CpuRate(reading.sample)
            return None
        return rate.add(reading.sample)

    def _read_all(self, containers: list[Container], measure_layers: bool) -> list[_Reading]:
        """Blocking: the cgroup of each container, and its writable layer when asked or never measured."""
        return [
            _Reading(
                c.id,
                _sample(c),
                _measure_layer(c) if measure_layers or c.id not in self._layers else None,
            )
            for c in containers
        ]


def _sample(container: Container) -> CgroupSample | None:
    try:
        return cgroupstats.sample(container.cgroups_path)
    except (OSError, ValueError) as exc:
        event(log, logging.DEBUG, "cgroup sample failed", id=container.id, error=str(exc))
        return None


def _measure_layer(container: Container) -> LayerUsage | None:
    try:
        used, inodes = rootfs.usage(Path(container.storage))
    except OSError:
        return None
    return LayerUsage(time.time_ns(), used, inodes)


def network(pid: int) -> NetworkFigures | None:
    """Interface counters of the network namespace `pid` lives in (/proc/<pid>/net/dev), loopback left out."""
    if pid <= 0:
        return None
    try:
        text = Path(f"/proc/{pid}/net/dev").read_text()
    except OSError:
        return None
    interfaces = {}
    for line in text.splitlines()[2:]:
        name, _, counters = line.partition(":")
        fields = counters.split()
        if name.strip() == "lo" or len(fields) < 11:
            continue
        interfaces[name.strip()] = (int(fields[0]), int(fields[2]), int(fields[8]), int(fields[10]))
    return NetworkFigures(time.time_ns(), interfaces)
