"""The sdist and wheel the standard build front end makes: what an installed criopy and deploy/install.sh need."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_python_m_build_makes_a_wheel_with_the_api_and_an_sdist_with_the_installer(tmp_path: Path) -> None:
    # --no-isolation: the venv's setuptools, so the test reaches no package index.
    subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(tmp_path), str(REPO)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("criopy-*-py3-none-any.whl")
    (sdist,) = tmp_path.glob("criopy-*.tar.gz")

    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "api/runtime/v1/api.proto",
        "api/runtime/v1/api_pb2.py",
        "api/runtime/v1/api_pb2.pyi",
        "api/runtime/v1/api_pb2_grpc.py",
        "cri/daemon/cli.py",
        "cri/oci/monitor_cgroup.py",
        "cni/conf.py",
        "podsandbox/infra.py",
    ):
        assert needed in names, needed
    assert not any(name.startswith("tests/") for name in names)
    dist_info = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "criopy = cri.daemon.cli:main" in zipfile.ZipFile(wheel).read(dist_info).decode()

    root = sdist.name.removesuffix(".tar.gz")
    with tarfile.open(sdist) as tar:
        members = set(tar.getnames())
    for needed in (
        "conf/criopy.yaml",
        "conf/crictl.yaml",
        "conf/10-criopy-bridge.conflist",
        "deploy/install.sh",
        "deploy/criopy.service",
        "deploy/kind/Dockerfile",
        "deploy/kind/cluster.yaml",
        "api/runtime/v1/api.proto",
    ):
        assert f"{root}/{needed}" in members, needed
