"""Loading and validating CNI network configurations the way libcni does.

The conf dir's files with extension .conflist, .conf or .json are read in
lexical order; a .conf/.json holding a single plugin is wrapped as a
one-plugin list.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_EXTENSIONS = (".conflist", ".conf", ".json")


class NetworkConfigError(Exception):
    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


@dataclass(frozen=True)
class PluginConf:
    type: str
    raw: dict[str, Any]


@dataclass(frozen=True)
class NetworkConfigList:
    name: str
    cni_version: str
    plugins: tuple[PluginConf, ...]
    path: Path
    raw: dict[str, Any] = field(compare=False)


def config_files(conf_dir: str) -> list[Path]:
    directory = Path(conf_dir)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.suffix in CONFIG_EXTENSIONS and p.is_file())


def _plugin(path: Path, raw: Any, where: str) -> PluginConf:
    if not isinstance(raw, dict):
        raise NetworkConfigError(path, f"{where} must be a JSON object")
    plugin_type = raw.get("type")
    if not isinstance(plugin_type, str) or not plugin_type:
        raise NetworkConfigError(path, f"{where} has no plugin 'type'")
    if "/" in plugin_type or plugin_type in (".", ".."):
        raise NetworkConfigError(path, f"{where} has an invalid plugin type {plugin_type!r}")
    return PluginConf(type=plugin_type, raw=raw)


def load_file(path: Path) -> NetworkConfigList:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NetworkConfigError(path, f"cannot be read: {exc.strerror}") from exc
    return parse(data, path, is_list=path.suffix == ".conflist")


def parse(data: bytes, path: Path, *, is_list: bool | None = None) -> NetworkConfigList:
    """A network config from its JSON; is_list=None decides by the presence of 'plugins' (cached configs)."""
    try:
        raw = json.loads(data)
    except ValueError as exc:
        raise NetworkConfigError(path, f"cannot be read as JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise NetworkConfigError(path, "must hold a JSON object")
    name, version = raw.get("name"), raw.get("cniVersion")
    if not isinstance(name, str) or not name:
        raise NetworkConfigError(path, "has no network 'name'")
    if not isinstance(version, str) or not version:
        raise NetworkConfigError(path, "has no 'cniVersion'")
    if is_list is None:
        is_list = "plugins" in raw
    if is_list:
        plugins_raw = raw.get("plugins")
        if not isinstance(plugins_raw, list) or not plugins_raw:
            raise NetworkConfigError(path, "has no 'plugins' list")
        plugins = tuple(_plugin(path, p, f"plugins[{i}]") for i, p in enumerate(plugins_raw))
    else:
        plugins = (_plugin(path, raw, "the config"),)
    return NetworkConfigList(name=name, cni_version=version, plugins=plugins, path=path, raw=raw)


def find_plugin(plugin_type: str, plugin_dirs: list[str]) -> Path | None:
    for directory in plugin_dirs:
        candidate = Path(directory) / plugin_type
        if candidate.is_file() and candidate.stat().st_mode & 0o111:
            return candidate
    return None
