"""The OCI distribution v2 client: resolve a reference, fetch manifests and blobs.

Where to pull from comes from `image.registries` (modelled on
containers-registries.conf): the entry with the longest prefix matching the
image name decides whether it is blocked, which mirrors are tried first, where
the origin really is, and whether TLS may be skipped. Mirrors are tried in order,
then the origin; the endpoint that served the manifest serves the blobs too.

Every request goes through one path: the scheme (https, and for insecure
registries http when TLS fails), authentication (401 -> challenge -> Basic or a
Bearer token -> retry once), redirects (followed by httpx, which drops the
Authorization header when the redirect leaves the registry's origin), retries
with exponential backoff on transient failures (connection errors, 429, 5xx, a
body cut short), and stall detection: a body that delivers no bytes for
`progress_timeout` seconds fails with PullStalled, however long the whole
download takes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import json
import logging
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx

from cri import __version__
from cri.config import ImageConfig, RegistryConfig
from cri.images.auth import (
    AuthFileError,
    Challenge,
    Credentials,
    TokenCache,
    TokenError,
    basic_header,
    from_auth_file,
    parse_challenges,
    pick_challenge,
)
from cri.images.downloads import BlobDownloads
from cri.images.platform import NoMatchingPlatform, Platform, choose, host_platform
from cri.images.reference import DEFAULT_DOMAIN, Reference, validate_digest
from cri.log import event

log = logging.getLogger(__name__)

MEDIA_OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MEDIA_DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
MEDIA_SCHEMA1 = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
    }
)
INDEX_TYPES = frozenset({MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST})
MANIFEST_TYPES = frozenset({MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST})
ACCEPT = ", ".join((MEDIA_OCI_INDEX, MEDIA_DOCKER_LIST, MEDIA_OCI_MANIFEST, MEDIA_DOCKER_MANIFEST))

MAX_MANIFEST_BYTES = 4 << 20
DOCKER_HUB_HOST = "registry-1.docker.io"
DEFAULT_CERTS_DIRS = (Path("/etc/containers/certs.d"), Path("/etc/docker/certs.d"))
USER_AGENT = f"criopy/{__version__}"

T = TypeVar("T")


# ---------------------------------------------------------------------------
# Errors: one flat family; cri/errors maps them to gRPC codes.


# What httpx imports on its first request (its transport, anyio's asyncio backend, h11/h2): 78 modules,
# about 0.15 s on the loop of the first pull after start-up unless loaded beforehand.
_HTTP_STACK = ("httpcore", "anyio._backends._asyncio", "h11", "cri.images.socket_backend")


# httpcore reads a response 64 KiB at a time, and each read is a round through the network backend, h11 and our
# sink; during a blob download a read of 256 KiB mostly comes back full (measured): reading that much per round
# quarters the rounds of a blob download (httpcore's class attribute, read on every receive).
HTTP_READ_SIZE = 256 * 1024


def preload_http_stack() -> None:
    """Import what the first request would; blocking, for a thread while the daemon already serves."""
    for module in _HTTP_STACK:
        importlib.import_module(module)
    # The process's first TLS context initialises OpenSSL: 20 ms on the loop of the first pull otherwise
    # (every client makes one, an insecure one too).
    ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def _read_more_per_round() -> None:
    # httpx's transport, imported by the first client (or by preload_http_stack before it)
    connection = importlib.import_module("httpcore").AsyncHTTP11Connection
    connection.READ_NUM_BYTES = max(connection.READ_NUM_BYTES, HTTP_READ_SIZE)


def _socket_transport(verify: ssl.SSLContext | bool) -> httpx.AsyncBaseTransport | None:
    """httpx's transport on cri.images.socket_backend (half the CPU a body costs through anyio); None, for
    httpx's own, when the environment names a proxy, which httpx honours with its own transport only.
    Imported on first use, as httpx imports httpcore: not in the daemon's start-up."""
    backend = importlib.import_module("cri.images.socket_backend")
    if backend.environment_proxies():
        return None
    transport: httpx.AsyncBaseTransport = backend.socket_transport(verify)
    return transport


class RegistryError(Exception):
    """A pull failed at the registry; the message says where and why."""


class RegistryUnauthorized(RegistryError):
    """Credentials were missing or rejected."""


class RegistryUnavailable(RegistryError):
    """The registry could not be reached, or kept failing (5xx, 429), through every retry."""


