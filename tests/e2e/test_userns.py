"""User namespaces for pods (`hostUsers: false`, issue 18): root, real runc and conmon, over the socket.

The kubelet sends `userns_options` mode POD with one uid and one gid range (container ID 0 at a host
offset it picks); criopy makes the pod's user namespace once with exactly those maps, the pod's net,
ipc and uts namespaces owned by it, and shows the shared image layers through idmapped mounts. Each
test picks its own host offset far above any real user of the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import sqlite3
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.system import linux
from tests.e2e.containers import NOTHING, Env, push_image, remove_all_containers, running_env
from tests.e2e.pods import info, pod_config, remove_all_pods
from tests.e2e.streams import exec_url
from tests.streamclients import remotecommand as rc
from tests.support import image_builder as ib
from tests.support.daemon_harness import Daemon
from tests.support.registry_harness import Registry
from tests.support.system import poll

WIDTH = 65536
SC = "config.linux.security_context.namespace_options"


def host_offset() -> int:
    """A 65536-aligned range of its own between 2^30 and 2^31: no real user, nor another test's pod."""
    return (1 << 30) + secrets.randbelow(1 << 14) * WIDTH


def userns_options(
    host_id: int, *, mode: pb.NamespaceMode = pb.POD, ranges: int = 1, first: int = 0
) -> pb.UserNamespace:
    mappings = [
        pb.IDMapping(container_id=first + i * WIDTH, host_id=host_id + i * WIDTH, length=WIDTH) for i in range(ranges)
    ]
    return pb.UserNamespace(mode=mode, uids=mappings, gids=mappings)


def run_pod(env: Env, host_id: int | None, *, shared_pid: bool = False, **kwargs) -> tuple[str, pb.PodSandboxConfig]:
    """A pod with its own user namespace at host_id (None: mode NODE), through env's cgroup parent bookkeeping."""
    config = env.pod_config(shared_pid=shared_pid, **kwargs)
    if host_id is not None:
        config.linux.security_context.namespace_options.userns_options.CopyFrom(userns_options(host_id))
    return env.run_pod(config)


def container(
    env: Env, pod: tuple[str, pb.PodSandboxConfig], name: str, command: list[str], **kwargs
) -> pb.ContainerConfig:
    config = env.container_config(name, command, **kwargs)
    # The kubelet repeats the pod's options for each container.
    config.linux.security_context.namespace_options.CopyFrom(pod[1].linux.security_context.namespace_options)
    return config


def exec_sync(env: Env, cid: str, *cmd: str) -> str:
    resp = env.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=20), timeout=30)
    assert resp.exit_code == 0, (cmd, resp.stdout, resp.stderr)
    return resp.stdout.decode()


def exec_sync_result(env: Env, cid: str, *cmd: str) -> pb.ExecSyncResponse:
    return env.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=list(cmd), timeout=20), timeout=30)


def container_pid(env: Env, cid: str) -> int:
    return int(json.loads(env.status(cid, verbose=True).info["info"])["pid"])


def owner(pid: int) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}")
    return st.st_uid, st.st_gid


@pytest.fixture(scope="module")
def tools(registry: Registry) -> str:
    """Two layers (busybox and /data), so as an image volume it is an overlay, not a bind of one layer."""
    layer = ib.Layer([ib.Dir("/data"), ib.File("/data/a.txt", b"alpha\n")], created_by="data")
    return push_image(registry, "e2e/userns-tools", layers=[layer])


@contextlib.contextmanager
def userns_env(make_daemon: Callable[..., Daemon], registry: Registry, images: list[str]) -> Iterator[Env]:
    with running_env(make_daemon, registry, images) as env:
        # runc's init runs as the pod's mapped root: it must traverse the daemon's directories, which
        # a real node's /var/lib and /run allow; mkdtemp made this one 0700.
        os.chmod(env.daemon.base, 0o711)
        yield env


