"""The admin socket: image import and export done by the running daemon, the one writer of its store.

`<runroot>/admin.sock`, mode 0600, and only a peer with the daemon's own uid (or
root) is served. One request per connection, a JSON line sent with one file
descriptor attached (SCM_RIGHTS), one JSON line answered:

    {"op": "import"}                      + the archive, open for reading (file, pipe)
    {"op": "export", "refs": ["busybox"]} + where to write the tar, open for writing
    -> {"ok": true, "images": [{"id": "sha256:…", "names": ["docker.io/library/busybox:latest"]}]}
    -> {"ok": false, "error": "digest mismatch of blob sha256:…"}

Passing the descriptor, not a path, makes a file, a pipe and the CLI's stdin or
stdout the same thing, and the daemon reads only what the caller could open. A
pipe is spooled into an unnamed temp file under the root (archives need seeking).
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, BinaryIO, cast

from cri.errors import CriError, no_space_in
from cri.images.archive import ArchiveError
from cri.images.imports import ImageSummary, StoppableOutput, export_images, import_archive, source_file
from cri.images.manager import ImageManager
from cri.log import event
from cri.system import offload

log = logging.getLogger(__name__)

SOCKET_NAME = "admin.sock"
REQUEST_TIMEOUT = 10.0  # for the request line itself; the work it asks for may take long
MAX_REQUEST = 1 << 20


class AdminError(Exception):
    """The daemon refused or failed the request; the message is the daemon's."""


def socket_path(runroot: str) -> Path:
    return Path(runroot) / SOCKET_NAME


class AdminServer:
    def __init__(self, path: Path, images: ImageManager, spool_dir: Path) -> None:
        self.path = path
        self._images = images
        self._spool_dir = spool_dir
        self._sock: socket.socket | None = None
        self._task: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)  # the daemon lock is held: a socket left here is a dead daemon's
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)  # never a moment with a wider mode
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o600)
        sock.listen(8)
        sock.setblocking(False)
        self._sock = sock
        self._task = asyncio.create_task(self._accept_loop(), name="admin-accept")
        event(log, logging.INFO, "admin socket listening", path=str(self.path))

    async def close(self) -> None:
        tasks = [t for t in [self._task, *self._clients] if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            self.path.unlink(missing_ok=True)

    async def _accept_loop(self) -> None:
        assert self._sock is not None
        loop = asyncio.get_running_loop()
        while True:
            conn, _addr = await loop.sock_accept(self._sock)
            task = asyncio.create_task(self._serve(conn), name="admin-request")
            self._clients.add(task)
            task.add_done_callback(self._clients.discard)

    async def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(True)
            try:
                _check_peer(conn)
                request, fds = await offload.to_thread(_receive, conn)
            except (OSError, ValueError, AdminError) as exc:
                event(log, logging.WARNING, "admin request refused", error=str(exc))
                with contextlib.suppress(OSError):
                    await offload.to_thread(_send, conn, {"ok": False, "error": str(exc)})
                return
            try:
                reply = await self._answer(request, fds)
            finally:
                for fd in fds:
                    os.close(fd)
            with contextlib.suppress(OSError):  # a client that went away has nobody to read the answer
                await offload.to_thread(_send, conn, reply)

    async def _answer(self, request: dict[str, Any], fds: list[int]) -> dict[str, Any]:
        op = request.get("op")
        started = time.monotonic()
        try:
            if len(fds) != 1:
                raise AdminError(f"request {op!r} needs exactly one file descriptor, got {len(fds)}")
            images = await self._run(op, request, fds[0])
        except (ArchiveError, CriError, AdminError) as exc:
            return {"ok": False, "error": str(exc)}
        except OSError as exc:  # reading the caller's file or pipe, writing its output
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        except Exception as exc:  # a bug: the caller still gets an answer, the log the whole story
            log.error("admin request failed", exc_info=exc, extra={"fields": {"op": op}})
            return {"ok": False, "error": f"internal error: {type(exc).__name__}: {exc}"}
        event(
            log,
            logging.INFO,
            "admin request done",
            op=op,
            images=len(images),
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return {"ok": True, "images": [asdict(image) for image in images]}

    async def _run(self, op: Any, request: dict[str, Any], fd: int) -> list[ImageSummary]:
        if op == "import":
            return await run_import(self._images, fd, self._spool_dir)
        if op == "export":
            refs = request.get("refs")
            if not isinstance(refs, list) or not refs or not all(isinstance(r, str) for r in refs):
                raise AdminError("export needs refs, a non-empty list of image names or IDs")
            return await run_export(self._images, refs, fd)
        raise AdminError(f"unknown op {op!r} (import or export)")


async def run_import(images: ImageManager, fd: int, spool_dir: Path) -> list[ImageSummary]:
    """Import the archive readable on `fd` (the daemon's way and the CLI's own, when no daemon runs)."""
    stop = threading.Event()
    try:
        with no_space_in(spool_dir, "spooling an image archive"):
            source = await offload.to_thread(source_file, fd, spool_dir, stop)
    except asyncio.CancelledError:
        stop.set()  # the thread would wait for the pipe's writer, and the daemon's stop for the thread
        raise
    with source:
        return await import_archive(images, source)


async def run_export(images: ImageManager, refs: list[str], fd: int) -> list[ImageSummary]:
    stop = threading.Event()
    out = StoppableOutput(fd, stop)
    try:
        return await export_images(images, refs, cast(BinaryIO, out))  # write() is all tarfile uses
    except asyncio.CancelledError:
        stop.set()  # the thread would wait for the pipe's reader, and the daemon's stop for the thread
        raise
    finally:
        out.close()


def _check_peer(conn: socket.socket) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    if uid not in (0, os.geteuid()):
        raise AdminError(f"uid {uid} may not use the admin socket")


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    conn.settimeout(REQUEST_TIMEOUT)
    fds: list[int] = []
    data = b""
    try:
        while not data.endswith(b"\n"):
            chunk, received, _flags, _addr = socket.recv_fds(conn, 65536, 4)
            fds.extend(received)
            if not chunk:
                raise AdminError("the request ended before its newline")
            data += chunk
            if len(data) > MAX_REQUEST:
                raise AdminError("the request is too long")
        request = json.loads(data)
        if not isinstance(request, dict):
            raise AdminError("the request is not a JSON object")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    finally:
        conn.settimeout(None)
    return request, fds


def _send(conn: socket.socket, reply: dict[str, Any]) -> None:
    conn.sendall(json.dumps(reply).encode() + b"\n")


# ---- the client (the CLI) ------------------------------------------------------------------


def request(path: Path, message: dict[str, Any], fd: int, timeout: float | None = None) -> list[ImageSummary]:
    """Send one request with `fd` attached and wait for the answer; AdminError when it failed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        fds = array.array("i", [fd])
        sock.sendmsg([json.dumps(message).encode() + b"\n"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise AdminError(f"the daemon closed {path} without an answer (did it stop?)")
            answer += chunk
    reply = json.loads(answer)
    if not reply.get("ok"):
        raise AdminError(str(reply.get("error") or "the daemon gave no reason"))
    return [ImageSummary(str(i["id"]), [str(n) for n in i["names"]]) for i in reply.get("images", [])]


def connect_when_ready(path: Path, attempt: Callable[[], list[ImageSummary]], wait: float) -> list[ImageSummary]:
    """Retry `attempt` while the socket is not there yet (a daemon still starting holds the lock already)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            return attempt()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            if time.monotonic() >= deadline:
                raise AdminError(
                    f"a daemon holds the store but does not answer on its admin socket {path}: {exc.strerror}"
                ) from exc
            time.sleep(0.2)
