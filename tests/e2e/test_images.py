"""The ImageService through the daemon's socket, against real registries on loopback (root).

Images are built by the test suite from Debian's static busybox and pushed to
Debian's docker-registry; faults come from a proxy in front of it.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from tests.support import image_builder as ib
from tests.support.daemon_harness import Daemon
from tests.support.fault_proxy import FaultProxy
from tests.support.registry_harness import Registry
from tests.support.token_server import TokenServer


@pytest.fixture
def registry() -> Iterator[Registry]:
    with Registry() as r:
        yield r


def registries_yaml(entries: list[dict[str, object]], extra: str = "") -> str:
    return "image:\n  registries: " + json.dumps(entries) + "\n" + extra


def pull(daemon: Daemon, ref: str, auth: pb.AuthConfig | None = None, timeout: float = 120) -> str:
    resp = daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=ref), auth=auth), timeout=timeout)
    return str(resp.image_ref)


def status(daemon: Daemon, ref: str, verbose: bool = False) -> pb.ImageStatusResponse:
    return daemon.images().ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref), verbose=verbose))


def layer_dirs(daemon: Daemon, ref: str) -> list[Path]:
    info = json.loads(status(daemon, ref, verbose=True).info["info"])
    return [daemon.root / "layers" / layer["chainID"].removeprefix("sha256:") / "diff" for layer in info["layers"]]


def remove(daemon: Daemon, ref: str) -> None:
    daemon.images().RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), timeout=60)


def insecure(host: str) -> dict[str, object]:
    return {"prefix": host, "insecure": True}


def test_pull_by_tag_digest_and_id_with_the_files_owners_modes_and_whiteouts(make_daemon, registry) -> None:
    image = ib.whiteout_image()
    special = ib.setuid_image()
    digest = ib.push(registry.url, "e2e/whiteouts", image, tag="v1")
    ib.push(registry.url, "e2e/special", special, tag="v1")
    daemon = make_daemon(registries_yaml([insecure(registry.host)]))
    ref = f"{registry.host}/e2e/whiteouts:v1"

    image_id = pull(daemon, ref)
    assert image_id == image.image_id
    assert pull(daemon, ref) == image_id  # idempotent
    assert pull(daemon, f"{registry.host}/e2e/whiteouts@{digest}") == image_id
    found = status(daemon, image_id[:19]).image  # an ID prefix, as crictl users type
    assert found.id == image_id
    assert found.repo_tags == [ref]
    assert found.repo_digests == [f"{registry.host}/e2e/whiteouts@{digest}"]
    assert found.size == image.size

    base, lower, upper = layer_dirs(daemon, ref)
    assert (base / "bin" / "busybox").stat().st_size > 100_000
    assert os.readlink(base / "bin" / "sh") == "busybox"
    assert (lower / "data" / "gone").read_bytes() == b"gone"
    gone = (upper / "data" / "gone").lstat()
    assert stat.S_ISCHR(gone.st_mode) and gone.st_rdev == 0  # overlay whiteout
    assert os.getxattr(upper / "opq", "trusted.overlay.opaque") == b"y"
    assert (upper / "data" / "replaced").read_bytes() == b"new"

    pull(daemon, f"{registry.host}/e2e/special:v1")
    top = layer_dirs(daemon, f"{registry.host}/e2e/special:v1")[-1]
    assert stat.S_IMODE((top / "bin" / "suid").stat().st_mode) == 0o4755
    assert stat.S_IMODE((top / "bin" / "sgid").stat().st_mode) == 0o2755
    private = (top / "data" / "private").stat()
    assert (private.st_uid, private.st_gid, stat.S_IMODE(private.st_mode)) == (1000, 1000, 0o600)
    assert stat.S_IMODE((top / "shared").stat().st_mode) == 0o1777

    samples = daemon.metrics()
    assert samples['criopy_image_pulls_total{outcome="success"}'] == 4.0
    assert samples["criopy_image_pull_bytes_total"] >= image.size - len(image.manifest_bytes)
    # The repeated pulls, and the busybox base layer the two images share, found their layers unpacked.
    assert samples["criopy_image_layer_cache_hits_total"] == 3 + 3 + 1
    assert samples["criopy_image_pull_duration_seconds_count"] == 4.0


def test_hardlinks_multi_arch_and_sixty_layers(make_daemon, registry) -> None:
    ib.push(registry.url, "e2e/links", ib.hardlink_image(), tag="v1")
    index = ib.multi_arch_index()
    ib.push_index(registry.url, "e2e/multi", index, tag="v1")
    many = ib.many_layers_image(64)
    ib.push(registry.url, "e2e/many", many, tag="v1")
    daemon = make_daemon(registries_yaml([insecure(registry.host)]))

    pull(daemon, f"{registry.host}/e2e/links:v1")
    top = layer_dirs(daemon, f"{registry.host}/e2e/links:v1")[-1]
    original = (top / "data" / "original").stat()
    assert original.st_nlink == 3
    assert (top / "data" / "link").stat().st_ino == original.st_ino

    arch, variant = ib.host_platform()
    chosen = index.for_platform(arch, variant)
    assert pull(daemon, f"{registry.host}/e2e/multi:v1") == chosen.image_id
    multi = status(daemon, f"{registry.host}/e2e/multi:v1").image
    assert multi.repo_digests == [f"{registry.host}/e2e/multi@{index.manifest_digest}"]

    assert pull(daemon, f"{registry.host}/e2e/many:v1") == many.image_id
    dirs = layer_dirs(daemon, f"{registry.host}/e2e/many:v1")
    assert len(dirs) == 65
    assert (dirs[-1] / "layers" / "last").read_text() == "63\n"


def test_list_filter_stream_retag_and_remove_semantics(make_daemon, registry) -> None:
    one, two = ib.busybox_image(config=ib.ImageConfig(labels={"n": "1"})), ib.whiteout_image()
    ib.push(registry.url, "e2e/app", one, tag="a")
    ib.push(registry.url, "e2e/app", one, tag="b")
    daemon = make_daemon(registries_yaml([insecure(registry.host)]))
    app_a, app_b = f"{registry.host}/e2e/app:a", f"{registry.host}/e2e/app:b"
    assert pull(daemon, app_a) == pull(daemon, app_b) == one.image_id
    images = daemon.images()
    listed = images.ListImages(pb.ListImagesRequest()).images
    assert [i.id for i in listed] == [one.image_id]
    assert sorted(listed[0].repo_tags) == [app_a, app_b]
    filtered = images.ListImages(pb.ListImagesRequest(filter=pb.ImageFilter(image=pb.ImageSpec(image=app_b))))
    assert [i.id for i in filtered.images] == [one.image_id]
    streamed = [i.id for r in images.StreamImages(pb.StreamImagesRequest()) for i in r.images]
    assert streamed == [one.image_id]

    # Retagging moves the tag: app:a now names the second image.
    ib.push(registry.url, "e2e/app", two, tag="a")
    assert pull(daemon, app_a) == two.image_id
    assert status(daemon, app_b).image.repo_tags == [app_b]
    assert status(daemon, app_a).image.id == two.image_id

    # A tag goes alone while another remains; the last tag takes the image; by ID removes it all.
    ib.push(registry.url, "e2e/app", two, tag="c")
    app_c = f"{registry.host}/e2e/app:c"
    pull(daemon, app_c)
    remove(daemon, app_a)
    assert status(daemon, app_c).image.repo_tags == [app_c]
    remove(daemon, app_b)
    assert not status(daemon, one.image_id).HasField("image")
    remove(daemon, one.image_id)  # already gone: fine
    # Gone, or never here, is fine whatever form names it: a bare ID, a digest reference, a tag.
    for absent in ("0" * 64, f"{registry.host}/e2e/app@sha256:{'0' * 64}", f"{registry.host}/e2e/never:there"):
        remove(daemon, absent)
    remove(daemon, two.image_id)
    assert images.ListImages(pb.ListImagesRequest()).images == []
    assert daemon.stored() == {"blobs": [], "layers": [], "temp": []}  # every layer and blob freed

    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, "Not A Reference!")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "Not A Reference!" in (err.value.details() or "")
    assert not status(daemon, f"{registry.host}/e2e/never:there").HasField("image")


def test_token_auth_and_basic_auth_over_tls(make_daemon, tmp_path) -> None:
    with TokenServer(users={"puller": "s3cret"}).start() as tokens, Registry(token_auth=tokens) as reg:
        image = ib.busybox_image()
        ib.push(reg.url, "e2e/private", image, tag="v1", auth=("puller", "s3cret"))
        daemon = make_daemon(registries_yaml([insecure(reg.host)]))
        ref = f"{reg.host}/e2e/private:v1"
        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, ref, auth=pb.AuthConfig(username="puller", password="wrong"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert reg.host in (err.value.details() or "")
        assert pull(daemon, ref, auth=pb.AuthConfig(username="puller", password="s3cret")) == image.image_id

    with Registry(tls=True, htpasswd={"alice": "pw"}) as reg:
        image = ib.busybox_image(config=ib.ImageConfig(labels={"tls": "yes"}))
        ib.push(reg.url, "e2e/tls", image, tag="v1", auth=("alice", "pw"), verify=reg.verify)
        certs = tmp_path / "certs.d"
        (certs / reg.host).mkdir(parents=True)
        assert reg.ca_file is not None
        (certs / reg.host / "ca.crt").write_bytes(reg.ca_file.read_bytes())
        daemon = make_daemon(f"image:\n  certs_dirs: [{certs}]\n")
        ref = f"{reg.host}/e2e/tls:v1"
        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, ref)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        auth = pb.AuthConfig(auth="YWxpY2U6cHc=")  # base64("alice:pw"), as the kubelet sends pull secrets
        assert pull(daemon, ref, auth=auth) == image.image_id


def test_mirror_serves_a_registry_that_does_not_exist_and_blocked_is_refused(make_daemon, registry) -> None:
    image = ib.busybox_image()
    ib.push(registry.url, "pause", image, tag="3.9")
    mirror: dict[str, object] = {
        "prefix": "registry.k8s.io",
        "mirrors": [{"location": registry.host, "insecure": True}],
    }
    blocked = {"prefix": "blocked.example", "blocked": True}
    daemon = make_daemon(registries_yaml([mirror, blocked]))
    assert pull(daemon, "registry.k8s.io/pause:3.9") == image.image_id
    assert status(daemon, "registry.k8s.io/pause:3.9").image.repo_tags == ["registry.k8s.io/pause:3.9"]
    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, "blocked.example/app:1")
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "blocked" in (err.value.details() or "")


def test_lying_registries_leave_nothing_and_cut_connections_are_retried(make_daemon, registry) -> None:
    image = ib.busybox_image(config=ib.ImageConfig(labels={"faults": "1"}))
    ib.push(registry.url, "e2e/faults", image, tag="v1")
    layer = image.layers[-1].digest
    with FaultProxy(registry.url) as proxy:
        daemon = make_daemon(registries_yaml([insecure(proxy.host)], "  pull_progress_timeout: 2\n"))
        ref = f"{proxy.host}/e2e/faults:v1"

        proxy.corrupt(digest=layer)
        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, ref)
        # The unpack worker meets the corruption mid-stream, before the digest check at the blob's end.
        assert layer in (err.value.details() or "")
        assert re.search(r"corrupt|digest", (err.value.details() or "").lower())
        assert layer.removeprefix("sha256:") not in daemon.stored()["blobs"]
        assert daemon.stored()["layers"] == [] and daemon.stored()["temp"] == []
        proxy.clear()

        proxy.wrong_digest()
        with pytest.raises(grpc.RpcError):
            pull(daemon, f"{proxy.host}/e2e/faults@{image.manifest_digest}")
        proxy.clear()

        proxy.stall_after(1000, digest=layer)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as err:
            pull(daemon, ref)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 30
        proxy.clear()

        proxy.cut_after(1000, times=1, digest=layer)
        assert pull(daemon, ref) == image.image_id  # retried after the cut
        assert daemon.stored()["temp"] == []


def test_concurrent_pulls_download_each_blob_once(make_daemon, registry) -> None:
    image = ib.busybox_image(config=ib.ImageConfig(labels={"concurrent": "1"}))
    ib.push(registry.url, "e2e/once", image, tag="v1")
    with FaultProxy(registry.url) as proxy:
        proxy.slow(2_000_000)  # long enough for both pulls to overlap
        daemon = make_daemon(registries_yaml([insecure(proxy.host)]))
        ref = f"{proxy.host}/e2e/once:v1"
        with ThreadPoolExecutor(2) as pool:
            ids = list(pool.map(lambda _i: pull(daemon, ref), range(2)))
        assert ids == [image.image_id] * 2
        for digest in image.blobs():
            if digest != image.manifest_digest:
                assert proxy.blob_gets(digest) == 1, digest


def test_escaping_layers_are_neutralised_and_the_host_is_untouched(make_daemon, registry) -> None:
    marker = Path("/etc") / ib.ESCAPE_MARKER
    assert not marker.exists()
    ib.push(registry.url, "e2e/escape", ib.escape_image(write_through=True), tag="through")
    ib.push(registry.url, "e2e/escape", ib.escape_image(traversal=True), tag="traversal")
    daemon = make_daemon(registries_yaml([insecure(registry.host)]))
    ref = f"{registry.host}/e2e/escape:through"
    pull(daemon, ref)
    top = layer_dirs(daemon, ref)[-1]
    # The symlink lives in the lower layer: this layer's diff holds a plain outside/ dir, inside its root.
    assert (top / "outside" / ib.ESCAPE_MARKER).read_bytes() == b"escaped\n"
    assert os.readlink(layer_dirs(daemon, ref)[-2] / "outside") == "../../../../etc"  # kept verbatim
    with pytest.raises(grpc.RpcError) as err:
        pull(daemon, f"{registry.host}/e2e/escape:traversal")
    assert ib.ESCAPE_MARKER in (err.value.details() or "")
    assert not marker.exists()
    assert not (daemon.root.parent / ib.ESCAPE_MARKER).exists()


def test_daemon_answers_while_a_big_image_is_pulled(make_daemon, registry) -> None:
    image = ib.big_image(total_mb=112, layer_count=4)
    ib.push(registry.url, "e2e/big", image, tag="v1")
    daemon = make_daemon(registries_yaml([insecure(registry.host)]))
    latencies: list[float] = []
    missed: list[Exception] = []  # what ended the probe early: a thread's exception would only be a warning
    done = threading.Event()

    def probe() -> None:
        runtime = daemon.runtime()
        try:
            while not done.is_set():
                started = time.monotonic()
                runtime.Version(pb.VersionRequest(), timeout=2)  # a stalled loop would miss this deadline
                latencies.append(time.monotonic() - started)
                time.sleep(0.01)
        except Exception as exc:
            missed.append(exc)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        assert pull(daemon, f"{registry.host}/e2e/big:v1", timeout=600) == image.image_id
    finally:
        done.set()
        prober.join()
    assert not missed, f"Version failed during the pull after {len(latencies)} answers: {missed[0]!r}"
    latencies.sort()
    print(
        f"Version during a {image.size >> 20} MiB pull: n={len(latencies)} "
        f"median={latencies[len(latencies) // 2] * 1000:.1f}ms max={latencies[-1] * 1000:.1f}ms"
    )
    assert len(latencies) > 10
    fs = daemon.images().ImageFsInfo(pb.ImageFsInfoRequest())
    deadline = time.monotonic() + 20
    while fs.image_filesystems and fs.image_filesystems[0].used_bytes.value < 100 << 20:
        assert time.monotonic() < deadline, fs
        time.sleep(0.2)
        fs = daemon.images().ImageFsInfo(pb.ImageFsInfoRequest())
    assert fs.image_filesystems[0].inodes_used.value > 10
    assert fs.image_filesystems[0].fs_id.mountpoint
