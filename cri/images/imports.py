"""Importing image archives into the image store, and exporting images from it.

Both run on an ImageManager, inside the daemon (through the admin socket) or in
the CLI when no daemon runs (it holds the daemon lock meanwhile): one writer.

An import is all or nothing, and crash safe the way a pull is: blobs land in the
content store only whole and verified (digest and size), layers only fully
unpacked with the config's diff ID, and the images are recorded in one
transaction once everything is in place. Until then the import holds its blobs
and layers against concurrent removals; if it fails, what it stored that no
image holds is freed, and after a crash the next start frees it the same way.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import stat
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cri.errors import InvalidArgument, NotFound
from cri.images import reference
from cri.images.archive import (
    ZSTD_MAGIC,
    ArchivedImage,
    ArchiveError,
    Blob,
    ExportImage,
    TarArchive,
    read_images,
    write_layout,
)
from cri.images.index import AmbiguousImage, ImageRecord, LayerRef
from cri.images.manager import ImageManager
from cri.images.platform import host_platform
from cri.images.registry import DigestMismatch
from cri.log import event
from cri.storage.layers import chain_ids
from cri.storage.unpack import UnpackError
from cri.system import faults, offload

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_STOP_POLL_MS = 200  # how soon a spooling thread notices that the import was stopped


class ImageNotFound(NotFound):
    pass


@dataclass(frozen=True)
class ImageSummary:
    id: str
    names: list[str]


def source_file(fd: int, spool_dir: Path, stop: threading.Event | None = None) -> BinaryIO:
    """A seekable file to read an archive from: the file behind `fd`, or a spooled copy of a pipe's stream.

    The copy is an O_TMPFILE under the storage root: never visible, gone with
    the last descriptor even after a crash. Blocking; a pipe whose writer
    never closes it is given up once `stop` is set (the daemon is stopping).
    The caller keeps `fd`: the copy reads a duplicate, which the caller may close meanwhile.
    """
    if stat.S_ISREG(os.fstat(fd).st_mode):
        return os.fdopen(os.dup(fd), "rb")
    spool_dir.mkdir(parents=True, exist_ok=True)
    spool = tempfile.TemporaryFile(dir=spool_dir)  # noqa: SIM115 - the caller closes it
    own = os.dup(fd)
    try:
        poller = select.poll()
        poller.register(own, select.POLLIN)
        while True:
            while not poller.poll(_STOP_POLL_MS):
                if stop is not None and stop.is_set():
                    raise InterruptedError("the import was stopped while the archive was still arriving")
            chunk = os.read(own, _CHUNK)
            if not chunk:
                break
            spool.write(chunk)
        spool.seek(0)
    except BaseException:
        spool.close()
        raise
    finally:
        os.close(own)
    return spool


class StoppableOutput:
    """Where an export writes: a duplicate of the caller's descriptor, written whole, that gives up once `stop` is set.

    A pipe whose reader does not read would block the writing thread for good, and the daemon's stop with it:
    so a pipe or socket is written PIPE_BUF bytes at a time, each once poll says it fits. close() waits for a
    write in progress, so the descriptor is never closed (and its number reused) under it.
    """

    def __init__(self, fd: int, stop: threading.Event) -> None:
        self._fd = os.dup(fd)
        self._stop = stop
        self._regular = stat.S_ISREG(os.fstat(self._fd).st_mode)
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLOUT)
        self._lock = threading.Lock()
        self._closed = False

    def write(self, data: bytes) -> int:
        view = memoryview(data)
        step = len(view) if self._regular else select.PIPE_BUF
        done = 0
        while done < len(view):
            with self._lock:
                if self._closed or self._stop.is_set():
                    raise InterruptedError("the export was stopped before its reader took it all")
                if self._regular or self._poller.poll(_STOP_POLL_MS):
                    done += os.write(self._fd, view[done : done + step])
        return done

    def flush(self) -> None:
        pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._fd)


async def import_archive(manager: ImageManager, source: BinaryIO) -> list[ImageSummary]:
    """Import every image of the archive `source` (seekable), or none; ArchiveError says why not."""
    started = time.monotonic()
    try:
        records = await _read_and_store(manager, source)
    except Exception as exc:
        event(log, logging.WARNING, "image import failed", error=str(exc) or type(exc).__name__)
        raise
    for record in records:
        event(log, logging.INFO, "image imported", image_id=record.id, names=",".join(record.names) or None)
    event(
        log,
        logging.INFO,
        "image archive imported",
        images=len(records),
        duration_ms=round((time.monotonic() - started) * 1000, 1),
    )
    return [ImageSummary(r.id, r.names) for r in records]


async def _read_and_store(manager: ImageManager, source: BinaryIO) -> list[ImageRecord]:
    archive = await offload.to_thread(TarArchive, source)
    try:
        images = await offload.to_thread(read_images, archive, host_platform())
        try:
            return await _store(manager, archive, images)
        except Exception:
            await _undo(manager)
            raise
    finally:
        archive.close()


async def _store(manager: ImageManager, archive: TarArchive, images: list[ArchivedImage]) -> list[ImageRecord]:
    planned = [(image, _layer_refs(image)) for image in images]
    held = [key for image, layers in planned for key in _keys(image, layers)]
    manager._hold(held)
    try:
        for image, layers in planned:
            await _store_blobs(manager, archive, image)
            await _unpack(manager, image, layers)
        faults.point("image.import.stored")
        entries = [(_record(manager, image, layers), _names(image)) for image, layers in planned]
        async with manager._lock:
            for record, _ in entries:
                existing = manager.index.get(record.id)
                if existing is not None:
                    record.pinned = record.pinned or existing.pinned
                    record.created_at = existing.created_at
            in_use = manager.holders_in_use(entries)
            orphans = await offload.to_thread(manager.index.put_many, entries, in_use.__contains__)
            faults.point("image.import.recorded")
            if orphans:
                await offload.to_thread(manager._free_unreferenced)
        return [record for record, _n in entries]
    finally:
        manager._release(held)


async def _undo(manager: ImageManager) -> None:
    """Free what the failed import stored that no image holds (as a failed pull does)."""
    async with manager._lock:
        try:
            await offload.to_thread(manager._free_unreferenced)
        except OSError as exc:  # the import's own error is the one to report
            event(log, logging.WARNING, "freeing a failed import's blobs failed", error=str(exc))


def _layer_refs(image: ArchivedImage) -> list[LayerRef]:
    chains = chain_ids(image.diff_ids)
    return [
        LayerRef(blob.digest, blob.media_type, blob.size, diff_id, chain)
        for blob, diff_id, chain in zip(image.layers, image.diff_ids, chains, strict=True)
    ]


def _keys(image: ArchivedImage, layers: list[LayerRef]) -> list[str]:
    return [*_blob_digests(image), *(layer.chain_id for layer in layers)]


def _blob_digests(image: ArchivedImage) -> list[str]:
    """Every blob the image holds in the content store: its index (as a pull keeps it), manifest, config, layers."""
    digests = [image.repo_digest, image.manifest_digest, image.config.digest, *(b.digest for b in image.layers)]
    return list(dict.fromkeys(digests))


async def _store_blobs(manager: ImageManager, archive: TarArchive, image: ArchivedImage) -> None:
    await manager.content.put_bytes(image.manifest_digest, image.manifest)
    if image.named_by is not None:
        await manager.content.put_bytes(*image.named_by)
    for blob in [image.config, *image.layers]:
        if not manager.content.has(blob.digest):
            await _copy_blob(manager, archive, blob)


async def _copy_blob(manager: ImageManager, archive: TarArchive, blob: Blob) -> None:
    try:
        with archive.open(blob.member) as stream:
            async with manager.content.writer(blob.digest, blob.size) as writer:
                while chunk := await offload.to_thread(stream.read, _CHUNK):
                    await writer.write(chunk)
    except DigestMismatch as exc:
        source = f"; {blob.expected_as}" if blob.expected_as else ""
        raise ArchiveError(f"digest mismatch of blob {blob.digest} ({blob.member}{source}): {exc}") from exc


async def _unpack(manager: ImageManager, image: ArchivedImage, layers: list[LayerRef]) -> None:
    parent: str | None = None
    for layer in layers:
        try:
            await offload.to_thread(
                manager.layers.ensure,
                layer.chain_id,
                parent,
                manager.content.path(layer.digest),
                layer.media_type,
                layer.diff_id,
            )
        except UnpackError as exc:
            raise ArchiveError(f"image {image.id}: layer {layer.digest}: {exc}") from exc
        parent = layer.chain_id


def _names(image: ArchivedImage) -> list[tuple[str, str]]:
    names = [(name, "tag") for name in image.names]
    if image.manifest_in_archive:
        # A manifest that came with the archive is the one a registry serves: name@digest pulls it.
        repos = dict.fromkeys([*(reference.parse(name).name for name in image.names), *image.digest_repos])
        names += [(f"{repo}@{image.repo_digest}", "digest") for repo in repos]
    return names


def _record(manager: ImageManager, image: ArchivedImage, layers: list[LayerRef]) -> ImageRecord:
    return ImageRecord(
        id=image.id,
        repo_tags=[],
        repo_digests=[],
        size=len(image.manifest) + image.config.size + sum(layer.size for layer in layers),
        created_at=time.time_ns(),
        manifest_digest=image.manifest_digest,
        manifest_media_type=image.manifest_media_type,
        layers=layers,
        config=image.config_json,
        annotations=dict(image.annotations),
        pinned=any(manager._is_pinned(reference.parse(name)) for name in image.names),
        blobs=_blob_digests(image),
    )


# ---- export --------------------------------------------------------------------------------


async def export_images(manager: ImageManager, refs: list[str], out: BinaryIO) -> list[ImageSummary]:
    """Write the images `refs` name as one OCI layout tar (with docker's manifest.json) into `out`."""
    chosen = _resolve(manager, refs)
    images = [_export_image(manager, record, names) for record, names in chosen.values()]
    held = [d for image in images for d in [image.manifest_digest, image.config_digest, *image.layer_digests]]

    def open_blob(digest: str) -> BinaryIO:
        return manager.content.path(digest).open("rb")  # write_layout closes it

    manager._hold(held)
    try:
        await offload.to_thread(write_layout, out, images, manager.content.size, open_blob, manager.content.ingest_dir)
    finally:
        manager._release(held)
    event(log, logging.INFO, "images exported", images=len(images), refs=",".join(refs))
    return [ImageSummary(record.id, names) for record, names in chosen.values()]


def _resolve(manager: ImageManager, refs: list[str]) -> dict[str, tuple[ImageRecord, list[str]]]:
    """image ID -> (record, the tags to export): the tag named, or every tag of an image named by ID."""
    chosen: dict[str, tuple[ImageRecord, list[str]]] = {}
    for text in refs:
        try:
            record = manager.find(text)
        except reference.ReferenceError as exc:
            raise ImageNotFound(f"{text!r} is neither an image reference nor an image ID: {exc}") from exc
        except AmbiguousImage as exc:
            raise InvalidArgument("refs", str(exc)) from exc
        if record is None:
            raise ImageNotFound(f"image {text!r} is not in the store")
        tags = [t for t in record.repo_tags if t == _tag_of(text)] or list(record.repo_tags)
        names = chosen.setdefault(record.id, (record, []))[1]
        names.extend(t for t in tags if t not in names)
    return chosen


def _tag_of(text: str) -> str | None:
    with contextlib.suppress(reference.ReferenceError):
        ref = reference.parse(text)
        if ref.digest is None:
            return ref.string()
    return None


def _export_image(manager: ImageManager, record: ImageRecord, names: list[str]) -> ExportImage:
    digests = [record.manifest_digest, record.id, *(layer.digest for layer in record.layers)]
    missing = [d for d in digests if not manager.content.has(d)]
    if missing:
        raise ImageNotFound(f"image {record.id}: blob {missing[0]} is not in the content store")
    return ExportImage(
        names=names,
        manifest_digest=record.manifest_digest,
        manifest_media_type=record.manifest_media_type,
        manifest_size=manager.content.size(record.manifest_digest),
        config_digest=record.id,
        layer_digests=[layer.digest for layer in record.layers],
        zstd_diff_ids={layer.digest: layer.diff_id for layer in record.layers if _is_zstd(manager, layer)},
    )


def _is_zstd(manager: ImageManager, layer: LayerRef) -> bool:
    """By the bytes, as the unpacker decides: media types are not always right about compression."""
    with manager.content.path(layer.digest).open("rb") as blob:
        return blob.read(4) == ZSTD_MAGIC
