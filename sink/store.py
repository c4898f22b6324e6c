"""Where recorded sessions and per-sender aggregates live: an interface and SQLite.

Contract:

* :class:`StoreWriter` is used by one thread at a time (the recorder's writer), but
  for ``prepare``, which touches no database and runs on the event loop: it turns
  rows of sessions into a :class:`~sink.record.PreparedBatch`. ``write_prepared``
  stores prepared batches and folds them into the per-IP aggregates, the running
  totals and the 10-second rate buckets in ONE transaction (``write`` does both).
  Aggregates are updated with SQL UPSERT increments, so several processes writing
  to the same store (``--workers N``) never lose an update.
* :class:`StoreReader` answers queries; every call may run on any thread and never
  blocks the writer (SQLite WAL: readers see a snapshot, the writer keeps writing).
* Retention (``prune``) deletes old sessions only; aggregates and totals stay.
* The schema is created and upgraded by :func:`migrate` from the numbered steps in
  ``MIGRATIONS``; ``schema_version`` holds the step reached.

Sessions are stored as *blocks* (schema 5): one row per written batch (at most
``BLOCK_ROWS`` sessions) holding the batch's sessions column by column (since schema
6, a column of one repeated value as that value once), pickled with
plain values only (a reader refuses a block that names any class or function but
``int``/``str``), plus one ``session_ips`` row per distinct sender in it. A session's
id is ``block << ID_SHIFT | position``, so ids grow in the order sessions were written.
Reads decode the blocks that can match (by sender, time range and the block's union
of flags) newest first and filter their sessions; retention and deletes rewrite a
block with the removed sessions blanked, so ids never change. Why: a 27-column row
per session with two indexes cost the writer about 7 µs per session, a block about
2.4 µs (in-process; BENCHMARKS.md, "Recording cost"), which is what recording costs
the sink per one-message connection. The price: sessions are not plain SQL rows any
more; read them through :class:`StoreReader` or the API (``/api/v1/sessions``).

The abstract classes are the seam for a PostgreSQL store for fleets: the SQL is
standard apart from ``INSERT ... ON CONFLICT`` (which PostgreSQL shares) and the
pragmas, which stay in :class:`SQLiteWriter`/:class:`SQLiteReader`.
"""

from __future__ import annotations

import abc
import io
import ipaddress
import math
import pickle
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import reduce
from itertools import compress, count
from operator import itemgetter, or_
from pathlib import Path
from typing import Any, NamedTuple, cast

from sink.record import (
    F_TARPITTED,
    ROW_FIELDS,
    BatchSums,
    PreparedBatch,
    Row,
    SessionRecord,
    StoreBusy,
    as_row,
)

#: The store's file inside ``--data``.
STORE_FILE = "spamsink.sqlite"
#: What netdrop writes inside ``--data`` (read here, read-only).
NETDROP_FILE = "netdrop.sqlite"
#: Width of a rate bucket in seconds.
BUCKET = 10
#: Rate buckets older than this are pruned.
BUCKET_KEEP = 2 * 86400
BUSY_TIMEOUT_MS = 10_000

# -- schema ----------------------------------------------------------------------------

#: A step is SQL (statements separated by ``;``) or a function of the connection.
Step = str | Callable[[sqlite3.Connection], None]
MIGRATIONS: list[tuple[int, Step]] = [
    (1, """
CREATE TABLE sessions (
    id INTEGER PRIMARY KEY,
    start REAL NOT NULL, end REAL NOT NULL,
    client_ip TEXT NOT NULL, client_port INTEGER NOT NULL,
    local_ip TEXT NOT NULL, local_port INTEGER NOT NULL,
    persona TEXT NOT NULL, helo TEXT NOT NULL,
    tls_version TEXT NOT NULL, tls_cipher TEXT NOT NULL,
    mail_from TEXT NOT NULL, recipients INTEGER NOT NULL, first_recipients TEXT NOT NULL,
    messages INTEGER NOT NULL, bytes INTEGER NOT NULL, commands INTEGER NOT NULL,
    errors INTEGER NOT NULL, bare_lf INTEGER NOT NULL, bare_cr INTEGER NOT NULL,
    flags INTEGER NOT NULL, end_reason TEXT NOT NULL, held REAL NOT NULL,
    segments_in INTEGER NOT NULL, retransmits INTEGER NOT NULL, last_stage TEXT NOT NULL
);
CREATE INDEX sessions_ip_end ON sessions (client_ip, end);
CREATE INDEX sessions_end ON sessions (end);
CREATE TABLE ips (
    ip TEXT PRIMARY KEY,
    first_seen REAL NOT NULL, last_seen REAL NOT NULL,
    sessions INTEGER NOT NULL, messages INTEGER NOT NULL,
    recipients INTEGER NOT NULL, bytes INTEGER NOT NULL,
    helo TEXT NOT NULL, flags INTEGER NOT NULL
);
CREATE INDEX ips_last_seen ON ips (last_seen, ip);
CREATE INDEX ips_messages ON ips (messages, ip);
"""),
    (2, """
ALTER TABLE ips ADD COLUMN local_addresses INTEGER NOT NULL DEFAULT 0;
CREATE TABLE ip_locals (
    ip TEXT NOT NULL, local_ip TEXT NOT NULL, PRIMARY KEY (ip, local_ip)
) WITHOUT ROWID;
CREATE TRIGGER ip_locals_count AFTER INSERT ON ip_locals BEGIN
    UPDATE ips SET local_addresses = local_addresses + 1 WHERE ip = NEW.ip;
END;
INSERT OR IGNORE INTO ip_locals (ip, local_ip) SELECT DISTINCT client_ip, local_ip FROM sessions;
CREATE TABLE totals (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    sessions INTEGER NOT NULL, messages INTEGER NOT NULL,
    recipients INTEGER NOT NULL, bytes INTEGER NOT NULL
);
INSERT INTO totals SELECT 1, coalesce(sum(sessions), 0), coalesce(sum(messages), 0),
    coalesce(sum(recipients), 0), coalesce(sum(bytes), 0) FROM ips;
CREATE TABLE buckets (
    t INTEGER PRIMARY KEY, sessions INTEGER NOT NULL, messages INTEGER NOT NULL,
    bytes INTEGER NOT NULL
);
INSERT INTO buckets SELECT CAST(end / 10 AS INTEGER) * 10, count(*), sum(messages), sum(bytes)
    FROM sessions GROUP BY 1;
"""),
    (3, """
ALTER TABLE sessions ADD COLUMN waited REAL NOT NULL DEFAULT 0;
"""),
    # The sender's cost against ours: seconds senders were held by the tarpit, the
    # segments they sent (TCP_INFO), and the CPU the sink spent, per sender and in all.
    (4, """
ALTER TABLE ips ADD COLUMN held REAL NOT NULL DEFAULT 0;
ALTER TABLE ips ADD COLUMN segments_in INTEGER NOT NULL DEFAULT 0;
UPDATE ips SET held = coalesce((SELECT sum(held) FROM sessions WHERE client_ip = ips.ip), 0),
    segments_in = coalesce((SELECT sum(segments_in) FROM sessions
                            WHERE client_ip = ips.ip), 0);
ALTER TABLE totals ADD COLUMN held REAL NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN segments_in INTEGER NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN cpu_seconds REAL NOT NULL DEFAULT 0;
ALTER TABLE totals ADD COLUMN tarpitted INTEGER NOT NULL DEFAULT 0;
UPDATE totals SET held = (SELECT coalesce(sum(held), 0) FROM ips),
    segments_in = (SELECT coalesce(sum(segments_in), 0) FROM ips),
    tarpitted = (SELECT count(*) FROM sessions WHERE flags & 2048 != 0);
"""),
    # Sessions in blocks, one per written batch (see the module docstring): the
    # session table's row and two indexes cost more per session than the whole engine
    # was allowed to spend on recording. Existing sessions move into blocks in id
    # order (their ids change: ids are block-based from here on).
    (5, lambda conn: _sessions_into_blocks(conn)),
    # Blocks may store a column whose sessions all hold one value once (_encode_block).
    # Nothing to convert (old blocks stay readable); the step is here so that an older
    # spamsink refuses to write the store (its readers refuse such blocks as damaged).
    (6, lambda conn: None),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]

