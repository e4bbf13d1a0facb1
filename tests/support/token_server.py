"""A tiny bearer token server for the distribution token auth flow, on loopback, for tests.

The registry (``Registry(token_auth=server)``) answers 401 with
``WWW-Authenticate: Bearer realm=<server.realm>,service=<server.service>,scope=...``;
the client asks the realm for a token with HTTP basic credentials (GET
``?service=&scope=``, or the OAuth2 POST form with ``grant_type=password``) and
presents the token to the registry.

Tokens are RS256 JWTs whose header carries the signing certificate in ``x5c``;
the registry trusts that certificate because ``cert_file`` is its
``rootcertbundle``. No crypto module is needed: the key and self-signed
certificate are made with ``openssl`` and each token is signed with
``openssl dgst -sha256 -sign``.

A known user gets what it asked for among pull/push/delete/*; a wrong password
or an unknown user gets 401, and so does an anonymous request unless
``anonymous_pull`` is set (then it gets pull only). ``requests`` counts every
token request so tests can assert that a client caches its tokens.
"""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

GRANTABLE = frozenset({"pull", "push", "delete", "*"})


def openssl(*args: str, cwd: Path | None = None, stdin: bytes | None = None, timeout: float = 30) -> bytes:
    """Runs openssl; raises with its stderr on failure."""
    try:
        done = subprocess.run(
            ["openssl", *args], cwd=cwd, input=stdin, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError as e:
        raise RuntimeError("openssl is missing: run `make test`, which installs the system packages") from e
    if done.returncode != 0:
        raise RuntimeError(
            f"openssl {' '.join(args)} failed ({done.returncode}): {done.stderr.decode(errors='replace')}"
        )
    return done.stdout


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pem_to_der(pem: str) -> bytes:
    body = pem.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
    return base64.b64decode("".join(body.split()))


@dataclass(frozen=True)
class TokenRequest:
    """One request to the realm, as the server saw it."""

    method: str
    user: str | None
    service: str | None
    scopes: tuple[str, ...]
    status: int


@dataclass
class TokenServer:
    users: dict[str, str] = field(default_factory=lambda: {"tester": "secret"})
    service: str = "criopy-test-registry"
    issuer: str = "criopy-test-issuer"
    expires_in: int = 300
    anonymous_pull: bool = False
    base: Path | None = None

    requests: int = 0
    log: list[TokenRequest] = field(default_factory=list)

    _server: ThreadingHTTPServer | None = field(default=None, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _owns_base: bool = field(default=False, repr=False)
    _x5c: str = field(default="", repr=False)

    @property
    def port(self) -> int:
        assert self._server is not None, "token server not started"
        return int(self._server.server_address[1])

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.port}/token"

    @property
    def cert_file(self) -> Path:
        assert self.base is not None
        return self.base / "token-signer.crt"

    @property
    def key_file(self) -> Path:
        assert self.base is not None
        return self.base / "token-signer.key"

    def start(self) -> TokenServer:
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="criopy-token-"))
            self._owns_base = True
        self.base.mkdir(parents=True, exist_ok=True)
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-sha256", "-days", "2",
            "-subj", "/CN=criopy test token issuer",
            "-keyout", str(self.key_file), "-out", str(self.cert_file),
        )  # fmt: skip
        self._x5c = base64.b64encode(pem_to_der(self.cert_file.read_text())).decode()
        server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="token-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._owns_base and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests = 0
            self.log.clear()

    # -- tokens --

    def grant(self, user: str | None, scopes: list[str]) -> list[dict[str, Any]]:
        """The access claim for a user asking for scopes like ``repository:name:pull,push``."""
        access = []
        for scope in scopes:
            # repository names contain no ':', but a registry-type scope may carry "(plugin)"; split from both ends.
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            if not kind or not name:
                continue
            wanted = [a for a in actions.split(",") if a in GRANTABLE]
            if user is None:
                wanted = [a for a in wanted if a == "pull"]
            access.append({"type": kind, "name": name, "actions": wanted})
        return access

    def make_token(self, user: str | None, scopes: list[str], expires_in: int | None = None) -> str:
        now = int(time.time())
        ttl = self.expires_in if expires_in is None else expires_in
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        claims = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,
            "exp": now + ttl,
            "nbf": now - 10,
            "iat": now,
            "jti": secrets.token_hex(12),
            "access": self.grant(user, scopes),
        }
        signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
        signature = openssl("dgst", "-sha256", "-sign", str(self.key_file), stdin=signing_input.encode(), timeout=10)
        return f"{signing_input}.{b64url(signature)}"

    def _check(self, authorization: str | None) -> tuple[bool, str | None]:
        """(allowed, user) for an Authorization header value."""
        if not authorization:
            return self.anonymous_pull, None
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except ValueError:
            return False, None
        return self._password_ok(user, password), user

    def _password_ok(self, user: str, password: str) -> bool:
        expected = self.users.get(user)
        return expected is not None and secrets.compare_digest(expected.encode(), password.encode())

    def _record(self, entry: TokenRequest) -> None:
        with self._lock:
            self.requests += 1
            self.log.append(entry)


def _first(values: dict[str, list[str]], key: str) -> str | None:
    found = values.get(key)
    return found[0] if found else None


def _handler_for(ts: TokenServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", 'Basic realm="criopy-test-token"')
            self.end_headers()
            self.wfile.write(data)

        def _issue(self, method: str, user: str | None, allowed: bool, service: str | None, scopes: list[str]) -> None:
            if urlsplit(self.path).path != "/token":
                ts._record(TokenRequest(method, user, service, tuple(scopes), 404))
                self._reply(404, {"errors": [{"code": "NOT_FOUND", "message": "no such endpoint"}]})
                return
            if not allowed:
                ts._record(TokenRequest(method, user, service, tuple(scopes), 401))
                self._reply(401, {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]})
                return
            token = ts.make_token(user, scopes)
            ts._record(TokenRequest(method, user, service, tuple(scopes), 200))
            issued = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self._reply(200, {"token": token, "access_token": token, "expires_in": ts.expires_in, "issued_at": issued})

        def do_GET(self) -> None:
            query = parse_qs(urlsplit(self.path).query)
            scopes = [s for value in query.get("scope", []) for s in value.split(" ") if s]
            allowed, user = ts._check(self.headers.get("Authorization"))
            self._issue("GET", user, allowed, _first(query, "service"), scopes)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode(errors="replace"))
            scopes = [s for value in form.get("scope", []) for s in value.split(" ") if s]
            service = _first(form, "service")
            if (form.get("grant_type") or [""])[0] == "password":
                user = (form.get("username") or [""])[0]
                allowed = ts._password_ok(user, (form.get("password") or [""])[0])
                self._issue("POST", user, allowed, service, scopes)
            else:
                allowed, who = ts._check(self.headers.get("Authorization"))
                self._issue("POST", who, allowed, service, scopes)

    return Handler
