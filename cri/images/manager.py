"""Pulling, listing and removing images: the registry client, the content store, the layer store and the index.

A pull resolves the reference, fetches the platform's manifest and config,
then takes the layers `image.max_concurrent_downloads` at a time: each layer's
bytes go, as they arrive, both into the content store (which checks the
compressed digest) and through a pipe into an unpack worker process (which
inflates, hashes the diffID and extracts on the same pass, cri/storage/
unpack_worker). Overlay layers are separate directories, so layers unpack in
parallel on every core; a layer becomes visible only after its blob is
committed and its diffID matched (LayerStore.stage/publish). The vfs driver
copies each layer's parent, so there the blobs download in parallel and the
layers unpack one after another. A blob is fetched, and a chain unpacked, once
even across concurrent pulls; a pull every caller has given up (cancelled,
deadline) is cancelled, and frees what it made. Removal frees the layers and
blobs no remaining image holds. Pulls in flight hold their blobs and chains so
a concurrent removal cannot free them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from cri import metrics
from cri.config import Config
from cri.errors import NoSpace, no_space_in
from cri.images import reference
from cri.images.auth import Credentials
from cri.images.content import ContentStore, Writer, made_in_thread
from cri.images.index import ImageIndex, ImageRecord, LayerRef
from cri.images.registry import Manifest, RegistryClient, Resolved, preload_http_stack
from cri.log import event
from cri.state import Store
from cri.storage.layers import LayerInfo, LayerStore, StagedLayer, chain_ids, tree_usage
from cri.storage.unpack import UnpackError, UnpackResult, is_foreign
from cri.storage.unpack_process import UnpackJob, UnpackPool, UnpackProcess
from cri.system import faults, offload
from cri.system.linux import mounts

log = logging.getLogger(__name__)

FS_USAGE_INTERVAL = 60.0
T = TypeVar("T")


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


@dataclass
class _Flight(Generic[T]):
    task: asyncio.Task[T]
    waiters: int = 0


@dataclass
class _SharedWork(Generic[T]):
    """One task per key, shared by every caller asking for that key; cancelled once all of them have gone."""

    flights: dict[str, _Flight[T]] = field(default_factory=dict)

    async def run(self, key: str, make: Callable[[], Coroutine[Any, Any, T]], name: str) -> T:
        flight = self.flights.get(key)
        if flight is None:
            flight = _Flight(asyncio.create_task(make(), name=name))
            self.flights[key] = flight
            flight.task.add_done_callback(lambda t: self._landed(key, t))
        flight.waiters += 1
        try:
            return await asyncio.shield(flight.task)
        except asyncio.CancelledError:
            if flight.waiters == 1 and not flight.task.done():
                flight.task.cancel()  # the last caller gave up: nobody wants the result
                # Its clean-up (workers, temp dirs) is done before this caller reports its own failure.
                await asyncio.wait([flight.task])
            raise
        finally:
            flight.waiters -= 1

    def _landed(self, key: str, task: asyncio.Task[T]) -> None:
        if key in self.flights and self.flights[key].task is task:
            del self.flights[key]
        if not task.cancelled():
            task.exception()  # retrieved: every caller may have gone


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
            config.image,
            certs_dirs=config.image.certs_dirs,
            progress_timeout=config.image.pull_progress_timeout,
            blobs_off_loop=True,
        )
        self._config = config
        self._in_use = in_use
        self._pulls: _SharedWork[ImageRecord] = _SharedWork()
        self._chains: _SharedWork[LayerInfo] = _SharedWork()  # layers being unpacked, by chain ID
        self.unpacks = UnpackPool(keep=config.image.max_concurrent_downloads)
        self._held: Counter[str] = Counter()  # blobs and chains of pulls in flight
        self._lock = asyncio.Lock()  # recording an image vs freeing layers
        self._fs: tuple[FsUsage, FsUsage] | None = None
        self._fs_task: asyncio.Task[None] | None = None
        self._preload: asyncio.Task[None] | None = None
        self._fs_wakeup = asyncio.Event()

    async def start(self) -> None:
        await offload.to_thread(self._recover)
        self._fs_task = asyncio.create_task(self._fs_loop(), name="image-fs-usage")
        # After start-up, not in it: readiness does not wait, and the first pull (a node's first pod) does not pay it.
        self._preload = asyncio.create_task(self._preload_for_pulls(), name="pull-preload")

    async def _preload_for_pulls(self) -> None:
        await offload.to_thread(preload_http_stack)
        # The unpack host, after the HTTP stack: the two cores of a small node are not both taken at start-up.
        try:
            await self.unpacks.warm()
        except OSError as exc:  # the first pull tries again, and fails with this if it still stands
            event(log, logging.WARNING, "unpack host not started", error=str(exc))

    def _recover(self) -> None:
        self.content.cleanup_ingest()
        self.layers.cleanup_temp()
        self.index.load()
        self._free_unreferenced()
        event(log, logging.INFO, "images loaded", count=len(self.index.all()))

    async def close(self) -> None:
        if self._preload is not None:
            await asyncio.gather(self._preload, return_exceptions=True)  # a thread: it cannot be cancelled
        if self._fs_task is not None:
            self._fs_task.cancel()
            await asyncio.gather(self._fs_task, return_exceptions=True)
        await self.unpacks.close()
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
        """Pull (once: concurrent pulls of one reference share the work) and record the image.

        The pull goes on while any caller waits for it; when the last one is cancelled (the client
        went, its deadline passed) the pull is cancelled too and frees what it had stored.
        """
        ref = reference.parse(text)
        key = ref.string()
        return await self._pulls.run(key, lambda: self._pull(ref, credentials), name=f"pull-{key}")

    async def _pull(self, ref: reference.Reference, credentials: Credentials | None) -> ImageRecord:
        started = time.monotonic()
        try:
            record = await self._fetch_and_record(ref, credentials)
        except (Exception, asyncio.CancelledError) as exc:
            metrics.IMAGE_PULLS.labels(outcome="failure").inc()
            error = "cancelled" if isinstance(exc, asyncio.CancelledError) else str(exc) or type(exc).__name__
            event(log, logging.WARNING, "image pull failed", image=ref.string(), error=error)
            # Undone like a removal: the blobs and layers it stored that no image (nor other pull) holds.
            # Shielded: a cancelled pull frees its blobs and layers all the same.
            await asyncio.shield(self._free_after_failure())
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

    async def _free_after_failure(self) -> None:
        async with self._lock:
            try:
                await offload.to_thread(self._free_unreferenced)
            except OSError as cleanup:  # the pull's own error is the one to answer with
                event(log, logging.WARNING, "freeing a failed pull's blobs failed", error=str(cleanup))

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
            config = _parse_config(await offload.to_thread(self.content.read, config_desc["digest"]))
            layers = _layer_refs(layer_descs, config, manifest.digest)
            self._hold(layer.chain_id for layer in layers)
            try:
                await self._pull_layers(resolved, layers)
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

    async def _pull_layers(self, resolved: Resolved, layers: list[LayerRef]) -> None:
        """Every layer's blob in the content store and its chain in the layer store."""
        parents: list[str | None] = [None, *(layer.chain_id for layer in layers[:-1])]
        limit = asyncio.Semaphore(self._config.image.max_concurrent_downloads)
        if self.layers.driver == "vfs":
            # A vfs layer starts as a copy of its parent: download in parallel, unpack in order.
            await _all(self._bounded(limit, self._fetch(resolved, _descriptor(layer))) for layer in layers)
            faults.point("image.pull.fetched")
            for layer, parent in zip(layers, parents, strict=True):
                await self.unpack_layer(layer, parent)
            return
        await _all(
            self._bounded(limit, self._layer(resolved, layer, parent))
            for layer, parent in zip(layers, parents, strict=True)
        )

    @staticmethod
    async def _bounded(limit: asyncio.Semaphore, work: Coroutine[Any, Any, object]) -> None:
        async with limit:
            await work

    async def _layer(self, resolved: Resolved, layer: LayerRef, parent: str | None) -> None:
        """One overlay layer: streamed from the registry into the blob store and an unpack worker at once."""
        if self.layers.exists(layer.chain_id):
            if not self.content.has(layer.digest):  # the blob of a layer another image brought, freed since
                await self._fetch(resolved, _descriptor(layer))
            metrics.IMAGE_LAYER_CACHE_HITS.inc()
            return
        await self._chains.run(
            layer.chain_id, lambda: self._stream_layer(resolved, layer, parent), name=f"unpack {layer.chain_id}"
        )
        metrics.IMAGE_LAYER_UNPACKS.inc()

    async def _stream_layer(self, resolved: Resolved, layer: LayerRef, parent: str | None) -> LayerInfo:
        if self.content.has(layer.digest):
            return await self._unpack_blob(layer, parent)
        sink = _UnpackingSink(self, layer, parent)

        async def fetch(writer: Writer) -> None:
            sink.writer = writer
            await self.client.fetch_blob(resolved.endpoint, _descriptor(layer), sink)
            await sink.finish()

        try:
            await self.content.ensure(layer.digest, layer.size, fetch)
            if sink.unpacked is None:  # another pull's fetch brought the blob: unpack it from the store
                return await self._unpack_blob(layer, parent)
            faults.point("image.pull.fetched")  # the blob is committed, its layer not yet visible
            staged, result = sink.unpacked
            sink.hand_over()
            return await self._publish(layer, staged, result)
        finally:
            await asyncio.shield(sink.discard())

    async def unpack_layer(self, layer: LayerRef, parent: str | None) -> LayerInfo:
        """The layer `layer.chain_id` unpacked from its blob in the content store (once, across callers).

        For a caller whose blobs are stored already (an import); parent must be in the store for vfs.
        """
        info = await self._chains.run(
            layer.chain_id, lambda: self._unpack_blob(layer, parent), name=f"unpack {layer.chain_id}"
        )
        (metrics.IMAGE_LAYER_CACHE_HITS if info.cached else metrics.IMAGE_LAYER_UNPACKS).inc()
        return info

    async def _unpack_blob(self, layer: LayerRef, parent: str | None) -> LayerInfo:
        found = await offload.to_thread(self.layers.info, layer.chain_id)
        if found is not None:
            return found
        staged = await self._stage(layer, parent)
        worker: UnpackProcess | None = None
        try:
            worker = await self.unpacks.start(_job(layer, staged), blob=self.content.path(layer.digest))
            with no_space_in(self.layers.root, f"unpacking layer {layer.digest}"):
                result = await worker.finish()
        except BaseException:
            await asyncio.shield(_abandon(self.layers, staged, worker))
            raise
        return await self._publish(layer, staged, result)

    async def _stage(self, layer: LayerRef, parent: str | None) -> StagedLayer:
        with _named_by_blob(layer):
            return await made_in_thread(
                lambda: self.layers.stage(layer.chain_id, parent, layer.diff_id), self.layers.discard
            )

    async def _publish(self, layer: LayerRef, staged: StagedLayer, result: UnpackResult) -> LayerInfo:
        try:
            with _named_by_blob(layer):
                return await offload.to_thread(self.layers.publish, staged, result)
        except UnpackError as exc:
            raise UnpackError(f"layer {layer.digest}: {exc}") from exc

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
            entries = [(record, names)]
            orphans = await offload.to_thread(self.index.put_many, entries, self.holders_in_use(entries).__contains__)
            if orphans:
                await offload.to_thread(self._free_unreferenced)
        return record

    def holders_in_use(self, entries: list[tuple[ImageRecord, list[tuple[str, str]]]]) -> frozenset[str]:
        """Of the images that hold these names now, those a container uses: an image whose last name goes
        to another stays, untagged, while a container's rootfs or volume is an overlay of its layers. Asked
        on the loop, where the containers' table changes, before put_many runs in a thread."""
        return frozenset(image_id for image_id in self.index.holders(entries) if self._in_use(image_id))

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
                await offload.to_thread(self.index.remove, record)
            else:
                assert name is not None
                await offload.to_thread(self.index.remove_name, record, name)
            faults.point("image.remove.unindexed")
            freed = await offload.to_thread(self._free_unreferenced)
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
                self._fs = await offload.to_thread(self._measure)
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


