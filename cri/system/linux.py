"""Linux calls missing from Python's standard library, as small ctypes wrappers.

Every mount-table walk and (un)mount in criopy goes through here.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import threading
from dataclasses import dataclass

MNT_DETACH = 2
MS_BIND = 0x1000
MS_RDONLY = 0x1
MS_REMOUNT = 0x20
MS_REC = 0x4000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8

CLONE_FS = 0x00000200
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000

# The C library already loaded into this process: no find_library(), which runs ldconfig (about 50 ms),
# a cost every short-lived helper would pay at start.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p)
_libc.umount2.argtypes = (ctypes.c_char_p, ctypes.c_int)
_libc.unshare.argtypes = (ctypes.c_int,)
_libc.setns.argtypes = (ctypes.c_int, ctypes.c_int)


_M_ARENA_MAX = -8  # <malloc.h>


def limit_malloc_arenas(count: int) -> bool:
    """Let glibc's malloc make at most `count` arenas from now on; False where it cannot (not glibc).

    By default a thread that finds the arenas in use makes another, up to 8 per core, and each keeps the
    memory freed into it: the daemon's pool threads took the RSS of a 200-container daemon from 64 to 69 MiB.
    """
    mallopt = getattr(_libc, "mallopt", None)
    return mallopt is not None and mallopt(_M_ARENA_MAX, count) == 1


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def mount(source: str, target: str, fstype: str | None, flags: int = 0, data: str | None = None) -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            flags,
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def mount_in(directory: str, target: str, fstype: str, flags: int, data: str) -> None:
    """mount(2) of a new `fstype` file system (source: its name) with the relative paths in `data` resolved
    against `directory`; target absolute.

    The kernel resolves them against the caller's cwd, which threads share, so the call is made from a
    throwaway thread that first takes a cwd of its own (unshare CLONE_FS): the daemon's cwd never moves.
    """
    failed: list[BaseException] = []

    def run() -> None:
        try:
            unshare(CLONE_FS)
            os.chdir(directory)
            mount(fstype, target, fstype, flags, data)
        except BaseException as exc:  # raised again in the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="mount-in", daemon=True)
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def umount(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), flags), f"umount {target}")


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in `directory` durable (the entry lives in the directory, not the file)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umount_if_mounted(target: str) -> bool:
    """Detach a mount; False when nothing is mounted there (EINVAL) or the path is gone (ENOENT)."""
    try:
        umount(target, MNT_DETACH)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.ENOENT):
            return False
        raise
    return True


def unshare(flags: int) -> None:
    """Move the calling thread into new namespaces (net, ipc and uts are per thread), or give it its own cwd
    (CLONE_FS)."""
    _check(_libc.unshare(flags), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace that fd (an open /proc/<pid>/ns/* or pinned file) refers to."""
    _check(_libc.setns(fd, nstype), f"setns({fd})")


@dataclass(frozen=True)
class MountEntry:
    mount_point: str
    fstype: str
    source: str
    optional: tuple[str, ...] = ()  # propagation tags: shared:N, master:N, propagate_from:N, unbindable


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _entry(line: str) -> MountEntry | None:
    left, sep, right = line.partition(" - ")
    if not sep:
        return None
    fields, tail = left.split(), right.split()
    return MountEntry(
        mount_point=_unescape(fields[4]),
        fstype=tail[0],
        source=_unescape(tail[1]),
        optional=tuple(fields[6:]),
    )


def parse_mountinfo(text: str) -> list[MountEntry]:
    return [entry for entry in map(_entry, text.splitlines()) if entry is not None]


# How the kernel writes a path in mountinfo (seq_path's escapes).
_MOUNTINFO_ESCAPES = str.maketrans({"\\": "\\134", " ": "\\040", "\t": "\\011", "\n": "\\012"})


