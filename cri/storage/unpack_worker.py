"""The unpack worker: one process extracts one layer read from its stdin.

    python -m cri.storage.unpack_worker --media-type T --dest DIR --whiteout-mode overlay --label sha256:...

Extraction is CPU-bound Python (tarfile, the hardened extractor) and holds the
GIL; a process per layer lets layers unpack in parallel on every core and
keeps the daemon's event loop free while they do. The daemon feeds the blob
as it downloads (or from the content store) into stdin; the worker answers
one JSON line on stdout: the UnpackResult, or {"error", "kind"} where kind is
"layer" (the blob is at fault), "no_space" (the destination is full) or
"internal". The message goes to stderr too.

Runs niced: under load the daemon's event loop (every other RPC) comes first.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import sys
from pathlib import Path
from typing import BinaryIO

from cri.storage.unpack import UnpackError, WhiteoutMode, unpack_stream

NICENESS = 5
EXIT_FAILED = 1


def run(source: BinaryIO, media_type: str, dest: Path, whiteout_mode: WhiteoutMode, label: str) -> dict[str, object]:
    """The answer line for one layer: its UnpackResult's fields, or the error and its kind."""
    # One thread, so the umask is ours to set: files are created with their modes, no chmod each.
    os.umask(0)
    try:
        return dataclasses.asdict(unpack_stream(source, media_type, dest, whiteout_mode, label=label, umask=0))
    except UnpackError as exc:
        return {"error": str(exc), "kind": "layer"}
    except OSError as exc:
        kind = "no_space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "internal"
        return {"error": f"layer {label}: {exc}", "kind": kind, "errno": exc.errno}
    except Exception as exc:  # a bug of ours: reported, not a traceback the daemon cannot parse
        return {"error": f"layer {label}: {type(exc).__name__}: {exc}", "kind": "internal"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cri.storage.unpack_worker", description=__doc__)
    parser.add_argument("--media-type", required=True)
    parser.add_argument("--dest", required=True, type=Path)
    parser.add_argument("--whiteout-mode", required=True, choices=["overlay", "apply"])
    parser.add_argument("--label", required=True)
    args = parser.parse_args(argv)
    os.nice(NICENESS)
    answer = run(sys.stdin.buffer, args.media_type, args.dest, args.whiteout_mode, args.label)
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    if "error" in answer:
        sys.stderr.write(f"{answer['error']}\n")
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main())
