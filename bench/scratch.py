"""A fresh ext4 file system for a benchmark's roots: the same for every runtime, and as a node has one.

This VM's root file system is ext4 *without* a journal. There each new inode costs a scan of the recently
freed inodes of its block group (fs/ext4/ialloc.c: find_inode_bit and recently_deleted, skipped when the
file system has a journal), and how long the scan is depends on which block groups a run's directories
land in: 12k files took 0.12 to 0.72 s of kernel time by directory, and the same pull moved by +-30% from
one run to the next. A node's /var/lib is a journaled file system. So the benchmarks put their roots on
an ext4 made for the run with mkfs.ext4's defaults (a journal included), loop-mounted with direct I/O
from a sparse file in /var/tmp (writes still reach this disk), removed again at the end.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

SIZE = 32 << 30  # sparse: only what the runs write takes disk space
_TIMEOUT = 300


def run(*argv: str) -> str:
    """A command's stdout; CalledProcessError (with its stderr) when it fails."""
    return subprocess.run(argv, check=True, capture_output=True, text=True, timeout=_TIMEOUT).stdout.strip()


@contextmanager
def scratch_filesystem() -> Iterator[Path]:
    """A fresh ext4 (journal included), mounted at the path yielded; unmounted and its file removed after."""
    fd, name = tempfile.mkstemp(prefix="criopy-bench-", suffix=".ext4", dir="/var/tmp")
    image = Path(name)
    try:
        os.ftruncate(fd, SIZE)
        os.close(fd)
        loop = run("losetup", "--find", "--show", "--direct-io=on", str(image))
        try:
            run("mkfs.ext4", "-q", loop)
            mount = Path(tempfile.mkdtemp(prefix="criopy-bench-"))
            run("mount", loop, str(mount))
            try:
                yield mount
            finally:
                _unmount(mount)
        finally:
            run("losetup", "--detach", loop)  # a device still busy goes when its last user does
    finally:
        image.unlink()


@contextmanager
def roots_in(given: Path | None) -> Iterator[Path]:
    """`given` as it is, or a fresh scratch file system when None."""
    if given is not None:
        yield given
        return
    with scratch_filesystem() as mount:
        yield mount


def filesystem_of(path: Path) -> str:
    """Which device and file system type `path` is on, for the report."""
    return run("findmnt", "--noheadings", "--output", "SOURCE,FSTYPE", "--target", str(path))


def _unmount(mount: Path) -> None:
    try:
        run("umount", str(mount))
    except subprocess.CalledProcessError:  # something under it still mounted or open: detached now, freed later
        run("umount", "--lazy", str(mount))
    mount.rmdir()
