"""Exec, attach and port-forward: ExecSync runs here, the others hand out a streaming URL."""

from __future__ import annotations

from api.runtime.v1 import api_pb2 as pb
from cri.containers.execs import check_command
from cri.errors import FailedPrecondition, InvalidArgument
from cri.services.parts import RuntimeParts
from cri.streaming.requests import AttachRequest, ExecRequest, PortForwardRequest
from podsandbox.sandbox import SandboxState


def _check_stdio(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    """The CRI's rules for the streams of Exec and Attach."""
    if not (stdin or stdout or stderr):
        raise InvalidArgument("stdin/stdout/stderr", "at least one of stdin, stdout and stderr must be requested")
    if tty and stderr:
        raise InvalidArgument("stderr", "must be false with tty: a terminal has one output stream")


class StreamRpcs(RuntimeParts):
    async def ExecSync(self, request: pb.ExecSyncRequest) -> pb.ExecSyncResponse:
        result = await self._execs.run_sync(request.container_id, request.cmd, request.timeout)
        return pb.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)

    async def Exec(self, request: pb.ExecRequest) -> pb.ExecResponse:
        _check_stdio(request.tty, request.stdin, request.stdout, request.stderr)
        cmd = check_command(request.cmd)
        container = self._containers.running(request.container_id)
        target = ExecRequest(container.id, tuple(cmd), request.tty, request.stdin, request.stdout, request.stderr)
        return pb.ExecResponse(url=self._streaming.url("exec", target))

    async def Attach(self, request: pb.AttachRequest) -> pb.AttachResponse:
        _check_stdio(request.tty, request.stdin, request.stdout, request.stderr)
        container = self._containers.running(request.container_id)
        if request.tty and not container.config.tty:
            raise InvalidArgument("tty", f"container {container.id} was not created with a TTY")
        target = AttachRequest(container.id, request.tty, request.stdin, request.stdout, request.stderr)
        return pb.AttachResponse(url=self._streaming.url("attach", target))

    async def PortForward(self, request: pb.PortForwardRequest) -> pb.PortForwardResponse:
        for port in request.port:
            if not 0 < port < 65536:
                raise InvalidArgument("port", f"{port} is not a TCP port")
        sandbox = self._sandboxes.get(request.pod_sandbox_id)
        if sandbox.state is not SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        target = PortForwardRequest(sandbox.id, sandbox.pins.get("net", ""), tuple(request.port))
        return pb.PortForwardResponse(url=self._streaming.url("portforward", target))
