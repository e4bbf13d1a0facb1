"""The pod infra process: PID 1 of a pod that shares one PID namespace.

Pods are built without a pause container (net, ipc and uts namespaces are
pinned by bind mounts). Only a pod whose containers share one PID namespace
needs a process to own it: Debian's static `catatonit -P` (pause mode), run by
the pod's runtime handler under conmon, from a bundle under
`<sandbox.dir>/infra/` whose root filesystem is an empty directory with the
binary bind-mounted read-only at `/catatonit`. It joins the pod's pinned
namespaces, gets new pid and mount namespaces, and its cgroup is
`<cgroup_parent>/criopy-<id>` (cgroupfs) or `<parent>:criopy:<id>` (systemd).
Containers later join its PID namespace through /proc/<infra pid>/ns/pid.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from cri.config import Config
from cri.log import event
from cri.oci import bundle, conmon
from cri.oci.conmon import ConmonLaunch, OciRuntimeError, Runtime
from cri.system import offload
from podsandbox.sandbox import Sandbox

log = logging.getLogger(__name__)

INFRA_DIR = "infra"
INFRA_PATH = "/catatonit"
STOP_TIMEOUT = 10.0  # seconds for the killed infra process to be reported gone


class InfraError(Exception):
    """Starting or stopping the infra process failed; the message says which step and why."""


@dataclass(frozen=True)
class InfraPaths:
    bundle: str
    rootfs: str
    log: str
    exit_dir: str
    persist_dir: str
    socket_dir: str

    @classmethod
    def of(cls, sandbox: Sandbox) -> InfraPaths:
        base = os.path.join(sandbox.dir, INFRA_DIR)
        return cls(
            bundle=base,
            rootfs=os.path.join(base, "rootfs"),
            log=os.path.join(base, "infra.log"),
            exit_dir=os.path.join(base, "exits"),
            persist_dir=os.path.join(base, "persist"),
            socket_dir=os.path.join(base, "sockets"),
        )


def container_id(sandbox: Sandbox) -> str:
    """The runtime's ID for the infra container: the sandbox ID (as cri-o names its infra container)."""
    return sandbox.id


def build_spec(sandbox: Sandbox, config: Config) -> dict[str, object]:
    """The runtime spec of the infra container (a plain OCI dict)."""
    join = {kind: path for kind, path in sandbox.pins.items() if kind in ("user", "net", "ipc", "uts")}
    spec = bundle.minimal_spec(
        [INFRA_PATH, "-P"],
        root="rootfs",
        readonly_root=True,
        uid=0,
        gid=0,
        caps=(),
        no_new_privileges=True,
        namespace_list=bundle.namespaces(new=("pid", "mnt"), join=join),
        cgroups_path=bundle.cgroups_path(config.runtime.cgroup_manager, sandbox.cgroup_parent, sandbox.id),
        extra_mounts=[bundle.bind_mount(config.pod.infra_binary, INFRA_PATH, read_only=True)],
        annotations={
            "io.kubernetes.cri.container-type": "sandbox",
            "io.kubernetes.cri.sandbox-id": sandbox.id,
            "io.kubernetes.cri.sandbox-name": sandbox.spec.metadata.name,
            "io.kubernetes.cri.sandbox-namespace": sandbox.spec.metadata.namespace,
        },
    )
    userns = sandbox.spec.userns
    if userns is not None:
        # runc joins the pinned namespace by path and wants its maps too (it checks root is mapped).
        spec["linux"].update(uidMappings=[userns.uids.to_oci()], gidMappings=[userns.gids.to_oci()])
    return spec


def _runtime(sandbox: Sandbox, config: Config, recorded: Runtime | None) -> Runtime:
    try:
        return conmon.recorded_runtime(config, recorded, sandbox.spec.runtime_handler)
    except OciRuntimeError as exc:
        raise InfraError(f"pod {sandbox.id} infra: {exc}") from exc


def _prepare(sandbox: Sandbox, config: Config, paths: InfraPaths) -> None:
    binary = config.pod.infra_binary
    if not os.path.isabs(binary) or not os.path.isfile(binary):
        raise InfraError(f"pod {sandbox.id} infra: pod.infra_binary {binary!r} is not an existing file")
    if os.path.lexists(paths.bundle):
        # A leftover of an interrupted attempt: the runtime state is gone with it (delete --force ran first).
        shutil.rmtree(paths.bundle)
    Path(paths.bundle).mkdir(mode=0o700, parents=True)
    Path(paths.rootfs).mkdir(mode=0o755)
    if sandbox.spec.userns is not None:
        # runc's init runs inside the pod's user namespace: it must reach the rootfs and make mount points in it.
        os.chmod(paths.bundle, 0o711)
        os.chown(paths.rootfs, *sandbox.spec.userns.root)
    bundle.write(paths.bundle, build_spec(sandbox, config))


