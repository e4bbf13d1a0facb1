"""The layer store: each layer unpacked once per chain ID, shared by every image that contains it.

Layout under the storage root:

    layers/<hex of chain ID>/diff         the layer's files
    layers/<hex of chain ID>/layer.json   chain ID, diff ID, parent, size
    layers/tmp-*                          unpacks in progress (or left by a crash)

With the "overlay" driver a diff holds only that layer's changes, whiteouts
as overlayfs markers, and a container's rootfs is an overlay mount of the
chain. With "vfs" a diff is a full copy of its parent with the layer applied,
so the topmost diff of a chain is the whole image filesystem.

A layer appears under its final name only by an atomic rename of a finished,
verified unpack, so a crash at any point leaves either nothing or a
`tmp-*` directory that cleanup_temp() removes at the next start.
"""

from __future__ import annotations

import builtins
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cri.errors import NotFound, no_space_in
from cri.log import event
from cri.storage.unpack import UnpackError, UnpackResult, WhiteoutMode, unpack_layer
from cri.system import affinity

# Under the "cri" logger tree, so the daemon's log level applies (cri.log.OWN_LOGGERS).
log = logging.getLogger(__name__)

Driver = Literal["overlay", "vfs"]

_DIGEST = re.compile(r"sha256:([0-9a-f]{64})")
_HEX = re.compile(r"[0-9a-f]{64}")
_META = "layer.json"
_TEMP_PREFIX = "tmp-"


class LayerNotFound(NotFound):
    pass


@dataclass(frozen=True)
class LayerInfo:
    chain_id: str
    diff_id: str
    path: Path  # the diff directory
    size: int  # bytes of regular files the layer itself wrote
    cached: bool  # True when the layer was already in the store


def _hex_of(digest: str, what: str) -> str:
    match = _DIGEST.fullmatch(digest)
    if match is None:
        raise UnpackError(f"{what} {digest!r} is not a sha256 digest (sha256:<64 hex>)")
    return match.group(1)


def _chain(parent: str, diff_id: str) -> str:
    return "sha256:" + hashlib.sha256(f"{parent} {diff_id}".encode()).hexdigest()


def chain_ids(diff_ids: Sequence[str]) -> list[str]:
    """The OCI image spec's chain IDs, base layer first.

    ChainID(L0) = DiffID(L0); ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).
    """
    chains: list[str] = []
    for diff_id in diff_ids:
        _hex_of(diff_id, "diff_id")
        chains.append(_chain(chains[-1], diff_id) if chains else diff_id)
    return chains


@dataclass(frozen=True)
class StagedLayer:
    """An unpack in progress under layers/tmp-*: invisible until LayerStore.publish()."""

    chain_id: str
    parent: str | None
    diff_id: str
    tmp: Path
    whiteout_mode: WhiteoutMode
    started: float  # time.monotonic(), for the log line

    @property
    def diff(self) -> Path:
        return self.tmp / "diff"


@dataclass(frozen=True)
class _Measured:
    """A published layer's usage, as tree_usage found it once."""

    identity: tuple[int, int]  # its directory's (st_ino, st_ctime_ns): a layer removed and unpacked again differs
    used: int
    inodes: int


class _ChainLock:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0


