"""`criopy wipe`: remove every trace of the daemon's state and storage."""

from __future__ import annotations

import logging
import os
import shutil

from cri.config import Config
from cri.daemon.lock import is_held
from cri.log import event
from cri.system import linux

log = logging.getLogger(__name__)


class WipeRefused(Exception):
    pass


def wipe(config: Config) -> list[str]:
    """Unmount whatever criopy left mounted under root and runroot, then delete both. Returns what was removed."""
    if is_held(config.root):
        raise WipeRefused(f"a criopy daemon is running on root {config.root}; stop it first")
    directories = [d for d in (config.runroot, config.root) if os.path.lexists(d)]
    for directory in directories:
        if os.path.realpath(directory).count("/") < 2:
            # A root of "/" or "/var" is a configuration mistake, never something to delete.
            raise WipeRefused(f"refusing to delete top-level directory {directory}")
    removed = []
    for directory in directories:
        for entry in linux.mounts_under(directory):
            linux.umount(entry.mount_point, linux.MNT_DETACH)
            event(log, logging.INFO, "unmounted", path=entry.mount_point)
        shutil.rmtree(directory)
        removed.append(directory)
        event(log, logging.INFO, "removed", path=directory)
    return removed
