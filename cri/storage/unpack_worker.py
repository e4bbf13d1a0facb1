"""The unpack worker: a process that extracts layers, one after another, as the daemon sends them.

    python -m cri.storage.unpack_worker

Extraction is CPU-bound Python (cri/storage/tarstream, the hardened extractor) and holds the
GIL; worker processes let layers unpack in parallel on every core and keep
the daemon's event loop free while they do. A worker serves many layers
(cri/storage/unpack_process keeps a few alive), so a pull of many layers pays
the interpreter's start-up once per worker, not once per layer.

The protocol, on stdin: a job line (JSON: media_type, dest, whiteout_mode,
label, `path`: the blob file, and `follow`). Without `follow` the file is
complete. With it the daemon is still writing the file as it downloads: it says
how far the file has grown with 9-byte messages (b"+", then the size as 8 bytes
big-endian) and ends with b"." and the final size; the worker reads the file up
to what was announced (the bytes come from the page cache, written once: no
copy of them crosses the pipe). The answer is one JSON line on stdout: the
UnpackResult, or {"error", "kind"} where kind is "layer" (the blob is at
fault), "no_space" (the destination is full) or "internal". After an error the
worker exits at once (so the daemon's next message to it fails and the download
stops); after a success it waits for the next job, and exits when stdin closes.

Runs niced a little: under load the daemon's event loop (every other RPC) comes first.
Dies with its parent (PR_SET_PDEATHSIG): the daemon's unpack host (cri/storage/unpack_host, which forks
the workers and dies with the daemon), or the daemon when it is run by itself. A restarted daemon removes
the unpack dirs of the one before, and nobody would read this worker's answer.
"""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os
import signal
import struct
import sys
from typing import Any, BinaryIO

from cri.storage.unpack import ByteSource, UnpackError, UnpackResult, WhiteoutMode, unpack_stream

NICENESS = 1
EXIT_FAILED = 1
GROWN = struct.Struct(">cQ")  # b"+" or b"." (the end), the blob file's size so far
TAG_GROWN, TAG_END = b"+", b"."
_PR_SET_PDEATHSIG = 1


class GrowingFile(io.RawIOBase):
    """A blob file the daemon is still writing, read up to the size it announced; b"" at the end it announced."""

    def __init__(self, path: str, control: BinaryIO) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._control = control
        self._position = 0
        self._announced = 0
        self.ended = False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._position >= self._announced:
            if self.ended:
                return 0
            self._next_message()
        view = memoryview(buffer).cast("B")[: self._announced - self._position]
        n = os.preadv(self._fd, [view], self._position)
        if n == 0:
            raise EOFError(f"the blob file ends at {self._position} bytes, {self._announced} were announced")
        self._position += n
        return n

    def drain(self) -> None:
        """Take the messages up to the end one (bytes after the end of the compressed stream are not ours)."""
        while not self.ended:
            self._next_message()

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()

    def _next_message(self) -> None:
        message = self._control.read(GROWN.size)
        if len(message) != GROWN.size:
            raise EOFError("the daemon's messages ended inside a layer")
        tag, size = GROWN.unpack(message)
        if tag not in (TAG_GROWN, TAG_END) or size < self._announced:
            raise ValueError(f"bad message from the daemon: {message!r}")
        self._announced = size
        self.ended = tag == TAG_END


def die_with_the_parent(parent: int | None = None) -> None:
    """SIGKILL when `parent` (the process that started this one) exits, or exit now if it has already."""
    parent = os.getppid() if parent is None else parent
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before the signal was armed
        os._exit(EXIT_FAILED)


def run(job: dict[str, Any], stdin: BinaryIO) -> dict[str, object]:
    """The answer line for one job: its UnpackResult's fields, or the error and its kind."""
    label = job.get("label", "?")
    try:
        if job.get("follow"):
            with GrowingFile(job["path"], stdin) as growing:
                result = _unpack(job, growing)
                growing.drain()
        else:
            with open(job["path"], "rb", buffering=0) as source:
                result = _unpack(job, source)
        return result._asdict()
    except UnpackError as exc:
        return {"error": str(exc), "kind": "layer"}
    except OSError as exc:
        kind = "no_space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "internal"
        return {"error": f"layer {label}: {exc}", "kind": kind, "errno": exc.errno}
    except Exception as exc:  # a bug of ours, or the daemon gone: reported, not a traceback it cannot parse
        return {"error": f"layer {label}: {type(exc).__name__}: {exc}", "kind": "internal"}


def _unpack(job: dict[str, Any], source: ByteSource) -> UnpackResult:
    mode: WhiteoutMode = "apply" if job["whiteout_mode"] == "apply" else "overlay"
    if job["whiteout_mode"] != mode:
        raise ValueError(f"whiteout_mode must be 'overlay' or 'apply', not {job['whiteout_mode']!r}")
    return unpack_stream(source, job["media_type"], job["dest"], mode, label=job["label"], umask=0)


def main(parent: int | None = None) -> int:
    die_with_the_parent(parent)
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
