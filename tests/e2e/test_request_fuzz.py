"""Request-level fuzz: every RPC of both CRI services, with generated requests, against the real daemon (root).

For each RPC of RuntimeService and ImageService (read from api.proto's
descriptor, so a new RPC is fuzzed without a change here), hypothesis builds
request messages field by field (tests/protofuzz.py) and, for the RPCs that
create or change something, also takes a valid request and changes one field
somewhere inside it, so that the checks behind the first ones are reached.
After each example:

- the answer is a gRPC status: OK, or a code that tells the caller what was
  wrong with its request (INVALID_ARGUMENT naming a field of the request,
  NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS, UNIMPLEMENTED,
  OUT_OF_RANGE), never UNKNOWN or INTERNAL, and never the client's deadline
  (a hang); the few exceptions are listed in `EXTRA_CODES`, each with why;
- the daemon process is alive and answers Version;
- a RunPodSandbox or CreateContainer, whether it failed or was undone by the
  test, left nothing: the same IPs, veths, mounts, directories, conmons and
  objects as before it.

At the end everything made through the CRI is removed, and nothing may be
left: pods, containers, images, mounts under the daemon's directories, conmon
processes, IPs in host-local's store, veths, cgroups, portmap rules.

IDs and image references in the requests are often placeholders (`@pod@`,
`@running:12@` for a 12-character prefix) that stand for live objects made on
demand, so an RPC meets real pods and containers in every state. Fields that
would reach outside the test (host paths, the log directory, the cgroup
parent, commands that get run, image references that get pulled) come from
pools that stay inside the daemon's directory, on loopback, and harmless.

Deterministic (derandomized, no example database). For a closer look:
FUZZ_RPCS=RunPodSandbox,CreateContainer runs only those, FUZZ_SCALE=4 runs
four times the examples, FUZZ_SHRINK=1 shrinks a failing example, FUZZ_RANDOM=1 draws other examples than CI's.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import text_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from api.runtime.v1 import api_pb2 as pb
from cri.images import reference
from cri.system import linux
from tests.e2e.containers import NOTHING, Env, remove_all_containers
from tests.e2e.pods import PodNet, pod_config, remove_all_pods
from tests.support import protofuzz
from tests.support.daemon_harness import Daemon, free_port
from tests.support.registry_harness import Registry
from tests.support.system import CGROUP_ROOT, conmon_pids, remove_cgroup_parent

log = logging.getLogger(__name__)

C = grpc.StatusCode
BAD_INPUT = frozenset(
    {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.FAILED_PRECONDITION,
        C.ALREADY_EXISTS,
        C.UNIMPLEMENTED,
        C.OUT_OF_RANGE,
    }
)
EXTRA_CODES: dict[str, frozenset[grpc.StatusCode]] = {
    # A subscription: it ends with the client's deadline and nothing else.
    "GetContainerEvents": frozenset({C.DEADLINE_EXCEEDED}),
    # What the registry answered: no such registry (a closed loopback port), or it refused the credentials.
    "PullImage": frozenset({C.UNAVAILABLE, C.DEADLINE_EXCEEDED, C.UNAUTHENTICATED}),
}
MAX_REQUEST = 4 * 1024 * 1024  # what a gRPC server takes by default; above it RESOURCE_EXHAUSTED is the answer

# Examples per RPC: the ones that make pods and containers cost a second or so each.
DEFAULT_EXAMPLES = 60
EXAMPLES = {
    "RunPodSandbox": 80,
    "CreateContainer": 100,
    "StartContainer": 30,
    "StopPodSandbox": 30,
    "RemovePodSandbox": 30,
    "StopContainer": 40,
    "RemoveContainer": 40,
    "PullImage": 80,
    "RemoveImage": 40,
    "GetContainerEvents": 4,
}
CLIENT_DEADLINE = {"RunPodSandbox": 60.0, "CreateContainer": 60.0, "GetContainerEvents": 0.5}
UNARY_DEADLINE = 30.0
STREAM_DEADLINE = 15.0

# The commands any example may make a container run: short, harmless, and never a prefix that would run what
# follows it (`sh -c` always comes with its script). The anchor container exits on SIGTERM within a second once it
# said it is ready (before its trap is set, SIGTERM to its PID 1 would be ignored, and a stop would take its timeout).
ANCHOR_COMMAND = ["sh", "-c", "trap 'exit 0' TERM; echo ready; while true; do sleep 1; done"]
SAFE_ARGV: list[list[str]] = [
    [],
    ["true"],
    ["echo", "hello"],
    ["sh", "-c", "exit 3"],
    ["sh", "-c", "echo to stderr >&2; exit 1"],
    ["ls", "-l", "/"],
    ["head", "-c", "70000", "/dev/zero"],
    ["/nonexistent"],
    [""],
    ["/"],
    ["sh", "-c", "cat /proc/self/status"],
]
NAMESPACED_SYSCTLS = [
    "net.ipv4.ip_forward",
    "net.ipv4.ping_group_range",
    "net.core.somaxconn",
    "net/ipv4/ip_unprivileged_port_start",
    "kernel.shmmax",
    "kernel.msgmax",
    "fs.mqueue.msg_max",
    "kernel.hostname",
    "kernel.domainname",
    "kernel.pid_max",
    "vm.swappiness",
]

# What placeholders stand for: an Anchors method each (`_pod`, `_running`, ...).
ANCHOR_NAMES = ("pod", "victim_pod", "stopped_pod", "running", "victim", "created", "exited", "image", "image_id")
TOKEN = re.compile(r"@(" + "|".join(ANCHOR_NAMES) + r")(?::(\d+))?@")


@dataclass(frozen=True)
class Rpc:
    service: str
    name: str
    request: Descriptor
    streaming: bool

    @property
    def examples(self) -> int:
        scale = float(os.environ.get("FUZZ_SCALE", "1"))
        return max(1, round(EXAMPLES.get(self.name, DEFAULT_EXAMPLES) * scale))


def all_rpcs() -> list[Rpc]:
    out = []
    for service in ("RuntimeService", "ImageService"):
        for method in pb.DESCRIPTOR.services_by_name[service].methods:
            out.append(Rpc(service, method.name, method.input_type, method.server_streaming))
    return out


# ---- the daemon and the live objects placeholders stand for -----------------------------------------------


@dataclass
class FuzzEnv(Env):
    """An Env whose stubs share one channel (Env makes a channel per call)."""

    _runtime: Any = None
    _images: Any = None

    @property
    def rt(self) -> Any:
        if self._runtime is None:
            self._runtime = self.daemon.runtime()
        return self._runtime

    @property
    def images(self) -> Any:
        if self._images is None:
            self._images = self.daemon.images()
        return self._images


@dataclass
class Anchors:
    """Live objects made on demand, in the state their name says; one that changed state is replaced."""

    env: FuzzEnv
    image_ref: str
    ids: dict[str, str] = field(default_factory=dict)
    pod_configs: dict[str, pb.PodSandboxConfig] = field(default_factory=dict)

    @property
    def rt(self) -> Any:
        return self.env.rt

    def pod_state(self, pod_id: str) -> int | None:
        try:
            return int(
                self.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=10).status.state
            )
        except grpc.RpcError as exc:
            if exc.code() == C.NOT_FOUND:
                return None
            raise

    def container_state(self, cid: str) -> int | None:
        try:
            return int(self.env.status(cid).status.state)
        except grpc.RpcError as exc:
            if exc.code() == C.NOT_FOUND:
                return None
            raise

    def get(self, name: str) -> str:
        make: Callable[[], str] = getattr(self, f"_{name}")
        return make()

    def _kept(
        self, name: str, alive: Callable[[str], bool], make: Callable[[], str], drop: Callable[[str], None]
    ) -> str:
        current = self.ids.get(name)
        if current is not None and alive(current):
            return current
        if current is not None:
            drop(current)
        self.ids[name] = make()
        return self.ids[name]

    def _drop_pod(self, pod_id: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)

    def _drop_container(self, cid: str) -> None:
        with contextlib.suppress(grpc.RpcError):
            self.env.remove(cid)

    def _new_pod(self) -> str:
        pod_id, config = self.env.pod(name=f"anchor-{secrets.token_hex(3)}")
        self.pod_configs[pod_id] = config
        return pod_id

    def _wait_ready(self, pod_id: str, name: str, timeout: float = 10) -> None:
        log = Path(self.pod_configs[pod_id].log_directory) / f"{name}.log"
        deadline = time.monotonic() + timeout
        while not (log.exists() and " ready" in log.read_text()):
            assert time.monotonic() < deadline, f"{name} did not say ready in {timeout}s"
            time.sleep(0.02)

    def _pod(self) -> str:
        return self._kept("pod", lambda p: self.pod_state(p) == pb.SANDBOX_READY, self._new_pod, self._drop_pod)

    def _victim_pod(self) -> str:
        return self._kept("victim_pod", lambda p: self.pod_state(p) == pb.SANDBOX_READY, self._new_pod, self._drop_pod)

    def _stopped_pod(self) -> str:
        def make() -> str:
            pod_id = self._new_pod()
            self.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
            return pod_id

        return self._kept("stopped_pod", lambda p: self.pod_state(p) == pb.SANDBOX_NOTREADY, make, self._drop_pod)

    def _container(self, name: str, state: int, command: list[str]) -> str:
        def make() -> str:
            pod_id = self._pod()
            config = self.env.container_config(f"{name}-{secrets.token_hex(3)}", command, image=self.image_ref)
            cid = self.env.create((pod_id, ANCHOR_SANDBOX), config)
            if state != pb.CONTAINER_CREATED:
                self.env.start(cid)
            if state == pb.CONTAINER_RUNNING:
                self._wait_ready(pod_id, config.metadata.name)
            if state == pb.CONTAINER_EXITED:
                self.env.wait_exited(cid)
                self.env.wait_released(cid)
            return cid

        def alive(cid: str) -> bool:
            return self.container_state(cid) == state and self.ids.get(f"{name}-pod") == self.ids.get("pod")

        self._pod()
        cid = self._kept(name, alive, make, self._drop_container)
        self.ids[f"{name}-pod"] = self.ids["pod"]
        return cid

    def _running(self) -> str:
        return self._container("running", pb.CONTAINER_RUNNING, ANCHOR_COMMAND)

    def _victim(self) -> str:
        return self._container("victim", pb.CONTAINER_RUNNING, ANCHOR_COMMAND)

    def _created(self) -> str:
        return self._container("created", pb.CONTAINER_CREATED, ANCHOR_COMMAND)

    def _exited(self) -> str:
        return self._container("exited", pb.CONTAINER_EXITED, ["true"])

    def _image(self) -> str:
        images = self.env.images
        if not images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=self.image_ref)), timeout=10).image.id:
            images.PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=self.image_ref)), timeout=120)
        return self.image_ref

    def _image_id(self) -> str:
        images = self.env.images
        image = images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=self._image())), timeout=10).image
        return str(image.id)

    def resolve(self, text: str) -> str:
        def one(match: re.Match[str]) -> str:
            value = self.get(match[1])
            return value[: int(match[2])] if match[2] else value

        return TOKEN.sub(one, text)

    def resolve_message(self, message: Message) -> None:
        """Every placeholder in the message's strings (fields, list items, map values) replaced, in place."""
        for fd, value in message.ListFields():
            if protofuzz.is_map(fd):
                value_fd = protofuzz.sub(fd).fields_by_name["value"]
                for key in list(value):
                    if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                        self.resolve_message(value[key])
                    elif value_fd.type == FieldDescriptor.TYPE_STRING:
                        value[key] = self.resolve(value[key])
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value if fd.is_repeated else [value]:
                    self.resolve_message(item)
            elif fd.type == FieldDescriptor.TYPE_STRING:
                if fd.is_repeated:
                    value[:] = [self.resolve(v) for v in value]
                else:
                    setattr(message, fd.name, self.resolve(value))


