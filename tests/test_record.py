"""The recorder: non-blocking hand-off, batching, drops, flush on close, into real SQLite."""

from __future__ import annotations

import dataclasses
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from sink.record import (
    ROW_FIELDS,
    BatchSums,
    PreparedBatch,
    Recorder,
    SessionRecord,
    StoreBusy,
    as_row,
)
from sink.recording import Recording
from sink.store import SessionFilter, open_reader, open_writer, store_path


def record(ip: str = "192.0.2.1") -> SessionRecord:
    r = SessionRecord(start=time.time(), client_ip=ip, client_port=1, local_ip="127.0.0.1",
                      local_port=25, persona="postfix")
    r.end = r.start
    r.messages = 1
    return r


class Batches:
    """A store's prepare and write that remember batch sizes; the write can be held
    shut or made to fail."""

    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.writes = 0
        self.prepared_on: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail = False
        self.busy = 0  # the next this many writes find the store busy

    def prepare(self, rows: Sequence[tuple]) -> PreparedBatch:
        self.prepared_on.append(threading.current_thread().name)
        messages = ROW_FIELDS.index("messages")
        return PreparedBatch(BatchSums(len(rows), sum(r[messages] for r in rows), 0, 0,
                                       0.0, 0, 0), list(rows))

    def __call__(self, batches: Sequence[PreparedBatch]) -> None:
        self.gate.wait()
        if self.fail:
            raise OSError("disk full")
        if self.busy:
            self.busy -= 1
            raise StoreBusy("the store is locked by another writer")
        self.writes += 1
        self.sizes.extend(batch.sums.sessions for batch in batches)

    def recorder(self, **kw) -> Recorder:
        return Recorder(self.prepare, self, **kw).start()


def test_a_row_holds_every_field_of_a_record():
    assert sorted(ROW_FIELDS) == sorted(f.name for f in dataclasses.fields(SessionRecord))
    r = record("192.0.2.9")
    assert as_row(r) == tuple(getattr(r, name) for name in ROW_FIELDS)


def test_batch_sums_add_field_by_field():
    parts = [BatchSums(1, 2, 3, 4, 0.5, 6, 1), BatchSums(10, 20, 30, 40, 1.5, 60, 0)]
    assert BatchSums.total(parts) == BatchSums(11, 22, 33, 44, 2.0, 66, 1)
    assert BatchSums.total([]) == BatchSums(0, 0, 0, 0, 0.0, 0, 0)


def test_a_full_batch_is_written_without_waiting_for_the_interval():
    batches = Batches()
    recorder = batches.recorder(batch=100, interval=30.0)
    for _ in range(100):
        recorder.submit(record())
    deadline = time.monotonic() + 5
    while not batches.sizes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batches.sizes == [100]
    recorder.close()


def test_full_batches_are_prepared_by_the_submitter_the_rest_by_the_writer():
    batches = Batches()
    recorder = batches.recorder(batch=100, interval=30.0)
    for _ in range(250):
        recorder.submit(record())
    assert batches.prepared_on == ["MainThread", "MainThread"]
    deadline = time.monotonic() + 5
    while sum(batches.sizes) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert batches.sizes == [100, 100] and recorder.depth == 50
    recorder.close()
    assert batches.sizes == [100, 100, 50] and recorder.written == 250
    assert batches.prepared_on == ["MainThread", "MainThread", "spamsink-recorder"]


def test_under_load_batches_share_one_write_per_gap():
    batches = Batches()
    recorder = batches.recorder(batch=10, interval=30.0, gap=0.3)
    for _ in range(10):
        recorder.submit(record())
    deadline = time.monotonic() + 5
    while not batches.writes and time.monotonic() < deadline:
        time.sleep(0.005)
    written_at = time.monotonic()
    for _ in range(40):  # four more batches, ready well inside the gap
        recorder.submit(record())
    while sum(batches.sizes) < 50 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert time.monotonic() - written_at >= 0.2
    assert batches.writes == 2 and batches.sizes == [10] * 5
    recorder.close()


def test_a_partial_batch_is_written_within_the_interval():
    batches = Batches()
    recorder = batches.recorder(batch=1000, interval=0.2)
    recorder.submit(record())
    started = time.monotonic()
    while not batches.sizes and time.monotonic() - started < 5:
        time.sleep(0.01)
    assert batches.sizes == [1]
    assert time.monotonic() - started < 1.0
    recorder.close()


def test_a_full_queue_drops_counts_and_warns_once_per_interval(caplog):
    batches = Batches()
    batches.gate.clear()  # the store is stuck
    recorder = batches.recorder(capacity=10, batch=5, interval=0.05, warn_interval=60)
    caplog.set_level(logging.WARNING, "spamsink.record")
    started = time.perf_counter()
    for _ in range(1000):
        recorder.submit(record())
    elapsed = time.perf_counter() - started
    assert elapsed < 5, "submit waited on the stuck store"
    # Kept at most: 10 records in prepared batches, waiting or taken by the stuck writer
    # (they count until written), fewer than a batch of leftovers the writer took, and
    # fewer than a batch being filled.
    assert recorder.dropped >= 1000 - 10 - 4 - 4
    assert recorder.depth >= 5  # the batch stuck in the write still counts
    warnings = [r for r in caplog.records if "queue full" in r.getMessage()]
    assert len(warnings) == 1
    batches.gate.set()
    recorder.close()
    assert sum(batches.sizes) + recorder.dropped == 1000


def test_close_writes_everything_queued():
    batches = Batches()
    recorder = batches.recorder(batch=64, interval=60.0)
    for _ in range(1000):
        recorder.submit(record())
    recorder.close()
    assert sum(batches.sizes) == 1000
    assert max(batches.sizes) <= 64
    assert recorder.depth == 0


