"""Builds OCI and Docker schema2 images from the host's static busybox, and pushes them to a registry.

Everything is made in memory and deterministically (fixed mtimes, no owner
names, gzip without a timestamp), so the same call gives the same digests.

    image = busybox_image(extra_layers=[Layer([File("/hello", b"hi\\n")])])
    digest = push(registry.url, "library/busybox", image, "latest", verify=registry.verify)

Layers are described with the entry types below (``File``, ``Dir``,
``Symlink``, ``Hardlink``, ``Whiteout``, ``Opaque``), or given as a finished
tar with ``Layer.from_tar``. Paths are written as absolute image paths and
stored without the leading ``/``, the way image builders store them; a path
with ``..`` is stored as given, so tests can build hostile layers.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import platform
import re
import ssl
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import httpx
import zstandard

BUSYBOX = Path("/bin/busybox")
FIXED_MTIME = 1_700_000_000  # 2023-11-14T22:13:20Z
CREATED = "2023-11-14T22:13:20Z"
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Compression = Literal["gzip", "zstd", "none"]
Format = Literal["oci", "docker"]

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER_MEDIA_TYPES: dict[tuple[Format, Compression], str] = {
    ("oci", "none"): "application/vnd.oci.image.layer.v1.tar",
    ("oci", "gzip"): "application/vnd.oci.image.layer.v1.tar+gzip",
    ("oci", "zstd"): "application/vnd.oci.image.layer.v1.tar+zstd",
    ("docker", "none"): "application/vnd.docker.image.rootfs.diff.tar",
    ("docker", "gzip"): "application/vnd.docker.image.rootfs.diff.tar.gzip",
    ("docker", "zstd"): "application/vnd.docker.image.rootfs.diff.tar.zstd",
}
ALL_MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# -- layer entries --


@dataclass(frozen=True)
class File:
    path: str
    content: bytes = b""
    mode: int = 0o644  # may carry setuid/setgid/sticky bits (0o4755)
    uid: int = 0
    gid: int = 0
    mtime: int = FIXED_MTIME


@dataclass(frozen=True)
class Dir:
    path: str
    mode: int = 0o755
    uid: int = 0
    gid: int = 0
    mtime: int = FIXED_MTIME


@dataclass(frozen=True)
class Symlink:
    path: str
    target: str  # stored verbatim: relative, absolute or escaping ("../../../../etc")
    uid: int = 0
    gid: int = 0


@dataclass(frozen=True)
class Hardlink:
    path: str
    target: str  # an image path earlier in the same layer


@dataclass(frozen=True)
class Whiteout:
    """Deletes path from the layers below: an empty ``.wh.<name>`` file beside it."""

    path: str


@dataclass(frozen=True)
class Opaque:
    """Hides everything the layers below have in directory path: ``<path>/.wh..wh..opq``."""

    path: str


TarEntry = File | Dir | Symlink | Hardlink | Whiteout | Opaque


def _name(path: str) -> str:
    return path.lstrip("/")


def _info(
    name: str, kind: bytes, mode: int, *, uid: int = 0, gid: int = 0, mtime: int = FIXED_MTIME
) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.uid, info.gid = uid, gid
    info.uname = info.gname = ""
    info.mtime = mtime
    return info


def build_tar(entries: Iterable[TarEntry]) -> bytes:
    """An uncompressed (PAX) layer tar holding entries in order."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            if isinstance(e, File):
                info = _info(_name(e.path), tarfile.REGTYPE, e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime)
                info.size = len(e.content)
                tar.addfile(info, io.BytesIO(e.content))
            elif isinstance(e, Dir):
                name = _name(e.path).rstrip("/") + "/"
                tar.addfile(_info(name, tarfile.DIRTYPE, e.mode, uid=e.uid, gid=e.gid, mtime=e.mtime))
            elif isinstance(e, Symlink):
                info = _info(_name(e.path), tarfile.SYMTYPE, 0o777, uid=e.uid, gid=e.gid)
                info.linkname = e.target
                tar.addfile(info)
            elif isinstance(e, Hardlink):
                info = _info(_name(e.path), tarfile.LNKTYPE, 0o644)
                info.linkname = _name(e.target)
                tar.addfile(info)
            elif isinstance(e, Whiteout):
                parent, _, base = _name(e.path).rstrip("/").rpartition("/")
                tar.addfile(_info(f"{parent}/.wh.{base}" if parent else f".wh.{base}", tarfile.REGTYPE, 0o600))
            elif isinstance(e, Opaque):
                tar.addfile(_info(_name(e.path).rstrip("/") + "/.wh..wh..opq", tarfile.REGTYPE, 0o600))
            else:
                raise TypeError(f"not a layer entry: {e!r}")
    return out.getvalue()


