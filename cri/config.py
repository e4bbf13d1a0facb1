"""Typed daemon configuration.

Sources, lowest precedence first: built-in defaults < the main YAML file
(/etc/criopy/criopy.yaml) < drop-ins (/etc/criopy/criopy.d/*.yaml, lexical
order) < CRIOPY_* environment variables < command-line flags.

Every option is a dataclass field whose metadata carries its documentation;
the commented default file (`criopy config --default`, shipped as
conf/criopy.yaml) and the README reference table are rendered from it, so
code, file and docs cannot drift apart.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeGuard, Union, get_args, get_origin

import yaml

from cri.containers import ulimits
from cri.system import affinity

DEFAULT_CONFIG_FILE = "/etc/criopy/criopy.yaml"
DEFAULT_CONFIG_DIR = "/etc/criopy/criopy.d"
ENV_PREFIX = "CRIOPY_"


class ConfigError(Exception):
    """A configuration source is invalid; the message names source and key."""

    def __init__(self, source: str, key: str, problem: str) -> None:
        super().__init__(f"{source}: key '{key}': {problem}")
        self.source = source
        self.key = key
        self.problem = problem


def opt(
    default: Any, doc: str, *, choices: Sequence[str] = (), reloadable: bool = False, number_as_text: bool = False
) -> Any:
    """A config field with its documentation (rendered into the default file). `number_as_text`: a text key
    whose value may be a plain number (a CPU list `2`), which YAML and the environment read as an integer."""
    meta = {"doc": doc, "choices": tuple(choices), "reloadable": reloadable, "number_as_text": number_as_text}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


def section(cls: type, doc: str) -> Any:
    return field(default_factory=cls, metadata={"doc": doc, "choices": (), "reloadable": False})


@dataclass
class LogConfig:
    level: str = opt(
        "info",
        "Minimum level of log lines written to stderr.",
        choices=("debug", "info", "warning", "error"),
        reloadable=True,
    )
    format: str = opt("text", "Log line format: key=value text or one JSON object per line.", choices=("text", "json"))


@dataclass
class RuntimeHandlerConfig:
    path: str = opt("runc", "OCI runtime binary: an absolute path, or a name looked up in PATH.")
    root: str = opt("", "State directory passed as --root to the runtime; empty means <runroot>/<handler name>.")
    runtime_args: list[str] = opt([], "Extra global arguments passed to the runtime before its command.")


DEFAULT_RUNTIMES = {
    "runc": RuntimeHandlerConfig(path="runc"),
    "crun": RuntimeHandlerConfig(path="crun"),
}

# cri-o's default set: what a typical container needs, nothing that reaches the host.
DEFAULT_CAPABILITIES = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "KILL",
]


@dataclass
class RuntimeConfig:
    default_runtime: str = opt(
        "runc", "Runtime handler used when a pod names none; must be a key of runtimes.", reloadable=True
    )
    runtimes: dict[str, RuntimeHandlerConfig] = opt(
        DEFAULT_RUNTIMES,
        "Runtime handlers by name (RunPodSandboxRequest.runtime_handler picks one). "
        "Each has path, root and runtime_args.",
        reloadable=True,
    )
    conmon: str = opt("/usr/bin/conmon", "Path of the conmon container monitor binary.")
    cgroup_manager: str = opt(
        "cgroupfs",
        "Cgroup driver reported to the kubelet and used for container cgroups.",
        choices=("cgroupfs", "systemd"),
    )
    default_capabilities: list[str] = opt(
        DEFAULT_CAPABILITIES, "Capabilities a container gets unless it adds or drops some.", reloadable=True
    )
    default_sysctls: list[str] = opt([], "Sysctls applied to every pod, as key=value.", reloadable=True)
    default_ulimits: list[str] = opt(
        [],
        "Resource limits every container starts with, as name=soft:hard (e.g. nofile=1024:4096; "
        "-1 is unlimited). Unset ones are inherited from the daemon.",
        reloadable=True,
    )
    seccomp_profile: str = opt(
        "/usr/share/containers/seccomp.json",
        "Profile used for the RuntimeDefault seccomp type.",
        reloadable=True,
    )
    pids_limit: int = opt(-1, "Maximum processes per container; -1 means no limit.")
    log_size_max: int = opt(-1, "Maximum bytes of a container log file before conmon truncates it; -1 means no limit.")
    cdi_spec_dirs: list[str] = opt(
        ["/etc/cdi", "/var/run/cdi"],
        "Directories of CDI spec files (*.json, *.yaml) naming devices as vendor.com/class=name; "
        "a later directory's device overrides an earlier one's. Read at each CreateContainer that asks for a device.",
        reloadable=True,
    )


@dataclass
class NetworkConfig:
    cni_config_dir: str = opt("/etc/cni/net.d", "Directory holding CNI network configs (.conflist, .conf, .json).")
    cni_plugin_dirs: list[str] = opt(["/opt/cni/bin", "/usr/lib/cni"], "Directories searched for CNI plugin binaries.")
    cni_default_network: str = opt("", "Name of the CNI network to use; empty means the first config in lexical order.")
    cni_plugin_timeout: int = opt(60, "Seconds one CNI plugin call may take before it is killed.")


@dataclass
class StorageConfig:
    driver: str = opt(
        "overlay", "Container root filesystem driver: overlay, or vfs (plain copies).", choices=("overlay", "vfs")
    )


@dataclass
class MirrorConfig:
    location: str = opt("", "host[:port][/path] of the mirror.")
    insecure: bool = opt(False, "Plain HTTP or unverified TLS for this mirror.")


@dataclass
class RegistryConfig:
    prefix: str = opt("", "Image name prefix this entry applies to (e.g. docker.io or registry.k8s.io/pause).")
    location: str = opt("", "Where to pull from instead of the prefix; empty means the prefix itself.")
    insecure: bool = opt(False, "Plain HTTP or unverified TLS for this registry.")
    blocked: bool = opt(False, "Refuse pulls from this registry.")
    mirrors: list[MirrorConfig] = opt([], "Mirrors tried in order before the origin.")


@dataclass
class ImageConfig:
    registries: list[RegistryConfig] = opt(
        [],
        "Per-registry settings, modelled on containers-registries.conf: a list of entries with "
        "prefix, location, insecure, blocked and mirrors (each with location and insecure).",
        reloadable=True,
    )
    auth_file: str = opt(
        "", "Global registry credentials in docker config.json format; empty means none.", reloadable=True
    )
    pull_progress_timeout: int = opt(60, "Seconds a layer download may make no progress before the pull fails.")
    max_concurrent_downloads: int = opt(
        3, "Layers one pull downloads (and unpacks, as they arrive) at the same time; 1 takes them one by one."
    )
    certs_dirs: list[str] = opt(
        ["/etc/containers/certs.d", "/etc/docker/certs.d"],
        "Per-registry TLS material: <dir>/<host[:port]>/*.crt are trusted CAs, *.cert + *.key a client certificate.",
    )


@dataclass
class PodConfig:
    infra_binary: str = opt(
        "/usr/bin/catatonit", "Static init run as the infra process of pods sharing one PID namespace."
    )
    pause_image: str = opt("", "Image whose entrypoint replaces infra_binary; empty means use infra_binary.")
    shm_size: int = opt(64 * 1024 * 1024, "Bytes of the per-pod /dev/shm tmpfs.")


@dataclass
class StreamingConfig:
    address: str = opt("127.0.0.1", "Address the exec/attach/port-forward HTTP server binds to.")
    port: int = opt(0, "Port of the streaming server; 0 picks a free one.")
    tls_cert: str = opt("", "PEM certificate for TLS on the streaming server; empty means plain HTTP.")
    tls_key: str = opt("", "PEM private key matching tls_cert.")
    token_ttl: int = opt(60, "Seconds a streaming URL stays valid before its first use.")
    idle_timeout: int = opt(14400, "Seconds an idle stream is kept open.")


@dataclass
class MetricsConfig:
    address: str = opt("127.0.0.1", "Address of the Prometheus metrics endpoint.")
    port: int = opt(9090, "Port of the Prometheus metrics endpoint; 0 turns it off.")


@dataclass
class GrpcConfig:
    max_connections: int = opt(
        1024, "Client connections the gRPC server keeps at once; a new one above it is closed at once."
    )
    idle_timeout: int = opt(
        300, "Seconds a connection may have no call open before the gRPC server closes it (GOAWAY); 0: never."
    )


@dataclass
class Config:
    listen: str = opt("/run/criopy/criopy.sock", "Unix socket the CRI gRPC server listens on.")
    grpc_server: str = opt(
        "builtin",
        "gRPC server transport: criopy's own HTTP/2 server (about a third of grpcio's CPU per call), or grpcio's.",
        choices=("builtin", "grpcio"),
    )
    root: str = opt("/var/lib/criopy", "Persistent state and storage (database, images, layers).")
    runroot: str = opt("/run/criopy", "Volatile state (sockets, runtime state, mounts); lost at reboot.")
    offload_cpus: str = opt(
        affinity.AUTO,
        "CPUs of the threads that run the daemon's blocking calls (file system, database, mounts): 'auto' binds"
        " them to the lowest-numbered CPU the daemon may use (none on a one-CPU machine), so that CPython's GIL"
        " changes hands on one core (11-14% less daemon CPU in a 110-pod burst on 2 cores), 'all' leaves them"
        " free, or a CPU list such as 2 or '0-1'. What the daemon starts (conmon, containers,"
        " plugins) is never bound.",
        number_as_text=True,
    )
    log: LogConfig = section(LogConfig, "Daemon logging.")
    runtime: RuntimeConfig = section(RuntimeConfig, "OCI runtimes, the container monitor and container defaults.")
    network: NetworkConfig = section(NetworkConfig, "CNI networking.")
    storage: StorageConfig = section(StorageConfig, "Container root filesystems.")
    image: ImageConfig = section(ImageConfig, "Image pulls.")
    pod: PodConfig = section(PodConfig, "Pod sandboxes.")
    streaming: StreamingConfig = section(StreamingConfig, "The exec / attach / port-forward streaming server.")
    metrics: MetricsConfig = section(MetricsConfig, "Prometheus metrics.")
    grpc: GrpcConfig = section(GrpcConfig, "Limits of the gRPC server on the CRI socket (both transports).")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def runtime_root(self, handler: str) -> str:
        """The --root of a runtime handler: explicit, or derived from runroot."""
        configured = self.runtime.runtimes[handler].root
        return configured or os.path.join(self.runroot, handler)


# ---------------------------------------------------------------------------
# Applying sources


def _is_dataclass_type(tp: Any) -> TypeGuard[type]:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return f"mapping of name to {_type_name(get_args(tp)[1])}"
    if _is_dataclass_type(tp):
        return "mapping"
    return {str: "string", int: "integer", bool: "boolean", float: "number"}.get(tp, str(tp))


def _fields(cls: type) -> dict[str, dataclasses.Field[Any]]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        f.type = hints[f.name]
        out[f.name] = f
    return out


def _coerce(value: Any, tp: Any, source: str, key: str, choices: Sequence[str] = ()) -> Any:
    """Check `value` against type `tp`; return the typed value or raise ConfigError."""
    origin = get_origin(tp)
    wrong = ConfigError(source, key, f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin in (Union, types.UnionType):
        raise TypeError(f"optional fields are not used in config: {key}")
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (item_tp,) = get_args(tp)
        return [_coerce(v, item_tp, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        _, val_tp = get_args(tp)
        return {str(k): _coerce(v, val_tp, source, f"{key}.{k}") for k, v in value.items()}
    if _is_dataclass_type(tp):
        if not isinstance(value, dict):
            raise wrong
        obj = tp()
        _apply_mapping(obj, value, source, key)
        return obj
    # bool is a subclass of int: refuse `port: true`.
    if tp is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise wrong
    if tp is not int and not isinstance(value, tp):
        raise wrong
    if choices and value not in choices:
        raise ConfigError(source, key, f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _apply_mapping(
    obj: Any, raw: Mapping[str, Any], source: str, prefix: str, origins: dict[str, str] | None = None
) -> None:
    known = _fields(type(obj))
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        f = known.get(str(name))
        if f is None:
            raise ConfigError(source, key, f"unknown key (known: {', '.join(known)})")
        if _is_dataclass_type(f.type) and isinstance(value, dict):
            # A section: merge key by key instead of replacing it whole.
            _apply_mapping(getattr(obj, name), value, source, key, origins)
            continue
        if get_origin(f.type) is dict and isinstance(value, dict):
            # Named tables (runtimes) merge by name: a drop-in adds a handler.
            merged = dict(getattr(obj, name))
            merged.update(_coerce(value, f.type, source, key))
            setattr(obj, name, merged)
        else:
            setattr(
                obj, name, _coerce(_as_text_if_number(f, value), f.type, source, key, f.metadata.get("choices", ()))
            )
        if origins is not None:
            origins[key] = source


def _as_text_if_number(f: dataclasses.Field[Any], value: Any) -> Any:
    """A plain number given for a `number_as_text` key, as its text (a bool stays itself, and refused)."""
    if f.metadata.get("number_as_text") and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def leaf_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, dataclasses.Field[Any]]]:
    """Every option as (dotted key, field), sections flattened."""
    out: list[tuple[str, dataclasses.Field[Any]]] = []
    for name, f in _fields(cls).items():
        key = f"{prefix}.{name}" if prefix else name
        if _is_dataclass_type(f.type):
            out.extend(leaf_keys(f.type, key))
        else:
            out.append((key, f))
    return out


def env_name(key: str) -> str:
    return ENV_PREFIX + key.replace(".", "_").upper()


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    """CRIOPY_LOG_LEVEL=debug -> {"log": {"level": "debug"}}; values are YAML scalars or flow lists."""
    by_env = {env_name(key): key for key, _ in leaf_keys()}
    layer: dict[str, Any] = {}
    for name, text in environ.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = by_env.get(name)
        if key is None:
            raise ConfigError(f"environment {name}", name, "unknown variable (it names no config key)")
        try:
            value = yaml.safe_load(text) if text != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"environment {name}", key, f"not valid YAML: {exc}") from exc
        _set_dotted(layer, key, value)
    return layer


def _set_dotted(target: dict[str, Any], key: str, value: Any) -> None:
    *parents, last = key.split(".")
    for part in parents:
        target = target.setdefault(part, {})
    target[last] = value


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), "-", f"cannot read: {exc.strerror}") from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), "-", f"not valid YAML: {exc}") from exc
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), "-", f"the file must hold a mapping, not {type(raw).__name__}")
    return raw


@dataclass
class ConfigSources:
    """Where to load from; kept so that SIGHUP can load the same sources again."""

    config_file: str = DEFAULT_CONFIG_FILE
    config_file_explicit: bool = False
    config_dir: str = DEFAULT_CONFIG_DIR
    environ: Mapping[str, str] = field(default_factory=dict)
    flags: dict[str, Any] = field(default_factory=dict)  # dotted key -> value


def load(sources: ConfigSources) -> Config:
    config = Config()
    origins: dict[str, str] = {}
    main = Path(sources.config_file)
    if main.exists() or sources.config_file_explicit:
        _apply_mapping(config, _read_yaml(main), str(main), "", origins)
    drop_in_dir = Path(sources.config_dir)
    if drop_in_dir.is_dir():
        for drop_in in sorted(drop_in_dir.glob("*.yaml")):
            _apply_mapping(config, _read_yaml(drop_in), str(drop_in), "", origins)
    _apply_mapping(config, _env_layer(sources.environ), "environment", "", origins)
    for key, value in sources.flags.items():
        layer: dict[str, Any] = {}
        _set_dotted(layer, key, value)
        _apply_mapping(config, layer, f"flag for {key}", "", origins)
    validate(config, origins)
    return config


def validate(config: Config, origins: Mapping[str, str] | None = None) -> None:
    """Checks that span keys or need more than a type."""

    def fail(key: str, problem: str) -> NoReturn:
        raise ConfigError(_origin_of(key, origins or {}), key, problem)

    for key in ("listen", "root", "runroot"):
        if not os.path.isabs(getattr(config, key)):
            fail(key, "must be an absolute path")
    try:  # the CPUs themselves are checked at the daemon's start: a reload or a CLI command may run elsewhere
        affinity.check(config.offload_cpus)
    except ValueError as exc:
        fail("offload_cpus", str(exc))
    if not config.runtime.runtimes:
        fail("runtime.runtimes", "at least one runtime handler is needed")
    if config.runtime.default_runtime not in config.runtime.runtimes:
        known = ", ".join(sorted(config.runtime.runtimes))
        fail(
            "runtime.default_runtime", f"{config.runtime.default_runtime!r} is not a key of runtime.runtimes ({known})"
        )
    for name, handler in config.runtime.runtimes.items():
        if not handler.path:
            fail(f"runtime.runtimes.{name}.path", "must not be empty")
    for key, port in (("streaming.port", config.streaming.port), ("metrics.port", config.metrics.port)):
        if not 0 <= port <= 65535:
            fail(key, f"must be between 0 and 65535, got {port}")
    for i, sysctl in enumerate(config.runtime.default_sysctls):
        if "=" not in sysctl or not sysctl.split("=", 1)[0].strip():
            fail(f"runtime.default_sysctls[{i}]", f"expected key=value, got {sysctl!r}")
    seen: set[str] = set()
    for i, text in enumerate(config.runtime.default_ulimits):
        try:
            limit = ulimits.parse(text)
        except ValueError as exc:
            fail(f"runtime.default_ulimits[{i}]", str(exc))
        problem = ulimits.settable(limit) or (f"{limit.name} is given twice" if limit.name in seen else None)
        if problem:
            fail(f"runtime.default_ulimits[{i}]", problem)
        seen.add(limit.name)
    for i, registry in enumerate(config.image.registries):
        if not registry.prefix:
            fail(f"image.registries[{i}].prefix", "must not be empty")
    if config.image.max_concurrent_downloads < 1:
        fail("image.max_concurrent_downloads", "must be at least 1")
    if config.network.cni_plugin_timeout <= 0:
        fail("network.cni_plugin_timeout", "must be a positive number of seconds")
    if config.pod.shm_size <= 0:
        fail("pod.shm_size", "must be a positive number of bytes")
    if config.grpc.max_connections <= 0:
        fail("grpc.max_connections", "must be a positive number of connections")
    if config.grpc.idle_timeout < 0:
        fail("grpc.idle_timeout", "must be 0 (never) or a positive number of seconds")
    if bool(config.streaming.tls_cert) != bool(config.streaming.tls_key):
        fail("streaming.tls_key", "tls_cert and tls_key must be given together")


def _origin_of(key: str, origins: Mapping[str, str]) -> str:
    """The source that set `key`, or the closest enclosing key it was set through."""
    candidate = key
    while candidate:
        if candidate in origins:
            return origins[candidate]
        candidate = re.sub(r"(\[\d+\]|\.[^.\[]*)$", "", candidate) if re.search(r"[.\[]", candidate) else ""
    return "defaults"


def reloadable_keys() -> list[str]:
    return [key for key, f in leaf_keys() if f.metadata.get("reloadable")]


def changed_keys(old: Config, new: Config) -> list[str]:
    return [key for key, _ in leaf_keys() if get_option(old, key) != get_option(new, key)]


def get_option(config: Config, key: str) -> Any:
    """The value of a dotted option key, e.g. get_option(config, "log.level")."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def set_option(config: Config, key: str, value: Any) -> None:
    *parents, last = key.split(".")
    target: Any = config
    for part in parents:
        target = getattr(target, part)
    setattr(target, last, value)


