"""The per-pod /dev/shm: a size-limited tmpfs that every container of the pod mounts."""

from __future__ import annotations

import os

from cri.system import linux


def mount(path: str, size: int) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    linux.mount("shm", path, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, f"mode=1777,size={size}")


def unmount(path: str) -> None:
    """Idempotent: an unmounted or missing path is fine."""
    linux.umount_if_mounted(path)
