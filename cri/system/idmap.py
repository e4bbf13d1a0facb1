"""Idmapped mounts and throwaway user namespaces, as small ctypes wrappers of the new mount API.

runc 1.1.5 cannot make idmapped mounts (that came in runc 1.2), the kernel can: a detached copy of a
mount tree (open_tree with OPEN_TREE_CLONE) takes a user namespace's mapping (mount_setattr with
MOUNT_ATTR_IDMAP) before it is attached anywhere (move_mount). Files then show their owners shifted
through the mapping: on-disk uid 0 appears as the namespace's host root. Overlay cannot be idmapped
itself (EINVAL); overlays are built on idmapped lower dirs instead.

A user namespace is made by a short child process (a multi-threaded process such as the daemon
cannot unshare one): it unshares, the parent writes its maps, and whoever needs it opens
/proc/<pid>/ns/user while the child waits. A pod's namespaces are made the same way by
podsandbox/nschild.py, which also makes the net, ipc and uts namespaces the user namespace owns.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import selectors
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cri.system import affinity, linux

# x86-64 and arm64 share these numbers (the new mount API came after the syscall tables were unified).
SYS_OPEN_TREE = 428
SYS_MOVE_MOUNT = 429
SYS_MOUNT_SETATTR = 442

OPEN_TREE_CLONE = 1
OPEN_TREE_CLOEXEC = os.O_CLOEXEC
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MOUNT_ATTR_IDMAP = 0x00100000

CLONE_NEWUSER = 0x10000000
CHILD_TIMEOUT = 10.0  # seconds a user namespace child may take to unshare and to exit

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


@dataclass(frozen=True)
class IdMapping:
    """One range of a user namespace's map: container IDs [container_id, +length) are host [host_id, +length)."""

    container_id: int
    host_id: int
    length: int

    def line(self) -> str:
        return f"{self.container_id} {self.host_id} {self.length}\n"

    def to_host(self, container_id: int) -> int | None:
        offset = container_id - self.container_id
        return self.host_id + offset if 0 <= offset < self.length else None

    def to_oci(self) -> dict[str, int]:
        return {"containerID": self.container_id, "hostID": self.host_id, "size": self.length}


def _syscall(number: int, *args: object, what: str) -> int:
    result = int(_libc.syscall(number, *args))
    if result < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")
    return result


def open_tree_clone(source: str) -> int:
    """A detached recursive copy of the mount tree at source, as an fd (closing it frees the copy)."""
    flags = OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC | AT_RECURSIVE
    return _syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), flags, what=f"open_tree {source}")


def set_idmap(tree_fd: int, userns_fd: int, *, read_only: bool = False, what: str = "") -> None:
    """Give every mount of a detached tree the mapping of the user namespace userns_fd refers to."""
    attr = _MountAttr(MOUNT_ATTR_IDMAP | (MOUNT_ATTR_RDONLY if read_only else 0), 0, 0, userns_fd)
    _syscall(
        SYS_MOUNT_SETATTR,
        tree_fd,
        b"",
        AT_EMPTY_PATH | AT_RECURSIVE,
        ctypes.byref(attr),
        ctypes.sizeof(attr),
        what=f"mount_setattr(MOUNT_ATTR_IDMAP) {what}",
    )


def move_mount(tree_fd: int, target: str) -> None:
    """Attach a detached tree at target (an existing directory, or a file for a file's tree)."""
    _syscall(
        SYS_MOVE_MOUNT,
        tree_fd,
        b"",
        AT_FDCWD,
        os.fsencode(target),
        MOVE_MOUNT_F_EMPTY_PATH,
        what=f"move_mount to {target}",
    )


