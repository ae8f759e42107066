"""Fixtures of the dataset tests: a Range-capable HTTP server on 127.0.0.1 (started and stopped per test)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from ds_support import LocalServer  # noqa: E402


@pytest.fixture
def server() -> Iterator[LocalServer]:
    srv = LocalServer()
    try:
        yield srv
    finally:
        srv.close()
