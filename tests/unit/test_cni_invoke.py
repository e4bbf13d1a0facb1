"""Plugin execution, the result cache and CniNetwork, against fake plugins written as shell scripts."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cni import handoff
from cni.cache import CacheEntry, ResultCache
from cni.conf import load_file
from cni.invoke import CallHooks, InvocationError, format_args, plugin_config
from cni.network import CniNetwork
from cni.result import CniError, PluginError

CID = "c0ffee" * 10 + "abcd"


def result_for(version: str, address: str, name: str = "eth0") -> dict[str, Any]:
    ip: dict[str, Any] = {"address": address, "gateway": address.split("/", maxsplit=1)[0].rsplit(".", 1)[0] + ".1"}
    if version in ("0.3.0", "0.3.1", "0.4.0"):
        ip["version"] = "4"
    ip["interface"] = 0
    return {
        "cniVersion": version,
        "interfaces": [{"name": name, "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/run/netns/x"}],
        "ips": [ip],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {"nameservers": ["10.0.0.53"]},
    }


class Plugins:
    """Fake plugins in tmp_path/bin; every call is recorded as calls/<n>.{env,stdin} plus a line in calls/log."""

    def __init__(self, root: Path) -> None:
        self.bin = root / "bin"
        self.calls = root / "calls"
        self.bin.mkdir()
        self.calls.mkdir()

    def _write(self, name: str, body: str) -> None:
        path = self.bin / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(0o755)

    def recording(self, name: str, result: dict[str, Any] | None = None, *, add_body: str = "") -> None:
        """Records env and stdin; ADD prints `result`; VERSION prints a version list."""
        out = self.bin / f"{name}.result"
        out.write_text(json.dumps(result if result is not None else result_for("1.0.0", "10.1.0.5/24")))
        self._write(
            name,
            f"""d={self.calls}
n=$(cat "$d/log" 2>/dev/null | wc -l)
cat > "$d/$n.stdin"
env > "$d/$n.env"
echo "{name} $CNI_COMMAND" >> "$d/log"
case "$CNI_COMMAND" in
  ADD) {add_body or f'cat "{out}"'} ;;
  VERSION) echo '{{"cniVersion":"1.0.0","supportedVersions":["0.3.1","0.4.0","1.0.0"]}}' ;;
esac
""",
        )

    def failing(self, name: str, *, on: str = "ADD") -> None:
        """Records the call, then fails `on` with the spec's error JSON (without reading stdin)."""
        self._write(
            name,
            f"""d={self.calls}
n=$(cat "$d/log" 2>/dev/null | wc -l)
env > "$d/$n.env"
echo "{name} $CNI_COMMAND" >> "$d/log"
if [ "$CNI_COMMAND" = {on} ]; then
  echo "{name}: something went wrong" >&2
  echo '{{"cniVersion":"1.0.0","code":7,"msg":"bad network config","details":"no subnet given"}}'
  exit 1
fi
""",
        )

    def log(self) -> list[str]:
        path = self.calls / "log"
        return path.read_text().splitlines() if path.exists() else []

    def stdin(self, n: int) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.calls / f"{n}.stdin").read_text())
        return data

    def env(self, n: int) -> dict[str, str]:
        lines = (self.calls / f"{n}.env").read_text().splitlines()
        return dict(line.split("=", 1) for line in lines if "=" in line)


@pytest.fixture
def plugins(tmp_path):
    return Plugins(tmp_path)


def network(tmp_path: Path, plugins: list[dict[str, Any]], version: str = "1.0.0", **extra: Any):
    path = tmp_path / "net.conflist"
    path.write_text(json.dumps({"cniVersion": version, "name": "testnet", "plugins": plugins, **extra}))
    return load_file(path)


def make_net(tmp_path: Path, plugs: Plugins, confs: list[dict[str, Any]], version: str = "1.0.0", **kw: Any):
    timeout = kw.pop("timeout", 10.0)
    return CniNetwork(
        network(tmp_path, confs, version, **kw), [str(plugs.bin), "/nonexistent/dir"], tmp_path / "cache", timeout
    )


