"""`criopy images import|export` against the real daemon (root, real stack, loopback registry).

The archives are built here without docker (tests/support/archive_builder.py),
in the formats `docker save` and containerd write. With the daemon running, the
CLI goes through its admin socket (the daemon holds the store's lock); stopped,
the CLI takes the lock and writes the store itself.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import select
import signal
import stat
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.daemon import admin
from cri.system import faults
from tests.e2e.containers import Env, push_image, registries_yaml, running_env
from tests.support import image_builder as ib
from tests.support.archive_builder import docker_save, oci_archive
from tests.support.daemon_harness import REPO, Daemon, clean_env
from tests.support.registry_harness import Registry

# A registry name that resolves nowhere: a pull of it cannot succeed, so what runs was imported.
UNREACHABLE = "criopy-e2e.invalid"


@pytest.fixture
def env(make_daemon, registry: Registry, busybox: str) -> Iterator[Env]:
    with running_env(make_daemon, registry, [busybox]) as env:
        yield env


def cli_argv(daemon: Daemon, *args: str) -> list[str]:
    """`criopy images ...` with the daemon's own flags, as an operator runs it."""
    flags = ["--config", str(daemon.config_file), "--config-dir", str(daemon.base / "criopy.d")]
    flags += ["--root", str(daemon.root), "--runroot", str(daemon.runroot), "--listen", daemon.socket]
    return [sys.executable, "-m", "cri", "images", *args, *flags]


def cli(daemon: Daemon, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        cli_argv(daemon, *args),
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        env=clean_env(),
        cwd=REPO,
        timeout=120,
        check=False,
    )


def marked_image(marker: str) -> ib.Image:
    return ib.busybox_image([ib.Layer([ib.File("/marker", f"{marker}\n".encode())], created_by="marker")])


def status(daemon: Daemon, name: str) -> pb.Image:
    return daemon.images().ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=name)), timeout=10).image


def listed(daemon: Daemon) -> dict[str, list[str]]:
    images = daemon.images().ListImages(pb.ListImagesRequest(), timeout=10).images
    return {image.id: sorted(image.repo_tags) for image in images}


def test_a_docker_save_archive_runs_a_container_with_no_registry_reachable(env: Env, tmp_path: Path) -> None:
    marker = secrets.token_hex(6)
    image, other = marked_image(marker), marked_image(f"other-{marker}")
    name = f"{UNREACHABLE}/e2e/imported-{marker}:v1"
    other_names = [f"{UNREACHABLE}/e2e/other-{marker}:a", f"{UNREACHABLE}/e2e/other-{marker}:b"]
    archive = tmp_path / "saved.tar"
    archive.write_bytes(docker_save([(image, [name]), (other, other_names)]))

    done = cli(env.daemon, "import", str(archive))

    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines() == [
        f"imported {image.image_id} {name}",
        f"imported {other.image_id} {' '.join(other_names)}",
    ]
    assert "admin request done" in env.daemon.log()  # the running daemon did it, on its own store
    images = listed(env.daemon)
    assert images[image.image_id] == [name]
    assert images[other.image_id] == other_names
    assert status(env.daemon, name).id == image.image_id
    pod = env.pod()
    cid = env.run(pod, env.container_config(image=name, command=["cat", "/marker"]))
    assert env.wait_exited(cid).exit_code == 0
    assert env.output(pod) == f"{marker}\n"


def test_export_remove_import_gives_back_the_id_and_repo_digest_a_pull_gave(
    env: Env, registry: Registry, tmp_path: Path
) -> None:
    pulled_name = push_image(registry, f"e2e/roundtrip-{secrets.token_hex(4)}", layers=[ib.Layer([ib.Dir("/r")])])
    env.daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=pulled_name)), timeout=120)
    pulled = status(env.daemon, pulled_name)
    archive = tmp_path / "exported.tar"

    exported = cli(env.daemon, "export", pulled_name, "-o", str(archive))
    assert exported.returncode == 0, exported.stderr.decode()
    with tarfile.open(archive) as tar:
        assert {"oci-layout", "index.json", "manifest.json"} <= set(tar.getnames())
    env.daemon.images().RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=pulled_name)), timeout=30)
    assert pulled.id not in listed(env.daemon)

    imported = cli(env.daemon, "import", str(archive))

    assert imported.returncode == 0, imported.stderr.decode()
    again = status(env.daemon, pulled_name)
    assert again.id == pulled.id
    assert list(again.repo_digests) == list(pulled.repo_digests)
    assert list(again.repo_tags) == [pulled_name]


