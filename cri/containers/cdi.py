"""Container Device Interface: devices named `vendor.com/class=name`, resolved from CDI spec files.

A spec file (JSON or YAML, CDI spec versions 0.3.0 to 1.0.x) declares one
kind (`vendor.com/class`), its devices, and container edits at spec level and
per device. Resolving a set of device names collects, in request order, each
device's spec-level edits (once per spec) then its own edits; `apply` writes
them into an OCI runtime spec the way the CDI library that containerd and
cri-o use does (env overrides by key, device nodes and mounts replace the
same path, hooks append).

Spec dirs are read in order and a later dir's device overrides an earlier
one's; two files of one dir defining the same device make it ambiguous.
Nothing here is cached: `scan` reads the dirs each time, which is what makes
a spec file dropped in while the daemon runs usable at the next container
(the simple form of the "watched" spec dirs of the CDI library).
"""

from __future__ import annotations

import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from api.runtime.v1 import api_pb2 as pb
from cri.log import event

log = logging.getLogger(__name__)

ANNOTATION_PREFIX = "cdi.k8s.io/"
HOOK_NAMES = ("prestart", "createRuntime", "createContainer", "startContainer", "poststart", "poststop")
_NODE_TYPES = ("", "b", "c", "u", "p")
_SPEC_SUFFIXES = (".json", ".yaml")
_RESCTRL = "/sys/fs/resctrl"

_VENDOR = re.compile(r"[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_CLASS = re.compile(r"[A-Za-z]([A-Za-z0-9_.-]*[A-Za-z0-9])?")
_DEVICE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.:-]*[A-Za-z0-9])?")


class CdiError(ValueError):
    """A device that cannot be resolved or applied; the message names the device and, where known, the spec file."""

    def __init__(self, message: str, device: str = "") -> None:
        super().__init__(message)
        self.device = device


# ---- edits ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceNode:
    path: str
    host_path: str = ""
    type: str = ""
    major: int = 0
    minor: int = 0
    file_mode: int | None = None
    permissions: str = ""
    uid: int | None = None
    gid: int | None = None


@dataclass(frozen=True)
class Mount:
    host_path: str
    container_path: str
    options: tuple[str, ...] = ()
    type: str = ""


@dataclass(frozen=True)
class Hook:
    hook_name: str
    path: str
    args: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    timeout: int | None = None


@dataclass(frozen=True)
class IntelRdt:
    clos_id: str = ""
    l3_cache_schema: str = ""
    mem_bw_schema: str = ""
    enable_cmt: bool = False
    enable_mbm: bool = False


@dataclass(frozen=True)
class ContainerEdits:
    env: tuple[str, ...] = ()
    device_nodes: tuple[DeviceNode, ...] = ()
    mounts: tuple[Mount, ...] = ()
    hooks: tuple[Hook, ...] = ()
    additional_gids: tuple[int, ...] = ()
    intel_rdt: IntelRdt | None = None

    def empty(self) -> bool:
        return self == ContainerEdits()

    def merged(self, later: ContainerEdits) -> ContainerEdits:
        """These edits followed by `later` (whose intelRdt, being one setting, wins)."""
        return ContainerEdits(
            env=self.env + later.env,
            device_nodes=self.device_nodes + later.device_nodes,
            mounts=self.mounts + later.mounts,
            hooks=self.hooks + later.hooks,
            additional_gids=self.additional_gids + later.additional_gids,
            intel_rdt=later.intel_rdt or self.intel_rdt,
        )


@dataclass(frozen=True)
class Spec:
    path: str
    kind: str
    version: str
    edits: ContainerEdits
    devices: Mapping[str, ContainerEdits]  # by the device's short name


@dataclass(frozen=True)
class Device:
    name: str  # qualified: vendor.com/class=name
    spec: Spec
    edits: ContainerEdits


# ---- names ---------------------------------------------------------------------------------------


def parse_name(name: str) -> tuple[str, str, str]:
    """(vendor, class, device) of a qualified name, or CdiError saying what is wrong with it."""
    kind, sep, device = name.partition("=")
    vendor, slash, klass = kind.partition("/")
    if not sep or not slash:
        raise CdiError(f"invalid CDI device name {name!r}: expected vendor.com/class=name")
    check_kind(kind)
    if not _DEVICE.fullmatch(device):
        raise CdiError(f"invalid CDI device name {name!r}: bad device name {device!r}")
    return vendor, klass, device


