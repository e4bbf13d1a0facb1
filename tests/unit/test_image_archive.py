"""Image archives: the formats read (docker save, both layouts; OCI layouts), refused, written; imports on a store.

The archives are made by tests/support/archive_builder.py the way docker and
containerd write them. The store tests import into a real ImageManager on a
temporary root (real content store, layer store and state database).
"""

from __future__ import annotations

import asyncio
import gzip
import io
import json
import os
import sqlite3
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri.config import Config
from cri.errors import InvalidArgument
from cri.images import index as index_module
from cri.images.archive import ArchivedImage, ArchiveError, TarArchive, read_images
from cri.images.imports import export_images, import_archive
from cri.images.index import ImageIndex, ImageRecord
from cri.images.manager import ImageManager
from cri.images.platform import host_platform
from cri.state import Store
from tests.support import image_builder as ib
from tests.support.archive_builder import docker_save, oci_archive

HELLO = ib.Layer([ib.File("/hello", b"hi\n")], created_by="hello")


def image(text: bytes = b"hi\n") -> ib.Image:
    return ib.busybox_image([ib.Layer([ib.File("/hello", text)], created_by="hello")])


def read(data: bytes) -> list[ArchivedImage]:
    return read_images(TarArchive(io.BytesIO(data)), host_platform())


def refused(data: bytes) -> str:
    with pytest.raises(ArchiveError) as err:
        read(data)
    return str(err.value)


