"""Registry credentials and the token dance.

Credentials come from the CRI request (`AuthConfig`, which the kubelet fills from
image pull secrets) or from a docker `config.json` auth file. A registry answers an
unauthenticated request with `401` and a `WWW-Authenticate` challenge: `Basic`
means send the username and password; `Bearer` means get a token from the
challenge's `realm` (the distribution token spec) and send that. Tokens are cached
until shortly before they expire.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from cri.log import event

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LIFETIME = 60.0
CLIENT_ID = "criopy"

# Hosts docker.io is known by in auth files, most specific first.
_DOCKER_HUB_KEYS = ("docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


@dataclass
class Credentials:
    username: str = ""
    password: str = field(default="", repr=False)
    identity_token: str = field(default="", repr=False)
    registry_token: str = field(default="", repr=False)

    def is_empty(self) -> bool:
        return not (self.username or self.password or self.identity_token or self.registry_token)

    def fingerprint(self) -> str:
        """A stable, non-reversible identity for cache keys (tokens are per identity)."""
        if self.is_empty():
            return ""
        material = "\0".join((self.username, self.password, self.identity_token, self.registry_token))
        return hashlib.sha256(material.encode()).hexdigest()[:16]


class AuthFileError(ValueError):
    """The auth file exists but cannot be used; the message names the file."""


class TokenError(Exception):
    """The token server refused or failed; `status` is its HTTP status (None: no answer)."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def _decode_auth(value: str, what: str) -> tuple[str, str]:
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}: not valid base64 of 'username:password'") from exc
    username, colon, password = decoded.partition(":")
    if not colon or not username:
        raise ValueError(f"{what}: the decoded value is not 'username:password'")
    return username, password


def from_cri(
    *,
    username: str = "",
    password: str = "",
    auth: str = "",
    server_address: str = "",
    identity_token: str = "",
    registry_token: str = "",
) -> Credentials | None:
    """Credentials from a CRI `AuthConfig`; None when it carries none.

    `auth` is base64 of `username:password` and, when set, wins over the separate
    fields (as in docker). `server_address` is informational: the kubelet already
    chose these credentials for the image's registry. A malformed `auth` raises
    ValueError naming the field `auth`.
    """
    del server_address
    if auth:
        username, password = _decode_auth(auth, "auth")
    creds = Credentials(username, password, identity_token, registry_token)
    return None if creds.is_empty() else creds


def _key_location(key: str) -> str:
    """An `auths` key as host[/path]: legacy URL forms (`https://host/v1/`) reduce to the host."""
    key = key.strip()
    for scheme in ("https://", "http://"):
        if key.startswith(scheme):
            return key[len(scheme) :].split("/", 1)[0].lower()
    first, _, rest = key.partition("/")
    return f"{first.lower()}/{rest}".rstrip("/") if rest else first.lower()


def _candidates(registry_host: str, repository: str) -> list[str]:
    """host/ns/repo, host/ns, host: the keys that apply, most specific first."""
    hosts = [registry_host.lower()]
    if hosts[0] in _DOCKER_HUB_KEYS:
        hosts = list(_DOCKER_HUB_KEYS)
    parts = [p for p in repository.split("/") if p]
    out: list[str] = []
    for n in range(len(parts), -1, -1):
        suffix = "/".join(parts[:n])
        out.extend(f"{host}/{suffix}" if suffix else host for host in hosts)
    return out


def _entry_credentials(entry: Any, path: Path, key: str) -> Credentials | None:
    if not isinstance(entry, Mapping):
        raise AuthFileError(f"{path}: auths[{key!r}] must be an object")
    for name in ("auth", "username", "password", "identitytoken", "registrytoken"):
        if not isinstance(entry.get(name, ""), str):
            raise AuthFileError(f"{path}: auths[{key!r}].{name} must be a string")
    username = entry.get("username", "")
    password = entry.get("password", "")
    if entry.get("auth"):
        try:
            username, password = _decode_auth(entry["auth"], f"{path}: auths[{key!r}].auth")
        except ValueError as exc:
            raise AuthFileError(str(exc)) from exc
    creds = Credentials(username, password, entry.get("identitytoken", ""), entry.get("registrytoken", ""))
    return None if creds.is_empty() else creds


