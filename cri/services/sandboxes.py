"""Pod sandbox RPCs: run, stop, remove, status, list, resize."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from api.runtime.v1 import api_pb2 as pb
from cri.services import sandbox_convert
from cri.services.parts import RuntimeParts
from cri.transport.rpc import chunks


class SandboxRpcs(RuntimeParts):
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
