"""The checked-in stubs are exactly what `make proto` generates from api.proto."""

from __future__ import annotations

import shutil
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[2]
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def test_stubs_match_the_proto(tmp_path):
    (tmp_path / "api/runtime/v1").mkdir(parents=True)
    shutil.copy(REPO / "api/runtime/v1/api.proto", tmp_path / "api/runtime/v1/api.proto")
    status = protoc.main(
        [
            "protoc",
            f"-I{tmp_path}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            str(tmp_path / "api/runtime/v1/api.proto"),
        ]
    )
    assert status == 0
    for name in GENERATED:
        fresh = (tmp_path / "api/runtime/v1" / name).read_text()
        assert fresh == (REPO / "api/runtime/v1" / name).read_text(), f"{name} is stale: run `make proto`"
