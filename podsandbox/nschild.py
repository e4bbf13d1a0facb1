"""Setting up a pod's fresh namespaces, and the child process that makes a pod's user namespace.

A pod with its own user namespace needs its net, ipc and uts namespaces owned by it, or root inside
could not set the pod's sysctls nor its hostname, and runc could not mount sysfs. Only a process
inside the user namespace can create them that way, and a multi-threaded process (the daemon) cannot
enter or unshare a user namespace: so a short child does it. The protocol, one line each way:

    child: unshare(CLONE_NEWUSER)                -> "unshared"
    parent: writes uid_map and gid_map            -> "mapped"
    child: becomes root inside, unshares the others, sets lo up, hostname and sysctls
                                                  -> "ready" (or "sysctl\t<key>\t<value>\t<errno>")
    parent: bind-mounts /proc/<child>/ns/* onto the pins, closes stdin -> the child exits.

The child's start is most of what a user namespace adds to RunPodSandbox, so this module imports only
C-level modules of the standard library (no socket.py, pathlib, dataclasses, json, nor cri.system.linux,
whose imports cost the child ~50 ms); the request comes as plain arguments.
"""

from __future__ import annotations

import _socket
import ctypes
import fcntl
import os
import struct
import sys
from collections.abc import Iterable, Mapping

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
CLONE_NEWUSER = 0x10000000
CLONE_FLAGS = {"net": 0x40000000, "ipc": 0x08000000, "uts": 0x04000000}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.unshare.argtypes = (ctypes.c_int,)


def unshare(flags: int) -> None:
    if _libc.unshare(flags) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"unshare({flags:#x}): {os.strerror(code)}")


class SysctlRefused(OSError):
    """The kernel refused a pod's sysctl: no such key here, a value it does not take, a read-only one."""

    def __init__(self, key: str, value: str, exc: OSError) -> None:
        super().__init__(exc.errno, f"sysctl {key}={value}: {exc.strerror}")
        self.key = key
        self.value = value


def unshare_and_configure(kinds: Iterable[str], hostname: str, sysctls: Mapping[str, str]) -> None:
    """Move the calling thread (or process) into new namespaces of kinds and set them up."""
    kinds = list(kinds)
    flags = 0
    for kind in kinds:
        flags |= CLONE_FLAGS[kind]
    unshare(flags)
    if "net" in kinds:
        loopback_up()
    if hostname and "uts" in kinds:
        _socket.sethostname(hostname)
    for key, value in sysctls.items():
        try:
            with open(sysctl_path(key), "w") as f:  # /proc/sys resolves in the calling thread's namespaces
                f.write(str(value))
        except OSError as exc:
            raise SysctlRefused(key, str(value), exc) from None


def sysctl_path(key: str) -> str:
    """net.ipv4.ip_forward -> /proc/sys/net/ipv4/ip_forward (both separators accepted, as sysctl(8) does)."""
    parts = key.split("/") if "/" in key else key.split(".")
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"sysctl {key!r} is not a valid name")
    return "/proc/sys/" + "/".join(parts)


def loopback_up() -> None:
    """Bring `lo` up in the new network namespace: containers of a pod talk over 127.0.0.1 whatever CNI does."""
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_DGRAM)
    try:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))
    finally:
        sock.close()


def child_args(kinds: Iterable[str], hostname: str, sysctls: Mapping[str, str]) -> list[str]:
    """The child's arguments: the kinds comma-joined, the hostname, then key=value per sysctl."""
    return [",".join(kinds), hostname, *(f"{key}={value}" for key, value in sysctls.items())]


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def child_main(args: list[str]) -> int:
    """The child's side of the protocol above (args from child_args); its exit status."""
    kinds, hostname = [k for k in args[0].split(",") if k], args[1]
    sysctls = dict(item.split("=", 1) for item in args[2:])
    unshare(CLONE_NEWUSER)
    _say("unshared")
    if sys.stdin.readline().strip() != "mapped":
        return 1  # the parent gave up
    # Root inside (the mapped host UID outside), without the daemon's supplementary groups.
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)
    try:
        unshare_and_configure(kinds, hostname, sysctls)
    except SysctlRefused as exc:
        _say(f"sysctl\t{exc.key}\t{exc.value}\t{exc.errno}")
        return 2
    _say("ready")
    sys.stdin.read()
    return 0
