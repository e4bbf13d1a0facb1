"""The method table and its instrumentation, served in-process on a unix socket by both transports."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from api.runtime.v1 import api_pb2_grpc
from cri import metrics
from cri.errors import InvalidArgument, NotFound
from cri.transport.rpc import methods, object_id
from cri.transport.server import CriServer


def test_every_rpc_of_both_services_is_in_the_table():
    runtime = {m.name for m in methods("RuntimeService")}
    images = {m.name for m in methods("ImageService")}
    assert {"Version", "RunPodSandbox", "ExecSync", "GetContainerEvents", "UpdatePodSandboxResources"} <= runtime
    assert images == {"ListImages", "StreamImages", "ImageStatus", "PullImage", "RemoveImage", "ImageFsInfo"}
    streaming = {m.name for m in methods("RuntimeService") if m.server_streaming}
    assert streaming == {
        "GetContainerEvents",
        "StreamPodSandboxes",
        "StreamContainers",
        "StreamContainerStats",
        "StreamPodSandboxStats",
        "StreamPodSandboxMetrics",
    }


def test_object_id_prefers_the_most_specific_field():
    assert object_id(pb.StopContainerRequest(container_id="c1")) == "c1"
    assert object_id(pb.CreateContainerRequest(pod_sandbox_id="p1")) == "p1"
    assert object_id(pb.PullImageRequest(image=pb.ImageSpec(image="busybox"))) == "busybox"
    run = pb.RunPodSandboxRequest(config=pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(name="web")))
    assert object_id(run) == "web"
    assert object_id(pb.VersionRequest()) is None


class FakeRuntime:
    async def Version(self, request):
        return pb.VersionResponse(runtime_name="fake")

    async def PodSandboxStatus(self, request):
        raise NotFound(f"pod sandbox {request.pod_sandbox_id} not found")

    async def ContainerStatus(self, request):
        raise InvalidArgument("container_id", "must not be empty")

    async def ExecSync(self, request):
        raise RuntimeError("boom")

    async def ListPodSandbox(self, request):
        await asyncio.Event().wait()  # outlives any deadline
        return pb.ListPodSandboxResponse()

    async def GetContainerEvents(self, request):
        await asyncio.Event().wait()  # a feed with nothing to say, held open by its client
        yield pb.ContainerEventResponse()

    async def StreamContainers(self, request):
        for i in range(3):
            yield pb.StreamContainersResponse(containers=[pb.Container(id=str(i))])

    async def StreamPodSandboxes(self, request):
        """A feed of 1 MiB messages that never ends: a client reading one leaves the server in a write."""
        try:
            while True:
                yield pb.StreamPodSandboxesResponse(pod_sandboxes=[pb.PodSandbox(id="p" * (1 << 20))])
        finally:
            FEEDS_CLOSED.append(request)


FEEDS_CLOSED: list[pb.StreamPodSandboxesRequest] = []


async def _exercise(path: str, transport: str) -> dict[str, object]:
    server = CriServer(path, {"RuntimeService": FakeRuntime()}, transport)
    await server.start()
    results: dict[str, object] = {}
    try:
        async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
            stub = api_pb2_grpc.RuntimeServiceStub(channel)
            results["version"] = (await stub.Version(pb.VersionRequest())).runtime_name
            for name, call in {
                "status": stub.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id="abc")),
                "container": stub.ContainerStatus(pb.ContainerStatusRequest()),
                "exec": stub.ExecSync(pb.ExecSyncRequest()),
                "unbuilt": stub.RunPodSandbox(pb.RunPodSandboxRequest()),
            }.items():
                try:
                    await call
                except grpc.aio.AioRpcError as exc:
                    results[name] = (exc.code(), exc.details())
            results["stream"] = [r.containers[0].id async for r in stub.StreamContainers(pb.StreamContainersRequest())]
    finally:
        await server.stop(1.0)
    return results


@pytest.fixture(scope="module", params=["builtin", "grpcio"])
def results(request, tmp_path_factory):
    return asyncio.run(_exercise(str(tmp_path_factory.mktemp("rpc") / "s.sock"), request.param))


def test_implemented_calls_answer(results):
    assert results["version"] == "fake"
    assert results["stream"] == ["0", "1", "2"]


def test_domain_errors_map_to_their_codes(results):
    assert results["status"] == (grpc.StatusCode.NOT_FOUND, "pod sandbox abc not found")
    assert results["container"] == (grpc.StatusCode.INVALID_ARGUMENT, "container_id: must not be empty")


def test_unexpected_errors_are_internal_and_unbuilt_rpcs_unimplemented(results):
    code, details = results["exec"]
    assert code == grpc.StatusCode.INTERNAL
    assert "boom" in details
    assert results["unbuilt"] == (
        grpc.StatusCode.UNIMPLEMENTED,
        "RuntimeService/RunPodSandbox is not implemented by criopy yet",
    )


def test_stop_ends_an_open_event_feed_without_waiting_the_grace(tmp_path):
    """Builtin transport only: grpcio's server keeps the call open when its handler task is cancelled."""

    async def exercise() -> grpc.StatusCode:
        path = str(tmp_path / "s.sock")
        server = CriServer(path, {"RuntimeService": FakeRuntime()}, "builtin")
        await server.start()
        async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
            feed = api_pb2_grpc.RuntimeServiceStub(channel).GetContainerEvents(pb.GetEventsRequest())
            await asyncio.sleep(0.3)  # the call is running on the server
            # A grace of 60 s: if the feed were waited for, this would time out.
            await asyncio.wait_for(server.stop(60), 10)
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                await feed.read()
            return ended.value.code()

    assert asyncio.run(exercise()) == grpc.StatusCode.UNAVAILABLE


