"""httpcore's network layer on asyncio's selector, straight on a non-blocking socket.

httpx's default async transport reads through anyio: every read of a blob body sets up a cancel scope, an
exception map, a task lookup and a sniffio check, and a TLS connection is decrypted in Python-driven
MemoryBIO rounds. A 96 MiB body from the loopback registry costs 0.07-0.09 s of CPU that way, 0.03-0.04 s
here (the same as httpx's blocking client), the rest being h11. Here a read is one `recv` on the socket
(plain, or an `ssl.SSLSocket` that decrypts in C), and only a read that finds nothing waits for the loop's
readiness callback.

`socket_transport` is an httpx transport on this backend. httpx takes no network backend, so it gets a
connection pool of its own with httpx's default limits. A transport handed to httpx turns off its proxy
settings from the environment, so `environment_proxies()` tells the caller when to keep httpx's own.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import select
import socket
import ssl
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import httpcore
import httpx

from cri.system import fdwait

T = TypeVar("T")

# RFC 8305's connection attempt delay, anyio's and asyncio's too.
CONNECT_STAGGER = 0.25

# httpx's own defaults (httpx.Limits()), which its transport would use.
MAX_CONNECTIONS = 100
MAX_KEEPALIVE = 20
KEEPALIVE_EXPIRY = 5.0


def environment_proxies() -> bool:
    """Whether the environment names an HTTP(S) proxy, which httpx honours only with its own transport."""
    return any(scheme in ("http", "https", "all") for scheme in urllib.request.getproxies())


def socket_transport(verify: ssl.SSLContext | bool) -> httpx.AsyncHTTPTransport:
    """An httpx transport whose connections are SocketStreams; `verify` as httpx takes it (False: no checks)."""
    context = verify if isinstance(verify, ssl.SSLContext) else _context(verify)
    transport = httpx.AsyncHTTPTransport(verify=context)  # its own pool is replaced: given the same context
    transport._pool = httpcore.AsyncConnectionPool(
        ssl_context=context,
        max_connections=MAX_CONNECTIONS,
        max_keepalive_connections=MAX_KEEPALIVE,
        keepalive_expiry=KEEPALIVE_EXPIRY,
        network_backend=SocketBackend(),
    )
    return transport


def _context(verify: bool) -> ssl.SSLContext:
    if verify:
        return ssl.create_default_context()
    # No checks, so no CA store to load: create_default_context reads the system's, 20 ms on the loop.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class SocketBackend(httpcore.AsyncNetworkBackend):
    """TCP connections for httpcore, on the running asyncio loop."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                addresses = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
                return SocketStream(await _connect_first(addresses, local_address, list(socket_options or ())))
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"connecting to {host}:{port} timed out") from None
        except OSError as exc:
            raise httpcore.ConnectError(f"connecting to {host}:{port}: {exc}") from exc

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError(f"{path}: unix sockets are not used for registries")

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def _connect_first(
    addresses: list[tuple[Any, ...]], local_address: str | None, options: list[Any]
) -> socket.socket:
    """A connected non-blocking socket to the first address that answers; the last failure otherwise.

    Happy eyeballs (RFC 8305), as anyio does: the next address is tried when the last attempt failed or has
    not connected within CONNECT_STAGGER, so an unreachable IPv6 route does not hold up IPv4. The first
    attempt to connect wins; the others are cancelled and their sockets closed."""
    waiting = _interleaved(addresses)
    running: set[asyncio.Task[socket.socket]] = set()
    failure: OSError = OSError(errno.EADDRNOTAVAIL, "the name resolved to no address")
    try:
        while waiting or running:
            if waiting:
                running.add(asyncio.ensure_future(_connect_one(waiting.pop(0), local_address, options)))
            done, running = await asyncio.wait(
                running, timeout=CONNECT_STAGGER if waiting else None, return_when=asyncio.FIRST_COMPLETED
            )
            connected = [task.result() for task in done if task.exception() is None]
            for task in done:
                exc = task.exception()
                if exc is not None and not isinstance(exc, OSError):
                    raise exc
                failure = exc or failure
            if connected:
                for extra in connected[1:]:
                    extra.close()
                return connected[0]
        raise failure
    finally:
        for task in running:
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().close()
            task.cancel()  # a running attempt closes its own socket


