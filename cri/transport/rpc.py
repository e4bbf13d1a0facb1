"""gRPC method table built from the CRI descriptor, wrapped once by instrumentation.

Every RPC of both services is registered, whether or not a servicer implements
it: an unbuilt one answers UNIMPLEMENTED naming itself. Each call gets one log
line (method, duration, code, object ID), Prometheus metrics, and the mapping of
domain errors to gRPC codes, all here and nowhere else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import aclosing, contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.message import Message

from api.runtime.v1 import api_pb2
from cri import metrics
from cri.errors import Unimplemented, status_of
from cri.log import event
from cri.transport.grpcserver import (
    Encoded,
    Route,
    RpcError,
    cut_details,
    deadline_exceeded,
    encode,
    never_waits,
    runs_to_completion,
)

__all__ = ["Encoded", "chunks", "routes", "service_handler"]

log = logging.getLogger(__name__)

PACKAGE = "runtime.v1"
SERVICES = ("RuntimeService", "ImageService")

# Server streams that last until the client leaves; a stopping daemon ends them at once.
SUBSCRIPTIONS = frozenset({"GetContainerEvents"})

# Request fields that identify the object an RPC acts on, most specific first.
_ID_FIELDS = (("container_id",), ("pod_sandbox_id",), ("image", "image"), ("config", "metadata", "name"))


_FAILURE_LEVELS = {
    grpc.StatusCode.INTERNAL: logging.ERROR,
    grpc.StatusCode.UNKNOWN: logging.ERROR,
    grpc.StatusCode.DEADLINE_EXCEEDED: logging.WARNING,
}


@dataclass(frozen=True)
class Method:
    service: str
    name: str
    request: type[Message]
    response: type[Message]
    server_streaming: bool

    @property
    def path(self) -> str:
        return f"/{PACKAGE}.{self.service}/{self.name}"


def methods(service: str) -> list[Method]:
    """The RPCs of one service, as declared in api.proto."""
    file_proto = descriptor_pb2.FileDescriptorProto()
    api_pb2.DESCRIPTOR.CopyToProto(file_proto)
    (service_proto,) = [s for s in file_proto.service if s.name == service]
    out = []
    for m in service_proto.method:
        if m.client_streaming:
            raise ValueError(f"client streaming is not part of CRI: {m.name}")
        out.append(
            Method(
                service=service,
                name=m.name,
                request=getattr(api_pb2, m.input_type.rsplit(".", 1)[-1]),
                response=getattr(api_pb2, m.output_type.rsplit(".", 1)[-1]),
                server_streaming=m.server_streaming,
            )
        )
    return out


def object_id(request: Message) -> str | None:
    for path in _ID_FIELDS:
        value: Any = request
        for name in path:
            if name not in value.DESCRIPTOR.fields_by_name:
                value = None
                break
            value = getattr(value, name)
        if isinstance(value, str) and value:
            return value
    return None


def _finish(method: Method, request: Message, started: float, code: grpc.StatusCode, error: str | None) -> None:
    seconds = time.monotonic() - started
    metrics.record_operation(method.name, code.name, seconds)
    # Routine calls (the kubelet polls several times a second) at debug; refusals at
    # info; our own failures at error.
    level = logging.DEBUG if code == grpc.StatusCode.OK else _FAILURE_LEVELS.get(code, logging.INFO)
    if not log.isEnabledFor(level):
        return
    event(
        log,
        level,
        "rpc",
        method=method.path,
        duration_ms=round(seconds * 1000, 3),
        code=code.name,
        id=object_id(request),
        error=error,
    )


def _unimplemented(method: Method) -> Unimplemented:
    return Unimplemented(f"{method.service}/{method.name} is not implemented by criopy yet")


UnaryImpl = Callable[[Any], Awaitable[Message]]
StreamImpl = Callable[[Any], AsyncGenerator[Message, None]]


def _failed(method: Method, request: Message, started: float, exc: Exception) -> RpcError:
    """Logs and counts a failed call; the status it answers with, as an RpcError."""
    code, message = status_of(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.error("unexpected error", exc_info=exc, extra={"fields": {"method": method.path}})
    _finish(method, request, started, code, message)
    return RpcError(code, message)


Expired = Callable[[], bool]


@contextmanager
def _instrumented(method: Method, request: Message, expired: Expired) -> Iterator[None]:
    """Times the call, logs and counts it, and turns a failure into its mapped status."""
    started = time.monotonic()
    try:
        yield
    except (asyncio.CancelledError, GeneratorExit):
        # Cancelled by the transport: the client's deadline (answered DEADLINE_EXCEEDED, so said
        # here too), or the client gone or the server stopping. A stream's generator is closed
        # instead (GeneratorExit) when that came while the transport was sending its last item.
        if expired():
            _finish(method, request, started, grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        else:
            _finish(method, request, started, grpc.StatusCode.CANCELLED, "cancelled: client gone or stopping")
        raise
    except Exception as exc:
        raise _failed(method, request, started, exc) from exc
    _finish(method, request, started, grpc.StatusCode.OK, None)


async def call_unary(
    method: Method, impl: UnaryImpl | None, request: Message, expired: Expired = deadline_exceeded
) -> Message:
    """Runs one unary call, instrumented; a failure raises RpcError with its status. `expired` tells,
    when the call is cancelled, whether its deadline passed (the builtin transport's by default)."""
    with _instrumented(method, request, expired):
        if impl is None:
            raise _unimplemented(method)
        return await impl(request)


def call_inline(method: Method, impl: UnaryImpl, request: Message) -> Message:
    """Runs one unary call whose implementation never waits (`never_waits`), to its end at once, instrumented
    as `call_unary` is."""
    with _instrumented(method, request, _never_expired):
        return runs_to_completion(impl(request))


def _never_expired() -> bool:
    return False


async def call_stream(
    method: Method, impl: StreamImpl | None, request: Message, expired: Expired = deadline_exceeded
) -> AsyncGenerator[Message, None]:
    """Runs one server-streaming call, instrumented as `call_unary` is."""
    with _instrumented(method, request, expired):
        if impl is None:
            raise _unimplemented(method)
        # Closed with this generator, so that the servicer's own cleanup (an event subscription) runs then.
        async with aclosing(impl(request)) as items:
            async for item in items:
                yield item


T = TypeVar("T")

# Items per message of the Stream* list RPCs: far below the 16 MiB message limit even with large labels.
STREAM_CHUNK = 500


def chunks(items: Sequence[T], size: int = STREAM_CHUNK) -> Iterator[Sequence[T]]:
    """A list RPC's items cut into the messages of its Stream* twin."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def routes(servicers: Mapping[str, object | None]) -> dict[str, Route]:
    """Every RPC of the named services, for criopy's own gRPC transport."""
    table: dict[str, Route] = {}
    for service, servicer in servicers.items():
        for method in methods(service):
            impl = getattr(servicer, method.name, None)
            if method.server_streaming:
                table[method.path] = Route(
                    parse=method.request.FromString,
                    stream=partial(call_stream, method, impl),
                    subscription=method.name in SUBSCRIPTIONS,
                )
            else:
                table[method.path] = Route(
                    parse=method.request.FromString,
                    unary=partial(call_unary, method, impl),
                    # Answered as the request arrives, without a task: Version, the status and list calls
                    # the kubelet polls, answered from memory.
                    inline=partial(call_inline, method, impl) if impl is not None and never_waits(impl) else None,
                )
    return table


def _past_deadline(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    remaining = context.time_remaining()
    return remaining is not None and remaining <= 0


def _aio_unary(
    method: Method, impl: UnaryImpl | None
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            return await call_unary(method, impl, request, partial(_past_deadline, context))
        except RpcError as exc:
            await context.abort(exc.code, cut_details(exc.details))  # clients refuse long messages

    return handle


def _aio_stream(
    method: Method, impl: StreamImpl | None
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[None]]:
    async def handle(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        # Written here rather than yielded to grpcio, which leaves a generator it stopped reading (the
        # client gone while a message was being sent) to the garbage collector: this one is closed, and
        # the call counted, as the client leaves.
        try:
            async with aclosing(call_stream(method, impl, request, partial(_past_deadline, context))) as items:
                async for item in items:
                    if not await _written(context, item):
                        return
        except RpcError as exc:
            await context.abort(exc.code, cut_details(exc.details))  # clients refuse long messages

    return handle


async def _written(context: grpc.aio.ServicerContext[Any, Any], item: Message) -> bool:
    """Sends one message of a stream; False if the call is over: grpcio refuses the write (its private
    ExecuteBatchError) before it says the call was cancelled."""
    try:
        await context.write(item)
    except Exception as exc:
        event(log, logging.DEBUG, "stream write refused", error=repr(exc))
        return False
    return True


def service_handler(service: str, servicer: object | None) -> grpc.GenericRpcHandler:
    """All RPCs of `service` for grpcio's server, dispatched to `servicer`'s methods of the same name."""
    table: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in methods(service):
        impl = getattr(servicer, method.name, None)
        if method.server_streaming:
            table[method.name] = grpc.unary_stream_rpc_method_handler(
                _aio_stream(method, impl),
                request_deserializer=method.request.FromString,
                response_serializer=method.response.SerializeToString,
            )
        else:  # a unary handler may answer with an Encoded response (a cached one)
            table[method.name] = grpc.unary_unary_rpc_method_handler(
                _aio_unary(method, impl),
                request_deserializer=method.request.FromString,
                response_serializer=encode,
            )
    return grpc.method_handlers_generic_handler(f"{PACKAGE}.{service}", table)
