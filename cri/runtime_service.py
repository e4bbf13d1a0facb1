"""RuntimeService servicer: validate, delegate, translate. Methods not here answer UNIMPLEMENTED."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import AsyncIterator

from api.runtime.v1 import api_pb2 as pb
from cni.readiness import NetworkWatcher
from cri import __version__, container_convert, sandbox_convert, stats_convert
from cri.containers import stats
from cri.containers.container import ContainerState
from cri.containers.execs import Execs, check_command
from cri.containers.manager import ContainerManager
from cri.errors import FailedPrecondition, InvalidArgument, Unimplemented
from cri.live_config import LiveConfig
from cri.log import event
from cri.oci.handlers import HandlerInfo, RuntimeHandlers
from cri.rpc import chunks
from cri.runtime_readiness import runtime_readiness
from cri.state import Store
from cri.streaming.requests import AttachRequest, ExecRequest, PortForwardRequest
from cri.streaming.server import StreamingServer
from podsandbox.manager import SandboxManager
from podsandbox.sandbox import Sandbox, SandboxState

log = logging.getLogger(__name__)

RUNTIME_NAME = "criopy"
CRI_API_VERSION = "v1"
# What the kubelet's Version call reports as the CRI "version" (cri-o and containerd say the same).
KUBELET_API_VERSION = "0.1.0"
POD_CIDR_KEY = "pod_cidr"


def _check_stdio(tty: bool, stdin: bool, stdout: bool, stderr: bool) -> None:
    """The CRI's rules for the streams of Exec and Attach."""
    if not (stdin or stdout or stderr):
        raise InvalidArgument("stdin/stdout/stderr", "at least one of stdin, stdout and stderr must be requested")
    if tty and stderr:
        raise InvalidArgument("stderr", "must be false with tty: a terminal has one output stream")


def _handler_message(name: str, info: HandlerInfo) -> pb.RuntimeHandler:
    return pb.RuntimeHandler(
        name=name,
        features=pb.RuntimeHandlerFeatures(
            recursive_read_only_mounts=info.recursive_read_only_mounts,
            user_namespaces=info.user_namespaces,
        ),
    )


