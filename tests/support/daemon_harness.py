"""Runs criopy as a subprocess on a private root, runroot, socket and CNI dir, and talks to it like the kubelet."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from api.runtime.v1 import api_pb2 as pb
from api.runtime.v1 import api_pb2_grpc

REPO = Path(__file__).resolve().parents[2]
DEBIAN_CNI_DIR = "/usr/lib/cni"
DEFAULT_CONFLIST = REPO / "conf" / "10-criopy-bridge.conflist"


PORT_TRIES = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The e2e suite runs against either gRPC server: E2E_GRPC_SERVER=grpcio gives every daemon grpcio's
# (the fallback transport); `make test` runs the e2e suite once more so.
E2E_GRPC_SERVER = "E2E_GRPC_SERVER"


def clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRIOPY_")}
    server = os.environ.get(E2E_GRPC_SERVER, "")
    if server:
        env["CRIOPY_GRPC_SERVER"] = server
    return env


@dataclass
class Daemon:
    base: Path
    config_file: Path
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=clean_env)
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> str:
        return str(self.base / "run" / "criopy.sock")

    @property
    def root(self) -> Path:
        return self.base / "root"

    @property
    def runroot(self) -> Path:
        return self.base / "run"

    @property
    def cni_dir(self) -> Path:
        return self.base / "cni"

    @property
    def log_path(self) -> Path:
        return self.base / "daemon.log"

    def argv(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cri",
            "run",
            "--config",
            str(self.config_file),
            "--config-dir",
            str(self.base / "criopy.d"),
            "--root",
            str(self.root),
            "--runroot",
            str(self.runroot),
            "--listen",
            self.socket,
            "--cni-config-dir",
            str(self.cni_dir),
            "--cni-plugin-dir",
            DEBIAN_CNI_DIR,
            "--metrics-port",
            str(self.metrics_port),
            "--log-level",
            "debug",
            *self.extra_args,
        ]

    def start(self, wait: bool = True) -> Daemon:
        for _ in range(PORT_TRIES):
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._launch()
            if not wait:
                return self
            try:
                self.wait_ready()
                return self
            except AssertionError:
                if not self._lost_its_port(logged):
                    raise
                # metrics_port was free when picked, but a listener bound to port 0 since (a registry, a
                # proxy) may have been given the same number: take another.
                self.metrics_port = free_port()
        raise AssertionError(f"no free metrics port in {PORT_TRIES} tries:\n{self.log()}")

    def _launch(self) -> None:
        self.cni_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, env=self.env, cwd=REPO)

    def _lost_its_port(self, logged: int) -> bool:
        assert self.proc is not None
        if self.proc.poll() is None:
            return False
        with self.log_path.open("rb") as log:
            log.seek(logged)
            return b"Address already in use" in log.read()

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.runtime().Version(pb.VersionRequest(), timeout=1)
                return
            except grpc.RpcError:
                time.sleep(0.05)
        raise AssertionError(f"daemon did not answer within {timeout}s:\n{self.log()}")

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(f"unix://{self.socket}")

    def runtime(self) -> api_pb2_grpc.RuntimeServiceStub:
        return api_pb2_grpc.RuntimeServiceStub(self.channel())

    def images(self) -> api_pb2_grpc.ImageServiceStub:
        return api_pb2_grpc.ImageServiceStub(self.channel())

    def metrics(self) -> dict[str, float]:
        """The /metrics samples, keyed by name and labels as Prometheus prints them."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        body = urllib.request.urlopen(url, timeout=5).read().decode()
        pairs = (line.rsplit(" ", 1) for line in body.splitlines() if line and not line.startswith("#"))
        return {name: float(value) for name, value in pairs}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not go. Returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def stored(self) -> dict[str, list[str]]:
        """What the image stores hold: blobs, unpacked layers, and anything half-written."""
        blobs = self.root / "blobs" / "sha256"
        layers = self.root / "layers"
        ingest = self.root / "blobs" / "ingest"
        return {
            "blobs": sorted(os.listdir(blobs)) if blobs.exists() else [],
            "layers": sorted(p for p in os.listdir(layers) if not p.startswith("tmp-")) if layers.exists() else [],
            "temp": (sorted(os.listdir(ingest)) if ingest.exists() else [])
            + (sorted(p for p in os.listdir(layers) if p.startswith("tmp-")) if layers.exists() else []),
        }

    def wait_for_log(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.log():
                return
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not logged within {timeout}s:\n{self.log()}")


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cri", *args],
        capture_output=True,
        text=True,
        env=env if env is not None else clean_env(),
        cwd=REPO,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        check=False,
    )
