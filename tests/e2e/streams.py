"""Helpers shared by the streaming e2e modules: a sleeping container, a web server, exec URLs, process scans."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import Env


def sleeper_config(env: Env) -> pb.ContainerConfig:
    return env.container_config(command=["sleep", "3600"])


def sleeper(env: Env, **kwargs) -> str:
    return env.run(env.pod(**kwargs), sleeper_config(env))


def web_server_config(env: Env, page: str) -> pb.ContainerConfig:
    """busybox httpd on port 8080 of the pod, serving `page` (one line) as /index.html."""
    script = f"mkdir -p /www && echo {page} > /www/index.html && exec busybox httpd -f -p 8080 -h /www"
    return env.container_config(command=["sh", "-c", script])


def processes(argv: list[str], pid_ns: str = "") -> list[int]:
    """Host pids whose command line is exactly argv, and the zombies named like it in `pid_ns` (a zombie has no
    command line left: what pgrep in the container would still show)."""
    wanted = "\0".join(argv).encode() + b"\0"
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
                stat = Path(f"/proc/{entry}/stat").read_text()
                ns = os.readlink(f"/proc/{entry}/ns/pid") if pid_ns else ""
            except OSError:
                continue
            zombie = stat.rsplit(")", 1)[-1].split()[0] == "Z" and f"({Path(argv[0]).name})" in stat
            if cmdline == wanted or (zombie and pid_ns and ns == pid_ns):
                found.append(int(entry))
    return found


def pid_ns(env: Env, cid: str) -> str:
    info = json.loads(env.status(cid, verbose=True).info["info"])
    return os.readlink(f"/proc/{info['pid']}/ns/pid")


def wait_present(argv: list[str], timeout: float = 10) -> list[int]:
    """The pids of argv once one runs: a shell that printed a line may not have exec'd its next command yet."""
    end = time.monotonic() + timeout
    while not (found := processes(argv)) and time.monotonic() < end:
        time.sleep(0.05)
    return found


def wait_gone(argv: list[str], timeout: float = 10) -> list[int]:
    end = time.monotonic() + timeout
    while (left := processes(argv)) and time.monotonic() < end:
        time.sleep(0.05)
    return left


def exec_url(env: Env, cid: str, cmd: list[str], **streams: bool) -> str:
    request = pb.ExecRequest(container_id=cid, cmd=cmd, **streams)
    return str(env.rt.Exec(request, timeout=10).url)
