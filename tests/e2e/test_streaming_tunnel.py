"""Port-forward with SPDY tunnelled through a WebSocket (subprotocol `SPDY/3.1+portforward.k8s.io`).

This is how kubectl port-forward connects by default since 1.31 (client-go's tunneling dialer); a server that
refuses it costs every port-forward a failed upgrade and a fallback to plain SPDY. The client here is
tests/streamclients/tunnel.py: client-go's SPDY session run over the WebSocket used as a byte stream, its frames
cut into messages of odd sizes as spdystream's field-by-field writes cut them.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable
from typing import TypeVar

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import Env
from tests.e2e.streams import web_server_config
from tests.streamclients.remotecommand import http_over
from tests.streamclients.tunnel import portforward_tunnel

T = TypeVar("T")
REQUEST = b"GET /index.html HTTP/1.0\r\nHost: pod\r\nConnection: close\r\n\r\n"
PAGE = "hello-through-spdy-in-websocket"
# Cut the client's SPDY bytes into messages of these sizes in turn: every frame header is taken apart.
ODD_SIZES = (1, 7, 2, 300, 3, 5)


def _run(coro: Awaitable[T]) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, 60)

    return asyncio.run(bounded())


def _http_pod(env: Env) -> str:
    """A pod (own network namespace) whose busybox httpd answers on its localhost:8080."""
    pod = env.pod()
    cid = env.run(pod, web_server_config(env, PAGE))
    probe = ["sh", "-c", "busybox wget -q -O - http://127.0.0.1:8080/index.html"]
    end = time.monotonic() + 20
    while env.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=probe, timeout=5), timeout=30).exit_code != 0:
        assert time.monotonic() < end, "httpd did not come up"
        time.sleep(0.2)
    return pod[0]


def _url(env: Env, pod_id: str, ports: list[int]) -> str:
    return str(env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod_id, port=ports), timeout=10).url)


def test_port_forward_tunnelled_in_websocket_reaches_the_pods_server(env: Env) -> None:
    pod_id = _http_pod(env)
    url = _url(env, pod_id, [8080])

    async def go() -> tuple[list[bytes], int]:
        forward = await portforward_tunnel(url, message_sizes=ODD_SIZES)
        try:
            assert forward.protocol == "portforward.k8s.io"
            pairs = [await forward.open(8080), await forward.open(8080)]
            answers = await asyncio.gather(*(http_over(data, REQUEST) for data, _ in pairs))
            assert forward.bridge is not None
            return list(answers), forward.bridge.messages_received
        finally:
            await forward.close()

    answers, received = _run(go())
    for answer in answers:
        assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0], answer[:200]
        assert PAGE.encode() in answer
    assert received > 0  # the answers came back as binary messages of the tunnel

    # A port nobody listens on: the error stream says so, through the tunnel as well.
    url = _url(env, pod_id, [9])

    async def refused() -> bytes:
        forward = await portforward_tunnel(url)
        try:
            _, error = await forward.open(9, close_error_stream=False)
            return await error.read_all(10)
        finally:
            await forward.close()

    assert b"forwarding 9" in _run(refused())


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Everything until the client's end of input, back behind "echo: ", then the end of the connection."""
    received = await reader.read()
    writer.write(b"echo: " + received)
    await writer.drain()
    writer.close()


def test_port_forward_tunnelled_in_websocket_on_the_host_network(env: Env) -> None:
    pod_id = env.pod(host_network=True)[0]
    payload = os.urandom(1_500_000)  # many SPDY windows' worth, both ways

    async def go() -> bytes:
        # A host-network pod's localhost is the host's: a server of this test on 127.0.0.1 is what it reaches.
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        url = await asyncio.to_thread(_url, env, pod_id, [port])
        async with server:
            forward = await portforward_tunnel(url)
            try:
                data, _ = await forward.open(port)
                await data.write(payload)
                await data.close()  # the server's end of input: it answers and closes
                return await data.read_all(30)
            finally:
                await forward.close()

    answer = _run(go())
    assert answer[:6] == b"echo: " and answer[6:] == payload, (len(answer), answer[:20])
