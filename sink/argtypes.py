"""Argument types shared by the command lines (``spamsink``, ``spamsink ips``, ``netdrop``).

Each takes the option's text and returns the value, or raises
``argparse.ArgumentTypeError`` with a short reason that argparse prints after the
option's name.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type[int] | type[float]) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a {'whole number' if kind is int else 'number'}: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    value = int(_number(text, int))
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def count(text: str) -> int:
    """A whole number of at least 0."""
    value = int(_number(text, int))
    if value < 0:
        raise argparse.ArgumentTypeError(f"cannot be negative: {text!r}")
    return value


def positive_float(text: str) -> float:
    """A number above 0."""
    value = _number(text, float)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


def fraction(text: str) -> float:
    """A probability: a number from 0 to 1."""
    value = _number(text, float)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def port(text: str) -> int:
    """A TCP port, 1-65535."""
    value = int(_number(text, int))
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"port out of range: {text!r}")
    return value


def seconds(text: str) -> float:
    """Seconds, or a number with a unit: 30s, 5m, 2h, 30d."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    scale = units.get(text[-1:])
    number = text[:-1] if scale else text
    try:
        value = float(number) * (scale or 1)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (use 30, 30s, 5m, 2h, 30d)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def size(text: str) -> int:
    """A byte count, optionally with k/M/G (powers of 1024)."""
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    text = text.strip().lower().removesuffix("b")
    scale = units.get(text[-1:])
    try:
        value = int(float(text[:-1] if scale else text) * (scale or 1))
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use 1024, 64k, 10M)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte: {text!r}")
    return value
