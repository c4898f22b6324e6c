"""Counters and latency histograms of one ``spamsink send`` run, mergeable across processes.

Contract:

* :class:`Histogram` records durations in fixed memory (2,048 buckets) with a relative
  error of at most 1/64 (1.6 %) above 128 microseconds and exact microseconds below;
  the maximum, count and sum are exact. Percentiles are nearest-rank. Samples are
  appended to a buffer (one C call each) and counted into the buckets in bulk by
  :meth:`Histogram.fold`, which every reader calls first (the runner also calls it
  every few hundredths of a second, which bounds the buffer). A fold sorts the buffer
  and counts each bucket's run of samples with one binary search, so its Python work
  is per bucket touched, not per sample.
* :class:`Stats` is written by one event loop only (no locks); worker processes send
  theirs to the parent as :meth:`Stats.to_dict` and the parent adds them with
  :meth:`Stats.merge`.
* Every message that was attempted ends in exactly one of ``sent``, ``failed`` (with
  one ``"<stage> <cause>"`` key in ``failures``) or ``unfinished`` (cut off by the end
  of a hold or an interrupt).
* Every connection made ends under one reason in ``ends`` ("quit", "quit timeout",
  "421", "closed by server", "timeout", "bad reply", ...).
* The run's clock (``elapsed``, which the sending rate divides by) runs from the first
  connection attempt to the last message's outcome (``settled``: its 250 or its
  failure), or to the stop of an interrupted run or a hold: QUIT exchanges after the
  last message (and a QUIT the server never answers) are not counted; a QUIT before a
  sender's next connection is, as that connection waits for it. A ``-t`` run's clock
  runs at least to its deadline: it was sending, or waiting to, until then (also when
  its senders stopped early because their next ``--rate`` turn came after it). A
  process that attempted nothing (a ``--procs`` worker with no share) has no clock
  (``started`` infinite, ``finished`` 0), so a merge ignores it.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from typing import Any

#: Stages of an SMTP session, in dialogue order; latency is kept for each.
STAGES = ("connect", "tls", "greeting", "ehlo", "helo", "starttls", "mail", "rcpt", "data",
          "dot", "bdat", "rset", "quit")
(CONNECT, TLS, GREETING, EHLO, HELO, STARTTLS, MAIL, RCPT, DATA, DOT, BDAT, RSET,
 QUIT) = range(len(STAGES))
#: How the report names a stage.
STAGE_LABELS = {"dot": "end of data", "bdat": "BDAT LAST"}

_BUCKETS = 2048
_MICROS = 1_000_000.0


def _index(us: int) -> int:
    """The bucket of a duration of ``us`` microseconds: exact below 128, then 64
    buckets per power of two."""
    if us < 128:
        return us if us > 0 else 0
    shift = us.bit_length() - 7
    index = (shift << 6) + (us >> shift)
    return index if index < _BUCKETS else _BUCKETS - 1


def _first_micro(index: int) -> int:
    """The least duration in microseconds of bucket ``index`` (0 for bucket 0, which
    also holds negative durations)."""
    if index < 128:
        return index
    shift = (index >> 6) - 1
    return (index - (shift << 6)) << shift


#: Bucket index -> :func:`bucket_end` of it, for the buckets folds have met.
_ENDS: dict[int, float] = {}


def bucket_end(index: int) -> float:
    """The least duration in seconds that falls in a bucket after ``index`` (``inf`` for
    the last): exactly where ``_index(int(seconds * 1e6))`` passes ``index``,
    floating-point rounding included. Computed once per bucket."""
    end = _ENDS.get(index)
    if end is None:
        if index == _BUCKETS - 1:
            end = math.inf
        else:
            upper = _first_micro(index + 1)
            end = upper / _MICROS
            while int(end * _MICROS) >= upper:
                end = math.nextafter(end, -math.inf)
            while int(end * _MICROS) < upper:
                end = math.nextafter(end, math.inf)
        _ENDS[index] = end
    return end


class Histogram:
    """Durations in seconds, stored as log-linear microsecond buckets.

    Recording is cheap: :meth:`add` (or ``pending.append``, a C call, on a hot path)
    only appends to :attr:`pending`; :meth:`fold` counts the pending samples into the
    buckets in bulk (see the module contract). Every reader folds first, so recorded
    samples are never missed.
    """

    __slots__ = ("_count", "_counts", "_max", "_total", "pending")

    def __init__(self) -> None:
        self._counts = [0] * _BUCKETS
        self._count = 0
        self._total = 0.0
        self._max = 0.0
        #: Durations recorded but not yet counted into the buckets (a list: its
        #: ``append`` is cheaper than an ``array``'s, which parses its argument).
        self.pending: list[float] = []

    def add(self, seconds: float) -> None:
        """Record one duration (negative values count as zero)."""
        self.pending.append(seconds)

    def fold(self) -> None:
        """Count the pending samples into the buckets."""
        pending = self.pending
        if not pending:
            return
        self._count += len(pending)
        self._total += sum(pending)
        top = max(pending)
        if top > self._max:
            self._max = top
        counts, ends = self._counts, _ENDS
        pending.sort()
        start, size = 0, len(pending)
        while start < size:
            index = _index(int(pending[start] * _MICROS))
            end = ends.get(index)
            stop = bisect_left(pending, bucket_end(index) if end is None else end, start)
            counts[index] += stop - start
            start = stop
        pending.clear()

    @property
    def counts(self) -> list[int]:
        """Samples per bucket."""
        self.fold()
        return self._counts

    @property
    def count(self) -> int:
        self.fold()
        return self._count

    @property
    def total(self) -> float:
        self.fold()
        return self._total

    @property
    def max(self) -> float:
        self.fold()
        return self._max

    @staticmethod
    def _bucket_value(index: int) -> float:
        """The midpoint of bucket ``index``, in seconds."""
        if index < 128:
            return index / 1_000_000
        shift = (index >> 6) - 1
        return (_first_micro(index) + ((1 << shift) - 1) / 2) / 1_000_000

    def percentile(self, p: float) -> float:
        """The nearest-rank ``p``-th percentile in seconds (0 when empty), at most ``max``."""
        self.fold()
        if not self._count:
            return 0.0
        rank = max(1, math.ceil(p / 100 * self._count))
        seen = 0
        for index, n in enumerate(self._counts):
            seen += n
            if seen >= rank:
                return min(self._bucket_value(index), self._max)
        return self._max

    @property
    def mean(self) -> float:
        self.fold()
        return self._total / self._count if self._count else 0.0

    def merge(self, other: Histogram) -> None:
        """Add ``other``'s samples to this histogram."""
        self.fold()
        other.fold()
        counts = self._counts
        for index, n in enumerate(other._counts):
            if n:
                counts[index] += n
        self._count += other._count
        self._total += other._total
        self._max = max(self._max, other._max)

    def to_dict(self) -> dict[str, Any]:
        self.fold()
        return {"counts": {i: n for i, n in enumerate(self._counts) if n},
                "count": self._count, "total": self._total, "max": self._max}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Histogram:
        hist = cls()
        for index, n in data["counts"].items():
            hist._counts[int(index)] = n
        hist._count, hist._total, hist._max = data["count"], data["total"], data["max"]
        return hist