def test_close_without_start_writes_everything_in_the_caller():
    batches = Batches()
    recorder = Recorder(batches.prepare, batches, batch=64)
    for _ in range(100):
        recorder.submit(record())
    recorder.close()
    assert sum(batches.sizes) == 100 and recorder.depth == 0 and recorder.written == 100


def test_a_capacity_below_one_batch_is_raised_to_one_batch():
    batches = Batches()
    recorder = batches.recorder(capacity=10, batch=100, interval=60.0)
    for _ in range(100):
        recorder.submit(record())
    recorder.close()
    assert recorder.capacity == 100 and recorder.dropped == 0 and sum(batches.sizes) == 100


def test_a_failed_write_is_counted_and_the_writer_carries_on(caplog):
    batches = Batches()
    batches.fail = True
    recorder = batches.recorder(batch=10, interval=0.05)
    caplog.set_level(logging.ERROR, "spamsink.record")
    for _ in range(10):
        recorder.submit(record())
    deadline = time.monotonic() + 5
    while recorder.failed < 10 and time.monotonic() < deadline:
        time.sleep(0.01)
    batches.fail = False
    recorder.submit(record())
    recorder.close()
    assert recorder.failed == 10
    assert batches.sizes == [1]
    assert any("could not write" in r.getMessage() for r in caplog.records)


def test_a_busy_store_keeps_the_write_for_the_next(caplog):
    batches = Batches()
    batches.busy = 3
    recorder = batches.recorder(batch=10, interval=0.05)
    caplog.set_level(logging.WARNING, "spamsink.record")
    for _ in range(10):
        recorder.submit(record())
    deadline = time.monotonic() + 5
    while batches.busy and time.monotonic() < deadline:
        assert recorder.depth == 10  # kept, counted, not lost
        time.sleep(0.01)
    for _ in range(5):
        recorder.submit(record())
    recorder.close()
    assert recorder.failed == 0 and recorder.dropped == 0 and recorder.written == 15
    assert sum(batches.sizes) == 15 and recorder.depth == 0
    assert sum("kept for the next write" in r.getMessage() for r in caplog.records) == 1


def test_a_store_still_busy_at_close_counts_the_records_failed(caplog):
    batches = Batches()
    batches.busy = 1_000_000
    recorder = batches.recorder(batch=10, interval=0.05)
    for _ in range(12):
        recorder.submit(record())
    recorder.close()
    assert recorder.failed == 12 and recorder.written == 0 and recorder.depth == 0


def test_a_lock_held_past_the_busy_timeout_loses_no_session(tmp_path: Path):
    writer = open_writer(tmp_path)
    writer.conn.execute("PRAGMA busy_timeout = 100")
    other = sqlite3.connect(store_path(tmp_path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # e.g. an operator's sqlite3 shell, or a long delete
    recorder = Recorder(writer.prepare, writer.write_prepared, batch=10, interval=0.05).start()
    for i in range(25):
        recorder.submit(record(f"192.0.2.{i}"))
    time.sleep(0.5)  # several attempts, each 0.1 s behind the lock
    assert recorder.written == 0 and recorder.depth == 25
    other.execute("COMMIT")
    other.close()
    recorder.close()
    writer.close()
    assert recorder.failed == 0 and recorder.written == 25
    assert len(open_reader(tmp_path).sessions(SessionFilter(), limit=100)) == 25


def test_recording_reaches_sqlite_and_metrics(tmp_path: Path):
    recording = Recording.open(tmp_path, retain=0, active=lambda: 7)
    for i in range(2500):
        recording.records.submit(record(f"192.0.2.{i % 10}"))
    recording.close()
    reader = open_reader(tmp_path)
    assert reader.stats(time.time())["totals"]["sessions"] == 2500
    assert len(reader.sessions(SessionFilter(ip="192.0.2.3"), limit=1000)) == 250
    registry = recording.metrics.registry
    assert registry.get_sample_value("spamsink_sessions_total") == 2500
    assert registry.get_sample_value("spamsink_messages_total") == 2500
    assert registry.get_sample_value("spamsink_active_connections") == 7
    assert registry.get_sample_value("spamsink_store_write_seconds_count") >= 1


def test_retention_runs_in_the_writer(tmp_path: Path):
    recording = Recording.open(tmp_path, retain=86400)
    old = record("192.0.2.1")
    old.start = old.end = time.time() - 2 * 86400
    recording.records.submit(old)
    recording.records.submit(record("192.0.2.2"))
    recording.close()
    # The prune at start ran before the old record arrived; the next one removes it.
    recording = Recording.open(tmp_path, retain=86400)
    recording.close()
    reader = open_reader(tmp_path)
    assert [s["client_ip"] for s in reader.sessions(SessionFilter())] == ["192.0.2.2"]
    assert reader.ip("192.0.2.1") is not None


def test_a_kept_busy_write_counts_against_the_capacity_in_the_quiet_case():
    batches = Batches()
    batches.busy = 1_000_000
    recorder = batches.recorder(batch=100, capacity=250, interval=0.02)
    for _ in range(20):  # fewer than a batch per interval: the writer takes them itself
        for _ in range(40):
            recorder.submit(record())
        time.sleep(0.03)
        assert recorder.depth <= 250 + 40
    deadline = time.monotonic() + 5
    while recorder.dropped < 800 - 250 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert recorder.depth == 250 and recorder.dropped == 800 - 250
    batches.busy = 0
    recorder.close()
    assert recorder.written == 250 and recorder.failed == 0
