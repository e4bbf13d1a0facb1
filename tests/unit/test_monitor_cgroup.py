"""Which cgroup hierarchies conmon is moved in."""

from __future__ import annotations

from pathlib import Path

import pytest

from cri.oci import monitor_cgroup
from cri.oci.monitor_cgroup import MONITOR_CGROUP, hierarchy_roots, move_monitor

# A node container's view: name=systemd read-only (systemd tracks units on cgroup2), a cpu hierarchy
# mounted twice, a subtree bind (root not '/'), and an empty tmpfs standing in for an absent controller.
NODE_MOUNTINFO = (
    "85 84 0:47 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
    "86 85 0:29 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu\n"
    "87 85 0:29 / /mnt/cpu-again rw,relatime - cgroup cgroup rw,cpu\n"
    "89 85 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,memory\n"
    "90 85 0:33 /docker/abc /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices\n"
    "94 85 0:37 / /sys/fs/cgroup/systemd ro,nosuid,nodev,noexec,relatime - cgroup systemd rw,name=systemd\n"
    "66 85 0:56 / /sys/fs/cgroup/hugetlb ro,relatime - tmpfs absent-hugetlb ro,size=4k,mode=555\n"
    "68 85 0:38 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n"
)


def test_writable_hierarchy_roots_once_each():
    assert hierarchy_roots(NODE_MOUNTINFO) == [
        Path("/sys/fs/cgroup/cpu"),
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup/unified"),
    ]


def fake_hierarchies(tmp_path: Path, names: list[str]) -> tuple[Path, list[Path]]:
    """A mount table naming cgroup hierarchies at tmp dirs, each with the monitors' cgroup made (its
    cgroup.procs present, as the kernel makes it)."""
    roots = [tmp_path / name for name in names]
    lines = []
    for i, root in enumerate(roots):
        (root / MONITOR_CGROUP).mkdir(parents=True)
        (root / MONITOR_CGROUP / "cgroup.procs").write_text("")
        lines.append(f"{90 + i} 85 0:{60 + i} / {root} rw,relatime - cgroup cgroup rw,{names[i]}\n")
    table = tmp_path / "mountinfo"
    table.write_text("".join(lines))
    return table, roots


def procs(root: Path) -> str:
    return (root / MONITOR_CGROUP / "cgroup.procs").read_text()


def test_moves_after_the_first_write_the_pid_only_until_a_hierarchy_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(monitor_cgroup, "_known", monitor_cgroup._Known())
    table, (cpu, memory) = fake_hierarchies(tmp_path, ["cpu", "memory"])
    monkeypatch.setattr(monitor_cgroup, "MOUNTINFO", table)
    move_monitor(101, "c1")
    assert procs(cpu) == procs(memory) == "101"

    # Known now: no mount table read for the next conmon.
    monkeypatch.setattr(monitor_cgroup, "MOUNTINFO", tmp_path / "no-such-mountinfo")
    move_monitor(102, "c2")
    assert procs(cpu) == procs(memory) == "102"

    # A hierarchy whose cgroup went refuses (never created as a plain file): the table is read again.
    (memory / MONITOR_CGROUP / "cgroup.procs").unlink()
    monkeypatch.setattr(monitor_cgroup, "MOUNTINFO", table)
    move_monitor(103, "c3")
    assert procs(cpu) == "103"
    assert not (memory / MONITOR_CGROUP / "cgroup.procs").exists()

    # ... and again for each conmon while one refuses, so a hierarchy back in order is used at once.
    (memory / MONITOR_CGROUP / "cgroup.procs").write_text("")
    move_monitor(104, "c4")
    assert procs(cpu) == procs(memory) == "104"
