"""Linux capabilities of a container: the configured default set, the CRI's add/drop, privileged mode."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

# Bit number -> name, as in <linux/capability.h>.
CAPABILITY_NAMES: tuple[str, ...] = (
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
)
_KNOWN = frozenset(CAPABILITY_NAMES)


class CapabilityError(ValueError):
    """An unknown capability name; the message names it."""


def normalize(name: str) -> str:
    """'chown' / 'CHOWN' / 'CAP_CHOWN' -> 'CAP_CHOWN'; 'ALL' stays 'ALL'; unknown names raise."""
    upper = name.strip().upper()
    if upper == "ALL":
        return upper
    full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
    if full not in _KNOWN:
        raise CapabilityError(f"unknown capability {name!r}")
    return full


def from_mask(mask: int) -> list[str]:
    """The names of the bits set in a capability mask (unknown high bits ignored)."""
    return [name for bit, name in enumerate(CAPABILITY_NAMES) if mask >> bit & 1]


def process_mask(field: str, status_path: Path = Path("/proc/self/status")) -> int:
    """A capability mask of this process from /proc/self/status ('CapBnd', 'CapEff', ...)."""
    for line in status_path.read_text().splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value.strip(), 16)
    raise LookupError(f"{field} not in {status_path}")


def bounding_set() -> list[str]:
    """What the daemon itself may hold: a privileged container gets exactly this, never more."""
    return from_mask(process_mask("CapBnd"))


def has_effective(name: str) -> bool:
    bit = CAPABILITY_NAMES.index(normalize(name))
    return bool(process_mask("CapEff") >> bit & 1)


def resolve(defaults: Iterable[str], add: Sequence[str], drop: Sequence[str], host: Sequence[str]) -> list[str]:
    """The container's set: defaults, then `add` (ALL = every host capability), then `drop` (ALL = none).

    As containerd does, drop ALL then add X leaves exactly X: adds are applied after a drop of ALL.
    """
    added = [normalize(n) for n in add]
    dropped = [normalize(n) for n in drop]
    caps = [normalize(n) for n in defaults]
    if "ALL" in added:
        caps = list(host)
    if "ALL" in dropped:
        caps = []
    caps += [n for n in added if n != "ALL"]
    out: list[str] = []
    for name in caps:
        if name not in out and (name not in dropped or ("ALL" in dropped and name in added)):
            out.append(name)
    return [n for n in out if n in host]
