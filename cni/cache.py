"""The on-disk cache of attachments, in libcni's format (kind "cniCacheV1").

One file per attachment, `<cache_dir>/results/<network>-<container id>-<ifname>`,
holding the config the plugins ran with, the CNI_ARGS, the capability args and
the final result. DEL and CHECK read it back (the result becomes prevResult);
a successful DEL removes it. Files are replaced atomically (temp file, fsync,
rename, fsync of the directory), so a crash leaves the old entry or the new
one, never half of one.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cni.events import event

log = logging.getLogger(__name__)

CACHE_KIND = "cniCacheV1"


@dataclass(frozen=True)
class CacheEntry:
    network_name: str
    container_id: str
    ifname: str
    config: bytes
    cni_args: dict[str, str] = field(default_factory=dict)
    capability_args: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "kind": CACHE_KIND,
            "containerId": self.container_id,
            "config": base64.b64encode(self.config).decode(),
            "ifName": self.ifname,
            "networkName": self.network_name,
            "cniArgs": [[k, v] for k, v in self.cni_args.items()],
        }
        if self.capability_args:
            data["capabilityArgs"] = self.capability_args
        if self.result is not None:
            data["result"] = self.result
        return data

    @classmethod
    def from_json(cls, data: Any) -> CacheEntry:
        """Parse a cache file's JSON; ValueError when it is not a cniCacheV1 entry."""
        if not isinstance(data, dict) or data.get("kind") != CACHE_KIND:
            raise ValueError(f"not a {CACHE_KIND} entry")
        strings = {key: data.get(key) for key in ("containerId", "ifName", "networkName", "config")}
        for key, value in strings.items():
            if not isinstance(value, str):
                raise ValueError(f"{key} is not a string")
        try:
            config = base64.b64decode(str(data["config"]), validate=True)
        except binascii.Error as exc:
            raise ValueError(f"config is not base64: {exc}") from None
        pairs = data.get("cniArgs") or []
        if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in pairs
        ):
            raise ValueError("cniArgs is not a list of [key, value] pairs")
        capability_args = data.get("capabilityArgs") or {}
        if not isinstance(capability_args, dict):
            raise ValueError("capabilityArgs is not an object")
        result = data.get("result")
        if result is not None and not isinstance(result, dict):
            raise ValueError("result is not an object")
        return cls(
            network_name=str(data["networkName"]),
            container_id=str(data["containerId"]),
            ifname=str(data["ifName"]),
            config=config,
            cni_args={k: v for k, v in pairs},
            capability_args=capability_args,
            result=result,
        )


def fsync_dir(directory: str | os.PathLike[str]) -> None:
    """Make a rename or unlink in `directory` durable (the entry lives in the directory, not the file)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultCache:
    def __init__(self, cache_dir: str | os.PathLike[str]) -> None:
        self.cache_dir = Path(cache_dir)

    def path(self, network_name: str, container_id: str, ifname: str) -> Path:
        for what, value in (("network name", network_name), ("container id", container_id), ("ifname", ifname)):
            if not value or "/" in value or value in (".", ".."):
                raise ValueError(f"{what} {value!r} cannot name a cache file")
        return self.cache_dir / "results" / f"{network_name}-{container_id}-{ifname}"

    def write(self, entry: CacheEntry) -> Path:
        path = self.path(entry.network_name, entry.container_id, entry.ifname)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        data = json.dumps(entry.to_json()).encode()
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        fsync_dir(path.parent)
        return path

    def remove_partial_writes(self) -> list[str]:
        """Delete the temp files of writes a crash cut short (the entries they replace are intact)."""
        results = self.cache_dir / "results"
        if not results.is_dir():
            return []
        removed = []
        for temp in results.glob(".*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
                removed.append(str(temp))
        return removed

    def read(self, network_name: str, container_id: str, ifname: str) -> CacheEntry | None:
        """The cached entry; None when there is none or it is unreadable (logged: DEL must still go on)."""
        path = self.path(network_name, container_id, ifname)
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            event(log, logging.WARNING, "cni cache entry unreadable", path=str(path), error=str(exc))
            return None
        try:
            return CacheEntry.from_json(json.loads(raw))
        except ValueError as exc:
            event(log, logging.WARNING, "cni cache entry corrupt", path=str(path), error=str(exc))
            return None

    def remove(self, network_name: str, container_id: str, ifname: str) -> None:
        path = self.path(network_name, container_id, ifname)
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)
