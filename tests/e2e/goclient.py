"""A grpc-go client for the e2e tests: the HTTP/2 stack the kubelet and crictl use, where the rest of the suite
uses Python's grpcio (gRPC C-core).

`tests/goclient/main.go` is built once per session against Debian's packaged grpc-go sources
(golang-go, golang-google-grpc-dev) in GOPATH mode: there is no module proxy on these machines. A missing
toolchain fails the test rather than skipping it: CI installs it (deploy/install.sh --test).

The binary knows nothing of CRI messages: it sends the serialized request it reads on stdin and prints each
response message as base64, so the messages are built and parsed here with the suite's own stubs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any, Generic, NamedTuple, TypeVar

import pytest
from google.protobuf.message import Message

from tests.support.daemon_harness import REPO

SOURCE = REPO / "tests" / "goclient" / "main.go"
# Debian's golang-* -dev packages install their sources here, laid out as a GOPATH.
DEBIAN_GOPATH = "/usr/share/gocode"

M = TypeVar("M", bound=Message)


class Reply(NamedTuple, Generic[M]):
    """What one call returned: its response messages (one for a unary call) and its final gRPC status."""

    responses: list[M]
    code: str  # grpc-go's codes.Code names: "OK", "NotFound", "InvalidArgument", "DeadlineExceeded", ...
    message: str


def build(out_dir: Path) -> Path:
    """Build the client; fail, with the compiler's output, when the Go toolchain or grpc-go sources are missing."""
    go = shutil.which("go") or "/usr/bin/go"
    if not Path(go).exists():
        pytest.fail("the Go toolchain is missing: apt-get install golang-go golang-google-grpc-dev")
    binary = out_dir / "criclient"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": DEBIAN_GOPATH,
        # Go's build cache (content-addressed, safe to share) outlives the session: a rebuild takes a second,
        # where compiling grpc-go afresh takes ten.
        "GOCACHE": os.environ.get("GOCACHE") or str(Path(tempfile.gettempdir()) / "criopy-tests-go-build"),
        "GOFLAGS": "",
        "CGO_ENABLED": "0",
    }
    done = subprocess.run(
        [go, "build", "-o", str(binary), str(SOURCE)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(
            f"building {SOURCE.relative_to(REPO)} failed (needs golang-go golang-google-grpc-dev):\n{done.stderr}"
        )
    return binary


@dataclass
class GoCall(Generic[M]):
    """A running client process. Its output is read as it comes, so a stream can be watched while it runs."""

    proc: subprocess.Popen[bytes]
    response_type: type[M]
    lines: Queue[dict[str, str] | None] = field(default_factory=Queue)
    received: list[M] = field(default_factory=list)  # messages taken by wait_for, not yet part of a reply
    held: list[dict[str, str] | None] = field(default_factory=list)  # the line that ended wait_for's reading

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.put(json.loads(raw))
        self.lines.put(None)

    def wait_for(self, done: Callable[[list[M]], bool], timeout: float) -> list[M]:
        """The messages received so far, once `done` holds for them, the call ended, or `timeout` passed."""
        deadline = time.monotonic() + timeout
        while not done(self.received) and not self.held and (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except Empty:
                break
            if line is None or "code" in line:
                self.held.append(line)  # the call ended: the rest is for replies()
            else:
                self.received.append(self._parse(line))
        return self.received

    def cancel(self) -> None:
        """Ask the client to cancel its calls (it cancels their context: RST_STREAM CANCEL on the wire)."""
        self.proc.send_signal(signal.SIGINT)

    def finished(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def replies(self, timeout: float = 60) -> list[Reply[M]]:
        """Wait for the process; the reply of each call it made, in the order they finished."""
        if not self.finished(timeout):
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the Go client did not finish within {timeout}s")
        assert self.proc.stderr is not None
        stderr = self.proc.stderr.read().decode(errors="replace")
        assert self.proc.returncode == 0, f"the Go client failed ({self.proc.returncode}): {stderr}"
        replies: list[Reply[M]] = []
        responses, self.received = self.received, []
        while (line := self.held.pop() if self.held else self.lines.get(timeout=10)) is not None:
            if "code" in line:
                replies.append(Reply(responses, line["code"], line["message"]))
                responses = []
            else:
                responses.append(self._parse(line))
        assert not responses, f"messages after the last status line: {responses}"
        return replies

    def reply(self, timeout: float = 60) -> Reply[M]:
        (only,) = self.replies(timeout)
        return only

    def _parse(self, line: dict[str, str]) -> M:
        return self.response_type.FromString(base64.b64decode(line["message"]))


@dataclass(frozen=True)
class GoClient:
    binary: Path

    def start(
        self,
        socket: str,
        method: str,
        request: Message,
        response_type: type[M],
        *,
        stream: bool = False,
        timeout: float = 10,
        max_messages: int = 0,
        concurrency: int = 1,
    ) -> GoCall[M]:
        """Start a call; `method` is a full name (/runtime.v1.RuntimeService/Version) or a RuntimeService method."""
        if not method.startswith("/"):
            method = f"/runtime.v1.RuntimeService/{method}"
        argv = [str(self.binary), "-socket", socket, "-method", method, "-timeout", f"{timeout}s"]
        argv += ["-max-messages", str(max_messages), "-concurrency", str(concurrency)]
        if stream:
            argv.append("-stream")
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None
        proc.stdin.write(request.SerializeToString())
        proc.stdin.close()
        return GoCall(proc, response_type)

    def call(
        self, socket: str, method: str, request: Message, response_type: type[M], timeout: float = 10, **options: Any
    ) -> Reply[M]:
        """One call, to its end: (responses, code, message). `options` are start()'s (stream, max_messages)."""
        return self.start(socket, method, request, response_type, timeout=timeout, **options).reply(timeout + 30)