def test_import_from_stdin_and_export_to_stdout(env: Env) -> None:
    marker = secrets.token_hex(6)
    image = marked_image(marker)
    name = f"{UNREACHABLE}/e2e/stdin-{marker}:v1"

    done = cli(env.daemon, "import", "-", stdin=oci_archive([(image, [name])]))

    assert done.returncode == 0, done.stderr.decode()
    assert status(env.daemon, name).id == image.image_id
    out = cli(env.daemon, "export", name, "-o", "-")
    assert out.returncode == 0, out.stderr.decode()
    with tarfile.open(fileobj=io.BytesIO(out.stdout)) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
    assert [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]] == [name]
    assert index["manifests"][0]["digest"] == image.manifest_digest


def test_a_corrupt_blob_is_refused_naming_it_and_nothing_is_left(env: Env, tmp_path: Path) -> None:
    good, bad = marked_image("good-" + secrets.token_hex(4)), marked_image("bad-" + secrets.token_hex(4))
    bad_layer = bad.layers[1].digest

    def flip_last_byte(member: str, data: bytes) -> bytes:
        return data[:-1] + bytes([data[-1] ^ 1]) if member.endswith(bad_layer.removeprefix("sha256:")) else data

    archive = tmp_path / "corrupt.tar"
    archive.write_bytes(
        oci_archive([(good, [f"{UNREACHABLE}/good:1"]), (bad, [f"{UNREACHABLE}/bad:1"])], mutate=flip_last_byte)
    )
    before_images, before_store = listed(env.daemon), env.daemon.stored()

    done = cli(env.daemon, "import", str(archive))

    assert done.returncode == 1
    assert "digest mismatch" in done.stderr.decode()
    assert bad_layer in done.stderr.decode()
    assert listed(env.daemon) == before_images  # not even the good image of the archive
    assert env.daemon.stored() == before_store


def test_import_while_the_daemon_is_stopped_then_the_started_daemon_has_it(
    make_daemon, registry: Registry, tmp_path: Path
) -> None:
    daemon = make_daemon(registries_yaml(registry.host), start=False)
    marker = secrets.token_hex(6)
    image = marked_image(marker)
    name = f"{UNREACHABLE}/e2e/offline-{marker}:v1"
    archive = tmp_path / "offline.tar"
    archive.write_bytes(docker_save([(image, [name])], layout="oci"))

    piped = marked_image(f"piped-{marker}")
    piped_name = f"{UNREACHABLE}/e2e/offline-piped-{marker}:v1"

    done = cli(daemon, "import", str(archive))
    from_stdin = cli(daemon, "import", "-", stdin=docker_save([(piped, [piped_name])]))

    assert done.returncode == 0, done.stderr.decode()
    assert from_stdin.returncode == 0, from_stdin.stderr.decode()
    assert not (daemon.runroot / "admin.sock").exists()  # nobody served it: the CLI wrote the store itself
    daemon.start()
    found = status(daemon, name)
    assert found.id == image.image_id
    assert list(found.repo_tags) == [name]
    assert status(daemon, piped_name).id == piped.image_id
    exported = cli(daemon, "export", name, "-o", str(tmp_path / "back.tar"))
    assert exported.returncode == 0, exported.stderr.decode()


