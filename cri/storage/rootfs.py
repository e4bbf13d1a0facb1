"""Per-container root filesystems: an overlay mount of the image's layers, or a vfs copy of them.

Everything lives in the container's own directory, `<storage root>/containers/<id>/`, which create()
makes and remove() deletes whole:

    upper/    overlay: the container's writes
    work/     overlay: the kernel's scratch dir (must be on the same file system as upper/)
    l/<n>     overlay, long chains only: short symlinks to the layer diff dirs, l/0 the topmost
    empty/    overlay, images without layers: the one lower dir overlay insists on
    merged/   what the OCI runtime gets as root.path: the overlay mount, or (vfs) the copy

Short mount-table entries. Every overlay is mounted with paths relative to its container dir:

 1. each lower dir gets a symlink `l/<n>` in the container dir (n = its position, so 1-3 characters);
 2. the options are `lowerdir=l/0:l/1:...,upperdir=upper,workdir=work`;
 3. the kernel resolves relative paths against the cwd of the thread calling mount(2), and the daemon's
    threads share theirs, so cri.system.linux.mount_in makes the call from a throwaway thread with a cwd
    of its own (the container dir).

Why: everyone reads the whole mount table, and an overlay's options were most of its entry. runc reads
/proc/self/mountinfo in each create, init, start and delete, and the kernel escapes every character of
it for every read: in a 110-pod burst, making that text cost ~9% of all the CPU the burst used. With
absolute paths a container's entry was ~630 bytes (~11 us per read), now ~230 (~4 us); a node with 110
pods reads its table in 1.5 ms instead of 2.1.

It also keeps within mount(2)'s one page of option data (4096 bytes on x86-64, NUL included) at any
depth: a layer's diff path is ~90 bytes, so absolute lowerdirs stopped fitting at about 40 layers, while
at the kernel's cap of 500 lowers the relative string is ~3.4 kB. The kernel resolves the links when
mounting, so the mount no longer depends on them; they stay for whoever debugs it (`ls -l l/`) and go
with the directory. Per-container links (not a shared `<root>/l/<short id>` pool, as containers/storage
keeps) need no bookkeeping in the layer store.

Read-only roots: the mount always has upper/ and work/. The caller sets root.readonly in the OCI spec
and the runtime remounts the root read-only inside the container's mount namespace, after it has made
the mount points (/proc, /dev, ...) it needs in the root. So there is no read-only flag here.

Overlay shows the upper dir's owner and mode as the root's, so upper/ copies those of the topmost lower
(the image's `/`, normally 0755 root:root); otherwise a non-root container could not list `/`.

Image volumes (cri/storage/imagevolumes.py) use mount_read_only: the same layout without upper/ and
work/, an overlay of lower dirs only (which the kernel makes read-only; it needs two lowers), or for a
single layer a read-only bind mount of it; long chains go through the same short links.

User namespaces (a pod with userns_options mode POD): the layers are shared with every other container and
stay as they are on disk, owned by the host's IDs; no chowned copy is made. Each lower dir gets an idmapped,
read-only bind mount `idmapped/<n>` in the container dir (cri.system.idmap: open_tree + mount_setattr with
the pod's pinned user namespace + move_mount), which shows on-disk uid 0 as the pod's mapped root, and the
overlay is built on those: an overlay mount itself cannot be idmapped (EINVAL). upper/ takes its owner from
the topmost idmapped lower, i.e. the mapped root, so the container's writes (copy-ups included) land there
with the container's host IDs. The container dir itself is then owned by the mapped root: runc's init runs
inside the namespace and must reach merged/, while other host users still cannot.

vfs: merged/ is `cp -a --reflink=auto` of the topmost lower dir, which with the vfs layer store is the
whole image. There is no mount; the copy is the writable layer.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cri.errors import Internal
from cri.log import event
from cri.storage.layers import CopyError, Driver, copy_tree, tree_usage
from cri.system import idmap, linux

log = logging.getLogger(__name__)

MAX_LOWER_DIRS = 500  # overlayfs' OVL_MAX_STACK
COPY_TIMEOUT = 1800.0  # vfs: copying a whole image


class RootfsError(Internal):
    """Making or removing a container's root filesystem failed; the message says which step and why."""


