"""criopy on a node built like a kind node: deploy/kind/Dockerfile over a Debian base with systemd, installed by
deploy/install.sh from wheels, run nested in docker with systemd as PID 1 and criopy as its unit, and driven
from the host through the node's socket with the suite's own CRI client (root, docker, debootstrap).

Every test checks that the host's cgroup mounts and the hierarchy of each controller are what they were: a
node once given the host's /sys/fs/cgroup broke every container on the host.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import Iterator

import grpc
import pytest

from api.runtime.v1 import api_pb2 as pb
from api.runtime.v1 import api_pb2_grpc
from tests.e2e.pods import pod_config
from tests.streamclients import remotecommand as rc
from tests.support import node_image as ni
from tests.support.system import wait_until

pytestmark = pytest.mark.root

Pod = tuple[str, pb.PodSandboxConfig]
INSTALLED = "/opt/criopy /usr/local/bin/criopy /usr/local/lib/systemd/system /etc/systemd/system /etc/criopy "
INSTALLED += "/etc/crictl.yaml /etc/cni/net.d /var/lib/dpkg/status"
PAGE = "served-from-a-pod-on-the-node"
FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=2).read().decode(), end='')"
HTTP_GET = b"GET /index.html HTTP/1.0\r\nHost: pod\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def host_cgroups() -> Iterator[ni.CgroupView]:
    """The host's cgroup view before anything here ran; compared again once every node and image is gone."""
    before = ni.host_cgroup_view()
    yield before
    assert ni.host_cgroup_view() == before


@pytest.fixture(scope="module")
def dockerd(host_cgroups: ni.CgroupView) -> Iterator[ni.Dockerd]:
    if os.geteuid() != 0:
        pytest.skip("node tests run docker and systemd nested in it as root (CI runs as root)")
    d = ni.Dockerd.ensure()
    ni.remove_strays()
    yield d
    ni.remove_strays()
    d.stop()


@pytest.fixture(scope="module")
def image(dockerd: ni.Dockerd) -> Iterator[ni.NodeImage]:
    with ni.node_image(sys.executable) as built:
        yield built


@pytest.fixture(scope="module")
def node(image: ni.NodeImage) -> Iterator[ni.Node]:
    n = ni.start_node(image.tag)
    try:
        # The streaming server must listen on the node's address for exec and port-forward from the host.
        n.exec("sh", "-c", f"printf 'streaming:\\n  address: {n.ip}\\n' > /etc/criopy/criopy.d/50-node-address.yaml")
        n.exec("systemctl", "restart", "criopy")
        n.booted_at = time.monotonic()
        n.wait_ready()
        yield n
    finally:
        n.remove()


@pytest.fixture(scope="module")
def busybox_tag(dockerd: ni.Dockerd) -> Iterator[str]:
    """The tests' busybox image, built by docker (removed after the module)."""
    tag = f"criopy-test/busybox:{secrets.token_hex(4)}"
    ni.build_busybox_image(tag, secrets.token_hex(4))
    try:
        yield tag
    finally:
        ni.sh("docker", "image", "rm", "--force", tag, check=False)


@pytest.fixture(scope="module")
def busybox(node: ni.Node, busybox_tag: str) -> str:
    """That image imported into the node from stdin (`docker save IMG | docker exec -i NODE criopy images import -`)."""
    node.exec("criopy", "images", "import", "-", input=ni.docker_save(busybox_tag))
    return f"docker.io/{busybox_tag}"


@pytest.fixture
def cri(
    node: ni.Node, host_cgroups: ni.CgroupView
) -> Iterator[tuple[api_pb2_grpc.RuntimeServiceStub, api_pb2_grpc.ImageServiceStub]]:
    """The suite's CRI client on the node's socket; every pod it made is removed after the test."""
    channel = grpc.insecure_channel(f"unix://{node.socket}")
    rt, images = api_pb2_grpc.RuntimeServiceStub(channel), api_pb2_grpc.ImageServiceStub(channel)
    try:
        yield rt, images
    finally:
        for pod in rt.ListPodSandbox(pb.ListPodSandboxRequest(), timeout=30).items:
            rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
            rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod.id), timeout=60)
        channel.close()
        assert ni.host_cgroup_view() == host_cgroups


