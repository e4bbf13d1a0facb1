from __future__ import annotations

import os
import subprocess
import sys
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


_ARENAS_SCRIPT = """
import ctypes, os, sys, tempfile, threading
from cri.system import linux
if sys.argv[1] == "limit":
    assert linux.limit_malloc_arenas(2)
barrier = threading.Barrier(8)
kept = []
def allocate():
    barrier.wait()
    kept.extend(bytearray(4096) for _ in range(2000))  # past pymalloc: glibc's malloc, at the same time
threads = [threading.Thread(target=allocate) for _ in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = (ctypes.c_char_p, ctypes.c_char_p)
libc.malloc_info.argtypes = (ctypes.c_int, ctypes.c_void_p)
libc.fclose.argtypes = (ctypes.c_void_p,)
fd, path = tempfile.mkstemp()
os.close(fd)
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, f)
libc.fclose(f)
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""


def _arenas_after_eight_threads(mode: str) -> int:
    run = subprocess.run(
        [sys.executable, "-c", _ARENAS_SCRIPT, mode], capture_output=True, text=True, timeout=60, check=True
    )
    return int(run.stdout)


def test_the_malloc_arenas_of_many_threads_are_limited() -> None:
    # The control shows that eight threads allocating at once do make more arenas here.
    assert _arenas_after_eight_threads("free") > 2
    assert _arenas_after_eight_threads("limit") <= 2
