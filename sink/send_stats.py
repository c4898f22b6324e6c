"""Counters and latency histograms of one ``spamsink send`` run, mergeable across processes.

Contract:

* :class:`Histogram` records durations in fixed memory (2,048 buckets) with a relative
  error of at most 1/64 (1.6 %) above 128 microseconds and exact microseconds below;
  the maximum, count and sum are exact. Percentiles are nearest-rank.
* :class:`Stats` is written by one event loop only (no locks); worker processes send
  theirs to the parent as :meth:`Stats.to_dict` and the parent adds them with
  :meth:`Stats.merge`.
* Every message that was attempted ends in exactly one of ``sent``, ``failed`` (with
  one ``"<stage> <cause>"`` key in ``failures``) or ``unfinished`` (cut off by the end
  of a hold or an interrupt).
"""

from __future__ import annotations

import math
from typing import Any

#: Stages of an SMTP session, in dialogue order; latency is kept for each.
STAGES = ("connect", "tls", "greeting", "ehlo", "helo", "starttls", "mail", "rcpt", "data",
          "dot", "bdat", "rset", "quit")
(CONNECT, TLS, GREETING, EHLO, HELO, STARTTLS, MAIL, RCPT, DATA, DOT, BDAT, RSET,
 QUIT) = range(len(STAGES))
#: How the report names a stage.
STAGE_LABELS = {"dot": "end of data", "bdat": "BDAT LAST"}

_BUCKETS = 2048


class Histogram:
    """Durations in seconds, stored as log-linear microsecond buckets."""

    __slots__ = ("count", "counts", "max", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        """Record one duration (negative values count as zero)."""
        us = int(seconds * 1_000_000)
        if us < 128:
            index = us if us > 0 else 0
        else:
            shift = us.bit_length() - 7
            index = (shift << 6) + (us >> shift)
            if index >= _BUCKETS:
                index = _BUCKETS - 1
        self.counts[index] += 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    @staticmethod
    def _bucket_value(index: int) -> float:
        """The midpoint of bucket ``index``, in seconds."""
        if index < 128:
            return index / 1_000_000
        shift = (index >> 6) - 1
        low = (index - (shift << 6)) << shift
        return (low + ((1 << shift) - 1) / 2) / 1_000_000

    def percentile(self, p: float) -> float:
        """The nearest-rank ``p``-th percentile in seconds (0 when empty), at most ``max``."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(p / 100 * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(self._bucket_value(index), self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s samples to this histogram."""
        counts = self.counts
        for index, n in enumerate(other.counts):
            if n:
                counts[index] += n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def to_dict(self) -> dict[str, Any]:
        return {"counts": {i: n for i, n in enumerate(self.counts) if n},
                "count": self.count, "total": self.total, "max": self.max}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        hist = cls()
        for index, n in data["counts"].items():
            hist.counts[int(index)] = n
        hist.count, hist.total, hist.max = data["count"], data["total"], data["max"]
        return hist


class Stats:
    """Everything one run measures (see the module contract)."""

    __slots__ = ("bytes_in", "bytes_out", "connections_failed", "connections_made",
                 "delivery", "extensions", "failed", "failures", "finished", "latency",
                 "sent", "started", "unfinished")

    def __init__(self) -> None:
        self.sent = 0
        self.failed = 0
        self.unfinished = 0
        self.failures: dict[str, int] = {}
        self.connections_made = 0
        self.connections_failed = 0
        self.bytes_out = 0
        self.bytes_in = 0
        self.latency = [Histogram() for _ in STAGES]
        #: Per message: from its start (connect for a connection's first) to its 250.
        self.delivery = Histogram()
        #: Extension name -> connections on which it was used (PIPELINING, CHUNKING, ...).
        self.extensions: dict[str, int] = {}
        #: perf_counter() of the first connection attempt and of the last close.
        self.started = math.inf
        self.finished = 0.0

    def fail(self, stage: int, cause: str) -> None:
        """Count one failed message, failed at ``stage`` because of ``cause``."""
        self.failed += 1
        key = f"{STAGES[stage]} {cause}"
        self.failures[key] = self.failures.get(key, 0) + 1

    def used(self, extension: str) -> None:
        """Count one connection that used ``extension``."""
        self.extensions[extension] = self.extensions.get(extension, 0) + 1

    @property
    def elapsed(self) -> float:
        """Seconds from the first connection attempt to the last close."""
        return max(0.0, self.finished - self.started) if self.finished else 0.0

    def merge(self, other: Stats) -> None:
        """Add ``other`` (another process's or another phase's stats) to these."""
        for name in ("sent", "failed", "unfinished", "connections_made",
                     "connections_failed", "bytes_out", "bytes_in"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for key, n in other.failures.items():
            self.failures[key] = self.failures.get(key, 0) + n
        for key, n in other.extensions.items():
            self.extensions[key] = self.extensions.get(key, 0) + n
        for mine, theirs in zip(self.latency, other.latency, strict=True):
            mine.merge(theirs)
        self.delivery.merge(other.delivery)
        self.started = min(self.started, other.started)
        self.finished = max(self.finished, other.finished)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "failed": self.failed, "unfinished": self.unfinished,
            "failures": dict(self.failures), "connections_made": self.connections_made,
            "connections_failed": self.connections_failed, "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in, "latency": [h.to_dict() for h in self.latency],
            "delivery": self.delivery.to_dict(), "extensions": dict(self.extensions),
            "started": self.started, "finished": self.finished,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        stats = cls()
        for name in ("sent", "failed", "unfinished", "connections_made", "connections_failed",
                     "bytes_out", "bytes_in", "started", "finished"):
            setattr(stats, name, data[name])
        stats.failures = dict(data["failures"])
        stats.extensions = dict(data["extensions"])
        stats.latency = [Histogram.from_dict(h) for h in data["latency"]]
        stats.delivery = Histogram.from_dict(data["delivery"])
        return stats
