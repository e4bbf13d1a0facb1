"""Image records and the names that point at them, in memory and in the state database.

An image is identified by `sha256:<config digest>`. Names are repo tags
(`docker.io/library/busybox:latest`) and repo digests (`name@sha256:<manifest>`);
a name points at one image, so tagging a new image moves the tag. An image
whose last name goes is forgotten; its layers and blobs are freed by the
caller once no other image holds them.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cri.images import reference
from cri.state import Store, records

_HEX_PREFIX = re.compile(r"^(sha256:)?([a-f0-9]{1,64})$")
_FULL_ID = re.compile(r"^(sha256:)?[a-f0-9]{64}$")


@dataclass(frozen=True)
class LayerRef:
    digest: str  # the blob in the content store
    media_type: str
    size: int
    diff_id: str
    chain_id: str


@dataclass
class ImageRecord:
    id: str  # sha256:<config digest>
    repo_tags: list[str]
    repo_digests: list[str]
    size: int  # bytes of the manifest, config and (compressed) layers, as containerd reports
    created_at: int
    manifest_digest: str
    manifest_media_type: str
    layers: list[LayerRef]
    config: dict[str, Any]  # the image config JSON (what `ImageStatus` verbose shows)
    annotations: dict[str, str] = field(default_factory=dict)
    pinned: bool = False
    blobs: list[str] = field(default_factory=list)  # every content-store digest the image holds

    @property
    def names(self) -> list[str]:
        return [*self.repo_tags, *self.repo_digests]

    @property
    def chain_ids(self) -> list[str]:
        return [layer.chain_id for layer in self.layers]

    def user(self) -> tuple[int | None, str]:
        """(uid, "") when the config USER is numeric, else (None, username); the group part is dropped."""
        user = str(self.config.get("config", {}).get("User", "") or "")
        name = user.split(":", 1)[0]
        if name.isdigit():
            return int(name), ""
        return None, name


# The fields kept as columns of the images table (tags and digests are rows of image_names); every
# other one is in its JSON `data`.
_ROW = records.Row(ImageRecord, columns=("id", "size", "created_at", "repo_tags", "repo_digests"))


def from_row(row: tuple[Any, ...], names: list[tuple[str, str]]) -> ImageRecord:
    image_id, size, created_at, data_text = row
    return _ROW.load(
        data_text,
        id=image_id,
        size=int(size),
        created_at=int(created_at),
        repo_tags=sorted(n for n, kind in names if kind == "tag"),
        repo_digests=sorted(n for n, kind in names if kind == "digest"),
    )


class AmbiguousImage(Exception):
    pass


class ImageIndex:
    """The images the daemon holds; lookups by name, repo digest, ID or ID prefix answer from memory."""

    def __init__(self, store: Store) -> None:
        self._store = store
        self._images: dict[str, ImageRecord] = {}
        self._names: dict[str, str] = {}

    def load(self) -> None:
        with self._store.transaction() as conn:
            names: dict[str, list[tuple[str, str]]] = {}
            for name, image_id, kind in conn.execute("SELECT name, image_id, kind FROM image_names"):
                names.setdefault(image_id, []).append((name, kind))
            for row in conn.execute("SELECT id, size, created_at, data FROM images"):
                record = from_row(tuple(row), names.get(row[0], []))
                self._images[record.id] = record
                for name in record.names:
                    self._names[name] = record.id

    def all(self) -> list[ImageRecord]:
        return list(self._images.values())

    def get(self, image_id: str) -> ImageRecord | None:
        return self._images.get(image_id)

    def resolve(self, text: str) -> ImageRecord | None:
        """An image by tag, repo digest, ID or unique ID prefix; None when there is none.

        ReferenceError when `text` is neither a reference nor an ID; AmbiguousImage for a shared prefix.
        """
        by_id = self._by_id(text)
        if by_id is not None or _FULL_ID.match(text):
            return by_id  # a whole ID names no repository (64 hex characters are refused as one)
        ref = reference.parse(text)
        if ref.digest is not None:
            return self._lookup(ref.with_digest(ref.digest).string())
        return self._lookup(ref.string())

    def _lookup(self, name: str) -> ImageRecord | None:
        image_id = self._names.get(name)
        return self._images.get(image_id) if image_id else None

    def _by_id(self, text: str) -> ImageRecord | None:
        match = _HEX_PREFIX.match(text)
        if match is None:
            return None
        hex_prefix = match.group(2)
        # A bare short hex word could also be a repository name ("abc"): only a full ID, or the
        # sha256: form, is taken as an ID unless some image ID actually starts with it.
        found = [image for image_id, image in self._images.items() if image_id[7:].startswith(hex_prefix)]
        if len(found) > 1:
            raise AmbiguousImage(f"image ID prefix {text!r} matches {len(found)} images")
        return found[0] if found else None

    def put(self, record: ImageRecord, names: list[tuple[str, str]]) -> list[ImageRecord]:
        """Record an image (new or existing) with extra names; returns the images left with no name."""
        return self.put_many([(record, names)])

    def holders(self, entries: list[tuple[ImageRecord, list[tuple[str, str]]]]) -> set[str]:
        """The IDs of the stored images that hold one of the entries' names now."""
        return {self._names[name] for _record, names in entries for name, _kind in names if name in self._names}

    def put_many(
        self,
        entries: list[tuple[ImageRecord, list[tuple[str, str]]]],
        in_use: Callable[[str], bool] = lambda _image_id: False,
    ) -> list[ImageRecord]:
        """Record several images in one transaction (an archive import is all or nothing).

        Returns the images the new names left with no name, which are forgotten; an image in_use (a
        container's rootfs or volume is made of its layers) stays, untagged, as RemoveImage leaves it.
        """
        # The stored images' names as they are: they lose some below, and get them back if the database refuses.
        owners = self.holders(entries)
        before = {i: (list(self._images[i].repo_tags), list(self._images[i].repo_digests)) for i in owners}
        losers = self._assign_names(entries)
        orphans = [image for image in losers.values() if not image.names and not image.pinned and not in_use(image.id)]
        try:
            self._record(entries, orphans)
        except BaseException:
            for image in losers.values():
                image.repo_tags[:], image.repo_digests[:] = before[image.id]
            raise
        for record, names in entries:
            self._images[record.id] = record
            for name, _kind in names:
                self._names[name] = record.id
        for image in orphans:
            self._images.pop(image.id, None)
        return orphans

    def _record(self, entries: list[tuple[ImageRecord, list[tuple[str, str]]]], orphans: list[ImageRecord]) -> None:
        with self._store.transaction() as conn:
            for record, names in entries:
                _write(conn, record)
                for name, kind in names:
                    conn.execute(
                        "INSERT INTO image_names(name, image_id, kind) VALUES (?, ?, ?) "
                        "ON CONFLICT(name) DO UPDATE SET image_id = excluded.image_id, kind = excluded.kind",
                        (name, record.id, kind),
                    )
            for image in orphans:
                conn.execute("DELETE FROM images WHERE id = ?", (image.id,))

    def _assign_names(self, entries: list[tuple[ImageRecord, list[tuple[str, str]]]]) -> dict[str, ImageRecord]:
        """Give the batch's records their stored names and the new ones; image ID -> a stored image that lost one.

        The records of the batch replace the stored ones: a name one of them takes from another image of the
        batch is dropped from that new record, and an image of the batch is never a loser (forgotten as nameless).
        """
        batch = {record.id: record for record, _names in entries}
        for record in batch.values():
            current = self._images.get(record.id)
            if current is not None:
                record.repo_tags, record.repo_digests = list(current.repo_tags), list(current.repo_digests)
        losers: dict[str, ImageRecord] = {}
        for record, names in entries:
            for name, kind in names:
                owner = self._names.get(name)
                if owner is not None and owner != record.id:
                    other = batch.get(owner) or self._images[owner]
                    _drop_name(other, name)
                    if owner not in batch:
                        losers[other.id] = other
                target = record.repo_tags if kind == "tag" else record.repo_digests
                if name not in target:
                    target.append(name)
        return losers

    def remove_name(self, record: ImageRecord, name: str) -> bool:
        """Drop one name; True when it was the last one and the image itself went too."""
        _drop_name(record, name)
        gone = not record.names
        with self._store.transaction() as conn:
            conn.execute("DELETE FROM image_names WHERE name = ?", (name,))
            if gone:
                conn.execute("DELETE FROM images WHERE id = ?", (record.id,))
        self._names.pop(name, None)
        if gone:
            self._images.pop(record.id, None)
        return gone

    def remove(self, record: ImageRecord) -> None:
        with self._store.transaction() as conn:
            conn.execute("DELETE FROM image_names WHERE image_id = ?", (record.id,))
            conn.execute("DELETE FROM images WHERE id = ?", (record.id,))
        for name in record.names:
            self._names.pop(name, None)
        self._images.pop(record.id, None)

    def referenced(self) -> tuple[set[str], set[str]]:
        """(chain IDs, blob digests) that some remaining image still holds."""
        chains: set[str] = set()
        blobs: set[str] = set()
        for image in self._images.values():
            chains.update(image.chain_ids)
            blobs.update(image.blobs)
        return chains, blobs


def _drop_name(record: ImageRecord, name: str) -> None:
    if name in record.repo_tags:
        record.repo_tags.remove(name)
    if name in record.repo_digests:
        record.repo_digests.remove(name)


def _write(conn: sqlite3.Connection, record: ImageRecord) -> None:
    conn.execute(
        "INSERT INTO images(id, size, created_at, data) VALUES (?, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET size = excluded.size, data = excluded.data",
        (record.id, record.size, record.created_at, _ROW.dump(record)),
    )
