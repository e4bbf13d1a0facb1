"""The daemon as the kubelet sees it: over its socket, from a separate process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import stat

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.system import linux
from tests.support.daemon_harness import DEFAULT_CONFLIST, run_cli
from tests.support.system import wait_until


def conditions(daemon) -> dict[str, pb.RuntimeCondition]:
    status = daemon.runtime().Status(pb.StatusRequest(), timeout=5)
    return {c.type: c for c in status.status.conditions}


def test_version_names_criopy_and_cri_v1(daemon):
    version = daemon.runtime().Version(pb.VersionRequest(version="0.1.0"), timeout=5)
    assert version.runtime_name == "criopy"
    assert version.runtime_api_version == "v1"
    assert version.runtime_version == run_cli("version").stdout.split()[1]


def test_status_reports_runtime_ready_and_handlers_with_features(daemon):
    status = daemon.runtime().Status(pb.StatusRequest(), timeout=5)
    by_type = {c.type: c for c in status.status.conditions}
    assert by_type["RuntimeReady"].status is True
    handlers = {h.name: h for h in status.runtime_handlers}
    assert {"", "runc", "crun"} <= set(handlers)
    # runc 1.1 on a kernel with mount_setattr supports recursive read-only mounts; `runc features` says so.
    assert handlers["runc"].features.recursive_read_only_mounts is True
    assert handlers[""].features == handlers["runc"].features


def test_network_ready_follows_the_cni_dir_without_restart(daemon):
    ready = conditions(daemon)["NetworkReady"]
    assert ready.status is False
    assert ready.reason == "NetworkPluginNotReady"
    assert str(daemon.cni_dir) in ready.message

    shutil.copy(DEFAULT_CONFLIST, daemon.cni_dir / "10-criopy-bridge.conflist")
    wait_until(lambda: conditions(daemon)["NetworkReady"].status, what="NetworkReady true")

    (daemon.cni_dir / "10-criopy-bridge.conflist").unlink()
    wait_until(lambda: not conditions(daemon)["NetworkReady"].status, what="NetworkReady false again")


def test_network_not_ready_names_a_missing_plugin(daemon):
    conflist = json.loads(DEFAULT_CONFLIST.read_text())
    conflist["plugins"].append({"type": "no-such-plugin"})
    (daemon.cni_dir / "10-net.conflist").write_text(json.dumps(conflist))
    ready = conditions(daemon)["NetworkReady"]
    assert ready.status is False
    assert "no-such-plugin" in ready.message


def test_status_verbose_carries_the_effective_config(daemon):
    status = daemon.runtime().Status(pb.StatusRequest(verbose=True), timeout=5)
    config = json.loads(status.info["config"])
    assert config["listen"] == daemon.socket
    assert config["network"]["cni_config_dir"] == str(daemon.cni_dir)
    assert daemon.runtime().Status(pb.StatusRequest(), timeout=5).info == {}


def test_runtime_config_reports_the_cgroup_driver(make_daemon):
    assert (
        make_daemon().runtime().RuntimeConfig(pb.RuntimeConfigRequest(), timeout=5).linux.cgroup_driver == pb.CGROUPFS
    )
    systemd = make_daemon(extra_args=["--cgroup-manager", "systemd"])
    assert systemd.runtime().RuntimeConfig(pb.RuntimeConfigRequest(), timeout=5).linux.cgroup_driver == pb.SYSTEMD


def test_update_runtime_config_records_the_pod_cidr(daemon):
    request = pb.UpdateRuntimeConfigRequest(
        runtime_config=pb.RuntimeConfig(network_config=pb.NetworkConfig(pod_cidr="10.244.1.0/24"))
    )
    daemon.runtime().UpdateRuntimeConfig(request, timeout=5)
    bad = pb.UpdateRuntimeConfigRequest(
        runtime_config=pb.RuntimeConfig(network_config=pb.NetworkConfig(pod_cidr="nope"))
    )
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime().UpdateRuntimeConfig(bad, timeout=5)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "runtime_config.network_config.pod_cidr" in err.value.details()
    assert daemon.stop() == 0
    with sqlite3.connect(daemon.root / "state.db") as db:
        assert db.execute("SELECT value FROM kv WHERE key = 'pod_cidr'").fetchone() == ("10.244.1.0/24",)


def test_socket_is_0660_and_one_log_line_per_rpc(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket).st_mode) == 0o660
    daemon.runtime().RuntimeConfig(pb.RuntimeConfigRequest(), timeout=5)
    daemon.wait_for_log("method=/runtime.v1.RuntimeService/RuntimeConfig")
    lines = [line for line in daemon.log().splitlines() if "RuntimeService/RuntimeConfig" in line]
    assert len(lines) == 1
    assert "code=OK" in lines[0]
    assert "duration_ms=" in lines[0]


def test_metrics_endpoint_counts_calls(daemon):
    for _ in range(3):
        daemon.runtime().Version(pb.VersionRequest(), timeout=5)
    with pytest.raises(grpc.RpcError):
        daemon.runtime().RunPodSandbox(pb.RunPodSandboxRequest(), timeout=5)
    samples = daemon.metrics()
    # The harness's readiness probe made one Version call before the test's three.
    assert samples['criopy_operations_total{code="OK",operation="Version"}'] == 4.0
    assert samples['criopy_operations_total{code="INVALID_ARGUMENT",operation="RunPodSandbox"}'] == 1.0
    assert samples['criopy_operations_duration_seconds_count{operation="Version"}'] == 4.0
    assert samples["process_resident_memory_bytes"] > 0


def test_metrics_port_zero_turns_the_endpoint_off(make_daemon):
    d = make_daemon(start=False)
    d.metrics_port = 0
    d.start()
    assert "metrics endpoint disabled" in d.log()


def test_bad_config_exits_2_naming_file_and_key(make_daemon):
    d = make_daemon("log:\n  levle: debug\n", start=False)
    done = run_cli(*d.argv()[3:])
    assert done.returncode == 2
    assert str(d.config_file) in done.stderr
    assert "log.levle" in done.stderr

    d.config_file.write_text("metrics:\n  port: lots\n")
    done = run_cli(*d.argv()[3:])
    assert done.returncode == 2
    assert "metrics.port" in done.stderr
    assert "expected integer" in done.stderr


def test_a_second_daemon_on_the_same_root_is_refused(make_daemon):
    first = make_daemon()
    second = make_daemon(start=False)
    argv = second.argv()
    argv[argv.index("--root") + 1] = str(first.root)
    done = run_cli(*argv[3:])
    assert done.returncode == 1
    assert f"is using root {first.root}" in done.stderr
    first.runtime().Version(pb.VersionRequest(), timeout=5)


def test_a_second_daemon_on_the_same_socket_is_refused(make_daemon):
    first = make_daemon()
    second = make_daemon(start=False)
    argv = second.argv()
    argv[argv.index("--listen") + 1] = first.socket
    done = run_cli(*argv[3:])
    assert done.returncode == 1
    assert f"already serving on {first.socket}" in done.stderr
    first.runtime().Version(pb.VersionRequest(), timeout=5)


def test_a_stale_socket_is_replaced(make_daemon):
    d = make_daemon(start=False)
    d.runroot.mkdir(parents=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(d.socket)
    stale.close()  # the file stays, nobody listens
    d.start()
    d.runtime().Version(pb.VersionRequest(), timeout=5)
    assert "replacing stale socket" in d.log()


def test_sigterm_exits_0_and_removes_the_socket(daemon):
    assert daemon.stop() == 0
    assert not os.path.exists(daemon.socket)
    assert "criopy stopped" in daemon.log()


def test_sigint_exits_0(daemon):
    daemon.signal(signal.SIGINT)
    assert daemon.proc.wait(20) == 0


VERSION_RPC_LOGGED = "msg=rpc method=/runtime.v1.RuntimeService/Version"  # a successful call: logged at debug only


def _version_logged_since(d, offset: int, marker: str) -> bool:
    """Whether a Version call made now is logged: `marker`, refused and logged at info, closes the window."""
    d.runtime().Version(pb.VersionRequest(), timeout=5)
    with pytest.raises(grpc.RpcError) as err:
        d.runtime().ContainerStatus(pb.ContainerStatusRequest(container_id=marker), timeout=5)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    d.wait_for_log(marker)
    return VERSION_RPC_LOGGED in d.log()[offset:]


def _reload(d, text: str) -> None:
    reloads = d.log().count("config reloaded")
    d.config_file.write_text(text)
    d.signal(signal.SIGHUP)
    wait_until(lambda: d.log().count("config reloaded") > reloads, what="config reloaded")


def test_sighup_reloads_reloadable_keys(make_daemon, monkeypatch):
    d = make_daemon("log:\n  level: info\n", start=False)
    # The harness starts every daemon with --log-level debug, and a flag beats the file, at a reload too.
    argv = d.argv()
    flag = argv.index("--log-level")
    monkeypatch.setattr(d, "argv", lambda: argv[:flag] + argv[flag + 2 :])
    d.start()
    assert not _version_logged_since(d, 0, "before-reload")

    offset = len(d.log())
    _reload(
        d,
        "log:\n  level: debug\n"
        "runtime:\n  runtimes:\n    runc-debug:\n      path: runc\n      runtime_args: [--debug]\n",
    )
    names = wait_until(
        lambda: {h.name for h in d.runtime().Status(pb.StatusRequest(), timeout=5).runtime_handlers} >= {"runc-debug"},
        what="runc-debug handler",
    )
    assert names
    info = json.loads(d.runtime().Status(pb.StatusRequest(verbose=True), timeout=5).info["config"])
    assert info["log"]["level"] == "debug"
    assert _version_logged_since(d, offset, "at-debug")

    _reload(d, "log:\n  level: info\n")
    offset = len(d.log())
    assert not _version_logged_since(d, offset, "back-at-info")


def test_sighup_with_a_bad_file_keeps_the_old_config(make_daemon):
    d = make_daemon("runtime:\n  runtimes:\n    runc-extra:\n      path: runc\n")
    d.config_file.write_text("runtime:\n  runtimes: [not, a, mapping]\n")
    d.signal(signal.SIGHUP)
    d.wait_for_log("config reload failed, keeping the current config")
    assert "runtime.runtimes" in d.log()
    names = {h.name for h in d.runtime().Status(pb.StatusRequest(), timeout=5).runtime_handlers}
    assert "runc-extra" in names


def test_sighup_does_not_apply_keys_that_need_a_restart(make_daemon):
    d = make_daemon("")
    d.config_file.write_text("storage:\n  driver: vfs\n")
    d.signal(signal.SIGHUP)
    d.wait_for_log("needs_restart=storage.driver")
    info = json.loads(d.runtime().Status(pb.StatusRequest(verbose=True), timeout=5).info["config"])
    assert info["storage"]["driver"] == "overlay"


def test_criopy_status_command(daemon):
    done = run_cli("status", "--listen", daemon.socket)
    assert done.returncode == 3, done.stderr
    assert "RuntimeReady: true" in done.stdout
    assert "NetworkReady: false (NetworkPluginNotReady" in done.stdout
    shutil.copy(DEFAULT_CONFLIST, daemon.cni_dir / "10-criopy-bridge.conflist")
    done = run_cli("status", "--listen", daemon.socket)
    assert done.returncode == 0
    assert "NetworkReady: true" in done.stdout


def test_criopy_status_without_a_daemon(tmp_path):
    done = run_cli("status", "--config", "/dev/null", "--listen", str(tmp_path / "none.sock"))
    assert done.returncode == 1
    assert "no daemon answering" in done.stderr


def test_wipe_is_refused_while_running_and_removes_everything_after(daemon):
    argv = [
        "wipe",
        "--yes",
        "--config",
        str(daemon.config_file),
        "--root",
        str(daemon.root),
        "--runroot",
        str(daemon.runroot),
    ]
    done = run_cli(*argv)
    assert done.returncode == 1
    assert "daemon is running" in done.stderr
    assert daemon.root.exists()

    assert daemon.stop() == 0
    unconfirmed = run_cli(*[a for a in argv if a != "--yes"])
    assert unconfirmed.returncode == 1
    assert "pass --yes" in unconfirmed.stderr
    assert daemon.root.exists()

    # Whatever is still mounted under the root (overlays, shm) is unmounted, not deleted through.
    leftover = daemon.root / "leftover-mount"
    leftover.mkdir()
    linux.mount("criopy-e2e", str(leftover), "tmpfs", 0, "size=1m")
    (leftover / "file").write_text("x")
    try:
        done = run_cli(*argv)
    finally:
        for m in linux.mounts_under(str(daemon.root)) if daemon.root.exists() else []:
            linux.umount(m.mount_point, linux.MNT_DETACH)
    assert done.returncode == 0, done.stderr
    assert not daemon.root.exists()
    assert not daemon.runroot.exists()
    assert linux.mounts_under(str(daemon.root)) == []


def test_config_command_prints_the_effective_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("log:\n  level: warning\n")
    env = {"PATH": os.environ["PATH"], "CRIOPY_METRICS_PORT": "9191"}
    done = run_cli("config", "--config", str(config), "--config-dir", str(tmp_path), "--stream-port", "10010", env=env)
    assert done.returncode == 0, done.stderr
    assert "level: warning" in done.stdout
    assert "port: 9191" in done.stdout
    assert "port: 10010" in done.stdout


def test_the_harness_takes_another_metrics_port_when_its_own_was_taken(make_daemon):
    """The harness picks a free port before the daemon binds it; a listener on port 0 may get the same number
    in between (seen in CI: 'Address already in use'). The harness then starts the daemon on another."""
    d = make_daemon(start=False)
    taken = d.metrics_port
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        d.start()
    assert d.metrics_port != taken
    assert d.metrics()  # the endpoint answers on the port it got
