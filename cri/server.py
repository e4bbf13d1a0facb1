"""The CRI gRPC server on a unix socket: socket lifecycle and graceful stop."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Sequence

import grpc

from cri.log import event

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
    def __init__(self, socket_path: str, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.socket_path = socket_path
        self._server = grpc.aio.server(
            handlers=list(handlers),
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )

    async def start(self) -> None:
        prepare_socket_path(self.socket_path)
        self._server.add_insecure_port(f"unix://{self.socket_path}")
        await self._server.start()
        os.chmod(self.socket_path, SOCKET_MODE)
        event(log, logging.INFO, "listening", socket=self.socket_path)

    async def stop(self, grace_seconds: float) -> None:
        """Stop accepting, let in-flight calls finish within the grace period, then cancel them."""
        await self._server.stop(grace_seconds)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)
        event(log, logging.INFO, "stopped listening", socket=self.socket_path)