class LayerStore:
    def __init__(self, root: Path, driver: Driver = "overlay", copy_timeout: float = 1800.0) -> None:
        if driver not in ("overlay", "vfs"):
            raise ValueError(f"storage driver must be 'overlay' or 'vfs', not {driver!r}")
        self.root = root
        self.dir = root / "layers"
        self.driver = driver
        self.copy_timeout = copy_timeout  # vfs: copying a parent layer
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._guard = threading.Lock()
        self._locks: dict[str, _ChainLock] = {}
        self._measured: dict[str, _Measured] = {}  # by the layer directory's name

    def path(self, chain_id: str) -> Path:
        """The diff directory of a chain ID (whether or not it exists)."""
        return self.dir / _hex_of(chain_id, "chain_id") / "diff"

    def exists(self, chain_id: str) -> bool:
        return self._info(chain_id) is not None

    def info(self, chain_id: str) -> LayerInfo | None:
        """The layer if it is in the store (cached=True), else None."""
        return self._info(chain_id)

    def ensure(
        self, chain_id: str, parent: str | None, blob: Path, media_type: str, expected_diff_id: str
    ) -> LayerInfo:
        """The layer `chain_id`, unpacked from `blob` unless already present. Blocking: run it in a thread.

        Idempotent and crash-safe; concurrent calls for one chain ID unpack it once.
        Raises UnpackError for a bad blob, a diffID that differs from the image
        config's, or a chain ID that does not follow from parent + diff ID, and
        NoSpace (naming the storage root) when the layer does not fit; either way
        nothing of the unpack is left.
        """
        _check_chain(chain_id, parent, expected_diff_id)
        with self._locked(chain_id):
            found = self._info(chain_id)
            if found is not None:
                return found
            self._discard(self.dir / _hex_of(chain_id, "chain_id"))  # a half-present layer from tampering
            with no_space_in(self.root, f"unpacking layer {chain_id}"):
                return self._unpack(chain_id, parent, blob, media_type, expected_diff_id)

    def stage(self, chain_id: str, parent: str | None, expected_diff_id: str) -> StagedLayer:
        """A temp dir to unpack the layer `chain_id` into, elsewhere (a worker process); publish() or discard() it.

        Blocking. For the vfs driver the parent must be in the store (its copy is the start).
        An unpack staged so becomes visible only through publish(), after its diffID is checked.
        """
        _check_chain(chain_id, parent, expected_diff_id)
        with self._locked(chain_id):
            if self._info(chain_id) is None:
                self._discard(self.dir / _hex_of(chain_id, "chain_id"))  # a half-present layer from tampering
        with no_space_in(self.root, f"unpacking layer {chain_id}"):
            return self._stage(chain_id, parent, expected_diff_id)

    def publish(self, staged: StagedLayer, result: UnpackResult) -> LayerInfo:
        """Check the unpack's diffID and move it into place atomically; UnpackError (and nothing left) if it differs."""
        with self._locked(staged.chain_id), no_space_in(self.root, f"unpacking layer {staged.chain_id}"):
            return self._publish_staged(staged, result)

    def discard(self, staged: StagedLayer) -> None:
        """Remove a staged unpack that will not be published (a failed or cancelled pull). Blocking."""
        _rmtree(staged.tmp)

    def lower_dirs(self, chain_ids: Sequence[str]) -> list[Path]:
        """The diff dirs of a chain given base layer first, returned topmost first (overlay's lowerdir order).

        overlay's mount data is limited to one page (4096 bytes), so a long
        chain does not fit in one lowerdir option; the mounter must handle that.
        """
        paths = []
        for chain_id in chain_ids:
            path = self.path(chain_id)
            if not path.is_dir():
                raise LayerNotFound(f"layer {chain_id} is not in the store")
            paths.append(path)
        return paths[::-1]

    def remove(self, chain_id: str) -> bool:
        """Remove a layer; False if it was not there. Callers make sure no image or container still uses it."""
        with self._locked(chain_id):
            return self._discard(self.dir / _hex_of(chain_id, "chain_id"))

    def cleanup_temp(self) -> int:
        """Remove unpacks and removals a crash left behind; call at start, before any ensure()."""
        leftovers = [p for p in self.dir.iterdir() if p.name.startswith(_TEMP_PREFIX)]
        for path in leftovers:
            _rmtree(path)
        if leftovers:
            event(log, logging.INFO, "layer_temp_cleaned", count=len(leftovers))
        return len(leftovers)

    def usage(self) -> tuple[int, int]:
        """(bytes, inodes) used under layers/, as du counts them: allocated blocks, hardlinks once.

        A published layer never changes (nor shares an inode with another: cp -a copies a vfs parent), so
        each one is walked once and its figure kept while its directory is the same one. The periodic
        measure then costs a stat per layer, not one per file of every image (12k files took 40 ms of the
        daemon's CPU, 3 us each, every minute and after each pull). Unpacks and removals under way
        (tmp-*) are walked each time.
        """
        used = inodes = 0
        measured: dict[str, _Measured] = {}
        with os.scandir(self.dir) as entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed meanwhile
                used, inodes = used + st.st_blocks * 512, inodes + 1
                if not stat.S_ISDIR(st.st_mode):
                    continue
                if _HEX.fullmatch(entry.name):
                    layer = self._measure(entry, (st.st_ino, st.st_ctime_ns))
                    measured[entry.name] = layer
                    below = layer.used, layer.inodes
                else:
                    below = tree_usage(Path(entry.path))
                used, inodes = used + below[0], inodes + below[1]
        self._measured = measured  # the layers gone meanwhile are forgotten
        return used, inodes

    def _measure(self, entry: os.DirEntry[str], identity: tuple[int, int]) -> _Measured:
        known = self._measured.get(entry.name)
        if known is not None and known.identity == identity:
            return known
        return _Measured(identity, *tree_usage(Path(entry.path)))

    def list(self) -> builtins.list[str]:
        """Chain IDs of the layers present."""
        found = [p.name for p in self.dir.iterdir() if _HEX.fullmatch(p.name) and (p / _META).is_file()]
        return sorted("sha256:" + name for name in found)

    # -- internals --

    @contextmanager
    def _locked(self, chain_id: str) -> Iterator[None]:
        with self._guard:
            entry = self._locks.setdefault(chain_id, _ChainLock())
            entry.users += 1
        try:
            with entry.lock:
                yield
        finally:
            with self._guard:
                entry.users -= 1
                if entry.users == 0:
                    del self._locks[chain_id]

    def _info(self, chain_id: str) -> LayerInfo | None:
        layer_dir = self.dir / _hex_of(chain_id, "chain_id")
        try:
            meta = json.loads((layer_dir / _META).read_text())
            info = LayerInfo(chain_id, meta["diff_id"], layer_dir / "diff", int(meta["size"]), cached=True)
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError, TypeError):
            return None  # absent, or not a layer we finished writing
        return info if info.path.is_dir() else None

    def _unpack(self, chain_id: str, parent: str | None, blob: Path, media_type: str, diff_id: str) -> LayerInfo:
        staged = self._stage(chain_id, parent, diff_id)
        try:
            result = unpack_layer(blob, media_type, staged.diff, staged.whiteout_mode)
        except BaseException:
            _rmtree(staged.tmp)
            raise
        return self._publish_staged(staged, result)

    def _stage(self, chain_id: str, parent: str | None, diff_id: str) -> StagedLayer:
        start = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX, dir=self.dir))
        try:
            whiteout_mode = self._prepare(tmp / "diff", parent)
        except BaseException:
            _rmtree(tmp)
            raise
        return StagedLayer(chain_id, parent, diff_id, tmp, whiteout_mode, start)

    def _publish_staged(self, staged: StagedLayer, result: UnpackResult) -> LayerInfo:
        chain_id, diff_id, tmp = staged.chain_id, staged.diff_id, staged.tmp
        published = False
        try:
            if result.diff_id != diff_id:
                raise UnpackError(f"layer diffID mismatch: config says {diff_id}, blob gives {result.diff_id}")
            meta = {"chain_id": chain_id, "diff_id": diff_id, "parent": staged.parent, "size": result.size}
            (tmp / _META).write_text(json.dumps(meta))
            published = self._publish(tmp, chain_id)
        finally:
            if not published:
                _rmtree(tmp)
        if not published:  # another process published the same layer first
            found = self._info(chain_id)
            if found is None:
                raise UnpackError(f"layer {chain_id} vanished while being published")
            return found
        event(
            log,
            logging.INFO,
            "layer_unpacked",
            chain_id=chain_id,
            diff_id=diff_id,
            driver=self.driver,
            size=result.size,
            entries=result.entries,
            xattrs_skipped=result.xattrs_skipped or None,
            seconds=round(time.monotonic() - staged.started, 3),
        )
        if result.xattrs_skipped:
            # Not silent: a dropped security.capability, say, changes what the program may do.
            event(log, logging.WARNING, "layer_xattrs_skipped", chain_id=chain_id, count=result.xattrs_skipped)
        return LayerInfo(chain_id, diff_id, self.path(chain_id), result.size, cached=False)

    def _prepare(self, diff: Path, parent: str | None) -> WhiteoutMode:
        """Make the empty (overlay, base layer) or parent-copied (vfs) diff dir the layer is unpacked into."""
        if self.driver == "vfs" and parent is not None:
            source = self.path(parent)
            if not source.is_dir():
                raise LayerNotFound(f"parent layer {parent} is not in the store")
            # Blocking like the unpack it precedes: the caller runs both in a thread.
            try:
                copy_tree(source, diff, self.copy_timeout)
            except CopyError as exc:
                raise UnpackError(f"copying parent layer {source}: {exc}") from exc
            return "apply"
        diff.mkdir()
        os.chmod(diff, 0o755)  # not the umask's idea; the layer's root entry may change it
        return "overlay" if self.driver == "overlay" else "apply"

    def _publish(self, tmp: Path, chain_id: str) -> bool:
        """Atomically move a finished unpack into place; False if another process got there first."""
        try:
            os.rename(tmp, self.dir / _hex_of(chain_id, "chain_id"))
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) and self._info(chain_id) is not None:
                return False
            raise
        return True

    def _discard(self, layer_dir: Path) -> bool:
        # Rename first: the layer vanishes atomically and a crash mid-delete leaves only a tmp-* dir.
        doomed = self.dir / f"{_TEMP_PREFIX}rm-{os.urandom(8).hex()}"
        try:
            os.rename(layer_dir, doomed)
        except FileNotFoundError:
            return False
        _rmtree(doomed)
        return True


