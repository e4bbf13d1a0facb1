"""Attaching containers to a CNI network list: ADD, DEL, CHECK, STATUS, VERSION (like libcni's CNIConfig).

ADD runs the plugins in order, each getting the previous one's result as
prevResult, and caches the final result. When plugin k fails, plugins k..0 get
DEL in reverse order (best effort) so nothing stays allocated, and the
original error is raised. DEL runs the plugins in reverse order with the cached
result as prevResult, works without a cache entry and without the netns, and
removes the entry once every plugin succeeded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from cni.cache import CacheEntry, ResultCache
from cni.conf import NetworkConfigList, PluginConf
from cni.events import event
from cni.invoke import (
    CallHooks,
    Invocation,
    exec_version,
    exec_with_result,
    exec_without_result,
    format_args,
    off_loop,
    plugin_config,
)
from cni.result import CniError, Result, ResultError, result_from_dict

log = logging.getLogger(__name__)

MAX_IFNAME = 15  # IFNAMSIZ - 1
_CONTAINER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def version_tuple(version: str) -> tuple[int, ...]:
    """'1.0.0' -> (1, 0, 0); an unparsable version sorts lowest."""
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        return (0,)


def validate_attachment(container_id: str, ifname: str, netns: str | None = None) -> None:
    """ValueError naming the parameter when one cannot be used (netns only checked when given)."""
    if not container_id:
        raise ValueError("container_id must not be empty")
    if not _CONTAINER_ID.match(container_id):
        raise ValueError(f"container_id {container_id!r} has characters other than letters, digits, '_', '.', '-'")
    if not ifname:
        raise ValueError("ifname must not be empty")
    if len(ifname) > MAX_IFNAME:
        raise ValueError(f"ifname {ifname!r} is longer than {MAX_IFNAME} characters")
    if ifname in (".", "..") or any(c in "/:" or c.isspace() for c in ifname):
        raise ValueError(f"ifname {ifname!r} is not a valid interface name")
    if netns is not None and not netns:
        raise ValueError("netns must not be empty")


@dataclass(frozen=True)
class _Attachment:
    container_id: str
    netns: str
    ifname: str
    args: dict[str, str]
    caps: dict[str, Any]

    @classmethod
    def of(
        cls,
        container_id: str,
        netns: str,
        ifname: str,
        *,
        args: Mapping[str, str] | None,
        capabilities: Mapping[str, Any] | None,
        entry: CacheEntry | None,
    ) -> _Attachment:
        """Explicit args and capabilities win; otherwise the ones ADD cached, if any."""
        cached_args = entry.cni_args if entry is not None else {}
        cached_caps = entry.capability_args if entry is not None else {}
        return cls(
            container_id,
            netns,
            ifname,
            dict(args if args is not None else cached_args),
            dict(capabilities if capabilities is not None else cached_caps),
        )


class CniNetwork:
    """One network config list, the plugin dirs to find its binaries in, and the result cache."""

    def __init__(
        self,
        network: NetworkConfigList,
        plugin_dirs: Sequence[str],
        cache_dir: str | os.PathLike[str],
        timeout: float = 60.0,
        hooks: CallHooks | None = None,
    ) -> None:
        self.network = network
        self.plugin_dirs = tuple(plugin_dirs)
        self.cache = ResultCache(cache_dir)
        self.timeout = timeout
        self.hooks = hooks or CallHooks()

    @property
    def name(self) -> str:
        return self.network.name

    def _inv(self, plugin: str, command: str, att: _Attachment | None = None) -> Invocation:
        return Invocation(
            plugin_type=plugin,
            command=command,
            plugin_dirs=self.plugin_dirs,
            timeout=self.timeout,
            container_id=att.container_id if att else "",
            netns=att.netns if att else "",
            ifname=att.ifname if att else "",
            args=dict(att.args) if att else {},
            network=self.network.name,
            hooks=self.hooks,
        )

    def _stdin(
        self, plugin: PluginConf, prev_result: Mapping[str, Any] | None, capabilities: Mapping[str, Any] | None
    ) -> bytes:
        return json.dumps(plugin_config(self.network, plugin, prev_result, capabilities)).encode()

    def _at_least(self, version: str) -> bool:
        return version_tuple(self.network.cni_version) >= version_tuple(version)

    async def add(
        self,
        container_id: str,
        netns: str,
        ifname: str,
        args: Mapping[str, str] | None = None,
        capabilities: Mapping[str, Any] | None = None,
    ) -> Result:
        validate_attachment(container_id, ifname, netns)
        att = _Attachment(container_id, netns, ifname, dict(args or {}), dict(capabilities or {}))
        format_args(att.args)  # ValueError now rather than from the first plugin call
        plugins = self.network.plugins
        result: Result | None = None
        done = 0  # plugins whose ADD succeeded
        try:
            for plugin in plugins:
                prev = result.raw if result is not None else None
                result = await exec_with_result(self._inv(plugin.type, "ADD", att), self._stdin(plugin, prev, att.caps))
                done += 1
            assert result is not None
            await _off_loop(
                self.hooks,
                self.cache.write,
                CacheEntry(
                    network_name=self.network.name,
                    container_id=container_id,
                    ifname=ifname,
                    config=json.dumps(self.network.raw).encode(),
                    cni_args=att.args,
                    capability_args=att.caps,
                    result=result.raw,
                ),
            )
        except (Exception, asyncio.CancelledError) as exc:
            # The plugin that failed may have allocated something before failing: undo it too.
            undo = plugins[: min(done + 1, len(plugins))]
            await asyncio.shield(self._rollback(exc, undo, att, result))
            raise
        return result

    async def _rollback(
        self, error: BaseException, plugins: Sequence[PluginConf], att: _Attachment, result: Result | None
    ) -> None:
        event(
            log,
            logging.WARNING,
            "cni add failed, undoing",
            network=self.network.name,
            container_id=att.container_id,
            ifname=att.ifname,
            plugins=",".join(p.type for p in reversed(plugins)),
            error=str(error) or type(error).__name__,
        )
        prev = result.raw if result is not None and self._at_least("0.4.0") else None
        for plugin in reversed(plugins):
            try:
                await exec_without_result(self._inv(plugin.type, "DEL", att), self._stdin(plugin, prev, att.caps))
            except CniError as exc:  # logged by the invocation; the original error is what gets raised
                error.add_note(f"while undoing: {exc}")
        try:
            await _off_loop(self.hooks, self.cache.remove, self.network.name, att.container_id, att.ifname)
        except OSError as exc:
            error.add_note(f"while undoing: cannot remove the cache entry: {exc}")

    async def delete(
        self,
        container_id: str,
        netns: str,
        ifname: str,
        args: Mapping[str, str] | None = None,
        capabilities: Mapping[str, Any] | None = None,
    ) -> None:
        """DEL on every plugin in reverse order; args/capabilities default to the cached ones."""
        validate_attachment(container_id, ifname)
        entry = await _off_loop(self.hooks, self.cache.read, self.network.name, container_id, ifname)
        att = _Attachment.of(container_id, netns, ifname, args=args, capabilities=capabilities, entry=entry)
        format_args(att.args)
        # The cached result is passed on DEL from spec 0.4.0 on, as libcni does.
        prev = entry.result if entry is not None and self._at_least("0.4.0") else None
        errors: list[CniError] = []
        for plugin in reversed(self.network.plugins):
            try:
                await exec_without_result(self._inv(plugin.type, "DEL", att), self._stdin(plugin, prev, att.caps))
            except CniError as exc:  # go on: the other plugins may still free what they hold
                errors.append(exc)
        if errors:
            for other in errors[1:]:
                errors[0].add_note(f"also: {other}")
            raise errors[0]
        await _off_loop(self.hooks, self.cache.remove, self.network.name, container_id, ifname)

    async def check(
        self,
        container_id: str,
        netns: str,
        ifname: str,
        args: Mapping[str, str] | None = None,
        capabilities: Mapping[str, Any] | None = None,
    ) -> None:
        """CHECK every plugin in order against the cached result (spec 0.4.0 and later)."""
        validate_attachment(container_id, ifname, netns)
        if not self._at_least("0.4.0"):
            raise CniError(f"network {self.network.name}: cniVersion {self.network.cni_version} does not support CHECK")
        if self.network.raw.get("disableCheck") is True:
            return
        entry = self.cache.read(self.network.name, container_id, ifname)
        if entry is None or entry.result is None:
            raise CniError(f"network {self.network.name}: no cached result for {container_id}/{ifname} to CHECK")
        att = _Attachment.of(container_id, netns, ifname, args=args, capabilities=capabilities, entry=entry)
        for plugin in self.network.plugins:
            await exec_without_result(self._inv(plugin.type, "CHECK", att), self._stdin(plugin, entry.result, att.caps))

    async def status(self) -> None:
        """STATUS on every plugin (spec 1.1.0 and later; nothing to ask before that)."""
        if not self._at_least("1.1.0"):
            return
        for plugin in self.network.plugins:
            await exec_without_result(self._inv(plugin.type, "STATUS"), self._stdin(plugin, None, None))

    async def version(self, plugin_type: str) -> list[str]:
        """The spec versions a plugin binary supports (VERSION)."""
        return await exec_version(self._inv(plugin_type, "VERSION"), self.network.cni_version)

    def cached_result(self, container_id: str, ifname: str) -> Result | None:
        """The result cached by ADD, or None (no entry, or one that no longer parses)."""
        validate_attachment(container_id, ifname)
        entry = self.cache.read(self.network.name, container_id, ifname)
        if entry is None or entry.result is None:
            return None
        try:
            return result_from_dict(entry.result)
        except ResultError as exc:
            event(log, logging.WARNING, "cni cached result unusable", network=self.network.name, error=str(exc))
            return None


T = TypeVar("T")


async def _off_loop(hooks: CallHooks, blocking: Callable[..., T], *args: Any) -> T:
    """A cache file operation (each write and removal ends in an fsync) in a thread, off the caller's event
    loop. A cancelled caller still waits for it to end, so that an undo that follows never races it."""
    job = off_loop(partial(blocking, *args), hooks)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        await asyncio.wait([job])
        raise
