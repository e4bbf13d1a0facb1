"""The daemon's side of an unpack worker (cri/storage/unpack_worker): start it, feed it, read its answer.

A layer's bytes reach the worker through a pipe as they arrive from the
registry (write()), or straight from a blob file given as its stdin. The
worker checks the stream as it goes: a corrupt blob makes it answer and exit
early, which the next write() meets as a broken pipe and turns into the
worker's UnpackError, naming the layer, while the download is still running.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from cri.storage.unpack import UnpackError, UnpackResult, WhiteoutMode

WORKER_MODULE = "cri.storage.unpack_worker"
PIPE_SIZE = 1 << 20  # fewer wake-ups of the worker and the loop than the default 64 KiB
# Extracting what is left once the input is complete (all of it, for a blob file).
FINISH_TIMEOUT = 1800.0
_KILL_TIMEOUT = 10.0


class UnpackWorkerError(UnpackError):
    """The worker failed for a reason that is not the layer's (it crashed, was killed, timed out); stderr is in it."""


@dataclass(frozen=True)
class UnpackJob:
    media_type: str
    dest: Path  # an existing directory
    whiteout_mode: WhiteoutMode
    label: str  # names the layer in every message: its digest


class UnpackProcess:
    def __init__(self, job: UnpackJob, proc: asyncio.subprocess.Process) -> None:
        self.job = job
        self._proc = proc

    @classmethod
    async def start(cls, job: UnpackJob, source: IO[bytes] | None = None) -> UnpackProcess:
        """A worker reading `source` (a blob file), or a pipe fed by write() when None."""
        argv = [
            sys.executable,
            "-m",
            WORKER_MODULE,
            "--media-type",
            job.media_type,
            "--dest",
            str(job.dest),
            "--whiteout-mode",
            job.whiteout_mode,
            "--label",
            job.label,
        ]
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if source is None else source,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        if proc.stdin is not None:
            pipe = proc.stdin.get_extra_info("pipe")
            with contextlib.suppress(OSError):  # a smaller pipe works too, only with more wake-ups
                fcntl.fcntl(pipe.fileno(), fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        return cls(job, proc)

    async def write(self, chunk: bytes) -> None:
        """Feed the next bytes; the worker's own error when it stopped reading because the layer is bad."""
        stdin = self._proc.stdin
        assert stdin is not None, "write() on a worker reading a file"
        try:
            stdin.write(chunk)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise await self._answer_error() from None

    async def finish(self, timeout: float = FINISH_TIMEOUT) -> UnpackResult:
        """End of input: the worker's result once it has extracted everything; its error otherwise."""
        stdin = self._proc.stdin
        if stdin is not None:
            stdin.close()
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                await stdin.wait_closed()
        try:
            stdout, stderr = await asyncio.wait_for(self._proc.communicate(), timeout)
        except TimeoutError:
            await self.kill()
            raise UnpackWorkerError(f"layer {self.job.label}: unpacking did not finish within {timeout:g}s") from None
        return self._result(stdout, stderr)

    async def kill(self) -> None:
        """Stop the worker (a cancelled or failed pull); safe to call when it is gone already."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._proc.wait(), _KILL_TIMEOUT)

    async def _answer_error(self) -> Exception:
        try:
            stdout, stderr = await asyncio.wait_for(self._proc.communicate(), _KILL_TIMEOUT)
        except TimeoutError:
            await self.kill()
            return UnpackWorkerError(f"layer {self.job.label}: the unpack worker stopped reading and did not exit")
        try:
            self._result(stdout, stderr)
        except Exception as exc:
            return exc
        return UnpackWorkerError(f"layer {self.job.label}: the unpack worker finished before the layer's end")

    def _result(self, stdout: bytes, stderr: bytes) -> UnpackResult:
        try:
            answer = json.loads(stdout.decode(errors="replace").strip().splitlines()[-1])
        except (ValueError, IndexError):
            detail = stderr.decode(errors="replace").strip()[-2000:] or "no output"
            raise UnpackWorkerError(
                f"layer {self.job.label}: the unpack worker exited with status {self._proc.returncode}: {detail}"
            ) from None
        if "error" not in answer:
            return UnpackResult(**answer)
        message = str(answer["error"])
        if answer.get("kind") == "layer":
            raise UnpackError(message)
        if answer.get("kind") == "no_space":
            # As an in-process unpack would: the caller names its storage root (cri.errors.no_space_in).
            raise OSError(int(answer.get("errno") or errno.ENOSPC), message)
        raise UnpackWorkerError(message)
