"""Containers through the daemon's socket, like the kubelet drives them: real conmon, runc, overlay, cgroups (root)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import NOTHING, Env, running_env
from tests.support.system import CGROUP_ROOT

CRI_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+(Z|[+-]\d\d:\d\d) (stdout|stderr) (P|F) ")


def test_a_container_prints_a_line_and_its_exit_reaches_status_at_once(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, env.container_config(command=["sh", "-c", "echo hello from criopy; echo to stderr >&2"]))
    status = env.wait_exited(cid, timeout=10)
    exited_seen = time.time_ns()
    assert status.exit_code == 0
    assert status.reason == "Completed"
    # Within a second of the exit as conmon recorded it.
    assert 0 <= exited_seen - status.finished_at < 1_000_000_000
    assert status.started_at >= status.created_at > 0
    lines = env.log_lines(pod)
    assert all(CRI_LOG_LINE.match(line) for line in lines), lines
    assert any(line.endswith(" stdout F hello from criopy") for line in lines), lines
    assert any(line.endswith(" stderr F to stderr") for line in lines), lines
    assert status.log_path == str(Path(pod[1].log_directory) / "c.log")

    failing = env.run_to_exit(pod, env.container_config("fails", ["sh", "-c", "exit 3"]))
    assert (failing.exit_code, failing.reason) == (3, "Error")


def nice_of(stat_line: str) -> int:
    """The nice value (field 19) of a /proc/<pid>/stat line."""
    return int(stat_line.rsplit(")", 1)[1].split()[16])


def test_containers_and_execs_run_at_nice_0_while_the_daemon_loop_runs_ahead(env: Env) -> None:
    """The loop's thread is raised (nice -5) with SCHED_RESET_ON_FORK: nothing it starts inherits that."""
    assert env.daemon.proc is not None
    loop = Path(f"/proc/{env.daemon.proc.pid}/task/{env.daemon.proc.pid}/stat").read_text()
    assert nice_of(loop) == -5
    pod = env.pod()
    cid = env.run(pod, env.container_config(command=["sleep", "60"]))
    reply = env.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/proc/1/stat", "/proc/self/stat"]))
    init, execd = reply.stdout.decode().splitlines()
    assert (nice_of(init), nice_of(execd)) == (0, 0)


def test_remove_leaves_nothing(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, env.container_config(command=["sleep", "3600"]))
    assert env.status(cid).status.state == pb.CONTAINER_RUNNING
    env.stop(cid, timeout=0)
    env.stop(cid, timeout=0)
    env.remove(cid)
    env.remove(cid)
    assert env.leftovers() == NOTHING
    with pytest.raises(grpc.RpcError) as err:
        env.status(cid)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_an_exited_container_keeps_its_record_and_log_but_not_its_runtime_state(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, env.container_config(command=["sh", "-c", "echo bye"]))
    env.wait_exited(cid)
    # As containerd deletes its task at exit: runc's state, its cgroup and conmon go without a RemoveContainer.
    assert env.wait_released(cid)
    info = json.loads(env.status(cid, verbose=True).info["info"])
    assert not (CGROUP_ROOT / "pids" / info["cgroupsPath"].strip("/")).exists()
    status = env.status(cid).status
    assert (status.state, status.exit_code, status.reason) == (pb.CONTAINER_EXITED, 0, "Completed")
    assert env.output(pod) == "bye\n"
    env.remove(cid)
    assert env.leftovers() == NOTHING


def _cgroup_file(env: Env, cid: str, controller: str, name: str) -> Path:
    info = json.loads(env.status(cid, verbose=True).info["info"])
    return CGROUP_ROOT / controller / info["cgroupsPath"].strip("/") / name


