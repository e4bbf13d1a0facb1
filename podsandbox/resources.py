"""A pod's own resources, as UpdatePodSandboxResources records them (in-place resize, KEP-1287 and KEP-2837).

The kubelet calls UpdatePodSandboxResources when it resizes a running pod,
with the pod-level limits (`resources`) and the RuntimeClass `overhead`, each
a CRI LinuxContainerResources. criopy records them with the sandbox and
reports them in PodSandboxStatus's verbose info; it applies nothing to the
host, for the same reason containerd and cri-o do not (they only hand the
update to NRI plugins): criopy owns no pod-level cgroup. A pod's containers go
under `cgroup_parent`, which is either

- the kubelet's pod cgroup (`/kubepods/<qos>/pod<uid>`, `kubepods-...slice`):
  the kubelet made it and writes its limits itself, before it grows and after
  it shrinks the containers' ones; or
- without one, criopy's default parent (`/criopy`, `criopy.slice`), which is
  shared by every pod of the node: one pod's limits there would bind them all.

Neither is created by criopy (runc makes missing parents of a container's
cgroup), so a write there would be a write to someone else's cgroup.

The values are plain ints, strings and dicts so the sandbox row stores them
as they are; a LinuxContainerResources becomes a `Limits` dict whose keys are
the CRI field names, and a message the request did not carry stays None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict


class Limits(TypedDict):
    """One CRI LinuxContainerResources, field by field (hugepage limits by page size)."""

    cpu_period: int
    cpu_quota: int
    cpu_shares: int
    memory_limit_in_bytes: int
    memory_swap_limit_in_bytes: int
    oom_score_adj: int
    cpuset_cpus: str
    cpuset_mems: str
    hugepage_limits: dict[str, int]
    unified: dict[str, str]


@dataclass(frozen=True)
class PodResources:
    """What the last UpdatePodSandboxResources said: the pod's limits and its overhead, None where not sent."""

    resources: Limits | None = None
    overhead: Limits | None = None


def log_fields(pod: PodResources) -> dict[str, int | str]:
    """The figures worth a log line: those that are set, overhead ones prefixed `overhead_`."""
    out: dict[str, int | str] = {}
    for prefix, limits in (("", pod.resources), ("overhead_", pod.overhead)):
        if limits is None:
            continue
        figures: dict[str, int | str] = {
            "cpu_shares": limits["cpu_shares"],
            "cpu_quota": limits["cpu_quota"],
            "cpu_period": limits["cpu_period"],
            "memory_limit_in_bytes": limits["memory_limit_in_bytes"],
            "cpuset_cpus": limits["cpuset_cpus"],
        }
        out.update({prefix + key: value for key, value in figures.items() if value})
    return out
