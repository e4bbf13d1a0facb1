"""The daemon's blocking-call threads share one CPU (offload_cpus: auto); nothing it starts inherits that.

A container, an exec'd command or a monitor held to one CPU would be a fault: a node's pods get whatever
CPUs their cgroups give them, not the runtime's choice of one.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable

from api.runtime.v1 import api_pb2 as pb
from cri.system import affinity
from tests.e2e.containers import Env
from tests.e2e.pods import PodNet, add_plugin, pod_config, remove_all_pods
from tests.support.daemon_harness import Daemon, run_cli
from tests.support.system import conmon_pids, cpus_allowed, cpus_allowed_in, two_cpus_or_skip, unpack_hosts


def _threads(pid: int) -> dict[int, str]:
    """Each thread of `pid` and its CPUs (threads ending meanwhile left out)."""
    found = {}
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            found[int(task)] = cpus_allowed(pid, int(task))
        except OSError:  # ENOENT or ESRCH: the thread ended
            continue
    return found


def _in_container(env: Env, cid: str, path: str) -> str:
    reply = env.rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", path], timeout=20), timeout=30)
    assert reply.exit_code == 0, reply.stderr
    return reply.stdout.decode()


def test_the_blocking_call_threads_share_one_cpu_and_nothing_the_daemon_starts_is_bound(env: Env) -> None:
    every = two_cpus_or_skip()
    every_text, home_text = affinity.format_list(every), str(min(every))
    cid = env.run(env.pod(), env.container_config(command=["sleep", "3600"]))
    assert env.daemon.proc is not None
    daemon = env.daemon.proc.pid

    threads = _threads(daemon)
    assert threads[daemon] == every_text  # the event loop's thread, which starts processes
    bound = [tid for tid, cpus in threads.items() if cpus != every_text]
    assert bound, f"no thread bound to CPU {home_text}: {threads}"
    assert {threads[tid] for tid in bound} == {home_text}

    (conmon,) = conmon_pids(cid)
    assert cpus_allowed(conmon) == every_text
    assert cpus_allowed_in(_in_container(env, cid, "/proc/1/status")) == every_text  # the container's own process
    assert cpus_allowed_in(_in_container(env, cid, "/proc/self/status")) == every_text  # an exec'd one
    hosts = unpack_hosts(daemon)
    assert hosts, "no unpack host among the daemon's children"
    assert [cpus_allowed(pid) for pid in hosts] == [every_text] * len(hosts)


def test_cpus_the_daemon_may_not_use_are_refused_at_its_start_naming_the_key(
    make_daemon: Callable[..., Daemon],
) -> None:
    outside = max(affinity.process_cpus()) + 1  # a CPU number the kernel takes, but not one of this machine's
    d = make_daemon(f"offload_cpus: '{outside}'\n", start=False)
    done = run_cli(*d.argv()[3:])
    assert done.returncode == 2
    assert f"key 'offload_cpus': CPU {outside} is not one of the daemon's CPUs" in done.stderr


# A bridge that first writes down the CPUs it may run on: a CNI plugin is started by the daemon too.
MASK_PLUGIN = textwrap.dedent(
    """\
    #!/bin/sh
    grep Cpus_allowed_list /proc/self/status >> {record}
    exec /usr/lib/cni/bridge
    """
)


def test_a_cni_plugin_the_daemon_starts_is_not_bound(make_daemon: Callable[..., Daemon]) -> None:
    every = affinity.format_list(two_cpus_or_skip())
    daemon = make_daemon(start=False)
    record = daemon.base / "plugin-cpus"
    add_plugin(daemon, "maskbridge", MASK_PLUGIN.format(record=record))
    net = PodNet.make(daemon)
    net.write([], bridge_type="maskbridge")
    daemon.start()
    try:
        pod = daemon.runtime().RunPodSandbox(pb.RunPodSandboxRequest(config=pod_config()), timeout=60).pod_sandbox_id
        daemon.runtime().StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod), timeout=60)
        seen = record.read_text().splitlines()
        assert len(seen) == 2, seen  # ADD, then DEL
        assert [cpus_allowed_in(line) for line in seen] == [every, every]
    finally:
        remove_all_pods(daemon)
        net.remove()
