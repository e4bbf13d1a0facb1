"""Running a command in a running container through `<runtime> exec`.

`runc exec --detach <id> <argv>` takes the process from the container's
bundle (user, groups, env, cwd, capabilities, no_new_privs, rlimits), joins
its namespaces and cgroups, applies its seccomp filter, starts the command
on the stdio it was given, writes its pid and exits. The command, orphaned,
comes to the daemon (a child subreaper, `cri.system.reaper`), which waits for it.
Detached, because a foreground runc copies the output through pipes of its
own and waits for them to close: a background child of the command that
keeps its stdout would hold runc, and the call, until that child exits.

runc's own failures (no such binary in the container, container not running)
are read from `--log`, where runc writes them as JSON lines.

On a timeout or a client that went away, only the exec'd process tree is
killed: the command and everything below it, found by parent pid, so the
container's other processes are never touched.

runc 1.1 before 1.1.13, built with Go 1.19 or later (Debian 12's 1.1.5 is),
races with itself over RLIMIT_NOFILE in exec (runc#4195): the Go runtime of
`runc init` raises the soft limit to the hard one, sometimes after runc has
set the container's limits. Here that happened in about half of all execs.
The daemon sets the container's NOFILE on the command again once runc
reports its pid: a shell or any command that runs longer than that instant
gets the container's limits; only what reads its limits in its first
microseconds can still see runc's raised soft limit.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import fcntl
import functools
import json
import os
import resource
import secrets
import signal
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from cri.oci.conmon import OciRuntimeError, Runtime, read_pid
from cri.system import linux, offload, reaper

# ExecSync output is capped per stream: the kubelet's gRPC client takes at most 16 MiB per message.
OUTPUT_LIMIT = 8 << 20
# After the command exits, how long a background child that kept the pipes open may hold the call.
DRAIN_GRACE = 0.5
CONSOLE_TIMEOUT = 10.0
KILL_WAIT = 10.0
# How long a parent in the container gets to reap a killed child before it is killed itself.
REAP_WAIT = 0.1


class ExecTimedOut(OciRuntimeError):
    """The command ran past its timeout and was killed."""


@dataclass(frozen=True)
class Console:
    """A TTY exec's terminal size, (width, height), set on the pty before the command runs. runc takes it only
    from a whole process spec (`--process`), made from the container's own in `bundle`/config.json."""

    bundle: str
    size: tuple[int, int]

    def process_spec(self, argv: Sequence[str]) -> dict[str, object]:
        with open(os.path.join(self.bundle, "config.json")) as f:
            process = dict(json.load(f)["process"])
        width, height = self.size
        return {**process, "args": list(argv), "terminal": True, "consoleSize": {"width": width, "height": height}}


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes


def _truncated(data: bytearray, limit: int, name: str) -> bytes:
    if len(data) <= limit:
        return bytes(data)
    return bytes(data[:limit]) + f"\n[criopy: {name} truncated at {limit} bytes]\n".encode()


async def _capture(reader: asyncio.StreamReader | None, sink: bytearray, limit: int) -> None:
    """Read to EOF, keeping one byte past the limit so truncation shows, discarding the rest."""
    if reader is None:
        return
    while chunk := await reader.read(65536):
        room = limit + 1 - len(sink)
        if room > 0:
            sink += chunk[:room]


