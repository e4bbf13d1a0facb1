"""The plugins a killed daemon left running: found by their mark, children included, and nobody else's."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from podsandbox import plugin_orphans
from tests.support.system import poll, process_gone

# A plugin that, like bridge running host-local, has a child of its own: both print their pid and wait.
PLUGIN = "sleep 60 & echo $!; echo $$; wait"


def _plugin(procs: list[subprocess.Popen[bytes]], env: dict[str, str]) -> list[int]:
    """The pids (child first) of a stand-in plugin run with this environment, in a session of its own (as
    the daemon runs plugins: the fixture kills its group, the child with it)."""
    proc = subprocess.Popen(
        ["sh", "-c", PLUGIN],
        env={"PATH": os.environ["PATH"], **env},
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    procs.append(proc)
    assert proc.stdout is not None
    child, shell = int(proc.stdout.readline()), int(proc.stdout.readline())
    return [child, shell]


def test_the_marked_plugin_and_its_child_are_killed_and_no_other(
    procs: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    ours = _plugin(procs, plugin_orphans.mark(tmp_path / "cni"))
    other_daemon = _plugin(procs, plugin_orphans.mark(tmp_path / "cni-other"))
    prefix_of_ours = _plugin(procs, plugin_orphans.mark(tmp_path / "cn"))
    unmarked = _plugin(procs, {})

    killed = plugin_orphans.kill_left_running(tmp_path / "cni")

    assert sorted(killed) == sorted(ours)
    assert poll(lambda: all(process_gone(pid) for pid in ours), 5, interval=0.02)
    for pid in other_daemon + prefix_of_ours + unmarked:
        assert not process_gone(pid)


def test_nothing_marked_kills_nothing(tmp_path: Path) -> None:
    assert plugin_orphans.kill_left_running(tmp_path / "cni") == []
