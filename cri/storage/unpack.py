"""Hardened extraction of OCI and Docker image layers.

A layer is untrusted input. Every entry name, and every directory on the way
to it, is resolved inside the destination as if the destination were "/":
a symlink met on the way is followed but clamped to the root (like
openat2's RESOLVE_IN_ROOT or securejoin), and the entry's own final
component is never followed. So nothing in a layer can create or change a
file outside the destination, whatever symlinks and hardlinks it carries.

Extraction is one streaming pass: the blob is decompressed, the uncompressed
tar is hashed (the layer's diffID) and extracted as it is read, from a file
or from any byte stream (a pipe fed by the download: cri/storage/unpack_worker).
The tar is read by cri/storage/tarstream, which yields what Python's tarfile
would for the same bytes at a fraction of its CPU; sparse members (GNU tar -S,
which containerd and cri-o extract too) are written with their holes.
gzip is inflated by ISA-L (python-isal), about 2.5x the standard library's
zlib here. A full destination is not the layer's fault: that OSError (ENOSPC,
EDQUOT) passes through unchanged, for the caller to report against its
storage root.

This module is imported by the unpack worker process, so it imports nothing
heavy (no grpc), and what few layers need (decimal, shutil, base64) only when
one does: a worker's start-up is in the pull's time.
"""

from __future__ import annotations

import errno
import gzip
import importlib
import io
import os
import posixpath
import stat
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol, cast

from isal import igzip, isal_zlib

from cri.storage.tarstream import Member, TarError, TarReader

if TYPE_CHECKING:
    from pathlib import Path

WhiteoutMode = Literal["overlay", "apply"]

# media type -> the compression it declares
_LAYER_TYPES: dict[str, str] = {
    "application/vnd.oci.image.layer.v1.tar": "none",
    "application/vnd.oci.image.layer.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "zstd",
    "application/vnd.oci.image.layer.nondistributable.v1.tar": "none",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": "gzip",
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": "zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "gzip",
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": "gzip",
    # Not in Docker's schema2 text, but pushed by real tools and accepted by containerd.
    "application/vnd.docker.image.rootfs.diff.tar": "none",
    "application/vnd.docker.image.rootfs.diff.tar.zstd": "zstd",
    "application/vnd.docker.image.rootfs.foreign.diff.tar": "none",
}
_FOREIGN = frozenset(t for t in _LAYER_TYPES if ".nondistributable." in t or ".foreign." in t)

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

WHITEOUT_PREFIX = ".wh."
WHITEOUT_META_PREFIX = ".wh..wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"

_CHUNK = 1 << 20
_MAX_SYMLINKS = 40  # the kernel's MAXSYMLINKS
_PARENT_CACHE_MAX = 256
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_NOT_SUPPORTED = frozenset({errno.ENOTSUP, errno.EOPNOTSUPP})
# cri.errors.is_no_space's errnos, without importing cri.errors (and grpc with it) into the worker.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
# isal's stubs declare its error as an instance of Exception; it is a class.
_ISAL_ERROR = cast(type[Exception], isal_zlib.error)


class ZstdStreamError(Exception):
    """zstandard's ZstdError, from a layer's stream (zstandard is imported by the first zstd layer only)."""


_STREAM_ERRORS = (TarError, EOFError, zlib.error, _ISAL_ERROR, ZstdStreamError, gzip.BadGzipFile)


class UnpackError(Exception):
    """A layer that cannot or must not be extracted; the message names the layer and the entry."""


class _Refused(Exception):
    """An entry refused for what it is (escapes, bad type); turned into an UnpackError naming it."""


class UnpackResult(NamedTuple):
    diff_id: str  # "sha256:<hex>" of the whole uncompressed tar stream
    size: int  # bytes of regular files written
    entries: int  # tar members processed, whiteouts included
    xattrs_skipped: int = 0  # xattrs the filesystem refused as unsupported


def is_foreign(media_type: str) -> bool:
    """Non-distributable / foreign layers: the OCI spec lets a puller skip them."""
    return media_type in _FOREIGN


def is_layer_media_type(media_type: str) -> bool:
    return media_type in _LAYER_TYPES


