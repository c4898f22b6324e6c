"""The SQLite store on real files: aggregates, migrations, retention, concurrency."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from sink.record import EndReason, Flag, SessionRecord, as_row
from sink.store import (
    BLOCK_ROWS,
    MIGRATIONS,
    SCHEMA_VERSION,
    SESSION_FIELDS,
    IpFilter,
    SessionFilter,
    SQLiteReader,
    SQLiteWriter,
    StoreError,
    _block_meta,
    _encode_block,
    _insert_block,
    canonical_ip,
    migrate,
    open_reader,
    open_writer,
    schema_version,
    store_path,
)


def session(ip: str = "192.0.2.1", *, end: float | None = None, messages: int = 1,
            helo: str = "bot.example", flags: int = 0, local: str = "198.51.100.1",
            size: int = 1000, recipients: int = 1) -> SessionRecord:
    end = time.time() if end is None else end
    record = SessionRecord(start=end - 1.0, client_ip=ip, client_port=40000,
                           local_ip=local, local_port=25, persona="postfix")
    record.end = end
    record.helo = helo
    record.messages = messages
    record.bytes = size
    record.recipients = recipients
    record.first_recipients = tuple(f"user{i}@example.org" for i in range(min(recipients, 5)))
    record.mail_from = ("spam@example.net",) * min(messages, 5)
    record.flags = flags
    return record


COUNT_SESSIONS = "SELECT coalesce(sum(count), 0) FROM session_blocks"


@pytest.fixture
def store(tmp_path: Path) -> tuple[SQLiteWriter, SQLiteReader]:
    writer = open_writer(tmp_path)
    yield writer, open_reader(tmp_path)
    writer.close()


def test_a_batch_folds_into_per_ip_aggregates(store):
    writer, reader = store
    t = 1_800_000_000.0
    writer.write([
        session("192.0.2.1", end=t, helo="first.example", flags=Flag.PREGREET, messages=2,
                recipients=3, size=500),
        session("192.0.2.1", end=t + 5, helo="", flags=Flag.BARE_LF, local="198.51.100.2"),
        session("192.0.2.1", end=t + 2, helo="middle.example"),
        session("::ffff:192.0.2.9", end=t, local="::ffff:198.51.100.1"),
    ])
    writer.write([session("192.0.2.1", end=t + 1, helo="older.example", local="198.51.100.2",
                          flags=Flag.AUTH_ATTEMPT)])
    found = reader.ip("192.0.2.1")
    assert found is not None
    ip, first, last, sessions, messages, recipients, size, helo, flags, locals_ = found["row"]
    assert (ip, first, last) == ("192.0.2.1", t - 1, t + 5)
    assert (sessions, messages, recipients, size) == (4, 5, 6, 3500)
    # The latest session that said HELO/EHLO wins, whatever the batch order.
    assert helo == "middle.example"
    assert flags == Flag.PREGREET | Flag.BARE_LF | Flag.AUTH_ATTEMPT
    assert locals_ == 2
    assert found["local_ips"] == ["198.51.100.1", "198.51.100.2"]
    # Last recorded first (the order of writing: a later batch, then its batch backwards).
    assert [s["end"] for s in found["recent_sessions"]] == [t + 1, t + 2, t + 5, t]
    assert found["recent_sessions"][-1]["mail_from"] == ["spam@example.net"] * 2
    # IPv4-mapped IPv6 (dual-stack listeners) is stored as IPv4.
    mapped = reader.ip("192.0.2.9")
    assert mapped is not None and mapped["local_ips"] == ["198.51.100.1"]
    stats = reader.stats(t + 6)
    assert stats["totals"] == {"sessions": 5, "messages": 6, "recipients": 7, "bytes": 4500,
                               "senders": 2}


def test_filters_sorting_and_keyset_pages(store):
    writer, reader = store
    t = 1_800_000_000.0
    writer.write([session(f"192.0.2.{i}", end=t + i, messages=i % 4,
                          flags=Flag.RELAY_ATTEMPT if i % 2 else 0) for i in range(1, 21)]
                 + [session("2001:db8::1", end=t + 100, messages=9)])
    every = reader.ips(IpFilter(), limit=100)
    assert [r[0] for r in every[:2]] == ["2001:db8::1", "192.0.2.20"]
    assert {r[0] for r in reader.ips(IpFilter(family=6))} == {"2001:db8::1"}
    assert len(reader.ips(IpFilter(family=4))) == 20
    assert all(r[4] >= 3 for r in reader.ips(IpFilter(min_messages=3)))
    assert {r[0] for r in reader.ips(IpFilter(flags=int(Flag.RELAY_ATTEMPT)))} == {
        f"192.0.2.{i}" for i in range(1, 21, 2)}
    assert {r[0] for r in reader.ips(IpFilter(since=t + 18))} == {
        "192.0.2.18", "192.0.2.19", "192.0.2.20", "2001:db8::1"}
    assert {r[0] for r in reader.ips(IpFilter(until=t + 2))} == {"192.0.2.1", "192.0.2.2"}
    # Pages of 4 by volume cover every sender once, in order.
    seen, after = [], None
    while True:
        page = reader.ips(IpFilter(), "volume", 4, after)
        if not page:
            break
        seen += page
        after = (page[-1][4], page[-1][0])
    assert len(seen) == 21 and len({r[0] for r in seen}) == 21
    assert [r[4] for r in seen] == sorted((r[4] for r in seen), reverse=True)


def test_sessions_query_and_delete(store):
    writer, reader = store
    t = time.time()
    writer.write([session("192.0.2.1", end=t - 10), session("192.0.2.2", end=t - 5),
                  session("192.0.2.1", end=t, flags=Flag.NON_SMTP)])
    assert len(reader.sessions(SessionFilter(ip="192.0.2.1"))) == 2
    assert len(reader.sessions(SessionFilter(flags=int(Flag.NON_SMTP)))) == 1
    assert len(reader.sessions(SessionFilter(since=t - 6))) == 2
    newest = reader.sessions(SessionFilter(), limit=1)
    assert newest[0]["client_ip"] == "192.0.2.1" and newest[0]["end"] == t
    assert len(reader.sessions(SessionFilter(), before_id=newest[0]["id"])) == 2
    assert reader.delete_ip("192.0.2.1") is True
    assert reader.delete_ip("192.0.2.1") is False
    assert reader.ip("192.0.2.1") is None
    assert [s["client_ip"] for s in reader.sessions(SessionFilter())] == ["192.0.2.2"]
    assert reader.stats(t)["totals"]["sessions"] == 1


def test_retention_deletes_sessions_and_keeps_aggregates(store):
    writer, reader = store
    now = time.time()
    writer.write([session("192.0.2.1", end=now - 40 * 86400),
                  session("192.0.2.1", end=now - 31 * 86400),
                  session("192.0.2.1", end=now - 3600)])
    assert writer.prune(now - 30 * 86400, chunk=1) == 2
    assert len(reader.sessions(SessionFilter())) == 1
    row = reader.ip("192.0.2.1")["row"]
    assert row[3] == 3  # sessions in the aggregate stay
    assert reader.stats(now)["totals"]["sessions"] == 3


def test_rates_count_recent_buckets(store):
    writer, reader = store
    now = time.time()
    writer.write([session(end=now - 30, messages=2), session(end=now - 1800),
                  session(end=now - 20 * 3600, messages=5)])
    rates = reader.stats(now)["rates"]
    assert rates["1m"]["messages"] == 2
    assert rates["1h"]["messages"] == 3
    assert rates["24h"]["messages"] == 8
    assert rates["24h"]["sessions"] == 3


def test_migration_from_empty_creates_the_current_schema(tmp_path: Path):
    conn = sqlite3.connect(tmp_path / "s.sqlite", isolation_level=None)
    assert schema_version(conn) == 0
    assert migrate(conn) == SCHEMA_VERSION
    assert migrate(conn) == SCHEMA_VERSION  # idempotent
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"session_blocks", "session_data", "session_ips", "ips", "ip_locals", "totals",
            "buckets", "schema_version"} <= tables
    assert "sessions" not in tables  # moved into blocks by step 5
    versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == [v for v, _ in MIGRATIONS]


_V1_SESSION = ("INSERT INTO sessions (start, end, client_ip, client_port, local_ip, "
               "local_port, persona, helo, tls_version, tls_cipher, mail_from, recipients, "
               "first_recipients, messages, bytes, commands, errors, bare_lf, bare_cr, flags, "
               "end_reason, held, segments_in, retransmits, last_stage) VALUES (?, ?, "
               "'192.0.2.1', 1, ?, 25, 'postfix', 'h', '', '', '', 2, '', 1, 250, 5, 0, 0, 0, "
               "1, 'quit', 0, 0, 0, 'quit')")


def test_migration_from_version_1_keeps_and_backfills_data(tmp_path: Path):
    path = store_path(tmp_path)
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn, target=1) == 1
    # Data as the version 1 writer left it: no ip_locals, totals or buckets yet.
    conn.execute("INSERT INTO ips (ip, first_seen, last_seen, sessions, messages, recipients, "
                 "bytes, helo, flags) VALUES ('192.0.2.1', 100, 200, 2, 3, 4, 500, 'h', 1)")
    for local, end in (("198.51.100.1", 150.0), ("198.51.100.2", 200.0)):
        conn.execute(_V1_SESSION, (end - 1, end, local))
    conn.close()
    with pytest.raises(StoreError, match="start `spamsink serve` once"):
        open_reader(tmp_path)
    writer = open_writer(tmp_path)  # migrates
    writer.write([session("192.0.2.1", end=300.0, local="198.51.100.3")])
    writer.close()
    reader = open_reader(tmp_path)
    row = reader.ip("192.0.2.1")["row"]
    assert row[3:7] == (3, 4, 5, 1500)
    assert row[9] == 3  # local addresses: two backfilled from sessions, one new
    stats = reader.stats(400.0)
    assert stats["totals"]["sessions"] == 3
    assert stats["rates"]["24h"]["sessions"] == 3  # buckets backfilled from sessions


def test_migration_from_the_previous_schema(tmp_path: Path):
    # Schema 5 blocks hold every column in full; they stay readable beside new ones.
    previous = MIGRATIONS[-2][0]
    conn = sqlite3.connect(store_path(tmp_path), isolation_level=None)
    assert migrate(conn, target=previous) == previous
    old = [as_row(session("192.0.2.1", end=100.0 + i)) for i in range(3)]
    blob = _encode_block(list(zip(*old, strict=True)), same=frozenset())
    assert all(type(column) is tuple for column in pickle.loads(blob)[1])  # as schema 5 wrote
    _insert_block(conn, _block_meta(old), blob, {"192.0.2.1"})
    conn.close()
    writer = open_writer(tmp_path)
    writer.write([session("192.0.2.1", end=300.0 + i) for i in range(3)])
    writer.close()
    found = open_reader(tmp_path).sessions(SessionFilter(ip="192.0.2.1"))
    assert [s["end"] for s in found] == [302.0, 301.0, 300.0, 102.0, 101.0, 100.0]
    assert {(s["helo"], s["local_ip"], s["messages"]) for s in found} == {
        ("bot.example", "198.51.100.1", 1)}
    assert all(s["mail_from"] == ["spam@example.net"] for s in found)


def test_a_newer_schema_is_refused(tmp_path: Path):
    writer = open_writer(tmp_path)
    writer.conn.execute("INSERT INTO schema_version VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    writer.close()
    with pytest.raises(StoreError, match="newer than this spamsink"):
        open_writer(tmp_path)
    with pytest.raises(StoreError, match="newer than this spamsink"):
        open_reader(tmp_path)  # it could misread blocks it does not know


def test_missing_store_is_a_clear_error(tmp_path: Path):
    with pytest.raises(StoreError, match=r"no store at .*spamsink serve --data"):
        open_reader(tmp_path / "nothing")


def test_canonical_ip():
    assert canonical_ip("::ffff:192.0.2.1") == "192.0.2.1"
    assert canonical_ip("2001:DB8:0::1") == "2001:db8::1"
    with pytest.raises(ValueError):
        canonical_ip("192.0.2.300")


def test_reader_sees_consistent_snapshots_and_never_blocks_the_writer(store):
    """A reader in a long transaction and a busy query loop while the writer commits."""
    writer, reader = store
    batches, per_batch = 60, 200
    errors: list[str] = []
    done = threading.Event()

    def read_loop() -> None:
        while not done.is_set():
            conn = reader._open()
            conn.execute("BEGIN")
            total = conn.execute("SELECT sessions FROM totals").fetchone()
            counted = conn.execute(COUNT_SESSIONS).fetchone()[0]
            summed = conn.execute("SELECT coalesce(sum(sessions), 0) FROM ips").fetchone()[0]
            conn.execute("COMMIT")
            conn.close()
            if (total[0] if total else 0) != counted or counted != summed:
                errors.append(f"torn read: totals {total} sessions {counted} ips {summed}")

    # One reader holds a snapshot open for the whole run (like a long export).
    holder = reader._open()
    holder.execute("BEGIN")
    holder.execute(COUNT_SESSIONS).fetchone()
    thread = threading.Thread(target=read_loop)
    thread.start()
    slowest = 0.0
    for b in range(batches):
        started = time.perf_counter()
        writer.write([session(f"10.0.{b}.{i % 50}") for i in range(per_batch)])
        slowest = max(slowest, time.perf_counter() - started)
    done.set()
    thread.join()
    assert holder.execute(COUNT_SESSIONS).fetchone()[0] == 0  # its snapshot
    holder.execute("COMMIT")
    holder.close()
    assert not errors, errors[:3]
    assert slowest < 2.0, f"a write waited {slowest:.2f} s behind readers"
    assert reader.stats(time.time())["totals"]["sessions"] == batches * per_batch


def _write_from_process(data: str, n: int) -> None:
    writer = SQLiteWriter(store_path(Path(data)))
    for _ in range(n):
        writer.write([session("192.0.2.77", messages=2, flags=Flag.PREGREET)
                      for _ in range(50)])
    writer.close()


def test_writers_in_several_processes_lose_no_update(tmp_path: Path):
    open_writer(tmp_path).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_from_process, args=(str(tmp_path), 40))
             for _ in range(3)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(60)
        assert proc.exitcode == 0
    row = open_reader(tmp_path).ip("192.0.2.77")["row"]
    assert row[3] == 3 * 40 * 50
    assert row[4] == 2 * 3 * 40 * 50


_V4_COLUMNS = ("start", "end", "client_ip", "client_port", "local_ip", "local_port", "persona",
               "helo", "tls_version", "tls_cipher", "mail_from", "recipients",
               "first_recipients", "messages", "bytes", "commands", "errors", "bare_lf",
               "bare_cr", "flags", "end_reason", "held", "segments_in", "retransmits",
               "last_stage", "waited")


def test_migration_from_version_4_moves_every_session_into_blocks(tmp_path: Path):
    conn = sqlite3.connect(store_path(tmp_path), isolation_level=None)
    assert migrate(conn, target=4) == 4
    insert = (f"INSERT INTO sessions ({', '.join(_V4_COLUMNS)}) "
              f"VALUES ({', '.join('?' * len(_V4_COLUMNS))})")
    old = []
    for i in range(5):
        ip = "192.0.2.1" if i % 2 else "2001:db8::7"
        row = (100.0 + i, 101.5 + i, ip, 40000 + i, "198.51.100.1", 25, "postfix",
               f"helo{i}.example", "TLSv1.3" if i == 3 else "", "TLS_AES_128_GCM_SHA256"
               if i == 3 else "", "a@example.net\nb@example.net" if i == 1 else "", 2,
               "u@example.org\nv@example.org", 1, 1000 + i, 7, i, 1, 0,
               int(Flag.BARE_LF | Flag.TARPITTED) if i == 4 else 0, "quit", 0.25 * i, 9 + i,
               i % 2, "quit", 1.5 if i == 2 else 0.0)
        conn.execute(insert, row)
        old.append(row)
    conn.close()
    open_writer(tmp_path).close()  # migrates to the current schema
    conn = sqlite3.connect(store_path(tmp_path))
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    conn.close()
    assert "sessions" not in tables
    reader = open_reader(tmp_path)
    moved = reader.sessions(SessionFilter(), limit=100)
    assert len(moved) == 5
    assert [s["id"] for s in moved] == sorted((s["id"] for s in moved), reverse=True)
    for stored, row in zip(reversed(moved), old, strict=True):
        expected = dict(zip(_V4_COLUMNS, row, strict=True))
        for name in ("mail_from", "first_recipients"):
            expected[name] = expected[name].split("\n") if expected[name] else []
        assert {k: v for k, v in stored.items() if k != "id"} == expected
    assert [s["end"] for s in reader.sessions(SessionFilter(ip="192.0.2.1"))] == [104.5, 102.5]
    assert len(reader.sessions(SessionFilter(flags=int(Flag.TARPITTED)))) == 1
    assert len(reader.sessions(SessionFilter(since=103.0, until=105.0))) == 2


def test_a_batch_larger_than_a_block_pages_through_every_session(store):
    writer, reader = store
    t = 1_800_000_000.0
    total = BLOCK_ROWS + 10
    writer.write([session(f"10.0.{i % 7}.1", end=t + i / 1000) for i in range(total)])
    seen, before = [], None
    while page := reader.sessions(SessionFilter(), limit=1000, before_id=before):
        seen += page
        before = page[-1]["id"]
    assert len(seen) == total
    assert [s["end"] for s in seen] == sorted((s["end"] for s in seen), reverse=True)
    assert len({s["id"] for s in seen}) == total
    assert len(reader.sessions(SessionFilter(ip="10.0.3.1"), limit=10_000)) == len(
        range(3, total, 7))
    totals = reader.stats(t + total)["totals"]
    assert totals["sessions"] == total and totals["messages"] == total


def test_deleting_a_sender_keeps_the_ids_of_the_others(store):
    writer, reader = store
    t = time.time()
    writer.write([session("192.0.2.1" if i % 3 else "192.0.2.2", end=t + i) for i in range(9)])
    kept = [s["id"] for s in reader.sessions(SessionFilter(ip="192.0.2.2"))]
    assert len(kept) == 3
    assert reader.delete_ip("192.0.2.1")
    assert [s["id"] for s in reader.sessions(SessionFilter())] == kept
    assert reader.sessions(SessionFilter(ip="192.0.2.1")) == []
    assert reader.delete_ip("192.0.2.2")
    assert reader.sessions(SessionFilter()) == []
    conn = sqlite3.connect(store_path(writer.path.parent))
    assert conn.execute("SELECT count(*) FROM session_blocks").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM session_ips").fetchone() == (0,)
    conn.close()


def test_enum_fields_are_stored_as_plain_values(store):
    writer, reader = store
    record = session(flags=Flag.PREGREET | Flag.AUTH_ATTEMPT)
    record.end_reason = EndReason.TIMEOUT
    writer.write([record])
    (stored,) = reader.sessions(SessionFilter())
    assert type(stored["flags"]) is int and stored["flags"] == Flag.PREGREET | Flag.AUTH_ATTEMPT
    assert type(stored["end_reason"]) is str and stored["end_reason"] == "timeout"


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_tampered_block_cannot_run_code_in_a_reader(store, tmp_path: Path):
    writer, reader = store
    writer.write([session()])
    evil = _RunsCode()
    evil.marker = tmp_path / "ran"
    blob = pickle.dumps((SESSION_FIELDS, (evil,), ()), protocol=5)
    writer.conn.execute("UPDATE session_data SET data = ?", (blob,))
    with pytest.raises(StoreError, match="damaged"):
        reader.sessions(SessionFilter())
    assert not evil.marker.exists()


def test_a_block_from_another_version_is_read_by_field_name(store):
    writer, reader = store
    writer.write([session()])
    # A block written before ``waited`` existed, with its fields in another order.
    fields = tuple(reversed([f for f in SESSION_FIELDS if f != "waited"]))
    record = session("192.0.2.5", end=500.0)
    record.end_reason = "quit"  # plain str: pickle.dumps would name the enum class
    columns = tuple((getattr(record, f),) for f in fields)
    writer.conn.execute("UPDATE session_data SET data = ?",
                        (pickle.dumps((fields, columns, ()), protocol=5),))
    (stored,) = reader.sessions(SessionFilter())
    assert stored["client_ip"] == "192.0.2.5" and stored["end"] == 500.0
    assert stored["waited"] == 0 and stored["mail_from"] == ["spam@example.net"]


def test_retention_drops_whole_old_blocks_and_their_index(store):
    writer, reader = store
    now = time.time()
    for age_days in (50, 45, 40):
        writer.write([session(f"192.0.2.{i}", end=now - age_days * 86400) for i in range(3)])
    writer.write([session("192.0.2.9", end=now - 60)])
    assert writer.prune(now - 30 * 86400, chunk=2) == 9
    assert [s["client_ip"] for s in reader.sessions(SessionFilter())] == ["192.0.2.9"]
    assert reader.sessions(SessionFilter(ip="192.0.2.1")) == []
    conn = sqlite3.connect(store_path(writer.path.parent))
    assert conn.execute("SELECT count(*) FROM session_blocks").fetchone() == (1,)
    assert conn.execute("SELECT count(*) FROM session_data").fetchone() == (1,)
    assert conn.execute("SELECT ip FROM session_ips").fetchall() == [("192.0.2.9",)]
    conn.close()
    assert reader.ip("192.0.2.1")["row"][3] == 3  # the aggregate stays
