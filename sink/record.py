"""The session model: what the engine hands over when a connection closes.

The engine fills one :class:`SessionRecord` per connection and passes it, once, to a
:class:`RecordSink` (``submit`` must never block or raise). The recorder that batches
records into the store lives beside this model; the store and API read what it wrote.
"""

from __future__ import annotations

import collections
import enum
import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import attrgetter
from typing import NamedTuple, Protocol

log = logging.getLogger("spamsink.record")


class Flag(enum.IntFlag):
    """Bot signals seen in a session. Stored as an integer bit set."""

    PREGREET = 1  # talked before the greeting was complete
    PIPELINING_UNASKED = 2  # sent ahead without PIPELINING being offered/negotiated
    BARE_LF = 4  # a line ended in LF without CR
    BARE_CR = 8  # a CR not followed by LF
    NON_SMTP = 16  # HTTP, TLS on the plain port, binary garbage, header lines
    AUTH_ATTEMPT = 32  # tried AUTH
    RELAY_ATTEMPT = 64  # asked for a recipient outside --domains
    SMUGGLING = 128  # an end-of-data look-alike with bare CR/LF (SMTP smuggling)
    LONG_LINE = 256  # a command line over the persona's line length limit
    GREYLISTED = 512  # answered 450 by the greylist
    GREYLIST_RETRY = 1024  # came back after a greylist deferral
    TARPITTED = 2048  # paced by the tarpit

    @classmethod
    def names(cls, value: int) -> list[str]:
        """The lower-case names of the flags set in ``value``, in bit order."""
        return [f.name.lower() for f in cls if value & f and f.name]

    @classmethod
    def parse(cls, name: str) -> Flag:
        """The flag called ``name`` (case-insensitive); ``ValueError`` if unknown."""
        try:
            return cls[name.upper()]
        except KeyError:
            known = ", ".join(f.name.lower() for f in cls if f.name)
            raise ValueError(f"unknown flag {name!r}; known: {known}") from None


#: Each flag as a plain ``int``, for the hot paths: ``int & Flag.X`` runs enum's
#: Python-level ``__rand__``, ``int & F_X`` is one C operation.
F_PREGREET = int(Flag.PREGREET)
F_PIPELINING_UNASKED = int(Flag.PIPELINING_UNASKED)
F_BARE_LF = int(Flag.BARE_LF)
F_BARE_CR = int(Flag.BARE_CR)
F_NON_SMTP = int(Flag.NON_SMTP)
F_AUTH_ATTEMPT = int(Flag.AUTH_ATTEMPT)
F_RELAY_ATTEMPT = int(Flag.RELAY_ATTEMPT)
F_SMUGGLING = int(Flag.SMUGGLING)
F_LONG_LINE = int(Flag.LONG_LINE)
F_GREYLISTED = int(Flag.GREYLISTED)
F_GREYLIST_RETRY = int(Flag.GREYLIST_RETRY)
F_TARPITTED = int(Flag.TARPITTED)


class EndReason(enum.StrEnum):
    """How a session ended."""

    QUIT = "quit"
    CLIENT_CLOSE = "client_close"
    TIMEOUT = "timeout"
    LIMIT = "limit"  # an error, command, size, time or connection limit
    FORBIDDEN = "forbidden"  # non-SMTP command answered and closed
    SHUTDOWN = "shutdown"
    ERROR = "error"  # transport error (reset, TLS failure)


#: How many recipients and sender addresses a record keeps verbatim.
KEEP_ADDRESSES = 5


