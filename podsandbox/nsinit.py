"""Child program that creates a pod's namespaces and pins them (run as `python -m podsandbox.nsinit`).

It runs in a fresh process because unshare() moves the caller into the new
namespaces: the daemon itself must never switch. Input is one JSON object on
stdin: {"pins": {"net"|"ipc"|"uts": path}, "hostname": str, "sysctls": {key: value}}.
The namespaces outlive this process through bind mounts of /proc/self/ns/<kind>
onto the pin files. On any failure it removes the pins it made and exits 1 with
the reason on stderr, so the caller has nothing to undo.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
import sys
from pathlib import Path
from typing import Any

from cri import linux

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
CLONE_FLAGS = {"net": linux.CLONE_NEWNET, "ipc": linux.CLONE_NEWIPC, "uts": linux.CLONE_NEWUTS}


def sysctl_path(key: str) -> Path:
    """net.ipv4.ip_forward -> /proc/sys/net/ipv4/ip_forward (both separators accepted, as sysctl(8) does)."""
    parts = key.split("/") if "/" in key else key.split(".")
    if not parts or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"sysctl {key!r} is not a valid name")
    return Path("/proc/sys", *parts)


def pin(kind: str, path: str) -> None:
    Path(path).parent.mkdir(mode=0o711, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    linux.mount(f"/proc/self/ns/{kind}", path, None, linux.MS_BIND)


def loopback_up() -> None:
    """Bring `lo` up in the new network namespace: containers of a pod talk over 127.0.0.1 whatever CNI does."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | IFF_UP))


def setup(request: dict[str, Any]) -> None:
    pins: dict[str, str] = request.get("pins", {})
    flags = 0
    for kind in pins:
        flags |= CLONE_FLAGS[kind]
    if flags:
        linux.unshare(flags)
    if "net" in pins:
        loopback_up()
    hostname = request.get("hostname") or ""
    if hostname and "uts" in pins:
        socket.sethostname(hostname)
    for key, value in (request.get("sysctls") or {}).items():
        try:
            sysctl_path(key).write_text(str(value))
        except OSError as exc:
            raise OSError(exc.errno, f"sysctl {key}={value}: {exc.strerror}") from None
    made: list[str] = []
    try:
        for kind, path in pins.items():
            pin(kind, path)
            made.append(path)
    except BaseException:
        for path in made:
            # As namespaces.release does; not imported, since that module pulls asyncio into this short-lived child.
            linux.umount_if_mounted(path)
            os.unlink(path)
        raise


def main() -> int:
    try:
        setup(json.loads(sys.stdin.read()))
    except (OSError, ValueError, KeyError) as exc:
        sys.stderr.write(f"{exc}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
