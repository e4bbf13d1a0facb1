"""cri.storage.tarstream against Python's tarfile: the same members and bytes from the same archives.

Archives are written by tarfile itself (ustar, GNU and PAX) and by hand where tarfile writes no such
thing (old V7 headers, signed checksums, PAX global headers between members, GNU headers with times
where ustar keeps its prefix). The lean reader must give what tarfile's stream mode gives, read in
chunks of any size, and hash every byte of the stream, the padding after the archive's end included.
Where tarfile silently stops (a bad header, a header cut short), the lean reader raises.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cri.storage.tarstream import Member, TarError, TarReader

Format = Literal[0, 1, 2]  # tarfile's USTAR_FORMAT, GNU_FORMAT, PAX_FORMAT
FORMATS: dict[str, Format] = {"ustar": tarfile.USTAR_FORMAT, "gnu": tarfile.GNU_FORMAT, "pax": tarfile.PAX_FORMAT}
FIXED_MTIME = 1_700_000_000
Take = Literal["read", "copy", "skip"]


class Chunked:
    """A byte stream that hands out at most `size` bytes a read (the decompressor gives what it has)."""

    def __init__(self, data: bytes, size: int) -> None:
        self._data = data
        self._size = size
        self._pos = 0

    def read(self, size: int, /) -> bytes:
        step = min(size, self._size)
        out = self._data[self._pos : self._pos + step]
        self._pos += len(out)
        return out


def info(name: str, kind: bytes = tarfile.REGTYPE, content: bytes = b"", **attrs: Any) -> tuple[tarfile.TarInfo, bytes]:
    member = tarfile.TarInfo(name)
    member.type = kind
    member.size = len(content) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE) else 0
    member.mtime = FIXED_MTIME
    member.mode = 0o644
    for key, value in attrs.items():
        setattr(member, key, value)
    return member, content


def header(member: tarfile.TarInfo, fmt: Format) -> bytes:
    return member.tobuf(fmt, "utf-8", "surrogateescape")


def block_padded(content: bytes) -> bytes:
    return content + b"\0" * (-len(content) % 512)


def archive(members: list[tuple[tarfile.TarInfo, bytes] | bytes], fmt: Format, end: bool = True) -> bytes:
    """A tar of `members` (a TarInfo and its content, or raw header bytes to put as they are)."""
    parts = []
    for item in members:
        if isinstance(item, bytes):
            parts.append(item)
        else:
            member, content = item
            parts.append(header(member, fmt) + block_padded(content))
    data = b"".join(parts)
    if end:  # tarfile's end: two zero blocks, then zeros up to a whole 10 KiB record
        data += b"\0" * 1024
        data += b"\0" * (-len(data) % tarfile.RECORDSIZE)
    return data


def rechecksum(block: bytearray, signed: bool = False) -> bytes:
    """`block` (one header) with its checksum field rewritten, as an old Sun tar would with `signed`."""
    block[148:156] = b" " * 8
    total = sum(b - 256 if signed and b > 127 else b for b in block[:512])
    block[148:156] = b"%06o\0 " % total
    return bytes(block)


@dataclass(frozen=True)
class Seen:
    name: str
    linkname: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float
    devmajor: int
    devminor: int
    pax_headers: dict[str, str]
    content: bytes | None


def seen(member: tarfile.TarInfo | Member, content: bytes | None) -> Seen:
    return Seen(
        member.name,
        member.linkname,
        member.type,
        member.mode,
        member.uid,
        member.gid,
        member.size,
        member.mtime,
        member.devmajor,
        member.devminor,
        dict(member.pax_headers),
        content,
    )


def by_tarfile(data: bytes, take: Take = "read") -> list[Seen]:
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        for member in tf:
            source = tf.extractfile(member) if member.isreg() and take != "skip" else None
            out.append(seen(member, source.read() if source else None))
    return out


def by_lean(data: bytes, read_size: int = 1 << 20, take: Take = "read") -> tuple[list[Seen], str]:
    """The members the lean reader yields, their content, and the hash of the stream."""
    reader = TarReader(Chunked(data, read_size), read_size)
    out = []
    for member in reader:
        content = None
        if member.isreg() and take == "read":
            content = reader.read_content()
        elif member.isreg() and take == "copy":
            fd = os.memfd_create("tarstream-test")
            try:
                assert reader.copy_to(fd) == member.size
                content = os.pread(fd, member.size + 1, 0)
            finally:
                os.close(fd)
        out.append(seen(member, content))
    reader.drain()
    return out, reader.hash.hexdigest()


def assert_same(data: bytes, read_sizes: tuple[int, ...] = (1 << 20, 512, 1023, 7)) -> list[Seen]:
    expected = by_tarfile(data)
    assert expected, "the archive has members"
    for read_size in read_sizes:
        for take in ("read", "copy"):
            members, digest = by_lean(data, read_size, take)
            assert members == expected, (read_size, take)
            assert digest == hashlib.sha256(data).hexdigest()
    skipped, digest = by_lean(data, 1023, "skip")
    assert skipped == by_tarfile(data, "skip")
    assert digest == hashlib.sha256(data).hexdigest()
    return expected


# -- archives of every format, with what each format can hold --

LONG_NAME = "/".join(["d" * 60] * 5) + "/file"  # 310 bytes: beyond ustar's 100 + 155 prefix
USTAR_SPLIT_NAME = "a" * 120 + "/" + "b" * 90  # 211 bytes: ustar splits it into prefix and name
LONG_TARGET = "../" * 40 + "target"  # 126 bytes: beyond the 100 of the linkname field


def common_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    """What all three formats can hold."""
    return [
        info("etc/", tarfile.DIRTYPE, mode=0o755),
        info("etc/hosts", content=b"127.0.0.1 localhost\n" * 5),
        info("empty"),
        info("exactly-512", content=os.urandom(512)),
        info("exactly-1536", content=os.urandom(1536)),
        info("one-over", content=os.urandom(513)),
        info("link", tarfile.SYMTYPE, linkname="etc/hosts", mode=0o777),
        info("hard", tarfile.LNKTYPE, linkname="etc/hosts"),
        info("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
        info("dev/sda", tarfile.BLKTYPE, devmajor=8, devminor=0, mode=0o660),
        info("pipe", tarfile.FIFOTYPE, mode=0o600),
        info("contiguous", tarfile.CONTTYPE, content=b"contiguous data"),
        info("old-regular", tarfile.AREGTYPE, content=b"type NUL"),
        info("ünïcødé/файл.txt", content=b"utf-8 name"),
        info(USTAR_SPLIT_NAME, content=b"split"),
        info("setuid", mode=0o4755, uid=1000, gid=100, content=b"#!/bin/sh\n"),
        info("max-octal", uid=8**7 - 1, gid=8**7 - 1, mtime=8**11 - 1),
        info("epoch", mtime=0),
        info("dir-with-slashes//", tarfile.DIRTYPE),
    ]


def gnu_and_pax_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    """What ustar cannot hold: long names and targets, big ids, negative times, non-UTF-8 names."""
    return [
        info(LONG_NAME, content=b"long"),
        info(LONG_NAME + "-dir/", tarfile.DIRTYPE),
        info("long-symlink", tarfile.SYMTYPE, linkname=LONG_TARGET),
        info("long-hardlink", tarfile.LNKTYPE, linkname=LONG_NAME),
        info("big-ids", uid=2**33 + 5, gid=2**40, content=b"ids"),
        info("before-1970", mtime=-1_000_000),
        info("caf\udce9-latin1", content=b"not utf-8"),  # the byte 0xe9 alone
    ]


def pax_members() -> list[tuple[tarfile.TarInfo, bytes]]:
    xattr_value = b"\x00\xff\xfe binary"
    return [
        info("fraction", mtime=1_700_000_000.25),
        info("ns-time", pax_headers={"mtime": "1700000000.123456789", "atime": "1600000000.5"}),
        info(
            "xattrs",
            content=b"x",
            pax_headers={
                "SCHILY.xattr.user.binary": xattr_value.decode("utf-8", "surrogateescape"),
                "SCHILY.xattr.security.capability": "\x01\x00\x00\x02",
                "LIBARCHIVE.xattr.user.b64": base64.b64encode(b"libarchive").decode().rstrip("="),
            },
        ),
        info("pax-overrides", pax_headers={"path": "renamed-by-pax//", "uid": "77", "gid": "not-a-number"}),
        info("pax-link", tarfile.SYMTYPE, pax_headers={"linkpath": "pax-target"}),
        info("binary-name-\udcff", content=b"hdrcharset=BINARY"),
    ]


@pytest.mark.parametrize("fmt", ["ustar", "gnu", "pax"])
def test_tarfile_archives_read_the_same(fmt: str) -> None:
    members = common_members()
    if fmt != "ustar":
        members += gnu_and_pax_members()
    if fmt == "pax":
        members += pax_members()
    expected = assert_same(archive(list(members), FORMATS[fmt]))
    names = [m.name for m in expected]
    assert "etc" in names and "dir-with-slashes" in names  # tarfile strips a directory's slashes
    if fmt != "ustar":
        assert LONG_NAME in names and any(m.linkname == LONG_TARGET for m in expected)
    if fmt == "gnu":
        assert any(m.mtime == -1_000_000 for m in expected)  # base-256, negative


def test_pax_global_headers_apply_to_the_members_after_them() -> None:
    first_global = tarfile.TarInfo.create_pax_global_header({"uid": "42", "comment": "first"})
    second_global = tarfile.TarInfo.create_pax_global_header({"mtime": "123.5", "uid": "7", "path": "global-path"})
    data = archive(
        [
            first_global,
            info("a", content=b"a"),
            info("b", pax_headers={"gid": "9"}),
            second_global,
            info("c", content=b"c"),
            info("d", pax_headers={"path": "own-path"}),
        ],
        tarfile.PAX_FORMAT,
    )
    expected = assert_same(data)
    assert [(m.name, m.uid, m.mtime) for m in expected] == [
        ("a", 42, FIXED_MTIME),
        ("b", 42, FIXED_MTIME),
        ("global-path", 7, 123.5),
        ("own-path", 7, 123.5),
    ]


def test_gnu_longname_and_pax_headers_combine_as_tarfile_combines_them() -> None:
    long_dir, _ = info("x" * 150 + "/", tarfile.DIRTYPE)
    longname = header(long_dir, tarfile.GNU_FORMAT)  # an 'L' header, then the dir's own header
    pax_then_gnu, _ = info("y" * 150, pax_headers={"uid": "5"})
    renamed, _ = info("z" * 150)
    owned, _ = info("owned", uid=5, gid=6)
    data = archive(
        [
            longname,
            pax_header({"mtime": "99.75"}) + header(pax_then_gnu, tarfile.GNU_FORMAT),  # 'x', then 'L', then it
            pax_header({"path": "pax-wins"}) + header(renamed, tarfile.GNU_FORMAT),  # the outer one has the last word
            header(renamed, tarfile.GNU_FORMAT)[:1024] + pax_header({"path": "inner"}) + header(owned, 0),
            pax_header({"uid": "not-a-number", "gid": "12"}) + header(owned, tarfile.USTAR_FORMAT),
            info("plain", content=b"p"),
        ],
        tarfile.GNU_FORMAT,
    )
    expected = assert_same(data)
    assert expected[0].name == "x" * 150 and expected[0].type == tarfile.DIRTYPE
    assert expected[1].name == "y" * 150 and expected[1].mtime == 99.75
    assert [m.name for m in expected[2:4]] == ["pax-wins", "z" * 150]
    assert (expected[4].uid, expected[4].gid) == (0, 12)  # a bad PAX number reads as 0, as tarfile reads it


def pax_header(records: dict[str, str]) -> bytes:
    """A PAX 'x' header (its header block and records) for the member that follows it."""
    carrier, _ = info("carrier", pax_headers=records)
    return header(carrier, tarfile.PAX_FORMAT)[:-512]  # less the carrier's own header


def test_old_v7_headers_and_signed_checksums() -> None:
    def v7(member: tarfile.TarInfo, content: bytes = b"") -> bytes:
        block = bytearray(header(member, tarfile.USTAR_FORMAT))
        block[257:500] = bytes(243)  # no magic, version, owner names, devices or prefix
        return rechecksum(block) + block_padded(content)

    old_dir, _ = info("olddir/", tarfile.AREGTYPE)  # V7: a directory is a NUL-type entry with a slash
    old_file, _ = info("olddir/file", tarfile.AREGTYPE, size=3)
    sun, sun_data = info("sun-\xe9\xff", content=b"signed")  # high bytes: the signed sum differs
    data = archive(
        [
            v7(old_dir),
            v7(old_file, b"old"),
            rechecksum(bytearray(header(sun, tarfile.USTAR_FORMAT)), signed=True) + block_padded(sun_data),
        ],
        tarfile.USTAR_FORMAT,
    )
    expected = assert_same(data)
    assert [(m.name, m.type) for m in expected] == [
        ("olddir", tarfile.DIRTYPE),
        ("olddir/file", tarfile.AREGTYPE),
        ("sun-\xe9\xff", tarfile.REGTYPE),
    ]


def test_a_gnu_header_with_times_in_the_prefix_area_reads_as_tarfile_reads_it() -> None:
    # GNU tar's old format keeps atime/ctime where ustar has its prefix; tarfile takes them for a prefix.
    member, content = info("timed", content=b"t")
    block = bytearray(header(member, tarfile.GNU_FORMAT))
    block[345:357] = b"14755555555\0"
    expected = assert_same(archive([rechecksum(block) + block_padded(content)], tarfile.GNU_FORMAT))
    assert expected[0].name == "14755555555/timed"


def test_the_archive_ends_at_the_first_zero_block_and_the_rest_is_hashed() -> None:
    body = archive([info("a", content=b"a")], tarfile.PAX_FORMAT, end=False)
    after = archive([info("hidden", content=b"after the end")], tarfile.PAX_FORMAT)
    data = body + bytes(512) + after  # one zero block, then more members: tarfile stops at the zero block
    assert [m.name for m in assert_same(data)] == ["a"]


def test_an_archive_without_end_blocks_ends_at_the_end_of_the_stream() -> None:
    data = archive([info("a", content=b"a"), info("b")], tarfile.GNU_FORMAT, end=False)
    assert [m.name for m in assert_same(data)] == ["a", "b"]


# -- generated archives --


NAME_PARTS = ["a", "bb", "ü", "文字", "x" * 70, "caf\udce9", ".", "..", "", "with space", "tab\tname"]


@st.composite
def generated_member(draw: st.DrawFn, fmt: Format) -> tuple[tarfile.TarInfo, bytes]:
    name = "/".join(draw(st.lists(st.sampled_from(NAME_PARTS), min_size=1, max_size=6)))
    kind = draw(st.sampled_from([b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"]))
    if kind == tarfile.DIRTYPE and draw(st.booleans()):
        name += "/"
    content = b""
    # A NUL-type entry named with a slash is a V7 directory: tarfile reads no data for it (see above).
    if kind in (b"0", b"7") or (kind == b"\0" and not name.endswith("/")):
        size = draw(st.sampled_from([0, 1, 511, 512, 513, 1024, 2000]))
        content = draw(st.binary(min_size=size, max_size=size))
    big = fmt != tarfile.USTAR_FORMAT
    attrs: dict[str, Any] = {
        "mode": draw(st.integers(0, 0o7777)),
        "uid": draw(st.integers(0, 2**40 if big else 8**7 - 1)),
        "gid": draw(st.integers(0, 2**40 if big else 8**7 - 1)),
        "mtime": draw(st.integers(-(2**40) if big else 0, 2**40 if big else 8**11 - 1)),
        "linkname": "/".join(draw(st.lists(st.sampled_from(NAME_PARTS), max_size=4))),
        "devmajor": draw(st.integers(0, 4095)),
        "devminor": draw(st.integers(0, 2**20)),
    }
    if fmt == tarfile.PAX_FORMAT:
        if draw(st.booleans()):
            attrs["mtime"] = draw(st.floats(-(2**33), 2**33, allow_nan=False)) or 0.5
        keys = st.sampled_from(["SCHILY.xattr.user.k", "LIBARCHIVE.xattr.user.v", "comment", "atime", "uname"])
        attrs["pax_headers"] = draw(st.dictionaries(keys, st.text(max_size=20), max_size=3))
    return info(name, kind, content, **attrs)


@st.composite
def generated_archive(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(list(FORMATS.values())))
    members: list[tuple[tarfile.TarInfo, bytes] | bytes] = []
    for _ in range(draw(st.integers(1, 8))):
        member, content = draw(generated_member(fmt))
        try:
            header(member, fmt)
        except ValueError:  # more than the format can hold (a ustar name or id too long)
            continue
        members.append((member, content))
    if fmt == tarfile.PAX_FORMAT and draw(st.booleans()):
        members.insert(0, tarfile.TarInfo.create_pax_global_header({"uid": "3", "comment": "g"}))
    data = archive(members, fmt)
    if not by_tarfile(data):
        members.append(info("fallback"))
        data = archive(members, fmt)
    return data


@settings(max_examples=150, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=generated_archive(), read_size=st.sampled_from([13, 512, 1023, 4096, 1 << 20]))
def test_generated_archives_read_the_same(data: bytes, read_size: int) -> None:
    expected = by_tarfile(data)
    for take in ("read", "copy"):
        members, digest = by_lean(data, read_size, take)
        assert members == expected
        assert digest == hashlib.sha256(data).hexdigest()


# -- damaged archives: raised, not an early end --


def two_files() -> tuple[bytes, int]:
    """An archive of a 1000-byte file then a 600-byte file, and where the second header starts."""
    data = archive([info("first", content=os.urandom(1000)), info("second", content=os.urandom(600))], 0)
    return data, 1024 + 512


def read_all(data: bytes, take: Take = "read") -> list[str]:
    reader = TarReader(Chunked(data, 700), 700)
    names = []
    for member in reader:
        names.append(member.name)
        if member.isreg() and take == "read":
            reader.read_content()
        elif member.isreg() and take == "copy":
            fd = os.memfd_create("tarstream-test")
            try:
                reader.copy_to(fd)
            finally:
                os.close(fd)
    reader.drain()
    return names


@pytest.mark.parametrize("take", ["read", "copy", "skip"])
def test_the_undamaged_archive_reads(take: Take) -> None:
    data, _ = two_files()
    assert read_all(data, take) == ["first", "second"]


@pytest.mark.parametrize(
    ("cut", "where"),
    [
        (100, "in the first header"),
        (512 + 300, "in the first file's data"),
        (512 + 1000 + 10, "in the first file's padding"),
        (1536 + 200, "in the second header"),
        (1536 + 512 + 599, "in the second file's data"),
    ],
)
@pytest.mark.parametrize("take", ["read", "copy", "skip"])
def test_a_truncated_archive_raises(cut: int, where: str, take: Take) -> None:
    data, _ = two_files()
    with pytest.raises(TarError):
        read_all(data[:cut], take)


def test_copy_to_raises_where_the_data_is_cut() -> None:
    data, _ = two_files()
    reader = TarReader(Chunked(data[: 512 + 300], 700), 700)
    member = reader.next()
    assert member is not None and member.size == 1000
    fd = os.memfd_create("tarstream-test")
    try:
        with pytest.raises(TarError, match="unexpected end of data"):
            reader.copy_to(fd)
        assert os.fstat(fd).st_size == 300  # what there was, written once
    finally:
        os.close(fd)


def test_truncated_in_an_extended_header_raises() -> None:
    data = archive([info(LONG_NAME, content=b"x")], tarfile.GNU_FORMAT)
    for cut in (512 + 100, 1024):  # in the longname's data, or right after it
        with pytest.raises(TarError):
            read_all(data[:cut])


def test_an_empty_stream_raises_as_tarfile_does() -> None:
    with pytest.raises(tarfile.ReadError):
        by_tarfile(b"")
    with pytest.raises(TarError, match="empty file"):
        read_all(b"")


def test_a_bad_checksum_raises() -> None:
    data, second = two_files()
    damaged = bytearray(data)
    damaged[second + 3] ^= 0x01  # a bit of the second name
    with pytest.raises(TarError, match="bad checksum"):
        read_all(bytes(damaged))


@pytest.mark.parametrize(("offset", "value"), [(100, b"0000z44\0"), (124, b"0000000001\xff\0")])
def test_a_bad_number_raises(offset: int, value: bytes) -> None:
    data, second = two_files()
    damaged = bytearray(data)
    damaged[second + offset : second + offset + len(value)] = value
    damaged[second : second + 512] = rechecksum(damaged[second : second + 512])
    with pytest.raises(TarError, match="bad number"):
        read_all(bytes(damaged))


def test_a_negative_size_raises() -> None:
    member, _ = info("negative")
    block = bytearray(header(member, tarfile.GNU_FORMAT))
    block[124:136] = b"\xff" * 12  # base-256 -1
    with pytest.raises(TarError, match="negative size"):
        read_all(archive([rechecksum(block)], tarfile.GNU_FORMAT))


def test_a_global_size_and_an_oversized_extended_header_raise() -> None:
    global_size = tarfile.TarInfo.create_pax_global_header({"size": "10"})
    with pytest.raises(TarError, match="global header sets size"):
        read_all(archive([global_size, info("a", content=b"a")], tarfile.PAX_FORMAT))
    huge = archive([info("a" * ((1 << 20) + 1), content=b"a")], tarfile.GNU_FORMAT)
    with pytest.raises(TarError, match="extended header of"):
        read_all(huge)


# -- sparse members (GNU tar -S): read in every flavour, written with their holes --

GNU_TAR = shutil.which("tar")
needs_gnu_tar = pytest.mark.skipif(GNU_TAR is None, reason="GNU tar writes the sparse archives")
MiB = 1 << 20
# (name, the chunks of data written, the file's size): holes at the start, the middle, the end, only holes,
# and enough chunks for old GNU extension blocks (4 in the header, 21 a block) and a 1.0 map over a block.
SPARSE_FILES: list[tuple[str, list[tuple[int, bytes]], int]] = [
    ("hole-start", [(MiB, b"s" * 5000)], MiB + 5000),
    ("hole-middle", [(0, b"m" * 4096), (3 * MiB, b"M" * 100)], 3 * MiB + 100),
    ("hole-end", [(0, b"e" * 70000)], 4 * MiB),
    ("all-hole", [], 2 * MiB),
    ("many-holes", [(i * 64 * 1024, bytes([i + 1]) * 4096) for i in range(80)], 80 * 64 * 1024 + 10),
]
# GNU tar's options for each flavour, and what marks its members as that flavour.
SPARSE_FLAVOURS: dict[str, tuple[list[str], str]] = {
    "gnu": (["--format=gnu"], "type S"),
    "pax-1.0": (["--format=posix"], "GNU.sparse.major"),
    "pax-0.1": (["--format=posix", "--sparse-version=0.1"], "GNU.sparse.map"),
    "pax-0.0": (["--format=posix", "--sparse-version=0.0"], "GNU.sparse.offset"),
}


@pytest.fixture(scope="module")
def sparse_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Files with holes (on this file system, holes for real: GNU tar finds them with SEEK_DATA)."""
    root = tmp_path_factory.mktemp("sparse-sources")
    for name, chunks, size in SPARSE_FILES:
        with open(root / name, "wb") as out:
            for offset, data in chunks:
                out.seek(offset)
                out.write(data)
            out.truncate(size)
        written = sum(len(data) for _, data in chunks)
        assert os.stat(root / name).st_blocks * 512 < max(size // 2, written + 65536), f"{name} has no holes here"
    (root / "plain").write_bytes(b"no holes" * 100)
    return root


def gnu_tar_sparse(sources: Path, flavour: str) -> bytes:
    options, _ = SPARSE_FLAVOURS[flavour]
    names = [name for name, _, _ in SPARSE_FILES] + ["plain"]
    return subprocess.run(
        [GNU_TAR or "tar", *options, "--sparse", "--owner=0", "--group=0", "-cf", "-", "-C", str(sources), *names],
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout


def write_sparse(reader: TarReader, member: Member, path: Path) -> None:
    """copy_sparse_to into a new file, as the extractor does."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        assert reader.copy_sparse_to(fd, member) == member.size
    finally:
        os.close(fd)


def expand_sparse(reader: TarReader, member: Member, path: Path) -> bytes:
    """The bytes of the file copy_sparse_to wrote."""
    write_sparse(reader, member, path)
    return path.read_bytes()


def tarfile_sparse_members(data: bytes) -> list[tuple[Seen, list[tuple[int, int]] | None]]:
    """What tarfile reads: the members with their expanded content, and each sparse map less its empty chunks."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tf:
        for member in tf:
            source = tf.extractfile(member) if member.isreg() else None
            sparse = cast("list[tuple[int, int]] | None", member.sparse)  # typeshed has it wrong
            chunks = None if sparse is None else [(o, n) for o, n in sparse if n]
            out.append((seen(member, source.read() if source else None), chunks))
    return out


@needs_gnu_tar
@pytest.mark.parametrize("read_size", [1 << 20, 512, 1023])
@pytest.mark.parametrize("flavour", list(SPARSE_FLAVOURS))
def test_gnu_tar_sparse_archives_read_as_tarfile_reads_them(
    sparse_sources: Path, tmp_path: Path, flavour: str, read_size: int
) -> None:
    data = gnu_tar_sparse(sparse_sources, flavour)
    reader = TarReader(Chunked(data, read_size), read_size)
    lean = []
    for index, member in enumerate(reader):
        if member.sparse is None:
            content = reader.read_content()
        else:
            content = expand_sparse(reader, member, tmp_path / str(index))
        lean.append((seen(member, content), None if member.sparse is None else list(member.sparse)))
    reader.drain()
    assert lean == tarfile_sparse_members(data)
    assert reader.hash.hexdigest() == hashlib.sha256(data).hexdigest()
    # What a user sees: each file's bytes as they were, and tar wrote the flavour this case is about.
    _, mark = SPARSE_FLAVOURS[flavour]
    for (got, chunks), (name, _, size) in zip(lean, SPARSE_FILES, strict=False):
        assert (got.name, got.size, got.content) == (name, size, (sparse_sources / name).read_bytes())
        assert chunks is not None and (got.type == b"S" if mark == "type S" else mark in got.pax_headers)
    assert lean[-1][0].name == "plain" and lean[-1][1] is None
    many = next(chunks for got, chunks in lean if got.name == "many-holes")
    assert many == [(i * 64 * 1024, 4096) for i in range(80)]  # 4 in the header and 4 extension blocks (gnu)


@needs_gnu_tar
@pytest.mark.parametrize("flavour", list(SPARSE_FLAVOURS))
def test_sparse_members_skipped_untaken_leave_the_stream_in_step(sparse_sources: Path, flavour: str) -> None:
    data = gnu_tar_sparse(sparse_sources, flavour)
    reader = TarReader(Chunked(data, 1023), 1023)
    assert [(m.name, m.size) for m in reader] == [(name, size) for name, _, size in SPARSE_FILES] + [("plain", 800)]
    reader.drain()
    assert reader.hash.hexdigest() == hashlib.sha256(data).hexdigest()


@needs_gnu_tar
@pytest.mark.parametrize("flavour", list(SPARSE_FLAVOURS))
def test_a_sparse_archive_cut_anywhere_raises(sparse_sources: Path, tmp_path: Path, flavour: str) -> None:
    data = gnu_tar_sparse(sparse_sources, flavour)
    end = len(data.rstrip(b"\0"))  # past the last data byte only the end-of-archive blocks are left
    # Never on a block boundary (100 + 1000k is never a multiple of 512): in headers, extension blocks,
    # maps and data. A cut between two members is an archive without end blocks, as tarfile reads it.
    for cut in range(100, end, 1000):
        reader = TarReader(Chunked(data[:cut], 4096), 4096)
        with pytest.raises(TarError):
            for index, member in enumerate(reader):
                if member.sparse is not None:
                    write_sparse(reader, member, tmp_path / f"{cut}-{index}")
            reader.drain()


# Sparse members written by hand, for the maps GNU tar never writes.


def pax_sparse(records: dict[str, str], stored: bytes, name: str = "holes") -> bytes:
    """A PAX member with GNU.sparse `records` and `stored` as its data (a 1.0 map included), as an archive."""
    member, content = info(name, content=stored, pax_headers=records)
    return archive([(member, content)], tarfile.PAX_FORMAT)


def pax_10(chunks: list[tuple[int, int]], realsize: int, stored: bytes, count: int | None = None) -> bytes:
    lines = [str(len(chunks) if count is None else count)] + [str(n) for chunk in chunks for n in chunk]
    records = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.realsize": str(realsize)}
    return pax_sparse(records, block_padded("".join(line + "\n" for line in lines).encode()) + stored)


def pax_01(chunks: list[tuple[int, int]], realsize: int, stored: bytes, numblocks: int | None = None) -> bytes:
    records = {
        "GNU.sparse.size": str(realsize),
        "GNU.sparse.numblocks": str(len(chunks) if numblocks is None else numblocks),
        "GNU.sparse.map": ",".join(str(n) for chunk in chunks for n in chunk),
    }
    return pax_sparse(records, stored)


def pax_00(chunks: list[tuple[int, int]], realsize: int, stored: bytes, swap: bool = False) -> bytes:
    """PAX sparse 0.0: repeated GNU.sparse.offset / numbytes records, which tarfile cannot write (a dict)."""
    keys = ["GNU.sparse.numbytes", "GNU.sparse.offset"] if swap else ["GNU.sparse.offset", "GNU.sparse.numbytes"]
    records = [("GNU.sparse.size", str(realsize)), ("GNU.sparse.numblocks", str(len(chunks)))]
    records += [(key, str(n)) for chunk in chunks for key, n in zip(keys, chunk, strict=True)]
    payload = b"".join(pax_record(key, value) for key, value in records)
    carrier, _ = info("PaxHeaders/holes", tarfile.XHDTYPE, size=len(payload))
    member, content = info("holes", content=stored)
    return archive([header(carrier, 0) + block_padded(payload), (member, content)], tarfile.USTAR_FORMAT)


def pax_record(key: str, value: str) -> bytes:
    body = f" {key}={value}\n".encode()
    length = len(body) + len(str(len(body)))
    length = len(body) + len(str(length))  # the length counts its own digits
    return str(length).encode() + body


def old_gnu(chunks: list[tuple[int, int]], realsize: int, stored: bytes, extension_blocks: int = 0) -> bytes:
    """An old GNU 'S' member: up to 4 chunks in the header, the rest in extension blocks of 21."""
    member, _ = info("holes", content=stored)
    block = bytearray(header(member, tarfile.GNU_FORMAT))
    block[156:157] = b"S"
    head, rest = chunks[:4], chunks[4:]
    for i, (offset, numbytes) in enumerate(head):
        block[386 + 24 * i : 410 + 24 * i] = b"%011o\0%011o\0" % (offset, numbytes)
    block[483:495] = b"%011o\0" % realsize
    extensions: list[bytearray] = []
    while rest or len(extensions) < extension_blocks:
        extension = bytearray(512)
        for i, (offset, numbytes) in enumerate(rest[:21]):
            extension[24 * i : 24 * i + 24] = b"%011o\0%011o\0" % (offset, numbytes)
        rest = rest[21:]
        extensions.append(extension)
    if extensions:  # the header's isextended flag, then each block's but the last
        block[482] = 1
        for extension in extensions[:-1]:
            extension[504] = 1
    return archive([rechecksum(block) + b"".join(bytes(e) for e in extensions) + block_padded(stored)], 2)


GOOD_CHUNKS = [(1000, 5), (5000, 3)]
GOOD_REALSIZE = 6000


Build = Callable[[list[tuple[int, int]], int, bytes], bytes]
BUILDERS: list[Build] = [pax_10, pax_01, pax_00, old_gnu]
BUILDER_IDS = ["pax-1.0", "pax-0.1", "pax-0.0", "gnu"]


@pytest.mark.parametrize("build", BUILDERS, ids=BUILDER_IDS)
def test_hand_made_sparse_members_read_as_tarfile_reads_them(tmp_path: Path, build: Build) -> None:
    data = build(GOOD_CHUNKS, GOOD_REALSIZE, b"abcdeXYZ")
    reader = TarReader(Chunked(data, 512), 512)
    member = reader.next()
    assert member is not None and member.sparse == tuple(GOOD_CHUNKS)
    content = expand_sparse(reader, member, tmp_path / "out")
    assert content == bytes(1000) + b"abcde" + bytes(3995) + b"XYZ" + bytes(997)
    [(expected, _)] = tarfile_sparse_members(data)
    assert seen(member, content) == expected


BAD_MAPS = [
    ([(5000, 3), (1000, 5)], GOOD_REALSIZE, "overlaps or precedes"),  # out of order
    ([(1000, 5), (1003, 3)], GOOD_REALSIZE, "overlaps or precedes"),
    ([(1000, 5), (5998, 3)], GOOD_REALSIZE, "runs past the real size 6000"),
    ([(1000, 5), (5000, 2)], GOOD_REALSIZE, "its chunks hold 7 bytes, the archive stores 8"),
    ([(1000, 5), (5000, 4)], GOOD_REALSIZE, "its chunks hold 9 bytes, the archive stores 8"),
]


@pytest.mark.parametrize(("chunks", "realsize", "problem"), BAD_MAPS)
@pytest.mark.parametrize("build", BUILDERS, ids=BUILDER_IDS)
def test_a_bad_sparse_map_raises_naming_the_problem(
    chunks: list[tuple[int, int]], realsize: int, problem: str, build: Build
) -> None:
    with pytest.raises(TarError, match=f"invalid sparse map of 'holes': .*{problem}"):
        read_all(build(chunks, realsize, b"abcdeXYZ"))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (pax_01(GOOD_CHUNKS, GOOD_REALSIZE, b"abcdeXYZ", numblocks=3), "4 map numbers for 3 blocks"),
        (pax_sparse({"GNU.sparse.size": "6000", "GNU.sparse.numblocks": "1", "GNU.sparse.map": "1,-2"}, b""), "bad"),
        (pax_sparse({"GNU.sparse.size": "6000", "GNU.sparse.numblocks": "0"}, b""), "without a map"),
        (pax_00(GOOD_CHUNKS, GOOD_REALSIZE, b"abcdeXYZ", swap=True), "offset/numbytes records out of order"),
        (pax_sparse({"GNU.sparse.map": "", "GNU.sparse.numblocks": "0"}, b""), "no real size"),
        (
            pax_sparse({"GNU.sparse.major": "2", "GNU.sparse.minor": "0", "GNU.sparse.realsize": "1"}, b""),
            "version 2.0",
        ),
        (pax_10(GOOD_CHUNKS, GOOD_REALSIZE, b"abcdeXYZ", count=3), "map runs past the member's data"),
        (pax_10(GOOD_CHUNKS, GOOD_REALSIZE, b"abcdeXYZ", count=-1), "bad map count"),
        (pax_10([(1, 2**63)], 2**63 - 1, b""), "bad map number"),
        (pax_10([], 2**63, b""), "bad real size"),
        # 1 MiB of lines and more, all data of the member: the map alone may not take more (Go's limit).
        (pax_10([(0, 0)] * (MiB // 4 + 1), 1, b""), "map over 1048576 bytes"),
    ],
    ids=[
        "numblocks",
        "negative",
        "no-map",
        "0.0-order",
        "no-realsize",
        "version",
        "count-past-data",
        "count",
        "int64",
        "int64-size",
        "1MiB",
    ],
)
def test_bad_pax_sparse_headers_raise(data: bytes, problem: str) -> None:
    with pytest.raises(TarError, match=f"invalid sparse header of 'holes': .*{problem}"):
        read_all(data)


def test_old_gnu_extension_blocks_are_bounded() -> None:
    # Go reads extension blocks without end; 1 MiB of them is more than any file's map needs.
    data = old_gnu([(0, 1)], 1, b"a", extension_blocks=(MiB // 512) + 1)
    with pytest.raises(TarError, match="extension blocks over 1048576 bytes"):
        read_all(data)
    fine = old_gnu([(0, 1)], 1, b"a", extension_blocks=MiB // 512)
    assert read_all(fine) == ["holes"]


def test_sparse_records_where_they_cannot_be_raise() -> None:
    records = {"GNU.sparse.size": "10", "GNU.sparse.numblocks": "1", "GNU.sparse.map": "0,1"}
    glob = tarfile.TarInfo.create_pax_global_header(records)
    with pytest.raises(TarError, match=r"global header carries GNU\.sparse"):
        read_all(archive([glob, info("a", content=b"a")], tarfile.PAX_FORMAT))
    link = info("holes", tarfile.SYMTYPE, linkname="t", pax_headers=records)
    with pytest.raises(TarError, match="invalid sparse header of 'holes': not a regular file"):
        read_all(archive([link], tarfile.PAX_FORMAT))


def test_copy_sparse_to_writes_only_the_current_sparse_member(tmp_path: Path) -> None:
    records = {"GNU.sparse.size": "6000", "GNU.sparse.numblocks": "2", "GNU.sparse.map": "1000,5,5000,3"}
    data = archive([info("holes", content=b"abcdeXYZ", pax_headers=records), info("plain", content=b"p")], 2)
    reader = TarReader(Chunked(data, 512), 512)
    sparse = reader.next()
    assert sparse is not None and sparse.sparse is not None
    reader.read_content()  # the stored chunks, packed: nothing left for copy_sparse_to
    with pytest.raises(ValueError, match="not the reader's to write"):
        expand_sparse(reader, sparse, tmp_path / "taken")
    plain = reader.next()
    assert plain is not None and plain.sparse is None
    with pytest.raises(ValueError, match="'plain' is not a sparse member"):
        expand_sparse(reader, plain, tmp_path / "plain")
