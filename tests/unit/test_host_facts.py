"""HostFacts: which cgroup controllers count as present."""

from __future__ import annotations

from pathlib import Path

import pytest

from cri.containers import host

# This machine's shape: cgroup v1 hierarchies (no hugetlb among them) and hugetlb on the v2 side only.
HYBRID_NO_HUGETLB = (
    "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n"
    "32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
    "35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n"
    "36 31 0:33 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    "40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n"
)
WITH_HUGETLB = HYBRID_NO_HUGETLB + "42 31 0:39 / /sys/fs/cgroup/hugetlb rw,relatime - cgroup cgroup rw,hugetlb\n"


def test_v1_controllers_are_read_from_the_mount_options():
    assert host.cgroup_v1_controllers(HYBRID_NO_HUGETLB) == {"cpu", "cpuacct", "memory"}
    assert "hugetlb" in host.cgroup_v1_controllers(WITH_HUGETLB)


def test_a_hugetlb_directory_that_is_no_mounted_controller_does_not_count(tmp_path: Path, monkeypatch):
    # What a node's systemd once left on a host: an empty /sys/fs/cgroup/hugetlb, no hierarchy behind it.
    (tmp_path / "hugetlb").mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(HYBRID_NO_HUGETLB)
    monkeypatch.setattr(host, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(host, "MOUNTINFO", mountinfo, raising=False)
    assert host.HostFacts.detect().hugetlb is False

    mountinfo.write_text(WITH_HUGETLB)
    assert host.HostFacts.detect().hugetlb is True


@pytest.mark.parametrize("controllers, expected", [("cpu memory hugetlb", True), ("cpu memory", False)])
def test_v2_hugetlb_is_read_from_cgroup_controllers(tmp_path: Path, monkeypatch, controllers, expected):
    (tmp_path / "cgroup.controllers").write_text(controllers + "\n")
    (tmp_path / "hugetlb").mkdir()
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("41 23 0:38 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")
    monkeypatch.setattr(host, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(host, "MOUNTINFO", mountinfo, raising=False)
    assert host.HostFacts.detect().hugetlb is expected
