"""Watching conmon's exit directory: one inotify watch for every container of the daemon.

conmon writes `<exit dir>/<container id>` holding the exit code once the
container's init process is gone. The watcher reports each new file at once
(no polling), and `scan()` reports the ones that appeared while nobody watched
(a daemon restart).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable

from cri.log import event
from cri.system import linux

log = logging.getLogger(__name__)

ExitCallback = Callable[[str], None]


class ExitWatcher:
    def __init__(self, directory: str, on_exit: ExitCallback) -> None:
        self.directory = directory
        self._on_exit = on_exit
        self._fd = -1

    def start(self) -> None:
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        self._fd = linux.inotify_watch(self.directory, linux.IN_CLOSE_WRITE | linux.IN_MOVED_TO)
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def scan(self) -> list[str]:
        """Container IDs with an exit file now (read at start, after the watch is in place)."""
        try:
            return [name for name in os.listdir(self.directory) if not name.startswith(".")]
        except FileNotFoundError:
            return []

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        for name in linux.inotify_names(data):
            if not name or name.startswith("."):
                continue  # conmon's temporary file before the rename
            try:
                self._on_exit(name)
            except Exception as exc:  # one bad record must not stop the watch for every other container
                event(log, logging.ERROR, "handling a container exit failed", id=name, error=str(exc))


def remove(directory: str, container_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(directory, container_id))