@pytest.fixture(scope="module")
def shared_env(registry: Registry, busybox: str, tools: str) -> Iterator[Env]:
    """One daemon for the tests that leave it running (a daemon and two pulls cost seconds each)."""
    if os.geteuid() != 0:
        pytest.skip("e2e tests drive the real daemon as root")
    made: list[Daemon] = []

    def make(config_text: str = "", start: bool = True) -> Daemon:
        base = Path(tempfile.mkdtemp(prefix="criopy-e2e-"))
        (base / "criopy.yaml").write_text(config_text)
        made.append(Daemon(base=base, config_file=base / "criopy.yaml"))
        return made[-1].start() if start else made[-1]

    try:
        with userns_env(make, registry, [busybox, tools]) as env:
            yield env
    finally:
        for daemon in made:
            daemon.stop()
            shutil.rmtree(daemon.base, ignore_errors=True)


@pytest.fixture
def env(shared_env: Env) -> Iterator[Env]:
    """The shared daemon, emptied after each test whatever it left."""
    yield shared_env
    remove_all_containers(shared_env.daemon)
    remove_all_pods(shared_env.daemon)


@pytest.fixture
def own_env(make_daemon, registry: Registry, busybox: str, tools: str) -> Iterator[Env]:
    """A daemon of the test's own, for the tests that kill or restart it."""
    with userns_env(make_daemon, registry, [busybox, tools]) as env:
        yield env


def test_a_pod_in_its_own_user_namespace_runs_as_root_inside_and_a_mapped_user_outside(
    env: Env, tmp_path: Path
) -> None:
    host_id = host_offset()
    sysctls = {"net.ipv4.ip_unprivileged_port_start": "81", "kernel.shm_rmid_forced": "1"}
    pod = run_pod(env, host_id, shared_pid=True, sysctls=sysctls)
    volume = tmp_path / "volume"
    volume.mkdir()
    os.chown(volume, host_id, host_id)
    mounts = [pb.Mount(container_path="/data", host_path=str(volume))]
    cid = env.run(pod, container(env, pod, "c", ["sleep", "3600"], mounts=mounts))

    status = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod[0]), timeout=10).status
    assert status.linux.namespaces.options.userns_options == userns_options(host_id)
    assert exec_sync(env, cid, "id").startswith("uid=0(root) gid=0(root)")
    assert exec_sync(env, cid, "cat", "/proc/self/uid_map").split() == ["0", str(host_id), str(WIDTH)]
    assert exec_sync(env, cid, "cat", "/proc/self/gid_map").split() == ["0", str(host_id), str(WIDTH)]
    assert owner(container_pid(env, cid)) == (host_id, host_id)
    # The image's files are root's inside; the pod's own files and /dev/shm too.
    listing = exec_sync(
        env,
        cid,
        "stat",
        "-c",
        "%u:%g %n",
        "/bin/busybox",
        "/etc/hostname",
        "/etc/hosts",
        "/etc/resolv.conf",
        "/dev/shm",
        "/data",
    )
    assert [line.split()[0] for line in listing.splitlines()] == ["0:0"] * 6, listing
    exec_sync(env, cid, "sh", "-c", "echo written > /data/out && touch /dev/shm/x && touch /new-in-root")
    written = os.stat(volume / "out")
    assert (written.st_uid, written.st_gid) == (host_id, host_id)
    assert (volume / "out").read_text() == "written\n"
    assert exec_sync(env, cid, "hostname").strip() == pod[1].hostname
    assert exec_sync(env, cid, "cat", "/proc/sys/net/ipv4/ip_unprivileged_port_start").strip() == "81"
    assert exec_sync(env, cid, "cat", "/proc/sys/kernel/shm_rmid_forced").strip() == "1"

    # A second container of the pod shares its user namespace (the pinned one), and so does the infra process.
    second = env.run(pod, container(env, pod, "d", ["sh", "-c", "echo from the log; id -u; exec sleep 3600"]))
    pin = str(info(env.daemon, pod[0])["namespaces"]["user"])  # type: ignore[index]
    userns = os.readlink(pin.replace(pin, f"/proc/{container_pid(env, cid)}/ns/user"))
    assert os.readlink(f"/proc/{container_pid(env, second)}/ns/user") == userns
    assert os.stat(pin).st_ino == os.stat(f"/proc/{container_pid(env, cid)}/ns/user").st_ino
    assert userns != os.readlink("/proc/self/ns/user")
    infra_pid = int(info(env.daemon, pod[0])["infraPid"])  # type: ignore[call-overload]
    assert os.readlink(f"/proc/{infra_pid}/ns/user") == userns and owner(infra_pid) == (host_id, host_id)

    # Logs, exec and attach through the streaming server.
    assert poll(lambda: "0\n" in env.output(pod, "d")), env.output(pod, "d")
    assert env.output(pod, "d") == "from the log\n0\n"
    url = exec_url(env, cid, ["sh", "-c", "id -u; echo err >&2; exit 3"], stdout=True, stderr=True)
    result = asyncio.run(asyncio.wait_for(rc.exec_spdy(url), 30))
    assert (result.stdout, result.stderr, result.exit_code) == (b"0\n", b"err\n", 3)
    attached = env.run(
        pod, container(env, pod, "a", ["sh", "-c", "while read l; do echo got $l as $(id -u); done"], stdin=True)
    )
    url = str(env.rt.Attach(pb.AttachRequest(container_id=attached, stdin=True, stdout=True), timeout=10).url)
    assert b"got hello as 0" in asyncio.run(asyncio.wait_for(_attach_line(url, b"hello\n", b"got hello as 0"), 30))


