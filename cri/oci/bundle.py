"""OCI bundles: a directory holding config.json (the runtime spec) next to the root filesystem.

The helpers here build a minimal runtime spec as a plain dict, close to what
`runc spec` writes: the default mounts, runc's masked and read-only paths, a
namespace list, and a cgroups path in the form the cgroup driver expects.
Callers (the pod infra process, the container spec builder) start from
`minimal_spec` and add what they need.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

OCI_VERSION = "1.0.2"
CONFIG_FILE = "config.json"
DEFAULT_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# runc's defaults (`runc spec`): kernel files a container has no business reading, or writing.
MASKED_PATHS = (
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/sys/firmware",
    "/proc/scsi",
)
READONLY_PATHS = (
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
)

# Namespace kinds as criopy names them (podsandbox pins: net, ipc, uts) and as the OCI spec does.
_NAMESPACE_TYPES = {
    "net": "network",
    "network": "network",
    "ipc": "ipc",
    "uts": "uts",
    "pid": "pid",
    "mnt": "mount",
    "mount": "mount",
    "cgroup": "cgroup",
    "user": "user",
}


def namespace_type(kind: str) -> str:
    """The OCI namespace type for a criopy kind ('net' -> 'network', 'mnt' -> 'mount')."""
    try:
        return _NAMESPACE_TYPES[kind]
    except KeyError:
        raise ValueError(f"unknown namespace kind {kind!r}") from None


def default_mounts(shm_size: int = 64 * 1024 * 1024) -> list[dict[str, Any]]:
    """The mounts every container gets, as `runc spec` lists them."""
    return [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {
            "destination": "/dev",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        },
        {
            "destination": "/dev/pts",
            "type": "devpts",
            "source": "devpts",
            "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"],
        },
        {
            "destination": "/dev/shm",
            "type": "tmpfs",
            "source": "shm",
            "options": ["nosuid", "noexec", "nodev", "mode=1777", f"size={shm_size}"],
        },
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        {
            "destination": "/sys/fs/cgroup",
            "type": "cgroup",
            "source": "cgroup",
            "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        },
    ]


def bind_mount(source: str, destination: str, *, read_only: bool = True) -> dict[str, Any]:
    """A bind mount entry; read-only unless asked otherwise."""
    options = ["rbind", "ro" if read_only else "rw", "nosuid", "nodev"]
    return {"destination": destination, "type": "bind", "source": source, "options": options}


def namespaces(new: Iterable[str], join: Mapping[str, str] | None = None) -> list[dict[str, str]]:
    """The linux.namespaces list: `new` kinds get fresh namespaces, `join` kinds enter the one at the path.

    A kind in neither is shared with the host (left out of the list).
    """
    out: list[dict[str, str]] = []
    seen: set[str] = set()
    for kind, path in (join or {}).items():
        ns_type = namespace_type(kind)
        if not os.path.isabs(path):
            raise ValueError(f"namespace path for {kind} must be absolute, got {path!r}")
        out.append({"type": ns_type, "path": path})
        seen.add(ns_type)
    for kind in new:
        ns_type = namespace_type(kind)
        if ns_type in seen:
            raise ValueError(f"namespace {kind} is both new and joined")
        out.append({"type": ns_type})
        seen.add(ns_type)
    return out


def cgroups_path(manager: str, parent: str, container_id: str, prefix: str = "criopy") -> str:
    """linux.cgroupsPath for a container.

    cgroupfs: `<parent>/<prefix>-<id>` (an absolute path in every hierarchy);
    systemd: `<slice>:<prefix>:<id>`, which runc (with --systemd-cgroup) turns into
    the scope unit `<prefix>-<id>.scope` under the slice.
    """
    if not container_id:
        raise ValueError("container id must not be empty")
    if manager == "systemd":
        slice_name = parent.strip("/") or "system.slice"
        if "/" in slice_name or not slice_name.endswith(".slice"):
            raise ValueError(f"systemd cgroup parent must be a slice name, got {parent!r}")
        return f"{slice_name}:{prefix}:{container_id}"
    if manager == "cgroupfs":
        base = "/" + parent.strip("/") if parent.strip("/") else ""
        return f"{base}/{prefix}-{container_id}"
    raise ValueError(f"unknown cgroup manager {manager!r}")


def capability_names(names: Iterable[str]) -> list[str]:
    """'chown' / 'CHOWN' / 'CAP_CHOWN' -> 'CAP_CHOWN', order kept, duplicates dropped."""
    out: list[str] = []
    for name in names:
        upper = name.upper()
        full = upper if upper.startswith("CAP_") else f"CAP_{upper}"
        if full not in out:
            out.append(full)
    return out


def capabilities(names: Iterable[str]) -> dict[str, list[str]]:
    """process.capabilities with the same set in bounding, effective and permitted (none inherited)."""
    caps = capability_names(names)
    return {"bounding": list(caps), "effective": list(caps), "permitted": list(caps)}


def minimal_spec(
    args: Sequence[str],
    *,
    root: str = "rootfs",
    readonly_root: bool = False,
    cwd: str = "/",
    env: Sequence[str] = (DEFAULT_PATH_ENV,),
    uid: int = 0,
    gid: int = 0,
    additional_gids: Sequence[int] = (),
    caps: Iterable[str] = (),
    no_new_privileges: bool = True,
    terminal: bool = False,
    hostname: str = "",
    namespace_list: Sequence[Mapping[str, str]] = (),
    cgroups_path: str = "",
    mounts: Sequence[Mapping[str, Any]] | None = None,
    extra_mounts: Sequence[Mapping[str, Any]] = (),
    masked_paths: Sequence[str] = MASKED_PATHS,
    readonly_paths: Sequence[str] = READONLY_PATHS,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A complete, runnable runtime spec for `args`; `mounts` replaces the defaults, `extra_mounts` adds to them."""
    if not args:
        raise ValueError("process args must not be empty")
    user: dict[str, Any] = {"uid": uid, "gid": gid}
    if additional_gids:
        user["additionalGids"] = list(additional_gids)
    process: dict[str, Any] = {
        "terminal": terminal,
        "user": user,
        "args": list(args),
        "env": list(env),
        "cwd": cwd,
        "capabilities": capabilities(caps),
        "noNewPrivileges": no_new_privileges,
    }
    linux: dict[str, Any] = {
        # Deny every device in the cgroup; runc still allows its default set (null, zero, tty, ...).
        "resources": {"devices": [{"allow": False, "access": "rwm"}]},
        "namespaces": [dict(ns) for ns in namespace_list],
        "maskedPaths": list(masked_paths),
        "readonlyPaths": list(readonly_paths),
    }
    if cgroups_path:
        linux["cgroupsPath"] = cgroups_path
    spec: dict[str, Any] = {
        "ociVersion": OCI_VERSION,
        "process": process,
        "root": {"path": root, "readonly": readonly_root},
        "mounts": [dict(m) for m in (default_mounts() if mounts is None else mounts)] + [dict(m) for m in extra_mounts],
        "linux": linux,
    }
    if hostname:
        spec["hostname"] = hostname
    if annotations:
        spec["annotations"] = dict(annotations)
    return spec


def write(bundle: str | os.PathLike[str], spec: Mapping[str, Any]) -> Path:
    """Write config.json into the bundle directory (made if missing), atomically; returns its path."""
    directory = Path(bundle)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    target = directory / CONFIG_FILE
    temporary = directory / f".{CONFIG_FILE}.tmp"
    # Compact: json's indenting encoder is pure Python, 0.23 ms a spec against 0.04 for the C one.
    text = json.dumps(spec) + "\n"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(temporary, target)
    return target


def read(bundle: str | os.PathLike[str]) -> dict[str, Any]:
    with open(Path(bundle) / CONFIG_FILE) as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{bundle}/{CONFIG_FILE}: not a JSON object")
    return data


def rootfs_path(bundle: str | os.PathLike[str], spec: Mapping[str, Any]) -> Path:
    """The root filesystem of a spec: root.path, relative to the bundle unless absolute."""
    path = Path(spec["root"]["path"])
    return path if path.is_absolute() else Path(bundle) / path


def remove(bundle: str | os.PathLike[str]) -> None:
    """Delete a bundle directory and everything in it; gone already is fine."""
    if os.path.lexists(bundle):
        shutil.rmtree(bundle)
