"""Layer extraction and the layer store, without root.

Ownership, device nodes, trusted.* xattrs and overlay markers need root:
tests/integration/test_unpack_root.py covers them.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
import zstandard

from cri.storage import layers as layers_module
from cri.storage.layers import LayerInfo, LayerNotFound, LayerStore, chain_ids
from cri.storage.unpack import UnpackError, UnpackResult, WhiteoutMode, is_foreign, unpack_layer, unpack_stream
from tests.support.layer_tar import (
    MEDIA_TYPES,
    Compression,
    Entry,
    build_layer,
    compress,
    directory,
    file,
    hardlink,
    opaque,
    sha256_digest,
    symlink,
    tar_bytes,
    whiteout,
)

OCI_TAR = MEDIA_TYPES["none"]
DOCKER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"


def unpack(
    tmp_path: Path,
    entries: list[Entry],
    *,
    compression: Compression = "gzip",
    dest: Path | None = None,
    whiteout_mode: WhiteoutMode = "overlay",
) -> tuple[UnpackResult, Path]:
    layer = build_layer(entries, compression)
    blob = tmp_path / f"blob-{layer.digest[7:19]}"
    blob.write_bytes(layer.blob)
    dest = dest or tmp_path / "rootfs"
    dest.mkdir(exist_ok=True)
    return unpack_layer(blob, layer.media_type, dest, whiteout_mode), dest


def write_blob(tmp_path: Path, data: bytes, name: str = "blob") -> Path:
    blob = tmp_path / name
    blob.write_bytes(data)
    return blob


def tree(root: Path) -> dict[str, tuple[str, int, bytes]]:
    """What a user would compare: relative path -> (kind, permission bits, content or link target)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("symlink", 0, os.readlink(path).encode())
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode), b"")
            else:
                out[rel] = ("file", stat.S_IMODE(st.st_mode), path.read_bytes())
    return out


SAMPLE = [
    directory("etc", 0o755),
    file("etc/hostname", b"layer\n"),
    file("etc/big", os.urandom(300_000)),
    directory("usr/bin", 0o755),
    file("usr/bin/tool", b"#!/bin/sh\n", 0o755),
    symlink("bin", "usr/bin"),
]


# -- compression, media types, diffID --


def test_gzip_zstd_and_plain_layers_unpack_to_the_same_files(tmp_path):
    trees = []
    for compression in ("gzip", "zstd", "none"):
        result, dest = unpack(tmp_path, SAMPLE, compression=compression, dest=tmp_path / compression)
        assert result.diff_id == sha256_digest(tar_bytes(SAMPLE))
        assert result.size == 6 + 300_000 + 10
        assert result.entries == len(SAMPLE)
        trees.append(tree(dest))
    assert trees[0] == trees[1] == trees[2]
    assert trees[0]["etc/hostname"] == ("file", 0o644, b"layer\n")
    assert trees[0]["bin"] == ("symlink", 0, b"usr/bin")


def test_docker_gzip_media_type(tmp_path):
    blob = write_blob(tmp_path, compress(tar_bytes(SAMPLE), "gzip"))
    (tmp_path / "d").mkdir()
    result = unpack_layer(blob, DOCKER_GZIP, tmp_path / "d")
    assert result.diff_id == sha256_digest(tar_bytes(SAMPLE))
    assert (tmp_path / "d/usr/bin/tool").read_bytes() == b"#!/bin/sh\n"


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
def test_compression_is_sniffed_when_the_type_says_plain_tar(tmp_path, compression):
    blob = write_blob(tmp_path, compress(tar_bytes(SAMPLE), compression))
    (tmp_path / "d").mkdir()
    result = unpack_layer(blob, OCI_TAR, tmp_path / "d")
    assert result.diff_id == sha256_digest(tar_bytes(SAMPLE))
    assert (tmp_path / "d/etc/hostname").read_bytes() == b"layer\n"


def test_multi_member_gzip_and_multi_frame_zstd_are_read_to_the_end(tmp_path):
    tar = tar_bytes(SAMPLE)
    half = len(tar) // 2
    for name, blob in [
        ("gz", gzip.compress(tar[:half]) + gzip.compress(tar[half:])),
        ("zst", zstandard.ZstdCompressor().compress(tar[:half]) + zstandard.ZstdCompressor().compress(tar[half:])),
    ]:
        (tmp_path / name).mkdir()
        result = unpack_layer(write_blob(tmp_path, blob, f"{name}.blob"), OCI_TAR, tmp_path / name)
        assert result.diff_id == sha256_digest(tar)
        assert (tmp_path / name / "etc/big").stat().st_size == 300_000