def parse_mountinfo_under(text: str, base: str) -> list[MountEntry]:
    """The entries of mountinfo `text` whose mount point is `base` or below it (base absolute, normalised).

    Only those lines are parsed: a node with a hundred pods has a thousand mounts, and the pod and
    container steps that ask about their own few would otherwise parse them all, each time."""
    escaped = base.translate(_MOUNTINFO_ESCAPES)
    below = escaped if escaped.endswith("/") else escaped + "/"
    found = []
    for line in text.splitlines():
        if escaped not in line:
            continue
        point = line.split(" ", 5)[4] if line.count(" ") >= 5 else ""
        if point == escaped or point.startswith(below):
            entry = _entry(line)
            if entry is not None:
                found.append(entry)
    return found


def mounts() -> list[MountEntry]:
    with open("/proc/self/mountinfo") as f:
        return parse_mountinfo(f.read())


def mounts_under(path: str) -> list[MountEntry]:
    """Mounts at or below `path`, deepest first (the order to unmount them in)."""
    base = os.path.realpath(path).rstrip("/") or "/"
    with open("/proc/self/mountinfo") as f:
        inside = parse_mountinfo_under(f.read(), base)
    return sorted(inside, key=lambda m: m.mount_point.count("/"), reverse=True)


# ---- inotify ---------------------------------------------------------------------------------

IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_libc.inotify_init1.argtypes = (ctypes.c_int,)
_libc.inotify_add_watch.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
_EVENT_HEADER = 16  # struct inotify_event: int wd; uint32 mask, cookie, len; then the name


def inotify_watch(directory: str, mask: int) -> int:
    """A non-blocking inotify fd watching `directory` for `mask` events; the caller closes it."""
    fd = int(_libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC))
    if fd < 0:
        code = ctypes.get_errno()
        raise OSError(code, f"inotify_init1: {os.strerror(code)}")
    if _libc.inotify_add_watch(fd, os.fsencode(directory), mask) < 0:
        code = ctypes.get_errno()
        os.close(fd)
        raise OSError(code, f"inotify_add_watch({directory}): {os.strerror(code)}")
    return fd


def inotify_names(data: bytes) -> list[str]:
    """The file names of the events in one read() of an inotify fd."""
    names, offset = [], 0
    while offset + _EVENT_HEADER <= len(data):
        length = int.from_bytes(data[offset + 12 : offset + 16], "little")
        raw = data[offset + _EVENT_HEADER : offset + _EVENT_HEADER + length]
        names.append(os.fsdecode(raw.rstrip(b"\0")))
        offset += _EVENT_HEADER + length
    return names


PR_SET_CHILD_SUBREAPER = 36
_libc.prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)


def raise_this_thread(nice: int) -> None:
    """Run the calling thread at `nice` (negative: ahead of the other threads and processes), alone.

    SCHED_RESET_ON_FORK first: whatever this thread starts later, threads or processes (and through
    them the containers), starts at nice 0 again. Needs CAP_SYS_NICE; OSError otherwise.
    """
    os.sched_setscheduler(0, os.SCHED_OTHER | os.SCHED_RESET_ON_FORK, os.sched_param(0))
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)


def set_child_subreaper() -> None:
    """Orphans of our children's children come to us instead of to init (what conmon does for containers)."""
    _check(_libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), "prctl(PR_SET_CHILD_SUBREAPER)")


@dataclass(frozen=True)
class ProcStat:
    state: str  # R, S, D, Z, X, ...
    ppid: int
    start_ticks: int  # when it started, in clock ticks after boot

    @property
    def running(self) -> bool:
        """Not a zombie waiting for its parent, nor dead."""
        return self.state not in ("Z", "X")

    def identity(self) -> str:
        """Which process this is: "<boot id>/<start time>" (see process_identity)."""
        return f"{boot_id()}/{self.start_ticks}"


def proc_stat(pid: int) -> ProcStat | None:
    """State and parent of a process from /proc/<pid>/stat; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces and parentheses: the fields follow the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return ProcStat(fields[0].decode(), int(fields[1]), int(fields[19]))


def process_identity(pid: int) -> str:
    """Which process `pid` is: "<boot id>/<start time>", "" when it is gone.

    A PID alone names another process after a reboot, or once PIDs wrap around on a busy node;
    the boot and the start time do not (runc keeps the start time in its state for the same reason).
    """
    stat = proc_stat(pid)
    return "" if stat is None else stat.identity()


@functools.cache
def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()