def tree_usage(top: Path) -> tuple[int, int]:
    """(bytes, inodes) used under top, as du -x counts them: allocated blocks, hardlinks once, one filesystem.

    Staying on one filesystem matters: a container's merged rootfs is an overlay mount below `top`
    that would count its whole image again.
    """
    used = inodes = 0
    seen: set[tuple[int, int]] = set()
    try:
        device = os.stat(top).st_dev
    except FileNotFoundError:
        return 0, 0
    pending = [str(top)]
    while pending:
        try:
            entries = list(os.scandir(pending.pop()))
        except FileNotFoundError:
            continue  # removed while we walk
        for entry in entries:
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if st.st_dev != device:
                continue  # a mount point: another filesystem
            if st.st_nlink > 1 and not stat.S_ISDIR(st.st_mode):
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
            used += st.st_blocks * 512
            inodes += 1
            if stat.S_ISDIR(st.st_mode):
                pending.append(entry.path)
    return used, inodes


def _check_chain(chain_id: str, parent: str | None, diff_id: str) -> None:
    _hex_of(chain_id, "chain_id")
    _hex_of(diff_id, "diff_id")
    expected = diff_id if parent is None else _chain(parent, diff_id)
    if chain_id != expected:
        raise UnpackError(f"chain ID {chain_id} does not follow from parent {parent} and diff ID {diff_id}")


