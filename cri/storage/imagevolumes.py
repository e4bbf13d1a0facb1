"""Image volumes (KEP-4639): an image's layers mounted read-only, once per image, shared by its containers.

    <root>/image-volumes/<image id hex>/merged    the read-only mount (see rootfs.mount_read_only)
    <root>/image-volumes/<image id hex>/l/<n>     short links for long layer chains, as for containers

Each container bind-mounts merged/ (or a sub path of it) into itself. The mount is made with the first
container that asks and unmounted with the last one that lets go; the holders are the container IDs,
recorded with each container's row, so a restarted daemon rebuilds the counts (recover) and unmounts
whatever no recorded container holds. The orphan sweep (cri/state/orphans.py) does not look here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path

from cri.log import event
from cri.storage import rootfs
from cri.system import linux

log = logging.getLogger(__name__)


class SubPathError(ValueError):
    """An image_sub_path the image cannot serve; the message says why."""


def check_sub_path(sub_path: str) -> None:
    """What can be refused before anything is mounted: absolute paths and `..` components."""
    if os.path.isabs(sub_path):
        raise SubPathError(f"{sub_path!r} must be relative to the image's root")
    if ".." in sub_path.split("/"):
        raise SubPathError(f"{sub_path!r} must not contain '..'")


def resolve_sub_path(root: Path, sub_path: str) -> Path:
    """root/sub_path with symlinks resolved, which must stay inside root and be a directory."""
    check_sub_path(sub_path)
    top = os.path.realpath(root)
    # The image is mounted read-only, so what realpath sees cannot change before the bind mount.
    found = os.path.realpath(os.path.join(top, sub_path))
    if os.path.commonpath([top, found]) != top:
        raise SubPathError(f"{sub_path!r} leads outside the image (a symlink to {found})")
    if not os.path.lexists(found):
        raise SubPathError(f"{sub_path!r} does not exist in the image")
    if not os.path.isdir(found):
        raise SubPathError(f"{sub_path!r} is not a directory in the image")
    return Path(found)


class ImageVolumes:
    """The reference-counted read-only image mounts under one directory. Blocking methods: run them in threads."""

    def __init__(self, top: Path) -> None:
        self.top = top
        self._holders: dict[str, set[str]] = {}  # image ID -> container IDs
        # Held is not mounted after a reboot: the exited containers of before still hold their images.
        self._mounted: set[str] = set()
        self._lock = threading.Lock()  # creations and removals run in worker threads concurrently

    def dir_of(self, image_id: str) -> Path:
        return self.top / image_id.removeprefix("sha256:")

    def holds(self, image_id: str) -> bool:
        return bool(self._holders.get(image_id))

    def acquire(self, image_id: str, lower_dirs: Sequence[Path], holder: str) -> Path:
        """The image's merged/ mount, made now if no one holds it yet; `holder` holds it until release_all."""
        with self._lock:
            if image_id not in self._mounted:
                self._mount(image_id, lower_dirs)
                self._mounted.add(image_id)
            self._holders.setdefault(image_id, set()).add(holder)
            return self._merged(image_id)

    def release_all(self, holder: str) -> None:
        """Let go of every image `holder` holds; the last holder unmounts it. Idempotent."""
        with self._lock:
            for image_id in [i for i, held in self._holders.items() if holder in held]:
                self._holders[image_id].discard(holder)
                if not self._holders[image_id]:
                    del self._holders[image_id]
                    self._mounted.discard(image_id)
                    self._unmount(image_id)

    def recover(self, held: Mapping[str, Sequence[str]]) -> None:
        """After a restart: `held` maps container IDs to their image IDs; what no one holds is unmounted."""
        with self._lock:
            for holder, image_ids in held.items():
                for image_id in image_ids:
                    self._holders.setdefault(image_id, set()).add(holder)
            kept = {self.dir_of(i).name for i in self._holders}
            mounted = {m.mount_point for m in linux.mounts_under(str(self.top))}
            self._mounted = {i for i in self._holders if str(self._merged(i)) in mounted}
            names = sorted(os.listdir(self.top)) if self.top.is_dir() else []
            for name in names:
                if name not in kept:
                    event(log, logging.INFO, "image volume orphan removed", dir=str(self.top / name))
                    rootfs.remove(self.top / name)

    def _merged(self, image_id: str) -> Path:
        return rootfs.RootfsPaths.of(self.dir_of(image_id)).merged

    def _mount(self, image_id: str, lower_dirs: Sequence[Path]) -> None:
        top = self.dir_of(image_id)
        rootfs.remove(top)  # what a crash or a reboot left: a dir without its mount
        top.mkdir(mode=0o700, parents=True)
        try:
            rootfs.mount_read_only(top, lower_dirs)
        except BaseException:
            rootfs.remove(top)
            raise
        event(log, logging.INFO, "image volume mounted", image_id=image_id, layers=len(lower_dirs))

    def _unmount(self, image_id: str) -> None:
        rootfs.remove(self.dir_of(image_id))
        event(log, logging.INFO, "image volume unmounted", image_id=image_id)