def test_add_sets_the_cni_environment_and_stdin(tmp_path, plugins, monkeypatch):
    monkeypatch.setenv("CRIOPY_SECRET_TEST_VAR", "must-not-leak")
    plugins.recording("rec")
    net = make_net(
        tmp_path,
        plugins,
        [{"type": "rec", "bridge": "br0", "capabilities": {"portMappings": True, "bandwidth": False}}],
    )
    caps = {
        "portMappings": [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}],
        "bandwidth": {"ingressRate": 1},
        "dns": {"servers": ["1.1.1.1"]},
    }
    result = asyncio.run(net.add(CID, "/run/netns/test", "eth0", {"K8S_POD_NAME": "web", "IgnoreUnknown": "1"}, caps))
    assert str(result.ips[0].address) == "10.1.0.5/24"
    assert plugins.log() == ["rec ADD"]
    env = plugins.env(0)
    assert env["CNI_COMMAND"] == "ADD"
    assert env["CNI_CONTAINERID"] == CID
    assert env["CNI_NETNS"] == "/run/netns/test"
    assert env["CNI_IFNAME"] == "eth0"
    assert env["CNI_ARGS"] == "K8S_POD_NAME=web;IgnoreUnknown=1"
    assert env["CNI_PATH"] == f"{plugins.bin}:/nonexistent/dir"
    assert env["PATH"]
    assert "CRIOPY_SECRET_TEST_VAR" not in env
    stdin = plugins.stdin(0)
    assert stdin["name"] == "testnet"
    assert stdin["cniVersion"] == "1.0.0"
    assert stdin["bridge"] == "br0"
    # Only the capabilities the plugin declares as true, and only those the caller gave.
    assert stdin["runtimeConfig"] == {"portMappings": caps["portMappings"]}
    assert "prevResult" not in stdin


def test_plugins_without_capabilities_get_no_runtime_config(tmp_path):
    net = network(tmp_path, [{"type": "a", "runtimeConfig": {"stale": 1}}, {"type": "b", "capabilities": {}}])
    caps: dict[str, Any] = {"portMappings": []}
    assert "runtimeConfig" not in plugin_config(net, net.plugins[0], None, caps)
    assert "runtimeConfig" not in plugin_config(net, net.plugins[1], None, caps)
    with_caps = network(tmp_path, [{"type": "a", "capabilities": {"portMappings": True, "ipRanges": True}}])
    conf = plugin_config(with_caps, with_caps.plugins[0], {"cniVersion": "1.0.0"}, {"ipRanges": [[{"subnet": "x"}]]})
    assert conf["runtimeConfig"] == {"ipRanges": [[{"subnet": "x"}]]}
    assert conf["prevResult"] == {"cniVersion": "1.0.0"}


def test_add_chains_prev_result_and_caches_the_final_result(tmp_path, plugins):
    first, second = result_for("1.0.0", "10.1.0.5/24"), result_for("1.0.0", "10.1.0.6/24")
    plugins.recording("first", first)
    plugins.recording("second", second)
    net = make_net(tmp_path, plugins, [{"type": "first"}, {"type": "second"}])
    result = asyncio.run(net.add(CID, "/run/netns/test", "eth0", {"A": "1"}, {"portMappings": []}))
    assert plugins.log() == ["first ADD", "second ADD"]
    assert "prevResult" not in plugins.stdin(0)
    assert plugins.stdin(1)["prevResult"] == first
    assert str(result.ips[0].address.ip) == "10.1.0.6"

    cache_file = tmp_path / "cache" / "results" / f"testnet-{CID}-eth0"
    assert stat.S_IMODE(cache_file.stat().st_mode) == 0o600
    cached = json.loads(cache_file.read_text())
    assert cached["kind"] == "cniCacheV1"
    assert (cached["containerId"], cached["ifName"], cached["networkName"]) == (CID, "eth0", "testnet")
    assert json.loads(base64.b64decode(cached["config"]))["plugins"] == [{"type": "first"}, {"type": "second"}]
    assert cached["cniArgs"] == [["A", "1"]]
    assert cached["capabilityArgs"] == {"portMappings": []}
    assert cached["result"] == second
    assert [p.name for p in cache_file.parent.iterdir()] == [cache_file.name]  # no temp files left
    cached_result = net.cached_result(CID, "eth0")
    assert cached_result is not None
    assert cached_result.ips == result.ips


