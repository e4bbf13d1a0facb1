"""Pull+unpack: criopy against Debian's containerd 1.6, interleaved in one run (a benchmark: prints, asserts nothing).

    .venv/bin/python -m bench.pulls_vs_containerd [--runs 3] [--baseline 5cf5a2d] [--only large,small]

Two images from a loopback registry (Debian's docker-registry):
  large: busybox + 8 layers, ~150 MB, ~12k files, half of the bytes random, gzip level 6 (docker's default);
  small: 3 layers of ~13.3k files each, 1-4 kB of text-like data (40k files), gzip level 6.
Each pull goes to a fresh daemon on a fresh root (nothing cached), after `sync; echo 3 > drop_caches`
(the registry reads its blobs from disk too), through the same client: the CRI PullImage on each
runtime's socket. The runtimes take turns within each run. While criopy pulls, a client calls Version
every 5 ms (bench/version_probe, a process of its own) and the p99 of those round trips is printed: the event
loop must stay responsive.
The floor row is GNU tar extracting the same gzip blobs from local disk, a tar per layer, as many at
once as cores (or one more, whichever is faster), page cache dropped: no runtime can turn these layers
into files much faster on this disk. The HTTP floor row adds the pull itself: curl fetching each
layer from the same registry into ISA-L's igzip (Debian's isal, installed when missing) and GNU tar,
as many at once: the registry's work and the bytes' way over the socket, which every pull pays and the
first floor leaves out, with the inflate criopy uses. A run removes the roots of its pulls only at its
end (LEFTOVERS).

Every root (each runtime's, the floor's) is on a fresh journaled ext4 made for the run (bench/scratch: this
VM's root file system moved the same pull by +-30% from run to run); `--scratch DIR` measures in DIR
instead (e.g. /tmp, to see that file system's figures).

`--baseline REV` also measures criopy as of REV (default 5cf5a2d, main before this work) from a git
worktree in /tmp, made single-stream: its PARALLEL_DOWNLOADS set to 1 (layers one after another, each
downloaded then unpacked in the daemon). Run as root.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shlex
import shutil
import statistics
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import grpc

from api.runtime.v1 import api_pb2 as pb
from api.runtime.v1 import api_pb2_grpc
from bench.bytecode import compile_tree
from bench.containerd_harness import Containerd, ensure_binary, ensure_containerd
from bench.scratch import filesystem_of, roots_in
from bench.version_probe import VersionProbe
from tests.support import image_builder as ib
from tests.support.daemon_harness import REPO, Daemon
from tests.support.registry_harness import Registry

BASELINE_DIR = Path("/tmp/criopy-pull-baseline")


class Scratch:
    """Where the roots of the pulls go (set once by main())."""

    dir = Path("/tmp")


# Roots of finished pulls, removed only when the whole run is over. This root file system is ext4 without a
# journal: there, for about a minute after a delete, the inode allocator skips each freed inode whose table
# block is still cached (fs/ext4/ialloc.c, recently_deleted), scanning past every one of them for each file
# it creates. Removing one pull's 40k files right before the next pull made that pull spend seconds of
# kernel time in that scan (perf: 75% of tar's samples in recently_deleted), whichever runtime it was.
LEFTOVERS: list[Path] = []


@contextmanager
def leftovers_removed_at_the_end() -> Iterator[None]:
    try:
        yield
    finally:
        while LEFTOVERS:
            shutil.rmtree(LEFTOVERS.pop(), ignore_errors=True)


# -- the images --


def _entries(tar: bytes) -> int:
    with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
        return len(archive.getnames())


def _text_corpus() -> bytes:
    """Text as images hold it (source, docs): the standard library's own source files."""
    out = bytearray()
    for path in sorted(Path(tarfile.__file__).parent.glob("*.py"))[:200]:
        out += path.read_bytes()
    return bytes(out)


def _text(corpus: bytes, rng: random.Random, size: int) -> bytes:
    start = rng.randrange(0, len(corpus) - size)
    return corpus[start : start + size]