def _run_pod(rt, image: str, command: list[str], name: str = "c") -> tuple[Pod, str]:
    config = pod_config(log_directory=f"/var/log/pods/{secrets.token_hex(4)}")
    pod_id = rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    container = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name),
        image=pb.ImageSpec(image=image),
        command=command,
        log_path=f"{name}.log",
    )
    cid = rt.CreateContainer(
        pb.CreateContainerRequest(pod_sandbox_id=pod_id, config=container, sandbox_config=config), timeout=60
    ).container_id
    rt.StartContainer(pb.StartContainerRequest(container_id=cid), timeout=30)
    return (pod_id, config), cid


def _web_server(rt, image: str) -> tuple[Pod, str]:
    script = f"mkdir -p /www && echo {PAGE} > /www/index.html && exec httpd -f -p 8080 -h /www"
    return _run_pod(rt, image, ["sh", "-c", script])


def _wait(what: str, check, timeout: float = 20):
    return wait_until(check, timeout, what, interval=0.2)


def _container_pid(rt, cid: str) -> int:
    info = json.loads(
        rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid, verbose=True), timeout=10).info["info"]
    )
    return int(info["pid"])


def test_the_install_script_run_again_changes_nothing(node: ni.Node, image: ni.NodeImage, host_cgroups) -> None:
    # The image build ran deploy/install.sh --system once; run it again on the booted node, from the same wheels.
    for source, target in ((image.wheels, "wheels"), (ni.REPO / "conf", "conf"), (ni.REPO / "deploy", "deploy")):
        node.copy_in(source, f"/tmp/reinstall/{target}")
    snapshot = f"find {INSTALLED} -printf '%p %y %m %s %T@ %l\\n' | sort; md5sum /var/lib/dpkg/status"
    before = node.exec("sh", "-c", snapshot).stdout
    main_pid = node.exec("systemctl", "show", "-p", "MainPID", "criopy").stdout

    run = node.exec("bash", "/tmp/reinstall/deploy/install.sh", "--system", "--wheels", "/tmp/reinstall/wheels")

    assert run.stdout == "" and run.stderr == "", (run.stdout, run.stderr)
    assert node.exec("sh", "-c", snapshot).stdout == before
    assert node.exec("systemctl", "show", "-p", "MainPID", "criopy").stdout == main_pid
    assert node.exec("systemctl", "is-active", "criopy").stdout.strip() == "active"
    assert node.exec("systemctl", "is-enabled", "criopy").stdout.strip() == "enabled"
    status = node.exec("criopy", "status").stdout
    assert "RuntimeReady: true" in status and "NetworkReady: true" in status
    node.exec("rm", "-rf", "/tmp/reinstall")
    assert ni.host_cgroup_view() == host_cgroups


def test_the_images_the_base_held_in_containerd_moved_into_criopy_and_containerd_is_off(
    node: ni.Node, image: ni.NodeImage, cri
) -> None:
    _, images = cri
    listed = {img.id: list(img.repo_tags) for img in images.ListImages(pb.ListImagesRequest(), timeout=10).images}
    assert listed.get(image.preloaded_id) == [f"docker.io/{image.preloaded}"], listed
    assert node.exec("systemctl", "is-enabled", "containerd", check=False).stdout.strip() == "masked"
    assert node.exec("systemctl", "is-active", "containerd", check=False).stdout.strip() == "inactive"
    assert node.exec("test", "-e", "/var/lib/containerd", check=False).returncode == 1
    assert node.exec("cat", "/etc/crictl.yaml").stdout == (ni.REPO / "conf" / "crictl.yaml").read_text()


