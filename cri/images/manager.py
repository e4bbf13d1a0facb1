"""Pulling, listing and removing images: the registry client, the content store, the layer store and the index.

A pull resolves the reference, fetches the platform's manifest, downloads the
config and layer blobs (concurrently, once per digest even across concurrent
pulls), unpacks each layer once per chain ID in a worker thread, and records
the image. Removal frees the layers and blobs no remaining image holds. Pulls
in flight hold their blobs and chains so a concurrent removal cannot free them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cri import metrics
from cri.config import Config
from cri.images import reference
from cri.images.auth import Credentials
from cri.images.content import ContentStore
from cri.images.index import ImageIndex, ImageRecord, LayerRef
from cri.images.registry import Manifest, RegistryClient, Resolved
from cri.log import event
from cri.state import Store
from cri.storage.layers import LayerStore, chain_ids, tree_usage
from cri.storage.unpack import is_foreign
from cri.system import faults
from cri.system.linux import mounts

log = logging.getLogger(__name__)

PARALLEL_DOWNLOADS = 3
FS_USAGE_INTERVAL = 60.0


class ImageInUse(Exception):
    pass


class BadImage(Exception):
    """The registry served something that is not a usable image (the message says what)."""


@dataclass(frozen=True)
class FsUsage:
    mountpoint: str
    used_bytes: int
    inodes_used: int
    timestamp: int


class _CountingSink:
    """Counts the bytes that really crossed the network, for the pull metrics."""

    def __init__(self, sink: Any) -> None:
        self._sink = sink

    async def write(self, chunk: bytes) -> None:
        metrics.IMAGE_PULL_BYTES.inc(len(chunk))
        await self._sink.write(chunk)

    async def reset(self) -> None:
        await self._sink.reset()


class ImageManager:
    def __init__(self, config: Config, store: Store, in_use: Callable[[str], bool] = lambda _id: False) -> None:
        root = Path(config.root)
        self.content = ContentStore(root)
        self.layers = LayerStore(root, "vfs" if config.storage.driver == "vfs" else "overlay")
        self.index = ImageIndex(store)
        self.client = RegistryClient(
            config.image, certs_dirs=config.image.certs_dirs, progress_timeout=config.image.pull_progress_timeout
        )
        self._config = config
        self._in_use = in_use
        self._pulls: dict[str, asyncio.Task[ImageRecord]] = {}
        self._held: Counter[str] = Counter()  # blobs and chains of pulls in flight
        self._lock = asyncio.Lock()  # recording an image vs freeing layers
        self._fs: tuple[FsUsage, FsUsage] | None = None
        self._fs_task: asyncio.Task[None] | None = None
        self._fs_wakeup = asyncio.Event()

    async def start(self) -> None:
        await asyncio.to_thread(self._recover)
        self._fs_task = asyncio.create_task(self._fs_loop(), name="image-fs-usage")

    def _recover(self) -> None:
        self.content.cleanup_ingest()
        self.layers.cleanup_temp()
        self.index.load()
        self._free_unreferenced()
        event(log, logging.INFO, "images loaded", count=len(self.index.all()))

    async def close(self) -> None:
        if self._fs_task is not None:
            self._fs_task.cancel()
            await asyncio.gather(self._fs_task, return_exceptions=True)
        await self.client.aclose()

    def reconfigure(self, config: Config) -> None:
        """SIGHUP: registries and the auth file apply from the next pull."""
        self.client.config = config.image
        self._config = config

    # ---- lookups ------------------------------------------------------------------------------

    def find(self, text: str) -> ImageRecord | None:
        """By tag, repo digest, ID or ID prefix; ReferenceError for text that is neither."""
        return self.index.resolve(text)

    def images(self) -> list[ImageRecord]:
        return self.index.all()

    def lower_dirs(self, image: ImageRecord) -> list[Path]:
        return self.layers.lower_dirs(image.chain_ids)

    # ---- pull ---------------------------------------------------------------------------------

    async def pull(self, text: str, credentials: Credentials | None) -> ImageRecord:
        """Pull (once: concurrent pulls of one reference share the work) and record the image."""
        ref = reference.parse(text)
        key = ref.string()
        task = self._pulls.get(key)
        if task is None:
            task = asyncio.create_task(self._pull(ref, credentials), name=f"pull-{key}")
            self._pulls[key] = task
            task.add_done_callback(lambda _t: self._pulls.pop(key, None))
        return await asyncio.shield(task)

    async def _pull(self, ref: reference.Reference, credentials: Credentials | None) -> ImageRecord:
        started = time.monotonic()
        try:
            record = await self._fetch_and_record(ref, credentials)
        except BaseException as exc:
            metrics.IMAGE_PULLS.labels(outcome="failure").inc()
            event(log, logging.WARNING, "image pull failed", image=ref.string(), error=str(exc) or type(exc).__name__)
            if isinstance(exc, Exception):
                # Undone like a removal: the blobs and layers it stored that no image (nor other pull) holds.
                async with self._lock:
                    try:
                        await asyncio.to_thread(self._free_unreferenced)
                    except OSError as cleanup:  # the pull's own error is the one to answer with
                        event(log, logging.WARNING, "freeing a failed pull's blobs failed", error=str(cleanup))
            raise
        seconds = time.monotonic() - started
        metrics.IMAGE_PULLS.labels(outcome="success").inc()
        metrics.IMAGE_PULL_SECONDS.observe(seconds)
        event(
            log,
            logging.INFO,
            "image pulled",
            image=ref.string(),
            image_id=record.id,
            size=record.size,
            duration_ms=round(seconds * 1000, 1),
        )
        self._fs_wakeup.set()
        return record

    async def _fetch_and_record(self, ref: reference.Reference, credentials: Credentials | None) -> ImageRecord:
        resolved = await self.client.resolve(ref, credentials)
        manifest = await self.client.platform_manifest(resolved)
        body = manifest.json()
        config_desc, layer_descs = _descriptors(body, manifest.digest)
        blobs = [resolved.manifest_digest, manifest.digest, config_desc["digest"]]
        blobs += [d["digest"] for d in layer_descs if not is_foreign(d["mediaType"])]
        self._hold(blobs)
        try:
            await self._fetch(resolved, config_desc)
            config = _parse_config(await asyncio.to_thread(self.content.read, config_desc["digest"]))
            layers = _layer_refs(layer_descs, config, manifest.digest)
            self._hold(layer.chain_id for layer in layers)
            try:
                await self._fetch_layers(resolved, layer_descs)
                faults.point("image.pull.fetched")
                await self._unpack(layers)
                faults.point("image.pull.unpacked")
                await self.content.put_bytes(resolved.manifest_digest, resolved.body)
                if manifest.digest != resolved.manifest_digest:
                    await self.content.put_bytes(manifest.digest, manifest.body)
                return await self._record(
                    ref,
                    resolved,
                    manifest,
                    config_desc=config_desc,
                    layers=layers,
                    config=config,
                    blobs=blobs,
                    annotations=body.get("annotations") or {},
                )
            finally:
                self._release(layer.chain_id for layer in layers)
        finally:
            self._release(blobs)

    async def _fetch(self, resolved: Resolved, desc: Mapping[str, Any]) -> None:
        async def fetch(sink: Any) -> None:
            await self.client.fetch_blob(resolved.endpoint, desc, _CountingSink(sink))

        await self.content.ensure(desc["digest"], int(desc["size"]), fetch)

    async def _fetch_layers(self, resolved: Resolved, descs: list[dict[str, Any]]) -> None:
        limit = asyncio.Semaphore(PARALLEL_DOWNLOADS)

        async def one(desc: dict[str, Any]) -> None:
            async with limit:
                await self._fetch(resolved, desc)

        try:
            async with asyncio.TaskGroup() as group:
                for desc in descs:
                    if not is_foreign(desc["mediaType"]):
                        group.create_task(one(desc))
        except ExceptionGroup as group:
            # The first layer's failure is the pull's error; the others were cancelled by it.
            first: BaseException = group
            while isinstance(first, BaseExceptionGroup):
                first = first.exceptions[0]
            raise first from None

    async def _unpack(self, layers: list[LayerRef]) -> None:
        parent: str | None = None
        for layer in layers:
            info = await asyncio.to_thread(
                self.layers.ensure,
                layer.chain_id,
                parent,
                self.content.path(layer.digest),
                layer.media_type,
                layer.diff_id,
            )
            (metrics.IMAGE_LAYER_CACHE_HITS if info.cached else metrics.IMAGE_LAYER_UNPACKS).inc()
            parent = layer.chain_id

    async def _record(
        self,
        ref: reference.Reference,
        resolved: Resolved,
        manifest: Manifest,
        *,
        config_desc: Mapping[str, Any],
        layers: list[LayerRef],
        config: dict[str, Any],
        blobs: list[str],
        annotations: Mapping[str, str],
    ) -> ImageRecord:
        names: list[tuple[str, str]] = []
        if ref.tag is not None and ref.digest is None:
            names.append((reference.Reference(ref.domain, ref.path, ref.tag, None).string(), "tag"))
        names.append((ref.with_digest(resolved.manifest_digest).string(), "digest"))
        record = ImageRecord(
            id=str(config_desc["digest"]),
            repo_tags=[],
            repo_digests=[],
            size=len(manifest.body) + int(config_desc["size"]) + sum(layer.size for layer in layers),
            created_at=time.time_ns(),
            manifest_digest=manifest.digest,
            manifest_media_type=manifest.media_type,
            layers=layers,
            config=config,
            annotations=dict(annotations),
            pinned=self._is_pinned(ref),
            blobs=list(dict.fromkeys(blobs)),
        )
        async with self._lock:
            existing = self.index.get(record.id)
            if existing is not None:
                record.pinned = record.pinned or existing.pinned
                record.created_at = existing.created_at
            orphans = await asyncio.to_thread(self.index.put, record, names)
            if orphans:
                await asyncio.to_thread(self._free_unreferenced)
        return record

    def _is_pinned(self, ref: reference.Reference) -> bool:
        pause = self._config.pod.pause_image
        if not pause:
            return False
        try:
            return reference.parse(pause).name == ref.name
        except reference.ReferenceError:
            return False

    def _hold(self, keys: Iterable[str]) -> None:
        self._held.update(keys)

    def _release(self, keys: Iterable[str]) -> None:
        self._held.subtract(keys)
        self._held += Counter()  # drop the zeros

    # ---- remove -------------------------------------------------------------------------------

    async def remove(self, text: str) -> None:
        """Remove a name, or the whole image when named by ID or by its last tag; gone already is fine."""
        record = self.index.resolve(text)
        if record is None:
            return
        async with self._lock:
            name = _name_of(record, text)
            # Like cri-o: a name goes alone while another tag remains; the last tag takes the image
            # (and its repo digests) with it, as a user of `crictl rmi name:tag` expects.
            other_tags = [t for t in record.repo_tags if t != name]
            whole = name is None or not other_tags
            if whole and self._in_use(record.id):
                raise ImageInUse(f"image {text!r} ({record.id}) is used by a container; remove the container first")
            if whole:
                await asyncio.to_thread(self.index.remove, record)
            else:
                assert name is not None
                await asyncio.to_thread(self.index.remove_name, record, name)
            faults.point("image.remove.unindexed")
            freed = await asyncio.to_thread(self._free_unreferenced)
        event(
            log,
            logging.INFO,
            "image removed" if whole else "image name removed",
            image=text,
            image_id=record.id,
            layers_freed=freed,
        )
        self._fs_wakeup.set()

    def _free_unreferenced(self) -> int:
        """Delete layers and blobs that no image, and no pull in flight, holds. Blocking."""
        chains, blobs = self.index.referenced()
        keep = chains | blobs | set(self._held)
        freed = 0
        for chain in self.layers.list():
            if chain not in keep:
                freed += int(self.layers.remove(chain))
        for digest in self.content.list():
            if digest not in keep:
                self.content.delete(digest)
        return freed

    # ---- filesystem usage ---------------------------------------------------------------------

    def fs_usage(self) -> tuple[FsUsage, FsUsage] | None:
        """(image filesystem, container writable layers) as last measured; None before the first walk ends."""
        return self._fs

    async def _fs_loop(self) -> None:
        while True:
            try:
                self._fs = await asyncio.to_thread(self._measure)
            except OSError as exc:
                event(log, logging.WARNING, "image filesystem usage failed", error=str(exc))
            self._fs_wakeup.clear()
            with contextlib.suppress(TimeoutError):  # a pull or removal wakes it early
                await asyncio.wait_for(self._fs_wakeup.wait(), FS_USAGE_INTERVAL)

    def _measure(self) -> tuple[FsUsage, FsUsage]:
        root = Path(self._config.root)
        layer_bytes, layer_inodes = self.layers.usage()
        blob_bytes, blob_inodes = tree_usage(root / "blobs")
        c_bytes, c_inodes = tree_usage(root / "containers")
        now, mountpoint = time.time_ns(), _mountpoint(root)
        images = FsUsage(mountpoint, layer_bytes + blob_bytes, layer_inodes + blob_inodes, now)
        return images, FsUsage(mountpoint, c_bytes, c_inodes, now)


def _name_of(record: ImageRecord, text: str) -> str | None:
    """The record's name that `text` means (normalized), or None when text is an ID."""
    if text in record.names:
        return text
    try:
        ref = reference.parse(text)
    except reference.ReferenceError:
        return None
    candidates = [ref.string()]
    if ref.digest is not None:
        candidates.append(ref.with_digest(ref.digest).string())
    return next((c for c in candidates if c in record.names), None)


