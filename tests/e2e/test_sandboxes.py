"""Pod sandboxes through the daemon's socket, with real namespaces and Debian's CNI plugins (root)."""

from __future__ import annotations

import os
import socket
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.system import linux
from tests.e2e.pods import PodNet, PodServer, add_plugin, fetch, info, pod_config, remove_all_pods, sh
from tests.support.daemon_harness import Daemon


@dataclass
class Env:
    daemon: Daemon
    net: PodNet

    @property
    def rt(self):
        return self.daemon.runtime()

    def run(self, config: pb.PodSandboxConfig, timeout: float = 60) -> str:
        resp = self.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=timeout)
        return str(resp.pod_sandbox_id)

    def status(self, pod_id: str) -> pb.PodSandboxStatus:
        return self.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=10).status

    def stop(self, pod_id: str) -> None:
        self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)

    def remove(self, pod_id: str) -> None:
        self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)

    def leftovers(self) -> dict[str, object]:
        """Everything a pod could leave behind: pins and shm mounts, veths, IPs, sandbox dirs, rows."""
        mounts = [m.mount_point for m in linux.mounts_under(str(self.daemon.runroot))]
        sandboxes = self.daemon.runroot / "sandboxes"
        return {
            "mounts": mounts,
            "veths": self.net.bridge_ports(),
            "ips": self.net.allocations(),
            "dirs": sorted(os.listdir(sandboxes)) if sandboxes.exists() else [],
            "pods": list(self.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items),
        }


NOTHING: dict[str, object] = {"mounts": [], "veths": [], "ips": [], "dirs": [], "pods": []}


@pytest.fixture
def env(make_daemon) -> Iterator[Env]:
    daemon = make_daemon(start=False)
    net = PodNet.make(daemon)
    daemon.start()
    try:
        yield Env(daemon, net)
    finally:
        remove_all_pods(daemon)
        net.remove()


def test_two_pods_get_ips_answer_reach_each_other_and_a_host_port(env: Env) -> None:
    host_port = 20000 + int.from_bytes(os.urandom(2), "big") % 20000
    a = env.run(pod_config(ports=[pb.PortMapping(container_port=8080, host_port=host_port)]))
    b = env.run(pod_config())
    ip_a, ip_b = env.status(a).network.ip, env.status(b).network.ip
    assert ip_a != ip_b
    assert ip_a.startswith(env.net.subnet + ".") and ip_b.startswith(env.net.subnet + ".")
    netns_a, netns_b = str(info(env.daemon, a)["netNamespacePath"]), str(info(env.daemon, b)["netNamespacePath"])
    servers = [PodServer(netns_a, 8080, "from-a"), PodServer(netns_b, 8080, "from-b")]
    try:
        assert fetch(ip_a, 8080) == "from-a"
        assert fetch(ip_b, 8080) == "from-b"
        assert fetch(ip_b, 8080, netns=netns_a) == "from-b"  # pod to pod over the bridge
        assert fetch(ip_a, 8080, netns=netns_b) == "from-a"
        # The host port reaches pod a through portmap's DNAT (to a host address: the bridge's).
        assert fetch(env.net.gateway, host_port) == "from-a"
    finally:
        for server in servers:
            server.close()


def test_hostname_dns_shm_and_sysctl_seen_inside_the_pod(make_daemon) -> None:
    daemon = make_daemon("pod:\n  shm_size: 33554432\n", start=False)
    net = PodNet.make(daemon)
    daemon.start()
    env = Env(daemon, net)
    try:
        dns = pb.DNSConfig(servers=["10.96.0.10", "1.1.1.1"], searches=["ns.svc.cluster.local"], options=["ndots:5"])
        pod = env.run(
            pod_config(
                hostname="web-0",
                dns=dns,
                sysctls={"net.ipv4.ip_unprivileged_port_start": "80", "kernel.shmmni": "1234"},
            )
        )
        details = info(daemon, pod)
        pins = details["namespaces"]
        assert isinstance(pins, dict)
        assert sh("nsenter", f"--uts={pins['uts']}", "hostname").stdout.strip() == "web-0"
        sandbox_dir = Path(str(details["sandboxDir"]))
        assert (sandbox_dir / "hostname").read_text() == "web-0\n"
        assert (sandbox_dir / "resolv.conf").read_text() == (
            "nameserver 10.96.0.10\nnameserver 1.1.1.1\nsearch ns.svc.cluster.local\noptions ndots:5\n"
        )
        shm = os.statvfs(str(details["shm"]))
        assert shm.f_blocks * shm.f_frsize == 32 * 1024 * 1024
        sysctl = sh("nsenter", f"--net={pins['net']}", "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start")
        assert sysctl.stdout.strip() == "80"
        assert sh("nsenter", f"--ipc={pins['ipc']}", "cat", "/proc/sys/kernel/shmmni").stdout.strip() == "1234"
        # ...and the host's own values are untouched.
        assert Path("/proc/sys/kernel/shmmni").read_text().strip() != "1234"
        assert Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text().strip() != "80"
        assert socket.gethostname() != "web-0"
        # The namespaces were made by a thread of the daemon: every thread left is in the host's.
        assert daemon.proc is not None
        host = {kind: os.readlink(f"/proc/self/ns/{kind}") for kind in ("net", "ipc", "uts")}
        for task in Path(f"/proc/{daemon.proc.pid}/task").iterdir():
            assert {kind: os.readlink(task / "ns" / kind) for kind in host} == host, task
        hosts = (sandbox_dir / "hosts").read_text()
        assert f"{env.status(pod).network.ip}\tweb-0" in hosts
    finally:
        remove_all_pods(daemon)
        net.remove()


