"""A stand-in for the API server and the kubelet, just enough for a real `kubectl exec/attach/port-forward`.

kubectl (client-go's SPDY and WebSocket executors, its port-forward dialer) is
the client the streaming server really serves. In a cluster it reaches the CRI
streaming server through two hops: the API server, and the kubelet, which asks
the runtime for a URL (Exec/Attach/PortForward) and proxies the upgrade
request to it. This does both hops in one, like the kubelet's proxy does:
it answers kubectl's GET of the pod (and the discovery documents port-forward
reads), turns the exec/attach/portforward request's query into the CRI
request, and relays the client's upgrade request, headers and all, and then
the raw bytes both ways. Nothing of the protocols is interpreted here.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc

from api.runtime.v1 import api_pb2 as pb

# Request headers that are the proxy's own business, never passed on.
HOP_HEADERS = {"host", "content-length"}
RELAY_CHUNK = 65536
RELAY_LINGER = 5.0  # how long the client may take to close after the server did


@dataclass
class KubeContainer:
    name: str
    id: str
    stdin: bool = False
    tty: bool = False


@dataclass
class KubePod:
    namespace: str
    name: str
    sandbox_id: str
    containers: list[KubeContainer] = field(default_factory=list)

    def container(self, name: str) -> KubeContainer | None:
        if not name and self.containers:
            return self.containers[0]
        return next((c for c in self.containers if c.name == name), None)

    def as_json(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "uid": self.sandbox_id[:32]},
            "spec": {
                "containers": [
                    {"name": c.name, "image": "busybox", "stdin": c.stdin, "tty": c.tty} for c in self.containers
                ]
            },
            "status": {
                "phase": "Running",
                "containerStatuses": [
                    {"name": c.name, "ready": True, "state": {"running": {}}, "containerID": f"criopy://{c.id}"}
                    for c in self.containers
                ],
            },
        }


def _discovery(path: str) -> dict[str, Any] | None:
    """The discovery documents kubectl's resource builder reads before it looks a pod up."""
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
    if path == "/apis":
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": []}
    if path == "/api/v1":
        pods: dict[str, Any] = {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod"}
        subresources = [
            {**pods, "name": f"pods/{sub}", "verbs": ["create", "get"]} for sub in ("exec", "attach", "portforward")
        ]
        return {
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [{**pods, "verbs": ["get", "list"], "shortNames": ["po"]}, *subresources],
        }
    return None


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[-1] in ("true", "1")


class KubeApi:
    """Serves kubectl on 127.0.0.1 over plain HTTP; `runtime` is the daemon's RuntimeService stub."""

    def __init__(self, runtime: Any) -> None:
        self.runtime = runtime
        self.pods: dict[tuple[str, str], KubePod] = {}
        self.requests: list[str] = []  # "METHOD path" of every request, for failure messages
        self.upgrades: list[str] = []  # the Upgrade header of each streaming request: which protocol kubectl chose
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="kubeapi", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add_pod(self, pod: KubePod) -> None:
        self.pods[(pod.namespace, pod.name)] = pod

    def kubeconfig(self, path: Path) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "e2e", "cluster": {"server": self.url}}],
            "users": [{"name": "e2e", "user": {}}],
            "contexts": [{"name": "e2e", "context": {"cluster": "e2e", "user": "e2e"}}],
            "current-context": "e2e",
        }
        path.write_text(json.dumps(config))
        return path

    def __enter__(self) -> KubeApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)

    # -- the kubelet's part: the CRI request for a streaming subresource --

    def stream_url(self, pod: KubePod, subresource: str, query: dict[str, list[str]]) -> str:
        if subresource == "portforward":
            ports = [int(p) for value in query.get("ports", []) for p in value.split(",") if p]
            request = pb.PortForwardRequest(pod_sandbox_id=pod.sandbox_id, port=ports)
            return str(self.runtime.PortForward(request, timeout=10).url)
        container = pod.container(query.get("container", [""])[-1])
        if container is None:
            raise LookupError(f"no container {query.get('container')} in pod {pod.name}")
        streams = {name: _flag(query, name) for name in ("stdin", "stdout", "stderr", "tty")}
        if subresource == "exec":
            exec_request = pb.ExecRequest(container_id=container.id, cmd=query.get("command", []), **streams)
            return str(self.runtime.Exec(exec_request, timeout=10).url)
        attach = pb.AttachRequest(container_id=container.id, **streams)
        return str(self.runtime.Attach(attach, timeout=10).url)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass  # kubectl's requests are kept in api.requests instead

            def do_GET(self) -> None:
                self._route()

            def do_POST(self) -> None:
                self._route()

            def _route(self) -> None:
                api.requests.append(f"{self.command} {self.path}")
                url = urllib.parse.urlsplit(self.path)
                parts = url.path.strip("/").split("/")
                if (document := _discovery(url.path)) is not None:
                    return self._json(200, document)
                # api/v1/namespaces/<ns>/pods/<name>[/<subresource>]
                if len(parts) in (6, 7) and parts[:3] == ["api", "v1", "namespaces"] and parts[4] == "pods":
                    pod = api.pods.get((parts[3], parts[5]))
                    if pod is None:
                        return self._status(404, "NotFound", f'pods "{parts[5]}" not found')
                    if len(parts) == 6:
                        return self._json(200, pod.as_json())
                    if parts[6] in ("exec", "attach", "portforward"):
                        return self._proxy(pod, parts[6], urllib.parse.parse_qs(url.query))
                return self._status(404, "NotFound", f"no route for {url.path}")

            def _json(self, code: int, document: dict[str, Any]) -> None:
                body = json.dumps(document).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _status(self, code: int, reason: str, message: str) -> None:
                status = {"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message}
                self._json(code, {**status, "reason": reason, "code": code})

            def _proxy(self, pod: KubePod, subresource: str, query: dict[str, list[str]]) -> None:
                api.upgrades.append(self.headers.get("Upgrade", ""))
                try:
                    target = urllib.parse.urlsplit(api.stream_url(pod, subresource, query))
                except (grpc.RpcError, LookupError) as error:  # the refusal goes back to kubectl, as the kubelet's does
                    return self._status(500, "InternalError", f"{subresource}: {error}")
                self.close_connection = True
                upstream = socket.create_connection((target.hostname or "", target.port or 80), timeout=30)
                with upstream:
                    upstream.sendall(self._upgrade_request(target))
                    _relay(self.connection, self.rfile.read1, upstream)

            def _upgrade_request(self, target: urllib.parse.SplitResult) -> bytes:
                lines = [f"{self.command} {target.path} HTTP/1.1", f"Host: {target.netloc}"]
                lines += [f"{k}: {v}" for k, v in self.headers.items() if k.lower() not in HOP_HEADERS]
                return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        return Handler


def _relay(client: socket.socket, client_read: Callable[[int], bytes], upstream: socket.socket) -> None:
    """Bytes both ways until both sides are done; an end of one direction is passed on as a half-close."""
    client.settimeout(None)
    upstream.settimeout(None)

    def pump(read: Callable[[int], bytes], to: socket.socket) -> None:
        try:
            while data := read(RELAY_CHUNK):
                to.sendall(data)
        except OSError:
            pass  # a reset on either side ends this direction like an end of stream
        with contextlib.suppress(OSError):
            to.shutdown(socket.SHUT_WR)

    upward = threading.Thread(target=pump, args=(client_read, upstream), daemon=True)
    upward.start()
    pump(upstream.recv, client)
    upward.join(RELAY_LINGER)
    if upward.is_alive():  # the server is done and the client still holds its side open: end it
        with contextlib.suppress(OSError):
            client.shutdown(socket.SHUT_RDWR)
        upward.join(RELAY_LINGER)