def test_two_containers_share_the_pod_network_and_an_empty_dir(env: Env, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    pod = env.pod()
    volume = [pb.Mount(container_path="/shared", host_path=str(shared))]
    # The server serves the shared directory on the pod's loopback; the client writes a file there and fetches it.
    serve = ["busybox", "httpd", "-f", "-p", "7070", "-h", "/shared"]
    server = env.run(pod, env.container_config("server", serve, mounts=volume))
    fetch = "echo written-by-client > /shared/note; sleep 0.3; busybox wget -q -O - http://127.0.0.1:7070/note"
    status = env.run_to_exit(pod, env.container_config("client", ["sh", "-c", fetch], mounts=volume))
    assert (status.exit_code, status.reason) == (0, "Completed"), env.output(pod, "client")
    assert env.output(pod, "client") == "written-by-client\n"
    assert (shared / "note").read_text() == "written-by-client\n"  # the host sees it too
    assert env.status(server).status.state == pb.CONTAINER_RUNNING


def test_memory_limit_is_in_the_cgroup_and_going_beyond_it_is_oomkilled(env: Env) -> None:
    pod = env.pod()
    limit = 32 * 1024 * 1024
    resources = pb.LinuxContainerResources(memory_limit_in_bytes=limit)
    config = env.container_config(
        "hog",
        ["sh", "-c", "sleep 1; dd if=/dev/zero of=/dev/null bs=128M count=1"],
        linux=pb.LinuxContainerConfig(resources=resources),
    )
    cid = env.run(pod, config)
    assert int(_cgroup_file(env, cid, "memory", "memory.limit_in_bytes").read_text()) == limit
    status = env.wait_exited(cid, timeout=30)
    assert status.reason == "OOMKilled", (status, env.output(pod, "hog"))
    assert status.exit_code == 137


def test_stop_honours_the_timeout_and_escalates_to_sigkill(env: Env) -> None:
    pod = env.pod()
    stubborn = env.run(
        pod, env.container_config("stubborn", ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    )
    polite = env.run(
        pod, env.container_config("polite", ["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 0.1; done"])
    )
    time.sleep(0.3)  # the traps are set
    started = time.monotonic()
    env.stop(polite, timeout=10)
    assert time.monotonic() - started < 5
    assert (env.status(polite).status.exit_code, env.status(polite).status.reason) == (0, "Completed")

    started = time.monotonic()
    env.stop(stubborn, timeout=2)
    took = time.monotonic() - started
    status = env.status(stubborn).status
    assert status.state == pb.CONTAINER_EXITED  # the call returned only once the process was gone
    assert 2 <= took < 10
    assert (status.exit_code, status.reason) == (137, "Error")
    env.stop(stubborn, timeout=2)  # again: fine
    for cid in (stubborn, polite):
        env.remove(cid)
        env.remove(cid)
    assert env.leftovers() == NOTHING


def test_stop_signal_by_name_realtime_and_kill_of_the_whole_pid_namespace(env: Env) -> None:
    pod = env.pod()
    waiter = "trap 'echo got {name}; exit {code}' {trap}; echo ready; while true; do sleep 0.1; done"
    usr1 = env.run(
        pod,
        env.container_config(
            "usr1", ["sh", "-c", waiter.format(name="USR1", code=5, trap="USR1")], stop_signal=pb.SIGUSR1
        ),
    )
    # The CRI enum's realtime names (SIGRTMINPLUS1) are not runc's: they reach the process as 35.
    rt = env.run(
        pod,
        env.container_config(
            "rt",
            ["sh", "-c", waiter.format(name="RTMIN+1", code=6, trap=signal.SIGRTMIN + 1)],
            stop_signal=pb.SIGRTMINPLUS1,
        ),
    )
    env.wait_for(usr1, lambda _s: "ready\n" in env.output(pod, "usr1"), timeout=10)
    env.wait_for(rt, lambda _s: "ready\n" in env.output(pod, "rt"), timeout=10)
    env.stop(usr1, timeout=30)
    env.stop(rt, timeout=30)
    assert (env.status(usr1).status.exit_code, env.output(pod, "usr1").splitlines()[-1]) == (5, "got USR1")
    assert (env.status(rt).status.exit_code, env.output(pod, "rt").splitlines()[-1]) == (6, "got RTMIN+1")

    # Stop with timeout 0 kills the init of a container with its own PID namespace; the kernel then
    # kills the rest of it, background children included.
    family = env.run(pod, env.container_config("family", ["sh", "-c", "sleep 4001 & sleep 4002 & echo ready; wait"]))
    env.wait_for(family, lambda _s: "ready\n" in env.output(pod, "family"), timeout=10)
    procs = _cgroup_file(env, family, "pids", "cgroup.procs")
    pids = [int(p) for p in procs.read_text().split()]
    assert len(pids) == 3, pids
    env.stop(family, timeout=0)
    assert (env.status(family).status.exit_code, env.status(family).status.reason) == (137, "Error")
    assert [pid for pid in pids if Path(f"/proc/{pid}").exists()] == []
    for cid in (usr1, rt, family):
        env.remove(cid)
    assert env.leftovers() == NOTHING


def test_reopen_container_log_after_rotation(env: Env) -> None:
    pod = env.pod()
    cid = env.run(
        pod,
        env.container_config("talker", ["sh", "-c", "i=0; while true; do echo line $i; i=$((i+1)); sleep 0.05; done"]),
    )
    log = Path(pod[1].log_directory) / "talker.log"
    env.wait_for(cid, lambda _s: log.exists() and log.stat().st_size > 0)
    rotated = log.with_suffix(".log.1")
    os.rename(log, rotated)
    env.rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid), timeout=10)
    assert log.exists()  # the kubelet's rotation relies on the new file being there when the call returns
    env.wait_for(cid, lambda _s: "stdout F line" in log.read_text(), timeout=10)
    assert CRI_LOG_LINE.match(log.read_text().splitlines()[0])
    size = rotated.stat().st_size
    time.sleep(0.3)
    assert rotated.stat().st_size == size  # nothing more goes to the old file
    env.rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid), timeout=10)  # not rotated: fine too
    env.stop(cid)
    with pytest.raises(grpc.RpcError) as err:
        env.rt.ReopenContainerLog(pb.ReopenContainerLogRequest(container_id=cid), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_long_lines_are_split_with_partial_tags(env: Env) -> None:
    pod = env.pod()
    status = env.run_to_exit(
        pod, env.container_config("long", ["sh", "-c", "head -c 20000 /dev/zero | tr '\\0' x; echo"])
    )
    assert status.exit_code == 0
    lines = env.log_lines(pod, "long")
    assert any(" stdout P " in line for line in lines), lines[:2]
    assert env.output(pod, "long") == "x" * 20000 + "\n"


def test_stats_of_a_busy_container_and_update_resources(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, env.container_config("busy", ["sh", "-c", "while true; do :; done"]))
    time.sleep(5)  # two collector rounds: nano cores need two samples
    stats = env.rt.ContainerStats(pb.ContainerStatsRequest(container_id=cid), timeout=10).stats
    assert stats.attributes.id == cid
    assert stats.cpu.usage_core_nano_seconds.value > 0
    assert stats.cpu.usage_nano_cores.value > 100_000_000  # a busy loop: well over a tenth of a core
    assert stats.memory.working_set_bytes.value > 0
    assert stats.writable_layer.inodes_used.value >= 0
    listed = env.rt.ListContainerStats(pb.ListContainerStatsRequest(), timeout=10).stats
    assert [s.attributes.id for s in listed] == [cid]
    pods = env.rt.ListPodSandboxStats(pb.ListPodSandboxStatsRequest(), timeout=10).stats
    assert [p.attributes.id for p in pods] == [pod[0]]
    assert pods[0].linux.cpu.usage_core_nano_seconds.value >= stats.cpu.usage_core_nano_seconds.value
    assert pods[0].linux.network.default_interface.name == "eth0"
    assert [c.attributes.id for c in pods[0].linux.containers] == [cid]
    streamed = [
        s.attributes.id
        for r in env.rt.StreamContainerStats(pb.StreamContainerStatsRequest())
        for s in r.container_stats
    ]
    assert streamed == [cid]
    streamed_pods = [
        p.attributes.id
        for r in env.rt.StreamPodSandboxStats(pb.StreamPodSandboxStatsRequest())
        for p in r.pod_sandbox_stats
    ]
    assert streamed_pods == [pod[0]]
    names = {d.name for d in env.rt.ListMetricDescriptors(pb.ListMetricDescriptorsRequest()).descriptors}
    assert "container_memory_working_set_bytes" in names
    pod_metrics = env.rt.ListPodSandboxMetrics(pb.ListPodSandboxMetricsRequest()).pod_metrics
    working_set = [
        m.value.value
        for pm in pod_metrics
        for cm in pm.container_metrics
        for m in cm.metrics
        if m.name == "container_memory_working_set_bytes"
    ]
    assert working_set and working_set[0] > 0
    with pytest.raises(grpc.RpcError) as err:
        env.rt.CheckpointContainer(pb.CheckpointContainerRequest(container_id=cid, location="/tmp/x.tar"))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "CRIU" in (err.value.details() or "")

    update = pb.LinuxContainerResources(cpu_quota=20000, cpu_period=100000, memory_limit_in_bytes=64 * 1024 * 1024)
    env.rt.UpdateContainerResources(pb.UpdateContainerResourcesRequest(container_id=cid, linux=update), timeout=10)
    assert int(_cgroup_file(env, cid, "cpu", "cpu.cfs_quota_us").read_text()) == 20000
    assert int(_cgroup_file(env, cid, "memory", "memory.limit_in_bytes").read_text()) == 64 * 1024 * 1024
    assert env.status(cid).status.resources.linux.cpu_quota == 20000
    time.sleep(4.5)
    throttled = env.rt.ContainerStats(pb.ContainerStatsRequest(container_id=cid), timeout=10).stats
    assert throttled.cpu.usage_nano_cores.value < 300_000_000  # held to a fifth of a core


def test_events_arrive_for_create_start_stop_delete(env: Env) -> None:
    _events_arrive(env)


def test_grpcio_transport_serves_a_container_and_its_events(make_daemon, registry, busybox: str) -> None:
    """The fallback transport (grpc_server: grpcio) still runs the whole service."""
    with running_env(make_daemon, registry, [busybox], "grpc_server: grpcio\n") as env:
        assert "transport=grpcio" in env.daemon.log()
        pod = env.pod()
        done = env.run_to_exit(pod, env.container_config(command=["echo", "over grpcio"]))
        assert (done.exit_code, done.reason) == (0, "Completed")
        assert any(line.endswith(" stdout F over grpcio") for line in env.log_lines(pod))
        _events_arrive(env)


def _events_arrive(env: Env) -> None:
    pod = env.pod()
    received: list[pb.ContainerEventResponse] = []
    stream = env.rt.GetContainerEvents(pb.GetEventsRequest())

    def read() -> None:
        try:
            for item in stream:
                received.append(item)
        except grpc.RpcError:
            pass

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    time.sleep(0.3)
    cid = env.run(pod, env.container_config("evented", ["sleep", "30"]))
    env.stop(cid)
    env.remove(cid)
    deadline = time.monotonic() + 5
    while len(received) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    stream.cancel()
    kinds = [(e.container_id, e.container_event_type) for e in received]
    assert kinds == [
        (cid, pb.CONTAINER_CREATED_EVENT),
        (cid, pb.CONTAINER_STARTED_EVENT),
        (cid, pb.CONTAINER_STOPPED_EVENT),
        (cid, pb.CONTAINER_DELETED_EVENT),
    ]
    assert received[0].pod_sandbox_status.id == pod[0]
    assert received[1].containers_statuses[0].state == pb.CONTAINER_RUNNING


SLOW_RUNC = """\
#!/bin/sh
# runc taking its time over `create`, as a loaded node does, and noting each one it was asked for.
for arg; do
    if [ "$arg" = create ]; then echo "$*" >> {calls}; sleep {seconds}; break; fi
done
exec {runc} "$@"
"""

CREATED = re.compile(r'level=info msg="container created" id=([0-9a-f]{64})')  # the manager's, once per container


def test_a_failing_create_leaves_nothing_and_an_abandoned_create_is_handed_to_the_retry(
    make_daemon, registry, busybox: str, tmp_path: Path
) -> None:
    # `runc create` takes 3 s, so a 1 s deadline always expires while the creation runs in the daemon.
    calls = tmp_path / "creates"
    slow = tmp_path / "slowrunc"
    slow.write_text(SLOW_RUNC.format(calls=calls, seconds=3, runc=shutil.which("runc")))
    slow.chmod(0o755)
    extra = f"runtime:\n  default_runtime: slow\n  runtimes:\n    slow:\n      path: {slow}\n"

    def runtime_creates() -> list[str]:
        """The IDs of the containers `runc create` ran for, in order (the ID is its last argument)."""
        return [line.split()[-1] for line in calls.read_text().splitlines()] if calls.exists() else []

    with running_env(make_daemon, registry, [busybox], extra) as env:
        pod = env.pod()
        with pytest.raises(grpc.RpcError) as err:
            env.create(pod, env.container_config("bogus", ["/no/such/binary"]))
        assert "/no/such/binary" in (err.value.details() or "")
        assert env.leftovers() == NOTHING

        config = env.container_config("retried", ["sleep", "30"])
        before = len(runtime_creates())
        with pytest.raises(grpc.RpcError) as err:
            env.create(pod, config, timeout=1)  # the kubelet's deadline expires first
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        retry = env.create(pod, config)  # joins the creation still in flight
        log = env.daemon.log()
        assert "container retry joins the creation in flight" in log
        assert CREATED.findall(log) == [retry]  # one creation, and the retry got what it made
        assert runtime_creates()[before:] == [retry]  # the abandoned call's runc create was the retry's
        listed = env.rt.ListContainers(pb.ListContainersRequest()).containers
        assert [c.id for c in listed] == [retry]

        # A retry that comes after the abandoned creation finished gets it too.
        late = env.container_config("late", ["sleep", "30"])
        finished = env.daemon.log().count("container finished after its caller left")
        with pytest.raises(grpc.RpcError) as err:
            env.create(pod, late, timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        deadline = time.monotonic() + 20
        while env.daemon.log().count("container finished after its caller left") == finished:
            assert time.monotonic() < deadline, "the abandoned creation did not finish"
            time.sleep(0.05)
        late_id = env.create(pod, late)
        log = env.daemon.log()
        assert "container handed to a retry" in log
        assert CREATED.findall(log) == [retry, late_id]
        assert runtime_creates()[before:] == [retry, late_id]
        assert sorted(c.id for c in env.rt.ListContainers(pb.ListContainersRequest()).containers) == sorted(
            [retry, late_id]
        )
        with pytest.raises(grpc.RpcError) as err:
            env.create(pod, config)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS


def test_list_filters_image_in_use_and_pod_removal_takes_its_containers(env: Env) -> None:
    pod = env.pod(labels={"app": "web"})
    running = env.run(pod, env.container_config("running", ["sleep", "30"], labels={"tier": "a"}))
    created = env.create(pod, env.container_config("created", ["sleep", "30"], labels={"tier": "b"}))
    rt = env.rt

    def ids(flt: pb.ContainerFilter) -> list[str]:
        return sorted(c.id for c in rt.ListContainers(pb.ListContainersRequest(filter=flt)).containers)

    assert ids(pb.ContainerFilter(id=running[:12])) == [running]
    assert ids(pb.ContainerFilter(state=pb.ContainerStateValue(state=pb.CONTAINER_CREATED))) == [created]
    assert ids(pb.ContainerFilter(label_selector={"tier": "a"})) == [running]
    assert ids(pb.ContainerFilter(pod_sandbox_id=pod[0][:10])) == sorted([running, created])
    assert env.status(running[:12]).status.id == running  # prefixes work in every call
    streamed = [c.id for r in rt.StreamContainers(pb.StreamContainersRequest()) for c in r.containers]
    assert sorted(streamed) == sorted([running, created])

    with pytest.raises(grpc.RpcError) as err:
        env.daemon.images().RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=env.image)), timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert_metrics_count_the_listed_states(env)

    rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)
    assert env.status(running).status.state == pb.CONTAINER_EXITED
    assert_metrics_count_the_listed_states(env)
    rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)
    assert env.leftovers() == NOTHING
    assert_metrics_count_the_listed_states(env)


