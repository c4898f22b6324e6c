"""The session model: what the engine hands over when a connection closes.

The engine fills one :class:`SessionRecord` per connection and passes it, once, to a
:class:`RecordSink` (``submit`` must never block or raise). The recorder that batches
records into the store lives beside this model; the store and API read what it wrote.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol


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
