"""Starting containers under conmon, as cri-o does, and driving the OCI runtime (runc, crun).

`create` launches `conmon`, which runs `<runtime> create` for the bundle, holds
the container's stdio, writes the CRI log file (k8s-file format), and, when the
container exits, writes the exit code to `<exit-dir>/<id>`. conmon
double-forks: the process we start exits at once (after writing the conmon
pid file), and its daemonized child reports over the sync pipe, an inherited
fd named by `_OCI_SYNCPIPE`: `{"data": <pid>}` once `create` succeeded, or
`{"data": -1, "message": "<runtime stderr>"}` when it failed (API version 0
used the key "pid"). criopy never becomes the container's parent.

The runtime wrappers (`start`, `kill`, `delete`, `state`, `list_containers`)
run `<runtime> --root <root> [args] <command>`; a container that does not
exist is `ContainerNotFound`, and `kill`/`delete` treat it as done.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import signal as signals
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cri.config import Config
from cri.log import event
from cri.oci import exec_fifo, monitor_cgroup
from cri.system import fdwait, linux, offload
from cri.system.process import CommandError, Spawn, communicate, run

log = logging.getLogger(__name__)

CREATE_TIMEOUT = 60.0  # conmon start + `runtime create`
RUNTIME_TIMEOUT = 30.0  # start / kill / delete / state
SYNC_PIPE_ENV = "_OCI_SYNCPIPE"
# The daemon's own activation variables must not reach conmon (it rewrites LISTEN_PID for its child).
_DROPPED_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET", SYNC_PIPE_ENV, "_OCI_STARTPIPE")


# What runc (`exec: "x": stat x: no such file or directory`) and crun (executable file `x` not found) say when
# the process asked for cannot be executed in the container.
_EXEC_REFUSED = re.compile(r'exec: "|executable file `')


class OciRuntimeError(Exception):
    """The runtime or conmon refused; `message` is what it said (runc's log line reduced to its msg)."""

    def __init__(self, what: str, message: str = "") -> None:
        super().__init__(f"{what}: {message}" if message else what)
        self.what = what
        self.message = message

    @property
    def exec_refused(self) -> bool:
        """The process could not be executed (no such file, not executable): the command asked for is at fault,
        not the host."""
        return bool(_EXEC_REFUSED.search(self.message))


class ContainerNotFound(OciRuntimeError):
    """The runtime knows no container with this ID."""


@dataclass(frozen=True)
class Runtime:
    """One OCI runtime handler, resolved: the binary, its --root, its extra global args."""

    name: str
    binary: str
    root: str
    args: tuple[str, ...] = ()
    systemd_cgroup: bool = False

    def global_args(self) -> list[str]:
        """The arguments that go before the command: `--root <root> [--systemd-cgroup] [extra...]`."""
        out = ["--root", self.root]
        if self.systemd_cgroup:
            out.append("--systemd-cgroup")
        return out + list(self.args)

    def conmon_runtime_args(self) -> list[str]:
        """The same, as conmon passes them on (`--root=<dir>` in one piece: conmon takes one word per arg)."""
        out = [f"--root={self.root}"]
        if self.systemd_cgroup:
            out.append("--systemd-cgroup")
        return out + list(self.args)

    def argv(self, *command: str) -> list[str]:
        return [self.binary, *self.global_args(), *command]


def runtime_for(config: Config, handler: str = "") -> Runtime:
    """Resolve a runtime handler from config (the default one when `handler` is empty).

    Raises OciRuntimeError when the handler is not configured or its binary is not found.
    """
    name = handler or config.runtime.default_runtime
    handler_config = config.runtime.runtimes.get(name)
    if handler_config is None:
        known = ", ".join(sorted(config.runtime.runtimes))
        raise OciRuntimeError(f"runtime handler {name!r}", f"not configured (known: {known})")
    binary = shutil.which(handler_config.path)
    if binary is None:
        raise OciRuntimeError(f"runtime handler {name!r}", f"runtime binary {handler_config.path!r} not found")
    return Runtime(
        name=name,
        binary=binary,
        root=config.runtime_root(name),
        args=tuple(handler_config.runtime_args),
        systemd_cgroup=config.runtime.cgroup_manager == "systemd",
    )


def recorded_runtime(config: Config, recorded: Runtime | None, handler: str) -> Runtime:
    """The runtime an existing container or infra process was created with, as its record keeps it.

    A SIGHUP may since have removed the handler or changed its binary or root: the process can still be
    stopped and removed only through the runtime (and --root) that made it. Records written before the
    runtime was kept fall back to the handler's current configuration.
    """
    return recorded if recorded is not None else runtime_for(config, handler)


# ---- messages ------------------------------------------------------------------------------

_LOGFMT_MSG = re.compile(r'\bmsg=("(?:[^"\\]|\\.)*"|\S+)')


def runtime_message(text: str) -> str:
    """What a runtime said, readable: runc's `time=.. level=error msg="..."` lines reduced to their msg."""
    parts: list[str] = []
    for raw in text.strip().splitlines():
        line = raw.strip()
        if not line:
            continue
        found = _LOGFMT_MSG.search(line)
        if found is None:
            parts.append(line)
            continue
        value = found.group(1)
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        parts.append(value)
    return "; ".join(parts)


def _not_found(message: str) -> bool:
    lowered = message.lower()
    return "does not exist" in lowered or "container not found" in lowered


def _not_running(message: str) -> bool:
    lowered = message.lower()
    return "not running" in lowered or "process already finished" in lowered or "no such process" in lowered


# ---- launching under conmon ------------------------------------------------------------------


@dataclass(frozen=True)
class ConmonLaunch:
    """Everything conmon needs to create one container.

    `pidfile` is where the runtime writes the container pid (`-p`), `conmon_pidfile`
    where conmon writes its own (`-P`). The exit code lands in `<exit_dir>/<id>`,
    and also in `<persist_dir>/exit` (with an `oom` marker next to it after an OOM
    kill). conmon makes `<socket_dir>/<id>` a symlink to the bundle; the attach
    socket and the ctl/winsz fifos live in the bundle.
    """

    id: str
    name: str
    bundle: str
    log_path: str
    exit_dir: str
    persist_dir: str
    socket_dir: str
    pidfile: str = ""  # default <bundle>/pidfile
    conmon_pidfile: str = ""  # default <bundle>/conmon.pid
    log_size_max: int = -1
    log_level: str = "info"
    terminal: bool = False
    stdin: bool = False
    leave_stdin_open: bool = False
    extra_args: tuple[str, ...] = field(default=())

    @property
    def container_pidfile(self) -> str:
        return self.pidfile or os.path.join(self.bundle, "pidfile")

    @property
    def monitor_pidfile(self) -> str:
        return self.conmon_pidfile or os.path.join(self.bundle, "conmon.pid")

    @property
    def exit_file(self) -> str:
        return os.path.join(self.exit_dir, self.id)


@dataclass(frozen=True)
class Created:
    pid: int  # the container's init process, as the host sees it
    conmon_pid: int  # 0 when conmon's pid file could not be read
    pid_identity: str = ""  # linux.process_identity(pid) just after creation ("" if it was gone already)


def conmon_argv(conmon: str, runtime: Runtime, launch: ConmonLaunch) -> list[str]:
    """conmon's command line, in the shape cri-o builds it."""
    argv = [
        conmon,
        "--api-version",
        "1",
        "-c",
        launch.id,
        "-u",
        launch.id,
        "-n",
        launch.name,
        "-r",
        runtime.binary,
        "-b",
        launch.bundle,
        "-p",
        launch.container_pidfile,
        "--exit-dir",
        launch.exit_dir,
        "--persist-dir",
        launch.persist_dir,
        "--socket-dir-path",
        launch.socket_dir,
        "-l",
        f"k8s-file:{launch.log_path}",
        "--log-level",
        launch.log_level,
    ]
    for arg in runtime.conmon_runtime_args():
        argv += ["--runtime-arg", arg]
    argv += ["--conmon-pidfile", launch.monitor_pidfile]
    if runtime.systemd_cgroup:
        argv.append("--systemd-cgroup")
    if launch.log_size_max > 0:
        argv += ["--log-size-max", str(launch.log_size_max)]
    if launch.terminal:
        argv.append("--terminal")
    if launch.stdin:
        argv.append("--stdin")
        if launch.leave_stdin_open:
            argv.append("--leave-stdin-open")
    return argv + list(launch.extra_args)


def _conmon_env(sync_fd: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED_ENV}
    env[SYNC_PIPE_ENV] = str(sync_fd)
    return env


def parse_sync_message(line: bytes) -> tuple[int, str]:
    """(pid or -1, message) from one sync pipe line; ValueError when it is not conmon's JSON."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError(f"not a JSON object: {line!r}")
    value = data.get("data", data.get("pid"))
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"no pid in {line!r}")
    message = data.get("message") or ""
    return value, str(message)


async def _read_sync_line(read_fd: int) -> bytes:
    """The first line conmon writes on the sync pipe; b'' when every writer closed without one."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(loop=loop)
    pipe = os.fdopen(read_fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader, loop=loop), pipe)
    try:
        return await reader.readline()
    finally:
        transport.close()


