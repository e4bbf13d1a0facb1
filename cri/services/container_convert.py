"""Translation from criopy's containers to the CRI's container messages."""

from __future__ import annotations

import json
from collections.abc import Iterable

from api.runtime.v1 import api_pb2 as pb
from cri.containers.container import Container, ContainerState
from cri.containers.events import ContainerEvent, EventType
from cri.oci import bundle
from cri.services.sandbox_convert import labels_match
from cri.transport.grpcserver import Encoded

STATES = {
    ContainerState.CREATING: pb.CONTAINER_UNKNOWN,
    ContainerState.CREATED: pb.CONTAINER_CREATED,
    ContainerState.RUNNING: pb.CONTAINER_RUNNING,
    ContainerState.EXITED: pb.CONTAINER_EXITED,
}
EVENT_TYPES = {
    EventType.CREATED: pb.CONTAINER_CREATED_EVENT,
    EventType.STARTED: pb.CONTAINER_STARTED_EVENT,
    EventType.STOPPED: pb.CONTAINER_STOPPED_EVENT,
    EventType.DELETED: pb.CONTAINER_DELETED_EVENT,
}


def _image(container: Container) -> pb.ImageSpec:
    return pb.ImageSpec(
        image=container.image_name,
        annotations=dict(container.config.image.annotations),
        user_specified_image=container.image_name,
    )


def _mounts(container: Container) -> list[pb.Mount]:
    """The mounts as given, an image volume's image named as resolved (its repo digest, else its ID) with
    what was asked for in user_specified_image, as the container's own image is shown."""
    out = []
    refs = container.image_volume_refs
    for i, given in enumerate(container.config.mounts):
        mount = pb.Mount()
        mount.CopyFrom(given)
        if i < len(refs) and refs[i]:
            mount.image.user_specified_image = given.image.user_specified_image or given.image.image
            mount.image.image = refs[i]
        out.append(mount)
    return out


def item(container: Container) -> pb.Container:
    """The list entry: of all it is built from, only the state changes after creation."""
    return pb.Container(
        id=container.id,
        pod_sandbox_id=container.sandbox_id,
        metadata=container.config.metadata,
        image=_image(container),
        image_ref=container.image_ref,
        image_id=container.image_id,
        state=STATES[container.state],
        created_at=container.created_at,
        labels=dict(container.config.labels),
        annotations=dict(container.config.annotations),
    )


def status(container: Container) -> pb.ContainerStatus:
    signal = container.stop_signal if container.stop_signal in pb.Signal.keys() else "RUNTIME_DEFAULT"  # noqa: SIM118
    return pb.ContainerStatus(
        id=container.id,
        metadata=container.config.metadata,
        state=STATES[container.state],
        created_at=container.created_at,
        started_at=container.started_at,
        finished_at=container.finished_at,
        exit_code=container.exit_code,
        image=_image(container),
        image_ref=container.image_ref,
        image_id=container.image_id,
        reason=container.reason,
        message=container.message,
        labels=dict(container.config.labels),
        annotations=dict(container.config.annotations),
        mounts=_mounts(container),
        log_path=container.log_path,
        resources=pb.ContainerResources(linux=container.resources),
        user=pb.ContainerUser(
            linux=pb.LinuxContainerUser(
                uid=container.uid, gid=container.gid, supplemental_groups=list(container.additional_gids)
            )
        ),
        stop_signal=pb.Signal.Value(signal),  # type: ignore[arg-type]
    )


def verbose_info(container: Container) -> dict[str, str]:
    """The `info` map crictl prints with `inspect`: one JSON document under "info", as containerd gives."""
    try:
        spec = bundle.read(container.bundle)
    except (OSError, ValueError):
        spec = {}
    info = {
        "sandboxID": container.sandbox_id,
        "pid": container.pid,
        "conmonPid": container.conmon_pid,
        "runtimeType": container.runtime,
        "bundle": container.bundle,
        "rootfs": container.storage,
        "logPath": container.log_path,
        "cgroupsPath": container.cgroups_path,
        "mounts": spec.get("mounts", []),
        "runtimeSpec": spec,
    }
    return {"info": json.dumps(info)}


def _selected(container: Container, flt: pb.ContainerFilter | pb.ContainerStatsFilter) -> bool:
    """What both filters share: an ID prefix, a pod ID prefix, a label selector."""
    return (
        container.id.startswith(flt.id)
        and container.sandbox_id.startswith(flt.pod_sandbox_id)
        and labels_match(container.config.labels, flt.label_selector)
    )


def filtered(containers: Iterable[Container], flt: pb.ContainerFilter | None) -> list[pb.Container]:
    out = []
    for container in containers:
        if container.state is ContainerState.CREATING:
            continue
        if flt is not None:
            if not _selected(container, flt):
                continue
            if flt.HasField("state") and STATES[container.state] != flt.state.state:
                continue
        out.append(item(container))
    return out


# What a ListContainers answer is built from: each container's ID and state, in order (every other field
# of an entry is fixed when the container is made).
Basis = tuple[tuple[str, ContainerState], ...]


class ListCache:
    """ListContainers answers, kept serialized while what they are built from is unchanged.

    The kubelet relists every second; with hundreds of containers, building and
    serializing the entries costs several times the rest of the call. The one
    cache of the answer: keyed on the filter and on the containers' IDs and
    states, holding immutable bytes the transports send as they are.
    """

    LIMIT = 16  # distinct filters remembered; the kubelet uses two or three

    def __init__(self) -> None:
        self._last: dict[bytes, tuple[Basis, Encoded]] = {}

    def answer(self, containers: Iterable[Container], flt: pb.ContainerFilter | None) -> Encoded:
        key = flt.SerializeToString(deterministic=True) if flt is not None else b""
        listed = list(containers)
        basis = tuple((c.id, c.state) for c in listed)
        last = self._last.get(key)
        if last is not None and last[0] == basis:
            return last[1]
        answer = Encoded(pb.ListContainersResponse(containers=filtered(listed, flt)).SerializeToString())
        if key not in self._last and len(self._last) >= self.LIMIT:
            del self._last[next(iter(self._last))]
        self._last[key] = (basis, answer)
        return answer


def stats_selected(containers: Iterable[Container], flt: pb.ContainerStatsFilter | None) -> list[Container]:
    return [c for c in containers if flt is None or _selected(c, flt)]


def event_message(
    item: ContainerEvent, sandbox: pb.PodSandboxStatus | None, statuses: list[pb.ContainerStatus]
) -> pb.ContainerEventResponse:
    return pb.ContainerEventResponse(
        container_id=item.container_id,
        container_event_type=EVENT_TYPES[item.type],
        created_at=item.created_at,
        pod_sandbox_status=sandbox,
        containers_statuses=statuses,
    )
