"""Layer extraction as root: owners, device nodes, capabilities, overlay whiteouts and a real overlay mount."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest

from cri.storage.layers import LayerStore, chain_ids
from cri.storage.unpack import unpack_layer
from cri.system import linux
from tests.support.layer_tar import Entry, build_layer, directory, file, hardlink, opaque, symlink, whiteout

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="owners, device nodes, trusted.* xattrs and mounts need root"),
]

# struct vfs_cap_data, revision 2, effective flag set, permitted = CAP_NET_BIND_SERVICE (10).
NET_BIND_CAP = struct.pack("<IIIII", 0x02000001, 1 << 10, 0, 0, 0)


def unpack(tmp_path: Path, entries: list[Entry], name: str = "rootfs") -> Path:
    layer = build_layer(entries)
    blob = tmp_path / f"{name}.blob"
    blob.write_bytes(layer.blob)
    dest = tmp_path / name
    dest.mkdir()
    result = unpack_layer(blob, layer.media_type, dest)
    assert result.diff_id == layer.diff_id
    assert result.xattrs_skipped == 0
    return dest


def snapshot(root: Path) -> dict[str, tuple[str, int, int, int, bytes]]:
    """relative path -> (kind, mode bits, uid, gid, content or link target): what `ls -lR` and `cat` show."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            kind = {stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFREG: "file"}.get(stat.S_IFMT(st.st_mode))
            data = path.read_bytes() if kind == "file" else os.readlink(path).encode() if kind == "symlink" else b""
            out[str(path.relative_to(root))] = (kind or "other", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, data)
    return out


def test_owners_modes_devices_and_capabilities(tmp_path):
    entries = [
        directory("home/user", 0o750, uid=1000, gid=1000),
        file("home/user/notes", b"x", 0o640, uid=1000, gid=1000),
        file("bin/setuid-user", b"", 0o4755, uid=1000, gid=1000),  # chown clears setuid: chmod must come after
        directory("shared", 0o2775, gid=50),
        directory("scratch", 0o1777),
        file("target", b"t", uid=7, gid=7),
        symlink("link", "target", uid=42, gid=43),
        Entry("dev/null", "char", mode=0o666, devmajor=1, devminor=3),
        Entry("dev/loop0", "block", mode=0o660, gid=6, devmajor=7, devminor=0),
        Entry("pipe", "fifo", mode=0o620, uid=5, gid=5),
        file(
            "bin/ping",
            b"\x7fELF",
            0o755,
            xattrs={"security.capability": NET_BIND_CAP, "trusted.criopy": b"t", "user.criopy": b"u"},
        ),
        hardlink("bin/ping6", "bin/ping"),
    ]
    dest = unpack(tmp_path, entries)

    notes = (dest / "home/user/notes").stat()
    assert (notes.st_uid, notes.st_gid, stat.S_IMODE(notes.st_mode)) == (1000, 1000, 0o640)
    assert (dest / "home/user").stat().st_uid == 1000
    setuid = (dest / "bin/setuid-user").stat()
    assert (setuid.st_uid, stat.S_IMODE(setuid.st_mode)) == (1000, 0o4755)
    shared = (dest / "shared").stat()
    assert (shared.st_gid, stat.S_IMODE(shared.st_mode)) == (50, 0o2775)
    assert stat.S_IMODE((dest / "scratch").stat().st_mode) == 0o1777

    # lchown: the symlink has its own owner and the target keeps its.
    assert ((dest / "link").lstat().st_uid, (dest / "link").lstat().st_gid) == (42, 43)
    assert (dest / "target").stat().st_uid == 7

    null = (dest / "dev/null").lstat()
    assert stat.S_ISCHR(null.st_mode) and (os.major(null.st_rdev), os.minor(null.st_rdev)) == (1, 3)
    assert stat.S_IMODE(null.st_mode) == 0o666
    loop = (dest / "dev/loop0").lstat()
    assert stat.S_ISBLK(loop.st_mode) and (os.major(loop.st_rdev), loop.st_gid) == (7, 6)
    pipe = (dest / "pipe").lstat()
    assert stat.S_ISFIFO(pipe.st_mode) and (pipe.st_uid, stat.S_IMODE(pipe.st_mode)) == (5, 0o620)

    assert os.getxattr(dest / "bin/ping", "security.capability") == NET_BIND_CAP
    assert os.getxattr(dest / "bin/ping", "trusted.criopy") == b"t"
    assert os.getxattr(dest / "bin/ping", "user.criopy") == b"u"
    assert (dest / "bin/ping6").stat().st_ino == (dest / "bin/ping").stat().st_ino