class RuntimeService:
    def __init__(
        self,
        live: LiveConfig,
        *,
        handlers: RuntimeHandlers,
        network: NetworkWatcher,
        store: Store,
        sandboxes: SandboxManager,
        containers: ContainerManager,
        execs: Execs,
        streaming: StreamingServer,
    ) -> None:
        self._live = live
        self._handlers = handlers
        self._network = network
        self._store = store
        self._sandboxes = sandboxes
        self._containers = containers
        self._execs = execs
        self._streaming = streaming
        self._container_lists = container_convert.ListResponses()

    async def Version(self, request: pb.VersionRequest) -> pb.VersionResponse:
        return pb.VersionResponse(
            version=KUBELET_API_VERSION,
            runtime_name=RUNTIME_NAME,
            runtime_version=__version__,
            runtime_api_version=CRI_API_VERSION,
        )

    async def Status(self, request: pb.StatusRequest) -> pb.StatusResponse:
        config = self._live.current
        runtime = runtime_readiness(config, self._handlers)
        net = self._network.current(
            config.network.cni_config_dir, config.network.cni_plugin_dirs, config.network.cni_default_network
        )
        conditions = [
            pb.RuntimeCondition(
                type="RuntimeReady", status=runtime.ready, reason=runtime.reason, message=runtime.message
            ),
            pb.RuntimeCondition(type="NetworkReady", status=net.ready, reason=net.reason, message=net.message),
        ]
        handlers = self._handlers.handlers
        # The unnamed handler is the default one, as the kubelet looks it up.
        messages = (
            [_handler_message("", handlers[self._handlers.default])] if self._handlers.default in handlers else []
        )
        messages += [_handler_message(name, info) for name, info in sorted(handlers.items())]
        return pb.StatusResponse(
            status=pb.RuntimeStatus(conditions=conditions),
            runtime_handlers=messages,
            features=pb.RuntimeFeatures(supplemental_groups_policy=True),
            info={"config": config.to_json()} if request.verbose else {},
        )

    async def RuntimeConfig(self, request: pb.RuntimeConfigRequest) -> pb.RuntimeConfigResponse:
        driver = pb.SYSTEMD if self._live.current.runtime.cgroup_manager == "systemd" else pb.CGROUPFS
        return pb.RuntimeConfigResponse(linux=pb.LinuxRuntimeConfiguration(cgroup_driver=driver))

    async def UpdateRuntimeConfig(self, request: pb.UpdateRuntimeConfigRequest) -> pb.UpdateRuntimeConfigResponse:
        pod_cidr = request.runtime_config.network_config.pod_cidr
        for cidr in filter(None, (c.strip() for c in pod_cidr.split(","))):
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise InvalidArgument(
                    "runtime_config.network_config.pod_cidr", f"{cidr!r} is not a CIDR: {exc}"
                ) from exc
        if pod_cidr:
            await asyncio.to_thread(self._store.put, POD_CIDR_KEY, pod_cidr)
            event(log, logging.INFO, "pod CIDR recorded", pod_cidr=pod_cidr)
        return pb.UpdateRuntimeConfigResponse()

    # ---- pod sandboxes --------------------------------------------------------------------------

    async def RunPodSandbox(self, request: pb.RunPodSandboxRequest) -> pb.RunPodSandboxResponse:
        spec = sandbox_convert.spec_of(request)
        sandbox = await self._sandboxes.run(spec, request.config.SerializeToString())
        return pb.RunPodSandboxResponse(pod_sandbox_id=sandbox.id)

    async def StopPodSandbox(self, request: pb.StopPodSandboxRequest) -> pb.StopPodSandboxResponse:
        await self._sandboxes.stop(request.pod_sandbox_id)
        return pb.StopPodSandboxResponse()

    async def RemovePodSandbox(self, request: pb.RemovePodSandboxRequest) -> pb.RemovePodSandboxResponse:
        await self._sandboxes.remove(request.pod_sandbox_id)
        return pb.RemovePodSandboxResponse()

    async def PodSandboxStatus(self, request: pb.PodSandboxStatusRequest) -> pb.PodSandboxStatusResponse:
        sandbox = self._sandboxes.get(request.pod_sandbox_id)
        return pb.PodSandboxStatusResponse(
            status=sandbox_convert.status(sandbox),
            info=sandbox_convert.verbose_info(sandbox) if request.verbose else {},
            timestamp=time.time_ns(),
        )

    async def UpdatePodSandboxResources(
        self, request: pb.UpdatePodSandboxResourcesRequest
    ) -> pb.UpdatePodSandboxResourcesResponse:
        await self._sandboxes.update_resources(request.pod_sandbox_id, sandbox_convert.pod_resources_of(request))
        return pb.UpdatePodSandboxResourcesResponse()

    async def ListPodSandbox(self, request: pb.ListPodSandboxRequest) -> pb.ListPodSandboxResponse:
        flt = request.filter if request.HasField("filter") else None
        return pb.ListPodSandboxResponse(items=sandbox_convert.filtered(self._sandboxes.list(), flt))

    async def StreamPodSandboxes(
        self, request: pb.StreamPodSandboxesRequest
    ) -> AsyncIterator[pb.StreamPodSandboxesResponse]:
        flt = request.filter if request.HasField("filter") else None
        items = sandbox_convert.filtered(self._sandboxes.list(), flt)
        for chunk in chunks(items):
            yield pb.StreamPodSandboxesResponse(pod_sandboxes=chunk)

    # ---- containers -----------------------------------------------------------------------------

    async def CreateContainer(self, request: pb.CreateContainerRequest) -> pb.CreateContainerResponse:
        container = await self._containers.create(request.pod_sandbox_id, request.config)
        return pb.CreateContainerResponse(container_id=container.id)

    async def StartContainer(self, request: pb.StartContainerRequest) -> pb.StartContainerResponse:
        await self._containers.start(request.container_id)
        return pb.StartContainerResponse()

    async def StopContainer(self, request: pb.StopContainerRequest) -> pb.StopContainerResponse:
        await self._containers.stop(request.container_id, request.timeout)
        return pb.StopContainerResponse()

    async def RemoveContainer(self, request: pb.RemoveContainerRequest) -> pb.RemoveContainerResponse:
        await self._containers.remove(request.container_id)
        return pb.RemoveContainerResponse()

    async def ContainerStatus(self, request: pb.ContainerStatusRequest) -> pb.ContainerStatusResponse:
        container = self._containers.get(request.container_id)
        return pb.ContainerStatusResponse(
            status=container_convert.status(container),
            info=container_convert.verbose_info(container) if request.verbose else {},
        )

    async def ListContainers(self, request: pb.ListContainersRequest) -> pb.ListContainersResponse:
        flt = request.filter if request.HasField("filter") else None
        return self._container_lists.answer(self._containers.all(), flt)

    async def StreamContainers(self, request: pb.StreamContainersRequest) -> AsyncIterator[pb.StreamContainersResponse]:
        flt = request.filter if request.HasField("filter") else None
        for chunk in chunks(container_convert.filtered(self._containers.all(), flt)):
            yield pb.StreamContainersResponse(containers=chunk)

    async def UpdateContainerResources(
        self, request: pb.UpdateContainerResourcesRequest
    ) -> pb.UpdateContainerResourcesResponse:
        if not request.HasField("linux"):
            raise InvalidArgument("linux", "is required (only Linux resources are supported)")
        await self._containers.update_resources(request.container_id, request.linux)
        return pb.UpdateContainerResourcesResponse()

    async def ReopenContainerLog(self, request: pb.ReopenContainerLogRequest) -> pb.ReopenContainerLogResponse:
        await self._containers.reopen_log(request.container_id)
        return pb.ReopenContainerLogResponse()

    async def CheckpointContainer(self, request: pb.CheckpointContainerRequest) -> pb.CheckpointContainerResponse:
        raise Unimplemented("checkpoint/restore is not supported by criopy (it needs CRIU, which it does not drive)")

    async def GetContainerEvents(self, request: pb.GetEventsRequest) -> AsyncIterator[pb.ContainerEventResponse]:
        async for item in self._containers.events.subscribe():
            sandbox = self._sandboxes.find(item.sandbox_id)
            pod_status = sandbox_convert.status(sandbox) if sandbox is not None else None
            statuses = [container_convert.status(c) for c in self._containers.of_sandbox(item.sandbox_id)]
            yield container_convert.event_message(item, pod_status, statuses)

    # ---- exec, attach, port forward -------------------------------------------------------------

    async def ExecSync(self, request: pb.ExecSyncRequest) -> pb.ExecSyncResponse:
        result = await self._execs.run_sync(request.container_id, request.cmd, request.timeout)
        return pb.ExecSyncResponse(stdout=result.stdout, stderr=result.stderr, exit_code=result.exit_code)

    async def Exec(self, request: pb.ExecRequest) -> pb.ExecResponse:
        _check_stdio(request.tty, request.stdin, request.stdout, request.stderr)
        cmd = check_command(request.cmd)
        container = self._containers.running(request.container_id)
        target = ExecRequest(container.id, tuple(cmd), request.tty, request.stdin, request.stdout, request.stderr)
        return pb.ExecResponse(url=self._streaming.url("exec", target))

    async def Attach(self, request: pb.AttachRequest) -> pb.AttachResponse:
        _check_stdio(request.tty, request.stdin, request.stdout, request.stderr)
        container = self._containers.running(request.container_id)
        if request.tty and not container.config.tty:
            raise InvalidArgument("tty", f"container {container.id} was not created with a TTY")
        target = AttachRequest(container.id, request.tty, request.stdin, request.stdout, request.stderr)
        return pb.AttachResponse(url=self._streaming.url("attach", target))

    async def PortForward(self, request: pb.PortForwardRequest) -> pb.PortForwardResponse:
        for port in request.port:
            if not 0 < port < 65536:
                raise InvalidArgument("port", f"{port} is not a TCP port")
        sandbox = self._sandboxes.get(request.pod_sandbox_id)
        if sandbox.state is not SandboxState.READY:
            raise FailedPrecondition(f"pod sandbox {sandbox.id} is not ready")
        target = PortForwardRequest(sandbox.id, sandbox.pins.get("net", ""), tuple(request.port))
        return pb.PortForwardResponse(url=self._streaming.url("portforward", target))

    # ---- stats ----------------------------------------------------------------------------------

    def _fs_mountpoint(self) -> str:
        return self._live.current.root

    async def ContainerStats(self, request: pb.ContainerStatsRequest) -> pb.ContainerStatsResponse:
        container = self._containers.get(request.container_id)
        figures = await self._containers.stats.figures([container])
        message = stats_convert.container_stats(container, figures.get(container.id), self._fs_mountpoint())
        return pb.ContainerStatsResponse(stats=message)

    async def _container_stats(self, flt: pb.ContainerStatsFilter | None) -> list[pb.ContainerStats]:
        selected = container_convert.stats_selected(self._containers.all(), flt)
        figures = await self._containers.stats.figures(selected)
        mountpoint = self._fs_mountpoint()
        return [stats_convert.container_stats(c, figures.get(c.id), mountpoint) for c in selected]

    async def ListContainerStats(self, request: pb.ListContainerStatsRequest) -> pb.ListContainerStatsResponse:
        flt = request.filter if request.HasField("filter") else None
        return pb.ListContainerStatsResponse(stats=await self._container_stats(flt))

    async def StreamContainerStats(
        self, request: pb.StreamContainerStatsRequest
    ) -> AsyncIterator[pb.StreamContainerStatsResponse]:
        flt = request.filter if request.HasField("filter") else None
        for chunk in chunks(await self._container_stats(flt)):
            yield pb.StreamContainerStatsResponse(container_stats=chunk)

    async def _pod_stats(self, sandbox: Sandbox) -> pb.PodSandboxStats:
        containers = self._containers.of_sandbox(sandbox.id)
        figures = await self._containers.stats.figures(containers)
        mountpoint = self._fs_mountpoint()
        messages = [stats_convert.container_stats(c, figures.get(c.id), mountpoint) for c in containers]
        pid = sandbox.infra_pid or next((c.pid for c in containers if c.state is ContainerState.RUNNING), 0)
        net = await asyncio.to_thread(stats.network, pid) if not sandbox.spec.host_network else None
        return stats_convert.pod_stats(sandbox, messages, list(figures.values()), net)

    async def _pods_stats(self, flt: pb.PodSandboxStatsFilter | None) -> list[pb.PodSandboxStats]:
        out = []
        for sandbox in self._sandboxes.list():
            if flt is not None:
                if flt.id and not sandbox.id.startswith(flt.id):
                    continue
                if not sandbox_convert.labels_match(sandbox.spec.labels, flt.label_selector):
                    continue
            if sandbox.state is SandboxState.READY:
                out.append(await self._pod_stats(sandbox))
        return out

    async def PodSandboxStats(self, request: pb.PodSandboxStatsRequest) -> pb.PodSandboxStatsResponse:
        sandbox = self._sandboxes.get(request.pod_sandbox_id)
        return pb.PodSandboxStatsResponse(stats=await self._pod_stats(sandbox))

    async def ListPodSandboxStats(self, request: pb.ListPodSandboxStatsRequest) -> pb.ListPodSandboxStatsResponse:
        flt = request.filter if request.HasField("filter") else None
        return pb.ListPodSandboxStatsResponse(stats=await self._pods_stats(flt))

    async def StreamPodSandboxStats(
        self, request: pb.StreamPodSandboxStatsRequest
    ) -> AsyncIterator[pb.StreamPodSandboxStatsResponse]:
        flt = request.filter if request.HasField("filter") else None
        for chunk in chunks(await self._pods_stats(flt)):
            yield pb.StreamPodSandboxStatsResponse(pod_sandbox_stats=chunk)

    async def ListMetricDescriptors(self, request: pb.ListMetricDescriptorsRequest) -> pb.ListMetricDescriptorsResponse:
        return pb.ListMetricDescriptorsResponse(descriptors=stats_convert.metric_descriptors())

    async def _pod_metrics(self) -> list[pb.PodSandboxMetrics]:
        out = []
        for sandbox in self._sandboxes.list():
            containers = self._containers.of_sandbox(sandbox.id)
            figures = await self._containers.stats.figures(containers)
            metrics = [
                stats_convert.container_metrics(c, sandbox, figures[c.id]) for c in containers if c.id in figures
            ]
            out.append(pb.PodSandboxMetrics(pod_sandbox_id=sandbox.id, container_metrics=metrics))
        return out

    async def ListPodSandboxMetrics(self, request: pb.ListPodSandboxMetricsRequest) -> pb.ListPodSandboxMetricsResponse:
        return pb.ListPodSandboxMetricsResponse(pod_metrics=await self._pod_metrics())

    async def StreamPodSandboxMetrics(
        self, request: pb.StreamPodSandboxMetricsRequest
    ) -> AsyncIterator[pb.StreamPodSandboxMetricsResponse]:
        for chunk in chunks(await self._pod_metrics()):
            yield pb.StreamPodSandboxMetricsResponse(pod_sandbox_metrics=chunk)
