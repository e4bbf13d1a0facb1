"""The daemon's side of the unpack workers (cri/storage/unpack_worker): a small pool, jobs fed and answered.

The worker reads the layer's blob file itself: a complete one, or one the
daemon is still writing as it downloads, following it as grown() says how far
it got (the bytes reach the worker through the page cache, written once). The
worker checks the stream as it goes: a corrupt blob makes it answer and exit
early, which the next grown() meets as a broken pipe and turns into the
worker's UnpackError, naming the layer, while the download is still running. A worker that answered a layer well goes
back to the pool for the next one (start-up is paid per worker, not per layer);
one that failed, was cancelled or timed out is killed. Idle workers exit after
IDLE_SECONDS, so an idle daemon keeps none.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cri.storage.unpack import UnpackError, UnpackResult, WhiteoutMode

WORKER_MODULE = "cri.storage.unpack_worker"
# Extracting what is left once the input is complete (all of it, for a blob file).
FINISH_TIMEOUT = 1800.0
IDLE_SECONDS = 30.0
_KILL_TIMEOUT = 10.0
_GROWN = struct.Struct(">cQ")  # cri/storage/unpack_worker's messages: b"+" grown to, b"." ended at, a size


class UnpackWorkerError(UnpackError):
    """The worker failed for a reason that is not the layer's (it crashed, was killed, timed out); stderr is in it."""


@dataclass(frozen=True)
class UnpackJob:
    media_type: str
    dest: Path  # an existing directory
    whiteout_mode: WhiteoutMode
    label: str  # names the layer in every message: its digest


@dataclass(eq=False)
class _Worker:
    proc: asyncio.subprocess.Process
    idle_timer: asyncio.TimerHandle | None = field(default=None, repr=False)

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def kill(self) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), _KILL_TIMEOUT)


