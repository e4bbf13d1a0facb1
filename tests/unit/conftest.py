"""Fixtures the unit tests of the gRPC transport share (their harness is tests/support/h2grpc.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.h2grpc import Client, Served, serving_handlers


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    with serving_handlers(str(tmp_path / "g.sock")) as s:
        yield s


@pytest.fixture
def client(served: Served) -> Iterator[Client]:
    c = Client(served.path)
    yield c
    c.close()
