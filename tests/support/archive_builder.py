"""Image archives made without docker: `docker save` output (both layouts) and OCI image-layout tars.

The images come from image_builder. What is written follows the formats as
docker and containerd write them:

- `docker_save(..., layout="legacy")`: docker < 25 (image spec v1.2): per layer a
  `<v1 id>/` directory with `VERSION`, `json` and an uncompressed `layer.tar`
  (a layer repeated by a later image is a symlink to the first), `<config hex>.json`,
  `manifest.json` and `repositories`.
- `docker_save(..., layout="oci")`: docker 25+: an OCI layout (`oci-layout`,
  `index.json` naming each image with `io.containerd.image.name` and
  `org.opencontainers.image.ref.name`, `blobs/sha256/`) whose manifests list
  uncompressed layers, plus `manifest.json` pointing into blobs/.
- `oci_archive(...)`: an OCI layout of the images as built (compressed layers),
  as `ctr export`/skopeo write it; indexes (multi-platform) are kept as indexes.

`mutate` lets a test corrupt one member's bytes after everything was computed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Sequence
from typing import Any, Literal

from tests.support.image_builder import (
    FIXED_MTIME,
    OCI_INDEX,
    OCI_MANIFEST,
    Image,
    Index,
    canonical_json,
    sha256_digest,
)

Named = tuple[Image | Index, Sequence[str]]  # an image or index and the names it carries ("busybox:latest")
Mutate = Callable[[str, bytes], bytes]  # (member name, bytes) -> bytes to write instead


def _keep(_name: str, data: bytes) -> bytes:
    return data


class _Tar:
    def __init__(self, mutate: Mutate) -> None:
        self.out = io.BytesIO()
        self.tar = tarfile.open(fileobj=self.out, mode="w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 - bytes() closes it
        self.names: set[str] = set()
        self.layer_members: dict[str, str] = {}  # diff ID -> the member holding it first
        self.mutate = mutate

    def add(self, name: str, data: bytes) -> None:
        if name in self.names:
            return
        self.names.add(name)
        data = self.mutate(name, data)
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, FIXED_MTIME
        self.tar.addfile(info, io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mtime = tarfile.SYMTYPE, target, FIXED_MTIME
        self.names.add(name)
        self.tar.addfile(info)

    def bytes(self) -> bytes:
        self.tar.close()
        return self.out.getvalue()


def _blob(digest: str) -> str:
    return "blobs/sha256/" + digest.removeprefix("sha256:")


def _uncompressed_manifest(image: Image) -> bytes:
    """The manifest docker 25 writes: the config as is, the layers as plain tars."""
    return canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": image.config_digest,
                "size": len(image.config_bytes),
            },
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer.diff_id, "size": len(layer.tar)}
                for layer in image.layers
            ],
        }
    )


def _full_name(name: str) -> str:
    """docker.io/library/busybox:latest for busybox:latest (what containerd writes in the annotation)."""
    path, _, tag = name.rpartition(":") if ":" in name.rsplit("/", 1)[-1] else (name, "", "latest")
    first = path.split("/", 1)[0]
    if "/" not in path:
        path = f"docker.io/library/{path}"
    elif "." not in first and ":" not in first and first != "localhost":
        path = f"docker.io/{path}"
    return f"{path}:{tag}"


def docker_save(
    images: Sequence[tuple[Image, Sequence[str]]],
    layout: Literal["legacy", "oci"] = "legacy",
    mutate: Mutate = _keep,
) -> bytes:
    tar = _Tar(mutate)
    entries: list[dict[str, Any]] = []
    index: list[dict[str, Any]] = []
    repositories: dict[str, dict[str, str]] = {}
    for image, tags in images:
        if layout == "legacy":
            config_name = image.config_digest.removeprefix("sha256:") + ".json"
            tar.add(config_name, image.config_bytes)
            layer_names = _legacy_layers(tar, image)
        else:
            config_name = _blob(image.config_digest)
            tar.add(config_name, image.config_bytes)
            layer_names = []
            for layer in image.layers:
                tar.add(_blob(layer.diff_id), layer.tar)
                layer_names.append(_blob(layer.diff_id))
            manifest = _uncompressed_manifest(image)
            tar.add(_blob(sha256_digest(manifest)), manifest)
            desc = {"mediaType": OCI_MANIFEST, "digest": sha256_digest(manifest), "size": len(manifest)}
            for tag in tags or [""]:
                annotations = (
                    {
                        "io.containerd.image.name": _full_name(tag),
                        "org.opencontainers.image.ref.name": tag.rpartition(":")[2],
                    }
                    if tag
                    else {}
                )
                index.append({**desc, "annotations": annotations} if annotations else desc)
        entries.append({"Config": config_name, "RepoTags": list(tags) or None, "Layers": layer_names})
        for tag in tags:
            repo, _, name_tag = tag.rpartition(":")
            repositories.setdefault(repo, {})[name_tag] = layer_names[-1].split("/")[0]
    if layout == "oci":
        tar.add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
        tar.add("index.json", canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": index}))
    else:
        tar.add("repositories", json.dumps(repositories).encode())
    tar.add("manifest.json", json.dumps(entries).encode())
    return tar.bytes()


def _legacy_layers(tar: _Tar, image: Image) -> list[str]:
    names = []
    parent = ""
    for layer in image.layers:
        # docker's v1 IDs hash the chain and the config, so images sharing a layer hold it under two IDs.
        v1_id = hashlib.sha256(f"{image.config_digest} {parent} {layer.diff_id}".encode()).hexdigest()
        name = f"{v1_id}/layer.tar"
        tar.add(f"{v1_id}/VERSION", b"1.0")
        tar.add(f"{v1_id}/json", json.dumps({"id": v1_id, "parent": parent or None}).encode())
        first = tar.layer_members.setdefault(layer.diff_id, name)
        if first == name:
            tar.add(name, layer.tar)
        else:  # the same layer content under another ID: a relative symlink to the first copy
            tar.symlink(name, f"../{first}")
        names.append(name)
        parent = v1_id
    return names


def oci_archive(
    items: Sequence[Named],
    annotation: Literal["containerd", "ref", "both"] = "both",
    mutate: Mutate = _keep,
) -> bytes:
    """An OCI layout tar of the images (or indexes) as built, each named by its annotations."""
    tar = _Tar(mutate)
    tar.add("oci-layout", b'{"imageLayoutVersion": "1.0.0"}')
    entries: list[dict[str, Any]] = []
    for item, names in items:
        images = item.manifests if isinstance(item, Index) else [item]
        for image in images:
            for digest, data in image.blobs().items():
                tar.add(_blob(digest), data)
            tar.add(_blob(image.manifest_digest), image.manifest_bytes)
        if isinstance(item, Index):
            tar.add(_blob(item.manifest_digest), item.manifest_bytes)
            desc = {"mediaType": item.media_type, "digest": item.manifest_digest, "size": len(item.manifest_bytes)}
        else:
            desc = {"mediaType": item.media_type, "digest": item.manifest_digest, "size": len(item.manifest_bytes)}
        for name in names or [""]:
            annotations: dict[str, str] = {}
            if name and annotation in ("containerd", "both"):
                annotations["io.containerd.image.name"] = _full_name(name)
            if name and annotation in ("ref", "both"):
                annotations["org.opencontainers.image.ref.name"] = (
                    name if annotation == "ref" else name.rpartition(":")[2]
                )
            entries.append({**desc, "annotations": annotations} if annotations else desc)
    tar.add("index.json", canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}))
    return tar.bytes()
