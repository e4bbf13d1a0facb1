"""A container as criopy keeps it: in memory for List/Status, and as one row of the state database."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from api.runtime.v1 import api_pb2 as pb
from cri.oci.conmon import Runtime
from cri.state import records


class ContainerState(Enum):
    CREATING = "creating"  # only in the database: what recovery must undo after a crash
    CREATED = "created"
    RUNNING = "running"
    EXITED = "exited"


@dataclass(eq=False)
class Lifecycle:
    """What the daemon holds of a live container besides its record; none of it is stored."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # serializes start, stop, update, remove
    exited: asyncio.Event = field(default_factory=asyncio.Event)  # set once the exit is recorded
    # The task that records an exit and then deletes the runtime's state (containerd deletes its task at
    # exit too): RemoveContainer waits for it, and deletes again only when it could not.
    after_exit: asyncio.Task[None] | None = None
    runtime_deleted: bool = False


@dataclass
class Container:
    id: str
    sandbox_id: str
    config: pb.ContainerConfig
    image_id: str
    image_ref: str  # a repo digest of the image when it has one, else its ID (what ContainerStatus.image_ref is)
    image_name: str  # what was asked for (config.image.image), as crictl shows it
    created_at: int  # ns since the epoch
    state: ContainerState
    runtime: str  # the handler name (the pod's)
    bundle: str  # <runroot>/containers/<id>: config.json, conmon's pid files, attach socket, ctl fifo
    storage: str  # <root>/containers/<id>: the rootfs (upper/work/merged)
    log_path: str  # absolute CRI log path ("" when the pod or container gives none)
    cgroups_path: str
    stop_signal: str
    uid: int = 0
    gid: int = 0
    additional_gids: tuple[int, ...] = ()
    username: str = ""
    pid: int = 0
    conmon_pid: int = 0
    pid_identity: str = ""  # which process `pid` is (linux.process_identity); "" in rows from before it was kept
    started_at: int = 0
    finished_at: int = 0
    exit_code: int = 0
    reason: str = ""
    message: str = ""
    resources: pb.LinuxContainerResources = field(default_factory=pb.LinuxContainerResources)
    # The handler as resolved at creation (binary, --root, args), used for every later runtime call: a
    # reload may change or remove the handler. None in rows written before it was kept.
    oci_runtime: Runtime | None = None
    # Image volumes, one entry per config.mounts entry ("" for the other mounts): the image's ID, which
    # holds its read-only mount (cri/storage/imagevolumes.py) and the image itself against removal, and
    # its ref (a repo digest, else the ID) that ContainerStatus reports. Recorded before the mounts are made.
    image_volume_ids: tuple[str, ...] = ()
    image_volume_refs: tuple[str, ...] = ()
    # The one entry per container: its lock, exit event and after-exit task live here.
    live: Lifecycle = field(default_factory=Lifecycle, repr=False, compare=False, metadata=records.TRANSIENT)

    @property
    def name(self) -> str:
        return self.config.metadata.name

    @property
    def attempt(self) -> int:
        return int(self.config.metadata.attempt)

    @property
    def volume_images(self) -> list[str]:
        """The IDs of the images this container mounts as volumes, each once."""
        return sorted({i for i in self.image_volume_ids if i})


# The fields kept as columns of the containers table; every other one is in its JSON `data`.
_ROW = records.Row(Container, columns=("id", "sandbox_id", "state", "image_id", "created_at", "config"))


def from_row(row: sqlite3.Row | tuple[Any, ...]) -> Container:
    container_id, sandbox_id, state, image_id, created_at, config_blob, data_text = row
    return _ROW.load(
        data_text,
        id=container_id,
        sandbox_id=sandbox_id,
        state=ContainerState(state),
        image_id=image_id,
        created_at=int(created_at),
        config=pb.ContainerConfig.FromString(bytes(config_blob)),
    )


def reservation(pod_reservation: str, metadata: pb.ContainerMetadata) -> str:
    """The name a container reserves: unique per pod and container metadata, as the kubelet builds names."""
    return f"{pod_reservation}/{metadata.name}_{metadata.attempt}"


SELECT_COLUMNS = "id, sandbox_id, state, image_id, created_at, config, data"


def insert(conn: sqlite3.Connection, container: Container, reservation: str) -> None:
    """The row and the name reservation, in the caller's transaction."""
    conn.execute(
        "INSERT INTO name_reservations(name, kind, owner_id) VALUES (?, 'container', ?)", (reservation, container.id)
    )
    conn.execute(
        "INSERT INTO containers(id, sandbox_id, name, attempt, state, image_id, created_at, config, data) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            container.id,
            container.sandbox_id,
            container.name,
            container.attempt,
            container.state.value,
            container.image_id,
            container.created_at,
            container.config.SerializeToString(),
            _ROW.dump(container),
        ),
    )


def update(conn: sqlite3.Connection, container: Container) -> None:
    conn.execute(
        "UPDATE containers SET state = ?, data = ? WHERE id = ?",
        (container.state.value, _ROW.dump(container), container.id),
    )


def delete(conn: sqlite3.Connection, container_id: str) -> None:
    conn.execute("DELETE FROM name_reservations WHERE owner_id = ? AND kind = 'container'", (container_id,))
    conn.execute("DELETE FROM containers WHERE id = ?", (container_id,))


def load_all(conn: sqlite3.Connection) -> list[Container]:
    return [from_row(row) for row in conn.execute(f"SELECT {SELECT_COLUMNS} FROM containers")]
