"""Every stored record survives a write and a read of its row, field for field, and old rows still load."""

from __future__ import annotations

import dataclasses
import itertools
import json
import types
import typing
from collections.abc import Callable
from enum import Enum
from typing import Any

import pytest
from google.protobuf.message import Message

from api.runtime.v1 import api_pb2 as pb
from cri.containers import container as container_rows
from cri.containers.container import Container, ContainerState
from cri.images.index import ImageIndex, ImageRecord, LayerRef
from cri.state import Store, records
from podsandbox import sandbox as sandbox_rows
from podsandbox.sandbox import Sandbox, SandboxState
from podsandbox.spec import DnsConfig, Metadata, NamespaceMode, PortMapping, SandboxSpec

# Protobuf messages a record holds, each with every field it cares about set.
CONFIG = pb.ContainerConfig(
    metadata=pb.ContainerMetadata(name="web", attempt=2),
    image=pb.ImageSpec(image="busybox"),
    command=["sh"],
    labels={"app": "web"},
)
RESOURCES = pb.LinuxContainerResources(cpu_shares=512, memory_limit_in_bytes=64 << 20)
PROTO_SAMPLES: dict[type[Message], Message] = {pb.ContainerConfig: CONFIG, pb.LinuxContainerResources: RESOURCES}


# Distinct values for every field, so that two fields swapped by a reader cannot go unnoticed.
_NUMBERS = itertools.count(7)
SIMPLE_SAMPLES: dict[Any, Callable[[str], Any]] = {
    str: lambda name: f"{name}-value",
    bool: lambda name: True,
    int: lambda name: next(_NUMBERS),
    float: lambda name: next(_NUMBERS) + 0.5,
    bytes: lambda name: b"\x00\xff" + name.encode(),
}


def _sample(tp: Any, name: str, default: Any) -> Any:
    """A value of type `tp` that is not `default` (the field's default, or MISSING)."""
    if tp in SIMPLE_SAMPLES:
        return SIMPLE_SAMPLES[tp](name)
    if tp is Any:
        return {"any": [1, "two", None, {"three": 3.0}]}
    if isinstance(tp, type) and issubclass(tp, Enum):
        return next(member for member in reversed(list(tp)) if member != default)
    if isinstance(tp, type) and issubclass(tp, Message):
        return PROTO_SAMPLES[tp]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return filled(tp)
    return _sample_generic(tp, name)