def read_pid(path: str) -> int:
    """A pid file's pid; 0 when it is missing or unreadable."""
    try:
        return int(Path(path).read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


async def create(
    runtime: Runtime, conmon: str, launch: ConmonLaunch, *, timeout: float = CREATE_TIMEOUT, prepared: bool = False
) -> Created:
    """Create the container of `launch.bundle` under conmon; returns its pid once `runtime create` succeeded.

    The container is created, not started: call `start`. On any failure nothing is
    left behind (runtime state, socket symlink, stale pid files) and OciRuntimeError
    carries the runtime's or conmon's message. `prepared`: the caller ran `prepare(launch)` already
    (with its own file work, saving a trip to a worker thread).
    """
    if not prepared:
        await offload.to_thread(prepare, launch)
    argv = conmon_argv(conmon, runtime, launch)
    what = f"creating container {launch.id} with conmon"
    started = time.monotonic()
    try:
        async with asyncio.timeout(timeout):
            line = await _launch(argv, what, launch.bundle, timeout)
        if not line:
            raise OciRuntimeError(what, "conmon exited without reporting the container pid (see its syslog lines)")
        try:
            pid, message = parse_sync_message(line)
        except ValueError as exc:
            raise OciRuntimeError(what, f"unexpected message from conmon: {exc}") from None
        if pid <= 0:
            raise OciRuntimeError(what, runtime_message(message) or f"conmon reported {pid}")
    except BaseException as exc:
        event(log, logging.WARNING, "container create failed", id=launch.id, error=str(exc) or repr(exc))
        await _undo_create(runtime, launch)
        if isinstance(exc, TimeoutError):
            raise OciRuntimeError(what, f"timed out after {timeout:g}s") from None
        raise
    event(
        log,
        logging.DEBUG,
        "container created",
        id=launch.id,
        pid=pid,
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )
    conmon_pid = read_pid(launch.monitor_pidfile)
    if conmon_pid > 0:
        await offload.to_thread(monitor_cgroup.move_monitor, conmon_pid, launch.id)
    return Created(pid=pid, conmon_pid=conmon_pid, pid_identity=linux.process_identity(pid))


def prepare(launch: ConmonLaunch) -> None:
    """Blocking: the directories conmon writes into, and no stale file it could be mistaken by."""
    for directory in (launch.exit_dir, launch.persist_dir, launch.socket_dir):
        os.makedirs(directory, 0o700, True)
    for stale in (launch.exit_file, launch.container_pidfile, launch.monitor_pidfile):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(stale)


async def _launch(argv: list[str], what: str, cwd: str, timeout: float = CREATE_TIMEOUT) -> bytes:
    """Run conmon's first process to its (quick) exit, then read the first sync pipe line."""
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        # As cri-o does: conmon's cgroup v1 OOM handler writes an `oom` marker into its cwd.
        spawn = Spawn(argv, env=_conmon_env(write_fd), cwd=cwd, pass_fds=(write_fd,))
        try:
            done = await communicate(spawn, timeout=timeout)
        except OSError as exc:
            raise OciRuntimeError(what, f"cannot start {argv[0]}: {exc.strerror}") from exc
        finally:
            # Only conmon may hold the write end: EOF then means it is gone.
            os.close(write_fd)
        if done.returncode != 0:
            said = (done.stderr or done.stdout).decode(errors="replace").strip()
            status = "was killed: timed out" if done.returncode is None else f"exited with status {done.returncode}"
            raise OciRuntimeError(what, f"conmon {status}: {said}")
        fd, read_fd = read_fd, -1
        return await _read_sync_line(fd)
    finally:
        if read_fd >= 0:
            os.close(read_fd)


async def _undo_create(runtime: Runtime, launch: ConmonLaunch) -> None:
    """After a failed create: stop conmon if it still runs, drop the runtime state and conmon's leftovers."""
    conmon_pid = read_pid(launch.monitor_pidfile)
    if conmon_pid > 0:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(conmon_pid, signals.SIGKILL)
    try:
        await delete(runtime, launch.id)
    except OciRuntimeError as exc:
        event(log, logging.ERROR, "removing the runtime state of a failed create", id=launch.id, error=str(exc))
    for leftover in (
        os.path.join(launch.socket_dir, launch.id),
        launch.container_pidfile,
        launch.monitor_pidfile,
    ):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leftover)


