"""UpdatePodSandboxResources input: conversion, validation and the record's plain form (no root)."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.errors import InvalidArgument
from cri.services.sandbox_convert import pod_resources_of
from podsandbox.resources import PodResources, log_fields

MiB = 1024 * 1024


def _request(**fields: pb.LinuxContainerResources) -> pb.UpdatePodSandboxResourcesRequest:
    return pb.UpdatePodSandboxResourcesRequest(pod_sandbox_id="a" * 64, **fields)


def test_every_field_is_kept_and_the_record_round_trips_through_json() -> None:
    resources = pb.LinuxContainerResources(
        cpu_period=100000,
        cpu_quota=50000,
        cpu_shares=512,
        memory_limit_in_bytes=256 * MiB,
        memory_swap_limit_in_bytes=512 * MiB,
        oom_score_adj=100,
        cpuset_cpus="0-1",
        cpuset_mems="0",
        hugepage_limits=[pb.HugepageLimit(page_size="2MB", limit=4 * MiB)],
        unified={"memory.high": "200000000"},
    )
    pod = pod_resources_of(_request(resources=resources))
    assert pod.overhead is None
    assert pod.resources is not None
    assert pod.resources["hugepage_limits"] == {"2MB": 4 * MiB}
    assert pod.resources["unified"] == {"memory.high": "200000000"}
    assert pod.resources["memory_swap_limit_in_bytes"] == 512 * MiB
    # Plain ints, strings and dicts: the sandbox row stores them as JSON and builds them again field by field.
    assert PodResources(**json.loads(json.dumps(asdict(pod)))) == pod
    assert log_fields(pod) == {
        "cpu_shares": 512,
        "cpu_quota": 50000,
        "cpu_period": 100000,
        "memory_limit_in_bytes": 256 * MiB,
        "cpuset_cpus": "0-1",
    }


def test_a_request_without_messages_records_none_of_them() -> None:
    assert pod_resources_of(_request()) == PodResources(resources=None, overhead=None)
    overhead_only = pod_resources_of(_request(overhead=pb.LinuxContainerResources(cpu_shares=25)))
    assert overhead_only.resources is None
    assert log_fields(overhead_only) == {"overhead_cpu_shares": 25}


@pytest.mark.parametrize(
    ("field", "fields"),
    [
        ("resources.cpu_shares", {"resources": pb.LinuxContainerResources(cpu_shares=-1)}),
        ("resources.cpu_quota", {"resources": pb.LinuxContainerResources(cpu_quota=-2)}),
        ("resources.cpu_period", {"resources": pb.LinuxContainerResources(cpu_period=10)}),
        ("resources.memory_limit_in_bytes", {"resources": pb.LinuxContainerResources(memory_limit_in_bytes=-1)}),
        ("resources.cpuset_mems", {"resources": pb.LinuxContainerResources(cpuset_mems="x")}),
        ("resources.unified", {"resources": pb.LinuxContainerResources(unified={"../x": "1"})}),
        ("overhead.memory_limit_in_bytes", {"overhead": pb.LinuxContainerResources(memory_limit_in_bytes=-5)}),
        (
            "resources.hugepage_limits[1].page_size",
            {
                "resources": pb.LinuxContainerResources(
                    hugepage_limits=[pb.HugepageLimit(page_size="2MB"), pb.HugepageLimit(page_size="2MB")]
                )
            },
        ),
    ],
)
def test_bad_values_are_invalid_argument_naming_the_field(
    field: str, fields: dict[str, pb.LinuxContainerResources]
) -> None:
    with pytest.raises(InvalidArgument) as err:
        pod_resources_of(_request(**fields))
    assert err.value.field == field
