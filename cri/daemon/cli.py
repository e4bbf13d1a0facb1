"""criopy [run] | config | status | version | wipe | images import|export"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import Any

import grpc

from api.runtime.v1 import api_pb2 as pb
from api.runtime.v1 import api_pb2_grpc
from cri import __version__, log
from cri import config as cfg
from cri.config import ConfigError, ConfigSources
from cri.daemon import imagecmd
from cri.daemon.live_config import LiveConfig
from cri.daemon.lock import AlreadyRunning
from cri.daemon.serve import serve
from cri.daemon.wipe import WipeRefused, wipe
from cri.state.store import StateError
from cri.transport.server import SocketInUse

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_READY = 0, 1, 2, 3

# flag dest -> dotted config key
FLAG_KEYS = {
    "listen": "listen",
    "root": "root",
    "runroot": "runroot",
    "log_level": "log.level",
    "log_format": "log.format",
    "cni_config_dir": "network.cni_config_dir",
    "cni_plugin_dir": "network.cni_plugin_dirs",
    "stream_address": "streaming.address",
    "stream_port": "streaming.port",
    "metrics_address": "metrics.address",
    "metrics_port": "metrics.port",
    "cgroup_manager": "runtime.cgroup_manager",
    "default_runtime": "runtime.default_runtime",
}


def _config_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("configuration (overrides files and CRIOPY_* environment)")
    g.add_argument("--config", metavar="FILE", help=f"main config file (default {cfg.DEFAULT_CONFIG_FILE})")
    g.add_argument("--config-dir", metavar="DIR", help=f"drop-in directory (default {cfg.DEFAULT_CONFIG_DIR})")
    g.add_argument("--listen", metavar="PATH", help="unix socket of the CRI server")
    g.add_argument("--root", metavar="DIR", help="persistent state and storage")
    g.add_argument("--runroot", metavar="DIR", help="volatile state")
    g.add_argument("--log-level", metavar="LEVEL", help="debug, info, warning or error")
    g.add_argument("--log-format", metavar="FORMAT", help="text or json")
    g.add_argument("--cni-config-dir", metavar="DIR", help="CNI network config directory")
    g.add_argument("--cni-plugin-dir", metavar="DIR", action="append", help="CNI plugin directory (repeat for several)")
    g.add_argument("--stream-address", metavar="ADDR", help="streaming server address")
    g.add_argument("--stream-port", metavar="PORT", type=int, help="streaming server port (0 = any free port)")
    g.add_argument("--metrics-address", metavar="ADDR", help="metrics endpoint address")
    g.add_argument("--metrics-port", metavar="PORT", type=int, help="metrics endpoint port (0 = off)")
    g.add_argument("--cgroup-manager", metavar="DRIVER", help="cgroupfs or systemd")
    g.add_argument("--default-runtime", metavar="NAME", help="runtime handler used when a pod names none")
    return p


def build_parser() -> argparse.ArgumentParser:
    flags = _config_flags()
    parser = argparse.ArgumentParser(
        prog="criopy",
        description="criopy: a Kubernetes container runtime (CRI runtime.v1). Without a command, runs the daemon.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[flags], help="run the daemon (the default command)")
    config_p = sub.add_parser("config", parents=[flags], help="print the effective configuration as YAML")
    config_p.add_argument("--default", action="store_true", help="print the shipped defaults, commented")
    sub.add_parser("version", help="print criopy's version")
    sub.add_parser("status", parents=[flags], help="ask the running daemon whether it is ready")
    wipe_p = sub.add_parser(
        "wipe", parents=[flags], help="remove all state and storage (refused while the daemon runs)"
    )
    wipe_p.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    images_p = sub.add_parser("images", help="import or export image archives (through the daemon when it runs)")
    images_sub = images_p.add_subparsers(dest="images_command", metavar="ACTION", required=True)
    import_p = images_sub.add_parser(
        "import", parents=[flags], help="import a docker save or OCI image layout archive (all or nothing)"
    )
    import_p.add_argument("archive", metavar="FILE|-", help="the archive, or - for standard input")
    export_p = images_sub.add_parser(
        "export", parents=[flags], help="write images as an OCI image layout archive that docker load accepts too"
    )
    export_p.add_argument("refs", metavar="REF", nargs="+", help="image name, repo digest or ID")
    export_p.add_argument("-o", "--output", metavar="FILE|-", required=True, help="the archive, or - for stdout")
    return parser


def sources_from(args: argparse.Namespace, environ: dict[str, str]) -> ConfigSources:
    flags: dict[str, Any] = {}
    for dest, key in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            flags[key] = value
    return ConfigSources(
        config_file=args.config or cfg.DEFAULT_CONFIG_FILE,
        config_file_explicit=args.config is not None,
        config_dir=args.config_dir or cfg.DEFAULT_CONFIG_DIR,
        environ=environ,
        flags=flags,
    )


def _out(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(f"criopy: {text}\n")


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "run")
    args = build_parser().parse_args(args_list)
    if args.command == "version":
        _out(f"criopy {__version__}\nCRI API runtime.v1\n")
        return EXIT_OK
    if args.command == "config" and args.default:
        _out(cfg.render_defaults())
        return EXIT_OK
    sources = sources_from(args, dict(os.environ))
    try:
        config = cfg.load(sources)
    except ConfigError as exc:
        _err(f"config error: {exc}")
        return EXIT_USAGE
    if args.command == "config":
        _out(cfg.render_yaml(config))
        return EXIT_OK
    if args.command == "status":
        return _status(config.listen)
    if args.command == "wipe":
        return _wipe(config, args.yes)
    if args.command == "images":
        return _images(config, args)
    return _run(config, sources)


def _run(config: cfg.Config, sources: ConfigSources) -> int:

    log.setup(config.log.level, config.log.format)
    try:
        asyncio.run(serve(LiveConfig(config, sources)))
    except (AlreadyRunning, SocketInUse, StateError, OSError) as exc:
        _err(f"cannot start: {exc}")
        return EXIT_FAILURE
    except ConfigError as exc:  # a value only the daemon's start can check (the CPUs it may use)
        _err(f"config error: {exc}")
        return EXIT_USAGE
    return EXIT_OK


def _status(listen: str) -> int:

    with grpc.insecure_channel(f"unix://{listen}") as channel:
        stub = api_pb2_grpc.RuntimeServiceStub(channel)
        try:
            version = stub.Version(pb.VersionRequest(), timeout=5)
            status = stub.Status(pb.StatusRequest(), timeout=5)
        except grpc.RpcError as exc:
            _err(f"no daemon answering on {listen}: {exc.code().name}: {exc.details()}")
            return EXIT_FAILURE
    lines = [f"runtime: {version.runtime_name} {version.runtime_version} (CRI {version.runtime_api_version})"]
    ready = True
    for condition in status.status.conditions:
        ready = ready and condition.status
        detail = f" ({condition.reason}: {condition.message})" if not condition.status else ""
        lines.append(f"{condition.type}: {str(condition.status).lower()}{detail}")
    handlers = ", ".join(h.name for h in status.runtime_handlers if h.name)
    lines.append(f"runtime handlers: {handlers}")
    _out("\n".join(lines) + "\n")
    return EXIT_OK if ready else EXIT_NOT_READY


def _images(config: cfg.Config, args: argparse.Namespace) -> int:

    try:
        if args.images_command == "import":
            done = imagecmd.import_images(config, args.archive)
            verb = "imported"
        else:
            done = imagecmd.export_images(config, args.refs, args.output)
            verb = "exported"
    except imagecmd.FAILURES as exc:
        _err(f"images {args.images_command}: {exc}")
        return EXIT_FAILURE
    report = sys.stderr if args.images_command == "export" and args.output == "-" else sys.stdout
    for image in done:
        report.write(f"{verb} {image.id} {' '.join(image.names) or '(untagged)'}\n")
    return EXIT_OK


def _wipe(config: cfg.Config, yes: bool) -> int:

    if not yes:
        if not sys.stdin.isatty():
            _err("wipe needs confirmation: pass --yes (standard input is not a terminal)")
            return EXIT_FAILURE
        answer = input(f"Remove all criopy state and storage in {config.root} and {config.runroot}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            _err("wipe cancelled")
            return EXIT_FAILURE
    try:
        removed = wipe(config)
    except (WipeRefused, OSError) as exc:
        _err(f"wipe refused: {exc}")
        return EXIT_FAILURE
    _out("".join(f"removed {path}\n" for path in removed) or "nothing to remove\n")
    return EXIT_OK
