"""spamsink: a memory hole for spam.

``SPAMSINK_INTERPRETED=1`` in the environment makes this process import the SMTP
engine from ``sink/smtp.py`` even when its compiled extension is installed: to compare
the two, or to rule the compiler out while debugging.
"""

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

__version__ = "0.1.0"


class _EngineSource(importlib.abc.MetaPathFinder):
    """Finds ``sink.smtp`` as its source file, ahead of the compiled extension."""

    def find_spec(self, name: str, path: object = None,
                  target: object = None) -> importlib.machinery.ModuleSpec | None:
        if name != "sink.smtp":
            return None
        return importlib.util.spec_from_file_location(name, Path(__file__).with_name("smtp.py"))


if os.environ.get("SPAMSINK_INTERPRETED", "") not in ("", "0"):
    sys.meta_path.insert(0, _EngineSource())

#: What :func:`engine_build` says when the source changed after the extension was built.
STALE = "compiled, older than sink/smtp.py: reinstall (pip install -e .) to rebuild it"


def engine_build() -> str:
    """How this installation runs the SMTP engine (``sink/smtp.py``): ``"compiled"``
    when the C extension setup.py builds with mypyc is loaded, ``"interpreted"`` when
    the source is, and :data:`STALE` when the loaded extension is older than the
    source beside it (an editable install, edited since it was built)."""
    from sink import smtp

    if Path(smtp.__file__ or "").suffix == ".py":
        return "interpreted"
    return STALE if stale_extensions() else "compiled"


def stale_extensions(package: Path = Path(__file__).parent) -> list[Path]:
    """The compiled modules in ``package`` older than their ``.py`` source by more
    than 2 s (a wheel install writes both within milliseconds, in any order)."""
    stale = []
    for compiled in package.glob("*.so"):
        source = compiled.with_name(compiled.name.split(".")[0] + ".py")
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime + 2.0:
            stale.append(compiled)
    return stale