def check_kind(kind: str) -> None:
    vendor, slash, klass = kind.partition("/")
    if not slash:
        raise CdiError(f"invalid CDI kind {kind!r}: expected vendor.com/class")
    if not _VENDOR.fullmatch(vendor):
        raise CdiError(f"invalid CDI kind {kind!r}: bad vendor {vendor!r}")
    if not _CLASS.fullmatch(klass):
        raise CdiError(f"invalid CDI kind {kind!r}: bad class {klass!r}")


@dataclass(frozen=True)
class Request:
    name: str
    field: str  # the CRI field that asked for it, for the error


def requested(config: pb.ContainerConfig) -> list[Request]:
    """The devices a container asks for: CDI_devices, then the cdi.k8s.io/ annotations (sorted by key), once each."""
    found: dict[str, Request] = {}
    for i, device in enumerate(config.CDI_devices):
        found.setdefault(device.name, Request(device.name, f"config.CDI_devices[{i}]"))
    for key in sorted(config.annotations):
        if not key.startswith(ANNOTATION_PREFIX):
            continue
        for name in config.annotations[key].split(","):
            if name.strip():
                found.setdefault(name.strip(), Request(name.strip(), f"config.annotations[{key}]"))
    return list(found.values())


# ---- spec files ----------------------------------------------------------------------------------


def _version_ok(version: str) -> bool:
    parts = version.removeprefix("v").split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return False
    major, minor, patch = (int(p) for p in parts)
    if major == 0:
        return 3 <= minor <= 8 and patch == 0
    return major == 1 and minor == 0


def _version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.removeprefix("v").split("."))