# ---- exit files ------------------------------------------------------------------------------


def read_exit(exit_dir: str, container_id: str) -> int | None:
    """The exit code conmon recorded, or None while the container runs (or never ran)."""
    try:
        text = Path(exit_dir, container_id).read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return int(text)
    except ValueError:
        # conmon writes the file atomically; a partial read means it is being replaced right now.
        return None


async def wait_exit(exit_dir: str, container_id: str, timeout: float, *, interval: float = 0.05) -> int:
    """Wait for conmon's exit file `<exit_dir>/<id>`; its exit code (128+signal after a signal).

    Raises TimeoutError when the container is still running after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        code = await offload.to_thread(read_exit, exit_dir, container_id)
        if code is not None:
            return code
        if time.monotonic() >= deadline:
            raise TimeoutError(f"container {container_id} did not exit within {timeout:g}s")
        await asyncio.sleep(interval)


# ---- runtime commands ------------------------------------------------------------------------


@dataclass(frozen=True)
class RuntimeState:
    """`<runtime> state <id>`: the OCI state of one container."""

    id: str
    status: str  # creating | created | running | stopped (runc also says paused)
    pid: int
    bundle: str
    created: str = ""  # RFC 3339, as the runtime wrote it
    annotations: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RuntimeState:
        return cls(
            id=str(data.get("id", "")),
            status=str(data.get("status", "")),
            pid=int(data.get("pid") or 0),
            bundle=str(data.get("bundle", "")),
            created=str(data.get("created", "")),
            annotations={str(k): str(v) for k, v in (data.get("annotations") or {}).items()},
        )


async def _runtime(runtime: Runtime, *command: str, timeout: float, stdin: bytes | None = None) -> bytes:
    argv = runtime.argv(*command)
    try:
        done = await run(argv, timeout=timeout, stdin=stdin)
    except CommandError as exc:
        said = runtime_message(exc.stderr) or str(exc)
        what = f"{runtime.name} {' '.join(command)}"
        if _not_found(said):
            raise ContainerNotFound(what, said) from exc
        raise OciRuntimeError(what, said) from exc
    return done.stdout


async def start(runtime: Runtime, container_id: str, *, init_pid: int = 0, timeout: float = RUNTIME_TIMEOUT) -> None:
    """Start a created container (its process execs the spec's args).

    runc's containers are started through their exec fifo, as `runc start` does, without its exec (see
    exec_fifo); that needs the init's pid, to notice an init that died before it got there.
    """
    if init_pid <= 0 or not await exec_fifo.speaks_exec_fifo(runtime.binary):
        await _runtime(runtime, "start", container_id, timeout=timeout)
        return
    what = f"{runtime.name} start {container_id} (through its exec fifo)"
    try:
        async with asyncio.timeout(timeout):
            await exec_fifo.start(exec_fifo.fifo_path(runtime.root, container_id), init_pid)
    except TimeoutError as exc:
        raise OciRuntimeError(what, f"timed out after {timeout:g}s") from exc
    except exec_fifo.ExecFifoError as exc:
        raise OciRuntimeError(what, str(exc)) from exc


async def kill(
    runtime: Runtime,
    container_id: str,
    signal: str | int = "KILL",
    *,
    all_processes: bool = False,
    timeout: float = RUNTIME_TIMEOUT,
) -> bool:
    """Send a signal; False (not an error) when the container is gone or no longer running."""
    command = ["kill"]
    if all_processes:
        command.append("--all")
    command += [container_id, str(signal)]
    try:
        await _runtime(runtime, *command, timeout=timeout)
    except ContainerNotFound:
        return False
    except OciRuntimeError as exc:
        if _not_running(exc.message):
            return False
        raise
    return True


async def update(
    runtime: Runtime, container_id: str, resources: dict[str, Any], *, timeout: float = RUNTIME_TIMEOUT
) -> None:
    """Apply OCI linux.resources to a live container's cgroup (`<runtime> update --resources -`)."""
    body = json.dumps(resources).encode()
    await _runtime(runtime, "update", "--resources", "-", container_id, timeout=timeout, stdin=body)


