"""The streaming server at its edges: TLS, the idle timeout, and multi-MiB output under flow control.

Same daemon-as-a-process setup as test_streaming.py, and the same independent SPDY/WebSocket clients.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import Env, running_env
from tests.e2e.streams import exec_url, processes, sleeper, wait_gone
from tests.streamclients import parse_url
from tests.streamclients import remotecommand as rc
from tests.streamclients.spdy import DEFAULT_WINDOW, SessionOptions
from tests.support.registry_harness import Registry, make_ca, make_server_cert

IDLE_TIMEOUT = 2  # seconds (streaming.idle_timeout is an int of seconds)

# `busybox seq 1 SEQ_END`: distinct, ordered lines, so a dropped, repeated or reordered chunk shows up.
SEQ_END = 1_200_000
SEQ_OUTPUT = b"".join(b"%d\n" % i for i in range(1, SEQ_END + 1))  # 8,488,896 bytes
EIGHT_MIB = 8 * 1024 * 1024


@pytest.fixture
def idle_env(make_daemon, registry: Registry, busybox: str) -> Iterator[Env]:
    with running_env(make_daemon, registry, [busybox], f"streaming:\n  idle_timeout: {IDLE_TIMEOUT}\n") as env:
        yield env


@pytest.fixture
def ca_cert(tmp_path: Path) -> Path:
    return make_ca(tmp_path, "criopy streaming test CA")[0]


@pytest.fixture
def tls_env(make_daemon, registry: Registry, busybox: str, ca_cert: Path) -> Iterator[Env]:
    cert, key = make_server_cert(ca_cert.parent, ca_cert, ca_cert.parent / "ca.key")
    extra = f"streaming:\n  tls_cert: {cert}\n  tls_key: {key}\n"
    with running_env(make_daemon, registry, [busybox], extra) as env:
        yield env


def _run(coro, timeout: float = 30):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# ---- TLS -----------------------------------------------------------------------------------------


async def _plain_http_upgrade(url: str) -> bytes:
    """A cleartext SPDY upgrade request to url's host and port; whatever comes back until EOF."""
    target = parse_url(url)
    reader, writer = await asyncio.wait_for(asyncio.open_connection(target.host, target.port), 10)
    try:
        writer.write(
            f"POST {target.request_target} HTTP/1.1\r\nHost: {target.host_header}\r\n"
            "Connection: Upgrade\r\nUpgrade: SPDY/3.1\r\nX-Stream-Protocol-Version: v4.channel.k8s.io\r\n"
            "Content-Length: 0\r\n\r\n".encode()
        )
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 10)  # EOF within 10 s, or the test fails
        except ConnectionResetError:
            return b""
    finally:
        writer.close()


def test_tls_urls_are_https_and_exec_works_only_over_tls_verified_against_the_ca(tls_env: Env, ca_cert: Path) -> None:
    env = tls_env
    cid = sleeper(env)
    trusted = ssl.create_default_context(cafile=str(ca_cert))

    url = exec_url(env, cid, ["sh", "-c", "echo over-tls; echo err-over-tls >&2; exit 3"], stdout=True, stderr=True)
    assert url.startswith("https://127.0.0.1:"), url
    result = _run(rc.exec_spdy(url, ssl_context=trusted))
    assert (result.stdout, result.stderr, result.exit_code) == (b"over-tls\n", b"err-over-tls\n", 3)

    url = exec_url(env, cid, ["cat"], stdin=True, stdout=True, stderr=True)
    assert url.startswith("https://"), url
    result = _run(rc.exec_websocket(url, stdin=b"websocket over tls\n", ssl_context=trusted))
    assert (result.stdout, result.exit_code) == (b"websocket over tls\n", 0)

    # A client that does not trust the CA refuses the server's certificate ...
    url = exec_url(env, cid, ["sh", "-c", "echo finally"], stdout=True)
    with pytest.raises(ssl.SSLCertVerificationError):
        _run(rc.exec_spdy(url, stderr=False, ssl_context=ssl.create_default_context()))
    # ... and cleartext HTTP on the same port gets no upgrade (no HTTP 101, the connection just ends).
    answer = _run(_plain_http_upgrade(url))
    assert not answer.startswith(b"HTTP/1.1 101") and b"SPDY/3.1" not in answer, answer[:200]
    # Neither attempt got as far as the request, so the one-time token is still good over verified TLS.
    result = _run(rc.exec_spdy(url, stderr=False, ssl_context=trusted))
    assert (result.stdout, result.exit_code) == (b"finally\n", 0)


# ---- idle timeout --------------------------------------------------------------------------------


def test_an_idle_exec_session_is_closed_and_its_process_killed(idle_env: Env) -> None:
    env = idle_env
    cid = sleeper(env)
    spdy_argv, ws_argv = ["sleep", "3617"], ["sleep", "3618"]

    async def idle_spdy() -> float:
        url = exec_url(env, cid, spdy_argv, stdout=True, stderr=True)
        streams = await rc.open_exec_streams(url, timeout=15)
        try:
            opened = time.monotonic()
            assert streams.stdout is not None
            while not processes(spdy_argv):
                assert time.monotonic() - opened < 5, "the exec'd sleep did not start"
                await asyncio.sleep(0.05)
            # Nothing is sent either way: the server must end the stream and the connection by itself.
            assert await streams.stdout.read_all(timeout=10) == b""
            await streams.client.wait_ended(timeout=5)
            return time.monotonic() - opened
        finally:
            await streams.close()

    async def idle_websocket() -> float:
        url = exec_url(env, cid, ws_argv, stdout=True, stderr=True)
        session = await rc.open_exec_websocket(url, timeout=15)
        try:
            opened = time.monotonic()
            assert await session.recv(timeout=10) is None  # only the empty "connected" message, then the end
            return time.monotonic() - opened
        finally:
            await session.close()

    took = _run(idle_spdy())
    assert IDLE_TIMEOUT - 0.5 <= took <= IDLE_TIMEOUT + 3, took
    assert wait_gone(spdy_argv) == []

    took = _run(idle_websocket())
    assert IDLE_TIMEOUT - 0.5 <= took <= IDLE_TIMEOUT + 3, took
    assert wait_gone(ws_argv) == []

    assert env.status(cid).status.state == pb.CONTAINER_RUNNING