def _descriptors(body: Mapping[str, Any], digest: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    config = body.get("config")
    layers = body.get("layers")
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise BadImage(f"manifest {digest} has no config or layers")
    for i, desc in enumerate([config, *layers]):
        if not isinstance(desc, dict) or not all(k in desc for k in ("digest", "size", "mediaType")):
            raise BadImage(f"manifest {digest}: descriptor {i} lacks digest, size or mediaType")
    return config, list(layers)


def _parse_config(data: bytes) -> dict[str, Any]:
    try:
        config = json.loads(data)
    except ValueError as exc:
        raise BadImage(f"image config is not JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise BadImage("image config is not a JSON object")
    return config


def _layer_refs(descs: list[dict[str, Any]], config: Mapping[str, Any], digest: str) -> list[LayerRef]:
    diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
    if len(diff_ids) != len(descs):
        raise BadImage(f"manifest {digest} has {len(descs)} layers but its config lists {len(diff_ids)} diff_ids")
    kept = [(d, diff) for d, diff in zip(descs, diff_ids, strict=True) if not is_foreign(d["mediaType"])]
    chains = chain_ids([diff for _d, diff in kept])
    return [
        LayerRef(str(d["digest"]), str(d["mediaType"]), int(d["size"]), str(diff), chain)
        for (d, diff), chain in zip(kept, chains, strict=True)
    ]


def _mountpoint(path: Path) -> str:
    target = os.path.realpath(path)
    best = "/"
    for entry in mounts():
        mp = entry.mount_point
        if (target == mp or target.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
            best = mp
    return best