class UnpackPool:
    """Worker processes for unpacks; at most `keep` wait idle between jobs."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self._idle: list[_Worker] = []
        self._leaving: set[asyncio.Task[None]] = set()  # workers told to exit, until they have

    async def start(self, job: UnpackJob, blob: Path, follow: bool = False) -> UnpackProcess:
        """A job on a worker: it reads the file `blob`; `follow`: as far as grown() says, until finish()."""
        header = {
            "media_type": job.media_type,
            "dest": str(job.dest),
            "whiteout_mode": job.whiteout_mode,
            "label": job.label,
            "path": str(blob),
            "follow": follow,
        }
        line = (json.dumps(header) + "\n").encode()
        while (worker := self._take()) is not None:
            try:
                await _send(worker, line)
                return UnpackProcess(self, worker, job, follow)
            except (BrokenPipeError, ConnectionResetError):
                await worker.kill()  # died while idle: try the next one
        worker = await self._spawn()
        try:
            await _send(worker, line)
        except BaseException:
            await asyncio.shield(worker.kill())
            raise
        return UnpackProcess(self, worker, job, follow)

    async def close(self) -> None:
        """Stop the idle workers (the daemon shuts down)."""
        idle, self._idle = self._idle, []
        for worker in idle:
            if worker.idle_timer is not None:
                worker.idle_timer.cancel()
            await worker.kill()
        await asyncio.gather(*self._leaving, return_exceptions=True)

    def idle_pids(self) -> list[int]:
        return [w.proc.pid for w in self._idle if w.alive]

    def _take(self) -> _Worker | None:
        while self._idle:
            worker = self._idle.pop()
            if worker.idle_timer is not None:
                worker.idle_timer.cancel()
                worker.idle_timer = None
            if worker.alive:
                return worker
        return None

    def _give_back(self, worker: _Worker) -> None:
        if not worker.alive or len(self._idle) >= self.keep:
            self._retire(worker)
            return
        worker.idle_timer = asyncio.get_running_loop().call_later(IDLE_SECONDS, self._retire, worker)
        self._idle.append(worker)

    def _retire(self, worker: _Worker) -> None:
        """Let the worker go: it exits at the end of its input; reaped in a task."""
        if worker in self._idle:
            self._idle.remove(worker)
        task = asyncio.get_running_loop().create_task(_leave(worker))
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def _spawn(self) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-S",
            "-m",
            WORKER_MODULE,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=worker_environment(),
        )
        return _Worker(proc)


def worker_environment() -> dict[str, str]:
    """The daemon's environment, its module path made the worker's.

    The worker runs without `site` (-S): it is started inside a pull, and an environment's .pth files (an
    editable install's finder, setuptools' distutils hack) were 11 ms of the 40 of CPU its start took. It
    finds its modules where the daemon found them: the daemon's sys.path, after the directory that holds
    this package (which an editable install's finder would otherwise have given).
    """
    package_root = str(Path(__file__).resolve().parents[2])
    path = dict.fromkeys([package_root, *(entry for entry in sys.path if entry)])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


class UnpackProcess:
    """One layer's job on a worker: grown() as its blob file grows (when following it), then finish()."""

    def __init__(self, pool: UnpackPool, worker: _Worker, job: UnpackJob, follow: bool) -> None:
        self.job = job
        self._pool = pool
        self._worker = worker
        self._follow = follow
        self._size = 0  # what the worker was told the blob file holds
        self._done = False
        self._released = False  # the worker went back to the pool: it may serve another job now

    @property
    def pid(self) -> int:
        return self._worker.proc.pid

    async def grown(self, size: int) -> None:
        """The blob file holds `size` bytes now; the worker's own error when it stopped because the layer is bad."""
        assert self._follow and not self._done, "grown() on a job reading a complete file, or finished"
        if size == self._size:
            return
        if size < self._size:
            raise ValueError(f"layer {self.job.label}: the blob file cannot shrink from {self._size} to {size} bytes")
        self._size = size
        try:
            await _send(self._worker, _GROWN.pack(b"+", size))
        except (BrokenPipeError, ConnectionResetError):
            raise await self._failure() from None

    async def finish(self, timeout: float = FINISH_TIMEOUT) -> UnpackResult:
        """End of input: the worker's result once it has extracted everything; its error otherwise."""
        assert not self._done, "finish() twice"
        self._done = True
        stdout = self._worker.proc.stdout
        assert stdout is not None
        try:
            if self._follow:
                await _send(self._worker, _GROWN.pack(b".", self._size))
            line = await asyncio.wait_for(stdout.readline(), timeout)
        except (BrokenPipeError, ConnectionResetError):
            raise await self._failure() from None
        except TimeoutError:
            await self._worker.kill()
            raise UnpackWorkerError(f"layer {self.job.label}: unpacking did not finish within {timeout:g}s") from None
        except BaseException:
            await asyncio.shield(self._worker.kill())
            raise
        result = await self._result(line)
        self._released = True
        self._pool._give_back(self._worker)
        return result

    async def kill(self) -> None:
        """Stop the job's worker (a cancelled or failed pull); safe to call when it is gone or done already."""
        self._done = True
        if not self._released:
            await self._worker.kill()

    async def _failure(self) -> Exception:
        self._done = True
        stdout = self._worker.proc.stdout
        assert stdout is not None
        try:
            line = await asyncio.wait_for(stdout.readline(), _KILL_TIMEOUT)
        except TimeoutError:
            await self._worker.kill()
            return UnpackWorkerError(f"layer {self.job.label}: the unpack worker stopped reading and did not answer")
        try:
            await self._result(line)
        except Exception as exc:
            return exc
        await self._worker.kill()
        return UnpackWorkerError(f"layer {self.job.label}: the unpack worker answered before the layer's end")

    async def _result(self, line: bytes) -> UnpackResult:
        try:
            answer = json.loads(line)
        except ValueError:
            await self._worker.kill()
            raise UnpackWorkerError(
                f"layer {self.job.label}: the unpack worker exited with status {self._worker.proc.returncode}: "
                + await self._stderr()
            ) from None
        if "error" not in answer:
            return UnpackResult(**answer)
        await self._worker.kill()  # it exits after an error; this reaps it
        message = str(answer["error"])
        if answer.get("kind") == "layer":
            raise UnpackError(message)
        if answer.get("kind") == "no_space":
            # As an in-process unpack would: the caller names its storage root (cri.errors.no_space_in).
            raise OSError(int(answer.get("errno") or errno.ENOSPC), message)
        raise UnpackWorkerError(message)

    async def _stderr(self) -> str:
        stderr = self._worker.proc.stderr
        assert stderr is not None
        try:
            data = await asyncio.wait_for(stderr.read(), _KILL_TIMEOUT)
        except TimeoutError:
            return "no output"
        return data.decode(errors="replace").strip()[-2000:] or "no output"


async def _send(worker: _Worker, *parts: bytes) -> None:
    stdin = worker.proc.stdin
    assert stdin is not None
    for part in parts:
        stdin.write(part)
    await stdin.drain()


async def _leave(worker: _Worker) -> None:
    stdin = worker.proc.stdin
    if stdin is not None:
        stdin.close()
    try:
        await asyncio.wait_for(worker.proc.wait(), _KILL_TIMEOUT)
    except TimeoutError:
        await worker.kill()
