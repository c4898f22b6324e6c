"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sink import stale_extensions
from tests.support import SinkProcess


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a compiled engine older than its source (an editable install
    builds ``sink/smtp.py`` into a C extension beside it, which Python then prefers)."""
    for compiled in stale_extensions():
        pytest.exit(f"{compiled.name} is older than its source: rebuild it with "
                    "`.venv/bin/pip install -e '.[dev,netdrop]'` (with SPAMSINK_PURE=1 "
                    "the engine is installed interpreted)", returncode=2)


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    """A running ``spamsink serve`` with default options on a loopback port."""
    with SinkProcess(tmp_path / "data") as process:
        yield process
