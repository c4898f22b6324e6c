"""Which messages may start, and when: ticket pools and pacers for ``spamsink send``.

Contract:

* A pool hands out tickets, one per message to attempt. :meth:`reserve` takes up to
  ``n`` at once (a connection's ``-m`` messages) and returns how many it got;
  :meth:`give_back` returns tickets that were taken but never put on the wire, so
  ``-n N`` attempts exactly N messages however connections end; :meth:`open` says
  whether a reserved ticket may still be used now, :meth:`open_at` whether a message
  paced to start at a later ``time.perf_counter()`` time may still start then.
  :class:`CountPool` holds N tickets; :class:`DeadlinePool` gives tickets until a
  ``time.perf_counter()`` deadline. :meth:`close` makes every later ``reserve``,
  ``open`` and ``open_at`` fail.
* A pacer's :meth:`delay` says how many seconds the next message must wait before it
  starts (never busy-waits: callers sleep on the event loop). :class:`RatePacer`
  spaces message starts ``1/rate`` apart over the whole process; :class:`PausePacer`
  waits a fixed pause (hold mode's patient spammer).
Only one event loop uses each object: no locks.
"""

from __future__ import annotations

import time


class CountPool:
    """Exactly ``total`` tickets."""

    __slots__ = ("closed", "remaining")

    def __init__(self, total: int) -> None:
        self.remaining = total
        self.closed = False

    def reserve(self, n: int) -> int:
        if self.closed:
            return 0
        got = n if n < self.remaining else self.remaining
        self.remaining -= got
        return got

    def open(self) -> bool:
        return not self.closed

    def open_at(self, when: float) -> bool:
        return not self.closed

    def give_back(self, n: int = 1) -> None:
        self.remaining += n

    def close(self) -> None:
        self.closed = True


class DeadlinePool:
    """Tickets for every message that starts before ``deadline`` (perf_counter time)."""

    __slots__ = ("closed", "deadline")

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.closed = False

    @property
    def remaining(self) -> int:
        return 0

    def reserve(self, n: int) -> int:
        return n if self.open() else 0

    def open(self) -> bool:
        return not self.closed and time.perf_counter() < self.deadline

    def open_at(self, when: float) -> bool:
        return not self.closed and when < self.deadline

    def give_back(self, n: int = 1) -> None:
        """Nothing to return: time-limited runs count what they attempted."""

    def close(self) -> None:
        self.closed = True


class RatePacer:
    """Message starts spaced ``1/rate`` seconds apart, shared by all senders of a process."""

    __slots__ = ("_interval", "_next")

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    def delay(self) -> float:
        now = time.perf_counter()
        start = self._next if self._next > now else now
        self._next = start + self._interval
        return start - now


class PausePacer:
    """The same pause before every message after a connection's first."""

    __slots__ = ("_pause",)

    def __init__(self, pause: float) -> None:
        self._pause = pause

    def delay(self) -> float:
        return self._pause