def test_a_pod_on_the_node_bridge_serves_its_ip_logs_exec_and_port_forward(node: ni.Node, busybox: str, cri) -> None:
    rt, _ = cri
    pod, cid = _web_server(rt, busybox)
    ip = rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod[0]), timeout=10).status.network.ip
    assert ip.startswith("10.85."), ip  # the default bridge network deploy/install.sh put in /etc/cni/net.d

    def answer() -> str:
        # The node's python, not busybox wget: Debian's static busybox wget crashes on these machines.
        got = node.exec("python3", "-c", FETCH, f"http://{ip}:8080/index.html", check=False)
        return got.stdout

    assert _wait("the pod's web server on its IP, from the node", answer).strip() == PAGE

    # The container's CRI log, where the kubelet on the node reads it.
    _, log_cid = _run_pod(rt, busybox, ["sh", "-c", "echo one line to the log"], name="logger")
    log_path = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=log_cid), timeout=10).status.log_path

    def logged() -> str:
        return node.exec("cat", log_path, check=False).stdout

    assert _wait("the container's log line", lambda: "stdout F one line to the log" in logged())

    sync = rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["cat", "/www/index.html"], timeout=10), timeout=30)
    assert (sync.exit_code, sync.stdout.decode().strip()) == (0, PAGE)

    # Exec and port-forward over the streaming server, from the host to the node's address.
    url = rt.Exec(
        pb.ExecRequest(container_id=cid, cmd=["sh", "-c", "echo $((6 * 7)); exit 3"], stdout=True), timeout=10
    ).url
    assert url.startswith(f"http://{node.ip}:"), url
    result = asyncio.run(asyncio.wait_for(rc.exec_spdy(url, stderr=False), 60))
    assert (result.stdout, result.exit_code) == (b"42\n", 3)

    forward = rt.PortForward(pb.PortForwardRequest(pod_sandbox_id=pod[0], port=[8080]), timeout=10).url

    async def fetch() -> bytes:
        session = await rc.portforward_spdy(forward)
        try:
            data, _ = await session.open(8080)
            return await rc.http_over(data, HTTP_GET)
        finally:
            await session.close()

    response = asyncio.run(asyncio.wait_for(fetch(), 60))
    assert response.split(b"\r\n")[0].endswith(b"200 OK") and response.rstrip().endswith(PAGE.encode()), response


def test_systemctl_restart_criopy_keeps_containers_running_with_their_pids(node: ni.Node, busybox: str, cri) -> None:
    rt, _ = cri
    _, cid = _run_pod(rt, busybox, ["sleep", "3600"])
    pid = _container_pid(rt, cid)
    conmon = node.exec("pgrep", "-f", f"conmon .*-c {cid}").stdout.split()
    assert len(conmon) == 1, conmon
    # conmon is out of criopy.service's cgroup: what systemd does to the unit does not reach it.
    # (systemd keeps the node's name=systemd hierarchy read-only and tracks units on cgroup2.)
    conmon_cgroups = dict(
        line.split(":", 2)[1:] for line in node.exec("cat", f"/proc/{conmon[0]}/cgroup").stdout.split()
    )
    daemon = node.exec("sh", "-c", "cat /proc/$(systemctl show -p MainPID --value criopy)/cgroup").stdout
    assert "0::/system.slice/criopy.service" in daemon.split(), daemon
    assert conmon_cgroups[""] == conmon_cgroups["memory"] == conmon_cgroups["pids"] == "/criopy-conmon", conmon_cgroups
    daemon_before = node.exec("systemctl", "show", "-p", "MainPID", "criopy").stdout

    node.exec("systemctl", "restart", "criopy")
    node.booted_at = time.monotonic()
    node.wait_ready()

    assert node.exec("systemctl", "show", "-p", "MainPID", "criopy").stdout != daemon_before
    status = rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=10).status
    assert status.state == pb.CONTAINER_RUNNING
    assert _container_pid(rt, cid) == pid
    assert node.exec("pgrep", "-f", f"conmon .*-c {cid}").stdout.split() == conmon
    assert node.exec("cat", f"/proc/{pid}/cmdline").stdout.split("\0")[:2] == ["sleep", "3600"]
    # And the restarted daemon still drives it.
    sync = rt.ExecSync(pb.ExecSyncRequest(container_id=cid, cmd=["echo", "still here"], timeout=10), timeout=30)
    assert sync.stdout == b"still here\n"