@dataclass(slots=True)
class SessionRecord:
    """One connection, from accept to close. Times are Unix seconds (float)."""

    start: float
    client_ip: str
    client_port: int
    local_ip: str
    local_port: int
    persona: str
    end: float = 0.0
    helo: str = ""
    tls_version: str = ""
    tls_cipher: str = ""
    #: The first ``KEEP_ADDRESSES`` sender and recipient addresses. Tuples, not lists:
    #: no allocation for a session without any, and a queued row holding only tuples
    #: and plain values is dropped from the garbage collector's tracking.
    mail_from: tuple[str, ...] = ()
    recipients: int = 0
    first_recipients: tuple[str, ...] = ()
    messages: int = 0
    bytes: int = 0
    commands: int = 0
    errors: int = 0
    bare_lf: int = 0
    bare_cr: int = 0
    flags: int = 0
    end_reason: str = EndReason.CLIENT_CLOSE
    #: Seconds spent waiting on our pacing (tarpit) in this session.
    held: float = 0.0
    #: What the kernel counted for this connection (TCP_INFO at close); 0 if unknown.
    segments_in: int = 0
    retransmits: int = 0
    #: The SMTP stage the client was in when the session ended ("greeting", "mail"...).
    last_stage: str = ""
    #: Seconds the client had waited for our pending (held) reply when it closed; 0 if none.
    waited: float = 0.0

    @property
    def duration(self) -> float:
        """Seconds from accept to close."""
        return max(0.0, self.end - self.start)


#: A finished session as a plain tuple: what the recorder queues and the store keeps,
#: these fields of :class:`SessionRecord` in this order (every field, see the tests).
ROW_FIELDS = ("start", "end", "client_ip", "client_port", "local_ip", "local_port", "persona",
              "helo", "tls_version", "tls_cipher", "mail_from", "recipients",
              "first_recipients", "messages", "bytes", "commands", "errors", "bare_lf",
              "bare_cr", "flags", "end_reason", "held", "segments_in", "retransmits",
              "last_stage", "waited")
#: ``as_row(record)``: the record's ``ROW_FIELDS`` as a tuple (one C call).
as_row = attrgetter(*ROW_FIELDS)
#: A session as :data:`as_row` gives it.
Row = tuple[object, ...]


class RecordSink(Protocol):
    """Where the engine hands finished sessions. ``submit`` never blocks or raises."""

    def submit(self, record: SessionRecord) -> None: ...


class DiscardRecords:
    """A :class:`RecordSink` that keeps nothing (recording turned off)."""

    def submit(self, record: SessionRecord) -> None:
        """Drop ``record``."""


class BatchSums(NamedTuple):
    """What a batch of sessions adds to the running totals (and to the metrics)."""

    sessions: int
    messages: int
    recipients: int
    bytes: int
    held: float
    segments: int
    tarpitted: int

    @classmethod
    def total(cls, parts: Iterable[BatchSums]) -> BatchSums:
        """The field-by-field sum of ``parts`` (zeros when there are none)."""
        columns = list(zip(*parts, strict=True))
        return cls(*map(sum, columns)) if columns else cls(0, 0, 0, 0, 0.0, 0, 0)


class StoreBusy(Exception):
    """A store's ``write`` could not take its lock in time (another writer held it):
    nothing was written, and the same write may succeed later."""


@dataclass(frozen=True, slots=True)
class PreparedBatch:
    """Rows made ready for a store by its ``prepare``: the batch's sums
    (``sums.sessions`` is the number of rows) and whatever the store's
    ``write_prepared`` needs (``payload``, the store's own)."""

    sums: BatchSums
    payload: object


