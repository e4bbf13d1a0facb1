"""Seccomp profiles for the runtime spec: the containers/common JSON format turned into OCI's linux.seccomp.

The RuntimeDefault profile (Debian's `/usr/share/containers/seccomp.json`) and
most Localhost profiles use the Docker/containers format: `archMap`, and
syscall rules guarded by `includes`/`excludes` (capabilities, Go arch names,
`minKernel`). OCI runtimes take a flat list, so each rule is kept or dropped
here, for this host and this container's capabilities. A profile already in
OCI form (`architectures`, no guards) passes through unchanged.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

# Machine name -> the Go arch name the profiles use in includes/excludes.
_GO_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
}
# Go arch -> the seccomp architecture of archMap.
_SCMP_ARCH = {
    "amd64": "SCMP_ARCH_X86_64",
    "arm64": "SCMP_ARCH_AARCH64",
    "arm": "SCMP_ARCH_ARM",
    "ppc64le": "SCMP_ARCH_PPC64LE",
    "s390x": "SCMP_ARCH_S390X",
    "riscv64": "SCMP_ARCH_RISCV64",
    "386": "SCMP_ARCH_X86",
}
_RULE_KEYS = ("names", "action", "args", "errnoRet")


class SeccompError(ValueError):
    """The profile cannot be read or is not a seccomp profile."""


def host_arch() -> str:
    machine = platform.machine()
    return _GO_ARCH.get(machine, machine)


def _kernel_version(release: str) -> tuple[int, ...]:
    parts = []
    for piece in release.split("-", maxsplit=1)[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def load(path: str, caps: Iterable[str]) -> dict[str, Any]:
    """The OCI linux.seccomp object of the profile at `path`, for a container holding `caps`."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise SeccompError(f"seccomp profile {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise SeccompError(f"seccomp profile {path}: {exc}") from exc
    if not isinstance(data, dict) or "defaultAction" not in data:
        raise SeccompError(f"seccomp profile {path}: not a seccomp profile (no defaultAction)")
    return convert(data, set(caps), host_arch(), _kernel_version(os.uname().release))


def convert(profile: Mapping[str, Any], caps: set[str], arch: str, kernel: tuple[int, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {"defaultAction": profile["defaultAction"]}
    if "defaultErrnoRet" in profile:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    out["architectures"] = _architectures(profile, arch)
    if profile.get("flags"):
        out["flags"] = list(profile["flags"])
    syscalls = []
    for rule in profile.get("syscalls") or []:
        if not _applies(rule, caps, arch, kernel):
            continue
        names = rule.get("names") or ([rule["name"]] if rule.get("name") else [])
        if not names:
            continue
        kept = {key: rule[key] for key in _RULE_KEYS if rule.get(key) not in (None, [])}
        kept["names"] = list(names)
        syscalls.append(kept)
    out["syscalls"] = syscalls
    return out


def _architectures(profile: Mapping[str, Any], arch: str) -> list[str]:
    if profile.get("architectures"):
        return list(profile["architectures"])
    wanted = _SCMP_ARCH.get(arch)
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == wanted:
            return [entry["architecture"], *(entry.get("subArchitectures") or [])]
    return [wanted] if wanted else []


def _applies(rule: Mapping[str, Any], caps: set[str], arch: str, kernel: tuple[int, ...]) -> bool:
    includes = rule.get("includes") or {}
    excludes = rule.get("excludes") or {}
    if includes.get("arches") and arch not in includes["arches"]:
        return False
    if includes.get("caps") and not set(includes["caps"]) <= caps:
        return False
    if includes.get("minKernel") and kernel < _kernel_version(str(includes["minKernel"])):
        return False
    if excludes.get("arches") and arch in excludes["arches"]:
        return False
    return not (excludes.get("caps") and set(excludes["caps"]) & caps)