_BLOCK_TABLES = """
CREATE TABLE session_blocks (
    id INTEGER PRIMARY KEY,
    first_end REAL NOT NULL, last_end REAL NOT NULL,
    count INTEGER NOT NULL, flags INTEGER NOT NULL
);
CREATE INDEX session_blocks_first_end ON session_blocks (first_end);
CREATE TABLE session_data (block INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE session_ips (
    block INTEGER NOT NULL, ip TEXT NOT NULL, PRIMARY KEY (block, ip)
) WITHOUT ROWID;
CREATE INDEX session_ips_ip ON session_ips (ip, block);
"""


def _sessions_into_blocks(conn: sqlite3.Connection) -> None:
    """Schema 5: create the block tables and move the ``sessions`` table into them."""
    for statement in _statements(_BLOCK_TABLES):
        conn.execute(statement)
    cursor = conn.execute(f"SELECT {', '.join(SESSION_FIELDS)} FROM sessions ORDER BY id")
    while rows := cursor.fetchmany(BLOCK_ROWS):
        block = []
        for row in rows:
            row = list(row)
            for index in _LIST_FIELDS:
                row[index] = row[index].split("\n") if row[index] else []
            block.append(tuple(row))
        meta = _block_meta(block)
        if meta is not None:  # always: fetchmany returned rows
            _insert_block(conn, meta, _encode_rows(block), {row[_IP] for row in block})
    conn.execute("DROP TABLE sessions")


class StoreError(ValueError):
    """The store cannot be opened or used; the message says why (a ``ValueError``, so
    the command line prints it as its one-line error)."""


def schema_version(conn: sqlite3.Connection) -> int:
    """The migration step ``conn``'s database has reached (0 for an empty one)."""
    row = conn.execute("SELECT name FROM sqlite_master WHERE name = 'schema_version'").fetchone()
    if row is None:
        return 0
    return int(conn.execute("SELECT max(version) FROM schema_version").fetchone()[0] or 0)