async def _attach_line(url: str, line: bytes, wanted: bytes) -> bytes:
    streams = await rc.open_exec_streams(url, stdin=True, stderr=False)
    assert streams.stdin is not None and streams.stdout is not None
    await streams.send_stdin(line)
    seen = b""
    while wanted not in seen:
        chunk = await streams.stdout.read(10)
        assert chunk, seen
        seen += chunk
    await streams.close()
    return seen


def test_mounts_with_the_pods_mapping_are_idmapped_and_others_show_host_owners_shifted(
    env: Env, tools: str, tmp_path: Path
) -> None:
    host_id = host_offset()
    pod = run_pod(env, host_id)
    shared = tmp_path / "shared"
    shared.mkdir()
    (shared / "by-root").write_text("host root's\n")
    mapping = userns_options(host_id)
    mounts = [
        pb.Mount(container_path="/plain", host_path=str(shared)),
        pb.Mount(container_path="/idmapped", host_path=str(shared), uidMappings=mapping.uids, gidMappings=mapping.gids),
        pb.Mount(container_path="/image-plain", image=pb.ImageSpec(image=tools), readonly=True),
        pb.Mount(
            container_path="/image-idmapped",
            image=pb.ImageSpec(image=tools),
            readonly=True,
            uidMappings=mapping.uids,
            gidMappings=mapping.gids,
        ),
    ]
    cid = env.run(pod, container(env, pod, "c", ["sleep", "3600"], mounts=mounts))
    paths = ["/plain/by-root", "/idmapped/by-root", "/image-plain/data/a.txt", "/image-idmapped/data/a.txt"]
    owners = exec_sync(env, cid, "stat", "-c", "%u:%g", *paths).split()
    # Without the mapping, host root is no one inside (the overflow ID); through the idmapped mounts, root.
    assert owners == ["65534:65534", "0:0", "65534:65534", "0:0"], owners
    assert exec_sync(env, cid, "cat", "/image-idmapped/data/a.txt") == "alpha\n"
    exec_sync(env, cid, "sh", "-c", "echo via idmap > /idmapped/new")
    assert (os.stat(shared / "new").st_uid, os.stat(shared / "new").st_gid) == (0, 0)  # unshifted on the host
    refused = exec_sync_result(env, cid, "sh", "-c", "touch /image-idmapped/x")
    assert refused.exit_code != 0 and b"Read-only file system" in refused.stderr
    # The rootfs' one layer and the image volume's two (the host path's bind is under volumes/).
    assert len(_idmapped_mounts(env)) == 1 + 2, _idmapped_mounts(env)

    # A mount may only ask for its pod's mapping: another range is refused naming the mount.
    other = userns_options(host_offset())
    wrong = pb.Mount(container_path="/x", host_path=str(shared), uidMappings=other.uids, gidMappings=other.gids)
    with pytest.raises(grpc.RpcError) as err:
        env.create(pod, container(env, pod, "wrong", ["true"], mounts=[wrong]))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("config.mounts[0].uidMappings: "), err.value.details()

    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)
    assert _idmapped_mounts(env) == [] and env.leftovers() == NOTHING


