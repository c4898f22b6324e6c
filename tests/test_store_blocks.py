"""The session block format (repeated columns stored once, folded from one value), and
reads that never hold the writer back."""

from __future__ import annotations

import pickle
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sink.record import EndReason, Flag, SessionRecord, as_row
from sink.store import (
    BLOCK_ROWS,
    SESSION_FIELDS,
    IpFilter,
    SessionFilter,
    StoreError,
    _decode_block,
    _encode_block,
    _fold,
    _repeated,
    open_reader,
    open_writer,
)


def flood(count: int, *, ip: str = "192.0.2.7") -> list[tuple]:
    """``count`` sessions of one bot: only the times and the client port differ."""
    rows = []
    for i in range(count):
        record = SessionRecord(start=1_800_000_000.0 + i, client_ip=ip, client_port=40000 + i,
                               local_ip="198.51.100.1", local_port=25, persona="postfix")
        record.end = record.start + 0.5
        record.helo = "bot.example"
        record.mail_from = ("spam@example.net",)
        record.recipients = record.messages = 1
        record.first_recipients = ("victim@example.org",)
        record.bytes, record.commands = 1200, 6
        record.end_reason = EndReason.QUIT
        record.last_stage = "quit"
        rows.append(as_row(record))
    return rows


def test_a_flood_block_stores_each_repeated_column_once():
    rows = flood(1000)
    columns = list(zip(*rows, strict=True))
    same = _repeated(columns)
    varying = {SESSION_FIELDS.index(name) for name in ("start", "end", "client_port")}
    assert same == frozenset(range(len(SESSION_FIELDS))) - varying
    squeezed, full = _encode_block(columns), _encode_block(columns, same=frozenset())
    assert len(squeezed) * 3 < len(full)
    _, stored, _, (size, values) = pickle.loads(squeezed)
    persona = SESSION_FIELDS.index("persona")
    assert stored[persona] is None and (persona, "postfix") in values and size == 1000
    expected = [tuple(str(v) if isinstance(v, EndReason) else v for v in row) for row in rows]
    assert _decode_block(squeezed) == _decode_block(full) == expected


def test_one_session_is_stored_in_full_as_schema_5_wrote_it():
    columns = list(zip(*flood(1), strict=True))
    assert _repeated(columns) == frozenset()
    block = pickle.loads(_encode_block(columns))
    assert len(block) == 3 and all(type(c) is tuple for c in block[1])


def test_a_reader_before_schema_6_refuses_a_block_with_repeated_columns():
    columns = list(zip(*flood(2), strict=True))  # two sessions: a [value, 2] would fit
    with pytest.raises(ValueError, match="too many values to unpack"):
        _, _, _ = pickle.loads(_encode_block(columns))  # what schema 5 did


_HELO = SESSION_FIELDS.index("helo")


@pytest.mark.parametrize("repeated", [
    (0, ((_HELO, "x"),)), (BLOCK_ROWS + 1, ((_HELO, "x"),)), ("3", ((_HELO, "x"),)),
    (1, ((len(SESSION_FIELDS), "x"),)), (1, ((-1, "x"),)), (1, ((0, 1.0),)),
    (1, (("0", "x"),)), (1, ((_HELO, "x"), (_HELO, "y"))), (1,), "xy",
])
def test_a_damaged_repeated_column_is_refused(repeated):
    columns = [(v,) for v in flood(1)[0]]
    columns[_HELO] = None
    with pytest.raises(StoreError, match="damaged"):
        _decode_block(pickle.dumps((SESSION_FIELDS, tuple(columns), (), repeated), 5))


def test_a_column_left_out_without_a_repeated_value_is_refused():
    columns = [(v,) for v in flood(1)[0]]
    columns[_HELO] = None
    with pytest.raises(StoreError, match="damaged"):
        _decode_block(pickle.dumps((SESSION_FIELDS, tuple(columns), ()), 5))


@pytest.mark.parametrize("dead", [(5,), (-9,), ("0",)])
def test_damaged_positions_and_lengths_are_refused(dead):
    columns = list(zip(*flood(3), strict=True))
    with pytest.raises(StoreError, match="damaged"):
        _decode_block(pickle.dumps((SESSION_FIELDS, tuple(columns), dead), 5))
    columns[0] = columns[0][:2]
    with pytest.raises(StoreError, match="damaged"):
        _decode_block(pickle.dumps((SESSION_FIELDS, tuple(columns), ()), 5))


_IPS = st.sampled_from(["192.0.2.1", "::ffff:192.0.2.1", "2001:db8::1", "192.0.2.9"])
_SESSION = st.fixed_dictionaries({
    "client_ip": _IPS,
    "local_ip": st.sampled_from(["198.51.100.1", "::ffff:198.51.100.1"]),
    "end": st.sampled_from([1_800_000_000.0, 1_800_000_030.0, 1_800_000_900.0]),
    "helo": st.sampled_from(["", "bot.example", "other.example"]),
    "messages": st.integers(0, 3),
    "bytes": st.integers(0, 5000),
    "recipients": st.integers(0, 2),
    "held": st.sampled_from([0.0, 1.5]),
    "segments_in": st.integers(0, 9),
    "flags": st.sampled_from([0, int(Flag.TARPITTED), int(Flag.PREGREET | Flag.BARE_LF)]),
})