def test_the_programs_hand_over_brings_back_every_plugin_and_cache_outcome(tmp_path, plugins):
    plugins.recording("first")
    plugins.recording("second")
    handed: list[str] = []

    def deliver(loop: asyncio.AbstractEventLoop, future: asyncio.Future[Any], result: Any, exc: Any) -> None:
        handed.append("error" if exc is not None else type(result).__name__)
        handoff.call_soon_threadsafe(loop, future, result, exc)

    confs = [{"type": "first"}, {"type": "second"}]
    net = CniNetwork(network(tmp_path, confs), [str(plugins.bin)], tmp_path / "cache", 10.0, CallHooks(deliver=deliver))
    result = asyncio.run(net.add(CID, "/run/netns/test", "eth0", {}, {}))
    assert str(result.ips[0].address) == "10.1.0.5/24"
    # Two ADDs (their parsed results), then the cache entry written (its path).
    assert handed == ["Result", "Result", "PosixPath"]
    asyncio.run(net.delete(CID, "/run/netns/test", "eth0"))
    # The entry read, two DELs, the entry removed.
    assert handed[3:] == ["CacheEntry", "NoneType", "NoneType", "NoneType"]
    assert plugins.log() == ["first ADD", "second ADD", "second DEL", "first DEL"]


def test_delete_runs_in_reverse_with_the_cached_result_and_removes_the_entry(tmp_path, plugins):
    final = result_for("1.0.0", "10.1.0.9/24")
    plugins.recording("first")
    plugins.recording("second", final)
    net = make_net(tmp_path, plugins, [{"type": "first"}, {"type": "second"}])
    asyncio.run(net.add(CID, "/run/netns/gone", "eth0", {"A": "1"}, {}))
    # The netns no longer exists: its path is passed anyway, and the args come from the cache.
    asyncio.run(net.delete(CID, "/run/netns/gone", "eth0"))
    assert plugins.log() == ["first ADD", "second ADD", "second DEL", "first DEL"]
    for n in (2, 3):
        assert plugins.stdin(n)["prevResult"] == final
        assert plugins.env(n)["CNI_NETNS"] == "/run/netns/gone"
        assert plugins.env(n)["CNI_ARGS"] == "A=1"
    assert not (tmp_path / "cache" / "results" / f"testnet-{CID}-eth0").exists()
    assert net.cached_result(CID, "eth0") is None


def test_delete_without_cache_entry_still_calls_del_without_prev_result(tmp_path, plugins):
    plugins.recording("only")
    net = make_net(tmp_path, plugins, [{"type": "only"}])
    asyncio.run(net.delete(CID, "", "eth0"))
    assert plugins.log() == ["only DEL"]
    assert "prevResult" not in plugins.stdin(0)
    assert plugins.env(0)["CNI_NETNS"] == ""


def test_delete_before_0_4_0_passes_no_prev_result(tmp_path, plugins):
    plugins.recording("only", result_for("0.3.1", "10.1.0.5/24"))
    net = make_net(tmp_path, plugins, [{"type": "only"}], version="0.3.1")
    asyncio.run(net.add(CID, "/run/netns/x", "eth0"))
    asyncio.run(net.delete(CID, "/run/netns/x", "eth0"))
    assert "prevResult" not in plugins.stdin(1)


def test_failed_delete_keeps_the_cache_and_still_runs_the_other_plugins(tmp_path, plugins):
    plugins.recording("first")
    plugins.failing("second", on="DEL")
    net = make_net(tmp_path, plugins, [{"type": "first"}, {"type": "second"}])
    # An entry as ADD would have left it.
    ResultCache(tmp_path / "cache").write(
        CacheEntry("testnet", CID, "eth0", b"{}", result=result_for("1.0.0", "10.1.0.5/24"))
    )
    with pytest.raises(PluginError) as err:
        asyncio.run(net.delete(CID, "/run/netns/x", "eth0"))
    assert "bad network config" in str(err.value)
    assert plugins.log() == ["second DEL", "first DEL"]
    assert net.cached_result(CID, "eth0") is not None


