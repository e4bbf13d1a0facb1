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

Workers are forked by the unpack host (cri/storage/unpack_host), which the daemon starts once and keeps:
a worker is ready in a millisecond, where an exec'd one took ~30 ms of CPU and, on a cold page cache, the
reads of its modules, while a pull's first layer waited (a large pull 0.71 -> 0.64 s here).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any

from cri.log import event
from cri.storage.unpack import UnpackError, UnpackResult, WhiteoutMode
from cri.storage.unpack_host import ASK, EXIT, EXITED, FAILED, MESSAGE_MAX, PID, STARTED

HOST_MODULE = "cri.storage.unpack_host"
# Extracting what is left once the input is complete (all of it, for a blob file).
FINISH_TIMEOUT = 1800.0
IDLE_SECONDS = 30.0
_KILL_TIMEOUT = 10.0
_PIPE_END_TIMEOUT = 1.0  # a worker that exited: its pipes have ended by the loop's next turns
_SEND_RETRY = 0.01  # the host's socket full of requests it has not read: try again after this
log = logging.getLogger(__name__)
_GROWN = struct.Struct(">cQ")  # cri/storage/unpack_worker's messages: b"+" grown to, b"." ended at, a size


class UnpackWorkerError(UnpackError):
    """The worker failed for a reason that is not the layer's (it crashed, was killed, timed out); stderr is in it."""


@dataclass(frozen=True)
class UnpackJob:
    media_type: str
    dest: Path  # an existing directory
    whiteout_mode: WhiteoutMode
    label: str  # names the layer in every message: its digest


@dataclass(frozen=True)
class _Forked:
    """A process the unpack host forked: not the daemon's child, so signalled through its pidfd (which
    stays open until its exit is known, see UnpackHost._take), and its exit learnt from the host."""

    pid: int
    pidfd: int
    exited: asyncio.Future[int | None]  # its status, as asyncio's returncode; None: its host was lost

    def kill(self) -> None:
        if not self.exited.done():
            with contextlib.suppress(ProcessLookupError):  # exited, not yet reported: a pidfd names no other one
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)


@dataclass(eq=False)
class _Worker:
    """A forked worker and the daemon's ends of its pipes."""

    process: _Forked
    stdin: asyncio.StreamWriter
    stdout: asyncio.StreamReader
    stderr: asyncio.StreamReader
    # stdout's and stderr's
    pipes: tuple[_PipeProtocol, _PipeProtocol] = field(repr=False)
    transports: tuple[asyncio.BaseTransport, ...] = field(repr=False)
    idle_timer: asyncio.TimerHandle | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return not self.process.exited.done()

    def ended(self) -> str:
        """How it ended, for a message."""
        exited = self.process.exited
        status = exited.result() if exited.done() else None
        return "was lost with the unpack host" if status is None else f"exited with status {status}"

    async def exit(self, timeout: float) -> bool:
        """Whether it exited within `timeout`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.process.exited), timeout)
        return not self.alive

    async def kill(self) -> None:
        """Kill it, and once it is gone, release its pipes."""
        self.process.kill()
        try:
            await self.exit(_KILL_TIMEOUT)
            await self._pipes_ended()
        finally:
            self._close_pipes()

    async def release(self) -> None:
        """Close the daemon's ends of its pipes, once what it wrote to them has been read."""
        try:
            await self._pipes_ended()
        finally:
            self._close_pipes()

    async def _pipes_ended(self) -> None:
        if not self.alive and not self._released:  # they end at once: what is in them stays for the caller
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(pipe.closed for pipe in self.pipes)), _PIPE_END_TIMEOUT)

    def _close_pipes(self) -> None:
        if not self._released:
            self._released = True
            for transport in self.transports:
                transport.close()


class _PipeProtocol(asyncio.StreamReaderProtocol):
    """A StreamReader's protocol that says when its pipe has ended (all it held fed to the reader)."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        super().__init__(reader)
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        if not self.closed.done():
            self.closed.set_result(None)


async def _connected(process: _Forked, stdin: IO[Any], stdout: IO[Any], stderr: IO[Any]) -> _Worker:
    """The worker with the daemon's ends of its pipes on the event loop; the pipes closed if that fails."""
    loop = asyncio.get_running_loop()
    transports: list[asyncio.BaseTransport] = []
    readers = asyncio.StreamReader(), asyncio.StreamReader()
    pipes = _PipeProtocol(readers[0]), _PipeProtocol(readers[1])
    try:
        for file, protocol in zip((stdout, stderr), pipes, strict=True):
            read, _ = await loop.connect_read_pipe(partial(_same, protocol), file)
            transports.append(read)
        write, flow = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, stdin)
        transports.append(write)
    except BaseException:
        for transport in transports:
            transport.close()
        for pipe in (stdout, stderr, stdin)[len(transports) :]:  # not yet a transport's to close
            pipe.close()
        raise
    writer = asyncio.StreamWriter(write, flow, None, loop)
    return _Worker(process, writer, *readers, pipes, tuple(transports))


def _same(protocol: _PipeProtocol) -> _PipeProtocol:
    return protocol


