"""Container and pod resource usage, read from cgroup files (v1 and v2).

A cgroup is named by its OCI `linux.cgroupsPath`: the cgroupfs form (a path
relative to every hierarchy's root, e.g. `/kubepods/pod<uid>/criopy-<id>`) or
the systemd form `slice:prefix:name`, which runc places at
`<expanded slice>/<prefix>-<name>.scope`. A pod's cgroup parent (a path or a
`.slice` name) is accepted too.

Every call is a handful of small blocking reads; callers run it in a thread.
The hierarchy layout of a root is detected once and cached, since a stats
collector calls this for hundreds of containers every few seconds.
"""

from __future__ import annotations

import errno
import os
import posixpath
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

DEFAULT_ROOT = Path("/sys/fs/cgroup")

# v1 reports "no limit" as LONG_MAX rounded down to the page size; anything this large is that.
_V1_UNLIMITED = 1 << 62
_V1_STATS = ("cpuacct", "memory", "pids")  # the v1 controllers whose files a sample reads
# v1 has hierarchical total_* figures and local ones; the total ones are read, the local ones a fallback.
_V1_MEMORY_STAT_KEYS = frozenset(
    {
        "total_rss",
        "rss",
        "total_inactive_file",
        "inactive_file",
        "total_pgfault",
        "pgfault",
        "total_pgmajfault",
        "pgmajfault",
    }
)
_V2_MEMORY_STAT_KEYS = frozenset(("anon", "inactive_file", "pgfault", "pgmajfault"))
_V2_CPU_STAT_KEYS = frozenset(("usage_usec",))
_OOM_KEYS = frozenset(("oom_kill",))
_READ_SIZE = 1 << 16
_DEFAULT_SYSTEMD_SLICE = "system.slice"  # runc's parent when the slice part is empty
# A cgroup removed under us fails with ENOENT, or ENODEV on a file open across the rmdir.
_GONE = (errno.ENOENT, errno.ENODEV, errno.ENOTDIR, errno.ESRCH)


@dataclass(frozen=True)
class CgroupSample:
    timestamp_ns: int  # wall clock, as the CRI reports it
    cpu_usage_ns: int | None  # cumulative
    memory_usage: int | None
    memory_working_set: int | None  # usage - inactive file pages, floored at 0 (what the kubelet evicts on)
    memory_rss: int | None
    memory_page_faults: int | None
    memory_major_page_faults: int | None
    memory_available: int | None  # limit - working set, only when a limit is set
    pids: int | None
    oom_kills: int | None


@dataclass(frozen=True)
class _Layout:
    """Where the controllers of one cgroup root live."""

    unified: bool  # v2: every controller in the root itself
    controllers: Mapping[str, str]  # v1: controller name -> its hierarchy's mount dir
    hierarchies: tuple[str, ...]  # every hierarchy dir, each once


_layouts: dict[Path, _Layout] = {}


def sample(cgroup_path: str, *, root: Path = DEFAULT_ROOT) -> CgroupSample | None:
    """Current usage of the cgroup; None when it is gone (or never existed)."""
    layout = _layout(root)
    rel = cgroup_dir(cgroup_path)
    now = time.time_ns()
    if layout.unified:
        return _sample_v2(_join(layout.hierarchies[0], rel), now)
    return _sample_v1(layout, rel, now)


def nano_cores(prev: CgroupSample, cur: CgroupSample) -> int | None:
    """Average CPU use between two samples in nanocores (1e9 = one core); None if it cannot be told."""
    if prev.cpu_usage_ns is None or cur.cpu_usage_ns is None:
        return None
    elapsed = cur.timestamp_ns - prev.timestamp_ns
    used = cur.cpu_usage_ns - prev.cpu_usage_ns
    # A counter that went back means the cgroup was recreated; a clock that did not advance means no interval.
    if elapsed <= 0 or used < 0:
        return None
    return used * 1_000_000_000 // elapsed


def memory_limit(cgroup_path: str, *, root: Path = DEFAULT_ROOT) -> int | None:
    """The cgroup's memory limit in bytes; None when unlimited or unknown."""
    layout = _layout(root)
    rel = cgroup_dir(cgroup_path)
    if layout.unified:
        return _read_limit(f"{_join(layout.hierarchies[0], rel)}/memory.max")
    memory = layout.controllers.get("memory")
    return _read_limit(f"{_join(memory, rel)}/memory.limit_in_bytes") if memory else None


