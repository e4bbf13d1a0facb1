"""Running one CNI plugin binary, the way libcni's invoke package does.

The plugin gets the CNI_* environment variables (plus PATH, nothing else from
our environment) and its network configuration on stdin. Every call has a
timeout; on expiry the plugin's whole process group is killed. Every error
names the plugin and carries its stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

from cni.conf import NetworkConfigList, PluginConf, find_plugin
from cni.events import event
from cni.handoff import Deliver, in_pool
from cni.rawexec import run_to_exit
from cni.result import CniError, Result, ResultError, parse_error, parse_result

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# How long to wait for the pipes to close after killing a timed-out plugin.
_KILL_GRACE = 2.0


class InvocationError(CniError):
    """The plugin could not be run, timed out, or printed something that is not a result."""

    def __init__(self, plugin: str, problem: str, stderr: str = "") -> None:
        text = f"plugin {plugin} {problem}"
        extra = stderr.strip()
        if extra:
            text += f" (stderr: {extra if len(extra) <= 4000 else extra[:4000] + '...[truncated]'})"
        super().__init__(text)
        self.plugin = plugin
        self.stderr = stderr


@dataclass(frozen=True)
class CallHooks:
    """What the embedding program adds around each plugin call (the library imports nothing of it)."""

    # Told of every call once it ended: plugin type, command, seconds, whether it failed (for metrics).
    observe: Callable[[str, str, float, bool], None] | None = None
    # Variables added to each plugin's environment (for example a mark by which a restarted program finds
    # the plugins it left running when it was killed).
    env: Mapping[str, str] = field(default_factory=dict)
    # How a pool thread hands a call's outcome to the caller's event loop (default: a call_soon_threadsafe
    # each; a program may batch them).
    deliver: Deliver | None = None


@dataclass(frozen=True)
class Invocation:
    """One plugin call: what goes into the CNI_* variables, and where to find the binary."""

    plugin_type: str
    command: str
    plugin_dirs: tuple[str, ...]
    timeout: float
    container_id: str = ""
    netns: str = ""
    ifname: str = ""
    args: Mapping[str, str] = field(default_factory=dict)
    network: str = ""  # for the log line only
    hooks: CallHooks = field(default_factory=CallHooks)


def format_args(args: Mapping[str, str]) -> str:
    """CNI_ARGS: `K=V;K=V`. Keys and values may hold neither ';' nor '=' (plugins split on both)."""
    for key, value in args.items():
        if not key or ";" in key or "=" in key:
            raise ValueError(f"args: invalid CNI_ARGS key {key!r}")
        if ";" in value or "=" in value:
            raise ValueError(f"args: invalid CNI_ARGS value {value!r} for key {key!r}")
    return ";".join(f"{k}={v}" for k, v in args.items())


def plugin_env(inv: Invocation) -> dict[str, str]:
    env = {
        **inv.hooks.env,
        "CNI_COMMAND": inv.command,
        "CNI_PATH": ":".join(inv.plugin_dirs),
        "PATH": os.environ.get("PATH") or DEFAULT_PATH,
    }
    if inv.command not in ("VERSION", "STATUS"):
        env.update(
            CNI_CONTAINERID=inv.container_id,
            CNI_NETNS=inv.netns,
            CNI_IFNAME=inv.ifname,
            CNI_ARGS=format_args(inv.args),
        )
    return env


def plugin_config(
    network: NetworkConfigList,
    plugin: PluginConf,
    prev_result: Mapping[str, Any] | None = None,
    capability_args: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON a plugin of the list reads on stdin (libcni's buildOneConfig + injectRuntimeConfig)."""
    conf = dict(plugin.raw)
    conf["name"] = network.name
    conf["cniVersion"] = network.cni_version
    if prev_result is not None:
        conf["prevResult"] = dict(prev_result)
    declared = plugin.raw.get("capabilities")
    runtime: dict[str, Any] = {}
    if isinstance(declared, dict) and capability_args:
        runtime = {key: value for key, value in capability_args.items() if declared.get(key) is True}
    if runtime:
        conf["runtimeConfig"] = runtime
    else:
        conf.pop("runtimeConfig", None)
    return conf


# Plugins run in threads of this pool, not on the caller's event loop: a plugin's start (vfork and
# exec, its pipes) and the wait for it would otherwise hold the loop for each of the three or four
# plugins of every pod's ADD and DEL. The threads sleep with the GIL released, in one poll() of the
# pipes and the exit (rawexec).
_pool = ThreadPoolExecutor(max_workers=64, thread_name_prefix="cni-plugin")


