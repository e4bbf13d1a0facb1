"""Runtime handlers from config: the binary each resolves to and what it supports.

User namespaces do not depend on the handler's own idmapped-mount support (runc 1.1.5 has none and no
`features` command): criopy joins the pod's pinned user namespace through the spec and makes the
idmapped mounts itself (cri.system.idmap). So a handler supports them when its binary exists and the
kernel does what criopy needs, which a probe at start tries for real on the storage root.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from dataclasses import dataclass, replace
from typing import Any

from cri.config import Config, RuntimeHandlerConfig
from cri.log import event
from cri.system import idmap, offload
from cri.system.process import CommandError, run

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 10.0


@dataclass(frozen=True)
class HandlerInfo:
    name: str
    binary: str | None
    recursive_read_only_mounts: bool = False
    user_namespaces: bool = False
    problem: str = ""


def features_from(report: dict[str, Any]) -> tuple[bool, bool]:
    """(recursive read-only mounts, user namespaces) from an OCI `features` document."""
    rro = "rro" in (report.get("mountOptions") or [])
    linux = report.get("linux") or {}
    idmap = ((linux.get("mountExtensions") or {}).get("idmap") or {}).get("enabled") is True
    userns = "user" in (linux.get("namespaces") or []) and idmap
    return rro, userns


async def probe(name: str, handler: RuntimeHandlerConfig) -> HandlerInfo:
    binary = shutil.which(handler.path)
    if binary is None:
        return HandlerInfo(name, None, problem=f"runtime binary {handler.path!r} not found")
    try:
        done = await run([binary, *handler.runtime_args, "features"], timeout=PROBE_TIMEOUT_SECONDS)
        rro, userns = features_from(json.loads(done.stdout))
    except (CommandError, ValueError, AttributeError) as exc:
        # Older runtimes (crun < 1.9) have no `features`: they work, but claim no extras.
        event(log, logging.INFO, "runtime features unknown", handler=name, binary=binary, reason=str(exc))
        return HandlerInfo(name, binary)
    return HandlerInfo(name, binary, recursive_read_only_mounts=rro, user_namespaces=userns)


def with_user_namespaces(info: HandlerInfo, kernel_problem: str) -> HandlerInfo:
    """The handler as criopy runs it: user namespaces when its binary exists and the kernel probe passed."""
    works = info.binary is not None and not kernel_problem
    return replace(info, user_namespaces=works)


async def _userns_problem(config: Config) -> str:
    """Why no pod can have its own user namespace here ("" if it can): the storage driver, then the kernel probe."""
    if config.storage.driver != "overlay":
        # A container's rootfs in a user namespace is an overlay of idmapped layers; a vfs copy cannot be one.
        return f"the {config.storage.driver} storage driver cannot show layers through an idmapping (overlay can)"
    return await offload.to_thread(idmap.probe, config.root)


class RuntimeHandlers:
    """The configured handlers, probed at start and after every config reload."""

    def __init__(self) -> None:
        self.handlers: dict[str, HandlerInfo] = {}
        self.default = ""
        self._userns_problem = ""

    def userns_problem(self, name: str) -> str:
        """Why the handler cannot run a pod in its own user namespace; "" when it can."""
        info = self.handlers.get(name)
        if info is None or info.user_namespaces:
            return ""  # an unknown handler is refused as such elsewhere
        return self._userns_problem or info.problem or f"runtime binary of handler {name!r} not found"

    async def refresh(self, config: Config) -> None:
        names = list(config.runtime.runtimes)
        infos = await asyncio.gather(*(probe(n, config.runtime.runtimes[n]) for n in names))
        userns_problem = self._userns_problem = await _userns_problem(config)
        if userns_problem:
            event(log, logging.WARNING, "user namespaces unavailable", reason=userns_problem)
        infos = [with_user_namespaces(info, userns_problem) for info in infos]
        self.handlers = dict(zip(names, infos, strict=True))
        self.default = config.runtime.default_runtime
        for info in infos:
            event(
                log,
                logging.INFO,
                "runtime handler",
                handler=info.name,
                binary=info.binary,
                recursive_read_only_mounts=info.recursive_read_only_mounts,
                user_namespaces=info.user_namespaces,
                problem=info.problem or None,
            )
