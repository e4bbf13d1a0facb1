"""Pod sandbox lifecycle: run, stop, remove, and what the kubelet sees of it.

Creation runs in a task of its own, detached from the RPC that asked for it:
when the kubelet's deadline expires it abandons the call, the task goes on,
and the kubelet's retry (same metadata) gets that sandbox back instead of a
'name is reserved' error (cri-o's in-flight creation store). Every step of a
creation pushes its undo; a failure unwinds them in reverse order, so nothing
is left half-made. Work on one sandbox is serialized by its lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import AsyncExitStack
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from cni.result import CniError
from cri import metrics
from cri.daemon.live_config import LiveConfig
from cri.errors import CriError, FailedPrecondition, Internal, InvalidArgument, NotFound
from cri.log import event
from cri.state import Store, idprefix
from cri.state.creations import Creations
from cri.system import concurrently, faults, offload
from podsandbox import files, infra, namespaces, shm
from podsandbox import sandbox as rows
from podsandbox.network import NetworkNotReady, PodNetwork, capabilities
from podsandbox.resources import PodResources, log_fields
from podsandbox.sandbox import Sandbox, SandboxState
from podsandbox.spec import NamespaceMode, SandboxSpec, sysctl_namespace, validate

log = logging.getLogger(__name__)


class PodMembers(Protocol):
    """What runs in the pods (the containers): stopped and removed before the pod itself."""

    async def stop_pod_containers(self, sandbox_id: str) -> None: ...

    async def remove_pod_containers(self, sandbox_id: str) -> None: ...


class _NoMembers:
    async def stop_pod_containers(self, sandbox_id: str) -> None:
        return None

    async def remove_pod_containers(self, sandbox_id: str) -> None:
        return None


def default_cgroup_parent(manager: str) -> str:
    return "criopy.slice" if manager == "systemd" else "/criopy"


class SandboxManager:
    def __init__(
        self,
        live: LiveConfig,
        store: Store,
        handlers: Callable[[], Iterable[str]],
        userns_problem: Callable[[str], str] = lambda handler: "",
    ) -> None:
        self._live = live
        self._store = store
        self._handlers = handlers
        self._userns_problem = userns_problem  # handler -> why it cannot run a pod's user namespace, "" if it can
        config = live.current
        self._runroot = Path(config.runroot)
        self._network = PodNetwork(Path(config.root) / "cni")
        self._sandboxes: dict[str, Sandbox] = {}
        self._creations: Creations[Sandbox] = Creations("pod sandbox", lambda s: s.id, self.find)
        self._members: PodMembers = _NoMembers()
        states = (SandboxState.READY, SandboxState.NOTREADY)
        metrics.count_sandbox_states([state.value for state in states], self._count_in_state)

    def serve_members(self, members: PodMembers) -> None:
        """Connected by the daemon once the containers are loaded (they need the sandboxes first)."""
        self._members = members

    # ---- lookup -------------------------------------------------------------------------------

    def get(self, id_or_prefix: str) -> Sandbox:
        found = self._existing(id_or_prefix)
        if found is None:
            raise NotFound(f"pod sandbox {id_or_prefix!r} not found")
        return found

    def _existing(self, id_or_prefix: str) -> Sandbox | None:
        """For the idempotent calls: None when the sandbox is gone, but an empty ID is still an error."""
        return idprefix.match(self._sandboxes, id_or_prefix, "pod_sandbox_id", "sandboxes")

    def find(self, sandbox_id: str) -> Sandbox | None:
        """The sandbox with exactly this ID, or None (for callers holding an ID, not a user's prefix)."""
        return self._sandboxes.get(sandbox_id)

    def list(self) -> list[Sandbox]:
        return list(self._sandboxes.values())

    def _count_in_state(self, state: str) -> int:
        """For the metrics endpoint's thread: list() copies the dict's values while the loop may change it."""
        return sum(1 for s in list(self._sandboxes.values()) if s.state.value == state)

    # ---- run ----------------------------------------------------------------------------------

    async def run(self, spec: SandboxSpec, config_blob: bytes) -> Sandbox:
        config = self._live.current
        validate(spec, config.runtime.cgroup_manager)
        try:
            capabilities(spec)  # the bandwidth annotations are parsed here, before anything is made
        except ValueError as exc:
            raise InvalidArgument("config.annotations", str(exc)) from exc
        handler = spec.runtime_handler or config.runtime.default_runtime
        if handler not in set(self._handlers()):
            raise InvalidArgument("runtime_handler", f"no runtime handler {handler!r} is configured")
        problem = self._userns_problem(handler) if spec.userns is not None else ""
        if problem:
            raise InvalidArgument(
                "config.linux.security_context.namespace_options.userns_options",
                f"runtime handler {handler!r} cannot run user namespaces on this node: {problem}",
            )
        return await self._creations.create(
            spec.metadata.reservation, lambda sandbox_id: self._create(sandbox_id, spec, handler, config_blob)
        )

    async def _create(self, sandbox_id: str, spec: SandboxSpec, handler: str, config_blob: bytes) -> Sandbox:
        config = self._live.current
        spec = _with_handler(spec, handler)
        sandbox = Sandbox(
            id=sandbox_id,
            spec=spec,
            created_at=time.time_ns(),
            state=SandboxState.CREATING,
            dir=str(self._runroot / "sandboxes" / sandbox_id),
            pins=self._pin_paths(sandbox_id, spec),
            shm="" if spec.host_ipc else str(self._runroot / "sandboxes" / sandbox_id / "shm"),
            cgroup_parent=spec.cgroup_parent or default_cgroup_parent(config.runtime.cgroup_manager),
            config_blob=config_blob,
        )
        started = time.monotonic()
        try:
            async with AsyncExitStack() as undo:
                await self._build(sandbox, undo)
                undo.pop_all()
        except BaseException as exc:
            event(log, logging.WARNING, "pod sandbox creation failed, undone", pod_id=sandbox_id, error=str(exc))
            mapped = _as_cri_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        self._sandboxes[sandbox_id] = sandbox
        event(
            log,
            logging.INFO,
            "pod sandbox ready",
            pod_id=sandbox_id,
            pod=sandbox.name,
            ips=",".join(sandbox.ips) or None,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return sandbox

    def _pin_paths(self, sandbox_id: str, spec: SandboxSpec) -> dict[str, str]:
        kinds = [] if spec.host_network else ["net", "uts"]
        if not spec.host_ipc:
            kinds.append("ipc")
        if spec.userns is not None:
            kinds.append("user")
        return {kind: str(self._runroot / "ns" / kind / sandbox_id) for kind in kinds}

    async def _build(self, sandbox: Sandbox, undo: AsyncExitStack) -> None:
        """Each step, then its undo; `undo` unwinds them in reverse if a later step fails."""
        spec, config = sandbox.spec, self._live.current
        await offload.to_thread(self._write, rows.insert, sandbox)
        undo.push_async_callback(self._undo, sandbox.id, "state row", self._write_delete, sandbox.id)
        faults.point("sandbox.run.recorded")

        # The undos first: the two steps below run at once, and either may fail after the other made things.
        undo.push_async_callback(
            self._undo, sandbox.id, "sandbox dir", offload.to_thread, shutil.rmtree, sandbox.dir, True
        )
        if sandbox.shm:
            undo.push_async_callback(self._undo, sandbox.id, "shm", offload.to_thread, shm.unmount, sandbox.shm)
        undo.push_async_callback(
            self._undo, sandbox.id, "namespaces", offload.to_thread, namespaces.release_all, list(sandbox.pins.values())
        )
        hostname = spec.hostname or (os.uname().nodename if spec.host_network else spec.metadata.name[:63])
        sysctls = _sysctls(config.runtime.default_sysctls, spec)
        await concurrently.all_of(
            offload.to_thread(self._write_files, sandbox, hostname, config.pod.shm_size),
            namespaces.create(sandbox.pins, hostname if "uts" in sandbox.pins else "", sysctls, spec.userns),
        )
        faults.point("sandbox.run.namespaces")

        if not spec.host_network:
            attachment = await self._network.attach(sandbox.id, sandbox.pins["net"], spec, config.network)
            sandbox.network, sandbox.ips, sandbox.cni_result = attachment.network, attachment.ips, attachment.result
            undo.push_async_callback(
                self._undo,
                sandbox.id,
                "cni",
                self._network.detach,
                sandbox.id,
                sandbox.pins["net"],
                attachment.network,
                config.network,
            )
            faults.point("sandbox.run.cni-added")
            await offload.to_thread(
                files.write_hosts, Path(sandbox.dir) / "hosts", hostname, list(sandbox.ips), _owner(spec)
            )

        if spec.pid_mode is NamespaceMode.POD:
            # The pod shares one PID namespace: catatonit holds it as PID 1 (no pause image).
            sandbox.infra_pid = await infra.start(sandbox, config)
            undo.push_async_callback(self._undo, sandbox.id, "infra", infra.stop, sandbox, config)
            faults.point("sandbox.run.infra")

        sandbox.state = SandboxState.READY
        await self._record(sandbox)

    def _write_files(self, sandbox: Sandbox, hostname: str, shm_size: int) -> None:
        """Blocking: the sandbox dir, its hostname, resolv.conf and hosts files, and the pod's /dev/shm."""
        directory = Path(sandbox.dir)
        directory.mkdir(0o711, parents=True)
        # In a user namespace the pod's root owns its files and /dev/shm, as the host's root does otherwise:
        # chowned (they are the pod's own, unlike image layers), as cri-o does.
        owner = _owner(sandbox.spec)
        files.write_hostname(directory / "hostname", hostname, owner)
        files.write_resolv_conf(directory / "resolv.conf", sandbox.spec.dns, owner=owner)
        if sandbox.spec.host_network:
            # A pod network's hosts file names the pod's addresses: written once CNI gave them (see _build).
            files.write_hosts(directory / "hosts", hostname, [], owner)
        if sandbox.shm:
            shm.mount(sandbox.shm, shm_size, owner)

    async def _undo(self, sandbox_id: str, step: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Best effort: one failed undo must not stop the others, nor hide the error that caused them."""
        try:
            await fn(*args)
        except Exception as exc:
            event(log, logging.ERROR, "undo step failed", pod_id=sandbox_id, step=step, error=str(exc))

    def _write(self, op: Callable[[Any, Sandbox], None], sandbox: Sandbox, durable: bool = True) -> None:
        with self._store.transaction(durable=durable) as conn:
            op(conn, sandbox)

    async def _record(self, sandbox: Sandbox) -> None:
        """A state change: not waited onto the disk, as recovery derives it again after a reboot."""
        await offload.to_thread(self._write, rows.update, sandbox, False)

    async def _write_delete(self, sandbox_id: str) -> None:
        await offload.to_thread(self._delete_row, sandbox_id)

    def _delete_row(self, sandbox_id: str) -> None:
        with self._store.transaction(durable=False) as conn:
            rows.delete(conn, sandbox_id)

    def _remove_files_and_row(self, sandbox: Sandbox) -> None:
        """Blocking, in one trip to a worker thread: the sandbox's files, then its row (a crash between the
        two leaves the row, and the pod is removed again after the restart)."""
        shutil.rmtree(sandbox.dir, ignore_errors=True)
        faults.point("sandbox.remove.files")
        self._delete_row(sandbox.id)

    # ---- stop and remove ----------------------------------------------------------------------

    async def stop(self, id_or_prefix: str) -> None:
        """Idempotent: an unknown or already stopped sandbox is fine."""
        sandbox = self._existing(id_or_prefix)
        if sandbox is None:
            return
        async with sandbox.lock:
            await self._stop_locked(sandbox)

    async def _stop_locked(self, sandbox: Sandbox) -> None:
        await self._members.stop_pod_containers(sandbox.id)
        faults.point("sandbox.stop.containers")
        if sandbox.released:
            # Stopped before (RemovePodSandbox after StopPodSandbox, as the kubelet calls them): releasing again
            # cost two trips to a worker thread, four unmounts of nothing and a row rewritten, per pod.
            return
        config = self._live.current
        if sandbox.spec.pid_mode is NamespaceMode.POD:
            await infra.stop(sandbox, config)  # gone already (or after a reboot) is fine
            sandbox.infra_pid = 0
        # Only CNI DEL needs the netns: the pod's /dev/shm and its other namespaces go meanwhile.
        others = [path for kind, path in sandbox.pins.items() if kind != "net"]
        await concurrently.all_of(self._detach(sandbox), offload.to_thread(_release, sandbox.shm, others))
        faults.point("sandbox.stop.network")
        await offload.to_thread(self._release_net_and_record_stopped, sandbox)
        if sandbox.state is not SandboxState.NOTREADY:
            event(log, logging.INFO, "pod sandbox stopped", pod_id=sandbox.id, pod=sandbox.name)
        sandbox.state = SandboxState.NOTREADY
        sandbox.released = True

    def _release_net_and_record_stopped(self, sandbox: Sandbox) -> None:
        """Blocking, in one trip to a worker thread (each trip costs about 0.1 ms of CPU in a burst): the net
        pin released once CNI DEL is done, then the state change recorded (not waited onto the disk, as
        recovery derives it again)."""
        if "net" in sandbox.pins:
            namespaces.release(sandbox.pins["net"])
        self._write(rows.update, replace(sandbox, state=SandboxState.NOTREADY), False)

    async def _detach(self, sandbox: Sandbox) -> None:
        if not sandbox.network:
            return
        pin = sandbox.pins.get("net", "")
        # CNI DEL must still run when the netns is gone; the plugins then free what the host holds. (Two stats:
        # inline, a worker thread's round trip would cost more.)
        pinned = bool(pin) and namespaces.is_pinned(pin)
        try:
            await self._network.detach(sandbox.id, pin if pinned else "", sandbox.network, self._live.current.network)
        except CniError as exc:
            raise Internal(f"stopping pod sandbox {sandbox.id}: CNI DEL failed: {exc}") from exc
        sandbox.network = ""

    async def remove(self, id_or_prefix: str) -> None:
        """Idempotent: stops first if needed; an unknown sandbox is fine."""
        sandbox = self._existing(id_or_prefix)
        if sandbox is None:
            return
        async with sandbox.lock:
            if sandbox.id not in self._sandboxes:
                return  # removed while we waited for the lock
            await self._stop_locked(sandbox)
            faults.point("sandbox.remove.stopped")
            await self._members.remove_pod_containers(sandbox.id)
            faults.point("sandbox.remove.containers")
            await offload.to_thread(self._remove_files_and_row, sandbox)
            self._sandboxes.pop(sandbox.id, None)
            self._creations.release(sandbox.id)
        event(log, logging.INFO, "pod sandbox removed", pod_id=sandbox.id, pod=sandbox.name)

    # ---- pod-level resources (UpdatePodSandboxResources) --------------------------------------

    async def update_resources(self, id_or_prefix: str, resources: PodResources) -> None:
        """Record a resize of the pod (validated by the caller); nothing on the host changes.

        The pod cgroup is the kubelet's, which resizes it itself, or the parent all pods share
        (see podsandbox.resources): as containerd, criopy writes no limits there.
        """
        sandbox = self.get(id_or_prefix)
        async with sandbox.lock:
            if sandbox.id not in self._sandboxes:
                raise NotFound(f"pod sandbox {id_or_prefix!r} not found")  # removed while we waited
            # Durable: unlike a state change, recovery cannot derive it again. The copy is written first,
            # so a failed write leaves the sandbox as it was.
            await offload.to_thread(self._write, rows.update, replace(sandbox, resources=resources))
            sandbox.resources = resources
        event(log, logging.INFO, "pod sandbox resources updated", pod_id=sandbox.id, **log_fields(resources))

    # ---- recovery -----------------------------------------------------------------------------

    async def recover(self) -> None:
        """Load the sandboxes of the database; finish undoing any creation a crash interrupted."""

        def load() -> list[Sandbox]:
            with self._store.transaction() as conn:
                return rows.load_all(conn)

        await offload.to_thread(self._network.stop_plugins_left_running)
        await offload.to_thread(self._network.remove_partial_writes)
        for sandbox in await offload.to_thread(load):
            if sandbox.state is SandboxState.CREATING:
                await self._discard_half_made(sandbox)
                continue
            if sandbox.state is SandboxState.READY and not await offload.to_thread(_pins_alive, sandbox):
                # After a reboot the pins under runroot are gone: the pod can only be stopped and removed.
                sandbox.state = SandboxState.NOTREADY
                await offload.to_thread(self._write, rows.update, sandbox)
            self._sandboxes[sandbox.id] = sandbox
            self._creations.reserve(sandbox.name, sandbox.id)
        event(log, logging.INFO, "pod sandboxes recovered", count=len(self._sandboxes))

    async def release_cached_networks(self, sandbox_id: str) -> int:
        """CNI DEL for each attachment cached for the ID, with or without a result; how many.

        For a creation a crash interrupted, and for an ID no record explains (the orphan sweep's).
        """
        networks = self._network.cached_networks(sandbox_id)
        for network in networks:
            await self._undo(
                sandbox_id, "cni", self._network.detach, sandbox_id, "", network, self._live.current.network
            )
        return len(networks)

    async def _discard_half_made(self, sandbox: Sandbox) -> None:
        event(log, logging.WARNING, "undoing a pod sandbox creation interrupted by a crash", pod_id=sandbox.id)
        config = self._live.current
        await self.release_cached_networks(sandbox.id)
        if sandbox.spec.pid_mode is NamespaceMode.POD:
            await self._undo(sandbox.id, "infra", infra.stop, sandbox, config)
        if sandbox.shm:
            await self._undo(sandbox.id, "shm", offload.to_thread, shm.unmount, sandbox.shm)
        await self._undo(sandbox.id, "namespaces", offload.to_thread, namespaces.release_all, sandbox.pins.values())
        await self._undo(sandbox.id, "sandbox dir", offload.to_thread, shutil.rmtree, sandbox.dir, True)
        await self._write_delete(sandbox.id)


def _release(shm_path: str, pins: list[str]) -> None:
    if shm_path:
        shm.unmount(shm_path)
    namespaces.release_all(pins)


def _pins_alive(sandbox: Sandbox) -> bool:
    return all(namespaces.is_pinned(path) for path in sandbox.pins.values())


def _owner(spec: SandboxSpec) -> tuple[int, int] | None:
    """Who owns the pod's files on the host: the mapped root of its user namespace, or None (the host's root)."""
    return None if spec.userns is None else spec.userns.root


def _with_handler(spec: SandboxSpec, handler: str) -> SandboxSpec:
    return replace(spec, runtime_handler=handler)


def _sysctls(defaults: list[str], spec: SandboxSpec) -> dict[str, str]:
    """The configured default sysctls that fit this pod's namespaces, overridden by the pod's own."""
    out: dict[str, str] = {}
    for item in defaults:
        key, _, value = item.partition("=")
        kind = sysctl_namespace(key.strip())
        if kind is None or (kind == "net" and spec.host_network) or (kind == "ipc" and spec.host_ipc):
            continue
        out[key.strip()] = value.strip()
    out.update(spec.sysctls)
    return out


def _as_cri_error(exc: BaseException) -> BaseException:
    if isinstance(exc, CriError | asyncio.CancelledError):
        return exc
    if isinstance(exc, NetworkNotReady):
        return FailedPrecondition(f"network not ready: {exc}")
    if isinstance(exc, CniError | namespaces.NamespaceError | infra.InfraError):
        return Internal(str(exc))
    return exc
