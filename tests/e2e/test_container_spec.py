"""What a container's spec gives the process inside, checked from inside (root, real runc/conmon, over the socket).

Each test runs a few containers in one pod and reads what they printed to
their CRI log: `id`, /proc/self/status, /proc/self/mounts, stat of devices,
the errors a refused write or syscall prints.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.config import DEFAULT_CAPABILITIES
from cri.containers.capabilities import CAPABILITY_NAMES
from tests.e2e.containers import NOTHING, Env, push_image, running_env
from tests.e2e.pods import pod_config
from tests.support import image_builder as ib
from tests.support.registry_harness import Registry
from tests.support.system import CGROUP_ROOT

SC = "config.linux.security_context"
Pod = tuple[str, pb.PodSandboxConfig]

# /etc/group of the "app" image: app belongs to wheel and extra, nobody to extra.
APP_GROUP = "root:x:0:\nwheel:x:10:app\napp:x:1000:\nextra:x:2000:app,nobody\nnogroup:x:65534:\n"
# The app image's entrypoint prints where it runs, three variables and its arguments ($0 is the first).
ENTRY_SCRIPT = 'echo "pwd=$(pwd) env=$FROM_IMAGE,$OVERRIDE,$FROM_CONFIG args=$0 $*"'


@pytest.fixture(scope="module")
def app_image(registry: Registry) -> str:
    """USER app, an ENTRYPOINT and CMD, Env, WORKDIR /home/app, and an /etc/group with memberships."""
    config = ib.ImageConfig(
        user="app",
        entrypoint=["sh", "-c", ENTRY_SCRIPT],
        cmd=["cmd0", "cmd1"],
        env=[ib.DEFAULT_PATH, "FROM_IMAGE=image", "OVERRIDE=image"],
        working_dir="/home/app",
    )
    layer = ib.Layer([ib.File("/etc/group", APP_GROUP.encode())], created_by="groups with members")
    return push_image(registry, "e2e/spec-app", config=config, layers=[layer])


@pytest.fixture
def env(make_daemon, registry: Registry, busybox: str, app_image: str) -> Iterator[Env]:
    with running_env(make_daemon, registry, [busybox, app_image]) as env:
        yield env


# ---- helpers ---------------------------------------------------------------------------------


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


def security(**kwargs: Any) -> pb.LinuxContainerConfig:
    """A container's linux config holding only a security context."""
    return pb.LinuxContainerConfig(security_context=pb.LinuxContainerSecurityContext(**kwargs))


def run_all(env: Env, pod: Pod, configs: list[pb.ContainerConfig]) -> dict[str, pb.ContainerStatus]:
    """Create and start every container, then wait for all of them: their final statuses by name."""
    ids = {c.metadata.name: env.run(pod, c) for c in configs}
    statuses = {name: env.wait_exited(cid) for name, cid in ids.items()}
    for name, status in statuses.items():
        assert status.state == pb.CONTAINER_EXITED, (name, status)
    return statuses


def privileged_pod(env: Env) -> Pod:
    """A pod whose sandbox is privileged, as the kubelet asks for one holding a privileged container."""
    log_dir = env.daemon.base / "logs" / secrets.token_hex(4)
    config = pod_config(log_directory=str(log_dir))
    config.linux.security_context.privileged = True
    config.linux.cgroup_parent = f"/criopy-e2e-{secrets.token_hex(4)}"
    env.cgroup_parents.append(config.linux.cgroup_parent)
    env.log_dirs.append(log_dir)
    resp = env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60)
    return str(resp.pod_sandbox_id), config


def refused(env: Env, pod: Pod, config: pb.ContainerConfig) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        env.create(pod, config)
    return err.value


def identity(output: str) -> tuple[int, int, set[int]]:
    """uid, gid and groups from busybox `id` output."""
    found = re.search(r"uid=(\d+)\S* gid=(\d+)\S*(?: groups=(\S+))?", output)
    assert found, output
    groups = {int(g) for g in re.findall(r"(\d+)(?:\([^)]*\))?", found.group(3) or "")}
    return int(found.group(1)), int(found.group(2)), groups