async def start(sandbox: Sandbox, config: Config) -> int:
    """Start the infra process of `sandbox`; its pid as the host sees it.

    The runtime it is made with is set in `sandbox.infra_runtime`, for the caller to record: stopping
    it later goes through that one, whatever a reload did to the handler since. On any failure (or
    cancellation) whatever was made is removed first (runtime state, conmon, the bundle directory),
    then InfraError is raised.
    """
    runtime = sandbox.infra_runtime = _runtime(sandbox, config, None)
    try:
        monitor = conmon.conmon_binary(config)
    except OciRuntimeError as exc:
        raise InfraError(f"pod {sandbox.id} infra: {exc}") from exc
    paths = InfraPaths.of(sandbox)
    cid = container_id(sandbox)
    launch = ConmonLaunch(
        id=cid,
        name=f"k8s_POD_{sandbox.spec.metadata.name}_{sandbox.spec.metadata.namespace}"
        f"_{sandbox.spec.metadata.uid}_{sandbox.spec.metadata.attempt}",
        bundle=paths.bundle,
        log_path=paths.log,
        exit_dir=paths.exit_dir,
        persist_dir=paths.persist_dir,
        socket_dir=paths.socket_dir,
        log_size_max=config.runtime.log_size_max,
    )
    try:
        await conmon.delete(runtime, cid)  # a leftover of a crashed attempt would make create fail
        await offload.to_thread(_prepare, sandbox, config, paths)
        created = await conmon.create(runtime, monitor, launch)
        await conmon.start(runtime, cid, init_pid=created.pid)
    except BaseException as exc:
        await _remove(runtime, sandbox, paths)
        if isinstance(exc, OciRuntimeError | OSError):
            raise InfraError(f"pod {sandbox.id} infra: {exc}") from exc
        raise
    event(log, logging.INFO, "pod infra process started", pod_id=sandbox.id, pid=created.pid, runtime=runtime.name)
    return created.pid


async def stop(sandbox: Sandbox, config: Config) -> None:
    """Kill the infra process, wait until it is gone, delete its runtime state and bundle. Idempotent."""
    runtime = _runtime(sandbox, config, sandbox.infra_runtime)
    paths = InfraPaths.of(sandbox)
    try:
        await _kill_and_wait(runtime, sandbox, paths)
    except OciRuntimeError as exc:
        raise InfraError(f"pod {sandbox.id} infra: stopping: {exc}") from exc
    await _remove(runtime, sandbox, paths, strict=True)
    event(log, logging.INFO, "pod infra process stopped", pod_id=sandbox.id, runtime=runtime.name)


async def _kill_and_wait(runtime: Runtime, sandbox: Sandbox, paths: InfraPaths) -> None:
    cid = container_id(sandbox)
    try:
        current = await conmon.state(runtime, cid)
    except conmon.ContainerNotFound:
        return  # never created, or already deleted
    pid = current.pid or sandbox.infra_pid
    if current.status == "stopped":
        return
    await conmon.kill(runtime, cid, "KILL")
    # Gone when conmon recorded the exit, or when the process itself has vanished.
    deadline = asyncio.get_running_loop().time() + STOP_TIMEOUT
    while conmon.read_exit(paths.exit_dir, cid) is None and not conmon.process_gone(pid):
        if asyncio.get_running_loop().time() >= deadline:
            raise InfraError(f"pod {sandbox.id} infra: pid {pid} still runs {STOP_TIMEOUT:g}s after SIGKILL")
        await asyncio.sleep(0.05)


async def _remove(runtime: Runtime, sandbox: Sandbox, paths: InfraPaths, *, strict: bool = False) -> None:
    """Delete the runtime state, let conmon finish, remove the bundle. Errors are logged, or raised when strict."""
    cid = container_id(sandbox)
    try:
        await conmon.delete(runtime, cid)
    except OciRuntimeError as exc:
        if strict:
            raise InfraError(f"pod {sandbox.id} infra: {exc}") from exc
        event(log, logging.ERROR, "removing the infra runtime state failed", pod_id=sandbox.id, error=str(exc))
    monitor_pid = conmon.read_pid(os.path.join(paths.bundle, "conmon.pid"))
    if monitor_pid > 0:
        # conmon writes the exit file, then drains the log and exits: let it finish before its directory goes.
        await conmon.wait_gone([monitor_pid], 2.0)
    try:
        await offload.to_thread(bundle.remove, paths.bundle)
    except OSError as exc:
        if strict:
            raise InfraError(f"pod {sandbox.id} infra: removing {paths.bundle}: {exc}") from exc
        event(log, logging.ERROR, "removing the infra bundle failed", pod_id=sandbox.id, error=str(exc))
