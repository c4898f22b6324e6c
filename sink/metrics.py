"""Prometheus metrics of the sink (prometheus-client), never labelled by IP address.

Contract: a :class:`SinkMetrics` belongs to one sink process and is updated only by
that process's recorder writer thread (``record_batch`` after every write, from the
sums each batch got when it was prepared; ``sample`` at every wake-up, at least once a
second), so the SMTP path pays nothing.
With ``--workers N`` every worker's values live in prometheus-client's multiprocess
directory (``PROMETHEUS_MULTIPROC_DIR``, set by the supervisor before it starts the
workers); :func:`exposition` then sums the workers: counters over every process that
ever ran, gauges over live ones.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from sink.record import BatchSums, PreparedBatch

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


class SinkMetrics:
    """The metrics one sink process exports."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        kw = {"registry": self.registry}
        self.sessions = Counter("spamsink_sessions", "SMTP sessions recorded", **kw)
        self.messages = Counter("spamsink_messages", "messages accepted (and discarded)", **kw)
        self.recipients = Counter("spamsink_recipients", "recipients accepted", **kw)
        self.bytes = Counter("spamsink_received_bytes", "bytes received from clients", **kw)
        self.active = Gauge("spamsink_active_connections", "open SMTP connections",
                            multiprocess_mode="livesum", **kw)
        self.queue = Gauge("spamsink_recorder_queue_depth",
                           "session records waiting to be written", multiprocess_mode="livesum",
                           **kw)
        self.dropped = Counter("spamsink_recorder_dropped",
                               "session records dropped because the recorder queue was full", **kw)
        self.failed = Counter("spamsink_recorder_failed",
                              "session records lost to a failed store write", **kw)
        self.write_seconds = Histogram(
            "spamsink_store_write_seconds",
            "time of one store write (one transaction of one or more batches of records)",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            **kw)
        # The asymmetry: what senders paid (held seconds, segments) against our CPU.
        self.held = Counter("spamsink_held_seconds", "seconds senders waited on the tarpit",
                            **kw)
        self.segments = Counter("spamsink_segments_in",
                                "TCP segments received from clients (TCP_INFO at close)", **kw)
        self.tarpitted = Counter("spamsink_tarpitted_sessions", "sessions paced by the tarpit",
                                 **kw)
        self.cpu = Counter("spamsink_cpu_seconds",
                           "CPU seconds of the sink processes (every thread)", **kw)
        self._cpu_mark = time.process_time()
        self._dropped_seen = 0
        self._failed_seen = 0
        self._lock = threading.Lock()

    def record_batch(self, batches: Sequence[PreparedBatch], seconds: float) -> None:
        """Count the sessions of a write and how long the write took."""
        sessions, messages, recipients, size, held, segments, tarpitted = BatchSums.total(
            batch.sums for batch in batches)
        self.held.inc(held)
        self.segments.inc(segments)
        self.tarpitted.inc(tarpitted)
        cpu = time.process_time()
        self.cpu.inc(max(0.0, cpu - self._cpu_mark))
        self._cpu_mark = cpu
        self.sessions.inc(sessions)
        self.messages.inc(messages)
        self.recipients.inc(recipients)
        self.bytes.inc(size)
        self.write_seconds.observe(seconds)

    def sample(self, *, active: int, queue_depth: int, dropped: int, failed: int) -> None:
        """Set the gauges; ``dropped``/``failed`` are running totals of the recorder.
        Safe to call from several threads (the writer, and a scrape)."""
        with self._lock:
            self.active.set(active)
            self.queue.set(queue_depth)
            if dropped > self._dropped_seen:
                self.dropped.inc(dropped - self._dropped_seen)
                self._dropped_seen = dropped
            if failed > self._failed_seen:
                self.failed.inc(failed - self._failed_seen)
                self._failed_seen = failed


def exposition(registry: CollectorRegistry | None, multiproc_dir: str | None = None,
               ) -> tuple[bytes, str]:
    """The text exposition and its content type: of ``registry`` (one process), or of
    every worker's files in ``multiproc_dir``."""
    if multiproc_dir:
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=multiproc_dir)
    return generate_latest(registry or CollectorRegistry()), CONTENT_TYPE_LATEST


def mark_worker_dead(pid: int) -> None:
    """Drop the live gauges of a worker that exited (multiprocess mode)."""
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, path)
