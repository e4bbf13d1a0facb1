"""Runs real registries (Debian's ``docker-registry``, distribution v2.8) on loopback for tests.

Each ``Registry`` is one ``docker-registry serve`` subprocess on 127.0.0.1 and a
free port, with filesystem storage, its config, certificates and log in a
private temporary directory that ``stop()`` removes. Variants:

- ``Registry()``: plain HTTP, anonymous push and pull.
- ``Registry(tls=True)``: HTTPS with a fresh CA (``ca_file``) and a server
  certificate for IP:127.0.0.1 and DNS:localhost signed by it.
- ``Registry(tls=True, htpasswd={"user": "password"})``: HTTP basic auth. The
  registry accepts only bcrypt entries; they are made with libcrypt's
  ``crypt(3)`` (``$2b$``), which Debian always has, through ctypes.
- ``Registry(token_auth=TokenServer(...).start())``: distribution token auth.

Use it as a context manager, or call ``start()``/``stop()`` from a fixture's
try/finally; registries a test forgot are stopped at interpreter exit, and the
registry process is killed if the test process dies.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.support.token_server import TokenServer, openssl

REGISTRY_BINARY = "/usr/bin/docker-registry"

_running: set[Registry] = set()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def registry_binary() -> str:
    """The registry binary, or an error telling how to install it."""
    found = shutil.which("docker-registry") or (REGISTRY_BINARY if Path(REGISTRY_BINARY).exists() else None)
    if found is None:
        raise FileNotFoundError(
            "docker-registry is missing: run `make test`, which installs Debian's docker-registry package"
        )
    return found


def bcrypt_hash(password: str, cost: int = 5) -> str:
    """A bcrypt ($2b$) hash of password, from libcrypt (libxcrypt) through ctypes."""
    name = ctypes.util.find_library("crypt") or "libcrypt.so.1"
    lib = ctypes.CDLL(name)
    lib.crypt_gensalt.restype = ctypes.c_char_p
    lib.crypt_gensalt.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p, ctypes.c_int]
    lib.crypt.restype = ctypes.c_char_p
    lib.crypt.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    setting = lib.crypt_gensalt(b"$2b$", cost, None, 0)
    if not setting:
        raise RuntimeError(f"{name} cannot make bcrypt salts")
    hashed = lib.crypt(password.encode(), setting)
    if not hashed or not hashed.startswith(b"$2"):
        raise RuntimeError(f"{name} did not produce a bcrypt hash")
    return str(hashed.decode())


def make_ca(directory: Path, name: str = "criopy test CA") -> tuple[Path, Path]:
    """A self-signed CA (EC P-256) in directory: (cert, key)."""
    cert, key = directory / "ca.crt", directory / "ca.key"
    openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-sha256",
        "-days", "3", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-addext", "subjectKeyIdentifier=hash",
    )  # fmt: skip
    return cert, key


def make_server_cert(
    directory: Path, ca_cert: Path, ca_key: Path, sans: str = "IP:127.0.0.1,DNS:localhost"
) -> tuple[Path, Path]:
    """A server certificate for sans signed by the CA: (cert, key)."""
    cert, key, csr, ext = (directory / n for n in ("server.crt", "server.key", "server.csr", "server.ext"))
    ext.write_text(
        f"subjectAltName={sans}\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    openssl(
        "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(csr),
    )  # fmt: skip
    openssl(
        "x509", "-req", "-sha256", "-days", "2", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-set_serial", str(secrets.randbits(63)), "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    return cert, key


def _die_with_parent() -> list[str]:
    """A command prefix so that the registry does not outlive a test process that was killed."""
    setpriv = shutil.which("setpriv")  # util-linux, essential in Debian
    return [setpriv, "--pdeathsig", "KILL"] if setpriv else []


@dataclass(eq=False)
class Registry:
    tls: bool = False
    htpasswd: dict[str, str] | None = None
    token_auth: TokenServer | None = None
    base: Path | None = None
    port: int = 0
    start_timeout: float = 20.0

    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _owns_base: bool = field(default=False, repr=False)

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    @property
    def ca_file(self) -> Path | None:
        """The CA that signed the registry's certificate (None without TLS)."""
        return self._dir / "ca.crt" if self.tls else None

    @property
    def verify(self) -> ssl.SSLContext | bool:
        """What to pass as httpx's ``verify=`` to talk to this registry: a context trusting its CA, or True."""
        return ssl.create_default_context(cafile=str(self.ca_file)) if self.ca_file else True

    @property
    def data_dir(self) -> Path:
        return self._dir / "data"

    @property
    def config_file(self) -> Path:
        return self._dir / "config.yml"

    @property
    def log_path(self) -> Path:
        return self._dir / "registry.log"

    @property
    def _dir(self) -> Path:
        assert self.base is not None, "registry not started"
        return self.base

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.base and self.log_path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def config_text(self) -> str:
        lines = [
            "version: 0.1",
            "log:",
            "  level: info",
            "  accesslog:",
            "    disabled: true",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {self.data_dir}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            f"  addr: {self.host}",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.tls:
            lines += ["  tls:", f"    certificate: {self._dir / 'server.crt'}", f"    key: {self._dir / 'server.key'}"]
        if self.htpasswd is not None and self.token_auth is not None:
            raise ValueError("the registry takes one auth provider: htpasswd or token_auth, not both")
        if self.htpasswd is not None:
            lines += ["auth:", "  htpasswd:", "    realm: criopy-test", f"    path: {self._dir / 'htpasswd'}"]
        if self.token_auth is not None:
            ts = self.token_auth
            lines += [
                "auth:",
                "  token:",
                f"    realm: {ts.realm}",
                f"    service: {ts.service}",
                f"    issuer: {ts.issuer}",
                f"    rootcertbundle: {ts.cert_file}",
            ]
        return "\n".join(lines) + "\n"

    def start(self) -> Registry:
        binary = registry_binary()
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix="criopy-registry-"))
            self._owns_base = True
        self.base.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        _running.add(self)
        try:
            if self.tls:
                ca_cert, ca_key = make_ca(self._dir)
                make_server_cert(self._dir, ca_cert, ca_key)
            if self.htpasswd is not None:
                entries = "".join(f"{user}:{bcrypt_hash(pw)}\n" for user, pw in self.htpasswd.items())
                (self._dir / "htpasswd").write_text(entries)
            # A port picked by free_port() can be taken before the registry binds it: try a few.
            fixed_port = self.port != 0
            for _ in range(1 if fixed_port else 5):
                if not fixed_port:
                    self.port = free_port()
                self.config_file.write_text(self.config_text())
                self._spawn(binary)
                if self._wait_up():
                    return self
                if "address already in use" not in self.log():
                    break
            raise RuntimeError(f"registry at {self.url} did not come up; log tail:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _spawn(self, binary: str) -> None:
        self._kill()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*_die_with_parent(), binary, "serve", str(self.config_file)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self._dir,
            )

    def _wait_up(self) -> bool:
        """True once GET /v2/ answers 200 or 401; False if the process exits or the timeout passes."""
        assert self.proc is not None
        deadline = time.monotonic() + self.start_timeout
        with httpx.Client(verify=self.verify, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    return False
                try:
                    if client.get(f"{self.url}/v2/").status_code in (200, 401):
                        return True
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        return False

    def _kill(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused registry cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def stop(self) -> None:
        """Stops the process and removes the registry's directory (if the harness made it)."""
        self._kill()
        _running.discard(self)
        if self._owns_base and self.base is not None:
            shutil.rmtree(self.base, ignore_errors=True)
            self.base = None
            self._owns_base = False

    def restart(self) -> None:
        """Stops and starts the same process on the same port and storage (e.g. to test a registry outage)."""
        self._kill()
        self._spawn(registry_binary())
        if not self._wait_up():
            raise RuntimeError(f"registry at {self.url} did not come back; log tail:\n{self.log_tail()}")

    def pause(self) -> None:
        """SIGSTOP: the port stays open but nothing answers (connections hang) until resume()."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def __enter__(self) -> Registry:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def client(self, auth: tuple[str, str] | None = None, timeout: float = 30) -> httpx.Client:
        """An httpx client for this registry's base URL that trusts its CA."""
        return httpx.Client(base_url=self.url, verify=self.verify, auth=auth, timeout=timeout)


@atexit.register
def _stop_forgotten() -> None:
    for registry in list(_running):
        registry.stop()
