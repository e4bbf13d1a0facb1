"""Image volumes (KEP-4639): an image's filesystem mounted read-only in a container (root, real stack, the socket).

Two volume images: "tools" has two layers (busybox and one with /data), so it is mounted as a lower-only
overlay; "share" has one layer, so it is a read-only bind of that layer. The kubelet pulls them first and
sends `Mount{container_path, image, readonly: true}`, optionally with `image_sub_path`.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.system import linux
from tests.e2e.containers import NOTHING, Env, push_image, running_env
from tests.support import image_builder as ib
from tests.support.registry_harness import Registry

Pod = tuple[str, pb.PodSandboxConfig]


@pytest.fixture(scope="module")
def tools_image(registry: Registry) -> str:
    layer = ib.Layer([ib.Dir("/data"), ib.File("/data/a.txt", b"alpha from tools\n")], created_by="data")
    return push_image(registry, "e2e/volume-tools", layers=[layer])


@pytest.fixture(scope="module")
def share_image(registry: Registry) -> str:
    entries: list[ib.TarEntry] = [
        ib.Dir("/share"),
        ib.Dir("/share/sub"),
        ib.File("/share/sub/b.txt", b"beta from share\n"),
        ib.File("/share/file.txt", b"a file, not a directory\n"),
        ib.Symlink("/share/out", "../../../../../../etc"),
        ib.Symlink("/share/abs", "/etc"),
        ib.Symlink("/share/in", "sub"),
    ]
    image = ib.Image(layers=[ib.Layer(entries, created_by="share")])
    ib.push(registry.url, "e2e/volume-share", image, "latest")
    return f"{registry.host}/e2e/volume-share:latest"


@pytest.fixture
def env(make_daemon, registry: Registry, busybox: str, tools_image: str, share_image: str) -> Iterator[Env]:
    with running_env(make_daemon, registry, [busybox, tools_image, share_image]) as env:
        yield env


def volume(path: str, image: str, sub_path: str = "") -> pb.Mount:
    return pb.Mount(container_path=path, image=pb.ImageSpec(image=image), readonly=True, image_sub_path=sub_path)


def volume_mounts(env: Env) -> list[str]:
    return [m.mount_point for m in linux.mounts_under(str(env.daemon.base)) if "image-volumes" in m.mount_point]


def image_id(env: Env, image: str) -> str:
    return str(env.daemon.images().ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image))).image.id)


def digest_of(env: Env, image: str) -> str:
    found = env.daemon.images().ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=image))).image
    return str(found.repo_digests[0])


def remove_image(env: Env, image: str) -> None:
    env.daemon.images().RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image)), timeout=30)


def refused(env: Env, pod: Pod, config: pb.ContainerConfig) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        env.create(pod, config)
    return err.value


def test_two_image_volumes_are_read_only_shared_and_hold_their_images(
    env: Env, tools_image: str, share_image: str
) -> None:
    pod = env.pod()
    script = (
        "cat /tools/data/a.txt /share/b.txt; ls /share; "
        "touch /tools/data/new; echo tools=$?; touch /share/new; echo share=$?"
    )
    mounts = [volume("/tools", tools_image), volume("/share", share_image, "share/sub")]
    cid = env.run(pod, env.container_config("c", ["sh", "-c", script], mounts=mounts))
    # A second container on the same image shares its mount: one mount per image.
    other = env.create(pod, env.container_config("other", ["true"], mounts=[volume("/t", tools_image)]))
    status = env.wait_exited(cid)
    out = env.output(pod)
    assert "alpha from tools" in out and "beta from share" in out, out
    assert "file.txt" not in out  # only the sub path is mounted
    assert "touch: /tools/data/new: Read-only file system" in out and "tools=1" in out, out
    assert "touch: /share/new: Read-only file system" in out and "share=1" in out, out
    assert len(volume_mounts(env)) == 2, volume_mounts(env)

    shown = [m for m in status.mounts if m.HasField("image") and m.image.image]
    assert [m.container_path for m in shown] == ["/tools", "/share"]
    assert [m.image.user_specified_image for m in shown] == [tools_image, share_image]
    assert shown[1].image_sub_path == "share/sub" and all(m.readonly for m in shown)
    # The image as resolved: its repo digest, as ContainerStatus.image_ref names the container's image.
    assert [m.image.image for m in shown] == [digest_of(env, tools_image), digest_of(env, share_image)]
    tools_id = image_id(env, tools_image)

    with pytest.raises(grpc.RpcError) as err:
        remove_image(env, tools_id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    env.remove(cid)
    assert len(volume_mounts(env)) == 1  # "other" still holds the tools image
    with pytest.raises(grpc.RpcError) as err:
        remove_image(env, tools_image)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    remove_image(env, share_image)  # nobody holds it any more
    env.remove(other)
    remove_image(env, tools_image)
    assert volume_mounts(env) == []
    assert env.leftovers() == NOTHING


def test_bad_sub_paths_and_missing_images_are_refused_with_nothing_made(env: Env, share_image: str) -> None:
    pod = env.pod()
    for sub_path in ("nope", "share/file.txt", "../share", "/share", "share/out", "share/abs"):
        err = refused(env, pod, env.container_config("bad", ["true"], mounts=[volume("/v", share_image, sub_path)]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (sub_path, err)
        assert "config.mounts[0].image_sub_path" in err.details(), (sub_path, err.details())
        assert volume_mounts(env) == [], sub_path
        assert env.leftovers() == NOTHING, sub_path

    missing = f"{share_image.rsplit(':', 1)[0]}:nope"
    err = refused(env, pod, env.container_config("bad", ["true"], mounts=[volume("/v", missing)]))
    assert err.code() == grpc.StatusCode.NOT_FOUND, err
    assert "config.mounts[0].image" in err.details()
    assert env.leftovers() == NOTHING

    # A symlink that stays inside the image is followed; the name freed by each refusal is usable again.
    status = env.run_to_exit(
        pod, env.container_config("bad", ["cat", "/v/b.txt"], mounts=[volume("/v", share_image, "share/in")])
    )
    assert status.exit_code == 0 and "beta from share" in env.output(pod, "bad")


def test_a_restarted_daemon_keeps_the_holds_and_unmounts_what_no_container_holds(
    env: Env, tools_image: str, share_image: str
) -> None:
    pod = env.pod()
    mounts = [volume("/tools", tools_image), volume("/share", share_image, "share")]
    cid = env.run(pod, env.container_config("c", ["sleep", "60"], mounts=mounts))
    env.daemon.stop()
    # What a crash between a mount and its holder's record would leave: a mount no container holds.
    orphan = env.daemon.root / "image-volumes" / ("0" * 64) / "merged"
    orphan.mkdir(parents=True)
    linux.mount("tmpfs", str(orphan), "tmpfs")
    env.daemon.start()
    assert not orphan.parent.exists() and len(volume_mounts(env)) == 2, volume_mounts(env)
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING
    with pytest.raises(grpc.RpcError) as err:
        remove_image(env, share_image)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    env.stop(cid)
    # A reboot: the mounts go, the exited container still holds its images; the next user mounts again.
    env.daemon.stop()
    for point in volume_mounts(env):
        linux.umount(point, linux.MNT_DETACH)
    env.daemon.start()
    script = "cat /tools/data/a.txt"
    after = env.run_to_exit(pod, env.container_config("after", ["sh", "-c", script], mounts=mounts[:1]))
    assert after.exit_code == 0 and "alpha from tools" in env.output(pod, "after")
    env.remove(cid)
    env.remove(after.id)
    assert volume_mounts(env) == []
    remove_image(env, share_image)
    assert env.leftovers() == NOTHING
