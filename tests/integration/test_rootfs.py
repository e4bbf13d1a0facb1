"""Container root filesystems against the real kernel (root): overlay mounts of hand-made layers, vfs copies."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
from pathlib import Path

import pytest

from cri.storage import rootfs
from cri.system import linux

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="overlay mounts need root (CI runs as root)"),
]


@pytest.fixture(autouse=True)
def no_mounts_left(tmp_path):
    """Whatever a test does or fails to do, nothing stays mounted under its tmp_path (deepest first)."""
    yield
    for m in linux.mounts_under(str(tmp_path)):
        linux.umount(m.mount_point, linux.MNT_DETACH)


def make_layers(tmp_path: Path, count: int, name: str = "layers") -> list[Path]:
    """`count` layer diff dirs laid out like the layer store's, returned topmost first (lowerdir order).

    Layer i holds its own file `f<i>` and its own version of the shared file `who`.
    """
    layers = []
    for i in range(count):
        diff = tmp_path / name / hashlib.sha256(f"{name} {i}".encode()).hexdigest() / "diff"
        diff.mkdir(parents=True)
        (diff / f"f{i}").write_text(f"from layer {i}\n")
        (diff / "who").write_text(f"layer {i}\n")
        layers.append(diff)
    return layers[::-1]


def mount_points(under: Path) -> list[str]:
    return [m.mount_point for m in linux.mounts_under(str(under))]  # read from /proc/self/mountinfo


def test_overlay_shows_lower_files_topmost_wins_and_writes_land_in_upper(tmp_path):
    lowers = make_layers(tmp_path, 3)
    container = tmp_path / "containers" / "c1"
    merged = rootfs.create(container, lowers, "overlay")

    assert merged == container / "merged"
    assert rootfs.is_mounted(container)
    assert [(m.mount_point, m.fstype) for m in linux.mounts_under(str(container))] == [(str(merged), "overlay")]
    assert [(merged / f"f{i}").read_text() for i in range(3)] == [f"from layer {i}\n" for i in range(3)]
    assert (merged / "who").read_text() == "layer 2\n"

    (merged / "new").write_text("written\n")
    (merged / "f0").write_text("changed\n")
    assert (container / "upper" / "new").read_text() == "written\n"
    assert (container / "upper" / "f0").read_text() == "changed\n"
    assert (lowers[-1] / "f0").read_text() == "from layer 0\n"
    assert not (lowers[0] / "new").exists()


def mount_table_line(mount_point: Path) -> str:
    escaped = str(mount_point).replace(" ", "\\040")
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return next(line for line in lines if line.split(" ")[4] == escaped)


@pytest.mark.parametrize("count", [1, 3])
def test_the_mount_table_entry_names_the_dirs_relative_to_the_container_dir(tmp_path, count):
    # Every reader of /proc/self/mountinfo (runc at each step) pays for each character of every entry.
    lowers = make_layers(tmp_path, count)
    container = tmp_path / "containers" / ("c" * 64)
    merged = rootfs.create(container, lowers, "overlay")

    line = mount_table_line(merged)
    lowerdir = ":".join(f"l/{n}" for n in range(count))
    assert f",lowerdir={lowerdir},upperdir=upper,workdir=work" in line
    assert str(tmp_path) not in line.split(" - ")[1], "no absolute path in the options"
    assert [os.readlink(container / "l" / str(n)) for n in range(count)] == [str(p) for p in lowers]
    assert os.getcwd() != str(container), "the daemon's cwd did not move"
    rootfs.remove(container)


def test_root_dir_shows_owner_and_mode_of_the_image_root(tmp_path):
    lowers = make_layers(tmp_path, 2)
    os.chown(lowers[0], 12, 34)
    os.chmod(lowers[0], 0o751)
    merged = rootfs.create(tmp_path / "c", lowers, "overlay")
    st = merged.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (12, 34, 0o751)


def test_remove_unmounts_deletes_and_can_run_twice(tmp_path):
    lowers = make_layers(tmp_path, 2)
    container = tmp_path / "c"
    rootfs.create(container, lowers, "overlay")
    (container / "merged" / "scratch").write_text("x")

    rootfs.remove(container)
    assert mount_points(tmp_path) == []
    assert not container.exists()
    assert not rootfs.is_mounted(container)
    rootfs.remove(container)
    rootfs.remove(tmp_path / "never-made")
    assert sorted(p.name for p in lowers[0].iterdir()) == ["f1", "who"], "the layer is untouched"


@pytest.mark.parametrize("count", [65, 130])
def test_long_chain_mounts_through_short_relative_links(tmp_path, count):
    lowers = make_layers(tmp_path, count)
    absolute = ":".join(map(str, lowers))
    assert len(absolute) > os.sysconf("SC_PAGESIZE"), "the chain must not fit in one page as absolute paths"
    container = tmp_path / "containers" / ("c" * 64)
    merged = rootfs.create(container, lowers, "overlay")

    assert rootfs.is_mounted(container)
    assert os.readlink(container / "l" / "0") == str(lowers[0])
    missing = [i for i in range(count) if (merged / f"f{i}").read_text() != f"from layer {i}\n"]
    assert missing == []
    assert (merged / "who").read_text() == f"layer {count - 1}\n"
    (merged / "new").write_text("w")
    assert (container / "upper" / "new").read_text() == "w"

    rootfs.remove(container)
    assert mount_points(tmp_path) == []
    assert not container.exists()
    assert all(lower.is_dir() and (lower / "who").is_file() for lower in lowers), "rmtree followed a link"


def test_paths_with_overlay_separators_are_escaped(tmp_path):
    lowers = make_layers(tmp_path, 3, name="lay,ers:x")
    merged = rootfs.create(tmp_path / "c,1:2", lowers, "overlay")
    assert (merged / "who").read_text() == "layer 2\n"
    assert (merged / "f0").is_file()
    (merged / "new").write_text("w")
    assert (tmp_path / "c,1:2" / "upper" / "new").is_file()


def test_usage_counts_the_writable_layer_only(tmp_path):
    lowers = make_layers(tmp_path, 2)
    (lowers[0] / "big-in-image").write_bytes(b"i" * (4 << 20))
    container = tmp_path / "c"
    merged = rootfs.create(container, lowers, "overlay")
    before_bytes, before_inodes = rootfs.usage(container)
    (merged / "big").write_bytes(os.urandom(1 << 20))
    after_bytes, after_inodes = rootfs.usage(container)
    assert before_bytes < 1 << 20, "the image's own files are not the container's usage"
    assert after_bytes - before_bytes >= 1 << 20
    assert after_inodes == before_inodes + 1


def test_vfs_copies_the_topmost_layer_and_remove_deletes_it(tmp_path):
    # With the vfs layer store the topmost diff is the whole image: here it holds every file itself.
    lowers = make_layers(tmp_path, 2)
    (lowers[0] / "f0").write_text("from layer 0\n")
    container = tmp_path / "c"
    merged = rootfs.create(container, lowers, "vfs")

    assert not rootfs.is_mounted(container)
    assert mount_points(tmp_path) == []
    assert (merged / "who").read_text() == "layer 1\n"
    assert (merged / "f0").read_text() == "from layer 0\n"
    (merged / "who").write_text("mine\n")
    assert (lowers[0] / "who").read_text() == "layer 1\n"
    bytes_used, inodes = rootfs.usage(container)
    assert bytes_used > 0 and inodes == 3

    rootfs.remove(container)
    assert not container.exists()
    assert (lowers[0] / "who").is_file()


@pytest.mark.parametrize("driver", ["overlay", "vfs"])
def test_image_without_layers_gets_an_empty_writable_root(tmp_path, driver):
    container = tmp_path / "c"
    merged = rootfs.create(container, [], driver)
    assert list(merged.iterdir()) == []
    assert merged.stat().st_mode & 0o777 == 0o755
    (merged / "new").write_text("w")
    assert rootfs.is_mounted(container) == (driver == "overlay")
    rootfs.remove(container)
    assert not container.exists()


@pytest.mark.parametrize("driver", ["overlay", "vfs"])
def test_missing_lower_dir_fails_before_anything_is_made(tmp_path, driver):
    lowers = make_layers(tmp_path, 3)
    gone = lowers[0] if driver == "vfs" else lowers[1]
    gone.rename(gone.with_name("moved"))
    container = tmp_path / "c"
    with pytest.raises(rootfs.RootfsError, match=str(gone)):
        rootfs.create(container, lowers, driver)
    assert not container.exists()
    assert mount_points(tmp_path) == []


@pytest.mark.parametrize("count", [3, 65], ids=["short-chain", "long-chain"])
def test_kernel_refusing_the_mount_leaves_no_mount_and_no_dir(tmp_path, monkeypatch, count):
    # Skip the up-front check so that the kernel itself meets the missing layer.
    lowers = make_layers(tmp_path, count)
    lowers[1].rename(lowers[1].with_name("moved"))
    monkeypatch.setattr(rootfs, "_check_lowers", lambda lowers: None)
    container = tmp_path / "c"
    with pytest.raises(rootfs.RootfsError, match="No such file or directory"):
        rootfs.create(container, lowers, "overlay")
    assert not container.exists()
    assert mount_points(tmp_path) == []


def test_too_many_layers_are_refused(tmp_path):
    lowers = [tmp_path / str(i) for i in range(rootfs.MAX_LOWER_DIRS + 1)]
    with pytest.raises(rootfs.RootfsError, match="at most 500"):
        rootfs.create(tmp_path / "c", lowers, "overlay")
    assert not (tmp_path / "c").exists()


def test_existing_container_dir_is_refused_and_left_alone(tmp_path):
    lowers = make_layers(tmp_path, 2)
    container = tmp_path / "c"
    merged = rootfs.create(container, lowers, "overlay")
    with pytest.raises(rootfs.RootfsError, match="already exists"):
        rootfs.create(container, lowers, "overlay")
    assert rootfs.is_mounted(container)
    assert (merged / "who").read_text() == "layer 1\n"
    rootfs.remove(container)


def test_busy_mount_is_detached_and_the_dir_still_deleted(tmp_path, caplog):
    lowers = make_layers(tmp_path, 2)
    container = tmp_path / "c"
    merged = rootfs.create(container, lowers, "overlay")
    # A process whose cwd is inside the mount makes a plain umount fail with EBUSY.
    holder = subprocess.Popen(["sleep", "60"], cwd=merged)
    try:
        with caplog.at_level(logging.WARNING, logger="cri.storage.rootfs"):
            rootfs.remove(container)
        assert not container.exists()
        assert mount_points(tmp_path) == []
        assert [r.getMessage() for r in caplog.records] == ["rootfs_busy_detached"]
    finally:
        holder.kill()
        holder.wait(timeout=10)


def test_remove_unmounts_stacked_and_nested_mounts_and_deletes_through_none(tmp_path):
    lowers = make_layers(tmp_path, 2)
    container = tmp_path / "c"
    merged = rootfs.create(container, lowers, "overlay")
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "keep").write_text("mine\n")
    (container / "upper" / "bound").mkdir()
    linux.mount(str(precious), str(container / "upper" / "bound"), None, linux.MS_BIND)  # nested, not merged/
    linux.mount(str(precious), str(merged), None, linux.MS_BIND)  # stacked on the overlay
    assert len(mount_points(container)) == 3
    try:
        rootfs.remove(container)
    finally:
        for point in mount_points(container):
            linux.umount(point, linux.MNT_DETACH)
    assert not container.exists()
    assert mount_points(tmp_path) == []
    assert (precious / "keep").read_text() == "mine\n", "nothing deleted through a mount"


# ---- read-only mounts of image volumes ----


@pytest.mark.parametrize("count", [1, 3, 120])
def test_read_only_mount_shows_the_layers_and_refuses_writes(tmp_path, count):
    # 1: a read-only bind of the one layer; 3 and 120: a lower-only overlay through the short links.
    lowers = make_layers(tmp_path, count)
    top = tmp_path / "image-volumes" / "v"
    top.mkdir(parents=True)
    merged = rootfs.mount_read_only(top, lowers)

    assert mount_points(top) == [str(merged)]
    assert (merged / "who").read_text() == f"layer {count - 1}\n"
    assert (merged / "f0").read_text() == "from layer 0\n"
    with pytest.raises(OSError, match="Read-only file system"):
        (merged / "new").write_text("x")
    assert (top / "l").exists() == (count > 1)
    rootfs.remove(top)
    assert not top.exists() and mount_points(tmp_path) == []
