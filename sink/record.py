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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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
    mail_from: list[str] = field(default_factory=list)
    recipients: int = 0
    first_recipients: list[str] = field(default_factory=list)
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


class RecordSink(Protocol):
    """Where the engine hands finished sessions. ``submit`` never blocks or raises."""

    def submit(self, record: SessionRecord) -> None: ...


class DiscardRecords:
    """A :class:`RecordSink` that keeps nothing (recording turned off)."""

    def submit(self, record: SessionRecord) -> None:
        """Drop ``record``."""


class Recorder:
    """The engine's :class:`RecordSink` that batches sessions into a store.

    ``submit`` (event-loop thread) appends to a bounded queue and returns; when the
    queue is full the record is dropped, counted in ``dropped`` and a warning is
    logged at most once per ``warn_interval`` seconds. One writer thread takes up to
    ``batch`` records at a time and hands them to ``write`` (one transaction per
    batch); it wakes when ``batch`` records are waiting and at least every
    ``interval`` seconds. ``close`` writes everything still queued and stops the
    thread. A failing write is logged, its batch counted in ``failed``, and the
    writer carries on. ``on_tick`` runs in the writer thread after every wake-up
    (metrics sampling, retention); ``on_batch`` after every written batch with the
    records and the seconds the write took.
    """

    def __init__(self, write: Callable[[Sequence[SessionRecord]], None], *,
                 capacity: int = 65_536, batch: int = 1000, interval: float = 0.5,
                 warn_interval: float = 60.0,
                 on_tick: Callable[[], None] | None = None,
                 on_batch: Callable[[Sequence[SessionRecord], float], None] | None = None,
                 ) -> None:
        self._write = write
        self._queue: collections.deque[SessionRecord] = collections.deque()
        self.capacity = capacity
        self.batch = batch
        self.interval = interval
        self.warn_interval = warn_interval
        self.on_tick = on_tick
        self.on_batch = on_batch
        self.dropped = 0
        self.failed = 0
        self.written = 0
        self._last_warning = -math.inf
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="spamsink-recorder", daemon=True)

    def start(self) -> Recorder:
        """Start the writer thread."""
        self._thread.start()
        return self

    @property
    def depth(self) -> int:
        """Records waiting to be written."""
        return len(self._queue)

    def submit(self, record: SessionRecord) -> None:
        """Queue ``record`` for writing; never blocks, never raises."""
        queue = self._queue
        size = len(queue)
        if size >= self.capacity:
            self._drop()
            return
        queue.append(record)
        if size + 1 == self.batch:
            self._wake.set()

    def _drop(self) -> None:
        self.dropped += 1
        now = time.monotonic()
        if now - self._last_warning >= self.warn_interval:
            self._last_warning = now
            log.warning("recorder queue full (%d records): dropped %d session records so far",
                        self.capacity, self.dropped)

    def close(self, timeout: float = 30.0) -> None:
        """Write everything queued, then stop the writer thread."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval)
            self._wake.clear()
            stopping = self._stopping
            self._drain()
            if self.on_tick is not None:
                try:
                    self.on_tick()
                except Exception:
                    log.exception("recorder tick failed")
            if stopping:
                return

    def _drain(self) -> None:
        queue, size = self._queue, self.batch
        while queue:
            records = [queue.popleft() for _ in range(min(size, len(queue)))]
            started = time.perf_counter()
            try:
                self._write(records)
            except Exception:
                self.failed += len(records)
                log.exception("could not write %d session records", len(records))
                continue
            self.written += len(records)
            if self.on_batch is not None:
                self.on_batch(records, time.perf_counter() - started)