@pytest.mark.parametrize("transport", ["builtin", "grpcio"])
def test_a_passed_deadline_is_logged_and_counted_as_deadline_exceeded(transport, tmp_path, caplog):
    """The client hears DEADLINE_EXCEEDED; the call's log line and its metric said CANCELLED."""

    def counted() -> float:
        value = metrics.OPERATIONS.labels(operation="ListPodSandbox", code="DEADLINE_EXCEEDED")._value.get()
        return float(value)

    async def exercise() -> grpc.StatusCode:
        path = str(tmp_path / "s.sock")
        server = CriServer(path, {"RuntimeService": FakeRuntime()}, transport)
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
                stub = api_pb2_grpc.RuntimeServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as late:
                    await stub.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=0.2)
                await asyncio.sleep(0.2)  # the server's side of the deadline
                return late.value.code()
        finally:
            await server.stop(1.0)

    caplog.set_level(logging.DEBUG, logger="cri.transport.rpc")
    before = counted()
    assert asyncio.run(exercise()) == grpc.StatusCode.DEADLINE_EXCEEDED
    calls = [r for r in caplog.records if r.getMessage() == "rpc" and "ListPodSandbox" in r.fields["method"]]
    logged = [r.fields["code"] for r in calls]
    assert logged == ["DEADLINE_EXCEEDED"]
    assert counted() == before + 1


@pytest.mark.parametrize("transport", ["builtin", "grpcio"])
def test_a_stream_cancelled_in_a_write_is_counted_and_its_feed_closed_at_once(transport, tmp_path):
    """The client reads one message and cancels while the server waits to send the next: the call is counted
    CANCELLED and the servicer's generator closed then, not whenever the garbage collector gets to it."""

    def counted() -> float:
        value = metrics.OPERATIONS.labels(operation="StreamPodSandboxes", code="CANCELLED")._value.get()
        return float(value)

    async def exercise() -> tuple[float, int]:
        path = str(tmp_path / "s.sock")
        server = CriServer(path, {"RuntimeService": FakeRuntime()}, transport)
        await server.start()
        before, closed = counted(), len(FEEDS_CLOSED)
        try:
            async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
                feed = api_pb2_grpc.RuntimeServiceStub(channel).StreamPodSandboxes(pb.StreamPodSandboxesRequest())
                assert len((await feed.read()).pod_sandboxes) == 1
                await asyncio.sleep(0.3)  # the server is blocked on flow control, in a later message's write
                feed.cancel()
                deadline = asyncio.get_running_loop().time() + 5
                while counted() == before and asyncio.get_running_loop().time() < deadline:
                    await asyncio.sleep(0.02)
                return counted() - before, len(FEEDS_CLOSED) - closed
        finally:
            await server.stop(1.0)

    assert asyncio.run(exercise()) == (1.0, 1)
