"""A criopy node in docker, built the way deploy/kind/ builds one, for tests/e2e/test_node.py and bench/.

kindest/node cannot be fetched here, so the base is Debian bookworm made with debootstrap (systemd, and the
OS packages deploy/install.sh asks for, so the install inside the image stays offline), cached as a tarball
under /var/cache/criopy-test and `docker import`ed. The node image is then deploy/kind/build.sh with that
base and wheels built here: the same Dockerfile, the same install script that ship.

A node runs as kind runs one, but without --privileged (these machines withhold CAP_SYS_RESOURCE, which
--privileged needs): every other capability, seccomp and AppArmor unconfined, all devices, a private
cgroup namespace, tmpfs /run and /tmp, criopy's storage on a volume (overlay cannot sit on the node's
overlay root), and /run/criopy bind-mounted out so the host's CRI client reaches its socket. The host's
/sys/fs/cgroup is never given to a node; tests/support/node_entrypoint.sh does what kind's entrypoint does
to the node's own cgroup view before systemd starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = Path("/var/cache/criopy-test")
ENTRYPOINT = Path(__file__).resolve().parent / "node_entrypoint.sh"
DOCKERD_PIDFILE = Path("/var/run/criopy-test-dockerd.pid")
DOCKERD_LOG = Path("/var/log/criopy-test-dockerd.log")
MIRROR = "http://deb.debian.org/debian"
# systemd as PID 1, and what deploy/install.sh --system installs, so that it finds them all installed.
NODE_PACKAGES = (
    "systemd,systemd-sysv,dbus,iproute2,ca-certificates,procps,busybox-static,"
    "runc,crun,conmon,containernetworking-plugins,iptables,catatonit,golang-github-containers-common,python3-venv,"
    # As in kindest/node: containerd enabled, with images preloaded (see preload_into_containerd).
    "containerd"
)
# The base as kind ships it: containerd holding images in its k8s.io namespace, which the node image's build
# (deploy/kind/switch-runtime.sh) must move into criopy. containerd runs for this step only.
PRELOAD_DOCKERFILE = """\
FROM {base}
COPY preloaded.tar /tmp/preload/
# kind ships its containerd unit as a file in /etc/systemd/system, enabled, and a crictl config for it.
RUN cp /lib/systemd/system/containerd.service /etc/systemd/system/containerd.service && \\
    systemctl enable containerd.service && \\
    echo "runtime-endpoint: unix:///run/containerd/containerd.sock" > /etc/crictl.yaml
RUN set -eu; containerd >/tmp/preload/containerd.log 2>&1 & pid=$!; i=0; \\
    until ctr version >/dev/null 2>&1; do \\
      i=$((i + 1)); [ $i -lt 100 ] || {{ cat /tmp/preload/containerd.log; exit 1; }}; sleep 0.1; \\
    done; \\
    ctr -n k8s.io images import --no-unpack /tmp/preload/preloaded.tar; \\
    kill $pid; wait $pid || true; rm -rf /tmp/preload
