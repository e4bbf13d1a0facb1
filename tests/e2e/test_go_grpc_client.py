"""The daemon driven by grpc-go, the gRPC stack of the kubelet and crictl, instead of the suite's grpcio client.

grpc-go's HTTP/2 client differs from gRPC C-core's in what the server has to get right: a 64 KiB initial
flow-control window that it grows with BDP pings, WINDOW_UPDATE pacing, many streams on one connection,
RST_STREAM on cancel and on its own deadline, status in trailers. Each test checks what a kubelet would
see, and that the daemon still answers (and logged no HTTP/2 failure) afterwards.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable

from api.runtime.v1 import api_pb2 as pb
from tests.e2e.containers import Env
from tests.e2e.goclient import GoClient
from tests.e2e.pods import pod_config
from tests.support.daemon_harness import Daemon


def assert_still_answers(go: GoClient, daemon: Daemon) -> None:
    """A fresh grpc-go connection gets Version, and the daemon logged no HTTP/2 or internal failure."""
    reply = go.call(daemon.socket, "Version", pb.VersionRequest(), pb.VersionResponse)
    assert (reply.code, reply.message) == ("OK", "")
    assert reply.responses[0].runtime_name == "criopy"
    bad = [line for line in daemon.log().splitlines() if "level=error" in line or "http2 connection error" in line]
    assert not bad, "\n".join(bad)


def big_map(prefix: str, total_bytes: int) -> dict[str, str]:
    """Keys and values adding up to about `total_bytes`, random and partly non-ASCII, so that any byte lost,
    reordered or mangled on the way shows."""
    out: dict[str, str] = {}
    size = 0
    while size < total_bytes:
        key = f"{prefix}/k{len(out):04d}-{secrets.token_hex(4)}"
        out[key] = f"{secrets.token_urlsafe(1536)}-é€😀-{len(out)}"
        size += len(key.encode()) + len(out[key].encode())
    return out


def sized_pod_config(env: Env, labels: dict[str, str], annotations: dict[str, str]) -> pb.PodSandboxConfig:
    """A pod request carrying `labels` and `annotations`, in its own cgroup parent that the env removes."""
    config = pod_config(labels=labels)
    config.annotations.update(annotations)
    config.linux.cgroup_parent = f"/criopy-e2e-{secrets.token_hex(4)}"
    env.cgroup_parents.append(config.linux.cgroup_parent)
    return config


def test_version_answers_criopy(daemon: Daemon, go_client: GoClient) -> None:
    reply = go_client.call(daemon.socket, "Version", pb.VersionRequest(version="v1"), pb.VersionResponse)
    assert (reply.code, reply.message) == ("OK", "")
    (version,) = reply.responses
    assert (version.runtime_name, version.runtime_api_version) == ("criopy", "v1")
    assert version.runtime_version


def test_errors_reach_the_go_client_with_their_codes(daemon: Daemon, go_client: GoClient) -> None:
    unknown = secrets.token_hex(32)
    missing = go_client.call(
        daemon.socket, "ContainerStatus", pb.ContainerStatusRequest(container_id=unknown), pb.ContainerStatusResponse
    )
    assert (missing.responses, missing.code) == ([], "NotFound")
    assert unknown in missing.message

    bad = go_client.call(daemon.socket, "RunPodSandbox", pb.RunPodSandboxRequest(), pb.RunPodSandboxResponse)
    assert (bad.responses, bad.code) == ([], "InvalidArgument")
    assert "metadata" in bad.message

    # ImageStatus of an unknown image is the one *Status that answers OK, with an empty response.
    request = pb.ImageStatusRequest(image=pb.ImageSpec(image=f"example.invalid/none-{secrets.token_hex(4)}:1"))
    image = go_client.call(daemon.socket, "/runtime.v1.ImageService/ImageStatus", request, pb.ImageStatusResponse)
    assert image.code == "OK"
    assert not image.responses[0].HasField("image")
    assert_still_answers(go_client, daemon)


def test_64_concurrent_calls_on_one_connection_all_succeed(daemon: Daemon, go_client: GoClient) -> None:
    call = go_client.start(daemon.socket, "Version", pb.VersionRequest(), pb.VersionResponse, concurrency=64)
    replies = call.replies()
    assert len(replies) == 64
    assert {(r.code, r.message) for r in replies} == {("OK", "")}
    assert {r.responses[0].runtime_name for r in replies} == {"criopy"}
    assert_still_answers(go_client, daemon)


def test_a_response_far_beyond_the_flow_control_window_arrives_whole(env: Env, go_client: GoClient) -> None:
    # ~300 KB of labels and annotations: several times grpc-go's initial 64 KiB window.
    labels, annotations = big_map("example.com/label", 150_000), big_map("example.com/note", 150_000)
    config = sized_pod_config(env, labels, annotations)
    pod_id = env.rt.RunPodSandbox(pb.RunPodSandboxRequest(config=config), timeout=60).pod_sandbox_id
    socket = env.daemon.socket

    reply = go_client.call(
        socket, "PodSandboxStatus", pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id), pb.PodSandboxStatusResponse
    )
    assert (reply.code, reply.message) == ("OK", "")
    (status,) = reply.responses
    assert status.ByteSize() > 290_000
    assert status.status.id == pod_id
    assert dict(status.status.labels) == labels
    assert dict(status.status.annotations) == annotations

    flt = pb.PodSandboxFilter(id=pod_id)
    listing = go_client.call(socket, "ListPodSandbox", pb.ListPodSandboxRequest(filter=flt), pb.ListPodSandboxResponse)
    assert listing.code == "OK", listing.message
    (listed,) = listing.responses[0].items
    assert (dict(listed.labels), dict(listed.annotations)) == (labels, annotations)

    # 64 of them at once on one connection: ~19 MB multiplexed through the connection's window.
    request = pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id)
    started = go_client.start(socket, "PodSandboxStatus", request, pb.PodSandboxStatusResponse, concurrency=64)
    replies = started.replies()
    assert [r.code for r in replies] == ["OK"] * 64, {r.message for r in replies}
    assert all(r.responses[0].status == status.status for r in replies)
    assert_still_answers(go_client, env.daemon)


def test_a_megabyte_request_is_accepted(env: Env, go_client: GoClient) -> None:
    annotations = big_map("example.com/big", 1_000_000)
    config = sized_pod_config(env, {}, annotations)
    request = pb.RunPodSandboxRequest(config=config)
    assert 1_000_000 < request.ByteSize() < 16 * 1024 * 1024
    reply = go_client.call(env.daemon.socket, "RunPodSandbox", request, pb.RunPodSandboxResponse, timeout=60)
    assert (reply.code, reply.message) == ("OK", "")
    pod_id = reply.responses[0].pod_sandbox_id
    # What grpcio's client reads back is what grpc-go sent.
    status = env.rt.PodSandboxStatus(pb.PodSandboxStatusRequest(pod_sandbox_id=pod_id), timeout=10).status
    assert status.state == pb.SANDBOX_READY
    assert dict(status.annotations) == annotations
    assert status.metadata == config.metadata
    assert_still_answers(go_client, env.daemon)


def _operations(daemon: Daemon, operation: str, code: str) -> float:
    return daemon.metrics().get(f'criopy_operations_total{{code="{code}",operation="{operation}"}}', 0.0)


def test_container_events_stream_to_the_go_client_and_cancel_cleanly(env: Env, go_client: GoClient) -> None:
    pod = env.pod()
    socket = env.daemon.socket
    request = pb.GetEventsRequest()
    watch = go_client.start(socket, "GetContainerEvents", request, pb.ContainerEventResponse, stream=True, timeout=120)
    # A second watcher that stops by itself after one event: the client cancels the stream.
    one = go_client.start(
        socket, "GetContainerEvents", request, pb.ContainerEventResponse, stream=True, timeout=120, max_messages=1
    )

    def has(cid: str, count: int = 1) -> Callable[[list[pb.ContainerEventResponse]], bool]:
        return lambda events: len([e for e in events if e.container_id == cid]) >= count

    # The streams are open once events reach them: create probe containers until both watchers got one.
    for attempt in range(10):
        probe = env.create(pod, env.container_config(f"probe-{attempt}", ["sleep", "1"]))
        if watch.wait_for(has(probe), timeout=2) and one.finished(timeout=1):
            break
    else:
        raise AssertionError(f"the Go watchers missed 10 probe containers: {watch.received}")
    first = one.reply(timeout=10)  # it got one event, cancelled, and ended
    assert [e.container_event_type for e in first.responses] == [pb.CONTAINER_CREATED_EVENT]
    assert (first.code, first.message) == ("OK", "cancelled by the client after 1 messages")

    # A container made through grpcio reaches the grpc-go watcher.
    cid = env.run(pod, env.container_config("evented", ["sleep", "3600"]))
    events = [e for e in watch.wait_for(has(cid, 2), timeout=10) if e.container_id == cid]
    assert [e.container_event_type for e in events] == [pb.CONTAINER_CREATED_EVENT, pb.CONTAINER_STARTED_EVENT]
    assert events[0].pod_sandbox_status.id == pod[0]
    assert [c.state for c in events[1].containers_statuses if c.id == cid] == [pb.CONTAINER_RUNNING]

    # The kubelet going away: the idle stream is cancelled (RST_STREAM CANCEL) and the daemon lets it go.
    cancelled = time.monotonic()
    watch.cancel()
    reply = watch.reply(timeout=10)
    assert time.monotonic() - cancelled < 5
    assert reply.code == "Canceled"
    deadline = time.monotonic() + 5
    while _operations(env.daemon, "GetContainerEvents", "CANCELLED") < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _operations(env.daemon, "GetContainerEvents", "CANCELLED") == 2  # both streams ended server-side
    env.stop(cid)  # an event with no watcher left
    assert_still_answers(go_client, env.daemon)


def test_a_deadline_shorter_than_the_work_ends_the_call_and_the_daemon_carries_on(
    env: Env, go_client: GoClient
) -> None:
    pod = env.pod()
    stubborn = env.run(
        pod, env.container_config("stubborn", ["sh", "-c", "trap '' TERM; while true; do sleep 0.1; done"])
    )
    time.sleep(0.3)  # the trap is set
    # The kubelet's StopContainer with a 30 s grace period, under a 1 s deadline: SIGTERM is ignored, so the
    # stop would take 30 s.
    started = time.monotonic()
    request = pb.StopContainerRequest(container_id=stubborn, timeout=30)
    reply = go_client.call(env.daemon.socket, "StopContainer", request, pb.StopContainerResponse, timeout=1)
    took = time.monotonic() - started
    assert reply.code == "DeadlineExceeded", reply
    assert took < 5
    assert_still_answers(go_client, env.daemon)
    # The kubelet retries; the container is neither stuck nor locked by the abandoned call.
    again = pb.ContainerStatusRequest(container_id=stubborn)
    status_reply = go_client.call(env.daemon.socket, "ContainerStatus", again, pb.ContainerStatusResponse)
    assert status_reply.code == "OK"
    env.stop(stubborn, timeout=0, rpc_timeout=20)
    status = env.status(stubborn).status
    assert (status.state, status.exit_code) == (pb.CONTAINER_EXITED, 137)
