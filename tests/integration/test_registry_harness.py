"""The test registry harness against the real thing: Debian's docker-registry on loopback.

Proves that images built by tests/image_builder.py push and read back with the
right digests, that the TLS, basic-auth and token-auth registries refuse and
accept what they should, and that every fault of tests/fault_proxy.py is
observable by a client. Needs /usr/bin/docker-registry and /bin/busybox (both
installed by `make test`), not root.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import socket
import ssl
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import zstandard

from tests.support.fault_proxy import FaultProxy
from tests.support.image_builder import (
    ALL_MANIFEST_TYPES,
    BUSYBOX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_INDEX,
    OCI_MANIFEST,
    Dir,
    File,
    Hardlink,
    Image,
    Layer,
    RegistryClient,
    Symlink,
    TarEntry,
    Whiteout,
    big_image,
    busybox_image,
    escape_image,
    hardlink_image,
    host_platform,
    many_layers_image,
    multi_arch_index,
    push,
    push_index,
    setuid_image,
    sha256_digest,
    whiteout_image,
)
from tests.support.registry_harness import Registry, registry_binary
from tests.support.token_server import TokenServer

USER, PASSWORD = "tester", "s3cret-pw"


@pytest.fixture(autouse=True)
def _binaries_present() -> None:
    try:
        registry_binary()
    except FileNotFoundError as e:
        pytest.fail(str(e))
    if not BUSYBOX.exists():
        pytest.fail(f"{BUSYBOX} is missing: run `make test`, which installs Debian's busybox-static")


@pytest.fixture
def started() -> Iterator[Callable[..., object]]:
    """start(thing) starts a Registry, TokenServer or FaultProxy and stops it at the end, even on failure."""
    made: list[Registry | TokenServer | FaultProxy] = []

    def start(thing):
        made.append(thing)
        return thing.start()

    yield start
    errors = []
    for thing in reversed(made):
        try:
            thing.stop()
        except Exception as e:  # stop the others all the same
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def registry(started) -> Registry:
    return started(Registry())


def tar_members(layer: Layer) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(layer.tar)) as tar:
        return {m.name: m for m in tar.getmembers()}


def read_member(tar: tarfile.TarFile, name: str) -> str:
    f = tar.extractfile(name)
    assert f is not None, name
    return f.read().decode()


def fetch_json(client: RegistryClient, repo: str, reference: str) -> tuple[httpx.Response, dict[str, Any]]:
    resp = client.get_manifest(repo, reference)
    assert resp.status_code == 200, resp.text
    return resp, json.loads(resp.content)


# -- plain registry --


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_push_then_fetch_manifest_config_and_blobs(registry, fmt):
    image = busybox_image([Layer([File("/hello", b"hello\n")], compression="zstd")], format=fmt)
    digest = push(registry.url, "library/busybox", image, "latest")
    assert digest == image.manifest_digest

    with RegistryClient(registry.url) as client:
        resp, manifest = fetch_json(client, "library/busybox", "latest")
        assert resp.headers["Content-Type"] == (OCI_MANIFEST if fmt == "oci" else DOCKER_MANIFEST)
        assert resp.headers["Docker-Content-Digest"] == digest
        assert sha256_digest(resp.content) == digest
        assert manifest["config"]["digest"] == image.image_id

        config_bytes = client.get_blob("library/busybox", image.config_digest)
        assert sha256_digest(config_bytes) == image.config_digest
        config = json.loads(config_bytes)
        assert config["rootfs"]["diff_ids"] == [layer.diff_id for layer in image.layers]
        assert config["config"]["Cmd"] == ["/bin/sh"]
        assert config["architecture"] == host_platform()[0]

        for layer, desc in zip(image.layers, manifest["layers"], strict=True):
            blob = client.get_blob("library/busybox", desc["digest"])
            assert sha256_digest(blob) == desc["digest"] == layer.digest
            assert len(blob) == desc["size"]
        base_tar = gzip.decompress(client.get_blob("library/busybox", image.layers[0].digest))
        assert sha256_digest(base_tar) == image.layers[0].diff_id
        zstd_tar = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(image.layers[1].blob)).read()
        assert sha256_digest(zstd_tar) == image.layers[1].diff_id

    # pushing again uploads nothing new and gives the same digest
    assert push(registry.url, "library/busybox", image, "latest") == digest


def test_busybox_base_layer_contents():
    members = tar_members(busybox_image().layers[0])
    busybox = members["bin/busybox"]
    assert busybox.isfile() and busybox.mode == 0o755 and busybox.size == BUSYBOX.stat().st_size
    for applet in ("sh", "echo", "cat", "sleep", "ls", "id"):
        assert members[f"bin/{applet}"].issym() and members[f"bin/{applet}"].linkname == "busybox"
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    with tarfile.open(fileobj=io.BytesIO(busybox_image().layers[0].tar)) as tar:
        passwd = read_member(tar, "etc/passwd")
    assert "app:x:1000:1000:" in passwd and "nobody:x:65534:65534:" in passwd and passwd.startswith("root:x:0:0:")


def test_images_are_deterministic_and_compressions_share_diff_ids():
    assert busybox_image().manifest_digest == busybox_image().manifest_digest
    entries: list[TarEntry] = [File("/a", b"a" * 1000), Dir("/d")]
    gz, zst, raw = (Layer(entries, c) for c in ("gzip", "zstd", "none"))
    assert gz.diff_id == zst.diff_id == raw.diff_id == raw.digest
    assert len({gz.digest, zst.digest, raw.digest}) == 3
    assert (gz.media_type, zst.media_type, raw.media_type) == (
        "application/vnd.oci.image.layer.v1.tar+gzip",
        "application/vnd.oci.image.layer.v1.tar+zstd",
        "application/vnd.oci.image.layer.v1.tar",
    )
    assert gz.media_type_for("docker") == "application/vnd.docker.image.rootfs.diff.tar.gzip"


def test_special_entries_are_in_the_tars():
    upper = tar_members(whiteout_image().layers[2])
    assert {"data/.wh.gone", "data/.wh.dir", "opq/.wh..wh..opq", "opq/new"} <= set(upper)
    entries: list[TarEntry] = [File("/f", b"x"), Hardlink("/g", "/f"), Symlink("/s", "/f"), Whiteout("/gone")]
    links = tar_members(Layer(entries))
    assert links["g"].islnk() and links["g"].linkname == "f"
    assert links["s"].issym() and links["s"].linkname == "/f"
    assert ".wh.gone" in links
    suid = tar_members(setuid_image().layers[1])
    assert suid["bin/suid"].mode == 0o4755 and suid["bin/sgid"].mode == 0o2755 and suid["bin/sgid"].gid == 1000
    assert suid["shared"].mode == 0o1777
    escape = escape_image(write_through=True, traversal=True)
    assert tar_members(escape.layers[1])["outside"].linkname == "../../../../etc"
    assert "outside/criopy-escape-test" in tar_members(escape.layers[2])
    assert "../../criopy-escape-test" in tar_members(escape.layers[3])


def test_special_images_push(registry):
    for name, image in {
        "whiteouts": whiteout_image(),
        "hardlinks": hardlink_image(format="docker"),
        "setuid": setuid_image(),
        "escape": escape_image(write_through=True),
    }.items():
        assert push(registry.url, f"test/{name}", image, "v1") == image.manifest_digest


def test_sixty_plus_layer_image_pushes(registry):
    image = many_layers_image(64)
    assert len(image.layers) == 65
    push(registry.url, "test/many", image, "v1")
    with RegistryClient(registry.url) as client:
        _, manifest = fetch_json(client, "test/many", "v1")
        assert [d["digest"] for d in manifest["layers"]] == [layer.digest for layer in image.layers]
        assert len(set(manifest["layers"][i]["digest"] for i in range(65))) == 65
        last = client.get_blob("test/many", image.layers[-1].digest)
        assert sha256_digest(last) == image.layers[-1].digest


def test_big_image_builds_fast_and_pushes(registry):
    started_at = time.monotonic()
    image = big_image(total_mb=16, layer_count=4)
    blobs = image.blobs()
    assert time.monotonic() - started_at < 10
    big = [layer for layer in image.layers[1:]]
    assert all(layer.size >= 4 << 20 for layer in big)
    # incompressible: the gzip blobs are no smaller than the tars
    assert all(layer.size >= len(layer.tar) for layer in big)
    assert sum(len(b) for b in blobs.values()) > 16 << 20
    push(registry.url, "test/big", image, "v1")
    with RegistryClient(registry.url) as client:
        blob = client.get_blob("test/big", big[0].digest)
    assert sha256_digest(blob) == big[0].digest


@pytest.mark.parametrize("fmt", ["oci", "docker"])
def test_multi_arch_index_pushes_and_children_are_fetchable(registry, fmt):
    index = multi_arch_index(fmt)
    assert len(index.manifests) == 3
    digest = push_index(registry.url, "test/multi", index, "v1")
    assert digest == index.manifest_digest
    with RegistryClient(registry.url) as client:
        resp, body = fetch_json(client, "test/multi", "v1")
        assert resp.headers["Content-Type"] == (OCI_INDEX if fmt == "oci" else DOCKER_MANIFEST_LIST)
        platforms = [entry["platform"] for entry in body["manifests"]]
        arch, variant = host_platform()
        assert platforms[0]["architecture"] == arch and platforms[0].get("variant") == variant
        assert len({(p["architecture"], p.get("variant")) for p in platforms}) == 3
        marker_digests = set()
        for entry, image in zip(body["manifests"], index.manifests, strict=True):
            child_resp, child = fetch_json(client, "test/multi", entry["digest"])
            assert sha256_digest(child_resp.content) == entry["digest"] == image.manifest_digest
            assert entry["size"] == len(child_resp.content)
            marker = child["layers"][-1]["digest"]
            marker_digests.add(marker)
            tar = gzip.decompress(client.get_blob("test/multi", marker))
            with tarfile.open(fileobj=io.BytesIO(tar)) as t:
                content = read_member(t, "platform").strip()
            p = entry["platform"]
            assert content == "/".join(x for x in ("linux", p["architecture"], p.get("variant")) if x)
        assert len(marker_digests) == 3  # the children's layers differ: a test can tell which one was chosen
    assert index.for_platform("s390x").architecture == "s390x" or arch == "s390x"


# -- lifecycle --


def test_two_registries_run_at_once_and_stop_cleans_up():
    a, b = Registry(), Registry()
    with a, b:
        assert a.port != b.port
        push(a.url, "one/image", busybox_image(), "v1")
        assert httpx.get(f"{b.url}/v2/one/image/tags/list", timeout=10).status_code == 404
        assert httpx.get(f"{a.url}/v2/one/image/tags/list", timeout=10).json()["tags"] == ["v1"]
        base, proc = a.base, a.proc
        assert base is not None and base.exists() and proc is not None
    assert proc.poll() is not None
    assert not base.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{a.url}/v2/", timeout=2)


def test_start_failure_raises_with_the_log_tail():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        registry = Registry(port=port)
        with pytest.raises(RuntimeError, match="address already in use"):
            registry.start()
        assert registry.proc is None and registry.base is None


# -- TLS and basic auth --


def test_tls_registry_with_basic_auth(started):
    registry = started(Registry(tls=True, htpasswd={USER: PASSWORD}))
    assert registry.url.startswith("https://127.0.0.1:")
    assert registry.ca_file is not None and registry.ca_file.exists()
    ctx = ssl.create_default_context(cafile=str(registry.ca_file))
    assert httpx.get(f"{registry.url}/v2/", verify=ctx, timeout=10).status_code == 401
    assert httpx.get(f"{registry.url}/v2/", verify=ctx, auth=(USER, "wrong"), timeout=10).status_code == 401
    assert httpx.get(f"{registry.url}/v2/", verify=ctx, auth=(USER, PASSWORD), timeout=10).status_code == 200
    # the certificate is for localhost too, and is not trusted without the CA
    localhost = registry.url.replace("127.0.0.1", "localhost")
    assert httpx.get(f"{localhost}/v2/", verify=ctx, auth=(USER, PASSWORD), timeout=10).status_code == 200
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{registry.url}/v2/", timeout=10)

    image = busybox_image()
    with pytest.raises(RuntimeError, match="401"):
        push(registry.url, "private/bb", image, "v1", verify=registry.ca_file)
    push(registry.url, "private/bb", image, "v1", auth=(USER, PASSWORD), verify=registry.ca_file)
    with registry.client(auth=(USER, PASSWORD)) as client:
        resp = client.get("/v2/private/bb/manifests/v1", headers={"Accept": OCI_MANIFEST})
        assert resp.status_code == 200 and sha256_digest(resp.content) == image.manifest_digest


# -- token auth --


def test_token_auth_flow(started):
    tokens = started(TokenServer(users={USER: PASSWORD}))
    registry = started(Registry(token_auth=tokens))

    anonymous = httpx.get(f"{registry.url}/v2/", timeout=10)
    assert anonymous.status_code == 401
    challenge = anonymous.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ") and f'realm="{tokens.realm}"' in challenge
    assert f'service="{tokens.service}"' in challenge

    # wrong credentials are refused by the token server itself
    refused = httpx.get(
        tokens.realm,
        params={"service": tokens.service, "scope": "repository:secure/bb:pull"},
        auth=(USER, "wrong"),
        timeout=10,
    )
    assert refused.status_code == 401
    assert httpx.get(tokens.realm, params={"service": tokens.service}, timeout=10).status_code == 401
    with pytest.raises(PermissionError):
        push(registry.url, "secure/bb", busybox_image(), "v1", auth=(USER, "wrong"))

    image = busybox_image()
    tokens.reset_counts()
    with RegistryClient(registry.url, auth=(USER, PASSWORD)) as client:
        assert client.push_image("secure/bb", image, "v1") == image.manifest_digest
        assert tokens.requests == 1  # one token for repository:secure/bb:pull,push, then cached
        resp, _ = fetch_json(client, "secure/bb", "v1")
        assert sha256_digest(resp.content) == image.manifest_digest
    assert tokens.log[0].user == USER and tokens.log[0].scopes == ("repository:secure/bb:pull,push",)

    # a pull token is scoped: it reads this repository, not another, and cannot push
    pull_token = httpx.get(
        tokens.realm,
        params={"service": tokens.service, "scope": "repository:secure/bb:pull"},
        auth=(USER, PASSWORD),
        timeout=10,
    ).json()["token"]
    bearer = {"Authorization": f"Bearer {pull_token}", "Accept": ", ".join(ALL_MANIFEST_TYPES)}
    assert httpx.get(f"{registry.url}/v2/secure/bb/manifests/v1", headers=bearer, timeout=10).status_code == 200
    assert httpx.get(f"{registry.url}/v2/secure/other/tags/list", headers=bearer, timeout=10).status_code == 401
    assert httpx.post(f"{registry.url}/v2/secure/bb/blobs/uploads/", headers=bearer, timeout=10).status_code == 401


def test_token_server_anonymous_pull_and_oauth_post(started):
    tokens = started(TokenServer(users={USER: PASSWORD}, anonymous_pull=True))
    registry = started(Registry(token_auth=tokens))
    push(registry.url, "pub/bb", busybox_image(), "v1", auth=(USER, PASSWORD))
    with RegistryClient(registry.url) as anonymous:
        resp, _ = fetch_json(anonymous, "pub/bb", "v1")
        assert resp.status_code == 200
    anon_token = tokens.log[-1]
    assert anon_token.user is None and anon_token.status == 200
    with pytest.raises(RuntimeError, match="401"):
        push(registry.url, "pub/bb", busybox_image([Layer([File("/x", b"x")])]), "v2")

    form = {"grant_type": "password", "username": USER, "password": PASSWORD, "service": tokens.service}
    form["scope"] = "repository:pub/bb:pull"
    resp = httpx.post(tokens.realm, data=form, timeout=10)
    assert resp.status_code == 200 and resp.json()["access_token"]
    form["password"] = "wrong"
    assert httpx.post(tokens.realm, data=form, timeout=10).status_code == 401


# -- fault proxy --


@pytest.fixture
def pushed(registry) -> tuple[Registry, Image]:
    """A registry holding test/bb:v1: busybox plus a 256 KiB incompressible layer."""
    image = busybox_image([Layer([File("/blob", os.urandom(256 << 10))], compression="none")])
    push(registry.url, "test/bb", image, "v1")
    return registry, image


@pytest.fixture
def proxy(started, pushed) -> FaultProxy:
    return started(FaultProxy(pushed[0].url))


def blob_url(proxy: FaultProxy, digest: str) -> str:
    return f"{proxy.url}/v2/test/bb/blobs/{digest}"


def test_proxy_passes_through_and_counts(proxy, pushed):
    _, image = pushed
    layer = image.layers[1]
    with RegistryClient(proxy.url) as client:
        resp, _ = fetch_json(client, "test/bb", "v1")
        assert sha256_digest(resp.content) == image.manifest_digest
        assert sha256_digest(client.get_blob("test/bb", layer.digest)) == layer.digest
        # pushing through the proxy works: upload Locations point back at it
        other = busybox_image([Layer([File("/via-proxy", b"1")])])
        client.push_image("test/other", other, "v1")
    assert proxy.blob_gets(layer.digest) == 1
    assert proxy.manifest_gets("v1") == 1
    assert proxy.count("GET", f"/v2/test/bb/blobs/{layer.digest}") == 1
    assert any(m == "PUT" and p.startswith("/v2/test/other/blobs/uploads/") for m, p in proxy.counts)
    assert all(r.fault is None for r in proxy.records)


def test_corrupt_keeps_the_length_and_changes_the_digest(proxy, pushed):
    _, image = pushed
    layer = image.layers[1]
    proxy.corrupt(layer.digest, times=1)
    bad = httpx.get(blob_url(proxy, layer.digest), timeout=10)
    assert bad.status_code == 200
    assert len(bad.content) == layer.size
    assert hashlib.sha256(bad.content).hexdigest() != layer.digest.removeprefix("sha256:")
    good = httpx.get(blob_url(proxy, layer.digest), timeout=10)
    assert sha256_digest(good.content) == layer.digest
    # another digest was never affected
    assert sha256_digest(httpx.get(blob_url(proxy, image.config_digest), timeout=10).content) == image.config_digest
    assert proxy.blob_gets(layer.digest) == 2
    assert [r.fault for r in proxy.records] == ["corrupt", None, None]


def test_wrong_digest_manifest(proxy, pushed):
    _, image = pushed
    proxy.wrong_digest(image.manifest_digest)
    url = f"{proxy.url}/v2/test/bb/manifests/{image.manifest_digest}"
    resp = httpx.get(url, headers={"Accept": OCI_MANIFEST}, timeout=10)
    assert resp.status_code == 200
    assert sha256_digest(resp.content) != image.manifest_digest
    assert resp.headers["Docker-Content-Digest"] == image.manifest_digest
    json.loads(resp.content)  # still a manifest: only its digest is wrong
    # by tag it is untouched (the fault is for that digest only)
    tagged = httpx.get(f"{proxy.url}/v2/test/bb/manifests/v1", headers={"Accept": OCI_MANIFEST}, timeout=10)
    assert sha256_digest(tagged.content) == image.manifest_digest


def test_cut_after_gives_a_short_body_then_recovers(proxy, pushed):
    _, image = pushed
    layer = image.layers[1]
    proxy.cut_after(1000, times=2, digest=layer.digest)
    for _ in range(2):
        got = bytearray()
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream("GET", blob_url(proxy, layer.digest), timeout=10) as resp,
        ):
            assert resp.headers["Content-Length"] == str(layer.size)
            for chunk in resp.iter_raw():
                got += chunk
        assert len(got) == 1000
    whole = httpx.get(blob_url(proxy, layer.digest), timeout=10)
    assert sha256_digest(whole.content) == layer.digest
    assert proxy.blob_gets(layer.digest) == 3


def test_range_requests_pass_through(proxy, pushed):
    _, image = pushed
    layer = image.layers[1]
    resp = httpx.get(blob_url(proxy, layer.digest), headers={"Range": "bytes=1000-"}, timeout=10)
    assert resp.status_code == 206
    assert resp.content == layer.blob[1000:]


def test_stall_after_trips_the_read_timeout_and_stop_does_not_hang(started, pushed):
    registry, image = pushed
    proxy = FaultProxy(registry.url)
    started(proxy)
    layer = image.layers[1]
    proxy.stall_after(2000, digest=layer.digest)
    got = bytearray()
    began = time.monotonic()
    with (
        pytest.raises(httpx.ReadTimeout),
        httpx.stream("GET", blob_url(proxy, layer.digest), timeout=httpx.Timeout(10, read=1)) as resp,
    ):
        for chunk in resp.iter_raw():
            got += chunk
    assert len(got) == 2000
    assert time.monotonic() - began < 8

    # a client still stuck in a stall when the proxy stops is let go, and stop() returns promptly
    stuck: list[BaseException] = []

    def reader() -> None:
        try:
            with httpx.stream("GET", blob_url(proxy, layer.digest), timeout=30) as r:
                for _ in r.iter_raw():
                    pass
        except httpx.HTTPError as e:
            stuck.append(e)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    deadline = time.monotonic() + 5
    while proxy.blob_gets(layer.digest) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    began = time.monotonic()
    proxy.stop()
    t.join(5)
    assert time.monotonic() - began < 5
    assert not t.is_alive() and stuck and isinstance(stuck[0], httpx.RemoteProtocolError)


def test_slow_is_slow_but_complete(proxy, pushed):
    _, image = pushed
    layer = image.layers[1]  # 256 KiB + tar overhead
    proxy.slow(512 << 10, digest=layer.digest)
    began = time.monotonic()
    resp = httpx.get(blob_url(proxy, layer.digest), timeout=10)
    elapsed = time.monotonic() - began
    assert sha256_digest(resp.content) == layer.digest
    assert 0.4 < elapsed < 5


def test_status_for_the_first_requests(proxy, pushed):
    _, image = pushed
    layer = image.layers[1]
    proxy.fail(503, times=2, retry_after=1)
    first = httpx.get(blob_url(proxy, layer.digest), timeout=10)
    assert first.status_code == 503 and first.headers["Retry-After"] == "1"
    assert httpx.head(blob_url(proxy, layer.digest), timeout=10).status_code == 503
    assert httpx.get(blob_url(proxy, layer.digest), timeout=10).status_code == 200
    proxy.fail(500, times=None, target="manifests")
    assert httpx.get(f"{proxy.url}/v2/test/bb/manifests/v1", timeout=10).status_code == 500
    assert [r.status for r in proxy.records] == [503, 503, 200, 500]


def test_redirect_to_blob_storage_without_authorization(started):
    tokens = started(TokenServer(users={USER: PASSWORD}))
    registry = started(Registry(token_auth=tokens))
    image = busybox_image([Layer([File("/data", os.urandom(64 << 10))], compression="none")])
    push(registry.url, "secure/bb", image, "v1", auth=(USER, PASSWORD))
    proxy = started(FaultProxy(registry.url))
    layer = image.layers[1]
    proxy.redirect(layer.digest)

    with RegistryClient(proxy.url, auth=(USER, PASSWORD)) as client:
        # unauthenticated: the registry's 401 comes back, not a redirect
        assert httpx.get(blob_url_for(proxy, "secure/bb", layer.digest), timeout=10).status_code == 401
        resp = client.request("GET", f"/v2/secure/bb/blobs/{layer.digest}", "secure/bb")
        assert resp.status_code == 307
        location = resp.headers["Location"]
        assert location.startswith(proxy.blob_server.url)
        # httpx drops Authorization when a redirect leaves the origin; blob storage got the bytes without it
        assert sha256_digest(client.get_blob("secure/bb", layer.digest)) == layer.digest
    assert [r.status for r in proxy.blob_server.requests] == [200]
    assert not proxy.blob_server.saw_authorization
    assert proxy.records[-1].authorization and proxy.records[-1].fault == "redirect"

    # a client that forwards its registry credentials to storage is refused (as S3 does) and seen
    forwarded = httpx.get(location, headers={"Authorization": "Bearer leaked"}, timeout=10)
    assert forwarded.status_code == 400
    assert proxy.blob_server.saw_authorization
    # anonymous 401, the client's 401 then 307, and get_blob's 307 (its token cached)
    assert proxy.blob_gets(layer.digest) == 4


def blob_url_for(proxy: FaultProxy, repo: str, digest: str) -> str:
    return f"{proxy.url}/v2/{repo}/blobs/{digest}"


def test_proxy_in_front_of_a_tls_registry(started):
    registry = started(Registry(tls=True, htpasswd={USER: PASSWORD}))
    image = busybox_image()
    push(registry.url, "private/bb", image, "v1", auth=(USER, PASSWORD), verify=registry.ca_file)
    proxy = started(FaultProxy(registry.url, upstream_verify=Path(registry.ca_file)))
    with RegistryClient(proxy.url, auth=(USER, PASSWORD)) as client:
        resp, _ = fetch_json(client, "private/bb", "v1")
        assert sha256_digest(resp.content) == image.manifest_digest


def test_faults_skip_auth_challenges(started):
    tokens = started(TokenServer(users={USER: PASSWORD}))
    registry = started(Registry(token_auth=tokens))
    image = busybox_image()
    push(registry.url, "secure/bb", image, "v1", auth=(USER, PASSWORD))
    proxy = started(FaultProxy(registry.url))
    layer = image.layers[0]
    proxy.cut_after(10, times=1)
    with RegistryClient(proxy.url, auth=(USER, PASSWORD)) as client:
        # the unauthenticated first GET gets its 401 untouched; the authenticated retry is the one cut
        with pytest.raises(httpx.RemoteProtocolError):
            client.get_blob("secure/bb", layer.digest)
        assert sha256_digest(client.get_blob("secure/bb", layer.digest)) == layer.digest
    assert [(r.status, r.fault) for r in proxy.records] == [(401, None), (200, "cut"), (200, None)]
