"""cri/images/socket_backend: httpx on plain non-blocking sockets, against the loopback registry (plain and
TLS) and small loopback servers that misbehave on purpose."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cri.images import registry, socket_backend
from cri.images.registry import Endpoint, RegistryClient, RegistryError
from tests.support import image_builder as ib
from tests.support.registry_harness import Registry

REPO = "socket/blob"


class Sink:
    def __init__(self) -> None:
        self.data = bytearray()

    async def write(self, chunk: bytes) -> None:
        self.data += chunk

    async def reset(self) -> None:
        self.data.clear()


def _descriptor(data: bytes) -> dict[str, object]:
    return {"digest": "sha256:" + hashlib.sha256(data).hexdigest(), "size": len(data)}


@pytest.fixture(scope="module")
def tls_registry() -> Iterator[tuple[Registry, bytes]]:
    with Registry(tls=True).start() as registry:
        data = os.urandom((5 << 20) + 321)
        with ib.RegistryClient(registry.url, verify=registry.ca_file or False) as uploader:
            uploader.upload_blob(REPO, data)
        yield registry, data


def test_a_blob_over_tls_comes_through_socket_streams_whole(tls_registry: tuple[Registry, bytes]) -> None:
    registry, data = tls_registry
    assert registry.ca_file is not None

    async def fetch() -> tuple[bytes, object, str]:
        async with RegistryClient(ca_file=registry.ca_file, progress_timeout=30) as client:
            sink = Sink()
            await client.fetch_blob(Endpoint(host=registry.host, repository=REPO), _descriptor(data), sink)
            http = client._client(registry.host, False)
            async with http.stream("GET", f"https://{registry.host}/v2/") as response:
                stream = response.extensions["network_stream"]
                return bytes(sink.data), stream, stream.get_extra_info("ssl_object").version()

    body, stream, version = asyncio.run(fetch())
    assert body == data
    assert isinstance(stream, socket_backend.SocketStream)
    assert version.startswith("TLSv1")


def test_an_untrusted_certificate_fails_at_once_naming_the_verification(tls_registry: tuple[Registry, bytes]) -> None:
    registry, data = tls_registry

    async def fetch() -> None:
        async with RegistryClient(progress_timeout=30, backoff=0.01) as client:
            await client.fetch_blob(Endpoint(host=registry.host, repository=REPO), _descriptor(data), Sink())

    with pytest.raises(RegistryError) as info:
        asyncio.run(fetch())
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)


@pytest.fixture(scope="module")
def plain_registry() -> Iterator[tuple[Registry, bytes]]:
    with Registry().start() as registry:
        data = os.urandom(300_000)
        with ib.RegistryClient(registry.url) as uploader:
            uploader.upload_blob(REPO, data)
        yield registry, data


def test_an_insecure_registry_speaking_plain_http_is_reached_after_the_tls_attempt_fails(
    plain_registry: tuple[Registry, bytes],
) -> None:
    registry, data = plain_registry

    async def fetch() -> bytes:
        async with RegistryClient(progress_timeout=30) as client:
            sink = Sink()
            endpoint = Endpoint(host=registry.host, repository=REPO, insecure=True)
            await client.fetch_blob(endpoint, _descriptor(data), sink)
            return bytes(sink.data)

    assert asyncio.run(fetch()) == data


def test_tls_to_a_plain_http_server_is_a_connect_error(plain_registry: tuple[Registry, bytes]) -> None:
    registry, _ = plain_registry

    async def get() -> None:
        async with _client() as client:
            await client.get(f"https://{registry.host}/v2/")

    with pytest.raises(httpx.ConnectError, match="TLS"):
        asyncio.run(get())


class SilentServer:
    """Accepts connections on loopback and reads each request whole, then answers `answer` (nothing when
    empty) and closes when `close_after`; `read_slowly` waits before reading, so a large request body fills
    the socket buffers."""

    def __init__(self, answer: bytes = b"", read_slowly: float = 0.0, close_after: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.answer = answer
        self.read_slowly = read_slowly
        self.close_after = close_after
        self.received = 0
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._conns: list[socket.socket] = []

    def __enter__(self) -> SilentServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.listener.close()
        for conn in self._conns:
            conn.close()
        self._thread.join(5)

    def _serve(self) -> None:
        self.listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        try:
            self._stop.wait(self.read_slowly)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            headers, _, body = head.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in headers.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                0,
            )
            self.received = len(body)
            while self.received < length:
                self.received += len(conn.recv(1 << 20))
            if self.answer:
                conn.sendall(self.answer)
            if self.close_after:
                conn.close()
        except OSError:
            pass


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def _client(timeout: float = 5.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=socket_backend.socket_transport(False), timeout=timeout)


def test_a_server_that_never_answers_is_a_read_timeout() -> None:
    with SilentServer() as server:

        async def get() -> None:
            async with _client(timeout=0.3) as client:
                await client.get(f"http://127.0.0.1:{server.port}/")

        with pytest.raises(httpx.ReadTimeout):
            asyncio.run(get())


def test_a_refused_connection_is_a_connect_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
    # nothing listens there now

    async def get() -> None:
        async with _client() as client:
            await client.get(f"http://127.0.0.1:{port}/")

    with pytest.raises(httpx.ConnectError):
        asyncio.run(get())


def test_a_body_larger_than_the_socket_buffers_waits_for_the_server_to_read_it() -> None:
    body = os.urandom(16 << 20)
    with SilentServer(answer=OK, read_slowly=0.5) as server:

        async def put() -> httpx.Response:
            async with _client() as client:
                return await client.put(f"http://127.0.0.1:{server.port}/", content=body)

        response = asyncio.run(put())
        assert response.status_code == 200 and response.text == "ok"
        assert server.received == len(body)


def test_a_pooled_connection_the_server_closed_is_not_reused() -> None:
    keep_alive = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
    with SilentServer(answer=keep_alive, close_after=True) as server:

        async def twice() -> list[int]:
            async with _client() as client:
                first = await client.get(f"http://127.0.0.1:{server.port}/")
                await asyncio.sleep(0.2)  # the server has closed it by now
                second = await client.get(f"http://127.0.0.1:{server.port}/")
                return [first.status_code, second.status_code]

        assert asyncio.run(twice()) == [200, 200]
        assert server.connections == 2


def test_a_cancelled_read_leaves_the_loop_without_a_reader_for_its_socket() -> None:
    with SilentServer() as server:

        async def cancelled() -> int:
            loop = asyncio.get_running_loop()
            async with _client() as client:
                task = asyncio.create_task(client.get(f"http://127.0.0.1:{server.port}/"))
                await asyncio.sleep(0.2)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                return len(loop._selector.get_map())  # type: ignore[attr-defined]

        async def baseline() -> int:
            return len(asyncio.get_running_loop()._selector.get_map())  # type: ignore[attr-defined]

        assert asyncio.run(cancelled()) == asyncio.run(baseline())


def test_a_proxy_in_the_environment_keeps_httpx_s_own_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("NO_PROXY", "example.com")
    assert isinstance(registry._socket_transport(False), httpx.AsyncHTTPTransport)
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    assert registry._socket_transport(False) is None


def test_the_ssl_context_given_is_the_one_the_connections_use() -> None:
    context = ssl.create_default_context()
    transport = socket_backend.socket_transport(context)
    assert transport._pool._ssl_context is context


def test_an_unverified_connection_loads_no_ca_store() -> None:
    """Loading the system's CA store takes 20 ms; a client made on the event loop must not pay it for nothing."""
    transport = socket_backend.socket_transport(False)
    context = transport._pool._ssl_context
    assert context is not None and context.verify_mode == ssl.CERT_NONE
    assert context.cert_store_stats()["x509_ca"] == 0


