"""CreateContainer with 4 CDI devices and 2 image volumes, against a plain one, in turns (prints figures).

    sudo .venv/bin/python -m bench.create_devices_volumes [--samples 15]

One daemon, one pod; the CDI devices are mknod'd copies of /dev/null and
/dev/zero described by one spec file, the image volumes two small images
from a loopback registry. Each sample creates a plain container, then one
with the devices and volumes, and removes both. The first image-volume
container mounts the images; the others reuse the mounts, as pods of one
workload do. Everything is removed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import stat
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import registries_yaml
from tests.e2e.pods import PodNet, pod_config, remove_all_pods
from tests.support import image_builder as ib
from tests.support.daemon_harness import Daemon
from tests.support.registry_harness import Registry
from tests.support.system import remove_cgroup_parent

DEVICES = 4


def cdi_spec(dev: Path) -> dict[str, object]:
    devices = []
    for i in range(DEVICES):
        source = "/dev/null" if i % 2 == 0 else "/dev/zero"
        os.mknod(dev / f"fake{i}", 0o666 | stat.S_IFCHR, os.stat(source).st_rdev)
        edits = {"deviceNodes": [{"path": f"/dev/fake{i}", "hostPath": str(dev / f"fake{i}")}]}
        devices.append({"name": f"d{i}", "containerEdits": edits})
    return {"cdiVersion": "0.6.0", "kind": "bench.example/fake", "devices": devices}


def push(registry: Registry, name: str) -> str:
    layer = ib.Layer([ib.Dir("/data"), ib.File(f"/data/{name}.txt", name.encode())], created_by=name)
    ib.push(registry.url, f"bench/{name}", ib.Image(layers=[layer]), "latest")
    return f"{registry.host}/bench/{name}:latest"


def created_ms(rt: Any, pod: tuple[str, pb.PodSandboxConfig], config: pb.ContainerConfig) -> float:
    started = time.perf_counter()
    cid = rt.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod[0], config=config, sandbox_config=pod[1]), timeout=60
    ).container_id
    elapsed = (time.perf_counter() - started) * 1000
    rt.RemoveContainer(pb.RemoveContainerRequest(container_id=cid), timeout=60)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=15)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="criopy-bench-cdv-"))
    (base / "cdi").mkdir()
    (base / "dev").mkdir()
    (base / "cdi" / "fake.json").write_text(json.dumps(cdi_spec(base / "dev")))
    parent = f"/criopy-bench-{os.getpid()}"
    with Registry() as registry:
        busybox = push_busybox(registry)
        volumes = [push(registry, "one"), push(registry, "two")]
        config = base / "criopy.yaml"
        config.write_text(registries_yaml(registry.host, f"runtime:\n  cdi_spec_dirs: [{base / 'cdi'}]\n"))
        daemon = Daemon(base=base, config_file=config, extra_args=["--log-level", "info"])
        net = PodNet.make(daemon)
        try:
            daemon.start()
            rt, images = daemon.runtime(), daemon.images()
            for image in [busybox, *volumes]:
                images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
            pc = pod_config(log_directory=str(base / "logs"))
            pc.linux.cgroup_parent = parent
            pod = (rt.RunPodSandbox(pb.RunPodSandboxRequest(config=pc), timeout=60).pod_sandbox_id, pc)
            plain, loaded = [], []
            for i in range(args.samples + 1):
                base_config = pb.ContainerConfig(
                    metadata=pb.ContainerMetadata(name=f"plain{i}"),
                    image=pb.ImageSpec(image=busybox),
                    command=["true"],
                    log_path=f"plain{i}.log",
                )
                full = pb.ContainerConfig()
                full.CopyFrom(base_config)
                full.metadata.name = f"full{i}"
                full.CDI_devices.extend(pb.CDIDevice(name=f"bench.example/fake=d{d}") for d in range(DEVICES))
                full.mounts.extend(
                    pb.Mount(container_path=f"/vol{v}", image=pb.ImageSpec(image=image), readonly=True)
                    for v, image in enumerate(volumes)
                )
                a, b = created_ms(rt, pod, base_config), created_ms(rt, pod, full)
                if i:  # the first of each is a warm-up
                    plain.append(a)
                    loaded.append(b)
            print(f"CreateContainer, median of {args.samples}, in turns")
            print(f"  plain                               {statistics.median(plain):7.1f} ms")
            print(f"  {DEVICES} CDI devices + 2 image volumes    {statistics.median(loaded):7.1f} ms")
        finally:
            remove_all_pods(daemon)
            daemon.stop()
            net.remove()
            remove_cgroup_parent(parent)
            for node in (base / "dev").iterdir():
                node.unlink()
            shutil.rmtree(base, ignore_errors=True)


def push_busybox(registry: Registry) -> str:
    ib.push(registry.url, "bench/busybox", ib.busybox_image([]), "latest")
    return f"{registry.host}/bench/busybox:latest"


if __name__ == "__main__":
    main()