def test_a_host_file_with_the_pods_mapping_is_an_idmapped_file_mount(env: Env, tmp_path: Path) -> None:
    """A single file (a config file, a socket's directory's sibling) takes uidMappings as a directory does."""
    host_id = host_offset()
    pod = run_pod(env, host_id)
    config_file = tmp_path / "app.conf"
    config_file.write_text("setting=1\n")
    mapping = userns_options(host_id)
    mount = pb.Mount(
        container_path="/etc/app.conf", host_path=str(config_file), uidMappings=mapping.uids, gidMappings=mapping.gids
    )
    cid = env.run(pod, container(env, pod, "c", ["sleep", "3600"], mounts=[mount]))
    assert exec_sync(env, cid, "stat", "-c", "%u:%g", "/etc/app.conf").split() == ["0:0"]
    assert exec_sync(env, cid, "cat", "/etc/app.conf") == "setting=1\n"
    env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)
    assert config_file.read_text() == "setting=1\n" and env.leftovers() == NOTHING


def test_users_and_groups_resolve_inside_and_are_the_mapped_ones_outside(env: Env) -> None:
    host_id = host_offset()
    pod = run_pod(env, host_id)
    config = container(env, pod, "app", ["sleep", "3600"])
    config.linux.security_context.run_as_username = "app"  # 1000:1000 in the image's /etc/passwd
    config.linux.security_context.supplemental_groups.append(4000)
    cid = env.run(pod, config)
    assert exec_sync(env, cid, "id").split() == ["uid=1000(app)", "gid=1000(app)", "groups=1000(app),4000"]
    status = Path(f"/proc/{container_pid(env, cid)}/status").read_text().splitlines()
    fields = {line.split(":")[0]: line.split(":")[1].split() for line in status if ":" in line}
    assert fields["Uid"] == [str(host_id + 1000)] * 4 and fields["Gid"] == [str(host_id + 1000)] * 4
    assert fields["Groups"] == [str(host_id + 1000), str(host_id + 4000)]

    # An ID outside the pod's range could not be set inside: refused naming the field, nothing left.
    unmapped = container(env, pod, "unmapped", ["true"])
    unmapped.linux.security_context.run_as_user.value = WIDTH + 5
    with pytest.raises(grpc.RpcError) as err:
        env.create(pod, unmapped)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("config.linux.security_context.run_as_user: uid 65541 is not mapped")
    assert [c.id for c in env.rt.ListContainers(pb.ListContainersRequest()).containers] == [cid]


