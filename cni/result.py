"""CNI results and plugin errors, as the spec defines them (0.3.0 up to 1.1.0).

A result is kept together with the JSON it was parsed from (`raw`): that JSON is
what the next plugin receives as prevResult and what the cache stores, so a
field this module does not model is never lost on the way.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass, field
from typing import Any

# Versions whose result has the interfaces/ips/routes/dns shape. 0.1.0 and 0.2.0
# (ip4/ip6 results) are not supported.
RESULT_VERSIONS = ("0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0")

IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Well-known error codes of the spec (section "Error").
ERROR_CODES = {
    1: "incompatible CNI version",
    2: "unsupported field in network configuration",
    3: "container unknown or does not exist",
    4: "invalid necessary environment variables",
    5: "I/O failure",
    6: "failed to decode content",
    7: "invalid network config",
    11: "try again later",
    50: "plugin not available",
    51: "plugin not available, limited connectivity",
}


class CniError(Exception):
    """Base of every error raised by the cni package."""


class ResultError(CniError):
    """A plugin's result does not follow the spec."""


class PluginError(CniError):
    """A plugin exited non-zero; carries the spec's error fields when it printed them."""

    def __init__(
        self,
        plugin: str,
        msg: str,
        *,
        code: int | None = None,
        details: str = "",
        stderr: str = "",
        exit_status: int | None = None,
        command: str = "",
    ) -> None:
        self.plugin = plugin
        self.code = code
        self.msg = msg
        self.details = details
        self.stderr = stderr
        self.exit_status = exit_status
        self.command = command
        if code is not None:
            head = f"plugin {plugin} failed (code {code})"
        elif exit_status is not None:
            head = f"plugin {plugin} failed (exit status {exit_status})"
        else:
            head = f"plugin {plugin} failed"
        text = f"{head}: {msg}" if msg else head
        if details:
            text += f": {details}"
        extra = stderr.strip()
        if extra and extra != msg.strip():
            text += f" (stderr: {_clip(extra)})"
        super().__init__(text)


def _clip(text: str, limit: int = 4000) -> str:
    return text if len(text) <= limit else text[:limit] + "...[truncated]"


def parse_error(plugin: str, stdout: bytes, stderr: str, exit_status: int | None, command: str = "") -> PluginError:
    """The PluginError for a failed call: the spec's error JSON on stdout, else stderr or stdout text."""
    try:
        data = json.loads(stdout)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("code"), int) and not isinstance(data.get("code"), bool):
        msg = data.get("msg")
        details = data.get("details")
        return PluginError(
            plugin,
            msg if isinstance(msg, str) else ERROR_CODES.get(data["code"], ""),
            code=data["code"],
            details=details if isinstance(details, str) else "",
            stderr=stderr,
            exit_status=exit_status,
            command=command,
        )
    text = stderr.strip() or stdout.decode(errors="replace").strip()
    return PluginError(plugin, _clip(text) or "no output", stderr=stderr, exit_status=exit_status, command=command)


@dataclass(frozen=True)
class Interface:
    name: str
    mac: str = ""
    mtu: int | None = None
    sandbox: str = ""
    socket_path: str = ""
    pci_id: str = ""


@dataclass(frozen=True)
class IPConfig:
    address: IPInterface
    gateway: IPAddress | None = None
    interface: int | None = None


@dataclass(frozen=True)
class Route:
    dst: IPNetwork
    gw: IPAddress | None = None
    mtu: int | None = None
    advmss: int | None = None
    priority: int | None = None
    table: int | None = None
    scope: int | None = None


@dataclass(frozen=True)
class DNS:
    nameservers: tuple[str, ...] = ()
    domain: str = ""
    search: tuple[str, ...] = ()
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class Result:
    cni_version: str
    interfaces: tuple[Interface, ...] = ()
    ips: tuple[IPConfig, ...] = ()
    routes: tuple[Route, ...] = ()
    dns: DNS = DNS()
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def sandbox_ips(self, ifname: str) -> list[IPConfig]:
        """The IPs on the container-side interface `ifname` (all IPs when none names an interface)."""
        if not any(ip.interface is not None for ip in self.ips):
            return list(self.ips)
        wanted = {i for i, iface in enumerate(self.interfaces) if iface.name == ifname and iface.sandbox}
        return [ip for ip in self.ips if ip.interface in wanted]


def _str(value: Any, where: str, *, required: bool = False) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise ResultError(f"{where}: expected a {'non-empty ' if required else ''}string, got {value!r}")
    return value