def test_failure_of_the_second_plugin_rolls_back_the_first(tmp_path, plugins):
    first = result_for("1.0.0", "10.1.0.5/24")
    plugins.recording("first", first)
    plugins.failing("second")
    net = make_net(tmp_path, plugins, [{"type": "first"}, {"type": "second"}])
    with pytest.raises(PluginError) as err:
        asyncio.run(net.add(CID, "/run/netns/x", "eth0", {}, {}))
    assert err.value.code == 7
    assert err.value.plugin == "second"
    assert str(err.value) == (
        "plugin second failed (code 7): bad network config: no subnet given (stderr: second: something went wrong)"
    )
    # The failed plugin and then the first get DEL, in reverse order, with what was allocated so far.
    assert plugins.log() == ["first ADD", "second ADD", "second DEL", "first DEL"]
    assert plugins.stdin(3)["prevResult"] == first
    assert plugins.env(3)["CNI_CONTAINERID"] == CID
    assert not (tmp_path / "cache" / "results" / f"testnet-{CID}-eth0").exists()


def test_non_json_error_output_falls_back_to_stderr(tmp_path, plugins):
    plugins._write("crash", 'echo "panic: runtime error" >&2\necho "not json"\nexit 2\n')
    net = make_net(tmp_path, plugins, [{"type": "crash"}])
    with pytest.raises(PluginError) as err:
        asyncio.run(net.add(CID, "/run/netns/x", "eth0"))
    assert err.value.code is None
    assert err.value.exit_status == 2
    assert str(err.value) == "plugin crash failed (exit status 2): panic: runtime error"


def test_garbage_on_add_is_an_error_naming_the_plugin(tmp_path, plugins):
    plugins._write("garbage", 'cat >/dev/null\necho "warning: chatty plugin" >&2\necho "hello, not a result"\n')
    net = make_net(tmp_path, plugins, [{"type": "garbage"}])
    with pytest.raises(InvocationError) as err:
        asyncio.run(net.add(CID, "/run/netns/x", "eth0"))
    message = str(err.value)
    assert message.startswith("plugin garbage ADD returned an invalid result: not JSON")
    assert "hello, not a result" in message
    # Garbage on DEL does not matter: only the exit status does.
    asyncio.run(net.delete(CID, "/run/netns/x", "eth0"))


def test_a_plugin_that_hangs_is_killed_after_the_timeout(tmp_path, plugins):
    pidfile = tmp_path / "sleeper.pid"
    plugins._write(
        "sleepy",
        f'cat >/dev/null\nif [ "$CNI_COMMAND" = ADD ]; then\n  echo "sleepy: waiting" >&2\n'
        f"  sleep 60 & echo $! > {pidfile}\n  wait\nfi\n",
    )
    net = make_net(tmp_path, plugins, [{"type": "sleepy"}], timeout=0.5)
    started = time.monotonic()
    with pytest.raises(InvocationError) as err:
        asyncio.run(net.add(CID, "/run/netns/x", "eth0"))
    assert time.monotonic() - started < 5
    assert str(err.value) == "plugin sleepy ADD timed out after 0.5s (stderr: sleepy: waiting)"
    # The plugin's children die with it (its whole process group is killed).
    sleeper = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(sleeper)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_missing_plugin_binary(tmp_path, plugins):
    net = make_net(tmp_path, plugins, [{"type": "nosuch"}])
    with pytest.raises(InvocationError) as err:
        asyncio.run(net.add(CID, "/run/netns/x", "eth0"))
    assert f"plugin nosuch not found in {plugins.bin}:/nonexistent/dir" in str(err.value)


@pytest.mark.parametrize(
    ("bad", "parameter"),
    [
        (("", "eth0", "/run/netns/x"), "container_id"),
        (("bad/id", "eth0", "/run/netns/x"), "container_id"),
        ((CID, "", "/run/netns/x"), "ifname"),
        ((CID, "a" * 16, "/run/netns/x"), "ifname"),
        ((CID, "eth/0", "/run/netns/x"), "ifname"),
        ((CID, "eth0", ""), "netns"),
    ],
)
def test_bad_parameters_are_refused_before_any_plugin_runs(tmp_path, plugins, bad, parameter):
    container_id, ifname, netns = bad
    plugins.recording("rec")
    net = make_net(tmp_path, plugins, [{"type": "rec"}])
    with pytest.raises(ValueError, match=parameter):
        asyncio.run(net.add(container_id, netns, ifname))
    assert plugins.log() == []


