"""The OCI runtime spec of a container, built from its CRI config, its pod, its image and the host.

Every input is already validated (cri/containers/validate.py); what can only
be checked against the host here (a device path, a mount's propagation, a
seccomp profile file) raises SpecError naming the CRI field.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from api.runtime.v1 import api_pb2 as pb
from cri.config import RuntimeConfig
from cri.containers import capabilities, cdi, seccomp, ulimits
from cri.containers.host import HostFacts
from cri.containers.users import ProcessUser
from cri.containers.validate import RES, SC
from cri.images.index import ImageRecord
from cri.log import event
from cri.oci import bundle
from cri.system.linux import mounts
from podsandbox.sandbox import Sandbox

log = logging.getLogger(__name__)


class SpecError(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


@dataclass(frozen=True)
class SpecInputs:
    container_id: str
    config: pb.ContainerConfig
    sandbox: Sandbox
    image: ImageRecord
    image_name: str  # what the container was asked to run (for the annotations)
    rootfs: str  # absolute path of the mounted root filesystem
    user: ProcessUser
    runtime: RuntimeConfig
    host: HostFacts
    pid_namespace: str | None  # "" a new one, a /proc/<pid>/ns/pid path to join, None the host's
    cgroups_path: str
    # Image volumes: config.mounts index -> the host dir to bind (the image's read-only mount or its sub path).
    image_volumes: Mapping[int, str] = field(default_factory=dict)
    # Host-path volumes with uidMappings: config.mounts index -> the idmapped bind of the host path to bind.
    idmapped_volumes: Mapping[int, str] = field(default_factory=dict)


def process_args(config: pb.ContainerConfig, image: ImageRecord) -> list[str]:
    """command replaces ENTRYPOINT, args replace CMD, and a command without args drops CMD (DESIGN 4)."""
    image_config = image.config.get("config") or {}
    if config.command:
        return [*config.command, *config.args]
    entrypoint = list(image_config.get("Entrypoint") or [])
    cmd = list(config.args) if config.args else list(image_config.get("Cmd") or [])
    return entrypoint + cmd


def environment(config: pb.ContainerConfig, image: ImageRecord, hostname: str) -> list[str]:
    """The image's Env, then the config's envs (a key set twice keeps its last value), PATH always set."""
    image_config = image.config.get("config") or {}
    values: dict[str, str] = {}
    for item in image_config.get("Env") or []:
        key, _, value = str(item).partition("=")
        values[key] = value
    values.setdefault("PATH", bundle.DEFAULT_PATH_ENV.split("=", 1)[1])
    if hostname:
        values.setdefault("HOSTNAME", hostname)
    for kv in config.envs:
        values[kv.key] = kv.value
    return [f"{k}={v}" for k, v in values.items()]


def stop_signal(config: pb.ContainerConfig, image: ImageRecord) -> str:
    """The signal StopContainer sends first: the config's, else the image's STOPSIGNAL, else SIGTERM."""
    if config.stop_signal:
        return str(pb.Signal.Name(config.stop_signal))
    text = str((image.config.get("config") or {}).get("StopSignal") or "").upper()
    if not text:
        return "SIGTERM"
    return text if text.startswith("SIG") or text.isdigit() else f"SIG{text}"


def build(inputs: SpecInputs) -> dict[str, Any]:
    config, sandbox = inputs.config, inputs.sandbox
    sc = config.linux.security_context
    privileged = sc.privileged
    caps = _capabilities(inputs)
    hostname = _hostname(sandbox)
    args = process_args(config, inputs.image)
    if not args:
        raise SpecError("config.command", "no command given and the image has neither ENTRYPOINT nor CMD")
    image_config = inputs.image.config.get("config") or {}
    spec = bundle.minimal_spec(
        args,
        root=inputs.rootfs,
        readonly_root=sc.readonly_rootfs,
        cwd=config.working_dir or image_config.get("WorkingDir") or "/",
        env=environment(config, inputs.image, hostname),
        uid=inputs.user.uid,
        gid=inputs.user.gid,
        additional_gids=inputs.user.additional_gids,
        caps=caps,
        no_new_privileges=sc.no_new_privs and not privileged,
        terminal=config.tty,
        hostname=hostname if "uts" in sandbox.pins else "",
        namespace_list=_namespaces(inputs),
        cgroups_path=inputs.cgroups_path,
        mounts=_mounts(inputs),
        masked_paths=() if privileged else (list(sc.masked_paths) or bundle.MASKED_PATHS),
        readonly_paths=() if privileged else (list(sc.readonly_paths) or bundle.READONLY_PATHS),
        annotations=_annotations(inputs),
    )
    process, linux = spec["process"], spec["linux"]
    if sc.capabilities.add_ambient_capabilities:
        ambient = [capabilities.normalize(c) for c in sc.capabilities.add_ambient_capabilities]
        process["capabilities"]["ambient"] = ambient
        process["capabilities"]["inheritable"] = ambient
    if inputs.runtime.default_ulimits:
        process["rlimits"] = [ulimits.parse(text).to_oci() for text in inputs.runtime.default_ulimits]
    process["oomScoreAdj"] = max(config.linux.resources.oom_score_adj, inputs.host.oom_score_adj_floor)
    linux["resources"] = _resources(config.linux.resources, inputs)
    devices = _devices(config.devices, privileged)
    if devices:
        linux["devices"] = [d for d, _ in devices]
        linux["resources"]["devices"] += [rule for _, rule in devices]
    if privileged:
        linux["resources"]["devices"] = [{"allow": True, "access": "rwm"}]
    _cdi_devices(spec, inputs)
    propagation = _rootfs_propagation(config.mounts)
    if propagation:
        linux["rootfsPropagation"] = propagation
    profile = _seccomp(inputs, caps)
    if profile is not None:
        linux["seccomp"] = profile
    apparmor = _apparmor(inputs)
    if apparmor:
        process["apparmorProfile"] = apparmor
    userns = sandbox.spec.userns
    if userns is not None:
        # The container joins its pod's pinned user namespace (see _namespaces); runc 1.1.5 still wants
        # its maps in the spec (it checks root is mapped, and chowns its exec fifo to the mapped root).
        linux["uidMappings"] = [userns.uids.to_oci()]
        linux["gidMappings"] = [userns.gids.to_oci()]
    return spec


def _hostname(sandbox: Sandbox) -> str:
    try:
        return Path(sandbox.dir, "hostname").read_text().strip()
    except OSError:
        return sandbox.spec.hostname


def _capabilities(inputs: SpecInputs) -> list[str]:
    sc = inputs.config.linux.security_context
    host = list(inputs.host.bounding_caps)
    if sc.privileged:
        return host
    try:
        return capabilities.resolve(
            inputs.runtime.default_capabilities,
            list(sc.capabilities.add_capabilities),
            list(sc.capabilities.drop_capabilities),
            host,
        )
    except capabilities.CapabilityError as exc:
        raise SpecError(f"{SC}.capabilities", str(exc)) from exc


def _namespaces(inputs: SpecInputs) -> list[dict[str, str]]:
    join = {kind: path for kind, path in inputs.sandbox.pins.items() if kind in ("user", "net", "ipc", "uts")}
    new = ["mnt"]
    if inputs.pid_namespace == "":
        new.append("pid")
    elif inputs.pid_namespace is not None:
        join["pid"] = inputs.pid_namespace
    if inputs.host.cgroup2:
        new.append("cgroup")
    return bundle.namespaces(new=new, join=join)


# ---- mounts --------------------------------------------------------------------------------

_PROPAGATION = {
    pb.PROPAGATION_PRIVATE: "rprivate",
    pb.PROPAGATION_HOST_TO_CONTAINER: "rslave",
    pb.PROPAGATION_BIDIRECTIONAL: "rshared",
}


def _mounts(inputs: SpecInputs) -> list[dict[str, Any]]:
    config, sandbox = inputs.config, inputs.sandbox
    privileged = config.linux.security_context.privileged
    wanted = {m.container_path.rstrip("/") or "/" for m in config.mounts}
    out = [_default_mount(m, sandbox, privileged) for m in bundle.default_mounts() if m["destination"] not in wanted]
    for name in ("hostname", "resolv.conf", "hosts"):
        target = f"/etc/{name}"
        source = os.path.join(sandbox.dir, name)
        if target not in wanted and os.path.exists(source):
            read_only = config.linux.security_context.readonly_rootfs
            out.append(bundle.bind_mount(source, target, read_only=read_only))
    for i, m in enumerate(config.mounts):
        volume = inputs.image_volumes.get(i)
        if volume is not None:
            out.append(_image_volume_mount(m, volume))
        else:
            out.append(_user_mount(m, f"config.mounts[{i}]", inputs.idmapped_volumes.get(i, m.host_path)))
    return out


def _image_volume_mount(mount: pb.Mount, source: str) -> dict[str, Any]:
    # Read-only whatever mount.readonly says: the source is a read-only mount already, and "ro" keeps
    # the container's own bind from being remounted read-write.
    options = ["rbind", _PROPAGATION.get(mount.propagation, "rprivate"), "ro"]
    return {"destination": mount.container_path, "type": "bind", "source": source, "options": options}


def _default_mount(mount: dict[str, Any], sandbox: Sandbox, privileged: bool) -> dict[str, Any]:
    if mount["destination"] == "/dev/shm":
        return _shm_mount(sandbox)
    if privileged and mount["type"] in ("sysfs", "cgroup"):
        return {**mount, "options": [o for o in mount["options"] if o != "ro"] + ["rw"]}
    return mount


def _shm_mount(sandbox: Sandbox) -> dict[str, Any]:
    source = sandbox.shm or "/dev/shm"  # host IPC: the host's /dev/shm
    return {
        "destination": "/dev/shm",
        "type": "bind",
        "source": source,
        "options": ["rbind", "rw", "nosuid", "nodev", "noexec"],
    }


def _user_mount(mount: pb.Mount, field: str, source: str) -> dict[str, Any]:
    if not os.path.exists(source):
        # As containerd and cri-o do (and docker -v): a missing host path becomes an empty directory.
        try:
            os.makedirs(source, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise SpecError(f"{field}.host_path", f"{source} does not exist and cannot be made: {exc}") from exc
    propagation = _PROPAGATION.get(mount.propagation)
    if propagation is None:
        raise SpecError(f"{field}.propagation", f"unknown propagation {mount.propagation}")
    if propagation != "rprivate":
        _check_source_propagation(source, propagation, f"{field}.propagation")
    options = ["rbind", propagation]
    if mount.recursive_read_only:
        options.append("rro")
    elif mount.readonly:
        options.append("ro")
    else:
        options.append("rw")
    return {"destination": mount.container_path, "type": "bind", "source": source, "options": options}


def _check_source_propagation(source: str, propagation: str, field: str) -> None:
    """rshared needs a shared source mount, rslave a shared or slave one (containerd refuses otherwise)."""
    entry = _mount_of(os.path.realpath(source))
    if entry is None:
        return
    optional = entry.optional
    shared = any(o.startswith("shared:") for o in optional)
    slave = any(o.startswith("master:") for o in optional)
    if propagation == "rshared" and not shared:
        raise SpecError(field, f"{source} is on mount {entry.mount_point}, which is not a shared mount")
    if propagation == "rslave" and not (shared or slave):
        raise SpecError(field, f"{source} is on mount {entry.mount_point}, which is neither shared nor slave")


def _mount_of(path: str) -> Any:
    best = None
    for entry in mounts():
        point = entry.mount_point
        if (path == point or path.startswith(point.rstrip("/") + "/")) and (
            best is None or len(point) >= len(best.mount_point)
        ):
            best = entry
    return best


def _rootfs_propagation(user_mounts: Sequence[pb.Mount]) -> str:
    kinds = {_PROPAGATION.get(m.propagation) for m in user_mounts}
    if "rshared" in kinds:
        return "rshared"
    if "rslave" in kinds:
        return "rslave"
    return ""


# ---- devices ---------------------------------------------------------------------------------


def _devices(devices: Sequence[pb.Device], privileged: bool) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    out = []
    if privileged:
        out += [_device(path, path, "rwm", "privileged host device") for path in _host_devices()]
    for i, device in enumerate(devices):
        field = f"config.devices[{i}]"
        host = device.host_path
        if os.path.isdir(host):
            for path in _host_devices(host):
                out.append(_device(path, device.container_path + path[len(host) :], device.permissions, field))
            continue
        out.append(_device(host, device.container_path, device.permissions, field))
    return out


def _cdi_devices(spec: dict[str, Any], inputs: SpecInputs) -> None:
    """CDI devices asked for by config.CDI_devices or cdi.k8s.io/ annotations, applied to the spec."""
    wanted = cdi.requested(inputs.config)
    if not wanted:
        return  # the common case reads no spec dir
    # Read at every create that asks for a device, so a spec file written while the daemon runs is
    # used without a restart: the simple form of the CDI library's watched spec dirs.
    registry = cdi.scan(inputs.runtime.cdi_spec_dirs)
    try:
        edits = registry.resolve([r.name for r in wanted])
    except cdi.CdiError as exc:
        field = next((r.field for r in wanted if r.name == exc.device), "config.CDI_devices")
        raise SpecError(field, str(exc)) from exc
    cdi.apply(spec, edits)
    event(log, logging.DEBUG, "CDI devices applied", id=inputs.container_id, devices=",".join(r.name for r in wanted))


def _host_devices(root: str = "/dev") -> list[str]:
    found = []
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in ("pts", "shm", "mqueue")] if directory == "/dev" else dirs
        for name in files:
            path = os.path.join(directory, name)
            try:
                mode = os.lstat(path).st_mode
            except OSError:
                continue
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
                found.append(path)
    return sorted(found)


def _device(host: str, target: str, permissions: str, field: str) -> tuple[dict[str, Any], dict[str, Any]]:
    try:
        info = os.stat(host)
    except OSError as exc:
        raise SpecError(f"{field}.host_path", f"{host}: {exc.strerror}") from exc
    if stat.S_ISCHR(info.st_mode):
        kind = "c"
    elif stat.S_ISBLK(info.st_mode):
        kind = "b"
    else:
        raise SpecError(f"{field}.host_path", f"{host} is not a device")
    major, minor = os.major(info.st_rdev), os.minor(info.st_rdev)
    device = {
        "path": target,
        "type": kind,
        "major": major,
        "minor": minor,
        "fileMode": stat.S_IMODE(info.st_mode),
        "uid": info.st_uid,
        "gid": info.st_gid,
    }
    rule = {"allow": True, "type": kind, "major": major, "minor": minor, "access": permissions or "rwm"}
    return device, rule


# ---- resources -------------------------------------------------------------------------------


def resources(res: pb.LinuxContainerResources, host: HostFacts, pids_limit: int) -> dict[str, Any]:
    """linux.resources for a CRI resource request (also what `runc update` takes)."""
    out: dict[str, Any] = {}
    cpu: dict[str, Any] = {}
    if res.cpu_shares:
        cpu["shares"] = res.cpu_shares
    if res.cpu_quota:
        cpu["quota"] = res.cpu_quota
    if res.cpu_period:
        cpu["period"] = res.cpu_period
    if res.cpuset_cpus:
        cpu["cpus"] = res.cpuset_cpus
    if res.cpuset_mems:
        cpu["mems"] = res.cpuset_mems
    if cpu:
        out["cpu"] = cpu
    memory: dict[str, Any] = {}
    if res.memory_limit_in_bytes:
        memory["limit"] = res.memory_limit_in_bytes
        if host.swap_accounting:
            # Without an explicit swap limit the container gets no swap beyond its memory (as the kubelet expects).
            memory["swap"] = res.memory_swap_limit_in_bytes or res.memory_limit_in_bytes
    if memory:
        out["memory"] = memory
    if pids_limit > 0:
        out["pids"] = {"limit": pids_limit}
    if res.hugepage_limits and host.hugetlb:
        out["hugepageLimits"] = [{"pageSize": h.page_size, "limit": h.limit} for h in res.hugepage_limits]
    if res.unified:
        out["unified"] = dict(res.unified)
    return out


def _resources(res: pb.LinuxContainerResources, inputs: SpecInputs) -> dict[str, Any]:
    if res.unified and not inputs.host.cgroup2:
        raise SpecError(f"{RES}.unified", "cgroup v2 settings on a host without the unified cgroup hierarchy")
    out = resources(res, inputs.host, inputs.runtime.pids_limit)
    out["devices"] = [{"allow": False, "access": "rwm"}]
    return out


# ---- security profiles -----------------------------------------------------------------------


def _seccomp(inputs: SpecInputs, caps: list[str]) -> dict[str, Any] | None:
    sc = inputs.config.linux.security_context
    if sc.privileged:
        return None  # privileged is unconfined whatever profile is named (the kubelet's and containerd's rule)
    kind, path = _seccomp_choice(sc, inputs.runtime.seccomp_profile)
    if kind == "unconfined":
        return None
    try:
        return seccomp.load(path, caps)
    except seccomp.SeccompError as exc:
        field = f"{SC}.seccomp" if kind == "localhost" else "runtime.seccomp_profile (daemon config)"
        raise SpecError(field, str(exc)) from exc


def _seccomp_choice(sc: pb.LinuxContainerSecurityContext, default_path: str) -> tuple[str, str]:
    """('unconfined'|'default'|'localhost', profile path): the `seccomp` field first, then the deprecated path."""
    if sc.HasField("seccomp"):
        profile = sc.seccomp
        if profile.profile_type == pb.SecurityProfile.Unconfined:
            return "unconfined", ""
        if profile.profile_type == pb.SecurityProfile.Localhost:
            return "localhost", profile.localhost_ref
        return "default", default_path
    legacy = sc.seccomp_profile_path
    if legacy in ("runtime/default", "docker/default"):
        return "default", default_path
    if legacy.startswith("localhost/"):
        return "localhost", legacy[len("localhost/") :]
    return "unconfined", ""


def _apparmor(inputs: SpecInputs) -> str:
    sc = inputs.config.linux.security_context
    if sc.HasField("apparmor"):
        kind, name = sc.apparmor.profile_type, sc.apparmor.localhost_ref
    elif sc.apparmor_profile.startswith("localhost/"):
        kind, name = pb.SecurityProfile.Localhost, sc.apparmor_profile[len("localhost/") :]
    else:
        return ""
    if kind != pb.SecurityProfile.Localhost or sc.privileged:
        return ""  # RuntimeDefault: the host's default confinement (none here without AppArmor)
    if not inputs.host.apparmor:
        raise SpecError(f"{SC}.apparmor", f"profile {name!r} asked for, but AppArmor is not enabled on this host")
    return name


# ---- annotations -----------------------------------------------------------------------------


def _annotations(inputs: SpecInputs) -> Mapping[str, str]:
    meta = inputs.sandbox.spec.metadata
    out = dict(inputs.config.annotations)
    out.update(
        {
            "io.kubernetes.cri.container-type": "container",
            "io.kubernetes.cri.container-name": inputs.config.metadata.name,
            "io.kubernetes.cri.sandbox-id": inputs.sandbox.id,
            "io.kubernetes.cri.sandbox-name": meta.name,
            "io.kubernetes.cri.sandbox-namespace": meta.namespace,
            "io.kubernetes.cri.sandbox-uid": meta.uid,
            "io.kubernetes.cri.image-name": inputs.image_name,
        }
    )
    return out