def from_auth_file(path: str | Path, registry_host: str, repository: str = "") -> Credentials | None:
    """Credentials for `registry_host` (and, most specific first, `repository` on it) from a docker config.json.

    Keys may be `host`, `host/namespace[/repo]` (containers-auth.json), or the legacy
    URL forms `https://host/v1/` and `http://host`; docker.io also matches
    `https://index.docker.io/v1/`. No file (or an empty path) means no credentials;
    an unreadable or malformed file raises AuthFileError naming it. Credential
    helpers (`credsStore`, `credHelpers`) are not run.
    """
    if not path:
        return None
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise AuthFileError(f"{path}: cannot read the auth file: {exc.strerror}") from exc
    try:
        data = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise AuthFileError(f"{path}: the auth file is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise AuthFileError(f"{path}: the auth file must hold a JSON object")
    auths = data.get("auths", {})
    if not isinstance(auths, dict):
        raise AuthFileError(f"{path}: 'auths' must be an object keyed by registry")
    by_location: dict[str, tuple[str, Any]] = {}
    for key, entry in auths.items():
        # An exact host/path key wins over a legacy URL key for the same host.
        location = _key_location(key)
        if location not in by_location or "://" in by_location[location][0]:
            by_location[location] = (key, entry)
    for candidate in _candidates(registry_host, repository):
        if candidate in by_location:
            key, entry = by_location[candidate]
            return _entry_credentials(entry, path, key)
    return None


# ---------------------------------------------------------------------------
# Challenges


@dataclass
class Challenge:
    """One `WWW-Authenticate` challenge: scheme lower-cased, parameter names lower-cased."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def realm(self) -> str:
        return self.params.get("realm", "")

    @property
    def service(self) -> str:
        return self.params.get("service", "")

    @property
    def scope(self) -> str:
        return self.params.get("scope", "")


_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def _parse_one(header: str) -> list[Challenge]:
    out: list[Challenge] = []
    pos, n = 0, len(header)

    def skip(chars: str) -> None:
        nonlocal pos
        while pos < n and header[pos] in chars:
            pos += 1

    def token() -> str:
        nonlocal pos
        start = pos
        while pos < n and header[pos] in _TOKEN_CHARS:
            pos += 1
        return header[start:pos]

    while pos < n:
        skip(" \t,")
        if pos >= n:
            break
        word = token()
        if not word:
            pos += 1  # garbage: skip a character and carry on
            continue
        skip(" \t")
        if pos < n and header[pos] == "=" and out:
            pos += 1
            skip(" \t")
            if pos < n and header[pos] == '"':
                pos += 1
                chars: list[str] = []
                while pos < n and header[pos] != '"':
                    if header[pos] == "\\" and pos + 1 < n:
                        pos += 1
                    chars.append(header[pos])
                    pos += 1
                pos += 1  # the closing quote
                value = "".join(chars)
            else:
                start = pos
                while pos < n and header[pos] not in ", \t":
                    pos += 1
                value = header[start:pos]
            out[-1].params[word.lower()] = value
        elif pos < n and header[pos] == "=":
            pos += 1  # a parameter before any scheme: ignore it
        else:
            out.append(Challenge(word.lower()))
    return out


def parse_challenges(headers: str | Iterable[str]) -> list[Challenge]:
    """Every challenge in one or several `WWW-Authenticate` header values."""
    values = [headers] if isinstance(headers, str) else list(headers)
    out: list[Challenge] = []
    for value in values:
        out.extend(_parse_one(value))
    return out


def pick_challenge(challenges: Sequence[Challenge]) -> Challenge | None:
    """Bearer when offered (it scopes access), else Basic; other schemes are not supported."""
    for scheme in ("bearer", "basic"):
        for challenge in challenges:
            if challenge.scheme == scheme:
                return challenge
    return None


def basic_header(creds: Credentials) -> str:
    raw = f"{creds.username}:{creds.password}".encode()
    return "Basic " + base64.b64encode(raw).decode()


# ---------------------------------------------------------------------------
# Tokens

TokenKey = tuple[str, str, str, str]  # realm, service, scopes, credentials fingerprint


def _parse_time(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


class TokenCache:
    """Bearer tokens keyed by (realm, service, scope, identity), kept until expiry minus a margin.

    The identity (a hash of the credentials) is part of the key so that a pull
    without credentials never reuses a token obtained with someone's pull secret.
    """

    def __init__(
        self,
        margin: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.margin = margin
        self._clock = clock
        self._wall = wall_clock
        self._tokens: dict[TokenKey, tuple[str, float]] = {}
        self._locks: dict[TokenKey, asyncio.Lock] = {}
        self.fetches = 0  # token server round trips, for tests and metrics

    @staticmethod
    def key(challenge: Challenge, scopes: Sequence[str], creds: Credentials | None) -> TokenKey:
        return (challenge.realm, challenge.service, " ".join(scopes), creds.fingerprint() if creds else "")

    def get(self, key: TokenKey) -> str | None:
        entry = self._tokens.get(key)
        if entry is None:
            return None
        token, valid_until = entry
        if self._clock() >= valid_until:
            del self._tokens[key]
            return None
        return token

    def put(self, key: TokenKey, token: str, lifetime: float) -> None:
        margin = min(self.margin, lifetime / 2)
        self._tokens[key] = (token, self._clock() + lifetime - margin)

    def invalidate(self, key: TokenKey) -> None:
        self._tokens.pop(key, None)

    async def token(
        self,
        client: httpx.AsyncClient,
        challenge: Challenge,
        scopes: Sequence[str],
        creds: Credentials | None,
        *,
        refresh: bool = False,
    ) -> str:
        """A bearer token for `scopes`: the kubelet's registry token, a cached one, or a fresh one."""
        if creds and creds.registry_token:
            return creds.registry_token
        key = self.key(challenge, scopes, creds)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if refresh:
                self.invalidate(key)
            cached = self.get(key)
            if cached is not None:
                return cached
            token, lifetime = await self._fetch(client, challenge, scopes, creds)
            self.put(key, token, lifetime)
            return token

    async def _fetch(
        self, client: httpx.AsyncClient, challenge: Challenge, scopes: Sequence[str], creds: Credentials | None
    ) -> tuple[str, float]:
        realm = challenge.realm
        if not realm.startswith(("https://", "http://")):
            raise TokenError(f"the Bearer challenge has no usable realm ({realm!r})")
        self.fetches += 1
        scope = " ".join(scopes)
        event(log, logging.DEBUG, "registry.token_fetch", realm=realm, service=challenge.service, scope=scope)
        try:
            if creds and creds.identity_token:
                # OAuth2 refresh-token grant, as the distribution token spec describes for identity tokens.
                form: dict[str, str | list[str]] = {
                    "grant_type": "refresh_token",
                    "refresh_token": creds.identity_token,
                    "client_id": CLIENT_ID,
                    "scope": list(scopes),
                }
                if challenge.service:
                    form["service"] = challenge.service
                response = await client.post(realm, data=form)
            else:
                params: dict[str, str | list[str]] = {"scope": list(scopes)}
                if challenge.service:
                    params["service"] = challenge.service
                auth = (creds.username, creds.password) if creds and creds.username else None
                response = await client.get(realm, params=params, auth=auth)
        except httpx.HTTPError as exc:
            raise TokenError(f"token server {realm}: {type(exc).__name__}: {exc}") from exc
        if response.status_code != 200:
            raise TokenError(f"token server {realm} answered {response.status_code}", response.status_code)
        return self._token_answer(response, realm)

    def _token_answer(self, response: httpx.Response, realm: str) -> tuple[str, float]:
        """(token, seconds it stays valid) from a token server's JSON answer."""
        try:
            data = response.json()
        except ValueError as exc:
            raise TokenError(f"token server {realm}: the answer is not JSON") from exc
        if not isinstance(data, dict):
            raise TokenError(f"token server {realm}: the answer is not a JSON object")
        token = data.get("token") or data.get("access_token")
        if not isinstance(token, str) or not token:
            raise TokenError(f"token server {realm}: the answer has no token")
        lifetime = data.get("expires_in")
        if not isinstance(lifetime, (int, float)) or isinstance(lifetime, bool) or lifetime <= 0:
            lifetime = DEFAULT_TOKEN_LIFETIME
        issued = _parse_time(data["issued_at"]) if isinstance(data.get("issued_at"), str) else None
        if issued is not None:
            age = self._wall() - issued
            if 0 < age < lifetime:  # a token issued in the future means skewed clocks: trust our own
                lifetime -= age
        return token, float(lifetime)
