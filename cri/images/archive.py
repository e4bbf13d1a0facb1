"""Image archives: reading `docker save` and OCI image-layout tars, writing OCI layouts docker can load.

Read formats (one archive may hold several images):

- Docker's `docker save` (image spec v1.2): `manifest.json`, a list of
  `{"Config": "<hex>.json", "RepoTags": [...], "Layers": ["<id>/layer.tar", ...]}`;
  layers are plain tars (digest = diff ID) and may be symlinks to other members.
- Docker 25+ writes the same `manifest.json` beside an OCI layout
  (`oci-layout`, `index.json`, `blobs/sha256/<hex>`), with its paths pointing into blobs/.
- An OCI image layout: `index.json` lists manifests (or indexes: the host's
  platform is chosen) named by the `io.containerd.image.name` annotation, or by
  `org.opencontainers.image.ref.name` when that is a whole reference.

An image found both ways (same config digest) is taken from the OCI layout (its
real manifest) with the names of both. A `docker save` image without one gets a
manifest made here (OCI, layer media types from the bytes), which does not change
its ID: the ID is the config digest. The whole archive may itself be gzip-compressed.

What is checked here: the structure, every manifest's and config's digest, the
config's diff_ids count. The layers' digests are checked as they are copied into
the content store, and their diff IDs as they are unpacked (cri.images.imports).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import posixpath
import shutil
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, BinaryIO

import zstandard

from cri.images import reference
from cri.images.platform import NoMatchingPlatform, Platform, choose
from cri.storage.unpack import is_foreign, is_layer_media_type

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_MANIFESTS = (OCI_MANIFEST, DOCKER_MANIFEST)
_INDEXES = (OCI_INDEX, DOCKER_MANIFEST_LIST)
_OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"

NAME_ANNOTATION = "io.containerd.image.name"
REF_ANNOTATION = "org.opencontainers.image.ref.name"

_MAX_JSON = 64 << 20  # manifests, configs, index.json: far below this
_MAX_LINKS = 16
_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


class ArchiveError(Exception):
    """The archive is not a usable image archive; the message names what is wrong and where."""


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str
    member: str  # the archive member holding it
    expected_as: str = ""  # where the expected digest comes from, when not from a manifest (for errors)


@dataclass
class ArchivedImage:
    names: list[str]  # normalized tags (docker.io/library/busybox:latest)
    manifest: bytes
    manifest_digest: str
    manifest_media_type: str
    manifest_in_archive: bool  # False: made here for a docker-save-only image (no repo digest then)
    config: Blob
    config_json: dict[str, Any]
    layers: list[Blob]  # foreign layers are left out (never fetched, never unpacked)
    diff_ids: list[str]  # of the kept layers, in order
    annotations: dict[str, str] = field(default_factory=dict)
    # (digest, bytes) of the image index the archive names the image by, when it does (docker 25's save,
    # containerd's export of a multi-platform image): a pull of that name records name@<index digest>.
    named_by: tuple[str, bytes] | None = None
    digest_repos: list[str] = field(default_factory=list)  # repositories named by repo@digest alone, no tag

    @property
    def id(self) -> str:
        return self.config.digest

    @property
    def repo_digest(self) -> str:
        """The digest name@digest pulls this image by: its index's when it came through one."""
        return self.named_by[0] if self.named_by is not None else self.manifest_digest


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def blob_path(digest: str) -> str:
    algorithm, _, hexpart = digest.partition(":")
    return f"blobs/{algorithm}/{hexpart}"


