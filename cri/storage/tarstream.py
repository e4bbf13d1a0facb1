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
stream (drain) so the hash covers it.

Sparse members (GNU tar -S) are read in every flavour tarfile and Go's
archive/tar read: old GNU type 'S' (the map in the header, then extension
blocks before the data) and PAX GNU.sparse 0.0 (repeated offset/numbytes
records), 0.1 (GNU.sparse.map) and 1.0 (the map as decimal lines at the start
of the data). Such a member's `size` is the file's real size, as tarfile
gives it, and `sparse` its map; copy_sparse_to() writes its chunks where they
lie and leaves the holes. A map that is out of order, overlapping, past the
real size, over 1 MiB or not matching the data stored raises TarError.
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import sys
import zlib
from collections.abc import Iterator
from typing import NamedTuple, Protocol

BLOCK = 512
READ_SIZE = 1 << 20
MAX_EXTENDED_HEADER = 1 << 20  # GNU longname/longlink and PAX payloads, as Go's archive/tar bounds them
# A sparse map read from the stream (old GNU extension blocks, a PAX 1.0 map): Go bounds the 1.0 map so.
MAX_SPARSE_MAP = 1 << 20
_INT64_MAX = (1 << 63) - 1  # sparse numbers are int64 in Go's reader

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
_SPARSE_PREFIX = "GNU.sparse."
_SPARSE_00_KEYS = frozenset({b"GNU.sparse.offset", b"GNU.sparse.numbytes"})
# An old GNU header's sparse area, inside the bytes read as the ustar prefix (header offset 345):
# 4 entries of 12-byte offset and numbytes at 386, the isextended flag at 482, the real size at 483.
_OLD_GNU_ENTRIES, _OLD_GNU_EXTENDED, _OLD_GNU_REALSIZE = 386 - 345, 482 - 345, 483 - 345
_EXTENSION_ENTRIES, _EXTENSION_EXTENDED = 21, 504  # an extension block: 21 entries, then its flag
_SPARSE_ENTRY = 24
_NUMBER_CACHE_MAX = 4096


class TarError(Exception):
    """The archive is corrupt or truncated."""


class _Source(Protocol):
    def read(self, size: int, /) -> bytes: ...


