"""One daemon per root: an exclusive flock on <root>/criopy.lock, held for the daemon's life."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = "criopy.lock"


class AlreadyRunning(Exception):
    pass


class DaemonLock:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    @classmethod
    def acquire(cls, root: str) -> DaemonLock:
        os.makedirs(root, mode=0o711, exist_ok=True)
        path = Path(root) / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunning(
                f"another criopy daemon (pid {holder}) is using root {root}: lock {path} is held"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def release(self) -> None:
        os.close(self._fd)


def is_held(root: str) -> bool:
    """Whether a daemon currently holds the lock of `root`."""
    path = Path(root) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