def assert_metrics_count_the_listed_states(env: Env) -> None:
    """The containers and pod sandboxes gauges say what ListContainers and ListPodSandbox say, per state."""
    containers = env.rt.ListContainers(pb.ListContainersRequest()).containers
    sandboxes = env.rt.ListPodSandbox(pb.ListPodSandboxRequest()).items
    samples = env.daemon.metrics()
    for state, name in (
        (pb.CONTAINER_CREATED, "created"),
        (pb.CONTAINER_RUNNING, "running"),
        (pb.CONTAINER_EXITED, "exited"),
    ):
        assert samples[f'criopy_containers{{state="{name}"}}'] == sum(c.state == state for c in containers), name
    for pod_state, name in ((pb.SANDBOX_READY, "ready"), (pb.SANDBOX_NOTREADY, "notready")):
        assert samples[f'criopy_pod_sandboxes{{state="{name}"}}'] == sum(p.state == pod_state for p in sandboxes), name


def test_containers_survive_a_daemon_restart_and_exits_while_down_are_seen(env: Env) -> None:
    pod = env.pod()
    survivor = env.run(pod, env.container_config("survivor", ["sleep", "60"]))
    short = env.run(pod, env.container_config("short", ["sh", "-c", "sleep 1; exit 4"]))
    env.daemon.stop()
    time.sleep(1.5)
    env.daemon.start()
    assert env.status(survivor).status.state == pb.CONTAINER_RUNNING
    status = env.wait_exited(short, timeout=5)
    assert (status.exit_code, status.reason) == (4, "Error")
    env.stop(survivor)
    assert env.status(survivor).status.exit_code == 137
