"""A loopback reverse proxy in front of a registry that injects faults, for tests of a puller's error handling.

    with FaultProxy(registry.url, upstream_verify=registry.verify) as proxy:  # verify: for a TLS registry
        proxy.cut_after(1000, times=2)          # the first two blob GETs end early
        ... pull from proxy.url ...
        assert proxy.blob_gets(layer.digest) == 3

Every request is forwarded to the upstream (bodies streamed both ways; Location
headers rewritten to point back at the proxy) and recorded: ``counts`` maps
(method, path) to the number of requests received and ``records`` lists each
request with the status and fault it got (both on arrival, so a stalled request
is there; its status is set before the response headers are sent).

Faults apply to GETs of blobs (``/v2/<name>/blobs/<digest>``, not uploads) or
of manifests, optionally only for one digest or reference, and optionally only
to the first ``times`` matching requests; the first active fault that matches a
request is the one applied. Faults on the body apply only
to the upstream's 2xx answers: a 401 challenge or a 404 passes untouched and
does not use up ``times``.

- ``corrupt``: one byte in the middle of the body is flipped (same length).
- ``wrong_digest``: a manifest body gets a trailing newline (still valid JSON,
  another sha256) while Docker-Content-Digest keeps the upstream's digest.
- ``cut_after(n)``: the full Content-Length is announced, n bytes are sent, the
  connection is closed.
- ``stall_after(n)``: n bytes are sent, then nothing while the connection stays
  open (until ``stop()``, or ``stall_seconds``).
- ``slow(rate)``: the body is sent at rate bytes per second.
- ``fail(status)``: the proxy answers status (503 by default) itself, to GETs
  and HEADs.
- ``redirect``: the proxy answers 307 to ``blob_server``, a second local server
  on another port that serves the same bytes like object storage would (signed
  URL, no Authorization expected): it records whether an Authorization header
  arrived and, like S3, refuses such a request with 400 unless told otherwise.
"""

from __future__ import annotations

import contextlib
import http.client
import re
import secrets
import socket
import ssl
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

CHUNK = 64 * 1024
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
BLOB_PATH = re.compile(r"^/v2/(?P<name>.+)/blobs/(?P<ref>[^/]+)$")
MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/manifests/(?P<ref>[^/]+)$")

FaultKind = Literal["corrupt", "wrong_digest", "cut", "stall", "slow", "status", "redirect"]
Target = Literal["blobs", "manifests", "any"]


@dataclass
class Fault:
    kind: FaultKind
    target: Target = "blobs"
    digest: str | None = None  # only requests for this digest (or manifest reference)
    times: int | None = None  # only the first `times` matching requests; None: all of them
    after: int = 0  # cut/stall: body bytes sent before
    rate: int = 0  # slow: bytes per second
    status: int = 503
    retry_after: int | None = None
    applied: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.applied >= self.times:
            return False
        if method != "GET" and not (method == "HEAD" and self.kind == "status"):
            return False
        blob, manifest = BLOB_PATH.match(path), MANIFEST_PATH.match(path)
        if self.target == "blobs":
            m = blob
        elif self.target == "manifests":
            m = manifest
        else:
            m = blob or manifest
        if m is None or m.group("ref") == "uploads":
            return False
        return self.digest is None or m.group("ref") == self.digest


@dataclass
class ProxyRecord:
    """One request: appended on arrival; status and fault are set before the response headers go out.

    `started` and `ended` (time.monotonic(); ended None while it is served) show which requests overlapped;
    `sent` counts the body bytes written to the client, so a client that hung up early is seen.
    """

    method: str
    path: str
    authorization: bool
    status: int = 0
    fault: FaultKind | None = None
    started: float = field(default_factory=time.monotonic)
    ended: float | None = None
    sent: int = 0


@dataclass(frozen=True)
class BlobRequest:
    path: str
    authorization: str | None
    status: int