def _sample_generic(tp: Any, name: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return _sample(next(arg for arg in args if arg is not type(None)), name, None)
    if origin in (tuple, list):
        return origin((_sample(args[0], name, None), _sample(args[0], name + "2", None)))
    if origin is dict:
        return {f"{name}-key": _sample(args[1], name, None)}
    if typing.is_typeddict(tp):
        return {key: _sample(hint, key, None) for key, hint in typing.get_type_hints(tp).items()}
    raise AssertionError(f"no sample for {name}: {tp!r}; teach _sample the type")


def filled(cls: type[Any], **overrides: Any) -> Any:
    """An instance of the dataclass `cls` with every compared field set to a value other than its default."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init or not f.compare:
            continue
        if f.name in overrides:
            values[f.name] = overrides[f.name]
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        values[f.name] = _sample(hints[f.name], f.name, default)
    return cls(**values)


def assert_nothing_default(record: Any) -> None:
    for f in dataclasses.fields(record):
        if not f.compare:
            continue
        value = getattr(record, f.name)
        if f.default is not dataclasses.MISSING:
            assert value != f.default, f"{type(record).__name__}.{f.name} left at its default: not tested"
        elif f.default_factory is not dataclasses.MISSING:
            assert value != f.default_factory(), f"{type(record).__name__}.{f.name} left at its default"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            assert_nothing_default(value)


@pytest.fixture
def store(tmp_path):
    store = Store.open(str(tmp_path))
    yield store
    store.close()


def full_sandbox() -> Sandbox:
    sandbox: Sandbox = filled(Sandbox, id="a" * 64, state=SandboxState.NOTREADY)
    assert_nothing_default(sandbox)
    return sandbox


def full_container(sandbox_id: str) -> Container:
    record: Container = filled(Container, id="b" * 64, sandbox_id=sandbox_id, state=ContainerState.EXITED)
    assert_nothing_default(record)
    return record


def full_image() -> ImageRecord:
    record: ImageRecord = filled(
        ImageRecord,
        id="sha256:" + "c" * 64,
        repo_tags=["docker.io/library/busybox:1"],
        repo_digests=["docker.io/library/busybox@sha256:" + "d" * 64],
    )
    assert_nothing_default(record)
    return record


def test_a_sandbox_row_keeps_every_field(store):
    sandbox = full_sandbox()
    with store.transaction() as conn:
        sandbox_rows.insert(conn, sandbox)
    with store.transaction() as conn:
        assert sandbox_rows.load_all(conn) == [sandbox]


def test_an_updated_sandbox_row_keeps_every_field(store):
    sandbox = filled(Sandbox, id="a" * 64, state=SandboxState.READY, spec=full_sandbox().spec)
    with store.transaction() as conn:
        sandbox_rows.insert(conn, sandbox)
    # update() writes the state and the data; the other columns are fixed at insert.
    fixed = {name: getattr(sandbox, name) for name in ("id", "created_at", "config_blob")}
    changed = dataclasses.replace(full_sandbox(), **fixed)
    with store.transaction() as conn:
        sandbox_rows.update(conn, changed)
    with store.transaction() as conn:
        assert sandbox_rows.load_all(conn) == [changed]


def test_a_container_row_keeps_every_field(store):
    sandbox = full_sandbox()
    record = full_container(sandbox.id)
    with store.transaction() as conn:
        sandbox_rows.insert(conn, sandbox)
        container_rows.insert(conn, record, "pod/web_2")
    with store.transaction() as conn:
        assert container_rows.load_all(conn) == [record]
    record.pid, record.state, record.exit_code = 0, ContainerState.RUNNING, 137
    with store.transaction() as conn:
        container_rows.update(conn, record)
    with store.transaction() as conn:
        assert container_rows.load_all(conn) == [record]


def test_an_image_row_keeps_every_field(store):
    record = full_image()
    names = [(n, "tag") for n in record.repo_tags] + [(n, "digest") for n in record.repo_digests]
    ImageIndex(store).put(record, names)
    index = ImageIndex(store)
    index.load()
    assert index.all() == [record]


# ---- rows as the code before the shared codec wrote them ---------------------------------------------

OLD_SPEC: dict[str, Any] = {
    "metadata": {"name": "web", "uid": "u1", "namespace": "default", "attempt": 1},
    "hostname": "web-0",
    "log_directory": "/var/log/pods/default_web_u1",
    "dns": {"servers": ["10.96.0.10"], "searches": ["svc.cluster.local"], "options": ["ndots:5"]},
    "port_mappings": [{"protocol": "tcp", "container_port": 80, "host_port": 8080, "host_ip": ""}],
    "labels": {"app": "web"},
    "annotations": {},
    "cgroup_parent": "/kubepods/pod-u1",
    "network_mode": "POD",
    "pid_mode": "POD",
    "ipc_mode": "POD",
    "sysctls": {},
    "runtime_handler": "runc",
    # no "privileged": rows older than that field
}
OLD_SANDBOX_DATA: dict[str, Any] = {
    "spec": OLD_SPEC,
    "dir": "/run/criopy/sandboxes/" + "a" * 64,
    "pins": {"net": "/run/criopy/ns/net/" + "a" * 64},
    "shm": "/run/criopy/sandboxes/" + "a" * 64 + "/shm",
    "cgroup_parent": "/kubepods/pod-u1",
    "network": "criopy",
    "ips": ["10.85.0.4"],
    "cni_result": {"cniVersion": "1.0.0", "ips": [{"address": "10.85.0.4/16"}]},
    "infra_pid": 4242,
}
OLD_CONTAINER_DATA: dict[str, Any] = {
    "image_ref": "docker.io/library/busybox@sha256:" + "d" * 64,
    "image_name": "busybox",
    "runtime": "runc",
    "bundle": "/run/criopy/containers/" + "b" * 64,
    "storage": "/var/lib/criopy/containers/" + "b" * 64,
    "log_path": "/var/log/pods/default_web_u1/web/0.log",
    "cgroups_path": "/kubepods/pod-u1/" + "b" * 64,
    "stop_signal": "SIGTERM",
    "uid": 1000,
    "gid": 1000,
    "additional_gids": [10, 20],
    "username": "",
    "pid": 5151,
    "conmon_pid": 5150,
    "started_at": 1_700_000_001_000_000_000,
    "finished_at": 0,
    "exit_code": 0,
    "reason": "",
    "message": "",
    "resources": RESOURCES.SerializeToString().hex(),
}
OLD_IMAGE_DATA: dict[str, Any] = {
    "manifest_digest": "sha256:" + "d" * 64,
    "manifest_media_type": "application/vnd.oci.image.manifest.v1+json",
    "layers": [
        {
            "digest": "sha256:" + "e" * 64,
            "media_type": "application/vnd.oci.image.layer.v1.tar+gzip",
            "size": 1024,
            "diff_id": "sha256:" + "f" * 64,
            "chain_id": "sha256:" + "f" * 64,
        }
    ],
    "config": {"config": {"User": "1000"}},
    "annotations": {},
    "pinned": False,
    "blobs": ["sha256:" + "d" * 64, "sha256:" + "e" * 64],
}


def test_rows_written_by_the_previous_code_load(store):
    config = CONFIG.SerializeToString()
    with store.transaction() as conn:
        conn.execute(
            "INSERT INTO sandboxes(id, name, namespace, uid, attempt, state, runtime_handler, created_at, config, data)"
            " VALUES (?, 'web', 'default', 'u1', 1, 'ready', 'runc', 1700000000000000000, x'0a00', ?)",
            ("a" * 64, json.dumps(OLD_SANDBOX_DATA)),
        )
        conn.execute(
            "INSERT INTO containers(id, sandbox_id, name, attempt, state, image_id, created_at, config, data)"
            " VALUES (?, ?, 'web', 2, 'running', ?, 1700000000500000000, ?, ?)",
            ("b" * 64, "a" * 64, "sha256:" + "c" * 64, config, json.dumps(OLD_CONTAINER_DATA)),
        )
        conn.execute(
            "INSERT INTO images(id, size, created_at, data) VALUES (?, 2048, 1699999999000000000, ?)",
            ("sha256:" + "c" * 64, json.dumps(OLD_IMAGE_DATA)),
        )
        conn.execute(
            "INSERT INTO image_names(name, image_id, kind) VALUES ('docker.io/library/busybox:1', ?, 'tag')",
            ("sha256:" + "c" * 64,),
        )
        [sandbox] = sandbox_rows.load_all(conn)
        [record] = container_rows.load_all(conn)
    assert sandbox == Sandbox(
        id="a" * 64,
        spec=SandboxSpec(
            metadata=Metadata(name="web", uid="u1", namespace="default", attempt=1),
            hostname="web-0",
            log_directory="/var/log/pods/default_web_u1",
            dns=DnsConfig(("10.96.0.10",), ("svc.cluster.local",), ("ndots:5",)),
            port_mappings=(PortMapping("tcp", 80, 8080),),
            labels={"app": "web"},
            cgroup_parent="/kubepods/pod-u1",
            pid_mode=NamespaceMode.POD,
            runtime_handler="runc",
            privileged=False,
        ),
        created_at=1_700_000_000_000_000_000,
        state=SandboxState.READY,
        dir=OLD_SANDBOX_DATA["dir"],
        pins={"net": "/run/criopy/ns/net/" + "a" * 64},
        shm=OLD_SANDBOX_DATA["shm"],
        cgroup_parent="/kubepods/pod-u1",
        network="criopy",
        ips=("10.85.0.4",),
        cni_result=OLD_SANDBOX_DATA["cni_result"],
        infra_pid=4242,
        config_blob=b"\x0a\x00",
    )
    assert record == Container(
        id="b" * 64,
        sandbox_id="a" * 64,
        config=CONFIG,
        image_id="sha256:" + "c" * 64,
        created_at=1_700_000_000_500_000_000,
        state=ContainerState.RUNNING,
        **{k: v for k, v in OLD_CONTAINER_DATA.items() if k not in ("additional_gids", "resources")},
        additional_gids=(10, 20),
        resources=RESOURCES,
    )
    index = ImageIndex(store)
    index.load()
    assert index.all() == [
        ImageRecord(
            id="sha256:" + "c" * 64,
            repo_tags=["docker.io/library/busybox:1"],
            repo_digests=[],
            size=2048,
            created_at=1_699_999_999_000_000_000,
            manifest_digest="sha256:" + "d" * 64,
            manifest_media_type="application/vnd.oci.image.manifest.v1+json",
            layers=[LayerRef(**OLD_IMAGE_DATA["layers"][0])],
            config={"config": {"User": "1000"}},
            blobs=["sha256:" + "d" * 64, "sha256:" + "e" * 64],
        )
    ]


# ---- the codec itself ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Limits:
    cpu_shares: int = 0
    unified: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class GrownSandbox(Sandbox):
    """A Sandbox with a field added at the end, as a later change would add one."""

    limits: Limits | None = None


def test_a_field_added_to_a_record_is_stored_with_no_other_edit():
    row = records.Row(GrownSandbox, columns=("id", "state", "created_at", "config_blob"))
    grown = GrownSandbox(**vars(full_sandbox()), limits=Limits(512, {"memory.high": "max"}))
    columns = {name: getattr(grown, name) for name in row.columns}
    assert row.load(row.dump(grown), **columns) == grown
    # A row written before the field existed takes its default.
    old_data = json.dumps({k: v for k, v in json.loads(row.dump(grown)).items() if k != "limits"})
    assert row.load(old_data, **columns) == dataclasses.replace(grown, limits=None)


def test_keys_no_field_claims_are_ignored_and_missing_required_ones_named():
    row = records.Row(Metadata, columns=("uid",))
    assert row.load('{"name": "web", "namespace": "ns", "gone": 1}', uid="u") == Metadata("web", "u", "ns")
    with pytest.raises(records.RecordError, match="missing namespace"):
        row.load('{"name": "web"}', uid="u")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ('{"name": "web", "namespace": "ns", "attempt": "1"}', "Metadata.attempt: expected"),
        ('{"name": "web", "namespace": "ns", "attempt": true}', "Metadata.attempt: expected int"),
        ('{"name": 3, "namespace": "ns"}', "Metadata.name: expected"),
        ("[1, 2]", "Metadata: expected an object"),
        ("{", "not JSON"),
    ],
)
def test_a_value_of_the_wrong_type_is_refused_with_its_field(data, message):
    with pytest.raises(records.RecordError, match=message):
        records.Row(Metadata, columns=("uid",)).load(data, uid="u")


def test_a_bad_enum_or_hex_value_is_refused_with_its_field():
    with pytest.raises(records.RecordError, match=r"pid_mode: 'SHARED' is not a NamespaceMode"):
        records.decode(SandboxSpec, {"metadata": {"name": "a", "uid": "b", "namespace": "c"}, "pid_mode": "SHARED"})
    with pytest.raises(records.RecordError, match="not hex"):
        records.decode(bytes, "zz")


def test_a_value_with_no_stored_form_fails_at_write_naming_the_field():
    @dataclasses.dataclass
    class Odd:
        when: object

    with pytest.raises(TypeError, match=r"Odd.when: a set has no stored form"):
        records.Row(Odd, columns=()).dump(Odd({1}))


def test_columns_must_be_fields_and_be_given_at_load():
    with pytest.raises(TypeError, match="no stored fields"):
        records.Row(Metadata, columns=("nope",))
    with pytest.raises(TypeError, match="expected"):
        records.Row(Metadata, columns=("uid",)).load("{}")


def test_transient_fields_are_not_stored():
    record = full_container("a" * 64)
    record.live.runtime_deleted = True
    assert "live" not in json.loads(records.Row(Container, columns=()).dump(record))