def cap_masks(output: str) -> dict[str, int]:
    """CapEff, CapPrm, CapBnd, ... from a printed /proc/self/status."""
    return {k: int(v, 16) for k, v in re.findall(r"^(Cap\w+):\s+([0-9a-f]+)$", output, re.MULTILINE)}


def mask_of(names: list[str]) -> int:
    return sum(1 << CAPABILITY_NAMES.index(n if n.startswith("CAP_") else f"CAP_{n}") for n in names)


def mount_options(output: str, point: str) -> list[str]:
    """The options of the mount at `point` in a printed /proc/self/mounts."""
    for line in output.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[1] == point:
            return fields[3].split(",")
    raise AssertionError(f"{point} not mounted in:\n{output}")


@contextlib.contextmanager
def bind_to_itself(path: Path, propagation: str) -> Iterator[Path]:
    """`path` bind-mounted onto itself with the given propagation (shared/private); unmounted at the end."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "--bind", str(path), str(path)], check=True)
    try:
        subprocess.run(["mount", f"--make-{propagation}", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-R", str(path)], check=False)


# ---- tests -----------------------------------------------------------------------------------


def test_the_process_runs_as_the_image_user_or_the_requested_one_with_its_groups(env: Env, app_image: str) -> None:
    pod = env.pod()
    i64 = pb.Int64Value
    id_home = sh("id; echo HOME=$HOME")
    configs = {
        # USER app from the image; Merge (the default) adds app's /etc/group memberships.
        "image-user": env.container_config("image-user", id_home, image=app_image),
        "run-as-user": env.container_config("run-as-user", id_home, linux=security(run_as_user=i64(value=65534))),
        # run_as_username replaces the image USER; nobody is a member of extra in this image.
        "run-as-username": env.container_config(
            "run-as-username", ["id"], image=app_image, linux=security(run_as_username="nobody")
        ),
        "run-as-group": env.container_config(
            "run-as-group",
            ["id"],
            image=app_image,
            linux=security(run_as_user=i64(value=1000), run_as_group=i64(value=4000)),
        ),
        "merge": env.container_config(
            "merge",
            ["id"],
            image=app_image,
            linux=security(supplemental_groups=[3000], supplemental_groups_policy=pb.Merge),
        ),
        "strict": env.container_config(
            "strict",
            ["id"],
            image=app_image,
            linux=security(supplemental_groups=[3000], supplemental_groups_policy=pb.Strict),
        ),
    }
    statuses = run_all(env, pod, list(configs.values()))
    seen = {name: identity(env.output(pod, name)) for name in configs}
    assert seen == {
        "image-user": (1000, 1000, {10, 1000, 2000}),
        "run-as-user": (65534, 65534, {65534}),
        "run-as-username": (65534, 65534, {2000, 65534}),
        "run-as-group": (1000, 4000, {10, 2000, 4000}),
        "merge": (1000, 1000, {10, 1000, 2000, 3000}),
        "strict": (1000, 1000, {1000, 3000}),
    }
    # HOME comes from the user's /etc/passwd entry.
    assert "HOME=/home/app" in env.output(pod, "image-user")
    assert "HOME=/nonexistent" in env.output(pod, "run-as-user")
    # ContainerStatus reports the same user the process got.
    user = statuses["merge"].user.linux
    assert (user.uid, user.gid, sorted(user.supplemental_groups)) == (1000, 1000, [10, 1000, 2000, 3000])


def test_capabilities_default_added_dropped_and_privileged(env: Env) -> None:
    pod = privileged_pod(env)
    probe = sh(
        "cat /proc/self/status; cat /proc/self/mounts; ls /dev;"
        " /bin/busybox ip link set lo mtu $(cat /sys/class/net/lo/mtu) && echo net-admin=yes || echo net-admin=no"
    )
    caps = pb.Capability
    configs = [
        env.container_config("default", probe),
        env.container_config("net-admin", probe, linux=security(capabilities=caps(add_capabilities=["NET_ADMIN"]))),
        env.container_config(
            "only-chown",
            sh("cat /proc/self/status; touch /tmp/f && chown 1000:1000 /tmp/f && stat -c owner=%u /tmp/f"),
            linux=security(capabilities=caps(drop_capabilities=["ALL"], add_capabilities=["CHOWN"]), no_new_privs=True),
        ),
        env.container_config("privileged", probe, linux=security(privileged=True)),
    ]
    run_all(env, pod, configs)
    out = {c.metadata.name: env.output(pod, c.metadata.name) for c in configs}
    masks = {name: cap_masks(text) for name, text in out.items()}

    default = mask_of(DEFAULT_CAPABILITIES)
    assert masks["default"]["CapEff"] == masks["default"]["CapBnd"] == default, out["default"]
    assert masks["default"]["CapInh"] == masks["default"]["CapAmb"] == 0
    assert "net-admin=no" in out["default"]
    assert masks["net-admin"]["CapEff"] == default | mask_of(["NET_ADMIN"])
    assert "net-admin=yes" in out["net-admin"]
    assert masks["only-chown"]["CapEff"] == masks["only-chown"]["CapBnd"] == mask_of(["CHOWN"])
    assert "owner=1000" in out["only-chown"]
    assert re.search(r"^NoNewPrivs:\s+1$", out["only-chown"], re.MULTILINE)
    assert re.search(r"^NoNewPrivs:\s+0$", out["default"], re.MULTILINE)

    # Privileged: exactly what this machine allows (it withholds CAP_SYS_RESOURCE), host devices, rw /sys.
    ours = cap_masks(Path("/proc/self/status").read_text())
    assert masks["privileged"]["CapBnd"] == ours["CapBnd"]
    assert masks["privileged"]["CapEff"] == ours["CapBnd"]
    assert "net-admin=yes" in out["privileged"]
    host_devices = {name for name in ("loop-control", "loop0", "kmsg") if Path("/dev", name).exists()}
    assert host_devices, "no host device to look for"
    assert host_devices <= set(out["privileged"].split()), out["privileged"]
    assert not host_devices & set(out["default"].split()), out["default"]
    assert "rw" in mount_options(out["privileged"], "/sys")
    assert "ro" in mount_options(out["default"], "/sys")
    # No masked or read-only kernel paths for a privileged container.
    assert "ro" in mount_options(out["default"], "/proc/sys")
    assert " /proc/sys " not in out["privileged"]


def test_read_only_rootfs_masked_and_read_only_paths(env: Env, tmp_path: Path) -> None:
    pod = env.pod()
    empty_dir = tmp_path / "empty-dir"
    empty_dir.mkdir(mode=0o777)
    # A file of runc's default masked list that this kernel has (/proc/kcore needs CONFIG_PROC_KCORE).
    masked = next(p for p in ("/proc/kcore", "/proc/keys", "/proc/timer_list") if os.path.exists(p))
    configs = [
        env.container_config(
            "ro-root",
            sh("echo written > /tmp/out && touch /x"),
            mounts=[pb.Mount(container_path="/tmp", host_path=str(empty_dir))],
            linux=security(readonly_rootfs=True),
        ),
        env.container_config(
            "default-paths",
            sh(
                f"echo masked=$(wc -c < {masked}) $(stat -c %t:%T {masked}) firmware=$(ls -A /sys/firmware | wc -l);"
                " echo hostname > /proc/sys/kernel/hostname; echo sysctl=$?"
            ),
        ),
        env.container_config(
            "custom-paths",
            sh("echo group=$(wc -c < /etc/group) home=$(ls -A /home | wc -l); touch /tmp/x; echo tmp=$?"),
            linux=security(masked_paths=["/etc/group", "/home"], readonly_paths=["/tmp"]),
        ),
    ]
    statuses = run_all(env, pod, configs)

    assert statuses["ro-root"].exit_code != 0
    assert "touch: /x: Read-only file system" in env.output(pod, "ro-root")
    assert (empty_dir / "out").read_text() == "written\n"

    default = env.output(pod, "default-paths")
    assert "masked=0 1:3 firmware=0" in default  # a masked file is /dev/null, a masked directory empty
    assert "/proc/sys/kernel/hostname: Read-only file system" in default
    assert "sysctl=1" in default

    custom = env.output(pod, "custom-paths")
    assert "group=0 home=0" in custom  # a masked file reads empty, a masked directory is an empty one
    assert "touch: /tmp/x: Read-only file system" in custom
    assert "tmp=1" in custom


def test_seccomp_runtime_default_unconfined_and_localhost_profiles(env: Env, tmp_path: Path) -> None:
    pod = env.pod()
    # personality(PER_LINUX32 | ADDR_NO_RANDOMIZE) is not among the values the default profile allows: ENOSYS.
    personality = sh("grep Seccomp: /proc/self/status; /bin/busybox linux32 -R true && echo personality=ok")
    # The default profile allows chroot only to a container holding CAP_SYS_CHROOT (its includes/excludes).
    chroot = sh("/bin/busybox chroot / /bin/true && echo chroot=ok")
    seccomp = pb.SecurityProfile
    profile = tmp_path / "no-mkdir.json"
    # 122 (EDQUOT) is an errno nothing else would give mkdir in /tmp: only the profile can have answered it.
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 122}],
            }
        )
    )
    configs = [
        env.container_config(
            "runtime-default", personality, linux=security(seccomp=seccomp(profile_type=seccomp.RuntimeDefault))
        ),
        env.container_config(
            "unconfined", personality, linux=security(seccomp=seccomp(profile_type=seccomp.Unconfined))
        ),
        env.container_config(
            "chroot-cap",
            chroot,
            linux=security(
                seccomp=seccomp(profile_type=seccomp.RuntimeDefault),
                capabilities=pb.Capability(add_capabilities=["SYS_CHROOT"]),
            ),
        ),
        env.container_config("chroot", chroot, linux=security(seccomp=seccomp(profile_type=seccomp.RuntimeDefault))),
        env.container_config(
            "localhost",
            sh("mkdir /tmp/d; echo mkdir=$?; touch /tmp/f && echo touch=ok"),
            linux=security(seccomp=seccomp(profile_type=seccomp.Localhost, localhost_ref=str(profile))),
        ),
    ]
    statuses = run_all(env, pod, configs)

    assert statuses["runtime-default"].exit_code != 0
    assert re.search(r"^Seccomp:\s+2$", env.output(pod, "runtime-default"), re.MULTILINE)  # 2: filter mode
    assert "Function not implemented" in env.output(pod, "runtime-default")
    assert "personality=ok" not in env.output(pod, "runtime-default")
    assert statuses["unconfined"].exit_code == 0
    assert re.search(r"^Seccomp:\s+0$", env.output(pod, "unconfined"), re.MULTILINE)
    assert "personality=ok" in env.output(pod, "unconfined")
    assert "chroot=ok" in env.output(pod, "chroot-cap")
    assert "chroot: can't change root directory to '/': Operation not permitted" in env.output(pod, "chroot")
    localhost = env.output(pod, "localhost")
    assert "Disk quota exceeded" in localhost
    assert "mkdir=1" in localhost
    assert "touch=ok" in localhost

    missing = str(tmp_path / "no-such-profile.json")
    err = refused(
        env,
        pod,
        env.container_config(
            "missing", ["true"], linux=security(seccomp=seccomp(profile_type=seccomp.Localhost, localhost_ref=missing))
        ),
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"{SC}.seccomp.localhost_ref" in err.details() and missing in err.details()


def test_privileged_container_runs_without_its_localhost_seccomp_profile(env: Env, tmp_path: Path) -> None:
    """Privileged means unconfined, whatever profile is named (the kubelet's and containerd's semantics)."""
    pod = privileged_pod(env)
    profile = tmp_path / "no-sethostname.json"
    profile.write_text(
        json.dumps(
            {
                "defaultAction": "SCMP_ACT_ALLOW",
                "syscalls": [{"names": ["sethostname"], "action": "SCMP_ACT_ERRNO", "errnoRet": 122}],
            }
        )
    )
    localhost = pb.SecurityProfile(profile_type=pb.SecurityProfile.Localhost, localhost_ref=str(profile))
    script = sh("grep Seccomp: /proc/self/status; hostname renamed && echo hostname=$(hostname)")
    configs = [
        env.container_config("privileged", script, linux=security(privileged=True, seccomp=localhost)),
        env.container_config("confined", script, linux=security(seccomp=localhost)),
    ]
    statuses = run_all(env, pod, configs)

    privileged = env.output(pod, "privileged")
    assert statuses["privileged"].exit_code == 0, privileged
    assert re.search(r"^Seccomp:\s+0$", privileged, re.MULTILINE)
    assert "hostname=renamed" in privileged
    # The same profile confines an unprivileged container: EDQUOT is the profile's answer (not EPERM's).
    confined = env.output(pod, "confined")
    assert re.search(r"^Seccomp:\s+2$", confined, re.MULTILINE)
    assert "sethostname: Disk quota exceeded" in confined


def test_env_working_dir_command_and_args(env: Env, app_image: str) -> None:
    pod = env.pod()
    kv = pb.KeyValue
    configs = [
        env.container_config("image", image=app_image),
        env.container_config(
            "override",
            image=app_image,
            args=["a0", "a1"],
            envs=[kv(key="OVERRIDE", value="config"), kv(key="FROM_CONFIG", value="yes")],
            working_dir="/tmp",
        ),
        env.container_config("command", ["echo", "command-only"], image=app_image),
        env.container_config("both", ["echo"], image=app_image, args=["x", "y"]),
    ]
    statuses = run_all(env, pod, configs)
    assert all(s.exit_code == 0 for s in statuses.values()), statuses
    assert {c.metadata.name: env.output(pod, c.metadata.name) for c in configs} == {
        "image": "pwd=/home/app env=image,image, args=cmd0 cmd1\n",
        "override": "pwd=/tmp env=image,config,yes args=a0 a1\n",
        "command": "command-only\n",  # command replaces ENTRYPOINT and drops CMD
        "both": "x y\n",
    }


def test_bad_requests_are_refused_naming_the_field_and_leave_nothing(env: Env, tmp_path: Path) -> None:
    pod = env.pod()
    caps = pb.Capability
    resources = pb.LinuxContainerResources
    dotdot = env.container_config("dotdot", ["true"])
    dotdot.log_path = "../escape.log"
    cases: list[tuple[str, pb.ContainerConfig]] = [
        (
            "config.mounts[0].container_path",
            env.container_config(
                "rel-mount", ["true"], mounts=[pb.Mount(container_path="data", host_path=str(tmp_path))]
            ),
        ),
        ("config.log_path", dotdot),
        (
            f"{SC}.capabilities.add_capabilities",
            env.container_config("bad-cap", ["true"], linux=security(capabilities=caps(add_capabilities=["CAP_NOPE"]))),
        ),
        (
            "config.linux.resources.cpuset_cpus",
            env.container_config(
                "bad-cpuset", ["true"], linux=pb.LinuxContainerConfig(resources=resources(cpuset_cpus="0-"))
            ),
        ),
        (
            "config.linux.resources.memory_limit_in_bytes",
            env.container_config(
                "bad-memory", ["true"], linux=pb.LinuxContainerConfig(resources=resources(memory_limit_in_bytes=-1))
            ),
        ),
        # The pod was not asked to be privileged, so none of its containers may be (containerd's rule).
        (f"{SC}.privileged", env.container_config("privileged", ["true"], linux=security(privileged=True))),
        # These two are found after the rootfs is made: it has to be undone.
        (f"{SC}.run_as_username", env.container_config("ghost", ["true"], linux=security(run_as_username="ghost"))),
        (
            "config.devices[0].host_path",
            env.container_config(
                "no-device",
                ["true"],
                devices=[pb.Device(container_path="/dev/x", host_path="/dev/criopy-none", permissions="r")],
            ),
        ),
    ]
    for field, config in cases:
        err = refused(env, pod, config)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, err)
        assert field in err.details(), (field, err.details())
        assert env.leftovers() == NOTHING, field

    err = refused(env, pod, env.container_config("no-image", ["true"], image=f"{env.image.rsplit(':', 1)[0]}:nope"))
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert env.leftovers() == NOTHING

    # Each refusal freed its name: the same config, made right, now runs.
    status = env.run_to_exit(pod, env.container_config("ghost", ["true"]))
    assert status.exit_code == 0


def test_devices_appear_with_their_numbers_and_permissions(env: Env) -> None:
    pod = env.pod()
    devices = [
        pb.Device(container_path="/dev/mydev", host_path="/dev/null", permissions="r"),
        pb.Device(container_path="/dev/myctl", host_path="/dev/loop-control", permissions="r"),
    ]
    if Path("/dev/loop0").exists():
        devices.append(pb.Device(container_path="/dev/myblock", host_path="/dev/loop0", permissions="r"))
    paths = " ".join(d.container_path for d in devices)
    script = f"stat -c '%n %F %t:%T' {paths}; echo x > /dev/myctl; echo write=$?"
    run_all(env, pod, [env.container_config("devices", sh(script), devices=devices)])
    out = env.output(pod, "devices")
    for device in devices:
        rdev = os.stat(device.host_path).st_rdev
        kind = "block special file" if device.host_path == "/dev/loop0" else "character special file"
        assert f"{device.container_path} {kind} {os.major(rdev):x}:{os.minor(rdev):x}" in out, out
    # "r" only: the device cgroup refuses opening it for writing.
    assert "/dev/myctl: Operation not permitted" in out
    assert "write=1" in out


def test_bind_mounts_read_only_created_and_propagation(env: Env, tmp_path: Path) -> None:
    pod = env.pod()
    ro_dir = tmp_path / "ro"
    ro_dir.mkdir()
    (ro_dir / "file").write_text("from the host\n")
    missing = tmp_path / "missing" / "deep"
    configs = [
        env.container_config(
            "binds",
            sh("cat /ro/file; touch /ro/new; echo ro=$?; echo hello > /made/hello && echo made=ok"),
            mounts=[
                pb.Mount(container_path="/ro", host_path=str(ro_dir), readonly=True),
                pb.Mount(container_path="/made", host_path=str(missing)),
            ],
        )
    ]
    statuses = run_all(env, pod, configs)
    out = env.output(pod, "binds")
    assert "from the host" in out
    assert "touch: /ro/new: Read-only file system" in out and "ro=1" in out
    assert "made=ok" in out
    assert not (ro_dir / "new").exists()
    assert missing.is_dir() and (missing / "hello").read_text() == "hello\n"

    assert env.wait_released(statuses["binds"].id)  # what the exited container holds stays put from here
    before = env.leftovers()
    with bind_to_itself(tmp_path / "private", "private") as private:
        mount = pb.Mount(container_path="/prop", host_path=str(private), propagation=pb.PROPAGATION_BIDIRECTIONAL)
        err = refused(env, pod, env.container_config("rshared", ["true"], mounts=[mount]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "config.mounts[0].propagation" in err.details()
        assert env.leftovers() == before

    # rslave (HostToContainer) on a shared source: a mount made on the host afterwards shows up inside.
    with bind_to_itself(tmp_path / "shared", "shared") as shared:
        (shared / "sub").mkdir()
        mount = pb.Mount(container_path="/prop", host_path=str(shared), propagation=pb.PROPAGATION_HOST_TO_CONTAINER)
        script = "for i in $(seq 100); do [ -e /prop/sub/marker ] && break; sleep 0.1; done; cat /prop/sub/marker"
        cid = env.run(pod, env.container_config("rslave", sh(script), mounts=[mount]))
        subprocess.run(["mount", "-t", "tmpfs", "criopy-test", str(shared / "sub")], check=True)
        (shared / "sub" / "marker").write_text("propagated\n")
        status = env.wait_exited(cid)
        assert (status.exit_code, env.output(pod, "rslave")) == (0, "propagated\n")


def test_default_ulimits_reach_the_container_and_its_execs(make_daemon, registry: Registry, busybox: str) -> None:
    """The CRI has no rlimits: `runtime.default_ulimits` sets them, as cri-o's option of that name does."""
    extra = "runtime:\n  default_ulimits: [nofile=1000:2000, core=-1, nproc=500]\n"
    with running_env(make_daemon, registry, [busybox], extra) as env:
        pod = env.pod()
        cid = env.run(pod, env.container_config("limits", sh("cat /proc/self/limits; sleep 300")))
        env.wait_for(cid, lambda s: "Max open files" in env.output(pod, "limits"))
        limits = rlimits(env.output(pod, "limits"))
        assert limits["Max open files"] == ("1000", "2000")
        assert limits["Max core file size"] == ("unlimited", "unlimited")
        assert limits["Max processes"] == ("500", "500")
        # An exec gets the container's limits too, not the daemon's. Its soft NOFILE in the first instant is
        # runc 1.1.5's to race over (runc#4195: raised to the hard limit in about half of all execs here).
        resp = env.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/proc/self/limits"], timeout=10))
        limits = rlimits(resp.stdout.decode())
        assert limits["Max open files"][1] == "2000"
        assert limits["Max core file size"] == ("unlimited", "unlimited")
        assert limits["Max processes"] == ("500", "500")
        # Past that instant the daemon has set the container's NOFILE again: every one of 8 execs sees it.
        request = pb.ExecSyncRequest(container_id=cid, cmd=["sh", "-c", "sleep 1; cat /proc/self/limits"], timeout=20)
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: env.rt.ExecSync(request), range(8)))
        assert [rlimits(r.stdout.decode())["Max open files"] for r in replies] == [("1000", "2000")] * 8


