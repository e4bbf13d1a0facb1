"""Running independent steps at once without leaving any of them behind."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any


async def all_of(*steps: Awaitable[Any]) -> None:
    """Run the steps concurrently, and only once every one has ended raise the first failure.

    asyncio.gather alone raises at the first failure while the other steps go on: an undo
    started then would race them.
    """
    for outcome in await asyncio.gather(*steps, return_exceptions=True):
        if isinstance(outcome, BaseException):
            raise outcome
