"""The registry client against in-process fakes (httpx.MockTransport) that behave like a registry."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import ssl
import sys
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from cri.config import ImageConfig, MirrorConfig, RegistryConfig
from cri.images.auth import Credentials, TokenCache
from cri.images.content import ContentStore, Writer
from cri.images.platform import Platform
from cri.images.reference import parse
from cri.images.registry import (
    MEDIA_DOCKER_LIST,
    MEDIA_DOCKER_MANIFEST,
    MEDIA_OCI_INDEX,
    MEDIA_OCI_MANIFEST,
    BlobUnknown,
    DigestMismatch,
    Endpoint,
    ManifestUnknown,
    PlatformUnavailable,
    PullStalled,
    RegistryBlocked,
    RegistryClient,
    RegistryError,
    RegistryUnauthorized,
    UnsupportedManifest,
    endpoints_for,
)

REALM = "https://auth.example/token"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True).encode()


def descriptor(media_type: str, data: bytes, **extra: Any) -> dict[str, Any]:
    return {"mediaType": media_type, "digest": sha(data), "size": len(data), **extra}


class Image:
    """A small image: a config and one layer, with its manifest."""

    def __init__(self, arch: str = "amd64", layer: bytes | None = None, media_type: str = MEDIA_OCI_MANIFEST):
        self.config = dumps({"architecture": arch, "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}})
        self.layer = layer if layer is not None else (f"layer for {arch} ".encode() * 100)
        self.manifest_obj: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": descriptor("application/vnd.oci.image.config.v1+json", self.config),
            "layers": [descriptor("application/vnd.oci.image.layer.v1.tar+gzip", self.layer)],
        }
        self.manifest = dumps(self.manifest_obj)
        self.media_type = media_type
        self.digest = sha(self.manifest)

    @property
    def layer_descriptor(self) -> dict[str, Any]:
        return self.manifest_obj["layers"][0]


Handler = Callable[[httpx.Request], Any]


class Network:
    """Routes requests by host to fakes; records every request; can refuse https per host."""

    def __init__(self) -> None:
        self.hosts: dict[str, Handler] = {}
        self.requests: list[httpx.Request] = []
        self.refuse_https: set[str] = set()

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        host = request.url.netloc.decode()
        if request.url.scheme == "https" and host in self.refuse_https:
            raise httpx.ConnectError("[SSL: WRONG_VERSION_NUMBER] wrong version number", request=request)
        handler = self.hosts.get(host)
        if handler is None:
            raise httpx.ConnectError(f"connection refused: {host}", request=request)
        response = handler(request)
        if asyncio.iscoroutine(response):
            response = await response
        return response

    def to(self, host: str) -> list[httpx.Request]:
        return [r for r in self.requests if r.url.netloc.decode() == host]


def registry_error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"errors": [{"code": code, "message": message}]})


class FakeRegistry:
    """Enough of the distribution API: /v2/<repo>/manifests/<ref>, /v2/<repo>/blobs/<digest>, auth, faults."""

    def __init__(self, host: str, auth: str | None = None, users: dict[str, str] | None = None) -> None:
        self.host = host
        self.auth = auth  # None, "basic" or "bearer"
        self.users = users if users is not None else {"alice": "secret"}
        self.manifests: dict[tuple[str, str], tuple[str, bytes, dict[str, str]]] = {}
        self.blobs: dict[str, bytes] = {}
        self.valid_tokens: set[str] = set()
        # path -> responses (or callables making one) served before the real answer, one per request.
        self.faults: dict[str, list[Any]] = {}
        self.blob_redirect: str | None = None
        self.blob_body: Callable[[bytes], Any] | None = None  # replaces the blob body (slow/stalling streams)

    def put_manifest(self, repo: str, ref: str, body: bytes, content_type: str, **headers: str) -> None:
        self.manifests[(repo, ref)] = (content_type, body, headers)
        self.manifests[(repo, sha(body))] = (content_type, body, headers)

    def push(self, repo: str, tag: str, image: Image) -> None:
        self.put_manifest(repo, tag, image.manifest, image.media_type)
        self.blobs[sha(image.config)] = image.config
        self.blobs[sha(image.layer)] = image.layer

    def fault(self, path: str, *responses: Any) -> None:
        self.faults.setdefault(path, []).extend(responses)

    def _authorized(self, request: httpx.Request, repo: str) -> httpx.Response | None:
        header = request.headers.get("authorization", "")
        if self.auth == "basic":
            expected = {"Basic " + base64.b64encode(f"{u}:{p}".encode()).decode() for u, p in self.users.items()}
            if header in expected:
                return None
            return httpx.Response(401, headers={"WWW-Authenticate": 'Basic realm="fake registry"'})
        if self.auth == "bearer":
            if header.startswith("Bearer ") and header[7:] in self.valid_tokens:
                return None
            challenge = f'Bearer realm="{REALM}",service="{self.host}",scope="repository:{repo}:pull"'
            return httpx.Response(
                401,
                headers={"WWW-Authenticate": challenge},
                json={"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
            )
        return None

    def __call__(self, request: httpx.Request) -> httpx.Response:  # noqa: PLR0911 - one return per route
        path = request.url.path
        queue = self.faults.get(path)
        if queue:
            fault = queue.pop(0)
            return fault(request) if callable(fault) else fault
        if path == "/v2/":
            return httpx.Response(200)
        if "/manifests/" in path:
            repo, ref = path[len("/v2/") :].split("/manifests/")
            denied = self._authorized(request, repo)
            if denied is not None:
                return denied
            found = self.manifests.get((repo, ref))
            if found is None:
                return registry_error(404, "MANIFEST_UNKNOWN", "manifest unknown")
            content_type, body, headers = found
            return httpx.Response(
                200,
                content=body,
                headers={"Content-Type": content_type, "Docker-Content-Digest": sha(body), **headers},
            )
        if "/blobs/" in path:
            repo, digest = path[len("/v2/") :].split("/blobs/")
            denied = self._authorized(request, repo)
            if denied is not None:
                return denied
            data = self.blobs.get(digest)
            if data is None:
                return registry_error(404, "BLOB_UNKNOWN", "blob unknown")
            if self.blob_redirect:
                return httpx.Response(307, headers={"Location": f"{self.blob_redirect}/{digest}?sig=abc"})
            if self.blob_body is not None:
                return httpx.Response(200, content=self.blob_body(data))
            return httpx.Response(200, content=data, headers={"Content-Type": "application/octet-stream"})
        return httpx.Response(404)


class TokenServer:
    """The token service at auth.example: basic-authenticated users, or anonymous when allowed."""

    def __init__(self, registry: FakeRegistry, anonymous: bool = True, expires_in: int = 300) -> None:
        self.registry = registry
        self.anonymous = anonymous
        self.expires_in = expires_in
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        header = request.headers.get("authorization")
        if header is None:
            if not self.anonymous:
                return httpx.Response(401)
        else:
            user, _, password = base64.b64decode(header.split()[1]).decode().partition(":")
            if self.registry.users.get(user) != password:
                return httpx.Response(401, json={"details": "incorrect username or password"})
        token = f"token-{len(self.requests)}"
        self.registry.valid_tokens.add(token)
        return httpx.Response(200, json={"token": token, "expires_in": self.expires_in})


class Setup:
    def __init__(self, tmp_path, config: ImageConfig | None = None, **client_args: Any) -> None:
        self.net = Network()
        self.store = ContentStore(tmp_path / "content")
        self.sleeps: list[float] = []

        async def sleep(delay: float) -> None:
            self.sleeps.append(delay)

        client_args.setdefault("sleep", sleep)
        self.client_args = client_args
        self.config = config if config is not None else ImageConfig()

    def add(self, handler: Handler, host: str | None = None) -> Any:
        self.net.hosts[host or handler.host] = handler  # type: ignore[attr-defined]
        return handler

    def client(self) -> RegistryClient:
        return RegistryClient(self.config, transport=httpx.MockTransport(self.net), **self.client_args)

    def run(self, body: Callable[[RegistryClient], Any]) -> Any:
        async def main() -> Any:
            async with self.client() as client:
                return await body(client)

        return asyncio.run(main())

    def pull(self, image_ref: str, credentials: Credentials | None = None, platform: Platform | None = None) -> Any:
        """resolve + platform manifest + config and layers into the store, like the image manager will."""

        async def body(client: RegistryClient) -> Any:
            resolved = await client.resolve(parse(image_ref), credentials)
            manifest = await client.platform_manifest(resolved, platform or Platform("linux", "amd64"))
            data = manifest.json()
            for desc in [data["config"], *data["layers"]]:

                async def fetch(writer: Writer, desc: dict[str, Any] = desc) -> None:
                    await client.fetch_blob(resolved.endpoint, desc, writer)

                await self.store.ensure(desc["digest"], desc["size"], fetch)
            return resolved, manifest

        return self.run(body)


# -- endpoint resolution


def test_endpoints_default_and_docker_hub_host():
    [ep] = endpoints_for("docker.io/library/busybox", [])
    assert (ep.host, ep.repository, ep.registry, ep.insecure, ep.mirror) == (
        "registry-1.docker.io",
        "library/busybox",
        "docker.io",
        False,
        False,
    )
    [ep] = endpoints_for("localhost:5000/a/b", [])
    assert (ep.host, ep.repository, ep.registry) == ("localhost:5000", "a/b", "localhost:5000")


def test_endpoints_mirrors_then_origin_with_location_and_longest_prefix():
    registries = [
        RegistryConfig(prefix="docker.io", mirrors=[MirrorConfig(location="m1.example/hub", insecure=True)]),
        RegistryConfig(
            prefix="docker.io/library",
            location="origin.example:5000/lib",
            insecure=True,
            mirrors=[MirrorConfig(location="m2.example"), MirrorConfig(location="m3.example/x")],
        ),
    ]
    eps = endpoints_for("docker.io/library/busybox", registries)
    assert [(e.host, e.repository, e.mirror, e.insecure) for e in eps] == [
        ("m2.example", "busybox", True, False),
        ("m3.example", "x/busybox", True, False),
        ("origin.example:5000", "lib/busybox", False, True),
    ]
    eps = endpoints_for("docker.io/user/app", registries)
    assert [(e.host, e.repository, e.insecure) for e in eps] == [
        ("m1.example", "hub/user/app", True),
        ("registry-1.docker.io", "user/app", False),
    ]


def test_prefix_matches_on_path_component_boundaries():
    registries = [RegistryConfig(prefix="reg.example/ab", blocked=True)]
    assert endpoints_for("reg.example/abc", registries)[0].host == "reg.example"
    with pytest.raises(RegistryBlocked):
        endpoints_for("reg.example/ab", registries)
    with pytest.raises(RegistryBlocked):
        endpoints_for("reg.example/ab/c", registries)


def test_wildcard_prefix():
    registries = [RegistryConfig(prefix="*.corp.example", insecure=True)]
    [ep] = endpoints_for("reg.corp.example/team/app", registries)
    assert ep.insecure
    assert not endpoints_for("corp.example/team/app", registries)[0].insecure


def test_blocked_prefix_refuses_the_pull(tmp_path):
    setup = Setup(tmp_path, ImageConfig(registries=[RegistryConfig(prefix="evil.example", blocked=True)]))
    with pytest.raises(RegistryBlocked) as info:
        setup.pull("evil.example/app:1")
    assert "evil.example" in str(info.value)
    assert setup.net.requests == []


# -- resolving


def test_resolve_by_tag_and_pull_blobs(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("team/app", "v1", image)
    resolved, manifest = setup.pull("reg.example/team/app:v1")
    assert resolved.manifest_digest == image.digest
    assert resolved.media_type == MEDIA_OCI_MANIFEST
    assert resolved.body == image.manifest
    assert resolved.endpoint.name == "reg.example/team/app"
    assert manifest.digest == image.digest
    assert setup.store.read(sha(image.layer)) == image.layer
    assert setup.store.read(sha(image.config)) == image.config
    manifest_request = setup.net.requests[0]
    assert MEDIA_OCI_INDEX in manifest_request.headers["accept"]
    assert MEDIA_DOCKER_MANIFEST in manifest_request.headers["accept"]
    assert manifest_request.headers["user-agent"].startswith("criopy/")


def test_resolve_by_digest_verifies_the_body(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)
    resolved, _ = setup.pull(f"reg.example/app@{image.digest}")
    assert resolved.manifest_digest == image.digest
    assert setup.net.requests[0].url.path == f"/v2/app/manifests/{image.digest}"

    other = Image(arch="arm64")
    reg.manifests[("app", image.digest)] = (MEDIA_OCI_MANIFEST, other.manifest, {})  # a lying registry
    with pytest.raises(DigestMismatch) as info:
        setup.pull(f"reg.example/app@{image.digest}")
    assert image.digest in str(info.value)
    assert other.digest in str(info.value)


def test_docker_content_digest_that_does_not_match_is_refused(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.put_manifest("app", "v1", image.manifest, MEDIA_OCI_MANIFEST, **{"Docker-Content-Digest": sha(b"other")})
    with pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
        setup.pull("reg.example/app:v1")


def test_unknown_image_names_the_reference(tmp_path):
    setup = Setup(tmp_path)
    setup.add(FakeRegistry("reg.example"))
    with pytest.raises(ManifestUnknown) as info:
        setup.pull("reg.example/nope:v9")
    assert "reg.example/nope:v9" in str(info.value)
    assert "MANIFEST_UNKNOWN" in str(info.value)


def oci_index(*images: tuple[Image, dict[str, str]], media_type: str = MEDIA_OCI_INDEX) -> bytes:
    return dumps(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "manifests": [descriptor(img.media_type, img.manifest, platform=plat) for img, plat in images],
        }
    )


@pytest.mark.parametrize(
    ("index_type", "child_type"),
    [(MEDIA_OCI_INDEX, MEDIA_OCI_MANIFEST), (MEDIA_DOCKER_LIST, MEDIA_DOCKER_MANIFEST)],
)
@pytest.mark.parametrize(
    ("host", "arch"),
    [(Platform("linux", "amd64"), "amd64"), (Platform("linux", "arm64", "v8"), "arm64")],
)
def test_index_resolves_to_the_host_platform(tmp_path, index_type, child_type, host, arch):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    amd, arm = Image("amd64", media_type=child_type), Image("arm64", media_type=child_type)
    for img in (amd, arm):
        reg.push("multi", img.digest, img)
    index = oci_index(
        (amd, {"os": "linux", "architecture": "amd64"}),
        (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}),
        media_type=index_type,
    )
    reg.put_manifest("multi", "latest", index, index_type)
    resolved, manifest = setup.pull("reg.example/multi", platform=host)
    assert resolved.is_index
    assert resolved.manifest_digest == sha(index)
    assert resolved.media_type == index_type
    chosen = amd if arch == "amd64" else arm
    assert manifest.digest == chosen.digest
    assert manifest.media_type == child_type
    assert setup.store.has(sha(chosen.layer))
    other = arm if chosen is amd else amd
    assert not setup.store.has(sha(other.layer))


def test_index_without_the_host_platform(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    arm = Image("arm64")
    reg.push("multi", arm.digest, arm)
    reg.put_manifest("multi", "latest", oci_index((arm, {"os": "linux", "architecture": "arm64"})), MEDIA_OCI_INDEX)
    with pytest.raises(PlatformUnavailable, match="linux/arm64"):
        setup.pull("reg.example/multi", platform=Platform("linux", "amd64"))


def test_media_type_sniffed_when_the_content_type_is_generic(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    obj = dict(image.manifest_obj)
    del obj["mediaType"]
    body = dumps(obj)
    reg.put_manifest("app", "v1", body, "application/json")
    resolved = setup.run(lambda client: client.resolve(parse("reg.example/app:v1")))
    assert resolved.media_type == MEDIA_OCI_MANIFEST


SCHEMA1 = dumps({"schemaVersion": 1, "name": "app", "tag": "old", "fsLayers": [], "history": []})


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/json",
    ],
)
def test_schema1_is_refused_with_advice(tmp_path, content_type):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    reg.put_manifest("app", "old", SCHEMA1, content_type)
    with pytest.raises(UnsupportedManifest) as info:
        setup.pull("reg.example/app:old")
    message = str(info.value)
    assert "schema 1" in message
    assert "not supported" in message
    assert "schema 2" in message
    assert "OCI" in message


def test_unknown_media_type_and_garbage_are_refused(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    reg.put_manifest("app", "weird", dumps({"schemaVersion": 2, "mediaType": "application/x-helm"}), "text/plain")
    reg.put_manifest("app", "garbage", b"<html>", "text/html")
    with pytest.raises(UnsupportedManifest, match="application/x-helm"):
        setup.pull("reg.example/app:weird")
    with pytest.raises(UnsupportedManifest, match="not a JSON object"):
        setup.pull("reg.example/app:garbage")


# -- authentication


def bearer_setup(tmp_path, anonymous: bool = True, **kwargs: Any) -> tuple[Setup, FakeRegistry, TokenServer]:
    setup = Setup(tmp_path, **kwargs)
    reg = setup.add(FakeRegistry("reg.example", auth="bearer"))
    tokens = TokenServer(reg, anonymous=anonymous)
    setup.add(tokens, "auth.example")
    reg.push("team/app", "v1", Image())
    return setup, reg, tokens


def test_bearer_challenge_fetches_a_token_with_credentials(tmp_path):
    setup, _, tokens = bearer_setup(tmp_path, anonymous=False)
    setup.pull("reg.example/team/app:v1", Credentials("alice", "secret"))
    [token_request] = tokens.requests
    assert token_request.url.params["service"] == "reg.example"
    assert token_request.url.params["scope"] == "repository:team/app:pull"
    assert token_request.headers["authorization"] == "Basic " + base64.b64encode(b"alice:secret").decode()
    registry_requests = setup.net.to("reg.example")
    # The first request is challenged; after that the token goes up front (no 401 per blob).
    assert "authorization" not in registry_requests[0].headers
    assert all(r.headers["authorization"] == "Bearer token-1" for r in registry_requests[1:])
    assert len(registry_requests) == 4  # 401, manifest, config, layer


def test_token_cache_spans_pulls_until_expiry(tmp_path):
    clock = [0.0]
    cache = TokenCache(margin=10, clock=lambda: clock[0])
    setup, _, tokens = bearer_setup(tmp_path, tokens=cache)

    async def two_pulls(client: RegistryClient) -> None:
        await client.resolve(parse("reg.example/team/app:v1"))
        await client.resolve(parse("reg.example/team/app:v1"))
        assert len(tokens.requests) == 1
        clock[0] += 300  # expired
        await client.resolve(parse("reg.example/team/app:v1"))
        assert len(tokens.requests) == 2

    setup.run(two_pulls)
    assert cache.fetches == 2


def test_token_rejected_by_the_registry_is_refreshed_once(tmp_path):
    setup, reg, tokens = bearer_setup(tmp_path)

    async def body(client: RegistryClient) -> None:
        await client.resolve(parse("reg.example/team/app:v1"))
        reg.valid_tokens.clear()  # the registry forgot (restarted with a new key)
        await client.resolve(parse("reg.example/team/app:v1"))

    setup.run(body)
    assert len(tokens.requests) == 2


def test_wrong_credentials_are_unauthorized(tmp_path):
    setup, _, _ = bearer_setup(tmp_path, anonymous=False)
    with pytest.raises(RegistryUnauthorized) as info:
        setup.pull("reg.example/team/app:v1", Credentials("alice", "wrong"))
    assert "reg.example" in str(info.value)
    assert "rejected the credentials" in str(info.value)


def test_missing_credentials_are_unauthorized(tmp_path):
    setup, _, _ = bearer_setup(tmp_path, anonymous=False)
    with pytest.raises(RegistryUnauthorized) as info:
        setup.pull("reg.example/team/app:v1")
    assert "reg.example" in str(info.value)
    assert "no credentials" in str(info.value)


def test_anonymous_token_for_a_private_repository_is_unauthorized(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example", auth="bearer"))
    setup.add(TokenServer(reg), "auth.example")
    reg.push("team/app", "v1", Image())

    def private(request: httpx.Request) -> httpx.Response:
        return httpx.Response(401, headers={"WWW-Authenticate": f'Bearer realm="{REALM}",service="reg.example"'})

    reg.fault("/v2/team/app/manifests/v1", private, private)
    with pytest.raises(RegistryUnauthorized, match="no credentials were given"):
        setup.pull("reg.example/team/app:v1")


def test_basic_auth(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example", auth="basic"))
    reg.push("app", "v1", Image())
    setup.pull("reg.example/app:v1", Credentials("alice", "secret"))
    expected = "Basic " + base64.b64encode(b"alice:secret").decode()
    assert [r.headers.get("authorization") for r in setup.net.requests] == [None, expected, expected, expected]
    with pytest.raises(RegistryUnauthorized, match="rejected the credentials"):
        setup.pull("reg.example/app:v1", Credentials("alice", "nope"))
    with pytest.raises(RegistryUnauthorized, match="no credentials were given"):
        setup.pull("reg.example/app:v1")


def test_registry_token_from_the_kubelet_is_the_bearer_token(tmp_path):
    setup, reg, tokens = bearer_setup(tmp_path)
    reg.valid_tokens.add("kubelet-token")
    setup.pull("reg.example/team/app:v1", Credentials(registry_token="kubelet-token"))
    assert tokens.requests == []
    assert setup.net.to("reg.example")[1].headers["authorization"] == "Bearer kubelet-token"


def test_auth_file_is_used_and_reread_at_each_pull(tmp_path):
    auth_file = tmp_path / "auth.json"

    def write(user: str, password: str) -> None:
        auth = base64.b64encode(f"{user}:{password}".encode()).decode()
        auth_file.write_text(json.dumps({"auths": {"reg.example": {"auth": auth}}}))

    setup = Setup(tmp_path, ImageConfig(auth_file=str(auth_file)))
    reg = setup.add(FakeRegistry("reg.example", auth="basic", users={"bob": "pw1"}))
    reg.push("app", "v1", Image())

    async def body(client: RegistryClient) -> None:
        write("bob", "pw1")
        await client.resolve(parse("reg.example/app:v1"))
        reg.users = {"bob": "pw2"}
        write("bob", "pw2")
        await client.resolve(parse("reg.example/app:v1"))
        # Request credentials win over the file.
        with pytest.raises(RegistryUnauthorized):
            await client.resolve(parse("reg.example/app:v1"), Credentials("bob", "pw1"))

    setup.run(body)


def test_malformed_auth_file_fails_the_pull_naming_it(tmp_path):
    auth_file = tmp_path / "auth.json"
    auth_file.write_text("{broken")
    setup = Setup(tmp_path, ImageConfig(auth_file=str(auth_file)))
    setup.add(FakeRegistry("reg.example"))
    with pytest.raises(RegistryError, match=str(auth_file)):
        setup.pull("reg.example/app:v1")


# -- mirrors


def test_mirror_500s_next_mirror_serves_and_blobs_come_from_it(tmp_path):
    config = ImageConfig(
        registries=[
            RegistryConfig(
                prefix="docker.io",
                mirrors=[MirrorConfig(location="m1.example"), MirrorConfig(location="m2.example/hub")],
            )
        ]
    )
    setup = Setup(tmp_path, config)
    broken = setup.add(FakeRegistry("m1.example"))
    broken.fault("/v2/library/busybox/manifests/latest", *[httpx.Response(500)] * 3)
    good = setup.add(FakeRegistry("m2.example"))
    image = Image()
    good.push("hub/library/busybox", "latest", image)
    resolved, _ = setup.pull("busybox")
    assert resolved.endpoint.host == "m2.example"
    assert resolved.endpoint.repository == "hub/library/busybox"
    assert resolved.endpoint.mirror
    assert len(setup.net.to("m1.example")) == 3  # retried, then moved on
    assert setup.net.to("registry-1.docker.io") == []
    blob_paths = [r.url.path for r in setup.net.to("m2.example") if "/blobs/" in r.url.path]
    assert blob_paths == [
        f"/v2/hub/library/busybox/blobs/{sha(image.config)}",
        f"/v2/hub/library/busybox/blobs/{sha(image.layer)}",
    ]
    assert setup.sleeps == [0.2, 0.4]


def test_every_endpoint_failing_lists_each_failure(tmp_path):
    config = ImageConfig(
        registries=[RegistryConfig(prefix="reg.example", mirrors=[MirrorConfig(location="down.example")])]
    )
    setup = Setup(tmp_path, config, attempts=1)
    setup.add(FakeRegistry("reg.example"))  # has nothing: 404
    with pytest.raises(ManifestUnknown) as info:
        setup.pull("reg.example/app:v1")
    message = str(info.value)
    assert "every endpoint failed" in message
    assert "[down.example/app]" in message
    assert "connection refused" in message
    assert "[reg.example/app]" in message
    assert "not found" in message


def test_insecure_registry_falls_back_to_http(tmp_path):
    config = ImageConfig(registries=[RegistryConfig(prefix="plain.example:5000", insecure=True)])
    setup = Setup(tmp_path, config)
    reg = setup.add(FakeRegistry("plain.example:5000"))
    reg.push("app", "v1", Image())
    setup.net.refuse_https.add("plain.example:5000")
    setup.pull("plain.example:5000/app:v1")
    schemes = [r.url.scheme for r in setup.net.requests]
    assert schemes == ["https", "http", "http", "http"]  # remembered after the first fallback


def test_secure_registry_does_not_fall_back_to_http(tmp_path):
    setup = Setup(tmp_path, attempts=1)
    reg = setup.add(FakeRegistry("plain.example:5000"))
    reg.push("app", "v1", Image())
    setup.net.refuse_https.add("plain.example:5000")
    with pytest.raises(RegistryError, match="WRONG_VERSION_NUMBER"):
        setup.pull("plain.example:5000/app:v1")
    assert {r.url.scheme for r in setup.net.requests} == {"https"}


# -- redirects


def test_blob_redirect_to_another_host_drops_authorization(tmp_path):
    setup, reg, _ = bearer_setup(tmp_path)
    reg.blob_redirect = "https://storage.example/blobs"

    def storage(request: httpx.Request) -> httpx.Response:
        digest = request.url.path.rsplit("/", 1)[1]
        return httpx.Response(200, content=reg.blobs[digest])

    setup.add(storage, "storage.example")
    image_layer = sha(Image().layer)
    setup.pull("reg.example/team/app:v1")
    storage_requests = setup.net.to("storage.example")
    assert len(storage_requests) == 2
    assert all("authorization" not in r.headers for r in storage_requests)
    assert storage_requests[1].url.params["sig"] == "abc"
    blob_requests = [r for r in setup.net.to("reg.example") if "/blobs/" in r.url.path]
    assert all(r.headers["authorization"].startswith("Bearer ") for r in blob_requests)
    assert setup.store.has(image_layer)


# -- blob integrity and retries


def test_blob_with_wrong_content_never_lands(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)
    reg.blobs[sha(image.layer)] = b"X" * len(image.layer)  # same size, other bytes
    with pytest.raises(DigestMismatch) as info:
        setup.pull("reg.example/app:v1")
    assert sha(image.layer) in str(info.value)
    assert not setup.store.has(sha(image.layer))
    assert sha(image.layer) not in setup.store.list()
    assert list(setup.store.ingest_dir.iterdir()) == []
    # Not retried: a registry serving wrong bytes is not a transient failure.
    assert len([r for r in setup.net.requests if sha(image.layer) in r.url.path]) == 1


def test_blob_longer_than_declared_fails_at_once(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)
    reg.blobs[sha(image.layer)] = image.layer + b"more"
    with pytest.raises(DigestMismatch, match="more than"):
        setup.pull("reg.example/app:v1")
    assert list(setup.store.ingest_dir.iterdir()) == []


def test_truncated_body_is_retried_then_succeeds(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)
    path = f"/v2/app/blobs/{sha(image.layer)}"
    reg.fault(path, httpx.Response(200, content=image.layer[:100]), httpx.Response(503))
    setup.pull("reg.example/app:v1")
    assert setup.store.read(sha(image.layer)) == image.layer
    assert len([r for r in setup.net.requests if r.url.path == path]) == 3
    assert setup.sleeps == [0.2, 0.4]


def test_transient_errors_give_up_after_the_attempts(tmp_path):
    setup = Setup(tmp_path, attempts=3, backoff=1.0, max_backoff=1.5)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)
    path = f"/v2/app/blobs/{sha(image.layer)}"

    def reset(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset by peer", request=request)

    reg.fault(path, httpx.Response(429, headers={"Retry-After": "1"}), reset, httpx.Response(502))
    with pytest.raises(RegistryError) as info:
        setup.pull("reg.example/app:v1")
    assert "502" in str(info.value)
    assert "3 attempts" in str(info.value)
    assert setup.sleeps == [1.0, 1.5]  # exponential, bounded
    assert list(setup.store.ingest_dir.iterdir()) == []


def test_missing_blob(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)
    del reg.blobs[sha(image.layer)]
    with pytest.raises(BlobUnknown, match=sha(image.layer)):
        setup.pull("reg.example/app:v1")


def test_stalled_download_fails_within_the_progress_timeout(tmp_path):
    setup = Setup(tmp_path, ImageConfig(pull_progress_timeout=1), progress_timeout=0.3)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)

    async def stalling(data: bytes):
        yield data[:10]
        await asyncio.sleep(30)
        yield data[10:]

    reg.blob_body = stalling
    started = time.monotonic()
    with pytest.raises(PullStalled) as info:
        setup.pull("reg.example/app:v1")
    elapsed = time.monotonic() - started
    assert elapsed < 2.0
    assert "0.3s" in str(info.value)
    assert "blob sha256:" in str(info.value)
    assert list(setup.store.ingest_dir.iterdir()) == []


def test_slow_but_progressing_download_succeeds(tmp_path):
    setup = Setup(tmp_path, progress_timeout=0.3)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)

    async def trickle(data: bytes):
        step = max(1, len(data) // 8)
        for i in range(0, len(data), step):
            await asyncio.sleep(0.1)  # total ~0.8s+, well over the timeout, never idle for 0.3s
            yield data[i : i + step]

    reg.blob_body = trickle
    started = time.monotonic()
    setup.pull("reg.example/app:v1")
    assert time.monotonic() - started > 0.6
    assert setup.store.read(sha(image.layer)) == image.layer


def test_progress_timeout_comes_from_the_config(tmp_path):
    assert RegistryClient(ImageConfig(pull_progress_timeout=7)).progress_timeout == 7
    assert RegistryClient(ImageConfig(pull_progress_timeout=0)).progress_timeout is None
    assert RegistryClient(ImageConfig(), progress_timeout=2.5).progress_timeout == 2.5


def test_fetch_manifest_verifies_the_digest(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)
    ep = Endpoint("reg.example", "app")

    async def body(client: RegistryClient) -> None:
        manifest = await client.fetch_manifest(ep, image.digest)
        assert manifest.body == image.manifest
        reg.manifests[("app", image.digest)] = (MEDIA_OCI_MANIFEST, Image("arm64").manifest, {})
        with pytest.raises(DigestMismatch):
            await client.fetch_manifest(ep, image.digest)
        with pytest.raises(UnsupportedManifest):
            await client.fetch_manifest(ep, "sha256:short")

    setup.run(body)


def test_blob_descriptor_is_validated(tmp_path):
    setup = Setup(tmp_path)

    class Sink:
        async def write(self, chunk: bytes) -> None: ...

        async def reset(self) -> None: ...

    async def body(client: RegistryClient) -> None:
        ep = Endpoint("reg.example", "app")
        with pytest.raises(UnsupportedManifest, match="invalid digest"):
            await client.fetch_blob(ep, {"digest": "sha256:../../x", "size": 1}, Sink())
        with pytest.raises(UnsupportedManifest, match="invalid size"):
            await client.fetch_blob(ep, {"digest": sha(b""), "size": -1}, Sink())

    setup.run(body)
    assert setup.net.requests == []


# -- TLS material


def test_certs_d_files_are_found(tmp_path):
    containers = tmp_path / "containers"
    docker = tmp_path / "docker"
    (containers / "reg.example:5000").mkdir(parents=True)
    (docker / "reg.example:5000").mkdir(parents=True)
    (containers / "reg.example:5000" / "ca.crt").write_text("x")
    (docker / "reg.example:5000" / "other.crt").write_text("x")
    (docker / "reg.example:5000" / "client.cert").write_text("x")
    (docker / "reg.example:5000" / "client.key").write_text("x")
    (docker / "reg.example:5000" / "lonely.cert").write_text("x")
    client = RegistryClient(certs_dirs=[containers, docker])
    assert client.ca_files("reg.example:5000") == [
        containers / "reg.example:5000" / "ca.crt",
        docker / "reg.example:5000" / "other.crt",
    ]
    assert client.client_certs("reg.example:5000") == [
        (docker / "reg.example:5000" / "client.cert", docker / "reg.example:5000" / "client.key")
    ]
    assert client.ca_files("other.example") == []
    # A file that is not a certificate is reported with its path.
    with pytest.raises(RegistryError, match=r"ca\.crt"):
        client.ssl_context("reg.example:5000")


def test_ssl_context_without_extra_material():
    client = RegistryClient(certs_dirs=[])
    assert client.ssl_context("reg.example").verify_mode.name == "CERT_REQUIRED"


def test_manifest_cut_short_is_retried(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)
    short = httpx.Response(
        200,
        content=image.manifest[:20],
        headers={"Content-Type": MEDIA_OCI_MANIFEST, "Content-Length": str(len(image.manifest))},
    )
    reg.fault("/v2/app/manifests/v1", short)
    resolved, _ = setup.pull("reg.example/app:v1")
    assert resolved.manifest_digest == image.digest
    assert setup.sleeps == [0.2]


def test_redirect_loop_is_an_error_not_a_retry(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)
    loop = httpx.Response(302, headers={"Location": "/v2/app/manifests/v1"})
    reg.fault("/v2/app/manifests/v1", *[loop] * 20)
    with pytest.raises(RegistryError, match="TooManyRedirects"):
        setup.pull("reg.example/app:v1")
    assert setup.sleeps == []


def test_forbidden_is_unauthorized_with_the_registry_message(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    reg.fault("/v2/app/manifests/v1", registry_error(403, "DENIED", "requested access to the resource is denied"))
    with pytest.raises(RegistryUnauthorized) as info:
        setup.pull("reg.example/app:v1")
    assert "reg.example" in str(info.value)
    assert "DENIED: requested access to the resource is denied" in str(info.value)


def test_concurrent_pulls_of_one_image_download_each_blob_once(tmp_path):
    setup = Setup(tmp_path)
    reg = setup.add(FakeRegistry("reg.example"))
    image = Image()
    reg.push("app", "v1", image)

    async def slow(data: bytes):
        await asyncio.sleep(0.05)
        yield data

    reg.blob_body = slow

    async def body(client: RegistryClient) -> None:
        async def pull() -> None:
            resolved = await client.resolve(parse("reg.example/app:v1"))
            desc = image.layer_descriptor

            async def fetch(writer: Writer) -> None:
                await client.fetch_blob(resolved.endpoint, desc, writer)

            await setup.store.ensure(desc["digest"], desc["size"], fetch)

        await asyncio.gather(pull(), pull())

    setup.run(body)
    layer_requests = [r for r in setup.net.requests if sha(image.layer) in r.url.path]
    assert len(layer_requests) == 1
    assert setup.store.fetch_counts[sha(image.layer)] == 1


def test_untrusted_certificate_is_not_retried_and_says_what_to_do(tmp_path):
    setup = Setup(tmp_path)

    def untrusted(request: httpx.Request) -> httpx.Response:
        try:
            raise ssl.SSLCertVerificationError(1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed")
        except ssl.SSLError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc

    setup.add(untrusted, "selfsigned.example")
    with pytest.raises(RegistryError) as info:
        setup.pull("selfsigned.example/app:v1")
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)
    assert "insecure" in str(info.value)
    assert setup.sleeps == []
    assert len(setup.net.requests) == 1


def test_httpcore_learns_the_async_library_without_a_failed_import_each_time():
    """httpcore asks sniffio which library runs on every lock, event and shield it sets up (several per blob
    chunk); without sniffio installed each ask was a failed import searching sys.path, on the event loop."""
    from httpcore._synchronization import current_async_library

    async def ask() -> str:
        return current_async_library()

    asyncio.run(ask())  # a first import may search; every later ask must not
    searched: list[str] = []

    class SpyFinder:
        @staticmethod
        def find_spec(name: str, path: object = None, target: object = None) -> None:
            searched.append(name)

    sys.meta_path.insert(0, SpyFinder)
    try:
        assert asyncio.run(ask()) == "asyncio"
    finally:
        sys.meta_path.remove(SpyFinder)
    assert searched == []