class ExecProcess:
    """A started exec: its stdio (or its pty), its pid, its exit."""

    def __init__(self, what: str, pid: int, pipes: _Pipes, pty: int) -> None:
        self.what = what
        self.pid = pid
        self._pipes = pipes
        self.pty = pty
        self._exit: asyncio.Task[int] = asyncio.ensure_future(reaper.wait_child(pid))

    @property
    def stdin(self) -> asyncio.StreamWriter | None:
        return self._pipes.stdin

    @property
    def stdout(self) -> asyncio.StreamReader | None:
        return self._pipes.stdout

    @property
    def stderr(self) -> asyncio.StreamReader | None:
        return self._pipes.stderr

    async def wait(self) -> int:
        """The command's exit status (128 + signal when a signal ended it)."""
        return await asyncio.shield(self._exit)

    @property
    def exited(self) -> bool:
        return self._exit.done()

    def resize(self, width: int, height: int) -> None:
        if self.pty >= 0 and width > 0 and height > 0:
            fcntl.ioctl(self.pty, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, 0, 0))

    async def kill(self) -> None:
        """SIGKILL the exec'd process tree (never the container's other processes) and reap it."""
        if not self._exit.done():
            await offload.to_thread(_kill_tree, self.pid)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wait(), KILL_WAIT)

    def close(self) -> None:
        """Release the pty and the pipes (after the output was read)."""
        if self.pty >= 0:
            os.close(self.pty)
            self.pty = -1
        if self._pipes.stdin is not None:
            self._pipes.stdin.close()
        for transport in self._pipes.read_transports:
            transport.close()


async def start(
    runtime: Runtime,
    container_id: str,
    argv: Sequence[str],
    *,
    work_dir: str,
    stdin: bool = False,
    stdout: bool = True,
    stderr: bool = True,
    tty: bool = False,
    console: Console | None = None,
    bundle: str | None = None,
) -> ExecProcess:
    """Start `argv` in the container. With `tty`, the pty master is in `.pty` and there are no pipes; `console`
    gives that pty its size from the start. `bundle` (the container's) gives the NOFILE limit that is set
    again on the command, past runc's race."""
    os.makedirs(work_dir, mode=0o700, exist_ok=True)
    nofile = await offload.to_thread(bundle_nofile, bundle) if bundle else None
    token = secrets.token_hex(8)
    files = [os.path.join(work_dir, f"{token}.{kind}") for kind in ("pid", "log", "sock", "json")]
    pid_file, log_file, console_socket, process_file = files
    command = ["--log", log_file, "--log-format", "json", "exec", "--detach", "--pid-file", pid_file]
    listener = _console_listener(console_socket) if tty else None
    if listener is not None:
        command += ["--tty", "--console-socket", console_socket]
    what = f"{runtime.name} exec {container_id}"
    pty = -1
    try:
        if tty and console is not None:
            await offload.to_thread(_write_process, process_file, console, argv, what)
            command += ["--process", process_file, container_id]
        else:
            command += [container_id, *argv]
        proc, pipes = await _spawn(runtime.argv(*command), what, (stdin, stdout, stderr), tty)
        if listener is not None:
            pty = await _receive_console(listener, proc, what)
        code = await proc.wait()
        if code != 0:
            failure = await offload.to_thread(_runtime_error, log_file)
            raise OciRuntimeError(what, failure or f"{runtime.binary} exited with status {code}")
        pid = await offload.to_thread(started_pid, pid_file, nofile)
        if not pid:
            raise OciRuntimeError(what, f"{runtime.binary} wrote no pid to {pid_file}")
    except BaseException:
        if pty >= 0:
            os.close(pty)
        raise
    finally:
        if listener is not None:
            listener.close()
        for path in files:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
    return ExecProcess(what, pid, pipes, pty)


def bundle_nofile(bundle: str) -> tuple[int, int] | None:
    """The (soft, hard) RLIMIT_NOFILE of the bundle's process spec, None when it sets none (or is unreadable:
    then runc exec fails and says why)."""
    try:
        with open(os.path.join(bundle, "config.json")) as f:
            rlimits = json.load(f)["process"].get("rlimits") or []
        for rlimit in rlimits:
            if rlimit["type"] == "RLIMIT_NOFILE":
                return _kernel_value(rlimit["soft"]), _kernel_value(rlimit["hard"])
    except (OSError, KeyError, TypeError, ValueError, AttributeError):
        return None
    return None