def test_bad_requests_name_the_field_and_create_nothing(env: Env) -> None:
    cases = {
        "config.linux.sysctls[kernel.pid_max]": pod_config(sysctls={"kernel.pid_max": "100"}),
        "config.dns_config.servers[0]": pod_config(dns=pb.DNSConfig(servers=["not-an-ip"])),
        "config.port_mappings[0].container_port": pod_config(ports=[pb.PortMapping(container_port=0)]),
        "config.log_directory": pod_config(log_directory="relative/logs"),
        "config.metadata.name": pb.PodSandboxConfig(metadata=pb.PodSandboxMetadata(uid="u", namespace="n")),
    }
    host_net = pod_config(host_network=True, sysctls={"net.ipv4.ip_forward": "1"})
    cases["config.linux.sysctls[net.ipv4.ip_forward]"] = host_net
    for field, config in cases.items():
        with pytest.raises(grpc.RpcError) as err:
            env.run(config)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
        assert field in (err.value.details() or ""), (field, err.value.details())
    assert env.leftovers() == NOTHING


def test_host_network_pod_shares_the_host_netns_without_cni(env: Env) -> None:
    pod = env.run(pod_config(host_network=True))
    details = info(env.daemon, pod)
    assert details["netNamespacePath"] == ""
    assert details["cniNetwork"] == ""
    assert env.status(pod).network.ip == ""
    assert env.net.allocations() == []  # no CNI ADD happened
    assert not (env.daemon.root / "cni" / "results").exists() or not os.listdir(env.daemon.root / "cni" / "results")
    resolv = Path(str(details["sandboxDir"]), "resolv.conf").read_text()
    assert resolv == Path("/etc/resolv.conf").read_text()


def test_failing_plugin_undoes_everything_and_the_pod_can_be_made_once_fixed(env: Env) -> None:
    failing: dict[str, object] = {"type": "tuning", "sysctl": {"net.ipv4.conf.eth0.no_such_sysctl": "1"}}
    env.net.write([failing])
    config = pod_config()
    with pytest.raises(grpc.RpcError) as err:
        env.run(config)
    assert "no_such_sysctl" in (err.value.details() or "")
    assert env.leftovers() == NOTHING
    env.net.write([])
    pod = env.run(config)  # the same metadata: the name was released
    assert env.status(pod).state == pb.SANDBOX_READY


def test_stop_remove_idempotent_status_after_stop_and_list_filters(env: Env) -> None:
    web = env.run(pod_config(labels={"app": "web"}))
    db = env.run(pod_config(labels={"app": "db"}))
    ip = env.status(web).network.ip
    assert ip in env.net.allocations()
    env.stop(web)
    env.stop(web)
    status = env.status(web)
    assert status.state == pb.SANDBOX_NOTREADY
    assert status.network.ip == ""
    assert ip not in env.net.allocations()

    def ids(flt: pb.PodSandboxFilter) -> set[str]:
        return {p.id for p in env.rt.ListPodSandbox(pb.ListPodSandboxRequest(filter=flt)).items}

    assert ids(pb.PodSandboxFilter()) == {web, db}
    assert ids(pb.PodSandboxFilter(id=web[:10])) == {web}
    assert ids(pb.PodSandboxFilter(state=pb.PodSandboxStateValue(state=pb.SANDBOX_READY))) == {db}
    assert ids(pb.PodSandboxFilter(state=pb.PodSandboxStateValue(state=pb.SANDBOX_NOTREADY))) == {web}
    assert ids(pb.PodSandboxFilter(label_selector={"app": "db"})) == {db}
    streamed = [p.id for r in env.rt.StreamPodSandboxes(pb.StreamPodSandboxesRequest()) for p in r.pod_sandboxes]
    assert sorted(streamed) == sorted([web, db])

    samples = env.daemon.metrics()
    assert samples['criopy_pod_sandboxes{state="ready"}'] == 1.0
    assert samples['criopy_pod_sandboxes{state="notready"}'] == 1.0
    assert samples['criopy_cni_plugin_duration_seconds_count{command="ADD",plugin="bridge"}'] == 2.0
    assert samples['criopy_cni_plugin_duration_seconds_count{command="DEL",plugin="bridge"}'] == 1.0

    env.remove(web)
    env.remove(web)
    env.remove(db[:12])  # a prefix, as crictl users type
    with pytest.raises(grpc.RpcError) as err:
        env.status(web)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert env.leftovers() == NOTHING


