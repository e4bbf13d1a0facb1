"""cri.system.process: helpers run to their exit in pool threads, with their timeout and their stderr."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from cri.system.process import CommandError, Spawn, communicate, run


def alive(pid: int) -> bool:
    """Whether pid still runs (a zombie left unreaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def wait_for_pid(pidfile: Path) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        if text:
            return int(text)
        time.sleep(0.01)
    raise AssertionError(f"{pidfile} was never written")


def test_output_and_stdin():
    done = asyncio.run(run(["sh", "-c", "cat; echo said >&2"], timeout=10, stdin=b"fed"))
    assert done.stdout == b"fed"
    assert done.stderr == "said\n"


def test_a_failure_names_the_status_and_carries_stderr():
    with pytest.raises(CommandError) as err:
        asyncio.run(run(["sh", "-c", "echo broken config >&2; exit 3"], timeout=10))
    assert "exited with status 3" in str(err.value)
    assert "broken config" in str(err.value)
    assert err.value.stderr == "broken config\n"


def test_a_missing_binary_cannot_start():
    with pytest.raises(CommandError, match="cannot start"):
        asyncio.run(run(["/nonexistent/criopy-helper"], timeout=10))


def test_a_helper_past_its_timeout_is_killed_and_its_stderr_kept(tmp_path):
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}; echo started >&2; exec sleep 30"
    started = time.monotonic()
    with pytest.raises(CommandError) as err:
        asyncio.run(run(["sh", "-c", script], timeout=0.5))
    assert time.monotonic() - started < 10
    assert "timed out after 0.5s" in str(err.value)
    assert "started" in str(err.value)
    assert not alive(wait_for_pid(pidfile))


def run_and_cancel(spawn: Spawn, pidfile: Path, *, kill: bool) -> None:
    async def scenario() -> None:
        call = asyncio.create_task(communicate(spawn, timeout=30, kill_when_cancelled=kill))
        while not pidfile.exists() or not pidfile.read_text().strip():
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(scenario())


def test_a_cancelled_call_kills_its_process_group(tmp_path):
    """The helper and what it started in its session go with the call given up."""
    pidfile = tmp_path / "pid"
    script = f"sleep 30 & echo $! > {pidfile}; wait"
    run_and_cancel(Spawn(["sh", "-c", script], start_new_session=True), pidfile, kill=True)
    grandchild = wait_for_pid(pidfile)
    deadline = time.monotonic() + 10
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not alive(grandchild)


def test_a_cancelled_call_may_leave_its_process_to_finish(tmp_path):
    """kill_when_cancelled=False: a runtime's delete is finished even when its caller left."""
    pidfile, finished = tmp_path / "pid", tmp_path / "finished"
    script = f"echo $$ > {pidfile}; sleep 0.3; touch {finished}"
    run_and_cancel(Spawn(["sh", "-c", script]), pidfile, kill=False)
    deadline = time.monotonic() + 10
    while not finished.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert finished.exists()


def test_passed_fds_env_and_cwd_reach_the_process(tmp_path):
    read_fd, write_fd = os.pipe()
    try:
        spawn = Spawn(
            ["sh", "-c", f'echo "$GREETING $(pwd)" > /dev/fd/{write_fd}'],
            env={"GREETING": "hello", "PATH": os.environ["PATH"]},
            cwd=str(tmp_path),
            pass_fds=(write_fd,),
        )
        done = asyncio.run(communicate(spawn, timeout=10))
        os.close(write_fd)
        write_fd = -1
        assert done.returncode == 0
        assert os.read(read_fd, 4096).decode() == f"hello {tmp_path}\n"
    finally:
        os.close(read_fd)
        if write_fd >= 0:
            os.close(write_fd)