def test_declared_compression_that_is_not_there_is_refused(tmp_path):
    blob = write_blob(tmp_path, tar_bytes(SAMPLE))
    (tmp_path / "d").mkdir()
    with pytest.raises(UnpackError, match=r"tar\+gzip says gzip"):
        unpack_layer(blob, MEDIA_TYPES["gzip"], tmp_path / "d")


def test_unknown_media_type_is_refused_naming_it(tmp_path):
    blob = write_blob(tmp_path, tar_bytes(SAMPLE))
    (tmp_path / "d").mkdir()
    with pytest.raises(UnpackError, match=r"application/vnd\.example\.layer"):
        unpack_layer(blob, "application/vnd.example.layer", tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []


def test_foreign_layers_are_recognised():
    assert is_foreign("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip")
    assert is_foreign("application/vnd.oci.image.layer.nondistributable.v1.tar")
    assert is_foreign("application/vnd.docker.image.rootfs.foreign.diff.tar.gzip")
    assert not is_foreign(DOCKER_GZIP)
    assert not is_foreign(MEDIA_TYPES["zstd"])


def test_diff_id_covers_bytes_after_the_tar_end(tmp_path):
    # Some writers pad past the two zero blocks; the diffID is of the whole uncompressed stream.
    padded = tar_bytes(SAMPLE) + b"\0" * 20_000
    (tmp_path / "d").mkdir()
    result = unpack_layer(write_blob(tmp_path, compress(padded, "zstd")), MEDIA_TYPES["zstd"], tmp_path / "d")
    assert result.diff_id == "sha256:" + hashlib.sha256(padded).hexdigest()


@pytest.mark.parametrize("compression", ["gzip", "zstd", "none"])
def test_a_pipe_that_cannot_seek_unpacks_like_the_file(tmp_path, compression):
    # The download feeds the unpack through a pipe: the compression is sniffed without seeking back.
    blob = compress(tar_bytes(SAMPLE), compression)
    (tmp_path / "file").mkdir()
    (tmp_path / "pipe").mkdir()
    from_file = unpack_layer(write_blob(tmp_path, blob), MEDIA_TYPES[compression], tmp_path / "file")
    read_end, write_end = os.pipe()

    def feed() -> None:
        with open(write_end, "wb") as out:
            for i in range(0, len(blob), 1000):  # small writes: the head arrives in pieces too
                out.write(blob[i : i + 1000])

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        with open(read_end, "rb", buffering=0) as source:
            from_pipe = unpack_stream(source, MEDIA_TYPES[compression], tmp_path / "pipe", label="piped")
    finally:
        feeder.join()
    assert from_pipe == from_file
    assert tree(tmp_path / "pipe") == tree(tmp_path / "file")


def test_truncated_blob_is_refused_naming_the_layer(tmp_path):
    blob_data = compress(tar_bytes(SAMPLE), "gzip")
    blob = write_blob(tmp_path, blob_data[: len(blob_data) // 2], "cut.tgz")
    (tmp_path / "d").mkdir()
    with pytest.raises(UnpackError, match=r"layer cut\.tgz: corrupt or truncated"):
        unpack_layer(blob, MEDIA_TYPES["gzip"], tmp_path / "d")


@pytest.mark.parametrize("compression", ["gzip", "zstd"])
@pytest.mark.parametrize("damage", ["cut", "flipped"])
def test_a_damaged_compressed_stream_is_refused_naming_the_layer(tmp_path, compression, damage):
    text = b"".join(b"line %d of a text file\n" % i for i in range(30_000))
    data = bytearray(compress(tar_bytes([file("big", text), *SAMPLE]), compression))
    if damage == "cut":  # the decompressor ends early; the tar reader notices
        del data[len(data) // 2 :]
    else:  # in the first block: the decompressor itself fails
        data[20] ^= 0xFF
    blob = write_blob(tmp_path, bytes(data), "damaged")
    (tmp_path / "d").mkdir()
    with pytest.raises(UnpackError, match=r"layer damaged: corrupt or truncated"):
        unpack_layer(blob, MEDIA_TYPES[compression], tmp_path / "d")


TWO_FILES = [file("first", os.urandom(1000)), file("second", os.urandom(600))]
SECOND_HEADER = 1536  # the first header, then 1000 bytes of data padded to 1024


@pytest.mark.parametrize(
    "cut",
    [100, 512 + 300, 512 + 1000 + 10, SECOND_HEADER + 200, SECOND_HEADER + 512 + 599],
    ids=["first-header", "first-data", "first-padding", "second-header", "second-data"],
)
def test_a_tar_cut_anywhere_is_refused_naming_the_layer(tmp_path, cut):
    # Uncompressed, so only the tar reader can notice; cut in a header, tarfile used to stop early instead.
    blob = write_blob(tmp_path, tar_bytes(TWO_FILES)[:cut], "cut.tar")
    (tmp_path / "d").mkdir()
    with pytest.raises(UnpackError, match=r"layer cut\.tar: corrupt or truncated archive"):
        unpack_layer(blob, OCI_TAR, tmp_path / "d")


def test_a_damaged_header_is_refused_not_taken_for_the_end(tmp_path):
    data = bytearray(tar_bytes(TWO_FILES))
    data[SECOND_HEADER + 2] ^= 0x01  # a bit of the second name: its checksum no longer holds
    (tmp_path / "d").mkdir()
    with pytest.raises(UnpackError, match=r"layer damaged: corrupt or truncated archive: invalid header: bad checksum"):
        unpack_layer(write_blob(tmp_path, bytes(data), "damaged"), OCI_TAR, tmp_path / "d")


# GNU tar's options for each flavour of sparse member (containerd and cri-o read them all).
SPARSE_TAR_OPTIONS = {
    "gnu": ["--format=gnu"],
    "pax-1.0": ["--format=posix"],
    "pax-0.1": ["--format=posix", "--sparse-version=0.1"],
    "pax-0.0": ["--format=posix", "--sparse-version=0.0"],
}
SPARSE_SIZE = 16 << 20


def sparse_layer(tmp_path, flavour):
    """A layer made by `tar --sparse` of a 16 MiB file that is mostly holes, then a plain file; the sources."""
    src = tmp_path / "src"
    src.mkdir()
    with open(src / "holes", "wb") as out:
        out.write(b"head" * 1000)  # data at the start
        out.seek(8 << 20)
        out.write(b"middle")  # a hole before, one after up to the end
        out.truncate(SPARSE_SIZE)
    os.chmod(src / "holes", 0o640)
    os.utime(src / "holes", (1_600_000_000, 1_600_000_000))
    (src / "after").write_bytes(b"the stream stays in step")
    tar = subprocess.run(
        ["tar", *SPARSE_TAR_OPTIONS[flavour], "--sparse", "-cf", "-", "-C", str(src), "holes", "after"],
        check=True,
        capture_output=True,
        timeout=60,
    ).stdout
    return tar, src


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar writes the sparse archive")
@pytest.mark.parametrize("flavour", list(SPARSE_TAR_OPTIONS))
def test_a_sparse_file_extracts_with_its_holes(tmp_path, flavour):
    tar, src = sparse_layer(tmp_path, flavour)
    assert len(tar) < 1 << 20, "tar stored the holes: not a sparse archive"
    dest = tmp_path / "d"
    dest.mkdir()
    result = unpack_layer(write_blob(tmp_path, compress(tar, "gzip")), MEDIA_TYPES["gzip"], dest)
    assert result.diff_id == sha256_digest(tar)
    assert result.size == SPARSE_SIZE + len(b"the stream stays in step")
    extracted = (dest / "holes").stat()
    assert (extracted.st_size, stat.S_IMODE(extracted.st_mode), extracted.st_mtime) == (SPARSE_SIZE, 0o640, 1.6e9)
    assert (dest / "holes").read_bytes() == (src / "holes").read_bytes()
    # The holes stay holes: a few blocks of data on disk, not 16 MiB (ext4 and tmpfs both keep holes).
    assert extracted.st_blocks * 512 < 1 << 20
    assert (dest / "after").read_bytes() == b"the stream stays in step"


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar writes the sparse archive")
def test_a_sparse_map_past_the_real_size_is_refused_naming_the_entry(tmp_path):
    tar, _ = sparse_layer(tmp_path, "gnu")
    header = bytearray(tar[:512])
    assert header[156:157] == b"S" and header[:6] == b"holes\0"
    header[483:495] = b"%011o\0" % (1 << 20)  # the real size: 1 MiB, but data lies at 8 MiB
    header[148:156] = b" " * 8
    header[148:156] = b"%06o\0 " % sum(header)
    blob = write_blob(tmp_path, bytes(header) + tar[512:], "sparse.tar")
    (tmp_path / "d").mkdir()
    with pytest.raises(
        UnpackError,
        match=r"layer sparse\.tar: corrupt or truncated archive: invalid sparse map of 'holes': "
        r"chunk at 8388608 runs past the real size 1048576",
    ):
        unpack_layer(blob, OCI_TAR, tmp_path / "d")


# -- hostile names, symlinks and hardlinks --


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A canary directory next to the destination: nothing may change in it."""
    canary = tmp_path / "outside"
    canary.mkdir()
    (canary / "secret").write_bytes(b"original")
    return canary


def assert_untouched(outside: Path) -> None:
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_bytes() == b"original"
    assert (outside / "secret").stat().st_nlink == 1


@pytest.mark.parametrize("name", ["../outside/pwned", "a/../../outside/pwned", "./../outside/pwned"])
def test_entry_climbing_out_of_the_root_is_refused_naming_it(tmp_path, outside, name):
    with pytest.raises(UnpackError, match=rf"entry {name!r}: path .* escapes the layer root"):
        unpack(tmp_path, [file("ok", b"1"), file(name, b"x")])
    assert_untouched(outside)


def test_absolute_entry_names_are_taken_relative_to_the_root(tmp_path, outside):
    _, dest = unpack(tmp_path, [file(f"{outside}/pwned", b"x"), file("/abs/x", b"y")])
    assert (dest / str(outside).lstrip("/") / "pwned").read_bytes() == b"x"
    assert (dest / "abs/x").read_bytes() == b"y"
    assert_untouched(outside)


def test_symlink_in_the_parent_chain_resolves_inside_the_root(tmp_path, outside):
    entries = [
        symlink("evil", str(outside)),  # absolute: outside if followed on the host
        file("evil/pwned", b"1"),
        symlink("up", "../../../../../.."),  # relative, climbing past the root
        file("up/escaped", b"2"),
        symlink("slash", "/"),
        file("slash/tmp/pwned", b"3"),
    ]
    _, dest = unpack(tmp_path, entries)
    assert os.readlink(dest / "evil") == str(outside)  # stored verbatim
    assert (dest / str(outside).lstrip("/") / "pwned").read_bytes() == b"1"
    assert (dest / "escaped").read_bytes() == b"2"
    assert (dest / "tmp/pwned").read_bytes() == b"3"
    assert not (tmp_path / "escaped").exists()
    assert_untouched(outside)


def test_whiteouts_through_a_symlink_cannot_delete_outside(tmp_path, outside):
    entries = [symlink("evil", str(outside)), whiteout("evil/secret"), opaque("evil")]
    _, dest = unpack(tmp_path, entries, whiteout_mode="apply")
    assert os.readlink(dest / "evil") == str(outside)
    assert_untouched(outside)


def test_symlink_loop_in_the_parent_chain_is_refused(tmp_path):
    with pytest.raises(UnpackError, match="too many levels of symbolic links"):
        unpack(tmp_path, [symlink("a", "b"), symlink("b", "a"), file("a/x", b"")])


def test_hardlink_through_a_symlink_to_outside_is_refused(tmp_path, outside):
    with pytest.raises(UnpackError, match=r"entry 'h': hardlink target 'out/secret' is not in the layer"):
        unpack(tmp_path, [symlink("out", str(outside)), hardlink("h", "out/secret")])
    assert_untouched(outside)


def test_hardlink_climbing_out_of_the_root_is_refused(tmp_path, outside):
    with pytest.raises(UnpackError, match=r"entry 'link': path '../../outside/secret' escapes"):
        unpack(tmp_path, [hardlink("link", "../../outside/secret")])
    assert_untouched(outside)


def test_file_entry_replaces_a_symlink_instead_of_writing_through_it(tmp_path, outside):
    _, dest = unpack(tmp_path, [symlink("s", str(outside / "secret")), file("s", b"new", 0o600)])
    assert not (dest / "s").is_symlink()
    assert (dest / "s").read_bytes() == b"new"
    assert_untouched(outside)


def test_file_entry_replaces_a_hardlink_instead_of_writing_through_it(tmp_path):
    _, dest = unpack(tmp_path, [file("a", b"first"), hardlink("b", "a"), file("b", b"second")])
    assert (dest / "a").read_bytes() == b"first"
    assert (dest / "b").read_bytes() == b"second"
    assert (dest / "a").stat().st_nlink == 1


def test_directory_entry_replaces_a_symlink_to_outside(tmp_path, outside):
    _, dest = unpack(tmp_path, [symlink("d", str(outside)), directory("d"), file("d/f", b"in")])
    assert (dest / "d").is_dir() and not (dest / "d").is_symlink()
    assert (dest / "d/f").read_bytes() == b"in"
    assert_untouched(outside)


def test_replacing_entries_of_another_kind(tmp_path):
    first = [directory("was-dir"), file("was-dir/x", b"x"), file("was-file", b"f"), directory("kept"), file("kept/a")]
    _, dest = unpack(tmp_path, first)
    unpack(tmp_path, [file("was-dir", b"now a file"), directory("was-file"), directory("kept", 0o700)], dest=dest)
    assert (dest / "was-dir").read_bytes() == b"now a file"
    assert (dest / "was-file").is_dir()
    assert (dest / "kept/a").exists()  # a directory over a directory keeps its contents
    assert stat.S_IMODE((dest / "kept").stat().st_mode) == 0o700


# -- what is preserved --


def test_modes_setuid_sticky_and_read_only_dirs(tmp_path):
    entries = [
        file("suid", b"", 0o4755),
        file("sgid", b"", 0o2755),
        directory("tmp", 0o1777),
        directory("ro", 0o555),
        file("ro/inside", b"written before the dir became read-only", 0o444),
    ]
    _, dest = unpack(tmp_path, entries)
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((dest / "tmp").stat().st_mode) == 0o1777
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o555
    assert (dest / "ro/inside").read_bytes().startswith(b"written")
    assert stat.S_IMODE((dest / "sgid").stat().st_mode) == 0o2755


def test_mtimes_of_files_dirs_and_symlinks(tmp_path):
    entries = [
        directory("d", mtime=1_000_000_000),
        file("d/f", b"x", mtime=1_100_000_000),
        symlink("d/link", "f", mtime=1_200_000_000),
        Entry("precise", "file", pax={"mtime": "1300000000.123456789"}),
    ]
    _, dest = unpack(tmp_path, entries)
    # The directory's time is set after its contents were written into it.
    assert (dest / "d").stat().st_mtime_ns == 1_000_000_000 * 10**9
    assert (dest / "d/f").stat().st_mtime_ns == 1_100_000_000 * 10**9
    assert (dest / "d/link").lstat().st_mtime_ns == 1_200_000_000 * 10**9
    assert (dest / "precise").stat().st_mtime_ns == 1_300_000_000_123_456_789


def test_hardlinks_share_an_inode_and_fifos_are_fifos(tmp_path):
    _, dest = unpack(tmp_path, [file("a", b"same"), hardlink("dir/b", "a"), Entry("pipe", "fifo", mode=0o640)])
    assert (dest / "a").stat().st_ino == (dest / "dir/b").stat().st_ino
    assert (dest / "a").stat().st_nlink == 2
    assert stat.S_ISFIFO((dest / "pipe").lstat().st_mode)
    assert stat.S_IMODE((dest / "pipe").lstat().st_mode) == 0o640


def test_user_xattrs_are_kept_byte_for_byte(tmp_path):
    value = b"\x00\xffbinary\n"
    result, dest = unpack(
        tmp_path, [file("f", b"", xattrs={"user.criopy": value}), directory("d", xattrs={"user.d": b"1"})]
    )
    if result.xattrs_skipped:
        pytest.skip(f"the file system under {tmp_path} has no user.* xattrs")
    assert os.getxattr(dest / "f", "user.criopy") == value
    assert os.getxattr(dest / "d", "user.d") == b"1"


def test_the_layer_root_entry_sets_the_root_directory(tmp_path):
    _, dest = unpack(tmp_path, [Entry("./", "dir", mode=0o750, mtime=1_000_000_000), file("./f", b"x")])
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert dest.stat().st_mtime_ns == 1_000_000_000 * 10**9
    with pytest.raises(UnpackError, match="the layer root can only be a directory"):
        unpack(tmp_path, [Entry("./", "file")], dest=tmp_path / "other")


def test_unsupported_entry_type_is_refused(tmp_path):
    header = bytearray(tar_bytes([Entry("odd", "file")]))
    # Make the member an unknown type ('Z') and rewrite the header checksum to match.
    header[156:157] = b"Z"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header[:512]):06o}\0 ".encode()
    (tmp_path / "d").mkdir()
    with pytest.raises(UnpackError, match="entry 'odd': unsupported tar entry type 'Z'"):
        unpack_layer(write_blob(tmp_path, bytes(header)), OCI_TAR, tmp_path / "d")


# -- whiteouts applied (the vfs way) --


def test_apply_mode_deletes_whited_out_paths_and_empties_opaque_dirs(tmp_path):
    lower = [
        file("gone", b"old"),
        directory("keep"),
        file("keep/a", b"a"),
        directory("opq"),
        file("opq/old", b"old"),
        directory("opq/sub"),
        file("opq/sub/deep", b"deep"),
    ]
    _, dest = unpack(tmp_path, lower, whiteout_mode="apply")
    upper = [
        whiteout("gone"),
        whiteout("never-existed"),
        directory("opq"),
        file("opq/before", b"written before the marker"),
        opaque("opq"),
        file("opq/after", b"written after the marker"),
        file("keep/b", b"b"),
    ]
    unpack(tmp_path, upper, dest=dest, whiteout_mode="apply")
    assert not (dest / "gone").exists()
    assert sorted(os.listdir(dest / "opq")) == ["after", "before"]
    assert sorted(os.listdir(dest / "keep")) == ["a", "b"]
    assert not any(name.startswith(".wh.") for _, dirs, files in os.walk(dest) for name in dirs + files)


def test_whiteout_never_hides_its_own_layer(tmp_path):
    _, dest = unpack(tmp_path, [file("x", b"same layer"), whiteout("x")], whiteout_mode="apply")
    assert (dest / "x").read_bytes() == b"same layer"


# -- the layer store --


def store_layer(tmp_path: Path, entries: list[Entry], compression: Compression = "gzip") -> tuple[Path, str, str]:
    layer = build_layer(entries, compression)
    blob = tmp_path / "blobs" / layer.digest[7:]
    blob.parent.mkdir(exist_ok=True)
    blob.write_bytes(layer.blob)
    return blob, layer.media_type, layer.diff_id


def test_chain_ids_follow_the_oci_image_spec():
    d = ["sha256:" + c * 64 for c in "abc"]
    c1 = "sha256:" + hashlib.sha256(f"{d[0]} {d[1]}".encode()).hexdigest()
    c2 = "sha256:" + hashlib.sha256(f"{c1} {d[2]}".encode()).hexdigest()
    assert chain_ids(d) == [d[0], c1, c2]
    assert chain_ids([]) == []
    with pytest.raises(UnpackError, match="not a sha256 digest"):
        chain_ids(["sha256:../../etc"])


@pytest.mark.parametrize("driver", ["overlay", "vfs"])
def test_ensure_twice_second_is_cached(tmp_path, driver):
    store = LayerStore(tmp_path / "root", driver)
    blob, media_type, diff_id = store_layer(tmp_path, SAMPLE)
    first = store.ensure(diff_id, None, blob, media_type, diff_id)
    second = store.ensure(diff_id, None, blob, media_type, diff_id)
    assert (first.cached, second.cached) == (False, True)
    assert first.path == second.path == tmp_path / "root/layers" / diff_id[7:] / "diff"
    assert (first.diff_id, first.size) == (second.diff_id, second.size) == (diff_id, 300_016)
    assert (first.path / "etc/hostname").read_bytes() == b"layer\n"
    assert store.exists(diff_id) and store.list() == [diff_id]


def test_diff_id_mismatch_is_refused_and_nothing_lands(tmp_path):
    store = LayerStore(tmp_path / "root")
    blob, media_type, diff_id = store_layer(tmp_path, SAMPLE)
    claimed = "sha256:" + "0" * 64
    with pytest.raises(UnpackError, match=f"layer diffID mismatch: config says {claimed}, blob gives {diff_id}"):
        store.ensure(claimed, None, blob, media_type, claimed)
    assert list((tmp_path / "root/layers").iterdir()) == []
    assert not store.exists(claimed)


def test_chain_id_that_does_not_follow_from_parent_is_refused(tmp_path):
    store = LayerStore(tmp_path / "root")
    blob, media_type, diff_id = store_layer(tmp_path, SAMPLE)
    with pytest.raises(UnpackError, match="does not follow"):
        store.ensure(diff_id, "sha256:" + "1" * 64, blob, media_type, diff_id)


def test_concurrent_ensure_of_one_chain_unpacks_it_once(tmp_path):
    store = LayerStore(tmp_path / "root")
    blob, media_type, diff_id = store_layer(tmp_path, SAMPLE)
    start = threading.Barrier(4)
    results: list[LayerInfo] = []

    def worker() -> None:
        start.wait()
        results.append(store.ensure(diff_id, None, blob, media_type, diff_id))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.cached for r in results) == [False, True, True, True]
    assert [p.name for p in (tmp_path / "root/layers").iterdir()] == [diff_id[7:]]
    assert tree(store.path(diff_id)) == tree(unpack(tmp_path, SAMPLE)[1])


def test_remove_is_idempotent_and_copes_with_read_only_dirs(tmp_path):
    store = LayerStore(tmp_path / "root")
    entries = [directory("ro", 0o555), directory("ro/inner", 0o500), file("ro/inner/f", b"x", 0o400)]
    blob, media_type, diff_id = store_layer(tmp_path, entries)
    store.ensure(diff_id, None, blob, media_type, diff_id)
    assert store.remove(diff_id) is True
    assert store.remove(diff_id) is False
    assert not store.exists(diff_id)
    assert list((tmp_path / "root/layers").iterdir()) == []


def test_cleanup_temp_removes_what_a_crash_left(tmp_path):
    store = LayerStore(tmp_path / "root")
    blob, media_type, diff_id = store_layer(tmp_path, SAMPLE)
    store.ensure(diff_id, None, blob, media_type, diff_id)
    leftover = tmp_path / "root/layers/tmp-crashed/diff/ro"
    leftover.mkdir(parents=True)
    (leftover / "f").write_bytes(b"half")
    leftover.chmod(0o555)
    assert store.cleanup_temp() == 1
    assert [p.name for p in (tmp_path / "root/layers").iterdir()] == [diff_id[7:]]
    assert store.cleanup_temp() == 0


def test_usage_counts_bytes_and_inodes(tmp_path):
    store = LayerStore(tmp_path / "root")
    assert store.usage() == (0, 0)
    entries = [directory("d"), file("d/big", b"x" * 100_000), file("g", b"g"), hardlink("h", "g")]
    blob, media_type, diff_id = store_layer(tmp_path, entries)
    store.ensure(diff_id, None, blob, media_type, diff_id)
    used, inodes = store.usage()
    # <hex>/, layer.json, diff/, d/, d/big, g (h is the same inode as g)
    assert inodes == 6
    assert used >= 100_000


def du(path: Path) -> tuple[int, int]:
    """(bytes, inodes) below `path` as GNU du counts them, the path itself left out."""
    bytes_out = subprocess.run(
        ["du", "-s", "-B1", "-x", str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    inodes_out = subprocess.run(
        ["du", "-s", "-x", "--inodes", str(path)], capture_output=True, text=True, timeout=60, check=True
    )
    top = path.stat()
    return int(bytes_out.stdout.split()[0]) - top.st_blocks * 512, int(inodes_out.stdout.split()[0]) - 1


def test_usage_follows_layers_added_and_removed_as_du_counts_them(tmp_path):
    store = LayerStore(tmp_path / "root")
    first = store_layer(tmp_path, [directory("d"), file("d/big", b"x" * 300_000), file("g", b"g"), hardlink("h", "g")])
    second = store_layer(tmp_path, [file("other", b"y" * 50_000)], "zstd")
    store.ensure(first[2], None, *first)
    assert store.usage() == du(store.dir)
    chain = chain_ids([first[2], second[2]])
    store.ensure(chain[1], chain[0], *second)
    assert store.usage() == du(store.dir)
    # A layer's figure goes with it, and one unpacked again is measured again.
    store.remove(chain[1])
    assert store.usage() == du(store.dir)
    store.ensure(chain[1], chain[0], *second)
    assert store.usage() == du(store.dir)
    store.remove(chain[0])
    store.remove(chain[1])
    assert store.usage() == du(store.dir) == (0, 0)


def test_usage_walks_a_published_layer_once(tmp_path, monkeypatch):
    store = LayerStore(tmp_path / "root")
    blob, media_type, diff_id = store_layer(tmp_path, [file(f"f{i}", b"z") for i in range(50)])
    store.ensure(diff_id, None, blob, media_type, diff_id)
    half_done = store.dir / "tmp-unpacking" / "diff"  # an unpack under way is walked every time
    half_done.mkdir(parents=True)
    walked: list[str] = []
    real = layers_module.tree_usage

    def counting(top: Path) -> tuple[int, int]:
        walked.append(top.name)
        return real(top)

    monkeypatch.setattr(layers_module, "tree_usage", counting)
    first = store.usage()
    assert sorted(walked) == sorted([diff_id[7:], "tmp-unpacking"])
    walked.clear()
    (half_done / "more").write_bytes(b"m" * 10_000)
    second = store.usage()
    assert walked == ["tmp-unpacking"]
    assert second[1] == first[1] + 1 and second == du(store.dir)


def test_lower_dirs_of_a_sixty_layer_chain(tmp_path):
    store = LayerStore(tmp_path / "root")
    layers = [store_layer(tmp_path, [file(f"layer-{i:02d}", str(i).encode())], "none") for i in range(60)]
    chain = chain_ids([diff_id for _, _, diff_id in layers])
    assert len(set(chain)) == 60
    parent = None
    for chain_id, (blob, media_type, diff_id) in zip(chain, layers, strict=True):
        store.ensure(chain_id, parent, blob, media_type, diff_id)
        parent = chain_id
    lowers = store.lower_dirs(chain)
    # Topmost first, as overlay's lowerdir wants. 60 such paths overflow the one page of overlay mount
    # data, which the mounter (not the store) has to work around.
    assert len(lowers) == 60
    assert lowers == [store.path(c) for c in reversed(chain)]
    assert (lowers[0] / "layer-59").read_bytes() == b"59"
    assert (lowers[-1] / "layer-00").read_bytes() == b"0"
    assert sorted(store.list()) == sorted(chain)


def test_lower_dirs_of_a_missing_layer_is_not_found(tmp_path):
    store = LayerStore(tmp_path / "root")
    with pytest.raises(LayerNotFound, match="is not in the store"):
        store.lower_dirs(["sha256:" + "a" * 64])


def test_vfs_layers_are_full_copies_with_whiteouts_applied(tmp_path):
    store = LayerStore(tmp_path / "root", "vfs")
    l1 = store_layer(tmp_path, [file("gone", b"1"), directory("opq"), file("opq/old", b"1"), file("a/same", b"s")])
    l2 = store_layer(tmp_path, [whiteout("gone"), opaque("opq"), file("opq/new", b"2"), hardlink("a/link", "a/same")])
    c1, c2 = chain_ids([l1[2], l2[2]])
    store.ensure(c1, None, *l1)
    top = store.ensure(c2, c1, *l2)
    assert sorted(tree(top.path)) == ["a", "a/link", "a/same", "opq", "opq/new"]
    assert (top.path / "a/link").stat().st_ino == (top.path / "a/same").stat().st_ino
    assert sorted(tree(store.path(c1))) == ["a", "a/same", "gone", "opq", "opq/old"]  # the parent is untouched


def test_vfs_needs_the_parent_in_the_store(tmp_path):
    store = LayerStore(tmp_path / "root", "vfs")
    blob, media_type, diff_id = store_layer(tmp_path, SAMPLE)
    parent = "sha256:" + "e" * 64
    child = "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()
    with pytest.raises(LayerNotFound, match=f"parent layer {parent}"):
        store.ensure(child, parent, blob, media_type, diff_id)
    assert list((tmp_path / "root/layers").iterdir()) == []
