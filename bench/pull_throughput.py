"""Pull+unpack throughput of criopy from a loopback registry (a benchmark: prints figures, asserts nothing).

    .venv/bin/python -m bench.pull_throughput [--mb 128] [--layers 4] [--runs 3]

Each run starts a daemon on a fresh root, so nothing is cached, and pulls a
multi-layer image of random (incompressible) data built from Debian's static
busybox and pushed to Debian's docker-registry on 127.0.0.1. Run as root.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from api.runtime.v1 import api_pb2 as pb
from tests.support import image_builder as ib
from tests.support.daemon_harness import Daemon
from tests.support.registry_harness import Registry


def one_run(registry: Registry, ref: str) -> float:
    base = Path(tempfile.mkdtemp(prefix="criopy-bench-"))
    config = base / "criopy.yaml"
    config.write_text("image:\n  registries: " + json.dumps([{"prefix": registry.host, "insecure": True}]) + "\n")
    daemon = Daemon(base=base, config_file=config, extra_args=["--log-level", "info"])
    try:
        daemon.start()
        started = time.monotonic()
        daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=900)
        return time.monotonic() - started
    finally:
        daemon.stop()
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mb", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    image = ib.big_image(total_mb=args.mb, layer_count=args.layers)
    with Registry() as registry:
        ib.push(registry.url, "bench/big", image, tag="v1")
        ref = f"{registry.host}/bench/big:v1"
        times = sorted(one_run(registry, ref) for _ in range(args.runs))
    size_mb = image.size / 1e6
    median = times[len(times) // 2]
    print(f"image: {size_mb:.1f} MB in {len(image.layers)} layers (gzip level 0, random data)")
    print(
        f"criopy pull+unpack: median {median:.2f}s = {size_mb / median:.1f} MB/s; runs: "
        + ", ".join(f"{t:.2f}s" for t in times)
    )


if __name__ == "__main__":
    main()
