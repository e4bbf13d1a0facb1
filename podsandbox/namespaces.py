"""Creating, pinning and releasing a pod's namespaces (no pause container).

A throwaway thread of the daemon (`cri.system.nsthread`) unshares net, ipc and
uts: Linux keeps these three namespaces per thread, so nothing else in the
daemon moves. The thread brings `lo` up, sets the hostname and the namespaced
sysctls, and bind-mounts its namespaces onto pin files; the pins keep the
namespaces alive after the thread exits, and containers join them by path. A
thread costs a few milliseconds where a child interpreter cost seventy.

A pod with its own user namespace (userns_options mode POD) cannot be made by
a thread: a multi-threaded process can neither unshare nor enter a user
namespace, and the other three must be owned by it. A short child process
(podsandbox.nschild) makes all four; the daemon writes the maps and pins them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sys
from collections.abc import Iterable, Mapping

from cri.errors import InvalidArgument
from cri.system import idmap, linux, nsthread
from cri.system.idmap import IdMapping
from podsandbox.nschild import SysctlRefused, child_args, sysctl_path, unshare_and_configure
from podsandbox.spec import UserNamespace

__all__ = ["SysctlRefused", "sysctl_path"]
CHILD_TIMEOUT = 10.0  # seconds for each step of the user namespace child

# The child interpreter: isolated, no site packages, the project's directory first on its path.
_NSCHILD = """\
import sys
sys.path.insert(0, sys.argv[1])
from podsandbox import nschild
sys.exit(nschild.child_main(sys.argv[2:]))
"""


class NamespaceError(Exception):
    pass


async def create(
    pins: Mapping[str, str], hostname: str, sysctls: Mapping[str, str], userns: UserNamespace | None = None
) -> None:
    """Make the namespaces named in pins ({'net': path, ...}) and pin them; all or nothing.

    With userns (pins then has 'user'), the others are made owned by a new user namespace with its maps.
    """
    if userns is not None:
        await _create_with_userns(pins, hostname, sysctls, userns.uids, userns.gids)
        return
    if not pins:
        return
    made = functools.partial(_make, dict(pins), hostname, dict(sysctls))
    try:
        await nsthread.in_fresh_thread(made, "pod-namespaces")
    except SysctlRefused as exc:
        raise InvalidArgument(f"config.linux.sysctls[{exc.key}]", str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise NamespaceError(f"creating the pod namespaces ({', '.join(pins)}): {exc}") from exc


def _make(pins: dict[str, str], hostname: str, sysctls: dict[str, str]) -> None:
    """In a thread of its own, which is left in the new namespaces and then exits."""
    unshare_and_configure(pins, hostname, sysctls)
    made: list[str] = []
    try:
        for kind, path in pins.items():
            _pin(kind, path)
            made.append(path)
    except BaseException:
        release_all(made)
        raise


async def _create_with_userns(
    pins: Mapping[str, str], hostname: str, sysctls: Mapping[str, str], uids: IdMapping, gids: IdMapping
) -> None:
    """Make a user namespace with these maps (pins['user']) and the other pins' namespaces owned by it."""
    others = [kind for kind in pins if kind != "user"]
    try:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",
            "-S",
            "-c",
            _NSCHILD,
            idmap.package_parent(),
            *child_args(others, hostname, sysctls),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise NamespaceError(f"starting the user namespace child {sys.executable}: {exc}") from exc
    made: list[str] = []
    try:
        await _expect(child, "unshared")
        try:
            idmap.write_maps(child.pid, uids, gids)
        except OSError as exc:
            raise NamespaceError(f"writing the user namespace maps: {exc}") from exc
        assert child.stdin is not None
        child.stdin.write(b"mapped\n")
        await _expect(child, "ready")
        for kind, path in pins.items():
            _pin(kind, path, f"/proc/{child.pid}/ns/{kind}")
            made.append(path)
    except BaseException:
        release_all(made)
        raise
    finally:
        await _finish(child)


async def _expect(child: asyncio.subprocess.Process, wanted: str) -> None:
    assert child.stdout is not None
    try:
        raw = await asyncio.wait_for(child.stdout.readline(), CHILD_TIMEOUT)
    except TimeoutError:
        raise NamespaceError(f"the user namespace child did not say {wanted!r} within {CHILD_TIMEOUT:g}s") from None
    line = raw.decode(errors="replace").strip()
    if line == wanted:
        return
    if line.startswith("sysctl\t"):
        _, key, rest = line.split("\t", 2)
        value, code = rest.rsplit("\t", 1)  # a value may hold tabs, as the kernel prints some ("32768\t60999")
        raise InvalidArgument(f"config.linux.sysctls[{key}]", f"sysctl {key}={value}: {os.strerror(int(code))}")
    await _finish(child)
    stderr = (await child.stderr.read()).decode(errors="replace").strip() if child.stderr else ""
    raise NamespaceError(f"the user namespace child exited ({child.returncode}) before {wanted!r}: {stderr}")


async def _finish(child: asyncio.subprocess.Process) -> None:
    """Close the child's stdin (it exits then) and reap it; killed if it does not go in time."""
    if child.stdin is not None and not child.stdin.is_closing():
        child.stdin.close()
    try:
        await asyncio.wait_for(child.wait(), CHILD_TIMEOUT)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()


def _pin(kind: str, path: str, source: str = "") -> None:
    os.makedirs(os.path.dirname(path), mode=0o711, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o444)
    os.close(fd)
    # thread-self, not self: /proc/self is the main thread, which never left the host's namespaces.
    linux.mount(source or f"/proc/thread-self/ns/{kind}", path, None, linux.MS_BIND)


def release(path: str) -> None:
    """Unpin one namespace: the kernel frees it once no process is left in it. Idempotent."""
    linux.umount_if_mounted(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def release_all(paths: Iterable[str]) -> None:
    for path in paths:
        release(path)


def is_pinned(path: str) -> bool:
    """Whether a namespace is still mounted on the pin file.

    The mount shows as a device other than the directory's (nsfs, not the runroot's file system): two
    stats, where reading the mount table cost a millisecond with a full node's pins and rootfs mounts in it.
    """
    try:
        return os.stat(path).st_dev != os.stat(os.path.dirname(path)).st_dev
    except FileNotFoundError:
        return False
