"""Stats RPCs: containers', pods' and the metrics descriptors, all read from the container manager."""

from __future__ import annotations

from collections.abc import AsyncIterator

from api.runtime.v1 import api_pb2 as pb
from cri.services import container_convert, sandbox_convert, stats_convert
from cri.services.parts import RuntimeParts
from cri.transport.rpc import chunks
from podsandbox.sandbox import Sandbox, SandboxState


class StatsRpcs(RuntimeParts):
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
        pod = await self._containers.pod_figures(sandbox)
        mountpoint = self._fs_mountpoint()
        messages = [stats_convert.container_stats(c, pod.figures.get(c.id), mountpoint) for c in pod.containers]
        return stats_convert.pod_stats(sandbox, messages, list(pod.figures.values()), pod.network)

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
            pod = await self._containers.pod_figures(sandbox, with_network=False)
            metrics = [
                stats_convert.container_metrics(c, sandbox, pod.figures[c.id])
                for c in pod.containers
                if c.id in pod.figures
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
