"""Structured log events, as the program that embeds this library renders them.

The library imports nothing of its host: an event is a plain logging record
whose `fields` extra holds the key=value pairs (criopy's formatter prints them
after the message; any other logging setup still gets the message).
"""

from __future__ import annotations

import logging
from typing import Any


def event(logger: logging.Logger, level: int, name: str, **fields: Any) -> None:
    """Log one event with its fields; fields with value None are left out."""
    logger.log(level, name, extra={"fields": {k: v for k, v in fields.items() if v is not None}})