def unpack_layer(blob: Path, media_type: str, dest: Path, whiteout_mode: WhiteoutMode = "overlay") -> UnpackResult:
    """Extract the layer `blob` into the existing directory `dest`. Blocking: run it in a thread.

    whiteout_mode "overlay" writes whiteouts as overlayfs markers (a 0:0 char
    device, the trusted.overlay.opaque xattr); "apply" deletes what they hide
    from `dest`, for a layer applied on top of a copy of its parent.
    """
    with open(blob, "rb") as raw:
        return unpack_stream(raw, media_type, dest, whiteout_mode, label=blob.name)


def unpack_stream(
    raw: ByteSource,
    media_type: str,
    dest: str | os.PathLike[str],
    whiteout_mode: WhiteoutMode = "overlay",
    *,
    label: str,
    umask: int | None = None,
) -> UnpackResult:
    """unpack_layer() from a stream of the (compressed) blob, read once to its end; `label` names the layer.

    `umask`: the process's, when the caller knows no thread changes it meanwhile (the unpack worker sets
    it to 0): files are created with their permission bits and need no chmod. None: chmod every file.
    """
    if whiteout_mode not in ("overlay", "apply"):
        raise ValueError(f"whiteout_mode must be 'overlay' or 'apply', not {whiteout_mode!r}")
    with _decompressed(raw, media_type) as stream:
        reader = TarReader(stream, _CHUNK)
        extractor = _Extractor(dest, whiteout_mode, umask)
        try:
            _extract_all(reader, extractor, label)
            # The diffID covers the whole uncompressed blob, padding after the tar end included.
            reader.drain()
        except _STREAM_ERRORS as exc:
            raise UnpackError(f"layer {label}: corrupt or truncated archive: {exc}") from exc
        finally:
            extractor.close()
    return UnpackResult(
        diff_id="sha256:" + reader.hash.hexdigest(),
        size=extractor.size,
        entries=extractor.entries,
        xattrs_skipped=extractor.xattrs_skipped,
    )


def _destination_full(exc: BaseException) -> bool:
    """A full destination (ENOSPC, EDQUOT): not the layer's fault."""
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


def _extract_all(reader: TarReader, extractor: _Extractor, label: str) -> None:
    for member in reader:
        try:
            extractor.add(reader, member)
        except _Refused as exc:
            raise UnpackError(f"layer {label}: entry {member.name!r}: {exc}") from exc
        except (gzip.BadGzipFile, _ISAL_ERROR):
            raise  # the stream, not the entry, is bad
        except OSError as exc:
            if _destination_full(exc):
                raise  # the destination is full, the layer is not at fault: the caller names the place
            raise UnpackError(f"layer {label}: entry {member.name!r}: {exc.strerror or exc}") from exc
        except (ValueError, OverflowError) as exc:  # ids, times or xattr encodings out of range
            raise UnpackError(f"layer {label}: entry {member.name!r}: {exc}") from exc
        finally:
            extractor.end_entry()
    try:
        extractor.finish()
    except _Refused as exc:
        raise UnpackError(f"layer {label}: {exc}") from exc


# -- the stream --


class _Reader(Protocol):
    def read(self, size: int, /) -> bytes: ...

    def readinto(self, buffer: Any, /) -> int | None: ...


# What unpack_stream reads a blob from: a file, a pipe, the blob file the worker follows.
ByteSource = _Reader


def _compression(media_type: str, head: bytes) -> str:
    declared = _LAYER_TYPES.get(media_type)
    if declared is None:
        raise UnpackError(f"unsupported layer media type {media_type!r}")
    # The bytes decide: registries and tools mislabel plain tars as compressed and vice versa.
    if head.startswith(_GZIP_MAGIC):
        return "gzip"
    if head.startswith(_ZSTD_MAGIC):
        return "zstd"
    if declared != "none":
        raise UnpackError(f"layer media type {media_type} says {declared}, but the blob is not {declared}-compressed")
    return "none"


class _Prepended(io.RawIOBase):
    """`head` (already read to sniff the compression) followed by the rest of a stream that cannot seek back."""

    def __init__(self, head: bytes, rest: _Reader) -> None:
        self._head = head
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._rest.readinto(view) or 0  # straight into the buffer: no bytes object, no copy


