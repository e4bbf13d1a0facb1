from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.containers import Env, push_image, running_env
from tests.e2e.goclient import GoClient
from tests.e2e.goclient import build as build_go_client
from tests.support.daemon_harness import DEBIAN_CNI_DIR, Daemon
from tests.support.registry_harness import Registry


def _require_system() -> None:
    if os.geteuid() != 0:
        pytest.skip("e2e tests drive the real daemon as root (CI runs as root); this run is not root")
    for binary in ("runc", "conmon"):
        if shutil.which(binary) is None and not Path(f"/usr/bin/{binary}").exists():
            pytest.fail(f"{binary} is missing: run `make test`, which installs the system packages")
    if not Path(DEBIAN_CNI_DIR, "bridge").exists():
        pytest.fail(f"CNI plugins missing in {DEBIAN_CNI_DIR}: run `make test`")


@pytest.fixture
def daemon_factory() -> Iterator[list[Daemon]]:
    """Daemons made by a test; each is stopped and its directory removed at the end, even when the test fails."""
    _require_system()
    made: list[Daemon] = []
    yield made
    for d in made:
        d.stop()
    for d in made:
        shutil.rmtree(d.base, ignore_errors=True)


@pytest.fixture
def make_daemon(daemon_factory: list[Daemon]):
    def make(
        config_text: str = "", extra_args: list[str] | None = None, base: Path | None = None, start: bool = True
    ) -> Daemon:
        # A short private directory: unix socket paths are limited to 108 bytes.
        base = base or Path(tempfile.mkdtemp(prefix="criopy-e2e-"))
        config_file = base / "criopy.yaml"
        config_file.write_text(config_text)
        d = Daemon(base=base, config_file=config_file, extra_args=list(extra_args or []))
        daemon_factory.append(d)
        if start:
            d.start()
        return d

    return make


@pytest.fixture
def daemon(make_daemon) -> Daemon:
    return make_daemon()


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    """A loopback docker-registry shared by one test module's tests (a module may define its own)."""
    with Registry() as r:
        yield r


@pytest.fixture(scope="module")
def busybox(registry: Registry) -> str:
    """The suite's busybox image, pushed once per module to that module's registry."""
    return push_image(registry, "e2e/busybox")


@pytest.fixture
def env(make_daemon, registry: Registry, busybox: str) -> Iterator[Env]:
    """A daemon with busybox pulled, on a fresh pod network (a module may define its own)."""
    with running_env(make_daemon, registry, [busybox]) as env:
        yield env


@pytest.fixture(scope="session")
def go_client(tmp_path_factory: pytest.TempPathFactory) -> GoClient:
    """The grpc-go client (the kubelet's gRPC stack), built once per session."""
    return GoClient(build_go_client(tmp_path_factory.mktemp("goclient")))
