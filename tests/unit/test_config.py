from __future__ import annotations

import asyncio
import os
import resource
from pathlib import Path

import pytest

from cri import config as cfg
from cri.config import Config, ConfigError, ConfigSources
from cri.containers import capabilities
from cri.daemon.live_config import LiveConfig

REPO = Path(__file__).resolve().parents[2]


def sources(
    tmp_path: Path, main: str = "", drop_ins: dict[str, str] | None = None, environ=None, flags=None
) -> ConfigSources:
    main_file = tmp_path / "criopy.yaml"
    main_file.write_text(main)
    drop_dir = tmp_path / "criopy.d"
    drop_dir.mkdir(exist_ok=True)
    for name, text in (drop_ins or {}).items():
        (drop_dir / name).write_text(text)
    return ConfigSources(str(main_file), True, str(drop_dir), environ or {}, flags or {})


def test_defaults_are_valid_and_match_the_design():
    config = cfg.load(ConfigSources(config_file="/nonexistent/criopy.yaml", config_dir="/nonexistent"))
    assert config.listen == "/run/criopy/criopy.sock"
    assert config.root == "/var/lib/criopy"
    assert config.runroot == "/run/criopy"
    assert config.runtime.default_runtime == "runc"
    assert set(config.runtime.runtimes) == {"runc", "crun"}
    assert config.network.cni_plugin_dirs == ["/opt/cni/bin", "/usr/lib/cni"]
    assert config.metrics.port == 9090
    assert config.metrics.address == config.streaming.address == "127.0.0.1"


