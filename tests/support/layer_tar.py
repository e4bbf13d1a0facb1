"""Build image layer tarballs in memory, for tests.

    blob = tar_layer([Entry("etc/", "dir"), Entry("etc/motd", content=b"hi\\n")], compression="zstd")

Names are written exactly as given (a leading ``/`` or a ``..`` is kept), so
tests can build hostile layers as well as ordinary ones. Output is
deterministic: fixed default mtimes, no owner names, gzip without a
timestamp, so the same entries always give the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import zstandard

EntryType = Literal["file", "dir", "symlink", "hardlink", "char", "block", "fifo"]
Compression = Literal["gzip", "zstd", "none"]

FIXED_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z

MEDIA_TYPES: dict[Compression, str] = {
    "none": "application/vnd.oci.image.layer.v1.tar",
    "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
}

_TAR_TYPES: dict[EntryType, bytes] = {
    "file": tarfile.REGTYPE,
    "dir": tarfile.DIRTYPE,
    "symlink": tarfile.SYMTYPE,
    "hardlink": tarfile.LNKTYPE,
    "char": tarfile.CHRTYPE,
    "block": tarfile.BLKTYPE,
    "fifo": tarfile.FIFOTYPE,
}
_DEFAULT_MODES: dict[EntryType, int] = {"dir": 0o755, "symlink": 0o777}


@dataclass
class Entry:
    """One tar member. `mode` defaults to 0755 for dirs, 0777 for symlinks, 0644 otherwise."""

    path: str
    type: EntryType = "file"
    content: bytes = b""
    mode: int | None = None
    uid: int = 0
    gid: int = 0
    mtime: float = FIXED_MTIME
    linkname: str = ""  # symlink target (verbatim) or hardlink target (an archive path)
    devmajor: int = 0
    devminor: int = 0
    xattrs: dict[str, bytes] = field(default_factory=dict)  # written as PAX SCHILY.xattr.<name>
    pax: dict[str, str] = field(default_factory=dict)  # any other PAX records, verbatim


def file(path: str, content: bytes = b"", mode: int = 0o644, **kw: Any) -> Entry:
    return Entry(path, "file", content=content, mode=mode, **kw)


def directory(path: str, mode: int = 0o755, **kw: Any) -> Entry:
    return Entry(path, "dir", mode=mode, **kw)


def symlink(path: str, target: str, **kw: Any) -> Entry:
    return Entry(path, "symlink", linkname=target, **kw)


def hardlink(path: str, target: str) -> Entry:
    return Entry(path, "hardlink", linkname=target)


def whiteout(path: str) -> Entry:
    """Hides `path` of the layers below: an empty `.wh.<name>` file beside it."""
    parent, _, name = path.rstrip("/").rpartition("/")
    return Entry(f"{parent}/.wh.{name}" if parent else f".wh.{name}", mode=0o600)


def opaque(path: str) -> Entry:
    """Hides everything the layers below have in directory `path`."""
    return Entry(path.rstrip("/") + "/.wh..wh..opq", mode=0o600)


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.path.rstrip("/") + "/" if e.type == "dir" else e.path)
    info.type = _TAR_TYPES[e.type]
    info.mode = e.mode if e.mode is not None else _DEFAULT_MODES.get(e.type, 0o644)
    info.uid, info.gid = e.uid, e.gid
    info.uname = info.gname = ""
    info.mtime = e.mtime
    info.linkname = e.linkname
    info.devmajor, info.devminor = e.devmajor, e.devminor
    info.size = len(e.content) if e.type == "file" else 0
    pax = dict(e.pax)
    for name, value in e.xattrs.items():
        # Binary values go through surrogateescape; tarfile then marks the header hdrcharset=BINARY.
        pax[f"SCHILY.xattr.{name}"] = value.decode("utf-8", "surrogateescape")
    info.pax_headers = pax
    return info


def tar_bytes(entries: Iterable[Entry]) -> bytes:
    """The uncompressed PAX tar of `entries`, in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            tar.addfile(_tarinfo(e), io.BytesIO(e.content) if e.type == "file" else None)
    return out.getvalue()


def compress(data: bytes, compression: Compression) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor().compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


def tar_layer(entries: Iterable[Entry], compression: Compression = "gzip") -> bytes:
    """The layer blob: the tar of `entries`, compressed."""
    return compress(tar_bytes(entries), compression)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class Layer:
    """A built layer with the figures an image manifest and config need."""

    tar: bytes
    blob: bytes
    media_type: str

    @property
    def diff_id(self) -> str:
        """sha256 of the uncompressed tar: the config's rootfs.diff_ids entry."""
        return sha256_digest(self.tar)

    @property
    def digest(self) -> str:
        """sha256 of the blob: the manifest's layer digest."""
        return sha256_digest(self.blob)


def build_layer(entries: Iterable[Entry], compression: Compression = "gzip") -> Layer:
    tar = tar_bytes(entries)
    return Layer(tar=tar, blob=compress(tar, compression), media_type=MEDIA_TYPES[compression])
