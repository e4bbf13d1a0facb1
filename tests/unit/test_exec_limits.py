"""The NOFILE limit an exec'd command is given again past runc's race (runc#4195): read from the bundle, set by pid."""

from __future__ import annotations

import json
import resource
import subprocess
from pathlib import Path

from cri.oci.exec import bundle_nofile, started_pid


def _bundle(tmp_path: Path, rlimits: object) -> str:
    (tmp_path / "config.json").write_text(json.dumps({"process": {"args": ["sh"], "rlimits": rlimits}}))
    return str(tmp_path)


def test_the_bundles_nofile_is_read_with_unlimited_as_the_kernels(tmp_path: Path) -> None:
    rlimits = [
        {"type": "RLIMIT_NPROC", "soft": 5, "hard": 5},
        {"type": "RLIMIT_NOFILE", "soft": 1000, "hard": 2**64 - 1},
    ]
    assert bundle_nofile(_bundle(tmp_path, rlimits)) == (1000, resource.RLIM_INFINITY)


def test_a_bundle_without_nofile_or_without_a_spec_gives_none(tmp_path: Path) -> None:
    assert bundle_nofile(_bundle(tmp_path, [{"type": "RLIMIT_CORE", "soft": 0, "hard": 0}])) is None
    assert bundle_nofile(_bundle(tmp_path, None)) is None
    assert bundle_nofile(str(tmp_path / "gone")) is None
    (tmp_path / "config.json").write_text("{not json")
    assert bundle_nofile(str(tmp_path)) is None


def test_the_started_command_gets_the_containers_nofile(tmp_path: Path) -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "pid").write_text(f"{child.pid}\n")
        assert started_pid(str(tmp_path / "pid"), (100, 200)) == child.pid
        assert resource.prlimit(child.pid, resource.RLIMIT_NOFILE) == (100, 200)
    finally:
        child.kill()
        child.wait(timeout=10)


def test_a_command_that_already_exited_is_no_error(tmp_path: Path) -> None:
    child = subprocess.Popen(["true"])
    child.wait(timeout=10)
    (tmp_path / "pid").write_text(f"{child.pid}\n")
    assert started_pid(str(tmp_path / "pid"), (100, 200)) == child.pid
    assert started_pid(str(tmp_path / "missing"), (100, 200)) == 0
