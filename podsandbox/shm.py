"""The per-pod /dev/shm: a size-limited tmpfs that every container of the pod mounts."""

from __future__ import annotations

import os

from cri.system import linux


def mount(path: str, size: int, owner: tuple[int, int] | None = None) -> None:
    """owner: the host (uid, gid) of the tmpfs root, the pod's root in its user namespace; None: root."""
    os.makedirs(path, mode=0o755, exist_ok=True)
    options = f"mode=1777,size={size}" + (f",uid={owner[0]},gid={owner[1]}" if owner else "")
    linux.mount("shm", path, "tmpfs", linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC, options)


def unmount(path: str) -> None:
    """Idempotent: an unmounted or missing path is fine."""
    linux.umount_if_mounted(path)