def test_an_explicit_config_file_must_exist(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        cfg.load(ConfigSources(config_file=str(tmp_path / "missing.yaml"), config_file_explicit=True))


def test_precedence_file_dropin_env_flag(tmp_path):
    s = sources(
        tmp_path,
        main="log:\n  level: warning\nroot: /srv/a\nrunroot: /run/a\n",
        drop_ins={"10-a.yaml": "log:\n  level: error\nroot: /srv/b\n", "20-b.yaml": "root: /srv/c\n"},
        environ={"CRIOPY_LOG_LEVEL": "debug", "HOME": "/root"},
        flags={"root": "/srv/flag"},
    )
    config = cfg.load(s)
    assert config.runroot == "/run/a"  # main file only
    assert config.log.level == "debug"  # env beats drop-ins
    assert config.root == "/srv/flag"  # flags beat everything
    assert cfg.load(sources(tmp_path, main="root: /srv/a\n", drop_ins={"10-a.yaml": "root: /srv/b\n"})).root == "/srv/c"


def test_sections_merge_key_by_key(tmp_path):
    config = cfg.load(
        sources(tmp_path, main="metrics:\n  port: 9999\n", drop_ins={"a.yaml": "metrics:\n  address: 127.0.0.2\n"})
    )
    assert (config.metrics.address, config.metrics.port) == ("127.0.0.2", 9999)


def test_runtime_handlers_merge_by_name(tmp_path):
    config = cfg.load(
        sources(tmp_path, drop_ins={"a.yaml": "runtime:\n  runtimes:\n    kata:\n      path: /usr/bin/kata\n"})
    )
    assert set(config.runtime.runtimes) == {"runc", "crun", "kata"}
    assert config.runtime.runtimes["kata"].root == ""
    assert config.runtime_root("kata") == "/run/criopy/kata"


def test_unknown_key_names_file_and_key(tmp_path):
    s = sources(tmp_path, drop_ins={"50-x.yaml": "network:\n  cni_conf_dir: /x\n"})
    with pytest.raises(ConfigError) as err:
        cfg.load(s)
    assert err.value.source.endswith("50-x.yaml")
    assert err.value.key == "network.cni_conf_dir"
    assert "unknown key" in str(err.value)


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("metrics:\n  port: '80'\n", "metrics.port", "expected integer, got str"),
        ("metrics:\n  port: true\n", "metrics.port", "expected integer, got bool"),
        ("network:\n  cni_plugin_dirs: /opt/cni/bin\n", "network.cni_plugin_dirs", "expected list of string"),
        ("network:\n  cni_plugin_dirs: [/a, 3]\n", "network.cni_plugin_dirs[1]", "expected string"),
        ("log:\n  level: loud\n", "log.level", "must be one of debug, info, warning, error"),
        ("runtime:\n  default_runtime: kata\n", "runtime.default_runtime", "is not a key of runtime.runtimes"),
        ("runtime:\n  runtimes:\n    runc:\n      pth: x\n", "runtime.runtimes.runc.pth", "unknown key"),
        ("image:\n  registries:\n  - location: x\n", "image.registries[0].prefix", "must not be empty"),
        ("root: relative/dir\n", "root", "must be an absolute path"),
        ("image:\n  max_concurrent_downloads: 0\n", "image.max_concurrent_downloads", "must be at least 1"),
        ("streaming:\n  port: 70000\n", "streaming.port", "between 0 and 65535"),
        ("runtime:\n  default_sysctls: [net.ipv4.ip_forward]\n", "runtime.default_sysctls[0]", "expected key=value"),
        ("runtime:\n  default_ulimits: [files=10]\n", "runtime.default_ulimits[0]", "with a name among"),
        ("runtime:\n  default_ulimits: [nofile=10:5]\n", "runtime.default_ulimits[0]", "above hard limit"),
        ("runtime:\n  default_ulimits: [nofile=many]\n", "runtime.default_ulimits[0]", "is not a number"),
        ("runtime:\n  default_ulimits: [core=0, core=1]\n", "runtime.default_ulimits[1]", "core is given twice"),
        ("offload_cpus: some\n", "offload_cpus", "expected 'auto', 'all', or CPU numbers"),
        ("offload_cpus: 0-9000\n", "offload_cpus", "CPU 9000 is above 8191"),
        ("log: debug\n", "log", "expected mapping"),
        ("- a list\n", "-", "must hold a mapping"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key, problem):
    with pytest.raises(ConfigError) as err:
        cfg.load(sources(tmp_path, main=text))
    assert err.value.key == key
    assert problem in str(err.value)
    assert str(tmp_path / "criopy.yaml") in str(err.value)


def test_offload_cpus_outside_this_process_load_and_are_left_to_the_daemons_start(tmp_path):
    # A reload or a CLI command may run with other CPUs than the daemon: only the daemon's start checks them.
    outside = max(os.sched_getaffinity(0)) + 1
    config = cfg.load(sources(tmp_path, main=f"offload_cpus: '{outside}'\n"))
    assert config.offload_cpus == str(outside)


def test_offload_cpus_may_be_a_plain_number_in_yaml_the_environment_or_a_flag(tmp_path):
    # `offload_cpus: 1` is how a user writes one CPU; YAML (and so the environment and flags) reads it as an
    # integer, which a text key used to refuse ("expected string, got int 1").
    assert cfg.load(sources(tmp_path, main="offload_cpus: 1\n")).offload_cpus == "1"
    assert cfg.load(sources(tmp_path, environ={"CRIOPY_OFFLOAD_CPUS": "0"})).offload_cpus == "0"
    assert cfg.load(sources(tmp_path, flags={"offload_cpus": 1})).offload_cpus == "1"
    with pytest.raises(ConfigError, match="expected string, got bool True"):
        cfg.load(sources(tmp_path, main="offload_cpus: true\n"))


def test_registries_parse_with_mirrors(tmp_path):
    text = (
        "image:\n  registries:\n  - prefix: registry.k8s.io\n    mirrors:\n"
        "    - location: 127.0.0.1:5000\n      insecure: true\n  - prefix: evil.example\n    blocked: true\n"
    )
    registries = cfg.load(sources(tmp_path, main=text)).image.registries
    assert registries[0].mirrors[0].location == "127.0.0.1:5000"
    assert registries[0].mirrors[0].insecure is True
    assert registries[1].blocked is True


def test_env_values_are_yaml_and_unknown_variables_are_errors(tmp_path):
    config = cfg.load(
        sources(tmp_path, environ={"CRIOPY_NETWORK_CNI_PLUGIN_DIRS": "[/a, /b]", "CRIOPY_METRICS_PORT": "0"})
    )
    assert config.network.cni_plugin_dirs == ["/a", "/b"]
    assert config.metrics.port == 0
    with pytest.raises(ConfigError, match="CRIOPY_LOG_LEVLE"):
        cfg.load(sources(tmp_path, environ={"CRIOPY_LOG_LEVLE": "debug"}))


def test_flag_values_are_checked_too(tmp_path):
    with pytest.raises(ConfigError) as err:
        cfg.load(sources(tmp_path, flags={"runtime.cgroup_manager": "cgroupv3"}))
    assert err.value.key == "runtime.cgroup_manager"
    assert "flag" in err.value.source


def test_shipped_default_file_is_in_sync_with_the_code():
    assert (REPO / "conf" / "criopy.yaml").read_text() == cfg.render_defaults()


def test_shipped_default_file_loads_to_the_defaults(tmp_path):
    loaded = cfg.load(ConfigSources(str(REPO / "conf" / "criopy.yaml"), True, str(tmp_path)))
    assert loaded == Config()


def test_readme_reference_table_is_in_sync():
    assert cfg.render_reference_table() in (REPO / "README.md").read_text()


def test_every_option_is_documented():
    for key, f in cfg.leaf_keys():
        assert f.metadata["doc"].strip(), key


def reload_in(tmp_path: Path, first: str, second: str) -> tuple[LiveConfig, bool, list[Config]]:
    s = sources(tmp_path, main=first)
    live = LiveConfig(cfg.load(s), s)
    seen: list[Config] = []

    async def listener(new: Config) -> None:
        seen.append(new)

    live.on_reload(listener)
    Path(s.config_file).write_text(second)
    ok = asyncio.run(live.reload())
    return live, ok, seen


def test_reload_applies_reloadable_keys_and_keeps_the_rest(tmp_path):
    live, ok, seen = reload_in(tmp_path, "log:\n  level: info\n", "log:\n  level: debug\nlisten: /run/other.sock\n")
    assert ok
    assert live.current.log.level == "debug"
    assert live.current.listen == "/run/criopy/criopy.sock"  # needs a restart
    assert seen == [live.current]


def test_reload_of_a_bad_file_keeps_everything(tmp_path):
    live, ok, seen = reload_in(tmp_path, "log:\n  level: info\n", "log:\n  level: debug\nbogus: 1\n")
    assert not ok
    assert live.current.log.level == "info"
    assert seen == []


def test_reload_is_all_or_nothing_across_keys(tmp_path):
    # Every key is well-typed, but default_runtime names no handler: neither the new log level
    # nor anything else of the file may be applied.
    live, ok, _ = reload_in(
        tmp_path,
        "runtime:\n  runtimes:\n    extra:\n      path: runc\n",
        "log:\n  level: debug\nruntime:\n  default_runtime: missing\n",
    )
    assert not ok
    assert live.current.log.level == "info"
    assert "extra" in live.current.runtime.runtimes


def test_a_default_ulimit_above_what_the_host_lets_raise_is_refused_at_load(tmp_path):
    """Without CAP_SYS_RESOURCE (as on the CI machines) runc could not set it: every container would fail."""
    _, ours = resource.getrlimit(resource.RLIMIT_NOFILE)
    text = f"runtime:\n  default_ulimits: [nofile=1024:{ours}]\n"
    assert cfg.load(sources(tmp_path, main=text)).runtime.default_ulimits == [f"nofile=1024:{ours}"]
    above = f"runtime:\n  default_ulimits: [nofile=1024:{ours + 1}]\n"
    if capabilities.has_effective("CAP_SYS_RESOURCE"):
        cfg.load(sources(tmp_path, main=above))  # runc may raise it here
        return
    with pytest.raises(ConfigError, match="withholds CAP_SYS_RESOURCE") as err:
        cfg.load(sources(tmp_path, main=above))
    assert err.value.key == "runtime.default_ulimits[0]"