def _tar(files: list[tuple[str, bytes]]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs: set[str] = set()
        for name, data in files:
            parent = name.rsplit("/", 1)[0]
            parts = parent.split("/")
            for i in range(1, len(parts) + 1):
                d = "/".join(parts[:i])
                if d not in dirs:
                    dirs.add(d)
                    info = tarfile.TarInfo(d + "/")
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, ib.FIXED_MTIME
                    tar.addfile(info)
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, ib.FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def large_image(seed: int = 1) -> ib.Image:
    """busybox + 8 layers of 1500 files: ~9 MB of text in small files and ~9.4 MB random in 4 big ones each."""
    rng, corpus = random.Random(seed), _text_corpus()
    layers = []
    for i in range(8):
        files = [
            (f"app/{i}/src/{j // 100}/f{j}.txt", _text(corpus, rng, rng.randint(2000, 10000))) for j in range(1496)
        ]
        files += [(f"app/{i}/data/blob{j}.bin", rng.randbytes(2_350_000)) for j in range(4)]
        layers.append(ib.Layer.from_tar(_tar(files), "gzip", level=6))
    return ib.busybox_image(layers)


def small_files_image(seed: int = 2) -> ib.Image:
    """3 layers of 13,334 files of 1-4 kB text each (40k files)."""
    rng, corpus = random.Random(seed), _text_corpus()
    layers = []
    for i in range(3):
        files = [(f"site/{i}/{j // 200}/p{j}.html", _text(corpus, rng, rng.randint(1024, 4096))) for j in range(13_334)]
        layers.append(ib.Layer.from_tar(_tar(files), "gzip", level=6))
    return ib.Image(layers=layers, config=ib.ImageConfig())


# -- the runtimes --


def drop_caches() -> None:
    subprocess.run(["sync"], check=True, timeout=120)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


class Runtime:
    name = ""

    def start(self) -> str:
        """A fresh daemon on a fresh root; returns its socket."""
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


@dataclass
class CriopyDaemon(Runtime):
    registry_host: str
    checkout: Path = REPO  # the source tree the daemon runs from
    label: str = "criopy"
    daemon: Daemon | None = None

    def __post_init__(self) -> None:
        self.name = self.label

    def start(self) -> str:
        base = Path(tempfile.mkdtemp(prefix="cp-pull-", dir=Scratch.dir))
        config = base / "criopy.yaml"
        config.write_text("image:\n  registries: " + json.dumps([{"prefix": self.registry_host, "insecure": True}]))
        daemon = _CheckoutDaemon(base=base, config_file=config, extra_args=["--log-level", "info"])
        daemon.checkout = self.checkout
        daemon.env["PYTHONPATH"] = str(self.checkout)
        self.daemon = daemon  # before start(): stop() then ends a daemon that failed to get ready
        daemon.start()
        return daemon.socket

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            LEFTOVERS.append(self.daemon.base)
            self.daemon = None


class _CheckoutDaemon(Daemon):
    checkout: Path = REPO

    def _launch(self) -> None:
        compile_tree(self.checkout)
        self.cni_dir.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=log, env=self.env, cwd=self.checkout)


@dataclass
class ContainerdDaemon(Runtime):
    registry_host: str
    name: str = "containerd"
    daemon: Containerd | None = None
    base: Path | None = None

    def start(self) -> str:
        self.base = Path(tempfile.mkdtemp(prefix="ctd-", dir=Scratch.dir))
        # Its CRI plugin reports ready only with a network config; pulls never use it.
        (self.base / "cni").mkdir()
        (self.base / "cni" / "10-bench.conflist").write_text(
            json.dumps({"cniVersion": "0.4.0", "name": "bench-pulls", "plugins": [{"type": "loopback"}]})
        )
        self.daemon = Containerd(
            base=self.base / "c",
            cni_dir=self.base / "cni",
            registry_host=self.registry_host,
            sandbox_image=f"{self.registry_host}/unused:v1",
            binary=ensure_containerd(),
        )
        self.daemon.start()
        return self.daemon.socket

    def stop(self) -> None:
        if self.daemon is not None:
            # It ran no pod, so no network namespace is its to remove: the ones made meanwhile belong to
            # whatever else runs on the machine, which the harness would unmount and remove.
            self.daemon._netns_before = None
            self.daemon.stop()
            self.daemon = None
        if self.base is not None:
            LEFTOVERS.append(self.base)


# -- one measured pull --


