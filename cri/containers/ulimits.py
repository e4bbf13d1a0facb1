"""Resource limits every container starts with (`runtime.default_ulimits`), in cri-o's `name=soft:hard` form.

The CRI carries no rlimits, so without this option a container inherits
conmon's, which are the daemon's. A hard limit above the daemon's own can
only be set with CAP_SYS_RESOURCE, which some hosts withhold from the whole
node: such a value is refused when the configuration is loaded, because
every container would otherwise fail in `runc create`.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

from cri.containers import capabilities

UNLIMITED = resource.RLIM_INFINITY
# Linux rlimit numbers (asm-generic/resource.h) by the short names docker, cri-o and ulimit(1) use;
# Python's resource module lacks some of them (RLIMIT_LOCKS).
NAMES: dict[str, int] = {
    "cpu": 0,
    "fsize": 1,
    "data": 2,
    "stack": 3,
    "core": 4,
    "rss": 5,
    "nproc": 6,
    "nofile": 7,
    "memlock": 8,
    "as": 9,
    "locks": 10,
    "sigpending": 11,
    "msgqueue": 12,
    "nice": 13,
    "rtprio": 14,
    "rttime": 15,
}


@dataclass(frozen=True)
class Ulimit:
    name: str
    soft: int
    hard: int

    def to_oci(self) -> dict[str, Any]:
        return {"type": f"RLIMIT_{self.name.upper()}", "soft": _oci_value(self.soft), "hard": _oci_value(self.hard)}


def _oci_value(value: int) -> int:
    # The OCI spec is uint64: unlimited is all ones, as RLIM_INFINITY is in the kernel.
    return 2**64 - 1 if value == UNLIMITED else value


def _number(text: str) -> int:
    if text in ("-1", "unlimited"):
        return UNLIMITED
    if not text.isdigit():
        raise ValueError(f"{text!r} is not a number, -1 or 'unlimited'")
    return int(text)


def parse(text: str) -> Ulimit:
    """`nofile=1024:2048` or `nofile=1024` (soft and hard alike)."""
    name, sep, values = text.partition("=")
    name = name.strip().lower()
    if not sep or name not in NAMES:
        raise ValueError(f"expected name=soft[:hard] with a name among {', '.join(sorted(NAMES))}, got {text!r}")
    soft_text, _, hard_text = values.strip().partition(":")
    soft = _number(soft_text)
    hard = _number(hard_text) if hard_text else soft
    if _above(soft, hard):
        raise ValueError(f"soft limit {soft_text} is above hard limit {hard_text} in {text!r}")
    return Ulimit(name, soft, hard)


def _text(value: int) -> str:
    return "unlimited" if value == UNLIMITED else str(value)


def _above(value: int, limit: int) -> bool:
    return limit != UNLIMITED and (value == UNLIMITED or value > limit)


def settable(limit: Ulimit) -> str | None:
    """Why a container could not be given `limit` on this host, or None if it can."""
    if capabilities.has_effective("CAP_SYS_RESOURCE"):
        return None
    _, ours = resource.getrlimit(NAMES[limit.name])
    if _above(limit.hard, ours):
        return (
            f"hard limit {_text(limit.hard)} is above the daemon's own ({_text(ours)}) and this host withholds "
            "CAP_SYS_RESOURCE, which raising it needs"
        )
    return None
