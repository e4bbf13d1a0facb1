"""criopy's HTTP/2 gRPC transport, driven frame by frame by an independent HTTP/2 client (python-hyper's h2)."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest

from api.runtime.v1 import api_pb2 as pb
from tests.support.h2grpc import BIG, MAX_MESSAGE, Client, Served, eventually, grpc_message


def test_unary_call_answers_with_status_ok(client: Client) -> None:
    status, body = client.answer(client.call("/t.S/Version", grpc_message(pb.VersionRequest())))
    assert status["grpc-status"] == "0"
    assert pb.VersionResponse.FromString(body).runtime_name == "xxxx"
    assert client.headers[1]["content-type"] == "application/grpc"


def test_an_answer_encoded_by_its_handler_is_sent_as_it_is(served: Served, client: Client) -> None:
    def name() -> str:
        status, body = client.answer(client.call("/t.S/Kept", grpc_message(pb.VersionRequest())))
        assert status["grpc-status"] == "0"
        return pb.VersionResponse.FromString(body).runtime_name

    assert [name(), name()] == ["first", "first"]
    served.handlers.kept = pb.VersionResponse(runtime_name="second")
    assert name() == "second"


def test_large_answer_waits_for_the_clients_window(served: Served) -> None:
    """A 100-byte stream window: the answer comes in pieces as the client grants room, never beyond it."""
    c = Client(served.path, window=100)
    try:
        sid = c.call("/t.S/Version", grpc_message(pb.VersionRequest(version="big")))
        while sid not in c.ended:
            c.pump()
            assert all(n <= 100 for n in c.frames.get(sid, []))
            received = sum(c.frames.get(sid, []))
            if received and sid not in c.ended:
                c.conn.acknowledge_received_data(received - getattr(c, "_acked", 0), sid)
                c._acked = received  # type: ignore[attr-defined]
                c.flush()
        assert pb.VersionResponse.FromString(bytes(c.data[sid])[5:]).runtime_name == "x" * BIG
        assert c.trailers[sid]["grpc-status"] == "0"
    finally:
        c.close()


def test_data_frames_respect_the_clients_max_frame_size(client: Client) -> None:
    status, body = client.answer(client.call("/t.S/Version", grpc_message(pb.VersionRequest(version="big"))))
    assert status["grpc-status"] == "0" and len(body) > BIG
    assert max(client.frames[1]) <= 16_384


def test_concurrent_streams_on_one_connection(client: Client) -> None:
    sids = [client.call("/t.S/Version", grpc_message(pb.VersionRequest())) for _ in range(50)]
    for sid in sids:
        status, body = client.answer(sid)
        assert status["grpc-status"] == "0" and pb.VersionResponse.FromString(body).runtime_name == "xxxx"


def test_error_status_is_percent_encoded_in_a_trailers_only_answer(client: Client) -> None:
    sid = client.call("/t.S/Fail", grpc_message(pb.VersionRequest()))
    status, body = client.answer(sid)
    assert status["grpc-status"] == str(grpc.StatusCode.NOT_FOUND.value[0])
    assert status["grpc-message"] == "container 50%25 gone: %C3%BC"
    assert body == b"" and sid not in client.trailers  # trailers-only: one HEADERS frame


def test_unknown_method_is_unimplemented(client: Client) -> None:
    status, _ = client.answer(client.call("/t.S/Nope", grpc_message(pb.VersionRequest())))
    assert status["grpc-status"] == "12"
    assert "/t.S/Nope" in status["grpc-message"]


def test_malformed_and_compressed_requests_are_refused(client: Client) -> None:
    status, _ = client.answer(client.call("/t.S/Version", b"\x00\x00\x00\x00\x09abc"))
    assert status["grpc-status"] == "3"
    status, _ = client.answer(client.call("/t.S/Version", b"\x00\x00\x00\x00\x03\xff\xff\xff"))
    assert status["grpc-status"] == "3" and "not a valid message" in status["grpc-message"]
    sid = client.call("/t.S/Version", grpc_message(pb.VersionRequest(), compressed=1), [("grpc-encoding", "gzip")])
    status, _ = client.answer(sid)
    assert status["grpc-status"] == "12" and "gzip" in status["grpc-message"]


def test_request_over_the_limit_is_resource_exhausted(client: Client) -> None:
    big = grpc_message(pb.VersionRequest(version="v" * (MAX_MESSAGE + 10)))
    status, _ = client.answer(client.call("/t.S/Version", big))
    assert status["grpc-status"] == str(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0])
    status, _ = client.answer(client.call("/t.S/Version", grpc_message(pb.VersionRequest())))
    assert status["grpc-status"] == "0"  # the connection goes on


def test_header_block_split_over_continuation_frames(client: Client) -> None:
    metadata = [(f"x-meta-{i}", "v" * 1000) for i in range(30)]  # ~30 kB: more than one 16 kB frame
    status, body = client.answer(client.call("/t.S/Version", grpc_message(pb.VersionRequest()), metadata))
    assert status["grpc-status"] == "0" and pb.VersionResponse.FromString(body).runtime_name == "xxxx"


def test_deadline_cancels_the_handler(served: Served, client: Client) -> None:
    sid = client.call("/t.S/Wait", grpc_message(pb.VersionRequest(version="slow")), [("grpc-timeout", "50m")])
    status, _ = client.answer(sid)
    assert status["grpc-status"] == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert served.handlers.cancelled == ["slow"]


def test_rst_stream_cancels_the_handler(served: Served, client: Client) -> None:
    sid = client.call("/t.S/Wait", grpc_message(pb.VersionRequest(version="abandoned")))
    eventually(lambda: served.handlers.started == ["abandoned"])
    client.conn.reset_stream(sid)
    client.flush()
    client.answer(client.call("/t.S/Version", grpc_message(pb.VersionRequest())))
    eventually(lambda: served.handlers.cancelled == ["abandoned"])


def test_ping_is_acknowledged_with_its_payload(client: Client) -> None:
    client.conn.ping(b"criopy!!")
    client.flush()
    client.until(lambda: any(isinstance(e, h2.events.PingAckReceived) for e in client.events))
    (ack,) = [e for e in client.events if isinstance(e, h2.events.PingAckReceived)]
    assert ack.ping_data == b"criopy!!"


def test_server_stream_then_status(client: Client) -> None:
    sid = client.call("/t.S/Stream", grpc_message(pb.StreamContainersRequest()))
    client.answer(sid)
    raw = bytes(client.data[sid])
    ids = []
    while raw:
        (length,) = struct.unpack(">I", raw[1:5])
        ids.append(pb.StreamContainersResponse.FromString(raw[5 : 5 + length]).containers[0].id[:1])
        raw = raw[5 + length :]
    assert ids == ["0", "1", "2"] and client.trailers[sid]["grpc-status"] == "0"
    failing = pb.StreamContainersRequest(filter=pb.ContainerFilter(id="fail"))
    sid = client.call("/t.S/Stream", grpc_message(failing))
    client.answer(sid)
    assert client.trailers[sid]["grpc-status"] == str(grpc.StatusCode.UNAVAILABLE.value[0])
    assert len(client.data[sid]) > 3000  # the three messages came before the failure


def _wait_method(channel: grpc.Channel) -> Any:
    return channel.unary_unary(
        "/t.S/Wait",
        request_serializer=pb.VersionRequest.SerializeToString,
        response_deserializer=pb.VersionResponse.FromString,
    )


def test_stop_lets_a_running_call_finish_and_refuses_new_calls(served: Served) -> None:
    """grpcio as the client here: it follows GOAWAY as a real client does (h2 stops reading at GOAWAY)."""
    with grpc.insecure_channel(f"unix://{served.path}") as channel:
        wait = _wait_method(channel)
        running = wait.future(pb.VersionRequest(version="in-flight"))
        eventually(lambda: served.handlers.started == ["in-flight"])
        stopping = asyncio.run_coroutine_threadsafe(served.server.stop(5), served.loop)
        time.sleep(0.2)
        assert not stopping.done()
        assert served.handlers.release is not None
        served.loop.call_soon_threadsafe(served.handlers.release.set)
        assert running.result(5).runtime_name == "released"
        stopping.result(10)
        with pytest.raises(grpc.RpcError) as refused:
            wait(pb.VersionRequest(version="late"), timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert served.handlers.cancelled == []


def test_stop_cancels_what_outlives_the_grace_period(served: Served) -> None:
    with grpc.insecure_channel(f"unix://{served.path}") as channel:
        wait = _wait_method(channel)
        running = wait.future(pb.VersionRequest(version="stuck"))
        eventually(lambda: served.handlers.started == ["stuck"])
        served.run(served.server.stop(0.1))
        assert served.handlers.cancelled == ["stuck"]
        with pytest.raises(grpc.RpcError) as cut:
            running.result(5)
        assert (cut.value.code(), cut.value.details()) == (grpc.StatusCode.UNAVAILABLE, "criopy is shutting down")


def test_stop_ends_a_subscription_at_once(served: Served) -> None:
    with grpc.insecure_channel(f"unix://{served.path}") as channel:
        feed = channel.unary_stream(
            "/t.S/Feed",
            request_serializer=pb.VersionRequest.SerializeToString,
            response_deserializer=pb.VersionResponse.FromString,
        )
        responses = feed(pb.VersionRequest(version="feed"))
        eventually(lambda: served.handlers.started == ["feed"])
        stopping = asyncio.run_coroutine_threadsafe(served.server.stop(60), served.loop)
        with pytest.raises(grpc.RpcError) as cut:
            next(responses)
        assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
        assert served.handlers.cancelled == ["feed"]
        stopping.result(10)  # nothing else was running: no wait for the 60 s grace


def test_garbage_instead_of_the_preface_ends_the_connection(served: Served) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(served.path)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        while chunk := s.recv(4096):
            received += chunk
    kinds = []
    while received:
        length = int.from_bytes(received[:3], "big")
        kinds.append((received[3], received[9 : 9 + length]))
        received = received[9 + length :]
    assert kinds[-1][0] == 7  # GOAWAY
    assert struct.unpack(">I", kinds[-1][1][4:8])[0] == 1  # PROTOCOL_ERROR


def test_frame_larger_than_advertised_is_a_connection_error(client: Client) -> None:
    client.sock.sendall(struct.pack(">I", (20_000 << 8) | 0)[0:4] + b"\x00" + struct.pack(">I", 1) + b"\x00" * 20_000)
    client.until(lambda: any(isinstance(e, h2.events.ConnectionTerminated) for e in client.events))
    (goaway,) = [e for e in client.events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == 6  # FRAME_SIZE_ERROR