class UnpackHost:
    """The daemon's end of cri/storage/unpack_host: the one process the workers are forked from.

    Started once (warm() at the daemon's start, or the first worker asked for) and kept: it waits in a
    recv at no CPU cost. One that died is started again for the next worker; the workers it had die with it.
    """

    def __init__(self) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._control: socket.socket | None = None
        self._asked: deque[asyncio.Future[_Forked]] = deque()  # answers come in the order asked
        self._exits: dict[int, asyncio.Future[int | None]] = {}
        self._starting = asyncio.Lock()
        self._closed = False
        self._ended: set[asyncio.Task[None]] = set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._control is not None else None

    async def start(self) -> None:
        async with self._starting:
            if self._closed:
                raise UnpackWorkerError("the unpack pool is closed")
            if self._control is not None:
                return
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-S",
                    "-m",
                    HOST_MODULE,
                    stdin=theirs.fileno(),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                    env=worker_environment(),
                )
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            ours.setblocking(False)
            self._control = ours
            asyncio.get_running_loop().add_reader(ours.fileno(), self._on_messages)

    async def worker(self) -> _Worker:
        """A new worker, its pipes connected."""
        ends = _pipes(3)
        stdin_r, stdin_w, stdout_r, stdout_w, stderr_r, stderr_w = ends
        ours = [os.fdopen(fd, mode, buffering=0) for fd, mode in ((stdin_w, "wb"), (stdout_r, "rb"), (stderr_r, "rb"))]
        answer: asyncio.Future[_Forked] | None = None
        try:
            try:
                answer = await self._ask([stdin_r, stdout_w, stderr_w])
            finally:
                for fd in (stdin_r, stdout_w, stderr_w):
                    os.close(fd)
            process = await answer
        except BaseException:
            for pipe in ours:
                pipe.close()
            # Cancelled in the turn its answer came: the worker is ours to stop (it would exit on its
            # closed stdin too). Its pidfd closes when its exit is reported.
            if answer is not None and answer.done() and not answer.cancelled() and answer.exception() is None:
                answer.result().kill()
            raise
        try:
            return await _connected(process, *ours)
        except BaseException:
            process.kill()
            raise

    async def _ask(self, fds: list[int]) -> asyncio.Future[_Forked]:
        """Send the request for a worker; its answer is the future's. A host found gone is started again."""
        deadline = asyncio.get_running_loop().time() + _KILL_TIMEOUT
        while True:
            await self.start()
            control = self._control
            assert control is not None
            try:
                socket.send_fds(control, [ASK], fds)
            except BlockingIOError:  # requests it has not read yet fill its socket: wait for room
                if asyncio.get_running_loop().time() > deadline:
                    raise UnpackWorkerError(f"the unpack host took no request for {_KILL_TIMEOUT:g}s") from None
                await asyncio.sleep(_SEND_RETRY)
                continue
            except OSError as exc:  # it died, and the loop has not read its end yet: a new one
                if asyncio.get_running_loop().time() > deadline:
                    raise UnpackWorkerError(f"the unpack host did not take the request: {exc}") from exc
                self._lose(expected=False)
                continue
            answer: asyncio.Future[_Forked] = asyncio.get_running_loop().create_future()
            self._asked.append(answer)
            return answer

    async def close(self) -> None:
        """The host exits at the end of its input; its workers die with it. No host is started after."""
        async with self._starting:
            self._closed = True
            proc = self._proc
            self._lose(expected=True)
        if proc is not None:
            try:
                await asyncio.wait_for(_ended(proc), _KILL_TIMEOUT)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await _ended(proc)
        await asyncio.gather(*self._ended, return_exceptions=True)

    def _on_messages(self) -> None:
        control = self._control
        assert control is not None
        while True:
            try:
                message, fds, _flags, _address = socket.recv_fds(control, MESSAGE_MAX, 1)
            except BlockingIOError:
                return
            except OSError:
                message, fds = b"", []
            if not message:
                self._lose(expected=False)
                return
            self._take(message, fds)

    def _take(self, message: bytes, fds: list[int]) -> None:
        tag, body = message[:1], message[1:]
        if tag == EXITED and len(body) == EXIT.size:
            pid, status = EXIT.unpack(body)
            ended = self._exits.pop(pid, None)
            if ended is not None and not ended.done():
                ended.set_result(status)
        elif tag == STARTED and len(body) == PID.size and self._asked:
            answer = self._asked.popleft()
            if not fds:  # its descriptor did not fit (the daemon at its limit of open files)
                _settle(answer, UnpackWorkerError("the unpack host's answer came without the worker's pidfd"))
                return  # the worker exits on its stdin, which the caller closes
            (pid,) = PID.unpack(body)
            exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
            exited.add_done_callback(partial(_close_fd, fds[0]))
            self._exits[pid] = exited
            process = _Forked(pid, fds[0], exited)
            if answer.cancelled():  # the pull went away while the host forked: nobody will use it
                process.kill()
            else:
                answer.set_result(process)
        elif tag == FAILED and self._asked:
            error = f"the unpack host could not start a worker: {body.decode(errors='replace')}"
            _settle(self._asked.popleft(), UnpackWorkerError(error))
        else:
            for fd in fds:
                os.close(fd)
            event(log, logging.ERROR, "unpack host message not understood", message=message[:64])
            self._lose(expected=False)

    def _lose(self, expected: bool) -> None:
        """The host is gone, or closed by us: fail what waits on it; a later worker() starts another."""
        control, proc = self._control, self._proc
        self._control, self._proc = None, None
        if control is not None:
            asyncio.get_running_loop().remove_reader(control.fileno())
            control.close()
        asked, self._asked = self._asked, deque()
        exits, self._exits = self._exits, {}
        for exited in exits.values():
            if not exited.done():
                exited.set_result(None)
        if proc is not None and not expected:
            task = asyncio.get_running_loop().create_task(_host_ended(proc, asked))
            self._ended.add(task)
            task.add_done_callback(self._ended.discard)
        else:
            _fail(asked, "the unpack host was closed")


