from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from cni.conf import NetworkConfigError, load_file
from cni.readiness import NetworkWatcher, evaluate

CONFLIST = {
    "cniVersion": "1.0.0",
    "name": "net1",
    "plugins": [{"type": "bridge"}, {"type": "portmap"}],
}


@pytest.fixture
def dirs(tmp_path):
    conf, plugins = tmp_path / "net.d", tmp_path / "bin"
    conf.mkdir()
    plugins.mkdir()
    return conf, plugins


def add_plugin(plugins: Path, name: str) -> None:
    path = plugins / name
    path.write_text("#!/bin/sh\n")
    path.chmod(0o755)


def test_empty_dir_is_not_ready(dirs):
    conf, plugins = dirs
    answer = evaluate(str(conf), [str(plugins)])
    assert not answer.ready
    assert answer.reason == "NetworkPluginNotReady"
    assert str(conf) in answer.message


def test_ready_once_config_and_plugins_exist(dirs):
    conf, plugins = dirs
    (conf / "10-net.conflist").write_text(json.dumps(CONFLIST))
    add_plugin(plugins, "bridge")
    answer = evaluate(str(conf), [str(plugins)])
    assert not answer.ready
    assert "portmap" in answer.message
    add_plugin(plugins, "portmap")
    assert evaluate(str(conf), [str(plugins)]).ready


def test_first_valid_file_in_lexical_order_wins_and_invalid_ones_are_reported(dirs):
    conf, plugins = dirs
    add_plugin(plugins, "bridge")
    add_plugin(plugins, "portmap")
    (conf / "05-broken.conflist").write_text("{not json")
    (conf / "20-other.conf").write_text(json.dumps({"cniVersion": "0.4.0", "name": "other", "type": "bridge"}))
    (conf / "10-net.conflist").write_text(json.dumps(CONFLIST))
    (conf / "00-ignored.txt").write_text("not a config")
    answer = evaluate(str(conf), [str(plugins)])
    assert answer.ready
    assert answer.network is not None
    assert answer.network.name == "net1"
    other = evaluate(str(conf), [str(plugins)], "other").network
    assert other is not None
    assert other.name == "other"
    (conf / "10-net.conflist").unlink()
    (conf / "20-other.conf").unlink()
    assert "05-broken.conflist" in evaluate(str(conf), [str(plugins)]).message


@pytest.mark.parametrize(
    ("name", "body", "problem"),
    [
        ("a.conflist", {"cniVersion": "1.0.0", "plugins": [{"type": "x"}]}, "no network 'name'"),
        ("a.conflist", {"name": "n", "plugins": [{"type": "x"}]}, "no 'cniVersion'"),
        ("a.conflist", {"name": "n", "cniVersion": "1.0.0", "plugins": []}, "no 'plugins' list"),
        ("a.conflist", {"name": "n", "cniVersion": "1.0.0", "plugins": [{}]}, "plugins[0] has no plugin 'type'"),
        ("a.conf", {"name": "n", "cniVersion": "1.0.0", "type": "../../bin/sh"}, "invalid plugin type"),
    ],
)
def test_invalid_configs_are_explained(tmp_path, name, body, problem):
    path = tmp_path / name
    path.write_text(json.dumps(body))
    with pytest.raises(NetworkConfigError, match=problem.replace("[", r"\[").replace("]", r"\]")):
        load_file(path)


def test_watcher_sees_a_file_rewritten_in_place(dirs):
    conf, plugins = dirs
    add_plugin(plugins, "bridge")
    add_plugin(plugins, "portmap")
    path = conf / "10-net.conflist"
    path.write_text(json.dumps({**CONFLIST, "plugins": [{"type": "missing"}]}))
    watcher = NetworkWatcher()
    assert not watcher.current(str(conf), [str(plugins)]).ready
    path.write_text(json.dumps(CONFLIST))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert watcher.current(str(conf), [str(plugins)]).ready
