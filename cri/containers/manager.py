"""Container lifecycle: create, start, stop, remove, exits, and what the kubelet sees of them.

Creation runs in a task of its own, detached from the RPC that asked for it
(as for sandboxes): a kubelet that gives up at its deadline gets the finished
container on its retry instead of a name conflict. Every creation step pushes
its undo; a failure unwinds them in reverse, so no mount, bundle, conmon,
runtime state or row is left behind. Exits come from conmon's exit files,
watched with inotify. Status and List answer from memory, never from the
runtime binary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

from api.runtime.v1 import api_pb2 as pb
from cri import metrics
from cri.containers import cgroupstats, exits, ocispec, users, validate
from cri.containers import container as rows
from cri.containers.container import Container, ContainerState
from cri.containers.events import ContainerEvent, EventBus, EventType
from cri.containers.host import HostFacts
from cri.containers.stats import PodFigures, StatsCollector, network
from cri.daemon.live_config import LiveConfig
from cri.errors import CriError, FailedPrecondition, Internal, InvalidArgument, NoSpace, NotFound, is_no_space
from cri.images import reference
from cri.images.index import AmbiguousImage, ImageRecord
from cri.images.manager import ImageManager
from cri.log import event
from cri.oci import bundle, conmon, conmon_ctl, init_signal
from cri.oci.conmon import ConmonLaunch, OciRuntimeError, Runtime
from cri.state import Store, idprefix
from cri.state.creations import Creations
from cri.storage import imagevolumes, rootfs
from cri.storage.layers import Driver
from cri.system import concurrently, faults, offload
from podsandbox.manager import SandboxManager
from podsandbox.sandbox import Sandbox, SandboxState

log = logging.getLogger(__name__)

KILL_WAIT = 30.0  # seconds a SIGKILLed container may take to be reported gone
CONMON_EXIT_WAIT = 5.0  # conmon drains the log after the exit file; let it finish before its dir goes
REOPEN_LOG_WAIT = 5.0  # seconds conmon may take to put the new log file in place


class ContainerManager:
    def __init__(self, live: LiveConfig, store: Store, sandboxes: SandboxManager, images: ImageManager) -> None:
        self._live = live
        self._store = store
        self._sandboxes = sandboxes
        self._images = images
        config = live.current
        self._runroot = Path(config.runroot) / "containers"
        self._storage = Path(config.root) / "containers"
        self._volumes = imagevolumes.ImageVolumes(Path(config.root) / "image-volumes")
        self.exit_dir = str(Path(config.runroot) / "exits")
        self._socket_dir = str(Path(config.runroot) / "sockets")
        self.host = HostFacts.detect()
        if not self.host.swap_accounting:
            # As the peers do, a swap limit is then accepted and not applied: said once, not per container.
            event(log, logging.INFO, "no swap accounting on this host: memory_swap_limit_in_bytes is not applied")
        self.events = EventBus()
        self._containers: dict[str, Container] = {}
        self._creations: Creations[Container] = Creations("container", lambda c: c.id, self._containers.get)
        self._watcher = exits.ExitWatcher(self.exit_dir, self._on_exit_file)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.stats = StatsCollector(self.all)
        states = (ContainerState.CREATED, ContainerState.RUNNING, ContainerState.EXITED)
        metrics.count_container_states([state.value for state in states], self._count_in_state)

    # ---- start-up -----------------------------------------------------------------------------

    async def load(self) -> None:
        """Watch for exits first, then load the database, so no exit falls between the two."""
        self._watcher.start()
        await self._recover()
        self.stats.start()

    async def close(self) -> None:
        await self.stats.close()
        self._watcher.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ---- lookup -------------------------------------------------------------------------------

    def get(self, id_or_prefix: str) -> Container:
        found = self._existing(id_or_prefix)
        if found is None:
            raise NotFound(f"container {id_or_prefix!r} not found")
        return found

    def running(self, id_or_prefix: str) -> Container:
        """A running container, for exec and attach: NOT_FOUND or FAILED_PRECONDITION otherwise."""
        container = self.get(id_or_prefix)
        if container.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {container.id} is {container.state.value}, not running")
        return container

    def attach_paths(self, container: Container) -> tuple[str, str]:
        """conmon's attach socket (through the short socket-dir link) and the bundle that holds its ctl fifo."""
        return os.path.join(self._socket_dir, container.id, "attach"), container.bundle

    def runtime_of(self, container: Container) -> Runtime:
        return conmon.recorded_runtime(self._live.current, container.oci_runtime, container.runtime)

    def _existing(self, id_or_prefix: str) -> Container | None:
        """For the idempotent calls: None when the container is gone, but an empty ID is still an error."""
        return idprefix.match(self._containers, id_or_prefix, "container_id", "containers")

    def all(self) -> list[Container]:
        return list(self._containers.values())

    def of_sandbox(self, sandbox_id: str) -> list[Container]:
        return [c for c in self._containers.values() if c.sandbox_id == sandbox_id]

    def uses_image(self, image_id: str) -> bool:
        """Whether a container runs the image or mounts it as a volume (RemoveImage refuses then)."""
        return any(c.image_id == image_id or image_id in c.image_volume_ids for c in self._containers.values())

    def _publish(self, container: Container, kind: EventType) -> None:
        self.events.publish(ContainerEvent(container.id, container.sandbox_id, kind, time.time_ns()))

    def _count_in_state(self, state: str) -> int:
        """For the metrics endpoint's thread: list() copies the dict's values while the loop may change it."""
        return sum(1 for c in list(self._containers.values()) if c.state.value == state)

    # ---- create -------------------------------------------------------------------------------

    async def create(self, sandbox_id: str, config: pb.ContainerConfig) -> Container:
        validate.request(config)
        sandbox = self._sandboxes.get(sandbox_id)
        if sandbox.state is not SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        if config.linux.security_context.privileged and not sandbox.spec.privileged:
            raise InvalidArgument(
                "config.linux.security_context.privileged", f"pod sandbox {sandbox.id} is not privileged"
            )
        validate.userns_agrees(config, sandbox.spec.userns, sandbox.id)
        image = self._find_image(config.image.image, "config.image.image")
        volumes = self._volume_images(config)
        name = rows.reservation(sandbox.name, config.metadata)
        return await self._creations.create(
            name, lambda container_id: self._create(container_id, name, sandbox, image, config, volumes=volumes)
        )

    def _find_image(self, text: str, field: str) -> ImageRecord:
        try:
            image = self._images.find(text)
        except (reference.ReferenceError, AmbiguousImage) as exc:
            raise InvalidArgument(field, str(exc)) from exc
        if image is None:
            # NOT_FOUND, as for the container's own image: the kubelet pulls image volumes first too.
            raise NotFound(f"{field}: image {text!r} not found: pull it first")
        return image

    def _volume_images(self, config: pb.ContainerConfig) -> dict[int, ImageRecord]:
        """config.mounts index -> the image each image volume names."""
        return {
            i: self._find_image(m.image.image, f"config.mounts[{i}].image")
            for i, m in enumerate(config.mounts)
            if validate.is_image_volume(m)
        }

    async def _create(
        self,
        container_id: str,
        name: str,
        sandbox: Sandbox,
        image: ImageRecord,
        config: pb.ContainerConfig,
        *,
        volumes: dict[int, ImageRecord],
    ) -> Container:
        settings = self._live.current
        container = Container(
            id=container_id,
            sandbox_id=sandbox.id,
            config=config,
            image_id=image.id,
            image_ref=_ref(image),
            image_name=config.image.image,
            created_at=time.time_ns(),
            state=ContainerState.CREATING,
            runtime=sandbox.spec.runtime_handler or settings.runtime.default_runtime,
            bundle=str(self._runroot / container_id),
            storage=str(self._storage / container_id),
            log_path=_log_path(sandbox, config),
            cgroups_path=bundle.cgroups_path(settings.runtime.cgroup_manager, sandbox.cgroup_parent, container_id),
            stop_signal=ocispec.stop_signal(config, image),
            resources=config.linux.resources,
            image_volume_ids=tuple(volumes[i].id if i in volumes else "" for i in range(len(config.mounts))),
            image_volume_refs=tuple(_ref(volumes[i]) if i in volumes else "" for i in range(len(config.mounts))),
        )
        started = time.monotonic()
        try:
            async with AsyncExitStack() as undo:
                await self._build(container, name, sandbox, image, undo, volumes=volumes)
                undo.pop_all()
        except BaseException as exc:
            event(log, logging.WARNING, "container creation failed, undone", id=container_id, error=str(exc))
            mapped = _exec_refused(exc, config, image) or _as_cri_error(exc)
            if mapped is exc:
                raise
            raise mapped from exc
        self._containers[container_id] = container
        self._publish(container, EventType.CREATED)
        event(
            log,
            logging.INFO,
            "container created",
            id=container_id,
            pod_id=sandbox.id,
            container=config.metadata.name,
            pid=container.pid,
            duration_ms=round((time.monotonic() - started) * 1000, 1),
        )
        return container

    async def _build(
        self,
        container: Container,
        name: str,
        sandbox: Sandbox,
        image: ImageRecord,
        undo: AsyncExitStack,
        *,
        volumes: dict[int, ImageRecord],
    ) -> None:
        settings = self._live.current
        # Resolved once, and recorded with the row before anything is made with it.
        runtime = container.oci_runtime = conmon.runtime_for(settings, container.runtime)
        monitor = conmon.conmon_binary(settings)
        await offload.to_thread(self._write, rows.insert, container, name)
        undo.push_async_callback(self._undo, container.id, "state row", self._delete_row, container.id)
        faults.point("container.create.recorded")

        undo.push_async_callback(self._undo, container.id, "bundle", offload.to_thread, bundle.remove, container.bundle)
        undo.push_async_callback(
            self._undo, container.id, "rootfs", offload.to_thread, rootfs.remove, Path(container.storage)
        )
        driver: Driver = "vfs" if settings.storage.driver == "vfs" else "overlay"
        pid_namespace = self._pid_namespace(container.config, sandbox)
        if volumes:
            undo.push_async_callback(
                self._undo, container.id, "image volumes", offload.to_thread, self._volumes.release_all, container.id
            )
        launch = self._launch(container, name)
        # One trip to a worker thread for all the file work (conmon's directories too): each trip costs a
        # loop turn or two, and about 0.1 ms of CPU in a burst.
        user = await offload.to_thread(
            self._write_bundle, container, sandbox, image, driver, pid_namespace, launch=launch, volumes=volumes
        )
        container.uid, container.gid = user.uid, user.gid
        container.additional_gids, container.username = user.additional_gids, user.username
        faults.point("container.create.bundle")

        undo.push_async_callback(self._undo, container.id, "runtime", self._delete_runtime, runtime, container)
        created = await conmon.create(runtime, monitor, launch, prepared=True)
        container.pid, container.conmon_pid = created.pid, created.conmon_pid
        container.pid_identity = created.pid_identity
        faults.point("container.create.runtime")
        container.state = ContainerState.CREATED
        await self._record(container)

    def _write_bundle(
        self,
        container: Container,
        sandbox: Sandbox,
        image: ImageRecord,
        driver: Driver,
        pid_namespace: str | None,
        *,
        launch: ConmonLaunch,
        volumes: dict[int, ImageRecord],
    ) -> users.ProcessUser:
        """Blocking: the image volumes, the bundle dir, the rootfs mount, the user, config.json, the log dir,
        conmon's directories."""
        os.makedirs(container.bundle, 0o700)
        shift = _shift(sandbox)
        root = rootfs.create(Path(container.storage), self._images.lower_dirs(image), driver, shift=shift)
        sources = self._mount_image_volumes(container, volumes, shift)
        idmapped = _idmapped_volumes(container, shift)
        user = _resolve_user(root, container.config, image)
        validate.user_mapped(user, sandbox.spec.userns)
        spec = ocispec.build(
            ocispec.SpecInputs(
                container_id=container.id,
                config=container.config,
                sandbox=sandbox,
                image=image,
                image_name=container.image_name,
                rootfs=str(root),
                user=user,
                runtime=self._live.current.runtime,
                host=self.host,
                pid_namespace=pid_namespace,
                cgroups_path=container.cgroups_path,
                image_volumes=sources,
                idmapped_volumes=idmapped,
            )
        )
        bundle.write(container.bundle, spec)
        if container.log_path:
            os.makedirs(os.path.dirname(container.log_path), 0o755, True)
        conmon.prepare(launch)
        return user

    def _mount_image_volumes(
        self, container: Container, volumes: dict[int, ImageRecord], shift: rootfs.IdShift | None
    ) -> dict[int, str]:
        """Blocking: each image's shared read-only mount (held by the container), then its sub path in it.

        An idmapped one (uidMappings, in a pod's user namespace) is the container's own: an overlay cannot
        be idmapped, so its layers are, under <container storage>/image-volumes/<i>, removed with the rootfs.
        """
        own = {i for i in volumes if shift is not None and validate.mount_mappings(container.config.mounts[i])}
        merged = {
            image.id: self._volumes.acquire(image.id, self._images.lower_dirs(image), container.id)
            for i, image in volumes.items()
            if i not in own
        }
        sources: dict[int, str] = {}
        for i, image in volumes.items():
            sub_path = container.config.mounts[i].image_sub_path
            if i in own and shift is not None:
                top = Path(container.storage) / "image-volumes" / str(i)
                top.mkdir(mode=0o711, parents=True)  # runc's init, the mapped root, binds it from inside
                top.parent.chmod(0o711)
                base = rootfs.mount_read_only(top, self._images.lower_dirs(image), shift)
            else:
                base = merged[image.id]
            try:
                sources[i] = str(imagevolumes.resolve_sub_path(base, sub_path))
            except imagevolumes.SubPathError as exc:
                raise InvalidArgument(f"config.mounts[{i}].image_sub_path", str(exc)) from exc
        return sources

    def _launch(self, container: Container, name: str) -> ConmonLaunch:
        config = container.config
        return ConmonLaunch(
            id=container.id,
            name=name,
            bundle=container.bundle,
            # Without a CRI log path conmon still needs somewhere to write: a file inside the bundle.
            log_path=container.log_path or os.path.join(container.bundle, "container.log"),
            exit_dir=self.exit_dir,
            persist_dir=os.path.join(container.bundle, "persist"),
            socket_dir=self._socket_dir,
            log_size_max=self._live.current.runtime.log_size_max,
            terminal=config.tty,
            stdin=config.stdin,
            leave_stdin_open=config.stdin and not config.stdin_once,
        )

    def _pid_namespace(self, config: pb.ContainerConfig, sandbox: Sandbox) -> str | None:
        ns = config.linux.security_context.namespace_options
        if ns.pid == pb.NODE:
            return None
        if ns.pid == pb.POD and sandbox.infra_pid:
            return f"/proc/{sandbox.infra_pid}/ns/pid"
        # POD in a pod whose containers do not share one (POD is also the proto's zero value, what
        # a config without namespace options says): the container gets its own, as the pod asked.
        if ns.pid == pb.TARGET:
            target = self.get(ns.target_id)
            if target.sandbox_id != sandbox.id or target.state is not ContainerState.RUNNING:
                raise FailedPrecondition(f"target container {ns.target_id} is not running in pod {sandbox.id}")
            return f"/proc/{target.pid}/ns/pid"
        return ""

    async def _undo(self, container_id: str, step: str, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        try:
            await fn(*args)
        except Exception as exc:
            event(log, logging.ERROR, "undo step failed", id=container_id, step=step, error=str(exc))

    async def _delete_runtime(self, runtime: Runtime, container: Container) -> None:
        """Remove the runtime state, then wait for conmon to finish (it exits once the container is gone)."""
        await conmon.delete(runtime, container.id)
        conmon_pid = container.conmon_pid or conmon.read_pid(os.path.join(container.bundle, "conmon.pid"))
        if conmon_pid:
            await conmon.wait_gone([conmon_pid], CONMON_EXIT_WAIT)
        await offload.to_thread(exits.remove, self.exit_dir, container.id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self._socket_dir, container.id))

    def _write(self, op: Callable[..., None], *args: Any, durable: bool = True) -> None:
        with self._store.transaction(durable=durable) as conn:
            op(conn, *args)

    async def _record(self, container: Container) -> None:
        """A state change: not waited onto the disk, as recovery derives it again after a reboot."""
        await offload.to_thread(self._write, rows.update, container, durable=False)

    async def _delete_row(self, container_id: str) -> None:
        await offload.to_thread(self._write, rows.delete, container_id, durable=False)

    # ---- start --------------------------------------------------------------------------------

    async def start(self, id_or_prefix: str) -> Container:
        container = self.get(id_or_prefix)
        async with container.live.lock:
            if container.state is not ContainerState.CREATED:
                raise FailedPrecondition(f"container {container.id} is {container.state.value}, not created")
            # Taken before the call: a process that exits at once must not look finished before it started.
            started_at = time.time_ns()
            try:
                await conmon.start(self.runtime_of(container), container.id, init_pid=container.pid)
            except OciRuntimeError as exc:
                raise Internal(f"starting container {container.id}: {exc}") from exc
            faults.point("container.start.started")
            container.started_at = started_at
            _mark_running(container)
            await self._record(container)
        self._publish(container, EventType.STARTED)
        event(log, logging.INFO, "container started", id=container.id, pod_id=container.sandbox_id)
        self._check_exit(container.id)
        return container

    # ---- exits --------------------------------------------------------------------------------

    def _on_exit_file(self, container_id: str) -> None:
        self._check_exit(container_id)

    def _check_exit(self, container_id: str) -> None:
        container = self._containers.get(container_id)
        if container is None or container.state is ContainerState.EXITED:
            return
        code = conmon.read_exit(self.exit_dir, container_id)
        if code is None:
            return
        self._record_exit(container, code)

    def _record_exit(self, container: Container, code: int, message: str = "") -> None:
        container.state = ContainerState.EXITED
        container.exit_code = code
        container.finished_at = _mtime_ns(os.path.join(self.exit_dir, container.id)) or time.time_ns()
        if self._oom_killed(container):
            container.reason = "OOMKilled"
        else:
            container.reason = "Completed" if code == 0 else "Error"
        container.message = message
        container.live.exited.set()
        metrics.record_container_exit(container.reason)
        container.live.after_exit = self._spawn(self._record_and_release(container))
        self._publish(container, EventType.STOPPED)
        event(
            log,
            logging.INFO,
            "container exited",
            id=container.id,
            pod_id=container.sandbox_id,
            exit_code=code,
            reason=container.reason,
        )

    def _oom_killed(self, container: Container) -> bool:
        markers = (os.path.join(container.bundle, "persist", "oom"), os.path.join(container.bundle, "oom"))
        if any(os.path.exists(marker) for marker in markers):
            return True
        return bool(cgroupstats.oom_kills(container.cgroups_path))

    async def _record_and_release(self, container: Container) -> None:
        """After an exit: write it down, then, if nothing of the container can still run, delete its runtime state."""
        try:
            await self._record(container)
        except Exception as exc:
            event(log, logging.ERROR, "recording a container exit failed", id=container.id, error=str(exc))
            return  # the exit file stays for a restarted daemon to find
        if not self._owns_pid_namespace(container):
            return  # processes exec'd into a shared PID namespace may still use it: RemoveContainer kills them
        try:
            await self._delete_runtime(self.runtime_of(container), container)
        except (OciRuntimeError, OSError) as exc:
            event(log, logging.WARNING, "runtime delete after exit failed", id=container.id, error=str(exc))
            return  # RemoveContainer tries again
        container.live.runtime_deleted = True

    def _spawn(self, work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait_exit(self, container: Container, timeout: float) -> bool:
        if container.state is ContainerState.EXITED:
            return True
        try:
            async with asyncio.timeout(timeout):
                await container.live.exited.wait()
        except TimeoutError:
            # The exit file may have appeared while the watch was busy: look once more before giving up.
            self._check_exit(container.id)
        return _exited(container)

    # ---- stop and remove ----------------------------------------------------------------------

    async def stop(self, id_or_prefix: str, timeout: int) -> None:
        """Stop signal, then SIGKILL after `timeout` seconds; returns once the process is gone. Idempotent."""
        container = self._existing(id_or_prefix)
        if container is None:
            return
        async with container.live.lock:
            await self._stop_locked(container, max(timeout, 0))

    async def _stop_locked(self, container: Container, timeout: int) -> None:
        if container.state is not ContainerState.RUNNING:
            return
        try:
            if timeout > 0:
                await self._signal(container, container.stop_signal, all_processes=False)
                if await self._wait_exit(container, timeout):
                    return
                event(log, logging.INFO, "container ignored its stop signal, killing", id=container.id)
            # In a PID namespace of its own, the kernel kills every process in it once its init dies.
            await self._signal(container, "SIGKILL", all_processes=not self._owns_pid_namespace(container))
            faults.point("container.stop.signalled")
        except OciRuntimeError as exc:
            raise Internal(f"stopping container {container.id}: {exc}") from exc
        if not await self._wait_exit(container, KILL_WAIT):
            raise Internal(f"container {container.id} still runs {KILL_WAIT:g}s after SIGKILL")

    async def _signal(self, container: Container, name: str, *, all_processes: bool) -> None:
        """Signal the init directly when that is sure to reach it, else through the runtime (and for --all)."""
        signum = init_signal.number(name)
        if signum is None:
            target = name.removeprefix("SIG")  # the runtime's error will name it
        elif not all_processes and init_signal.send(container.pid, container.conmon_pid, signum):
            return
        else:
            target = str(signum)
        await conmon.kill(self.runtime_of(container), container.id, target, all_processes=all_processes)

    async def remove(self, id_or_prefix: str) -> None:
        """Kill if needed, delete the runtime state, rootfs, bundle and row, free the name. Idempotent."""
        container = self._existing(id_or_prefix)
        if container is None:
            return
        async with container.live.lock:
            if container.id not in self._containers:
                return
            await self._stop_locked(container, 0)
            await self._remove_locked(container)

    async def _remove_locked(self, container: Container) -> None:
        runtime = self.runtime_of(container)
        try:
            if container.state is ContainerState.EXITED and self._owns_pid_namespace(container):
                # Its PID namespace died with its init, so nothing uses the rootfs any more:
                # unmount it while the runtime deletes its state.
                await concurrently.all_of(
                    self._delete_runtime_after_exit(runtime, container),
                    offload.to_thread(rootfs.remove, Path(container.storage)),
                )
            else:
                # A created container's init, or an exec'd process in a shared PID namespace, may still
                # use the rootfs until the runtime kills it.
                await self._delete_runtime(runtime, container)
                await offload.to_thread(rootfs.remove, Path(container.storage))
            faults.point("container.remove.runtime")
            await offload.to_thread(self._remove_files, container)
        except (OciRuntimeError, OSError) as exc:
            raise Internal(f"removing container {container.id}: {exc}") from exc
        faults.point("container.remove.files")
        await self._delete_row(container.id)
        self._containers.pop(container.id, None)
        self._creations.release(container.id)
        self._publish(container, EventType.DELETED)
        event(log, logging.INFO, "container removed", id=container.id, pod_id=container.sandbox_id)

    def _remove_files(self, container: Container) -> None:
        """Blocking, in one trip to a worker thread (each trip costs about 0.1 ms of CPU in a burst): the
        bundle, then the image volumes the container held."""
        bundle.remove(container.bundle)
        self._volumes.release_all(container.id)

    async def _delete_runtime_after_exit(self, runtime: Runtime, container: Container) -> None:
        after_exit = container.live.after_exit
        if after_exit is not None:
            await asyncio.wait([after_exit])  # not cancelled with the caller: it holds no lock and ends by itself
        if not container.live.runtime_deleted:
            await self._delete_runtime(runtime, container)

    def _owns_pid_namespace(self, container: Container) -> bool:
        mode = container.config.linux.security_context.namespace_options.pid
        if mode == pb.CONTAINER:
            return True
        sandbox = self._sandboxes.find(container.sandbox_id)
        return mode == pb.POD and sandbox is not None and not sandbox.infra_pid

    async def pod_figures(self, sandbox: Sandbox, *, with_network: bool = True) -> PodFigures:
        """A pod's stats: its containers' figures, read now, and the counters of its network namespace."""
        containers = self.of_sandbox(sandbox.id)
        figures = await self.stats.figures(containers)
        net = None
        if with_network and not sandbox.spec.host_network:
            # Any process in the pod's netns shows its counters: the infra process, else a running container.
            pid = sandbox.infra_pid or next((c.pid for c in containers if c.state is ContainerState.RUNNING), 0)
            net = await offload.to_thread(network, pid)
        return PodFigures(containers, figures, net)

    async def stop_pod_containers(self, sandbox_id: str) -> None:
        """StopPodSandbox: every container of the pod is killed (the kubelet stopped them gracefully first)."""
        await asyncio.gather(*(self.stop(c.id, 0) for c in self.of_sandbox(sandbox_id)))

    async def remove_pod_containers(self, sandbox_id: str) -> None:
        await asyncio.gather(*(self.remove(c.id) for c in self.of_sandbox(sandbox_id)))

    # ---- update and logs ----------------------------------------------------------------------

    async def update_resources(self, id_or_prefix: str, resources: pb.LinuxContainerResources) -> None:
        container = self.get(id_or_prefix)
        validate.resources(resources, "linux")
        if resources.unified and not self.host.cgroup2:
            raise InvalidArgument("linux.unified", "cgroup v2 settings on a host without the unified hierarchy")
        async with container.live.lock:
            if container.state not in (ContainerState.CREATED, ContainerState.RUNNING):
                raise FailedPrecondition(f"container {container.id} is {container.state.value}")
            settings = self._live.current
            body = ocispec.resources(resources, self.host, settings.runtime.pids_limit)
            try:
                await conmon.update(self.runtime_of(container), container.id, body)
            except OciRuntimeError as exc:
                if _CGROUP_REFUSED.search(exc.message):
                    raise InvalidArgument("linux", f"container {container.id}: {exc.message}") from exc
                raise Internal(f"updating container {container.id}: {exc}") from exc
            container.resources = resources
            await self._record(container)
        event(log, logging.INFO, "container resources updated", id=container.id)

    async def reopen_log(self, id_or_prefix: str) -> None:
        container = self.get(id_or_prefix)
        if container.state is not ContainerState.RUNNING:
            raise FailedPrecondition(f"container {container.id} is not running")
        try:
            reopened = await conmon_ctl.reopen_log(container.bundle, container.log_path, REOPEN_LOG_WAIT)
        except OSError as exc:
            raise Internal(f"reopening the log of container {container.id}: conmon's ctl fifo: {exc.strerror}") from exc
        if not reopened:
            raise Internal(
                f"reopening the log of container {container.id}: conmon made no new {container.log_path} "
                f"within {REOPEN_LOG_WAIT:g}s"
            )
        event(log, logging.INFO, "container log reopened", id=container.id, path=container.log_path)

    # ---- recovery -----------------------------------------------------------------------------

    async def _recover(self) -> None:
        def load() -> list[Container]:
            with self._store.transaction() as conn:
                return rows.load_all(conn)

        for container in await offload.to_thread(load):
            if container.state is ContainerState.CREATING:
                await self._discard_half_made(container)
                continue
            self._containers[container.id] = container
            if container.state is ContainerState.EXITED:
                container.live.exited.set()
            sandbox = self._sandboxes.find(container.sandbox_id)
            if sandbox is not None:
                self._creations.reserve(rows.reservation(sandbox.name, container.config.metadata), container.id)
            self._check_exit(container.id)
            if not _exited(container) and not conmon.container_runs(
                container.pid, container.conmon_pid, container.pid_identity
            ):
                self._record_exit(container, 255, "the container was lost while the daemon was down")
        held = {c.id: c.volume_images for c in self._containers.values()}
        await offload.to_thread(self._volumes.recover, held)
        event(log, logging.INFO, "containers recovered", count=len(self._containers))

    async def _discard_half_made(self, container: Container) -> None:
        event(log, logging.WARNING, "undoing a container creation interrupted by a crash", id=container.id)
        with contextlib.suppress(OciRuntimeError):
            await self._undo(container.id, "runtime", self._delete_runtime, self.runtime_of(container), container)
        await self._undo(container.id, "rootfs", offload.to_thread, rootfs.remove, Path(container.storage))
        await self._undo(container.id, "bundle", offload.to_thread, bundle.remove, container.bundle)
        await self._delete_row(container.id)


def _ref(image: ImageRecord) -> str:
    """How ContainerStatus names an image: a repo digest when it has one, else its ID."""
    return image.repo_digests[0] if image.repo_digests else image.id


def _exited(container: Container) -> bool:
    return container.state is ContainerState.EXITED


def _mark_running(container: Container) -> None:
    # A very short process may have exited (and been recorded) while `start` ran: keep that.
    if container.state is ContainerState.CREATED:
        container.state = ContainerState.RUNNING


def _shift(sandbox: Sandbox) -> rootfs.IdShift | None:
    """The pod's user namespace as the rootfs sees it; None when the pod runs in the host's."""
    userns = sandbox.spec.userns
    if userns is None:
        return None
    return rootfs.IdShift(sandbox.pins["user"], userns.root)


def _idmapped_volumes(container: Container, shift: rootfs.IdShift | None) -> dict[int, str]:
    """Blocking: an idmapped bind of each host-path volume that asks for uidMappings; index -> what runc binds."""
    out: dict[int, str] = {}
    for i, mount in enumerate(container.config.mounts):
        if shift is None or validate.is_image_volume(mount) or validate.mount_mappings(mount) is None:
            continue
        try:
            if not os.path.exists(mount.host_path):  # a missing host path: an empty dir, as plain; a file stays one
                os.makedirs(mount.host_path, mode=0o755, exist_ok=True)
            out[i] = str(rootfs.mount_idmapped_volume(Path(container.storage), i, mount.host_path, shift))
        except OSError as exc:
            raise InvalidArgument(f"config.mounts[{i}].uidMappings", f"{mount.host_path}: {exc}") from exc
    return out


def _log_path(sandbox: Sandbox, config: pb.ContainerConfig) -> str:
    if not sandbox.spec.log_directory or not config.log_path:
        return ""
    return os.path.join(sandbox.spec.log_directory, config.log_path)


def _resolve_user(root: Path, config: pb.ContainerConfig, image: ImageRecord) -> users.ProcessUser:
    sc = config.linux.security_context
    image_user = str((image.config.get("config") or {}).get("User") or "")
    try:
        return users.resolve(
            root,
            run_as_user=sc.run_as_user.value if sc.HasField("run_as_user") else None,
            run_as_username=sc.run_as_username,
            run_as_group=sc.run_as_group.value if sc.HasField("run_as_group") else None,
            image_user=image_user,
            supplemental_groups=list(sc.supplemental_groups),
            policy="Strict" if sc.supplemental_groups_policy == pb.Strict else "Merge",
        )
    except users.UserError as exc:
        raise InvalidArgument(exc.field, str(exc)) from exc


def _mtime_ns(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


# What runc update says when the kernel refuses a value for the container's cgroup (a memory limit below what it
# uses, CPUs the host has not, ...): the request's resources are at fault, not the host.
_CGROUP_REFUSED = re.compile(
    r"unable to set|failed to write|invalid argument|out of range|resource busy", re.IGNORECASE
)


def _exec_refused(exc: BaseException, config: pb.ContainerConfig, image: ImageRecord) -> InvalidArgument | None:
    """The runtime could not execute the container's process: the field it came from is at fault."""
    if not isinstance(exc, OciRuntimeError) or not exc.exec_refused:
        return None
    if config.command:
        field = "config.command"
    elif config.args and not (image.config.get("config") or {}).get("Entrypoint"):
        field = "config.args"
    else:
        field = "config.image"
    return InvalidArgument(field, f"the container's process cannot be executed: {exc.message}")


def _as_cri_error(exc: BaseException) -> BaseException:
    if isinstance(exc, CriError | asyncio.CancelledError):
        return exc
    if isinstance(exc, ocispec.SpecError):
        return InvalidArgument(exc.field, exc.problem)
    if isinstance(exc, OciRuntimeError | OSError):
        if is_no_space(exc):
            return NoSpace(getattr(exc, "filename", None) or "the container's storage", "creating the container")
        return Internal(str(exc))
    return exc
