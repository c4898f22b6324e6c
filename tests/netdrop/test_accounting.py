"""netdrop.accounting: deltas per sender, summed into a real SQLite file."""

from __future__ import annotations

import ipaddress
import sqlite3
from pathlib import Path

from netdrop.accounting import Ledger, SqliteWriter

A = ipaddress.ip_address("203.0.113.7").packed
V6 = ipaddress.ip_address("2001:db8::7").packed


def _touch(ledger: Ledger, ip: bytes, seen: int, dropped: int) -> None:
    s = ledger.sender(ip)
    if not s.dirty:
        s.dirty = True
        ledger.dirty.append(s)
    s.seen += seen
    s.dropped += dropped
    s.passed += seen - dropped


def test_take_returns_only_moved_senders_and_resets() -> None:
    ledger = Ledger()
    _touch(ledger, A, 10, 2)
    _touch(ledger, V6, 4, 1)
    rows = ledger.take(now=5.0)
    assert sorted(rows) == [("2001:db8::7", 4, 3, 1, 0, 5.0), ("203.0.113.7", 10, 8, 2, 0, 5.0)]
    assert ledger.take() == []
    _touch(ledger, A, 1, 0)
    assert [r[:5] for r in ledger.take()] == [("203.0.113.7", 1, 1, 0, 0)]


def test_ledger_forgets_senders_beyond_its_bound() -> None:
    ledger = Ledger(max_senders=3)
    for i in range(5):
        _touch(ledger, bytes([10, 0, 0, i]), 1, 0)
    assert len(ledger.take()) == 5
    assert ledger.senders == {}


def test_writer_sums_deltas_across_flushes_and_runs(tmp_path: Path) -> None:
    path = tmp_path / "data" / "netdrop.sqlite"
    writer = SqliteWriter(path)
    writer.put([("203.0.113.7", 10, 8, 2, 0, 1.0)])
    writer.put([("203.0.113.7", 5, 3, 1, 1, 2.0), ("2001:db8::7", 1, 1, 0, 0, 2.0)])
    writer.close()
    writer = SqliteWriter(path)  # a later netdrop run adds to the same rows
    writer.put([("203.0.113.7", 1, 0, 1, 0, 3.0)])
    writer.close()
    rows = sqlite3.connect(path).execute(
        "SELECT ip, seen, passed, dropped, delayed, updated FROM netdrop_senders ORDER BY ip"
    ).fetchall()
    assert rows == [("2001:db8::7", 1, 1, 0, 0, 2.0), ("203.0.113.7", 16, 11, 4, 1, 3.0)]
