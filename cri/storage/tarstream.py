"""A lean, streaming reader of the tar archives image layers are made of.

The unpack worker's hot path: Python's tarfile, read as a stream, spends
about as much CPU parsing headers and copying member data through its
10 KiB-read buffer chain as the extraction spends in the file system. This
reader reads the (decompressed) layer in large chunks, hashes each chunk once
as it arrives (the diffID), parses headers straight out of the chunk, and
writes a member's content to a file descriptor from memoryview slices of it.

What it yields is what tarfile's stream mode ("r|", the default encoding
sys.getfilesystemencoding() with "surrogateescape") gives for the same bytes:
the same names (ustar prefix, GNU longname/longlink, PAX path/linkpath, the
slashes tarfile strips from directories), types (old V7 headers, a trailing
"/" on an old regular file making a directory), numbers (octal, GNU
base-256, negative mtimes), PAX records (decoded as tarfile decodes them,
global headers applying to the members after them) and checksums (unsigned,
or signed as some old tars wrote them). tests/unit/test_tarstream.py checks
it against tarfile.

It is stricter than tarfile where tarfile silently stops: a header with a bad
checksum or number, a header cut short, a bad PAX record, a negative size,
or an extended header over 1 MiB (Go's archive/tar limit, so containerd
refuses those too) raise TarError instead of ending the archive early. Like
tarfile, it stops at the first zero block; the caller reads the rest of the
stream (drain) so the hash covers it. Sparse members (GNU type 'S', PAX
GNU.sparse.*) are flagged for the caller to refuse, not expanded.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import sys
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

BLOCK = 512
READ_SIZE = 1 << 20
MAX_EXTENDED_HEADER = 1 << 20  # GNU longname/longlink and PAX payloads, as Go's archive/tar bounds them

# tarfile's stream-mode defaults: names decoded with the file-system encoding, never failing.
ENCODING = sys.getfilesystemencoding()
ERRORS = "surrogateescape"

REGTYPE = b"0"
AREGTYPE = b"\0"
LNKTYPE = b"1"
SYMTYPE = b"2"
CHRTYPE = b"3"
BLKTYPE = b"4"
DIRTYPE = b"5"
FIFOTYPE = b"6"
CONTTYPE = b"7"
GNUTYPE_LONGNAME = b"L"
GNUTYPE_LONGLINK = b"K"
GNUTYPE_SPARSE = b"S"
XHDTYPE = b"x"
XGLTYPE = b"g"
SOLARIS_XHDTYPE = b"X"

REGULAR_TYPES = frozenset({REGTYPE, AREGTYPE, CONTTYPE, GNUTYPE_SPARSE})
# Types tarfile knows; any other type's size counts as data to skip, as tarfile treats it as a file.
SUPPORTED_TYPES = frozenset(
    {REGTYPE, AREGTYPE, LNKTYPE, SYMTYPE, DIRTYPE, FIFOTYPE, CONTTYPE, CHRTYPE, BLKTYPE}
    | {GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, GNUTYPE_SPARSE}
)
_GNU_TYPES = frozenset({GNUTYPE_LONGNAME, GNUTYPE_LONGLINK, GNUTYPE_SPARSE})
_PAX_TYPES = frozenset({XHDTYPE, XGLTYPE, SOLARIS_XHDTYPE})

# PAX records that replace a header field, and how tarfile converts them (a bad number becomes 0).
_PAX_NAME_FIELDS = frozenset({"path", "linkpath", "uname", "gname"})
_PAX_NUMBERS: dict[str, type[int] | type[float]] = {"mtime": float, "uid": int, "gid": int, "size": int}

# The header fields tarfile reads, in order (magic, version, uname and gname are skipped: the
# extractor needs none of them, and tarfile does not check the magic, so V7 headers read the same).
# Mode, uid and gid are read as one field, devmajor and devminor as another: they repeat from member to
# member, and one cache look-up of each pair saves parsing five numbers.
_HEADER = struct.Struct("100s24s12s12s8sc100s8x32x32x16s155s12x")
_NAME, _IDS, _SIZE, _MTIME, _CHKSUM, _TYPE, _LINKNAME, _DEVICE, _PREFIX = range(9)
_ID_FIELDS = struct.Struct("8s8s8s")
_DEVICE_FIELDS = struct.Struct("8s8s")
_SIGNED_BYTES = struct.Struct("148b8x356b")
_ZERO_BLOCK_CHECKSUM = 8 * ord(" ")  # the checksum field counts as spaces
_PAX_RECORD = re.compile(rb"(\d+) ([^=]+)=")
_PAX_HDRCHARSET = re.compile(rb"\d+ hdrcharset=([^\n]+)\n")
_NUMBER_CACHE_MAX = 4096


class TarError(Exception):
    """The archive is corrupt or truncated."""


class _Source(Protocol):
    def read(self, size: int, /) -> bytes: ...


@dataclass(slots=True)
class Member:
    """One archive member, with tarfile.TarInfo's names for what the extractor reads."""

    name: str
    type: bytes
    mode: int
    uid: int
    gid: int
    size: int
    mtime: float  # an int from the header, a float from a PAX record (its exact text stays in pax_headers)
    linkname: str
    devmajor: int
    devminor: int
    pax_headers: dict[str, str] = field(default_factory=dict)
    sparse: bool = False  # GNU or PAX sparse: its data is not the file's bytes as they lie

    def isreg(self) -> bool:
        return self.type in REGULAR_TYPES

    def isdir(self) -> bool:
        return self.type == DIRTYPE

    def issym(self) -> bool:
        return self.type == SYMTYPE

    def islnk(self) -> bool:
        return self.type == LNKTYPE

    def ischr(self) -> bool:
        return self.type == CHRTYPE

    def isblk(self) -> bool:
        return self.type == BLKTYPE

    def isfifo(self) -> bool:
        return self.type == FIFOTYPE