"""
LABEL = "criopy-test-node"  # on every container, image and volume made here, so a later run can find strays


def sh(
    *argv: str, timeout: float = 120, check: bool = True, input: bytes | None = None
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=input, capture_output=True, timeout=timeout, check=False)
    out = subprocess.CompletedProcess(
        argv, proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace")
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} exited {proc.returncode}:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return out


# ---- docker --------------------------------------------------------------------------------------------------


def docker_ready() -> bool:
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30, check=False).returncode == 0


@dataclass
class Dockerd:
    """The docker daemon the node tests use; started here (a plain process: systemd may not run on these
    machines) when none answers, and stopped again by whoever started it."""

    proc: subprocess.Popen[bytes] | None = None  # set when this process started it
    made_bridge: bool = False  # docker0 was not there before

    @classmethod
    def ensure(cls, timeout: float = 60) -> Dockerd:
        if shutil.which("dockerd") is None:
            raise AssertionError("dockerd is missing: run `make test` (deploy/install.sh --test installs docker.io)")
        if docker_ready():
            return cls()
        made_bridge = not Path("/sys/class/net/docker0").exists()
        with DOCKERD_LOG.open("ab") as log:
            # --iptables=false: the nodes need no way out, and the host's firewall (the FORWARD policy docker
            # would set, its chains, NAT) stays as the other tests and the machine had it.
            proc = subprocess.Popen(
                ["dockerd", "--pidfile", str(DOCKERD_PIDFILE), "--iptables=false", "--ip-masq=false"],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        started = cls(proc=proc, made_bridge=made_bridge)
        deadline = time.monotonic() + timeout
        while not docker_ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                started.stop()
                raise AssertionError(f"dockerd did not answer in {timeout:g}s; see {DOCKERD_LOG}")
            time.sleep(0.5)
        return started

    def stop(self, timeout: float = 60) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self.made_bridge:
            sh("ip", "link", "del", "docker0", check=False)


def remove_strays() -> None:
    """Containers, volumes and untagged images an earlier, killed run left (each carries the label)."""
    for kind in ("container", "volume"):
        listed = sh("docker", kind, "ls", "-aq" if kind == "container" else "-q", "--filter", f"label={LABEL}")
        ids = listed.stdout.split()
        if ids:
            sh("docker", kind, "rm", "-f" if kind == "container" else "--force", *ids, check=False)
    sh("docker", "image", "prune", "--force", "--filter", f"label={LABEL}", check=False)


# ---- the base and the image ----------------------------------------------------------------------------------


def base_tarball() -> Path:
    """Debian bookworm minbase with systemd and the node packages, made once with debootstrap."""
    key = hashlib.sha256(f"bookworm {NODE_PACKAGES} {MIRROR}".encode()).hexdigest()[:12]
    tarball = CACHE_DIR / f"node-base-bookworm-{key}.tar"
    if tarball.exists():
        return tarball
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="debootstrap-", dir=CACHE_DIR))
    try:
        root = work / "root"
        sh(
            "debootstrap",
            "--variant=minbase",
            f"--include={NODE_PACKAGES}",
            "bookworm",
            str(root),
            MIRROR,
            timeout=1200,
        )
        # The downloaded .debs and apt lists: a third of the tree, and nothing in the node reads them.
        for leftover in (root / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        (root / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
        partial = work / "base.tar"
        sh("tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), ".", timeout=600)
        partial.rename(tarball)  # only a whole tarball ever has the cached name
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return tarball


def import_base(tarball: Path, tag: str) -> None:
    sh(
        "docker",
        "import",
        "--change",
        'CMD ["/sbin/init"]',
        "--change",
        f"LABEL {LABEL}=1",
        str(tarball),
        tag,
        timeout=600,
    )


def build_wheels(dest: Path, python: str, source: Path = REPO) -> list[Path]:
    """criopy's wheel from `source` (this checkout), and its dependencies' wheels (cached: only a new
    requirement needs PyPI)."""
    cache = CACHE_DIR / "wheels"
    cache.mkdir(parents=True, exist_ok=True)
    dest.mkdir(parents=True, exist_ok=True)
    pip = (python, "-m", "pip")
    quiet = ("-q", "--disable-pip-version-check")
    sh(*pip, "wheel", *quiet, "--no-deps", "--no-build-isolation", "--wheel-dir", str(dest), str(source), timeout=300)
    (criopy_wheel,) = dest.glob("criopy-*.whl")
    # pip copies the wheel it resolves into the cache too; a cached criopy of the same version would then
    # stand in for this one, with the requirements it had (a new dependency went missing in the image).
    _drop_criopy_wheels(cache)
    offline = sh(*pip, "wheel", *quiet, "--no-index", "--find-links", str(cache), "--wheel-dir", str(cache),
                 str(criopy_wheel), timeout=300, check=False)  # fmt: skip
    if offline.returncode != 0:
        sh(*pip, "wheel", *quiet, "--find-links", str(cache), "--wheel-dir", str(cache), str(criopy_wheel), timeout=600)
    _drop_criopy_wheels(cache)
    for wheel in cache.glob("*.whl"):
        shutil.copy2(wheel, dest / wheel.name)
    return sorted(dest.glob("*.whl"))


def _drop_criopy_wheels(cache: Path) -> None:
    for wheel in cache.glob("criopy-*.whl"):
        wheel.unlink()


def preload_into_containerd(base: str, tag: str, image: str) -> None:
    """`tag`: `base` with docker image `image` in containerd's store, as kindest/node carries its images."""
    with tempfile.TemporaryDirectory(prefix="criopy-preload-") as context:
        (Path(context) / "preloaded.tar").write_bytes(docker_save(image))
        (Path(context) / "Dockerfile").write_text(PRELOAD_DOCKERFILE.format(base=base))
        sh("docker", "build", "--quiet", "--tag", tag, context, timeout=300)