def _address(sockaddr: tuple[str, int]) -> tuple[Any, ...]:
    return (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)


def test_an_address_that_never_answers_does_not_hold_up_the_next() -> None:
    """Happy eyeballs: a broken route to the first address (a dead IPv6 path, say) must not keep the client
    from the second. The first listener's accept queue is full, so the kernel drops the SYNs sent to it."""
    with (
        socket.create_server(("127.0.0.1", 0), backlog=0) as silent,
        socket.create_server(("127.0.0.1", 0)) as live,
    ):
        fillers = []
        for _ in range(3):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(silent.getsockname())
            fillers.append(filler)
        addresses = [_address(silent.getsockname()), _address(live.getsockname())]

        async def connect() -> tuple[Any, int]:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(30):  # without the stagger this waits for the SYN retries (minutes)
                sock = await socket_backend._connect_first(addresses, None, [])
            try:
                await asyncio.sleep(0.1)  # the cancelled attempt has closed its socket by now
                return sock.getpeername(), len(loop._selector.get_map())  # type: ignore[attr-defined]
            finally:
                sock.close()

        try:
            peer, watched = asyncio.run(connect())
        finally:
            for filler in fillers:
                filler.close()
        assert peer == live.getsockname()
        assert watched == 1  # the loop's own wake-up pipe only: no attempt left behind


def test_addresses_alternate_between_families_the_first_ones_family_first() -> None:
    v6 = [(socket.AF_INET6, socket.SOCK_STREAM, 6, "", (f"2001:db8::{i}", 443, 0, 0)) for i in range(3)]
    v4 = [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (f"192.0.2.{i}", 443)) for i in range(2)]
    ordered = socket_backend._interleaved(v6 + v4)
    assert [a[4][0] for a in ordered] == ["2001:db8::0", "192.0.2.0", "2001:db8::1", "192.0.2.1", "2001:db8::2"]