def compress(data: bytes, compression: Compression, level: int | None = None) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1 if level is None else level, mtime=0)
    if compression == "zstd":
        return zstandard.ZstdCompressor(level=3 if level is None else level).compress(data)
    if compression == "none":
        return data
    raise ValueError(f"unknown compression {compression!r}")


# -- layers, images, indexes --


@dataclass(eq=False)
class Layer:
    entries: Sequence[TarEntry] = ()
    compression: Compression = "gzip"
    level: int | None = None  # gzip 0-9 (default 1), zstd 1-22 (default 3)
    created_by: str = ""  # the history entry
    raw_tar: bytes | None = None  # a finished tar instead of entries

    @classmethod
    def from_tar(cls, tar: bytes, compression: Compression = "gzip", level: int | None = None) -> Layer:
        return cls(compression=compression, level=level, raw_tar=tar)

    @cached_property
    def tar(self) -> bytes:
        return self.raw_tar if self.raw_tar is not None else build_tar(self.entries)

    @cached_property
    def blob(self) -> bytes:
        """The bytes stored in the registry (compressed tar)."""
        return compress(self.tar, self.compression, self.level)

    @cached_property
    def digest(self) -> str:
        return sha256_digest(self.blob)

    @cached_property
    def diff_id(self) -> str:
        """sha256 of the uncompressed tar: what the config's rootfs.diff_ids lists."""
        return sha256_digest(self.tar)

    @property
    def size(self) -> int:
        return len(self.blob)

    @property
    def media_type(self) -> str:
        return self.media_type_for("oci")

    def media_type_for(self, fmt: Format) -> str:
        return LAYER_MEDIA_TYPES[(fmt, self.compression)]

    def descriptor(self, fmt: Format) -> dict[str, Any]:
        return {"mediaType": self.media_type_for(fmt), "digest": self.digest, "size": self.size}


@dataclass
class ImageConfig:
    """The runtime part of the image config (its ``config`` object)."""

    entrypoint: list[str] | None = None
    cmd: list[str] | None = field(default_factory=lambda: ["/bin/sh"])
    env: list[str] = field(default_factory=lambda: [DEFAULT_PATH])
    user: str = ""
    working_dir: str = ""
    stop_signal: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. ExposedPorts, Volumes, Healthcheck

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"Env": list(self.env)}
        if self.entrypoint is not None:
            out["Entrypoint"] = list(self.entrypoint)
        if self.cmd is not None:
            out["Cmd"] = list(self.cmd)
        if self.user:
            out["User"] = self.user
        if self.working_dir:
            out["WorkingDir"] = self.working_dir
        if self.stop_signal:
            out["StopSignal"] = self.stop_signal
        if self.labels:
            out["Labels"] = dict(self.labels)
        out.update(self.extra)
        return out


def host_platform() -> tuple[str, str | None]:
    """(architecture, variant) of this machine in OCI terms."""
    machine = platform.machine().lower()
    table: dict[str, tuple[str, str | None]] = {
        "x86_64": ("amd64", None),
        "amd64": ("amd64", None),
        "aarch64": ("arm64", None),
        "arm64": ("arm64", None),
        "armv7l": ("arm", "v7"),
        "armv6l": ("arm", "v6"),
        "i686": ("386", None),
        "i386": ("386", None),
    }
    return table.get(machine, (machine, None))


