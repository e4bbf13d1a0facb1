"""UpdatePodSandboxResources (in-place pod resize, KEP-1287 / KEP-2837) through the daemon's socket (root).

The call records the pod-level resources and shows them in PodSandboxStatus's
verbose info; it writes nothing to the host, because the pod cgroup it would
go to is the kubelet's (the kubelet resizes it itself), as with containerd.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.pods import info, pod_config, remove_all_pods
from tests.support.daemon_harness import Daemon

MiB = 1024 * 1024
CGROUP_V1 = Path("/sys/fs/cgroup")


@pytest.fixture
def daemon(make_daemon) -> Iterator[Daemon]:
    d: Daemon = make_daemon()
    try:
        yield d
    finally:
        remove_all_pods(d)


def _run(daemon: Daemon, config: pb.PodSandboxConfig) -> str:
    resp = daemon.runtime().RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60)
    return str(resp.pod_sandbox_id)


def _update(daemon: Daemon, pod_id: str, **fields: pb.LinuxContainerResources) -> None:
    request = pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id=pod_id, **fields)
    daemon.runtime().UpdatePodSandboxResources(request, timeout=10)


def _refused(daemon: Daemon, pod_id: str, **fields: pb.LinuxContainerResources) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        _update(daemon, pod_id, **fields)
    return err.value


def test_resize_is_recorded_and_shown_bad_input_refused_unknown_pod_not_found(daemon: Daemon) -> None:
    config = pod_config(host_network=True)
    config.linux.resources.CopyFrom(pb.LinuxContainerResources(cpu_shares=1024, memory_limit_in_bytes=512 * MiB))
    pod = _run(daemon, config)
    # Before any resize, the status shows what RunPodSandbox was given.
    assert info(daemon, pod)["resources"] == {"cpuShares": "1024", "memoryLimitInBytes": str(512 * MiB)}
    assert info(daemon, pod)["overhead"] is None

    resources = pb.LinuxContainerResources(
        cpu_shares=512, cpu_quota=50000, cpu_period=100000, memory_limit_in_bytes=256 * MiB
    )
    overhead = pb.LinuxContainerResources(cpu_shares=25, memory_limit_in_bytes=32 * MiB)
    _update(daemon, pod[:12], resources=resources, overhead=overhead)  # a unique prefix, as crictl users type
    shown = info(daemon, pod)
    assert shown["resources"] == {
        "cpuShares": "512",
        "cpuQuota": "50000",
        "cpuPeriod": "100000",
        "memoryLimitInBytes": str(256 * MiB),
    }
    assert shown["overhead"] == {"cpuShares": "25", "memoryLimitInBytes": str(32 * MiB)}

    bad = {
        "resources.cpu_shares": {"resources": pb.LinuxContainerResources(cpu_shares=-2)},
        "resources.memory_limit_in_bytes": {"resources": pb.LinuxContainerResources(memory_limit_in_bytes=-1)},
        "resources.cpu_quota": {"resources": pb.LinuxContainerResources(cpu_quota=10)},
        "resources.cpuset_cpus": {"resources": pb.LinuxContainerResources(cpuset_cpus="0-a")},
        # Valid resources with a bad overhead: neither is taken.
        "overhead.cpu_period": {
            "resources": pb.LinuxContainerResources(cpu_shares=2),
            "overhead": pb.LinuxContainerResources(cpu_period=5),
        },
    }
    for field, fields in bad.items():
        err = _refused(daemon, pod, **fields)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err.details())
        assert field in (err.details() or ""), (field, err.details())
    assert info(daemon, pod) == shown  # nothing half-applied

    missing = _refused(daemon, "0" * 64, resources=resources)
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    empty = _refused(daemon, "", resources=resources)
    assert empty.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "pod_sandbox_id" in (empty.details() or "")

    # A resize to no limits at all is recorded as such, and a stopped pod still reports it.
    _update(daemon, pod)
    daemon.runtime().StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
    assert info(daemon, pod)["resources"] is None
    assert info(daemon, pod)["overhead"] is None


def test_a_resize_outlives_a_crash_of_the_daemon(daemon: Daemon) -> None:
    pod = _run(daemon, pod_config(host_network=True))
    _update(daemon, pod, resources=pb.LinuxContainerResources(cpu_shares=300, memory_limit_in_bytes=96 * MiB))
    assert daemon.proc is not None
    daemon.proc.kill()  # no graceful stop: the record was on the disk when the call returned
    daemon.proc.wait()
    daemon.start()
    assert info(daemon, pod)["resources"] == {"cpuShares": "300", "memoryLimitInBytes": str(96 * MiB)}


@pytest.fixture
def kubelet_pod_cgroup() -> Iterator[str]:
    """A pod cgroup as the kubelet makes it (cgroupfs driver, v1): its own directory with its own limits."""
    if not (CGROUP_V1 / "memory" / "memory.limit_in_bytes").exists() or not (CGROUP_V1 / "cpu").is_dir():
        pytest.skip("this host has no cgroup v1 memory and cpu hierarchies")
    name = f"criopy-e2e-pod{secrets.token_hex(6)}"
    made = [CGROUP_V1 / "memory" / name, CGROUP_V1 / "cpu" / name]
    try:
        for directory in made:
            directory.mkdir()
        (made[0] / "memory.limit_in_bytes").write_text(str(512 * MiB))
        (made[1] / "cpu.shares").write_text("1024")
        yield f"/{name}"
    finally:
        for directory in made:
            if directory.exists():
                directory.rmdir()


def test_the_kubelets_pod_cgroup_is_left_to_the_kubelet(daemon: Daemon, kubelet_pod_cgroup: str) -> None:
    config = pod_config(host_network=True)
    config.linux.cgroup_parent = kubelet_pod_cgroup
    pod = _run(daemon, config)
    _update(daemon, pod, resources=pb.LinuxContainerResources(cpu_shares=256, memory_limit_in_bytes=128 * MiB))
    details = info(daemon, pod)
    assert details["cgroupParent"] == kubelet_pod_cgroup
    assert details["resources"] == {"cpuShares": "256", "memoryLimitInBytes": str(128 * MiB)}
    # The kubelet writes its pod cgroup around this call; the runtime does not (containerd does not either).
    memory = CGROUP_V1 / "memory" / kubelet_pod_cgroup.lstrip("/") / "memory.limit_in_bytes"
    assert int(memory.read_text()) == 512 * MiB
    assert int((CGROUP_V1 / "cpu" / kubelet_pod_cgroup.lstrip("/") / "cpu.shares").read_text()) == 1024
    daemon.runtime().RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod), timeout=60)