class Recorder:
    """The engine's :class:`RecordSink` that batches sessions into a store.

    ``submit`` runs in one thread, the event loop's, and never blocks: it appends the
    record to a queue as a row (:data:`as_row`; the record is freed at once) and, every
    ``batch`` rows, turns them into one :class:`PreparedBatch` with ``prepare`` (the CPU
    part of a write: columns, sums, encoding) right there. Why there: the rows were
    just made on that core and are freed by the thread that allocated them; done in
    the writer thread, the same work cost the sink about twice as much (BENCHMARKS.md,
    "Recording cost"). The writer thread hands the prepared batches to ``write``, all
    that are waiting in one call (one transaction). It wakes when a batch is ready, but
    under load writes at most once per ``gap`` seconds (each transaction has a fixed
    cost: the same hot pages rewritten); when ``interval`` seconds pass without a full
    batch it prepares and writes what is queued itself (the quiet case), so a record
    waits about ``interval + gap`` seconds at most. When the prepared batches waiting
    or being written hold ``capacity`` records, the next batch is dropped instead,
    counted in ``dropped``, and a warning is logged at most once per ``warn_interval``
    seconds. ``close`` writes everything still queued and stops the thread.

    A write that raises :class:`StoreBusy` is kept and tried again, first in the next
    write (its records count towards ``depth`` and the capacity meanwhile; a warning is
    logged at most once per ``warn_interval``); at ``close`` it is tried once more and
    then counted in ``failed``. Any other failing prepare or write is logged, its
    records counted in ``failed``, and recording carries on. ``on_tick`` runs in the
    writer thread after every wake-up (metrics sampling, retention); ``on_batch`` after
    every write with the batches written and the seconds the write took.
    """

    def __init__(self, prepare: Callable[[Sequence[Row]], PreparedBatch],
                 write: Callable[[Sequence[PreparedBatch]], None], *,
                 capacity: int = 65_536, batch: int = 1000, interval: float = 0.5,
                 gap: float = 0.25,
                 warn_interval: float = 60.0,
                 on_tick: Callable[[], None] | None = None,
                 on_batch: Callable[[Sequence[PreparedBatch], float], None] | None = None,
                 ) -> None:
        self._prepare = prepare
        self._write = write
        self._rows: collections.deque[Row] = collections.deque()
        self._ready: collections.deque[PreparedBatch] = collections.deque()
        # Records in ``_ready``: added by the submitting thread, taken by the writer;
        # each counter has one writer, so no lock is needed.
        self._readied = 0
        self._taken = 0
        # A write the store was too busy to take, kept by the writer thread for its next.
        self._retry: list[PreparedBatch] = []
        self._retrying = 0
        self.capacity = max(capacity, batch)  # else every full batch would be dropped
        self.batch = batch
        self.interval = interval
        self.gap = gap
        self.warn_interval = warn_interval
        self.on_tick = on_tick
        self.on_batch = on_batch
        # Dropped records, counted by the thread that dropped them.
        self._dropped_full = 0
        self._dropped_leftovers = 0
        self.written = 0
        # Lost records, counted by the thread that lost them.
        self._failed_prepares = 0
        self._failed_writes = 0
        self._last_warning = -math.inf
        self._last_busy_warning = -math.inf
        self._wake = threading.Event()
        self._stop = threading.Event()  # set by close()
        self._last_write = -math.inf
        self._thread = threading.Thread(target=self._run, name="spamsink-recorder", daemon=True)

    def start(self) -> Recorder:
        """Start the writer thread."""
        self._thread.start()
        return self

    @property
    def dropped(self) -> int:
        """Records dropped because the queue was full."""
        return self._dropped_full + self._dropped_leftovers

    @property
    def failed(self) -> int:
        """Records lost to a failed prepare or write."""
        return self._failed_prepares + self._failed_writes

    @property
    def depth(self) -> int:
        """Records waiting to be written."""
        return len(self._rows) + self._readied - self._taken + self._retrying

    def submit(self, record: SessionRecord) -> None:
        """Queue ``record`` for writing; never blocks, never raises."""
        rows = self._rows
        rows.append(as_row(record))  # the record itself is freed now, while it is hot
        if len(rows) >= self.batch:
            self._hand_over()

    def _hand_over(self) -> None:
        """Prepare a full batch in the submitting thread and wake the writer (or drop
        the batch when the writer is ``capacity`` records behind)."""
        rows = self._take(self.batch)
        if not rows:
            return  # the writer took them first
        if self._readied - self._taken + self._retrying + len(rows) > self.capacity:
            self._dropped_full += len(rows)
            self._warn_full()
            return
        try:
            prepared = self._prepare(rows)
        except Exception:
            self._failed_prepares += len(rows)
            log.exception("could not prepare %d session records", len(rows))
            return
        self._readied += len(rows)  # before the append: ``depth`` never goes negative
        self._ready.append(prepared)
        self._wake.set()

    def _take(self, count: int) -> list[Row]:
        """Up to ``count`` rows from the queue (the other thread may take some too: each
        ``popleft`` is atomic)."""
        taken: list[Row] = []
        pop = self._rows.popleft
        try:
            for _ in range(count):
                taken.append(pop())
        except IndexError:
            pass
        return taken

    def _warn_full(self) -> None:
        now = time.monotonic()
        if now - self._last_warning >= self.warn_interval:
            self._last_warning = now
            log.warning("recorder queue full (%d records): dropped %d session records so far",
                        self.capacity, self.dropped)

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the writer thread."""
        self._stop.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is None:  # never started: write here
            self._drain(leftovers=True, stopping=True)

    def _run(self) -> None:
        while True:
            woken = self._wake.wait(self.interval)
            rest = self._last_write + self.gap - time.monotonic()
            if woken and rest > 0:
                self._stop.wait(rest)  # under load, one transaction per ``gap`` at most
            self._wake.clear()
            stopping = self._stop.is_set()  # after the clear: a close() cannot slip between
            # Records left unprepared are taken only when ``interval`` passed without a
            # full batch (or at close): after a hand-over they are the next batch.
            self._drain(leftovers=stopping or not woken, stopping=stopping)
            if self.on_tick is not None:
                try:
                    self.on_tick()
                except Exception:
                    log.exception("recorder tick failed")
            if stopping:
                return

    def _drain(self, leftovers: bool, stopping: bool = False) -> None:
        """In one write: the batches a busy store could not take last time, the
        prepared batches and, with ``leftovers``, the rows not yet prepared (those
        queued when the wake-up came: a busy submitter cannot keep the writer here);
        ``stopping``: the last write."""
        ready = self._ready
        batches, self._retry = self._retry, []
        fresh: list[PreparedBatch] = []
        while ready:
            fresh.append(ready.popleft())
        taken = sum(prepared.sums.sessions for prepared in fresh)
        batches += fresh
        if leftovers:
            batches += self._prepare_leftovers()
        try:
            self._write_batches(batches, last_try=stopping)
        finally:
            self._taken += taken  # out of ``depth`` (and the capacity) once written or lost

    def _prepare_leftovers(self) -> list[PreparedBatch]:
        """The rows queued now, prepared in this thread (``batch`` at a time), as many
        as the capacity leaves room for (a kept busy write and the batches waiting
        count); the rest are dropped."""
        prepared: list[PreparedBatch] = []
        left = len(self._rows)
        room = max(0, self.capacity - (self._readied - self._taken) - self._retrying)
        while left > 0:
            rows = self._take(min(left, self.batch))
            if not rows:
                break
            left -= len(rows)
            if len(rows) > room:
                self._dropped_leftovers += len(rows) - room
                self._warn_full()
                rows = rows[:room]
                if not rows:
                    continue
            room -= len(rows)
            try:
                prepared.append(self._prepare(rows))
            except Exception:
                self._failed_writes += len(rows)
                log.exception("could not prepare %d session records", len(rows))
        return prepared

    def _write_batches(self, batches: list[PreparedBatch], last_try: bool = False) -> None:
        """One ``write`` of ``batches``; counts them written or failed, then ``on_batch``.
        A busy store's write is kept for the next (unless ``last_try``)."""
        if not batches:
            return
        sessions = sum(prepared.sums.sessions for prepared in batches)
        started = time.perf_counter()
        self._last_write = time.monotonic()
        try:
            self._write(batches)
        except StoreBusy as exc:
            if last_try:
                self._retrying = 0
                self._failed_writes += sessions
                log.error("could not write %d session records at shutdown: %s", sessions, exc)
                return
            self._retry = batches
            self._retrying = sessions  # before ``_drain`` counts the fresh ones taken
            now = time.monotonic()
            if now - self._last_busy_warning >= self.warn_interval:
                self._last_busy_warning = now
                log.warning("%s; %d session records kept for the next write", exc, sessions)
            return
        except Exception:
            self._retrying = 0
            self._failed_writes += sessions
            log.exception("could not write %d session records", sessions)
            return
        self._retrying = 0
        self.written += sessions
        if self.on_batch is not None:
            try:
                self.on_batch(batches, time.perf_counter() - started)
            except Exception:
                log.exception("recorder batch hook failed")
