"""Port-forward as SPDY tunnelled through a WebSocket, the way client-go's tunneling dialer does it.

Facts this follows (client-go tools/portforward tunneling_dialer.go and
tunneling_connection.go; apimachinery pkg/util/portforward constants.go;
apiserver pkg/util/proxy/streamtunnel.go, the serving side):

- The upgrade is a WebSocket GET whose subprotocols are the SPDY protocols,
  each behind the prefix ``SPDY/3.1+`` (``SPDY/3.1+portforward.k8s.io``); no
  ``?ports=``: the ports travel in the SPDY streams' headers. The server
  answers with the prefixed protocol it chose, and the client strips the
  prefix to learn the port-forward protocol.
- After the upgrade the WebSocket is a net.Conn (``TunnelingConnection``):
  each Write is one binary message; a Read takes bytes out of binary messages
  with no regard for their boundaries; a text message is an error ("invalid
  message type received"); a CLOSE with 1000 is the end of the stream. Close
  sends CLOSE(1000) and drops the connection.
- Over it runs an ordinary spdystream client session. spdystream's framer
  writes straight to the conn, field by field, so one SPDY frame usually
  travels as several small messages: a server must reassemble across them.

Here the SPDY client of ``tests.streamclients.spdy`` runs on one end of a
local socket pair and a bridge copies the other end to and from the
WebSocket; ``message_sizes`` cuts what it sends into messages of those sizes
in turn, to take frames apart at arbitrary points.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import socket
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from tests.streamclients import DEFAULT_TIMEOUT, ProtocolError, websocket
from tests.streamclients.remotecommand import PORT_FORWARD_V1, PortForwardSession
from tests.streamclients.spdy import SessionOptions, SpdyClient
from tests.streamclients.websocket import BINARY, WsClient

__all__ = ["TUNNEL_PREFIX", "TunnelBridge", "TunnelledPortForward", "portforward_tunnel"]

TUNNEL_PREFIX = "SPDY/3.1+"
READ_SIZE = 64 * 1024


class TunnelBridge:
    """Copies between a socket (the SPDY client's conn) and a WebSocket's binary messages, both ways."""

    def __init__(self, ws: WsClient, sock: socket.socket, message_sizes: Sequence[int] | None) -> None:
        self.ws = ws
        self._sock = sock
        self._sizes: Iterator[int] | None = itertools.cycle(message_sizes) if message_sizes else None
        self._tasks: list[asyncio.Task[None]] = []
        self.messages_sent = 0
        self.messages_received = 0
        self.error: str | None = None  # what broke the tunnel, for failure messages

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._upward(), name="tunnel-up"),
            asyncio.create_task(self._downward(), name="tunnel-down"),
        ]

    def _pieces(self, data: bytes) -> Iterator[bytes]:
        if self._sizes is None:
            yield data
            return
        start = 0
        while start < len(data):
            size = next(self._sizes)
            yield data[start : start + size]
            start += size

    async def _upward(self) -> None:
        """SPDY bytes to binary messages; the client's close of its conn sends CLOSE(1000), as Close() does."""
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(self._sock, READ_SIZE):
                for piece in self._pieces(data):
                    await self.ws.send_binary(piece)
                    self.messages_sent += 1
        except (ConnectionError, TimeoutError) as exc:
            self.error = self.error or f"sending: {exc}"
        await self.ws.send_close()

    async def _downward(self) -> None:
        """Binary messages to SPDY bytes; the server's CLOSE or EOF ends the client's conn (its read sees EOF)."""
        loop = asyncio.get_running_loop()
        try:
            while (message := await self.ws.recv_message(math.inf)) is not None:
                opcode, payload = message
                if opcode != BINARY:
                    raise ProtocolError(f"message of opcode {opcode} in the tunnel: only binary ones carry SPDY")
                self.messages_received += 1
                await loop.sock_sendall(self._sock, payload)
        except (ProtocolError, ConnectionError, OSError) as exc:
            self.error = self.error or f"receiving: {exc}"
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    async def close(self, timeout: float) -> None:
        """Wait for both directions to end (the SPDY client closed first), then drop what is left."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*self._tasks, return_exceptions=True), timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.ws.abort()
        self._sock.close()


@dataclass
class TunnelledPortForward(PortForwardSession):
    """A PortForwardSession whose SPDY connection is tunnelled in a WebSocket; `bridge` counts the messages."""

    bridge: TunnelBridge | None = field(default=None, kw_only=True)

    async def close(self) -> None:
        await super().close()
        if self.bridge is not None:
            await self.bridge.close(self.timeout)

    def abort(self, *, rst: bool = False) -> None:
        super().abort(rst=rst)
        if self.bridge is not None:
            self.bridge.ws.abort(rst=rst)


async def portforward_tunnel(
    url: str,
    *,
    protocols: Sequence[str] = (PORT_FORWARD_V1,),
    message_sizes: Sequence[int] | None = None,
    ssl_context: ssl.SSLContext | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    options: SessionOptions | None = None,
) -> TunnelledPortForward:
    """Upgrade url to a WebSocket tunnelling SPDY and start a port-forward session in it.

    UpgradeRefused when the server will not tunnel; `protocol` of the result is the chosen one, prefix stripped.
    """
    offered = [TUNNEL_PREFIX + p for p in protocols]
    ws, chosen = await websocket.connect(url, offered, ssl_context=ssl_context, timeout=timeout)
    if not chosen.startswith(TUNNEL_PREFIX):
        ws.abort()
        raise ProtocolError(f"asked to tunnel SPDY ({offered}), the server chose {chosen!r}")
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    bridge = TunnelBridge(ws, theirs, message_sizes)
    bridge.start()
    reader, writer = await asyncio.open_connection(sock=ours)
    client = SpdyClient(reader, writer, options, timeout=timeout)
    client.start()
    return TunnelledPortForward(client, chosen.removeprefix(TUNNEL_PREFIX), timeout, bridge=bridge)