ANCHOR_SANDBOX = pod_config("anchor-template", uid="anchor-template")


class GrpcClientErrors(logging.Handler):
    """What grpcio's client logs when an answer is malformed (a status message that is not UTF-8, say)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage()[:300])

    @contextlib.contextmanager
    def installed(self) -> Iterator[GrpcClientErrors]:
        logger = logging.getLogger("grpc._cython.cygrpc")
        logger.addHandler(self)
        propagate, logger.propagate = logger.propagate, False
        try:
            yield self
        finally:
            logger.removeHandler(self)
            logger.propagate = propagate

    def take(self) -> list[str]:
        out, self.messages = self.messages, []
        return out


@dataclass
class Outcome:
    code: grpc.StatusCode
    details: str
    response: Message | None


@dataclass
class Fuzz:
    env: FuzzEnv
    anchors: Anchors
    registry_host: str
    closed_host: str
    cgroup_root: str
    client_errors: GrpcClientErrors = field(default_factory=GrpcClientErrors)
    counts: collections.Counter[str] = field(default_factory=collections.Counter)
    seconds: dict[str, float] = field(default_factory=lambda: collections.defaultdict(float))
    # The fields INVALID_ARGUMENT named, per RPC: which checks the examples reached.
    refused: dict[str, set[str]] = field(default_factory=lambda: collections.defaultdict(set))
    codes: dict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter)
    )

    @property
    def daemon(self) -> Daemon:
        return self.env.daemon

    # ---- what the strategies may put in fields that reach outside the daemon ----------------------------

    def ids(self) -> st.SearchStrategy[str]:
        tokens = [f"@{n}@" for n in ANCHOR_NAMES if n != "image"] + [
            f"@{n}:{k}@" for n in ("pod", "running", "exited") for k in (1, 5, 12)
        ]
        return st.one_of(st.sampled_from(tokens), protofuzz.strings())

    def image_refs(self) -> st.SearchStrategy[str]:
        reg, closed = self.registry_host, self.closed_host
        known = [
            "@image@",
            "@image_id@",
            "@image_id:12@",
            "@image_id:3@",
            "sha256:@image_id@",
            f"{reg}/e2e/busybox",
            f"{reg}/e2e/busybox:nope",
            f"{reg}/e2e/missing:latest",
            f"{reg}/e2e/busybox@sha256:{'0' * 64}",
            f"{reg}/e2e/busybox@sha256:abc",
            f"{reg}/e2e/busybox@md5:{'0' * 32}",
            f"{closed}/e2e/busybox:latest",
            f"{reg}/E2E/Busybox",
            f"{reg}//busybox",
            f"{reg}/e2e/busybox:{'t' * 200}",
        ]
        return st.one_of(
            st.sampled_from(known),
            protofuzz.strings().map(lambda s: f"{reg}/{s}"),
            protofuzz.strings().map(lambda s: f"{closed}/{s}"),
            protofuzz.strings(),
        )

    def paths_under(self, where: Path) -> st.SearchStrategy[str]:
        """Absolute paths inside `where`, and the malformed ones validation must refuse, never elsewhere."""
        component = protofuzz.strings().filter(lambda s: "/" not in s and s not in (".", ".."))
        return st.one_of(
            st.sampled_from(["", "relative", "rel/../x", f"{where}/../x", f"{where}/./x", f"{where}//x"]),
            component.map(lambda s: f"{where}/{s}"),
            st.lists(component, min_size=1, max_size=3).map(lambda parts: f"{where}/" + "/".join(parts)),
        )

    def argv(self) -> st.SearchStrategy[list[str]]:
        extra = st.lists(protofuzz.strings(), max_size=3)
        return st.one_of(
            st.sampled_from(SAFE_ARGV).map(list),
            extra.map(lambda a: ["echo", *a]),
            extra.map(lambda a: ["/nonexistent", *a]),
        )

    def overrides(self) -> dict[str, Callable[[], st.SearchStrategy[Any]]]:
        """Strategies by field name (`Message.field` where the name alone is not enough)."""
        base = self.daemon.base
        ids = self.ids
        refs = ["", "runtime/default", "docker/default", "unconfined", "/etc/hostname", "localhost/etc/hostname"]
        profiles = self.paths_under(base / "profiles")
        table: dict[str, Callable[[], st.SearchStrategy[Any]]] = {
            **dict.fromkeys(("pod_sandbox_id", "container_id", "id", "target_id", "image_id"), ids),
            "container_ids": lambda: st.lists(ids(), max_size=3),
            "ImageSpec.image": self.image_refs,
            "ImageSpec.user_specified_image": self.image_refs,
            **dict.fromkeys(("command", "args", "cmd"), self.argv),
            "log_directory": lambda: self.paths_under(base / "logs" / "fuzz"),
            **dict.fromkeys(
                ("location", "checkpoint_path", "output_path", "image_sub_path"),
                lambda: self.paths_under(base / "checkpoints"),
            ),
            "Device.host_path": lambda: st.one_of(
                st.sampled_from(["/dev/null", "/dev/zero", "/dev/criopy-fuzz-none"]), self.paths_under(base)
            ),
            "Mount.host_path": lambda: st.one_of(st.just("/dev/null"), self.paths_under(base / "mounts")),
            "cgroup_parent": lambda: st.one_of(
                st.sampled_from(["", "relative", "kubepods.slice", "a/b.slice"]),
                self.paths_under(Path(self.cgroup_root)),
            ),
            **dict.fromkeys(
                ("localhost_ref", "seccomp_profile_path", "apparmor_profile"),
                lambda: st.one_of(
                    st.sampled_from(refs), profiles, profiles.map(lambda p: f"localhost/{p.lstrip('/')}")
                ),
            ),
            "SysctlsEntry.key": lambda: st.one_of(st.sampled_from(NAMESPACED_SYSCTLS), protofuzz.strings()),
            "host_ip": lambda: st.one_of(
                st.sampled_from(["", "127.0.0.1", "0.0.0.0", "::1", "::", "1.2.3.4"]), protofuzz.strings()
            ),
            "runtime_handler": lambda: st.one_of(st.sampled_from(["", "runc", "crun", "kata"]), protofuzz.strings()),
        }
        return table

    def override(self, containing: Descriptor, fd: FieldDescriptor) -> st.SearchStrategy[Any] | None:
        """The strategy for a string field that must stay inside the test, or should meet live objects."""
        if fd.type != FieldDescriptor.TYPE_STRING:
            return None
        table = self.overrides()
        make = table.get(f"{containing.name}.{fd.name}") or table.get(fd.name)
        if make is None or (make is self.ids and fd.is_repeated):
            return None
        return make()

    # ---- requests ------------------------------------------------------------------------------------

    def pod_configs(self) -> st.SearchStrategy[pb.PodSandboxConfig]:
        hexes = st.text("0123456789abcdef", min_size=8, max_size=8)

        @st.composite
        def build(draw: st.DrawFn) -> pb.PodSandboxConfig:
            tag = draw(hexes)
            ports = []
            if draw(st.booleans()):
                ports = [pb.PortMapping(container_port=80, host_port=draw(st.sampled_from([0, 30080, 30081])))]
            dns = None
            if draw(st.booleans()):
                dns = pb.DNSConfig(servers=["10.96.0.10"], searches=["svc.cluster.local"], options=["ndots:5"])
            config = pod_config(
                f"fz-{tag}",
                uid=tag,
                log_directory=str(self.daemon.base / "logs" / "fuzz" / tag),
                ports=ports,
                dns=dns,
                sysctls={"net.ipv4.ip_forward": "1"} if draw(st.booleans()) else {},
                labels={"app": "fuzz"},
                shared_pid=draw(st.booleans()),
            )
            config.linux.cgroup_parent = f"{self.cgroup_root}/{tag}"
            return config

        return build()

    def container_configs(self) -> st.SearchStrategy[pb.ContainerConfig]:
        @st.composite
        def build(draw: st.DrawFn) -> pb.ContainerConfig:
            tag = draw(st.text("0123456789abcdef", min_size=8, max_size=8))
            config = pb.ContainerConfig(
                metadata=pb.ContainerMetadata(name=f"c-{tag}"),
                image=pb.ImageSpec(image="@image@"),
                command=draw(st.sampled_from(SAFE_ARGV)),
                log_path=f"c-{tag}.log",
                envs=[pb.KeyValue(key="A", value="b")],
                labels={"app": "fuzz"},
                linux=pb.LinuxContainerConfig(
                    resources=pb.LinuxContainerResources(cpu_shares=512, memory_limit_in_bytes=64 << 20),
                    security_context=pb.LinuxContainerSecurityContext(
                        namespace_options=pb.NamespaceOption(pid=pb.CONTAINER)
                    ),
                ),
            )
            if draw(st.booleans()):
                config.mounts.append(
                    pb.Mount(container_path="/data", host_path=str(self.daemon.base / "mounts" / tag), readonly=True)
                )
            if draw(st.booleans()):
                config.devices.append(pb.Device(container_path="/dev/xnull", host_path="/dev/null", permissions="rw"))
            return config

        return build()

    def resources(self) -> pb.LinuxContainerResources:
        return pb.LinuxContainerResources(
            cpu_period=100_000, cpu_quota=50_000, cpu_shares=512, memory_limit_in_bytes=128 << 20
        )

    def bases(self) -> dict[str, st.SearchStrategy[Message]]:
        """A valid request for each RPC that has something to validate past its IDs."""
        image = pb.ImageSpec(image="@image@")
        return {
            "RunPodSandbox": self.pod_configs().map(lambda c: pb.RunPodSandboxRequest(config=c)),
            "CreateContainer": self.container_configs().map(
                lambda c: pb.CreateContainerRequest(pod_sandbox_id="@pod@", config=c, sandbox_config=ANCHOR_SANDBOX)
            ),
            "StartContainer": st.just(pb.StartContainerRequest(container_id="@created@")),
            "StopContainer": st.just(pb.StopContainerRequest(container_id="@victim@", timeout=10)),
            "RemoveContainer": st.just(pb.RemoveContainerRequest(container_id="@victim@")),
            "StopPodSandbox": st.just(pb.StopPodSandboxRequest(pod_sandbox_id="@victim_pod@")),
            "RemovePodSandbox": st.just(pb.RemovePodSandboxRequest(pod_sandbox_id="@victim_pod@")),
            "UpdateContainerResources": st.just(
                pb.UpdateContainerResourcesRequest(container_id="@running@", linux=self.resources())
            ),
            "UpdatePodSandboxResources": st.just(
                pb.UpdatePodSandboxResourcesRequest(
                    pod_sandbox_id="@pod@", overhead=self.resources(), resources=self.resources()
                )
            ),
            "ExecSync": st.just(pb.ExecSyncRequest(container_id="@running@", cmd=["echo", "hi"], timeout=10)),
            "Exec": st.just(pb.ExecRequest(container_id="@running@", cmd=["sh"], stdin=True, stdout=True)),
            "Attach": st.just(pb.AttachRequest(container_id="@running@", stdout=True, stderr=True)),
            "PortForward": st.just(pb.PortForwardRequest(pod_sandbox_id="@pod@", port=[80])),
            "UpdateRuntimeConfig": st.just(
                pb.UpdateRuntimeConfigRequest(
                    runtime_config=pb.RuntimeConfig(network_config=pb.NetworkConfig(pod_cidr="10.88.0.0/16"))
                )
            ),
            "PullImage": st.just(pb.PullImageRequest(image=image)),
            "ImageStatus": st.just(pb.ImageStatusRequest(image=image, verbose=True)),
            "RemoveImage": st.just(pb.RemoveImageRequest(image=image)),
            "ListImages": st.just(pb.ListImagesRequest(filter=pb.ImageFilter(image=image))),
            "ListContainers": st.just(
                pb.ListContainersRequest(filter=pb.ContainerFilter(pod_sandbox_id="@pod@", label_selector={"a": "b"}))
            ),
        }

    def requests(self, rpc: Rpc, generator: protofuzz.Generator) -> st.SearchStrategy[Message]:
        generic = generator.message(rpc.request)
        base = self.bases().get(rpc.name)
        if base is None:
            return generic
        mutated = generator.mutated(base)
        return st.one_of(generic, base, mutated, mutated, mutated, mutated)

    # ---- one example ---------------------------------------------------------------------------------

    def call(self, rpc: Rpc, request: Message) -> Outcome:
        method = getattr(self.env.images if rpc.service == "ImageService" else self.env.rt, rpc.name)
        timeout = CLIENT_DEADLINE.get(rpc.name, STREAM_DEADLINE if rpc.streaming else UNARY_DEADLINE)
        try:
            if rpc.streaming:
                for _ in method(request, timeout=timeout):
                    pass
                return Outcome(C.OK, "", None)
            return Outcome(C.OK, "", method(request, timeout=timeout))
        except grpc.RpcError as exc:
            return Outcome(exc.code(), exc.details() or "", None)

    def guard_pull(self, request: Message) -> None:
        """A PullImage goes to the test registry or a closed loopback port, or is refused before any network."""
        assert isinstance(request, pb.PullImageRequest)
        try:
            ref = reference.parse(request.image.image)
        except reference.ReferenceError:
            return
        if ref.domain not in (self.registry_host, self.closed_host):
            request.image.image = f"{self.closed_host}/guarded/{ref.path}"

    def snapshot(self) -> dict[str, object]:
        d = self.daemon
        return {
            "ips": self.env.net.allocations(),
            "veths": self.env.net.bridge_ports(),
            "mounts": sorted(m.mount_point for m in linux.mounts_under(str(d.base))),
            "conmon": len(conmon_pids(str(d.base))),
            "sandbox dirs": _listdir(d.runroot / "sandboxes"),
            "bundles": _listdir(d.runroot / "containers"),
            "container storage": _listdir(d.root / "containers"),
            "pods": sorted(p.id for p in self.env.rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items),
            "containers": sorted(
                c.id for c in self.env.rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers
            ),
        }

    def settled(self, before: dict[str, object], timeout: float = 5) -> dict[str, object]:
        deadline = time.monotonic() + timeout
        while True:
            now = self.snapshot()
            if now == before or time.monotonic() > deadline:
                return now
            time.sleep(0.05)

    def undo(self, rpc: Rpc, outcome: Outcome) -> None:
        """Removes what a successful call made (the checks after it want the state before it)."""
        if outcome.response is None:
            return
        if rpc.name == "RunPodSandbox":
            assert isinstance(outcome.response, pb.RunPodSandboxResponse)
            pod_id = outcome.response.pod_sandbox_id
            self.env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
            self.env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
        elif rpc.name == "CreateContainer":
            assert isinstance(outcome.response, pb.CreateContainerResponse)
            self.env.remove(outcome.response.container_id)

    def exercise(self, rpc: Rpc, template: Message) -> None:
        request = type(template)()
        request.CopyFrom(template)
        self.anchors.resolve_message(request)
        if rpc.name == "PullImage":
            self.guard_pull(request)
        creates = rpc.name in ("RunPodSandbox", "CreateContainer")
        before = self.snapshot() if creates else None

        self.client_errors.take()
        outcome = self.call(rpc, request)
        unreadable = self.client_errors.take()
        assert not unreadable, f"the client could not read {rpc.name}'s answer ({outcome.code.name}): {unreadable}"
        self.counts[rpc.name] += 1
        self.codes[rpc.name][outcome.code.name] += 1

        sent = _shown(request)
        allowed = BAD_INPUT | EXTRA_CODES.get(rpc.name, frozenset())
        if request.ByteSize() > MAX_REQUEST:
            allowed |= {C.RESOURCE_EXHAUSTED}
        assert outcome.code in allowed, f"{rpc.name} answered {outcome.code.name}: {outcome.details}\n{sent}"
        if outcome.code == C.INVALID_ARGUMENT:
            self.refused[rpc.name].add(re.sub(r"\[[^\]]*\]", "[]", outcome.details.split(": ", 1)[0])[:80])
            named = re.split(r"[.\[/:]", outcome.details, maxsplit=1)[0]
            assert named in rpc.request.fields_by_name, (
                f"{rpc.name}: INVALID_ARGUMENT does not start with a field of the request: {outcome.details}\n{sent}"
            )
        self.undo(rpc, outcome)

        assert self.daemon.proc is not None and self.daemon.proc.poll() is None, f"the daemon died\n{sent}"
        version = self.env.rt.Version(pb.VersionRequest(), timeout=5)
        assert version.runtime_name == "criopy"
        if before is not None:
            after = self.settled(before)
            assert after == before, f"{rpc.name} ({outcome.code.name}) left: {_diff(before, after)}\n{sent}"


def _shown(request: Message, limit: int = 3000) -> str:
    """The request as sent (placeholders resolved), long strings cut, for a failure message."""
    text = text_format.MessageToString(request, as_utf8=True)
    text = re.sub(r'"([^"\n]{60})[^"\n]{40,}"', lambda m: f'"{m[1]}…"', text)
    return f"request sent:\n{text[:limit]}"


def _listdir(path: Path) -> list[str]:
    return sorted(os.listdir(path)) if path.exists() else []


def _diff(before: dict[str, object], after: dict[str, object]) -> dict[str, object]:
    return {k: {"before": before[k], "after": after[k]} for k in before if before[k] != after.get(k)}


def run_rpc(fuzz: Fuzz, rpc: Rpc, generator: protofuzz.Generator) -> None:
    phases = [Phase.explicit, Phase.generate]
    if os.environ.get("FUZZ_SHRINK"):
        phases.append(Phase.shrink)

    @settings(
        max_examples=rpc.examples,
        deadline=None,
        derandomize=not os.environ.get("FUZZ_RANDOM"),
        database=None,
        phases=phases,
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(request=fuzz.requests(rpc, generator))
    def check(request: Message) -> None:
        fuzz.exercise(rpc, request)

    check()


# ---- the test ---------------------------------------------------------------------------------------------


def _daemon_yaml(registry_host: str, closed_host: str) -> str:
    return (
        "image:\n"
        "  registries:\n"
        f'    - {{"prefix": "{registry_host}", "insecure": true}}\n'
        f'    - {{"prefix": "{closed_host}", "insecure": true}}\n'
        # Belt and braces: a reference the test's guard missed still reaches no public registry.
        '    - {"prefix": "docker.io", "blocked": true}\n'
    )


@contextlib.contextmanager
def fuzz_env(make_daemon: Callable[..., Daemon], registry: Registry, image: str) -> Iterator[Fuzz]:
    closed_host = f"127.0.0.1:{free_port()}"
    daemon = make_daemon(_daemon_yaml(registry.host, closed_host), start=False)
    net = PodNet.make(daemon)
    daemon.start()
    env = FuzzEnv(daemon, net, image)
    cgroup_root = f"/criopy-fuzz-{secrets.token_hex(4)}"
    env.cgroup_parents.append(cgroup_root)
    try:
        daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=image)), timeout=120)
        yield Fuzz(env, Anchors(env, image), registry.host, closed_host, cgroup_root)
    finally:
        remove_all_containers(daemon)
        remove_all_pods(daemon)
        net.remove()
        env.cleanup()


def leftovers(fuzz: Fuzz) -> dict[str, object]:
    d, net = fuzz.daemon, fuzz.env.net
    rt, images = fuzz.env.rt, fuzz.env.images
    cgroups = []
    for hierarchy in CGROUP_ROOT.iterdir():
        root = hierarchy / fuzz.cgroup_root.strip("/")
        if root.is_dir():
            cgroups += [str(p) for p in root.rglob("criopy-*") if p.is_dir()]
    rules = []
    if shutil.which("iptables-save"):
        out = subprocess.run(["iptables-save"], capture_output=True, text=True, check=False, timeout=30).stdout
        rules = [line for line in out.splitlines() if f"net-{net.bridge}" in line]
    return {
        "pods": list(rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=10).items),
        "containers": list(rt.ListContainers(pb.ListContainersRequest(), timeout=10).containers),
        "images": [i.id for i in images.ListImages(pb.ListImagesRequest(), timeout=10).images],
        "mounts": [m.mount_point for m in linux.mounts_under(str(d.base))],
        "conmon": conmon_pids(str(d.base)),
        "ips": net.allocations(),
        "veths": net.bridge_ports(),
        "cgroups": cgroups,
        "portmap rules": rules,
        "sandbox dirs": _listdir(d.runroot / "sandboxes"),
        "bundles": _listdir(d.runroot / "containers"),
        "container storage": _listdir(d.root / "containers"),
    }


def test_every_rpc_answers_generated_requests_with_a_status_and_leaves_nothing(
    make_daemon, registry: Registry, busybox: str, record_property
) -> None:
    rpcs = all_rpcs()
    only = {n for n in os.environ.get("FUZZ_RPCS", "").split(",") if n}
    selected = [r for r in rpcs if not only or r.name in only]
    failures: dict[str, str] = {}
    started = time.monotonic()
    with fuzz_env(make_daemon, registry, busybox) as fuzz:
        generator = protofuzz.Generator(fuzz.override)
        with fuzz.client_errors.installed():
            for rpc in selected:
                rpc_started = time.monotonic()
                try:
                    run_rpc(fuzz, rpc, generator)
                except Exception as exc:
                    failures[rpc.name] = "".join(traceback.format_exception_only(exc))
                fuzz.seconds[rpc.name] += time.monotonic() - rpc_started
        d = fuzz.daemon
        remove_all_containers(d)
        remove_all_pods(d)
        images = fuzz.env.images
        for image in images.ListImages(pb.ListImagesRequest(), timeout=10).images:
            images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=image.id)), timeout=60)
        remove_cgroup_parent(fuzz.cgroup_root)
        left = leftovers(fuzz)
        seconds = time.monotonic() - started

    per_rpc = {
        r.name: {
            "examples": fuzz.counts[r.name],
            "seconds": round(fuzz.seconds[r.name], 2),
            **fuzz.codes[r.name],
            "refused fields": sorted(fuzz.refused[r.name]),
        }
        for r in selected
    }
    total = sum(fuzz.counts.values())
    record_property("request_fuzz", json.dumps({"rpcs": len(selected), "examples": total, "per_rpc": per_rpc}))
    log.info("request fuzz: %d RPCs, %d examples, %.1f s", len(selected), total, seconds)
    for name, figures in per_rpc.items():
        log.info("request fuzz: %s %s", name, json.dumps(figures))
    assert not failures, "\n\n".join(f"{name}:\n{text}" for name, text in failures.items())
    assert all(fuzz.counts[r.name] > 0 for r in selected), (
        f"RPCs never called: {set(r.name for r in selected) - set(fuzz.counts)}"
    )
    assert {k: v for k, v in left.items() if v} == {}


# ---- regressions: what the fuzz found, one focused test each ---------------------------------------------


def _refused(call: Callable[..., object], *args: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value


def test_a_long_non_ascii_error_message_reaches_the_client_whole_characters(env: Env) -> None:
    """The status message is cut at 4 KiB; the cut fell inside a character, which the client cannot decode."""
    with GrpcClientErrors().installed() as client_errors:
        err = _refused(lambda: env.rt.ContainerStatus(pb.ContainerStatusRequest(container_id="é" * 3000), timeout=10))
    assert err.code() == C.NOT_FOUND
    assert client_errors.take() == []
    assert err.details().startswith("container 'éééé") and "\ufffd" not in err.details()


def test_malformed_or_unreachable_images_are_refused_with_what_is_wrong(env: Env) -> None:
    pod = env.pod()
    err = _refused(lambda: env.create(pod, env.container_config(image="127.0.0.1:1/--flag")))
    assert err.code() == C.INVALID_ARGUMENT and err.details().startswith("config.image.image: "), err.details()
    closed = f"127.0.0.1:{free_port()}/e2e/busybox:latest"
    err = _refused(lambda: env.daemon.images().PullImage(pb.PullImageRequest(image=pb.ImageSpec(image=closed))))
    assert err.code() == C.UNAVAILABLE and "gave up after" in err.details(), err.details()


def test_commands_that_cannot_run_and_nul_bytes_are_invalid_argument_naming_the_field(env: Env) -> None:
    pod = env.pod()
    running = env.run(pod, env.container_config("sleeper", ["sleep", "3600"]))
    base = env.daemon.base
    cases: list[tuple[dict[str, Any], str]] = [
        ({"command": ["/nonexistent"]}, "config.command: "),
        ({"command": [""]}, "config.command: "),
        ({"command": ["/etc/passwd"]}, "config.command: "),
        ({"command": ["true"], "args": ["a\x00b"]}, "config.args[0]: "),
        ({"command": ["true"], "envs": [pb.KeyValue(key="A", value="a\x00b")]}, "config.envs[0].value: "),
        ({"command": ["true"], "working_dir": "/a\x00b"}, "config.working_dir: "),
        (
            {"command": ["true"], "mounts": [pb.Mount(container_path="/x", host_path=f"{base}/m\x00x")]},
            "config.mounts[0].host_path: ",
        ),
        (
            {"command": ["true"], "devices": [pb.Device(container_path="/dev/x", host_path="/dev/nu\x00ll")]},
            "config.devices[0].host_path: ",
        ),
    ]
    for i, (fields, named) in enumerate(cases):
        err = _refused(env.create, pod, env.container_config(f"c{i}", **fields))
        assert err.code() == C.INVALID_ARGUMENT and err.details().startswith(named), (fields, err.details())
    below_usage = pb.UpdateContainerResourcesRequest(
        container_id=running, linux=pb.LinuxContainerResources(memory_limit_in_bytes=4096)
    )
    err = _refused(env.rt.UpdateContainerResources, below_usage)
    assert err.code() == C.INVALID_ARGUMENT and err.details().startswith("linux: "), err.details()
    assert env.status(running).status.state == pb.CONTAINER_RUNNING
    for cmd, named in ((["/nonexistent"], "cmd: "), (["echo", "a\x00b"], "cmd[1]: ")):
        request = pb.ExecSyncRequest(container_id=running, cmd=cmd, timeout=10)
        err = _refused(env.rt.ExecSync, request)
        assert err.code() == C.INVALID_ARGUMENT and err.details().startswith(named), err.details()
    env.stop(running)
    env.remove(running)
    assert env.leftovers() == NOTHING


def test_pod_fields_the_kernel_refuses_are_invalid_argument_and_undone(env: Env) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"uid": "a\x00b"}, "config.metadata.uid: "),
        ({"namespace": "a\x00b"}, "config.metadata.namespace: "),
        ({"dns": pb.DNSConfig(searches=["a\x00b"])}, "config.dns_config.searches[0]: "),
        ({"sysctls": {"net.ipv4.ip_forward": "1\x00"}}, "config.linux.sysctls[net.ipv4.ip_forward]: "),
        ({"sysctls": {"net.ipv4.ip_forward": "not a number"}}, "config.linux.sysctls[net.ipv4.ip_forward]: "),
        ({"sysctls": {"net.ipv4.no_such_key": "1"}}, "config.linux.sysctls[net.ipv4.no_such_key]: "),
    ]
    for fields, named in cases:
        err = _refused(partial(env.pod, **fields))
        assert err.code() == C.INVALID_ARGUMENT and err.details().startswith(named), (fields, err.details())
    assert env.net.allocations() == [] and env.net.bridge_ports() == []
    assert linux.mounts_under(str(env.daemon.runroot)) == []
    assert list(env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