class CopyError(Exception):
    """cp failed or timed out; the message says which, with cp's stderr."""


def copy_tree(source: Path, dest: Path, timeout: float) -> None:
    """Copy `source` to `dest` (which must not exist) with everything a layer holds. Blocking: run it in a thread.

    cp -a keeps hardlinks, owners, modes, times, xattrs and device nodes; reflinks make it cheap where the
    file system can. A full destination raises OSError(ENOSPC), any other failure CopyError.
    """
    argv = ["cp", "-a", "--reflink=auto", "--", str(source), str(dest)]
    try:
        with affinity.unbound():  # called in a bound offload thread: cp must not inherit its CPU
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise CopyError(f"timed out after {timeout:g}s") from None
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace").strip()
        if os.strerror(errno.ENOSPC) in stderr:  # cp's message for ENOSPC: a full disk, not a bad layer
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (cp: {stderr})", str(dest))
        raise CopyError(f"cp exited with status {done.returncode}: {stderr}")


def _rmtree(path: Path) -> None:
    """Remove a tree we own, even one holding read-only directories (which stop a non-root unlink)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except PermissionError:
        _make_dirs_writable(path)
        shutil.rmtree(path)


def _make_dirs_writable(top: Path) -> None:
    pending = [str(top)]
    while pending:
        path = pending.pop()
        try:
            os.chmod(path, stat.S_IMODE(os.lstat(path).st_mode) | stat.S_IRWXU)
            with os.scandir(path) as it:
                pending.extend(e.path for e in it if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            continue