def test_an_import_while_stopped_that_moves_the_tag_of_a_containers_image_keeps_that_image(
    env: Env, tmp_path: Path
) -> None:
    """With no daemon, the CLI still knows the containers of the store: their image is not freed under them."""
    marker = secrets.token_hex(6)
    used, newer = marked_image(marker), marked_image(f"newer-{marker}")
    name = f"{UNREACHABLE}/e2e/moved-{marker}:v1"
    assert cli(env.daemon, "import", "-", stdin=docker_save([(used, [name])])).returncode == 0
    pod = env.pod()
    cid = env.run(pod, env.container_config(image=name, command=["cat", "/marker"]))
    assert env.wait_exited(cid).exit_code == 0
    env.daemon.stop()

    done = cli(env.daemon, "import", "-", stdin=docker_save([(newer, [name])]))

    assert done.returncode == 0, done.stderr.decode()
    env.daemon.start()
    assert status(env.daemon, name).id == newer.image_id
    kept = status(env.daemon, used.image_id)
    assert kept.id == used.image_id
    assert list(kept.repo_tags) == []
    assert len(env.daemon.stored()["layers"]) >= len(used.layers) + 1  # its own layer, beside newer's


def test_export_to_a_fifo_writes_into_it_and_leaves_it_a_fifo(env: Env, tmp_path: Path) -> None:
    """-o names a FIFO (or /dev/stdout, /dev/null): written in place, never replaced by a regular file."""
    fifo = tmp_path / "out.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open now, so the CLI's open for writing does not wait
    got = bytearray()
    proc = subprocess.Popen(
        cli_argv(env.daemon, "export", env.image, "-o", str(fifo)),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd=REPO,
    )
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if select.select([reader], [], [], 0.2)[0]:
                got += os.read(reader, 1 << 16)  # b"" while no writer has it open
        got += os.read(reader, 1 << 20) if select.select([reader], [], [], 0)[0] else b""
        _out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate(timeout=30)
        os.close(reader)
    assert proc.returncode == 0, err.decode()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["out.fifo"]  # no temp file beside it either
    with tarfile.open(fileobj=io.BytesIO(bytes(got))) as tar:
        assert {"oci-layout", "index.json", "manifest.json"} <= set(tar.getnames())

    # Through a symlink to a file, the file is replaced whole and the link stays a link.
    (tmp_path / "real.tar").write_bytes(b"old")
    (tmp_path / "link.tar").symlink_to("real.tar")
    done = cli(env.daemon, "export", env.image, "-o", str(tmp_path / "link.tar"))
    assert done.returncode == 0, done.stderr.decode()
    assert os.readlink(tmp_path / "link.tar") == "real.tar"
    with tarfile.open(tmp_path / "real.tar") as tar:
        assert "index.json" in tar.getnames()


def test_a_daemon_stopped_while_an_import_waits_on_a_pipe_stops_and_the_cli_says_so(env: Env) -> None:
    """A writer that never closes its end must not keep the daemon from stopping (SIGTERM, not the kill)."""
    with cli_on_a_stalled_pipe(env, "import", "-") as cli_proc:
        assert env.daemon.stop(timeout=20) == 0
        _out, err = cli_proc.communicate(timeout=30)
    assert cli_proc.returncode == 1
    assert b"images import: " in err


def test_a_daemon_stopped_while_an_export_waits_on_a_full_pipe_stops_and_the_cli_says_so(env: Env) -> None:
    """A reader that never reads must not keep the daemon from stopping either."""
    with cli_on_a_stalled_pipe(env, "export", env.image, "-o", "-") as cli_proc:
        assert env.daemon.stop(timeout=20) == 0
        _out, err = cli_proc.communicate(timeout=30)
    assert cli_proc.returncode == 1
    assert b"images export: " in err


