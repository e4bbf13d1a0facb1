"""criopy's own gRPC server transport: HTTP/2 (RFC 9113) and the gRPC wire protocol on asyncio.

grpcio's server costs 0.4-0.5 ms of CPU per call in its Python layer; this one about a
third of that, which is what the kubelet's relist of every container each second pays.
"""

from cri.transport.grpcserver.calls import (
    Encoded,
    Route,
    RpcError,
    cut_details,
    deadline_exceeded,
    encode,
    never_waits,
    runs_to_completion,
)
from cri.transport.grpcserver.connection import Limits
from cri.transport.grpcserver.server import GrpcServer

__all__ = [
    "Encoded",
    "GrpcServer",
    "Limits",
    "Route",
    "RpcError",
    "cut_details",
    "deadline_exceeded",
    "encode",
    "never_waits",
    "runs_to_completion",
]