def test_15_character_ifname_is_fine(tmp_path, plugins):
    plugins.recording("rec")
    net = make_net(tmp_path, plugins, [{"type": "rec"}])
    asyncio.run(net.add(CID, "/run/netns/x", "a" * 15))


def test_cni_args_refuse_separators():
    assert format_args({"A": "1", "B": "2"}) == "A=1;B=2"
    with pytest.raises(ValueError, match="args"):
        format_args({"A": "1;B=2"})


@pytest.mark.parametrize("version", ["0.3.1", "0.4.0", "1.0.0", "1.1.0"])
def test_results_of_each_version_come_back_parsed(tmp_path, plugins, version):
    plugins.recording("rec", result_for(version, "10.7.0.3/24"))
    net = make_net(tmp_path, plugins, [{"type": "rec"}], version=version)
    result = asyncio.run(net.add(CID, "/run/netns/x", "eth0"))
    assert result.cni_version == version
    assert [str(ip.address) for ip in result.sandbox_ips("eth0")] == ["10.7.0.3/24"]
    assert str(result.ips[0].gateway) == "10.7.0.1"
    assert result.dns.nameservers == ("10.0.0.53",)


def test_check_uses_the_cached_result(tmp_path, plugins):
    final = result_for("1.0.0", "10.1.0.5/24")
    plugins.recording("first")
    plugins.recording("second", final)
    net = make_net(tmp_path, plugins, [{"type": "first"}, {"type": "second"}])
    with pytest.raises(CniError, match="no cached result"):
        asyncio.run(net.check(CID, "/run/netns/x", "eth0"))
    asyncio.run(net.add(CID, "/run/netns/x", "eth0"))
    asyncio.run(net.check(CID, "/run/netns/x", "eth0"))
    assert plugins.log()[2:] == ["first CHECK", "second CHECK"]
    assert plugins.stdin(2)["prevResult"] == final


def test_check_is_refused_before_0_4_0_and_skipped_when_disabled(tmp_path, plugins):
    plugins.recording("rec", result_for("0.3.1", "10.1.0.5/24"))
    old = make_net(tmp_path, plugins, [{"type": "rec"}], version="0.3.1")
    with pytest.raises(CniError, match="does not support CHECK"):
        asyncio.run(old.check(CID, "/run/netns/x", "eth0"))
    disabled = make_net(tmp_path, plugins, [{"type": "rec"}], disableCheck=True)
    asyncio.run(disabled.check(CID, "/run/netns/x", "eth0"))
    assert plugins.log() == []


def test_status_runs_only_from_1_1_0(tmp_path, plugins):
    plugins.recording("rec")
    asyncio.run(make_net(tmp_path, plugins, [{"type": "rec"}], version="1.0.0").status())
    assert plugins.log() == []
    asyncio.run(make_net(tmp_path, plugins, [{"type": "rec", "x": 1}], version="1.1.0").status())
    assert plugins.log() == ["rec STATUS"]
    env = plugins.env(0)
    assert env["CNI_COMMAND"] == "STATUS"
    assert "CNI_CONTAINERID" not in env
    assert plugins.stdin(0) == {"type": "rec", "x": 1, "name": "testnet", "cniVersion": "1.1.0"}


def test_status_failure_is_a_plugin_error(tmp_path, plugins):
    plugins.failing("down", on="STATUS")
    with pytest.raises(PluginError, match="plugin down failed"):
        asyncio.run(make_net(tmp_path, plugins, [{"type": "down"}], version="1.1.0").status())


def test_version(tmp_path, plugins):
    plugins.recording("rec")
    net = make_net(tmp_path, plugins, [{"type": "rec"}])
    assert asyncio.run(net.version("rec")) == ["0.3.1", "0.4.0", "1.0.0"]
    assert plugins.stdin(0) == {"cniVersion": "1.0.0"}
    plugins._write("garbage", "cat >/dev/null; echo nope\n")
    with pytest.raises(InvocationError, match="plugin garbage VERSION returned no supportedVersions"):
        asyncio.run(net.version("garbage"))


