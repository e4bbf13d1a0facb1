"""One client session each: exec, attach and port-forward, once their streams are in place."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from cri.log import event
from cri.oci import conmon_ctl
from cri.oci.exec import DRAIN_GRACE, ExecProcess
from cri.streaming import netns
from cri.streaming.pumps import Pty, pump, stream_reader, stream_writer
from cri.streaming.remotecommand import CommandStreams, Inbound, TerminalSizes, resizes
from cri.streaming.spdy import SpdySession, SpdyStream
from cri.streaming.websocket import WebSocket

log = logging.getLogger(__name__)

# conmon's attach socket: packets of one pipe byte and the data (cri-o's AttachPipeStdout / Stderr).
ATTACH_PIPE_STDOUT = 2
ATTACH_PIPE_STDERR = 3
ATTACH_PACKET = 8192 + 1


async def _run(
    streams: CommandStreams,
    outputs: list[Coroutine[Any, Any, None]],
    inputs: list[Coroutine[Any, Any, None]],
    ended: Awaitable[int],
    stop: Callable[[], Awaitable[None]],
) -> None:
    """Pump until `ended` (then drain the output and report) or the client goes away (then `stop`)."""
    out_tasks = [asyncio.ensure_future(c) for c in outputs]
    in_tasks = [asyncio.ensure_future(c) for c in inputs]
    end = asyncio.ensure_future(ended)
    gone = asyncio.ensure_future(streams.gone)
    try:
        await asyncio.wait({end, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not end.done():
            await stop()
            return
        code = end.result()
        if out_tasks:
            await asyncio.wait(out_tasks, timeout=DRAIN_GRACE)
        await streams.finish(code)
    finally:
        for task in [*out_tasks, *in_tasks, end]:
            task.cancel()
        await asyncio.gather(*out_tasks, *in_tasks, end, return_exceptions=True)


async def serve_exec(streams: CommandStreams, process: ExecProcess, sizes: TerminalSizes | None) -> None:
    outputs: list[Coroutine[Any, Any, None]] = []
    inputs: list[Coroutine[Any, Any, None]] = []
    if process.pty >= 0:
        pty = Pty(process.pty)
        if streams.stdout is not None:
            outputs.append(pump(pty.read, streams.stdout.write))
        if streams.stdin is not None:
            inputs.append(pump(streams.stdin.read, pty.write))
    else:
        for source, sink in ((process.stdout, streams.stdout), (process.stderr, streams.stderr)):
            if source is not None and sink is not None:
                outputs.append(pump(stream_reader(source), sink.write))
        if streams.stdin is not None and process.stdin is not None:
            write, close = stream_writer(process.stdin)
            inputs.append(pump(streams.stdin.read, write, close))
    if sizes is not None:
        inputs.append(sizes.follow(process.resize))
    try:
        await _run(streams, outputs, inputs, process.wait(), process.kill)
    finally:
        process.close()


async def serve_attach(streams: CommandStreams, attach_socket: str, bundle: str, stdin_once: bool) -> None:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.setblocking(False)
    try:
        await _connect_long_path(loop, sock, attach_socket)
    except OSError as exc:
        sock.close()
        await streams.finish(None, f"cannot attach: {attach_socket}: {exc.strerror or exc}")
        return

    async def output() -> int:
        while packet := await loop.sock_recv(sock, ATTACH_PACKET):
            sink = streams.stderr if packet[0] == ATTACH_PIPE_STDERR else streams.stdout
            if sink is not None and len(packet) > 1:
                with contextlib.suppress(ConnectionError):
                    await sink.write(packet[1:])
        return 0

    async def send(data: bytes) -> None:
        await loop.sock_sendall(sock, data)

    async def end_input() -> None:
        if stdin_once:
            sock.shutdown(socket.SHUT_WR)

    inputs: list[Coroutine[Any, Any, None]] = []
    if streams.stdin is not None:
        inputs.append(pump(streams.stdin.read, send, end_input))
    if streams.resize is not None:
        inputs.append(_resize_attached(streams.resize, bundle))

    async def detach() -> None:
        sock.close()

    try:
        await _run(streams, [], inputs, output(), detach)
    finally:
        sock.close()


async def _connect_long_path(loop: asyncio.AbstractEventLoop, sock: socket.socket, path: str) -> None:
    """connect() to a unix socket whose path may pass the 107-byte limit: through its directory's fd, as cri-o."""
    directory = os.open(os.path.dirname(path), os.O_PATH | os.O_CLOEXEC)
    try:
        await loop.sock_connect(sock, f"/proc/self/fd/{directory}/{os.path.basename(path)}")
    finally:
        os.close(directory)