@dataclass(eq=False)
class Image:
    layers: list[Layer]
    config: ImageConfig = field(default_factory=ImageConfig)
    os: str = "linux"
    architecture: str = field(default_factory=lambda: host_platform()[0])
    variant: str | None = field(default_factory=lambda: host_platform()[1])
    format: Format = "oci"
    created: str = CREATED
    annotations: dict[str, str] = field(default_factory=dict)  # manifest annotations (OCI only)

    @property
    def config_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"created": self.created, "architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        out["config"] = self.config.to_json()
        out["rootfs"] = {"type": "layers", "diff_ids": [layer.diff_id for layer in self.layers]}
        out["history"] = [
            {"created": self.created, "created_by": layer.created_by or f"criopy test layer {i}"}
            for i, layer in enumerate(self.layers)
        ]
        return out

    @property
    def config_bytes(self) -> bytes:
        return canonical_json(self.config_json)

    @property
    def config_digest(self) -> str:
        return sha256_digest(self.config_bytes)

    @property
    def image_id(self) -> str:
        """What a runtime reports as the image ID: the config digest."""
        return self.config_digest

    @property
    def config_media_type(self) -> str:
        return OCI_CONFIG if self.format == "oci" else DOCKER_CONFIG

    @property
    def media_type(self) -> str:
        return OCI_MANIFEST if self.format == "oci" else DOCKER_MANIFEST

    @property
    def manifest_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "config": {
                "mediaType": self.config_media_type,
                "digest": self.config_digest,
                "size": len(self.config_bytes),
            },
            "layers": [layer.descriptor(self.format) for layer in self.layers],
        }
        if self.annotations and self.format == "oci":
            out["annotations"] = dict(self.annotations)
        return out

    @property
    def manifest_bytes(self) -> bytes:
        return canonical_json(self.manifest_json)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest_bytes)

    @property
    def platform(self) -> dict[str, str]:
        out = {"architecture": self.architecture, "os": self.os}
        if self.variant:
            out["variant"] = self.variant
        return out

    def descriptor(self) -> dict[str, Any]:
        """This image's manifest as an index entry, with its platform."""
        body = self.manifest_bytes
        return {
            "mediaType": self.media_type,
            "digest": sha256_digest(body),
            "size": len(body),
            "platform": self.platform,
        }

    def blobs(self) -> dict[str, bytes]:
        """Every blob (layers, then config) by digest."""
        out = {layer.digest: layer.blob for layer in self.layers}
        out[self.config_digest] = self.config_bytes
        return out

    @property
    def size(self) -> int:
        """Manifest + config + layer blobs, in bytes."""
        return len(self.manifest_bytes) + len(self.config_bytes) + sum(layer.size for layer in self.layers)


@dataclass(eq=False)
class Index:
    """An OCI image index or a Docker manifest list."""

    manifests: list[Image]
    format: Format = "oci"
    annotations: dict[str, str] = field(default_factory=dict)

    @property
    def media_type(self) -> str:
        return OCI_INDEX if self.format == "oci" else DOCKER_MANIFEST_LIST

    @property
    def index_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": self.media_type,
            "manifests": [image.descriptor() for image in self.manifests],
        }
        if self.annotations and self.format == "oci":
            out["annotations"] = dict(self.annotations)
        return out

    @property
    def manifest_bytes(self) -> bytes:
        return canonical_json(self.index_json)

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest_bytes)

    def for_platform(self, architecture: str, variant: str | None = None, os: str = "linux") -> Image:
        for image in self.manifests:
            if (image.os, image.architecture, image.variant) == (os, architecture, variant):
                return image
        raise KeyError(f"no {os}/{architecture}/{variant} in the index")


# -- the busybox base and the images the tests use --


@functools.cache
def _busybox_bytes() -> bytes:
    if not BUSYBOX.exists():
        raise FileNotFoundError(f"{BUSYBOX} is missing: run `make test`, which installs Debian's busybox-static")
    return BUSYBOX.read_bytes()


BUSYBOX_APPLETS = (
    "sh", "echo", "cat", "sleep", "ls", "id", "true", "false", "env", "mkdir", "touch", "rm",
    "wc", "head", "hostname", "readlink", "stat", "kill", "ps", "test", "grep", "date", "stty", "tar",
)  # fmt: skip
PASSWD = (
    "root:x:0:0:root:/root:/bin/sh\n"
    "app:x:1000:1000:app:/home/app:/bin/sh\n"
    "nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
)
GROUP = "root:x:0:\napp:x:1000:\nnogroup:x:65534:\n"


def busybox_entries() -> list[TarEntry]:
    entries: list[TarEntry] = [
        Dir("/bin"),
        File("/bin/busybox", _busybox_bytes(), mode=0o755),
        *(Symlink(f"/bin/{applet}", "busybox") for applet in BUSYBOX_APPLETS),
        Dir("/etc"),
        File("/etc/passwd", PASSWD.encode()),
        File("/etc/group", GROUP.encode()),
        Dir("/root", mode=0o700),
        Dir("/home"),
        Dir("/home/app", uid=1000, gid=1000),
        Dir("/tmp", mode=0o1777),
        Dir("/proc"),
        Dir("/sys"),
        Dir("/dev"),
    ]
    return entries