def migrate(conn: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Apply the steps of ``MIGRATIONS`` after the current version, up to ``target``.

    Each step runs in its own exclusive transaction, so processes that open the store
    at the same moment migrate it once. Returns the version reached. A database newer
    than this code raises :class:`StoreError`.
    """
    conn.execute("BEGIN EXCLUSIVE")
    try:
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version "
                     "(version INTEGER PRIMARY KEY, applied REAL NOT NULL)")
        current = schema_version(conn)
        if current > SCHEMA_VERSION:
            raise StoreError(f"the store has schema version {current}, newer than this "
                             f"spamsink ({SCHEMA_VERSION}); upgrade spamsink")
        for version, step in MIGRATIONS:
            if current < version <= target:
                if callable(step):
                    step(conn)
                else:
                    for statement in _statements(step):
                        conn.execute(statement)
                conn.execute("INSERT INTO schema_version VALUES (?, ?)", (version, time.time()))
                current = version
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return current


def _statements(script: str) -> Iterator[str]:
    """Split ``script`` into statements (``sqlite3.complete_statement`` knows triggers)."""
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            yield buffer.strip()
            buffer = ""
    if buffer.strip():
        raise ValueError(f"incomplete statement in migration: {buffer!r}")


# -- queries ---------------------------------------------------------------------------

SORTS = ("last_seen", "volume")
_SORT_COLUMN = {"last_seen": "last_seen", "volume": "messages"}


@dataclass(frozen=True, slots=True)
class IpFilter:
    """Which senders: seen at or after ``since``, first seen before ``until`` (Unix
    seconds), at least ``min_messages`` messages, every flag bit of ``flags`` set,
    and only one address family when ``family`` is 4 or 6."""

    since: float | None = None
    until: float | None = None
    min_messages: int = 0
    flags: int = 0
    family: int | None = None

    def where(self) -> tuple[str, list[object]]:
        """An SQL condition over ``ips`` and its parameters."""
        terms: list[str] = ["1"]
        params: list[object] = []
        if self.since is not None:
            terms.append("last_seen >= ?")
            params.append(self.since)
        if self.until is not None:
            terms.append("first_seen < ?")
            params.append(self.until)
        if self.min_messages:
            terms.append("messages >= ?")
            params.append(self.min_messages)
        if self.flags:
            terms.append("flags & ? = ?")
            params += [self.flags, self.flags]
        if self.family == 4:
            terms.append("instr(ip, ':') = 0")
        elif self.family == 6:
            terms.append("instr(ip, ':') > 0")
        return " AND ".join(terms), params


@dataclass(frozen=True, slots=True)
class SessionFilter:
    """Which sessions: from ``ip``, ended in [since, until), every bit of ``flags``."""

    ip: str | None = None
    since: float | None = None
    until: float | None = None
    flags: int = 0

    def where(self) -> tuple[str, list[object]]:
        """An SQL condition over ``session_blocks`` (``b``): the blocks that may hold a
        matching session (the sender is matched through ``session_ips``)."""
        terms: list[str] = ["1"]
        params: list[object] = []
        if self.since is not None:
            terms.append("b.last_end >= ?")
            params.append(self.since)
        if self.until is not None:
            terms.append("b.first_end < ?")
            params.append(self.until)
        if self.flags:
            terms.append("b.flags & ? = ?")
            params += [self.flags, self.flags]
        return " AND ".join(terms), params

    def matches(self, row: Sequence) -> bool:
        """Whether the stored session tuple ``row`` (``SESSION_FIELDS``) matches."""
        if self.ip is not None and row[_IP] != self.ip:
            return False
        if self.since is not None and row[_END] < self.since:
            return False
        if self.until is not None and row[_END] >= self.until:
            return False
        return row[_FLAGS] & self.flags == self.flags


IP_COLUMNS = ("ip", "first_seen", "last_seen", "sessions", "messages", "recipients",
              "bytes", "helo", "flags", "local_addresses")
#: A stored session: the recorder's row (the record's fields in this order).
SESSION_FIELDS = ROW_FIELDS
SESSION_COLUMNS = ("id", *SESSION_FIELDS)
_IP, _END, _FLAGS = (SESSION_FIELDS.index(n) for n in ("client_ip", "end", "flags"))
_LIST_FIELDS = tuple(SESSION_FIELDS.index(n) for n in ("mail_from", "first_recipients"))
#: Sessions per block at most, and the bits of a session id that are its position.
BLOCK_ROWS = 4096
ID_SHIFT = 12
#: Blocks rewritten per transaction when a sender is deleted (about 10 ms each when full).
DELETE_CHUNK = 16


def canonical_ip(text: str) -> str:
    """``text`` as the store keeps it: compressed, IPv4-mapped IPv6 as IPv4.

    Raises ``ValueError`` when ``text`` is not an IP address.
    """
    address = ipaddress.ip_address(text.strip())
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return address.compressed


class StoreWriter(abc.ABC):
    """Writes batches of sessions; one thread at a time (``prepare`` excepted)."""

    @abc.abstractmethod
    def prepare(self, rows: Sequence[Row]) -> PreparedBatch:
        """Sessions given as rows (:func:`~sink.record.as_row`) made ready for
        :meth:`write_prepared`, without touching the database: safe on any thread."""

    @abc.abstractmethod
    def write_prepared(self, batches: Sequence[PreparedBatch]) -> None:
        """Store the sessions of ``batches`` (from this writer's :meth:`prepare`) and
        fold them into the aggregates, in one transaction."""

    def write(self, records: Sequence[SessionRecord]) -> None:
        """Store ``records`` and fold them into the aggregates, in one transaction."""
        self.write_prepared([self.prepare(list(map(as_row, records)))])

    @abc.abstractmethod
    def prune(self, before: float) -> int:
        """Delete sessions that ended before ``before``; returns how many."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the connection."""


class StoreReader(abc.ABC):
    """Answers queries; safe to call from any thread, never blocks the writer."""

    @abc.abstractmethod
    def ips(self, flt: IpFilter, sort: str = "last_seen", limit: int = 100,
            after: tuple[float, str] | None = None) -> list[tuple]:
        """Aggregate rows (``IP_COLUMNS``) matching ``flt``, newest/biggest first, after
        the keyset ``after`` (sort value and ip of the previous page's last row)."""

    @abc.abstractmethod
    def iter_ips(self, flt: IpFilter, sort: str = "last_seen") -> Iterator[list[tuple]]:
        """Every aggregate matching ``flt`` as chunks of rows, in bounded memory: the
        rows as they were when the iteration started, without holding the store's
        writer back however slowly the chunks are taken."""

    @abc.abstractmethod
    def ip(self, ip: str, sessions: int = 20) -> dict[str, object] | None:
        """One sender: ``row`` (its aggregate, ``IP_COLUMNS``), ``local_ips`` (the local
        addresses it reached) and ``recent_sessions`` (dicts, last recorded first)."""

    @abc.abstractmethod
    def sessions(self, flt: SessionFilter, limit: int = 100,
                 before_id: int | None = None) -> list[dict[str, object]]:
        """Sessions matching ``flt``, last recorded (highest id) first, with ids below
        ``before_id``. Ids grow in the order sessions were written, which is the order
        they ended up to the recorder's flush interval."""

    @abc.abstractmethod
    def stats(self, now: float, top: int = 10) -> dict[str, object]:
        """``totals``, ``rates`` over 1 m / 1 h / 24 h, and ``top_senders`` (aggregate
        rows by messages)."""

    @abc.abstractmethod
    def delete_ip(self, ip: str) -> bool:
        """Forget ``ip`` (aggregate and sessions); ``False`` if it was unknown."""


# -- SQLite ----------------------------------------------------------------------------

#: Per-IP aggregates of a batch, added to the stored ones. Unqualified names in SET
#: are the stored row's values. The batch's HELO (from its latest session that sent
#: one, at time ?12) replaces the stored one unless the stored sender was seen later.
_UPSERT_IP = """
INSERT INTO ips (ip, first_seen, last_seen, sessions, messages, recipients, bytes, helo, flags,
                 held, segments_in)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)
ON CONFLICT (ip) DO UPDATE SET
    first_seen = min(first_seen, excluded.first_seen),
    last_seen = max(last_seen, excluded.last_seen),
    sessions = sessions + excluded.sessions,
    messages = messages + excluded.messages,
    recipients = recipients + excluded.recipients,
    bytes = bytes + excluded.bytes,
    helo = CASE WHEN excluded.helo != '' AND (?12 >= last_seen OR helo = '')
                THEN excluded.helo ELSE helo END,
    flags = flags | excluded.flags,
    held = held + excluded.held,
    segments_in = segments_in + excluded.segments_in
"""
#: A new (sender, local address) pair; the trigger counts it in ips.local_addresses.
_INSERT_LOCAL = "INSERT OR IGNORE INTO ip_locals (ip, local_ip) VALUES (?, ?)"
_UPSERT_BUCKET = """
INSERT INTO buckets (t, sessions, messages, bytes) VALUES (?, ?, ?, ?)
ON CONFLICT (t) DO UPDATE SET sessions = sessions + excluded.sessions,
    messages = messages + excluded.messages, bytes = bytes + excluded.bytes
"""
_ADD_TOTALS = """
INSERT INTO totals (id, sessions, messages, recipients, bytes, held, segments_in, cpu_seconds,
                    tarpitted)
VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    tarpitted = tarpitted + excluded.tarpitted,
    sessions = sessions + excluded.sessions, messages = messages + excluded.messages,
    recipients = recipients + excluded.recipients, bytes = bytes + excluded.bytes,
    held = held + excluded.held, segments_in = segments_in + excluded.segments_in,
    cpu_seconds = cpu_seconds + excluded.cpu_seconds
"""


# -- session blocks --------------------------------------------------------------------


#: The only globals a block may name: the constructors of plain ints and strings.
_BLOCK_GLOBALS = {("builtins", "int"): int, ("builtins", "str"): str}


class _BlockPickler(pickle.Pickler):
    """Pickles session tuples with int and str subclasses (``Flag``, ``EndReason``)
    stored as plain values, so a block never names a class of this program."""

    def reducer_override(self, obj: object) -> Any:
        # Called only for objects that are not exact ints, strs, floats, tuples...
        if obj is int or obj is str:
            return NotImplemented  # pickled by name, the one kind of global allowed
        if isinstance(obj, int):
            return int, (int.__int__(obj),)
        if isinstance(obj, str):
            return str, (str.__str__(obj),)
        raise pickle.PicklingError(f"a session field holds a {type(obj).__name__}")


class _PlainUnpickler(pickle.Unpickler):
    """Loads only what blocks hold (tuples, lists, str, int, float, None): no class or
    function but ``int`` and ``str`` is ever looked up, so a tampered store cannot run
    code in a reader."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _BLOCK_GLOBALS[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"a session block may not refer to {module}.{name}") from None


def _repeated(columns: Sequence[tuple]) -> frozenset[int]:
    """The positions of the columns that hold one value for every session (two or
    more). In a flood most do: persona, local address, HELO, how it ended, the zero
    counters; often the sender too."""
    same = []
    for index, column in enumerate(columns):
        first = column[0]
        if len(column) > 1 and column[-1] == first and column.count(first) == len(column):
            same.append(index)
    return frozenset(same)


def _encode_block(columns: Sequence[tuple], dead: tuple[int, ...] = (),
                  same: frozenset[int] | None = None) -> bytes:
    """A block's blob: the field names, one column per field (``SESSION_FIELDS``
    order) and the positions of deleted sessions, pickled (protocol 5: later Pythons
    read it). A column is a tuple of the sessions' values; when they all hold the same
    value (``same``, found when not given; schema 6) it is ``None`` and the value goes
    in a fourth part, ``(sessions, ((position, value), ...))``: a flood's block then
    pickles a few values per field instead of a reference per session (5-7x smaller;
    BENCHMARKS.md, "Recording cost"), and a reader older than schema 6 refuses the block
    as damaged instead of misreading it. Columns, not a tuple per session: a batch then
    allocates 26 containers instead of one per session, which the cyclic garbage
    collector would have to walk."""
    if same is None:
        same = _repeated(columns)
    stored = tuple(None if index in same else column for index, column in enumerate(columns))
    block: tuple = (SESSION_FIELDS, stored, dead)
    if same:
        block += ((len(columns[0]), tuple((index, columns[index][0]) for index in sorted(same))),)
    out = io.BytesIO()
    _BlockPickler(out, protocol=5).dump(block)
    return out.getvalue()


def _columns(stored: tuple, repeated: tuple = ()) -> list[tuple]:
    """A block's columns from its stored ones and, if any, its repeated values
    (``(sessions, ((position, value), ...))``); ``ValueError`` when they do not fit."""
    columns = list(stored)
    if repeated:
        size, values = repeated
        if type(size) is not int or not 0 < size <= BLOCK_ROWS:
            raise ValueError(f"a block of {size!r} sessions")
        for index, value in values:
            if (type(index) is not int or not 0 <= index < len(columns)
                    or columns[index] is not None):
                raise ValueError(f"a repeated value for column {index!r}")
            columns[index] = (value,) * size
    for column in columns:
        if not isinstance(column, tuple):
            raise ValueError(f"a column is a {type(column).__name__}")
    return columns


def _encode_rows(rows: Sequence[tuple | None]) -> bytes:
    """A block's blob from session tuples (``None`` for a deleted session)."""
    blank = tuple(SESSION_DEFAULTS[name] for name in SESSION_FIELDS)
    columns = list(zip(*(blank if row is None else row for row in rows), strict=True))
    return _encode_block(columns, tuple(i for i, row in enumerate(rows) if row is None))


def _decode_block(data: bytes) -> list[tuple | None]:
    """The session tuples of a block in ``SESSION_FIELDS`` order, ``None`` for deleted
    ones (a block written with other fields is mapped by name; fields it lacks get
    ``SESSION_DEFAULTS``)."""
    try:
        fields, stored, dead, *repeated = _PlainUnpickler(io.BytesIO(data)).load()
        columns = _columns(stored, *repeated)
        if tuple(fields) != SESSION_FIELDS:
            size = len(columns[0]) if columns else 0
            by_name = dict(zip(fields, columns, strict=True))
            columns = [by_name.get(name, (SESSION_DEFAULTS[name],) * size)
                       for name in SESSION_FIELDS]
        rows: list[tuple | None] = list(zip(*columns, strict=True))
        for index in dead:
            rows[index] = None
    except (pickle.UnpicklingError, ValueError, TypeError, IndexError, EOFError) as exc:
        raise StoreError(f"a session block in the store is damaged: {exc}") from None
    return rows


#: Values for fields a block written by another version lacks.
SESSION_DEFAULTS: dict[str, object] = {
    name: [] if name in ("mail_from", "first_recipients") else "" if name in (
        "client_ip", "local_ip", "persona", "helo", "tls_version", "tls_cipher",
        "end_reason", "last_stage") else 0 for name in SESSION_FIELDS}


def _block_meta(rows: Iterable[tuple | None]) -> tuple[float, float, int, int] | None:
    """(first end, last end, sessions, union of flags) of a block; ``None`` if empty."""
    first: float | None = None
    last = -math.inf
    count = flags = 0
    for row in rows:
        if row is None:
            continue
        end = row[_END]
        if first is None or end < first:
            first = end
        last = max(last, end)
        count += 1
        flags |= row[_FLAGS]
    return None if first is None else (first, last, count, flags)


def _insert_block(conn: sqlite3.Connection, meta: tuple[float, float, int, int],
                  data: bytes, ips: Iterable[str]) -> None:
    """Store a new block: its ``meta`` (first end, last end, sessions, union of flags),
    its blob and the senders in it."""
    block = conn.execute("INSERT INTO session_blocks (first_end, last_end, count, flags) "
                         "VALUES (?, ?, ?, ?)", meta).lastrowid
    conn.execute("INSERT INTO session_data (block, data) VALUES (?, ?)", (block, data))
    conn.executemany("INSERT INTO session_ips (block, ip) VALUES (?, ?)",
                     [(block, ip) for ip in ips])


def _delete_block(conn: sqlite3.Connection, block: int) -> None:
    """Delete ``block`` with its blob and its senders' index entries."""
    for table, key in (("session_blocks", "id"), ("session_data", "block"),
                       ("session_ips", "block")):
        conn.execute(f"DELETE FROM {table} WHERE {key} = ?", (block,))


def _blank_sessions(conn: sqlite3.Connection, block: int,
                    gone: Callable[[tuple], bool]) -> list[tuple]:
    """Blank the sessions of ``block`` for which ``gone`` is true (ids stay); delete the
    block when none is left. Returns the sessions blanked."""
    (data,) = conn.execute("SELECT data FROM session_data WHERE block = ?", (block,)).fetchone()
    rows = _decode_block(data)
    blanked = []
    for index, row in enumerate(rows):
        if row is not None and gone(row):
            rows[index] = None
            blanked.append(row)
    if not blanked:
        return blanked
    meta = _block_meta(rows)
    if meta is None:
        _delete_block(conn, block)
        return blanked
    conn.execute("UPDATE session_blocks SET first_end = ?, last_end = ?, count = ?, flags = ? "
                 "WHERE id = ?", (*meta, block))
    conn.execute("UPDATE session_data SET data = ? WHERE block = ?", (_encode_rows(rows), block))
    left = {row[_IP] for row in rows if row is not None}
    for (ip,) in conn.execute("SELECT ip FROM session_ips WHERE block = ?", (block,)).fetchall():
        if ip not in left:
            conn.execute("DELETE FROM session_ips WHERE block = ? AND ip = ?", (block, ip))
    return blanked


def _unfold(conn: sqlite3.Connection, sessions: Sequence[tuple]) -> None:
    """Take deleted ``sessions`` out of the rate buckets and the tarpitted total (the
    other totals are taken from the sender's aggregate, which holds them all). Sessions
    that retention already removed are not here: their share of the buckets (kept two
    days) and of the tarpitted count stays, which matters only with a retention under
    two days or for the all-time tarpitted count."""
    if not sessions:
        return
    columns = list(zip(*sessions, strict=True))
    conn.executemany("UPDATE buckets SET sessions = sessions - ?2, messages = messages - ?3, "
                     "bytes = bytes - ?4 WHERE t = ?1",
                     _buckets(columns[_END], columns[_MSGS], columns[_BYTES]))
    conn.execute("UPDATE totals SET tarpitted = tarpitted - ?", (_tarpitted(columns[_FLAGS]),))


def store_path(data: Path) -> Path:
    """The SQLite file of the store in the data directory ``data``."""
    return Path(data) / STORE_FILE


def _connect(path: Path, *, create: bool) -> sqlite3.Connection:
    mode = "rwc" if create else "rw"
    try:
        conn = sqlite3.connect(f"file:{path}?mode={mode}", uri=True, isolation_level=None,
                               check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1000)
    except sqlite3.OperationalError as exc:
        if not create and not path.exists():
            raise StoreError(f"no store at {path} (has `spamsink serve --data "
                             f"{path.parent}` run?)") from None
        raise StoreError(f"cannot open the store {path}: {exc}") from None
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _canonical(ip: str) -> str:
    # Dual-stack listeners report IPv4 clients as ::ffff:a.b.c.d.
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


_START, _LOCAL, _HELO, _RCPT, _MSGS, _BYTES, _HELD, _SEGS = (SESSION_FIELDS.index(n) for n in (
    "start", "local_ip", "helo", "recipients", "messages", "bytes", "held", "segments_in"))


def _fold(columns: list[tuple], same: frozenset[int]) -> tuple[
        tuple, list[tuple], set[tuple[str, str]], list[tuple], BatchSums]:
    """What a block given as ``columns`` (one tuple per ``SESSION_FIELDS`` entry) adds
    to the store: the block's meta (first end, last end, count, union of flags), one
    ``_UPSERT_IP`` row per sender, the (sender, local address) pairs, ``_UPSERT_BUCKET``
    rows and the block's sums. ``same`` holds the positions of the columns with one
    value throughout (:func:`_repeated`), which are folded from that value alone.

    Sums run over columns in C; Python loops only per sender, or per session when a
    batch spans a bucket boundary. IPv4-mapped addresses in ``columns`` are replaced by
    IPv4 in place."""
    for index in (_IP, _LOCAL):
        column = columns[index]
        if index in same:
            if column[0].startswith("::ffff:"):
                columns[index] = (_canonical(column[0]),) * len(column)
        elif any(a.startswith("::ffff:") for a in set(column)):
            columns[index] = tuple(map(_canonical, column))
    ips, locals_, ends, flags = columns[_IP], columns[_LOCAL], columns[_END], columns[_FLAGS]
    sessions = len(ends)
    messages, size = sum(columns[_MSGS]), sum(columns[_BYTES])
    first_end, last_end = min(ends), max(ends)
    if _FLAGS in same:
        union = flags[0]
        tarpitted = sessions if union & F_TARPITTED else 0
    else:
        union = reduce(or_, flags, 0)
        tarpitted = _tarpitted(flags)
    totals = BatchSums(sessions, messages, sum(columns[_RCPT]), size, sum(columns[_HELD]),
                       sum(columns[_SEGS]), tarpitted)
    buckets: list[tuple[int, ...]]
    if int(first_end) // BUCKET == int(last_end) // BUCKET:
        buckets = [(int(first_end) // BUCKET * BUCKET, sessions, messages, size)]
    else:
        buckets = _buckets(ends, columns[_MSGS], columns[_BYTES])
    pairs = ({(ips[0], locals_[0])} if _IP in same and _LOCAL in same
             else set(zip(ips, locals_, strict=True)))
    meta = (first_end, last_end, sessions, union)
    return meta, _senders(columns, same), pairs, buckets, totals


def _buckets(ends: Sequence[float], messages: Sequence[int],
             sizes: Sequence[int]) -> list[tuple[int, ...]]:
    """One ``_UPSERT_BUCKET`` row (start, sessions, messages, bytes) per rate bucket
    the sessions given column by column ended in."""
    per_bucket: dict[int, list[int]] = {}
    for end, n_msgs, n_bytes in zip(ends, messages, sizes, strict=True):
        t = int(end) // BUCKET * BUCKET
        bucket = per_bucket.setdefault(t, [t, 0, 0, 0])
        bucket[1] += 1
        bucket[2] += n_msgs
        bucket[3] += n_bytes
    return [tuple(b) for b in per_bucket.values()]


def _tarpitted(flags: Sequence[int]) -> int:
    """How many of the sessions with these flags were tarpitted."""
    return sum(map(F_TARPITTED.__and__, flags)) // F_TARPITTED


_SENDER_FIELDS = (_START, _END, _HELO, _MSGS, _RCPT, _BYTES, _FLAGS, _HELD, _SEGS)


def _senders(columns: list[tuple], same: frozenset[int]) -> list[tuple]:
    """One ``_UPSERT_IP`` row per sender in a block's ``columns`` (``same`` as for
    :func:`_fold`): first start, last end, sessions, messages, recipients, bytes, the
    HELO of its latest session that sent one (and that session's end, -1 if none),
    union of flags, seconds held, segments."""
    ips = columns[_IP]
    if _IP in same or ips.count(ips[0]) == len(ips):  # one sender: the block's columns
        groups: dict[str, list[int] | None] = {ips[0]: None}
    else:
        groups = {}
        for index, ip in enumerate(ips):
            group = groups.get(ip)
            if group is None:
                groups[ip] = [index]
            else:
                group.append(index)
    senders = []
    for ip, group in groups.items():
        if group is not None and len(group) == 1:
            start, end, helo, msgs, rcpts, size, flags, held, segs = (
                columns[f][group[0]] for f in _SENDER_FIELDS)
            senders.append((ip, start, end, 1, msgs, rcpts, size, helo, flags, held, segs,
                            end if helo else -1.0))
            continue
        if group is None:
            starts, ends, helos, msgs, rcpts, size, flags, held, segs = (
                columns[f] for f in _SENDER_FIELDS)
            union = flags[0] if _FLAGS in same else reduce(or_, flags, 0)
            if _HELO in same:  # the latest session's HELO is that one HELO
                latest: tuple = (max(ends), 0, helos[0]) if helos[0] else (-1.0, 0, "")
            else:
                latest = _latest_helo(ends, helos)
        else:
            pick = itemgetter(*group)
            starts, ends, helos, msgs, rcpts, size, flags, held, segs = (
                pick(columns[f]) for f in _SENDER_FIELDS)
            union = reduce(or_, flags, 0)
            latest = _latest_helo(ends, helos)
        senders.append((ip, min(starts), max(ends), len(ends), sum(msgs), sum(rcpts),
                        sum(size), latest[2], union, sum(held), sum(segs), latest[0]))
    return senders


def _latest_helo(ends: Sequence[float], helos: Sequence[str]) -> tuple:
    """(end, position, HELO) of the latest session that sent a HELO (on equal ends the
    later one in the batch); ``(-1.0, 0, "")`` when none did."""
    return max(compress(zip(ends, count(), helos), helos), default=(-1.0, 0, ""))


class _Block(NamedTuple):
    """One block of a :class:`PreparedBatch` from :meth:`SQLiteWriter.prepare`: its meta
    (first end, last end, sessions, union of flags), blob, ``_UPSERT_IP`` rows,
    (sender, local address) pairs, ``_UPSERT_BUCKET`` rows and sums."""

    meta: tuple
    data: bytes
    senders: list[tuple]
    pairs: set[tuple[str, str]]
    buckets: list[tuple]
    sums: BatchSums


class SQLiteWriter(StoreWriter):
    """The single writer of a SQLite store (WAL, synchronous=NORMAL)."""

    def __init__(self, path: Path) -> None:
        path = Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
        self.path = path
        self.conn = _connect(path, create=True)
        try:
            self.conn.execute("PRAGMA journal_mode = WAL")
            self.conn.execute("PRAGMA synchronous = NORMAL")
            # Fewer, larger checkpoints (WAL up to ~40 MB) and a 16 MB page cache: the
            # hot pages (ips, indexes, totals) are copied once per checkpoint, not per
            # 4 MB of WAL. Measured: about 10 % less writer CPU per session.
            self.conn.execute("PRAGMA wal_autocheckpoint = 10000")
            self.conn.execute("PRAGMA cache_size = -16000")
            migrate(self.conn)
        except sqlite3.Error as exc:
            self.conn.close()
            raise StoreError(f"cannot use the store {path}: {exc}") from None
        # This process's CPU (every thread) is added to the totals with each batch, so
        # the store knows what the senders' held seconds cost us, across workers.
        self._cpu_mark = time.process_time()

    def prepare(self, rows: Sequence[Row]) -> PreparedBatch:
        """The blocks of ``rows`` (``BLOCK_ROWS`` at most each) as a list of
        :class:`_Block`, encoded and folded."""
        blocks = []
        for offset in range(0, len(rows), BLOCK_ROWS):
            columns = list(zip(*rows[offset:offset + BLOCK_ROWS], strict=True))
            same = _repeated(columns)
            meta, senders, pairs, buckets, sums = _fold(columns, same)
            blocks.append(_Block(meta, _encode_block(columns, same=same), senders, pairs,
                                 buckets, sums))
        return PreparedBatch(BatchSums.total(block.sums for block in blocks), blocks)

    def write_prepared(self, batches: Sequence[PreparedBatch]) -> None:
        """Raises :class:`~sink.record.StoreBusy` when another connection held the write
        lock for ``BUSY_TIMEOUT_MS`` (nothing written: the same write may be retried)."""
        conn = self.conn
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise StoreBusy(f"the store is locked by another writer: {exc}") from None
            raise
        try:
            for batch in batches:
                for block in cast(list[_Block], batch.payload):
                    self._write_block(block)
            cpu = time.process_time()
            sums = BatchSums.total(batch.sums for batch in batches)
            conn.execute(_ADD_TOTALS, (*sums[:-1], cpu - self._cpu_mark, sums.tarpitted))
            conn.execute("COMMIT")
            self._cpu_mark = cpu
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _write_block(self, block: _Block) -> None:
        """One prepared block and its per-sender, pair and bucket aggregates, inside the
        caller's transaction (the totals are added once per write)."""
        conn = self.conn
        _insert_block(conn, block.meta, block.data, [sender[0] for sender in block.senders])
        conn.executemany(_UPSERT_IP, block.senders)
        conn.executemany(_INSERT_LOCAL, block.pairs)
        conn.executemany(_UPSERT_BUCKET, block.buckets)

    def prune(self, before: float, chunk: int = 100) -> int:
        """Delete the sessions that ended before ``before``, ``chunk`` blocks per
        transaction (whole blocks, or blanked rows of a block that straddles it)."""
        deleted = 0
        conn = self.conn
        old = lambda row: row[_END] < before  # noqa: E731
        while True:
            conn.execute("BEGIN IMMEDIATE")
            try:
                blocks = conn.execute("SELECT id, last_end, count FROM session_blocks "
                                      "WHERE first_end < ? ORDER BY first_end LIMIT ?",
                                      (before, chunk)).fetchall()
                blanked = 0
                for block, last_end, sessions in blocks:
                    if last_end < before:  # all of it: no need to read the blob
                        _delete_block(conn, block)
                        blanked += sessions
                    else:
                        blanked += len(_blank_sessions(conn, block, old))
                conn.execute("DELETE FROM buckets WHERE t < ?", (time.time() - BUCKET_KEEP,))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            deleted += blanked
            if len(blocks) < chunk or not blanked:
                return deleted

    def close(self) -> None:
        self.conn.close()


class SQLiteReader(StoreReader):
    """Queries a SQLite store; one short-lived connection per call, so any thread may
    call and a long export never holds up another request."""

    def __init__(self, path: Path, netdrop: Path | None = None) -> None:
        self.path = Path(path)
        self.netdrop = netdrop
        conn = self._open()  # fail now, with a clear message, if the store is missing
        try:
            version = schema_version(conn)
        finally:
            conn.close()
        if version < SCHEMA_VERSION:
            raise StoreError(f"the store {self.path} has schema version {version}; start "
                             f"`spamsink serve` once to upgrade it to {SCHEMA_VERSION}")
        if version > SCHEMA_VERSION:
            raise StoreError(f"the store {self.path} has schema version {version}, newer "
                             f"than this spamsink ({SCHEMA_VERSION}); upgrade spamsink")

    def _open(self) -> sqlite3.Connection:
        conn = _connect(self.path, create=False)
        conn.execute("PRAGMA query_only = 1")
        return conn

    def ips(self, flt: IpFilter, sort: str = "last_seen", limit: int = 100,
            after: tuple[float, str] | None = None) -> list[tuple]:
        column = _SORT_COLUMN[sort]
        where, params = flt.where()
        if after is not None:
            where += f" AND ({column}, ip) < (?, ?)"
            params += list(after)
        sql = (f"SELECT {', '.join(IP_COLUMNS)} FROM ips WHERE {where} "
               f"ORDER BY {column} DESC, ip DESC LIMIT ?")
        conn = self._open()
        try:
            return conn.execute(sql, [*params, limit]).fetchall()
        finally:
            conn.close()

    def iter_ips(self, flt: IpFilter, sort: str = "last_seen",
                 chunk: int = 2000) -> Iterator[list[tuple]]:
        column = _SORT_COLUMN[sort]
        where, params = flt.where()
        columns = ", ".join(IP_COLUMNS)
        conn = self._open()
        try:
            # One consistent copy of the matching rows, in order, taken in one statement
            # into a temporary table on disk; the export then streams from the copy. So
            # a slow or stalled client holds no snapshot of the store, which would keep
            # every later write in the WAL (no checkpoint can pass a reader) for as long
            # as it stalls. The copy is the only write this connection may make.
            conn.execute("PRAGMA temp_store = FILE")
            conn.execute("PRAGMA query_only = 0")
            conn.execute(f"CREATE TEMP TABLE export AS SELECT {columns} FROM ips WHERE {where} "
                         f"ORDER BY {column} DESC, ip DESC", params)
            conn.execute("PRAGMA query_only = 1")
            cursor = conn.execute(f"SELECT {columns} FROM temp.export ORDER BY rowid")
            while rows := cursor.fetchmany(chunk):
                yield rows
        finally:
            conn.close()

    def ip(self, ip: str, sessions: int = 20) -> dict[str, object] | None:
        conn = self._open()
        try:
            conn.execute("BEGIN")
            row = conn.execute(f"SELECT {', '.join(IP_COLUMNS)} FROM ips WHERE ip = ?",
                               (ip,)).fetchone()
            if row is None:
                item = None
            else:
                item = {"row": row}
                held, segments = conn.execute(
                    "SELECT held, segments_in FROM ips WHERE ip = ?", (ip,)).fetchone()
                item["cost"] = {"held_seconds": round(held, 3), "segments_in": segments}
                item["local_ips"] = [r[0] for r in conn.execute(
                    "SELECT local_ip FROM ip_locals WHERE ip = ? ORDER BY local_ip", (ip,))]
                item["recent_sessions"] = _find_sessions(conn, SessionFilter(ip=ip), sessions)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return item

    def ping(self) -> None:
        """Raise unless the store answers a trivial query."""
        conn = self._open()
        try:
            conn.execute("SELECT sessions FROM totals").fetchall()
        finally:
            conn.close()

    def netdrop_counts(self, ip: str) -> dict[str, object] | None:
        """netdrop's packet counts for ``ip`` from ``netdrop.sqlite``, read-only; ``None``
        when netdrop has no file or no row for it, ``{"error": ...}`` when its table
        cannot be read."""
        if self.netdrop is None or not self.netdrop.exists():
            return None
        try:
            conn = sqlite3.connect(f"file:{self.netdrop}?mode=ro", uri=True,
                                   check_same_thread=False, timeout=2.0)
        except sqlite3.Error:
            return None
        try:
            row = conn.execute("SELECT seen, passed, dropped, delayed, updated "
                               "FROM netdrop_senders WHERE ip = ?", (ip,)).fetchone()
        except sqlite3.Error as exc:
            return {"error": str(exc)}
        finally:
            conn.close()
        if row is None:
            return None
        return dict(zip(("seen", "passed", "dropped", "delayed", "updated"), row, strict=True))

    def sessions(self, flt: SessionFilter, limit: int = 100,
                 before_id: int | None = None) -> list[dict[str, object]]:
        conn = self._open()
        try:
            conn.execute("BEGIN")
            found = _find_sessions(conn, flt, limit, before_id)
            conn.execute("COMMIT")
        finally:
            conn.close()
        return found

    def stats(self, now: float, top: int = 10) -> dict[str, object]:
        conn = self._open()
        try:
            conn.execute("BEGIN")
            totals_row = conn.execute(
                "SELECT sessions, messages, recipients, bytes FROM totals").fetchone()
            cost_row = conn.execute(
                "SELECT held, segments_in, cpu_seconds, tarpitted FROM totals").fetchone()
            senders = conn.execute("SELECT count(*) FROM ips").fetchone()[0]
            rates = {}
            for name, window in (("1m", 60), ("1h", 3600), ("24h", 86400)):
                start = int(now - window) // BUCKET * BUCKET
                row = conn.execute("SELECT coalesce(sum(sessions), 0), coalesce(sum(messages), 0),"
                                   " coalesce(sum(bytes), 0) FROM buckets WHERE t >= ?",
                                   (start,)).fetchone()
                span = max(float(window), now - start)
                rates[name] = {"sessions": row[0], "messages": row[1], "bytes": row[2],
                               "messages_per_s": round(row[1] / span, 3),
                               "sessions_per_s": round(row[0] / span, 3)}
            top_rows = conn.execute(f"SELECT {', '.join(IP_COLUMNS)} FROM ips "
                                    "ORDER BY messages DESC, ip DESC LIMIT ?", (top,)).fetchall()
            conn.execute("COMMIT")
        finally:
            conn.close()
        totals = dict(zip(("sessions", "messages", "recipients", "bytes"),
                          totals_row or (0, 0, 0, 0), strict=True))
        totals["senders"] = senders
        held, segments, cpu, tarpitted = cost_row or (0.0, 0, 0.0, 0)
        messages = totals["messages"] or 0
        cost = {
            "held_seconds": round(held, 3), "held_hours": round(held / 3600, 3),
            "segments_in": segments, "cpu_seconds": round(cpu, 3),
            "held_per_cpu_second": round(held / cpu, 3) if cpu else None,
            "segments_per_message": round(segments / messages, 3) if messages else None,
            "tarpitted_sessions": tarpitted,
        }
        return {"totals": totals, "rates": rates, "cost": cost,
                "top_senders": top_rows}

    def delete_ip(self, ip: str, chunk: int = DELETE_CHUNK, pause: float = 0.05) -> bool:
        """Blocks are rewritten ``chunk`` at a time, one transaction each, with ``pause``
        seconds between: a sender in thousands of blocks takes seconds to forget, and
        the recorder (which waits ``BUSY_TIMEOUT_MS`` at most for the write lock) must
        get in between. The aggregate goes in the last transaction, with the last of
        the blocks: until then the sender is listed, with fewer sessions, and a delete
        that was interrupted can be repeated."""
        conn = _connect(self.path, create=False)
        mine = lambda row: row[_IP] == ip  # noqa: E731
        found = False
        try:
            while True:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    blocks = conn.execute("SELECT block FROM session_ips WHERE ip = ? "
                                          "ORDER BY block LIMIT ?", (ip, chunk)).fetchall()
                    for (block,) in blocks:
                        _unfold(conn, _blank_sessions(conn, block, mine))
                    found = found or bool(blocks)
                    last = len(blocks) < chunk
                    if last:
                        found = self._delete_aggregate(conn, ip) or found
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                if last:
                    return found
                time.sleep(pause)
        finally:
            conn.close()

    @staticmethod
    def _delete_aggregate(conn: sqlite3.Connection, ip: str) -> bool:
        """Delete ``ip``'s aggregate and take it out of the totals; ``False`` if none."""
        row = conn.execute("SELECT sessions, messages, recipients, bytes, held, segments_in "
                           "FROM ips WHERE ip = ?", (ip,)).fetchone()
        if row is None:
            return False
        conn.execute("UPDATE totals SET sessions = sessions - ?, messages = messages - ?,"
                     " recipients = recipients - ?, bytes = bytes - ?, held = held - ?,"
                     " segments_in = segments_in - ?", row)
        conn.execute("DELETE FROM ips WHERE ip = ?", (ip,))
        conn.execute("DELETE FROM ip_locals WHERE ip = ?", (ip,))
        return True


def _find_sessions(conn: sqlite3.Connection, flt: SessionFilter, limit: int,
                   before_id: int | None = None) -> list[dict[str, object]]:
    """Up to ``limit`` sessions matching ``flt`` with ids below ``before_id``, latest
    (highest id) first: the blocks that may match, newest first, decoded one at a time."""
    where, params = flt.where()
    if before_id is not None:
        where += " AND b.id <= ?"
        params.append(before_id >> ID_SHIFT)
    if flt.ip is not None:
        sql = ("SELECT b.id, d.data FROM session_ips s JOIN session_blocks b ON b.id = s.block "
               f"JOIN session_data d ON d.block = b.id WHERE s.ip = ? AND {where} "
               "ORDER BY s.block DESC")
        params.insert(0, flt.ip)
    else:
        sql = ("SELECT b.id, d.data FROM session_blocks b JOIN session_data d "
               f"ON d.block = b.id WHERE {where} ORDER BY b.id DESC")
    found: list[dict[str, object]] = []
    if limit <= 0:
        return found
    for block, data in conn.execute(sql, params):
        base = block << ID_SHIFT
        rows = _decode_block(data)
        for index in range(len(rows) - 1, -1, -1):
            row = rows[index]
            if row is None or not flt.matches(row):
                continue
            session_id = base | index
            if before_id is not None and session_id >= before_id:
                continue
            session = dict(zip(SESSION_COLUMNS, (session_id, *row), strict=True))
            for name in ("mail_from", "first_recipients"):  # tuples (lists in older blocks)
                session[name] = list(session[name])
            found.append(session)
            if len(found) >= limit:
                return found
    return found


def open_writer(data: Path) -> StoreWriter:
    """The store writer for the data directory ``data`` (creating and migrating it)."""
    return SQLiteWriter(store_path(data))


def ensure_store(data: Path) -> None:
    """Create the store in ``data`` (or migrate it to this code's schema) if needed."""
    open_writer(data).close()


def open_reader(data: Path) -> SQLiteReader:
    """A reader for the store in ``data``; :class:`StoreError` if there is none."""
    return SQLiteReader(store_path(data), netdrop=Path(data) / NETDROP_FILE)
