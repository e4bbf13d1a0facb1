"""Signals sent straight to a container init: the names understood, and the parent check that guards the pid."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.oci import init_signal


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("SIGTERM", signal.SIGTERM),
        ("TERM", signal.SIGTERM),
        ("sigquit", signal.SIGQUIT),
        ("9", signal.SIGKILL),
        ("SIGRTMIN", signal.SIGRTMIN),
        ("SIGRTMIN+3", signal.SIGRTMIN + 3),
        ("RTMAX-2", signal.SIGRTMAX - 2),
        ("SIGRTMINPLUS1", signal.SIGRTMIN + 1),
        ("SIGRTMAXMINUS1", signal.SIGRTMAX - 1),
        ("SIGRTMAX", signal.SIGRTMAX),
    ],
)
def test_signal_names_image_and_cri_spellings(name: str, expected: int) -> None:
    assert init_signal.number(name) == expected


@pytest.mark.parametrize("name", ["SIGBOGUS", "", "0", "65", "SIGRTMIN+40", "SIGRTMAX+1", "RTMINPLUS"])
def test_unknown_signals_have_no_number(name: str) -> None:
    assert init_signal.number(name) is None


def test_every_cri_signal_has_a_number() -> None:
    names = [name for name, _ in pb.Signal.items() if name != "RUNTIME_DEFAULT"]
    numbers = {name: init_signal.number(name) for name in names}
    assert None not in numbers.values(), numbers
    assert numbers["SIGRTMAXMINUS14"] == signal.SIGRTMAX - 14


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_signal_reaches_a_child_of_the_named_parent(child: subprocess.Popen[bytes]) -> None:
    assert init_signal.send(child.pid, os.getpid(), signal.SIGTERM)
    assert child.wait(timeout=10) == -signal.SIGTERM


def test_a_process_of_another_parent_is_left_alone(child: subprocess.Popen[bytes]) -> None:
    # As a reused pid would look: the process exists, but it is not the child of the container's conmon.
    assert not init_signal.send(child.pid, os.getppid(), signal.SIGTERM)
    assert child.poll() is None


def test_an_exited_process_is_not_signalled(child: subprocess.Popen[bytes]) -> None:
    child.kill()
    child.wait(timeout=10)
    assert not init_signal.send(child.pid, os.getpid(), signal.SIGTERM)
    assert not init_signal.send(0, os.getpid(), signal.SIGTERM)


def test_a_zombie_counts_as_exited() -> None:
    proc = subprocess.Popen(["true"])
    try:
        os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)  # exited, not yet reaped
        assert not init_signal.send(proc.pid, os.getpid(), signal.SIGTERM)
    finally:
        proc.wait(timeout=10)