@functools.cache
def busybox_layer(compression: Compression = "gzip") -> Layer:
    """The base layer (shared between calls: do not mutate)."""
    return Layer(busybox_entries(), compression, created_by="criopy busybox base")


def busybox_image(
    extra_layers: Sequence[Layer] = (),
    *,
    config: ImageConfig | None = None,
    format: Format = "oci",
    compression: Compression = "gzip",
    architecture: str | None = None,
    variant: str | None = None,
    os: str = "linux",
) -> Image:
    """Busybox (with /bin/sh and friends, users root/app/nobody, /tmp 1777) plus extra_layers."""
    host_arch, host_variant = host_platform()
    return Image(
        layers=[busybox_layer(compression), *extra_layers],
        config=config or ImageConfig(),
        os=os,
        architecture=architecture or host_arch,
        variant=variant if architecture else host_variant,
        format=format,
    )


def whiteout_image(format: Format = "oci") -> Image:
    """Layers that delete and hide what earlier layers made.

    Final tree: /data/keep ("keep"), /data/replaced ("new"); /data/gone and
    /data/dir (with its file) are deleted; /opq holds only "new" (its "old" file
    and "sub" dir are hidden by the opaque marker); /dir-then-file is a file
    ("now a file") where the lower layer had a directory.
    """
    lower = Layer(
        [
            Dir("/data"),
            File("/data/keep", b"keep"),
            File("/data/gone", b"gone"),
            File("/data/replaced", b"old"),
            Dir("/data/dir"),
            File("/data/dir/inner", b"inner"),
            Dir("/opq"),
            File("/opq/old", b"old"),
            Dir("/opq/sub"),
            File("/opq/sub/deep", b"deep"),
            Dir("/dir-then-file"),
            File("/dir-then-file/x", b"x"),
        ],
        created_by="lower",
    )
    upper = Layer(
        [
            Whiteout("/data/gone"),
            Whiteout("/data/dir"),
            File("/data/replaced", b"new"),
            Dir("/opq"),
            Opaque("/opq"),
            File("/opq/new", b"new"),
            File("/dir-then-file", b"now a file"),
        ],
        created_by="upper: whiteouts and an opaque dir",
    )
    return busybox_image([lower, upper], format=format)


def hardlink_image(format: Format = "oci") -> Image:
    """/data/original and /data/link are one inode (nlink 2); /data/sub/link2 a third name for it."""
    layer = Layer(
        [
            Dir("/data"),
            File("/data/original", b"linked content\n", mode=0o640, uid=1000, gid=1000),
            Hardlink("/data/link", "/data/original"),
            Dir("/data/sub"),
            Hardlink("/data/sub/link2", "/data/original"),
        ],
        created_by="hardlinks",
    )
    return busybox_image([layer], format=format)


def setuid_image(format: Format = "oci") -> Image:
    """/bin/suid (04755 root), /bin/sgid (02755 root:app), /data/private (0600 app), /shared (sticky 1777)."""
    layer = Layer(
        [
            File("/bin/suid", b"#!/bin/sh\nid\n", mode=0o4755),
            File("/bin/sgid", b"#!/bin/sh\nid\n", mode=0o2755, gid=1000),
            Dir("/data"),
            File("/data/private", b"secret\n", mode=0o600, uid=1000, gid=1000),
            Dir("/shared", mode=0o1777),
        ],
        created_by="special modes",
    )
    return busybox_image([layer], format=format)


ESCAPE_MARKER = "criopy-escape-test"


def escape_image(write_through: bool = False, traversal: bool = False, format: Format = "oci") -> Image:
    """Symlinks pointing outside the root: /outside -> ../../../../etc, /abs -> /etc.

    write_through adds a layer writing ``outside/criopy-escape-test`` (a safe
    unpacker writes it inside the rootfs, never into the host's /etc);
    traversal adds an entry named ``../../criopy-escape-test``.
    """
    layers = [Layer([Symlink("/outside", "../../../../etc"), Symlink("/abs", "/etc")], created_by="escaping symlinks")]
    if write_through:
        layers.append(Layer([File(f"/outside/{ESCAPE_MARKER}", b"escaped\n")], created_by="write through symlink"))
    if traversal:
        layers.append(Layer([File(f"../../{ESCAPE_MARKER}", b"escaped\n")], created_by="path traversal"))
    return busybox_image(layers, format=format)