class TarArchive:
    """Random access to the members of a (seekable) tar, with symlinks and hardlinks inside it followed."""

    def __init__(self, source: BinaryIO) -> None:
        if source.seek(0, io.SEEK_END) == 0:
            raise ArchiveError("the archive is empty (0 bytes)")
        source.seek(0)
        try:
            self._tar = tarfile.open(fileobj=source, mode="r:*")  # noqa: SIM115 - closed by close()
        except tarfile.ReadError as exc:  # its text lists every method tried: nothing a user can act on
            raise ArchiveError("not a tar archive (plain, or gzip, bzip2 or xz compressed)") from exc
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise ArchiveError(f"not a readable tar archive: {exc}") from exc
        try:
            self._members = {_clean(m.name): m for m in self._tar.getmembers()}
        except (tarfile.TarError, EOFError, OSError) as exc:
            self._tar.close()
            raise ArchiveError(f"truncated or corrupt tar archive: {exc}") from exc
        if not self._members:
            raise ArchiveError("the archive is empty")

    def close(self) -> None:
        self._tar.close()

    def has(self, name: str) -> bool:
        return self._resolve(name, missing_ok=True) is not None

    def size(self, name: str) -> int:
        member = self._resolve(name)
        assert member is not None
        return member.size

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[IO[bytes]]:
        member = self._resolve(name)
        assert member is not None
        stream = self._tar.extractfile(member)
        if stream is None:
            raise ArchiveError(f"member {name!r} is not a regular file")
        try:
            yield stream
        except (tarfile.TarError, EOFError) as exc:
            raise ArchiveError(f"member {name!r}: truncated or corrupt archive: {exc}") from exc
        finally:
            stream.close()

    def read(self, name: str, limit: int = _MAX_JSON) -> bytes:
        if self.size(name) > limit:
            raise ArchiveError(f"member {name!r} is larger than {limit} bytes")
        with self.open(name) as stream:
            return stream.read()

    def head(self, name: str, count: int) -> bytes:
        with self.open(name) as stream:
            return stream.read(count)

    def digest_of(self, name: str) -> str:
        hasher = hashlib.sha256()
        with self.open(name) as stream:
            while chunk := stream.read(_CHUNK):
                hasher.update(chunk)
        return "sha256:" + hasher.hexdigest()

    def _resolve(self, name: str, missing_ok: bool = False) -> tarfile.TarInfo | None:
        path = _clean(name)
        for _ in range(_MAX_LINKS):
            member = self._members.get(path)
            if member is None:
                if missing_ok:
                    return None
                raise ArchiveError(f"member {name!r} is missing from the archive")
            if member.issym():
                path = _clean(posixpath.join(posixpath.dirname(path), member.linkname))
            elif member.islnk():
                path = _clean(member.linkname)
            elif member.isfile():
                return member
            else:
                raise ArchiveError(f"member {name!r} is not a regular file")
        raise ArchiveError(f"member {name!r}: too many links")


def _clean(name: str) -> str:
    return posixpath.normpath("/" + name).lstrip("/")


# ---- reading -------------------------------------------------------------------------------


def read_images(archive: TarArchive, host: Platform) -> list[ArchivedImage]:
    """Every image the archive holds (one per config digest), checked as the module docstring says."""
    has_layout = archive.has("index.json")
    has_docker = archive.has("manifest.json")
    if not has_layout and not has_docker:
        raise ArchiveError("neither a docker save archive nor an OCI image layout: no manifest.json and no index.json")
    found: dict[str, ArchivedImage] = {}
    if has_layout:
        _check_layout_version(archive)
        for image in _layout_images(archive, host):
            _merge(found, image)
    if has_docker:
        for image in _docker_images(archive):
            _merge(found, image)
    if not found:
        raise ArchiveError("the archive holds no image")
    # A tag names one image: given to two, the later one keeps it (as `docker load` leaves it).
    images = list(found.values())
    for i, image in enumerate(images):
        later = {name for other in images[i + 1 :] for name in other.names}
        image.names = [name for name in image.names if name not in later]
    return images


def _merge(found: dict[str, ArchivedImage], image: ArchivedImage) -> None:
    existing = found.get(image.id)
    if existing is None:
        found[image.id] = image
        return
    existing.names = list(dict.fromkeys([*existing.names, *image.names]))
    existing.digest_repos = list(dict.fromkeys([*existing.digest_repos, *image.digest_repos]))


