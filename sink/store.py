"""Where recorded sessions and per-sender aggregates live: an interface and SQLite.

Contract:

* :class:`StoreWriter` is used by one thread at a time (the recorder's writer).
  ``write`` stores a batch of session records and folds them into the per-IP
  aggregates, the running totals and the 10-second rate buckets in ONE transaction.
  Aggregates are updated with SQL UPSERT increments, so several processes writing
  to the same store (``--workers N``) never lose an update.
* :class:`StoreReader` answers queries; every call may run on any thread and never
  blocks the writer (SQLite WAL: readers see a snapshot, the writer keeps writing).
* Retention (``prune``) deletes old sessions only; aggregates and totals stay.
* The schema is created and upgraded by :func:`migrate` from the numbered steps in
  ``MIGRATIONS``; ``schema_version`` holds the step reached.

The abstract classes are the seam for a PostgreSQL store for fleets: the SQL is
standard apart from ``INSERT ... ON CONFLICT`` (which PostgreSQL shares) and the
pragmas, which stay in :class:`SQLiteWriter`/:class:`SQLiteReader`.
"""

from __future__ import annotations

import abc
import ipaddress
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from operator import attrgetter
from pathlib import Path

from sink.record import Flag, SessionRecord

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

MIGRATIONS: list[tuple[int, str]] = [
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
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


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
        for version, script in MIGRATIONS:
            if current < version <= target:
                for statement in _statements(script):
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
        terms, params = ["1"], []
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
        """An SQL condition over ``sessions`` and its parameters."""
        terms, params = ["1"], []
        if self.ip is not None:
            terms.append("client_ip = ?")
            params.append(self.ip)
        if self.since is not None:
            terms.append("end >= ?")
            params.append(self.since)
        if self.until is not None:
            terms.append("end < ?")
            params.append(self.until)
        if self.flags:
            terms.append("flags & ? = ?")
            params += [self.flags, self.flags]
        return " AND ".join(terms), params


IP_COLUMNS = ("ip", "first_seen", "last_seen", "sessions", "messages", "recipients",
              "bytes", "helo", "flags", "local_addresses")
SESSION_COLUMNS = ("id", "start", "end", "client_ip", "client_port", "local_ip",
                   "local_port", "persona", "helo", "tls_version", "tls_cipher", "mail_from",
                   "recipients", "first_recipients", "messages", "bytes", "commands", "errors",
                   "bare_lf", "bare_cr", "flags", "end_reason", "held", "segments_in",
                   "retransmits", "last_stage", "waited")
_LIST_COLUMNS = ("mail_from", "first_recipients")


def canonical_ip(text: str) -> str:
    """``text`` as the store keeps it: compressed, IPv4-mapped IPv6 as IPv4.

    Raises ``ValueError`` when ``text`` is not an IP address.
    """
    address = ipaddress.ip_address(text.strip())
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return address.compressed


def _row_dict(columns: Sequence[str], row: Sequence[object]) -> dict[str, object]:
    item = dict(zip(columns, row, strict=True))
    for name in _LIST_COLUMNS:
        if name in item:
            value = item[name]
            item[name] = value.split("\n") if value else []
    return item


class StoreWriter(abc.ABC):
    """Writes batches of sessions; one thread at a time."""

    @abc.abstractmethod
    def write(self, records: Sequence[SessionRecord]) -> None:
        """Store ``records`` and fold them into the aggregates, in one transaction."""

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
        """Every aggregate matching ``flt`` as chunks of rows, in bounded memory."""

    @abc.abstractmethod
    def ip(self, ip: str, sessions: int = 20) -> dict[str, object] | None:
        """One sender: ``row`` (its aggregate, ``IP_COLUMNS``), ``local_ips`` (the local
        addresses it reached) and ``recent_sessions`` (dicts, latest first)."""

    @abc.abstractmethod
    def sessions(self, flt: SessionFilter, limit: int = 100,
                 before_id: int | None = None) -> list[dict[str, object]]:
        """Sessions matching ``flt``, latest first, with ids below ``before_id``."""

    @abc.abstractmethod
    def stats(self, now: float, top: int = 10) -> dict[str, object]:
        """``totals``, ``rates`` over 1 m / 1 h / 24 h, and ``top_senders`` (aggregate
        rows by messages)."""

    @abc.abstractmethod
    def delete_ip(self, ip: str) -> bool:
        """Forget ``ip`` (aggregate and sessions); ``False`` if it was unknown."""


# -- SQLite ----------------------------------------------------------------------------

_SESSION_ROW = attrgetter(
    "start", "end", "client_ip", "client_port", "local_ip", "local_port", "persona", "helo",
    "tls_version", "tls_cipher", "mail_from", "recipients", "first_recipients", "messages",
    "bytes", "commands", "errors", "bare_lf", "bare_cr", "flags", "end_reason", "held",
    "segments_in", "retransmits", "last_stage", "waited")
_INSERT_SESSION = (f"INSERT INTO sessions ({', '.join(SESSION_COLUMNS[1:])}) "
                   f"VALUES ({', '.join('?' * (len(SESSION_COLUMNS) - 1))})")
#: Per-IP aggregates of a batch, added to the stored ones. Unqualified names in SET
#: are the stored row's values. The batch's HELO (from its latest session that sent
#: one, at time ?10) replaces the stored one unless the stored sender was seen later.
_UPSERT_IP = """
INSERT INTO ips (ip, first_seen, last_seen, sessions, messages, recipients, bytes, helo, flags)
VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
ON CONFLICT (ip) DO UPDATE SET
    first_seen = min(first_seen, excluded.first_seen),
    last_seen = max(last_seen, excluded.last_seen),
    sessions = sessions + excluded.sessions,
    messages = messages + excluded.messages,
    recipients = recipients + excluded.recipients,
    bytes = bytes + excluded.bytes,
    helo = CASE WHEN excluded.helo != '' AND (?10 >= last_seen OR helo = '')
                THEN excluded.helo ELSE helo END,
    flags = flags | excluded.flags
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
_TARPITTED = int(Flag.TARPITTED)
#: Per sender: seconds held and segments sent, added after the aggregate upsert.
_ADD_IP_COST = "UPDATE ips SET held = held + ?, segments_in = segments_in + ? WHERE ip = ?"


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

    def write(self, records: Sequence[SessionRecord]) -> None:
        rows = []
        per_ip: dict[str, list] = {}
        pairs = set()
        buckets: dict[int, list[int]] = {}
        sessions = messages = recipients = size = 0
        for record in records:
            row = list(_SESSION_ROW(record))
            ip, local = row[2], row[4]
            if ip.startswith("::ffff:"):
                ip = row[2] = _canonical(ip)
            if local.startswith("::ffff:"):
                local = row[4] = _canonical(local)
            row[10] = "\n".join(row[10])
            row[12] = "\n".join(row[12])
            rows.append(row)
            start, end, helo = row[0], row[1], row[7]
            n_rcpt, n_msg, n_bytes = row[11], row[13], row[14]
            sessions += 1
            messages += n_msg
            recipients += n_rcpt
            size += n_bytes
            pairs.add((ip, local))
            agg = per_ip.get(ip)
            if agg is None:
                per_ip[ip] = [ip, start, end, 1, n_msg, n_rcpt, n_bytes, helo, row[19],
                              end if helo else -1.0]
            else:
                if start < agg[1]:
                    agg[1] = start
                if end > agg[2]:
                    agg[2] = end
                if helo and end >= agg[9]:
                    agg[7], agg[9] = helo, end
                agg[3] += 1
                agg[4] += n_msg
                agg[5] += n_rcpt
                agg[6] += n_bytes
                agg[8] |= row[19]
            t = int(end) // BUCKET * BUCKET
            bucket = buckets.get(t)
            if bucket is None:
                buckets[t] = [t, 1, n_msg, n_bytes]
            else:
                bucket[1] += 1
                bucket[2] += n_msg
                bucket[3] += n_bytes
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_INSERT_SESSION, rows)
            conn.executemany(_UPSERT_IP, per_ip.values())
            conn.executemany(_INSERT_LOCAL, pairs)
            conn.executemany(_UPSERT_BUCKET, buckets.values())
            cost: dict[str, list[float]] = {}
            tarpitted = 0
            for record in records:
                if record.flags & _TARPITTED:
                    tarpitted += 1
                if record.held or record.segments_in:
                    entry = cost.setdefault(_canonical(record.client_ip), [0.0, 0])
                    entry[0] += record.held
                    entry[1] += record.segments_in
            conn.executemany(_ADD_IP_COST, [(h, n, ip) for ip, (h, n) in cost.items()])
            cpu = time.process_time()
            conn.execute(_ADD_TOTALS, (sessions, messages, recipients, size,
                                       sum(h for h, _ in cost.values()),
                                       sum(n for _, n in cost.values()), cpu - self._cpu_mark,
                                       tarpitted))
            conn.execute("COMMIT")
            self._cpu_mark = cpu
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def prune(self, before: float, chunk: int = 10_000) -> int:
        deleted = 0
        conn = self.conn
        while True:
            conn.execute("BEGIN IMMEDIATE")
            cur = conn.execute("DELETE FROM sessions WHERE id IN (SELECT id FROM sessions "
                               "WHERE end < ? ORDER BY end LIMIT ?)", (before, chunk))
            conn.execute("DELETE FROM buckets WHERE t < ?", (time.time() - BUCKET_KEEP,))
            conn.execute("COMMIT")
            deleted += cur.rowcount
            if cur.rowcount < chunk:
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
        sql = (f"SELECT {', '.join(IP_COLUMNS)} FROM ips WHERE {where} "
               f"ORDER BY {column} DESC, ip DESC")
        conn = self._open()
        try:
            conn.execute("BEGIN")  # one snapshot for the whole export
            cursor = conn.execute(sql, params)
            while rows := cursor.fetchmany(chunk):
                yield rows
            conn.execute("COMMIT")
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
                item["recent_sessions"] = [_row_dict(SESSION_COLUMNS, r) for r in conn.execute(
                    f"SELECT {', '.join(SESSION_COLUMNS)} FROM sessions WHERE client_ip = ? "
                    f"ORDER BY end DESC LIMIT ?", (ip, sessions))]
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
        where, params = flt.where()
        if before_id is not None:
            where += " AND id < ?"
            params.append(before_id)
        sql = (f"SELECT {', '.join(SESSION_COLUMNS)} FROM sessions WHERE {where} "
               f"ORDER BY id DESC LIMIT ?")
        conn = self._open()
        try:
            rows = conn.execute(sql, [*params, limit]).fetchall()
        finally:
            conn.close()
        return [_row_dict(SESSION_COLUMNS, row) for row in rows]

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

    def delete_ip(self, ip: str) -> bool:
        conn = _connect(self.path, create=False)
        try:
            conn.execute("BEGIN IMMEDIATE")
            row = conn.execute("SELECT sessions, messages, recipients, bytes FROM ips "
                               "WHERE ip = ?", (ip,)).fetchone()
            if row is not None:
                conn.execute("UPDATE totals SET sessions = sessions - ?, messages = messages - ?,"
                             " recipients = recipients - ?, bytes = bytes - ?", row)
                conn.execute("DELETE FROM ips WHERE ip = ?", (ip,))
                conn.execute("DELETE FROM ip_locals WHERE ip = ?", (ip,))
                conn.execute("DELETE FROM sessions WHERE client_ip = ?", (ip,))
            conn.execute("COMMIT")
        finally:
            conn.close()
        return row is not None


def open_writer(data: Path) -> StoreWriter:
    """The store writer for the data directory ``data`` (creating and migrating it)."""
    return SQLiteWriter(store_path(data))


def ensure_store(data: Path) -> None:
    """Create the store in ``data`` (or migrate it to this code's schema) if needed."""
    open_writer(data).close()


def open_reader(data: Path) -> SQLiteReader:
    """A reader for the store in ``data``; :class:`StoreError` if there is none."""
    return SQLiteReader(store_path(data), netdrop=Path(data) / NETDROP_FILE)
