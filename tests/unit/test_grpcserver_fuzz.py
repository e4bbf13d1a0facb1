"""Frame-level fuzzing of criopy's HTTP/2 gRPC transport.

Each case is one connection sending a generated frame sequence: plausible frames (requests to every kind of
route, SETTINGS, PING, WINDOW_UPDATE, RST_STREAM, PRIORITY, GOAWAY, CONTINUATION, unknown types) with random
stream ids, flags and values, then often mutated (bits flipped, bytes cut, inserted or repeated, a length
field rewritten). After each case the server must still answer a normal call from another client, must have
let the case's connection go, and must hold no more tasks than before; nothing may have reached the event
loop's exception handler or been logged as an error. The seed is fixed: a failure names its case.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import hpack
import pytest

from api.runtime.v1 import api_pb2 as pb
from cri.transport.grpcserver import Limits
from tests.support.h2grpc import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    Abused,
    Client,
    grpc_message,
    request_headers,
    serving,
)

SEED = 0x6372696F  # "crio"
CASES = 5000
SECONDS = 45  # the whole run's bound; it takes a fraction of it

PRIORITY_FLAG = 0x20
MARK = b"fuzzmark"

PATHS = ["/t.S/Version", "/t.S/Wait", "/t.S/Feed", "/a.S/BigStream", "/t.S/Nope", "/", "*", ""]
PATH_WEIGHTS = [40, 15, 10, 15, 5, 5, 5, 5]


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return (
        struct.pack(">I", len(payload))[1:]
        + bytes([kind & 0xFF, flags & 0xFF])
        + struct.pack(">I", sid & 0xFFFFFFFF)
        + payload
    )


class Case:
    """One generated connection, its frames as bytes from a seeded generator. Most frames follow the protocol
    (so that a case gets past its first frame and into streams, windows and answers); the others, and the
    mutations, break it."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.enc = hpack.Encoder()
        self.opened: list[int] = []
        self.next_sid = 1
        self.open_block: int | None = None  # a HEADERS frame without END_HEADERS was sent on this stream

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def new_sid(self) -> int:
        if self.chance(0.95):
            sid = self.next_sid
            self.next_sid += 2
        else:  # even, the largest, or one below the last
            sid = self.rng.choice([2, 2**31 - 1, max(1, self.next_sid - 4)])
        self.opened.append(sid)
        return sid

    def old_sid(self) -> int:
        if self.opened and self.chance(0.9):
            return self.rng.choice(self.opened[-4:])
        return self.rng.choice([0, 1, 2, 3, self.next_sid, 2**31 - 1, self.rng.randrange(2**31)])

    def value(self, low: int, high: int) -> int:
        if self.chance(0.85):
            return self.rng.randint(low, high)
        return self.rng.choice([0, 1, 16_383, 16_384, 65_535, 2**24, 2**31 - 1, 2**31, 2**32 - 1])

    def block(self) -> bytes:
        rng = self.rng
        (path,) = rng.choices(PATHS, PATH_WEIGHTS)
        extra: list[tuple[str, str]] = []
        if self.chance(0.3):
            extra.append(("grpc-timeout", rng.choice(["1m", "20m", "5S", "0n", "x", "99999999H", "100"])))
        if self.chance(0.15):
            extra.append((f"x-{rng.randrange(100)}", "v" * rng.choice([1, 100, 5000, 20_000])))
        fields = request_headers(path, extra)
        if self.chance(0.05):
            fields = [(k, v) for k, v in fields if self.chance(0.7)]  # pseudo-headers missing
        if self.chance(0.05):
            fields = [(":method", rng.choice(["GET", "PUT"])), *fields[1:]]
        if self.chance(0.03):
            self.enc.header_table_size = rng.choice([0, 256, 4096, 8192])
        # hpack's Huffman coder is slow in Python: most blocks go without it.
        encoded: bytes = self.enc.encode(fields, huffman=self.chance(0.2) and not extra)
        return encoded

    def message(self) -> bytes:
        rng = self.rng
        if self.chance(0.7):
            return grpc_message(pb.VersionRequest(version=rng.choice(["", "big", "x" * 100])))
        if self.chance(0.5):
            body = rng.randbytes(rng.randrange(40))
            return struct.pack(">BI", rng.randrange(2), rng.choice([len(body), 0, 2**32 - 1])) + body
        return rng.randbytes(rng.choice([0, 1, 4, 5, 100, 16_384, 20_000]))

    def padded(self, flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        pad = self.rng.choice([0, 1, 10, 255])
        return bytes([pad]) + payload + b"\0" * self.rng.choice([pad, pad, 0, max(0, pad - 1)])

    def request(self) -> bytes:
        """HEADERS (maybe split into CONTINUATIONs, maybe padded), then the body in one or more DATA frames."""
        sid, block, rng = self.new_sid(), self.block(), self.rng
        out = b""
        if len(block) > 16_000 or self.chance(0.15):
            cut = rng.randrange(len(block) + 1) if len(block) <= 16_000 else 16_000
            out += frame(HEADERS, 0, sid, block[:cut])
            out += b"".join(frame(CONTINUATION, 0, sid, block[i : i + 16_000]) for i in range(cut, len(block), 16_000))
            out += frame(CONTINUATION, END_HEADERS, sid)
        else:
            flags = PADDED if self.chance(0.1) else 0
            out += frame(HEADERS, END_HEADERS | flags, sid, self.padded(flags, block))
        body = self.message()
        if self.chance(0.1):
            return out  # the request left unfinished
        if self.chance(0.2) and len(body) > 2:
            out += frame(DATA, 0, sid, body[:2])
            body = body[2:]
        return out + frame(DATA, END_STREAM, sid, body)

    def control(self) -> bytes:
        rng, ok = self.rng, self.chance(0.9)
        kind = rng.choice(["settings", "ping", "window", "rst", "other"])
        if kind == "settings":
            if self.chance(0.2):
                return frame(SETTINGS, ACK, 0 if ok else 1, b"" if ok else b"\0" * 6)
            ident = rng.choice([1, 2, 3, 4, 5, 6, rng.randrange(7, 65_536)])
            high = {2: 1, 4: 2**31 - 1, 5: 2**24 - 1}.get(ident, 2**32 - 1)
            value = self.value(16_384 if ident == 5 else 0, high)
            return frame(SETTINGS, 0, 0 if ok else 1, struct.pack(">HI", ident, value & 0xFFFFFFFF))
        if kind == "ping":
            return frame(PING, ACK if self.chance(0.2) else 0, 0 if ok else 1, rng.randbytes(8 if ok else 7))
        if kind == "window":
            sid = 0 if self.chance(0.4) else self.old_sid()
            return frame(WINDOW_UPDATE, 0, sid, struct.pack(">I", self.value(1, 2**20) & 0xFFFFFFFF)[: 4 if ok else 3])
        if kind == "rst":
            return frame(RST_STREAM, 0, self.old_sid(), struct.pack(">I", rng.randrange(16))[: 4 if ok else 5])
        other = rng.choice([PRIORITY, PRIORITY, GOAWAY, PUSH_PROMISE, rng.randrange(10, 256)])
        size = {PRIORITY: 5, GOAWAY: 8}.get(other, rng.randrange(20)) if ok else rng.randrange(20)
        return frame(other, 0, self.old_sid() if other != GOAWAY else 0, rng.randbytes(size))

    def broken(self) -> bytes:
        """A frame where the protocol does not allow it."""
        rng = self.rng
        kind = rng.choice([HEADERS, DATA, CONTINUATION, rng.randrange(256)])
        payload = self.block() if kind in (HEADERS, CONTINUATION) and self.chance(0.5) else self.message()
        return frame(kind, rng.randrange(256), self.old_sid(), payload)

    def one(self) -> bytes:
        if self.open_block is not None:
            sid, self.open_block = self.open_block, None
            flags = END_HEADERS if self.chance(0.8) else 0
            if not flags:
                self.open_block = sid
            return frame(CONTINUATION, flags, sid, self.rng.randbytes(self.rng.randrange(8)))
        r = self.rng.random()
        if r < 0.45:
            return self.request()
        if r < 0.5:  # a HEADERS frame whose block goes on in the next frame
            self.open_block = self.new_sid()
            return frame(HEADERS, END_STREAM, self.open_block, self.block()[:10])
        if r < 0.9:
            return self.control()
        if r < 0.97:
            return self.broken()
        return self.rng.randbytes(self.rng.randrange(1, 40))

    def mutate(self, data: bytes) -> bytes:
        rng = self.rng
        buf = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            if not buf:
                break
            at = rng.randrange(len(buf))
            how = rng.randrange(5)
            if how == 0:
                buf[at] ^= 1 << rng.randrange(8)
            elif how == 1:
                del buf[at:]
            elif how == 2:
                buf[at:at] = rng.randbytes(rng.randrange(1, 9))
            elif how == 3:
                buf[at:at] = buf[at : at + rng.randrange(1, 64)] * rng.randrange(1, 4)
            else:
                buf[at] = rng.choice([0x00, 0x7F, 0x80, 0xFF])
        return bytes(buf)

    def build(self) -> bytes:
        frames = [self.one() for _ in range(self.rng.randrange(1, 20))]
        if self.chance(0.3):
            i = self.rng.randrange(len(frames))
            frames[i] = self.mutate(frames[i])
        data = b"".join(frames)
        if self.chance(0.1):
            data = self.mutate(data)
        preface = PREFACE if self.chance(0.98) else self.mutate(PREFACE)
        return preface + frame(SETTINGS, 0, 0) + data


def whole_frames(data: bytes) -> bool:
    """Whether the server will see `data` (after the preface) as whole frames: a PING sent after it is then
    read as a frame of its own, not as the rest of a truncated one."""
    if not data.startswith(PREFACE):
        return False
    pos = len(PREFACE)
    while pos + 9 <= len(data):
        pos += 9 + int.from_bytes(data[pos : pos + 3], "big")
    return pos == len(data)


def play(path: str, data: bytes) -> None:
    """Sends one case, lets the server answer what it will (up to a PING of ours), then half-closes and reads
    to the end: the server must close its side."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(path)
        s.settimeout(2)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(data)
            if whole_frames(data):
                s.sendall(frame(PING, 0, 0, MARK))
                _read_until(s, lambda got: frame(PING, ACK, 0, MARK) in got)
            s.shutdown(socket.SHUT_WR)
        _read_until(s, lambda got: False)


def _read_until(s: socket.socket, done: Callable[[bytes], bool]) -> None:
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while not done(got):
            chunk = s.recv(1 << 16)  # a timeout here: the server neither answered nor closed
            if not chunk:
                return
            got = got[-64:] + chunk


@pytest.fixture
def fuzzed(tmp_path: Path) -> Iterator[tuple[Abused, list[dict[str, Any]]]]:
    limits = Limits(
        max_receive_bytes=64 * 1024,
        max_send_bytes=1024 * 1024,
        max_concurrent_streams=16,
        max_header_list_bytes=16 * 1024,
        reset_burst=20,
        resets_per_second=10,
        control_burst=20,
        control_per_second=10,
        goaway_ack_seconds=0.2,
    )
    with serving(str(tmp_path / "f.sock"), limits) as served:
        errors: list[dict[str, Any]] = []
        served.loop.call_soon_threadsafe(served.loop.set_exception_handler, lambda _, ctx: errors.append(ctx))
        yield served, errors


async def _tasks() -> int:
    return len(asyncio.all_tasks())


def test_generated_frame_sequences_leave_the_server_serving(
    fuzzed: tuple[Abused, list[dict[str, Any]]], caplog: pytest.LogCaptureFixture
) -> None:
    served, errors = fuzzed
    caplog.set_level(logging.ERROR, logger="cri")
    rng = random.Random(SEED)
    checker = Client(served.path)
    started = time.monotonic()
    try:
        tasks = served.run(_tasks())
        for case in range(CASES):
            data = Case(rng).build()
            play(served.path, data)
            _settled(served, tasks, case, data)
            sid = checker.call("/t.S/Version", grpc_message(pb.VersionRequest()))
            status, _ = checker.answer(sid)
            assert status["grpc-status"] == "0", (case, data)
            assert not errors, (case, data, errors)
            assert not caplog.records, (case, data, caplog.records)
            assert time.monotonic() - started < SECONDS, f"{case} cases in {SECONDS} s"
    finally:
        checker.close()


def _settled(served: Abused, tasks: int, case: int, data: bytes) -> None:
    """The case's connection is gone and the calls it started have ended (the checker's connection stays)."""
    deadline = time.monotonic() + 3
    while True:
        counts = (served.connections(), served.run(_tasks()))
        if counts == (1, tasks):
            return
        assert time.monotonic() < deadline, (case, data, counts, "connections, tasks: expected", (1, tasks))
        time.sleep(0.002)
