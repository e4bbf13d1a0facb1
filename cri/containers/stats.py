"""Container and pod figures for the stats RPCs, from a background collector.

The kubelet asks for every container's stats every few seconds (summary API,
eviction, metrics-server). Reading hundreds of cgroups per call would make that
cost grow with the node, so a background task samples the cgroups of running
containers every STATS_INTERVAL seconds (one thread hop per round) and the RPCs
answer from the latest round. CPU nano cores come from the last two samples;
the writable layer is measured less often, since it walks a directory tree.
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

log = logging.getLogger(__name__)

STATS_INTERVAL = 2.0
LAYER_INTERVAL = 30.0


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


@dataclass(frozen=True)
class NetworkFigures:
    timestamp_ns: int
    interfaces: dict[str, tuple[int, int, int, int]]  # name -> rx bytes, rx errors, tx bytes, tx errors


class StatsCollector:
    def __init__(self, containers: Callable[[], Iterable[Container]]) -> None:
        self._containers = containers
        self._samples: dict[str, CgroupSample] = {}
        self._nano: dict[str, int | None] = {}
        self._layers: dict[str, LayerUsage] = {}
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="stats-collector")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def latest(self, container: Container) -> Figures | None:
        sample = self._samples.get(container.id)
        if sample is None:
            return None
        return Figures(sample, self._nano.get(container.id), self._layers.get(container.id))

    async def figures(self, containers: list[Container]) -> dict[str, Figures]:
        """The latest figures of each container; the ones never sampled yet (just created) are sampled now."""
        missing = [c for c in containers if c.id not in self._samples]
        if missing:
            await asyncio.to_thread(self._sample_all, missing, True)
        out = {}
        for container in containers:
            found = self.latest(container)
            if found is not None:
                out[container.id] = found
        return out

    async def _loop(self) -> None:
        last_layers = 0.0
        while True:
            live = [c for c in self._containers() if c.state is not ContainerState.CREATING]
            measure_layers = time.monotonic() - last_layers >= LAYER_INTERVAL
            try:
                await asyncio.to_thread(self._sample_all, live, measure_layers)
            except Exception as exc:  # a bad round must not end the collector
                event(log, logging.ERROR, "stats round failed", error=str(exc))
            if measure_layers:
                last_layers = time.monotonic()
            known = {c.id for c in live}
            for table in (self._samples, self._nano, self._layers):
                for gone in set(table) - known:
                    del table[gone]
            await asyncio.sleep(STATS_INTERVAL)

    def _sample_all(self, containers: Iterable[Container], measure_layers: bool) -> None:
        for container in containers:
            if container.state is ContainerState.EXITED and container.id in self._samples:
                continue  # its cgroup is gone or frozen in time: keep the last figures
            self._sample_one(container)
            if measure_layers or container.id not in self._layers:
                self._measure_layer(container)

    def _sample_one(self, container: Container) -> None:
        try:
            current = cgroupstats.sample(container.cgroups_path)
        except (OSError, ValueError) as exc:
            event(log, logging.DEBUG, "cgroup sample failed", id=container.id, error=str(exc))
            return
        if current is None:
            return
        previous = self._samples.get(container.id)
        if previous is not None:
            self._nano[container.id] = cgroupstats.nano_cores(previous, current)
        self._samples[container.id] = current

    def _measure_layer(self, container: Container) -> None:
        try:
            used, inodes = rootfs.usage(Path(container.storage))
        except OSError:
            return
        self._layers[container.id] = LayerUsage(time.time_ns(), used, inodes)


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
