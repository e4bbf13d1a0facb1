"""The CRI gRPC server on a unix socket: socket lifecycle, the choice of transport, graceful stop."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Mapping

import grpc

from cri.log import event
from cri.transport.grpcserver import GrpcServer, Limits
from cri.transport.rpc import routes, service_handler

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SOCKET_MODE = 0o660


class SocketInUse(Exception):
    pass


def _answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def prepare_socket_path(path: str) -> None:
    """Create parent dirs; replace a stale socket, refuse a live one or a non-socket."""
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    if _answers(path):
        raise SocketInUse(f"another process is already serving on {path}")
    event(log, logging.INFO, "replacing stale socket", path=path)
    os.unlink(path)


class CriServer:
    """The CRI services on the unix socket, served by criopy's own gRPC transport or by grpcio's."""

    def __init__(
        self,
        socket_path: str,
        servicers: Mapping[str, object],
        transport: str = "builtin",
        *,
        max_connections: int = 1024,
        idle_timeout: float = 300.0,
    ) -> None:
        self.socket_path = socket_path
        self.transport = transport
        self._builtin: GrpcServer | None = None
        self._grpcio: grpc.aio.Server | None = None
        if transport == "builtin":
            limits = Limits(
                max_receive_bytes=MAX_MESSAGE_BYTES,
                max_send_bytes=MAX_MESSAGE_BYTES,
                max_connections=max_connections,
                idle_timeout=idle_timeout,
            )
            self._builtin = GrpcServer(routes(servicers), limits)
        else:
            options: list[tuple[str, int]] = [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_allowed_incoming_connections", max_connections),
            ]
            if idle_timeout > 0:
                options.append(("grpc.max_connection_idle_ms", int(idle_timeout * 1000)))
            self._grpcio = grpc.aio.server(
                handlers=[service_handler(name, servicer) for name, servicer in servicers.items()],
                options=options,
            )

    async def start(self) -> None:
        prepare_socket_path(self.socket_path)
        if self._builtin is not None:
            await self._builtin.start(self.socket_path)
        else:
            assert self._grpcio is not None
            self._grpcio.add_insecure_port(f"unix://{self.socket_path}")
            await self._grpcio.start()
        os.chmod(self.socket_path, SOCKET_MODE)
        event(log, logging.INFO, "listening", socket=self.socket_path, transport=self.transport)

    async def stop(self, grace_seconds: float) -> None:
        """Stop accepting, let in-flight calls finish within the grace period, then cancel them."""
        if self._builtin is not None:
            await self._builtin.stop(grace_seconds)
        else:
            assert self._grpcio is not None
            await self._grpcio.stop(grace_seconds)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        event(log, logging.INFO, "stopped listening", socket=self.socket_path)
