"""The config in force, and its all-or-nothing reload on SIGHUP."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable

from cri import config as cfg
from cri.config import Config, ConfigError, ConfigSources
from cri.log import event
from cri.system import offload

log = logging.getLogger(__name__)

ReloadListener = Callable[[Config], Awaitable[None]]


class LiveConfig:
    def __init__(self, current: Config, sources: ConfigSources) -> None:
        self.current = current
        self.sources = sources
        self._listeners: list[ReloadListener] = []
        self._lock = asyncio.Lock()

    def on_reload(self, listener: ReloadListener) -> None:
        self._listeners.append(listener)

    async def reload(self) -> bool:
        """Load every source again; apply the reloadable keys only if the whole new config is valid."""
        async with self._lock:
            try:
                loaded = await offload.to_thread(cfg.load, self.sources)
            except ConfigError as exc:
                event(log, logging.ERROR, "config reload failed, keeping the current config", error=str(exc))
                return False
            changed = cfg.changed_keys(self.current, loaded)
            reloadable = set(cfg.reloadable_keys())
            needs_restart = [k for k in changed if k not in reloadable]
            merged = copy.deepcopy(self.current)
            for key in reloadable:
                cfg.set_option(merged, key, copy.deepcopy(cfg.get_option(loaded, key)))
            try:
                cfg.validate(merged)
            except ConfigError as exc:
                event(log, logging.ERROR, "config reload failed, keeping the current config", error=str(exc))
                return False
            self.current = merged
            event(
                log,
                logging.INFO,
                "config reloaded",
                changed=",".join(k for k in changed if k in reloadable) or "none",
                needs_restart=",".join(needs_restart) or None,
            )
            for listener in self._listeners:
                await listener(merged)
            return True
