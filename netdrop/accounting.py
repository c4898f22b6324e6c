"""Per-sender packet accounting: counters in memory, flushed to SQLite once a second.

The consumer thread owns the :class:`Ledger` (no locks on the packet path); every flush
it takes the senders whose counters moved since the last flush as rows of deltas and
hands them to :class:`SqliteWriter`, a thread that adds them to
``<data>/netdrop.sqlite`` table ``netdrop_senders`` (one row per address, counts summed
over netdrop runs). The sink's API reads that table; the file is given to the owner of
the data directory so a non-root sink can read it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import sqlite3
import threading
import time
from pathlib import Path

log = logging.getLogger("netdrop")

SCHEMA = """
CREATE TABLE IF NOT EXISTS netdrop_senders (
    ip TEXT PRIMARY KEY,
    seen INTEGER NOT NULL DEFAULT 0,
    passed INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    delayed INTEGER NOT NULL DEFAULT 0,
    updated REAL NOT NULL
)
"""

UPSERT = """
INSERT INTO netdrop_senders (ip, seen, passed, dropped, delayed, updated)
VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (ip) DO UPDATE SET
    seen = seen + excluded.seen, passed = passed + excluded.passed,
    dropped = dropped + excluded.dropped, delayed = delayed + excluded.delayed,
    updated = excluded.updated
"""

Row = tuple[str, int, int, int, int, float]


class Sender:
    """One source address: counters since the last flush and the policy's cached view."""

    __slots__ = ("allowed", "delayed", "dirty", "dropped", "ip", "passed", "policy_gen",
                 "seen", "targeted")

    def __init__(self, ip: bytes) -> None:
        self.ip = ip
        self.allowed: bool | None = None
        self.policy_gen = 0
        self.targeted = False
        self.dirty = False
        self.seen = self.passed = self.dropped = self.delayed = 0


class Ledger:
    """The senders seen by this process, at most ``max_senders`` kept between flushes."""

    def __init__(self, max_senders: int = 100_000) -> None:
        self.senders: dict[bytes, Sender] = {}
        self.dirty: list[Sender] = []
        self.max_senders = max_senders

    def sender(self, ip: bytes) -> Sender:
        """The :class:`Sender` for ``ip`` (packed), created on first sight."""
        found = self.senders.get(ip)
        if found is None:
            found = self.senders[ip] = Sender(ip)
        return found

    def take(self, now: float | None = None) -> list[Row]:
        """Rows of the counters that moved since the last call; resets them."""
        now = time.time() if now is None else now
        rows = []
        for s in self.dirty:
            rows.append((str(ipaddress.ip_address(s.ip)), s.seen, s.passed, s.dropped,
                         s.delayed, now))
            s.seen = s.passed = s.dropped = s.delayed = 0
            s.dirty = False
        self.dirty.clear()
        if len(self.senders) > self.max_senders:
            # Their totals are in the store; the cached policy view is rebuilt on demand.
            self.senders.clear()
        return rows


class SqliteWriter:
    """A thread that adds rows of deltas to ``netdrop_senders`` in one transaction each."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._queue: queue.SimpleQueue[list[Row] | None] = queue.SimpleQueue()
        db = self._open()
        db.close()
        self._thread = threading.Thread(target=self._run, name="netdrop-sqlite", daemon=True)
        self._thread.start()

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=10.0, isolation_level=None)
        db.execute("PRAGMA busy_timeout = 10000")
        db.execute(SCHEMA)
        owner = self.path.parent.stat()
        if os.geteuid() == 0 and (owner.st_uid, owner.st_gid) != (0, 0):
            os.chown(self.path, owner.st_uid, owner.st_gid)
        return db

    def put(self, rows: list[Row]) -> None:
        """Queue ``rows`` for writing (never blocks)."""
        if rows:
            self._queue.put(rows)

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        db = self._open()
        try:
            while (rows := self._queue.get()) is not None:
                try:
                    with db:
                        db.execute("BEGIN IMMEDIATE")
                        db.executemany(UPSERT, rows)
                except sqlite3.Error as exc:
                    log.warning("netdrop: could not write %s: %s", self.path, exc)
        finally:
            db.close()
