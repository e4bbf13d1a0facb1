"""CreateContainer input checks: every problem is INVALID_ARGUMENT naming the CRI field (DESIGN 5)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from google.protobuf.message import Message

from api.runtime.v1 import api_pb2 as pb
from cri.containers import capabilities, cdi
from cri.containers.users import ProcessUser
from cri.errors import InvalidArgument
from cri.storage import imagevolumes
from cri.system.idmap import IdMapping
from podsandbox.spec import UserNamespace

SC = "config.linux.security_context"
RES = "config.linux.resources"
_CPUSET = re.compile(r"^\d+(-\d+)?(,\d+(-\d+)?)*$")
_PAGE_SIZE = re.compile(r"^\d+(KB|MB|GB|TB|PB)$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_MODES = (pb.POD, pb.CONTAINER, pb.NODE, pb.TARGET)
MAX_CPU_SHARES = 262144
MAX_ID = 2**32 - 1  # (uid_t)-1 is not an ID


def _absolute(value: str, field: str) -> None:
    if not value:
        raise InvalidArgument(field, "must not be empty")
    if not os.path.isabs(value):
        raise InvalidArgument(field, f"{value!r} must be an absolute path")
    if ".." in value.split("/"):
        raise InvalidArgument(field, f"{value!r} must not contain '..'")


def no_nul(message: Message, where: str) -> None:
    """INVALID_ARGUMENT for a NUL byte in any string of `message` but its labels and annotations (kept as given):
    the rest become paths, command lines, environments and names, and none of them can hold one."""
    for fd, value in message.ListFields():
        if fd.name in ("labels", "annotations"):
            continue
        field = f"{where}.{fd.name}"
        if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
            items = [(f"{field}[{key}]", key) for key in value] + [(f"{field}[{k}]", v) for k, v in value.items()]
        elif fd.is_repeated:
            items = [(f"{field}[{i}]", item) for i, item in enumerate(value)]
        else:
            items = [(field, value)]
        for name, item in items:
            if isinstance(item, Message):
                no_nul(item, name)
            elif isinstance(item, str) and "\x00" in item:
                raise InvalidArgument(name, f"{item!r} contains a NUL byte")


def request(config: pb.ContainerConfig) -> None:
    no_nul(config, "config")
    if not config.HasField("metadata") or not config.metadata.name:
        raise InvalidArgument("config.metadata.name", "is required")
    if not _NAME.match(config.metadata.name):
        raise InvalidArgument("config.metadata.name", f"{config.metadata.name!r} is not a valid container name")
    if not config.image.image:
        raise InvalidArgument("config.image.image", "is required")
    if config.log_path and (os.path.isabs(config.log_path) or ".." in config.log_path.split("/")):
        raise InvalidArgument("config.log_path", f"{config.log_path!r} must be relative, without '..'")
    if config.working_dir:
        _absolute(config.working_dir, "config.working_dir")
    for i, kv in enumerate(config.envs):
        if not kv.key or "=" in kv.key:
            raise InvalidArgument(f"config.envs[{i}].key", f"{kv.key!r} is not a variable name")
    _mounts(config)
    _devices(config)
    resources(config.linux.resources, RES)
    _security(config.linux.security_context)
    if config.stop_signal and config.stop_signal not in pb.Signal.values():
        raise InvalidArgument("config.stop_signal", f"unknown signal {config.stop_signal}")
    for i, device in enumerate(config.CDI_devices):
        try:
            cdi.parse_name(device.name)
        except cdi.CdiError as exc:
            raise InvalidArgument(f"config.CDI_devices[{i}]", str(exc)) from None


def _mounts(config: pb.ContainerConfig) -> None:
    for i, mount in enumerate(config.mounts):
        field = f"config.mounts[{i}]"
        _absolute(mount.container_path, f"{field}.container_path")
        if is_image_volume(mount):
            _image_volume(mount, field)
        else:
            _absolute(mount.host_path, f"{field}.host_path")
        if mount.uidMappings or mount.gidMappings:
            _mount_mappings(mount, field)
        if mount.propagation not in pb.MountPropagation.values():
            raise InvalidArgument(f"{field}.propagation", f"unknown propagation {mount.propagation}")
        if mount.recursive_read_only and not mount.readonly:
            raise InvalidArgument(f"{field}.recursive_read_only", "needs readonly too")
        if mount.recursive_read_only and mount.propagation != pb.PROPAGATION_PRIVATE:
            raise InvalidArgument(f"{field}.recursive_read_only", "needs private propagation")


def _mount_mappings(mount: pb.Mount, field: str) -> None:
    """An idmapped mount: one range each way, container ID 0 mapped, private (a fresh detached mount)."""
    _one_range(mount.uidMappings, f"{field}.uidMappings")
    _one_range(mount.gidMappings, f"{field}.gidMappings")
    if mount.propagation != pb.PROPAGATION_PRIVATE:
        raise InvalidArgument(f"{field}.propagation", "an idmapped mount (uidMappings) has private propagation only")


def mount_mappings(mount: pb.Mount) -> UserNamespace | None:
    """The idmapping a mount asks for, None for a plain one (validated by request() already)."""
    if not mount.uidMappings:
        return None
    uids, gids = mount.uidMappings[0], mount.gidMappings[0]
    return UserNamespace(
        IdMapping(uids.container_id, uids.host_id, uids.length), IdMapping(gids.container_id, gids.host_id, gids.length)
    )


def is_image_volume(mount: pb.Mount) -> bool:
    return mount.HasField("image") and bool(mount.image.image)


def _image_volume(mount: pb.Mount, field: str) -> None:
    # The kubelet sends readonly=true; a read-write request is not refused (cri-o's tests send what the
    # kubelet does and it mounts read-only whatever readonly says): the mount is read-only anyway. A host
    # path, which the kubelet leaves empty, is ignored.
    try:
        imagevolumes.check_sub_path(mount.image_sub_path)
    except imagevolumes.SubPathError as exc:
        raise InvalidArgument(f"{field}.image_sub_path", str(exc)) from exc


def _devices(config: pb.ContainerConfig) -> None:
    for i, device in enumerate(config.devices):
        field = f"config.devices[{i}]"
        _absolute(device.container_path, f"{field}.container_path")
        _absolute(device.host_path, f"{field}.host_path")
        if device.permissions and (set(device.permissions) - set("rwm")):
            raise InvalidArgument(f"{field}.permissions", f"{device.permissions!r} is not a subset of 'rwm'")


def resources(res: pb.LinuxContainerResources, where: str) -> None:
    """Also used by UpdateContainerResources, whose field is `linux`."""
    if not 0 <= res.cpu_shares <= MAX_CPU_SHARES:
        raise InvalidArgument(f"{where}.cpu_shares", f"{res.cpu_shares} is outside 0..{MAX_CPU_SHARES}")
    if res.cpu_quota < -1 or 0 < res.cpu_quota < 1000:
        raise InvalidArgument(f"{where}.cpu_quota", f"{res.cpu_quota} must be -1, 0 or at least 1000 (µs)")
    if res.cpu_period and not 1000 <= res.cpu_period <= 1_000_000:
        raise InvalidArgument(f"{where}.cpu_period", f"{res.cpu_period} is outside 1000..1000000 (µs)")
    _memory(res, where)
    _sets(res, where)


def _memory(res: pb.LinuxContainerResources, where: str) -> None:
    if res.memory_limit_in_bytes < 0:
        raise InvalidArgument(f"{where}.memory_limit_in_bytes", f"{res.memory_limit_in_bytes} is negative")
    if res.memory_swap_limit_in_bytes < -1:
        raise InvalidArgument(f"{where}.memory_swap_limit_in_bytes", f"{res.memory_swap_limit_in_bytes} is invalid")
    if 0 < res.memory_swap_limit_in_bytes < res.memory_limit_in_bytes:
        raise InvalidArgument(f"{where}.memory_swap_limit_in_bytes", "is smaller than memory_limit_in_bytes")
    if not -1000 <= res.oom_score_adj <= 1000:
        raise InvalidArgument(f"{where}.oom_score_adj", f"{res.oom_score_adj} is outside -1000..1000")


def _sets(res: pb.LinuxContainerResources, where: str) -> None:
    for name in ("cpuset_cpus", "cpuset_mems"):
        value = getattr(res, name)
        if value and not _CPUSET.match(value):
            raise InvalidArgument(f"{where}.{name}", f"{value!r} is not a list like '0-3,5'")
    for i, page in enumerate(res.hugepage_limits):
        if not _PAGE_SIZE.match(page.page_size):
            raise InvalidArgument(f"{where}.hugepage_limits[{i}].page_size", f"{page.page_size!r} is not like '2MB'")
    for key in res.unified:
        if "/" in key or not key or "." not in key:
            raise InvalidArgument(f"{where}.unified", f"{key!r} is not a cgroup v2 file name")


def _security(sc: pb.LinuxContainerSecurityContext) -> None:
    _namespaces(sc.namespace_options)
    _identity(sc)
    _capabilities(sc.capabilities)
    _profile(sc, "seccomp")
    _profile(sc, "apparmor")
    if sc.seccomp_profile_path.startswith("localhost/"):
        _absolute(sc.seccomp_profile_path[len("localhost/") :], f"{SC}.seccomp_profile_path")
    for field in ("masked_paths", "readonly_paths"):
        for i, path in enumerate(getattr(sc, field)):
            _absolute(path, f"{SC}.{field}[{i}]")


def _namespaces(ns: pb.NamespaceOption) -> None:
    for kind in ("network", "pid", "ipc"):
        if getattr(ns, kind) not in _MODES:
            raise InvalidArgument(f"{SC}.namespace_options.{kind}", f"unknown namespace mode {getattr(ns, kind)}")
    if ns.pid == pb.TARGET and not ns.target_id:
        raise InvalidArgument(f"{SC}.namespace_options.target_id", "is required with pid mode TARGET")
    userns_of(ns, f"{SC}.namespace_options")


def userns_of(ns: pb.NamespaceOption, where: str) -> UserNamespace | None:
    """The user namespace userns_options asks for: None for the host's (NODE, or no options).

    Mode POD with exactly one uid and one gid range that maps container ID 0 is what the kubelet sends
    (hostUsers: false); anything else is refused naming the field, rather than silently run as host root.
    """
    if not ns.HasField("userns_options"):
        return None
    options, where = ns.userns_options, f"{where}.userns_options"
    if options.mode == pb.NODE:
        return None
    if options.mode != pb.POD:
        name = pb.NamespaceMode.Name(options.mode) if options.mode in pb.NamespaceMode.values() else options.mode
        raise InvalidArgument(f"{where}.mode", f"{name} is not supported: a user namespace is per pod (POD) or NODE")
    return UserNamespace(uids=_one_range(options.uids, f"{where}.uids"), gids=_one_range(options.gids, f"{where}.gids"))


def _one_range(mappings: Sequence[pb.IDMapping], where: str) -> IdMapping:
    if len(mappings) != 1:
        raise InvalidArgument(where, f"exactly one mapping range is supported, got {len(mappings)}")
    m = mappings[0]
    if m.length == 0:
        raise InvalidArgument(where, "the mapping range is empty (length 0)")
    if m.container_id != 0:
        raise InvalidArgument(where, f"container ID 0 is not mapped (the range starts at {m.container_id})")
    if m.host_id + m.length > MAX_ID or m.container_id + m.length > MAX_ID:
        raise InvalidArgument(where, f"the range {m.host_id}+{m.length} goes past the last ID {MAX_ID - 1}")
    return IdMapping(m.container_id, m.host_id, m.length)


def userns_agrees(config: pb.ContainerConfig, pod: UserNamespace | None, pod_id: str) -> None:
    """A container runs in its pod's user namespace: it may repeat the pod's options, not ask for others."""
    ns = config.linux.security_context.namespace_options
    where = f"{SC}.namespace_options"
    said = "the host's" if pod is None else f"mode POD with uids {pod.uids.line().strip()!r}"
    if ns.HasField("userns_options") and userns_of(ns, where) != pod:
        raise InvalidArgument(f"{where}.userns_options", f"does not agree with pod sandbox {pod_id}, which has {said}")
    # An idmapped mount is made with the pod's own namespace: it can only show the pod's mapping.
    for i, mount in enumerate(config.mounts):
        wanted = mount_mappings(mount)
        if wanted is not None and wanted != pod:
            raise InvalidArgument(
                f"config.mounts[{i}].uidMappings",
                f"an idmapped mount takes its pod's user namespace mapping; pod sandbox {pod_id} has {said}",
            )


def _identity(sc: pb.LinuxContainerSecurityContext) -> None:
    if sc.HasField("run_as_user") and sc.run_as_user.value < 0:
        raise InvalidArgument(f"{SC}.run_as_user", f"{sc.run_as_user.value} is negative")
    if sc.HasField("run_as_group"):
        if sc.run_as_group.value < 0:
            raise InvalidArgument(f"{SC}.run_as_group", f"{sc.run_as_group.value} is negative")
        if not sc.HasField("run_as_user") and not sc.run_as_username:
            raise InvalidArgument(f"{SC}.run_as_group", "is given without run_as_user or run_as_username")
    if any(g < 0 for g in sc.supplemental_groups):
        raise InvalidArgument(f"{SC}.supplemental_groups", "group IDs must not be negative")
    if sc.supplemental_groups_policy not in pb.SupplementalGroupsPolicy.values():
        raise InvalidArgument(f"{SC}.supplemental_groups_policy", f"unknown policy {sc.supplemental_groups_policy}")


def _capabilities(caps: pb.Capability) -> None:
    for name in ("add_capabilities", "drop_capabilities", "add_ambient_capabilities"):
        for cap in getattr(caps, name):
            try:
                capabilities.normalize(cap)
            except capabilities.CapabilityError as exc:
                raise InvalidArgument(f"{SC}.capabilities.{name}", str(exc)) from exc


def _profile(sc: pb.LinuxContainerSecurityContext, name: str) -> None:
    if not sc.HasField(name):
        return
    profile: pb.SecurityProfile = getattr(sc, name)
    if profile.profile_type not in pb.SecurityProfile.ProfileType.values():
        raise InvalidArgument(f"{SC}.{name}.profile_type", f"unknown profile type {profile.profile_type}")
    if profile.profile_type == pb.SecurityProfile.Localhost:
        if name == "seccomp":
            _absolute(profile.localhost_ref, f"{SC}.seccomp.localhost_ref")
            if not os.path.isfile(profile.localhost_ref):
                raise InvalidArgument(f"{SC}.seccomp.localhost_ref", f"{profile.localhost_ref} does not exist")
        elif not profile.localhost_ref:
            raise InvalidArgument(f"{SC}.apparmor.localhost_ref", "must name a profile")


def user_mapped(user: ProcessUser, userns: UserNamespace | None) -> None:
    """The process's IDs (in the namespace's terms) must be mapped, or runc's setuid/setgroups fails with EINVAL."""
    if userns is None:
        return
    if userns.uids.to_host(user.uid) is None:
        raise InvalidArgument(f"{SC}.run_as_user", f"uid {user.uid} is not mapped in the pod's user namespace")
    if userns.gids.to_host(user.gid) is None:
        raise InvalidArgument(f"{SC}.run_as_group", f"gid {user.gid} is not mapped in the pod's user namespace")
    for gid in user.additional_gids:
        if userns.gids.to_host(gid) is None:
            raise InvalidArgument(f"{SC}.supplemental_groups", f"gid {gid} is not mapped in the pod's user namespace")
