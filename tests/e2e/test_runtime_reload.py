"""A SIGHUP (or a restart) that removes or moves a runtime handler leaves its pods and containers removable.

The OCI runtime (binary, --root, arguments) of a container and of a pod's infra
process is the one they were created with, kept in their records: a reload
that removes or changes the handler must not orphan them.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import Env, registries_yaml, running_env
from tests.e2e.pods import info as pod_info
from tests.e2e.pods import pod_config
from tests.support.registry_harness import Registry
from tests.support.system import conmon_pids, runc_delete_all, wait_gone


@pytest.fixture
def alt_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="criopy-alt-"))
    yield root
    for path in (root, _moved(root)):
        runc_delete_all(path)
        shutil.rmtree(path, ignore_errors=True)


def _moved(root: Path) -> Path:
    return root.with_name(root.name + "-moved")


def _with_alt(host: str, root: Path) -> str:
    return registries_yaml(host, f"runtime:\n  runtimes:\n    alt:\n      path: runc\n      root: {root}\n")


def _reload(env: Env, text: str) -> None:
    daemon = env.daemon
    reloads = daemon.log().count("config reloaded")
    daemon.config_file.write_text(text)
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while daemon.log().count("config reloaded") <= reloads:
        assert time.monotonic() < deadline, "the SIGHUP reload was not logged"
        time.sleep(0.05)


def _handlers(env: Env) -> set[str]:
    return {h.name for h in env.rt.Status(pb.StatusRequest(), timeout=5).runtime_handlers}


def _run_pod(env: Env, handler: str, shared_pid: bool) -> tuple[str, pb.PodSandboxConfig]:
    """Env.pod, with a runtime handler."""
    parent = f"/criopy-e2e-{secrets.token_hex(4)}"
    env.cgroup_parents.append(parent)
    log_dir = env.daemon.base / "logs" / secrets.token_hex(4)
    env.log_dirs.append(log_dir)
    config = pod_config(shared_pid=shared_pid, log_directory=str(log_dir))
    config.linux.cgroup_parent = parent
    resp = env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config, runtime_handler=handler), timeout=60)
    return str(resp.pod_sandbox_id), config


@pytest.mark.parametrize("change", ["removed", "moved", "removed-across-a-restart"])
def test_a_handler_removed_or_moved_by_sighup_leaves_its_pods_and_containers_removable(
    make_daemon, registry: Registry, busybox: str, alt_root: Path, change: str
) -> None:
    with running_env(make_daemon, registry, [busybox], _with_alt(registry.host, alt_root)) as env:
        try:
            plain = _run_pod(env, "alt", shared_pid=False)
            shared = _run_pod(env, "alt", shared_pid=True)  # a pod with an infra process
            cids = [env.run(pod, env.container_config(command=["sleep", "3600"])) for pod in (plain, shared)]
            pids = [json.loads(env.status(cid, verbose=True).info["info"])["pid"] for cid in cids]
            infra_pid = int(pod_info(env.daemon, shared[0])["infraPid"])  # type: ignore[call-overload]
            assert infra_pid > 0
            assert sorted(os.listdir(alt_root)) == sorted([*cids, shared[0]])  # made with the handler's own root

            if change == "removed":
                _reload(env, registries_yaml(registry.host))
                assert "alt" not in _handlers(env)
            elif change == "removed-across-a-restart":  # the runtimes come back from the rows
                env.daemon.stop()
                env.daemon.config_file.write_text(registries_yaml(registry.host))
                env.daemon.start()
                assert "alt" not in _handlers(env)
            else:  # the same handler name, another --root: the live lookup would look for nothing there
                _reload(env, _with_alt(registry.host, _moved(alt_root)))
                assert "alt" in _handlers(env)

            for cid in cids:
                env.stop(cid)
                env.remove(cid)
            for pod_id, _config in (plain, shared):
                env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
                env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)

            assert [pid for pid in [*pids, infra_pid] if not wait_gone(pid)] == []
            assert os.listdir(alt_root) == []  # no runc state left under the handler's former root
            assert conmon_pids(str(env.daemon.base)) == []
            assert list(env.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items) == []
        finally:
            # Put the handler back, so that the env's teardown can remove whatever a failure left.
            _reload(env, _with_alt(registry.host, alt_root))
