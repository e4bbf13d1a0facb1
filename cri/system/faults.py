"""Test-only crash points: the daemon kills itself at a named step of an operation.

`CRIOPYTEST_FAULT_POINT=<step>` (off by default; outside the CRIOPY_ prefix,
which names config keys) makes the first pass through `point(<step>)` end the
process with SIGKILL, as a power cut or an OOM kill would, so the
crash-consistency tests can restart the daemon on what that instant left.
Each operation calls `point` right after each side effect that outlives the
daemon. Nothing else reads the variable.
"""

from __future__ import annotations

import logging
import os
import signal

from cri.log import event

log = logging.getLogger(__name__)

ENV = "CRIOPYTEST_FAULT_POINT"
_armed = os.environ.get(ENV, "")


def point(step: str) -> None:
    if step != _armed:
        return
    event(log, logging.WARNING, "fault point reached, killing the daemon", step=step)
    for handler in logging.getLogger().handlers:
        handler.flush()
    os.kill(os.getpid(), signal.SIGKILL)
