"""Coarse deadlines for many sessions on one event-loop timer.

A sink holds tens of thousands of connections, each with an idle deadline and, when
paced, a next-byte time. One ``loop.call_later`` per deadline costs a timer handle
(allocation plus a libuv timer) per connection and per stuttered byte; here each
deadline is a set insertion into a bucket of ``resolution`` seconds, and one repeating
tick fires the due buckets. Deadlines fire up to one ``resolution`` late, never early.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Deadlines(Generic[T]):
    """Calls ``fire(item)`` for every item whose deadline has passed.

    Contract: an item is scheduled at most once (scheduling again moves it); items
    are hashable by identity; ``fire`` may schedule items again (also the one being
    fired), which then fire on a later tick. The tick timer runs only while something
    is scheduled. All calls happen on the loop's thread.
    """

    __slots__ = ("_buckets", "_due", "_fire", "_handle", "_loop", "_next", "resolution")

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float,
                 fire: Callable[[T], object]) -> None:
        if resolution <= 0:
            raise ValueError("resolution must be positive")
        self._loop = loop
        self.resolution = resolution
        self._fire = fire
        self._buckets: dict[int, set[T]] = {}
        self._due: dict[T, int] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._next = 0  # the first bucket not yet fired

    def __len__(self) -> int:
        return len(self._due)

    def schedule(self, item: T, when: float) -> None:
        """Fire ``item`` at loop time ``when`` (rounded up to the resolution)."""
        key = math.ceil(when / self.resolution)
        if item in self._due:
            self.cancel(item)
        if self._handle is None:
            self._next = math.ceil(self._loop.time() / self.resolution)
            self._handle = self._loop.call_later(self.resolution, self._tick)
        key = max(key, self._next)
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
            bucket = self._buckets.get(key)  # None: that bucket is firing now
            if bucket is not None:
                bucket.discard(item)
                if not bucket:
                    del self._buckets[key]

    def _tick(self) -> None:
        now_key = math.floor(self._loop.time() / self.resolution)
        buckets, due, fire = self._buckets, self._due, self._fire
        while self._next <= now_key:
            key = self._next
            self._next = key + 1  # items scheduled while firing land in a later bucket
            bucket = buckets.pop(key, None)
            if bucket is None:
                continue
            for item in bucket:
                if due.get(item) == key:
                    del due[item]
                    fire(item)
        if due:
            self._handle = self._loop.call_later(self.resolution, self._tick)
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
