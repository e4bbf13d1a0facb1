"""conmon lives outside the daemon's cgroup: a `systemctl restart criopy` (or stop) then never reaches the monitors.

Under systemd the daemon's cgroup is criopy.service's; whatever stays in it is the unit's, and a
KillMode other than `process`, a `systemctl kill` or a memory limit on the unit would take every
container's monitor with it.
"""

from __future__ import annotations

from pathlib import Path

from tests.e2e.containers import Env
from tests.support.system import conmon_pids


def _cgroups(pid: int) -> dict[str, str]:
    """hierarchy (controllers, or '' for cgroup2) -> the process's cgroup path in it."""
    out = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        out[controllers] = path
    return out


def test_conmon_is_moved_out_of_the_daemon_cgroup(env: Env) -> None:
    pod = env.pod()
    cid = env.run(pod, env.container_config(command=["sleep", "3600"]))
    assert env.daemon.proc is not None
    daemon_cgroups = _cgroups(env.daemon.proc.pid)
    (conmon,) = conmon_pids(cid)
    conmon_cgroups = _cgroups(conmon)
    # Every hierarchy this host mounts: the v1 controllers, name=systemd, and cgroup2 ('').
    assert conmon_cgroups.keys() == daemon_cgroups.keys()
    for hierarchy, path in conmon_cgroups.items():
        assert path == "/criopy-conmon", (hierarchy, conmon_cgroups, daemon_cgroups)