def one_pull(runtime: Runtime, ref: str, probe: bool) -> tuple[float, float | None]:
    try:
        socket = runtime.start()  # inside: a runtime that failed to start is stopped all the same
        drop_caches()
        version = VersionProbe(socket) if probe else None  # connected before the pull starts
        with grpc.insecure_channel(f"unix://{socket}") as channel:
            images = api_pb2_grpc.ImageServiceStub(channel)
            started = time.monotonic()
            images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=900)
            seconds = time.monotonic() - started
        return seconds, _p99(version.stop()) if version is not None else None
    finally:
        runtime.stop()


def _p99(latencies_ms: list[float]) -> float | None:
    return statistics.quantiles(latencies_ms, n=100)[98] if len(latencies_ms) >= 2 else None


# -- the machine's floor --

FLOOR = "floor: GNU tar, local blobs"


def tar_floor(image: ib.Image) -> float:
    """The machine's floor for turning these layers into files: GNU tar (C, zlib) extracting the image's gzip
    blobs from local disk, one tar per layer, page cache dropped; the faster of as many tars at once as there
    are cores and one more (which hides the disk's reads: 15% faster here). No network, registry, digest,
    fsync or bookkeeping: what any runtime pays at least on this disk."""
    return _fastest_at_once(image, "floor-", _local_tar)


HTTP_FLOOR = "floor: curl | igzip | tar, registry"


def http_floor(image: ib.Image, blobs_url: str) -> float:
    """The floor of a pull itself: each layer fetched from the loopback registry by curl (C, one HTTP/1.1
    GET), inflated by ISA-L's igzip (the library criopy inflates with) and extracted by GNU tar, as many
    pipelines at once as there are cores or one more, page cache dropped. What tar_floor leaves out and
    every pull pays: the registry's work and the bytes' way over the socket. Still no digest, fsync or
    bookkeeping."""
    ensure_binary("igzip", "isal")
    return _fastest_at_once(image, "floor-http-", partial(_curl_igzip_tar, blobs_url))


# One layer's command: given the floor's directory, the layer's index and the layer, prepares what it needs
# there (its blob, its destination) and returns its argv.
LayerCommand = Callable[[Path, int, ib.Layer], list[str]]


def _fastest_at_once(image: ib.Image, prefix: str, command: LayerCommand) -> float:
    cores = os.cpu_count() or 1
    return min(_run_at_once(image, prefix, command, at_once) for at_once in (cores, cores + 1))


