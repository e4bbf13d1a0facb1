"""One more client calling Version every 5 ms, in a process of its own, while a benchmark loads a runtime.

    python -m bench.version_probe SOCKET    (calls until its stdin closes, then prints one JSON list of ms)

Its own process, so what it measures is the runtime's answer, not the benchmark's other client threads:
in the benchmark's process they share one GIL with the probe, and a probe call waited for them (the same
~30 ms p99 against criopy and containerd alike). The kubelet's calls share no GIL either.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import grpc

from api.runtime.v1 import api_pb2 as pb
from api.runtime.v1 import api_pb2_grpc

INTERVAL = 0.005


class VersionProbe:
    """The probe process for `socket`: start() once connected, stop() for its latencies in ms."""

    def __init__(self, socket: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.version_probe", socket],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        self.proc.stdout.readline()  # "connected"

    def stop(self) -> list[float]:
        out, _ = self.proc.communicate(b"", timeout=60)
        return [float(v) for v in json.loads(out)]


def main() -> None:
    done = threading.Event()

    def until_stdin_closes() -> None:
        sys.stdin.read()
        done.set()

    threading.Thread(target=until_stdin_closes, daemon=True).start()
    latencies = []
    with grpc.insecure_channel(f"unix://{sys.argv[1]}") as channel:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)
        stub.Version(pb.VersionRequest(), timeout=10)
        print("connected", flush=True)
        while not done.is_set():
            started = time.perf_counter()
            stub.Version(pb.VersionRequest(), timeout=10)
            latencies.append((time.perf_counter() - started) * 1000)
            time.sleep(INTERVAL)
    print(json.dumps(latencies), flush=True)


if __name__ == "__main__":
    main()