async def delete(runtime: Runtime, container_id: str, *, force: bool = True, timeout: float = RUNTIME_TIMEOUT) -> None:
    """Remove the runtime's state (with force, killing a running container first); gone already is fine."""
    command = ["delete", "--force", container_id] if force else ["delete", container_id]
    with contextlib.suppress(ContainerNotFound):
        await _runtime(runtime, *command, timeout=timeout)


async def state(runtime: Runtime, container_id: str, *, timeout: float = RUNTIME_TIMEOUT) -> RuntimeState:
    """The container's OCI state; ContainerNotFound when the runtime has none."""
    out = await _runtime(runtime, "state", container_id, timeout=timeout)
    try:
        data = json.loads(out)
    except ValueError as exc:
        raise OciRuntimeError(f"{runtime.name} state {container_id}", f"not JSON: {out[:200]!r}") from exc
    if not isinstance(data, dict):
        raise OciRuntimeError(f"{runtime.name} state {container_id}", f"not a JSON object: {out[:200]!r}")
    return RuntimeState.from_json(data)


async def list_containers(runtime: Runtime, *, timeout: float = RUNTIME_TIMEOUT) -> list[RuntimeState]:
    """Every container under the runtime's root (runc prints `null` when there are none)."""
    out = await _runtime(runtime, "list", "--format", "json", timeout=timeout)
    try:
        data = json.loads(out or b"null")
    except ValueError as exc:
        raise OciRuntimeError(f"{runtime.name} list", f"not JSON: {out[:200]!r}") from exc
    if data is None:
        return []
    if not isinstance(data, list):
        raise OciRuntimeError(f"{runtime.name} list", f"not a JSON list: {out[:200]!r}")
    return [RuntimeState.from_json(item) for item in data if isinstance(item, dict)]