def _interleaved(addresses: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """The addresses alternating between families, the first one's family first (RFC 8305, 4)."""
    families: dict[int, list[tuple[Any, ...]]] = {}
    for address in addresses:
        families.setdefault(address[0], []).append(address)
    queues = list(families.values())
    out: list[tuple[Any, ...]] = []
    while any(queues):
        out.extend(queue.pop(0) for queue in queues if queue)
    return out


async def _connect_one(address: tuple[Any, ...], local_address: str | None, options: list[Any]) -> socket.socket:
    family, kind, proto, _, target = address
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option in options:
            sock.setsockopt(*option)
        if local_address is not None:
            sock.bind((local_address, 0))
        await asyncio.get_running_loop().sock_connect(sock, target)
    except BaseException:
        sock.close()
        raise
    return sock


class SocketStream(httpcore.AsyncNetworkStream):
    """One connection: a non-blocking socket, or the SSLSocket that replaced it in start_tls."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        try:
            return await self._until_done(lambda: self._sock.recv(max_bytes), timeout, writing=False)
        except TimeoutError:
            raise httpcore.ReadTimeout(f"no data for {timeout}s") from None
        except OSError as exc:
            raise httpcore.ReadError(str(exc)) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        view = memoryview(buffer)
        try:
            while view:
                sent = await self._until_done(functools.partial(self._sock.send, view), timeout, writing=True)
                view = view[sent:]
        except TimeoutError:
            raise httpcore.WriteTimeout(f"could not write for {timeout}s") from None
        except OSError as exc:
            raise httpcore.WriteError(str(exc)) from exc

    async def aclose(self) -> None:
        self._sock.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        # Errors are ConnectErrors, as anyio's: an insecure registry's https attempt falls back to http on them.
        try:
            secured = ssl_context.wrap_socket(
                self._sock, server_hostname=server_hostname, do_handshake_on_connect=False
            )
        except (OSError, ValueError) as exc:
            self._sock.close()
            raise httpcore.ConnectError(f"TLS: {exc}") from exc
        self._sock = secured  # wrap_socket took over the descriptor
        try:
            await self._until_done(secured.do_handshake, timeout, writing=False)
        except TimeoutError:
            secured.close()
            raise httpcore.ConnectTimeout(f"the TLS handshake took over {timeout}s") from None
        except OSError as exc:
            secured.close()
            raise httpcore.ConnectError(f"TLS handshake: {exc}") from exc
        return self

    def get_extra_info(self, info: str) -> Any:
        if info == "ssl_object":
            return self._sock if isinstance(self._sock, ssl.SSLSocket) else None
        if info == "socket":
            return self._sock
        if info == "client_addr":
            return self._sock.getsockname()
        if info == "server_addr":
            return self._sock.getpeername()
        if info == "is_readable":  # an idle pooled connection that reads as ready was closed by the server
            return _readable(self._sock)
        return None

    async def _until_done(self, call: Callable[[], T], timeout: float | None, writing: bool) -> T:
        """`call()` on the non-blocking socket, waiting for the readiness it asks for as often as it asks.

        The first try needs no timer: a body's reads mostly find their bytes already there."""
        outcome = _attempt(call, writing)
        if not isinstance(outcome, _Pending):
            return outcome
        async with asyncio.timeout(timeout):
            while isinstance(outcome, _Pending):
                await fdwait.ready(self._sock.fileno(), write=outcome.writable)
                outcome = _attempt(call, writing)
            return outcome


@dataclass(frozen=True)
class _Pending:
    """The call would block until the socket is writable (else readable)."""

    writable: bool


def _attempt(call: Callable[[], T], writing: bool) -> T | _Pending:
    try:
        return call()
    except BlockingIOError:
        return _Pending(writing)
    except ssl.SSLWantReadError:
        return _Pending(False)
    except ssl.SSLWantWriteError:  # TLS may need to send before it can go on (a key update)
        return _Pending(True)


def _readable(sock: socket.socket) -> bool:
    if sock.fileno() < 0:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))