class Member:
    """One archive member, with tarfile.TarInfo's names for what the extractor reads.

    A plain class, not a dataclass: dataclasses (and inspect with it) cost every unpack worker ~20 ms of
    start-up, which the first layers of a pull wait for.
    """

    __slots__ = (
        "devmajor",
        "devminor",
        "gid",
        "linkname",
        "mode",
        "mtime",
        "name",
        "pax_headers",
        "size",
        "sparse",
        "type",
        "uid",
    )

    def __init__(
        self,
        *,
        name: str,
        type: bytes,
        mode: int,
        uid: int,
        gid: int,
        size: int,
        mtime: float,  # an int from the header, a float from a PAX record (its exact text stays in pax_headers)
        linkname: str,
        devmajor: int,
        devminor: int,
        pax_headers: dict[str, str] | None = None,
        # GNU or PAX sparse: the (offset, numbytes) of each chunk of data, holes between; `size` is the real size.
        sparse: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        self.name = name
        self.type = type
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.size = size
        self.mtime = mtime
        self.linkname = linkname
        self.devmajor = devmajor
        self.devminor = devminor
        self.pax_headers: dict[str, str] = {} if pax_headers is None else pax_headers
        self.sparse = sparse

    def __repr__(self) -> str:
        return f"Member({self.name!r}, type={self.type!r}, size={self.size})"

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


def _pax_records(payload: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The keyword and value of each record of a PAX payload, in order."""
    pos = 0
    while (record := _PAX_RECORD.match(payload, pos)) is not None:
        length = int(record.group(1))
        if length == 0:
            raise TarError("invalid header: PAX record of length 0")
        # The value runs to the record's end, less its newline.
        yield record.group(2), payload[record.end(2) + 1 : record.start(1) + length - 1]
        pos += length


def parse_pax(payload: bytes, headers: dict[str, str]) -> None:
    """Add the PAX records of `payload` to `headers`, as tarfile's _proc_pax reads them."""
    match = _PAX_HDRCHARSET.search(payload)
    if match is not None:
        try:
            headers["hdrcharset"] = match.group(1).decode("utf-8")
        except UnicodeDecodeError:
            raise TarError("invalid header: PAX hdrcharset is not UTF-8") from None
    names_encoding = ENCODING if headers.get("hdrcharset") == "BINARY" else "utf-8"
    # _pax_records' walk, inline: a generator costs 6% of reading a layer whose every member has PAX records.
    pos = 0
    while (record := _PAX_RECORD.match(payload, pos)) is not None:
        length = int(record.group(1))
        if length == 0:
            raise TarError("invalid header: PAX record of length 0")
        value = payload[record.end(2) + 1 : record.start(1) + length - 1]
        keyword = _decode_pax(record.group(2), "utf-8", "utf-8")
        if keyword in _PAX_NAME_FIELDS:
            headers[keyword] = _decode_pax(value, names_encoding, ENCODING)
        else:
            headers[keyword] = _decode_pax(value, "utf-8", "utf-8")
        pos += length


def sparse_00_records(payload: bytes) -> tuple[tuple[str, str], ...]:
    """PAX sparse 0.0's repeated GNU.sparse.offset / GNU.sparse.numbytes records, in order (a dict keeps the last)."""
    return tuple(
        (keyword.decode("ascii"), value.decode("utf-8", ERRORS))
        for keyword, value in _pax_records(payload)
        if keyword in _SPARSE_00_KEYS
    )


def apply_pax(member: Member, headers: dict[str, str]) -> None:
    """Replace `member`'s fields by PAX records, as tarfile's _apply_pax_info does."""
    for keyword, value in headers.items():
        if keyword.startswith(_SPARSE_PREFIX):
            member.sparse = _MAP_UNREAD
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


# A sparse member's map until TarReader.next() reads it (from the header, extension blocks or the data).
_MAP_UNREAD: tuple[tuple[int, int], ...] = ()


def sparse_number(text: str | bytes | None, what: str, name: str) -> int:
    """A decimal number of a PAX sparse map (as Go parses them: int64, no sign, no blanks)."""
    if text is None:
        raise TarError(f"invalid sparse header of {name!r}: no {what}")
    if not (text.isascii() and text.isdigit() and len(text) <= 19) or int(text) > _INT64_MAX:
        raise TarError(f"invalid sparse header of {name!r}: bad {what} {text!r}")
    return int(text)


def checked_map(chunks: list[tuple[int, int]], realsize: int, stored: int, name: str) -> tuple[tuple[int, int], ...]:
    """The chunks of a sparse map, less the empty ones, once they are sure to describe `stored` bytes of data.

    Go's validateSparseEntries (the BSD tar checks: in order, not overlapping, inside the real size), and
    the data they cover is exactly what the archive stores (Go fails reading otherwise).
    """
    if not 0 <= realsize <= _INT64_MAX:
        raise TarError(f"invalid sparse map of {name!r}: real size {realsize}")
    end = total = 0
    kept = []
    for offset, numbytes in chunks:
        if offset < 0 or numbytes < 0:
            raise TarError(f"invalid sparse map of {name!r}: negative chunk ({offset}, {numbytes})")
        if offset < end:
            raise TarError(f"invalid sparse map of {name!r}: chunk at {offset} overlaps or precedes the one before")
        end = offset + numbytes
        if end > realsize:
            raise TarError(f"invalid sparse map of {name!r}: chunk at {offset} runs past the real size {realsize}")
        total += numbytes
        if numbytes:
            kept.append((offset, numbytes))
    if total != stored:
        raise TarError(f"invalid sparse map of {name!r}: its chunks hold {total} bytes, the archive stores {stored}")
    return tuple(kept)


def _old_gnu_entries(block: bytes, start: int, count: int) -> list[tuple[int, int]]:
    """The (offset, numbytes) entries of an old GNU sparse area; the first offset starting with NUL ends them (Go)."""
    entries = []
    for at in range(start, start + count * _SPARSE_ENTRY, _SPARSE_ENTRY):
        if block[at] == 0:
            break
        entries.append((parse_number(block[at : at + 12]), parse_number(block[at + 12 : at + _SPARSE_ENTRY])))
    return entries


def _pairs(values: list[int]) -> list[tuple[int, int]]:
    return list(zip(values[::2], values[1::2], strict=True))


def _pax_0x_values(records: dict[str, str], records_00: tuple[tuple[str, str], ...], name: str) -> list[int]:
    """The numbers of a PAX 0.1 map (GNU.sparse.map "off,size,...") or of 0.0's repeated records."""
    if "GNU.sparse.map" in records:
        if records_00:
            raise TarError(f"invalid sparse header of {name!r}: both GNU.sparse.map and GNU.sparse.offset records")
        text = records["GNU.sparse.map"]
        values = [sparse_number(item, "GNU.sparse.map", name) for item in text.split(",")] if text else []
    else:
        # 0.0: offset, numbytes, offset, numbytes... (Go checks the order; tarfile pairs them up regardless)
        for index, (keyword, _) in enumerate(records_00):
            if keyword != ("GNU.sparse.offset" if index % 2 == 0 else "GNU.sparse.numbytes"):
                raise TarError(f"invalid sparse header of {name!r}: GNU.sparse.offset/numbytes records out of order")
        values = [sparse_number(value, keyword, name) for keyword, value in records_00]
    blocks = sparse_number(records.get("GNU.sparse.numblocks"), "GNU.sparse.numblocks", name)
    if len(values) != 2 * blocks:
        raise TarError(f"invalid sparse header of {name!r}: {len(values)} map numbers for {blocks} blocks")
    return values


class _Extension(NamedTuple):
    """An extended header met before its member: applied once the member's own header is read."""

    type: bytes
    text: str = ""  # GNU longname / longlink
    pax: dict[str, str] | None = None  # a PAX 'x' header's records, over the global ones of its time


class TarReader:
    """Members of the tar stream `source`, one pass; every byte read is hashed once into `hash`.

    Iterate for the members; a regular member's content goes out through copy_to(), a sparse one's
    (`sparse` not None) through copy_sparse_to(); what the caller does not take is skipped. At the end of
    the archive, drain() reads the rest of the stream.
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
        self._sparse_00: tuple[tuple[str, str], ...] = ()  # PAX sparse 0.0 records for the member to come
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
        size = self._data_left
        self._write_out(fd, size, None)
        return size

    def copy_sparse_to(self, fd: int, member: Member) -> int:
        """Write the current member, sparse, to the regular file `fd` as it lay: each chunk of data at its
        offset, the holes never written (they stay holes), the file then cut to the real size. Returns that.
        """
        if member.sparse is None:
            raise ValueError(f"{member.name!r} is not a sparse member")
        if self._data_left != sum(numbytes for _, numbytes in member.sparse):
            raise ValueError(f"the data of {member.name!r} is not the reader's to write (taken, or not current)")
        for offset, numbytes in member.sparse:
            self._write_out(fd, numbytes, offset)
        os.ftruncate(fd, member.size)
        return member.size

    def _write_out(self, fd: int, size: int, offset: int | None) -> None:
        """The next `size` bytes of the member's content to `fd`: at its position, or at `offset` (pwrite)."""
        while size:
            available = len(self._chunk) - self._pos
            if not available:
                if not self._fill():
                    raise TarError("unexpected end of data")
                continue
            step = min(size, available)
            view = self._view[self._pos : self._pos + step]
            while view:
                written = os.write(fd, view) if offset is None else os.pwrite(fd, view, offset)
                view = view[written:]
                if offset is not None:
                    offset += written
            self._pos += step
            size -= step
            self._data_left -= step

    def read_content(self) -> bytes:
        """The current member's remaining content (for small members and tests); a sparse member's chunks packed."""
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
            if member.sparse is not None:
                self._begin_sparse(member, fields[_PREFIX])
                return member
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
            if any(keyword.startswith(_SPARSE_PREFIX) for keyword in self._global):
                raise TarError("invalid header: a PAX global header carries GNU.sparse records")
        else:
            records = self._global.copy()
            parse_pax(payload, records)
            extensions.append(_Extension(kind, pax=records))
            if "GNU.sparse.offset" in records:  # its member is sparse: _begin_sparse takes these
                self._sparse_00 += sparse_00_records(payload)

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
        sparse = _MAP_UNREAD if kind == GNUTYPE_SPARSE else None
        member = Member(
            name=name,
            type=kind,
            mode=mode,
            uid=uid,
            gid=gid,
            size=size,
            mtime=mtime,
            linkname=linkname,
            devmajor=devmajor,
            devminor=devminor,
            sparse=sparse,
        )
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

    # -- sparse members --

    def _begin_sparse(self, member: Member, header_area: bytes) -> None:
        """Read `member`'s sparse map: its `size` becomes the real size, the data stored what is left to take.

        `member.size` is the size stored in the archive until then (the header's, or a PAX size record's).
        """
        stored = member.size
        if member.type == GNUTYPE_SPARSE:
            if any(keyword.startswith(_SPARSE_PREFIX) for keyword in member.pax_headers):
                raise TarError(f"invalid sparse header of {member.name!r}: GNU type 'S' with GNU.sparse records")
            chunks, realsize = self._old_gnu_map(header_area, member.name)
        else:
            if member.type not in REGULAR_TYPES:
                raise TarError(f"invalid sparse header of {member.name!r}: not a regular file")
            records_00, self._sparse_00 = self._sparse_00, ()
            chunks, realsize, map_size = self._pax_map(member, records_00)
            stored -= map_size
        member.sparse = checked_map(chunks, realsize, stored, member.name)
        member.size = realsize
        self._data_left = stored
        self._padding = padded(stored) - stored

    def _old_gnu_map(self, area: bytes, name: str) -> tuple[list[tuple[int, int]], int]:
        """An old GNU 'S' header's map (4 entries in the header, 21 in each extension block after it) and real size."""
        chunks = _old_gnu_entries(area, _OLD_GNU_ENTRIES, 4)
        realsize = parse_number(area[_OLD_GNU_REALSIZE : _OLD_GNU_REALSIZE + 12])
        extended = area[_OLD_GNU_EXTENDED]
        read = 0
        while extended:
            read += BLOCK
            if read > MAX_SPARSE_MAP:
                raise TarError(f"invalid sparse header of {name!r}: extension blocks over {MAX_SPARSE_MAP} bytes")
            block = self._read(BLOCK)
            if len(block) < BLOCK:
                raise TarError(f"unexpected end of data in the sparse header of {name!r}")
            chunks += _old_gnu_entries(block, 0, _EXTENSION_ENTRIES)
            extended = block[_EXTENSION_EXTENDED]
        return chunks, realsize

    def _pax_map(
        self, member: Member, records_00: tuple[tuple[str, str], ...]
    ) -> tuple[list[tuple[int, int]], int, int]:
        """A PAX sparse member's map, real size, and the bytes of its data the map took (1.0 keeps it there)."""
        records, name = member.pax_headers, member.name
        # Go's rules: the real size from GNU.sparse.size (0.x) or GNU.sparse.realsize (1.0); the version from
        # major/minor, else 0.x when there is a map (0.0 and 0.1 wrote no version).
        realsize = sparse_number(
            records.get("GNU.sparse.size") or records.get("GNU.sparse.realsize"), "real size", name
        )
        version = (records.get("GNU.sparse.major"), records.get("GNU.sparse.minor"))
        if version == ("1", "0"):
            values, map_size = self._pax_10_values(member.size, name)
            return _pairs(values), realsize, map_size
        if version not in ((None, None), ("0", "0"), ("0", "1")):
            raise TarError(f"invalid sparse header of {name!r}: unknown GNU sparse version {version[0]}.{version[1]}")
        if "GNU.sparse.map" not in records and not records_00:
            raise TarError(f"invalid sparse header of {name!r}: GNU.sparse records without a map")
        return _pairs(_pax_0x_values(records, records_00, name)), realsize, 0

    def _pax_10_values(self, stored: int, name: str) -> tuple[list[int], int]:
        """PAX sparse 1.0's map: decimal lines at the start of the data (a count, then offset and numbytes of
        each chunk), padded to whole blocks; returns its numbers and how many bytes of data it took."""
        blocks: list[bytes] = []
        newlines = 0
        needed: int | None = None  # the lines the map takes: its count's, then two per chunk
        while needed is None or newlines < needed:
            taken = (len(blocks) + 1) * BLOCK
            if taken > MAX_SPARSE_MAP:
                raise TarError(f"invalid sparse header of {name!r}: map over {MAX_SPARSE_MAP} bytes")
            if taken > stored:
                raise TarError(f"invalid sparse header of {name!r}: map runs past the member's data")
            block = self._read(BLOCK)
            if len(block) < BLOCK:
                raise TarError(f"unexpected end of data in the sparse map of {name!r}")
            blocks.append(block)
            newlines += block.count(b"\n")
            if needed is None and newlines:
                count = b"".join(blocks).partition(b"\n")[0]
                needed = 1 + 2 * sparse_number(count, "map count", name)
        lines = b"".join(blocks).split(b"\n", needed)[1:needed]
        return [sparse_number(line, "map number", name) for line in lines], len(blocks) * BLOCK