def conmon_binary(config: Config) -> str:
    """The configured conmon, checked: OciRuntimeError when it is missing."""
    found = shutil.which(config.runtime.conmon)
    if found is None:
        raise OciRuntimeError("conmon", f"{config.runtime.conmon!r} not found")
    return found


def container_runs(pid: int, conmon_pid: int, identity: str) -> bool:
    """Whether the container process recorded as `pid` still runs: that PID alive and still that process.

    Its identity (linux.process_identity) tells it from a later process given the same PID; rows from
    before identities were kept fall back on the parent: a container's process is its conmon's child.
    """
    stat = linux.proc_stat(pid) if pid > 0 else None
    if stat is None or not stat.running:
        return False
    if identity:
        return stat.identity() == identity
    return conmon_pid > 0 and stat.ppid == conmon_pid


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (absent, or a zombie waiting for its parent)."""
    if pid <= 0:
        return True
    stat = linux.proc_stat(pid)
    return stat is None or not stat.running


async def wait_gone(pids: Sequence[int], timeout: float) -> bool:
    """Wait until every pid is gone; False when some still run after `timeout` seconds.

    Woken by a pidfd, which turns readable the moment the process exits: a
    removal waiting for conmon must not pay a polling interval each time.
    """
    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(_exited(pid) for pid in pids))
    except TimeoutError:
        return False
    return True


async def _exited(pid: int) -> None:
    if process_gone(pid):
        return
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await fdwait.ready(pidfd)
    finally:
        os.close(pidfd)
