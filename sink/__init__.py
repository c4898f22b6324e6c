"""spamsink: a memory hole for spam."""

from pathlib import Path

__version__ = "0.1.0"


def engine_build() -> str:
    """How this installation runs the SMTP engine (``sink/smtp.py``): ``"compiled"``
    when the C extension mypyc built at install time is loaded (setup.py), else
    ``"interpreted"``. Both run the same source."""
    from sink import smtp

    return "interpreted" if Path(smtp.__file__ or "").suffix == ".py" else "compiled"
