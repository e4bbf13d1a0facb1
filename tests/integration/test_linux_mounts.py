"""The ctypes mount wrappers against the real kernel (root)."""

from __future__ import annotations

import os

import pytest

from cri.system import linux

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root (CI runs as root)")


def test_mount_is_listed_and_unmount_removes_it(tmp_path):
    target = tmp_path / "mnt"
    (target / "inner").mkdir(parents=True)
    linux.mount("criopy-test", str(target), "tmpfs", 0, "size=1m")
    try:
        (target / "inner").mkdir()
        linux.mount("criopy-test-inner", str(target / "inner"), "tmpfs", 0, "size=1m")
        found = linux.mounts_under(str(tmp_path))
        assert [m.mount_point for m in found] == [str(target / "inner"), str(target)]
        assert found[0].fstype == "tmpfs"
        for m in found:
            linux.umount(m.mount_point, linux.MNT_DETACH)
        assert linux.mounts_under(str(tmp_path)) == []
    finally:
        for m in linux.mounts_under(str(tmp_path)):
            linux.umount(m.mount_point, linux.MNT_DETACH)


def test_errors_carry_errno_and_path(tmp_path):
    with pytest.raises(OSError) as err:
        linux.umount(str(tmp_path / "not-mounted"))
    assert str(tmp_path / "not-mounted") in str(err.value)