@dataclass(frozen=True)
class IdShift:
    """The user namespace a container runs in: its pinned ns file, and the host (uid, gid) of root inside."""

    userns_path: str
    root: tuple[int, int]


@dataclass(frozen=True)
class RootfsPaths:
    dir: Path
    upper: Path
    work: Path
    merged: Path
    links: Path
    empty: Path
    idmapped: Path

    @classmethod
    def of(cls, container_dir: Path) -> RootfsPaths:
        d = Path(os.path.abspath(container_dir))
        return cls(d, d / "upper", d / "work", d / "merged", d / "l", d / "empty", d / "idmapped")


def create(
    container_dir: Path,
    lower_dirs: Sequence[Path],
    driver: Driver,
    *,
    copy_timeout: float = COPY_TIMEOUT,
    shift: IdShift | None = None,
) -> Path:
    """Make the container's rootfs from lower_dirs (topmost first) and return merged/, the OCI root.path.

    container_dir must not exist yet. shift: the container's user namespace, whose mapping the layers are
    seen through (overlay only). Blocking: run it in a thread. On failure nothing is left (mounts
    undone, directory removed) and RootfsError says what failed.
    """
    if driver not in ("overlay", "vfs"):
        raise ValueError(f"storage driver must be 'overlay' or 'vfs', not {driver!r}")
    if shift is not None and driver != "overlay":
        raise RootfsError("containers in a user namespace need the overlay storage driver (idmapped lower dirs)")
    paths = RootfsPaths.of(container_dir)
    lowers = [Path(os.path.abspath(p)) for p in lower_dirs]
    _check_lowers(lowers if driver == "overlay" else lowers[:1])
    start = time.monotonic()
    _make_container_dir(paths.dir)
    try:
        overlay = driver == "overlay"
        how = _mount_overlay(paths, lowers, shift) if overlay else _copy_vfs(paths, lowers, copy_timeout)
    except BaseException as exc:
        _discard_after_failure(paths)
        if isinstance(exc, RootfsError) or not isinstance(exc, OSError):
            raise
        raise RootfsError(f"making the root filesystem in {paths.dir}: {exc}") from exc
    seconds = round(time.monotonic() - start, 3)
    event(
        log,
        logging.INFO,
        "rootfs_created",
        dir=str(paths.dir),
        driver=driver,
        layers=len(lowers),
        how=how,
        idmapped=shift is not None,
        seconds=seconds,
    )
    return paths.merged


def remove(container_dir: Path) -> None:
    """Unmount everything under container_dir and delete it. Idempotent: a missing directory is fine.

    A busy mount (a process has its cwd or a file open inside) is detached lazily, with a warning; the
    kernel frees it when the last user goes. Nothing is deleted while anything is still mounted below.
    """
    paths = RootfsPaths.of(container_dir)
    if not os.path.lexists(paths.dir):
        return
    _unmount_all(paths.dir)
    _delete(paths.dir)
    event(log, logging.INFO, "rootfs_removed", dir=str(paths.dir))


def is_mounted(container_dir: Path) -> bool:
    """Whether merged/ is a mount point (always False for vfs)."""
    merged = os.path.realpath(RootfsPaths.of(container_dir).merged)
    return any(m.mount_point == merged for m in linux.mounts_under(merged))


def usage(container_dir: Path) -> tuple[int, int]:
    """(bytes, inodes) of the writable layer: upper/ for overlay, the merged/ copy for vfs. Blocking."""
    paths = RootfsPaths.of(container_dir)
    return tree_usage(paths.upper if paths.upper.is_dir() else paths.merged)


# -- create --


def _check_lowers(lowers: Sequence[Path]) -> None:
    # The kernel would say only "No such file or directory" or "Invalid argument"; name the culprit here.
    if len(lowers) > MAX_LOWER_DIRS:
        raise RootfsError(f"{len(lowers)} layers: overlayfs mounts at most {MAX_LOWER_DIRS}")
    for lower in lowers:
        if not lower.is_dir():
            raise RootfsError(f"layer directory {lower} is missing")


