"""A pod's namespace pins against the real kernel (root): made, seen pinned, released."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from podsandbox import namespaces

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="unshare and bind mounts need root (CI runs as root)"),
    pytest.mark.root,
]


def test_a_pin_is_pinned_until_released(tmp_path: Path) -> None:
    pins = {kind: str(tmp_path / "ns" / kind / "pod") for kind in ("net", "uts", "ipc")}
    try:
        asyncio.run(namespaces.create(pins, "pins-test", {}))
        assert all(namespaces.is_pinned(path) for path in pins.values())
        # The pin file under the mount is an empty file of the directory's file system, not the namespace.
        assert os.stat(pins["net"]).st_ino != os.stat(tmp_path / "ns" / "net").st_ino

        namespaces.release(pins["net"])
        assert not namespaces.is_pinned(pins["net"])
        assert namespaces.is_pinned(pins["uts"])

        # The file left behind without its mount (as after a reboot wiped the mounts) is not a pin.
        Path(pins["net"]).touch()
        assert not namespaces.is_pinned(pins["net"])
        assert not namespaces.is_pinned(str(tmp_path / "ns" / "net" / "other-pod"))
        assert not namespaces.is_pinned(str(tmp_path / "gone" / "pod"))
    finally:
        namespaces.release_all(pins.values())
    assert not any(namespaces.is_pinned(path) for path in pins.values())