def _int(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ResultError(f"{where}: expected an integer, got {value!r}")
    return value


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ResultError(f"{where}: expected a list of strings, got {value!r}")
    return tuple(value)


def _objects(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ResultError(f"{where}: expected a list of objects, got {value!r}")
    return value


def _address(value: Any, where: str) -> IPAddress | None:
    if value is None or value == "":
        return None
    try:
        return ipaddress.ip_address(_str(value, where))
    except ValueError:
        raise ResultError(f"{where}: {value!r} is not an IP address") from None


def _cidr(value: Any, where: str) -> str:
    text = _str(value, where, required=True)
    if "/" not in text:
        raise ResultError(f"{where}: {text!r} is not in CIDR notation (address/prefix)")
    return text


def _interface(raw: dict[str, Any], where: str) -> Interface:
    return Interface(
        name=_str(raw.get("name"), f"{where}.name", required=True),
        mac=_str(raw.get("mac"), f"{where}.mac"),
        mtu=_int(raw.get("mtu"), f"{where}.mtu"),
        sandbox=_str(raw.get("sandbox"), f"{where}.sandbox"),
        socket_path=_str(raw.get("socketPath"), f"{where}.socketPath"),
        pci_id=_str(raw.get("pciID"), f"{where}.pciID"),
    )


def _ip(raw: dict[str, Any], where: str) -> IPConfig:
    # 0.3.x and 0.4.0 also carry "version" ("4"/"6"); the address says it already.
    text = _cidr(raw.get("address"), f"{where}.address")
    try:
        address = ipaddress.ip_interface(text)
    except ValueError:
        raise ResultError(f"{where}.address: {text!r} is not an IP address with prefix") from None
    index = _int(raw.get("interface"), f"{where}.interface")
    if index is not None and index < 0:
        raise ResultError(f"{where}.interface: negative interface index {index}")
    return IPConfig(address=address, gateway=_address(raw.get("gateway"), f"{where}.gateway"), interface=index)


def _route(raw: dict[str, Any], where: str) -> Route:
    text = _cidr(raw.get("dst"), f"{where}.dst")
    try:
        dst = ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise ResultError(f"{where}.dst: {text!r} is not a network") from None
    return Route(
        dst=dst,
        gw=_address(raw.get("gw"), f"{where}.gw"),
        mtu=_int(raw.get("mtu"), f"{where}.mtu"),
        advmss=_int(raw.get("advmss"), f"{where}.advmss"),
        priority=_int(raw.get("priority"), f"{where}.priority"),
        table=_int(raw.get("table"), f"{where}.table"),
        scope=_int(raw.get("scope"), f"{where}.scope"),
    )


def _dns(raw: Any) -> DNS:
    if raw is None:
        return DNS()
    if not isinstance(raw, dict):
        raise ResultError(f"dns: expected an object, got {raw!r}")
    return DNS(
        nameservers=_strs(raw.get("nameservers"), "dns.nameservers"),
        domain=_str(raw.get("domain"), "dns.domain"),
        search=_strs(raw.get("search"), "dns.search"),
        options=_strs(raw.get("options"), "dns.options"),
    )


def result_from_dict(raw: Any) -> Result:
    if not isinstance(raw, dict):
        raise ResultError(f"expected a JSON object, got {type(raw).__name__}")
    version = raw.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise ResultError("has no 'cniVersion'")
    if version not in RESULT_VERSIONS:
        raise ResultError(f"unsupported result version {version!r} (supported: {', '.join(RESULT_VERSIONS)})")
    return Result(
        cni_version=version,
        interfaces=tuple(
            _interface(r, f"interfaces[{i}]") for i, r in enumerate(_objects(raw.get("interfaces"), "interfaces"))
        ),
        ips=tuple(_ip(r, f"ips[{i}]") for i, r in enumerate(_objects(raw.get("ips"), "ips"))),
        routes=tuple(_route(r, f"routes[{i}]") for i, r in enumerate(_objects(raw.get("routes"), "routes"))),
        dns=_dns(raw.get("dns")),
        raw=raw,
    )


def parse_result(data: bytes | str) -> Result:
    """Parse a plugin's stdout (or a cached result) into a Result; ResultError if it is not one."""
    try:
        raw = json.loads(data)
    except ValueError as exc:
        text = data if isinstance(data, str) else data.decode(errors="replace")
        raise ResultError(f"not JSON ({exc}): {_clip(text.strip(), 200)!r}") from None
    return result_from_dict(raw)