def oom_kills(cgroup_path: str, *, root: Path = DEFAULT_ROOT) -> int | None:
    """How many processes the kernel's OOM killer killed in the cgroup; None when unknown or gone.

    One file, where a whole sample reads six: every container exit asks, on the event loop."""
    layout = _layout(root)
    rel = cgroup_dir(cgroup_path)
    if layout.unified:
        return _oom_kills_v2(_join(layout.hierarchies[0], rel))
    memory = layout.controllers.get("memory")
    return _oom_kills_v1(_join(memory, rel)) if memory else None


def exists(cgroup_path: str, *, root: Path = DEFAULT_ROOT) -> bool:
    """Whether the cgroup directory is present in any hierarchy."""
    rel = cgroup_dir(cgroup_path)
    return any(os.path.isdir(_join(h, rel)) for h in _layout(root).hierarchies)


def cgroup_dir(cgroup_path: str) -> str:
    """The cgroup's directory relative to a hierarchy root ("" for the root itself).

    Raises ValueError for a path with "..", which could climb out of the hierarchy.
    """
    if not cgroup_path.startswith("/"):
        if cgroup_path.count(":") == 2:
            return _systemd_dir(*cgroup_path.split(":"))
        if cgroup_path.endswith(".slice") and "/" not in cgroup_path:
            return expand_slice(cgroup_path)
    if ".." in cgroup_path.split("/"):
        raise ValueError(f"cgroup path {cgroup_path!r} contains ..")
    return posixpath.normpath("/" + cgroup_path).lstrip("/")


def _systemd_dir(slice_name: str, prefix: str, name: str) -> str:
    if not name or "/" in prefix + name:
        raise ValueError(f"invalid systemd cgroup path {slice_name}:{prefix}:{name}")
    # As runc: a name that is itself a slice is used as is, anything else becomes a scope.
    scope = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    unit = name if name.endswith(".slice") else scope
    parent = expand_slice(slice_name or _DEFAULT_SYSTEMD_SLICE)
    return posixpath.join(parent, unit) if parent else unit