def _json(archive: TarArchive, name: str, what: str) -> Any:
    try:
        return json.loads(archive.read(name))
    except ValueError as exc:
        raise ArchiveError(f"{what} ({name}) is not valid JSON: {exc}") from exc


def _verified_json(archive: TarArchive, digest: str, what: str) -> tuple[bytes, dict[str, Any]]:
    name = blob_path(_checked_digest(digest, what))
    if not archive.has(name):
        raise ArchiveError(f"{what} {digest} is missing from the archive (no {name})")
    data = archive.read(name)
    actual = sha256(data)
    if actual != digest:
        raise ArchiveError(f"digest mismatch of blob {digest} ({what}): its content hashes to {actual}")
    return data, _json_object(data, f"{what} {digest}")


def _json_object(data: bytes, what: str) -> dict[str, Any]:
    try:
        body = json.loads(data)
    except ValueError as exc:
        raise ArchiveError(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise ArchiveError(f"{what} is not a JSON object")
    return body


def _checked_digest(digest: Any, what: str) -> str:
    problem = reference.validate_digest(digest) if isinstance(digest, str) else "not a string"
    if problem or not str(digest).startswith("sha256:"):
        raise ArchiveError(f"{what}: bad digest {digest!r}: {problem or 'only sha256 is supported'}")
    return str(digest)


def _check_layout_version(archive: TarArchive) -> None:
    if not archive.has("oci-layout"):
        return  # docker 25's save has one; other writers forget it, and index.json says enough
    layout = _json(archive, "oci-layout", "oci-layout")
    if not isinstance(layout, dict) or not str(layout.get("imageLayoutVersion", "")).startswith("1."):
        raise ArchiveError(f"oci-layout: unsupported imageLayoutVersion in {layout!r}")


def _layout_images(archive: TarArchive, host: Platform) -> Iterator[ArchivedImage]:
    index = _json(archive, "index.json", "index.json")
    entries = index.get("manifests") if isinstance(index, dict) else None
    if not isinstance(entries, list):
        raise ArchiveError("index.json has no manifests list")
    for position, entry in enumerate(entries):
        what = f"index.json manifests[{position}]"
        if not isinstance(entry, dict):
            raise ArchiveError(f"{what} is not a descriptor")
        names, digest_repos = _names_of(entry.get("annotations") or {}, what, entry.get("digest"))
        image = _image_at(archive, entry, names, host, what)
        image.digest_repos = digest_repos
        yield image


def _names_of(annotations: Any, what: str, digest: Any) -> tuple[list[str], list[str]]:
    """(tags, repositories named by digest alone) of an index.json entry whose descriptor has `digest`."""
    if not isinstance(annotations, dict):
        raise ArchiveError(f"{what}: annotations is not an object")
    full = annotations.get(NAME_ANNOTATION)
    ref_name = annotations.get(REF_ANNOTATION)
    # The OCI spec lets ref.name be just a tag ("latest"): it names no repository, so it is no name here.
    text = full or (ref_name if isinstance(ref_name, str) and ("/" in ref_name or ":" in ref_name) else None)
    if not text:
        return [], []
    with contextlib.suppress(reference.ReferenceError):
        ref = reference.parse(str(text))
        if ref.tag is None and ref.digest is not None:
            # containerd's name of an image pulled by digest: a repo digest, no tag (_tag_name refuses it).
            if ref.digest != digest:
                raise ArchiveError(f"{what}: image name {text!r} names digest {ref.digest}, the entry is {digest}")
            return [], [ref.name]
    return [_tag_name(str(text), what)], []


def _tag_name(text: str, what: str) -> str:
    try:
        ref = reference.parse(text)
    except reference.ReferenceError as exc:
        raise ArchiveError(f"{what}: bad image name {text!r}: {exc}") from exc
    if ref.tag is None:
        raise ArchiveError(f"{what}: image name {text!r} has no tag")
    return reference.Reference(ref.domain, ref.path, ref.tag, None).string()


def _image_at(archive: TarArchive, desc: dict[str, Any], names: list[str], host: Platform, what: str) -> ArchivedImage:
    digest = _checked_digest(desc.get("digest"), what)
    media_type = str(desc.get("mediaType", ""))
    data, body = _verified_json(archive, digest, f"manifest of {what}")
    media_type = str(body.get("mediaType") or media_type)
    if media_type in _INDEXES or (not media_type and "manifests" in body):
        try:
            chosen = choose(body, host)
        except NoMatchingPlatform as exc:
            raise ArchiveError(f"{what}: image index {digest}: {exc}") from exc
        image = _image_at(archive, chosen, names, host, f"{what} (index {digest}, platform {host})")
        image.named_by = (digest, data)  # set last by the outermost index, the one the archive names
        return image
    if media_type not in _MANIFESTS and not (not media_type and "layers" in body):
        raise ArchiveError(f"{what}: manifest {digest} has unsupported media type {media_type!r}")
    return _from_manifest(archive, data, digest, media_type or OCI_MANIFEST, body, names=names)


def _descriptor(desc: Any, what: str) -> tuple[str, int, str]:
    if not isinstance(desc, dict):
        raise ArchiveError(f"{what} is not a descriptor")
    digest = _checked_digest(desc.get("digest"), what)
    size, media_type = desc.get("size"), desc.get("mediaType")
    if not isinstance(size, int) or size < 0 or not isinstance(media_type, str):
        raise ArchiveError(f"{what}: descriptor lacks a size or mediaType")
    return digest, size, media_type


def _from_manifest(
    archive: TarArchive, data: bytes, digest: str, media_type: str, body: dict[str, Any], *, names: list[str]
) -> ArchivedImage:
    config_digest, config_size, config_type = _descriptor(body.get("config"), f"manifest {digest} config")
    layer_list = body.get("layers")
    if not isinstance(layer_list, list):
        raise ArchiveError(f"manifest {digest} has no layers list")
    descs = [_descriptor(d, f"manifest {digest} layers[{i}]") for i, d in enumerate(layer_list)]
    config_json = _config(archive, config_digest, f"config of manifest {digest}")
    diff_ids = _diff_ids(config_json, len(descs), f"manifest {digest}")
    layers: list[Blob] = []
    kept: list[str] = []
    for i, ((layer_digest, size, layer_type), diff_id) in enumerate(zip(descs, diff_ids, strict=True)):
        if not is_layer_media_type(layer_type):
            raise ArchiveError(f"manifest {digest} layers[{i}]: unsupported media type {layer_type!r}")
        if is_foreign(layer_type):
            continue
        member = blob_path(layer_digest)
        if not archive.has(member):
            raise ArchiveError(f"layer {layer_digest} of manifest {digest} is missing from the archive")
        if archive.size(member) != size:
            raise ArchiveError(
                f"blob {layer_digest}: the manifest says {size} bytes, the archive holds {archive.size(member)}"
            )
        layers.append(Blob(layer_digest, size, layer_type, member))
        kept.append(diff_id)
    annotations = body.get("annotations") or {}
    return ArchivedImage(
        names=names,
        manifest=data,
        manifest_digest=digest,
        manifest_media_type=media_type,
        manifest_in_archive=True,
        config=Blob(config_digest, config_size, config_type, blob_path(config_digest)),
        config_json=config_json,
        layers=layers,
        diff_ids=kept,
        annotations={str(k): str(v) for k, v in annotations.items()} if isinstance(annotations, dict) else {},
    )


def _config(archive: TarArchive, digest: str, what: str) -> dict[str, Any]:
    _data, body = _verified_json(archive, digest, what)
    return body


def _diff_ids(config: dict[str, Any], layer_count: int, what: str) -> list[str]:
    rootfs = config.get("rootfs")
    diff_ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(diff_ids, list):
        raise ArchiveError(f"{what}: the image config has no rootfs.diff_ids")
    if len(diff_ids) != layer_count:
        raise ArchiveError(f"{what} has {layer_count} layers but its config lists {len(diff_ids)} diff_ids")
    return [_checked_digest(d, f"{what}: rootfs.diff_ids[{i}]") for i, d in enumerate(diff_ids)]


def _docker_images(archive: TarArchive) -> Iterator[ArchivedImage]:
    entries = _json(archive, "manifest.json", "manifest.json")
    if not isinstance(entries, list):
        raise ArchiveError("manifest.json is not a list of images")
    for position, entry in enumerate(entries):
        yield _docker_image(archive, entry, f"manifest.json[{position}]")


def _docker_image(archive: TarArchive, entry: Any, what: str) -> ArchivedImage:
    if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
        raise ArchiveError(f"{what} has no Config")
    layer_paths = entry.get("Layers")
    if not isinstance(layer_paths, list) or not all(isinstance(p, str) for p in layer_paths):
        raise ArchiveError(f"{what} has no Layers list")
    tags = entry.get("RepoTags") or []
    if not isinstance(tags, list):
        raise ArchiveError(f"{what}: RepoTags is not a list")
    names = [_tag_name(str(t), what) for t in tags]
    config_path = str(entry["Config"])
    if not archive.has(config_path):
        raise ArchiveError(f"{what}: config {config_path} is missing from the archive")
    config_data = archive.read(config_path)
    config_digest = sha256(config_data)
    named = _digest_in_name(config_path)
    if named is not None and named != config_digest:
        raise ArchiveError(
            f"digest mismatch of blob {config_path} ({what} config): its content hashes to {config_digest}"
        )
    config_json = _json_object(config_data, f"{what}: config {config_path}")
    diff_ids = _diff_ids(config_json, len(layer_paths), what)
    layers = [
        _docker_layer(archive, path, diff_id, f"{what} Layers[{i}]")
        for i, (path, diff_id) in enumerate(zip(layer_paths, diff_ids, strict=True))
    ]
    config = Blob(config_digest, len(config_data), OCI_CONFIG, config_path)
    manifest = _make_manifest(config, layers)
    return ArchivedImage(
        names=names,
        manifest=manifest,
        manifest_digest=sha256(manifest),
        manifest_media_type=OCI_MANIFEST,
        manifest_in_archive=False,
        config=config,
        config_json=config_json,
        layers=layers,
        diff_ids=diff_ids,
    )


def _digest_in_name(path: str) -> str | None:
    """The digest a member's path claims: blobs/sha256/<hex> or <hex>.json (docker's config name)."""
    base = posixpath.basename(path).removesuffix(".json")
    if len(base) == 64 and all(c in "0123456789abcdef" for c in base):
        return f"sha256:{base}"
    return None


def _docker_layer(archive: TarArchive, path: str, diff_id: str, what: str) -> Blob:
    if not archive.has(path):
        raise ArchiveError(f"{what}: layer {path} is missing from the archive")
    # docker saves plain tars, but a containerd-backed docker keeps the registry's compressed blobs.
    head = archive.head(path, 4)
    if head.startswith((_GZIP_MAGIC, ZSTD_MAGIC)):
        media_type = _OCI_LAYER + ("+gzip" if head.startswith(_GZIP_MAGIC) else "+zstd")
        # A compressed blob's digest is only known from its bytes: one pass more for these.
        digest = archive.digest_of(path)
        expected_as = ""
    else:
        # A plain tar's digest is its diff ID by definition; the content store checks it as the blob lands.
        media_type, digest = _OCI_LAYER, diff_id
        expected_as = f"{what}: a plain layer, whose digest must be the config's diff ID"
    named = _digest_in_name(path) if path.startswith("blobs/") else None
    if named is not None and named != digest:
        raise ArchiveError(f"layer {path} ({what}) is named by a digest other than its own, {digest}")
    return Blob(digest, archive.size(path), media_type, path, expected_as)


def _make_manifest(config: Blob, layers: Iterable[Blob]) -> bytes:
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config.digest, "size": config.size},
        "layers": [{"mediaType": b.media_type, "digest": b.digest, "size": b.size} for b in layers],
    }
    return json.dumps(body, separators=(",", ":")).encode()


