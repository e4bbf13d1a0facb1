"""Fixtures the unit tests share: the gRPC transport's (their harness is tests/support/h2grpc.py), child processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.h2grpc import Client, Served, serving_handlers


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serving_handlers(str(tmp_path / "g.sock")) as s:
        yield s


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    c = Client(served.path)
    yield c
    c.close()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts: killed and reaped after it, whatever its outcome, with their process group
    when they lead one (their children too). Before the reaping, the pid names no other process or group."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        with contextlib.suppress(ProcessLookupError):  # it leads no group
            os.killpg(proc.pid, signal.SIGKILL)
        proc.kill()
        proc.wait(10)
