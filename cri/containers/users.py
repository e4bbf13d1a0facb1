"""The process user of a container, as the CRI asks for it.

`run_as_username` / `run_as_user` / `run_as_group` from the security context
win; otherwise the image's USER string (`name`, `uid`, `name:group`, `uid:gid`,
...). Names are looked up in the container's own /etc/passwd and /etc/group,
read from its rootfs with every symlink resolved as if the rootfs were "/", so
an image can never make criopy read a host file.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

FIELD_RUN_AS_USER = "config.linux.security_context.run_as_user"
FIELD_RUN_AS_USERNAME = "config.linux.security_context.run_as_username"
FIELD_RUN_AS_GROUP = "config.linux.security_context.run_as_group"
FIELD_SUPPLEMENTAL_GROUPS = "config.linux.security_context.supplemental_groups"
FIELD_IMAGE_USER = "image.user"

# (uid_t)-1 means "leave unchanged" to setresuid/setresgid, so it is never a real id.
_MAX_ID = 2**32 - 2
_MAX_SYMLINKS = 40  # the kernel's own limit (MAXSYMLINKS)
_MAX_FILE_BYTES = 16 << 20  # a passwd file this large is an attack, not a user database
_NUMERIC = re.compile(r"[0-9]+")  # ASCII only: int() would also take "+1", " 1" and non-ASCII digits


@dataclass(frozen=True)
class ProcessUser:
    uid: int
    gid: int
    additional_gids: tuple[int, ...]  # sorted, unique, includes gid (as containerd reports it)
    username: str  # "" when the uid has no /etc/passwd entry
    home: str  # from /etc/passwd, "/" when unknown


class UserError(Exception):
    """A user or group that cannot be resolved; `field` is the CRI field to blame."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class _PasswdEntry:
    name: str
    uid: int
    gid: int
    home: str


@dataclass(frozen=True)
class _GroupEntry:
    name: str
    gid: int
    members: tuple[str, ...]


@dataclass(frozen=True)
class _Request:
    """What to look up: a user and an optional group, each a name or a decimal id, and whom to blame."""

    user: str  # "" = root
    group: str  # "" = the user's primary group from /etc/passwd
    user_field: str
    group_field: str


def resolve(
    rootfs: Path,
    *,
    run_as_user: int | None,
    run_as_username: str,
    run_as_group: int | None,
    image_user: str,
    supplemental_groups: Sequence[int],
    policy: Literal["Merge", "Strict"],
) -> ProcessUser:
    """The uid, gid and groups the container's process runs with. Raises UserError naming the field."""
    if policy not in ("Merge", "Strict"):
        raise ValueError(f"unknown supplemental groups policy {policy!r}")
    for gid in supplemental_groups:
        _check_id(gid, FIELD_SUPPLEMENTAL_GROUPS, "group")
    request = _request(run_as_user, run_as_username, run_as_group, image_user)
    entry = _lookup_user(rootfs, request)
    uid = entry.uid if entry else _parse_id(request.user or "0", request.user_field, "user")
    gid = _primary_gid(rootfs, request, entry)
    gids = {gid, *supplemental_groups}
    if policy == "Merge" and entry is not None:
        # Memberships the image grants in /etc/group: what Kubernetes calls the implicit groups.
        gids.update(g.gid for g in _read_groups(rootfs) if entry.name in g.members)
    return ProcessUser(
        uid=uid,
        gid=gid,
        additional_gids=tuple(sorted(gids)),
        username=entry.name if entry else "",
        home=(entry.home if entry else "") or "/",
    )


def _request(run_as_user: int | None, run_as_username: str, run_as_group: int | None, image_user: str) -> _Request:
    # run_as_username wins over run_as_user (as in containerd and cri-o); either replaces the whole image USER.
    if run_as_username:
        request = _Request(run_as_username, "", FIELD_RUN_AS_USERNAME, FIELD_RUN_AS_USERNAME)
    elif run_as_user is not None:
        _check_id(run_as_user, FIELD_RUN_AS_USER, "user")
        request = _Request(str(run_as_user), "", FIELD_RUN_AS_USER, FIELD_RUN_AS_USER)
    else:
        user, _, group = image_user.partition(":")
        request = _Request(user, group, FIELD_IMAGE_USER, FIELD_IMAGE_USER)
    if run_as_group is not None:
        _check_id(run_as_group, FIELD_RUN_AS_GROUP, "group")
        request = _Request(request.user, str(run_as_group), request.user_field, FIELD_RUN_AS_GROUP)
    return request


def _lookup_user(rootfs: Path, request: _Request) -> _PasswdEntry | None:
    """The passwd entry of the requested user; None for a uid without one (allowed), UserError for a lost name."""
    user = request.user or "0"
    if _NUMERIC.fullmatch(user):
        uid = _parse_id(user, request.user_field, "user")
        return next((e for e in _read_passwd(rootfs) if e.uid == uid), None)
    entry = next((e for e in _read_passwd(rootfs) if e.name == user), None)
    if entry is None:
        raise UserError(request.user_field, f'user "{user}" not found in /etc/passwd of the container')
    return entry


