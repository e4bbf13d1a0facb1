"""The host platform and picking its manifest out of an OCI index / Docker manifest list.

Matching follows containerd's `platforms` package in spirit: os and architecture
must match (after normalizing aliases such as x86_64 -> amd64); among those, an
exact variant wins, then an entry with no variant (arm64 means v8, arm means v7),
then, for 32-bit arm, older variants the host can also run (v7 runs v6 and v5).
"""

from __future__ import annotations

import platform as _platform
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# uname -m (and a few spellings found in indexes) -> (GOARCH, variant).
_MACHINES: dict[str, tuple[str, str]] = {
    "x86_64": ("amd64", ""),
    "amd64": ("amd64", ""),
    "x86-64": ("amd64", ""),
    "aarch64": ("arm64", "v8"),
    "arm64": ("arm64", "v8"),
    "armv8l": ("arm", "v7"),  # a 32-bit userland on a 64-bit core
    "armv7l": ("arm", "v7"),
    "armv7": ("arm", "v7"),
    "armhf": ("arm", "v7"),
    "armv6l": ("arm", "v6"),
    "armv6": ("arm", "v6"),
    "armel": ("arm", "v6"),
    "armv5tel": ("arm", "v5"),
    "armv5l": ("arm", "v5"),
    "i386": ("386", ""),
    "i486": ("386", ""),
    "i586": ("386", ""),
    "i686": ("386", ""),
    "x86": ("386", ""),
    "ppc64le": ("ppc64le", ""),
    "ppc64": ("ppc64", ""),
    "s390x": ("s390x", ""),
    "riscv64": ("riscv64", ""),
    "mips64": ("mips64", ""),
    "mips64el": ("mips64le", ""),
    "loongarch64": ("loong64", ""),
}

# The variant an entry without one means, per architecture.
_DEFAULT_VARIANT = {"arm64": "v8", "arm": "v7"}


class NoMatchingPlatform(Exception):
    """The index has no manifest for the host; the message lists what it has."""


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


def normalize_arch(architecture: str, variant: str = "") -> tuple[str, str]:
    """(GOARCH, variant) for an architecture name and variant as found in the wild.

    A uname spelling implies its variant (`armv7l` is arm v7, `aarch64` is arm64 v8); a GOARCH
    name does not (`arm64` without a variant stays without one).
    """
    arch = architecture.lower()
    var = variant.lower()
    if var and var[0].isdigit():
        var = "v" + var
    norm_arch, implied = _MACHINES.get(arch, (arch, ""))
    if not var and norm_arch != arch:
        var = implied
    return norm_arch, var


def host_platform(machine: str | None = None, system: str | None = None) -> Platform:
    """The platform of this host, from `platform.machine()` / `platform.system()` unless given."""
    machine = (machine if machine is not None else _platform.machine()).lower()
    os_name = (system if system is not None else _platform.system()).lower() or "linux"
    arch, variant = _MACHINES.get(machine, (machine, ""))
    return Platform(os_name, arch, variant)


def parse_platform(text: str) -> Platform:
    """`linux/arm64/v8` -> Platform; `linux/amd64` without a variant."""
    parts = text.split("/")
    if len(parts) not in (2, 3) or not all(parts):
        raise ValueError(f"invalid platform {text!r}: expected os/architecture[/variant]")
    arch, variant = normalize_arch(parts[1], parts[2] if len(parts) == 3 else "")
    return Platform(parts[0].lower(), arch, variant)


def _entry_platform(entry: Mapping[str, Any]) -> Platform | None:
    raw = entry.get("platform")
    if not isinstance(raw, Mapping):
        return None
    os_name = raw.get("os")
    arch = raw.get("architecture")
    variant = raw.get("variant") or ""
    if not isinstance(os_name, str) or not isinstance(arch, str) or not isinstance(variant, str):
        return None
    norm_arch, norm_variant = normalize_arch(arch, variant)
    return Platform(os_name.lower(), norm_arch, norm_variant)


def _rank(candidate: Platform, host: Platform) -> int | None:
    """Lower is better; None when the host cannot run it."""
    if candidate.os != host.os or candidate.architecture != host.architecture:
        return None
    host_variant = host.variant or _DEFAULT_VARIANT.get(host.architecture, "")
    if candidate.variant == host.variant:
        return 0
    if not candidate.variant:
        return 1
    if candidate.variant == host_variant:
        return 1
    if (
        host.architecture == "arm"
        and candidate.variant in ("v5", "v6", "v7")
        and host_variant in ("v6", "v7", "v8")
        and candidate.variant < host_variant
    ):
        # An older ARM variant runs on a newer core: v7 runs v6, v6 runs v5; the nearest is preferred.
        return 2 + (int(host_variant[1:]) - int(candidate.variant[1:]))
    return None


def choose(index_json: Mapping[str, Any], host: Platform) -> dict[str, Any]:
    """The descriptor of `index_json["manifests"]` the host should pull; NoMatchingPlatform when none fits."""
    manifests = index_json.get("manifests")
    if not isinstance(manifests, list):
        raise NoMatchingPlatform("the image index has no manifests list")
    best: tuple[int, int] | None = None
    chosen: dict[str, Any] | None = None
    available: list[str] = []
    for position, entry in enumerate(manifests):
        if not isinstance(entry, dict):
            continue
        candidate = _entry_platform(entry)
        if candidate is None:
            continue
        if candidate.os != "unknown":  # attestation manifests carry unknown/unknown
            available.append(str(candidate))
        rank = _rank(candidate, host)
        if rank is not None and (best is None or (rank, position) < best):
            best, chosen = (rank, position), entry
    if chosen is None:
        listing = ", ".join(dict.fromkeys(available)) or "none"
        raise NoMatchingPlatform(f"no image for platform {host} in the image index (available: {listing})")
    return chosen