class RegistryBlocked(RegistryError):
    """The registries configuration blocks the image's registry."""


class ManifestUnknown(RegistryError):
    """No such image (repository or tag/digest) at the registry."""


class BlobUnknown(RegistryError):
    """The registry does not have a blob its own manifest refers to."""


class UnsupportedManifest(RegistryError):
    """Schema 1, an unknown media type, or a manifest that is not JSON."""


class PlatformUnavailable(RegistryError):
    """The image index has no manifest for this host's platform."""


class DigestMismatch(RegistryError):
    """Bytes did not match the digest (or size) they were promised under."""


class PullStalled(RegistryError):
    """A download received nothing for `progress_timeout` seconds."""


class _Transient(Exception):
    """Worth another attempt: connection trouble, 429/5xx, a body cut short."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# ---------------------------------------------------------------------------
# Endpoints


class BlobSink(Protocol):
    """Where fetch_blob puts the bytes: content.Writer is one."""

    async def write(self, chunk: bytes) -> None: ...

    async def reset(self) -> None: ...


@dataclass(frozen=True)
class Endpoint:
    """One place an image can be pulled from.

    `host` is what is dialled (`registry-1.docker.io` for docker.io), `repository` the
    image's path there (mirrors may remap it), `registry` the name used for
    credentials and messages (`docker.io`, the mirror's location). `credentials`
    are the ones chosen for this endpoint by RegistryClient.endpoints().
    """

    host: str
    repository: str
    insecure: bool = False
    mirror: bool = False
    registry: str = ""
    credentials: Credentials | None = field(default=None, repr=False, compare=False)

    @property
    def name(self) -> str:
        return f"{self.host}/{self.repository}"


def _prefix_matches(prefix: str, name: str) -> bool:
    if prefix.startswith("*."):
        domain = name.split("/", 1)[0]
        return domain.endswith(prefix[1:])
    return name == prefix or name.startswith(prefix + "/")


def _normalize_prefix(prefix: str) -> str:
    prefix = prefix.strip().rstrip("/")
    if prefix == "index.docker.io" or prefix.startswith("index.docker.io/"):
        prefix = DEFAULT_DOMAIN + prefix[len("index.docker.io") :]
    return prefix


def find_registry(name: str, registries: Sequence[RegistryConfig]) -> tuple[str, RegistryConfig] | None:
    """The entry whose prefix is the longest match of `name` on path-component boundaries, with that prefix."""
    best: tuple[str, RegistryConfig] | None = None
    for entry in registries:
        prefix = _normalize_prefix(entry.prefix or entry.location)
        if prefix and _prefix_matches(prefix, name) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, entry)
    return best


def _endpoint(location: str, insecure: bool, mirror: bool) -> Endpoint:
    host, _, repository = location.partition("/")
    if not host or not repository:
        raise RegistryError(f"registries configuration: {location!r} leaves no repository to pull")
    registry = host
    if host in (DEFAULT_DOMAIN, "index.docker.io"):
        registry, host = DEFAULT_DOMAIN, DOCKER_HUB_HOST
    return Endpoint(host, repository, insecure, mirror, registry)


def endpoints_for(name: str, registries: Sequence[RegistryConfig]) -> list[Endpoint]:
    """Mirrors in order, then the origin, for the image `name` (`domain/path`); RegistryBlocked if blocked."""
    found = find_registry(name, registries)
    if found is None:
        return [_endpoint(name, False, False)]
    prefix, entry = found
    if entry.blocked:
        raise RegistryBlocked(
            f"pulling {name} is refused: registry {prefix} is blocked by the registries configuration"
        )
    wildcard = prefix.startswith("*.")
    rest = "" if wildcard else name[len(prefix) :]
    out = [
        _endpoint(mirror.location.rstrip("/") + rest, mirror.insecure, True)
        for mirror in entry.mirrors
        if mirror.location
    ]
    origin = name if wildcard or not entry.location else entry.location.rstrip("/") + rest
    out.append(_endpoint(origin, entry.insecure, False))
    return out


# ---------------------------------------------------------------------------
# Results


def _parse_json(body: bytes) -> dict[str, Any]:
    data = json.loads(body)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


@dataclass(frozen=True)
class Manifest:
    digest: str
    media_type: str
    body: bytes = field(repr=False)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def json(self) -> dict[str, Any]:
        return _parse_json(self.body)


@dataclass(frozen=True)
class Resolved:
    """What a reference resolved to: the top-level manifest (maybe an index) and who served it."""

    reference: Reference
    endpoint: Endpoint
    manifest_digest: str
    media_type: str
    body: bytes = field(repr=False)

    @property
    def is_index(self) -> bool:
        return self.media_type in INDEX_TYPES

    def json(self) -> dict[str, Any]:
        return _parse_json(self.body)

    def manifest(self) -> Manifest:
        return Manifest(self.manifest_digest, self.media_type, self.body)


def _schema1(what: str) -> UnsupportedManifest:
    return UnsupportedManifest(
        f"{what}: the image has a Docker schema 1 manifest, which is not supported; "
        "push the image with a schema 2 (Docker) or OCI manifest"
    )


def manifest_media_type(content_type: str, body: bytes, what: str) -> str:
    """The media type of a manifest body; UnsupportedManifest for schema 1 and unknown kinds."""
    ctype = content_type.split(";", 1)[0].strip().lower()
    if ctype in MEDIA_SCHEMA1:
        raise _schema1(what)
    try:
        data = _parse_json(body)
    except ValueError as exc:
        raise UnsupportedManifest(f"{what}: the manifest is not a JSON object ({exc})") from None
    if data.get("schemaVersion") == 1:
        raise _schema1(what)
    media_type = data.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        if ctype in INDEX_TYPES or ctype in MANIFEST_TYPES:
            media_type = ctype
        elif "manifests" in data:
            media_type = MEDIA_OCI_INDEX
        elif "config" in data and "layers" in data:
            media_type = MEDIA_OCI_MANIFEST
        else:
            media_type = ctype
    if media_type in MEDIA_SCHEMA1:
        raise _schema1(what)
    if media_type not in INDEX_TYPES and media_type not in MANIFEST_TYPES:
        raise UnsupportedManifest(f"{what}: unsupported manifest media type {media_type!r}")
    return media_type


def compute_digest(data: bytes, algorithm: str = "sha256") -> str:
    return f"{algorithm}:{hashlib.new(algorithm, data).hexdigest()}"


def _descriptor(descriptor: Mapping[str, Any], what: str) -> tuple[str, int]:
    digest = descriptor.get("digest")
    size = descriptor.get("size")
    if not isinstance(digest, str) or validate_digest(digest) is not None:
        raise UnsupportedManifest(f"{what}: descriptor has an invalid digest {digest!r}")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UnsupportedManifest(f"{what}: descriptor of {digest} has an invalid size {size!r}")
    return digest, size


def _describe(response: httpx.Response) -> str:
    """`404 Not Found (MANIFEST_UNKNOWN: manifest unknown)` from a registry error answer."""
    text = f"{response.status_code} {response.reason_phrase}".strip()
    try:
        errors = response.json().get("errors")
        first = errors[0]
        text += f" ({first.get('code', '')}: {first.get('message', '')})"
    except Exception:  # any body that is not a registry error document
        pass
    return text


def _tls_verification_failed(exc: BaseException) -> bool:
    """A certificate the client does not trust: retrying cannot help."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers.get("retry-after", ""))
    except ValueError:
        return None


# ---------------------------------------------------------------------------
# The client


class RegistryClient:
    """Pulls manifests and blobs; one per daemon (it holds connection pools, tokens and per-host state).

    `config` is read at every pull, so assigning a reloaded ImageConfig applies
    new registries and auth file at the next pull. `ca_file` adds a CA bundle
    trusted for every registry; `certs_dirs` are searched for
    `<dir>/<host[:port]>/*.crt` (CAs) and `*.cert`/`*.key` (client certificates),
    like containers/image. `transport` replaces the network (tests pass an
    httpx.MockTransport).
    """

    def __init__(
        self,
        config: ImageConfig | None = None,
        *,
        ca_file: str | Path | None = None,
        certs_dirs: Sequence[str | Path] = DEFAULT_CERTS_DIRS,
        transport: httpx.AsyncBaseTransport | None = None,
        progress_timeout: float | None = None,
        attempts: int = 3,
        backoff: float = 0.2,
        max_backoff: float = 5.0,
        connect_timeout: float = 30.0,
        tokens: TokenCache | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        blobs_off_loop: bool = False,
    ) -> None:
        self.config = config if config is not None else ImageConfig()
        self.ca_file = Path(ca_file) if ca_file else None
        self.certs_dirs = [Path(d) for d in certs_dirs]
        self.transport = transport
        self._progress_timeout = progress_timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.connect_timeout = connect_timeout
        self.tokens = tokens if tokens is not None else TokenCache()
        self._sleep = sleep
        self._clients: dict[tuple[str, bool], httpx.AsyncClient] = {}
        self._schemes: dict[str, str] = {}  # insecure hosts that turned out to speak plain http
        self._challenges: dict[str, Challenge] = {}  # host -> its last challenge, to authenticate up front
        # Blob bodies on a loop of their own (cri.images.downloads); not with a transport of the caller's loop.
        self._downloads = BlobDownloads(self._download_client) if blobs_off_loop and transport is None else None

    def _download_client(self) -> RegistryClient:
        return RegistryClient(
            self.config,
            ca_file=self.ca_file,
            certs_dirs=self.certs_dirs,
            progress_timeout=self._progress_timeout,
            attempts=self.attempts,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            connect_timeout=self.connect_timeout,
        )

    @property
    def progress_timeout(self) -> float | None:
        """Seconds without a byte before a download fails; None (or <= 0 configured) means no limit."""
        value = self._progress_timeout
        if value is None:
            value = float(self.config.pull_progress_timeout)
        return value if value > 0 else None

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()
        if self._downloads is not None:
            await self._downloads.aclose()

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- TLS and connections

    def _cert_dirs(self, host: str) -> list[Path]:
        return [d / host for d in self.certs_dirs if (d / host).is_dir()]

    def ca_files(self, host: str) -> list[Path]:
        """CA certificates configured for `host` (host[:port]) in the certs.d directories."""
        return [p for d in self._cert_dirs(host) for p in sorted(d.glob("*.crt"))]

    def client_certs(self, host: str) -> list[tuple[Path, Path]]:
        """(certificate, key) pairs for `host`: `name.cert` with its `name.key`."""
        out = []
        for d in self._cert_dirs(host):
            for cert in sorted(d.glob("*.cert")):
                key = cert.with_suffix(".key")
                if key.is_file():
                    out.append((cert, key))
        return out

    def ssl_context(self, host: str) -> ssl.SSLContext:
        """System CAs + ca_file + the host's certs.d CAs and client certificates."""
        ctx = ssl.create_default_context()
        files = ([self.ca_file] if self.ca_file else []) + self.ca_files(host)
        for path in files:
            try:
                ctx.load_verify_locations(cafile=str(path))
            except (OSError, ssl.SSLError) as exc:
                raise RegistryError(f"cannot load CA certificate {path} for {host}: {exc}") from exc
        for cert, key in self.client_certs(host):
            try:
                ctx.load_cert_chain(str(cert), str(key))
            except (OSError, ssl.SSLError) as exc:
                raise RegistryError(f"cannot load client certificate {cert} for {host}: {exc}") from exc
        return ctx

    def _client(self, host: str, insecure: bool) -> httpx.AsyncClient:
        client = self._clients.get((host, insecure))
        if client is None:
            _read_more_per_round()
            progress = self.progress_timeout
            # httpx's read timeout is only a backstop: stalls are detected per chunk (see _next_chunk).
            read = None if progress is None else progress + 5.0
            timeout = httpx.Timeout(self.connect_timeout, read=read)
            common: dict[str, Any] = {
                "timeout": timeout,
                "follow_redirects": True,
                "max_redirects": 10,
                "headers": {"User-Agent": USER_AGENT},
            }
            if self.transport is not None:
                client = httpx.AsyncClient(transport=self.transport, **common)
            else:
                verify: ssl.SSLContext | bool = False if insecure else self.ssl_context(host)
                client = httpx.AsyncClient(verify=verify, transport=_socket_transport(verify), **common)
            self._clients[(host, insecure)] = client
        return client

    async def _send(
        self, ep: Endpoint, method: str, path: str, headers: Mapping[str, str], stream: bool
    ) -> httpx.Response:
        """One HTTP exchange; an insecure endpoint falls back from https to http when TLS fails."""
        client = self._client(ep.host, ep.insecure)
        scheme = self._schemes.get(ep.host, "https")
        request = client.build_request(method, f"{scheme}://{ep.host}{path}", headers=dict(headers))
        try:
            return await client.send(request, stream=stream)
        except httpx.ConnectError as exc:
            if not ep.insecure or scheme == "http":
                raise
            event(log, logging.DEBUG, "registry.http_fallback", host=ep.host, error=str(exc))
        request = client.build_request(method, f"http://{ep.host}{path}", headers=dict(headers))
        response = await client.send(request, stream=stream)
        self._schemes[ep.host] = "http"
        return response

    # -- authentication

    async def _authorization(self, ep: Endpoint, challenge: Challenge, refresh: bool = False) -> str | None:
        """The Authorization value answering `challenge`; None when there is nothing to answer with."""
        creds = ep.credentials
        if challenge.scheme == "basic":
            return basic_header(creds) if creds and creds.username else None
        realm = challenge.realm
        realm_host = httpx.URL(realm).netloc.decode() if realm.startswith(("http://", "https://")) else ""
        # The token server gets the registry's TLS settings, with its own host's certs.d material.
        client = self._client(realm_host or ep.host, ep.insecure)
        scopes = [f"repository:{ep.repository}:pull"]
        try:
            token = await self.tokens.token(client, challenge, scopes, creds, refresh=refresh)
        except TokenError as exc:
            if exc.status in (401, 403):
                raise self._unauthorized(ep, f"the token server refused ({exc})") from exc
            if exc.status is None or exc.status == 429 or exc.status >= 500:
                raise _Transient(str(exc)) from exc
            raise RegistryError(f"{ep.registry}: cannot get a token: {exc}") from exc
        return f"Bearer {token}"

    def _unauthorized(self, ep: Endpoint, detail: str) -> RegistryUnauthorized:
        creds = ep.credentials
        if creds is None or creds.is_empty():
            what = "requires authentication and no credentials were given"
        else:
            what = "rejected the credentials"
        return RegistryUnauthorized(f"registry {ep.registry or ep.host} {what} for {ep.repository}: {detail}")

    async def _request(
        self, ep: Endpoint, method: str, path: str, headers: Mapping[str, str], *, stream: bool
    ) -> httpx.Response:
        """A request with authentication: up front when the host's challenge is known, else after its 401."""
        sent_auth = False
        known = self._challenges.get(ep.host)
        all_headers = dict(headers)
        if known is not None:
            authorization = await self._authorization(ep, known)
            if authorization:
                all_headers["Authorization"] = authorization
                sent_auth = True
        response = await self._send(ep, method, path, all_headers, stream)
        if response.status_code == 403:
            await response.aread()
            await response.aclose()
            raise self._unauthorized(ep, _describe(response))
        if response.status_code != 401:
            return response
        await response.aclose()
        challenge = pick_challenge(parse_challenges(response.headers.get_list("www-authenticate")))
        if challenge is None:
            raise self._unauthorized(ep, "401 Unauthorized without a Basic or Bearer challenge")
        self._challenges[ep.host] = challenge
        authorization = await self._authorization(ep, challenge, refresh=sent_auth)
        if authorization is None:
            raise self._unauthorized(ep, f"the registry asks for {challenge.scheme.capitalize()} authentication")
        all_headers["Authorization"] = authorization
        response = await self._send(ep, method, path, all_headers, stream)
        if response.status_code in (401, 403):
            await response.aread()
            await response.aclose()
            raise self._unauthorized(ep, _describe(response))
        return response

    # -- retries, status and bodies

    async def _retrying(self, what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        last: _Transient | None = None
        for number in range(self.attempts):
            if last is not None:
                delay = min(self.max_backoff, self.backoff * 2 ** (number - 1))
                if last.retry_after is not None:
                    delay = max(delay, min(last.retry_after, self.max_backoff))
                event(
                    log, logging.WARNING, "registry.retry", what=what, attempt=number + 1, delay=delay, error=str(last)
                )
                await self._sleep(delay)
            try:
                return await attempt()
            except _Transient as exc:
                last = exc
            except httpx.ConnectError as exc:
                if _tls_verification_failed(exc):
                    raise RegistryError(
                        f"{what}: {exc}; trust the registry's CA (certs.d, or the CA file the daemon was given) "
                        "or mark the registry insecure"
                    ) from exc
                last = _Transient(f"{type(exc).__name__}: {exc}")
            except httpx.TransportError as exc:
                last = _Transient(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            except httpx.HTTPError as exc:  # too many redirects, an undecodable body: not worth retrying
                raise RegistryError(f"{what}: {type(exc).__name__}: {exc}") from exc
        raise RegistryUnavailable(f"{what}: {last} (gave up after {self.attempts} attempts)")

    async def _check_status(self, response: httpx.Response, what: str) -> None:
        if response.status_code in (200, 203):
            return
        await response.aread()
        if response.status_code == 429 or response.status_code >= 500:
            raise _Transient(f"{response.url.host} answered {_describe(response)}", _retry_after(response))
        raise RegistryError(f"{what}: {response.url.host} answered {_describe(response)}")

    async def _next_chunk(self, chunks: AsyncIterator[bytes], what: str) -> bytes | None:
        """The next piece of a body, None at its end; PullStalled when nothing comes for progress_timeout."""
        timeout = self.progress_timeout
        try:
            if timeout is None:
                return await anext(chunks)
            async with asyncio.timeout(timeout):  # unlike wait_for, no task per chunk
                return await anext(chunks)
        except StopAsyncIteration:
            return None
        except (TimeoutError, httpx.ReadTimeout):
            raise PullStalled(f"{what}: no data received for {timeout:g}s, the download stalled") from None

    async def _stalling(self, awaitable: Awaitable[T], what: str) -> T:
        """Waiting for the response headers counts against the progress timeout too."""
        timeout = self.progress_timeout
        if timeout is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, timeout)
        except TimeoutError:
            raise PullStalled(f"{what}: no response for {timeout:g}s, the download stalled") from None

    # -- manifests

    async def _get_manifest(self, ep: Endpoint, obj: str, what: str) -> tuple[bytes, str, str]:
        path = f"/v2/{ep.repository}/manifests/{obj}"
        headers = {"Accept": ACCEPT, "Accept-Encoding": "identity"}
        response = await self._stalling(self._request(ep, "GET", path, headers, stream=True), what)
        try:
            if response.status_code == 404:
                await response.aread()
                raise ManifestUnknown(f"image {what} not found at {ep.host}: {_describe(response)}")
            await self._check_status(response, what)
            body = bytearray()
            chunks = response.aiter_bytes()
            while (chunk := await self._next_chunk(chunks, f"manifest of {what}")) is not None:
                body += chunk
                if len(body) > MAX_MANIFEST_BYTES:
                    raise UnsupportedManifest(f"{what}: the manifest is larger than {MAX_MANIFEST_BYTES} bytes")
            length = response.headers.get("content-length", "")
            encoded = response.headers.get("content-encoding", "identity").lower() != "identity"
            if length.isdigit() and not encoded and int(length) != len(body):
                raise _Transient(f"manifest body cut short: {len(body)} of {length} bytes")
        finally:
            await response.aclose()
        return bytes(body), response.headers.get("content-type", ""), response.headers.get("docker-content-digest", "")

    async def _manifest_at(self, ep: Endpoint, obj: str, expected: str | None, what: str) -> Manifest:
        body, content_type, header_digest = await self._retrying(
            f"fetching the manifest of {what} from {ep.host}", lambda: self._get_manifest(ep, obj, what)
        )
        media_type = manifest_media_type(content_type, body, what)
        if expected is not None:
            actual = compute_digest(body, expected.split(":", 1)[0])
            if actual != expected:
                raise DigestMismatch(f"{what}: {ep.host} served a manifest with digest {actual}, expected {expected}")
            digest = expected if expected.startswith("sha256:") else compute_digest(body)
        else:
            digest = compute_digest(body)
            algorithm = header_digest.split(":", 1)[0]
            if header_digest and validate_digest(header_digest) is None:
                actual = compute_digest(body, algorithm)
                if actual != header_digest:
                    raise DigestMismatch(
                        f"{what}: {ep.host} says the manifest is {header_digest} (Docker-Content-Digest) "
                        f"but its content is {actual}"
                    )
        return Manifest(digest, media_type, body)

    def endpoints(self, ref: Reference, credentials: Credentials | None = None) -> list[Endpoint]:
        """Where to try, in order, each with its credentials: the request's, else the auth file's (re-read now)."""
        out = []
        for ep in endpoints_for(ref.name, self.config.registries):
            creds = credentials if credentials is not None and not credentials.is_empty() else None
            if creds is None and self.config.auth_file:
                try:
                    creds = from_auth_file(self.config.auth_file, ep.registry, ep.repository)
                except AuthFileError as exc:
                    raise RegistryError(str(exc)) from exc
            out.append(dataclasses.replace(ep, credentials=creds))
        return out

    async def resolve(self, ref: Reference, credentials: Credentials | None = None) -> Resolved:
        """The top-level manifest of `ref` (maybe an index), from the first endpoint that has it.

        A manifest pulled by digest must hash to that digest; one pulled by tag is
        checked against Docker-Content-Digest when the registry sends it.
        """
        endpoints = self.endpoints(ref, credentials)
        failures: list[tuple[Endpoint, RegistryError]] = []
        for ep in endpoints:
            try:
                manifest = await self._manifest_at(ep, ref.object, ref.digest, ref.string())
            except RegistryError as exc:
                event(
                    log, logging.INFO, "registry.endpoint_failed", image=ref.string(), endpoint=ep.name, error=str(exc)
                )
                failures.append((ep, exc))
                continue
            event(
                log,
                logging.DEBUG,
                "registry.resolved",
                image=ref.string(),
                endpoint=ep.name,
                digest=manifest.digest,
                media_type=manifest.media_type,
            )
            return Resolved(ref, ep, manifest.digest, manifest.media_type, manifest.body)
        last = failures[-1][1]
        if len(failures) == 1:
            raise last
        detail = "; ".join(f"[{ep.name}] {exc}" for ep, exc in failures)
        raise type(last)(f"pulling {ref.string()}: every endpoint failed: {detail}") from last

    async def fetch_manifest(self, endpoint: Endpoint, digest: str) -> Manifest:
        """The manifest `digest` from `endpoint` (the one that resolved the index), verified."""
        problem = validate_digest(digest)
        if problem:
            raise UnsupportedManifest(f"{endpoint.name}: {problem}")
        return await self._manifest_at(endpoint, digest, digest, f"{endpoint.name}@{digest}")

    async def platform_manifest(self, resolved: Resolved, platform: Platform | None = None) -> Manifest:
        """The image manifest for `platform` (default: this host): the resolved one, or its index's entry."""
        if not resolved.is_index:
            return resolved.manifest()
        target = platform if platform is not None else host_platform()
        try:
            descriptor = choose(resolved.json(), target)
        except NoMatchingPlatform as exc:
            raise PlatformUnavailable(f"{resolved.reference.string()}: {exc}") from exc
        digest, size = _descriptor(descriptor, resolved.reference.string())
        child = await self.fetch_manifest(resolved.endpoint, digest)
        if len(child.body) != size:
            raise DigestMismatch(
                f"{resolved.reference.string()}: manifest {digest} is {len(child.body)} bytes, the index says {size}"
            )
        if child.is_index:
            raise UnsupportedManifest(f"{resolved.reference.string()}: nested image indexes are not supported")
        return child

    # -- blobs

    async def fetch_blob(self, endpoint: Endpoint, descriptor: Mapping[str, Any], sink: BlobSink) -> None:
        """Stream the blob of `descriptor` (digest, size) from `endpoint` into `sink`.

        Retried from the start (sink.reset()) on transient failures and short
        bodies. More bytes than the descriptor's size fail at once. The digest
        itself is checked by the sink (content.Writer) when it commits.
        """
        if self._downloads is not None:
            await self._downloads.fetch_blob(self, endpoint, descriptor, sink)
            return
        digest, size = _descriptor(descriptor, endpoint.name)
        what = f"blob {digest} of {endpoint.name}"
        path = f"/v2/{endpoint.repository}/blobs/{digest}"
        attempts = 0

        async def attempt() -> None:
            nonlocal attempts
            attempts += 1
            if attempts > 1:
                await sink.reset()
            response = await self._stalling(
                self._request(endpoint, "GET", path, {"Accept-Encoding": "identity"}, stream=True), what
            )
            try:
                if response.status_code == 404:
                    await response.aread()
                    raise BlobUnknown(f"{what}: the registry does not have it ({_describe(response)})")
                await self._check_status(response, what)
                received = 0
                chunks = response.aiter_bytes()
                while (chunk := await self._next_chunk(chunks, what)) is not None:
                    received += len(chunk)
                    if received > size:
                        raise DigestMismatch(
                            f"{what}: the registry sent more than the {size} bytes the manifest declares"
                        )
                    await sink.write(chunk)
                if received < size:
                    raise _Transient(f"body cut short: {received} of {size} bytes")
            finally:
                await response.aclose()

        await self._retrying(f"fetching {what}", attempt)