# ---- writing -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExportImage:
    names: list[str]  # normalized tags
    manifest_digest: str
    manifest_media_type: str
    manifest_size: int
    config_digest: str
    layer_digests: list[str]  # the kept (distributable) layers, base first
    zstd_diff_ids: dict[str, str] = field(default_factory=dict)  # zstd layer digest -> its diff ID

    def docker_layers(self) -> list[str]:
        """What manifest.json lists: a zstd layer as its plain tar (blob named by the diff ID), for older docker."""
        return [self.zstd_diff_ids.get(d, d) for d in self.layer_digests]


def write_layout(
    out: BinaryIO,
    images: list[ExportImage],
    blob_size: Callable[[str], int],
    open_blob: Callable[[str], BinaryIO],
    spool_dir: Path,
) -> None:
    """Stream an OCI image layout tar of `images` into `out` (a pipe is fine), with docker's manifest.json.

    index.json has one entry per tag (containerd's way: both name annotations), or
    one unnamed entry for an image without tags. Blobs shared by images go in once.
    docker before 23 cannot read zstd layers: manifest.json points those at a plain
    copy, decompressed through a temp file in `spool_dir` (a tar needs sizes first).
    """
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        _add_bytes(tar, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        written: set[str] = set()
        tar.addfile(_dir_info("blobs/"))
        tar.addfile(_dir_info("blobs/sha256/"))
        for image in images:
            for digest in [image.manifest_digest, image.config_digest, *image.layer_digests]:
                if digest in written:
                    continue
                written.add(digest)
                info = _file_info(blob_path(digest), blob_size(digest))
                with open_blob(digest) as blob:
                    tar.addfile(info, blob)
            for digest, diff_id in image.zstd_diff_ids.items():
                if diff_id not in written:
                    written.add(diff_id)
                    _add_decompressed(tar, blob_path(diff_id), open_blob(digest), spool_dir)
        _add_bytes(tar, "index.json", _index_json(images))
        _add_bytes(tar, "manifest.json", _docker_manifest_json(images))


def _index_json(images: list[ExportImage]) -> bytes:
    entries: list[dict[str, Any]] = []
    for image in images:
        desc: dict[str, Any] = {
            "mediaType": image.manifest_media_type,
            "digest": image.manifest_digest,
            "size": image.manifest_size,
        }
        if not image.names:
            entries.append(desc)
        for name in image.names:
            tag = reference.parse(name).tag or reference.DEFAULT_TAG
            entries.append({**desc, "annotations": {NAME_ANNOTATION: name, REF_ANNOTATION: tag}})
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}, indent=2).encode()


def _docker_manifest_json(images: list[ExportImage]) -> bytes:
    entries = [
        {
            "Config": blob_path(image.config_digest),
            "RepoTags": [reference.parse(name).familiar() for name in image.names],
            "Layers": [blob_path(d) for d in image.docker_layers()],
        }
        for image in images
    ]
    return json.dumps(entries, indent=2).encode()


def _file_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0
    return info


def _dir_info(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
    return info


def _add_decompressed(tar: tarfile.TarFile, name: str, compressed: BinaryIO, spool_dir: Path) -> None:
    spool_dir.mkdir(parents=True, exist_ok=True)
    with compressed, tempfile.TemporaryFile(dir=spool_dir) as plain:
        with zstandard.ZstdDecompressor().stream_reader(compressed, read_across_frames=True) as reader:
            shutil.copyfileobj(reader, plain, _CHUNK)
        size = plain.tell()
        plain.seek(0)
        tar.addfile(_file_info(name, size), plain)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_file_info(name, len(data)), io.BytesIO(data))
