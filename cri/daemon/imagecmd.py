"""`criopy images import FILE|-` and `criopy images export REF... -o FILE|-`.

One writer on the store: when a daemon holds the root's lock, the request goes
to it through the admin socket (cri.daemon.admin); otherwise this process
takes the lock itself for the time of the command and runs the same code on
the store directly (a daemon started meanwhile waits for nothing: it fails to
take the lock and says so, as with two daemons).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cri import log
from cri.config import Config
from cri.containers import container as rows
from cri.daemon import admin
from cri.daemon.lock import AlreadyRunning, DaemonLock
from cri.errors import CriError
from cri.images.archive import ArchiveError
from cri.images.imports import ImageSummary
from cri.images.manager import ImageManager
from cri.state import Store
from cri.state.store import StateError
from cri.system import offload

DAEMON_STARTUP_WAIT = 15.0  # a daemon holding the lock but not yet listening on its admin socket


class ImageCommandError(Exception):
    pass


def import_images(config: Config, source: str) -> list[ImageSummary]:
    """Import the archive at path `source`, or from standard input for "-"."""
    if source == "-":
        if sys.stdin.isatty():
            raise ImageCommandError("refusing to read an image archive from a terminal: pipe one in or name a file")
        return _execute(config, {"op": "import"}, sys.stdin.fileno())
    if os.path.isdir(source):
        raise ImageCommandError(f"{source} is a directory: import takes an archive (tar it, e.g. tar -C DIR -cf - .)")
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageCommandError(f"cannot open {source}: {exc.strerror}") from exc
    try:
        return _execute(config, {"op": "import"}, fd)
    finally:
        os.close(fd)


def export_images(config: Config, refs: list[str], output: str) -> list[ImageSummary]:
    """Write `refs` to the file `output` (made whole or not at all), or to standard output for "-"."""
    message = {"op": "export", "refs": refs}
    if output == "-":
        if sys.stdout.isatty():
            raise ImageCommandError("refusing to write an image archive to a terminal: redirect it or use -o FILE")
        sys.stdout.flush()
        return _execute(config, message, sys.stdout.fileno())
    target = Path(output)
    if target.exists() and not target.is_file():
        # A FIFO or a device (/dev/stdout, /dev/null), maybe through a symlink: written in place. Renaming a
        # temp file over it would replace the node itself (and make /dev/null a regular file).
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageCommandError(f"cannot write {target}: {exc.strerror}") from exc
        try:
            return _execute(config, message, fd)
        finally:
            os.close(fd)
    with _replacing(target.resolve()) as fd:  # through a symlink to a file: the file is replaced, the link kept
        return _execute(config, message, fd)


@contextlib.contextmanager
def _replacing(target: Path) -> Iterator[int]:
    """A temp file beside `target`, renamed over it only when the body succeeds."""
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent or Path("."))
    except OSError as exc:
        raise ImageCommandError(f"cannot write {target}: {exc.strerror}") from exc
    try:
        yield fd
        os.fsync(fd)
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)


def _execute(config: Config, message: dict[str, Any], fd: int) -> list[ImageSummary]:
    try:
        lock = DaemonLock.acquire(config.root)
    except AlreadyRunning:
        path = admin.socket_path(config.runroot)
        return admin.connect_when_ready(path, lambda: admin.request(path, message, fd), DAEMON_STARTUP_WAIT)
    # Only errors: the command reports its outcome itself, and a user's terminal is no daemon log.
    log.setup("error", config.log.format)
    try:
        return asyncio.run(_locally(config, message, fd))
    finally:
        lock.release()


async def _locally(config: Config, message: dict[str, Any], fd: int) -> list[ImageSummary]:
    """The request run on the store by this process, which holds the daemon lock."""
    try:
        store = await offload.to_thread(Store.open, config.root)
    except StateError as exc:
        raise ImageCommandError(f"cannot open the state in {config.root}: {exc}") from exc
    used = await offload.to_thread(_images_in_use, store)
    images = ImageManager(config, store, in_use=used.__contains__)
    try:
        # Also frees what a crashed import left: this process is the only writer now.
        await offload.to_thread(images._recover)
        if message["op"] == "import":
            return await admin.run_import(images, fd, images.content.ingest_dir)
        refs = message["refs"]
        assert isinstance(refs, list)
        return await admin.run_export(images, [str(r) for r in refs], fd)
    finally:
        await images.close()
        store.close()


def _images_in_use(store: Store) -> set[str]:
    """The images the store's containers run or mount as volumes: their layers are under those rootfs mounts."""
    with store.transaction() as conn:
        containers = rows.load_all(conn)
    return {image_id for c in containers for image_id in (c.image_id, *c.volume_images)}


FAILURES = (ImageCommandError, admin.AdminError, ArchiveError, CriError, OSError)