def _make_container_dir(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir(mode=0o700)  # merged/ shows the image, setuid files included: not for other host users
    except FileExistsError:
        raise RootfsError(f"container directory {path} already exists") from None
    except OSError as exc:
        raise RootfsError(f"making container directory {path}: {exc}") from exc


def _mount_overlay(paths: RootfsPaths, lowers: list[Path], shift: IdShift | None) -> str:
    """Mount the overlay on merged/; returns how ("overlay"), for the log."""
    lowers = list(_lowers_or_empty(paths, lowers))
    if shift is not None:
        lowers = _idmapped_lowers(paths, lowers, shift)
        os.chown(paths.dir, *shift.root)
    for d in (paths.upper, paths.work, paths.merged):
        d.mkdir(mode=0o755)
    _copy_owner_and_mode(lowers[0], paths.upper)
    _overlay(paths, lowers, writable=True)
    return "overlay"


def mount_idmapped_volume(container_dir: Path, index: int, source: str, shift: IdShift) -> Path:
    """An idmapped bind of a volume's host path at <container_dir>/volumes/<index>, for the runtime to bind.

    Under the container dir, so remove() unmounts it with the rest. The mount point is a directory or an
    empty file, as the source is. Files there show host uid 0 as the mapped root, and what the container
    writes lands on the host with unshifted IDs (the point of an idmapped volume).
    """
    target = Path(container_dir) / "volumes" / str(index)
    target.parent.mkdir(mode=0o711, exist_ok=True)  # runc's init, the mapped root, binds it from inside
    if os.path.isdir(source):
        target.mkdir(mode=0o755)
    else:
        target.touch(mode=0o644)
    idmap.mount_idmapped(source, str(target), shift.userns_path)
    return target


def _idmapped_lowers(paths: RootfsPaths, lowers: list[Path], shift: IdShift) -> list[Path]:
    """A read-only idmapped bind mount of each lower dir, idmapped/<n>; the layers themselves are not touched."""
    paths.idmapped.mkdir(mode=0o700)
    out = []
    for n, lower in enumerate(lowers):
        target = paths.idmapped / str(n)
        target.mkdir(mode=0o755)
        try:
            idmap.mount_idmapped(str(lower), str(target), shift.userns_path, read_only=True)
        except OSError as exc:
            raise RootfsError(f"idmapped mount of layer {lower} on {target}: {exc}") from exc
        out.append(target)
    return out


def mount_read_only(top: Path, lowers: Sequence[Path], shift: IdShift | None = None) -> Path:
    """Mount lowers (topmost first) read-only on top/merged, for an image volume; returns merged/.

    top must exist and be empty. Two or more lowers: an overlay without upper and work dirs, which the
    kernel makes read-only; a single one: a read-only bind mount of it (overlay wants two lowers when it
    has no upper). Long chains use the same short relative links as containers. Blocking; on failure
    whatever was made under top is left for the caller's removal (remove(top)). shift: seen through a user
    namespace's mapping, over idmapped lowers as for containers (one container's volume, not shared).
    """
    paths = RootfsPaths.of(top)
    lowers = [Path(os.path.abspath(p)) for p in _lowers_or_empty(paths, lowers)]
    _check_lowers(lowers)
    if shift is not None:
        lowers = _idmapped_lowers(paths, lowers, shift)
    paths.merged.mkdir(mode=0o755)
    if len(lowers) > 1:
        _overlay(paths, lowers, writable=False)
        event(log, logging.INFO, "read_only_overlay_mounted", dir=str(paths.dir), layers=len(lowers))
        return paths.merged
    try:
        linux.mount(str(lowers[0]), str(paths.merged), None, linux.MS_BIND | linux.MS_REC)
        # A bind mount takes MS_RDONLY only on a remount.
        flags = linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY
        linux.mount("none", str(paths.merged), None, flags)
    except OSError as exc:
        raise RootfsError(f"read-only bind mount of {lowers[0]} on {paths.merged}: {exc}") from exc
    return paths.merged


def _lowers_or_empty(paths: RootfsPaths, lowers: Sequence[Path]) -> Sequence[Path]:
    """An image without layers still needs one lower dir: an empty one under the mount's own dir."""
    if lowers:
        return lowers
    paths.empty.mkdir(mode=0o755)
    os.chmod(paths.empty, 0o755)  # not the umask's idea: it becomes the root's mode (via upper/ for containers)
    return [paths.empty]


def _overlay(paths: RootfsPaths, lowers: list[Path], *, writable: bool) -> None:
    """The overlay on merged/, with upper/ and work/ when writable, named relative to the container dir."""
    paths.links.mkdir(mode=0o700)
    for n, lower in enumerate(lowers):
        (paths.links / str(n)).symlink_to(lower)
    relative = [f"{paths.links.name}/{n}" for n in range(len(lowers))]
    data = _overlay_options(relative, (paths.upper.name, paths.work.name) if writable else None)
    if not _fits_in_a_page(data):  # not reached below MAX_LOWER_DIRS; a guard should the cap ever rise
        raise RootfsError(f"{len(lowers)} layers: overlay options do not fit in one page even with short links")
    # Without an upper dir the kernel makes the overlay read-only whatever the flags.
    flags = 0 if writable else linux.MS_RDONLY
    try:
        linux.mount_in(str(paths.dir), str(paths.merged), "overlay", flags, data)
    except OSError as exc:
        raise RootfsError(f"overlay mount of {len(lowers)} layers: {exc}{_kernel_log_hint(exc)}") from exc


def _copy_owner_and_mode(source: Path, dest: Path) -> None:
    st = source.stat()
    os.chown(dest, st.st_uid, st.st_gid)
    os.chmod(dest, st.st_mode & 0o7777)  # after chown, which clears setuid/setgid


def _overlay_options(lowers: Sequence[str], upper_work: tuple[str, str] | None) -> str:
    # Names made here (l/<n>, upper, work): none has the ',' or ':' overlay would split at.
    lowerdir = ":".join(lowers)
    if upper_work is None:  # lower dirs only: a read-only overlay
        return f"lowerdir={lowerdir}"
    upper, work = upper_work
    return f"lowerdir={lowerdir},upperdir={upper},workdir={work}"


def _fits_in_a_page(data: str) -> bool:
    return len(data.encode()) < os.sysconf("SC_PAGESIZE")  # the kernel copies one page, NUL included


def _kernel_log_hint(exc: OSError) -> str:
    return " (overlayfs writes the reason to the kernel log: dmesg)" if exc.errno == errno.EINVAL else ""


def _copy_vfs(paths: RootfsPaths, lowers: list[Path], timeout: float) -> str:
    if not lowers:
        paths.merged.mkdir(mode=0o755)
        os.chmod(paths.merged, 0o755)
        return "empty"
    # merged/ does not exist yet, so the copy becomes merged/ itself.
    try:
        copy_tree(lowers[0], paths.merged, timeout)
    except CopyError as exc:
        raise RootfsError(f"copying {lowers[0]} to {paths.merged}: {exc}") from exc
    return "copy"


def _discard_after_failure(paths: RootfsPaths) -> None:
    # Best effort: the caller gets the original error; a leftover is logged for remove() to finish later.
    try:
        _unmount_all(paths.dir)
        _delete(paths.dir)
    except Exception as exc:
        event(log, logging.ERROR, "rootfs_cleanup_failed", dir=str(paths.dir), error=str(exc))


# -- remove --


def _unmount_all(top: Path) -> None:
    """Unmount everything at or below top, deepest first, from one read of the mount table.

    When this returns, nothing is mounted there: each entry was unmounted or detached (a detached mount
    leaves the table at once), and a stacked mount is its own entry. Nothing mounts under a directory
    being removed, so a second read (2 ms on a node with 110 pods, in every removal) would find nothing.
    """
    for entry in linux.mounts_under(str(top)):  # deepest first
        try:
            linux.umount(entry.mount_point)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                continue  # unmounted meanwhile
            if exc.errno != errno.EBUSY:
                raise RootfsError(f"unmounting {entry.mount_point}: {exc}") from exc
            event(log, logging.WARNING, "rootfs_busy_detached", mount_point=entry.mount_point)
            _detach(entry.mount_point)


def _detach(mount_point: str) -> None:
    try:
        linux.umount(mount_point, linux.MNT_DETACH)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise RootfsError(f"detaching {mount_point}: {exc}") from exc


def _delete(top: Path) -> None:
    # rmtree crosses mount points: deleting through a live overlay would write whiteouts, through a bind
    # mount it would delete someone else's files. So it runs only after _unmount_all has left nothing.
    try:
        shutil.rmtree(top)  # unlinks the l/<n> symlinks, never follows them into the layer store
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RootfsError(f"deleting {top}: {exc}") from exc
