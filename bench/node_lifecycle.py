"""A pod's full lifecycle inside a kind-style node against the same on the host, in turns (prints figures).

    sudo .venv/bin/python -m bench.node_lifecycle [--lifecycles 20] [--source DIR]

Builds the node image as tests/e2e/test_node.py does (deploy/kind/build.sh over the debootstrap base; the
base tarball and wheels are cached under /var/cache/criopy-test), boots one node, and starts a host daemon
(tests/support/daemon_harness) on a bridge of its own. Both get the same busybox image, imported from one
`docker save` archive with `criopy images import`, and the same requests from the same client: one
lifecycle is RunPodSandbox, CreateContainer, StartContainer, StopContainer (timeout 0), RemoveContainer,
StopPodSandbox, RemovePodSandbox. The node's daemon runs with its installed defaults under systemd, the
host's under the harness. Also printed: the image's size, its build time, and the node's boot to criopy
ready. Everything is removed at the end. --source takes criopy for the node from another tree (e.g. a
`git archive HEAD` export while the checkout is mid-edit); the host daemon always runs this checkout.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

from api.runtime.v1 import api_pb2 as pb
from api.runtime.v1 import api_pb2_grpc
from tests.e2e.pods import PodNet, pod_config, remove_all_pods
from tests.support import node_image as ni
from tests.support.daemon_harness import Daemon, run_cli
from tests.support.system import remove_cgroup_parent


def lifecycle_ms(rt: Any, image: str, log_dir: str, cgroup_parent: str = "") -> float:
    config = pod_config(log_directory=log_dir)
    if cgroup_parent:
        config.linux.cgroup_parent = cgroup_parent
    container = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="c"), image=pb.ImageSpec(image=image), command=["sleep", "3600"]
    )
    container.log_path = "c.log"
    started = time.perf_counter()
    pod_id = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    cid = rt.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config), timeout=60
    ).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=30)
    rt.StopContainer(pb.StopContainerRequest(container_id=cid, timeout=0), timeout=60)
    rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    return (time.perf_counter() - started) * 1000


def in_turns(
    count: int, node_rt: Any, host_rt: Any, *, ref: str, host_logs: Path, parent: str
) -> tuple[list[float], ...]:
    """One lifecycle inside the node, then one on the host, and again; the first of each is a warm-up."""
    inside, outside = [], []
    for i in range(count + 1):
        a = lifecycle_ms(node_rt, ref, f"/var/log/pods/bench-{i}")
        b = lifecycle_ms(host_rt, ref, str(host_logs / str(i)), parent)
        if i:
            inside.append(a)
            outside.append(b)
    return inside, outside


def host_import(daemon: Daemon, archive: Path) -> None:
    flags = ["--config", str(daemon.config_file), "--root", str(daemon.root), "--runroot", str(daemon.runroot)]
    done = run_cli("images", "import", str(archive), *flags, "--listen", daemon.socket, timeout=120)
    if done.returncode != 0:
        raise SystemExit(f"criopy images import on the host daemon failed: {done.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lifecycles", type=int, default=20)
    parser.add_argument("--source", type=Path, default=ni.REPO)
    args = parser.parse_args()
    dockerd = ni.Dockerd.ensure()
    base = Path(tempfile.mkdtemp(prefix="criopy-bench-node-"))
    tag = f"criopy-test/busybox:{secrets.token_hex(4)}"
    parent = f"/criopy-bench-{os.getpid()}"
    node: ni.Node | None = None
    daemon: Daemon | None = None
    net: PodNet | None = None
    try:
        with ni.node_image(sys.executable, args.source) as image:
            ni.build_busybox_image(tag, secrets.token_hex(4))
            archive = base / "busybox.tar"
            archive.write_bytes(ni.docker_save(tag))
            ref = f"docker.io/{tag}"
            node = ni.start_node(image.tag)
            node.exec("criopy", "images", "import", "-", input=archive.read_bytes())

            (base / "criopy.yaml").write_text("")
            daemon = Daemon(base=base, config_file=base / "criopy.yaml", extra_args=["--log-level", "info"])
            net = PodNet.make(daemon)
            daemon.start()
            host_import(daemon, archive)

            node_rt = api_pb2_grpc.RuntimeServiceStub(grpc.insecure_channel(f"unix://{node.socket}"))
            inside, outside = in_turns(
                args.lifecycles, node_rt, daemon.runtime(), ref=ref, host_logs=base / "logs", parent=parent
            )
            print(f"node image {image.tag}: {ni.image_size(image.tag) / 1e6:.0f} MB")
            print(f"  base (debootstrap when not cached, docker import)  {image.base_seconds:6.1f} s")
            print(f"  deploy/kind/build.sh                                {image.build_seconds:6.1f} s")
            print(f"  node boot to criopy ready                           {node.ready_seconds:6.1f} s")
            print(f"pod lifecycle (run, create, start, stop, remove), median of {args.lifecycles}, in turns")
            print(f"  inside the node                                     {statistics.median(inside):6.1f} ms")
            print(f"  on the host                                         {statistics.median(outside):6.1f} ms")
    finally:
        if node is not None:
            node.remove()
        if daemon is not None:
            remove_all_pods(daemon)
            daemon.stop()
        if net is not None:
            net.remove()
        remove_cgroup_parent(parent)
        ni.sh("docker", "image", "rm", "--force", tag, check=False)
        shutil.rmtree(base, ignore_errors=True)
        dockerd.stop()


if __name__ == "__main__":
    main()
