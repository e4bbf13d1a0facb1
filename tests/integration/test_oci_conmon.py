"""Containers under the real conmon and runc (root): create, start, log, exit file, errors, cleanup.

Each test gets a bundle with Debian's static busybox as its whole root
filesystem, its own runc --root under tmp_path, a random container ID and a
cgroup parent of its own, and removes all of it (runc delete --force, cgroup
directories) in a finally block, so the tests can run any number of times.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from cri.oci import bundle, conmon
from cri.oci.conmon import ConmonLaunch, ContainerNotFound, OciRuntimeError, Runtime
from tests.support.system import BUSYBOX, CONMON, RUNC, remove_cgroup_parent, require_binaries, runc_list

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="runc needs root (CI runs as root)"),
    pytest.mark.root,
]


@pytest.fixture(autouse=True)
def _binaries_present() -> None:
    require_binaries(RUNC, CONMON, BUSYBOX)


@dataclass
class Env:
    tmp: Path
    runtime: Runtime
    bundle: Path
    cid: str
    cgroup_parent: str

    def launch(self) -> ConmonLaunch:
        return ConmonLaunch(
            id=self.cid,
            name=f"test-{self.cid[:12]}",
            bundle=str(self.bundle),
            log_path=str(self.tmp / "ctr.log"),
            exit_dir=str(self.tmp / "exits"),
            persist_dir=str(self.tmp / "persist"),
            socket_dir=str(self.tmp / "sockets"),
        )

    def write_spec(self, args: list[str]) -> None:
        spec = bundle.minimal_spec(
            args,
            namespace_list=bundle.namespaces(new=("pid", "mnt", "ipc", "uts", "net")),
            cgroups_path=bundle.cgroups_path("cgroupfs", self.cgroup_parent, self.cid),
            hostname="conmon-test",
        )
        bundle.write(self.bundle, spec)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    rootfs = tmp_path / "bundle" / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in ("sh", "sleep", "echo"):
        (rootfs / "bin" / applet).symlink_to("busybox")
    cid = secrets.token_hex(32)
    root = tmp_path / "runc-root"
    e = Env(
        tmp=tmp_path,
        runtime=Runtime(name="runc", binary=RUNC, root=str(root)),
        bundle=tmp_path / "bundle",
        cid=cid,
        cgroup_parent=f"/criopy-test-{secrets.token_hex(4)}",
    )
    try:
        yield e
    finally:
        subprocess.run(
            [RUNC, "--root", str(root), "delete", "--force", cid], check=False, capture_output=True, timeout=30
        )
        remove_cgroup_parent(e.cgroup_parent)


def test_container_logs_and_exit_code(env: Env) -> None:
    env.write_spec(["sh", "-c", "echo hello; exit 3"])

    async def scenario() -> int:
        created = await conmon.create(env.runtime, CONMON, env.launch())
        assert created.pid > 0
        assert created.conmon_pid > 0
        state = await conmon.state(env.runtime, env.cid)
        assert (state.status, state.pid, state.bundle) == ("created", created.pid, str(env.bundle))
        await conmon.start(env.runtime, env.cid, init_pid=created.pid)
        code = await conmon.wait_exit(str(env.tmp / "exits"), env.cid, timeout=20)
        assert (await conmon.state(env.runtime, env.cid)).status == "stopped"
        await conmon.delete(env.runtime, env.cid)
        return code

    assert asyncio.run(scenario()) == 3
    lines = (env.tmp / "ctr.log").read_text().splitlines()
    assert any(line.endswith(" stdout F hello") for line in lines), lines
    assert (env.tmp / "persist" / "exit").read_text().strip() == "3"
    assert runc_list(env.runtime.root) == []


def test_failed_create_carries_the_runtime_message_and_leaves_nothing(env: Env) -> None:
    env.write_spec(["/no/such/binary"])
    with pytest.raises(OciRuntimeError) as err:
        asyncio.run(conmon.create(env.runtime, CONMON, env.launch(), timeout=30))
    assert "/no/such/binary" in str(err.value)
    assert "no such file or directory" in err.value.message
    assert "time=" not in err.value.message  # runc's log line reduced to its msg
    assert runc_list(env.runtime.root) == []
    assert not (env.tmp / "sockets" / env.cid).exists()
    assert not (env.tmp / "exits" / env.cid).exists()


def test_conmon_refusing_its_arguments_is_reported(env: Env) -> None:
    env.write_spec(["sh", "-c", "true"])
    bad = dataclasses.replace(env.launch(), extra_args=("--no-such-conmon-option",))
    with pytest.raises(OciRuntimeError) as err:
        asyncio.run(conmon.create(env.runtime, CONMON, bad, timeout=30))
    assert "no-such-conmon-option" in str(err.value)
    assert runc_list(env.runtime.root) == []


def test_kill_and_delete_are_idempotent(env: Env) -> None:
    env.write_spec(["sleep", "1000"])

    async def scenario() -> None:
        created = await conmon.create(env.runtime, CONMON, env.launch())
        await conmon.start(env.runtime, env.cid, init_pid=created.pid)
        assert (await conmon.state(env.runtime, env.cid)).status == "running"
        assert await conmon.kill(env.runtime, env.cid, "KILL") is True
        assert await conmon.wait_exit(str(env.tmp / "exits"), env.cid, timeout=20) == 137
        assert await conmon.wait_gone([created.pid], 10)
        assert await conmon.kill(env.runtime, env.cid, "KILL") is False  # stopped
        await conmon.delete(env.runtime, env.cid)
        await conmon.delete(env.runtime, env.cid)  # gone
        assert await conmon.kill(env.runtime, env.cid, "KILL") is False  # gone
        with pytest.raises(ContainerNotFound):
            await conmon.state(env.runtime, env.cid)
        assert await conmon.list_containers(env.runtime) == []

    asyncio.run(scenario())
    assert runc_list(env.runtime.root) == []


def test_delete_force_removes_a_running_container(env: Env) -> None:
    env.write_spec(["sleep", "1000"])

    async def scenario() -> int:
        created = await conmon.create(env.runtime, CONMON, env.launch())
        await conmon.start(env.runtime, env.cid)
        listed = await conmon.list_containers(env.runtime)
        assert [(s.id, s.status) for s in listed] == [(env.cid, "running")]
        await conmon.delete(env.runtime, env.cid, force=True)
        assert await conmon.wait_gone([created.pid], 10)
        return await conmon.wait_exit(str(env.tmp / "exits"), env.cid, timeout=20)

    assert asyncio.run(scenario()) == 137
    assert runc_list(env.runtime.root) == []


def test_wait_exit_times_out_while_running(env: Env) -> None:
    env.write_spec(["sleep", "1000"])

    async def scenario() -> None:
        await conmon.create(env.runtime, CONMON, env.launch())
        await conmon.start(env.runtime, env.cid)
        with pytest.raises(TimeoutError):
            await conmon.wait_exit(str(env.tmp / "exits"), env.cid, timeout=0.3)
        await conmon.delete(env.runtime, env.cid, force=True)

    asyncio.run(scenario())


def test_create_that_hangs_times_out_and_conmon_is_stopped(env: Env) -> None:
    env.write_spec(["sh", "-c", "true"])
    hanging = env.tmp / "hanging-runtime"
    marker = f"99.{secrets.randbelow(10**6):06d}"  # a sleep length no other process has
    hanging.write_text(f'#!/bin/sh\ncase "$*" in *" create "*) exec sleep {marker};; esac\nexit 0\n')
    hanging.chmod(0o755)
    runtime = dataclasses.replace(env.runtime, binary=str(hanging))
    launch = env.launch()

    async def scenario() -> None:
        with pytest.raises(OciRuntimeError, match="timed out after 1s"):
            await conmon.create(runtime, CONMON, launch, timeout=1)

    asyncio.run(scenario())
    # conmon (and with it the runtime it ran) was killed, and its files are gone.
    assert not Path(launch.monitor_pidfile).exists()
    assert not (env.tmp / "sockets" / env.cid).exists()
    time.sleep(0.2)  # SIGKILL delivery to the runtime (conmon's PDEATHSIG) is asynchronous
    for pattern in (env.cid, f"sleep {marker}"):
        found = subprocess.run(["pgrep", "-f", pattern], check=False, capture_output=True, text=True, timeout=10)
        assert found.stdout.strip() == "", pattern


def test_start_through_the_exec_fifo_runs_the_process_and_leaves_runc_saying_running(env: Env) -> None:
    env.write_spec(["sh", "-c", "echo started; exec sleep 1000"])
    fifo = env.tmp / "runc-root" / env.cid / "exec.fifo"

    async def scenario() -> None:
        created = await conmon.create(env.runtime, CONMON, env.launch())
        assert fifo.exists()
        await conmon.start(env.runtime, env.cid, init_pid=created.pid)
        assert not fifo.exists()
        assert (await conmon.state(env.runtime, env.cid)).status == "running"
        # The init exec'd the container's process, which went on to exec sleep.
        assert Path(f"/proc/{created.pid}/cmdline").read_bytes().split(b"\0")[:2] == [b"sleep", b"1000"]
        with pytest.raises(OciRuntimeError, match="not in the created state"):
            await conmon.start(env.runtime, env.cid, init_pid=created.pid)
        await conmon.delete(env.runtime, env.cid, force=True)

    asyncio.run(scenario())
    lines = (env.tmp / "ctr.log").read_text().splitlines()
    assert any(line.endswith(" stdout F started") for line in lines), lines


def test_start_of_a_container_whose_init_died_fails_at_once(env: Env) -> None:
    env.write_spec(["sleep", "1000"])

    async def scenario() -> float:
        created = await conmon.create(env.runtime, CONMON, env.launch())
        os.kill(created.pid, 9)
        assert await conmon.wait_gone([created.pid], 10)
        began = time.monotonic()
        with pytest.raises(OciRuntimeError, match="already dead"):
            await conmon.start(env.runtime, env.cid, init_pid=created.pid, timeout=20)
        return time.monotonic() - began

    # Not a timing assertion on speed: a start that missed the death would wait out the 20 s timeout.
    assert asyncio.run(scenario()) < 10


def test_runc_is_started_through_its_fifo_and_other_runtimes_by_their_start_command() -> None:
    from cri.oci import exec_fifo

    crun = shutil.which("crun")

    async def dialects() -> tuple[bool, bool | None, bool]:
        return (
            await exec_fifo.speaks_exec_fifo(RUNC),
            await exec_fifo.speaks_exec_fifo(crun) if crun else None,
            await exec_fifo.speaks_exec_fifo("/no/such/runtime"),
        )

    runc, crun_speaks, missing = asyncio.run(dialects())
    assert runc is True
    assert crun_speaks in (False, None)
    assert missing is False