def test_another_pods_user_namespace_cannot_see_or_signal_the_first(env: Env) -> None:
    first_id, second_id = host_offset(), host_offset()
    first, second = run_pod(env, first_id), run_pod(env, second_id)
    # Root inside may bind a privileged port: the pod's network namespace is its user namespace's.
    httpd = "mkdir -p /www && echo served-in-userns > /www/index.html && exec busybox httpd -f -p 80 -h /www"
    a = env.run(first, container(env, first, "a", ["sh", "-c", httpd]))
    b = env.run(second, container(env, second, "b", ["sleep", "3600"]))
    a_pid, b_pid = container_pid(env, a), container_pid(env, b)
    assert owner(a_pid) == (first_id, first_id) and owner(b_pid) == (second_id, second_id)
    assert os.readlink(f"/proc/{a_pid}/ns/user") != os.readlink(f"/proc/{b_pid}/ns/user")
    # Inside the second pod only its own processes exist: one sleep, not the first pod's.
    assert exec_sync(env, b, "sh", "-c", "cat /proc/[0-9]*/comm").split().count("sleep") == 1
    # Root of the second pod's user namespace may not signal the first pod's process; root of the first may.
    refused = _signal_from(b_pid, a_pid)
    assert refused.returncode != 0 and "Operation not permitted" in refused.stderr, refused
    assert _signal_from(a_pid, a_pid).returncode == 0
    assert env.status(a).status.state == pb.CONTAINER_RUNNING

    # Port-forward enters the pod's network namespace (owned by its user namespace) from the daemon.
    probe = ["sh", "-c", "busybox wget -q -O - http://127.0.0.1/index.html"]
    assert poll(lambda: exec_sync_result(env, a, *probe).exit_code == 0, 20), "httpd did not come up"
    url = str(env.rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=first[0], port=[80]), timeout=10).url)
    assert b"served-in-userns" in asyncio.run(asyncio.wait_for(_fetch_forwarded(url), 30))


async def _fetch_forwarded(url: str) -> bytes:
    forward = await rc.portforward_websocket(url, [80])
    return await rc.http_over(forward.channel(0), b"GET /index.html HTTP/1.0\r\nHost: pod\r\n\r\n")


def _signal_from(member: int, target: int) -> subprocess.CompletedProcess[str]:
    """kill -0 target, run as root of member's user namespace (host PIDs: the pid namespace is not entered)."""
    argv = ["nsenter", f"--user=/proc/{member}/ns/user", "--", "/bin/kill", "-0", str(target)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)


REFUSED = [
    (userns_options(1 << 30, ranges=2), "uids"),  # more than one range
    (userns_options(1 << 30, first=1), "uids"),  # container ID 0 unmapped
    (userns_options(1 << 30, mode=pb.CONTAINER), "mode"),
    (userns_options(1 << 30, mode=pb.TARGET), "mode"),
]


