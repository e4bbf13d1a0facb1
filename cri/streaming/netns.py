"""Connecting to localhost inside a pod: a socket made in the pod's network namespace.

A socket belongs to the namespace it was created in, so only its creation
needs the namespace: a throwaway thread (`cri.system.nsthread`) enters it, makes
the socket and leaves; the event loop does the connect and the I/O.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket

from cri.system import linux, nsthread

DIAL_TIMEOUT = 10.0


def _socket_in(netns: str, family: int) -> socket.socket:
    if not netns:
        return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(target, linux.CLONE_NEWNET)
            try:
                return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            finally:
                linux.setns(own, linux.CLONE_NEWNET)
        finally:
            os.close(target)
    finally:
        os.close(own)


async def dial(netns: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to localhost:port in `netns` ("" = the host's): IPv4 first, then IPv6."""
    loop = asyncio.get_running_loop()
    failures = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = await nsthread.in_fresh_thread(functools.partial(_socket_in, netns, family), "netns-dial")
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), DIAL_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            sock.close()
            failures.append(f"{host}: {exc}")
            continue
        return await asyncio.open_connection(sock=sock)
    raise OSError(f"dial localhost:{port} in the pod: " + "; ".join(failures))