def _row(fields: dict) -> tuple:
    record = SessionRecord(start=fields["end"] - 1.0, client_ip=fields["client_ip"],
                           client_port=40000, local_ip=fields["local_ip"], local_port=25,
                           persona="postfix")
    for name in ("end", "helo", "messages", "bytes", "recipients", "held", "segments_in",
                 "flags"):
        setattr(record, name, fields[name])
    return as_row(record)


@settings(max_examples=300, deadline=None)
@given(st.lists(_SESSION, min_size=1, max_size=12), st.booleans())
def test_folding_from_repeated_values_equals_folding_every_session(sessions, repeat):
    rows = [_row(s) for s in (sessions * 3 if repeat else sessions)]
    columns = list(zip(*rows, strict=True))
    same = _repeated(columns)
    fast, slow = list(columns), list(columns)
    assert _fold(fast, same) == _fold(slow, frozenset())
    assert fast == slow  # the same IPv4-mapped addresses made plain
    assert _decode_block(_encode_block(fast, same=same)) == _decode_block(
        _encode_block(slow, same=frozenset()))


def test_a_stalled_export_holds_no_snapshot_of_the_store(tmp_path):
    writer = open_writer(tmp_path)
    reader = open_reader(tmp_path)
    writer.write([_record(f"10.0.{i >> 8}.{i & 255}", end=1000.0 + i) for i in range(3000)])
    chunks = reader.iter_ips(IpFilter(), "last_seen")
    first = next(chunks)  # a client that read a little and stopped
    writer.write([_record("192.0.2.200", end=9000.0)])
    busy, _, _ = writer.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    assert busy == 0  # the checkpoint went through: nothing holds the WAL
    rest = [row for rows in chunks for row in rows]
    exported = [row[0] for row in first + rest]
    assert len(exported) == 3000 and "192.0.2.200" not in exported  # as it was at the start
    assert [row[2] for row in first + rest] == sorted((row[2] for row in first + rest),
                                                      reverse=True)
    writer.close()


def _record(ip: str, *, end: float) -> SessionRecord:
    record = SessionRecord(start=end - 1.0, client_ip=ip, client_port=40000,
                           local_ip="198.51.100.1", local_port=25, persona="postfix")
    record.end = end
    return record


def test_forgetting_a_sender_in_many_blocks_lets_the_writer_in(tmp_path):
    writer = open_writer(tmp_path)
    reader = open_reader(tmp_path)
    for b in range(12):  # a block per write, each with both senders
        writer.write([_record("192.0.2.1", end=1000.0 + b), _record("192.0.2.2", end=1000.5 + b)])
    writer.conn.execute("PRAGMA busy_timeout = 1000")
    deleting = threading.Thread(target=reader.delete_ip, args=("192.0.2.1",),
                                kwargs={"chunk": 1, "pause": 0.25})
    deleting.start()
    time.sleep(0.6)
    writer.write([_record("192.0.2.3", end=2000.0)])  # between two of the delete's chunks
    assert deleting.is_alive()
    deleting.join()
    assert reader.ip("192.0.2.1") is None
    assert reader.sessions(SessionFilter(ip="192.0.2.1")) == []
    assert len(reader.sessions(SessionFilter(ip="192.0.2.2"))) == 12
    assert reader.stats(3000.0)["totals"]["sessions"] == 13
    assert not reader.delete_ip("192.0.2.1")  # unknown now
    writer.close()


def test_forgetting_a_sender_takes_it_out_of_totals_rates_and_cost(tmp_path):
    now = time.time()

    def traffic(ip: str, count: int) -> list[SessionRecord]:
        records = []
        for i in range(count):
            record = _record(ip, end=now - 30 * i)
            record.messages, record.bytes, record.recipients = 2, 3000, 2
            record.held, record.segments_in = 1.5, 7
            record.flags = int(Flag.TARPITTED) if i % 2 else 0
            records.append(record)
        return records

    both, alone = open_writer(tmp_path / "both"), open_writer(tmp_path / "alone")
    both.write(traffic("192.0.2.1", 5) + traffic("192.0.2.2", 3))
    alone.write(traffic("192.0.2.2", 3))
    reader = open_reader(tmp_path / "both")
    assert reader.delete_ip("192.0.2.1")
    forgot, expected = reader.stats(now), open_reader(tmp_path / "alone").stats(now)
    for stats in (forgot, expected):
        del stats["cost"]["cpu_seconds"], stats["cost"]["held_per_cpu_second"]
    assert forgot == expected
    both.close()
    alone.close()