def test_sessions_with_traffic_outlive_the_idle_timeout(idle_env: Env) -> None:
    env = idle_env
    cid = sleeper(env)

    # Output only, a line every 0.5 s for 4 s (twice the idle timeout).
    ticks = "for i in 1 2 3 4 5 6 7 8; do echo tick $i; sleep 0.5; done"
    url = exec_url(env, cid, ["sh", "-c", ticks], stdout=True, stderr=True)
    started = time.monotonic()
    result = _run(rc.exec_spdy(url))
    assert time.monotonic() - started > IDLE_TIMEOUT + 1
    assert result.stdout == b"".join(b"tick %d\n" % i for i in range(1, 9)) and result.exit_code == 0

    # Input only: the command prints nothing until its stdin ends.
    url = exec_url(
        env, cid, ["sh", "-c", "n=0; while read l; do n=$((n+1)); done; echo read $n"], stdin=True, stdout=True
    )

    async def feed() -> rc.ExecResult:
        streams = await rc.open_exec_streams(url, stdin=True, stderr=False)
        try:
            for i in range(8):
                await streams.send_stdin(b"line %d\n" % i)
                await asyncio.sleep(0.5)
            return await streams.run(stdin=b"")
        finally:
            await streams.close()

    result = _run(feed())
    assert (result.stdout, result.exit_code) == (b"read 8\n", 0)


# ---- large output --------------------------------------------------------------------------------


async def _attach_and_read(url: str, go: bytes, expected: bytes, options: SessionOptions, pauses: int) -> int:
    """Attach, send `go`, read stdout until `expected` (checked byte for byte) and make sure nothing follows.

    Returns the most bytes received but not yet read, seen at the end of a pause.

    pauses: how many times to stop reading for 0.3 s along the way, so the server meets a full window or a full
    socket buffer and has to wait, and conmon with it.
    """
    streams = await rc.open_exec_streams(url, stdin=True, options=options, timeout=20)
    try:
        assert streams.stdout is not None
        await streams.send_stdin(go)
        seen = bytearray()
        most_unread = 0
        pause_at = [len(expected) * (k + 1) // (pauses + 1) for k in range(pauses)]
        while len(seen) < len(expected):
            chunk = await streams.stdout.read(timeout=15)
            assert chunk, f"stdout ended after {len(seen)} of {len(expected)} bytes"
            seen += chunk
            if pause_at and len(seen) >= pause_at[0]:
                pause_at.pop(0)
                await asyncio.sleep(0.3)
                most_unread = max(most_unread, streams.stdout.bytes_received - len(seen))
        assert len(seen) == len(expected), (len(seen), len(expected))
        if seen != expected:
            first = next(i for i, (a, b) in enumerate(zip(seen, expected, strict=False)) if a != b)
            pytest.fail(f"output differs from byte {first}: {bytes(seen[first : first + 40])!r}")
        with pytest.raises(TimeoutError):
            extra = await streams.stdout.read(timeout=0.5)
            pytest.fail(f"unexpected output after the marker: {extra[:80]!r}")
        return most_unread
    finally:
        await streams.close()


def test_attach_delivers_megabytes_of_output_intact_over_spdy(env: Env) -> None:
    pod = env.pod()
    script = f"while read x; do busybox seq 1 {SEQ_END}; echo END-$x; done"
    config = env.container_config(command=["sh", "-c", script])
    config.stdin = True
    cid = env.run(pod, config)

    def attach(go: bytes, options: SessionOptions, pauses: int) -> int:
        request = pb.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True)
        url = str(env.rt.Attach(request, timeout=10).url)
        expected = SEQ_OUTPUT + b"END-" + go
        return _run(_attach_and_read(url, go, expected, options, pauses))

    # As client-go's spdystream: no flow control, reading as fast as it can.
    attach(b"1\n", SessionOptions(), pauses=0)
    # spdystream's own backpressure: a busy reader stops reading the socket; TCP pushes back on the server.
    attach(b"2\n", SessionOptions(max_queued_frames=2), pauses=4)
    # A client that grants window only for what it has read: the server must stop at the 64 KiB window
    # while the reader pauses (its inbox is unbounded here, so only the server can hold the data back).
    windowed_unread = attach(b"3\n", SessionOptions(send_window_updates=True, session_window_updates=True), pauses=4)
    assert 0 < windowed_unread <= DEFAULT_WINDOW, windowed_unread
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING


def test_exec_delivers_eight_mib_of_stdout_intact_over_websocket(env: Env) -> None:
    cid = sleeper(env)
    url = exec_url(env, cid, ["sh", "-c", f"busybox seq 1 {SEQ_END} | head -c {EIGHT_MIB}"], stdout=True, stderr=True)
    result = _run(rc.exec_websocket(url, timeout=25))
    assert len(result.stdout) == EIGHT_MIB
    assert result.stdout == SEQ_OUTPUT[:EIGHT_MIB]
    assert (result.stderr, result.exit_code) == (b"", 0)