def _run_at_once(image: ib.Image, prefix: str, command: LayerCommand, at_once: int) -> float:
    """Seconds to run every layer's command, `at_once` at a time, from a dropped page cache."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=Scratch.dir))
    try:
        argvs = [command(base, i, layer) for i, layer in enumerate(image.layers)]
        drop_caches()
        started = time.monotonic()
        with ThreadPoolExecutor(at_once) as pool:
            list(pool.map(_run_quietly, argvs))
        return time.monotonic() - started
    finally:
        LEFTOVERS.append(base)


def _run_quietly(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=600)


def _local_tar(base: Path, index: int, layer: ib.Layer) -> list[str]:
    blob = base / f"{index}.tar.gz"
    blob.write_bytes(layer.blob)
    dest = base / str(index)
    dest.mkdir()
    return ["tar", "-xzf", str(blob), "-C", str(dest)]


def _curl_igzip_tar(blobs_url: str, base: Path, index: int, layer: ib.Layer) -> list[str]:
    dest = base / str(index)
    dest.mkdir()
    url = f"{blobs_url}/{layer.digest}"
    pipeline = f"set -o pipefail; curl -sSfL {shlex.quote(url)} | igzip -dc | tar -xf - -C {shlex.quote(str(dest))}"
    return ["bash", "-c", pipeline]


# -- the baseline checkout --


@contextmanager
def baseline_checkout(rev: str) -> Iterator[Path]:
    _remove_worktree()
    subprocess.run(
        ["git", "worktree", "add", "--detach", str(BASELINE_DIR), rev],
        cwd=REPO,
        check=True,
        capture_output=True,
        timeout=120,
    )
    try:
        manager = BASELINE_DIR / "cri/images/manager.py"
        text = manager.read_text()
        if "PARALLEL_DOWNLOADS = 3" not in text:
            raise SystemExit(f"{rev}: no PARALLEL_DOWNLOADS = 3 in cri/images/manager.py to make single-stream")
        manager.write_text(text.replace("PARALLEL_DOWNLOADS = 3", "PARALLEL_DOWNLOADS = 1"))
        yield BASELINE_DIR
    finally:
        _remove_worktree()


def _remove_worktree() -> None:
    argv = ["git", "worktree", "remove", "--force", str(BASELINE_DIR)]
    subprocess.run(argv, cwd=REPO, capture_output=True, check=False, timeout=60)  # absent is fine


# -- the report --


def fmt(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f} s  (" + ", ".join(f"{v:.2f}" for v in values) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--baseline", default="5cf5a2d", help="git revision of the single-stream figure; '' for none")
    parser.add_argument("--only", default="large,small", help="images to pull: large, small")
    parser.add_argument("--scratch", type=Path, help="put the roots in this directory, not on a fresh ext4")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: dropping the page cache and containerd need it")
    builders: dict[str, Callable[[], ib.Image]] = {"large": large_image, "small": small_files_image}
    wanted = [name for name in args.only.split(",") if name]
    print(f"building images: {', '.join(wanted)}", flush=True)
    images = {name: builders[name]() for name in wanted}
    with (
        roots_in(args.scratch) as scratch,
        leftovers_removed_at_the_end(),
        Registry() as registry,
        _maybe_baseline(args.baseline) as baseline,
    ):
        Scratch.dir = scratch
        print(f"roots in {scratch} ({filesystem_of(scratch)})", flush=True)
        runtimes: list[Runtime] = [CriopyDaemon(registry.host), ContainerdDaemon(registry.host)]
        if baseline is not None:
            runtimes.append(CriopyDaemon(registry.host, checkout=baseline, label=f"criopy@{args.baseline} 1-stream"))
        refs = {}
        for name, image in images.items():
            ib.push(registry.url, f"bench/{name}", image, tag="v1")
            refs[name] = f"{registry.host}/bench/{name}:v1"
            files = sum(_entries(layer.tar) for layer in image.layers)
            print(
                f"image {name}: {image.size / 1e6:.1f} MB compressed, "
                f"{sum(len(layer.tar) for layer in image.layers) / 1e6:.1f} MB of tar, "
                f"{len(image.layers)} layers, {files} entries",
                flush=True,
            )
        times: dict[tuple[str, str], list[float]] = {}
        p99s: dict[str, list[float]] = {}
        for run in range(args.runs):
            for name, image in images.items():
                for runtime in runtimes:
                    seconds, p99 = one_pull(runtime, refs[name], probe=runtime.name == "criopy")
                    times.setdefault((name, runtime.name), []).append(seconds)
                    if p99 is not None:
                        p99s.setdefault(name, []).append(p99)
                    load = os.getloadavg()[0]  # the figures move with it: other work on the machine
                    print(f"run {run + 1} {name:5} {runtime.name:28} {seconds:6.2f} s  (load {load:.1f})", flush=True)
                floors = {
                    FLOOR: partial(tar_floor, image),
                    HTTP_FLOOR: partial(http_floor, image, f"{registry.url}/v2/bench/{name}/blobs"),
                }
                for floor, measure in floors.items():
                    seconds = measure()
                    times.setdefault((name, floor), []).append(seconds)
                    print(f"run {run + 1} {name:5} {floor:28} {seconds:6.2f} s", flush=True)
        print()
        print(f"pull + unpack, page cache dropped before each, {args.runs} runs, {os.cpu_count()} cpus")
        for name in images:
            ctd = statistics.median(times[(name, "containerd")])
            for label in [runtime.name for runtime in runtimes] + [FLOOR, HTTP_FLOOR]:
                values = times[(name, label)]
                ratio = statistics.median(values) / ctd
                print(f"  {name:5} {label:28} {fmt(values)}  x{ratio:.2f} of containerd")
            if baseline is not None:
                old = statistics.median(times[(name, runtimes[-1].name)])
                new = statistics.median(times[(name, "criopy")])
                http_floor_s = statistics.median(times[(name, HTTP_FLOOR)])
                print(
                    f"  {name:5} speed-up over the single-stream baseline: criopy {old / new:.2f}x, "
                    f"the HTTP floor {old / http_floor_s:.2f}x"
                )
            if name in p99s:
                print(f"  {name:5} criopy Version p99 during the pull: " + ", ".join(f"{v:.1f} ms" for v in p99s[name]))


@contextmanager
def _maybe_baseline(rev: str) -> Iterator[Path | None]:
    if not rev:
        yield None
        return
    with baseline_checkout(rev) as path:
        yield path


if __name__ == "__main__":
    main()
