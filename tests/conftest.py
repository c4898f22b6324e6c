"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import SinkProcess


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    """A running ``spamsink serve`` with default options on a loopback port."""
    with SinkProcess(tmp_path / "data") as process:
        yield process