class _Plugin:
    """A plugin process a pool thread runs, for the event loop to kill (its group) when the call is given up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._given_up = False

    def start(self, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes] | None:
        with self._lock:
            if self._given_up:
                return None
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,
            )
            return self._proc

    def kill(self) -> None:
        with self._lock:
            self._given_up = True
            if self._proc is not None and self._proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self._proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    self._proc.kill()


def _communicate_blocking(
    plugin: _Plugin, argv: list[str], env: dict[str, str], stdin: bytes, timeout: float
) -> tuple[int | None, bytes, bytes]:
    proc = plugin.start(argv, env)
    if proc is None:
        return None, b"", b""
    return run_to_exit(proc, stdin, timeout, plugin.kill, _KILL_GRACE)


def off_loop(call: Callable[[], T], hooks: CallHooks) -> asyncio.Future[T]:
    """call() in a thread of the plugins' pool; its outcome comes back to the running loop as `hooks` say."""
    return in_pool(_pool, call, hooks.deliver)


async def _in_thread(inv: Invocation, stdin: bytes, parse: Callable[[bytes], T]) -> T:
    """The whole call in a pool thread (finding the plugin, running it, parsing its stdout), so that the
    event loop only waits; the process group is killed when the caller is cancelled."""
    plugin = _Plugin()
    running = off_loop(partial(_call_blocking, plugin, inv, stdin, parse), inv.hooks)
    try:
        return await asyncio.shield(running)
    except asyncio.CancelledError:
        plugin.kill()
        raise


async def _call(inv: Invocation, stdin: bytes, parse: Callable[[bytes], T]) -> T:
    """Run the plugin and parse its stdout; log one line for the call, at warning when it failed."""
    started = time.monotonic()
    try:
        value = await _in_thread(inv, stdin, parse)
    except Exception as exc:
        _log(inv, started, exc)
        raise
    _log(inv, started, None)
    return value


def _call_blocking(plugin: _Plugin, inv: Invocation, stdin: bytes, parse: Callable[[bytes], T]) -> T:
    path = find_plugin(inv.plugin_type, list(inv.plugin_dirs))
    if path is None:
        raise InvocationError(inv.plugin_type, f"not found in {':'.join(inv.plugin_dirs) or '(no plugin dirs)'}")
    try:
        argv = [str(path)]
        status, stdout, stderr_bytes = _communicate_blocking(plugin, argv, plugin_env(inv), stdin, inv.timeout)
    except OSError as exc:
        raise InvocationError(
            inv.plugin_type, f"{inv.command} cannot be started ({path}): {exc.strerror or exc}"
        ) from exc
    stderr = stderr_bytes.decode(errors="replace")
    if status is None:
        raise InvocationError(inv.plugin_type, f"{inv.command} timed out after {inv.timeout:g}s", stderr)
    if status != 0:
        raise parse_error(inv.plugin_type, stdout, stderr, status, inv.command)
    return parse(stdout)


def _log(inv: Invocation, started: float, error: Exception | None) -> None:
    if inv.hooks.observe is not None:
        inv.hooks.observe(inv.plugin_type, inv.command, time.monotonic() - started, error is not None)
    event(
        log,
        logging.DEBUG if error is None else logging.WARNING,
        "cni plugin call" if error is None else "cni plugin call failed",
        plugin=inv.plugin_type,
        command=inv.command,
        network=inv.network or None,
        container_id=inv.container_id or None,
        ifname=inv.ifname or None,
        duration_ms=round((time.monotonic() - started) * 1000, 1),
        error=str(error) if error is not None else None,
    )


async def exec_plugin(inv: Invocation, stdin: bytes) -> bytes:
    """Run the plugin; its stdout on success. PluginError on a non-zero exit, InvocationError otherwise."""
    return await _call(inv, stdin, lambda stdout: stdout)


async def exec_with_result(inv: Invocation, stdin: bytes) -> Result:
    """ADD: run the plugin and parse its result; a malformed result is an InvocationError naming it."""

    def parse(stdout: bytes) -> Result:
        try:
            return parse_result(stdout)
        except ResultError as exc:
            raise InvocationError(inv.plugin_type, f"{inv.command} returned an invalid result: {exc}") from None

    return await _call(inv, stdin, parse)


async def exec_without_result(inv: Invocation, stdin: bytes) -> None:
    """DEL, CHECK, STATUS: only the exit status matters; stdout is ignored."""
    await _call(inv, stdin, lambda stdout: None)


async def exec_version(inv: Invocation, cni_version: str) -> list[str]:
    """VERSION: the spec versions the plugin supports."""

    def parse(stdout: bytes) -> list[str]:
        try:
            data = json.loads(stdout)
        except ValueError:
            data = None
        versions = data.get("supportedVersions") if isinstance(data, dict) else None
        if not isinstance(versions, list) or not all(isinstance(v, str) for v in versions):
            text = stdout.decode(errors="replace").strip()[:200]
            raise InvocationError(inv.plugin_type, f"VERSION returned no supportedVersions list: {text!r}")
        return list(versions)

    return await _call(inv, json.dumps({"cniVersion": cni_version}).encode(), parse)
