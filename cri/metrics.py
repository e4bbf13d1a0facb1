"""Prometheus collectors and the metrics HTTP endpoint."""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from cri.log import event

log = logging.getLogger(__name__)

OPERATIONS = Counter(
    "criopy_operations",
    "CRI operations handled, by operation (RPC name) and gRPC status code.",
    ["operation", "code"],
)
OPERATION_SECONDS = Histogram(
    "criopy_operations_duration_seconds",
    "Time to answer a CRI operation, by operation (RPC name).",
    ["operation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
)


POD_SANDBOXES = Gauge("criopy_pod_sandboxes", "Pod sandboxes the daemon holds, by state.", ["state"])
CNI_PLUGIN_SECONDS = Histogram(
    "criopy_cni_plugin_duration_seconds",
    "Time of one CNI plugin call, by plugin type and command.",
    ["plugin", "command"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
CNI_PLUGIN_FAILURES = Counter(
    "criopy_cni_plugin_failures", "CNI plugin calls that failed, by plugin type and command.", ["plugin", "command"]
)


IMAGE_PULLS = Counter("criopy_image_pulls", "Image pulls, by outcome (success, failure).", ["outcome"])
IMAGE_PULL_BYTES = Counter("criopy_image_pull_bytes", "Bytes of blobs downloaded from registries.")
IMAGE_PULL_SECONDS = Histogram(
    "criopy_image_pull_duration_seconds",
    "Time of a successful image pull, from resolving the reference to recording the image.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
IMAGE_LAYER_CACHE_HITS = Counter("criopy_image_layer_cache_hits", "Layers a pull found already unpacked.")
IMAGE_LAYER_UNPACKS = Counter("criopy_image_layer_unpacks", "Layers a pull had to unpack.")

CONTAINERS = Gauge("criopy_containers", "Containers the daemon holds, by state.", ["state"])
CONTAINER_EXITS = Counter("criopy_container_exits", "Container exits seen, by reason.", ["reason"])


def _count_when_scraped(gauge: Gauge, states: Iterable[str], count: Callable[[str], int]) -> None:
    """`gauge` reads count(state) for each state when scraped. Counting at every change walked all the
    objects on the event loop at each of them: a walk of 110 per event in a 110-pod burst."""
    for state in states:
        gauge.labels(state=state).set_function(functools.partial(count, state))


def count_container_states(states: Iterable[str], count: Callable[[str], int]) -> None:
    _count_when_scraped(CONTAINERS, states, count)


def record_container_exit(reason: str) -> None:
    CONTAINER_EXITS.labels(reason=reason).inc()


def record_cni_call(plugin: str, command: str, seconds: float, failed: bool) -> None:
    CNI_PLUGIN_SECONDS.labels(plugin=plugin, command=command).observe(seconds)
    if failed:
        CNI_PLUGIN_FAILURES.labels(plugin=plugin, command=command).inc()


def count_sandbox_states(states: Iterable[str], count: Callable[[str], int]) -> None:
    _count_when_scraped(POD_SANDBOXES, states, count)


@functools.cache
def _operation_children(operation: str, code: str) -> tuple[Any, Any]:
    # labels() costs a lock and a dict walk; every RPC pays it, so each child is looked up once.
    return OPERATIONS.labels(operation=operation, code=code), OPERATION_SECONDS.labels(operation=operation)


def record_operation(operation: str, code: str, seconds: float) -> None:
    count, duration = _operation_children(operation, code)
    count.inc()
    duration.observe(seconds)


@dataclass
class MetricsEndpoint:
    server: WSGIServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve(address: str, port: int) -> MetricsEndpoint | None:
    """Start the /metrics endpoint in a thread; port 0 turns it off."""
    if port == 0:
        event(log, logging.INFO, "metrics endpoint disabled")
        return None
    server, thread = start_http_server(port, addr=address)
    event(log, logging.INFO, "metrics endpoint listening", address=address, port=port)
    return MetricsEndpoint(server, thread)
