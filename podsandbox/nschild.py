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

This module imports only the standard library and cri.system, so the child starts in ~20 ms.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from cri.system import idmap, linux

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
CLONE_FLAGS = {"net": linux.CLONE_NEWNET, "ipc": linux.CLONE_NEWIPC, "uts": linux.CLONE_NEWUTS}


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
    linux.unshare(flags)
    if "net" in kinds:
        loopback_up()
    if hostname and "uts" in kinds:
        socket.sethostname(hostname)
    for key, value in sysctls.items():
        try:
            sysctl_path(key).write_text(str(value))  # /proc/sys resolves in the calling thread's namespaces
        except OSError as exc:
            raise SysctlRefused(key, str(value), exc) from None


def sysctl_path(key: str) -> Path:
    """net.ipv4.ip_forward -> /proc/sys/net/ipv4/ip_forward (both separators accepted, as sysctl(8) does)."""
    parts = key.split("/") if "/" in key else key.split(".")
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"sysctl {key!r} is not a valid name")
    return Path("/proc/sys", *parts)


def loopback_up() -> None:
    """Bring `lo` up in the new network namespace: containers of a pod talk over 127.0.0.1 whatever CNI does."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def child_main(request_json: str) -> int:
    """The child's side of the protocol above; its exit status."""
    request = json.loads(request_json)
    linux.unshare(idmap.CLONE_NEWUSER)
    _say("unshared")
    if sys.stdin.readline().strip() != "mapped":
        return 1  # the parent gave up
    # Root inside (the mapped host UID outside), without the daemon's supplementary groups.
    os.setresgid(0, 0, 0)
    os.setgroups([])
    os.setresuid(0, 0, 0)
    try:
        unshare_and_configure(request["kinds"], request["hostname"], request["sysctls"])
    except SysctlRefused as exc:
        _say(f"sysctl\t{exc.key}\t{exc.value}\t{exc.errno}")
        return 2
    _say("ready")
    sys.stdin.read()
    return 0
