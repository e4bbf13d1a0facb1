"""Creating, pinning and releasing a pod's net, ipc and uts namespaces (no pause container).

A short-lived child (podsandbox.nsinit) unshares, sets the hostname and the
namespaced sysctls, and bind-mounts its namespaces onto pin files; the pins
keep the namespaces alive after it exits, and containers join them by path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterable, Mapping

from cri import linux
from cri.process import CommandError, run

log = logging.getLogger(__name__)

NSINIT_TIMEOUT = 30.0


class NamespaceError(Exception):
    pass


async def create(pins: Mapping[str, str], hostname: str, sysctls: Mapping[str, str]) -> None:
    """Make the namespaces named in pins ({'net': path, ...}) and pin them; all or nothing."""
    request = {"pins": dict(pins), "hostname": hostname, "sysctls": dict(sysctls)}
    try:
        await run(
            [sys.executable, "-m", "podsandbox.nsinit"], timeout=NSINIT_TIMEOUT, stdin=json.dumps(request).encode()
        )
    except CommandError as exc:
        # The child undoes its own pins on failure; a timeout kill may leave some behind.
        await asyncio.to_thread(release_all, pins.values())
        raise NamespaceError(f"creating the pod namespaces ({', '.join(pins)}): {exc.stderr.strip() or exc}") from exc


def release(path: str) -> None:
    """Unpin one namespace: the kernel frees it once no process is left in it. Idempotent."""
    linux.umount_if_mounted(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def release_all(paths: Iterable[str]) -> None:
    for path in paths:
        release(path)


def is_pinned(path: str) -> bool:
    return any(m.mount_point == path for m in linux.mounts_under(os.path.dirname(path)))
