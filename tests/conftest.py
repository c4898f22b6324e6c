"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sink import smtp as engine
from tests.support import SinkProcess


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a compiled engine older than its source (an editable install
    builds ``sink/smtp.py`` into a C extension beside it, which Python then prefers)."""
    compiled = Path(engine.__file__ or "")
    source = compiled.with_name("smtp.py")
    if compiled.suffix != ".py" and source.stat().st_mtime > compiled.stat().st_mtime:
        pytest.exit(f"{source} changed after the compiled engine {compiled.name} was "
                    "built: rebuild it with `.venv/bin/pip install -e '.[dev,netdrop]'` "
                    "(or install with SPAMSINK_PURE=1 to run it interpreted)", returncode=2)


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    """A running ``spamsink serve`` with default options on a loopback port."""
    with SinkProcess(tmp_path / "data") as process:
        yield process