class Stats:
    """Everything one run measures (see the module contract)."""

    __slots__ = ("bytes_in", "bytes_out", "connections_failed", "connections_made",
                 "delivery", "ends", "extensions", "failed", "failures", "finished",
                 "latency", "sent", "settled", "started", "unfinished")

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
        #: Why connections ended -> how many (see the module contract).
        self.ends: dict[str, int] = {}
        #: perf_counter() of the first connection attempt and of the clock's end (see
        #: the module contract).
        self.started = math.inf
        self.finished = 0.0
        #: perf_counter() of the last message's outcome (sent or failed).
        self.settled = 0.0

    def histograms(self) -> list[Histogram]:
        """Every histogram: one per stage, then delivery."""
        return [*self.latency, self.delivery]

    def fail(self, stage: int, cause: str) -> None:
        """Count one failed message, failed at ``stage`` because of ``cause``."""
        self.failed += 1
        self.settled = time.perf_counter()
        key = f"{STAGES[stage]} {cause}"
        self.failures[key] = self.failures.get(key, 0) + 1

    def used(self, extension: str) -> None:
        """Count one connection that used ``extension``."""
        self.extensions[extension] = self.extensions.get(extension, 0) + 1

    @property
    def elapsed(self) -> float:
        """Seconds the run's clock ran (see the module contract)."""
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
        for key, n in other.ends.items():
            self.ends[key] = self.ends.get(key, 0) + n
        for mine, theirs in zip(self.latency, other.latency, strict=True):
            mine.merge(theirs)
        self.delivery.merge(other.delivery)
        self.started = min(self.started, other.started)
        self.finished = max(self.finished, other.finished)
        self.settled = max(self.settled, other.settled)

    def to_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "failed": self.failed, "unfinished": self.unfinished,
            "failures": dict(self.failures), "connections_made": self.connections_made,
            "connections_failed": self.connections_failed, "bytes_out": self.bytes_out,
            "bytes_in": self.bytes_in, "latency": [h.to_dict() for h in self.latency],
            "delivery": self.delivery.to_dict(), "extensions": dict(self.extensions),
            "ends": dict(self.ends), "started": self.started, "finished": self.finished,
            "settled": self.settled,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stats:
        stats = cls()
        for name in ("sent", "failed", "unfinished", "connections_made", "connections_failed",
                     "bytes_out", "bytes_in", "started", "finished", "settled"):
            setattr(stats, name, data[name])
        stats.failures = dict(data["failures"])
        stats.ends = dict(data["ends"])
        stats.extensions = dict(data["extensions"])
        stats.latency = [Histogram.from_dict(h) for h in data["latency"]]
        stats.delivery = Histogram.from_dict(data["delivery"])
        return stats