def expand_slice(slice_name: str) -> str:
    """The directory of a systemd slice: `a-b.slice` is `a.slice/a-b.slice`, `-.slice` is the root ("")."""
    stem = slice_name.removesuffix(".slice")
    if stem == slice_name or not stem or "/" in slice_name:
        raise ValueError(f"invalid systemd slice name {slice_name!r}")
    if stem == "-":
        return ""
    parts = stem.split("-")
    if "" in parts:  # "a--b.slice", "-a.slice" and "a-.slice" are not slices
        raise ValueError(f"invalid systemd slice name {slice_name!r}")
    return "/".join("-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


# -- layout --


def _layout(root: Path) -> _Layout:
    layout = _layouts.get(root)
    if layout is None:
        layout = _detect(root)
        if layout.hierarchies:  # a root with nothing mounted yet may be mounted later: do not remember it
            _layouts[root] = layout
    return layout


def _detect(root: Path) -> _Layout:
    if os.path.exists(root / "cgroup.controllers"):
        return _Layout(unified=True, controllers={}, hierarchies=(os.fspath(root),))
    controllers: dict[str, str] = {}
    hierarchies: list[str] = []
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except (FileNotFoundError, NotADirectoryError):
        return _Layout(unified=False, controllers={}, hierarchies=())
    for entry in entries:
        if not entry.is_dir():
            continue
        path = entry.path
        # Distros mount "cpu,cpuacct" and symlink "cpu" and "cpuacct" to it: count each hierarchy once.
        if not entry.is_symlink():
            hierarchies.append(path)
        for name in entry.name.split(","):
            controllers.setdefault(name, path)
    return _Layout(unified=False, controllers=controllers, hierarchies=tuple(hierarchies))


# -- v1 --


def _sample_v1(layout: _Layout, rel: str, now: int) -> CgroupSample | None:
    dirs = {name: _join(layout.controllers[name], rel) for name in _V1_STATS if name in layout.controllers}
    if not any(os.path.isdir(d) for d in dirs.values()):
        return None
    cpu = _read_int(dirs["cpuacct"] + "/cpuacct.usage") if "cpuacct" in dirs else None
    memory = dirs.get("memory")
    pids = _read_int(dirs["pids"] + "/pids.current") if "pids" in dirs else None
    if memory is None:
        return _without_memory(now, cpu, pids)
    usage = _read_int(memory + "/memory.usage_in_bytes")
    stat = _read_keyed(memory + "/memory.stat", _V1_MEMORY_STAT_KEYS)
    working_set = _working_set(usage, _first(stat, "total_inactive_file", "inactive_file"))
    return CgroupSample(
        timestamp_ns=now,
        cpu_usage_ns=cpu,
        memory_usage=usage,
        memory_working_set=working_set,
        memory_rss=_first(stat, "total_rss", "rss"),
        memory_page_faults=_first(stat, "total_pgfault", "pgfault"),
        memory_major_page_faults=_first(stat, "total_pgmajfault", "pgmajfault"),
        memory_available=_available(_read_limit(memory + "/memory.limit_in_bytes"), working_set),
        pids=pids,
        oom_kills=_oom_kills_v1(memory),
    )


def _oom_kills_v1(memory: str) -> int | None:
    return _read_keyed(memory + "/memory.oom_control", _OOM_KEYS).get("oom_kill")


def _without_memory(now: int, cpu: int | None, pids: int | None) -> CgroupSample:
    return CgroupSample(now, cpu, None, None, None, None, None, None, pids, None)


# -- v2 --


def _sample_v2(path: str, now: int) -> CgroupSample | None:
    cpu_stat = _read_keyed(path + "/cpu.stat", _V2_CPU_STAT_KEYS)
    if not cpu_stat and not os.path.isdir(path):
        return None
    usage_usec = cpu_stat.get("usage_usec")
    usage = _read_int(path + "/memory.current")
    stat = _read_keyed(path + "/memory.stat", _V2_MEMORY_STAT_KEYS)
    working_set = _working_set(usage, stat.get("inactive_file"))
    return CgroupSample(
        timestamp_ns=now,
        cpu_usage_ns=usage_usec * 1000 if usage_usec is not None else None,
        memory_usage=usage,
        memory_working_set=working_set,
        memory_rss=stat.get("anon"),
        memory_page_faults=stat.get("pgfault"),
        memory_major_page_faults=stat.get("pgmajfault"),
        memory_available=_available(_read_limit(path + "/memory.max"), working_set),
        pids=_read_int(path + "/pids.current"),
        oom_kills=_oom_kills_v2(path),
    )


def _oom_kills_v2(path: str) -> int | None:
    return _read_keyed(path + "/memory.events", _OOM_KEYS).get("oom_kill")


# -- derived figures --


def _working_set(usage: int | None, inactive_file: int | None) -> int | None:
    if usage is None:
        return None
    return max(usage - (inactive_file or 0), 0)


def _available(limit: int | None, working_set: int | None) -> int | None:
    if limit is None or working_set is None:
        return None
    return max(limit - working_set, 0)


def _first(values: Mapping[str, int], *keys: str) -> int | None:
    """The first of `keys` present: the hierarchical total_* figure when v1 has it (a pod's usage is its children's)."""
    return next((values[k] for k in keys if k in values), None)


# -- files --


def _join(hierarchy: str, rel: str) -> str:
    # Paths are plain strings on the sampling path: pathlib's joins cost a quarter of a sample's time.
    return f"{hierarchy}/{rel}" if rel else hierarchy


def _read(path: str) -> str | None:
    """The file's text, None when it (or its cgroup) is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise
    try:
        return _read_fd(fd).decode("ascii", errors="replace")
    except OSError as exc:
        if exc.errno in _GONE:
            return None
        raise
    finally:
        os.close(fd)


def _read_fd(fd: int) -> bytes:
    # cgroup files are seq_files: one read returns everything that fits (memory.stat, the largest, is ~2 KiB),
    # so a short first read is the whole file and the EOF read can be skipped.
    data = os.read(fd, _READ_SIZE)
    if len(data) < _READ_SIZE:
        return data
    chunks = [data]
    while chunk := os.read(fd, _READ_SIZE):
        chunks.append(chunk)
    return b"".join(chunks)


def _read_int(path: str) -> int | None:
    text = _read(path)
    return _to_int(text.strip()) if text is not None else None


def _read_limit(path: str) -> int | None:
    """A memory limit: None for v2 "max" or v1's huge no-limit value."""
    value = _read_int(path)
    return value if value is not None and value < _V1_UNLIMITED else None


def _read_keyed(path: str, keys: frozenset[str]) -> dict[str, int]:
    """The wanted `keys` of a "key value" per line file (memory.stat, cpu.stat, memory.events, ...)."""
    text = _read(path)
    if not text:
        return {}
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, raw = line.partition(" ")
        if key in keys and (value := _to_int(raw.strip())) is not None:
            values[key] = value
    return values


def _to_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None  # "max" and friends