def test_images_imported_from_file_and_stdin_run_without_a_registry_and_export_round_trips(node: ni.Node, cri) -> None:
    rt, images = cri
    tag = f"criopy-test/imported:{secrets.token_hex(4)}"
    ref = f"docker.io/{tag}"
    docker_id = ni.build_busybox_image(tag, secrets.token_hex(4))
    archive = f"/tmp/{secrets.token_hex(4)}.tar"
    try:
        # From a file in the node.
        node.exec("sh", "-c", f"cat > {archive}", input=ni.docker_save(tag))
        node.exec("criopy", "images", "import", archive)
        assert (
            images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), timeout=10).image.id == docker_id
        )
        images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), timeout=30)
        assert not images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), timeout=10).HasField(
            "image"
        )

        # From standard input, as `docker save IMG | docker exec -i NODE criopy images import -`.
        node.exec("criopy", "images", "import", "-", input=ni.docker_save(tag))
        listed = {img.id: list(img.repo_tags) for img in images.ListImages(pb.ListImagesRequest(), timeout=10).images}
        assert listed.get(docker_id) == [ref], listed

        # The node reaches no registry for it: the container runs from the imported layers.
        pod, cid = _run_pod(rt, ref, ["sh", "-c", "echo from an imported image"])
        status = _wait(
            "the container's exit",
            lambda: (
                (s := rt.ContainerStatus(pb.ContainerStatusRequest(container_id=cid), timeout=10).status).state
                == pb.CONTAINER_EXITED
                and s
            ),
        )
        assert status.exit_code == 0
        assert "stdout F from an imported image" in node.exec("cat", status.log_path).stdout
        rt.StopPodSandbox(pb.StopPodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)
        rt.RemovePodSandbox(pb.RemovePodSandboxRequest(pod_sandbox_id=pod[0]), timeout=60)

        # Export, remove, import the export again: the same image ID.
        node.exec("criopy", "images", "export", ref, "-o", f"{archive}.export")
        images.RemoveImage(pb.RemoveImageRequest(image=pb.ImageSpec(image=ref)), timeout=30)
        node.exec("criopy", "images", "import", f"{archive}.export")
        again = images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=ref)), timeout=10).image
        assert again.id == docker_id and list(again.repo_tags) == [ref]
    finally:
        node.exec("rm", "-f", archive, f"{archive}.export", check=False)
        ni.sh("docker", "image", "rm", "--force", tag, check=False)


def test_uninstall_keeps_data_edits_and_running_containers_and_purge_waits_for_them(
    image: ni.NodeImage, busybox_tag: str, host_cgroups
) -> None:
    node = ni.start_node(image.tag)  # a node of its own: this one loses its criopy
    try:
        node.exec("criopy", "images", "import", "-", input=ni.docker_save(busybox_tag))
        channel = grpc.insecure_channel(f"unix://{node.socket}")
        _, cid = _run_pod(api_pb2_grpc.RuntimeServiceStub(channel), f"docker.io/{busybox_tag}", ["sleep", "3600"])
        pid = _container_pid(api_pb2_grpc.RuntimeServiceStub(channel), cid)
        channel.close()
        node.exec("sh", "-c", "echo '# an operator was here' >> /etc/criopy/criopy.yaml")
        for source, target in ((ni.REPO / "conf", "conf"), (ni.REPO / "deploy", "deploy")):
            node.copy_in(source, f"/tmp/uninstall/{target}")
        uninstall = ("bash", "/tmp/uninstall/deploy/install.sh", "--uninstall")

        node.exec(*uninstall)

        assert node.exec("systemctl", "is-active", "criopy", check=False).stdout.strip() == "inactive"
        gone = "/opt/criopy /usr/local/bin/criopy /usr/local/lib/systemd/system/criopy.service /etc/crictl.yaml"
        gone += " /etc/cni/net.d/10-criopy-bridge.conflist /etc/systemd/system/multi-user.target.wants/criopy.service"
        assert node.exec("sh", "-c", f"ls -d {gone} 2>/dev/null", check=False).stdout == ""
        assert "# an operator was here" in node.exec("cat", "/etc/criopy/criopy.yaml").stdout
        assert node.exec("ls", "/var/lib/criopy").stdout.split(), "the containers' data went without --purge"
        assert node.exec("cat", f"/proc/{pid}/cmdline").stdout.split("\0")[:2] == ["sleep", "3600"]

        refused = node.exec(*uninstall, "--purge", check=False)
        assert refused.returncode != 0 and "containers are still running" in refused.stderr, refused
        assert node.exec("ls", "/var/lib/criopy").stdout.split()

        node.exec("sh", "-c", f"kill -9 {pid} $(pgrep -x conmon); while pgrep -x conmon >/dev/null; do sleep 0.1; done")
        node.exec(*uninstall, "--purge")
        assert node.exec("ls", "-A", "/var/lib/criopy").stdout == ""  # the volume stays mounted, emptied
        assert (
            node.exec("sh", "-c", "findmnt -rn -o TARGET | grep -c /var/lib/criopy/", check=False).stdout.strip() == "0"
        )
    finally:
        node.remove()
    assert ni.host_cgroup_view() == host_cgroups
