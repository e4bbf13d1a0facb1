"""CniNetwork against Debian's real CNI plugins (bridge, host-local, portmap, loopback), as root.

Each test makes its own network namespace, its own bridge (cpt<random hex>) and
its own /24 in 10.199.0.0/16 with host-local's dataDir under tmp_path, so tests
do not see each other or anything else, and can run any number of times. The
only traffic is between the host and the test's own namespace over its bridge.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cni.conf import load_file
from cni.network import CniNetwork
from cni.result import PluginError, Result

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")

SYSTEM_PLUGINS = "/usr/lib/cni"
CID = "feed" * 16


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=30)


@pytest.fixture(autouse=True)
def _plugins_present() -> None:
    for name in ("bridge", "host-local", "portmap", "loopback"):
        if not os.access(f"{SYSTEM_PLUGINS}/{name}", os.X_OK):
            pytest.fail(f"{SYSTEM_PLUGINS}/{name} missing: install Debian's containernetworking-plugins")


@pytest.fixture
def netns() -> Iterator[str]:
    name = f"criopy-t-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", name)
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


@dataclass
class NetFixture:
    bridge: str
    subnet: str  # "10.199.N"
    ipam_dir: Path
    conflist: Path
    plugin_dirs: list[str]
    cache_dir: Path

    def network(self) -> CniNetwork:
        return CniNetwork(load_file(self.conflist), self.plugin_dirs, self.cache_dir, timeout=30)

    def allocations(self) -> list[str]:
        """The IPs host-local holds (its dataDir has one file per allocated IP)."""
        found = []
        for path in self.ipam_dir.rglob("*"):
            if path.is_file() and path.name.startswith(self.subnet + "."):
                found.append(path.name)
        return found

    def bridge_ports(self) -> list[str]:
        out = sh("ip", "-j", "link", "show", "master", self.bridge, check=False)
        return [link["ifname"] for link in json.loads(out.stdout or "[]")]


def _free_subnet() -> str:
    routes = sh("ip", "-4", "route", "show", "table", "all").stdout
    for _ in range(50):
        prefix = f"10.199.{random.randint(0, 255)}"
        if prefix + "." not in routes:
            return prefix
    pytest.fail("no free 10.199.N.0/24 subnet for the test")


def _conflist(path: Path, name: str, plugins: list[dict[str, Any]]) -> Path:
    path.write_text(json.dumps({"cniVersion": "1.0.0", "name": name, "plugins": plugins}))
    return path


@pytest.fixture
def testnet(tmp_path: Path) -> Iterator[NetFixture]:
    bridge = f"cpt{secrets.token_hex(3)}"
    subnet = _free_subnet()
    extra = tmp_path / "bin"
    extra.mkdir()
    net = NetFixture(
        bridge=bridge,
        subnet=subnet,
        ipam_dir=tmp_path / "ipam",
        conflist=tmp_path / "net.conflist",
        plugin_dirs=[SYSTEM_PLUGINS, str(extra)],
        cache_dir=tmp_path / "cache",
    )
    bridge_plugin = {
        "type": "bridge",
        "bridge": bridge,
        "isGateway": True,
        "ipMasq": False,
        "hairpinMode": False,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": f"{subnet}.0/24"}]],
            "routes": [{"dst": "0.0.0.0/0"}],
            "dataDir": str(net.ipam_dir),
        },
    }
    _conflist(
        net.conflist,
        f"criopy-test-{bridge}",
        [bridge_plugin, {"type": "portmap", "capabilities": {"portMappings": True}}],
    )
    try:
        yield net
    finally:
        sh("ip", "link", "del", bridge, check=False)


def _pod_ip(result: Result) -> str:
    ips = result.sandbox_ips("eth0")
    assert len(ips) == 1, result
    return str(ips[0].address.ip)


def _host_veth(result: Result, bridge: str) -> str:
    names = [i.name for i in result.interfaces if not i.sandbox and i.name != bridge]
    assert len(names) == 1, result
    return names[0]


SERVER = """
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 0))
s.listen(1)
print(s.getsockname()[1], flush=True)
s.settimeout(20)
conn, _ = s.accept()
conn.sendall(b"hello from the pod\\n")
conn.close()
"""


@pytest.fixture
def serve_in(request: pytest.FixtureRequest) -> Iterator[Any]:
    procs: list[subprocess.Popen[str]] = []

    def start(ns: str) -> int:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", SERVER],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip().isdigit(), f"server did not start: {line!r} {proc.stderr.read() if proc.stderr else ''}"
        return int(line)

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


def _read_line(ip: str, port: int) -> bytes:
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection((ip, port), timeout=3) as conn:
                return conn.makefile("rb").readline()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)  # the veth may still be coming up (DAD, bridge port learning)


def test_add_gives_a_reachable_ip_and_del_frees_everything(netns, testnet, serve_in):
    net = testnet.network()
    ns_path = f"/run/netns/{netns}"
    result = asyncio.run(
        net.add(CID, ns_path, "eth0", {"IgnoreUnknown": "1", "K8S_POD_NAME": "web"}, {"portMappings": []})
    )
    try:
        ip = _pod_ip(result)
        assert ip.startswith(testnet.subnet + ".")
        assert str(result.ips[0].gateway) == f"{testnet.subnet}.1"
        veth = _host_veth(result, testnet.bridge)
        assert testnet.bridge_ports() == [veth]
        assert testnet.allocations() == [ip]
        assert f"inet {ip}/24" in sh("ip", "-n", netns, "addr", "show", "eth0").stdout
        assert net.cached_result(CID, "eth0") == result

        port = serve_in(netns)
        assert _read_line(ip, port) == b"hello from the pod\n"

        asyncio.run(net.check(CID, ns_path, "eth0"))
    finally:
        asyncio.run(net.delete(CID, ns_path, "eth0"))
    assert sh("ip", "link", "show", veth, check=False).returncode != 0
    assert testnet.bridge_ports() == []
    assert testnet.allocations() == []
    assert net.cached_result(CID, "eth0") is None
    assert "eth0" not in sh("ip", "-n", netns, "link", "show").stdout
    # DEL again (a kubelet retry) succeeds with nothing left to free.
    asyncio.run(net.delete(CID, ns_path, "eth0"))


def test_del_after_the_netns_is_gone_still_frees_the_ip(testnet):
    ns = f"criopy-t-{secrets.token_hex(4)}"
    sh("ip", "netns", "add", ns)
    try:
        net = testnet.network()
        result = asyncio.run(net.add(CID, f"/run/netns/{ns}", "eth0"))
        assert testnet.allocations() == [_pod_ip(result)]
    finally:
        sh("ip", "netns", "del", ns, check=False)
    asyncio.run(net.delete(CID, f"/run/netns/{ns}", "eth0"))
    assert testnet.allocations() == []
    assert net.cached_result(CID, "eth0") is None
    deadline = time.monotonic() + 5  # the veth dies with its namespace, asynchronously
    while testnet.bridge_ports() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert testnet.bridge_ports() == []


def test_failing_second_plugin_undoes_the_bridge_and_ip(netns, testnet):
    failing = Path(testnet.plugin_dirs[1]) / "criopy-test-fail"
    failing.write_text(
        "#!/bin/sh\ncat >/dev/null\n"
        'if [ "$CNI_COMMAND" = ADD ]; then\n'
        "  echo 'refusing on purpose' >&2\n"
        '  echo \'{"cniVersion":"1.0.0","code":7,"msg":"test plugin refuses","details":"on purpose"}\'\n'
        "  exit 1\n"
        "fi\n"
    )
    failing.chmod(0o755)
    conf = json.loads(testnet.conflist.read_text())
    conf["plugins"] = [conf["plugins"][0], {"type": "criopy-test-fail"}, conf["plugins"][1]]
    testnet.conflist.write_text(json.dumps(conf))
    net = testnet.network()
    with pytest.raises(PluginError) as err:
        asyncio.run(net.add(CID, f"/run/netns/{netns}", "eth0"))
    assert err.value.plugin == "criopy-test-fail"
    assert str(err.value) == (
        "plugin criopy-test-fail failed (code 7): test plugin refuses: on purpose (stderr: refusing on purpose)"
    )
    assert testnet.allocations() == []
    assert testnet.bridge_ports() == []
    assert "eth0" not in sh("ip", "-n", netns, "link", "show").stdout
    assert net.cached_result(CID, "eth0") is None


def test_invalid_portmap_config_fails_with_its_message_and_leaves_nothing(netns, testnet):
    conf = json.loads(testnet.conflist.read_text())
    conf["plugins"][1]["snat"] = "not a boolean"
    testnet.conflist.write_text(json.dumps(conf))
    net = testnet.network()
    with pytest.raises(PluginError) as err:
        asyncio.run(net.add(CID, f"/run/netns/{netns}", "eth0", capabilities={"portMappings": []}))
    assert err.value.plugin == "portmap"
    assert str(err.value).startswith("plugin portmap failed (code 999): failed to parse config")
    assert "PortMapConf.snat" in str(err.value)
    assert testnet.allocations() == []
    assert testnet.bridge_ports() == []


def test_loopback_and_version(netns, tmp_path):
    conflist = _conflist(tmp_path / "lo.conflist", "criopy-test-lo", [{"type": "loopback"}])
    net = CniNetwork(load_file(conflist), [SYSTEM_PLUGINS], tmp_path / "cache", timeout=30)
    result = asyncio.run(net.add(CID, f"/run/netns/{netns}", "lo"))
    assert [str(ip.address) for ip in result.ips][:1] == ["127.0.0.1/8"]
    shown = sh("ip", "-n", netns, "addr", "show", "lo").stdout
    assert "UP" in shown.split(">")[0]
    assert "inet 127.0.0.1/8" in shown
    asyncio.run(net.delete(CID, f"/run/netns/{netns}", "lo"))
    assert "1.0.0" in asyncio.run(net.version("bridge"))
