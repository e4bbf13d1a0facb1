"""cri.system.idmap against the real kernel: user namespaces from a child, idmapped mounts, the start-up probe.

Root only (the e2e and integration suites run as root too): mounts and maps need it.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cri.system import idmap, linux
from cri.system.idmap import IdMapping

MAPPING = IdMapping(0, 2_100_000_000, 65536)


@pytest.fixture
def dirs(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if os.geteuid() != 0:
        pytest.skip("idmapped mounts need root")
    source, target = tmp_path / "source", tmp_path / "target"
    source.mkdir()
    target.mkdir()
    yield source, target
    for entry in linux.mounts_under(str(tmp_path)):
        linux.umount(entry.mount_point, linux.MNT_DETACH)


def test_a_mapping_translates_only_the_ids_in_its_range() -> None:
    m = IdMapping(0, 100000, 10)
    assert (m.to_host(0), m.to_host(9), m.to_host(10), m.to_host(-1)) == (100000, 100009, None, None)
    assert m.line() == "0 100000 10\n"
    assert m.to_oci() == {"containerID": 0, "hostID": 100000, "size": 10}


def test_the_child_namespace_has_exactly_the_maps_written(dirs: tuple[Path, Path]) -> None:
    with idmap.user_namespace(MAPPING, IdMapping(0, 2_200_000_000, 1000)) as userns:
        pid = userns.split("/")[2]
        assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", "2100000000", "65536"]
        assert Path(f"/proc/{pid}/gid_map").read_text().split() == ["0", "2200000000", "1000"]
        assert os.readlink(userns) != os.readlink("/proc/self/ns/user")
    assert not Path(f"/proc/{pid}").exists()  # the child is gone with the block


def test_an_idmapped_mount_shifts_owners_both_ways_and_leaves_the_source_alone(dirs: tuple[Path, Path]) -> None:
    source, target = dirs
    (source / "by-root").write_text("root's\n")
    os.chown(source / "by-root", 0, 0)
    (source / "by-1000").write_text("a user's\n")
    os.chown(source / "by-1000", 1000, 1000)
    with idmap.user_namespace(MAPPING, MAPPING) as userns:
        idmap.mount_idmapped(str(source), str(target), userns)
    seen = {name: os.stat(target / name) for name in ("by-root", "by-1000")}
    assert (seen["by-root"].st_uid, seen["by-root"].st_gid) == (MAPPING.host_id, MAPPING.host_id)
    assert (seen["by-1000"].st_uid, seen["by-1000"].st_gid) == (MAPPING.host_id + 1000, MAPPING.host_id + 1000)
    assert (target / "by-root").read_text() == "root's\n"
    # A file made through the mount by the mapped root lands on disk as plain root, not the mapped one.
    directory = os.open(target, os.O_RDONLY | os.O_DIRECTORY)  # tmp_path's parents are not the mapped root's
    os.setegid(MAPPING.host_id)
    os.seteuid(MAPPING.host_id)
    try:
        os.close(os.open("made", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=directory))
    finally:
        os.seteuid(0)
        os.setegid(0)
        os.close(directory)
    assert (os.stat(source / "made").st_uid, os.stat(target / "made").st_uid) == (0, MAPPING.host_id)
    assert (os.stat(source / "by-root").st_uid, os.stat(source / "by-1000").st_uid) == (0, 1000)


def test_a_read_only_idmapped_mount_refuses_writes(dirs: tuple[Path, Path]) -> None:
    source, target = dirs
    with idmap.user_namespace(MAPPING, MAPPING) as userns:
        idmap.mount_idmapped(str(source), str(target), userns, read_only=True)
    with pytest.raises(OSError) as err:
        (target / "new").write_text("x")
    assert err.value.errno == errno.EROFS
    assert os.listdir(source) == []


def test_an_overlay_cannot_be_idmapped_itself_and_the_error_names_it(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    source, target = dirs
    for name in ("upper", "work", "merged"):
        (tmp_path / name).mkdir()
    options = f"lowerdir={source},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    linux.mount("overlay", str(tmp_path / "merged"), "overlay", 0, options)
    with idmap.user_namespace(MAPPING, MAPPING) as userns, pytest.raises(OSError) as err:
        idmap.mount_idmapped(str(tmp_path / "merged"), str(target), userns)
    assert err.value.errno == errno.EINVAL and "MOUNT_ATTR_IDMAP" in str(err.value)
    assert not any(m.mount_point == str(target) for m in linux.mounts_under(str(tmp_path)))


def test_the_probe_passes_here_and_leaves_nothing(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    scratch = tmp_path / "root"
    assert idmap.probe(str(scratch)) == ""
    assert os.listdir(scratch) == []
    assert linux.mounts_under(str(scratch)) == []


def test_the_probe_says_why_it_fails_on_a_file_system_without_idmapped_mounts(
    dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    # An overlay mount cannot be idmapped: a storage root on one makes the probe fail with the kernel's reason.
    for name in ("lower", "upper", "work", "merged"):
        (tmp_path / name).mkdir()
    options = f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    linux.mount("overlay", str(tmp_path / "merged"), "overlay", 0, options)
    problem = idmap.probe(str(tmp_path / "merged"))
    assert "MOUNT_ATTR_IDMAP" in problem and "Invalid argument" in problem
    assert os.listdir(tmp_path / "merged") == []


@pytest.mark.parametrize("layers", [2, 60])
def test_a_rootfs_over_idmapped_layers_shows_them_shifted_and_leaves_them_alone(
    dirs: tuple[Path, Path], tmp_path: Path, layers: int, caplog: pytest.LogCaptureFixture
) -> None:
    from cri.storage import rootfs

    lowers = []
    for n in range(layers):
        layer = tmp_path / "layers" / f"{n:03d}-{'x' * 80}"  # long names: 60 of them overflow one page of options
        layer.mkdir(parents=True)
        (layer / f"file{n}").write_text(f"layer {n}\n")
        os.chown(layer / f"file{n}", 0, 1000)
        lowers.append(layer)
    container_dir = tmp_path / "containers" / "c1"
    with idmap.user_namespace(MAPPING, MAPPING) as userns:
        pin = tmp_path / "userns"
        pin.touch()
        linux.mount(userns, str(pin), None, linux.MS_BIND)  # what the pod's pin is
    caplog.set_level(logging.INFO, "cri.storage.rootfs")
    shift = rootfs.IdShift(str(pin), (MAPPING.host_id, MAPPING.host_id))
    merged = rootfs.create(container_dir, lowers, "overlay", shift=shift)
    created = [r for r in caplog.records if r.getMessage() == "rootfs_created"]
    assert [r.fields["how"] for r in created] == ["overlay"]  # type: ignore[attr-defined]
    top, bottom = os.stat(merged / "file0"), os.stat(merged / f"file{layers - 1}")
    assert (top.st_uid, top.st_gid) == (MAPPING.host_id, MAPPING.host_id + 1000)
    assert (bottom.st_uid, bottom.st_gid) == (MAPPING.host_id, MAPPING.host_id + 1000)
    assert os.stat(merged).st_uid == MAPPING.host_id  # upper/ took the mapped root from the topmost layer
    assert os.stat(container_dir).st_uid == MAPPING.host_id  # runc's init, the mapped root, must reach merged/
    (merged / "file0").write_text("changed\n")  # copied up; the layer keeps its own
    assert (lowers[0] / "file0").read_text() == "layer 0\n" and os.stat(lowers[0] / "file0").st_uid == 0
    rootfs.remove(container_dir)
    assert not container_dir.exists()
    assert linux.mounts_under(str(tmp_path / "containers")) == []
    linux.umount(str(pin))