def _read_head(raw: _Reader, size: int) -> bytes:
    head = b""
    while len(head) < size:
        more = raw.read(size - len(head))
        if not more:
            break
        head += more
    return head


def _rarely_needed(module: str) -> Any:
    """A module only some layers need, imported by the first that does: the unpack worker starts inside a
    pull. zstandard was 15-20 ms of that start (most layers are gzip); decimal (PAX times), base64 and
    urllib.parse (libarchive xattrs), shutil (a replaced directory) and pathlib were 7 ms of the 40 it
    took then."""
    return importlib.import_module(module)


@contextmanager
def _decompressed(raw: _Reader, media_type: str) -> Iterator[_Reader]:
    head = _read_head(raw, 4)
    compression = _compression(media_type, head)
    source = io.BufferedReader(_Prepended(head, raw), _CHUNK)
    if compression == "gzip":
        # Reads every member of a multi-member gzip. isal's GzipFile has no annotations.
        with igzip.GzipFile(fileobj=source, mode="rb") as gz:  # type: ignore[no-untyped-call]
            yield gz
    elif compression == "zstd":
        zstandard = _rarely_needed("zstandard")
        with zstandard.ZstdDecompressor().stream_reader(source, read_across_frames=True, closefd=False) as zr:
            yield _ZstdReader(zr, zstandard.ZstdError)
    else:
        yield source


class _ZstdReader:
    """zstandard's stream reader, its errors raised as ZstdStreamError, which _STREAM_ERRORS can name."""

    def __init__(self, reader: _Reader, error: type[Exception]) -> None:
        self._reader = reader
        self._error = error

    def read(self, size: int, /) -> bytes:
        try:
            return self._reader.read(size)
        except self._error as exc:
            raise ZstdStreamError(str(exc)) from exc

    def readinto(self, buffer: Any, /) -> int | None:
        try:
            return self._reader.readinto(buffer)
        except self._error as exc:
            raise ZstdStreamError(str(exc)) from exc


# -- names and metadata of one entry --


def _clean(name: str) -> tuple[str, ...]:
    """The entry's path components inside the root; a name that climbs out of it is refused."""
    stripped = name.lstrip("/")
    normal = posixpath.normpath(stripped) if stripped else "."
    if normal == ".." or normal.startswith("../"):
        raise _Refused(f"path {name!r} escapes the layer root")
    return () if normal == "." else tuple(normal.split("/"))


def _pax_ns(member: Member, key: str, fallback: float) -> int:
    # PAX times are decimal strings with up to ns precision; a float would round them.
    raw = member.pax_headers.get(key)
    if not raw:
        return int(fallback) * 1_000_000_000
    decimal = _rarely_needed("decimal")
    try:
        return int(decimal.Decimal(raw) * 1_000_000_000)
    except (decimal.InvalidOperation, ValueError, OverflowError):
        raise _Refused(f"bad PAX {key} {raw!r}") from None


def _times(member: Member) -> tuple[int, int]:
    mtime = _pax_ns(member, "mtime", member.mtime)
    atime = _pax_ns(member, "atime", member.mtime) if "atime" in member.pax_headers else mtime
    return atime, mtime


def _xattrs(member: Member) -> list[tuple[str, bytes]]:
    found = []
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            # PAX values come decoded with surrogateescape (as tarfile decodes them); this gives back the raw bytes.
            found.append((key.removeprefix("SCHILY.xattr."), value.encode("utf-8", "surrogateescape")))
        elif key.startswith("LIBARCHIVE.xattr."):
            name = _rarely_needed("urllib.parse").unquote(key.removeprefix("LIBARCHIVE.xattr."))
            found.append((name, _rarely_needed("base64").b64decode(value + "=" * (-len(value) % 4))))
    return found


class _DirMeta(NamedTuple):
    mode: int
    times: tuple[int, int]


# -- the extractor --


