"""The pod lifecycle with and without a user namespace (hostUsers: false), in turns (prints figures).

    sudo .venv/bin/python -m bench.userns_lifecycle [--samples 15]

One daemon, busybox from a loopback registry. Each sample runs the whole lifecycle of a plain pod,
then of a pod with userns_options mode POD (a 65536-wide range of its own): RunPodSandbox with a
shared PID namespace (so the infra process is made too), CreateContainer and StartContainer of one
`sleep 3600`, StopPodSandbox, RemovePodSandbox. The user namespace costs a child interpreter that
makes the namespaces, and an idmapped bind per image layer under the overlay. Medians per step and
in total; the first sample of each is a warm-up. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import registries_yaml
from tests.e2e.pods import PodNet, pod_config, remove_all_pods
from tests.support import image_builder as ib
from tests.support.daemon_harness import Daemon
from tests.support.registry_harness import Registry
from tests.support.system import remove_cgroup_parent

STEPS = ("RunPodSandbox", "CreateContainer", "StartContainer", "StopPodSandbox", "RemovePodSandbox")
WIDTH = 65536


def lifecycle(rt: Any, image: str, parent: str, log_dir: Path, host_id: int | None) -> dict[str, float]:
    """One pod's lifecycle, ms per step; host_id: the pod's user namespace range, None for the host's."""
    config = pod_config(shared_pid=True, log_directory=str(log_dir))
    config.linux.cgroup_parent = parent
    ns = config.linux.security_context.namespace_options
    if host_id is not None:
        mapping = [pb.IDMapping(container_id=0, host_id=host_id, length=WIDTH)]
        ns.userns_options.CopyFrom(pb.UserNamespace(mode=pb.POD, uids=mapping, gids=mapping))
    container = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="c"), image=pb.ImageSpec(image=image), command=["sleep", "3600"]
    )
    container.linux.security_context.namespace_options.CopyFrom(ns)
    took: dict[str, float] = {}

    def timed(step: str, call: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = call()
        took[step] = (time.perf_counter() - started) * 1000
        return result

    pod_id = timed("RunPodSandbox", lambda: rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60))
    pod_id = pod_id.pod_sandbox_id
    request = pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config)
    cid = timed("CreateContainer", lambda: rt.CreateContainer(request, timeout=60)).container_id
    timed("StartContainer", lambda: rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=60))
    timed("StopPodSandbox", lambda: rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60))
    timed(
        "RemovePodSandbox", lambda: rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
    )
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=15)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="criopy-bench-userns-"))
    os.chmod(base, 0o711)  # the pods' mapped roots must traverse it, as they do a node's /var/lib and /run
    parent = f"/criopy-bench-{os.getpid()}"
    with Registry() as registry:
        ib.push(registry.url, "bench/busybox", ib.busybox_image([]), "latest")
        image = f"{registry.host}/bench/busybox:latest"
        config = base / "criopy.yaml"
        config.write_text(registries_yaml(registry.host))
        daemon = Daemon(base=base, config_file=config, extra_args=["--log-level", "info"])
        net = PodNet.make(daemon)
        try:
            daemon.start()
            rt = daemon.runtime()
            daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
            plain: list[dict[str, float]] = []
            userns: list[dict[str, float]] = []
            for i in range(args.samples + 1):
                a = lifecycle(rt, image, parent, base / "logs", None)
                b = lifecycle(rt, image, parent, base / "logs", (1 << 30) + (i % 1024) * WIDTH)
                if i:  # the first of each is a warm-up
                    plain.append(a)
                    userns.append(b)
            print(f"pod lifecycle (shared PID namespace, one container), median ms of {args.samples}, in turns")
            print(f"  {'step':18} {'host userns':>12} {'own userns':>12}")
            for step in (*STEPS, "total"):
                medians = [statistics.median(_ms(s, step) for s in samples) for samples in (plain, userns)]
                print(f"  {step:18} {medians[0]:12.1f} {medians[1]:12.1f}")
        finally:
            remove_all_pods(daemon)
            daemon.stop()
            net.remove()
            remove_cgroup_parent(parent)
            shutil.rmtree(base, ignore_errors=True)


def _ms(sample: dict[str, float], step: str) -> float:
    return sum(sample.values()) if step == "total" else sample[step]


if __name__ == "__main__":
    main()
