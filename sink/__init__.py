"""spamsink: a memory hole for spam.

``SPAMSINK_INTERPRETED=1`` in the environment makes the process import the SMTP
engine from ``sink/smtp.py`` even when its compiled extension is installed
(:mod:`sink.interpreted`). Imports here stay cheap: every command starts with them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__version__ = "0.1.0"

#: What :func:`engine_build` says when the source changed after the extension was built.
STALE = "compiled, older than sink/smtp.py: reinstall (pip install -e .) to rebuild it"


def engine_build() -> str:
    """How this installation runs the SMTP engine (``sink/smtp.py``): ``"compiled"``
    when the C extension setup.py builds with mypyc is loaded, ``"interpreted"`` when
    the source is, and :data:`STALE` when the loaded extension is older than the
    source beside it (an editable install, edited since it was built)."""
    from sink import smtp

    if (smtp.__file__ or "").endswith(".py"):
        return "interpreted"
    return STALE if stale_extensions() else "compiled"


def stale_extensions(package: Path | None = None) -> list[Path]:
    """The compiled modules in ``package`` (default: this one) older than their
    ``.py`` source by more than 2 s (a wheel install writes both within milliseconds,
    in any order)."""
    from pathlib import Path

    stale = []
    for compiled in (package or Path(__file__).parent).glob("*.so"):
        source = compiled.with_name(compiled.name.split(".")[0] + ".py")
        if source.exists() and source.stat().st_mtime > compiled.stat().st_mtime + 2.0:
            stale.append(compiled)
    return stale


if os.environ.get("SPAMSINK_INTERPRETED", "") not in ("", "0"):
    from sink import interpreted

    interpreted.install()
