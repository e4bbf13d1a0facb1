"""Containers through the daemon's socket, like the kubelet drives them: real conmon, runc, overlay, cgroups (root)."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from tests import image_builder as ib
from tests.e2e.containers import NOTHING, Env, push_image, registries_yaml, remove_all_containers
from tests.e2e.pods import PodNet, remove_all_pods
from tests.registry_harness import Registry

CRI_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) (P|F) ")


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with Registry() as r:
        yield r


@pytest.fixture(scope="module")
def busybox(registry: Registry) -> str:
    return push_image(registry, "e2e/busybox")


@pytest.fixture
def env(make_daemon, registry: Registry, busybox: str) -> Iterator[Env]:
    daemon = make_daemon(registries_yaml(registry.host), start=False)
    net = PodNet.make(daemon)
    daemon.start()
    env = Env(daemon, net, busybox)
    env.daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=busybox)), timeout=120)
    try:
        yield env
    finally:
        remove_all_containers(daemon)
        remove_all_pods(daemon)
        net.remove()
        env.cleanup()


def test_a_container_prints_a_line_and_its_exit_reaches_status_at_once(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, env.container_config(command=["sh", "-c", "echo hello from criopy; echo to stderr >&2"]))
    status = env.wait_exited(cid, timeout=10)
    exited_seen = time.time_ns()
    assert status.exit_code == 0
    assert status.reason == "Completed"
    # Within a second of the exit as conmon recorded it.
    assert 0 <= exited_seen - status.finished_at < 1_000_000_000
    assert status.started_at >= status.created_at > 0
    lines = env.log_lines(pod)
    assert all(CRI_LOG_LINE.match(line) for line in lines), lines
    assert any(line.endswith(" stdout F hello from criopy") for line in lines), lines
    assert any(line.endswith(" stderr F to stderr") for line in lines), lines
    assert status.log_path == str(__import__("pathlib").Path(pod[1].log_directory) / "c.log")

    failing = env.run_to_exit(pod, env.container_config("fails", ["sh", "-c", "exit 3"]))
    assert (failing.exit_code, failing.reason) == (3, "Error")


def test_remove_leaves_nothing(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, env.container_config(command=["sleep", "3600"]))
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING
    env.stop(cid, timeout=0)
    env.stop(cid, timeout=0)
    env.remove(cid)
    env.remove(cid)
    assert env.leftovers() == NOTHING
    with pytest.raises(grpc.RpcError) as err:
        env.status(cid)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    ib  # noqa: B018
