"""The daemon's life: acquire the root, build the services, serve, stop on a signal."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from contextlib import AsyncExitStack
from pathlib import Path

from cni.readiness import NetworkWatcher
from cri import __version__, metrics
from cri.config import Config, ConfigError
from cri.containers.execs import Execs
from cri.containers.manager import ContainerManager
from cri.daemon.admin import AdminServer
from cri.daemon.admin import socket_path as admin_socket_path
from cri.daemon.live_config import LiveConfig
from cri.daemon.lock import DaemonLock
from cri.images.manager import ImageManager
from cri.log import event, set_level
from cri.oci.conmon import OciRuntimeError, Runtime, runtime_for
from cri.oci.handlers import RuntimeHandlers
from cri.services.images import ImageService
from cri.services.runtime import RuntimeService
from cri.state import Store
from cri.state.orphans import Layout, OrphanCollector
from cri.streaming.server import StreamingServer
from cri.system import affinity, linux, offload, reaper
from cri.transport.server import CriServer
from podsandbox.manager import SandboxManager

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_SECONDS = 10.0
# The daemon's threads share this many malloc arenas (glibc makes up to 8 per core, each keeping freed memory).
MALLOC_ARENAS = 2
LOOP_NICE = -5  # its threads and children are reset to 0 (SCHED_RESET_ON_FORK)


class StartupError(Exception):
    pass


async def serve(live: LiveConfig) -> None:
    """Run until SIGTERM or SIGINT; raise StartupError if the daemon cannot start."""
    config = live.current
    async with AsyncExitStack() as stack:
        lock = DaemonLock.acquire(config.root)
        stack.callback(lock.release)
        os.makedirs(config.runroot, mode=0o711, exist_ok=True)
        _prepare_the_process(config)
        sweeper = reaper.Sweeper()
        sweeper.start()
        stack.callback(sweeper.close)
        store = await offload.to_thread(Store.open, config.root)
        stack.callback(store.close)
        stack.callback(offload.close)  # before the store closes: calls under way may still write to it

        handlers = RuntimeHandlers()
        await handlers.refresh(config)
        # A function, not the dict: a SIGHUP reload replaces the handler table.
        sandboxes = SandboxManager(live, store, lambda: list(handlers.handlers), handlers.userns_problem)
        await sandboxes.recover()

        # A lambda, not the method: the container manager is made after (it needs the images).
        images = ImageManager(config, store, in_use=lambda image_id: containers.uses_image(image_id))  # noqa: PLW0108
        await images.start()
        stack.push_async_callback(images.close)
        containers = ContainerManager(live, store, sandboxes, images)
        sandboxes.serve_members(containers)  # a pod's containers are stopped and removed before it
        await containers.load()
        stack.push_async_callback(containers.close)
        orphans = OrphanCollector(
            Layout(Path(config.root), Path(config.runroot)),
            store,
            lambda: _runtimes(live),
            sandboxes.release_cached_networks,
        )
        await orphans.sweep()
        orphans.start()
        stack.push_async_callback(orphans.close)
        execs = Execs(containers, config.runroot)
        streaming = StreamingServer(config.streaming, execs, containers)
        await streaming.start()
        stack.push_async_callback(streaming.close)
        runtime = RuntimeService(
            live,
            handlers=handlers,
            network=NetworkWatcher(),
            store=store,
            sandboxes=sandboxes,
            containers=containers,
            execs=execs,
            streaming=streaming,
        )

        async def apply_reload(new: Config) -> None:
            set_level(new.log.level)
            await handlers.refresh(new)
            images.reconfigure(new)

        live.on_reload(apply_reload)

        endpoint = metrics.serve(config.metrics.address, config.metrics.port)
        if endpoint is not None:
            stack.callback(endpoint.close)

        # Image import/export (`criopy images`) through the daemon: the store keeps one writer.
        stack.push_async_callback((await _admin_server(config, images)).close)

        server = CriServer(
            config.listen,
            {"RuntimeService": runtime, "ImageService": ImageService(images)},
            config.grpc_server,
            max_connections=config.grpc.max_connections,
            idle_timeout=config.grpc.idle_timeout,
        )
        # What start-up made (modules, recovered state) lives as long as the daemon: kept out of the
        # collector's sight, a full collection walks only what came since. Each one paused the loop for
        # 15-96 ms in a burst with a pull (every call waiting behind it); now about 2 ms.
        gc.freeze()
        await server.start()
        stack.push_async_callback(server.stop, SHUTDOWN_GRACE_SECONDS)
        event(
            log,
            logging.INFO,
            "criopy started",
            version=__version__,
            root=config.root,
            runroot=config.runroot,
            pid=os.getpid(),
        )
        await _wait_for_stop(live)
        event(log, logging.INFO, "criopy stopping", grace_seconds=SHUTDOWN_GRACE_SECONDS)
    event(log, logging.INFO, "criopy stopped")


def _prepare_the_process(config: Config) -> None:
    """Before anything is started: exec'd commands (runc exec --detach) and conmon monitors come to us;
    the blocking calls' threads are made on their CPUs."""
    reaper.become_subreaper()
    reaper.watch_children_with_pidfds()
    if not linux.limit_malloc_arenas(MALLOC_ARENAS):
        event(log, logging.INFO, "malloc arenas not limited (not glibc)")
    _raise_the_loop()
    try:
        cpus = affinity.resolve(config.offload_cpus, affinity.process_cpus())
    except ValueError as exc:
        raise ConfigError("at start", "offload_cpus", str(exc)) from None
    offload.bind(cpus)
    event(log, logging.INFO, "blocking-call threads", cpus=affinity.format_list(cpus) if cpus else "all")


def _raise_the_loop() -> None:
    """The loop's thread answers every call, and in a burst with a pull competes for the cores with runc, the
    CNI plugins and the unpack workers: it goes first (a 50-pod burst with a 150 MB pull on 2 cores, Version
    from another process: p50 4-6 -> 2 ms, p99 42-47 -> 28-35 ms, as containerd's ~30 ms). What it starts
    does not (reset on fork): containers and their execs keep nice 0."""
    try:
        linux.raise_this_thread(LOOP_NICE)
    except OSError as exc:  # no CAP_SYS_NICE (a restricted node container): it runs as everything else
        event(log, logging.WARNING, "event loop priority not raised", nice=LOOP_NICE, error=exc.strerror or exc)


async def _admin_server(config: Config, images: ImageManager) -> AdminServer:
    server = AdminServer(admin_socket_path(config.runroot), images, images.content.ingest_dir)
    await server.start()
    return server


def _runtimes(live: LiveConfig) -> list[Runtime]:
    """The configured handlers that resolve (a missing binary has no state to sweep)."""
    config, out = live.current, []
    for name in config.runtime.runtimes:
        with contextlib.suppress(OciRuntimeError):
            out.append(runtime_for(config, name))
    return out


async def _wait_for_stop(live: LiveConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    def on_hup() -> None:
        task = loop.create_task(live.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        for task in reloads:
            task.cancel()
