"""Domain errors and the one place that maps them to gRPC status codes."""

from __future__ import annotations

import grpc


class CriError(Exception):
    """Base of every error a request can end with; the message is shown to the client."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class NotFound(CriError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(CriError):
    """Bad request input; the message names the field."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


class AlreadyExists(CriError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(CriError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unimplemented(CriError):
    code = grpc.StatusCode.UNIMPLEMENTED


class DeadlineExceeded(CriError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(CriError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Unavailable(CriError):
    code = grpc.StatusCode.UNAVAILABLE


class Internal(CriError):
    code = grpc.StatusCode.INTERNAL


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message a failed RPC answers with."""
    if isinstance(exc, CriError):
        return exc.code, str(exc)
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"timed out: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
