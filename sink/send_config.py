"""What one ``spamsink send`` run does: validated settings, and their split over processes.

Contract: :func:`config_from_options` turns the parsed command line into a
:class:`SendConfig` or raises :class:`UsageError` whose text is one line for the user.
:meth:`SendConfig.share` gives worker ``i`` of ``n`` its part: counts, senders, hold
connections and rate are divided so that the parts add up exactly to the whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
from dataclasses import dataclass
from pathlib import Path

from sink.send_body import BodyError, load_bodies
from sink.send_source import SourceError, parse_sources

DEFAULT_FROM = "smtpsend@localhost"
DEFAULT_TO = "smtpsink@localhost"
DEFAULT_SUBJECT = "spamsink send test message"
DEFAULT_BYTES = 1024
#: The largest -b: each process builds the message in memory, and a copy per message.
MAX_BYTES = 100 * 1024**2
#: Seconds a reply may take; hold mode waits like a patient spammer.
DEFAULT_TIMEOUT = 30.0
DEFAULT_HOLD_TIMEOUT = 3600.0


class UsageError(ValueError):
    """A command line that cannot run; the text is one line for the user."""


@dataclass(frozen=True, slots=True)
class SendConfig:
    """Validated settings of a run (or of one worker's share of it)."""

    host: str
    port: int
    family: int
    sockaddr: tuple
    senders: int
    per_connection: int
    count: int | None
    duration: float | None
    sender: str
    recipient: str
    subject: str
    body_bytes: int
    bodies: list[bytes] | None
    verbose: int = 0
    json: bool = False
    quiet: bool = False
    ehlo: str = "localhost"
    pipelining: bool = False
    bdat: bool = False
    starttls: bool = False
    tls: bool = False
    rcpts: int = 1
    rate: float | None = None
    sources: list[str] | None = None
    timeout: float = DEFAULT_TIMEOUT
    procs: int = 1
    hold: int | None = None
    hold_pause: float = 5.0
    #: Which worker this share is for (offsets source and body rotation).
    worker: int = 0

    def share(self, index: int, parts: int) -> SendConfig:
        """Worker ``index``'s part of this run when split over ``parts`` processes."""
        def split(total: int) -> int:
            return total // parts + (1 if index < total % parts else 0)

        return dataclasses.replace(
            self,
            senders=split(self.senders),
            count=split(self.count) if self.count is not None else None,
            hold=split(self.hold) if self.hold is not None else None,
            rate=self.rate / parts if self.rate else None,
            procs=1,
            worker=index,
        )


def _address(text: str, option: str) -> str:
    """An envelope address as given; ``-F ''`` is the null sender ``MAIL FROM:<>``
    (bounces), a recipient must not be empty."""
    if any(c in text for c in "\r\n<> "):
        raise UsageError(f"{option} {text!r}: an address must not contain spaces, '<', '>' "
                         "or line breaks")
    if not text and option == "-T":
        raise UsageError("-T '': a recipient must not be empty (only the sender may be null)")
    return text


def _ehlo_name(text: str) -> str:
    """The EHLO/HELO name: one word of printable ASCII (RFC 5321 domain or address
    literal), so nothing but the name can reach the wire."""
    if not text or not all("!" <= c <= "~" for c in text):
        raise UsageError(f"--ehlo {text!r}: the name must be one word of printable ASCII "
                         "(no spaces, control characters or line breaks)")
    return text


def _resolve(host: str, port: int) -> tuple[int, tuple]:
    name = host.strip("[]")
    try:
        # An ASCII name goes as bytes: the same lookup without loading the IDNA codec,
        # 1.4 ms of every start.
        infos = socket.getaddrinfo(name.encode() if name.isascii() else name, port,
                                   type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise UsageError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def config_from_options(options: argparse.Namespace) -> SendConfig:
    """A :class:`SendConfig` from ``spamsink send``'s parsed options (see the contract)."""
    hold = options.hold
    if hold is not None:
        if options.count is not None:
            raise UsageError("--hold runs for -t SECONDS; -n does not apply")
        if options.senders is not None or options.per_connection is not None:
            raise UsageError("--hold N sets the number of connections; -s and -m do not apply")
        if options.rate is not None:
            raise UsageError("--hold paces messages with --hold-pause; --rate does not apply")
    if options.subject is not None and any(c in options.subject for c in "\r\n"):
        raise UsageError("-S: a subject must not contain line breaks")
    if options.duration is not None and options.duration <= 0:
        raise UsageError("-t must be more than 0 seconds")
    if options.body_bytes is not None and options.body_bytes > MAX_BYTES:
        raise UsageError("-b: at most 100M (the message is built in memory)")
    bodies = None
    if options.body is not None:
        if options.body_bytes is not None:
            raise UsageError("--body sends the files as they are; -b does not apply")
        if options.subject is not None:
            raise UsageError("--body sends the files' own headers; -S does not apply")
        try:
            bodies = load_bodies(Path(options.body))
        except BodyError as exc:
            raise UsageError(str(exc)) from None
    sources = None
    if options.source:
        try:
            sources = parse_sources(options.source)
        except SourceError as exc:
            raise UsageError(str(exc)) from None
    family, sockaddr = _resolve(options.host, options.port)
    if sources is not None:
        source_family = socket.AF_INET6 if ":" in sources[0] else socket.AF_INET
        if source_family != family:
            def version(f: int) -> str:
                return "IPv6" if f == socket.AF_INET6 else "IPv4"
            raise UsageError(f"--source addresses are {version(source_family)} but "
                             f"{options.host} is {version(family)}")
    senders = hold if hold is not None else (options.senders or 1)
    procs = max(1, min(options.procs, senders))
    timeout = options.timeout
    if timeout is not None and timeout <= 0:
        raise UsageError("--timeout must be more than 0 seconds")
    if timeout is None:
        timeout = DEFAULT_HOLD_TIMEOUT if hold is not None else DEFAULT_TIMEOUT
    return SendConfig(
        host=options.host,
        port=options.port,
        family=family,
        sockaddr=sockaddr,
        senders=senders,
        per_connection=options.per_connection or 1,
        count=options.count,
        duration=options.duration,
        sender=_address(options.sender if options.sender is not None else DEFAULT_FROM, "-F"),
        recipient=_address(options.recipient if options.recipient is not None else DEFAULT_TO,
                           "-T"),
        subject=options.subject if options.subject is not None else DEFAULT_SUBJECT,
        body_bytes=options.body_bytes if options.body_bytes is not None else DEFAULT_BYTES,
        bodies=bodies,
        verbose=options.verbose,
        json=options.json,
        quiet=options.quiet,
        ehlo=_ehlo_name(options.ehlo),
        pipelining=options.pipelining,
        bdat=options.bdat,
        starttls=options.starttls,
        tls=options.tls,
        rcpts=options.rcpts,
        rate=options.rate,
        sources=sources,
        timeout=timeout,
        procs=procs,
        hold=hold,
        hold_pause=options.hold_pause,
    )
