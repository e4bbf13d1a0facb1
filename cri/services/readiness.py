"""RuntimeReady: the default runtime and the container monitor are usable."""

from __future__ import annotations

import os
from dataclasses import dataclass

from cri.config import Config
from cri.oci.handlers import RuntimeHandlers


@dataclass(frozen=True)
class Readiness:
    ready: bool
    reason: str = ""
    message: str = ""


def runtime_readiness(config: Config, handlers: RuntimeHandlers) -> Readiness:
    default = handlers.handlers.get(config.runtime.default_runtime)
    if default is None or default.binary is None:
        problem = default.problem if default else "not probed yet"
        return Readiness(
            False, "RuntimeBinaryMissing", f"default runtime {config.runtime.default_runtime!r}: {problem}"
        )
    if not os.access(config.runtime.conmon, os.X_OK):
        return Readiness(
            False, "MonitorBinaryMissing", f"conmon not found or not executable at {config.runtime.conmon}"
        )
    return Readiness(True)
