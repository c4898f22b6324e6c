"""Query parameters shared by the HTTP API and ``spamsink ips``: parsing and cursors.

Every parser takes the text a user typed and returns a value or raises
:class:`BadParameter` naming the parameter and saying what is accepted.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from sink.record import Flag
from sink.store import SORTS, IpFilter, SessionFilter, canonical_ip

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


class BadParameter(ValueError):
    """A query parameter has a bad value; ``name`` is the parameter."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def parse_time(name: str, text: str, now: float | None = None) -> float:
    """Unix seconds (``1764150000``), ISO 8601 (``2026-11-26T10:00:00Z``; no zone means
    UTC) or an age (``90s``, ``30m``, ``24h``, ``7d``, ``2w``: that long before now).
    Always finite: ``nan``, ``inf`` and numbers beyond a float (``1e400``) are refused."""
    text = text.strip()
    age = text[:-1]
    digits = age.isascii() and age.replace(".", "", 1).isdigit()  # not "²", which isdigit()
    unit = _UNITS.get(text[-1:].lower()) if digits else None
    number: float | None = None
    if unit is not None:
        number = (time.time() if now is None else now) - float(text[:-1]) * unit
    else:
        with contextlib.suppress(ValueError):
            number = float(text)
    if number is not None:
        if not math.isfinite(number):
            raise BadParameter(name, f"not a finite time: {text!r}")
        return number
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadParameter(name, f"not a time: {text!r} (use Unix seconds, ISO 8601 such as "
                           "2026-11-26T10:00:00Z, or an age such as 30m, 24h, 7d)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_count(name: str, text: str, *, low: int = 0, high: int | None = None) -> int:
    """A whole number in [low, high]."""
    try:
        value = int(text.strip())
    except ValueError:
        raise BadParameter(name, f"not a whole number: {text!r}") from None
    if value < low or (high is not None and value > high):
        limits = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise BadParameter(name, f"must be {limits}, not {value}")
    return value


def parse_flags(name: str, texts: list[str]) -> int:
    """Flag names, comma-separated or repeated; the result has every one of them set."""
    value = 0
    for text in texts:
        for part in text.split(","):
            if part.strip():
                try:
                    value |= Flag.parse(part.strip())
                except ValueError as exc:
                    raise BadParameter(name, str(exc)) from None
    return value


def parse_ip(name: str, text: str) -> str:
    """An IPv4 or IPv6 address, in the store's canonical form."""
    try:
        return canonical_ip(text)
    except ValueError:
        raise BadParameter(name, f"not an IP address: {text!r}") from None


def parse_choice(name: str, text: str, choices: tuple[str, ...]) -> str:
    """One of ``choices``."""
    if text not in choices:
        raise BadParameter(name, f"must be one of {', '.join(choices)}, not {text!r}")
    return text


def encode_cursor(*values: object) -> str:
    """An opaque cursor holding ``values`` (JSON, base64url)."""
    raw = json.dumps(values, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(name: str, text: str, shape: tuple[type, ...]) -> tuple:
    """The values of a cursor made by :func:`encode_cursor`, checked against ``shape``
    (a type or tuple of types per value); numbers are finite and fit in 64 bits."""
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        values = json.loads(raw, parse_constant=_no_constant)
    except (binascii.Error, ValueError):
        raise BadParameter(name, "not a cursor this API returned") from None
    if (not isinstance(values, list) or len(values) != len(shape)
            or not all(isinstance(v, t) and not isinstance(v, bool)
                       and (not isinstance(v, int) or abs(v) < 2**63)
                       and (not isinstance(v, float) or math.isfinite(v))
                       for v, t in zip(values, shape, strict=True))):
        raise BadParameter(name, "not a cursor this API returned")
    return tuple(values)


def _no_constant(word: str) -> float:
    raise ValueError(f"{word} in a cursor")


@dataclass(frozen=True, slots=True)
class IpQuery:
    """A parsed ``ips``/``export`` query."""

    filter: IpFilter
    sort: str = "last_seen"


def ip_query(get: dict[str, list[str]], now: float | None = None) -> IpQuery:
    """An :class:`IpQuery` from the parameters ``since``, ``until``, ``min_messages``,
    ``flag`` (repeatable), ``family`` and ``sort`` (each a list of the values given)."""
    def one(name: str) -> str | None:
        values = get.get(name)
        return values[-1] if values else None

    since, until = one("since"), one("until")
    minimum, family, sort = one("min_messages"), one("family"), one("sort")
    flt = IpFilter(
        since=parse_time("since", since, now) if since is not None else None,
        until=parse_time("until", until, now) if until is not None else None,
        min_messages=(parse_count("min_messages", minimum, high=2**62)
                      if minimum is not None else 0),
        flags=parse_flags("flag", get.get("flag", [])),
        family=int(parse_choice("family", family, ("4", "6"))) if family is not None else None,
    )
    return IpQuery(flt, parse_choice("sort", sort, SORTS) if sort is not None else "last_seen")


def session_filter(get: dict[str, list[str]], now: float | None = None) -> SessionFilter:
    """A :class:`SessionFilter` from ``ip``, ``since``, ``until`` and ``flag``."""
    def one(name: str) -> str | None:
        values = get.get(name)
        return values[-1] if values else None

    ip, since, until = one("ip"), one("since"), one("until")
    return SessionFilter(
        ip=parse_ip("ip", ip) if ip is not None else None,
        since=parse_time("since", since, now) if since is not None else None,
        until=parse_time("until", until, now) if until is not None else None,
        flags=parse_flags("flag", get.get("flag", [])),
    )


def iso(seconds: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds: ``2026-11-26T10:00:00.123Z``."""
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"
