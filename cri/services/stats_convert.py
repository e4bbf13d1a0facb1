"""Container and pod figures as the CRI's stats and metrics messages."""

from __future__ import annotations

import time
from collections.abc import Iterable

from api.runtime.v1 import api_pb2 as pb
from cri.containers.container import Container
from cri.containers.stats import Figures, NetworkFigures
from podsandbox.sandbox import Sandbox


def _u64(value: int | None) -> pb.UInt64Value | None:
    return None if value is None else pb.UInt64Value(value=max(value, 0))


def _cpu(figures: Figures) -> pb.CpuUsage:
    return pb.CpuUsage(
        timestamp=figures.cpu_timestamp_ns,
        usage_core_nano_seconds=_u64(figures.sample.cpu_usage_ns),
        usage_nano_cores=_u64(figures.nano_cores),
    )


def _memory(figures: Figures) -> pb.MemoryUsage:
    s = figures.sample
    return pb.MemoryUsage(
        timestamp=s.timestamp_ns,
        working_set_bytes=_u64(s.memory_working_set),
        available_bytes=_u64(s.memory_available),
        usage_bytes=_u64(s.memory_usage),
        rss_bytes=_u64(s.memory_rss),
        page_faults=_u64(s.memory_page_faults),
        major_page_faults=_u64(s.memory_major_page_faults),
    )


def container_stats(container: Container, figures: Figures | None, fs_mountpoint: str) -> pb.ContainerStats:
    stats = pb.ContainerStats(
        attributes=pb.ContainerAttributes(
            id=container.id,
            metadata=container.config.metadata,
            labels=dict(container.config.labels),
            annotations=dict(container.config.annotations),
        )
    )
    if figures is None:
        return stats
    stats.cpu.CopyFrom(_cpu(figures))
    stats.memory.CopyFrom(_memory(figures))
    if figures.layer is not None:
        stats.writable_layer.CopyFrom(
            pb.FilesystemUsage(
                timestamp=figures.layer.timestamp_ns,
                fs_id=pb.FilesystemIdentifier(mountpoint=fs_mountpoint),
                used_bytes=pb.UInt64Value(value=figures.layer.bytes),
                inodes_used=pb.UInt64Value(value=figures.layer.inodes),
            )
        )
    return stats


def _sum(values: Iterable[int | None]) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def pod_stats(
    sandbox: Sandbox,
    containers: list[pb.ContainerStats],
    figures: list[Figures],
    net: NetworkFigures | None,
) -> pb.PodSandboxStats:
    """A pod's figures are the sums of its containers' (its cgroup parent may be shared, so it is not read)."""
    now = time.time_ns()
    samples = [f.sample for f in figures]
    linux = pb.LinuxPodSandboxStats(
        cpu=pb.CpuUsage(
            # When the summed counters were read, so that usage growth over timestamp growth is the pod's CPU use.
            timestamp=max((f.cpu_timestamp_ns for f in figures), default=now),
            usage_core_nano_seconds=_u64(_sum(s.cpu_usage_ns for s in samples)),
            usage_nano_cores=_u64(_sum(f.nano_cores for f in figures)),
        ),
        memory=pb.MemoryUsage(
            timestamp=now,
            working_set_bytes=_u64(_sum(s.memory_working_set for s in samples)),
            usage_bytes=_u64(_sum(s.memory_usage for s in samples)),
            rss_bytes=_u64(_sum(s.memory_rss for s in samples)),
            page_faults=_u64(_sum(s.memory_page_faults for s in samples)),
            major_page_faults=_u64(_sum(s.memory_major_page_faults for s in samples)),
        ),
        process=pb.ProcessUsage(timestamp=now, process_count=_u64(_sum(s.pids for s in samples))),
        containers=containers,
    )
    if net is not None:
        linux.network.CopyFrom(_network(net))
    meta = sandbox.spec.metadata
    return pb.PodSandboxStats(
        attributes=pb.PodSandboxAttributes(
            id=sandbox.id,
            metadata=pb.PodSandboxMetadata(
                name=meta.name, uid=meta.uid, namespace=meta.namespace, attempt=meta.attempt
            ),
            labels=dict(sandbox.spec.labels),
            annotations=dict(sandbox.spec.annotations),
        ),
        linux=linux,
    )


def _network(net: NetworkFigures) -> pb.NetworkUsage:
    interfaces = [
        pb.NetworkInterfaceUsage(
            name=name,
            rx_bytes=pb.UInt64Value(value=rx),
            rx_errors=pb.UInt64Value(value=rx_err),
            tx_bytes=pb.UInt64Value(value=tx),
            tx_errors=pb.UInt64Value(value=tx_err),
        )
        for name, (rx, rx_err, tx, tx_err) in sorted(net.interfaces.items())
    ]
    default = next((i for i in interfaces if i.name == "eth0"), interfaces[0] if interfaces else None)
    return pb.NetworkUsage(timestamp=net.timestamp_ns, default_interface=default, interfaces=interfaces)


# ---- metrics (ListMetricDescriptors / ListPodSandboxMetrics), named as cAdvisor names them --------

_METRICS = (
    ("container_cpu_usage_seconds_total", "Cumulative cpu time consumed in seconds.", pb.COUNTER),
    ("container_memory_usage_bytes", "Current memory usage in bytes, including all memory.", pb.GAUGE),
    ("container_memory_working_set_bytes", "Current working set in bytes.", pb.GAUGE),
    ("container_memory_rss", "Size of RSS in bytes.", pb.GAUGE),
    ("container_oom_events_total", "Count of out of memory events observed for the container.", pb.COUNTER),
)
_LABELS = ["container", "id", "image", "name", "namespace", "pod"]


def metric_descriptors() -> list[pb.MetricDescriptor]:
    return [pb.MetricDescriptor(name=name, help=text, label_keys=_LABELS) for name, text, _ in _METRICS]


def container_metrics(container: Container, sandbox: Sandbox, figures: Figures) -> pb.ContainerMetrics:
    s = figures.sample
    values = {
        "container_cpu_usage_seconds_total": None if s.cpu_usage_ns is None else s.cpu_usage_ns // 1_000_000_000,
        "container_memory_usage_bytes": s.memory_usage,
        "container_memory_working_set_bytes": s.memory_working_set,
        "container_memory_rss": s.memory_rss,
        "container_oom_events_total": s.oom_kills,
    }
    meta = sandbox.spec.metadata
    labels = [container.name, container.id, container.image_name, container.name, meta.namespace, meta.name]
    metrics = [
        pb.Metric(
            name=name,
            timestamp=s.timestamp_ns,
            metric_type=kind,
            label_values=labels,
            value=pb.UInt64Value(value=max(values[name] or 0, 0)),
        )
        for name, _, kind in _METRICS
        if values[name] is not None
    ]
    return pb.ContainerMetrics(container_id=container.id, metrics=metrics)
