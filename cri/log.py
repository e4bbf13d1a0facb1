"""Structured logging: one line per event, key=value text or JSON, to stderr."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import time
from typing import Any

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log one event with its fields; fields with value None are left out.

    The record is made here rather than by `logger.log`, which also walks the stack for a caller's file and
    line that no format shows: the events of a pod burst are logged on the event loop."""
    if not logger.isEnabledFor(level):
        return
    kept = {k: v for k, v in fields.items() if v is not None}
    logger.handle(logger.makeRecord(logger.name, level, "", 0, name, (), None, extra={"fields": kept}))


_NEEDS_QUOTES = re.compile(r'[ "=\n\t]')


def _quote(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)
    if not text or _NEEDS_QUOTES.search(text):
        return json.dumps(text)
    return text


@functools.lru_cache(maxsize=4)
def _second_text(second: int) -> str:
    # strftime once a second: a burst logs thousands of events within the same few seconds.
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))


def _timestamp(record: logging.LogRecord) -> str:
    return f"{_second_text(int(record.created))}.{int(record.msecs):03d}Z"


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            f"time={_timestamp(record)}",
            f"level={record.levelname.lower()}",
            f"msg={_quote(record.getMessage())}",
        ]
        for key, value in getattr(record, "fields", {}).items():
            parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"traceback={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        data.update(getattr(record, "fields", {}))
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


# criopy's own loggers; libraries (grpc, asyncio) stay at WARNING whatever the level.
OWN_LOGGERS = ("cri", "cni", "podsandbox")


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    set_level(level)


def set_level(level: str) -> None:
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(LEVELS[level])
