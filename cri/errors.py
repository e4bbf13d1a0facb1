"""Domain errors and the one place that maps them to gRPC status codes."""

from __future__ import annotations

import errno
import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager

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


class NoSpace(CriError):
    """The file system under `where` is full: a write failed with ENOSPC (or EDQUOT), or SQLite said SQLITE_FULL.

    RESOURCE_EXHAUSTED is gRPC's code for "perhaps the entire file system is out of space": not a bug of
    the daemon (INTERNAL), and a retry can succeed once space is freed, as the kubelet's image GC does.
    containerd and cri-o answer UNKNOWN here, with the errno text; the kubelet backs off either way.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, where: str | os.PathLike[str], doing: str) -> None:
        self.where = os.fspath(where)
        super().__init__(f"no space left on device in {self.where} while {doing}")


_NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_no_space(exc: BaseException) -> bool:
    """Whether `exc` says a file system (or a quota on it) is full."""
    if isinstance(exc, OSError):
        return exc.errno in _NO_SPACE_ERRNOS
    if isinstance(exc, sqlite3.Error):
        return getattr(exc, "sqlite_errorcode", -1) & 0xFF == sqlite3.SQLITE_FULL
    return False


@contextmanager
def no_space_in(where: str | os.PathLike[str], doing: str) -> Iterator[None]:
    """Turns a full file system met inside the block into NoSpace naming `where` and what was being done."""
    try:
        yield
    except Exception as exc:
        if is_no_space(exc):
            raise NoSpace(where, doing) from exc
        raise


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC code and message a failed RPC answers with."""
    if isinstance(exc, CriError):
        return exc.code, str(exc)
    if is_no_space(exc):  # met where no caller named the place; the OSError's text names the file
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"no space left on device: {exc}"
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED, f"timed out: {exc}"
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}"
