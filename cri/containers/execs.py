"""Commands run in running containers: ExecSync, and the processes behind streaming Exec."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence

from cri.containers.manager import ContainerManager
from cri.errors import DeadlineExceeded, Internal, InvalidArgument
from cri.log import event
from cri.oci import exec as oci_exec
from cri.oci.conmon import OciRuntimeError

log = logging.getLogger(__name__)


def check_command(cmd: Sequence[str]) -> list[str]:
    if not cmd or not cmd[0]:
        raise InvalidArgument("cmd", "must name a command to run")
    for i, arg in enumerate(cmd):
        if "\x00" in arg:
            raise InvalidArgument(f"cmd[{i}]", f"{arg!r} contains a NUL byte, which no command line can hold")
    return list(cmd)


class Execs:
    def __init__(self, containers: ContainerManager, runroot: str) -> None:
        self._containers = containers
        # Pid files, runc logs and console sockets: short paths (a unix socket path holds 107 bytes).
        self._work_dir = os.path.join(runroot, "exec")

    async def run_sync(self, container_id: str, cmd: Sequence[str], timeout: int) -> oci_exec.ExecResult:
        argv = check_command(cmd)
        if timeout < 0:
            raise InvalidArgument("timeout", f"must not be negative, got {timeout}")
        container = self._containers.running(container_id)
        started = time.monotonic()
        try:
            result = await oci_exec.run_sync(
                self._containers.runtime_of(container),
                container.id,
                argv,
                timeout=timeout,
                work_dir=self._work_dir,
                bundle=container.bundle,
            )
        except oci_exec.ExecTimedOut as exc:
            event(log, logging.INFO, "exec timed out", id=container.id, cmd=argv[0], timeout=timeout)
            raise DeadlineExceeded(f"container {container.id}: {exc}") from exc
        except OciRuntimeError as exc:
            if exc.exec_refused:
                raise InvalidArgument("cmd", f"cannot be executed in container {container.id}: {exc.message}") from exc
            raise Internal(f"exec in container {container.id}: {exc}") from exc
        event(
            log,
            logging.DEBUG,
            "exec finished",
            id=container.id,
            cmd=argv[0],
            exit_code=result.exit_code,
            ms=round((time.monotonic() - started) * 1000, 1),
        )
        return result

    async def start(
        self,
        container_id: str,
        cmd: Sequence[str],
        *,
        tty: bool,
        stdin: bool,
        stdout: bool,
        stderr: bool,
        console_size: tuple[int, int] | None = None,
    ) -> oci_exec.ExecProcess:
        argv = check_command(cmd)
        container = self._containers.running(container_id)
        try:
            process = await oci_exec.start(
                self._containers.runtime_of(container),
                container.id,
                argv,
                work_dir=self._work_dir,
                bundle=container.bundle,
                tty=tty,
                stdin=stdin,
                stdout=stdout,
                stderr=stderr,
                console=oci_exec.Console(container.bundle, console_size) if tty and console_size else None,
            )
        except OciRuntimeError as exc:
            raise Internal(f"exec in container {container.id}: {exc}") from exc
        event(log, logging.INFO, "exec started", id=container.id, cmd=argv[0], pid=process.pid, tty=tty)
        return process
