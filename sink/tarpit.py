"""Pacing policy: how long the engine waits before each reply, and how fast it sends it.

The engine asks :meth:`Tarpit.pacer_for` once per connection. ``None`` means "no
pacing": the engine then never touches a timer for replies (the hot path). Otherwise
the returned :class:`Pacer` answers, for each reply, how long to wait before it and
at how many bytes per second to send it (0 = all at once).
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, replace


class Stage(enum.IntEnum):
    """Where in the dialogue a reply is sent."""

    GREETING = 0
    COMMAND = 1
    END_OF_DATA = 2


@dataclass(frozen=True, slots=True)
class Pacing:
    """Delays (seconds) and stutter rate (bytes/s, 0 = off), each with relative jitter."""

    greeting_delay: float = 0.0
    command_delay: float = 0.0
    data_delay: float = 0.0
    stutter_bps: float = 0.0
    jitter: float = 0.0

    @property
    def active(self) -> bool:
        """True when any reply is delayed or stuttered."""
        return bool(self.greeting_delay or self.command_delay or self.data_delay or self.stutter_bps)


PRESETS: dict[str, Pacing] = {
    "off": Pacing(),
    "polite": Pacing(greeting_delay=2.0, command_delay=0.5, data_delay=2.0, jitter=0.3),
    "spamd": Pacing(greeting_delay=1.0, stutter_bps=1.0, jitter=0.2),
    "max": Pacing(greeting_delay=30.0, command_delay=20.0, data_delay=60.0, stutter_bps=1.0,
                  jitter=0.3),
}


def pacing_from_options(preset: str, **overrides: float | None) -> Pacing:
    """The named preset with every override that is not ``None`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tarpit preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    changes = {key: value for key, value in overrides.items() if value is not None}
    return replace(PRESETS[preset], **changes)


class Pacer:
    """Per-connection pacing decisions, drawn with jitter from a :class:`Pacing`."""

    __slots__ = ("_pacing", "_random")

    def __init__(self, pacing: Pacing, rng: random.Random) -> None:
        self._pacing = pacing
        self._random = rng

    def _jittered(self, value: float) -> float:
        if not value or not self._pacing.jitter:
            return value
        spread = value * self._pacing.jitter
        return max(0.0, value + self._random.uniform(-spread, spread))

    def delay(self, stage: Stage) -> float:
        """Seconds to wait before sending the reply of ``stage``."""
        pacing = self._pacing
        if stage is Stage.GREETING:
            return self._jittered(pacing.greeting_delay)
        if stage is Stage.END_OF_DATA:
            return self._jittered(pacing.data_delay)
        return self._jittered(pacing.command_delay)

    def byte_interval(self) -> float:
        """Seconds between reply bytes (0 = send the reply in one write)."""
        if not self._pacing.stutter_bps:
            return 0.0
        return self._jittered(1.0 / self._pacing.stutter_bps)


class Tarpit:
    """Decides which connections are paced. Shared by all sessions of a server."""

    def __init__(self, pacing: Pacing, rng: random.Random | None = None) -> None:
        self.pacing = pacing
        self._random = rng or random.Random()

    def pacer_for(self, client_ip: str) -> Pacer | None:
        """The pacer for a new connection from ``client_ip``; ``None`` when unpaced."""
        if not self.pacing.active:
            return None
        return Pacer(self.pacing, self._random)