def rlimits(text: str) -> dict[str, tuple[str, str]]:
    """Soft and hard limit by name, from /proc/<pid>/limits."""
    found = re.findall(r"^(Max [a-z ]+?)\s{2,}(\S+)\s+(\S+)", text, re.MULTILINE)
    return {name: (soft, hard) for name, soft, hard in found}


MIB = 1024 * 1024


def _swap_limit(parent: str, cid: str) -> int:
    """The container's memory + swap limit as the kernel holds it (v1 memsw; v2 keeps swap apart)."""
    v1 = CGROUP_ROOT / "memory" / parent.strip("/") / f"criopy-{cid}" / "memory.memsw.limit_in_bytes"
    if v1.exists():
        return int(v1.read_text())
    v2 = CGROUP_ROOT / parent.strip("/") / f"criopy-{cid}"
    return int((v2 / "memory.swap.max").read_text()) + int((v2 / "memory.max").read_text())


def test_a_swap_limit_lands_in_the_cgroup_and_is_updated_live(env: Env) -> None:
    if not (CGROUP_ROOT / "memory" / "memory.memsw.limit_in_bytes").exists() and not list(
        CGROUP_ROOT.glob("*/memory.swap.max")
    ):
        assert "no swap accounting on this host" in env.daemon.log()
        pytest.skip("the kernel does not account swap (no memory.memsw.* / memory.swap.max): limits are not applied")
    pod = env.pod()
    limits = pb.LinuxContainerResources(memory_limit_in_bytes=64 * MIB, memory_swap_limit_in_bytes=96 * MIB)
    cid = env.run(pod, env.container_config("swap", ["sleep", "3600"], linux=pb.LinuxContainerConfig(resources=limits)))
    parent = pod[1].linux.cgroup_parent
    assert _swap_limit(parent, cid) == 96 * MIB
    raised = pb.LinuxContainerResources(memory_limit_in_bytes=64 * MIB, memory_swap_limit_in_bytes=128 * MIB)
    env.rt.UpdateContainerResources(pb.UpdateContainerResourcesRequest(container_id=cid, linux=raised), timeout=30)
    assert _swap_limit(parent, cid) == 128 * MIB
    status = env.status(cid).status
    assert status.resources.linux.memory_swap_limit_in_bytes == 128 * MIB
    # No swap limit with a memory limit: no swap beyond the memory, as the kubelet expects.
    plain = pb.LinuxContainerResources(memory_limit_in_bytes=64 * MIB)
    other = env.run(
        pod, env.container_config("no-swap", ["sleep", "3600"], linux=pb.LinuxContainerConfig(resources=plain))
    )
    assert _swap_limit(parent, other) == 64 * MIB
