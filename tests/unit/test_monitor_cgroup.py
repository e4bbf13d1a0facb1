"""Which cgroup hierarchies conmon is moved in."""

from __future__ import annotations

from pathlib import Path

from cri.oci.monitor_cgroup import hierarchy_roots

# A node container's view: name=systemd read-only (systemd tracks units on cgroup2), a cpu hierarchy
# mounted twice, a subtree bind (root not '/'), and an empty tmpfs standing in for an absent controller.
NODE_MOUNTINFO = (
    "85 84 0:47 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n"
    "86 85 0:29 / /sys/fs/cgroup/cpu rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,cpu\n"
    "87 85 0:29 / /mnt/cpu-again rw,relatime - cgroup cgroup rw,cpu\n"
    "89 85 0:32 / /sys/fs/cgroup/memory rw,nosuid,nodev,noexec,relatime - cgroup cgroup rw,memory\n"
    "90 85 0:33 /docker/abc /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices\n"
    "94 85 0:37 / /sys/fs/cgroup/systemd ro,nosuid,nodev,noexec,relatime - cgroup systemd rw,name=systemd\n"
    "66 85 0:56 / /sys/fs/cgroup/hugetlb ro,relatime - tmpfs absent-hugetlb ro,size=4k,mode=555\n"
    "68 85 0:38 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw\n"
)


def test_writable_hierarchy_roots_once_each():
    assert hierarchy_roots(NODE_MOUNTINFO) == [
        Path("/sys/fs/cgroup/cpu"),
        Path("/sys/fs/cgroup/memory"),
        Path("/sys/fs/cgroup/unified"),
    ]