def _descriptor(layer: LayerRef) -> dict[str, Any]:
    return {"digest": layer.digest, "size": layer.size, "mediaType": layer.media_type}


@contextlib.contextmanager
def _named_by_blob(layer: LayerRef) -> Iterator[None]:
    """The layer store names a layer by its chain ID, which no manifest shows: its NoSpace names the blob."""
    try:
        yield
    except NoSpace as exc:
        raise NoSpace(exc.where, f"unpacking layer {layer.digest}") from exc


def _job(layer: LayerRef, staged: StagedLayer) -> UnpackJob:
    return UnpackJob(layer.media_type, staged.diff, staged.whiteout_mode, label=layer.digest)


async def _all(works: Iterable[Coroutine[Any, Any, None]]) -> None:
    """Run every coroutine; the first failure cancels the rest and is raised itself (not as a group)."""
    try:
        async with asyncio.TaskGroup() as group:
            for work in works:
                group.create_task(work)
    except ExceptionGroup as failed:
        first: BaseException = failed
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


async def _abandon(layers: LayerStore, staged: StagedLayer | None, worker: UnpackProcess | None) -> None:
    """A failed or cancelled unpack: stop its worker, then remove its temp dir."""
    if worker is not None:
        await worker.kill()
    if staged is not None:
        await offload.to_thread(layers.discard, staged)


