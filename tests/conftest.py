"""Fixtures more than one test file uses."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest


@pytest.fixture
def shm_name() -> Iterator[str]:
    """A fresh shared-memory name, removed (with any half-made temporary file) after the test."""
    name = f"pytest-shared-{os.getpid()}-{uuid.uuid4().hex[:10]}"
    yield name
    for entry in os.listdir("/dev/shm"):
        if entry == name or entry.startswith(f".{name}."):
            os.unlink(os.path.join("/dev/shm", entry))
