"""cri/system/affinity: the blocking-call threads' CPUs from the config, and processes started from a bound thread."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from cri.storage.layers import copy_tree
from cri.system import affinity, idmap
from cri.system.idmap import IdMapping
from tests.support.system import cpus_allowed, two_cpus_or_skip

T = TypeVar("T")

ALLOWED = frozenset({0, 1, 2, 3})
READ_OWN_CPUS = "print(open('/proc/self/status').read().split('Cpus_allowed_list:')[1].split()[0])"
MAPPING = IdMapping(0, 2_100_000_000, 65536)
# A cp first in PATH that writes down its CPUs, then copies as the real one does.
RECORDING_CP = """#!/bin/sh
grep Cpus_allowed_list: /proc/self/status | cut -f2 > {record}
exec /bin/cp "$@"
"""


def test_auto_takes_the_lowest_numbered_cpu_and_all_takes_none():
    assert affinity.resolve("auto", ALLOWED) == frozenset({0})
    assert affinity.resolve("auto", frozenset({5, 3, 9})) == frozenset({3})
    assert affinity.resolve("all", ALLOWED) is None


def test_auto_binds_nothing_on_one_cpu():
    assert affinity.resolve("auto", frozenset({2})) is None


def test_a_list_names_cpus_and_ranges_and_the_whole_set_is_no_binding():
    assert affinity.resolve("2", ALLOWED) == frozenset({2})
    assert affinity.resolve("0-1,3", ALLOWED) == frozenset({0, 1, 3})
    assert affinity.resolve(" 1 , 2 ", ALLOWED) == frozenset({1, 2})
    assert affinity.resolve("0-3", ALLOWED) is None


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("x", "expected 'auto', 'all', or CPU numbers"),
        ("", "expected 'auto', 'all', or CPU numbers"),
        ("1,", "expected 'auto', 'all', or CPU numbers"),
        ("-1", "expected 'auto', 'all', or CPU numbers"),
        ("\u0661", "expected 'auto', 'all', or CPU numbers"),  # a digit, but not one of the kernel's lists
        ("3-1", "the range '3-1' ends before it starts"),
        ("0-99999999", "CPU 99999999 is above 8191"),  # refused before a set of 10^8 CPUs is made
        ("2,7-8", r"CPU 7-8 is not one of the daemon's CPUs \(0-3\)"),
    ],
)
def test_a_bad_list_is_refused_saying_what_is_wrong(spec: str, problem: str):
    with pytest.raises(ValueError, match=problem):
        affinity.resolve(spec, ALLOWED)


def test_the_configs_check_takes_any_cpu_a_kernel_may_have_and_leaves_the_daemons_own_to_its_start():
    for spec in ("auto", "all", "0", "4095", "0-3,8"):
        affinity.check(spec)
    for spec in ("some", "9000", "2-1"):
        with pytest.raises(ValueError):
            affinity.check(spec)


def test_lists_are_written_as_the_kernel_writes_them():
    assert affinity.format_list([3, 0, 1, 2, 8, 10, 11]) == "0-3,8,10-11"
    assert affinity.format_list({5}) == "5"


def _in_a_thread(work: Callable[[], T]) -> T:
    """`work` in a fresh thread: a binding made there stays there."""
    out: list[T] = []
    thread = threading.Thread(target=lambda: out.append(work()))
    thread.start()
    thread.join(timeout=30)
    assert out, "the thread's work failed (its exception is above)"
    return out[0]


def _child_cpus() -> str:
    return subprocess.run(
        [sys.executable, "-I", "-S", "-c", READ_OWN_CPUS], capture_output=True, text=True, check=True, timeout=30
    ).stdout.strip()


def test_a_process_started_inside_unbound_gets_every_cpu_and_the_thread_is_bound_again_after():
    every = two_cpus_or_skip()
    home = {min(every)}

    def start_one_each_way() -> tuple[str, str, set[int]]:
        affinity.bind_this_thread(home)
        bound_child = _child_cpus()
        with affinity.unbound():
            free_child = _child_cpus()
        return bound_child, free_child, os.sched_getaffinity(0)

    bound_child, free_child, after = _in_a_thread(start_one_each_way)
    assert bound_child == affinity.format_list(home)  # what unbound() is for: children inherit a binding
    assert free_child == affinity.format_list(every)
    assert after == home


def test_unbound_in_a_free_thread_changes_nothing():
    every = two_cpus_or_skip()

    def start_one() -> tuple[str, set[int]]:
        with affinity.unbound():
            child = _child_cpus()
        return child, os.sched_getaffinity(0)

    assert _in_a_thread(start_one) == (affinity.format_list(every), set(every))


def test_the_user_namespace_child_of_a_bound_thread_gets_every_cpu():
    if os.geteuid() != 0:
        pytest.skip("writing a user namespace's maps needs root")
    every = two_cpus_or_skip()

    def hold_one() -> str:
        affinity.bind_this_thread({min(every)})
        with idmap.user_namespace(MAPPING, MAPPING) as userns:
            pid = userns.split("/")[2]
            return cpus_allowed(int(pid))

    assert _in_a_thread(hold_one) == affinity.format_list(every)


def test_the_cp_of_a_layer_copy_in_a_bound_thread_gets_every_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    every = two_cpus_or_skip()
    bin_dir, record, source = tmp_path / "bin", tmp_path / "cp-cpus", tmp_path / "source"
    bin_dir.mkdir()
    (bin_dir / "cp").write_text(RECORDING_CP.format(record=record))
    (bin_dir / "cp").chmod(0o755)
    source.mkdir()
    (source / "file").write_text("layer\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    def copy() -> bool:
        affinity.bind_this_thread({min(every)})
        copy_tree(source, tmp_path / "copy", timeout=30)
        return True

    assert _in_a_thread(copy)
    assert (tmp_path / "copy" / "file").read_text() == "layer\n"
    assert record.read_text().strip() == affinity.format_list(every)
