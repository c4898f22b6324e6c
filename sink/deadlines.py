"""Coarse deadlines for many sessions on one event-loop timer, optionally rate-limited.

A sink holds tens of thousands of connections, each with an idle deadline and, when
paced, a next-byte time. One ``loop.call_later`` per deadline costs a timer handle
(allocation plus a libuv timer) per connection and per stuttered byte; here each
deadline is a set insertion into a bucket of ``resolution`` seconds, and one repeating
tick, at each bucket's end, fires the due buckets. Deadlines fire up to one
``resolution`` late (plus the loop's own lateness), never early.

With a ``rate``, at most that many items fire per second (a token bucket refilled at
every tick): the due items beyond it wait, oldest deadline first. That is how the
tarpit keeps the cost of stuttering to tens of thousands of clients bounded.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: With a rate, this many seconds' worth of fires may happen in one burst.
_BURST_SECONDS = 0.1


class Deadlines(Generic[T]):
    """Calls ``fire(item)`` for every item whose deadline has passed.

    Contract: an item has at most one deadline (scheduling again moves it); items are
    hashable; ``fire`` may schedule or cancel any item, also the one being fired, or
    close the whole thing; what it schedules fires on a later tick. An exception from
    ``fire`` goes to the loop's exception handler and the other items still fire. The
    tick timer runs only while something is scheduled. All calls happen on the loop's
    thread.
    """

    __slots__ = ("_allowance", "_buckets", "_burst", "_due", "_fire", "_floor", "_handle",
                 "_last_tick", "_loop", "_next", "_rate", "resolution")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float,
                 fire: Callable[[T], object], *, rate: float | None = None) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive (or None for no limit)")
        self._loop = loop
        self.resolution = resolution
        self._fire = fire
        self._rate = rate
        self._burst = max(1.0, (rate or 0.0) * max(_BURST_SECONDS, resolution))
        self._allowance = self._burst
        self._last_tick = 0.0
        self._buckets: dict[int, set[T]] = {}
        self._due: dict[T, int] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._next = 0  # the first bucket not yet fired (completely)
        self._floor = 0  # the first bucket a newly scheduled item may go to

    def __len__(self) -> int:
        return len(self._due)

    def schedule(self, item: T, when: float) -> None:
        """Fire ``item`` at loop time ``when`` (rounded up to the resolution)."""
        if item in self._due:
            self.cancel(item)
        if self._handle is None:
            now = self._loop.time()
            self._next = self._floor = math.ceil(now / self.resolution)
            if self._rate is not None:  # the budget refilled while nothing was scheduled
                self._allowance = min(self._burst,
                                      self._allowance + (now - self._last_tick) * self._rate)
            self._last_tick = now
            self._handle = self._loop.call_at(self._next * self.resolution, self._tick)
        key = max(math.ceil(when / self.resolution), self._floor)
        self._due[item] = key
        bucket = self._buckets.get(key)
        if bucket is None:
            self._buckets[key] = {item}
        else:
            bucket.add(item)

    def cancel(self, item: T) -> None:
        """Forget ``item``'s deadline; nothing happens when it has none."""
        key = self._due.pop(item, None)
        if key is not None:
            bucket = self._buckets[key]
            bucket.discard(item)
            if not bucket:
                del self._buckets[key]

    def _tick(self) -> None:
        current = self._handle
        now = self._loop.time()
        now_key = math.floor(now / self.resolution)
        self._floor = now_key + 1  # whatever fire() schedules waits for a later tick
        rate = self._rate
        limited = rate is not None
        if rate is not None:
            self._allowance = min(self._burst, self._allowance + (now - self._last_tick) * rate)
        self._last_tick = now
        buckets, due, fire = self._buckets, self._due, self._fire
        while self._next <= now_key:
            key = self._next
            bucket = buckets.get(key)
            while bucket:
                if limited:
                    if self._allowance < 1.0:
                        self._reschedule(now_key)
                        return
                    self._allowance -= 1.0
                item = bucket.pop()
                del due[item]
                try:
                    fire(item)
                except Exception as exc:  # one failing item must not stop the others
                    self._loop.call_exception_handler({
                        "message": f"deadline callback failed for {item!r}",
                        "exception": exc})
                if self._handle is not current:  # fire() closed (and maybe restarted) us
                    return
            buckets.pop(key, None)
            self._next = key + 1
        self._reschedule(now_key)

    def _reschedule(self, now_key: int) -> None:
        if self._due:  # the next tick at the end of the next bucket
            self._handle = self._loop.call_at((now_key + 1) * self.resolution, self._tick)
        else:
            self._buckets.clear()
            self._handle = None

    def close(self) -> None:
        """Drop every deadline and stop the tick."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._buckets.clear()
        self._due.clear()