def _kernel_value(oci: int) -> int:
    # The OCI spec's unlimited is uint64 all ones; Python's resource module takes RLIM_INFINITY (-1).
    return resource.RLIM_INFINITY if oci >= 2**63 else int(oci)


def started_pid(pid_file: str, nofile: tuple[int, int] | None) -> int:
    """The exec'd command's pid, its NOFILE set to the container's again (runc#4195, see the module doc).
    The command is not reaped before its wait starts (the daemon is its subreaper), so the pid is its own."""
    pid = read_pid(pid_file)
    if pid and nofile is not None:
        with contextlib.suppress(ProcessLookupError):
            resource.prlimit(pid, resource.RLIMIT_NOFILE, nofile)
    return pid


def _write_process(path: str, console: Console, argv: Sequence[str], what: str) -> None:
    try:
        spec = console.process_spec(argv)
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise OciRuntimeError(what, f"cannot read the container's process spec from {console.bundle}: {exc}") from exc
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(spec, f)


@dataclass
class _Pipes:
    """The command's stdio as streams of ours. Plain pipes, not asyncio's subprocess pipes: those tie the
    runtime's wait() to the pipes closing, and runc --detach exits long before the command does."""

    stdin: asyncio.StreamWriter | None = None
    stdout: asyncio.StreamReader | None = None
    stderr: asyncio.StreamReader | None = None
    read_transports: list[asyncio.BaseTransport] = field(default_factory=list)


async def _spawn(
    argv: list[str], what: str, wanted: tuple[bool, bool, bool], tty: bool
) -> tuple[asyncio.subprocess.Process, _Pipes]:
    """The runtime, its stdio the command's (runc --detach hands its own stdio to the command)."""
    stdin, stdout, stderr = (want and not tty for want in wanted)
    pairs = [os.pipe2(os.O_CLOEXEC) if want else None for want in (stdin, stdout, stderr)]
    child = [pair[0 if i == 0 else 1] if pair else subprocess.DEVNULL for i, pair in enumerate(pairs)]
    try:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=child[0], stdout=child[1], stderr=child[2])
    except OSError as exc:
        _close_all(pairs)
        raise OciRuntimeError(what, f"cannot start {argv[0]}: {exc.strerror}") from exc
    for fd in child:
        if fd >= 0:
            os.close(fd)
    ours = [pair[1 if i == 0 else 0] if pair else -1 for i, pair in enumerate(pairs)]
    return proc, await _streams(ours)


def _close_all(pairs: list[tuple[int, int] | None]) -> None:
    for pair in pairs:
        for fd in pair or ():
            os.close(fd)


async def _streams(fds: list[int]) -> _Pipes:
    loop = asyncio.get_running_loop()
    pipes = _Pipes()
    if fds[0] >= 0:
        transport, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(fds[0], "wb", buffering=0)
        )
        pipes.stdin = asyncio.StreamWriter(transport, protocol, None, loop)
    for index, name in ((1, "stdout"), (2, "stderr")):
        if fds[index] >= 0:
            reader = asyncio.StreamReader(limit=1 << 20)
            read_transport, _ = await loop.connect_read_pipe(
                functools.partial(asyncio.StreamReaderProtocol, reader), os.fdopen(fds[index], "rb", buffering=0)
            )
            pipes.read_transports.append(read_transport)
            setattr(pipes, name, reader)
    return pipes


