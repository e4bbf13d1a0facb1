"""CDI devices through the daemon's socket (root, real runc/conmon).

The devices are fakes backed by real character devices: nodes made with
mknod in the test's tmp dir with /dev/null's and /dev/zero's numbers. The CDI
spec dirs are two tmp dirs given in the daemon's config; one spec is JSON,
one YAML, and a createRuntime hook appends runc's state (which holds the
container ID) to a marker file on the host.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import Env, running_env
from tests.support.registry_harness import Registry
from tests.support.system import CGROUP_ROOT

Pod = tuple[str, pb.PodSandboxConfig]

# What a container prints: the device nodes as ls sees them, bytes read from each, the CDI env, the mount.
SCRIPT = (
    "ls -ln /dev/fake-null /dev/fake-zero; "
    "echo zero=$(head -c 3 /dev/fake-zero | od -An -tx1 | tr -d ' '); "
    "echo null=$(cat /dev/fake-null | wc -c); "
    "echo env=$FAKE_SPEC,$FAKE_DEVICE; "
    "cat /cdi-share/hello"
)


class Host:
    """The host side of the test: fake devices, a shared dir, the hook's marker, the two spec dirs."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.etc, self.run = base / "etc-cdi", base / "run-cdi"
        self.dev, self.share, self.marker = base / "dev", base / "share", base / "hook-ran"
        for d in (self.etc, self.run, self.dev, self.share):
            d.mkdir()
        for name, source in (("null", "/dev/null"), ("zero", "/dev/zero")):
            rdev = os.stat(source).st_rdev
            os.mknod(self.dev / name, 0o666 | stat.S_IFCHR, rdev)
        (self.share / "hello").write_text("hello from the cdi mount\n")

    def config_yaml(self) -> str:
        return f"runtime:\n  cdi_spec_dirs: [{self.etc}, {self.run}]\n"

    def write_specs(self) -> None:
        hook = {
            "hookName": "createRuntime",
            "path": "/bin/sh",
            "args": ["sh", "-c", f"cat >> {self.marker}; echo >> {self.marker}"],
            "env": ["PATH=/usr/bin:/bin"],
        }
        fake = {
            "cdiVersion": "0.6.0",
            "kind": "vendor.example/fake",
            "containerEdits": {"env": ["FAKE_SPEC=json"], "hooks": [hook]},
            "devices": [
                {
                    "name": "null0",
                    "containerEdits": {
                        "deviceNodes": [{"path": "/dev/fake-null", "hostPath": str(self.dev / "null")}],
                        "env": ["FAKE_DEVICE=null0"],
                        "mounts": [
                            {"hostPath": str(self.share), "containerPath": "/cdi-share", "options": ["rbind", "ro"]}
                        ],
                    },
                }
            ],
        }
        node: dict[str, Any] = {"path": "/dev/fake-zero", "hostPath": str(self.dev / "zero"), "type": "c"}
        node |= {"major": os.major(os.stat("/dev/zero").st_rdev), "minor": os.minor(os.stat("/dev/zero").st_rdev)}
        other = {
            "cdiVersion": "1.0.0",
            "kind": "vendor.example/other",
            "devices": [{"name": "zero0", "containerEdits": {"deviceNodes": [node], "env": ["FAKE_DEVICE=zero0"]}}],
        }
        (self.etc / "fake.json").write_text(json.dumps(fake))
        (self.run / "other.yaml").write_text(yaml.safe_dump(other))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    made = Host(tmp_path)
    yield made
    for node in made.dev.iterdir():  # pytest keeps old tmp dirs: leave no device node behind
        node.unlink()


@pytest.fixture
def env(make_daemon, registry: Registry, busybox: str, host: Host) -> Iterator[Env]:
    with running_env(make_daemon, registry, [busybox], host.config_yaml()) as env:
        yield env


def devices(*names: str) -> list[pb.CDIDevice]:
    return [pb.CDIDevice(name=n) for n in names]


def refused(env: Env, pod: Pod, config: pb.ContainerConfig) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        env.create(pod, config)
    return err.value


def check_output(output: str, major_minor: dict[str, tuple[int, int]]) -> None:
    for name, (major, minor) in major_minor.items():
        assert re.search(rf"^c\S+\s.*\b{major},\s+{minor}\b.*/dev/{name}$", output, re.M), output
    assert "zero=000000" in output, output
    assert "null=0" in output, output
    assert "env=json,zero0" in output, output  # the spec's variable over the config's; the last device's wins
    assert "hello from the cdi mount" in output, output


def test_cdi_devices_by_field_and_by_annotation(env: Env, host: Host) -> None:
    host.write_specs()
    pod = env.pod()
    wanted = ["vendor.example/fake=null0", "vendor.example/other=zero0"]
    by_field = env.container_config(
        "by-field",
        ["sh", "-c", SCRIPT],
        CDI_devices=devices(*wanted),
        envs=[pb.KeyValue(key="FAKE_SPEC", value="config")],
    )
    by_annotation = env.container_config(
        "by-annotation", ["sh", "-c", SCRIPT], annotations={"cdi.k8s.io/test-plugin": ",".join(wanted)}
    )
    ids = [env.run(pod, by_field), env.run(pod, by_annotation)]
    numbers = {
        "fake-null": (os.major(os.stat("/dev/null").st_rdev), os.minor(os.stat("/dev/null").st_rdev)),
        "fake-zero": (os.major(os.stat("/dev/zero").st_rdev), os.minor(os.stat("/dev/zero").st_rdev)),
    }
    for cid, name in zip(ids, ("by-field", "by-annotation"), strict=True):
        status = env.wait_exited(cid)
        assert status.exit_code == 0, env.output(pod, name)
        check_output(env.output(pod, name), numbers)
    # The createRuntime hook ran once per container, on the host, with runc's state on its stdin.
    marker = host.marker.read_text()
    for cid in ids:
        assert cid in marker, marker