# ---------------------------------------------------------------------------
# Rendering


def render_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, default_flow_style=False)


def render_defaults() -> str:
    """The commented default file: every option, its default and what it does."""
    lines = [
        "# criopy configuration: every option with its default.",
        "# Load order: these defaults < /etc/criopy/criopy.yaml < /etc/criopy/criopy.d/*.yaml",
        "# < CRIOPY_<SECTION>_<KEY> environment variables < command-line flags.",
        "# Options marked (reloadable) take effect on SIGHUP; the others need a restart.",
        "# Generated by `criopy config --default`; tests keep it in sync with the code.",
        "",
    ]
    _render_fields(Config(), lines, indent="")
    return "\n".join(lines) + "\n"


def _render_fields(obj: Any, lines: list[str], indent: str) -> None:
    for name, f in _fields(type(obj)).items():
        value = getattr(obj, name)
        doc = f.metadata["doc"] + (" (reloadable)" if f.metadata.get("reloadable") else "")
        if f.metadata.get("choices"):
            doc += f" One of: {', '.join(f.metadata['choices'])}."
        lines.append(f"{indent}# {doc}")
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            lines.append(f"{indent}{name}:")
            _render_fields(value, lines, indent + "  ")
            lines.append("")
            continue
        plain = _plain(value)
        dumped = yaml.safe_dump({name: plain}, sort_keys=False, default_flow_style=False).rstrip("\n")
        if isinstance(plain, (list, dict)) and not plain:
            dumped = f"{name}: {'[]' if isinstance(plain, list) else '{}'}"
        lines.extend(indent + line for line in dumped.splitlines())


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def render_reference_table() -> str:
    """The README's config reference, one row per option."""
    rows = ["| key | default | env | meaning |", "| --- | --- | --- | --- |"]
    for key, f in leaf_keys():
        default = _plain(get_option(Config(), key))
        shown = json.dumps(default) if not isinstance(default, str) else (default or '""')
        doc = f.metadata["doc"] + (" (reloadable)" if f.metadata.get("reloadable") else "")
        rows.append(f"| `{key}` | `{shown}` | `{env_name(key)}` | {doc} |")
    return "\n".join(rows) + "\n"
