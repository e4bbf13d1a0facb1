"""What a streaming URL stands for: the request behind it, kept under a single-use token that expires."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field

from cri.errors import Unavailable

# As the kubelet's streaming server: at most this many URLs handed out and not yet used.
MAX_PENDING = 1000


@dataclass(frozen=True)
class ExecRequest:
    container_id: str
    cmd: tuple[str, ...]
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class AttachRequest:
    container_id: str
    tty: bool
    stdin: bool
    stdout: bool
    stderr: bool


@dataclass(frozen=True)
class PortForwardRequest:
    sandbox_id: str
    netns: str  # the pod's network namespace; "" for a pod on the host network
    ports: tuple[int, ...] = field(default=())


Request = ExecRequest | AttachRequest | PortForwardRequest


@dataclass(frozen=True)
class _Pending:
    request: Request
    expires: float


class TokenCache:
    """Random tokens to requests: each one answered once, and only before it expires."""

    def __init__(self) -> None:
        self._pending: dict[str, _Pending] = {}

    def insert(self, request: Request, ttl: float) -> str:
        now = time.monotonic()
        self._pending = {t: p for t, p in self._pending.items() if p.expires > now}
        if len(self._pending) >= MAX_PENDING:
            raise Unavailable(f"too many streaming requests pending ({MAX_PENDING}); try again later")
        token = secrets.token_urlsafe(24)
        self._pending[token] = _Pending(request, now + ttl)
        return token

    def consume(self, token: str) -> Request | None:
        """The request, once: None for an unknown, used or expired token."""
        pending = self._pending.pop(token, None)
        if pending is None or pending.expires <= time.monotonic():
            return None
        return pending.request
