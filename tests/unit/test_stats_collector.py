"""The stats collector's answers: read at the call, nano cores over the true interval, exited figures kept."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.containers import cgroupstats
from cri.containers.cgroupstats import CgroupSample
from cri.containers.container import Container, ContainerState
from cri.containers.stats import CpuRate, Figures, StatsCollector
from cri.services import stats_convert
from cri.storage import rootfs

SECOND = 1_000_000_000


class FakeCgroups:
    """Cgroups whose clock and cpu counters the test moves."""

    def __init__(self) -> None:
        self.now = time.time_ns() - 3600 * SECOND  # in the past: the collector's own "now" is always later
        self.usage: dict[str, int] = {}
        self.layer_walks = 0

    def sample(self, cgroup_path: str, *, root: Path = cgroupstats.DEFAULT_ROOT) -> CgroupSample | None:
        if cgroup_path not in self.usage:
            return None  # gone
        return CgroupSample(self.now, self.usage[cgroup_path], 4096, 2048, 1024, 10, 1, None, 1, 0)

    def layer(self, container_dir: Path) -> tuple[int, int]:
        self.layer_walks += 1
        return 8192, 3

    def run(self, seconds: float, cores: float, *paths: str) -> None:
        """`seconds` pass while `paths` use `cores` of CPU each."""
        for path in paths:
            self.usage[path] += int(seconds * cores * SECOND)
        self.now += int(seconds * SECOND)


@pytest.fixture
def cgroups(monkeypatch: pytest.MonkeyPatch) -> FakeCgroups:
    fake = FakeCgroups()
    monkeypatch.setattr(cgroupstats, "sample", fake.sample)
    monkeypatch.setattr(rootfs, "usage", fake.layer)
    return fake


def container(cgroups: FakeCgroups, name: str, state: ContainerState = ContainerState.RUNNING) -> Container:
    path = f"/kubepods/criopy-{name}"
    cgroups.usage[path] = 0
    return Container(
        id=name * 8,
        sandbox_id="p" * 64,
        config=pb.ContainerConfig(metadata=pb.ContainerMetadata(name=name)),
        image_id="",
        image_ref="",
        image_name="",
        created_at=0,
        state=state,
        runtime="runc",
        bundle="",
        storage=f"/nonexistent/{name}",
        log_path="",
        cgroups_path=path,
        stop_signal="",
    )


def figures_of(collector: StatsCollector, c: Container) -> Figures:
    return asyncio.run(collector.figures([c]))[c.id]


def test_each_call_reads_the_cgroup_at_the_call(cgroups: FakeCgroups) -> None:
    busy = container(cgroups, "a")
    collector = StatsCollector(lambda: [busy])
    first = figures_of(collector, busy)
    cgroups.run(1.0, 0.5, busy.cgroups_path)
    second = figures_of(collector, busy)
    assert second.cpu_timestamp_ns - first.cpu_timestamp_ns == SECOND
    assert second.sample.cpu_usage_ns is not None and first.sample.cpu_usage_ns is not None
    assert second.sample.cpu_usage_ns - first.sample.cpu_usage_ns == SECOND // 2
    assert first.nano_cores is None  # one reading: no rate yet
    assert second.nano_cores == SECOND // 2


def test_nano_cores_are_over_the_true_interval_and_never_a_tiny_one(cgroups: FakeCgroups) -> None:
    busy = container(cgroups, "a")
    collector = StatsCollector(lambda: [busy])
    figures_of(collector, busy)  # t0
    cgroups.run(1.5, 0.5, busy.cgroups_path)
    assert figures_of(collector, busy).nano_cores == SECOND // 2  # t0 .. t0+1.5
    cgroups.run(0.2, 1.0, busy.cgroups_path)
    # 0.2 s after the last reading is too short a window: measured from t0, over the 1.7 s since.
    assert figures_of(collector, busy).nano_cores == (SECOND * 95 // 100) * SECOND // (SECOND * 17 // 10)
    assert figures_of(collector, busy).nano_cores == figures_of(collector, busy).nano_cores
    cgroups.run(0.9, 1.0, busy.cgroups_path)
    assert figures_of(collector, busy).nano_cores == SECOND  # t0+1.5 .. t0+2.6, one full core


def test_a_collector_round_is_the_baseline_of_the_next_call(cgroups: FakeCgroups) -> None:
    busy = container(cgroups, "a")
    idle = container(cgroups, "b")
    collector = StatsCollector(lambda: [busy, idle])
    asyncio.run(collector.collect(measure_layers=True))
    cgroups.run(2.0, 0.25, busy.cgroups_path)
    found = asyncio.run(collector.figures([busy, idle]))
    assert found[busy.id].nano_cores == SECOND // 4
    assert found[idle.id].nano_cores == 0


def test_an_exited_container_keeps_its_figures_and_its_cpu_clock_moves(cgroups: FakeCgroups) -> None:
    busy = container(cgroups, "a")
    collector = StatsCollector(lambda: [busy])
    figures_of(collector, busy)
    cgroups.run(1.0, 1.0, busy.cgroups_path)
    last = figures_of(collector, busy)
    busy.state = ContainerState.EXITED
    del cgroups.usage[busy.cgroups_path]  # released at exit
    first = figures_of(collector, busy)
    second = figures_of(collector, busy)
    assert first.sample == second.sample == last.sample  # memory and usage as last seen
    # The counter is final, so it is true now: crictl sees time pass and no CPU used.
    assert last.cpu_timestamp_ns < first.cpu_timestamp_ns < second.cpu_timestamp_ns
    assert first.nano_cores == second.nano_cores == 0


def test_an_exited_container_never_sampled_has_no_figures(cgroups: FakeCgroups) -> None:
    gone = container(cgroups, "a", ContainerState.EXITED)
    del cgroups.usage[gone.cgroups_path]
    assert asyncio.run(StatsCollector(lambda: [gone]).figures([gone])) == {}


def test_the_writable_layer_is_walked_by_rounds_not_by_calls(cgroups: FakeCgroups) -> None:
    busy = container(cgroups, "a")
    collector = StatsCollector(lambda: [busy])
    first = figures_of(collector, busy)
    figures_of(collector, busy)
    assert cgroups.layer_walks == 1  # once when first seen
    assert first.layer is not None and (first.layer.bytes, first.layer.inodes) == (8192, 3)
    asyncio.run(collector.collect(measure_layers=True))
    assert cgroups.layer_walks == 2


def test_collect_forgets_removed_containers(cgroups: FakeCgroups) -> None:
    live = [container(cgroups, "a")]
    collector = StatsCollector(lambda: live)
    asyncio.run(collector.collect(measure_layers=False))
    removed = live.pop()
    asyncio.run(collector.collect(measure_layers=False))
    cgroups.run(1.0, 1.0, removed.cgroups_path)
    assert figures_of(collector, removed).nano_cores is None  # no baseline left


def sample_at(seconds: float, usage_seconds: float) -> CgroupSample:
    return CgroupSample(int(seconds * SECOND), int(usage_seconds * SECOND), *([None] * 8))


def test_cpu_rate_keeps_baselines_a_second_apart() -> None:
    rate = CpuRate(sample_at(0, 0))
    assert rate.add(sample_at(0.5, 0.5)) is None  # too soon, nothing older
    assert rate.add(sample_at(2, 1)) == SECOND // 2  # 0 .. 2
    assert rate.add(sample_at(2.5, 1.5)) == SECOND * 3 // 5  # 0 .. 2.5: the window is at least a second
    assert rate.add(sample_at(1.5, 0.75)) == SECOND // 2  # late and out of order: 0 .. 1.5, baseline kept
    assert rate.add(sample_at(3, 2)) == SECOND  # 2 .. 3
    assert rate.add(sample_at(3, 2)) == SECOND  # the same instant again: from 2, not a zero interval


def test_container_stats_message_carries_the_cpu_clock() -> None:
    sample = CgroupSample(5 * SECOND, 7, 4096, 2048, 1024, 10, 1, None, 1, 0)
    c = Container(
        "c" * 64, "p" * 64, pb.ContainerConfig(), "", "", "", 0, ContainerState.EXITED, "runc", "", "", "", "", ""
    )
    message = stats_convert.container_stats(c, Figures(sample, 0, None, 9 * SECOND), "/var/lib/criopy")
    assert (message.cpu.timestamp, message.cpu.usage_core_nano_seconds.value) == (9 * SECOND, 7)
    assert message.cpu.usage_nano_cores.value == 0
    assert (message.memory.timestamp, message.memory.working_set_bytes.value) == (5 * SECOND, 2048)
