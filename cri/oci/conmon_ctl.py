"""conmon's control fifo, `<bundle>/ctl`: one `"<type> <height> <width>\\n"` line per message.

Type 1 resizes the container's terminal (conmon passes it on as `"<height>
<width>\\n"` through a second fifo, `<bundle>/winsz`); type 2 reopens the log.

conmon of Debian 12 (2.1.6) and its age handles only the first line of what
one read of either fifo returns: it hands its buffer's start, not the line's,
to the parser, once per line. Two messages that meet in a fifo become two
copies of the first. kubectl attach resizes to (w+1, h+1) and back to (w, h)
back to back, to make the program redraw; the terminal was left a row and a
column too big about half the time. So each message waits, briefly, until
conmon has taken the one before out of both fifos.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import struct
import termios

from cri.system import offload

RESIZE = 1
REOPEN_LOGS = 2
# How long a message waits for conmon to take the previous one; past it, it is sent anyway.
DRAIN_WAIT = 0.2
POLL_INTERVAL = 0.002
# Empty fifos seen this many polls in a row: conmon is not between reading ctl and writing winsz.
QUIET_POLLS = 2


async def send(bundle: str, kind: int, height: int = 0, width: int = 0) -> None:
    """Write one message to conmon. OSError when conmon is gone (ENXIO: nobody reads the fifo)."""
    await _drained(bundle)
    await offload.to_thread(_write, os.path.join(bundle, "ctl"), f"{kind} {height} {width}\n".encode())


async def reopen_log(bundle: str, log_path: str, timeout: float) -> bool:
    """Ask conmon to reopen the log; True once the new file is in place (False: not within `timeout`).

    The kubelet rotates by renaming the log, then expects the new file to exist when the call returns.
    conmon opens `<log>.tmp` and renames it over the log path, so a new inode at the path is its answer,
    whether or not the old file had been moved away.
    """
    before = _inode(log_path)
    await send(bundle, REOPEN_LOGS)
    if not log_path:
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        now = _inode(log_path)
        if now is not None and now != before:
            return True
        await asyncio.sleep(POLL_INTERVAL)
    return False


def _inode(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


async def _drained(bundle: str) -> None:
    fifos = [os.path.join(bundle, "ctl"), os.path.join(bundle, "winsz")]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DRAIN_WAIT
    quiet = 0
    while loop.time() < deadline:
        quiet = quiet + 1 if not any(_unread(fifo) for fifo in fifos) else 0
        if quiet >= QUIET_POLLS:
            return
        await asyncio.sleep(POLL_INTERVAL)


def _unread(fifo: str) -> int:
    """Bytes in the fifo that conmon has not read yet (0 when it or its reader is gone)."""
    try:
        # Opened for writing, never read: a reader of ours would take conmon's messages.
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])
    finally:
        os.close(fd)


def _write(fifo: str, data: bytes) -> None:
    # Non-blocking: a conmon that is gone must not hang the caller.
    fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
