"""criopy's gRPC transport answering Version and nothing else: the floor under Version's p99 on a loaded machine.

    python -m bench.version_floor_server SOCKET    (prints "ready", serves until its stdin closes)

The bursts benchmark probes it beside the runtime it loads (bench/version_probe, a second probe process): the
same transport, on an event loop raised as criopy raises its own (nice -5), with no other work in the process.
What a probe measures against it is what the loaded machine, the probe and the transport cost by
themselves; what a runtime's p99 has above it is the runtime's own work (its loop busy, its threads' GIL).
"""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys

from api.runtime.v1 import api_pb2 as pb
from cri import __version__
from cri.daemon.serve import LOOP_NICE
from cri.services.runtime_info import CRI_API_VERSION, KUBELET_API_VERSION, RUNTIME_NAME
from cri.system import linux
from cri.transport.server import CriServer


class OnlyVersion:
    """A RuntimeService of one method (the rest answer UNIMPLEMENTED), giving criopy's own answer."""

    async def Version(self, request: pb.VersionRequest) -> pb.VersionResponse:
        return pb.VersionResponse(
            version=KUBELET_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=CRI_API_VERSION,
        )


class _Stdin(asyncio.Protocol):
    def __init__(self, closed: asyncio.Future[None]) -> None:
        self._closed = closed

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed.set_result(None)


async def serve(socket: str) -> None:
    loop = asyncio.get_running_loop()
    server = CriServer(socket, {"RuntimeService": OnlyVersion()})
    gc.freeze()  # as criopy does before it serves
    await server.start()
    closed: asyncio.Future[None] = loop.create_future()
    await loop.connect_read_pipe(lambda: _Stdin(closed), sys.stdin)
    print("ready", flush=True)
    try:
        await closed
    finally:
        await server.stop(1.0)


class FloorServer:
    """The server in a process of its own, on `socket`, until stop()."""

    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.version_floor_server", socket], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError(f"the Version floor server on {socket} did not start")

    def __enter__(self) -> FloorServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        try:
            self.proc.communicate(b"", timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def main() -> None:
    linux.raise_this_thread(LOOP_NICE)
    asyncio.run(serve(sys.argv[1]))


if __name__ == "__main__":
    main()
