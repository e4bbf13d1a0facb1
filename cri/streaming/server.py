"""The streaming server: the URLs Exec, Attach and PortForward return, served over SPDY/3.1 or WebSocket.

`GET|POST /{exec,attach,portforward}/<token>` with `Upgrade: SPDY/3.1`
(protocol versions in `X-Stream-Protocol-Version`) or `Upgrade: websocket`
(in `Sec-WebSocket-Protocol`). Port-forward also takes a WebSocket that tunnels
SPDY (`SPDY/3.1+portforward.k8s.io`, cri.streaming.tunnel), kubectl's default.
A token is good for one connection, before it expires. A connection with no
traffic for `idle_timeout` seconds is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator
from http import HTTPStatus

from cri.config import StreamingConfig
from cri.containers.execs import Execs
from cri.containers.manager import ContainerManager
from cri.errors import CriError
from cri.log import event
from cri.streaming import remotecommand as rc
from cri.streaming import sessions, tunnel
from cri.streaming.http import BadRequest, RequestHead, read_head, response, switching
from cri.streaming.requests import AttachRequest, ExecRequest, PortForwardRequest, Request, TokenCache
from cri.streaming.spdy import SpdySession
from cri.streaming.websocket import WebSocket

log = logging.getLogger(__name__)

PORTFORWARD_SPDY = ("portforward.k8s.io",)
PORTFORWARD_WEBSOCKET = (rc.V4, rc.BASE64_V4, *tunnel.tunnelled(PORTFORWARD_SPDY))
# How long a TTY exec waits for the client's terminal size before it starts without one. client-go sends it as
# soon as the streams are up, so this bounds only clients that never do.
FIRST_SIZE_WAIT = 0.5
KINDS = {"exec": ExecRequest, "attach": AttachRequest, "portforward": PortForwardRequest}
Transport = SpdySession | WebSocket


class StreamingServer:
    def __init__(self, config: StreamingConfig, execs: Execs, containers: ContainerManager) -> None:
        self._config = config
        self._execs = execs
        self._containers = containers
        self._tokens = TokenCache()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.base_url = ""

    async def start(self) -> None:
        context = None
        if self._config.tls_cert:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(self._config.tls_cert, self._config.tls_key)
        self._server = await asyncio.start_server(
            self._on_connection, self._config.address, self._config.port, ssl=context
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        host = f"[{host}]" if ":" in host else host
        self.base_url = f"{'https' if context else 'http'}://{host}:{port}"
        event(log, logging.INFO, "streaming server listening", url=self.base_url)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    def url(self, kind: str, request: Request) -> str:
        token = self._tokens.insert(request, float(self._config.token_ttl))
        return f"{self.base_url}/{kind}/{token}"

    def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await read_head(reader)
            await self._dispatch(head, reader, writer)
        except BadRequest as exc:
            await _answer(writer, HTTPStatus.BAD_REQUEST, str(exc))
        except (ConnectionError, TimeoutError, asyncio.IncompleteReadError) as exc:
            event(log, logging.DEBUG, "streaming connection ended", error=str(exc))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, ssl.SSLError):
                await writer.wait_closed()

    async def _dispatch(self, head: RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parts = head.path.strip("/").split("/")
        kind = parts[0] if len(parts) == 2 else ""
        if kind not in KINDS:
            await _answer(writer, HTTPStatus.NOT_FOUND, f"no such streaming endpoint: {head.path}")
            return
        request = self._tokens.consume(parts[1])
        if not isinstance(request, KINDS[kind]):
            await _answer(writer, HTTPStatus.NOT_FOUND, "unknown, used or expired streaming token")
            return
        upgrade = head.upgrade()
        if upgrade not in ("websocket", "spdy/3.1"):
            await _answer(writer, HTTPStatus.BAD_REQUEST, "expected an Upgrade to SPDY/3.1 or websocket")
            return
        if isinstance(request, PortForwardRequest):
            await self._portforward(request, head, reader, writer)
        elif request is not None:
            await self._command(request, head, reader, writer)

    async def _upgrade(
        self,
        head: RequestHead,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        spdy: tuple[str, ...],
        websocket: tuple[str, ...],
    ) -> tuple[Transport, str] | None:
        """Negotiate a protocol and switch; None when no protocol matched (refused with 403)."""
        is_websocket = head.upgrade() == "websocket"
        offered = head.values("sec-websocket-protocol" if is_websocket else "x-stream-protocol-version")
        protocol = rc.negotiate(offered, websocket if is_websocket else spdy)
        if protocol is None:
            supported = ", ".join(websocket if is_websocket else spdy)
            await _answer(
                writer,
                HTTPStatus.FORBIDDEN,
                "unable to upgrade: unable to negotiate protocol: "
                f"client supports {offered}, server supports [{supported}]",
            )
            return None
        if is_websocket:
            socket_ = WebSocket(reader, writer, text="base64" in protocol)
            await socket_.accept(head.raw, protocol or None)
            return socket_, protocol
        headers = {"Connection": "Upgrade", "Upgrade": "SPDY/3.1"}
        if protocol:
            headers["X-Stream-Protocol-Version"] = protocol
        writer.write(switching(headers))
        await writer.drain()
        return SpdySession(reader, writer), protocol

    async def _command(
        self,
        request: ExecRequest | AttachRequest,
        head: RequestHead,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        upgraded = await self._upgrade(head, reader, writer, rc.SPDY_PROTOCOLS, rc.WEBSOCKET_PROTOCOLS)
        if upgraded is None:
            return
        transport, protocol = upgraded
        wanted = rc.Wanted(request.stdin, request.stdout, request.stderr, request.tty)
        async with self._serving(transport) as served:
            if isinstance(transport, SpdySession):
                streams = await rc.spdy_streams(transport, served, protocol, wanted)
            else:
                streams = rc.websocket_streams(transport, served, protocol, wanted)
            if isinstance(request, ExecRequest):
                await self._exec(request, streams)
            else:
                await self._attach(request, streams)

    @contextlib.asynccontextmanager
    async def _serving(self, transport: Transport) -> AsyncIterator[asyncio.Task[None]]:
        """The transport's read loop (the task that ends when the client goes away) and its idle watch."""
        served = asyncio.ensure_future(transport.serve())
        watchdog = asyncio.ensure_future(self._idle_watch(transport))
        try:
            yield served
        finally:
            watchdog.cancel()
            await transport.close()
            served.cancel()
            await asyncio.gather(served, watchdog, return_exceptions=True)

    async def _exec(self, request: ExecRequest, streams: rc.CommandStreams) -> None:
        sizes = rc.TerminalSizes(streams.resize) if streams.resize is not None else None
        size = await sizes.first(FIRST_SIZE_WAIT) if sizes is not None and request.tty else None
        try:
            process = await self._execs.start(
                request.container_id,
                request.cmd,
                tty=request.tty,
                stdin=request.stdin,
                stdout=request.stdout,
                stderr=request.stderr,
                console_size=size,
            )
        except CriError as exc:
            if sizes is not None:
                sizes.close()
            await streams.finish(None, str(exc))
            return
        await sessions.serve_exec(streams, process, sizes)
        event(log, logging.INFO, "streaming exec ended", id=request.container_id, pid=process.pid)

    async def _attach(self, request: AttachRequest, streams: rc.CommandStreams) -> None:
        try:
            container = self._containers.running(request.container_id)
        except CriError as exc:
            await streams.finish(None, str(exc))
            return
        paths = self._containers.attach_paths(container)
        await sessions.serve_attach(streams, paths[0], paths[1], container.config.stdin_once)

    async def _portforward(
        self, request: PortForwardRequest, head: RequestHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        upgraded = await self._upgrade(head, reader, writer, PORTFORWARD_SPDY, PORTFORWARD_WEBSOCKET)
        if upgraded is None:
            return
        transport, protocol = upgraded
        if isinstance(transport, WebSocket) and tunnel.is_tunnel(protocol):
            await self._portforward_tunnelled(transport, request.netns)
            return
        async with self._serving(transport) as served:
            if isinstance(transport, SpdySession):
                await sessions.serve_portforward_spdy(transport, request.netns)
            else:
                ports = list(request.ports) or _query_ports(head)
                await sessions.serve_portforward_websocket(transport, served, request.netns, ports)

    async def _portforward_tunnelled(self, socket_: WebSocket, netns_path: str) -> None:
        """SPDY inside the WebSocket: the socket's read loop feeds a SPDY session, served as a plain SPDY one is."""
        session = tunnel.spdy_session(socket_)
        carrying = asyncio.ensure_future(socket_.serve())
        try:
            async with self._serving(session):
                await sessions.serve_portforward_spdy(session, netns_path)
        finally:
            # The session's close ended the connection and with it, normally, the read loop; cancelling makes sure
            # that no task outlives the request.
            carrying.cancel()
            await asyncio.gather(carrying, return_exceptions=True)

    async def _idle_watch(self, transport: Transport) -> None:
        limit = float(self._config.idle_timeout)
        if limit <= 0:
            return
        while True:
            idle = time.monotonic() - transport.last_activity
            if idle >= limit:
                event(log, logging.INFO, "closing idle stream", idle_seconds=round(idle))
                await transport.close()
                return
            await asyncio.sleep(min(limit - idle, 30.0) + 0.01)


def _query_ports(head: RequestHead) -> list[int]:
    ports = []
    for value in head.query.get("ports", []):
        for item in value.split(","):
            with contextlib.suppress(ValueError):
                ports.append(int(item))
    return ports


async def _answer(writer: asyncio.StreamWriter, status: HTTPStatus, body: str) -> None:
    with contextlib.suppress(ConnectionError):
        writer.write(response(status, body + "\n"))
        await writer.drain()
