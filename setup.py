"""Build hook: compile the SMTP engine (``sink/smtp.py``) to a C extension with mypyc.

Everything else about the package is in pyproject.toml. The engine is the one module
on the sink's per-command path; compiled, the sink's CPU per message drops by a sixth
to a quarter (BENCHMARKS.md, "The sink against smtp-sink and aiosmtpd"). The source
stays plain Python and is the same program interpreted:

- without a C compiler and Python's headers (Debian: ``gcc python3-dev``) the build
  of the extension fails, is reported by pip as a warning, and the package installs
  with the engine interpreted;
- ``SPAMSINK_PURE=1`` at install time skips the compilation on purpose.

``spamsink version`` says which engine an installation runs.
"""

from __future__ import annotations

import os

from setuptools import Extension, setup

#: The modules compiled, beside their sources. (``spamsink send``'s session was tried
#: too: its CPU per message did not move, the system calls dominate it.)
COMPILED = ["sink/smtp.py"]


def compiled_extensions() -> list[Extension]:
    """The extensions of ``COMPILED``, optional; none with ``SPAMSINK_PURE=1``."""
    if os.environ.get("SPAMSINK_PURE", "") not in ("", "0"):
        return []
    from mypyc.build import mypycify  # a build requirement (pyproject.toml)

    extensions = mypycify(COMPILED, opt_level="3", separate=True)  # no shared top-level lib
    for extension in extensions:
        extension.optional = True  # no compiler: install the interpreted engine
    return extensions


setup(ext_modules=compiled_extensions())
