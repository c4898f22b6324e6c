"""``SPAMSINK_INTERPRETED=1``: import the SMTP engine from its source.

Installed by ``sink/__init__.py`` when the variable is set, before anything imports
``sink.smtp``: the engine then runs from ``sink/smtp.py`` even when its compiled
extension is installed beside it, to compare the two or to rule the compiler out
while debugging.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from pathlib import Path


class EngineSource(importlib.abc.MetaPathFinder):
    """Finds ``sink.smtp`` as its source file, ahead of the compiled extension."""

    def find_spec(self, name: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "sink.smtp":
            return None
        return importlib.util.spec_from_file_location(name, Path(__file__).with_name("smtp.py"))


def install() -> None:
    """Put :class:`EngineSource` first in this process's import system (once)."""
    if not any(isinstance(finder, EngineSource) for finder in sys.meta_path):
        sys.meta_path.insert(0, EngineSource())
