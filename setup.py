"""Build hook: compile the SMTP engine (``sink/smtp.py``) to a C extension with mypyc.

Everything else about the package is in pyproject.toml. The engine is the one module
on the sink's per-command path; compiled, the sink's CPU per message drops by a sixth
to a quarter (BENCHMARKS.md, "The sink against smtp-sink and aiosmtpd"). The source
stays plain Python and is the same program interpreted, which is what installs when:

- ``SPAMSINK_PURE=1`` is set (on purpose);
- mypy's check of the engine fails (mypyc compiles only code that type-checks);
- the C build fails, e.g. without a C compiler and Python's headers (Debian: ``gcc
  python3-dev``). All or nothing: the extension is a small module plus the compiled
  code, and one without the other would not import.

A fallback says why on stderr (``pip install -v`` shows it) and removes compiled
engines left beside the source by an earlier editable install, so Python does not
load a stale one. ``SPAMSINK_REQUIRE_COMPILED=1`` makes a fallback fail the install
instead (CI sets it). ``spamsink version`` says which engine an installation runs.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

#: The modules compiled, beside their sources. (``spamsink send``'s session was tried
#: too: its CPU per message did not move, the system calls dominate it.)
COMPILED = ["sink/smtp.py"]
HERE = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def fall_back(reason: str) -> None:
    """Install the engine interpreted, saying why; or fail under
    ``SPAMSINK_REQUIRE_COMPILED``."""
    if _flag("SPAMSINK_REQUIRE_COMPILED"):
        raise SystemExit(f"spamsink: cannot compile the SMTP engine: {reason}")
    print(f"spamsink: the SMTP engine will run interpreted: {reason}", file=sys.stderr)
    for source in COMPILED:  # an editable install's earlier build, now stale
        module = HERE / source
        for stale in module.parent.glob(f"{module.stem}*.so"):
            stale.unlink()


class BuildAllOrNothing(build_ext):
    """Build the compiled engine's extensions; if any part fails, none is installed."""

    def build_extensions(self) -> None:
        try:
            super().build_extensions()
        except (BaseError, CCompilerError, OSError) as exc:
            for extension in self.extensions:
                Path(self.get_ext_fullpath(extension.name)).unlink(missing_ok=True)
            fall_back(f"building it failed ({exc})")


def compiled_extensions() -> list[Extension]:
    """The extensions of ``COMPILED``; none when the engine will run interpreted."""
    if _flag("SPAMSINK_PURE"):
        fall_back("SPAMSINK_PURE is set")
        return []
    from mypyc.build import mypycify  # a build requirement (pyproject.toml)

    try:
        return mypycify(COMPILED, opt_level="3", separate=True)  # no top-level runtime lib
    except SystemExit:  # mypy printed the type errors
        fall_back("mypy's check of it failed (errors above)")
        return []


setup(ext_modules=compiled_extensions(), cmdclass={"build_ext": BuildAllOrNothing})
