"""Garbage collection: what lies under criopy's own roots that no record explains.

Every creation writes its row before it makes anything outside the database,
and every removal deletes its row last, so a thing whose ID has no row is an
orphan: left by a bug, a lost database, or a hand that removed rows. The
sweep lists the disk first and reads the rows after, which keeps it safe
beside creations and removals in flight (a thing listed before its row was
written cannot exist; one whose row went meanwhile was already deleted).

Only names shaped like criopy's IDs (64 hex characters) in criopy's own
directories are candidates, and processes only when their command line names
a bundle under criopy's runroot: nothing outside its roots is touched.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cri.containers import exits
from cri.log import event
from cri.oci import bundle, conmon
from cri.oci.conmon import OciRuntimeError, Runtime
from cri.state.store import Store
from cri.storage import rootfs
from cri.system import offload
from podsandbox import namespaces, shm

log = logging.getLogger(__name__)

_ID = re.compile(r"^[0-9a-f]{64}$")
_CNI_ENTRY = re.compile(r"^.+-([0-9a-f]{64})-[^-]+$")  # <network>-<sandbox id>-<ifname>, libcni's naming
NAMESPACE_KINDS = ("net", "ipc", "uts", "user")
SWEEP_INTERVAL = 600.0  # seconds between sweeps after the one at start


@dataclass(frozen=True)
class Layout:
    """Where criopy keeps each kind of thing, by object ID."""

    root: Path
    runroot: Path

    @property
    def bundles(self) -> Path:
        return self.runroot / "containers"

    @property
    def storage(self) -> Path:
        return self.root / "containers"

    @property
    def exits(self) -> Path:
        return self.runroot / "exits"

    @property
    def sockets(self) -> Path:
        return self.runroot / "sockets"

    @property
    def sandboxes(self) -> Path:
        return self.runroot / "sandboxes"

    @property
    def cni_results(self) -> Path:
        return self.root / "cni" / "results"

    def pins(self, kind: str) -> Path:
        return self.runroot / "ns" / kind


@dataclass
class Found:
    """IDs present on disk, per place, as listed before the rows were read."""

    bundles: set[str] = field(default_factory=set)
    storage: set[str] = field(default_factory=set)
    exits: set[str] = field(default_factory=set)
    sockets: set[str] = field(default_factory=set)
    sandboxes: set[str] = field(default_factory=set)
    pins: dict[str, set[str]] = field(default_factory=dict)
    runtime_state: dict[str, set[str]] = field(default_factory=dict)  # runtime root -> IDs
    conmons: dict[int, str] = field(default_factory=dict)  # pid -> the ID its bundle names
    attachments: set[str] = field(default_factory=set)  # sandbox IDs with a cached CNI entry


def _ids(directory: Path) -> set[str]:
    try:
        return {name for name in os.listdir(directory) if _ID.match(name)}
    except FileNotFoundError:
        return set()


def list_disk(layout: Layout, runtime_roots: Iterable[str]) -> Found:
    """Blocking: every ID-named thing under the roots, and conmon processes of bundles under the runroot."""
    return Found(
        bundles=_ids(layout.bundles),
        storage=_ids(layout.storage),
        exits=_ids(layout.exits),
        sockets=_ids(layout.sockets),
        sandboxes=_ids(layout.sandboxes),
        pins={kind: _ids(layout.pins(kind)) for kind in NAMESPACE_KINDS},
        runtime_state={root: _ids(Path(root)) for root in runtime_roots if _within(Path(root), layout.runroot)},
        conmons=_conmons(layout.runroot),
        attachments=_attachments(layout.cni_results),
    )


def known_ids(store: Store) -> set[str]:
    """Blocking: the ID of every sandbox and container row, whatever its state (CREATING ones included)."""
    with store.transaction() as conn:
        rows = conn.execute("SELECT id FROM sandboxes UNION SELECT id FROM containers").fetchall()
    return {str(row[0]) for row in rows}


def remove_files(layout: Layout, found: Found, known: set[str]) -> list[tuple[str, str]]:
    """Blocking: remove the orphan files, mounts and pins; (kind, path) of each one removed."""
    removed: list[tuple[str, str]] = []
    for cid in sorted(found.storage - known):
        rootfs.remove(layout.storage / cid)  # unmounts the overlay first
        removed.append(("container storage", str(layout.storage / cid)))
    for cid in sorted(found.bundles - known):
        bundle.remove(layout.bundles / cid)
        removed.append(("bundle", str(layout.bundles / cid)))
    for cid in sorted(found.exits - known):
        exits.remove(str(layout.exits), cid)
        removed.append(("exit file", str(layout.exits / cid)))
    for cid in sorted(found.sockets - known):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(layout.sockets / cid)
        removed.append(("attach socket link", str(layout.sockets / cid)))
    for sid in sorted(found.sandboxes - known):
        shm.unmount(str(layout.sandboxes / sid / "shm"))
        shutil.rmtree(layout.sandboxes / sid, ignore_errors=True)
        removed.append(("sandbox dir", str(layout.sandboxes / sid)))
    for kind, ids in found.pins.items():
        for sid in sorted(ids - known):
            namespaces.release(str(layout.pins(kind) / sid))
            removed.append((f"{kind} namespace pin", str(layout.pins(kind) / sid)))
    return removed


def runtime_orphans(found: Found, known: set[str], runtimes: Iterable[Runtime]) -> list[tuple[Runtime, str]]:
    """(runtime, ID) for each state dir of an unknown container under a runtime root of ours."""
    by_root = {runtime.root: runtime for runtime in runtimes}
    return [
        (by_root[root], cid)
        for root, ids in sorted(found.runtime_state.items())
        if root in by_root
        for cid in sorted(ids - known)
    ]


def kill_conmons(found: Found, known: set[str]) -> list[tuple[str, str]]:
    """SIGKILL the monitors of unknown containers that are still there (their container is gone by now)."""
    killed = []
    for pid, cid in sorted(found.conmons.items()):
        if cid in known:
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(("conmon", f"pid {pid} for {cid}"))
    return killed


def report(removed: Iterable[tuple[str, str]]) -> int:
    count = 0
    for kind, what in removed:
        event(log, logging.WARNING, "orphan removed", kind=kind, path=what)
        count += 1
    return count


def _within(path: Path, top: Path) -> bool:
    return os.path.realpath(path).startswith(os.path.realpath(top).rstrip("/") + "/")


def _attachments(results: Path) -> set[str]:
    try:
        names = os.listdir(results)
    except FileNotFoundError:
        return set()
    return {match.group(1) for name in names if (match := _CNI_ENTRY.match(name))}


def _conmons(runroot: Path) -> dict[int, str]:
    """pid -> container ID of each conmon whose `-b <bundle>` lies under our runroot."""
    out: dict[int, str] = {}
    prefixes = [str(runroot / "containers") + "/", str(runroot / "sandboxes") + "/"]
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if not argv or not argv[0].endswith(b"conmon"):
            continue
        args = [arg.decode(errors="replace") for arg in argv]
        cid = _arg(args, "-c")
        bundle_dir = _arg(args, "-b")
        if cid and bundle_dir and _ID.match(cid) and any(bundle_dir.startswith(p) for p in prefixes):
            out[int(entry)] = cid
    return out


def _arg(args: list[str], flag: str) -> str:
    with contextlib.suppress(ValueError, IndexError):
        return args[args.index(flag) + 1]
    return ""


class OrphanCollector:
    """Runs the sweep at start and then every SWEEP_INTERVAL seconds, one log line per orphan removed."""

    def __init__(
        self,
        layout: Layout,
        store: Store,
        runtimes: Callable[[], list[Runtime]],
        release_network: Callable[[str], Awaitable[int]],
    ) -> None:
        self._layout = layout
        self._store = store
        self._runtimes = runtimes
        self._release_network = release_network  # CNI DEL from the cache entries of a sandbox ID: how many
        self._task: asyncio.Task[None] | None = None

    async def sweep(self) -> int:
        runtimes = self._runtimes()
        found = await offload.to_thread(list_disk, self._layout, [r.root for r in runtimes])
        known = await offload.to_thread(known_ids, self._store)
        # The monitors first: a conmon that saw its container die would write an exit file after the sweep.
        removed = kill_conmons(found, known)
        for runtime, cid in runtime_orphans(found, known, runtimes):
            try:
                await conmon.delete(runtime, cid)  # --force: kills what still runs, then frees its cgroup
            except OciRuntimeError as exc:
                event(log, logging.ERROR, "orphan runtime state not removed", id=cid, error=str(exc))
                continue
            removed.append(("runtime state", f"{runtime.root}/{cid}"))
        for sid in sorted(found.attachments - known):
            # DEL before the pins go matters not: CNI DEL works without the netns.
            if await self._release_network(sid):
                removed.append(("cni attachment", sid))
        removed += await offload.to_thread(remove_files, self._layout, found, known)
        return report(removed)

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="orphan-collector")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_INTERVAL)
            try:
                await self.sweep()
            except Exception as exc:  # a failed round must not end the collector
                event(log, logging.ERROR, "orphan sweep failed", error=str(exc))