def load_spec(path: str | Path) -> Spec:
    """One spec file, checked as the CDI library checks it; CdiError names the file."""
    path = str(path)
    try:
        text = Path(path).read_text()
        raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        return _spec(path, raw)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise CdiError(f"CDI spec file {path}: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc).replace("\n", " ")


def _spec(path: str, raw: Any) -> Spec:
    doc = _obj(raw, "spec", {"cdiVersion", "kind", "devices", "containerEdits", "annotations"})
    version = _str(doc.get("cdiVersion"), "cdiVersion")
    if not _version_ok(version):
        raise ValueError(f"unsupported cdiVersion {version!r} (0.3.0 to 1.0.x are known)")
    kind = _str(doc.get("kind"), "kind")
    try:
        check_kind(kind)
    except CdiError as exc:
        raise ValueError(str(exc)) from None
    edits = _edits(doc.get("containerEdits"), "containerEdits")
    devices: dict[str, ContainerEdits] = {}
    for i, item in enumerate(_list(doc.get("devices"), "devices")):
        name, device_edits = _device(item, f"devices[{i}]")
        if name in devices:
            raise ValueError(f"device {name!r} defined twice")
        devices[name] = device_edits
    if not devices:
        raise ValueError("no devices")
    _check_needs(version, doc, kind, edits, devices)
    return Spec(path=path, kind=kind, version=version, edits=edits, devices=devices)


def _device(raw: Any, where: str) -> tuple[str, ContainerEdits]:
    item = _obj(raw, where, {"name", "annotations", "containerEdits"})
    name = _str(item.get("name"), f"{where}.name")
    if not _DEVICE.fullmatch(name):
        raise ValueError(f"{where}.name: invalid device name {name!r}")
    _str_map(item.get("annotations"), f"{where}.annotations")
    edits = _edits(item.get("containerEdits"), f"{where}.containerEdits")
    if edits.empty():
        raise ValueError(f"{where}: device {name!r} has no container edits")
    return name, edits


def _check_needs(version: str, doc: Mapping[str, Any], kind: str, edits: ContainerEdits, devices: Any) -> None:
    """A feature newer than the file's cdiVersion is refused, as the CDI library refuses it."""
    all_edits = [edits, *devices.values()]
    needs = (0, 3, 0)
    if any(m.type for e in all_edits for m in e.mounts):
        needs = max(needs, (0, 4, 0))
    if any(n.host_path for e in all_edits for n in e.device_nodes) or any(not d[0].isalpha() for d in devices):
        needs = max(needs, (0, 5, 0))
    device_annotations = any((d or {}).get("annotations") for d in doc.get("devices") or [] if isinstance(d, dict))
    if doc.get("annotations") or device_annotations or "." in kind.partition("/")[2]:
        needs = max(needs, (0, 6, 0))
    if any(e.intel_rdt is not None or e.additional_gids for e in all_edits):
        needs = max(needs, (0, 7, 0))
    if _version_tuple(version) < needs:
        raise ValueError(f"cdiVersion {version} is too old for what the spec uses (needs {'.'.join(map(str, needs))})")


_EDIT_KEYS = {"env", "deviceNodes", "mounts", "hooks", "additionalGids", "intelRdt"}


def _edits(raw: Any, where: str) -> ContainerEdits:
    if raw is None:
        return ContainerEdits()
    doc = _obj(raw, where, _EDIT_KEYS)
    env = tuple(_env(doc.get("env"), f"{where}.env"))
    nodes = tuple(_node(n, f"{where}.deviceNodes[{i}]") for i, n in enumerate(_list(doc.get("deviceNodes"), where)))
    mounts = tuple(_mount(m, f"{where}.mounts[{i}]") for i, m in enumerate(_list(doc.get("mounts"), where)))
    hooks = tuple(_hook(h, f"{where}.hooks[{i}]") for i, h in enumerate(_list(doc.get("hooks"), where)))
    gids = tuple(_int(g, f"{where}.additionalGids[{i}]") for i, g in enumerate(_list(doc.get("additionalGids"), where)))
    rdt = _intel_rdt(doc.get("intelRdt"), f"{where}.intelRdt")
    return ContainerEdits(env, nodes, mounts, hooks, gids, rdt)


def _env(raw: Any, where: str) -> list[str]:
    out = []
    for i, item in enumerate(_list(raw, where)):
        text = _str(item, f"{where}[{i}]")
        if "=" not in text or text.startswith("="):
            raise ValueError(f"{where}[{i}]: expected KEY=VALUE, got {text!r}")
        out.append(text)
    return out


def _node(raw: Any, where: str) -> DeviceNode:
    keys = {"path", "hostPath", "type", "major", "minor", "fileMode", "permissions", "uid", "gid"}
    doc = _obj(raw, where, keys)
    path = _str(doc.get("path"), f"{where}.path")
    if not path.startswith("/"):
        raise ValueError(f"{where}.path: {path!r} is not absolute")
    kind = _opt_str(doc.get("type"), f"{where}.type")
    if kind not in _NODE_TYPES:
        raise ValueError(f"{where}.type: unknown device type {kind!r}")
    permissions = _opt_str(doc.get("permissions"), f"{where}.permissions")
    if set(permissions) - set("rwm"):
        raise ValueError(f"{where}.permissions: {permissions!r} is not a subset of rwm")
    return DeviceNode(
        path=path,
        host_path=_opt_str(doc.get("hostPath"), f"{where}.hostPath"),
        type=kind,
        major=_int(doc.get("major", 0), f"{where}.major"),
        minor=_int(doc.get("minor", 0), f"{where}.minor"),
        file_mode=_opt_int(doc.get("fileMode"), f"{where}.fileMode"),
        permissions=permissions,
        uid=_opt_int(doc.get("uid"), f"{where}.uid"),
        gid=_opt_int(doc.get("gid"), f"{where}.gid"),
    )


def _mount(raw: Any, where: str) -> Mount:
    doc = _obj(raw, where, {"hostPath", "containerPath", "options", "type"})
    container_path = _str(doc.get("containerPath"), f"{where}.containerPath")
    if not container_path.startswith("/"):
        raise ValueError(f"{where}.containerPath: {container_path!r} is not absolute")
    options = tuple(_str(o, f"{where}.options[{i}]") for i, o in enumerate(_list(doc.get("options"), where)))
    return Mount(
        host_path=_str(doc.get("hostPath"), f"{where}.hostPath"),
        container_path=container_path,
        options=options,
        type=_opt_str(doc.get("type"), f"{where}.type"),
    )


def _hook(raw: Any, where: str) -> Hook:
    doc = _obj(raw, where, {"hookName", "path", "args", "env", "timeout"})
    name = _str(doc.get("hookName"), f"{where}.hookName")
    if name not in HOOK_NAMES:
        raise ValueError(f"{where}.hookName: unknown hook {name!r} (one of {', '.join(HOOK_NAMES)})")
    path = _str(doc.get("path"), f"{where}.path")
    if not path.startswith("/"):
        raise ValueError(f"{where}.path: {path!r} is not absolute")
    args = tuple(_str(a, f"{where}.args[{i}]") for i, a in enumerate(_list(doc.get("args"), where)))
    timeout = _opt_int(doc.get("timeout"), f"{where}.timeout")
    return Hook(name, path, args, tuple(_env(doc.get("env"), f"{where}.env")), timeout)


def _intel_rdt(raw: Any, where: str) -> IntelRdt | None:
    if raw is None:
        return None
    doc = _obj(raw, where, {"closID", "l3CacheSchema", "memBwSchema", "enableCMT", "enableMBM"})
    return IntelRdt(
        clos_id=_opt_str(doc.get("closID"), f"{where}.closID"),
        l3_cache_schema=_opt_str(doc.get("l3CacheSchema"), f"{where}.l3CacheSchema"),
        mem_bw_schema=_opt_str(doc.get("memBwSchema"), f"{where}.memBwSchema"),
        enable_cmt=bool(doc.get("enableCMT", False)),
        enable_mbm=bool(doc.get("enableMBM", False)),
    )


# Small typed readers: each error names the key path inside the file.


def _obj(raw: Any, where: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(str(k) for k in raw if k not in keys)
    if unknown:
        # Strict, as the CDI library's parser: a misspelt key would otherwise silently do nothing.
        raise ValueError(f"{where}: unknown key {unknown[0]!r}")
    return raw


def _list(raw: Any, where: str) -> list[Any]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ValueError(f"{where}: expected a list, got {type(raw).__name__}")
    return raw


def _str(raw: Any, where: str) -> str:
    if not isinstance(raw, str) or not raw:
        raise ValueError(f"{where}: expected a non-empty string, got {raw!r}")
    return raw


def _opt_str(raw: Any, where: str) -> str:
    """An optional string: absent is empty."""
    return "" if raw is None else raw if isinstance(raw, str) else _str(raw, where)


def _int(raw: Any, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
        raise ValueError(f"{where}: expected a non-negative integer, got {raw!r}")
    return raw


def _opt_int(raw: Any, where: str) -> int | None:
    return None if raw is None else _int(raw, where)


def _str_map(raw: Any, where: str) -> None:
    if raw is None:
        return
    if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
        raise ValueError(f"{where}: expected a mapping of strings")


# ---- the registry --------------------------------------------------------------------------------


@dataclass
class Registry:
    dirs: tuple[str, ...]
    devices: dict[str, Device] = field(default_factory=dict)
    conflicts: dict[str, list[str]] = field(default_factory=dict)  # device -> the files of one dir defining it
    broken: dict[str, tuple[str, str]] = field(default_factory=dict)  # file -> (its kind if readable, why)

    def resolve(self, names: Sequence[str]) -> ContainerEdits:
        """The edits of `names`, in order: each spec's own edits once, before its first device's.

        Device nodes come back completed from the host (type, major/minor, mode), so a missing host
        device is refused here, naming the device and its spec file.
        """
        edits = ContainerEdits()
        seen_specs: set[str] = set()
        for name in names:
            device = self.lookup(name)
            if device.spec.path not in seen_specs:
                seen_specs.add(device.spec.path)
                edits = edits.merged(_on_host(device.spec.edits, name, device.spec.path))
            edits = edits.merged(_on_host(device.edits, name, device.spec.path))
        return edits

    def lookup(self, name: str) -> Device:
        try:
            return self._lookup(name)
        except CdiError as exc:
            raise CdiError(str(exc), name) from None

    def _lookup(self, name: str) -> Device:
        vendor, klass, _ = parse_name(name)
        if name in self.conflicts:
            files = ", ".join(self.conflicts[name])
            raise CdiError(f"CDI device {name!r} is ambiguous: defined by more than one spec file ({files})")
        device = self.devices.get(name)
        if device is not None:
            return device
        kind = f"{vendor}/{klass}"
        broken = [f"{path}: {why}" for path, (k, why) in self.broken.items() if k in ("", kind)]
        where = f"in {', '.join(self.dirs)}" if self.dirs else "(no CDI spec dirs configured)"
        message = f"unknown CDI device {name!r}: no spec file {where} defines it"
        if broken:
            message += "; spec files that could not be read: " + "; ".join(broken)
        raise CdiError(message)


def scan(dirs: Iterable[str]) -> Registry:
    """Every spec file of `dirs`, read now. Broken files are kept aside, named by a lookup they could matter to."""
    registry = Registry(tuple(dirs))
    for directory in registry.dirs:
        per_dir: dict[str, list[Device]] = {}
        for path in _spec_files(directory):
            try:
                spec = load_spec(path)
            except CdiError as exc:
                registry.broken[path] = (_kind_of(path), str(exc).removeprefix(f"CDI spec file {path}: "))
                event(log, logging.WARNING, "CDI spec file skipped", path=path, error=str(exc))
                continue
            for short, edits in spec.devices.items():
                name = f"{spec.kind}={short}"
                per_dir.setdefault(name, []).append(Device(name, spec, edits))
        _layer(registry, per_dir)
    return registry


def _layer(registry: Registry, per_dir: Mapping[str, list[Device]]) -> None:
    """One dir's devices over the earlier dirs': a later dir wins, two files of one dir conflict."""
    for name, found in per_dir.items():
        if len(found) > 1:
            registry.conflicts[name] = [d.spec.path for d in found]
            registry.devices.pop(name, None)
        else:
            registry.devices[name] = found[0]
            registry.conflicts.pop(name, None)


def _on_host(edits: ContainerEdits, name: str, path: str) -> ContainerEdits:
    try:
        if edits.intel_rdt is not None and not os.path.isdir(os.path.join(_RESCTRL, "info")):
            raise CdiError(f"intelRdt asked for, but this host has no resctrl filesystem at {_RESCTRL}")
        return replace(edits, device_nodes=tuple(_filled(n) for n in edits.device_nodes))
    except CdiError as exc:
        raise CdiError(f"CDI device {name!r} (spec file {path}): {exc}", name) from None


def _spec_files(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return []
    except OSError as exc:
        event(log, logging.WARNING, "CDI spec dir unreadable", dir=directory, error=str(exc))
        return []
    paths = (os.path.join(directory, n) for n in names if n.endswith(_SPEC_SUFFIXES))
    return [p for p in paths if os.path.isfile(p)]


def _kind_of(path: str) -> str:
    """The kind a broken file declares, if it can be read that far ("" when not: it may define anything)."""
    try:
        text = Path(path).read_text()
        raw = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError):
        return ""
    kind = raw.get("kind") if isinstance(raw, dict) else None
    return kind if isinstance(kind, str) else ""


# ---- applying edits to an OCI spec ---------------------------------------------------------------


def apply(spec: dict[str, Any], edits: ContainerEdits) -> None:
    """Write resolved `edits` into the OCI runtime spec `spec`, in place."""
    process, linux = spec["process"], spec.setdefault("linux", {})
    _apply_env(process, edits.env)
    for node in edits.device_nodes:
        _apply_node(linux, process, node)
    if edits.mounts:
        _apply_mounts(spec, edits.mounts)
    for hook in edits.hooks:
        spec.setdefault("hooks", {}).setdefault(hook.hook_name, []).append(_oci_hook(hook))
    gids = process["user"].setdefault("additionalGids", [])
    gids += [g for g in dict.fromkeys(edits.additional_gids) if g != 0 and g not in gids]
    if edits.intel_rdt is not None:
        linux["intelRdt"] = _oci_intel_rdt(edits.intel_rdt)


def _apply_env(process: dict[str, Any], env: Sequence[str]) -> None:
    """A CDI variable replaces the image's or config's of the same key (containerd's CDI does the same)."""
    values = dict(item.partition("=")[::2] for item in process.get("env", []))
    for item in env:
        key, _, value = item.partition("=")
        values.pop(key, None)  # re-inserted last, as an appended variable
        values[key] = value
    process["env"] = [f"{k}={v}" for k, v in values.items()]


def _filled(node: DeviceNode) -> DeviceNode:
    """Type, major/minor and mode taken from the host device when the spec leaves them out."""
    if node.type == "p" or (node.type and node.major):
        return node
    host = node.host_path or node.path
    try:
        info = os.stat(host)
    except OSError as exc:
        raise CdiError(f"device node {node.path}: host device {host}: {exc.strerror}") from exc
    if stat.S_ISCHR(info.st_mode):
        kind = "c"
    elif stat.S_ISBLK(info.st_mode):
        kind = "b"
    elif stat.S_ISFIFO(info.st_mode):
        kind = "p"
    else:
        raise CdiError(f"device node {node.path}: {host} is not a device")
    if node.type and node.type != kind and not (node.type == "u" and kind == "c"):
        raise CdiError(f"device node {node.path}: {host} is a {kind!r} device, the spec says {node.type!r}")
    mode = node.file_mode if node.file_mode is not None else stat.S_IMODE(info.st_mode)
    if kind == "p":
        return replace(node, type=kind, file_mode=mode)
    major, minor = os.major(info.st_rdev), os.minor(info.st_rdev)
    return replace(node, type=node.type or kind, major=major, minor=minor, file_mode=mode)


def _apply_node(linux: dict[str, Any], process: dict[str, Any], node: DeviceNode) -> None:
    user = process.get("user", {})
    device: dict[str, Any] = {"path": node.path, "type": node.type, "major": node.major, "minor": node.minor}
    if node.file_mode is not None:
        device["fileMode"] = node.file_mode
    # Unset owner: the container's user, when not root (the CDI library's rule).
    uid = node.uid if node.uid is not None else (user.get("uid") or None)
    gid = node.gid if node.gid is not None else (user.get("gid") or None)
    if uid is not None:
        device["uid"] = uid
    if gid is not None:
        device["gid"] = gid
    linux["devices"] = [d for d in linux.get("devices", []) if d.get("path") != node.path] + [device]
    if node.type in ("b", "c"):
        rule = {"allow": True, "type": node.type, "major": node.major, "minor": node.minor}
        rule["access"] = node.permissions or "rwm"
        linux.setdefault("resources", {}).setdefault("devices", []).append(rule)


def _apply_mounts(spec: dict[str, Any], mounts: Sequence[Mount]) -> None:
    targets = {m.container_path for m in mounts}
    kept = [m for m in spec.get("mounts", []) if m.get("destination") not in targets]
    added = [_oci_mount(m) for m in mounts]
    # Parents before children, as the CDI library sorts: a CDI mount at /a must not hide one at /a/b.
    spec["mounts"] = sorted(kept + added, key=lambda m: len(Path(m["destination"]).parts))


def _oci_mount(mount: Mount) -> dict[str, Any]:
    out: dict[str, Any] = {"destination": mount.container_path, "source": mount.host_path}
    out["options"] = list(mount.options)
    if mount.type:
        out["type"] = mount.type
    elif "bind" in mount.options or "rbind" in mount.options:
        out["type"] = "bind"
    return out


def _oci_hook(hook: Hook) -> dict[str, Any]:
    out: dict[str, Any] = {"path": hook.path}
    if hook.args:
        out["args"] = list(hook.args)
    if hook.env:
        out["env"] = list(hook.env)
    if hook.timeout is not None:
        out["timeout"] = hook.timeout
    return out


def _oci_intel_rdt(rdt: IntelRdt) -> dict[str, Any]:
    out: dict[str, Any] = {"enableCMT": rdt.enable_cmt, "enableMBM": rdt.enable_mbm}
    for key, value in (("closID", rdt.clos_id), ("l3CacheSchema", rdt.l3_cache_schema)):
        if value:
            out[key] = value
    if rdt.mem_bw_schema:
        out["memBwSchema"] = rdt.mem_bw_schema
    return out