def corrupt(member_suffix: str):
    def mutate(name: str, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if name.endswith(member_suffix) else data

    return mutate


# ---- reading -------------------------------------------------------------------------------


def test_legacy_docker_save_gives_the_config_digest_as_id_and_normalized_tags() -> None:
    img = image()
    [found] = read(docker_save([(img, ["busybox:latest", "localhost:5000/team/app:v1"])]))
    assert found.id == img.image_id
    assert found.names == ["docker.io/library/busybox:latest", "localhost:5000/team/app:v1"]
    assert not found.manifest_in_archive  # made here: no repo digest comes of it
    assert [layer.digest for layer in found.layers] == [layer.diff_id for layer in img.layers]
    assert {layer.media_type for layer in found.layers} == {"application/vnd.oci.image.layer.v1.tar"}


def test_legacy_docker_save_with_two_images_sharing_a_layer_follows_the_symlink() -> None:
    one, two = image(b"one\n"), image(b"two\n")
    data = docker_save([(one, ["one:1"]), (two, ["two:2"])])
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        assert any(m.issym() for m in tar.getmembers()), "the builder should have linked the shared base layer"
    found = {f.id: f for f in read(data)}
    assert set(found) == {one.image_id, two.image_id}
    assert found[two.image_id].layers[0].digest == two.layers[0].diff_id


def test_docker_25_save_is_read_from_its_oci_layout_with_the_names_of_both() -> None:
    img = image()
    [found] = read(docker_save([(img, ["busybox:1.36"])], layout="oci"))
    assert found.id == img.image_id
    assert found.names == ["docker.io/library/busybox:1.36"]
    assert found.manifest_in_archive


def test_oci_layout_keeps_the_compressed_layers_and_the_manifest() -> None:
    img = image()
    [found] = read(oci_archive([(img, ["registry.example:5000/app:v2"])]))
    assert found.manifest_digest == img.manifest_digest
    assert [layer.digest for layer in found.layers] == [layer.digest for layer in img.layers]
    assert found.names == ["registry.example:5000/app:v2"]


def test_oci_ref_name_annotation_names_an_image_only_when_it_is_a_whole_reference() -> None:
    img = image()
    assert read(oci_archive([(img, ["app:v3"])], annotation="ref"))[0].names == ["docker.io/library/app:v3"]
    bare_tag = oci_archive([(img, ["v3"])], annotation="ref")  # the spec's own example: a tag alone
    assert read(bare_tag)[0].names == []


def test_multi_platform_index_imports_the_host_platform() -> None:
    index = ib.multi_arch_index()
    [found] = read(oci_archive([(index, ["multi:latest"])]))
    assert found.id == index.manifests[0].image_id
    assert found.names == ["docker.io/library/multi:latest"]


def test_a_gzip_compressed_archive_is_read() -> None:
    img = image()
    [found] = read(gzip.compress(docker_save([(img, ["busybox:latest"])]), compresslevel=1))
    assert found.id == img.image_id


def test_a_tag_given_to_two_images_stays_with_the_later() -> None:
    one, two = image(b"one\n"), image(b"two\n")
    found = {f.id: f.names for f in read(docker_save([(one, ["app:x"]), (two, ["app:x"])]))}
    assert found == {one.image_id: [], two.image_id: ["docker.io/library/app:x"]}


def test_refused_archives_say_what_is_wrong() -> None:
    img = image()
    assert "not a tar archive" in refused(b"this is not a tar" * 100)
    assert "the archive is empty" in refused(b"")
    assert "truncated" in refused(docker_save([(img, ["busybox:latest"])])[:5000])
    assert "no manifest.json and no index.json" in refused(_tar({"README": b"hello"}))
    legacy = docker_save(
        [(img, ["busybox:latest"])], mutate=corrupt(img.config_digest.removeprefix("sha256:") + ".json")
    )
    assert "digest mismatch" in refused(legacy)
    layout = oci_archive([(img, ["busybox:latest"])], mutate=corrupt(img.config_digest.removeprefix("sha256:")))
    message = refused(layout)
    assert "digest mismatch of blob" in message
    assert img.config_digest in message


def test_a_missing_layer_is_named() -> None:
    img = image()
    data = oci_archive([(img, ["busybox:latest"])])
    layer = "blobs/sha256/" + img.layers[1].digest.removeprefix("sha256:")
    message = refused(_without(data, layer))
    assert img.layers[1].digest in message
    assert "missing" in message


def test_diff_ids_must_match_the_layer_count() -> None:
    img = image()
    config = img.config_json
    config["rootfs"]["diff_ids"] = config["rootfs"]["diff_ids"][:1]
    body = json.dumps(config).encode()
    entries = {
        "cfg.json": body,
        "manifest.json": json.dumps([{"Config": "cfg.json", "RepoTags": ["a:b"], "Layers": ["l0", "l1"]}]).encode(),
        "l0": img.layers[0].tar,
        "l1": img.layers[1].tar,
    }
    assert "has 2 layers but its config lists 1 diff_ids" in refused(_tar(entries))


def _tar(entries: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _entries(data: bytes) -> dict[str, bytes]:
    """The regular members of a tar, by name."""
    entries = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar.getmembers():
            stream = tar.extractfile(member)
            if stream is not None:
                entries[member.name] = stream.read()
    return entries


def _without(data: bytes, drop: str) -> bytes:
    return _tar({name: body for name, body in _entries(data).items() if name != drop})


# ---- importing into a store ----------------------------------------------------------------


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[ImageManager]:
    if os.geteuid() != 0:
        pytest.skip("unpacking layers owned by root needs root")
    config = Config()
    config.root = str(tmp_path / "root")
    store = Store.open(config.root)
    images = ImageManager(config, store)
    images.index.load()
    yield images
    asyncio.run(images.close())
    store.close()


def stored(manager: ImageManager) -> tuple[list[str], list[str]]:
    return manager.content.list(), manager.layers.list()


def test_import_then_export_then_import_again_keeps_the_id_and_digests(manager: ImageManager, tmp_path: Path) -> None:
    img = image()
    [summary] = asyncio.run(import_archive(manager, io.BytesIO(oci_archive([(img, ["app:v1"])]))))
    assert summary.id == img.image_id
    record = manager.find("app:v1")
    assert record is not None
    assert record.repo_digests == [f"docker.io/library/app@{img.manifest_digest}"]
    assert (manager.lower_dirs(record)[0] / "hello").read_bytes() == b"hi\n"

    out = tmp_path / "out.tar"
    with out.open("wb") as f:
        asyncio.run(export_images(manager, ["app:v1"], f))
    with tarfile.open(out) as tar:
        names = set(tar.getnames())
        docker_manifest = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert {"oci-layout", "index.json", "manifest.json"} <= names
    assert docker_manifest[0]["RepoTags"] == ["app:v1"]
    assert docker_manifest[0]["Config"] == "blobs/sha256/" + img.image_id.removeprefix("sha256:")

    asyncio.run(manager.remove("app:v1"))
    assert stored(manager) == ([], [])
    [again] = asyncio.run(import_archive(manager, out.open("rb")))
    assert again.id == img.image_id
    assert manager.find(f"docker.io/library/app@{img.manifest_digest}") is not None


def test_a_corrupt_layer_imports_nothing_and_leaves_nothing(manager: ImageManager) -> None:
    good, bad = image(b"good\n"), image(b"bad\n")
    bad_layer = bad.layers[1].digest.removeprefix("sha256:")
    data = oci_archive([(good, ["good:1"]), (bad, ["bad:1"])], mutate=corrupt(bad_layer))
    with pytest.raises(ArchiveError) as err:
        asyncio.run(import_archive(manager, io.BytesIO(data)))
    assert bad.layers[1].digest in str(err.value)
    assert manager.images() == []
    assert stored(manager) == ([], [])
    assert os.listdir(manager.content.ingest_dir) == []


def test_a_layer_whose_diff_id_differs_from_the_config_is_refused(manager: ImageManager) -> None:
    img = image()
    config = img.config_json
    config["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    body = json.dumps(config).encode()
    entries = {
        "c.json": body,
        "manifest.json": json.dumps([{"Config": "c.json", "RepoTags": ["x:y"], "Layers": ["a", "b"]}]).encode(),
        "a": img.layers[0].tar,
        "b": img.layers[1].tar,
    }
    with pytest.raises(ArchiveError) as err:
        asyncio.run(import_archive(manager, io.BytesIO(_tar(entries))))
    assert "digest mismatch of blob sha256:" + "0" * 64 in str(err.value)
    assert "Layers[1]: a plain layer, whose digest must be the config's diff ID" in str(err.value)
    assert manager.images() == []
    assert stored(manager) == ([], [])


def test_export_points_docker_at_a_plain_copy_of_a_zstd_layer(manager: ImageManager, tmp_path: Path) -> None:
    """docker before 23 cannot read zstd: manifest.json names the plain tar; the OCI manifest keeps the blob."""
    zstd_layer = ib.Layer([ib.File("/z", b"zstd\n")], compression="zstd")
    img = ib.busybox_image([zstd_layer])
    asyncio.run(import_archive(manager, io.BytesIO(oci_archive([(img, ["zs:1"])]))))
    out = tmp_path / "out.tar"
    with out.open("wb") as f:
        asyncio.run(export_images(manager, ["zs:1"], f))
    with tarfile.open(out) as tar:
        docker_layers = json.loads(_member(tar, "manifest.json"))[0]["Layers"]
        plain = _member(tar, docker_layers[1])
        index = json.loads(_member(tar, "index.json"))
        manifest = json.loads(_member(tar, "blobs/sha256/" + index["manifests"][0]["digest"][7:]))
    assert docker_layers[1] == "blobs/sha256/" + zstd_layer.diff_id.removeprefix("sha256:")
    assert ib.sha256_digest(plain) == zstd_layer.diff_id
    assert manifest["layers"][1]["digest"] == zstd_layer.digest
    assert os.listdir(manager.content.ingest_dir) == []


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    stream = tar.extractfile(name)
    assert stream is not None, name
    return stream.read()


def test_a_compressed_layer_whose_diff_id_differs_from_the_config_is_refused(manager: ImageManager) -> None:
    img = image()
    config = img.config_json
    config["rootfs"]["diff_ids"][1] = "sha256:" + "0" * 64
    entries = {
        "c.json": json.dumps(config).encode(),
        "manifest.json": json.dumps([{"Config": "c.json", "RepoTags": ["x:y"], "Layers": ["a", "b"]}]).encode(),
        "a": img.layers[0].tar,
        "b": img.layers[1].blob,  # gzip: stored under its own digest, the diff ID is checked as it unpacks
    }
    with pytest.raises(ArchiveError) as err:
        asyncio.run(import_archive(manager, io.BytesIO(_tar(entries))))
    assert f"layer {img.layers[1].digest}" in str(err.value)
    assert "diffID mismatch" in str(err.value)
    assert manager.images() == []
    assert stored(manager) == ([], [])


def test_export_of_an_ambiguous_id_prefix_is_refused_naming_refs(manager: ImageManager, tmp_path: Path) -> None:
    seen: dict[str, ib.Image] = {}
    for i in range(17):  # 16 hex digits: by the 17th image two IDs share their first one
        candidate = image(f"{i}\n".encode())
        first = candidate.image_id[7]
        if first in seen:
            pair = [seen[first], candidate]
            break
        seen[first] = candidate
    archive = oci_archive([(pair[0], ["one:1"]), (pair[1], ["two:2"])])
    asyncio.run(import_archive(manager, io.BytesIO(archive)))
    with (tmp_path / "out.tar").open("wb") as out, pytest.raises(InvalidArgument) as err:
        asyncio.run(export_images(manager, [f"sha256:{first}"], out))
    assert str(err.value).startswith("refs: image ID prefix")


def test_an_import_that_retags_a_stored_image_keeps_both_images(manager: ImageManager) -> None:
    """A stored image, re-imported under a new tag before the image that takes its old tag, stays (with its new one).

    The batch once dropped the old tag from the stale record, found it nameless, and deleted the image it had
    just recorded (and freed its layers).
    """
    first, second = image(b"first\n"), image(b"second\n")
    asyncio.run(import_archive(manager, io.BytesIO(docker_save([(first, ["x:1"])]))))
    asyncio.run(import_archive(manager, io.BytesIO(docker_save([(first, ["a:1"]), (second, ["x:1"])]))))
    tags = {record.id: record.repo_tags for record in manager.images()}
    assert tags == {first.image_id: ["docker.io/library/a:1"], second.image_id: ["docker.io/library/x:1"]}
    kept = manager.find("a:1")
    assert kept is not None and (manager.lower_dirs(kept)[0] / "hello").read_bytes() == b"first\n"
    reloaded = ImageIndex(manager.index._store)
    reloaded.load()
    assert {record.id: record.repo_tags for record in reloaded.all()} == tags


def test_an_import_that_moves_the_last_tag_of_an_image_in_use_keeps_that_image(tmp_path: Path) -> None:
    """A container's rootfs is an overlay of its image's layers: the image it runs must not be freed under it."""
    if os.geteuid() != 0:
        pytest.skip("unpacking layers owned by root needs root")
    old, new = image(b"old\n"), image(b"new\n")
    config = Config()
    config.root = str(tmp_path / "root")
    store = Store.open(config.root)
    images = ImageManager(config, store, in_use=lambda image_id: image_id == old.image_id)
    images.index.load()
    try:
        asyncio.run(import_archive(images, io.BytesIO(docker_save([(old, ["app:1"])]))))
        asyncio.run(import_archive(images, io.BytesIO(docker_save([(new, ["app:1"])]))))
        kept = images.index.get(old.image_id)
        assert kept is not None and kept.repo_tags == []
        assert (images.lower_dirs(kept)[0] / "hello").read_bytes() == b"old\n"
        assert images.find("app:1") is not None and images.find("app:1").id == new.image_id  # type: ignore[union-attr]
    finally:
        asyncio.run(images.close())
        store.close()


def test_an_image_named_through_an_index_gets_the_repo_digest_a_pull_of_that_name_gives(manager: ImageManager) -> None:
    """docker 25's save and containerd's export name a multi-platform image by its index: a pull records
    name@<index digest> (what a pod pinned by digest asks for), so an import must too, and keep the index."""
    index = ib.multi_arch_index()
    [summary] = asyncio.run(import_archive(manager, io.BytesIO(oci_archive([(index, ["multi:latest"])]))))
    assert summary.id == index.manifests[0].image_id
    record = manager.find(f"docker.io/library/multi@{index.manifest_digest}")
    assert record is not None and record.id == index.manifests[0].image_id
    assert record.repo_digests == [f"docker.io/library/multi@{index.manifest_digest}"]
    assert manager.content.has(index.manifest_digest)
    assert record.manifest_digest == index.manifests[0].manifest_digest  # what runs: the host's manifest


def test_a_layout_entry_named_by_digest_alone_imports_with_that_repo_digest(manager: ImageManager) -> None:
    """containerd names an image pulled by digest `repo@sha256:…` (no tag): its export is imported, untagged."""
    img = image()
    data = _renamed(oci_archive([(img, ["app:v1"])]), f"registry.example/team/app@{img.manifest_digest}")
    [summary] = asyncio.run(import_archive(manager, io.BytesIO(data)))
    assert summary.id == img.image_id
    record = manager.find(f"registry.example/team/app@{img.manifest_digest}")
    assert record is not None and record.repo_tags == []
    assert record.repo_digests == [f"registry.example/team/app@{img.manifest_digest}"]
    other = "sha256:" + "0" * 64
    assert f"names digest {other}" in refused(_renamed(oci_archive([(img, ["app:v1"])]), f"app@{other}"))


def _renamed(data: bytes, name: str) -> bytes:
    """The layout with its one index.json entry named `name` (containerd's annotation only)."""
    entries = _entries(data)
    index = json.loads(entries["index.json"])
    index["manifests"][0]["annotations"] = {"io.containerd.image.name": name}
    entries["index.json"] = json.dumps(index).encode()
    return _tar(entries)


def test_a_failed_recording_leaves_the_stored_images_names_as_they_were(
    manager: ImageManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database refusing the import (a full disk) must not leave memory saying the old image lost its tag."""
    old, new = image(b"old\n"), image(b"new\n")
    asyncio.run(import_archive(manager, io.BytesIO(docker_save([(old, ["app:1"]), (old, ["app:2"])]))))

    def full(conn: sqlite3.Connection, record: ImageRecord) -> None:
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(index_module, "_write", full)
    with pytest.raises(sqlite3.OperationalError):
        asyncio.run(import_archive(manager, io.BytesIO(docker_save([(new, ["app:1"])]))))
    kept = manager.find("app:1")
    assert kept is not None and kept.id == old.image_id
    assert kept.repo_tags == ["docker.io/library/app:1", "docker.io/library/app:2"]
