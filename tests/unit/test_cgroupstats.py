from __future__ import annotations

import os
from pathlib import Path

import pytest

from cri.containers import cgroupstats
from cri.containers.cgroupstats import CgroupSample, cgroup_dir, exists, expand_slice, memory_limit, nano_cores, sample

CID = "criopy-" + "ab" * 32
V1_UNLIMITED = "9223372036854771712"
BESTEFFORT = "kubepods.slice/kubepods-besteffort.slice"

V1_MEMORY_STAT = """\
cache 1028096
rss 999
inactive_file 1
pgfault 1
pgmajfault 1
total_cache 1028096
total_rss 1769472
total_inactive_file 626688
total_active_file 401408
total_pgfault 30474
total_pgmajfault 11
"""

V2_MEMORY_STAT = """\
anon 2097152
file 1048576
inactive_file 524288
active_file 524288
pgfault 4000
pgmajfault 7
"""


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def v1_tree(root: Path, rel: str, *, merged_cpu: bool = True) -> None:
    """A fake v1 hybrid root with one cgroup at `rel` in each stats hierarchy."""
    if merged_cpu:  # Debian/systemd style: one "cpu,cpuacct" mount and two symlinks to it
        (root / "cpu,cpuacct").mkdir(parents=True)
        (root / "cpu").symlink_to("cpu,cpuacct")
        (root / "cpuacct").symlink_to("cpu,cpuacct")
    else:
        (root / "cpu").mkdir(parents=True)
        (root / "cpuacct").mkdir(parents=True)
    (root / "unified").mkdir()
    (root / "systemd").mkdir()
    write(root / "cpuacct" / rel / "cpuacct.usage", "5000000000\n")
    mem = root / "memory" / rel
    write(mem / "memory.usage_in_bytes", "2000000\n")
    write(mem / "memory.stat", V1_MEMORY_STAT)
    write(mem / "memory.limit_in_bytes", "3000000\n")
    write(mem / "memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    write(root / "pids" / rel / "pids.current", "3\n")


def v2_tree(root: Path, rel: str) -> None:
    write(root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    cg = root / rel
    write(cg / "cpu.stat", "usage_usec 2500\nuser_usec 2000\nsystem_usec 500\n")
    write(cg / "memory.current", "3145728\n")
    write(cg / "memory.stat", V2_MEMORY_STAT)
    write(cg / "memory.max", "max\n")
    write(cg / "memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n")
    write(cg / "pids.current", "9\n")


@pytest.fixture(autouse=True)
def _fresh_layout_cache():
    cgroupstats._layouts.clear()
    yield
    cgroupstats._layouts.clear()


# -- path forms --


@pytest.mark.parametrize(
    ("path", "rel"),
    [
        (f"/criopy/{CID}", f"criopy/{CID}"),
        (f"/kubepods/podu1/{CID}", f"kubepods/podu1/{CID}"),
        ("/kubepods//podu1/", "kubepods/podu1"),
        ("/", ""),
        ("kubepods/podu1", "kubepods/podu1"),
        (
            "kubepods-besteffort-podu1.slice:criopy:abc",
            f"{BESTEFFORT}/kubepods-besteffort-podu1.slice/criopy-abc.scope",
        ),
        ("system.slice:criopy:abc", "system.slice/criopy-abc.scope"),
        (":criopy:abc", "system.slice/criopy-abc.scope"),
        ("-.slice:criopy:abc", "criopy-abc.scope"),
        ("machine.slice::abc", "machine.slice/abc.scope"),
        ("kubepods.slice:criopy:kubepods-podu2.slice", "kubepods.slice/kubepods-podu2.slice"),
        ("kubepods-burstable.slice", "kubepods.slice/kubepods-burstable.slice"),
    ],
)
def test_cgroup_dir(path: str, rel: str) -> None:
    assert cgroup_dir(path) == rel


BAD_PATHS = ["/../etc", "/a/../../b", "/a/../b", "a--b.slice:p:n", "-a.slice:p:n", "a-.slice:p:n"]
BAD_PATHS += ["notaslice:p:n", ".slice:p:n", "a.slice:p:", "a.slice:p:x/../../..", "a.slice:../..:x"]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_cgroup_dir_rejects(path: str) -> None:
    with pytest.raises(ValueError):
        cgroup_dir(path)


def test_expand_slice() -> None:
    assert expand_slice("a-b-c.slice") == "a.slice/a-b.slice/a-b-c.slice"
    assert expand_slice("-.slice") == ""
    with pytest.raises(ValueError):
        expand_slice("a/b.slice")


# -- v1 --


@pytest.mark.parametrize("merged_cpu", [True, False])
def test_v1_sample(tmp_path: Path, merged_cpu: bool) -> None:
    rel = f"kubepods/podu1/{CID}"
    v1_tree(tmp_path, rel, merged_cpu=merged_cpu)
    s = sample(f"/{rel}", root=tmp_path)
    assert s is not None
    assert s.cpu_usage_ns == 5_000_000_000
    assert s.memory_usage == 2_000_000
    assert s.memory_working_set == 2_000_000 - 626688  # total_inactive_file, not the local figure
    assert s.memory_rss == 1769472
    assert (s.memory_page_faults, s.memory_major_page_faults) == (30474, 11)
    assert s.memory_available == 3_000_000 - s.memory_working_set
    assert s.pids == 3
    assert s.oom_kills == 2
    assert memory_limit(f"/{rel}", root=tmp_path) == 3_000_000


def test_v1_local_stat_keys_when_totals_are_missing(tmp_path: Path) -> None:
    v1_tree(tmp_path, "c")
    write(tmp_path / "memory" / "c" / "memory.stat", "rss 10\ninactive_file 5\npgfault 2\npgmajfault 1\n")
    s = sample("/c", root=tmp_path)
    assert s is not None
    assert (s.memory_rss, s.memory_working_set, s.memory_page_faults, s.memory_major_page_faults) == (
        10,
        2_000_000 - 5,
        2,
        1,
    )


def test_v1_unlimited_and_working_set_floor(tmp_path: Path) -> None:
    v1_tree(tmp_path, "c")
    mem = tmp_path / "memory" / "c"
    write(mem / "memory.limit_in_bytes", V1_UNLIMITED + "\n")
    write(mem / "memory.usage_in_bytes", "100\n")  # less than total_inactive_file: the kernel's figures race
    s = sample("/c", root=tmp_path)
    assert s is not None
    assert s.memory_working_set == 0
    assert s.memory_available is None
    assert memory_limit("/c", root=tmp_path) is None


def test_v1_missing_files_are_none(tmp_path: Path) -> None:
    (tmp_path / "memory" / "c").mkdir(parents=True)
    (tmp_path / "cpuacct").mkdir()
    s = sample("/c", root=tmp_path)
    assert s is not None
    assert s.cpu_usage_ns is None
    assert (s.memory_usage, s.memory_working_set, s.memory_rss, s.pids, s.oom_kills) == (None,) * 5


def test_v1_gone_cgroup_is_none(tmp_path: Path) -> None:
    v1_tree(tmp_path, "c")
    assert sample("/other", root=tmp_path) is None
    assert not exists("/other", root=tmp_path)
    assert exists("/c", root=tmp_path)
    assert memory_limit("/other", root=tmp_path) is None


def test_v1_exists_in_any_hierarchy(tmp_path: Path) -> None:
    v1_tree(tmp_path, "c")
    (tmp_path / "systemd" / "only-here").mkdir()
    assert exists("/only-here", root=tmp_path)
    assert sample("/only-here", root=tmp_path) is None  # but there is nothing to read


def test_v1_systemd_form(tmp_path: Path) -> None:
    rel = "kubepods.slice/kubepods-podu1.slice/criopy-abc.scope"
    v1_tree(tmp_path, rel)
    s = sample("kubepods-podu1.slice:criopy:abc", root=tmp_path)
    assert s is not None and s.cpu_usage_ns == 5_000_000_000
    pod = sample("kubepods-podu1.slice", root=tmp_path)  # the pod's parent slice: a directory, no files
    assert pod is not None and pod.cpu_usage_ns is None


# -- v2 --


def test_v2_sample(tmp_path: Path) -> None:
    rel = f"kubepods/podu1/{CID}"
    v2_tree(tmp_path, rel)
    s = sample(f"/{rel}", root=tmp_path)
    assert s is not None
    assert s.cpu_usage_ns == 2_500_000
    assert s.memory_usage == 3145728
    assert s.memory_working_set == 3145728 - 524288
    assert s.memory_rss == 2097152
    assert (s.memory_page_faults, s.memory_major_page_faults) == (4000, 7)
    assert s.memory_available is None  # memory.max is "max"
    assert s.pids == 9
    assert s.oom_kills == 1
    assert memory_limit(f"/{rel}", root=tmp_path) is None


def test_v2_limit_and_available(tmp_path: Path) -> None:
    v2_tree(tmp_path, "c")
    write(tmp_path / "c" / "memory.max", "4194304\n")
    s = sample("/c", root=tmp_path)
    assert s is not None
    assert memory_limit("/c", root=tmp_path) == 4194304
    assert s.memory_available == 4194304 - (3145728 - 524288)


def test_v2_gone_and_exists(tmp_path: Path) -> None:
    v2_tree(tmp_path, "c")
    assert sample("/gone", root=tmp_path) is None
    assert exists("/c", root=tmp_path)
    assert not exists("/gone", root=tmp_path)


def test_v2_without_memory_and_pids_controllers(tmp_path: Path) -> None:
    write(tmp_path / "cgroup.controllers", "")
    write(tmp_path / "c" / "cpu.stat", "usage_usec 7\n")
    s = sample("/c", root=tmp_path)
    assert s is not None
    assert s.cpu_usage_ns == 7000
    assert (s.memory_usage, s.memory_working_set, s.pids, s.oom_kills) == (None, None, None, None)


def test_layout_is_cached_per_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    v1_tree(tmp_path, "c")
    assert sample("/c", root=tmp_path) is not None
    calls: list[object] = []
    real_scandir = os.scandir

    def counting_scandir(path: Path) -> object:
        calls.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", counting_scandir)
    for _ in range(3):
        assert sample("/c", root=tmp_path) is not None
    assert calls == []


def test_missing_root_is_not_cached(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    assert sample("/c", root=root) is None
    assert not exists("/c", root=root)
    v2_tree(root, "c")  # mounted later
    assert sample("/c", root=root) is not None


# -- nano_cores --


def _at(ts: int, cpu: int | None) -> CgroupSample:
    return CgroupSample(ts, cpu, None, None, None, None, None, None, None, None)


def test_nano_cores() -> None:
    assert nano_cores(_at(0, 0), _at(2_000_000_000, 1_000_000_000)) == 500_000_000  # half a core
    assert nano_cores(_at(0, 0), _at(1_000_000_000, 3_000_000_000)) == 3_000_000_000
    assert nano_cores(_at(5, 10), _at(5, 20)) is None  # no interval
    assert nano_cores(_at(0, 10), _at(10, 5)) is None  # counter reset: cgroup recreated
    assert nano_cores(_at(0, None), _at(10, 5)) is None


# -- the real host --


def _own_cgroup(root: Path) -> tuple[str, str] | None:
    """(controller file that must exist, our cgroup path) for this process, from /proc/self/cgroup."""
    v2 = (root / "cgroup.controllers").exists()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if v2 and controllers == "":
            return "memory.current", path
        if not v2 and "memory" in controllers.split(","):
            return "memory.usage_in_bytes", path
    return None


@pytest.mark.skipif(not Path("/sys/fs/cgroup").is_dir(), reason="no cgroup filesystem at /sys/fs/cgroup")
def test_real_host_own_cgroup() -> None:
    root = Path("/sys/fs/cgroup")
    own = _own_cgroup(root)
    if own is None:
        pytest.skip("this process has no memory cgroup in /proc/self/cgroup")
    marker, path = own
    layout_dir = root if marker == "memory.current" else root / "memory"
    if not (layout_dir / path.lstrip("/") / marker).exists():
        pytest.skip(f"{marker} not readable for our cgroup {path} (root cgroup or another cgroup namespace)")
    first = sample(path, root=root)
    assert first is not None
    assert first.memory_usage is not None and first.memory_usage > 0
    assert first.memory_working_set is not None and 0 <= first.memory_working_set <= first.memory_usage
    assert first.memory_rss is not None and first.memory_rss > 0
    assert first.memory_page_faults is not None and first.memory_page_faults > 0
    assert first.oom_kills is not None and first.oom_kills >= 0
    assert exists(path, root=root)
    limit = memory_limit(path, root=root)
    assert limit is None or limit > 0
    sum(range(200_000))  # burn a little CPU between samples
    second = sample(path, root=root)
    assert second is not None and second.timestamp_ns > first.timestamp_ns


@pytest.mark.skipif(not Path("/sys/fs/cgroup").is_dir(), reason="no cgroup filesystem at /sys/fs/cgroup")
def test_real_host_cpu_usage() -> None:
    root = Path("/sys/fs/cgroup")
    v2 = (root / "cgroup.controllers").exists()
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if (v2 and controllers == "") or (not v2 and "cpuacct" in controllers.split(",")):
            break
    else:
        pytest.skip("this process has no cpu accounting cgroup in /proc/self/cgroup")
    first = sample(path, root=root)
    if first is None or first.cpu_usage_ns is None:
        pytest.skip(f"no CPU usage readable for our cgroup {path} (another cgroup namespace?)")
    sum(range(2_000_000))  # our own CPU time goes into this cgroup's counter
    second = sample(path, root=root)
    assert second is not None and second.cpu_usage_ns is not None
    assert second.cpu_usage_ns > first.cpu_usage_ns
    cores = nano_cores(first, second)
    assert cores is not None and cores > 0


@pytest.mark.parametrize(("tree", "kills"), [(v1_tree, 2), (v2_tree, 1)])
def test_oom_kills_reads_the_one_counter_and_none_when_the_cgroup_is_gone(tmp_path: Path, tree, kills) -> None:
    rel = f"kubepods/podu1/{CID}"
    tree(tmp_path, rel)
    assert cgroupstats.oom_kills(f"/{rel}", root=tmp_path) == kills
    assert cgroupstats.oom_kills("/kubepods/podu1/gone", root=tmp_path) is None