def test_spec_file_written_while_the_daemon_runs_is_used(env: Env, host: Host) -> None:
    pod = env.pod()
    device = {"name": "x", "containerEdits": {"env": ["LATE=yes"]}}
    late = {"cdiVersion": "0.3.0", "kind": "vendor.example/late", "devices": [device]}
    (host.run / "late.json").write_text(json.dumps(late))
    cid = env.run(
        pod, env.container_config("late", ["sh", "-c", "echo late=$LATE"], CDI_devices=devices("vendor.example/late=x"))
    )
    assert env.wait_exited(cid).exit_code == 0
    assert "late=yes" in env.output(pod, "late")


def test_unresolvable_devices_are_refused_with_nothing_created(env: Env, host: Host) -> None:
    host.write_specs()
    broken = host.etc / "broken.json"
    broken.write_text(json.dumps({"cdiVersion": "0.6.0", "kind": "vendor.example/broken", "devices": "b0"}))
    dup = {
        "cdiVersion": "0.6.0",
        "kind": "vendor.example/dup",
        "devices": [{"name": "d0", "containerEdits": {"env": ["A=1"]}}],
    }
    (host.run / "dup-a.json").write_text(json.dumps(dup))
    (host.run / "dup-b.yaml").write_text(yaml.safe_dump(dup))
    pod = env.pod()
    before = env.leftovers()
    cases = [
        ("unknown", devices("vendor.example/fake=nope"), {}, ["config.CDI_devices[0]", "vendor.example/fake=nope"]),
        ("malformed-field", devices("gpu0"), {}, ["config.CDI_devices[0]", "gpu0"]),
        ("malformed", [], {"cdi.k8s.io/x": "not-a-cdi-name"}, ["config.annotations[cdi.k8s.io/x]", "not-a-cdi-name"]),
        (
            "broken",
            devices("vendor.example/fake=null0", "vendor.example/broken=b0"),
            {},
            ["config.CDI_devices[1]", str(broken)],
        ),
        ("ambiguous", devices("vendor.example/dup=d0"), {}, ["vendor.example/dup=d0", "dup-a.json", "dup-b.yaml"]),
    ]
    for name, cdi_devices, notes, expected in cases:
        config = env.container_config(name, ["true"], CDI_devices=cdi_devices, annotations=notes)
        err = refused(env, pod, config)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err)
        for text in expected:
            assert text in err.details(), (name, text, err.details())
        assert env.leftovers() == before, name
    # A broken or ambiguous file elsewhere does not stop a good device from being used.
    cid = env.run(pod, env.container_config("good", ["true"], CDI_devices=devices("vendor.example/other=zero0")))
    assert env.wait_exited(cid).exit_code == 0


def _device_rules(parent: str, cid: str) -> list[str]:
    """The container's device cgroup allow list (cgroup v1; v2 keeps it in a BPF program, not readable)."""
    listed = CGROUP_ROOT / "devices" / parent.strip("/") / f"criopy-{cid}" / "devices.list"
    return listed.read_text().split("\n")


def test_the_device_cgroup_allows_the_cdi_devices_of_the_container_and_no_other(env: Env, host: Host) -> None:
    if not (CGROUP_ROOT / "devices" / "devices.list").exists():
        pytest.skip("no cgroup v1 devices controller: v2 enforces device rules in BPF, with no list to read")
    # /dev/kmsg's numbers (1:11): a device runc's default rules do not allow, unlike null and zero.
    kmsg = os.stat("/dev/kmsg").st_rdev
    os.mknod(host.dev / "kmsg", 0o600 | stat.S_IFCHR, kmsg)
    node = {"path": "/dev/fake-kmsg", "hostPath": str(host.dev / "kmsg"), "permissions": "r"}
    spec = {
        "cdiVersion": "0.6.0",
        "kind": "vendor.example/kmsg",
        "devices": [{"name": "k0", "containerEdits": {"deviceNodes": [node]}}],
    }
    (host.etc / "kmsg.json").write_text(json.dumps(spec))
    pod = env.pod()
    parent = pod[1].linux.cgroup_parent
    sleeper = ["sleep", "3600"]
    asked = env.run(pod, env.container_config("asked", sleeper, CDI_devices=devices("vendor.example/kmsg=k0")))
    other = env.run(pod, env.container_config("other", sleeper))
    rule = f"c {os.major(kmsg)}:{os.minor(kmsg)} r"
    assert rule in _device_rules(parent, asked)
    assert not any(line.startswith(f"c {os.major(kmsg)}:{os.minor(kmsg)} ") for line in _device_rules(parent, other))
