"""The unpack worker: a process that extracts layers, one after another, as the daemon sends them.

    python -m cri.storage.unpack_worker

Extraction is CPU-bound Python (cri/storage/tarstream, the hardened extractor) and holds the
GIL; worker processes let layers unpack in parallel on every core and keep
the daemon's event loop free while they do. A worker serves many layers
(cri/storage/unpack_process keeps a few alive), so a pull of many layers pays
the interpreter's start-up once per worker, not once per layer.

The protocol, on stdin: a job line (JSON: media_type, dest, whiteout_mode,
label, and `path` for a blob file to read); without `path`, the blob follows as
frames (4-byte big-endian length, then that many bytes) ended by an empty frame.
The answer is one JSON line on stdout: the UnpackResult, or {"error", "kind"}
where kind is "layer" (the blob is at fault), "no_space" (the destination is
full) or "internal". After an error the worker exits at once (so the daemon's
next write to it fails and the download stops); after a success it waits for
the next job, and exits when stdin closes.

Runs niced a little: under load the daemon's event loop (every other RPC) comes first.
Dies with the daemon (PR_SET_PDEATHSIG): a restarted daemon removes the
unpack dirs of the one before, and nobody would read this worker's answer.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import io
import json
import os
import signal
import struct
import sys
from pathlib import Path
from typing import BinaryIO

from cri.storage.unpack import ByteSource, UnpackError, UnpackResult, WhiteoutMode, unpack_stream

NICENESS = 1
EXIT_FAILED = 1
FRAME_HEADER = struct.Struct(">I")
_PR_SET_PDEATHSIG = 1


class Frames(io.RawIOBase):
    """One layer's bytes out of the framed stream; b"" at its empty end frame (the stream goes on after)."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._left = 0  # bytes of the current frame not yet read
        self.ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._left == 0:
            if self.ended:
                return 0
            header = _read_exactly(self._source, FRAME_HEADER.size)
            self._left = FRAME_HEADER.unpack(header)[0]
            self.ended = self._left == 0
        view = memoryview(buffer).cast("B")
        data = self._source.read(min(len(view), self._left))
        if not data:
            raise EOFError("the daemon's stream ended inside a frame")
        view[: len(data)] = data
        self._left -= len(data)
        return len(data)

    def drain(self) -> None:
        """Skip to the end frame (bytes after the end of the compressed stream are not the worker's concern)."""
        while self.read(1 << 20):
            pass


def _read_exactly(source: BinaryIO, size: int) -> bytes:
    data = source.read(size)
    if len(data) != size:
        raise EOFError("the daemon's stream ended inside a frame header")
    return data


def _die_with_the_daemon() -> None:
    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the daemon died before the signal was armed
        os._exit(EXIT_FAILED)


def run(job: dict[str, str], stdin: BinaryIO) -> dict[str, object]:
    """The answer line for one job: its UnpackResult's fields, or the error and its kind."""
    label = job.get("label", "?")
    try:
        if job.get("path"):
            with open(job["path"], "rb") as source:
                result = _unpack(job, source)
        else:
            frames = Frames(stdin)
            result = _unpack(job, frames)
            frames.drain()
        return dataclasses.asdict(result)
    except UnpackError as exc:
        return {"error": str(exc), "kind": "layer"}
    except OSError as exc:
        kind = "no_space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "internal"
        return {"error": f"layer {label}: {exc}", "kind": kind, "errno": exc.errno}
    except Exception as exc:  # a bug of ours, or the daemon gone: reported, not a traceback it cannot parse
        return {"error": f"layer {label}: {type(exc).__name__}: {exc}", "kind": "internal"}


def _unpack(job: dict[str, str], source: ByteSource) -> UnpackResult:
    mode: WhiteoutMode = "apply" if job["whiteout_mode"] == "apply" else "overlay"
    if job["whiteout_mode"] != mode:
        raise ValueError(f"whiteout_mode must be 'overlay' or 'apply', not {job['whiteout_mode']!r}")
    return unpack_stream(source, job["media_type"], Path(job["dest"]), mode, label=job["label"], umask=0)


def main() -> int:
    _die_with_the_daemon()
    os.nice(NICENESS)
    # One thread, so the umask is ours to set: files are created with their modes, no chmod each.
    os.umask(0)
    stdin = sys.stdin.buffer
    while line := stdin.readline():
        answer = run(json.loads(line), stdin)
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()
        if "error" in answer:
            sys.stderr.write(f"{answer['error']}\n")
            return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
