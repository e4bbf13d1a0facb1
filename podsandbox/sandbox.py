"""A pod sandbox as criopy keeps it: in memory for List/Status, and as one row of the state database."""

from __future__ import annotations

import asyncio
import sqlite3
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from cri.oci.conmon import Runtime
from cri.state import records
from podsandbox.resources import PodResources
from podsandbox.spec import SandboxSpec


class SandboxState(Enum):
    CREATING = "creating"  # only in the database: what recovery must undo after a crash
    READY = "ready"
    NOTREADY = "notready"


@dataclass
class Sandbox:
    id: str
    spec: SandboxSpec
    created_at: int  # ns since the epoch
    state: SandboxState
    dir: str
    pins: dict[str, str]  # namespace kind -> pinned path (absent: the host's)
    shm: str = ""  # tmpfs mount point; empty for host IPC
    cgroup_parent: str = ""
    network: str = ""  # CNI network attached; empty when none (host network, or torn down)
    ips: tuple[str, ...] = ()
    cni_result: dict[str, Any] | None = None
    infra_pid: int = 0
    # The handler the infra process was created with (binary, --root, args), used to stop and remove it:
    # a reload may change or remove the handler. None without an infra process, or in older rows.
    infra_runtime: Runtime | None = None
    config_blob: bytes = field(default=b"", repr=False)  # the CRI PodSandboxConfig as received
    resources: PodResources | None = None  # the last UpdatePodSandboxResources; None: as in the config
    # Its stop ran to its end in this process: network, mounts, pins and infra are released, and nothing makes
    # them again. Not stored: after a restart the first stop runs whole again, for what a crash may have left.
    released: bool = field(default=False, repr=False, compare=False, metadata=records.TRANSIENT)
    # Serializes stop, remove and updates of this sandbox; held in memory only.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False, metadata=records.TRANSIENT)

    @property
    def name(self) -> str:
        return self.spec.metadata.reservation


# The fields kept as columns of the sandboxes table; every other one is in its JSON `data`.
_ROW = records.Row(Sandbox, columns=("id", "state", "created_at", "config_blob"))


def from_row(row: sqlite3.Row | tuple[Any, ...]) -> Sandbox:
    sandbox_id, state, created_at, config, data_text = row
    return _ROW.load(
        data_text,
        id=sandbox_id,
        state=SandboxState(state),
        created_at=int(created_at),
        config_blob=bytes(config),
    )


SELECT_COLUMNS = "id, state, created_at, config, data"


def insert(conn: sqlite3.Connection, sandbox: Sandbox) -> None:
    """The row and the name reservation, in the caller's transaction."""
    meta = sandbox.spec.metadata
    conn.execute(
        "INSERT INTO name_reservations(name, kind, owner_id) VALUES (?, 'sandbox', ?)", (sandbox.name, sandbox.id)
    )
    conn.execute(
        "INSERT INTO sandboxes(id, name, namespace, uid, attempt, state, runtime_handler, created_at, config, data) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            sandbox.id,
            meta.name,
            meta.namespace,
            meta.uid,
            meta.attempt,
            sandbox.state.value,
            sandbox.spec.runtime_handler,
            sandbox.created_at,
            sandbox.config_blob,
            _ROW.dump(sandbox),
        ),
    )


def update(conn: sqlite3.Connection, sandbox: Sandbox) -> None:
    conn.execute(
        "UPDATE sandboxes SET state = ?, data = ? WHERE id = ?", (sandbox.state.value, _ROW.dump(sandbox), sandbox.id)
    )


def delete(conn: sqlite3.Connection, sandbox_id: str) -> None:
    conn.execute("DELETE FROM name_reservations WHERE owner_id = ? AND kind = 'sandbox'", (sandbox_id,))
    conn.execute("DELETE FROM sandboxes WHERE id = ?", (sandbox_id,))


def load_all(conn: sqlite3.Connection) -> list[Sandbox]:
    return [from_row(row) for row in conn.execute(f"SELECT {SELECT_COLUMNS} FROM sandboxes")]
