"""Container RPCs: create, start, stop, remove, status, list, update, log reopen, events."""

from __future__ import annotations

from collections.abc import AsyncIterator

from api.runtime.v1 import api_pb2 as pb
from cri.errors import InvalidArgument, Unimplemented
from cri.services import container_convert, sandbox_convert
from cri.services.parts import RuntimeParts
from cri.transport.grpcserver import Encoded
from cri.transport.rpc import chunks


class ContainerRpcs(RuntimeParts):
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

    async def ListContainers(self, request: pb.ListContainersRequest) -> Encoded:
        """Answered from the one cache of ListContainers, serialized (the transports send the bytes)."""
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
