"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import sink as package
from tests.support import SinkProcess


def pytest_sessionstart(session: pytest.Session) -> None:
    """Refuse to test a compiled module older than its source (an editable install
    builds ``sink/smtp.py`` into a C extension beside it, which Python then prefers)."""
    for compiled in Path(package.__file__ or "").parent.glob("*.so"):
        source = compiled.with_name(compiled.name.split(".")[0] + ".py")
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime:
            pytest.exit(f"{source} changed after {compiled.name} was built from it: "
                        "rebuild with `.venv/bin/pip install -e '.[dev,netdrop]'` (or "
                        "install with SPAMSINK_PURE=1 to run it interpreted)", returncode=2)


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[SinkProcess]:
    """A running ``spamsink serve`` with default options on a loopback port."""
    with SinkProcess(tmp_path / "data") as process:
        yield process