def test_overlay_whiteouts_are_0_0_char_devices_and_opaque_is_an_xattr(tmp_path):
    dest = unpack(tmp_path, [whiteout("gone"), whiteout("dir/sub"), directory("opq"), opaque("opq"), file("opq/new")])
    for name in ("gone", "dir/sub"):
        st = (dest / name).lstat()
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0), name
    assert os.getxattr(dest / "opq", "trusted.overlay.opaque") == b"y"
    assert (dest / "opq/new").exists()
    assert not any(n.startswith(".wh.") for _, dirs, files in os.walk(dest) for n in dirs + files)


LAYERS = [
    [
        directory("etc"),
        file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n"),
        file("gone", b"from layer 1"),
        directory("gonedir"),
        file("gonedir/inner", b"1"),
        directory("opq"),
        file("opq/old", b"1"),
        directory("opq/sub"),
        file("opq/sub/deep", b"1"),
        directory("keep"),
        file("keep/a", b"a"),
        file("keep/owned", b"o", uid=1000, gid=1000),
    ],
    [
        whiteout("gone"),
        whiteout("gonedir"),
        directory("opq"),
        opaque("opq"),
        file("opq/new", b"2"),
        directory("keep"),
        file("keep/b", b"b"),
    ],
    [
        file("gone", b"back in layer 3"),
        directory("keep"),
        whiteout("keep/a"),
    ],
]

VISIBLE = {
    "etc": "dir",
    "etc/passwd": "file",
    "gone": "file",
    "keep": "dir",
    "keep/b": "file",
    "keep/owned": "file",
    "opq": "dir",
    "opq/new": "file",
}


def ensure_chain(store: LayerStore, tmp_path: Path) -> list[str]:
    built = [build_layer(entries) for entries in LAYERS]
    chain = chain_ids([layer.diff_id for layer in built])
    parent = None
    for chain_id, layer in zip(chain, built, strict=True):
        blob = tmp_path / f"{layer.digest[7:]}.blob"
        blob.write_bytes(layer.blob)
        assert not store.ensure(chain_id, parent, blob, layer.media_type, layer.diff_id).cached
        parent = chain_id
    return chain


def test_overlay_mount_of_a_layer_chain_hides_whited_out_files_and_matches_vfs(tmp_path):
    overlay_store = LayerStore(tmp_path / "overlay-root", "overlay")
    chain = ensure_chain(overlay_store, tmp_path)
    layer2 = overlay_store.path(chain[1])
    assert stat.S_ISCHR((layer2 / "gone").lstat().st_mode)
    assert os.getxattr(layer2 / "opq", "trusted.overlay.opaque") == b"y"

    merged = tmp_path / "merged"
    merged.mkdir()
    lowers = overlay_store.lower_dirs(chain)
    assert lowers[0] == overlay_store.path(chain[2])
    # No upperdir: a read-only overlay of the lower layers alone, as a container image would look.
    linux.mount("overlay", str(merged), "overlay", 0, "lowerdir=" + ":".join(map(str, lowers)))
    try:
        view = snapshot(merged)
        assert {path: entry[0] for path, entry in view.items()} == VISIBLE
        assert (merged / "gone").read_bytes() == b"back in layer 3"
        assert sorted(os.listdir(merged / "opq")) == ["new"]  # opaque: layer 1's old and sub are hidden
        assert view["keep/owned"][2:4] == (1000, 1000)

        vfs_store = LayerStore(tmp_path / "vfs-root", "vfs")
        assert ensure_chain(vfs_store, tmp_path) == chain
        assert snapshot(vfs_store.path(chain[-1])) == view
    finally:
        for m in linux.mounts_under(str(tmp_path)):
            linux.umount(m.mount_point, linux.MNT_DETACH)
    assert linux.mounts_under(str(tmp_path)) == []
