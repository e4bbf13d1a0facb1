"""Running helper binaries: always with a timeout, stderr always in the error."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass


class CommandError(Exception):
    def __init__(self, argv: Sequence[str], problem: str, stderr: str = "") -> None:
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{' '.join(argv)}: {problem}{detail}")
        self.argv = list(argv)
        self.stderr = stderr


@dataclass(frozen=True)
class Completed:
    stdout: bytes
    stderr: str


async def run(argv: Sequence[str], *, timeout: float, stdin: bytes | None = None) -> Completed:
    """Run argv to completion; raise CommandError on failure, non-zero exit or timeout."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as exc:
        raise CommandError(argv, f"cannot start: {exc.strerror}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        _, err = await proc.communicate()
        raise CommandError(argv, f"timed out after {timeout:g}s", err.decode(errors="replace")) from None
    stderr = err.decode(errors="replace")
    if proc.returncode != 0:
        raise CommandError(argv, f"exited with status {proc.returncode}", stderr)
    return Completed(out, stderr)
