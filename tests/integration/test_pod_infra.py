"""The pod infra process (catatonit under conmon + runc) against the real kernel (root).

Each test pins its own net/ipc/uts namespaces under tmp_path with
podsandbox.namespaces.create, uses a random sandbox ID, a runc --root under
tmp_path and a cgroup parent of its own, and removes all of it in a finally
block (runc delete --force, unpin, rmdir cgroups), so it can run any number of times.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri.config import Config, RuntimeHandlerConfig
from podsandbox import infra, namespaces
from podsandbox.infra import InfraError
from podsandbox.sandbox import Sandbox, SandboxState
from podsandbox.spec import Metadata, NamespaceMode, SandboxSpec
from tests.support.system import (
    CATATONIT,
    CONMON,
    RUNC,
    remove_cgroup_parent,
    require_binaries,
    runc_list,
    wait_gone,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and runc need root (CI runs as root)"),
    pytest.mark.root,
]


@pytest.fixture(autouse=True)
def _binaries_present() -> None:
    require_binaries(RUNC, CONMON, CATATONIT)


def ns_ino(path: str) -> int:
    return os.stat(path).st_ino


class PodFixture:
    def __init__(self, tmp: Path, kinds: tuple[str, ...]) -> None:
        self.tmp = tmp
        self.config = Config()
        self.config.runroot = str(tmp / "run")
        self.config.runtime.runtimes = {"runc": RuntimeHandlerConfig(path=RUNC, root=str(tmp / "runc-root"))}
        self.config.runtime.default_runtime = "runc"
        self.config.runtime.conmon = CONMON
        self.config.runtime.cgroup_manager = "cgroupfs"
        sandbox_id = secrets.token_hex(32)
        pins = {kind: str(tmp / "ns" / kind / sandbox_id) for kind in kinds}
        spec = SandboxSpec(
            metadata=Metadata(name="infra-test", uid=secrets.token_hex(8), namespace="default"),
            pid_mode=NamespaceMode.POD,
            network_mode=NamespaceMode.POD if "net" in kinds else NamespaceMode.NODE,
            runtime_handler="runc",
        )
        self.sandbox = Sandbox(
            id=sandbox_id,
            spec=spec,
            created_at=time.time_ns(),
            state=SandboxState.READY,
            dir=str(tmp / "sandboxes" / sandbox_id),
            pins=pins,
            cgroup_parent=f"/criopy-test-{secrets.token_hex(4)}",
        )
        Path(self.sandbox.dir).mkdir(parents=True)

    @property
    def runc_root(self) -> str:
        return self.config.runtime_root("runc")

    def cleanup(self) -> None:
        subprocess.run(
            [RUNC, "--root", self.runc_root, "delete", "--force", self.sandbox.id],
            check=False,
            capture_output=True,
            timeout=30,
        )
        namespaces.release_all(self.sandbox.pins.values())
        remove_cgroup_parent(self.sandbox.cgroup_parent)


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[PodFixture]:
    fixture = PodFixture(tmp_path, ("net", "ipc", "uts"))
    try:
        asyncio.run(namespaces.create(fixture.sandbox.pins, "infra-test", {}))
        yield fixture
    finally:
        fixture.cleanup()


@pytest.fixture
def host_network_pod(tmp_path: Path) -> Iterator[PodFixture]:
    fixture = PodFixture(tmp_path, ("ipc",))
    try:
        asyncio.run(namespaces.create(fixture.sandbox.pins, "", {}))
        yield fixture
    finally:
        fixture.cleanup()


def test_infra_is_pid_1_in_the_pods_namespaces_and_cgroup(pod: PodFixture) -> None:
    sandbox = pod.sandbox
    pid = asyncio.run(infra.start(sandbox, pod.config))
    assert pid > 0
    sandbox.infra_pid = pid
    # `runc start` returns once the exec fifo is opened: runc init may not have exec'd catatonit yet.
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] != b"/catatonit" and time.monotonic() < deadline:
        time.sleep(0.01)

    # The pod's pinned namespaces, joined.
    for kind in ("net", "ipc", "uts"):
        assert ns_ino(f"/proc/{pid}/ns/{kind}") == ns_ino(sandbox.pins[kind]), kind
    # New pid and mount namespaces, with catatonit as PID 1 of its own.
    assert ns_ino(f"/proc/{pid}/ns/pid") != ns_ino("/proc/self/ns/pid")
    assert ns_ino(f"/proc/{pid}/ns/mnt") != ns_ino("/proc/self/ns/mnt")
    status = Path(f"/proc/{pid}/status").read_text()
    nspid = next(line for line in status.splitlines() if line.startswith("NSpid:")).split()[1:]
    assert nspid == [str(pid), "1"]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"/catatonit", b"-P"]
    assert "NoNewPrivs:\t1" in status
    assert "CapEff:\t0000000000000000" in status
    # Its cgroup: <parent>/criopy-<id>.
    expected = f"{sandbox.cgroup_parent}/criopy-{sandbox.id}"
    paths = {line.split(":", 2)[2] for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines()}
    assert expected in paths, paths

    bundle = Path(sandbox.dir) / "infra"
    assert (bundle / "config.json").is_file()
    assert runc_list(pod.runc_root) == [sandbox.id]

    asyncio.run(infra.stop(sandbox, pod.config))
    assert wait_gone(pid)
    assert runc_list(pod.runc_root) == []
    assert not bundle.exists()
    # The pinned namespaces outlive the infra process.
    assert namespaces.is_pinned(sandbox.pins["net"])

    asyncio.run(infra.stop(sandbox, pod.config))  # already stopped: fine


def test_host_network_pod_keeps_the_hosts_network(host_network_pod: PodFixture) -> None:
    sandbox = host_network_pod.sandbox
    pid = asyncio.run(infra.start(sandbox, host_network_pod.config))
    try:
        assert ns_ino(f"/proc/{pid}/ns/net") == ns_ino("/proc/self/ns/net")
        assert ns_ino(f"/proc/{pid}/ns/uts") == ns_ino("/proc/self/ns/uts")
        assert ns_ino(f"/proc/{pid}/ns/ipc") == ns_ino(sandbox.pins["ipc"])
    finally:
        asyncio.run(infra.stop(sandbox, host_network_pod.config))
    assert wait_gone(pid)
    assert runc_list(host_network_pod.runc_root) == []


def test_stop_of_a_process_that_died_on_its_own(pod: PodFixture) -> None:
    sandbox = pod.sandbox
    pid = asyncio.run(infra.start(sandbox, pod.config))
    os.kill(pid, 9)
    assert wait_gone(pid)
    asyncio.run(infra.stop(sandbox, pod.config))
    assert runc_list(pod.runc_root) == []
    assert not (Path(sandbox.dir) / "infra").exists()


def test_stop_without_start_is_fine(pod: PodFixture) -> None:
    asyncio.run(infra.stop(pod.sandbox, pod.config))
    assert not (Path(pod.sandbox.dir) / "infra").exists()


def test_failed_start_removes_what_it_made(pod: PodFixture) -> None:
    not_executable = pod.tmp / "not-executable"
    not_executable.write_text("just text\n")
    not_executable.chmod(0o644)
    pod.config.pod.infra_binary = str(not_executable)
    with pytest.raises(InfraError) as err:
        asyncio.run(infra.start(pod.sandbox, pod.config))
    assert "permission denied" in str(err.value).lower()
    assert runc_list(pod.runc_root) == []
    assert not (Path(pod.sandbox.dir) / "infra").exists()


def test_missing_infra_binary_is_refused_before_anything_is_made(pod: PodFixture) -> None:
    pod.config.pod.infra_binary = str(pod.tmp / "no-such-catatonit")
    with pytest.raises(InfraError, match="infra_binary"):
        asyncio.run(infra.start(pod.sandbox, pod.config))
    assert runc_list(pod.runc_root) == []
    assert not (Path(pod.sandbox.dir) / "infra").exists()