class _Extractor:
    """Writes tar members under one root; all file-system access goes through directory fds."""

    def __init__(self, dest: str | os.PathLike[str], whiteout_mode: WhiteoutMode, umask: int | None = None) -> None:
        self.root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.whiteout_mode = whiteout_mode
        self.umask = umask  # known for sure (no thread changes it), or None: chmod every file
        self.as_root = os.geteuid() == 0
        self.size = self.entries = self.xattrs_skipped = 0
        # Directory modes and mtimes are applied at the end: writing into a directory changes its
        # mtime, and a read-only mode would stop a non-root unpack from filling it.
        self.dirs: dict[tuple[str, ...], _DirMeta] = {}
        # Paths this layer wrote: whiteouts never hide them, an opaque dir keeps them.
        self.written: set[tuple[str, ...]] = set()
        self._parents: dict[tuple[str, ...], int] = {}
        self._stale: list[int] = []

    def close(self) -> None:
        self._invalidate()
        self.end_entry()
        os.close(self.root_fd)

    def end_entry(self) -> None:
        # Fds dropped from the cache stay open until the entry that used them is done.
        for fd in self._stale:
            os.close(fd)
        self._stale.clear()

    def add(self, reader: TarReader, member: Member) -> None:
        self.entries += 1
        parts = _clean(member.name)
        base = parts[-1] if parts else ""
        if base.startswith(WHITEOUT_META_PREFIX):
            if base == OPAQUE_MARKER:
                self._opaque(parts[:-1])
            return  # other .wh..wh. names are AUFS bookkeeping, not content
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parts[:-1], base.removeprefix(WHITEOUT_PREFIX))
            return
        if not parts:
            self._root_entry(member)
            return
        self.written.add(parts)
        pfd = self._dir_fd(parts[:-1], create=True)
        name = parts[-1]
        if member.isdir():
            self._directory(pfd, parts, member)
        elif member.isreg():
            self._file(pfd, name, member, reader)
        elif member.issym():
            self._symlink(pfd, name, member)
        elif member.islnk():
            self._hardlink(pfd, parts, member)
        elif member.ischr() or member.isblk() or member.isfifo():
            self._node(pfd, name, member)
        else:
            raise _Refused(f"unsupported tar entry type {member.type.decode(errors='replace')!r}")

    def finish(self) -> None:
        # Deepest first, so a parent made read-only does not stop us reaching its children.
        for parts, meta in sorted(self.dirs.items(), key=lambda item: len(item[0]), reverse=True):
            fd = self._reopen_dir(parts)
            if fd is None:
                continue  # replaced or whited out later in the layer
            try:
                os.fchmod(fd, meta.mode)
                os.utime(fd, ns=meta.times)
            except OSError as exc:
                raise _Refused(f"directory {'/'.join(parts) or '/'!r}: {exc.strerror or exc}") from exc
            finally:
                os.close(fd)

    # -- entry kinds --

    def _root_entry(self, member: Member) -> None:
        if not member.isdir():
            raise _Refused("the layer root can only be a directory")
        if self.as_root:
            os.fchown(self.root_fd, member.uid, member.gid)
        self._set_xattrs(self.root_fd, member)
        self.dirs[()] = _DirMeta(member.mode & 0o7777, _times(member))

    def _directory(self, pfd: int, parts: tuple[str, ...], member: Member) -> None:
        name = parts[-1]
        existing = self._lstat(pfd, name)
        if existing is None or not stat.S_ISDIR(existing.st_mode):
            self._remove(pfd, name)
            os.mkdir(name, 0o755, dir_fd=pfd)
        # An existing directory keeps its contents: dir over dir merges.
        self._chown(pfd, name, member)
        fd = os.open(name, _DIR_FLAGS, dir_fd=pfd)
        try:
            self._set_xattrs(fd, member)
        finally:
            os.close(fd)
        self.dirs[parts] = _DirMeta(member.mode & 0o7777, _times(member))

    def _file(self, pfd: int, name: str, member: Member, reader: TarReader) -> None:
        fd = self._create(pfd, name, member.mode & 0o777)
        try:
            if member.sparse is None:
                reader.copy_to(fd)
            else:
                reader.copy_sparse_to(fd, member)  # GNU tar -S: the holes stay holes
            if self.as_root:
                os.fchown(fd, member.uid, member.gid)
            if self._needs_chmod(member.mode):
                os.fchmod(fd, member.mode & 0o7777)  # after chown, which clears setuid/setgid
            self._set_xattrs(fd, member)  # after chown and the write, which both drop security.capability
            os.utime(fd, ns=_times(member))
        finally:
            os.close(fd)
        self.size += member.size

    def _create(self, pfd: int, name: str, permissions: int) -> int:
        """A new file `name`; whatever had the name is removed first, never opened (a symlink, a hardlink)."""
        # Opening first saves a stat per file: O_EXCL fails on anything there, dangling symlinks included.
        try:
            return os.open(name, _FILE_FLAGS, permissions, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, name)
            return os.open(name, _FILE_FLAGS, permissions, dir_fd=pfd)

    def _needs_chmod(self, mode: int) -> bool:
        """Whether the mode a file was created with is not yet `mode`: special bits, or bits the umask took."""
        return self.umask is None or bool(mode & 0o7000) or bool(mode & 0o777 & self.umask)

    def _symlink(self, pfd: int, name: str, member: Member) -> None:
        self._remove(pfd, name)
        os.symlink(member.linkname, name, dir_fd=pfd)  # the target is stored verbatim, never followed
        self._chown(pfd, name, member)
        self._set_xattrs(_proc_path(pfd, name), member)
        os.utime(name, ns=_times(member), dir_fd=pfd, follow_symlinks=False)

    def _hardlink(self, pfd: int, parts: tuple[str, ...], member: Member) -> None:
        target = _clean(member.linkname)
        if target == parts:
            return  # a link to itself: nothing to do
        if not target:
            raise _Refused("hardlink to the layer root")
        try:
            tpfd = self._dir_fd(target[:-1], create=False)
            st = os.stat(target[-1], dir_fd=tpfd, follow_symlinks=False)
        except FileNotFoundError:
            raise _Refused(f"hardlink target {member.linkname!r} is not in the layer") from None
        if stat.S_ISDIR(st.st_mode):
            raise _Refused(f"hardlink target {member.linkname!r} is a directory")
        self._remove(pfd, parts[-1])
        # follow_symlinks=False: a link to a symlink links the symlink itself, as tar means it.
        os.link(target[-1], parts[-1], src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)

    def _node(self, pfd: int, name: str, member: Member) -> None:
        self._remove(pfd, name)
        if member.isfifo():
            os.mkfifo(name, 0o600, dir_fd=pfd)
        else:
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor), dir_fd=pfd)
        self._chown(pfd, name, member)
        # We just made this node, so it is not a symlink: chmod cannot be sent elsewhere.
        os.chmod(name, member.mode & 0o7777, dir_fd=pfd)
        self._set_xattrs(_proc_path(pfd, name), member)
        os.utime(name, ns=_times(member), dir_fd=pfd, follow_symlinks=False)

    # -- whiteouts --

    def _whiteout(self, dir_parts: tuple[str, ...], name: str) -> None:
        if name in ("", ".", ".."):
            raise _Refused("whiteout without a name")
        if (*dir_parts, name) in self.written:
            return  # the OCI spec: a whiteout only hides the layers below, not its own layer
        if self.whiteout_mode == "overlay":
            pfd = self._dir_fd(dir_parts, create=True)
            self._remove(pfd, name)
            os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
            return
        try:
            pfd = self._dir_fd(dir_parts, create=False)
        except (FileNotFoundError, _Refused):
            return  # nothing below to hide
        self._remove(pfd, name)

    def _opaque(self, dir_parts: tuple[str, ...]) -> None:
        if self.whiteout_mode == "overlay":
            os.setxattr(self._dir_fd(dir_parts, create=True), OVERLAY_OPAQUE_XATTR, b"y")
            return
        try:
            fd = self._dir_fd(dir_parts, create=False)
        except (FileNotFoundError, _Refused):
            return
        self._clear_lower(fd, dir_parts)

    def _clear_lower(self, fd: int, parts: tuple[str, ...]) -> None:
        """Remove what earlier layers put under `parts`, keeping what this layer wrote (either order in the tar)."""
        with os.scandir(fd) as it:
            children = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
        for name, is_dir in children:
            child = (*parts, name)
            if child not in self.written:
                self._remove(fd, name)
            elif is_dir:
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
                try:
                    self._clear_lower(sub, child)
                finally:
                    os.close(sub)

    # -- resolving inside the root --

    def _dir_fd(self, parts: tuple[str, ...], create: bool) -> int:
        """An fd of the directory at `parts`, every component resolved inside the root. Owned by the cache."""
        if not parts:
            return self.root_fd
        fd = self._parents.get(parts)
        if fd is None:
            fd = self._walk(parts, create)
            if len(self._parents) >= _PARENT_CACHE_MAX:
                self._invalidate()
            self._parents[parts] = fd
        return fd

    def _walk(self, parts: tuple[str, ...], create: bool) -> int:
        stack = [os.dup(self.root_fd)]  # the fds from the root down to where we are; ".." pops
        pending = list(reversed(parts))
        links = 0
        try:
            while pending:
                component = pending.pop()
                if component in ("", "."):
                    continue
                if component == "..":
                    if len(stack) > 1:  # ".." at the root stays at the root
                        os.close(stack.pop())
                    continue
                fd = self._open_component(stack[-1], component, create)
                if fd is not None:
                    stack.append(fd)
                    continue
                # A symlink on the way: continue with its target, read as if the root were "/".
                links += 1
                if links > _MAX_SYMLINKS:
                    raise _Refused("too many levels of symbolic links")
                target = os.readlink(component, dir_fd=stack[-1])
                if target.startswith("/"):
                    while len(stack) > 1:
                        os.close(stack.pop())
                pending.extend(reversed(target.split("/")))
            return stack.pop()
        finally:
            for fd in stack:
                os.close(fd)

    def _open_component(self, dir_fd: int, name: str, create: bool) -> int | None:
        """The fd of directory `name`, None if it is a symlink; creates a missing one (like mkdir -p)."""
        try:
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            if not create:
                raise
            os.mkdir(name, 0o755, dir_fd=dir_fd)
            return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            return None
        raise _Refused(f"{name!r} on the path is not a directory")

    def _reopen_dir(self, parts: tuple[str, ...]) -> int | None:
        """A fresh fd of the directory at `parts` without following its last component; None if it is gone."""
        if not parts:
            return os.dup(self.root_fd)
        try:
            return os.open(parts[-1], _DIR_FLAGS, dir_fd=self._dir_fd(parts[:-1], create=False))
        except (OSError, _Refused):
            return None

    def _invalidate(self) -> None:
        self._stale.extend(self._parents.values())
        self._parents.clear()

    # -- small operations on one name in a directory fd --

    @staticmethod
    def _lstat(pfd: int, name: str) -> os.stat_result | None:
        try:
            return os.stat(name, dir_fd=pfd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def _remove(self, pfd: int, name: str) -> None:
        existing = self._lstat(pfd, name)
        if existing is None:
            return
        if stat.S_ISDIR(existing.st_mode) or stat.S_ISLNK(existing.st_mode):
            self._invalidate()  # cached paths may have run through it
        if stat.S_ISDIR(existing.st_mode):
            _rarely_needed("shutil").rmtree(name, dir_fd=pfd)  # the fd-based rmtree: never follows symlinks
        else:
            os.unlink(name, dir_fd=pfd)

    def _chown(self, pfd: int, name: str, member: Member) -> None:
        # Only root can give files away; a rootless unpack keeps its own ids.
        if self.as_root:
            os.chown(name, member.uid, member.gid, dir_fd=pfd, follow_symlinks=False)

    def _set_xattrs(self, target: int | str, member: Member) -> None:
        for key, value in _xattrs(member):
            try:
                if isinstance(target, int):
                    os.setxattr(target, key, value)
                else:
                    os.setxattr(target, key, value, follow_symlinks=False)
            except OSError as exc:
                if not self._skippable(exc, key):
                    raise
                self.xattrs_skipped += 1

    def _skippable(self, exc: OSError, key: str) -> bool:
        if exc.errno in _NOT_SUPPORTED:
            return True  # the file system has no such namespace
        # Without root the trusted.* and security.* namespaces are closed to us.
        privileged = key.startswith(("trusted.", "security."))
        return not self.as_root and exc.errno == errno.EPERM and privileged


def _proc_path(pfd: int, name: str) -> str:
    # os.setxattr has no dir_fd; this path reaches `name` through the already-resolved directory fd.
    return f"/proc/self/fd/{pfd}/{name}"