async def _ended(proc: asyncio.subprocess.Process) -> str:
    """What the host wrote to stderr, once it has exited (and its pipe is closed, so is its transport)."""
    assert proc.stderr is not None
    said = await proc.stderr.read()
    await proc.wait()
    return _last_words(said)


async def _host_ended(proc: asyncio.subprocess.Process, asked: deque[asyncio.Future[_Forked]]) -> None:
    """The host died: logged, and the workers asked of it fail, with what it said on its way out."""
    said = ""
    with contextlib.suppress(TimeoutError):
        said = await asyncio.wait_for(_ended(proc), _KILL_TIMEOUT)
    event(log, logging.ERROR, "unpack host exited", pid=proc.pid, status=proc.returncode, stderr=said)
    _fail(asked, f"the unpack host exited with status {proc.returncode}: {said or 'no output'}")


def _fail(asked: deque[asyncio.Future[_Forked]], error: str) -> None:
    for answer in asked:
        _settle(answer, UnpackWorkerError(error))


def _settle(answer: asyncio.Future[_Forked], error: Exception) -> None:
    if not answer.done():
        answer.set_exception(error)


def _last_words(stderr: bytes) -> str:
    """The end of what a process wrote to stderr, for a message."""
    return stderr.decode(errors="replace").strip()[-2000:]


def _close_fd(fd: int, _done: object) -> None:
    os.close(fd)


def _pipes(count: int) -> list[int]:
    """`count` pipes' ends (read, write, read, write ...); none left open if one cannot be made."""
    ends: list[int] = []
    try:
        for _ in range(count):
            ends += os.pipe()
    except OSError:
        for fd in ends:
            os.close(fd)
        raise
    return ends


class UnpackPool:
    """Worker processes for unpacks; at most `keep` wait idle between jobs."""

    def __init__(self, keep: int = 3) -> None:
        self.keep = keep
        self.host = UnpackHost()
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
        try:
            worker = await self._spawn()
        except UnpackWorkerError as exc:
            raise UnpackWorkerError(f"layer {job.label}: {exc}") from exc
        process = UnpackProcess(self, worker, job, follow)
        try:
            await _send(worker, line)
        except (BrokenPipeError, ConnectionResetError):
            raise await process._failure() from None  # it died at once: its status and stderr say why
        except BaseException:
            await asyncio.shield(worker.kill())
            raise
        return process

    async def close(self) -> None:
        """Stop the idle workers (the daemon shuts down)."""
        idle, self._idle = self._idle, []
        for worker in idle:
            if worker.idle_timer is not None:
                worker.idle_timer.cancel()
            await worker.kill()
        await asyncio.gather(*self._leaving, return_exceptions=True)
        await self.host.close()

    async def warm(self) -> None:
        """Start the host now, so that the first pull finds it ready."""
        await self.host.start()

    def idle_pids(self) -> list[int]:
        return [w.pid for w in self._idle if w.alive]

    def _take(self) -> _Worker | None:
        while self._idle:
            worker = self._idle.pop()
            if worker.idle_timer is not None:
                worker.idle_timer.cancel()
                worker.idle_timer = None
            if worker.alive:
                return worker
            self._retire(worker)
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
        return await self.host.worker()


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
        return self._worker.pid

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
        stdout = self._worker.stdout
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
        try:
            line = await asyncio.wait_for(self._worker.stdout.readline(), _KILL_TIMEOUT)
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
                f"layer {self.job.label}: the unpack worker {self._worker.ended()}: " + await self._stderr()
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
        try:
            data = await asyncio.wait_for(self._worker.stderr.read(), _KILL_TIMEOUT)
        except TimeoutError:
            return "no output"
        return _last_words(data) or "no output"


async def _send(worker: _Worker, *parts: bytes) -> None:
    for part in parts:
        worker.stdin.write(part)
    await worker.stdin.drain()


async def _leave(worker: _Worker) -> None:
    worker.stdin.close()
    if await worker.exit(_KILL_TIMEOUT):
        await worker.release()
    else:
        await worker.kill()