@contextlib.contextmanager
def cli_on_a_stalled_pipe(env: Env, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """The CLI reading (import -) or writing (-o -) a pipe whose other end this test holds and leaves idle.

    Yields once the daemon holds the pipe; the CLI is killed and the pipe closed whatever happens."""
    reads = args[0] == "import"
    read_end, write_end = os.pipe()
    ours, theirs = (write_end, read_end) if reads else (read_end, write_end)
    proc = subprocess.Popen(
        cli_argv(env.daemon, *args),
        stdin=theirs if reads else subprocess.DEVNULL,
        stdout=subprocess.PIPE if reads else theirs,
        stderr=subprocess.PIPE,
        env=clean_env(),
        cwd=REPO,
    )
    try:
        os.close(theirs)
        if reads:
            os.write(ours, b"not all of an archive")
        pipe = f"pipe:[{os.fstat(ours).st_ino}]"
        assert env.daemon.proc is not None
        daemon_fds = Path(f"/proc/{env.daemon.proc.pid}/fd")
        deadline = time.monotonic() + 30
        while not any(_link(fd) == pipe for fd in daemon_fds.iterdir()):
            assert time.monotonic() < deadline, "the daemon never received the pipe"
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
        os.close(ours)


def _link(path: Path) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_the_admin_socket_is_root_only_and_refuses_bad_requests(env: Env, tmp_path: Path) -> None:
    path = env.daemon.runroot / "admin.sock"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with (tmp_path / "out").open("wb") as out:
        with pytest.raises(admin.AdminError, match="unknown op 'bogus'"):
            admin.request(path, {"op": "bogus"}, out.fileno(), timeout=30)
        with pytest.raises(admin.AdminError, match="refs, a non-empty list"):
            admin.request(path, {"op": "export", "refs": []}, out.fileno(), timeout=30)
    missing = f"{UNREACHABLE}/e2e/never-{secrets.token_hex(4)}:v1"
    done = cli(env.daemon, "export", missing, "-o", str(tmp_path / "never.tar"))
    assert done.returncode == 1
    assert "is not in the store" in done.stderr.decode()
    assert not (tmp_path / "never.tar").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no half-written temp file either


@pytest.mark.parametrize(("step", "kept"), [("image.import.stored", False), ("image.import.recorded", True)])
def test_a_daemon_killed_during_an_import_has_the_images_whole_or_not_at_all(
    make_daemon, registry: Registry, tmp_path: Path, step: str, kept: bool
) -> None:
    daemon = make_daemon(registries_yaml(registry.host), start=False)
    daemon.env[faults.ENV] = step
    daemon.start()
    image = marked_image(secrets.token_hex(6))
    name = f"{UNREACHABLE}/e2e/killed-{secrets.token_hex(4)}:v1"
    archive = tmp_path / "killed.tar"
    archive.write_bytes(oci_archive([(image, [name])]))

    done = cli(daemon, "import", str(archive))

    assert done.returncode == 1
    assert "without an answer" in done.stderr.decode()
    assert daemon.proc is not None and daemon.proc.wait(10) == -signal.SIGKILL
    assert f"step={step}" in daemon.log()
    daemon.env.pop(faults.ENV)
    daemon.start()
    if kept:
        assert status(daemon, name).id == image.image_id
        assert len(daemon.stored()["layers"]) == len(image.layers)
    else:
        assert listed(daemon) == {}
        assert daemon.stored() == {"blobs": [], "layers": [], "temp": []}  # freed at the start


def test_a_pull_that_moves_the_last_name_of_an_image_a_container_runs_keeps_that_image(
    env: Env, registry: Registry, tmp_path: Path
) -> None:
    """An image imported without a repo digest has its tag for only name: a pull of that tag takes it. The
    container running from the old image keeps its layers (its rootfs is their overlay), as RemoveImage
    refuses to free them; the old image stays, untagged."""
    marker = secrets.token_hex(6)
    repo = f"e2e/moved-{marker}"
    old, new = marked_image(f"old-{marker}"), marked_image(f"new-{marker}")
    name = f"{registry.host}/{repo}:v1"
    archive = tmp_path / "old.tar"
    archive.write_bytes(docker_save([(old, [name])]))
    assert cli(env.daemon, "import", str(archive)).returncode == 0
    pod = env.pod()
    cid = env.run(pod, env.container_config(image=name, command=["sleep", "3600"]))
    ib.push(registry.url, repo, new, tag="v1")

    env.daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=name)), timeout=120)

    assert status(env.daemon, name).id == new.image_id
    kept = status(env.daemon, old.image_id)
    assert kept.id == old.image_id and list(kept.repo_tags) == []
    done = env.daemon.runtime().ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/marker"], timeout=10))
    assert (done.exit_code, done.stdout) == (0, f"old-{marker}\n".encode())
