from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cri.oci import conmon
from cri.system import linux
from cri.system.linux import parse_mountinfo, parse_mountinfo_under

MOUNTINFO = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "40 22 0:35 / /var/lib/criopy/overlay/a\\040b/merged rw - overlay overlay rw,lowerdir=/l\n"
    "41 22 0:36 / /run/criopy/shm rw shared:2 master:1 - tmpfs shm rw,size=65536k\n"
)


def test_mountinfo_fields_and_octal_escapes():
    entries = parse_mountinfo(MOUNTINFO)
    assert [e.mount_point for e in entries] == ["/", "/var/lib/criopy/overlay/a b/merged", "/run/criopy/shm"]
    assert [e.fstype for e in entries] == ["ext4", "overlay", "tmpfs"]
    assert entries[2].source == "shm"


UNDER = (
    "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "40 22 0:35 / /run/c/a\\040b rw - tmpfs x rw\n"
    "41 40 0:36 / /run/c/a\\040b/merged rw - overlay overlay rw,lowerdir=/l\n"
    "42 22 0:37 / /run/c/a\\040bc rw - tmpfs sibling rw\n"
    "43 22 0:38 / /var/run/c/a\\040b rw - tmpfs elsewhere rw\n"
    "44 22 0:39 / /run/c/other rw - tmpfs mentions\\040/run/c/a\\040b rw\n"
)


def test_mounts_under_a_path_are_the_ones_at_or_below_it_only():
    """Not a sibling whose name starts the same, not the same path under another root, not a line that
    only mentions the path in its source; names with escaped spaces compared as the kernel writes them."""
    found = parse_mountinfo_under(UNDER, "/run/c/a b")
    assert [e.mount_point for e in found] == ["/run/c/a b", "/run/c/a b/merged"]
    assert [e.fstype for e in found] == ["tmpfs", "overlay"]
    assert found == [e for e in parse_mountinfo(UNDER) if e.mount_point in ("/run/c/a b", "/run/c/a b/merged")]


def test_a_process_identity_names_one_process_of_one_boot() -> None:
    mine = linux.process_identity(os.getpid())
    boot, _, started = mine.partition("/")
    assert boot == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    assert int(started) > 0
    with subprocess.Popen(["sleep", "30"]) as other:
        try:
            assert linux.process_identity(other.pid) not in ("", mine)  # started later: another start time
        finally:
            other.kill()
    other.wait()
    assert linux.process_identity(other.pid) == ""  # gone


def test_a_container_pid_given_to_another_process_is_not_the_container() -> None:
    """After a reboot or a PID wrap-around, the recorded PID may be alive as something else entirely."""
    me, parent = os.getpid(), os.getppid()
    assert conmon.container_runs(me, parent, linux.process_identity(me))
    assert not conmon.container_runs(me, parent, "another-boot/" + linux.process_identity(me).split("/")[1])
    assert not conmon.container_runs(me, parent, linux.process_identity(me).split("/")[0] + "/1")
    # rows from before identities were kept: the container process is its conmon's child
    assert conmon.container_runs(me, parent, "")
    assert not conmon.container_runs(me, parent + 1, "")
    assert not conmon.container_runs(me, 0, "")
    assert not conmon.container_runs(0, parent, "")