def padded(size: int) -> int:
    """`size` rounded up to whole blocks."""
    return -(-size // BLOCK) * BLOCK


def nts(raw: bytes, encoding: str = ENCODING) -> str:
    """A NUL-terminated field as a str, as tarfile decodes it."""
    return raw.partition(b"\0")[0].decode(encoding, ERRORS)


def parse_number(raw: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80, or 0xff for a negative number)."""
    if raw[0] in (0o200, 0o377):
        n = int.from_bytes(raw[1:], "big")
        return n - 256 ** (len(raw) - 1) if raw[0] == 0o377 else n
    try:
        # The same conversion as tarfile's nti (int() with its whitespace and "0o" rules included).
        return int(raw.partition(b"\0")[0].decode("ascii").strip() or "0", 8)
    except ValueError:  # UnicodeDecodeError included
        raise TarError(f"invalid header: bad number field {bytes(raw)!r}") from None


def _decode_pax(value: bytes, encoding: str, fallback: str) -> str:
    # tarfile: the standard encoding strictly, else `fallback` with the surrogateescape handler.
    try:
        return value.decode(encoding, "strict")
    except UnicodeDecodeError:
        return value.decode(fallback, ERRORS)


def parse_pax(payload: bytes, headers: dict[str, str]) -> None:
    """Add the PAX records of `payload` to `headers`, as tarfile's _proc_pax reads them."""
    match = _PAX_HDRCHARSET.search(payload)
    if match is not None:
        try:
            headers["hdrcharset"] = match.group(1).decode("utf-8")
        except UnicodeDecodeError:
            raise TarError("invalid header: PAX hdrcharset is not UTF-8") from None
    names_encoding = ENCODING if headers.get("hdrcharset") == "BINARY" else "utf-8"
    pos = 0
    while (record := _PAX_RECORD.match(payload, pos)) is not None:
        length = int(record.group(1))
        if length == 0:
            raise TarError("invalid header: PAX record of length 0")
        # The value runs to the record's end, less its newline.
        value = payload[record.end(2) + 1 : record.start(1) + length - 1]
        keyword = _decode_pax(record.group(2), "utf-8", "utf-8")
        if keyword in _PAX_NAME_FIELDS:
            headers[keyword] = _decode_pax(value, names_encoding, ENCODING)
        else:
            headers[keyword] = _decode_pax(value, "utf-8", "utf-8")
        pos += length


def apply_pax(member: Member, headers: dict[str, str]) -> None:
    """Replace `member`'s fields by PAX records, as tarfile's _apply_pax_info does."""
    for keyword, value in headers.items():
        if keyword.startswith("GNU.sparse."):
            member.sparse = True
            if keyword == "GNU.sparse.name":
                member.name = value  # the real name: PAX sparse 1.0 headers carry a made-up one
        elif keyword == "path":
            member.name = value.rstrip("/")
        elif keyword == "linkpath":
            member.linkname = value
        elif keyword in _PAX_NUMBERS:
            try:
                number = _PAX_NUMBERS[keyword](value)
            except ValueError:
                number = 0
            setattr(member, keyword, number)
    member.pax_headers = headers.copy()


@dataclass(frozen=True, slots=True)
class _Extension:
    """An extended header met before its member: applied once the member's own header is read."""

    type: bytes
    text: str = ""  # GNU longname / longlink
    pax: dict[str, str] | None = None  # a PAX 'x' header's records, over the global ones of its time


class TarReader:
    """Members of the tar stream `source`, one pass; every byte read is hashed once into `hash`.

    Iterate for the members; a regular member's content goes out through copy_to() (what the caller
    does not take is skipped). At the end of the archive, drain() reads the rest of the stream.
    """

    def __init__(self, source: _Source, read_size: int = READ_SIZE) -> None:
        self._source = source
        self._read_size = read_size
        self.hash = hashlib.sha256()
        self.consumed = 0  # bytes read from the source
        self._chunk = b""
        self._view = memoryview(self._chunk)
        self._pos = 0  # in _chunk
        self._data_left = 0  # content of the current member not taken yet
        self._padding = 0  # after that content
        self._global: dict[str, str] = {}  # PAX global records, for every member after them
        self._numbers: dict[bytes, int] = {}  # field -> value: sizes and times repeat
        self._ids: dict[tuple[bytes, bytes], tuple[int, int, int, int, int]] = {}  # mode, uid, gid, devices
        self._started = False
        self._ended = False

    def __iter__(self) -> Iterator[Member]:
        while (member := self.next()) is not None:
            yield member

    # -- the byte stream --

    def _fill(self) -> bool:
        """Read the next chunk; False at the end of the stream."""
        data = self._source.read(self._read_size)
        if not data:
            return False
        self.hash.update(data)
        self.consumed += len(data)
        self._chunk = data
        self._view = memoryview(data)
        self._pos = 0
        return True

    def _skip(self, size: int) -> None:
        while size:
            available = len(self._chunk) - self._pos
            if not available:
                if not self._fill():
                    raise TarError("unexpected end of data")
                continue
            step = min(size, available)
            self._pos += step
            size -= step

    def _read(self, size: int) -> bytes:
        """The next `size` bytes, or fewer at the end of the stream."""
        end = self._pos + size
        if end <= len(self._chunk):
            self._pos = end
            return self._chunk[end - size : end]
        parts = [self._chunk[self._pos :]]
        size -= len(parts[0])
        self._pos = len(self._chunk)
        while size and self._fill():
            step = min(size, len(self._chunk))
            parts.append(self._chunk[:step])
            self._pos = step
            size -= step
        return b"".join(parts)

    def _header_block(self) -> tuple[bytes, int] | None:
        """The next header block and its offset in the bytes returned; None at the end of the stream."""
        pos = self._pos
        if pos + BLOCK <= len(self._chunk):
            self._pos = pos + BLOCK
            return self._chunk, pos
        block = self._read(BLOCK)
        if not block:
            return None
        if len(block) < BLOCK:
            raise TarError("truncated header")
        return block, 0

    def drain(self) -> None:
        """Read (and hash) the stream to its end: the diffID covers what follows the archive's end."""
        self._pos = len(self._chunk)
        while self._fill():
            pass

    # -- member content --

    def copy_to(self, fd: int) -> int:
        """Write the current member's remaining content to `fd`; returns how many bytes."""
        written = left = self._data_left
        while left:
            available = len(self._chunk) - self._pos
            if not available:
                if not self._fill():
                    raise TarError("unexpected end of data")
                continue
            step = min(left, available)
            view = self._view[self._pos : self._pos + step]
            while view:
                view = view[os.write(fd, view) :]
            self._pos += step
            left -= step
            self._data_left = left
        return written

    def read_content(self) -> bytes:
        """The current member's remaining content (for small members and tests)."""
        data = self._read(self._data_left)
        if len(data) != self._data_left:
            raise TarError("unexpected end of data")
        self._data_left = 0
        return data

    # -- headers --

    def next(self) -> Member | None:
        """The next member, None at the end of the archive."""
        if self._ended:
            return None
        if self._data_left or self._padding:
            self._skip(self._data_left + self._padding)
            self._data_left = self._padding = 0
        extensions: list[_Extension] = []
        while (fields := self._next_header(extensions)) is not None:
            kind: bytes = fields[_TYPE]
            if kind in (GNUTYPE_LONGNAME, GNUTYPE_LONGLINK) or kind in _PAX_TYPES:
                self._read_extension(kind, fields, extensions)
                continue
            member = self._member(fields, extensions)
            if member.size < 0:
                raise TarError(f"invalid header: negative size of {member.name!r}")
            has_data = member.type in REGULAR_TYPES or member.type not in SUPPORTED_TYPES
            self._data_left = member.size if has_data else 0
            self._padding = padded(self._data_left) - self._data_left
            return member
        self._ended = True
        return None

    def _next_header(self, extensions: list[_Extension]) -> tuple[bytes, ...] | None:
        """The fields of the next header block; None at the end of the archive."""
        found = self._header_block()
        first = not self._started
        self._started = True
        if found is None:
            if first:
                raise TarError("empty file")
            if extensions:
                raise TarError("unexpected end of data after an extended header")
            return None  # no end-of-archive blocks: an end all the same, as for tarfile
        block, pos = found
        fields: tuple[bytes, ...] = _HEADER.unpack_from(block, pos)
        if self._checksum_ok(block, pos, fields[_CHKSUM]):
            return fields
        if block.count(b"\0", pos, pos + BLOCK) != BLOCK:
            raise TarError("invalid header: bad checksum")
        if extensions:
            raise TarError("end of archive after an extended header")
        return None  # the first zero block ends the archive, as for tarfile

    def _read_extension(self, kind: bytes, fields: tuple[bytes, ...], extensions: list[_Extension]) -> None:
        payload = self._extension_payload(fields)
        if kind in (GNUTYPE_LONGNAME, GNUTYPE_LONGLINK):
            extensions.append(_Extension(kind, text=nts(payload)))
        elif kind == XGLTYPE:
            parse_pax(payload, self._global)  # in place: tarfile's global dict
            if "size" in self._global:
                # tarfile would give every later member this size without reading that much.
                raise TarError("invalid header: a PAX global header sets size")
        else:
            records = self._global.copy()
            parse_pax(payload, records)
            extensions.append(_Extension(kind, pax=records))

    def _checksum_ok(self, block: bytes, pos: int, stored_field: bytes) -> bool:
        stored = self._number(stored_field)
        view = self._view if block is self._chunk else memoryview(block)
        # adler32's low half is 1 + the byte sum mod 65521: exact for 256 bytes (at most 65280).
        low = zlib.adler32(view[pos : pos + 256]) & 0xFFFF
        high = zlib.adler32(view[pos + 256 : pos + BLOCK]) & 0xFFFF
        total = low + high - 2
        unsigned = total - sum(stored_field) + _ZERO_BLOCK_CHECKSUM
        if stored == unsigned:
            return True
        # Some old tars (Sun, NeXT) summed signed chars; tarfile accepts either.
        signed: int = _ZERO_BLOCK_CHECKSUM + sum(_SIGNED_BYTES.unpack_from(block, pos))
        return stored == signed

    def _number(self, raw: bytes) -> int:
        value = self._numbers.get(raw)
        if value is None:
            value = parse_number(raw)
            if len(self._numbers) >= _NUMBER_CACHE_MAX:
                self._numbers.clear()
            self._numbers[raw] = value
        return value

    def _id_numbers(self, ids: bytes, device: bytes) -> tuple[int, int, int, int, int]:
        """mode, uid, gid, devmajor, devminor."""
        key = (ids, device)
        values = self._ids.get(key)
        if values is None:
            mode, uid, gid = (parse_number(raw) for raw in _ID_FIELDS.unpack(ids))
            devmajor, devminor = (parse_number(raw) for raw in _DEVICE_FIELDS.unpack(device))
            values = (mode, uid, gid, devmajor, devminor)
            if len(self._ids) >= _NUMBER_CACHE_MAX:
                self._ids.clear()
            self._ids[key] = values
        return values

    def _extension_payload(self, fields: tuple[bytes, ...]) -> bytes:
        size = self._number(fields[_SIZE])
        if size < 0 or size > MAX_EXTENDED_HEADER:
            raise TarError(f"invalid header: extended header of {size} bytes")
        payload = self._read(padded(size))
        if len(payload) != padded(size):
            raise TarError("unexpected end of data in an extended header")
        return payload

    def _member(self, fields: tuple[bytes, ...], extensions: list[_Extension]) -> Member:
        """The member of header `fields`, with the extended headers before it applied as tarfile applies them."""
        name = nts(fields[_NAME])
        kind: bytes = fields[_TYPE]
        if kind == AREGTYPE and name.endswith("/"):
            kind = DIRTYPE  # old V7 tars marked directories by the slash alone
        if kind == DIRTYPE:
            name = name.rstrip("/")
        prefix = fields[_PREFIX]
        if prefix[0] and kind not in _GNU_TYPES:
            name = nts(prefix) + "/" + name
        mode, uid, gid, devmajor, devminor = self._id_numbers(fields[_IDS], fields[_DEVICE])
        linkname = nts(fields[_LINKNAME]) if fields[_LINKNAME][0] else ""
        size, mtime = self._number(fields[_SIZE]), self._number(fields[_MTIME])
        sparse = kind == GNUTYPE_SPARSE
        member = Member(name, kind, mode, uid, gid, size, mtime, linkname, devmajor, devminor, {}, sparse)
        if self._global:
            apply_pax(member, self._global)
            if kind == DIRTYPE:
                member.name = member.name.rstrip("/")
        # tarfile applies the extended headers innermost first: the first one read has the last word.
        for extension in reversed(extensions):
            if extension.pax is not None:
                apply_pax(member, extension.pax)
                continue
            if extension.type == GNUTYPE_LONGNAME:
                member.name = extension.text
            else:
                member.linkname = extension.text
            if member.type == DIRTYPE:
                member.name = member.name.removesuffix("/")
        return member
