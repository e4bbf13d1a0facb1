"""Messages to conmon's ctl fifo wait until conmon has read the one before (it mishandles two in one read)."""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from pathlib import Path

import pytest

from cri.oci import conmon_ctl


def fifo_with_reader(bundle: Path, name: str) -> int:
    path = bundle / name
    os.mkfifo(path)
    return os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # stands for conmon, which holds the read side


def test_a_message_waits_until_the_previous_one_was_read(tmp_path: Path) -> None:
    ctl = fifo_with_reader(tmp_path, "ctl")
    read_at: list[float] = []

    def conmon() -> None:  # reads the first message late
        time.sleep(0.1)
        read_at.append(time.monotonic())
        os.read(ctl, 100)

    async def two_messages() -> float:
        await conmon_ctl.send(str(tmp_path), conmon_ctl.RESIZE, 24, 80)
        reader = threading.Thread(target=conmon)
        reader.start()
        await conmon_ctl.send(str(tmp_path), conmon_ctl.RESIZE, 25, 81)
        sent_at = time.monotonic()
        await asyncio.to_thread(reader.join)
        return sent_at

    try:
        sent_at = asyncio.run(two_messages())
        assert sent_at >= read_at[0]
        assert os.read(ctl, 100) == b"1 25 81\n"  # the second message alone in the fifo
    finally:
        os.close(ctl)


def test_a_conmon_that_never_reads_delays_a_message_only_so_long(tmp_path: Path) -> None:
    ctl, winsz = fifo_with_reader(tmp_path, "ctl"), fifo_with_reader(tmp_path, "winsz")
    try:
        writer = os.open(tmp_path / "winsz", os.O_WRONLY | os.O_NONBLOCK)
        os.write(writer, b"24 80\n")
        os.close(writer)
        started = time.monotonic()
        asyncio.run(conmon_ctl.send(str(tmp_path), conmon_ctl.REOPEN_LOGS))
        assert conmon_ctl.DRAIN_WAIT <= time.monotonic() - started < conmon_ctl.DRAIN_WAIT + 1
        assert os.read(ctl, 100) == b"2 0 0\n"
    finally:
        os.close(ctl)
        os.close(winsz)


def test_a_gone_conmon_is_an_error(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "ctl")  # nobody reads
    with pytest.raises(OSError) as error:
        asyncio.run(conmon_ctl.send(str(tmp_path), conmon_ctl.REOPEN_LOGS))
    assert error.value.errno == errno.ENXIO