def test_duplicate_name_is_refused_until_removed(env: Env) -> None:
    config = pod_config()
    first = env.run(config)
    with pytest.raises(grpc.RpcError) as err:
        env.run(config)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert first in (err.value.details() or "")
    env.remove(first)
    assert env.run(config) != first


def test_daemon_restart_between_run_and_stop_still_tears_down_the_network(env: Env) -> None:
    pod = env.run(pod_config())
    ip = env.status(pod).network.ip
    assert env.daemon.stop() == 0
    env.daemon.start()
    assert env.status(pod).state == pb.SANDBOX_READY
    assert env.status(pod).network.ip == ip
    env.stop(pod)
    assert env.net.allocations() == []
    assert env.net.bridge_ports() == []
    env.remove(pod)
    assert env.leftovers() == NOTHING


def test_twenty_pods_created_and_removed_concurrently_leave_nothing(env: Env) -> None:
    configs = [pod_config() for _ in range(20)]
    with ThreadPoolExecutor(max_workers=20) as pool:
        ids = list(pool.map(env.run, configs))
    assert len(set(ids)) == 20
    ips = {env.status(pod).network.ip for pod in ids}
    assert len(ips) == 20
    with ThreadPoolExecutor(max_workers=20) as pool:
        list(pool.map(env.remove, ids))
    assert env.leftovers() == NOTHING


SLOW_PLUGIN = textwrap.dedent(
    """\
    #!/bin/sh
    # A bridge that takes its time on ADD: what a slow network add-on looks like to the runtime.
    if [ "$CNI_COMMAND" = ADD ]; then sleep {seconds}; fi
    exec /usr/lib/cni/bridge
    """
)


def test_kubelet_retry_after_deadline_gets_the_same_sandbox(make_daemon) -> None:
    daemon = make_daemon(start=False)
    add_plugin(daemon, "slowbridge", SLOW_PLUGIN.format(seconds=4))
    net = PodNet.make(daemon)
    net.write([], bridge_type="slowbridge")
    daemon.start()
    env = Env(daemon, net)
    try:
        config = pod_config()
        with pytest.raises(grpc.RpcError) as err:
            env.run(config, timeout=1)  # the kubelet's deadline expires first
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        started = time.monotonic()
        retry = env.run(config, timeout=30)  # joins the creation still in flight
        assert time.monotonic() - started < 10
        assert env.status(retry).state == pb.SANDBOX_READY
        pods = env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
        assert [p.id for p in pods] == [retry]

        # A retry that comes after the abandoned creation finished gets it too.
        late = pod_config()
        with pytest.raises(grpc.RpcError):
            env.run(late, timeout=1)
        daemon.wait_for_log("finished after its caller left", timeout=20)
        assert env.status(env.run(late, timeout=30)).state == pb.SANDBOX_READY
        assert len(env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items) == 2
    finally:
        remove_all_pods(daemon)
        net.remove()


def test_shared_pid_pod_gets_catatonit_as_pid_1_in_its_namespaces(env: Env) -> None:
    pod = env.run(pod_config(shared_pid=True))
    details = info(env.daemon, pod)
    pid = int(str(details["infraPid"]))
    pins = details["namespaces"]
    assert isinstance(pins, dict)
    status = Path(f"/proc/{pid}/status").read_text()
    assert any(line.split()[-1] == "1" for line in status.splitlines() if line.startswith("NSpid:"))
    assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(pins["net"]).st_ino
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0] == b"/catatonit"
    env.stop(pod)
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    assert int(str(info(env.daemon, pod)["infraPid"])) == 0
    env.remove(pod)
    assert env.leftovers() == NOTHING
