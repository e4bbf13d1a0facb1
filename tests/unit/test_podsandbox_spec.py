"""Pod sandbox specs, files and CNI arguments: pure functions, no root."""

from __future__ import annotations

import dataclasses
import json

import pytest

from cri.errors import InvalidArgument
from cri.state import records
from podsandbox.files import render_hosts, render_resolv_conf
from podsandbox.network import MAX_BURST, capabilities, cni_args, parse_quantity
from podsandbox.spec import DnsConfig, Metadata, NamespaceMode, PortMapping, SandboxSpec, sysctl_namespace, validate


def spec(**changes) -> SandboxSpec:
    base = SandboxSpec(metadata=Metadata("web", "uid-1", "default", 0), hostname="web")
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("net.ipv4.ip_forward", "net"),
        ("net/ipv4/ip_forward", "net"),
        ("kernel.shmmax", "ipc"),
        ("fs.mqueue.msg_max", "ipc"),
        ("kernel.domainname", "uts"),
        ("kernel.pid_max", None),
        ("vm.swappiness", None),
    ],
)
def test_sysctls_are_classified_by_namespace(key, kind):
    assert sysctl_namespace(key) == kind


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"metadata": Metadata("", "u", "n")}, "config.metadata.name"),
        ({"metadata": Metadata("a", "", "n")}, "config.metadata.uid"),
        ({"metadata": Metadata("a", "u", "n", -1)}, "config.metadata.attempt"),
        ({"hostname": "bad_name!"}, "config.hostname"),
        ({"log_directory": "var/log"}, "config.log_directory"),
        ({"log_directory": "/var/../etc"}, "config.log_directory"),
        ({"pid_mode": NamespaceMode.TARGET}, "config.linux.security_context.namespace_options.pid"),
        ({"network_mode": NamespaceMode.CONTAINER}, "config.linux.security_context.namespace_options.network"),
        ({"dns": DnsConfig(servers=("8.8.8.8", "x"))}, "config.dns_config.servers[1]"),
        ({"dns": DnsConfig(options=("a b",))}, "config.dns_config.options[0]"),
        ({"port_mappings": (PortMapping("tcp", 70000, 0),)}, "config.port_mappings[0].container_port"),
        ({"port_mappings": (PortMapping("tcp", 80, 80, "nope"),)}, "config.port_mappings[0].host_ip"),
        ({"sysctls": {"kernel.pid_max": "9"}}, "config.linux.sysctls[kernel.pid_max]"),
        ({"sysctls": {"net.ipv4.ip_forward": "1"}, "network_mode": NamespaceMode.NODE}, "net.ipv4.ip_forward"),
        ({"sysctls": {"kernel.shmmax": "1"}, "ipc_mode": NamespaceMode.NODE}, "kernel.shmmax"),
        ({"cgroup_parent": "relative/path"}, "config.linux.cgroup_parent"),
    ],
)
def test_invalid_specs_name_the_field(changes, field):
    with pytest.raises(InvalidArgument) as err:
        validate(spec(**changes), "cgroupfs")
    assert field in str(err.value)


def test_cgroup_parent_forms_follow_the_manager():
    validate(spec(cgroup_parent="/kubepods/besteffort/pod1"), "cgroupfs")
    validate(spec(cgroup_parent="kubepods-besteffort-pod1.slice"), "systemd")
    with pytest.raises(InvalidArgument, match="slice"):
        validate(spec(cgroup_parent="/kubepods/pod1"), "systemd")


def test_a_valid_spec_round_trips_through_json():
    original = spec(
        dns=DnsConfig(("10.0.0.10",), ("svc.local",), ("ndots:5",)),
        port_mappings=(PortMapping("udp", 53, 5353, "127.0.0.1"),),
        labels={"app": "web"},
        sysctls={"net.ipv4.ip_unprivileged_port_start": "0"},
        pid_mode=NamespaceMode.POD,
        privileged=True,
    )
    validate(original, "cgroupfs")
    assert records.decode(SandboxSpec, json.loads(json.dumps(records.encode(original)))) == original


def test_a_row_written_before_the_privileged_field_reads_as_unprivileged():
    data = records.encode(spec(privileged=True))
    del data["privileged"]
    assert records.decode(SandboxSpec, data).privileged is False


def test_resolv_conf_and_hosts_render_like_the_peers():
    dns = DnsConfig(("10.96.0.10",), ("ns.svc.cluster.local", "svc.cluster.local"), ("ndots:5",))
    assert render_resolv_conf(dns) == (
        "nameserver 10.96.0.10\nsearch ns.svc.cluster.local svc.cluster.local\noptions ndots:5\n"
    )
    assert render_hosts("web", ["10.1.0.5"]).splitlines()[-1] == "10.1.0.5\tweb"


@pytest.mark.parametrize(
    ("text", "bits"), [("10M", 10_000_000), ("1Gi", 2**30), ("500k", 500_000), ("1.5M", 1_500_000)]
)
def test_bandwidth_quantities(text, bits):
    assert parse_quantity(text, "x") == bits


def test_capabilities_and_args_carry_ports_bandwidth_and_pod_identity():
    s = spec(
        port_mappings=(PortMapping("tcp", 80, 8080), PortMapping("tcp", 81, 0)),
        annotations={"kubernetes.io/ingress-bandwidth": "1M"},
    )
    caps = capabilities(s)
    assert caps["portMappings"] == [{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}]
    assert caps["bandwidth"] == {"ingressRate": 1_000_000, "ingressBurst": MAX_BURST}
    args = cni_args("abc", s)
    assert args["K8S_POD_NAME"] == "web" and args["K8S_POD_INFRA_CONTAINER_ID"] == "abc"
    assert args["IgnoreUnknown"] == "1"
    with pytest.raises(ValueError, match="ingress-bandwidth"):
        capabilities(spec(annotations={"kubernetes.io/ingress-bandwidth": "fast"}))