def mount_idmapped(source: str, target: str, userns_path: str, *, read_only: bool = False) -> None:
    """Bind source (and what is mounted below it) at target, owners shifted through the user namespace."""
    userns_fd = os.open(userns_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        tree = open_tree_clone(source)
        try:
            set_idmap(tree, userns_fd, read_only=read_only, what=source)
            move_mount(tree, target)
        finally:
            os.close(tree)
    finally:
        os.close(userns_fd)


# A child that unshares a user namespace, says so, and waits for its stdin to close. The parent writes
# its maps meanwhile; the namespace lives as long as the child or anything that holds it open or pinned.
# Plain ctypes, no package import: the child's start is most of the probe's time.
_HOLD_USERNS = """\
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x10000000) != 0:
    sys.exit("unshare(CLONE_NEWUSER): " + os.strerror(ctypes.get_errno()))
sys.stdout.write("unshared\\n")
sys.stdout.flush()
sys.stdin.read()
"""


def package_parent() -> str:
    """The directory holding the `cri` package, for child interpreters started with -I -S."""
    return str(Path(__file__).resolve().parent.parent.parent)


def write_maps(pid: int, uids: IdMapping, gids: IdMapping) -> None:
    """Set a fresh user namespace's maps from outside (the daemon is root in the host's namespace)."""
    for name, mapping in (("uid_map", uids), ("gid_map", gids)):
        with open(f"/proc/{pid}/{name}", "w") as f:
            f.write(mapping.line())


@contextlib.contextmanager
def user_namespace(uids: IdMapping, gids: IdMapping) -> Iterator[str]:
    """A new user namespace with these maps, for the duration of the block: yields its /proc/<pid>/ns/user."""
    argv = [sys.executable, "-I", "-S", "-c", _HOLD_USERNS]
    with affinity.unbound():  # called in a bound offload thread: the child must not inherit its CPU
        child = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, close_fds=True
        )
    try:
        assert child.stdout is not None and child.stdin is not None
        line = _read_line(child, CHILD_TIMEOUT)
        if line != "unshared":
            raise OSError(f"user namespace child: {line or _stderr_of(child)}")
        write_maps(child.pid, uids, gids)
        yield f"/proc/{child.pid}/ns/user"
    finally:
        _finish(child)


def _read_line(child: subprocess.Popen[str], timeout: float) -> str:
    assert child.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(child.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise OSError(f"user namespace child: no answer within {timeout:g}s")
    return child.stdout.readline().strip()


def _stderr_of(child: subprocess.Popen[str]) -> str:
    child.kill()
    _, stderr = child.communicate(timeout=CHILD_TIMEOUT)
    return stderr.strip() or f"exited with status {child.returncode}"


def _finish(child: subprocess.Popen[str]) -> None:
    try:
        child.communicate(timeout=CHILD_TIMEOUT)  # closes stdin: the child exits
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()


# ---- the start-up probe ----------------------------------------------------------------------

PROBE_MAPPING = IdMapping(0, 3_000_000_000, 65536)  # far above any real user: only the probe uses it


def probe(scratch_parent: str) -> str:
    """Make a user namespace and an idmapped mount of a directory on scratch_parent's file system, for real.

    Returns "" when the owners appear shifted as they must, else the reason it does not work here.
    scratch_parent is where the container layers live: their file system must support idmapped mounts.
    """
    try:
        os.makedirs(scratch_parent, exist_ok=True)
        scratch = tempfile.mkdtemp(prefix=".idmap-probe-", dir=scratch_parent)
    except OSError as exc:
        return f"making a scratch directory in {scratch_parent}: {exc}"
    source, target = os.path.join(scratch, "source"), os.path.join(scratch, "target")
    try:
        os.mkdir(source)
        os.mkdir(target)
        with user_namespace(PROBE_MAPPING, PROBE_MAPPING) as userns:
            mount_idmapped(source, target, userns)
        try:
            seen = os.stat(target)
        finally:
            linux.umount(target, linux.MNT_DETACH)
        if seen.st_uid != PROBE_MAPPING.host_id or seen.st_gid != PROBE_MAPPING.host_id:
            return f"an idmapped mount shows owner {seen.st_uid}:{seen.st_gid}, not {PROBE_MAPPING.host_id}"
        return ""
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
