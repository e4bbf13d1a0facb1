"""CDI names, spec files, the registry's override and conflict rules, and edits on an OCI spec (no root)."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from api.runtime.v1 import api_pb2 as pb
from cri.containers import cdi

NULL = os.stat("/dev/null").st_rdev
BAD_NAME = {"cdiVersion": "0.6.0", "kind": "v.com/c", "devices": [{"name": "-bad", "containerEdits": {"env": ["A=1"]}}]}


def spec_doc(kind: str = "vendor.com/gpu", version: str = "0.6.0", **devices: dict[str, Any]) -> dict[str, Any]:
    return {
        "cdiVersion": version,
        "kind": kind,
        "devices": [{"name": n, "containerEdits": e} for n, e in (devices or {"d0": {"env": ["A=1"]}}).items()],
    }


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc) if path.suffix == ".json" else yaml.safe_dump(doc))
    return path


def oci_spec() -> dict[str, Any]:
    return {
        "process": {"env": ["PATH=/bin", "A=image"], "user": {"uid": 0, "gid": 0}},
        "mounts": [{"destination": "/proc", "type": "proc", "source": "proc", "options": []}],
        "linux": {"resources": {"devices": [{"allow": False, "access": "rwm"}]}},
    }


# ---- names ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["nvidia.com/gpu=0", "vendor.example/class=all", "a/b=c:1", "example.com/net-dev=eth_0.1", "v/c.d=9x"],
)
def test_valid_names(name: str) -> None:
    vendor, klass, device = cdi.parse_name(name)
    assert f"{vendor}/{klass}={device}" == name


@pytest.mark.parametrize(
    "name", ["gpu0", "nvidia.com=gpu0", "nvidia.com/gpu", "nvidia.com/gpu=", "1vendor/gpu=0", "v/c=-x", "v/c=x-"]
)
def test_malformed_names(name: str) -> None:
    with pytest.raises(cdi.CdiError, match="invalid CDI"):
        cdi.parse_name(name)


def test_requested_from_field_and_annotations_once_each() -> None:
    config = pb.ContainerConfig(
        CDI_devices=[pb.CDIDevice(name="v.com/c=a"), pb.CDIDevice(name="v.com/c=b")],
        annotations={
            "cdi.k8s.io/z-plugin": "v.com/c=b, v.com/c=d,",
            "cdi.k8s.io/a-plugin": "v.com/c=e",
            "other/annotation": "v.com/c=x",
        },
    )
    found = [(r.name, r.field) for r in cdi.requested(config)]
    assert found == [
        ("v.com/c=a", "config.CDI_devices[0]"),
        ("v.com/c=b", "config.CDI_devices[1]"),
        ("v.com/c=e", "config.annotations[cdi.k8s.io/a-plugin]"),
        ("v.com/c=d", "config.annotations[cdi.k8s.io/z-plugin]"),
    ]
    assert cdi.requested(pb.ContainerConfig()) == []


# ---- spec files ----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("version", ["0.3.0", "0.5.0", "0.8.0", "1.0.0", "1.0.1"])
def test_spec_loads_from_json_and_yaml(tmp_path: Path, suffix: str, version: str) -> None:
    doc = spec_doc(version=version, d0={"env": ["A=1"], "deviceNodes": [{"path": "/dev/x", "permissions": "rw"}]})
    doc["containerEdits"] = {"mounts": [{"hostPath": "/h", "containerPath": "/c", "options": ["bind"]}]}
    spec = cdi.load_spec(write(tmp_path / f"s{suffix}", doc))
    assert spec.kind == "vendor.com/gpu" and spec.version == version
    assert spec.edits.mounts == (cdi.Mount("/h", "/c", ("bind",)),)
    assert spec.devices["d0"] == cdi.ContainerEdits(
        env=("A=1",), device_nodes=(cdi.DeviceNode("/dev/x", permissions="rw"),)
    )


@pytest.mark.parametrize(
    ("doc", "problem"),
    [
        (spec_doc(version="0.2.0"), "unsupported cdiVersion"),
        (spec_doc(version="1.1.0"), "unsupported cdiVersion"),
        (spec_doc(kind="gpu"), "invalid CDI kind"),
        (spec_doc(d0={}), "no container edits"),
        (BAD_NAME, "invalid device name"),
        (spec_doc(d0={"env": ["NOVALUE"]}), "expected KEY=VALUE"),
        (spec_doc(d0={"envs": ["A=1"]}), "unknown key 'envs'"),
        (spec_doc(d0={"deviceNodes": [{"path": "dev/x"}]}), "not absolute"),
        (spec_doc(d0={"deviceNodes": [{"path": "/dev/x", "type": "z"}]}), "unknown device type"),
        (spec_doc(d0={"deviceNodes": [{"path": "/dev/x", "permissions": "rwx"}]}), "subset of rwm"),
        (spec_doc(d0={"hooks": [{"hookName": "preStart", "path": "/bin/true"}]}), "unknown hook"),
        (spec_doc(d0={"mounts": [{"containerPath": "/c"}]}), "hostPath"),
        (spec_doc(version="0.4.0", d0={"deviceNodes": [{"path": "/d", "hostPath": "/h"}]}), "needs 0.5.0"),
        (spec_doc(version="0.6.0", d0={"additionalGids": [5]}), "needs 0.7.0"),
        (spec_doc(version="0.3.0", d0={"mounts": [{"hostPath": "/h", "containerPath": "/c", "type": "x"}]}), "0.4.0"),
        ({"cdiVersion": "0.6.0", "kind": "v.com/c", "devices": []}, "no devices"),
    ],
)
def test_bad_specs_are_refused_naming_the_file(tmp_path: Path, doc: dict[str, Any], problem: str) -> None:
    path = write(tmp_path / "bad.json", doc)
    with pytest.raises(cdi.CdiError, match=problem) as err:
        cdi.load_spec(path)
    assert str(path) in str(err.value)


def test_unparsable_file_is_refused_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("cdiVersion: [unclosed\n")
    with pytest.raises(cdi.CdiError, match=str(path)):
        cdi.load_spec(path)


# ---- the registry --------------------------------------------------------------------------------


def test_later_dir_overrides_earlier_and_one_dir_conflicts(tmp_path: Path) -> None:
    etc, run = tmp_path / "etc", tmp_path / "run"
    write(etc / "a.json", spec_doc(d0={"env": ["FROM=etc"]}, d1={"env": ["FROM=etc"]}))
    write(run / "b.yaml", spec_doc(d0={"env": ["FROM=run"]}))
    write(run / "c.json", spec_doc(d2={"env": ["X=1"]}))
    write(run / "d.json", spec_doc(d2={"env": ["X=2"]}))
    registry = cdi.scan([str(etc), str(run), str(tmp_path / "missing")])
    assert registry.resolve(["vendor.com/gpu=d0"]).env == ("FROM=run",)
    assert registry.resolve(["vendor.com/gpu=d1"]).env == ("FROM=etc",)
    with pytest.raises(cdi.CdiError, match="ambiguous") as err:
        registry.resolve(["vendor.com/gpu=d2"])
    assert str(run / "c.json") in str(err.value) and str(run / "d.json") in str(err.value)
    assert err.value.device == "vendor.com/gpu=d2"


def test_a_later_dir_settles_a_conflict_of_an_earlier_one(tmp_path: Path) -> None:
    write(tmp_path / "etc" / "a.json", spec_doc(d0={"env": ["X=1"]}))
    write(tmp_path / "etc" / "b.json", spec_doc(d0={"env": ["X=2"]}))
    write(tmp_path / "run" / "c.json", spec_doc(d0={"env": ["X=3"]}))
    registry = cdi.scan([str(tmp_path / "etc"), str(tmp_path / "run")])
    assert registry.resolve(["vendor.com/gpu=d0"]).env == ("X=3",)


def test_unknown_device_names_the_broken_files_that_may_define_it(tmp_path: Path) -> None:
    write(tmp_path / "good.json", spec_doc())
    write(tmp_path / "broken-same-kind.json", spec_doc(d9={"env": ["bad"]}))
    write(tmp_path / "broken-other-kind.json", spec_doc(kind="other.com/x", d9={"env": ["bad"]}))
    (tmp_path / "garbage.json").write_text("{")
    (tmp_path / "ignored.txt").write_text("{")
    registry = cdi.scan([str(tmp_path)])
    assert registry.resolve(["vendor.com/gpu=d0"]).env == ("A=1",)  # broken files do not stop good ones
    with pytest.raises(cdi.CdiError, match=re.escape("unknown CDI device 'vendor.com/gpu=d9'")) as err:
        registry.resolve(["vendor.com/gpu=d9"])
    message = str(err.value)
    assert "broken-same-kind.json" in message and "garbage.json" in message
    assert "broken-other-kind.json" not in message and "ignored.txt" not in message


def test_resolve_merges_spec_edits_once_then_each_device(tmp_path: Path) -> None:
    doc = spec_doc(
        d0={"env": ["D=0"]}, d1={"env": ["D=1"], "deviceNodes": [{"path": "/dev/n", "hostPath": "/dev/null"}]}
    )
    doc["containerEdits"] = {"env": ["SPEC=gpu"], "additionalGids": [7]}
    doc["cdiVersion"] = "0.7.0"
    write(tmp_path / "gpu.json", doc)
    write(tmp_path / "net.yaml", spec_doc(kind="vendor.com/net", n0={"env": ["N=0"]}))
    edits = cdi.scan([str(tmp_path)]).resolve(["vendor.com/gpu=d1", "vendor.com/net=n0", "vendor.com/gpu=d0"])
    assert edits.env == ("SPEC=gpu", "D=1", "N=0", "D=0")
    assert edits.additional_gids == (7,)
    # The device node was completed from the host.
    (node,) = edits.device_nodes
    assert (node.type, node.major, node.minor) == ("c", os.major(NULL), os.minor(NULL))
    assert node.file_mode == 0o666


def test_missing_host_device_names_the_device_and_spec(tmp_path: Path) -> None:
    path = write(tmp_path / "gpu.json", spec_doc(d0={"deviceNodes": [{"path": str(tmp_path / "nope")}]}))
    with pytest.raises(cdi.CdiError, match="No such file") as err:
        cdi.scan([str(tmp_path)]).resolve(["vendor.com/gpu=d0"])
    assert "vendor.com/gpu=d0" in str(err.value) and str(path) in str(err.value)


def test_intel_rdt_refused_without_resctrl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cdi, "_RESCTRL", str(tmp_path / "resctrl"))
    write(tmp_path / "cdi" / "r.json", spec_doc(version="0.7.0", d0={"intelRdt": {"closID": "c1"}}))
    with pytest.raises(cdi.CdiError, match="resctrl"):
        cdi.scan([str(tmp_path / "cdi")]).resolve(["vendor.com/gpu=d0"])


# ---- edits on an OCI spec ------------------------------------------------------------------------


def test_apply_env_overrides_by_key_and_appends() -> None:
    spec = oci_spec()
    cdi.apply(spec, cdi.ContainerEdits(env=("A=cdi", "B=1", "B=2")))
    assert spec["process"]["env"] == ["PATH=/bin", "A=cdi", "B=2"]


def test_apply_device_nodes_replace_by_path_and_allow_in_the_cgroup() -> None:
    spec = oci_spec()
    spec["process"]["user"] = {"uid": 1000, "gid": 1001}
    spec["linux"]["devices"] = [{"path": "/dev/x", "type": "c", "major": 9, "minor": 9}]
    nodes = (
        cdi.DeviceNode("/dev/x", type="c", major=1, minor=3, file_mode=0o666),
        cdi.DeviceNode("/dev/y", type="b", major=8, minor=0, permissions="r", uid=0, gid=0),
        cdi.DeviceNode("/dev/p", type="p"),
    )
    cdi.apply(spec, cdi.ContainerEdits(device_nodes=nodes))
    assert spec["linux"]["devices"] == [
        {"path": "/dev/x", "type": "c", "major": 1, "minor": 3, "fileMode": 0o666, "uid": 1000, "gid": 1001},
        {"path": "/dev/y", "type": "b", "major": 8, "minor": 0, "uid": 0, "gid": 0},
        {"path": "/dev/p", "type": "p", "major": 0, "minor": 0, "uid": 1000, "gid": 1001},
    ]
    assert spec["linux"]["resources"]["devices"][1:] == [
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
        {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "r"},
    ]


def test_apply_mounts_replace_by_destination_parents_first() -> None:
    spec = oci_spec()
    spec["mounts"].append({"destination": "/data/sub", "type": "bind", "source": "/old", "options": []})
    mounts = (
        cdi.Mount("/host/sub", "/data/sub", ("rbind", "ro")),
        cdi.Mount("/host", "/data", ("rbind",)),
        cdi.Mount("tmpfs", "/scratch", ("nosuid",), type="tmpfs"),
    )
    cdi.apply(spec, cdi.ContainerEdits(mounts=mounts))
    assert [(m["destination"], m["source"], m.get("type")) for m in spec["mounts"]] == [
        ("/proc", "proc", "proc"),
        ("/data", "/host", "bind"),
        ("/scratch", "tmpfs", "tmpfs"),
        ("/data/sub", "/host/sub", "bind"),
    ]


def test_apply_hooks_gids_and_intel_rdt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = oci_spec()
    spec["process"]["user"]["additionalGids"] = [5]
    hooks = (
        cdi.Hook("createRuntime", "/bin/hook", ("hook", "a"), ("K=V",), 5),
        cdi.Hook("poststop", "/bin/other"),
        cdi.Hook("createRuntime", "/bin/second"),
    )
    rdt = cdi.IntelRdt(clos_id="c1", mem_bw_schema="MB:0=50")
    cdi.apply(spec, cdi.ContainerEdits(hooks=hooks, additional_gids=(0, 5, 6, 6), intel_rdt=rdt))
    assert spec["hooks"] == {
        "createRuntime": [
            {"path": "/bin/hook", "args": ["hook", "a"], "env": ["K=V"], "timeout": 5},
            {"path": "/bin/second"},
        ],
        "poststop": [{"path": "/bin/other"}],
    }
    assert spec["process"]["user"]["additionalGids"] == [5, 6]
    assert spec["linux"]["intelRdt"] == {
        "closID": "c1",
        "memBwSchema": "MB:0=50",
        "enableCMT": False,
        "enableMBM": False,
    }