async def _resize_attached(inbound: Inbound, bundle: str) -> None:
    async for width, height in resizes(inbound):
        with contextlib.suppress(OSError):  # conmon gone: the session ends with the container
            await conmon_ctl.send(bundle, conmon_ctl.RESIZE, height, width)


# ---- port forward -------------------------------------------------------------------------------


async def _relay(netns_path: str, port: int, data_read: Callable[[], Awaitable[bytes]], data: Any, error: Any) -> None:
    """One forwarded connection: dial localhost:port in the pod, copy both ways until both sides end."""
    try:
        reader, writer = await netns.dial(netns_path, port)
    except OSError as exc:
        message = f"an error occurred forwarding {port} -> {port}: {exc}"
        event(log, logging.INFO, "port forward failed", port=port, error=str(exc))
        with contextlib.suppress(ConnectionError):
            await error.write(message.encode())
            await error.close()
        return
    write, _ = stream_writer(writer)

    async def half_close() -> None:
        if writer.can_write_eof():
            writer.write_eof()

    # The client's end of its input only half-closes the pod side; the pod's end of its output ends the relay
    # (a WebSocket channel has no end of its own, so waiting for both would never finish there).
    inbound = asyncio.ensure_future(pump(data_read, write, half_close))
    try:
        await pump(stream_reader(reader), data.write, data.close)
    finally:
        inbound.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await inbound
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await error.close()


async def serve_portforward_spdy(session: SpdySession, netns_path: str) -> None:
    pairs: dict[str, dict[str, SpdyStream]] = {}
    relays: set[asyncio.Task[None]] = set()
    try:
        while (stream := await session.accept()) is not None:
            kind = stream.headers.get("streamtype", "")
            request_id = stream.headers.get("requestid", "")
            try:
                port = int(stream.headers.get("port", ""))
            except ValueError:
                stream.reset()
                continue
            if kind not in ("data", "error"):
                stream.reset()
                continue
            pair = pairs.setdefault(request_id, {})
            pair[kind] = stream
            if len(pair) == 2:
                del pairs[request_id]
                task = asyncio.ensure_future(_relay(netns_path, port, pair["data"].read, pair["data"], pair["error"]))
                relays.add(task)
                task.add_done_callback(relays.discard)
    finally:
        for task in relays:
            task.cancel()
        await asyncio.gather(*relays, return_exceptions=True)


async def serve_portforward_websocket(
    socket_: WebSocket, served: asyncio.Task[None], netns_path: str, ports: list[int]
) -> None:
    relays = []
    for index, port in enumerate(ports):
        data_channel, error_channel = 2 * index, 2 * index + 1
        inbound = socket_.inbound(data_channel)
        prefix = struct.pack("<H", port)
        await socket_.send(data_channel, prefix)
        await socket_.send(error_channel, prefix)
        relays.append(
            _relay(netns_path, port, inbound.read, socket_.outbound(data_channel), socket_.outbound(error_channel))
        )
    work: asyncio.Future[list[None]] = asyncio.ensure_future(asyncio.gather(*relays))
    watched: list[asyncio.Future[Any]] = [work, served]
    try:
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    finally:
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await work