class _UnpackingSink:
    """A blob download's sink: chunks go to the content store's writer; an unpack worker follows its temp file.

    The worker starts with the first chunk and is told how far the file has grown after each of the writer's
    writes; a retried download (reset) starts a new one on a fresh stage.
    """

    def __init__(self, manager: ImageManager, layer: LayerRef, parent: str | None) -> None:
        self._manager = manager
        self._layer = layer
        self._parent = parent
        self.writer: Writer | None = None
        self._staged: StagedLayer | None = None
        self._worker: UnpackProcess | None = None
        self.unpacked: tuple[StagedLayer, UnpackResult] | None = None

    async def write(self, chunk: bytes) -> None:
        assert self.writer is not None
        metrics.IMAGE_PULL_BYTES.inc(len(chunk))
        if self._worker is None:
            await self._start()
        assert self._worker is not None
        await self.writer.write(chunk)
        with self._no_space():
            await self._worker.grown(self.writer.on_disk)

    async def reset(self) -> None:
        assert self.writer is not None
        await self.discard()
        await self.writer.reset()

    async def finish(self) -> None:
        """The download is complete: wait for the worker to extract the rest."""
        if self._worker is None:
            await self._start()  # an empty blob: the worker says what is wrong with it
        assert self._worker is not None and self._staged is not None and self.writer is not None
        await self.writer.flush()
        with self._no_space():
            await self._worker.grown(self.writer.on_disk)
            result = await self._worker.finish()
        self.unpacked = (self._staged, result)

    def hand_over(self) -> None:
        """The caller publishes the stage now: discard() must no longer touch it (a rename may be under way)."""
        self._staged = None

    async def discard(self) -> None:
        """Whatever this sink staged and did not hand over: its worker stopped, its temp dir removed."""
        staged, worker = self._staged, self._worker
        self._staged = self._worker = None
        await _abandon(self._manager.layers, staged, worker)

    async def _start(self) -> None:
        layer = self._layer
        self._staged = await self._manager._stage(layer, self._parent)
        try:
            assert self.writer is not None
            self._worker = await self._manager.unpacks.start(_job(layer, self._staged), self.writer.path, follow=True)
        except BaseException:
            await asyncio.shield(_abandon(self._manager.layers, self._staged, None))
            self._staged = None
            raise

    def _no_space(self) -> contextlib.AbstractContextManager[None]:
        return no_space_in(self._manager.layers.root, f"unpacking layer {self._layer.digest}")
