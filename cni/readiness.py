"""Whether a usable CNI network exists: a valid config whose plugin binaries are all present.

Network add-ons install their config late, so the answer is re-evaluated
whenever the conf dir or a plugin dir changes (detected from their stat
fingerprint on each call; a few stat calls, no parsing when nothing changed).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from cni.conf import NetworkConfigError, NetworkConfigList, config_files, find_plugin, load_file
from cni.events import event

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NetworkReadiness:
    ready: bool
    reason: str
    message: str
    network: NetworkConfigList | None = None


def evaluate(conf_dir: str, plugin_dirs: list[str], network_name: str = "") -> NetworkReadiness:
    problems: list[str] = []
    for path in config_files(conf_dir):
        try:
            network = load_file(path)
        except NetworkConfigError as exc:
            problems.append(str(exc))
            continue
        if network_name and network.name != network_name:
            continue
        missing = [p.type for p in network.plugins if find_plugin(p.type, plugin_dirs) is None]
        if missing:
            return NetworkReadiness(
                False,
                "NetworkPluginNotReady",
                f"network {network.name!r} ({path}): plugin(s) {', '.join(missing)} not found in "
                f"{', '.join(plugin_dirs)}",
                network,
            )
        return NetworkReadiness(True, "", "", network)
    wanted = f"network {network_name!r}" if network_name else "network config"
    message = f"no valid CNI {wanted} found in {conf_dir}"
    if problems:
        message += ": " + "; ".join(problems)
    return NetworkReadiness(False, "NetworkPluginNotReady", message)


def _fingerprint(conf_dir: str, plugin_dirs: list[str]) -> tuple[object, ...]:
    parts: list[object] = []
    for directory in (conf_dir, *plugin_dirs):
        try:
            st = os.stat(directory)
            parts.append((directory, st.st_mtime_ns, st.st_ino))
        except OSError:
            parts.append((directory, None))
    # Files rewritten in place do not touch the directory's mtime.
    for path in config_files(conf_dir):
        try:
            st = path.stat()
            parts.append((path.name, st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            continue
    return tuple(parts)


class NetworkWatcher:
    """Caches the readiness answer until the watched directories change."""

    def __init__(self) -> None:
        self._key: tuple[object, ...] | None = None
        self._answer: NetworkReadiness | None = None

    def current(self, conf_dir: str, plugin_dirs: list[str], network_name: str = "") -> NetworkReadiness:
        key = (conf_dir, tuple(plugin_dirs), network_name, _fingerprint(conf_dir, plugin_dirs))
        if key != self._key or self._answer is None:
            answer = evaluate(conf_dir, plugin_dirs, network_name)
            if self._answer is None or answer.ready != self._answer.ready:
                event(
                    log,
                    logging.INFO,
                    "network readiness changed",
                    ready=answer.ready,
                    network=answer.network.name if answer.network else None,
                    config=str(answer.network.path) if answer.network else None,
                    reason=answer.reason or None,
                    message=answer.message or None,
                )
            self._key, self._answer = key, answer
        return self._answer
