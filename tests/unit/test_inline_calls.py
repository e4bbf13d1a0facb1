"""Unary calls whose implementation never waits are answered inline by the builtin transport (no task):
which ones, and that they are answered, instrumented and isolated as the others are."""

from __future__ import annotations

import asyncio
import contextvars
import logging
from collections.abc import AsyncIterator

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from api.runtime.v1 import api_pb2_grpc
from cri import metrics
from cri.errors import NotFound
from cri.transport.grpcserver import never_waits, runs_to_completion
from cri.transport.rpc import routes
from cri.transport.server import CriServer

SEEN: contextvars.ContextVar[str] = contextvars.ContextVar("seen", default="")


class Runtime:
    async def Version(self, request: pb.VersionRequest) -> pb.VersionResponse:
        earlier = SEEN.get()
        SEEN.set("set by an earlier call")  # must not reach the next call
        return pb.VersionResponse(runtime_name="inline", runtime_version=earlier)

    async def PodSandboxStatus(self, request: pb.PodSandboxStatusRequest) -> pb.PodSandboxStatusResponse:
        raise NotFound(f"pod sandbox {request.pod_sandbox_id} not found")

    async def ListContainers(self, request: pb.ListContainersRequest) -> pb.ListContainersResponse:
        # Far over the test server's send limit: refused RESOURCE_EXHAUSTED, as a waiting call's would be.
        return pb.ListContainersResponse(containers=[pb.Container(id="c" * 100) for _ in range(2000)])

    async def ContainerStatus(self, request: pb.ContainerStatusRequest) -> pb.ContainerStatusResponse:
        await asyncio.sleep(0)
        return pb.ContainerStatusResponse(status=pb.ContainerStatus(id=request.container_id))

    async def StreamContainers(self, request: pb.StreamContainersRequest) -> AsyncIterator[pb.StreamContainersResponse]:
        yield pb.StreamContainersResponse()


async def _suspending() -> int:
    await asyncio.sleep(0)
    return 1


async def _no_await() -> int:
    return 2


async def _async_for() -> int:
    async for _ in Runtime().StreamContainers(pb.StreamContainersRequest()):
        pass
    return 3


async def _async_with(lock: asyncio.Lock) -> int:
    async with lock:
        return 4


def _plain() -> int:
    return 5


def test_only_coroutine_functions_without_await_async_for_or_with_never_wait():
    assert never_waits(_no_await)
    assert never_waits(Runtime().Version)
    assert not never_waits(_suspending)
    assert not never_waits(_async_for)
    assert not never_waits(_async_with)
    assert not never_waits(_plain)
    assert not never_waits(Runtime().StreamContainers)


def test_runs_to_completion_refuses_a_coroutine_that_suspends():
    assert runs_to_completion(_no_await()) == 2
    with pytest.raises(RuntimeError, match="suspended"):
        runs_to_completion(_suspending())


def test_the_table_answers_inline_only_what_never_waits():
    table = routes({"RuntimeService": Runtime()})
    service = "/runtime.v1.RuntimeService/"
    assert table[service + "Version"].inline is not None
    assert table[service + "PodSandboxStatus"].inline is not None
    assert table[service + "ContainerStatus"].inline is None  # it awaits: a task runs it
    assert table[service + "RunPodSandbox"].inline is None  # not implemented: answered UNIMPLEMENTED by a task
    assert table[service + "StreamContainers"].inline is None


def ok_count(operation: str, code: str) -> float:
    return float(metrics.OPERATIONS.labels(operation=operation, code=code)._value.get())


def test_inline_calls_are_answered_counted_logged_and_isolated(tmp_path, caplog):
    caplog.set_level(logging.DEBUG, logger="cri.transport.rpc")
    before = ok_count("Version", "OK"), ok_count("PodSandboxStatus", "NOT_FOUND")

    async def exercise() -> list[object]:
        path = str(tmp_path / "s.sock")
        server = CriServer(path, {"RuntimeService": Runtime()}, "builtin")
        server._builtin._dispatch._max_send = 64 * 1024  # type: ignore[union-attr]
        await server.start()
        out: list[object] = []
        try:
            async with grpc.aio.insecure_channel(f"unix://{path}") as channel:
                stub = api_pb2_grpc.RuntimeServiceStub(channel)
                for _ in range(2):
                    out.append((await stub.Version(pb.VersionRequest(), timeout=10)).runtime_version)
                for call in (
                    stub.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id="p1"), timeout=10),
                    stub.ListContainers(pb.ListContainersRequest(), timeout=10),
                ):
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await call
                    out.append(err.value.code())
                status = await stub.ContainerStatus(pb.ContainerStatusRequest(container_id="c1"), timeout=10)
                out.append(status.status.id)
        finally:
            await server.stop(1.0)
        return out

    results = asyncio.run(exercise())
    versions, refusals, waited = results[:2], results[2:4], results[4]
    assert versions == ["", ""]  # each call starts in a context of its own
    assert refusals == [grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert waited == "c1"
    assert ok_count("Version", "OK") - before[0] == 2
    assert ok_count("PodSandboxStatus", "NOT_FOUND") - before[1] == 1
    logged = [getattr(r, "fields", {}) for r in caplog.records if r.getMessage() == "rpc"]
    versions_logged = [f for f in logged if f.get("method") == "/runtime.v1.RuntimeService/Version"]
    assert [f["code"] for f in versions_logged] == ["OK", "OK"]
