"""The exec fifo protocol as runc's init speaks it, played by a shell: open for writing, write one byte, exec.

The shell stands in for `runc init`: it opens the fifo for writing (blocking until a reader comes), writes
"0" and then holds the write end for a moment, as the init does until its exec closes it. start() must
return only after that close, remove the fifo, and tell an init that died before writing.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from cri.oci import exec_fifo


@pytest.fixture
def fifo(tmp_path: Path) -> Path:
    path = tmp_path / exec_fifo.FIFO_NAME
    os.mkfifo(path, 0o622)
    return path


def init(procs: list[subprocess.Popen[bytes]], script: str, fifo: Path, marker: Path) -> int:
    proc = subprocess.Popen(["sh", "-c", script, "sh", str(fifo), str(marker)])
    procs.append(proc)
    return proc.pid


# $1 the fifo, $2 a file the "init" creates just before its write end closes (its exec).
WRITES_THEN_EXECS = 'exec 3>"$1"; printf 0 >&3; sleep 0.3; touch "$2"; exec 3>&-; sleep 30'


@pytest.mark.parametrize(
    "script",
    [WRITES_THEN_EXECS, "sleep 0.3; " + WRITES_THEN_EXECS],
    ids=["init-already-waiting", "init-opens-after-the-reader"],
)
def test_start_returns_once_the_init_closed_its_end_and_removes_the_fifo(
    script: str, fifo: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    marker = tmp_path / "exec'd"
    pid = init(procs, script, fifo, marker)
    asyncio.run(exec_fifo.start(str(fifo), pid))
    assert marker.exists()
    assert not fifo.exists()


def test_an_init_that_closes_without_writing_is_an_error(
    fifo: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    pid = init(procs, 'exec 3>"$1"; exec 3>&-; sleep 30', fifo, tmp_path / "unused")
    with pytest.raises(exec_fifo.ExecFifoError, match="already dead or has already been started"):
        asyncio.run(exec_fifo.start(str(fifo), pid))


def test_an_init_that_dies_before_opening_the_fifo_is_an_error_not_a_wait(
    fifo: Path, tmp_path: Path, procs: list[subprocess.Popen[bytes]]
) -> None:
    pid = init(procs, "sleep 0.2; exit 1", fifo, tmp_path / "unused")

    async def bounded() -> None:
        async with asyncio.timeout(20):
            await exec_fifo.start(str(fifo), pid)

    with pytest.raises(exec_fifo.ExecFifoError, match="already dead"):
        asyncio.run(bounded())
    assert fifo.exists()  # left as runc leaves it: `runc delete` removes the container's state dir


def test_no_fifo_means_not_in_the_created_state(tmp_path: Path) -> None:
    with pytest.raises(exec_fifo.NoExecFifo, match="not in the created state"):
        asyncio.run(exec_fifo.start(str(tmp_path / "exec.fifo"), os.getpid()))


def test_a_file_that_is_not_a_fifo_is_refused_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "exec.fifo"
    path.write_text("0")
    with pytest.raises(exec_fifo.ExecFifoError, match="not a fifo"):
        asyncio.run(exec_fifo.start(str(path), os.getpid()))
    assert path.read_text() == "0"


def test_the_runtime_is_asked_its_dialect_once_when_a_burst_of_starts_asks_at_once(tmp_path: Path) -> None:
    # A node's first burst after a restart starts many containers at once: each start asks whether the
    # runtime is runc. The binary's `--version` must run once for all of them, not once per start.
    calls = tmp_path / "calls"
    binary = tmp_path / "runc"
    binary.write_text(f'#!/bin/sh\necho x >> {calls}\nsleep 0.2\necho "runc version 1.1.5"\n')
    binary.chmod(0o755)

    async def burst() -> list[bool]:
        return await asyncio.gather(*(exec_fifo.speaks_exec_fifo(str(binary)) for _ in range(16)))

    assert asyncio.run(burst()) == [True] * 16
    assert calls.read_text().splitlines() == ["x"]
    assert asyncio.run(exec_fifo.speaks_exec_fifo(str(binary))) is True  # asked again later: still once
    assert calls.read_text().splitlines() == ["x"]