async def run_sync(
    runtime: Runtime,
    container_id: str,
    argv: Sequence[str],
    *,
    timeout: float,
    work_dir: str,
    limit: int = OUTPUT_LIMIT,
    bundle: str | None = None,
) -> ExecResult:
    """Run `argv` to its end (or `timeout` seconds, 0 = none), stdout and stderr captured apart."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout if timeout > 0 else None
    process = await start(runtime, container_id, argv, work_dir=work_dir, bundle=bundle)
    out, err = bytearray(), bytearray()
    readers = asyncio.gather(_capture(process.stdout, out, limit), _capture(process.stderr, err, limit))
    try:
        remaining = None if deadline is None else max(0.0, deadline - loop.time())
        try:
            code = await asyncio.wait_for(process.wait(), remaining)
        except TimeoutError:
            await process.kill()
            raise ExecTimedOut(process.what, f"command {list(argv)!r} timed out after {timeout:g}s") from None
        # A background child may hold the pipes open: drain what is there, not until it exits.
        grace = DRAIN_GRACE if deadline is None else max(0.0, min(DRAIN_GRACE, deadline - loop.time()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(readers), grace)
    finally:
        readers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await readers
        process.close()
    return ExecResult(code, _truncated(out, limit, "stdout"), _truncated(err, limit, "stderr"))


# ---- the pty from --console-socket ------------------------------------------------------------


def _console_listener(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(path)
        listener.listen(1)
        listener.setblocking(False)
    except OSError:
        listener.close()
        raise
    return listener


async def _receive_console(listener: socket.socket, proc: asyncio.subprocess.Process, what: str) -> int:
    """The pty master runc sends over the console socket; fails if runc exits without sending it."""
    loop = asyncio.get_running_loop()
    accept = asyncio.ensure_future(loop.sock_accept(listener))
    exited = asyncio.ensure_future(proc.wait())
    try:
        await asyncio.wait({accept, exited}, timeout=CONSOLE_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
    finally:
        exited.cancel()
    if not accept.done():
        accept.cancel()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
            raise OciRuntimeError(what, f"no console received within {CONSOLE_TIMEOUT:g}s")
        return -1  # runc failed: the caller reads why from its log
    conn, _ = accept.result()
    with conn:
        conn.settimeout(CONSOLE_TIMEOUT)
        return await offload.to_thread(_recv_fd, conn)


def _recv_fd(conn: socket.socket) -> int:
    fds = array.array("i")
    _, ancdata, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(fds.itemsize))
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    if not fds:
        raise OSError("console socket message carried no file descriptor")
    for extra in fds[1:]:
        os.close(extra)
    os.set_inheritable(fds[0], False)
    return fds[0]


# ---- process trees ----------------------------------------------------------------------------


def _runtime_error(log_file: str) -> str:
    """The last error runc logged, or "" when it logged none (the command itself exited 255)."""
    try:
        with open(log_file) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return ""
    for line in reversed(lines):
        with contextlib.suppress(ValueError):
            entry = json.loads(line)
            if isinstance(entry, dict) and entry.get("level") in ("error", "fatal"):
                return str(entry.get("msg", ""))
    return ""


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        stat = linux.proc_stat(int(entry)) if entry.isdigit() else None
        if stat is not None:
            children.setdefault(stat.ppid, []).append(int(entry))
    return children


def tree(root: int) -> list[list[int]]:
    """`root` and its descendants, one list per generation."""
    children = _children_map()
    levels, current = [], [root]
    while current:
        levels.append(current)
        current = [child for pid in current for child in children.get(pid, [])]
    return levels


def _signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_reaped(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(os.path.exists(f"/proc/{pid}") for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.005)


def _kill_tree(root: int) -> None:
    """Kill from the leaves up, letting each parent reap its killed children before it dies in turn:
    a zombie orphaned into the container would stay visible under an init that does not reap."""
    levels = tree(root)
    _signal_all([pid for level in levels for pid in level], signal.SIGSTOP)
    for depth in range(len(levels) - 1, 0, -1):
        _signal_all(levels[depth], signal.SIGKILL)
        _signal_all(levels[depth - 1], signal.SIGCONT)
        _wait_reaped(levels[depth], REAP_WAIT)
        _signal_all(levels[depth - 1], signal.SIGSTOP)
    _signal_all([pid for level in tree(root) for pid in level], signal.SIGKILL)
