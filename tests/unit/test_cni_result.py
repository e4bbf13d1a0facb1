"""Parsing CNI results (0.3.0 to 1.1.0) and plugin error output."""

from __future__ import annotations

import ipaddress
import json

import pytest

from cni.result import DNS, PluginError, ResultError, parse_error, parse_result, result_from_dict

RESULT_031 = {
    "cniVersion": "0.3.1",
    "interfaces": [
        {"name": "cni0", "mac": "00:11:22:33:44:55"},
        {"name": "veth1", "mac": "66:77:88:99:aa:bb"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "sandbox": "/var/run/netns/x"},
    ],
    "ips": [
        {"version": "4", "address": "10.1.0.5/16", "gateway": "10.1.0.1", "interface": 2},
        {"version": "6", "address": "fd00::5/64", "interface": 2},
    ],
    "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1"}, {"dst": "::/0"}],
    "dns": {"nameservers": ["10.1.0.1"], "domain": "example.test", "search": ["a.test"], "options": ["ndots:5"]},
}


@pytest.mark.parametrize("version", ["0.3.0", "0.3.1", "0.4.0"])
def test_0_3_and_0_4_results_ignore_the_ip_version_field(version):
    result = parse_result(json.dumps({**RESULT_031, "cniVersion": version}))
    assert result.cni_version == version
    assert [i.name for i in result.interfaces] == ["cni0", "veth1", "eth0"]
    assert result.interfaces[2].sandbox == "/var/run/netns/x"
    assert result.ips[0].address == ipaddress.ip_interface("10.1.0.5/16")
    assert result.ips[0].address.network == ipaddress.ip_network("10.1.0.0/16")
    assert result.ips[0].gateway == ipaddress.ip_address("10.1.0.1")
    assert result.ips[0].interface == 2
    assert result.ips[1].address == ipaddress.ip_interface("fd00::5/64")
    assert result.ips[1].gateway is None
    assert result.routes[0].dst == ipaddress.ip_network("0.0.0.0/0")
    assert result.routes[0].gw == ipaddress.ip_address("10.1.0.1")
    assert result.routes[1].gw is None
    assert result.dns == DNS(("10.1.0.1",), "example.test", ("a.test",), ("ndots:5",))
    # The JSON is kept whole: it is the next plugin's prevResult.
    assert result.raw["ips"][0]["version"] == "4"


def test_1_0_0_result():
    raw = {
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "mac": "aa:bb:cc:dd:ee:ff", "mtu": 1500, "sandbox": "/run/netns/n"}],
        "ips": [{"address": "10.2.0.7/24", "gateway": "10.2.0.1", "interface": 0}],
        "routes": [{"dst": "10.0.0.0/8", "gw": "10.2.0.1"}],
        "dns": {},
    }
    result = parse_result(json.dumps(raw).encode())
    assert result.interfaces[0].mtu == 1500
    assert str(result.ips[0].address.ip) == "10.2.0.7"
    assert result.dns == DNS()
    assert result.raw == raw


def test_1_1_0_result_with_route_attributes_and_minimal_fields():
    raw = {
        "cniVersion": "1.1.0",
        "interfaces": [{"name": "eth0", "socketPath": "/run/x.sock", "pciID": "0000:00:1f.6"}],
        "ips": [{"address": "10.3.0.2/24"}],
        "routes": [{"dst": "10.9.0.0/16", "mtu": 1400, "advmss": 1360, "priority": 10, "table": 100, "scope": 0}],
    }
    result = result_from_dict(raw)
    assert result.interfaces[0].socket_path == "/run/x.sock"
    assert result.interfaces[0].pci_id == "0000:00:1f.6"
    route = result.routes[0]
    assert (route.mtu, route.advmss, route.priority, route.table, route.scope) == (1400, 1360, 10, 100, 0)
    assert result.ips[0].interface is None
    assert result.dns == DNS()


def test_empty_result_is_valid():
    result = parse_result('{"cniVersion": "1.0.0"}')
    assert (result.interfaces, result.ips, result.routes) == ((), (), ())


def test_sandbox_ips_picks_the_container_interface():
    result = result_from_dict(RESULT_031)
    assert [str(ip.address.ip) for ip in result.sandbox_ips("eth0")] == ["10.1.0.5", "fd00::5"]
    assert result.sandbox_ips("veth1") == []
    no_index = result_from_dict({"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/8"}]})
    assert len(no_index.sandbox_ips("eth0")) == 1


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ("not json", "not JSON"),
        ("[]", "expected a JSON object"),
        ('{"ips": []}', "no 'cniVersion'"),
        ('{"cniVersion": "0.2.0", "ip4": {"ip": "10.0.0.2/8"}}', "unsupported result version '0.2.0'"),
        ('{"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2"}]}', "ips[0].address: '10.0.0.2' is not in CIDR"),
        ('{"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.300/8"}]}', "ips[0].address"),
        ('{"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/8", "gateway": "x"}]}', "ips[0].gateway"),
        ('{"cniVersion": "1.0.0", "ips": [{"address": "10.0.0.2/8", "interface": "0"}]}', "ips[0].interface"),
        ('{"cniVersion": "1.0.0", "ips": {}}', "ips: expected a list"),
        ('{"cniVersion": "1.0.0", "interfaces": [{"mac": "x"}]}', "interfaces[0].name"),
        ('{"cniVersion": "1.0.0", "routes": [{"dst": "nope/8"}]}', "routes[0].dst"),
        ('{"cniVersion": "1.0.0", "dns": {"nameservers": "1.1.1.1"}}', "dns.nameservers"),
    ],
)
def test_malformed_results_name_the_field(data, problem):
    with pytest.raises(ResultError) as err:
        parse_result(data)
    assert problem in str(err.value)


def test_plugin_error_from_spec_json():
    stdout = json.dumps({"cniVersion": "1.0.0", "code": 7, "msg": "invalid config", "details": "no subnet"})
    err = parse_error("bridge", stdout.encode(), "", 1, "ADD")
    assert isinstance(err, PluginError)
    assert (err.code, err.msg, err.details, err.exit_status, err.command) == (
        7,
        "invalid config",
        "no subnet",
        1,
        "ADD",
    )
    assert str(err) == "plugin bridge failed (code 7): invalid config: no subnet"


def test_plugin_error_carries_stderr_and_tolerates_missing_details():
    err = parse_error("bridge", b'{"code": 11, "msg": "busy"}', "lock held by 42\n", 1)
    assert str(err) == "plugin bridge failed (code 11): busy (stderr: lock held by 42)"
    assert err.details == ""


def test_plugin_error_without_msg_uses_the_code_meaning():
    err = parse_error("x", b'{"code": 3}', "", 1)
    assert "container unknown" in str(err)


def test_plugin_error_falls_back_to_stderr_then_stdout():
    err = parse_error("portmap", b"panic: boom", "goroutine 1 [running]", 2)
    assert err.code is None
    assert str(err) == "plugin portmap failed (exit status 2): goroutine 1 [running]"
    err = parse_error("portmap", b"plain failure text", "", 2)
    assert str(err) == "plugin portmap failed (exit status 2): plain failure text"
    err = parse_error("portmap", b"", "", 2)
    assert str(err) == "plugin portmap failed (exit status 2): no output"
