"""Creating, pinning and releasing a pod's net, ipc and uts namespaces (no pause container).

A throwaway thread of the daemon (`cri.system.nsthread`) unshares them: Linux keeps
these three namespaces per thread, so nothing else in the daemon moves. The
thread brings `lo` up, sets the hostname and the namespaced sysctls, and
bind-mounts its namespaces onto pin files; the pins keep the namespaces
alive after the thread exits, and containers join them by path. A thread
costs a few milliseconds where a child interpreter cost seventy.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import socket
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

from cri.errors import InvalidArgument
from cri.system import linux, nsthread

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
CLONE_FLAGS = {"net": linux.CLONE_NEWNET, "ipc": linux.CLONE_NEWIPC, "uts": linux.CLONE_NEWUTS}


class NamespaceError(Exception):
    pass


class SysctlRefused(OSError):
    """The kernel refused a pod's sysctl: no such key here, a value it does not take, a read-only one."""

    def __init__(self, key: str, value: str, exc: OSError) -> None:
        super().__init__(exc.errno, f"sysctl {key}={value}: {exc.strerror}")
        self.key = key


async def create(pins: Mapping[str, str], hostname: str, sysctls: Mapping[str, str]) -> None:
    """Make the namespaces named in pins ({'net': path, ...}) and pin them; all or nothing."""
    if not pins:
        return
    made = functools.partial(_make, dict(pins), hostname, dict(sysctls))
    try:
        await nsthread.in_fresh_thread(made, "pod-namespaces")
    except SysctlRefused as exc:
        raise InvalidArgument(f"config.linux.sysctls[{exc.key}]", str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise NamespaceError(f"creating the pod namespaces ({', '.join(pins)}): {exc}") from exc


def _make(pins: dict[str, str], hostname: str, sysctls: dict[str, str]) -> None:
    """In a thread of its own, which is left in the new namespaces and then exits."""
    flags = 0
    for kind in pins:
        flags |= CLONE_FLAGS[kind]
    linux.unshare(flags)
    if "net" in pins:
        _loopback_up()
    if hostname and "uts" in pins:
        socket.sethostname(hostname)
    for key, value in sysctls.items():
        try:
            sysctl_path(key).write_text(str(value))  # /proc/sys resolves in the calling thread's namespaces
        except OSError as exc:
            raise SysctlRefused(key, str(value), exc) from None
    made: list[str] = []
    try:
        for kind, path in pins.items():
            _pin(kind, path)
            made.append(path)
    except BaseException:
        release_all(made)
        raise


def sysctl_path(key: str) -> Path:
    """net.ipv4.ip_forward -> /proc/sys/net/ipv4/ip_forward (both separators accepted, as sysctl(8) does)."""
    parts = key.split("/") if "/" in key else key.split(".")
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"sysctl {key!r} is not a valid name")
    return Path("/proc/sys", *parts)


def _pin(kind: str, path: str) -> None:
    Path(path).parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    # thread-self, not self: /proc/self is the main thread, which never left the host's namespaces.
    linux.mount(f"/proc/thread-self/ns/{kind}", path, None, linux.MS_BIND)


def _loopback_up() -> None:
    """Bring `lo` up in the new network namespace: containers of a pod talk over 127.0.0.1 whatever CNI does."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def release(path: str) -> None:
    """Unpin one namespace: the kernel frees it once no process is left in it. Idempotent."""
    linux.umount_if_mounted(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def release_all(paths: Iterable[str]) -> None:
    for path in paths:
        release(path)


def is_pinned(path: str) -> bool:
    return any(m.mount_point == path for m in linux.mounts_under(os.path.dirname(path)))