def test_what_cannot_be_honoured_is_refused_naming_the_field_and_nothing_is_made(env: Env) -> None:
    for options, field in REFUSED:
        refused = pod_config()
        refused.linux.security_context.namespace_options.userns_options.CopyFrom(options)
        with pytest.raises(grpc.RpcError) as err:
            env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=refused), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{SC}.userns_options.{field}: "), err.value.details()
    assert list(env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
    assert all(_pins(env, kind) == [] for kind in ("user", "net", "ipc", "uts"))


def test_a_sysctl_the_pods_namespaces_refuse_is_invalid_and_nothing_is_left(env: Env) -> None:
    with pytest.raises(grpc.RpcError) as err:
        run_pod(env, host_offset(), sysctls={"net.ipv4.no_such_key": "1"})
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("config.linux.sysctls[net.ipv4.no_such_key]: "), err.value.details()
    assert list(env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
    assert all(_pins(env, kind) == [] for kind in ("user", "net", "ipc", "uts"))


def test_a_refused_sysctl_whose_value_has_tabs_is_invalid_naming_it(env: Env) -> None:
    """Values as the kernel prints them ("32768\t60999"): the child's report of the refusal must still parse."""
    with pytest.raises(grpc.RpcError) as err:
        run_pod(env, host_offset(), sysctls={"net.ipv4.ip_local_port_range": "2000\t1000"})  # low above high
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert err.value.details().startswith("config.linux.sysctls[net.ipv4.ip_local_port_range]: "), err.value.details()
    assert list(env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items) == []
    assert all(_pins(env, kind) == [] for kind in ("user", "net", "ipc", "uts"))


def test_a_container_cannot_ask_for_another_user_namespace_than_its_pods(env: Env) -> None:
    host_id = host_offset()
    for pod_host_id, asked in ((None, userns_options(host_id)), (host_id, userns_options(0, mode=pb.NODE))):
        pod = run_pod(env, pod_host_id)
        config = env.container_config("c", ["true"])
        config.linux.security_context.namespace_options.userns_options.CopyFrom(asked)
        with pytest.raises(grpc.RpcError) as err:
            env.create(pod, config)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith(f"{SC}.userns_options: does not agree with pod sandbox")
    assert list(env.rt.ListContainers(pb.ListContainersRequest()).containers) == []


def test_mode_node_runs_in_the_hosts_user_namespace_as_before(env: Env) -> None:
    pod = run_pod(env, None)
    config = env.container_config("c", ["sleep", "3600"])
    config.linux.security_context.namespace_options.userns_options.mode = pb.NODE
    cid = env.run(pod, config)
    assert exec_sync(env, cid, "cat", "/proc/self/uid_map").split() == ["0", "0", "4294967295"]
    assert owner(container_pid(env, cid)) == (0, 0)
    assert os.readlink(f"/proc/{container_pid(env, cid)}/ns/user") == os.readlink("/proc/self/ns/user")
    assert "user" not in info(env.daemon, pod[0])["namespaces"]  # type: ignore[operator]
    assert _idmapped_mounts(env) == []


def test_status_reports_user_namespaces_for_the_handler(env: Env) -> None:
    handlers = env.rt.Status(pb.StatusRequest(), timeout=10).runtime_handlers
    assert handlers and all(h.features.user_namespaces for h in handlers)


def test_status_reports_no_user_namespaces_where_the_storage_cannot_be_idmapped(make_daemon, tmp_path: Path) -> None:
    daemon = make_daemon(start=False)
    # The storage root on an overlay mount, which the kernel cannot idmap: the probe at start must fail there.
    for name in ("lower", "upper", "work"):
        (tmp_path / name).mkdir()
    daemon.root.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={tmp_path / 'lower'},upperdir={tmp_path / 'upper'},workdir={tmp_path / 'work'}"
    linux.mount("overlay", str(daemon.root), "overlay", 0, options)
    try:
        daemon.start()
        assert_no_user_namespaces(daemon, because="MOUNT_ATTR_IDMAP")
        daemon.stop()
    finally:
        daemon.stop()
        linux.umount(str(daemon.root), linux.MNT_DETACH)


def test_the_vfs_storage_driver_reports_no_user_namespaces_and_refuses_such_a_pod(make_daemon) -> None:
    """vfs copies are not overlays of idmappable layers: Status says so, and a pod is refused, not its containers."""
    assert_no_user_namespaces(make_daemon("storage:\n  driver: vfs\n"), because="vfs storage driver")


def assert_no_user_namespaces(daemon: Daemon, because: str) -> None:
    """Status says no handler runs user namespaces, the log says why, and a pod asking for one is refused so."""
    handlers = daemon.runtime().Status(pb.StatusRequest(), timeout=10).runtime_handlers
    assert handlers and not any(h.features.user_namespaces for h in handlers)
    assert "user namespaces unavailable" in daemon.log() and because in daemon.log()
    # A pod asking for one anyway is refused with the reason, not run as host root.
    config = pod_config()
    config.linux.security_context.namespace_options.userns_options.CopyFrom(userns_options(host_offset()))
    with pytest.raises(grpc.RpcError) as err:
        daemon.runtime().RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(f"{SC}.userns_options: runtime handler "), err.value.details()
    assert because in err.value.details()
    assert list(daemon.runtime().ListPodSandbox(pb.ListPodSandboxRequest()).items) == []


def test_a_restart_keeps_the_pod_and_removal_leaves_nothing_and_the_layers_are_untouched(own_env: Env) -> None:
    layers_before = _tree(own_env.daemon.root / "layers")
    host_id = host_offset()
    pod = run_pod(own_env, host_id)
    cid = own_env.run(
        pod,
        container(
            own_env, pod, "c", ["sh", "-c", "echo changed > /bin/sh.txt; chown 5:5 /etc/passwd; exec sleep 3600"]
        ),
    )
    assert poll(lambda: exec_sync_result(own_env, cid, "cat", "/bin/sh.txt").stdout == b"changed\n")
    pin = str(info(own_env.daemon, pod[0])["namespaces"]["user"])  # type: ignore[index]
    userns = os.readlink(f"/proc/{container_pid(own_env, cid)}/ns/user")
    assert _idmapped_mounts(own_env) != []

    assert own_env.daemon.stop() == 0
    own_env.daemon.start()
    assert own_env.status(cid).status.state == pb.CONTAINER_RUNNING
    assert linux.mounts_under(pin)[0].fstype == "nsfs"
    assert (
        own_env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod[0])).status.state == pb.SANDBOX_READY
    )
    # A container made after the restart joins the same namespace.
    later = own_env.run(pod, container(own_env, pod, "later", ["sleep", "3600"]))
    assert os.readlink(f"/proc/{container_pid(own_env, later)}/ns/user") == userns
    assert exec_sync(own_env, later, "stat", "-c", "%u", "/etc/passwd").strip() == "0"  # its own copy-on-write layer

    own_env.rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)
    own_env.rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)
    assert _idmapped_mounts(own_env) == []
    assert _pins(own_env, "user") == [] and not os.path.lexists(pin)
    assert own_env.leftovers() == NOTHING
    assert _tree(own_env.daemon.root / "layers") == layers_before


