"""Connecting to localhost inside a pod: a socket made in the pod's network namespace.

A socket belongs to the namespace it was created in, so only its creation
needs the namespace: a throwaway thread enters it, makes the socket and
leaves; the event loop does the connect and the I/O. A fresh thread each
time, so a failed return to the host namespace cannot leak into a pool.
"""

from __future__ import annotations

import asyncio
import functools
import os
import socket
import threading
from collections.abc import Callable

from cri import linux

CLONE_NEWNET = 0x40000000
DIAL_TIMEOUT = 10.0


def _socket_in(netns: str, family: int) -> socket.socket:
    if not netns:
        return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        target = os.open(netns, os.O_RDONLY | os.O_CLOEXEC)
        try:
            linux.setns(target, CLONE_NEWNET)
            try:
                return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            finally:
                linux.setns(own, CLONE_NEWNET)
        finally:
            os.close(target)
    finally:
        os.close(own)


async def _in_fresh_thread(fn: Callable[[], socket.socket]) -> socket.socket:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[socket.socket] = loop.create_future()

    def settle(result: socket.socket | None, error: BaseException | None) -> None:
        if done.done():
            return
        if error is not None:
            done.set_exception(error)
        elif result is not None:
            done.set_result(result)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:  # handed to the awaiting coroutine
            loop.call_soon_threadsafe(settle, None, exc)
        else:
            loop.call_soon_threadsafe(settle, result, None)

    threading.Thread(target=run, name="netns-dial", daemon=True).start()
    return await done


async def dial(netns: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to localhost:port in `netns` ("" = the host's): IPv4 first, then IPv6."""
    loop = asyncio.get_running_loop()
    failures = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        sock = await _in_fresh_thread(functools.partial(_socket_in, netns, family))
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, (host, port)), DIAL_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            sock.close()
            failures.append(f"{host}: {exc}")
            continue
        return await asyncio.open_connection(sock=sock)
    raise OSError(f"dial localhost:{port} in the pod: " + "; ".join(failures))
