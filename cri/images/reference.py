"""Image references, normalized like docker/distribution's `ParseNormalizedNamed`.

`busybox` is `docker.io/library/busybox:latest`; `user/repo` lives on docker.io; the
first path component is a registry domain only when it contains `.` or `:`, is
`localhost`, or has upper-case letters (which a repository path cannot have).
A reference with neither tag nor digest gets the tag `latest`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_DOMAIN = "docker.io"
LEGACY_DEFAULT_DOMAIN = "index.docker.io"
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255

# The distribution grammar (github.com/distribution/reference/regexp.go).
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = re.compile(rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_DIGEST = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}")
_HEX64 = re.compile(r"[a-f0-9]{64}")
_ID_PREFIX = re.compile(r"sha256:[a-f0-9]{1,64}")

# Digest algorithms the store and the client can verify, with their hex length.
DIGEST_HEX_LENGTH = {"sha256": 64, "sha512": 128}


class ReferenceError(ValueError):
    """A malformed image reference; the message names the reference and the problem.

    The name shadows the builtin inside this module only; callers use `reference.ReferenceError`.
    """

    def __init__(self, text: str, problem: str) -> None:
        super().__init__(f"invalid image reference {text!r}: {problem}")
        self.text = text
        self.problem = problem


@dataclass(frozen=True)
class Reference:
    """A normalized image reference: `domain/path[:tag][@digest]`."""

    domain: str
    path: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        """`domain/path`, the repository without tag or digest."""
        return f"{self.domain}/{self.path}"

    def string(self) -> str:
        """The canonical form: `docker.io/library/busybox:latest`, `host:5000/a/b@sha256:…`."""
        out = self.name
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out

    def familiar(self) -> str:
        """The short form docker prints: `busybox:latest`, `user/repo:tag`, other domains kept."""
        name = self.name
        if self.domain == DEFAULT_DOMAIN:
            name = self.path.removeprefix(OFFICIAL_REPO_PREFIX)
        if self.tag is not None:
            name += f":{self.tag}"
        if self.digest is not None:
            name += f"@{self.digest}"
        return name

    @property
    def object(self) -> str:
        """What the registry is asked for: the digest when there is one, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or DEFAULT_TAG

    def with_digest(self, digest: str) -> Reference:
        """The same repository pinned to `digest` (no tag): the image's repo digest."""
        return Reference(self.domain, self.path, None, digest)

    def __str__(self) -> str:
        return self.string()


def validate_digest(digest: str) -> str | None:
    """None when `digest` is a well-formed, supported digest; else what is wrong with it."""
    algorithm, _, hexpart = digest.partition(":")
    length = DIGEST_HEX_LENGTH.get(algorithm)
    if length is not None:
        if len(hexpart) != length or not re.fullmatch(r"[a-f0-9]+", hexpart):
            return f"invalid digest {digest!r}: {algorithm} needs {length} lower-case hex digits"
        return None
    if not _DIGEST.fullmatch(digest):
        return f"invalid digest {digest!r}: expected algorithm:hex"
    return f"unsupported digest algorithm {algorithm!r} (supported: {', '.join(DIGEST_HEX_LENGTH)})"


def _split_domain(name: str) -> tuple[str, str]:
    first, slash, rest = name.partition("/")
    if not slash or (not any(c in first for c in ".:") and first != "localhost" and first.lower() == first):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, rest
    if domain == LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = OFFICIAL_REPO_PREFIX + remainder
    return domain, remainder


def _split_tag(text: str, name: str) -> tuple[str, str | None]:
    colon, slash = name.rfind(":"), name.rfind("/")
    if colon <= slash:
        return name, None
    tag = name[colon + 1 :]
    if not _TAG.fullmatch(tag):
        raise ReferenceError(
            text, f"invalid tag {tag!r}: a tag is 1-128 of [A-Za-z0-9_.-] and cannot start with '.' or '-'"
        )
    return name[:colon], tag


def _check_path(text: str, path: str) -> None:
    if path.lower() != path:
        raise ReferenceError(text, "repository name must be lowercase")
    for component in path.split("/"):
        if not component:
            raise ReferenceError(text, "empty path component (a '/' too many)")
        if not _PATH_COMPONENT.fullmatch(component):
            raise ReferenceError(
                text,
                f"invalid path component {component!r}: lower-case letters and digits, "
                "separated by '.', '_', '__' or '-'",
            )


def parse(text: str) -> Reference:
    """Parse and normalize an image reference; raise ReferenceError when it is malformed."""
    if not text:
        raise ReferenceError(text, "empty reference")
    if text != text.strip():
        raise ReferenceError(text, "leading or trailing whitespace")
    if _HEX64.fullmatch(text):
        raise ReferenceError(text, "a 64-character hexadecimal string is an image ID, not a repository name")
    name, at, digest_text = text.partition("@")
    digest: str | None = None
    if at:
        problem = validate_digest(digest_text)
        if problem:
            raise ReferenceError(text, problem)
        digest = digest_text
    name, tag = _split_tag(text, name)
    if not name:
        raise ReferenceError(text, "missing repository name")
    domain, path = _split_domain(name)
    if not _DOMAIN.fullmatch(domain):
        raise ReferenceError(text, f"invalid registry domain {domain!r}")
    _check_path(text, path)
    if len(domain) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise ReferenceError(text, f"repository name is longer than {NAME_TOTAL_LENGTH_MAX} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, path, tag, digest)


def is_image_id_like(text: str) -> bool:
    """True for `sha256:<hex prefix>` or a bare 64-hex string: an image ID (or a prefix), not a name."""
    return bool(_ID_PREFIX.fullmatch(text) or _HEX64.fullmatch(text))