def test_the_orphan_sweep_removes_a_forgotten_pods_idmapped_mounts_and_pins(own_env: Env) -> None:
    pod = run_pod(own_env, host_offset(), shared_pid=True)
    cid = own_env.run(pod, container(own_env, pod, "c", ["sleep", "3600"]))
    pid = container_pid(own_env, cid)
    assert _idmapped_mounts(own_env) != [] and _pins(own_env, "user") == [pod[0]]
    assert own_env.daemon.proc is not None
    own_env.daemon.proc.kill()
    own_env.daemon.proc.wait(10)
    with sqlite3.connect(own_env.daemon.root / "state.db") as db:  # a lost database: no row explains the pod
        for table in ("containers", "sandboxes", "name_reservations"):
            db.execute(f"DELETE FROM {table}")

    own_env.daemon.start()
    assert "orphan removed" in own_env.daemon.log()
    assert _idmapped_mounts(own_env) == []
    assert all(_pins(own_env, kind) == [] for kind in ("user", "net", "ipc", "uts"))
    assert own_env.leftovers() == NOTHING
    assert not os.path.exists(f"/proc/{pid}")


def _tree(top: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every entry under top: owner, group, mode and a digest of the content (or the link target)."""
    out = {}
    for directory, dirs, files in os.walk(top):
        for name in dirs + files:
            path = os.path.join(directory, name)
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            else:
                content = os.readlink(path) if stat.S_ISLNK(st.st_mode) else ""
            out[os.path.relpath(path, top)] = (st.st_uid, st.st_gid, st.st_mode, content)
    assert out, f"no layers under {top}"
    return out


def _pins(env: Env, kind: str) -> list[str]:
    directory = env.daemon.runroot / "ns" / kind
    return sorted(os.listdir(directory)) if directory.exists() else []


def _idmapped_mounts(env: Env) -> list[str]:
    return [m.mount_point for m in linux.mounts_under(str(env.daemon.base)) if "/idmapped/" in m.mount_point]