def _context(verify: bool | str | Path | ssl.SSLContext) -> ssl.SSLContext:
    if isinstance(verify, ssl.SSLContext):
        return verify
    if isinstance(verify, str | Path):
        return ssl.create_default_context(cafile=str(verify))
    if verify:
        return ssl.create_default_context()
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class _Upstream:
    def __init__(self, url: str, verify: bool | str | Path | ssl.SSLContext, timeout: float) -> None:
        parts = urlsplit(url.rstrip("/"))
        self.url = f"{parts.scheme}://{parts.netloc}"
        self.scheme, self.netloc = parts.scheme, parts.netloc
        self.tls = _context(verify) if parts.scheme == "https" else None
        self.timeout = timeout

    def connect(self) -> http.client.HTTPConnection:
        if self.tls is not None:
            return http.client.HTTPSConnection(self.netloc, timeout=self.timeout, context=self.tls)
        return http.client.HTTPConnection(self.netloc, timeout=self.timeout)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.stopping = threading.Event()
        self.connections: set[socket.socket] = set()
        self.conn_lock = threading.Lock()
        self.thread = threading.Thread(target=self.serve_forever, args=(0.05,), name="fault-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def begin(self) -> None:
        self.thread.start()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients that hang up mid-body (timeouts, cut connections) are part of the tests, not errors.
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handle_error(request, client_address)

    def end(self) -> None:
        self.stopping.set()
        self.shutdown()
        with self.conn_lock:
            conns = list(self.connections)
        for conn in conns:  # wakes handlers stuck writing to or reading from a client
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self.server_close()
        self.thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.conn_lock:
            self.server.connections.add(self.connection)

    def finish(self) -> None:
        with self.server.conn_lock:
            self.server.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def read_body(self) -> bytes | Iterator[bytes] | None:
        """The request body: a stream when its length is known, bytes when chunked, None without one."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        if not length:
            return None

        def stream() -> Iterator[bytes]:
            left = length
            while left > 0:
                chunk = self.rfile.read(min(CHUNK, left))
                if not chunk:
                    return
                left -= len(chunk)
                yield chunk

        return stream()

    def reply(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def drop(self) -> None:
        """Closes the client connection now (after a cut or a stall)."""
        self.close_connection = True
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class BlobServer:
    """Serves blobs the proxy redirected to, fetching them from the upstream with the stashed credentials."""

    def __init__(self, upstream: _Upstream, reject_authorization: bool = True) -> None:
        self.upstream = upstream
        self.reject_authorization = reject_authorization
        self.requests: list[BlobRequest] = []
        self._tickets: dict[str, tuple[str, dict[str, str]]] = {}
        self._lock = threading.Lock()
        self._server: _Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None, "blob server not started"
        return self._server.url

    @property
    def saw_authorization(self) -> bool:
        return any(r.authorization is not None for r in self.requests)

    def ticket(self, path: str, headers: dict[str, str]) -> str:
        """A one-path signed-URL stand-in: the URL the proxy redirects to."""
        token = secrets.token_hex(8)
        with self._lock:
            self._tickets[token] = (path, headers)
        return f"{self.url}/storage/{token}/{path.rsplit('/', 1)[-1]}?X-Criopy-Signature={secrets.token_hex(8)}"

    def start(self) -> BlobServer:
        self._server = _Server(self._handler())
        self._server.begin()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.end()
            self._server = None

    def _handler(self) -> type[_Handler]:
        blobs = self

        class Handler(_Handler):
            def _record(self, status: int) -> None:
                with blobs._lock:
                    blobs.requests.append(BlobRequest(self.path, self.headers.get("Authorization"), status))

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                parts = urlsplit(self.path).path.split("/")
                token = parts[2] if len(parts) > 2 and parts[1] == "storage" else ""
                with blobs._lock:
                    ticket = blobs._tickets.get(token)
                if ticket is None:
                    self._record(404)
                    self.reply(404, b"no such object\n")
                    return
                if self.headers.get("Authorization") and blobs.reject_authorization:
                    self._record(400)
                    self.reply(400, b"only one auth mechanism allowed: the URL is signed\n")
                    return
                upstream_path, headers = ticket
                if self.headers.get("Range"):
                    headers = {**headers, "Range": self.headers["Range"]}
                conn = blobs.upstream.connect()
                try:
                    conn.request(self.command, upstream_path, headers=headers)
                    resp = conn.getresponse()
                    self._record(resp.status)
                    self.send_response(resp.status)
                    for k in ("Content-Type", "Content-Range", "Accept-Ranges", "Docker-Content-Digest", "ETag"):
                        if resp.getheader(k):
                            self.send_header(k, resp.getheader(k, ""))
                    length = resp.getheader("Content-Length")
                    if length is None:
                        data = resp.read()
                        self.send_header("Content-Length", str(len(data)))
                        self.end_headers()
                        if self.command != "HEAD":
                            self.wfile.write(data)
                        return
                    self.send_header("Content-Length", length)
                    self.end_headers()
                    if self.command != "HEAD":
                        while chunk := resp.read(CHUNK):
                            self.wfile.write(chunk)
                finally:
                    conn.close()

        return Handler


class FaultProxy:
    def __init__(
        self,
        upstream_url: str,
        *,
        upstream_verify: bool | str | Path | ssl.SSLContext = True,
        upstream_timeout: float = 60,
        stall_seconds: float = 600,
        blob_server_rejects_authorization: bool = True,
    ) -> None:
        self.upstream = _Upstream(upstream_url, upstream_verify, upstream_timeout)
        self.stall_seconds = stall_seconds
        self.blob_server = BlobServer(self.upstream, blob_server_rejects_authorization)
        self.faults: list[Fault] = []
        self.counts: Counter[tuple[str, str]] = Counter()
        self.records: list[ProxyRecord] = []
        self._lock = threading.Lock()
        self._server: _Server | None = None

    # -- lifecycle --

    @property
    def port(self) -> int:
        assert self._server is not None, "fault proxy not started"
        return int(self._server.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> FaultProxy:
        self.blob_server.start()
        self._server = _Server(self._handler())
        self._server.begin()
        return self

    def stop(self) -> None:
        """Stops both servers; stalled and slow responses are cut off."""
        if self._server is not None:
            self._server.end()
            self._server = None
        self.blob_server.stop()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- faults --

    def add(self, fault: Fault) -> Fault:
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()

    def corrupt(self, digest: str | None = None, times: int | None = None, target: Target = "blobs") -> Fault:
        return self.add(Fault("corrupt", target, digest, times))

    def wrong_digest(self, reference: str | None = None, times: int | None = None) -> Fault:
        return self.add(Fault("wrong_digest", "manifests", reference, times))

    def cut_after(self, n: int, times: int | None = 1, digest: str | None = None, target: Target = "blobs") -> Fault:
        return self.add(Fault("cut", target, digest, times, after=n))

    def stall_after(
        self, n: int, times: int | None = None, digest: str | None = None, target: Target = "blobs"
    ) -> Fault:
        return self.add(Fault("stall", target, digest, times, after=n))

    def slow(
        self, bytes_per_sec: int, digest: str | None = None, times: int | None = None, target: Target = "blobs"
    ) -> Fault:
        return self.add(Fault("slow", target, digest, times, rate=bytes_per_sec))

    def fail(
        self,
        status: int = 503,
        times: int | None = 1,
        digest: str | None = None,
        target: Target = "blobs",
        retry_after: int | None = None,
    ) -> Fault:
        return self.add(Fault("status", target, digest, times, status=status, retry_after=retry_after))

    def redirect(self, digest: str | None = None, times: int | None = None) -> Fault:
        return self.add(Fault("redirect", "blobs", digest, times))

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(method, path):
                    fault.applied += 1
                    return fault
        return None

    def _give_back(self, fault: Fault) -> None:
        with self._lock:
            fault.applied -= 1

    # -- counts --

    def count(self, method: str, path: str) -> int:
        return self.counts[(method, path)]

    def blob_gets(self, digest: str) -> int:
        """GETs of blob digest (any repository), whatever their outcome."""
        return sum(n for (m, p), n in self.counts.items() if m == "GET" and p.endswith(f"/blobs/{digest}"))

    def manifest_gets(self, reference: str) -> int:
        return sum(n for (m, p), n in self.counts.items() if m == "GET" and p.endswith(f"/manifests/{reference}"))

    def blob_records(self, digest: str | None = None) -> list[ProxyRecord]:
        """The blob GETs (of one digest, or all), in arrival order."""
        with self._lock:
            records = list(self.records)
        return [
            r
            for r in records
            if r.method == "GET" and BLOB_PATH.match(r.path) and (digest is None or r.path.endswith(f"/blobs/{digest}"))
        ]

    def max_concurrent_blob_gets(self) -> int:
        """The most blob GETs that were being served at the same instant."""
        edges = []
        for r in self.blob_records():
            edges += [(r.started, 1), (r.ended if r.ended is not None else float("inf"), -1)]
        peak = current = 0
        for _, step in sorted(edges, key=lambda e: (e[0], e[1])):  # an end before a start at the same instant
            current += step
            peak = max(peak, current)
        return peak

    def reset_counts(self) -> None:
        with self._lock:
            self.counts.clear()
            self.records.clear()

    def _arrived(self, record: ProxyRecord) -> None:
        with self._lock:
            self.counts[(record.method, record.path)] += 1
            self.records.append(record)

    # -- the proxy --

    def _handler(self) -> type[_Handler]:
        proxy = self

        class Handler(_Handler):
            fault: Fault | None = None
            record: ProxyRecord

            def send_response(self, code: int, message: str | None = None) -> None:
                record = getattr(self, "record", None)  # unset when http.server rejects the request line
                if record is not None:
                    record.status = code
                super().send_response(code, message)

            def do_GET(self) -> None:
                self.forward()

            def do_HEAD(self) -> None:
                self.forward()

            def do_POST(self) -> None:
                self.forward()

            def do_PUT(self) -> None:
                self.forward()

            def do_PATCH(self) -> None:
                self.forward()

            def do_DELETE(self) -> None:
                self.forward()

            def forward(self) -> None:
                path = urlsplit(self.path).path
                self.record = ProxyRecord(self.command, path, "Authorization" in self.headers)
                proxy._arrived(self.record)
                self.fault = proxy._take_fault(self.command, path)
                self.record.fault = self.fault.kind if self.fault else None
                try:
                    self._serve(self.fault)
                finally:
                    self.record.ended = time.monotonic()

            def _upstream_headers(self) -> dict[str, str]:
                out = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                out["Host"] = proxy.upstream.netloc
                return out

            def _serve(self, fault: Fault | None) -> int:
                body = self.read_body()
                if fault is not None and fault.kind == "status":
                    headers = {"Content-Type": "application/json"}
                    if fault.retry_after is not None:
                        headers["Retry-After"] = str(fault.retry_after)
                    msg = b'{"errors":[{"code":"UNAVAILABLE","message":"injected by the fault proxy"}]}'
                    self.reply(fault.status, msg, headers)
                    return fault.status
                headers = self._upstream_headers()
                if isinstance(body, bytes):
                    headers["Content-Length"] = str(len(body))
                elif body is not None:
                    headers["Content-Length"] = self.headers["Content-Length"]
                conn = proxy.upstream.connect()
                try:
                    if fault is not None and fault.kind == "redirect":
                        # Ask the upstream first, so that auth and existence answers stay the registry's.
                        conn.request("HEAD", self.path, headers=headers)
                        resp = conn.getresponse()
                        resp.read()
                        if resp.status == 200:
                            location = proxy.blob_server.ticket(self.path, headers)
                            self.reply(307, b"", {"Location": location})
                            return 307
                        conn.close()
                        conn = proxy.upstream.connect()
                        proxy._give_back(fault)  # not redirected: relay the registry's answer (401, 404...)
                        fault = self.fault = self.record.fault = None
                    conn.request(self.command, self.path, body=body, headers=headers)
                    return self._relay(conn.getresponse(), fault)
                finally:
                    conn.close()

            def _relay(self, resp: http.client.HTTPResponse, fault: Fault | None) -> int:
                if fault is not None and not 200 <= resp.status < 300:
                    # A 401 challenge or a 404 is relayed untouched and does not use up the fault.
                    proxy._give_back(fault)
                    fault = self.fault = self.record.fault = None
                length_header = resp.getheader("Content-Length")
                no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
                data: bytes | None = None
                if not no_body and (length_header is None or (fault is not None and fault.kind == "wrong_digest")):
                    data = resp.read()
                    if fault is not None and fault.kind == "wrong_digest":
                        data += b"\n"
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() in HOP_BY_HOP:
                        continue
                    if k.lower() == "location" and v.startswith(proxy.upstream.url):
                        self.send_header(k, proxy.url + v[len(proxy.upstream.url) :])
                    else:
                        self.send_header(k, v)
                if data is not None:
                    self.send_header("Content-Length", str(len(data)))
                elif length_header is not None:
                    self.send_header("Content-Length", length_header)
                else:
                    self.send_header("Content-Length", "0")
                self.end_headers()
                if no_body:
                    return resp.status
                if data is not None:
                    self.wfile.write(data)
                    self.record.sent = len(data)
                    return resp.status
                self._stream(resp, int(length_header or 0), fault)
                return resp.status

            def _stream(self, resp: http.client.HTTPResponse, length: int, fault: Fault | None) -> None:
                kind = fault.kind if fault else None
                flip_at = length // 2 if kind == "corrupt" and length > 0 else -1
                limit = fault.after if fault is not None and kind in ("cut", "stall") else None
                rate = fault.rate if fault is not None and kind == "slow" else 0
                piece = max(1, min(CHUNK, rate // 20)) if rate else CHUNK
                sent = 0
                started = time.monotonic()
                while True:
                    want = piece if limit is None else min(piece, limit - sent)
                    chunk = resp.read(want) if want > 0 else b""
                    if not chunk:
                        break
                    if sent <= flip_at < sent + len(chunk):
                        i = flip_at - sent
                        chunk = chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]
                    self.wfile.write(chunk)
                    sent += len(chunk)
                    self.record.sent = sent
                    if rate:
                        self.wfile.flush()
                        ahead = sent / rate - (time.monotonic() - started)
                        if ahead > 0 and self.server.stopping.wait(ahead):
                            self.drop()
                            return
                if kind == "stall":
                    self.wfile.flush()
                    self.server.stopping.wait(proxy.stall_seconds)
                    self.drop()
                elif kind == "cut":
                    self.drop()

        return Handler
