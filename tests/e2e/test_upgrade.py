"""Upgrade: a state database written by the previous release opens, shows what it held, and can be emptied.

The fixture is criopy 0.1.0's database of a node with one pod, three containers
(running, exited with code 3, created) and an image, as that release wrote it;
the daemon meets it as after a reboot, its processes, pins and files gone.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from api.runtime.v1 import api_pb2 as pb
from cri.state.migrations import SCHEMA_VERSION
from tests.e2e.containers import registries_yaml
from tests.support.registry_harness import Registry

FIXTURE = Path(__file__).parent / "fixtures" / "state-0.1.0.sql"
POD_ID = "a7a8edc740ac6b4d9ec4e64b4f39255622b3fe1c9e97b8423f36e617d03a235d"
IMAGE_ID = "sha256:23e017691db44231150073f6f0a63292c035dced07c2d81a760a10f215d16ae7"


def test_a_database_of_the_previous_release_opens_and_empties(make_daemon, registry: Registry) -> None:
    daemon = make_daemon(registries_yaml(registry.host), start=False)
    daemon.root.mkdir(parents=True)
    script = FIXTURE.read_text().replace("@BASE@", str(daemon.base)).replace("@REGISTRY@", registry.host)
    # After a reboot the sleeper's PID may be any other process's: here, this test's own. (It failed in CI
    # when its fixed PID happened to be alive: the container showed as running.)
    script = script.replace('"pid": 25135,', f'"pid": {os.getpid()},')
    with sqlite3.connect(daemon.root / "state.db") as db:
        db.executescript(script)
    daemon.start()
    rt, images = daemon.runtime(), daemon.images()

    pods = rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items
    assert [(p.id, p.metadata.name, p.metadata.uid, p.state) for p in pods] == [
        (POD_ID, "old-pod", "0123456789abcdef", pb.SANDBOX_NOTREADY)  # its namespaces went with the reboot
    ]
    listed = {c.metadata.name: c for c in rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers}
    assert sorted(listed) == ["created", "done", "sleeper"]
    for c in listed.values():
        assert (c.pod_sandbox_id, c.metadata.attempt, c.image_id) == (POD_ID, 1, IMAGE_ID)
        assert (dict(c.labels), dict(c.annotations)) == ({"app": "old"}, {"note": "v1"})
        assert c.state == pb.CONTAINER_EXITED  # none of their processes is left
    done = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=listed["done"].id), timeout=10).status
    assert (done.exit_code, done.reason) == (3, "Error")
    assert done.log_path == str(daemon.base / "logs" / "done.log")
    lost = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=listed["sleeper"].id), timeout=10).status
    assert lost.exit_code == 255 and "lost" in lost.message
    found = images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=f"{registry.host}/e2e/busybox")))
    assert found.image.id == IMAGE_ID

    for c in listed.values():
        rt.RemoveContainer(pb.RemoveContainerRequest(container_id=c.id), timeout=30)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=POD_ID), timeout=30)
    images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=IMAGE_ID)), timeout=30)
    assert rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers == []
    assert rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items == []
    assert images.ListImages(pb.ListImagesRequest(), timeout=10).images == []
    assert daemon.stop() == 0
    with sqlite3.connect(daemon.root / "state.db") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM name_reservations").fetchone()[0] == 0
