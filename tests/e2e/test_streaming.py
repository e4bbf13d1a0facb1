"""Exec, attach and port-forward through the daemon, with clients that speak SPDY/3.1 and WebSocket on the wire."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import Env, running_env
from tests.e2e.streams import exec_url, pid_ns, processes, sleeper, wait_gone, wait_present, web_server_config
from tests.streamclients import UpgradeRefused
from tests.streamclients import remotecommand as rc
from tests.support.registry_harness import Registry

TOKEN_TTL = 4


@pytest.fixture
def env(make_daemon, registry: Registry, busybox: str) -> Iterator[Env]:
    with running_env(make_daemon, registry, [busybox], f"streaming:\n  token_ttl: {TOKEN_TTL}\n") as env:
        yield env


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


# ---- ExecSync ------------------------------------------------------------------------------------


def test_exec_sync_separates_streams_returns_the_code_and_times_out_alone(env: Env) -> None:
    cid = sleeper(env)
    resp = env.rt.ExecSync(
        pb.ExecSyncRequest(container_id=cid[:12], cmd=["sh", "-c", "echo out; echo err >&2; exit 7"]), timeout=30
    )
    assert (resp.stdout, resp.stderr, resp.exit_code) == (b"out\n", b"err\n", 7)

    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as err:
        env.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["sleep", "1001"], timeout=1), timeout=30)
    took = time.monotonic() - started
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 0.9 < took < 5, took
    assert processes(["sleep", "1001"], pid_ns(env, cid)) == []  # killed and reaped at once, no zombie
    # The container itself is untouched.
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING

    # A background child holding stdout open does not hold the call past the command's end.
    started = time.monotonic()
    resp = env.rt.ExecSync(
        pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "sleep 1002 & echo bg"], timeout=20), timeout=30
    )
    assert resp.stdout == b"bg\n" and resp.exit_code == 0
    assert time.monotonic() - started < 5


def test_exec_sync_errors_name_what_is_wrong(env: Env) -> None:
    cid = sleeper(env)
    cases = [
        (pb.ExecSyncRequest(container_id="f" * 64, cmd=["true"]), grpc.StatusCode.NOT_FOUND, "not found"),
        (pb.ExecSyncRequest(container_id=cid, cmd=[]), grpc.StatusCode.INVALID_ARGUMENT, "cmd"),
        (
            pb.ExecSyncRequest(container_id=cid, cmd=["/no/such/binary"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "/no/such/binary",
        ),
    ]
    for request, code, text in cases:
        with pytest.raises(grpc.RpcError) as err:
            env.rt.ExecSync(request, timeout=30)
        assert err.value.code() == code and text in err.value.details(), err.value.details()
    created = env.create(env.pod(), env.container_config("idle", ["sleep", "3600"]))
    for call in (
        lambda: env.rt.ExecSync(pb.ExecSyncRequest(container_id=created, cmd=["true"]), timeout=30),
        lambda: env.rt.Exec(pb.ExecRequest(container_id=created, cmd=["true"], stdout=True), timeout=30),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for exec_request, field in (
        (pb.ExecRequest(container_id=cid, cmd=["true"]), "stdin/stdout/stderr"),
        (pb.ExecRequest(container_id=cid, cmd=["true"], tty=True, stdout=True, stderr=True), "stderr"),
    ):
        with pytest.raises(grpc.RpcError) as err:
            env.rt.Exec(exec_request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details()


# ---- Exec ----------------------------------------------------------------------------------------


def test_exec_over_spdy_output_exit_code_stdin_and_tty(env: Env) -> None:
    cid = sleeper(env)
    url = exec_url(env, cid, ["sh", "-c", "echo hello; echo oops >&2; exit 3"], stdout=True, stderr=True)
    result = _run(rc.exec_spdy(url))
    assert result.protocol == "v4.channel.k8s.io"
    assert (result.stdout, result.stderr, result.exit_code) == (b"hello\n", b"oops\n", 3)
    assert result.status is not None and result.status["reason"] == "NonZeroExitCode"

    url = exec_url(env, cid, ["cat"], stdin=True, stdout=True, stderr=True)
    result = _run(rc.exec_spdy(url, stdin=b"piped through cat\n" * 1000))
    assert result.stdout == b"piped through cat\n" * 1000 and result.exit_code == 0

    # The pty has the client's size before the command runs: no sleep needed for the resize to land.
    url = exec_url(env, cid, ["stty", "size"], stdout=True, tty=True)
    result = _run(rc.exec_spdy(url, tty=True, stderr=False, resize=(91, 37)))
    assert result.stdout.strip() == b"37 91" and result.exit_code == 0

    # An older client negotiates down and gets the text error stream.
    url = exec_url(env, cid, ["sh", "-c", "exit 5"], stdout=True)
    result = _run(rc.exec_spdy(url, stderr=False, protocols=("v2.channel.k8s.io",)))
    assert result.protocol == "v2.channel.k8s.io" and "5" in result.error_text


def test_exec_over_websocket_output_exit_code_stdin_and_tty(env: Env) -> None:
    cid = sleeper(env)
    url = exec_url(env, cid, ["sh", "-c", "echo hello; echo oops >&2; exit 4"], stdout=True, stderr=True)
    result = _run(rc.exec_websocket(url))
    assert result.protocol == "v5.channel.k8s.io"
    assert (result.stdout, result.stderr, result.exit_code) == (b"hello\n", b"oops\n", 4)

    url = exec_url(env, cid, ["cat"], stdin=True, stdout=True, stderr=True)
    result = _run(rc.exec_websocket(url, stdin=b"to cat over websocket\n"))
    assert result.stdout == b"to cat over websocket\n" and result.exit_code == 0

    url = exec_url(env, cid, ["sh", "-c", "sleep 0.5; stty size"], stdout=True, tty=True)
    result = _run(rc.exec_websocket(url, tty=True, stderr=False, resize=(120, 40), subprotocols=("v4.channel.k8s.io",)))
    assert result.protocol == "v4.channel.k8s.io"
    assert result.stdout.strip() == b"40 120" and result.exit_code == 0


def test_a_client_that_goes_away_mid_exec_leaves_no_process(env: Env) -> None:
    cid = sleeper(env)
    url = exec_url(env, cid, ["sh", "-c", "echo ready; exec sleep 1003"], stdout=True, stderr=True)

    async def go() -> None:
        streams = await rc.open_exec_streams(url)
        assert streams.stdout is not None
        assert await streams.stdout.read(10) == b"ready\n"
        assert wait_present(["sleep", "1003"])
        streams.abort()

    _run(go())
    assert wait_gone(["sleep", "1003"]) == []
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING


def test_a_token_works_once_and_not_after_it_expires(env: Env) -> None:
    cid = sleeper(env)
    url = exec_url(env, cid, ["true"], stdout=True)
    assert _run(rc.exec_spdy(url, stderr=False)).exit_code == 0
    with pytest.raises(UpgradeRefused) as refused:
        _run(rc.exec_spdy(url, stderr=False))
    assert refused.value.status == 404

    url = exec_url(env, cid, ["true"], stdout=True)
    time.sleep(TOKEN_TTL + 0.5)
    with pytest.raises(UpgradeRefused) as refused:
        _run(rc.exec_websocket(url, stderr=False))
    assert refused.value.status == 404


# ---- Attach --------------------------------------------------------------------------------------


def test_attach_receives_output_and_sends_input(env: Env) -> None:
    pod = env.pod()
    config = env.container_config(command=["sh", "-c", "while read line; do echo got: $line; done"])
    config.stdin = True
    cid = env.run(pod, config)
    url = str(env.rt.Attach(pb.AttachRequest(container_id=cid, stdin=True, stdout=True, stderr=True), timeout=10).url)

    async def go() -> bytes:
        streams = await rc.open_exec_streams(url, stdin=True)
        assert streams.stdin is not None and streams.stdout is not None
        await streams.send_stdin(b"hello attach\n")
        seen = b""
        while b"got: hello attach" not in seen:
            chunk = await streams.stdout.read(10)
            assert chunk, (seen, await streams.error.read_all(5))
            seen += chunk
        await streams.close()
        return seen

    assert b"got: hello attach\n" in _run(go())
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING


def test_attach_resizes_sent_back_to_back_all_reach_the_terminal(env: Env) -> None:
    # kubectl attach sends (w+1, h+1) then (w, h) at once to make the program redraw; conmon 2.1.6 keeps only the
    # first of two messages that meet in its fifo, so the daemon paces them.
    config = env.container_config(command=["sleep", "3600"])
    config.stdin, config.tty = True, True
    cid = env.run(env.pod(), config)
    url = str(env.rt.Attach(pb.AttachRequest(container_id=cid, stdin=True, stdout=True, tty=True), timeout=10).url)
    probe = pb.ExecSyncRequest(container_id=cid, cmd=["stty", "size", "-F", "/proc/1/fd/0"], timeout=10)

    async def go() -> list[bytes]:
        streams = await rc.open_exec_streams(url, stdin=True, stderr=False, tty=True)
        seen: list[bytes] = []
        try:
            for width, height in ((81, 25), (80, 24), (133, 41), (132, 40)):
                await streams.send_resize(width, height)
            end = time.monotonic() + 10
            while not seen or (seen[-1] != b"40 132\n" and time.monotonic() < end):
                await asyncio.sleep(0.1)
                seen.append((await asyncio.to_thread(env.rt.ExecSync, probe, timeout=30)).stdout)
        finally:
            await streams.close()
        return seen

    assert _run(go())[-1] == b"40 132\n"


# ---- PortForward ---------------------------------------------------------------------------------


def _http_pod(env: Env) -> str:
    pod = env.pod()
    cid = env.run(pod, web_server_config(env, "hello-through-the-tunnel"))
    probe = ["sh", "-c", "busybox wget -q -O - http://127.0.0.1:8080/index.html"]
    end = time.monotonic() + 20
    while env.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=probe, timeout=5), timeout=30).exit_code != 0:
        assert time.monotonic() < end, "httpd did not come up"
        time.sleep(0.2)
    return pod[0]


REQUEST = b"GET /index.html HTTP/1.0\r\nHost: pod\r\nConnection: close\r\n\r\n"


def test_port_forward_over_spdy_two_concurrent_connections(env: Env) -> None:
    pod_id = _http_pod(env)
    url = str(env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id, port=[8080]), timeout=10).url)

    async def go() -> list[bytes]:
        session = await rc.portforward_spdy(url)
        try:
            pairs = [await session.open(8080), await session.open(8080)]
            return list(await asyncio.gather(*(rc.http_over(data, REQUEST) for data, _ in pairs)))
        finally:
            await session.close()

    for answer in _run(go()):
        assert answer.startswith(b"HTTP/1.") and b"200" in answer.split(b"\r\n")[0], answer[:200]
        assert b"hello-through-the-tunnel" in answer


def test_port_forward_over_websocket_and_a_closed_port_reports_an_error(env: Env) -> None:
    pod_id = _http_pod(env)
    url = str(env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id, port=[8080]), timeout=10).url)

    async def go() -> bytes:
        forward = await rc.portforward_websocket(url, [8080])
        return await rc.http_over(forward.channel(0), REQUEST)

    assert b"hello-through-the-tunnel" in _run(go())

    url = str(env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id, port=[9]), timeout=10).url)

    async def refused() -> bytes:
        session = await rc.portforward_spdy(url)
        try:
            _, error = await session.open(9, close_error_stream=False)
            return await error.read_all(10)
        finally:
            await session.close()

    assert b"forwarding 9" in _run(refused())
    with pytest.raises(grpc.RpcError) as err:
        env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id="e" * 64, port=[80]), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
