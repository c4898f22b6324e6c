"""Wiring of recording and the API into ``spamsink serve``.

One sink process's recording: the store writer, the recorder, metrics, retention.

Contract: :meth:`Recording.open` creates (or migrates) the store in ``--data`` and
fails with :class:`~sink.store.StoreError` saying why; ``records`` is the engine's
non-blocking :class:`~sink.record.RecordSink`; :meth:`close` writes everything still
queued. Retention runs in the writer thread at start and then hourly, deleting
sessions older than ``retain`` seconds (0 keeps them forever). With ``--workers N``
each worker process has its own Recording on the same SQLite file: writes take the
write lock per batch (``BEGIN IMMEDIATE`` with a busy timeout) and aggregates are
UPSERT increments, so no update is lost.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from sink.metrics import MULTIPROC_ENV, SinkMetrics, exposition, mark_worker_dead
from sink.record import PreparedBatch, Recorder
from sink.store import StoreWriter, ensure_store, open_reader, open_writer

if TYPE_CHECKING:
    from sink.api import ApiServer, ApiThread
    from sink.server import Settings

log = logging.getLogger("spamsink.record")

PRUNE_EVERY = 3600.0


class Recording:
    """Store writer + :class:`Recorder` + :class:`SinkMetrics` of one process."""

    def __init__(self, writer: StoreWriter, *, retain: float,
                 active: Callable[[], int] = lambda: 0,
                 metrics: SinkMetrics | None = None) -> None:
        self.writer = writer
        self.retain = retain
        self.active = active
        self.metrics = metrics or SinkMetrics()
        self._next_prune = 0.0
        self.records = Recorder(writer.prepare, writer.write_prepared, on_tick=self._tick,
                                on_batch=self._batch)

    @classmethod
    def open(cls, data: Path, *, retain: float, active: Callable[[], int] = lambda: 0,
             ) -> Recording:
        """Open the store in ``data`` and start the writer thread."""
        recording = cls(open_writer(data), retain=retain, active=active)
        recording.records.start()
        return recording

    def sample(self) -> None:
        """Refresh the gauges (also called before a scrape in a one-process sink)."""
        records = self.records
        self.metrics.sample(active=self.active(), queue_depth=records.depth,
                            dropped=records.dropped, failed=records.failed)

    def _batch(self, batches: Sequence[PreparedBatch], seconds: float) -> None:
        self.metrics.record_batch(batches, seconds)

    def _tick(self) -> None:
        self.sample()
        now = time.time()
        if self.retain and now >= self._next_prune:
            self._next_prune = now + PRUNE_EVERY
            deleted = self.writer.prune(now - self.retain)
            if deleted:
                log.info("retention: deleted %d sessions older than %.0f days", deleted,
                         self.retain / 86400)

    def close(self) -> None:
        """Write everything queued, stop the writer thread, close the store."""
        self.records.close()
        self.writer.close()


async def start_api(settings: Settings, recording: Recording | None) -> ApiServer | None:
    """The API of a one-process sink on ``settings.api`` (``None`` when off); /metrics
    samples ``recording`` at each scrape. ``ValueError`` saying why when it cannot listen."""
    if settings.api is None:
        return None
    from sink.api import Api, ApiServer  # aiohttp: ~0.2 s to import, only where it serves

    if recording is None:
        scrape = lambda: exposition(None)  # noqa: E731
    else:
        def scrape() -> tuple[bytes, str]:
            recording.sample()
            return exposition(recording.metrics.registry)
    ensure_store(settings.data)  # also with --no-record: the API serves what is stored
    server = ApiServer(Api(open_reader(settings.data), settings.api_token, scrape),
                       settings.api.host, settings.api.port)
    try:
        await server.start()
    except OSError as exc:
        raise ValueError(api_bind_advice(str(settings.api), exc)) from None
    return server


def api_bind_advice(address: str, exc: OSError) -> str:
    """One line saying why the API cannot listen on ``address`` and what to do."""
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot serve the API on {address}: the address is in use (another "
                f"spamsink?); choose another --api address or --api off")
    return f"cannot serve the API on {address}: {exc.strerror or exc}"


class WorkerFleet:
    """What the ``--workers`` supervisor adds for recording: it creates (migrates) the
    store once before the workers start, points their metrics at one
    prometheus-client multiprocess directory, and serves the API in a thread, reading
    the store the workers write and summing their metrics."""

    def __init__(self, settings: Settings) -> None:
        ensure_store(settings.data)  # once, before the workers race to create it
        self.metrics_dir = tempfile.mkdtemp(prefix="spamsink-metrics-")
        os.environ[MULTIPROC_ENV] = self.metrics_dir
        self.api: ApiThread | None = None
        if settings.api is not None:
            from sink.api import Api, ApiServer, ApiThread

            api = Api(open_reader(settings.data), settings.api_token,
                      lambda: exposition(None, self.metrics_dir))
            self.api = ApiThread(ApiServer(api, settings.api.host, settings.api.port))
            try:
                self.api.start()
            except OSError as exc:
                self.close()
                raise ValueError(api_bind_advice(str(settings.api), exc)) from None

    def worker_exited(self, pid: int) -> None:
        """Forget the live gauges of a worker that exited."""
        mark_worker_dead(pid)

    def close(self) -> None:
        """Stop the API and remove the metrics directory."""
        if self.api is not None:
            self.api.stop()
        os.environ.pop(MULTIPROC_ENV, None)
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