def build_node_image(base: str, tag: str, wheels: Path) -> None:
    sh(str(REPO / "deploy/kind/build.sh"), "--base", base, "--tag", tag, "--wheels", str(wheels), timeout=900)


def image_size(tag: str) -> int:
    return int(sh("docker", "image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


@dataclass
class NodeImage:
    tag: str
    wheels: Path  # what the image was installed from, kept for a second run of the install script
    preloaded: str  # the image the base held in containerd's store, as docker names it
    preloaded_id: str = ""
    build_seconds: float = 0.0  # deploy/kind/build.sh
    base_seconds: float = 0.0  # debootstrap (when not cached), docker import, the containerd preload
    made: list[str] = field(default_factory=list)  # every image tag made on the way

    def remove(self) -> None:
        sh("docker", "image", "rm", "--force", *reversed(self.made), check=False)


@contextlib.contextmanager
def node_image(python: str, source: Path = REPO) -> Iterator[NodeImage]:
    """The node image with criopy from `source` over a kind-like base (containerd with a preloaded image),
    built for one test module and removed after it (the base tarball and dependencies' wheels stay cached)."""
    suffix = secrets.token_hex(4)
    plain, base, tag = (f"criopy-test/{name}:{suffix}" for name in ("node-base", "node-base-preloaded", "node"))
    with tempfile.TemporaryDirectory(prefix="criopy-wheels-") as wheels:
        image = NodeImage(tag, Path(wheels), preloaded=f"criopy-test/preloaded:{suffix}")
        try:
            started = time.monotonic()
            image.made.append(plain)
            import_base(base_tarball(), plain)
            image.made.append(image.preloaded)
            image.preloaded_id = build_busybox_image(image.preloaded, suffix)
            image.made.append(base)
            preload_into_containerd(plain, base, image.preloaded)
            image.base_seconds = time.monotonic() - started
            build_wheels(image.wheels, python, source)
            started = time.monotonic()
            image.made.append(tag)
            build_node_image(base, tag, image.wheels)
            image.build_seconds = time.monotonic() - started
            yield image
        finally:
            image.remove()


# ---- a running node -----------------------------------------------------------------------------------------


@dataclass
class Node:
    name: str
    volume: str
    run_dir: Path  # the node's /run/criopy, on the host
    ip: str = ""
    booted_at: float = 0.0
    ready_seconds: float = 0.0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def socket(self) -> str:
        return str(self.run_dir / "criopy.sock")

    def exec(self, *argv: str, input: bytes | None = None, timeout: float = 120, check: bool = True):
        return sh("docker", "exec", *(["-i"] if input is not None else []), self.name, *argv,
                  input=input, timeout=timeout, check=check)  # fmt: skip

    def copy_in(self, source: Path, target: str) -> None:
        """A host directory's contents into the node (by tar: `docker cp` cannot write into the node's tmpfs)."""
        archive = subprocess.run(["tar", "-C", str(source), "-c", "."], capture_output=True, timeout=120, check=True)
        self.exec("sh", "-c", f'mkdir -p "{target}" && tar -C "{target}" -x', input=archive.stdout)

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds from `docker run` to criopy active under systemd and `criopy status` ready."""
        deadline = time.monotonic() + timeout
        while True:
            active = self.exec("systemctl", "is-active", "criopy", check=False).stdout.strip()
            if active == "active":
                status = self.exec("criopy", "status", check=False)
                if status.returncode == 0 and Path(self.socket).exists():
                    return time.monotonic() - self.booted_at
            if time.monotonic() > deadline:
                journal = self.exec("journalctl", "-u", "criopy", "--no-pager", "-n", "60", check=False).stdout
                raise AssertionError(f"criopy on node {self.name} not ready after {timeout:g}s ({active}):\n{journal}")
            time.sleep(0.2)

    def remove(self) -> None:
        sh("docker", "rm", "--force", "--volumes", self.name, check=False, timeout=120)
        sh("docker", "volume", "rm", "--force", self.volume, check=False)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def start_node(image: str) -> Node:
    suffix = secrets.token_hex(4)
    node = Node(
        name=f"criopy-test-node-{suffix}",
        volume=f"criopy-test-node-{suffix}",
        run_dir=Path(tempfile.mkdtemp(prefix="criopy-node-")),
    )
    sh("docker", "volume", "create", "--label", f"{LABEL}=1", node.volume)
    node.booted_at = time.monotonic()
    sh(
        "docker", "run", "--detach", "--name", node.name, "--hostname", node.name, "--label", f"{LABEL}=1",
        "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
        "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined",
        "--device-cgroup-rule", "a *:* rwm", "--cgroupns", "private",
        "--tmpfs", "/run", "--tmpfs", "/tmp",
        "--volume", f"{node.volume}:/var/lib/criopy",
        "--volume", f"{node.run_dir}:/run/criopy",
        "--volume", f"{ENTRYPOINT}:/criopy-node-entrypoint:ro", "--entrypoint", "/criopy-node-entrypoint",
        "--stop-signal", "SIGRTMIN+3",
        image,
    )  # fmt: skip
    try:
        inspect = json.loads(sh("docker", "inspect", node.name).stdout)[0]
        node.ip = inspect["NetworkSettings"]["IPAddress"]
        node.ready_seconds = node.wait_ready()
    except BaseException:
        node.remove()
        raise
    return node


# ---- the host's cgroup view ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CgroupView:
    mounts: tuple[str, ...]  # mountinfo lines at or below /sys/fs/cgroup
    controllers: tuple[tuple[str, str, str], ...]  # /proc/cgroups: name, hierarchy, enabled


def host_cgroup_view() -> CgroupView:
    """What a node must leave alone: the host's cgroup mounts and which hierarchy holds each controller."""
    mounts = tuple(
        line
        for line in Path("/proc/self/mountinfo").read_text().splitlines()
        if line.split()[4] == "/sys/fs/cgroup" or line.split()[4].startswith("/sys/fs/cgroup/")
    )
    controllers = tuple(
        (name, hierarchy, enabled)
        for name, hierarchy, _, enabled in (line.split() for line in Path("/proc/cgroups").read_text().splitlines()[1:])
    )
    return CgroupView(mounts, controllers)


# ---- images for the node ------------------------------------------------------------------------------------


def build_busybox_image(tag: str, marker: str) -> str:
    """A docker image of the host's static busybox (a shell, httpd, wget), built by docker; returns its ID.
    `marker` goes into a label, so each build is an image of its own."""
    with tempfile.TemporaryDirectory(prefix="criopy-bb-") as context:
        shutil.copy2("/bin/busybox", Path(context) / "busybox")
        (Path(context) / "Dockerfile").write_text(
            "FROM scratch\n"
            "COPY busybox /bin/busybox\n"
            'RUN ["/bin/busybox", "--install", "-s", "/bin"]\n'
            f"LABEL {LABEL}={marker}\n"
        )
        sh("docker", "build", "--quiet", "--tag", tag, context, timeout=300)
    return sh("docker", "image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()


def docker_save(*refs: str) -> bytes:
    return subprocess.run(["docker", "save", *refs], capture_output=True, timeout=300, check=True).stdout