def many_layers_image(count: int = 64, format: Format = "oci") -> Image:
    """busybox plus count small layers: layer i adds /layers/<i> and rewrites /layers/last to i."""
    layers = [
        Layer([Dir("/layers"), File(f"/layers/{i}", f"{i}\n".encode()), File("/layers/last", f"{i}\n".encode())])
        for i in range(count)
    ]
    return busybox_image(layers, format=format)


def big_image(
    total_mb: int = 128,
    layer_count: int = 4,
    *,
    compression: Compression = "gzip",
    level: int | None = 0,
    files_per_layer: int = 4,
    format: Format = "oci",
) -> Image:
    """busybox plus total_mb MiB of incompressible data over layer_count layers (/big/<layer>/<file>).

    Built fast: os.urandom, and gzip level 0 (stored blocks: valid gzip a puller
    has to inflate and checksum, at a fraction of level 1's build time).
    """
    per_layer = (total_mb << 20) // layer_count
    per_file = max(1, per_layer // files_per_layer)
    layers = []
    for i in range(layer_count):
        entries: list[TarEntry] = [Dir("/big"), Dir(f"/big/{i}")]
        entries += [File(f"/big/{i}/{j}", os.urandom(per_file)) for j in range(files_per_layer)]
        layers.append(Layer(entries, compression, level=level, created_by=f"big {i}"))
    return busybox_image(layers, format=format)


def platform_marker_layer(architecture: str, variant: str | None) -> Layer:
    name = f"linux/{architecture}" + (f"/{variant}" if variant else "")
    return Layer([File("/platform", f"{name}\n".encode())], created_by=f"platform {name}")


def multi_arch_index(format: Format = "oci", extra: Sequence[tuple[str, str | None]] | None = None) -> Index:
    """An index with the host platform first plus two others (arm/v7 and s390x unless the host is one).

    Every child has its own /platform file and PLATFORM env, so their layers
    and configs differ; they all carry the host's busybox (only the host entry
    is meant to run).
    """
    host = host_platform()
    if extra is None:
        candidates = [("arm", "v7"), ("s390x", None), ("ppc64le", None), ("amd64", None)]
        extra = [p for p in candidates if p != host][:2]
    images = []
    for arch, variant in [host, *extra]:
        name = f"linux/{arch}" + (f"/{variant}" if variant else "")
        config = ImageConfig(env=[DEFAULT_PATH, f"PLATFORM={name}"], labels={"platform": name})
        images.append(
            busybox_image(
                [platform_marker_layer(arch, variant)],
                config=config,
                format=format,
                architecture=arch,
                variant=variant,
            )
        )
    return Index(images, format=format)


# -- pushing --


def _verify(verify: bool | str | Path | ssl.SSLContext) -> bool | ssl.SSLContext:
    if isinstance(verify, str | Path):
        return ssl.create_default_context(cafile=str(verify))
    return verify


_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class RegistryClient:
    """A small distribution API client for tests: answers basic and bearer challenges and caches tokens."""

    def __init__(
        self,
        registry_url: str,
        *,
        auth: tuple[str, str] | None = None,
        verify: bool | str | Path | ssl.SSLContext = True,
        timeout: float = 120,
    ) -> None:
        self.base = registry_url.rstrip("/")
        self.auth = auth
        self.http = httpx.Client(verify=_verify(verify), timeout=timeout)
        self.tokens: dict[str, str] = {}
        self.token_requests = 0
        self._basic = False

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _headers(self, scope: str) -> dict[str, str]:
        if scope in self.tokens:
            return {"Authorization": f"Bearer {self.tokens[scope]}"}
        return {}

    def _authenticate(self, challenge: str, scope: str) -> bool:
        scheme, _, params_text = challenge.partition(" ")
        if scheme.lower() == "basic":
            if self.auth is None or self._basic:
                return False
            self._basic = True
            return True
        if scheme.lower() != "bearer":
            return False
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        query = {"scope": scope}
        if "service" in params:
            query["service"] = params["service"]
        self.token_requests += 1
        resp = self.http.get(params["realm"], params=query, auth=self.auth)
        if resp.status_code != 200:
            raise PermissionError(f"token server {params['realm']} refused ({resp.status_code}): {resp.text}")
        body = resp.json()
        self.tokens[scope] = body.get("token") or body["access_token"]
        return True

    def request(self, method: str, url: str, repo: str, actions: str = "pull", **kwargs: Any) -> httpx.Response:
        """One request to the registry (path or absolute URL), authenticating when challenged."""
        full = url if url.startswith(("http://", "https://")) else f"{self.base}{url}"
        scope = f"repository:{repo}:{actions}"
        extra_headers = kwargs.pop("headers", {})
        for _ in range(2):
            auth = self.auth if self._basic else None
            resp = self.http.request(
                method, full, headers={**extra_headers, **self._headers(scope)}, auth=auth, **kwargs
            )
            if resp.status_code != 401:
                return resp
            challenge = resp.headers.get("WWW-Authenticate", "")
            self.tokens.pop(scope, None)
            if not self._authenticate(challenge, scope):
                return resp
        return resp

    def blob_exists(self, repo: str, digest: str) -> bool:
        resp = self.request("HEAD", f"/v2/{repo}/blobs/{digest}", repo, "pull,push")
        return resp.status_code == 200

    def upload_blob(self, repo: str, data: bytes, digest: str | None = None) -> str:
        """Monolithic upload (POST then PUT ?digest=); skipped when the blob is there already."""
        digest = digest or sha256_digest(data)
        if self.blob_exists(repo, digest):
            return digest
        start = self.request("POST", f"/v2/{repo}/blobs/uploads/", repo, "pull,push")
        if start.status_code != 202:
            raise RuntimeError(f"upload start for {repo} failed: {start.status_code} {start.text}")
        location = httpx.URL(self.base + "/").join(start.headers["Location"]).copy_add_param("digest", digest)
        done = self.request(
            "PUT",
            str(location),
            repo,
            "pull,push",
            content=data,
            headers={"Content-Type": "application/octet-stream"},
        )
        if done.status_code != 201:
            raise RuntimeError(f"upload of {digest} to {repo} failed: {done.status_code} {done.text}")
        return digest

    def put_manifest(self, repo: str, reference: str, body: bytes, media_type: str) -> str:
        resp = self.request(
            "PUT",
            f"/v2/{repo}/manifests/{reference}",
            repo,
            "pull,push",
            content=body,
            headers={"Content-Type": media_type},
        )
        if resp.status_code != 201:
            raise RuntimeError(f"manifest PUT {repo}:{reference} failed: {resp.status_code} {resp.text}")
        digest = sha256_digest(body)
        answered = resp.headers.get("Docker-Content-Digest")
        if answered and answered != digest:
            raise RuntimeError(f"registry stored manifest as {answered}, expected {digest}")
        return digest

    def get_manifest(self, repo: str, reference: str, accept: Sequence[str] = ALL_MANIFEST_TYPES) -> httpx.Response:
        return self.request("GET", f"/v2/{repo}/manifests/{reference}", repo, headers={"Accept": ", ".join(accept)})

    def get_blob(self, repo: str, digest: str) -> bytes:
        resp = self.request("GET", f"/v2/{repo}/blobs/{digest}", repo, follow_redirects=True)
        resp.raise_for_status()
        return resp.content

    def push_image(self, repo: str, image: Image, reference: str | None = None) -> str:
        for digest, data in image.blobs().items():
            self.upload_blob(repo, data, digest)
        return self.put_manifest(repo, reference or image.manifest_digest, image.manifest_bytes, image.media_type)

    def push_index(self, repo: str, index: Index, reference: str | None = None) -> str:
        for image in index.manifests:
            self.push_image(repo, image)
        return self.put_manifest(repo, reference or index.manifest_digest, index.manifest_bytes, index.media_type)


def push(
    registry_url: str,
    repo: str,
    image: Image,
    tag: str | None = None,
    *,
    auth: tuple[str, str] | None = None,
    verify: bool | str | Path | ssl.SSLContext = True,
) -> str:
    """Uploads image's blobs and puts its manifest under tag (or by digest); returns the manifest digest."""
    with RegistryClient(registry_url, auth=auth, verify=verify) as client:
        return client.push_image(repo, image, tag)


def push_index(
    registry_url: str,
    repo: str,
    index: Index,
    tag: str | None = None,
    *,
    auth: tuple[str, str] | None = None,
    verify: bool | str | Path | ssl.SSLContext = True,
) -> str:
    """Pushes every child image by digest, then the index under tag; returns the index digest."""
    with RegistryClient(registry_url, auth=auth, verify=verify) as client:
        return client.push_index(repo, index, tag)