def test_each_call_is_logged_once(tmp_path, plugins, caplog):
    plugins.recording("first")
    plugins.failing("second")
    net = make_net(tmp_path, plugins, [{"type": "first"}, {"type": "second"}])
    with caplog.at_level(logging.DEBUG, logger="cni"), pytest.raises(PluginError):
        asyncio.run(net.add(CID, "/run/netns/x", "eth0"))
    calls = [r for r in caplog.records if r.getMessage().startswith("cni plugin call")]
    summary = [(r.fields["plugin"], r.fields["command"], r.levelno) for r in calls]
    assert summary == [
        ("first", "ADD", logging.DEBUG),
        ("second", "ADD", logging.WARNING),
        ("second", "DEL", logging.DEBUG),
        ("first", "DEL", logging.DEBUG),
    ]
    fields = calls[0].fields
    assert fields["container_id"] == CID
    assert fields["network"] == "testnet"
    assert isinstance(fields["duration_ms"], float)
    assert "bad network config" in calls[1].fields["error"]


def test_cache_round_trip_and_corrupt_entries(tmp_path):
    cache = ResultCache(tmp_path / "c")
    assert cache.read("net", CID, "eth0") is None
    entry = CacheEntry("net", CID, "eth0", b'{"x": 1}', {"K": "V"}, {"portMappings": []}, {"cniVersion": "1.0.0"})
    path = cache.write(entry)
    assert path == tmp_path / "c" / "results" / f"net-{CID}-eth0"
    assert cache.read("net", CID, "eth0") == entry
    cache.write(CacheEntry("net", CID, "eth0", b"{}"))  # replaced whole
    again = cache.read("net", CID, "eth0")
    assert again is not None
    assert again.result is None
    assert again.cni_args == {}
    path.write_text("{half a file")
    assert cache.read("net", CID, "eth0") is None
    path.write_text(json.dumps({"kind": "somethingElse"}))
    assert cache.read("net", CID, "eth0") is None
    cache.remove("net", CID, "eth0")
    cache.remove("net", CID, "eth0")  # already gone: fine
    assert not path.exists()
    assert os.listdir(path.parent) == []
    with pytest.raises(ValueError, match="network name"):
        cache.path("../x", CID, "eth0")


def test_cancelled_add_kills_the_plugin_and_undoes(tmp_path, plugins):
    pidfile = tmp_path / "sleeper.pid"
    plugins.recording("first")
    plugins._write(
        "slow",
        f'cat >/dev/null\necho "slow $CNI_COMMAND" >> {plugins.calls}/log\n'
        f'if [ "$CNI_COMMAND" = ADD ]; then sleep 60 & echo $! > {pidfile}; wait; fi\n',
    )
    net = make_net(tmp_path, plugins, [{"type": "first"}, {"type": "slow"}], timeout=30)

    async def cancel_soon() -> None:
        task = asyncio.ensure_future(net.add(CID, "/run/netns/x", "eth0"))
        while not pidfile.exists():
            await asyncio.sleep(0.02)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    assert plugins.log() == ["first ADD", "slow ADD", "slow DEL", "first DEL"]
    sleeper = int(pidfile.read_text())
    deadline = time.monotonic() + 5
    while _alive(sleeper) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(sleeper)
    assert net.cached_result(CID, "eth0") is None


def test_add_cancelled_while_its_result_is_cached_undoes_after_the_write(tmp_path, plugins):
    """The cache is written off the event loop: a cancellation then waits for the write, so the undo's
    removal of the entry comes after it and no entry outlives the attachment."""
    plugins.recording("only")
    net = make_net(tmp_path, plugins, [{"type": "only"}])
    writing, release = threading.Event(), threading.Event()
    real_write = net.cache.write

    def slow_write(entry: CacheEntry) -> Path:
        writing.set()
        release.wait(10)
        return real_write(entry)

    net.cache.write = slow_write

    async def cancel_mid_write() -> None:
        task = asyncio.ensure_future(net.add(CID, "/run/netns/x", "eth0"))
        while not writing.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.sleep(0.1)  # the cancellation is in; the write is still held
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_mid_write())
    assert plugins.log() == ["only ADD", "only DEL"]
    assert net.cached_result(CID, "eth0") is None
    assert os.listdir(net.cache.cache_dir / "results") == []
