"""image_sub_path checks of image volumes: relative, no `..`, inside the image after symlinks, a directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.containers import validate
from cri.errors import InvalidArgument
from cri.storage.imagevolumes import SubPathError, check_sub_path, resolve_sub_path


@pytest.fixture
def image(tmp_path: Path) -> Path:
    root = tmp_path / "merged"
    (root / "share" / "sub").mkdir(parents=True)
    (root / "share" / "file.txt").write_text("x")
    (root / "share" / "in").symlink_to("sub")
    (root / "share" / "up").symlink_to("..")  # still inside: share/up is the image root
    (root / "share" / "out").symlink_to("../../..")
    (root / "share" / "abs").symlink_to("/etc")
    (root / "share" / "dangling").symlink_to("nowhere")
    return root


@pytest.mark.parametrize(
    ("sub_path", "expected"),
    [("", "."), ("share", "share"), ("share/sub/", "share/sub"), ("share/in", "share/sub"), ("share/up", ".")],
)
def test_sub_paths_inside_the_image_resolve(image: Path, sub_path: str, expected: str) -> None:
    assert resolve_sub_path(image, sub_path) == (image / expected).resolve()


@pytest.mark.parametrize(
    ("sub_path", "problem"),
    [
        ("/share", "relative"),
        ("../share", "'..'"),
        ("share/../share", "'..'"),
        ("share/out", "outside the image"),
        ("share/abs", "outside the image"),
        ("nope", "does not exist"),
        ("share/dangling", "does not exist"),
        ("share/file.txt", "not a directory"),
    ],
)
def test_bad_sub_paths_are_refused(image: Path, sub_path: str, problem: str) -> None:
    with pytest.raises(SubPathError, match=problem):
        resolve_sub_path(image, sub_path)


def test_static_checks_need_no_image() -> None:
    check_sub_path("a/b")
    for bad in ("/a", "a/../b", ".."):
        with pytest.raises(SubPathError):
            check_sub_path(bad)


def _config(mount: pb.Mount) -> pb.ContainerConfig:
    return pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name="c"), image=pb.ImageSpec(image="busybox"), mounts=[mount]
    )


def test_validation_names_the_sub_path_field_and_needs_no_host_path() -> None:
    volume = pb.Mount(container_path="/v", image=pb.ImageSpec(image="busybox"), readonly=True)
    validate.request(_config(volume))  # no host path: fine for an image volume
    volume.image_sub_path = "../x"
    with pytest.raises(InvalidArgument, match=r"config\.mounts\[0\]\.image_sub_path"):
        validate.request(_config(volume))