def _primary_gid(rootfs: Path, request: _Request, entry: _PasswdEntry | None) -> int:
    group = request.group
    if not group:
        return entry.gid if entry else 0
    if _NUMERIC.fullmatch(group):
        return _parse_id(group, request.group_field, "group")  # a gid need not be in /etc/group
    found = next((g for g in _read_groups(rootfs) if g.name == group), None)
    if found is None:
        raise UserError(request.group_field, f'group "{group}" not found in /etc/group of the container')
    return found.gid


def _parse_id(text: str, field: str, kind: str) -> int:
    if not _NUMERIC.fullmatch(text):
        raise UserError(field, f'{kind} id "{text}" is not a number')
    value = int(text)
    _check_id(value, field, kind)
    return value


def _check_id(value: int, field: str, kind: str) -> None:
    if not 0 <= value <= _MAX_ID:
        raise UserError(field, f"{kind} id {value} is out of range 0..{_MAX_ID}")


# -- /etc/passwd and /etc/group --


def _read_passwd(rootfs: Path) -> list[_PasswdEntry]:
    """The entries of the container's /etc/passwd; malformed lines are skipped, as libc does."""
    entries = []
    for fields in _colon_lines(read_in_root(rootfs, "/etc/passwd")):
        if len(fields) < 4 or not (_NUMERIC.fullmatch(fields[2]) and _NUMERIC.fullmatch(fields[3])):
            continue
        home = fields[5] if len(fields) > 5 else ""
        entries.append(_PasswdEntry(fields[0], int(fields[2]), int(fields[3]), home))
    return entries


def _read_groups(rootfs: Path) -> list[_GroupEntry]:
    """The entries of the container's /etc/group; malformed lines are skipped."""
    entries = []
    for fields in _colon_lines(read_in_root(rootfs, "/etc/group")):
        if len(fields) < 3 or not _NUMERIC.fullmatch(fields[2]):
            continue
        members = tuple(m.strip() for m in fields[3].split(",") if m.strip()) if len(fields) > 3 else ()
        entries.append(_GroupEntry(fields[0], int(fields[2]), members))
    return entries


def _colon_lines(data: bytes | None) -> list[list[str]]:
    if not data:
        return []
    lines = data.decode("utf-8", errors="surrogateescape").splitlines()
    # "+"/"-" lines are NIS compat entries, which only the host's NSS could resolve.
    return [line.split(":") for line in lines if line and line[0] not in "#+-"]


# -- reading a file inside a rootfs --


def read_in_root(rootfs: Path, path: str) -> bytes | None:
    """The bytes of `path` inside `rootfs`, resolved as if rootfs were "/".

    None when it is missing, a symlink loop or not a regular file (a fifo
    would block the reader, a device could have side effects on open).
    """
    root_fd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fd = _open_in_root(root_fd, path)
    finally:
        os.close(root_fd)
    if fd is None:
        return None
    try:
        return _read_capped(fd, path)
    finally:
        os.close(fd)


def _open_in_root(root_fd: int, path: str) -> int | None:
    """A read-only fd of the regular file at `path` under root_fd, or None.

    Each component is opened with O_PATH|O_NOFOLLOW so the kernel never
    follows a link: a symlink is read and its target walked here, an absolute
    target from the root and ".." never above it (what openat2's
    RESOLVE_IN_ROOT does, without needing it).
    """
    stack = [os.dup(root_fd)]  # fds from the root down to where we are
    names = [""]  # the name each fd in `stack` was opened by, in the fd below it
    pending = _components(path)
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name == "..":
                if len(stack) > 1:
                    os.close(stack.pop())
                    names.pop()
                continue
            try:
                fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=stack[-1])
            except (FileNotFoundError, NotADirectoryError):
                return None
            if not stat.S_ISLNK(os.fstat(fd).st_mode):
                stack.append(fd)
                names.append(name)
                continue
            os.close(fd)
            links += 1
            if links > _MAX_SYMLINKS:
                return None
            target = os.readlink(name, dir_fd=stack[-1])
            if target.startswith("/"):
                while len(stack) > 1:
                    os.close(stack.pop())
                    names.pop()
            pending.extend(_components(target))
        return _reopen_regular(stack, names)
    finally:
        for fd in stack:
            os.close(fd)


def _components(path: str) -> list[str]:
    """The components of `path` in reverse order, ready to pop; empty and "." ones dropped."""
    return [c for c in reversed(path.split("/")) if c not in ("", ".")]


def _reopen_regular(stack: list[int], names: list[str]) -> int | None:
    """Reopen the O_PATH fd on top of `stack` for reading, if it is a regular file."""
    if len(stack) < 2:
        return None  # the root itself
    want = os.fstat(stack[-1])
    if not stat.S_ISREG(want.st_mode):
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(names[-1], flags, dir_fd=stack[-2])
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
        return None
    got = os.fstat(fd)
    # O_NOFOLLOW keeps the reopen inside the root; the inode check catches a swap since the walk.
    if (got.st_dev, got.st_ino) != (want.st_dev, want.st_ino):
        os.close(fd)
        return None
    return fd


def _read_capped(fd: int, path: str) -> bytes:
    chunks = []
    size = 0
    while chunk := os.read(fd, 1 << 16):
        size += len(chunk)
        if size > _MAX_FILE_BYTES:
            raise OSError(f"{path} in the container is larger than {_MAX_FILE_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
