"""Our runtime.v1 against an independent published copy of the CRI descriptor.

The copy ships in PyPI's container-runtime-interface-api (installed as a test
dependency). Its module is never imported, since two runtime.v1 files cannot share
protobuf's default pool: the serialized FileDescriptorProto is read from its
source. Every message, field, enum value and RPC of that copy must exist
identically in ours; ours may add newer ones.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from api.runtime.v1 import api_pb2


def _published_descriptor() -> descriptor_pb2.FileDescriptorProto:
    spec = importlib.util.find_spec("cri_api")
    if spec is None or spec.origin is None:
        pytest.fail("container-runtime-interface-api is not installed: run `make test`")
    source = Path(spec.origin).parent / "v1" / "api_pb2.py"
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "AddSerializedFile":
            (arg,) = node.args
            assert isinstance(arg, ast.Constant)
            assert isinstance(arg.value, bytes)
            return descriptor_pb2.FileDescriptorProto.FromString(arg.value)
    raise AssertionError(f"no serialized descriptor in {source}")


def _ours() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto()
    api_pb2.DESCRIPTOR.CopyToProto(proto)
    return proto


def _messages(file: descriptor_pb2.FileDescriptorProto) -> dict[str, descriptor_pb2.DescriptorProto]:
    out: dict[str, descriptor_pb2.DescriptorProto] = {}

    def walk(prefix: str, message: descriptor_pb2.DescriptorProto) -> None:
        name = f"{prefix}.{message.name}"
        out[name] = message
        for nested in message.nested_type:
            walk(name, nested)

    for message in file.message_type:
        walk(f".{file.package}", message)
    return out


def _enums(file: descriptor_pb2.FileDescriptorProto) -> dict[str, dict[str, int]]:
    out = {f".{file.package}.{e.name}": {v.name: v.number for v in e.value} for e in file.enum_type}
    for name, message in _messages(file).items():
        for e in message.enum_type:
            out[f"{name}.{e.name}"] = {v.name: v.number for v in e.value}
    return out


def _field_shape(message: descriptor_pb2.DescriptorProto, f: descriptor_pb2.FieldDescriptorProto) -> tuple[object, ...]:
    oneof = message.oneof_decl[f.oneof_index].name if f.HasField("oneof_index") else None
    return (f.number, f.type, f.label, f.type_name, oneof)


OURS = _ours()


@pytest.fixture(scope="module")
def published() -> descriptor_pb2.FileDescriptorProto:
    return _published_descriptor()


def test_same_package(published):
    assert published.package == OURS.package == "runtime.v1"


def test_every_published_field_exists_identically(published):
    ours = _messages(OURS)
    differences = []
    for name, message in _messages(published).items():
        if name not in ours:
            differences.append(f"message {name} missing")
            continue
        our_fields = {f.name: _field_shape(ours[name], f) for f in ours[name].field}
        for f in message.field:
            theirs = _field_shape(message, f)
            if our_fields.get(f.name) != theirs:
                differences.append(f"{name}.{f.name}: published {theirs}, ours {our_fields.get(f.name)}")
    assert differences == []
    assert len(_messages(published)) > 150


def test_every_published_enum_value_exists_identically(published):
    ours = _enums(OURS)
    for name, values in _enums(published).items():
        assert name in ours, name
        for value, number in values.items():
            assert ours[name].get(value) == number, f"{name}.{value}"


def test_every_published_rpc_exists_identically(published):
    ours = {s.name: {m.name: m for m in s.method} for s in OURS.service}
    for service in published.service:
        for method in service.method:
            mine = ours[service.name][method.name]
            assert (mine.input_type, mine.output_type, mine.client_streaming, mine.server_streaming) == (
                method.input_type,
                method.output_type,
                method.client_streaming,
                method.server_streaming,
            ), f"{service.name}/{method.name}"


def test_newer_rpcs_of_cri_api_are_declared():
    runtime = {m.name: m for s in OURS.service if s.name == "RuntimeService" for m in s.method}
    images = {m.name: m for s in OURS.service if s.name == "ImageService" for m in s.method}
    for name in (
        "StreamPodSandboxes",
        "StreamContainers",
        "StreamContainerStats",
        "StreamPodSandboxStats",
        "StreamPodSandboxMetrics",
        "GetContainerEvents",
    ):
        assert runtime[name].server_streaming, name
    assert images["StreamImages"].server_streaming
    assert not runtime["UpdatePodSandboxResources"].server_streaming
