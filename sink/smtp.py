"""The SMTP engine: one ``asyncio.Protocol`` per connection, a state machine over bytes.

Contract:

* Every command is answered as the configured :class:`~sink.persona.Persona` answers
  it; nothing is ever relayed, stored or sent anywhere. DATA and BDAT payloads are
  scanned and discarded as they arrive, never buffered whole.
* All replies produced by one read are joined into one ``write``.
* A connection costs a fixed, small amount of memory: the partial command line is
  bounded by the persona's line length, input arriving while a reply is held by the
  tarpit is bounded by ``Limits.buffer_bytes``, and a client that stops reading
  stops being read from (write-buffer high-water mark) until the idle timeout.
* When the connection closes, exactly one :class:`~sink.record.SessionRecord` is
  handed to the server's record sink, without blocking.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass

from sink.deadlines import Deadlines
from sink.persona import Persona, rfc2822_now
from sink.record import (
    F_AUTH_ATTEMPT,
    F_BARE_CR,
    F_BARE_LF,
    F_GREYLISTED,
    F_LONG_LINE,
    F_NON_SMTP,
    F_PIPELINING_UNASKED,
    F_PREGREET,
    F_RELAY_ATTEMPT,
    F_SMUGGLING,
    F_TARPITTED,
    KEEP_ADDRESSES,
    EndReason,
    RecordSink,
    SessionRecord,
)
from sink.tarpit import BOT_FLAGS, Pacer, Stage, Tarpit

log = logging.getLogger("spamsink.smtp")

_CMD, _DATA, _BDAT = 0, 1, 2
_END_OF_DATA = b"\r\n.\r\n"
#: End-of-data look-alikes other servers accept (SMTP smuggling): a dot line opened or
#: closed by a bare LF or a bare CR. The real CRLF.CRLF never matches.
_SMUGGLING = re.compile(rb"(?<!\r)\n\.\r?\n|\r\n\.\n|\r\.\r?\n")
#: RFC 2920: these may only end a pipelined group.
_GROUP_ENDERS = frozenset({b"EHLO", b"HELO", b"DATA", b"VRFY", b"EXPN", b"TURN", b"QUIT",
                           b"NOOP", b"STARTTLS", b"AUTH", b"ETRN"})
_JUNK = frozenset({b"NOOP", b"VRFY", b"ETRN", b"RSET"})
_HEADER_LINE = re.compile(rb"^[!-9;-~]+:")
_XTEXT = re.compile(rb"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})+$")
#: Bytes an address may not contain: controls, and "<" inside the brackets.
_CONTROLS = bytes(range(0x20)) + b"\x7f"
_NOT_IN_BRACKETS = _CONTROLS + b"<"
_NOTIFY = frozenset({b"SUCCESS", b"FAILURE", b"DELAY"})
_MAX_BDAT = 1 << 62
#: ``_held`` while a STARTTLS handshake runs: nothing is processed, input is dropped.
_TLS_PENDING: tuple[bytes, float, float, float] = (b"", 0.0, 0.0, 0.0)
#: Seconds a closing connection may take to drain its output before it is aborted
#: (a client that stops reading must not keep its slot, and its memory, forever).
_CLOSE_GRACE = 10.0
#: Idle and session timeouts fire up to this many seconds late.
_TIMEOUT_RESOLUTION = 0.25
#: Held replies and stuttered bytes go out up to this many seconds late (less when
#: the stutter is faster than 10 bytes/s: half a byte's interval, at least 5 ms).
#: Coarser ticks batch more writes per loop wake-up (measured: 8.0 % instead of 10.1 %
#: of a core for 50,000 stuttering connections).
_PACING_RESOLUTION = 0.05
#: Replies gathered from one read before they are written out (and the write buffer's
#: high-water mark gets a say), so one read cannot make an unbounded reply.
_MAX_BATCH = 64
#: STARTTLS handshakes in progress (a reference keeps their tasks alive).
_UPGRADES: set[asyncio.Future[None]] = set()


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-session and per-server limits. Persona defaults fill what is ``None``."""

    line_length: int = 2048
    message_size: int = 10_240_000
    recipients: int = 1000
    commands: int = 10_000
    errors: int = 20
    idle_timeout: float = 300.0
    session_time: float = 3600.0
    connections: int = 20_000
    connections_per_ip: int = 50
    buffer_bytes: int = 65_536


class ConnectionTracker:
    """Counts open connections in total and per client IP (one per server process)."""

    __slots__ = ("_per_ip", "total")

    def __init__(self) -> None:
        self.total = 0
        self._per_ip: dict[str, int] = {}

    def admit(self, ip: str, limits: Limits) -> bool:
        """Count a new connection from ``ip``; ``False`` (not counted) when over a limit."""
        current = self._per_ip.get(ip, 0)
        if self.total >= limits.connections or current >= limits.connections_per_ip:
            return False
        self._per_ip[ip] = current + 1
        self.total += 1
        return True

    def release(self, ip: str) -> None:
        """Forget one connection from ``ip`` counted by :meth:`admit`."""
        left = self._per_ip[ip] - 1
        if left:
            self._per_ip[ip] = left
        else:
            del self._per_ip[ip]
        self.total -= 1


class ServerContext:
    """What every session of one listener shares: persona, limits, policy, sinks.

    Replies without per-call fields are rendered to bytes once, here.
    """

    def __init__(
        self,
        *,
        persona: Persona,
        hostname: str,
        limits: Limits,
        records: RecordSink,
        tarpit: Tarpit,
        domains: frozenset[str] | None = None,
        tls: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        listening: tuple[str, int] | None = None,
        pacing_timers: PacingTimers | None = None,
        tracker: ConnectionTracker | None = None,
        on_close: Callable[[SessionRecord], None] | None = None,
    ) -> None:
        self.persona = persona
        self.hostname = hostname
        self.limits = limits
        self.records = records
        self.tarpit = tarpit
        self.domains = domains
        self.tls = tls
        self.implicit_tls = implicit_tls
        #: Every session's local (ip, port) when the listener is bound to one address;
        #: ``None`` for a wildcard listener (then each session asks its socket).
        self.local_address = (
            (_unmapped(listening[0]), listening[1])
            if listening is not None and not ipaddress.ip_address(listening[0]).is_unspecified
            else None)
        self.tracker = tracker or ConnectionTracker()
        self.on_close = on_close
        self.forbidden = frozenset(c.encode() for c in persona.forbidden_commands)
        self.soft_errors = persona.soft_error_limit if persona.error_sleep else 1 << 62
        self.escalates = tarpit.escalates
        self.sessions: set[SMTPSession] = set()
        self.shutting_down = False
        self.loop = asyncio.get_event_loop()
        #: Idle and session-time deadlines of every session, on one coarse timer.
        self.timeouts: Deadlines[SMTPSession] = Deadlines(
            self.loop, _TIMEOUT_RESOLUTION, SMTPSession._check_timeouts)
        # Pass the process's one pair to every listener: the write budget is per process.
        timers = pacing_timers or PacingTimers.for_tarpit(self.loop, tarpit)
        self.releases = timers.releases
        self.stutter = timers.stutter
        #: The end-of-data reply around its queue id, rendered once: (before, after).
        head, tail = self._line(persona.replies["queued"], queue_id="\0").split(b"\0", 1)
        self.queued_parts = (head, tail)
        self.rendered = {
            key: self._line(template)
            for key, template in persona.replies.items()
            if "{" not in template.replace("{hostname}", "")
        }
        self.banner = None if persona.per_session_greeting else self._line(persona.banner)
        # The replies of every message, looked up once.
        self.mail_ok = self.reply("mail_ok")
        self.rcpt_ok = self.reply("rcpt_ok")
        self.data_ok = self.reply("data_ok")
        self.ehlo_tls = self._ehlo(with_starttls=True)
        self.ehlo_plain = self._ehlo(with_starttls=False)
        per_session = persona.per_session_greeting
        self.ehlo_tls_bytes = (None if per_session
                               else self.ehlo_tls.format(hostname=hostname).encode())
        self.ehlo_plain_bytes = (None if per_session
                                 else self.ehlo_plain.format(hostname=hostname).encode())

    def _line(self, template: str, **fields: object) -> bytes:
        return (template.format(hostname=self.hostname, **fields) + "\r\n").encode()

    def _ehlo(self, *, with_starttls: bool) -> str:
        keywords = [k.format(size=self.limits.message_size) for k in self.persona.ehlo_keywords
                    if with_starttls or k != "STARTTLS"]
        lines = [self.persona.ehlo_greeting, *keywords]
        return "".join(f"250-{line}\r\n" for line in lines[:-1]) + f"250 {lines[-1]}\r\n"

    def reply(self, key: str, **fields: object) -> bytes:
        """The persona's reply ``key`` as bytes, formatted with ``fields``."""
        rendered = self.rendered.get(key)
        if rendered is not None:
            return rendered
        for name, value in fields.items():
            if isinstance(value, str):
                fields[name] = printable(value)
        return self._line(self.persona.replies[key], **fields)

    def accepts_domain(self, address: str) -> bool:
        """True when mail for ``address`` is accepted (not a relay attempt).

        Sender-specified routing in the local part (``a@b@dom``, ``a%b@dom``,
        ``b!a@dom``) is refused as Postfix's ``allow_untrusted_routing = no`` does.
        """
        local = address[address.rfind(":") + 1:] if address.startswith("@") else address
        at = local.rfind("@")
        if at > 0:
            local_part = local[:at]
            if "@" in local_part or "%" in local_part or "!" in local_part:
                return False
        if self.domains is None:
            return True
        return domain_accepted(address, self.domains)


@dataclass(frozen=True, slots=True)
class PacingTimers:
    """When paced output is due, for every session of a process.

    ``releases``: held replies, sent whole or as their first stuttered byte when their
    delay is over (the greeting after the teaser, delayed replies): never budgeted, so
    an honest client is not queued behind stuttering ones. ``stutter``: each further
    stuttered byte, at most the tarpit's ``write_budget`` per second.
    """

    releases: Deadlines[SMTPSession]
    stutter: Deadlines[SMTPSession]

    @classmethod
    def for_tarpit(cls, loop: asyncio.AbstractEventLoop, tarpit: Tarpit) -> PacingTimers:
        """The pair for a process whose pacing and budget ``tarpit`` holds."""
        bps = tarpit.pacing.stutter_bps
        resolution = (max(0.005, min(_PACING_RESOLUTION, 0.5 / bps)) if bps
                      else _PACING_RESOLUTION)
        return cls(Deadlines(loop, resolution, SMTPSession._release),
                   Deadlines(loop, resolution, SMTPSession._release,
                             rate=tarpit.policy.write_budget or None))


def _unmapped(ip: str) -> str:
    """``::ffff:192.0.2.7`` (an IPv4 client on a dual-stack socket) as ``192.0.2.7``."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def printable(text: str) -> str:
    """``text`` safe to echo in a reply: CR, LF, NUL and other controls become ``?``."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else "?" for c in text)


def domain_accepted(address: str, domains: frozenset[str]) -> bool:
    """True when ``address`` is local (no domain) or its domain is in ``domains``.

    A listed domain also covers its subdomains, as Postfix's ``relay_domains`` did on
    the reference system.
    """
    route_end = address.rfind(":") if address.startswith("@") else -1
    address = address[route_end + 1:]
    at = address.rfind("@")
    if at < 0:
        return True
    domain = address[at + 1:].lower().rstrip(".")
    if domain in domains:
        return True
    return any(domain.endswith("." + d) for d in domains)


def _parse_path(arg: bytes, keyword: bytes) -> tuple[int, bytes, list[bytes]]:
    """Split ``FROM:<addr> PARAMS`` (or ``TO:``). Returns (status, address, params).

    Status 0 = ok, 1 = syntax error (no keyword or address), 2 = bad address.
    """
    if arg[: len(keyword)].upper() != keyword:
        return 1, b"", []
    rest = arg[len(keyword):].lstrip()
    if not rest:
        return 1, b"", []
    if rest[0] == 0x3C:  # "<"
        close = rest.find(b">")
        if close < 0:
            return 2, b"", []
        address, rest = rest[1:close], rest[close + 1:]
        forbidden = _NOT_IN_BRACKETS
    else:
        parts = rest.split(None, 1)
        address, rest = parts[0], parts[1] if len(parts) > 1 else b""
        forbidden = _CONTROLS
    if len(address.translate(None, forbidden)) != len(address):
        return 2, b"", []
    return 0, address, rest.split()


class SMTPSession(asyncio.Protocol):
    """One SMTP connection. See the module docstring for the contract."""

    __slots__ = (
        "_bdat_chunk",
        "_bdat_error",
        "_bdat_last",
        "_bdat_remaining",
        "_bdat_reply",
        "_bdat_size",
        "_bdat_started",
        "_bdat_tail",
        "_close_after",
        "_commands",
        "_ctx",
        "_data_bytes",
        "_data_tail",
        "_declared_size",
        "_errors",
        "_esmtp",
        "_greeted",
        "_held",
        "_input",
        "_junk",
        "_last_activity",
        "_line",
        "_mail",
        "_mode",
        "_out",
        "_pacer",
        "_queued",
        "_rcpts",
        "_record",
        "_skipping",
        "_started",
        "_tls",
        "_transport",
        "_writing_paused",
    )

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._transport: asyncio.Transport | None = None
        self._record: SessionRecord | None = None
        self._mode = _CMD
        self._line = bytearray()
        self._skipping = False
        self._out: list[bytes] = []
        # A reply held back: (rest, seconds between bytes, held since, when due).
        self._held: tuple[bytes, float, float, float] | None = None
        # Replies produced while another is held: (data, delay, interval), sent in order.
        self._queued: list[tuple[bytes, float, float]] | None = None
        self._input = b""
        self._close_after = False
        self._esmtp = False
        self._greeted = False
        self._tls = ctx.implicit_tls
        self._mail = False
        self._rcpts = 0
        self._declared_size = 0
        self._data_bytes = 0
        self._data_tail = b""
        self._bdat_started = False
        self._bdat_error = False
        self._bdat_remaining = 0
        self._bdat_chunk = 0
        self._bdat_last = False
        self._bdat_reply = ""
        self._bdat_size = 0
        self._bdat_tail = b""
        self._errors = 0
        self._junk = 0
        self._commands = 0
        self._pacer: Pacer | None = None
        self._started = 0.0
        self._last_activity = 0.0
        self._writing_paused = False

    # -- connection lifecycle -------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        ctx = self._ctx
        self._transport = transport
        peer = transport.get_extra_info("peername") or ("", 0)
        sock = ctx.local_address or transport.get_extra_info("sockname") or ("", 0)
        record = self._record = SessionRecord(
            start=time.time(), client_ip=_unmapped(peer[0]), client_port=peer[1],
            local_ip=_unmapped(sock[0]), local_port=sock[1], persona=ctx.persona.name,
        )
        record.last_stage = "greeting"
        self._started = self._last_activity = ctx.loop.time()
        if ctx.shutting_down or not ctx.tracker.admit(record.client_ip, ctx.limits):
            record.end_reason = EndReason.LIMIT
            self._record = None  # not admitted: nothing to release; record at close
            transport.write(ctx.reply("too_many_connections"))
            transport.close()
            ctx.records.submit(self._finish(record))
            return
        ctx.sessions.add(self)
        transport.set_write_buffer_limits(high=ctx.limits.buffer_bytes)
        if self._tls:
            self._note_tls()
        self._pacer = ctx.tarpit.pacer_for(record.client_ip, transport)
        if self._pacer is not None:
            record.flags |= F_TARPITTED
        ctx.timeouts.schedule(self, self._started + ctx.limits.idle_timeout)
        greeting = self._greeting()
        teaser = ctx.tarpit.pregreet_wait()
        if teaser and greeting.startswith(b"220 "):
            transport.write(b"220-" + greeting[4:])  # postscreen's pregreet test
        self._reply(greeting, Stage.GREETING, teaser)
        self._flush()

    def _greeting(self) -> bytes:
        ctx = self._ctx
        if ctx.banner is not None:
            return ctx.banner
        return ctx._line(ctx.persona.banner, date=rfc2822_now(),
                         client_ip=self._record.client_ip if self._record else "")

    def connection_lost(self, exc: Exception | None) -> None:
        record = self._record
        if record is None:
            return
        self._record = None
        ctx = self._ctx
        ctx.sessions.discard(self)
        ctx.tracker.release(record.client_ip)
        ctx.timeouts.cancel(self)
        ctx.releases.cancel(self)
        ctx.stutter.cancel(self)
        if exc is not None and record.end_reason == EndReason.CLIENT_CLOSE:
            record.end_reason = EndReason.ERROR
        if self._held is not None and self._held[2]:  # gave up waiting for our reply
            record.waited = ctx.loop.time() - self._held[2]
            record.held += record.waited
        # A pending hold timer finds nothing to send; the buffers go now, not then.
        self._held = self._queued = None
        self._input = b""
        self._line.clear()
        ctx.tarpit.closed(record, self._transport)
        record.commands = self._commands
        record.errors = self._errors
        ctx.records.submit(self._finish(record))

    def _finish(self, record: SessionRecord) -> SessionRecord:
        record.end = time.time()
        if self._ctx.on_close is not None:
            self._ctx.on_close(record)
        return record

    def pause_writing(self) -> None:
        """The client is not reading: stop reading its input until it catches up."""
        self._writing_paused = True
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._transport is not None and self._held is None and not self._close_after:
            self._transport.resume_reading()
            if self._input:
                self._resume_input()

    def _check_timeouts(self) -> None:
        """Idle and total-session deadline (``ctx.timeouts``), re-armed lazily."""
        ctx = self._ctx
        now = ctx.loop.time()
        limits = ctx.limits
        idle_left = limits.idle_timeout - (now - self._last_activity)
        session_left = limits.session_time - (now - self._started)
        if self._held is not None:
            idle_left = limits.idle_timeout  # we are the ones waiting
        if idle_left <= 0 or session_left <= 0:
            key = "timeout" if idle_left <= 0 else "session_too_long"
            self._end(EndReason.TIMEOUT if idle_left <= 0 else EndReason.LIMIT, key, now=True)
            return
        ctx.timeouts.schedule(self, now + min(idle_left, session_left))

    def shutdown(self) -> None:
        """Server shutdown: say goodbye as the persona does and close."""
        if self._record is None:
            return
        if self._held is _TLS_PENDING and self._transport is not None:
            self._record.end_reason = EndReason.SHUTDOWN
            self._transport.abort()  # mid-handshake: no plaintext goodbye
            return
        self._end(EndReason.SHUTDOWN, "shutdown", now=True)

    def _end(self, reason: EndReason, key: str, *, now: bool = False) -> None:
        """Send the persona's closing reply ``key`` and close after it is written."""
        if self._record is not None and self._record.end_reason in (
            EndReason.CLIENT_CLOSE, EndReason.QUIT
        ):
            self._record.end_reason = reason
        if now:
            self._held = self._queued = None
            self._out.append(self._ctx.reply(key))
            self._close_after = True
            self._flush()
            return
        self._reply(self._ctx.reply(key))
        self._close_after = True

    # -- output and pacing ----------------------------------------------------------

    def _reply(self, data: bytes, stage: Stage = Stage.COMMAND, wait: float = 0.0) -> None:
        """Queue one reply; the tarpit, ``wait`` or the error sleep may hold it back."""
        ctx = self._ctx
        if (self._held is None and self._pacer is None and not wait and not ctx.escalates
                and self._errors < ctx.soft_errors):
            self._out.append(data)  # the common case: no pacing of any kind
            return
        delay = wait + (ctx.persona.error_sleep if self._errors >= ctx.persona.soft_error_limit
                        else 0.0)
        interval = 0.0
        pacer = self._pacer
        record = self._record
        if pacer is None and ctx.tarpit.escalates and record is not None \
                and record.flags & BOT_FLAGS:
            pacer = self._pacer = ctx.tarpit.escalate(self._transport)
            if pacer is not None:
                record.flags |= F_TARPITTED
        if pacer is not None:
            paced, interval = pacer.pace(stage, record.held if record is not None else 0.0,
                                         len(data))
            delay += paced
        if self._held is not None:
            if self._queued is None:
                self._queued = []
            self._queued.append((data, delay, interval))
            return
        if not delay and not interval:
            self._out.append(data)
            return
        self._flush()
        self._hold(data, delay, interval)

    def _hold(self, data: bytes, delay: float, interval: float) -> None:
        ctx = self._ctx
        # Reading goes on while a reply is held (input is buffered up to buffer_bytes):
        # so talking early is seen (PREGREET), and a client that gives up is noticed.
        now = ctx.loop.time()
        self._held = (data, interval, now, now + delay)
        ctx.releases.schedule(self, now + delay)

    def _release(self) -> None:
        """A held reply is due: send it, whole or one byte per interval.

        Stutter times count from when each byte was due, so the timer's lateness does
        not add up; when the timer ticks more coarsely than the interval, the bytes due
        by now go in one write. A session held back longer than that (the write budget
        was spent) goes on from now instead of catching up in a burst.
        """
        held = self._held
        transport = self._transport
        if held is None or transport is None or transport.is_closing():
            return
        data, interval, since, due = held
        if interval and len(data) > 1:
            ctx = self._ctx
            now = ctx.loop.time()
            behind = now - due
            # Ticks fire up to one resolution late (plus the loop's own lateness).
            if behind > interval + 2 * ctx.stutter.resolution:
                count, due = 1, now
            else:
                count = 1 + int(behind / interval) if behind > 0 else 1
            if count < len(data):
                transport.write(data[:count])
                due += count * interval
                self._held = (data[count:], interval, since, due)
                ctx.stutter.schedule(self, due)
                return
        transport.write(data)
        self._held = None
        self._last_activity = self._ctx.loop.time()
        if since and self._record is not None:
            self._record.held += self._last_activity - since
        self._greeted = True
        if self._queued:
            self._hold(*self._queued.pop(0))
            return
        self._queued = None
        if self._close_after:
            self._close()
            return
        self._resume_input()

    def _close(self) -> None:
        """Close after the output is written; abort if the client will not take it."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        if transport.get_write_buffer_size():
            self._ctx.loop.call_later(_CLOSE_GRACE, transport.abort)

    def _resume_input(self) -> None:
        pending, self._input = self._input, b""
        if pending:
            self._consume(pending)
            self._flush()
        if self._held is None and not self._close_after and not self._writing_paused:
            transport = self._transport
            if transport is not None and not transport.is_closing():
                transport.resume_reading()

    def _flush(self) -> None:
        out = self._out
        if not out:
            if self._close_after and self._held is None:
                self._close()
            return
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            if self._held is None:
                self._greeted = True
                if self._close_after:
                    self._close()
        out.clear()

    # -- input ----------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        record = self._record
        if record is None or self._close_after:
            return
        record.bytes += len(data)
        self._last_activity = self._ctx.loop.time()
        if self._held is not None or self._writing_paused:
            if self._held is _TLS_PENDING:
                return  # RFC 3207: nothing sent before the handshake is kept
            if not self._greeted:
                record.flags |= F_PREGREET
            self._stash(data)
            return
        mode = self._mode
        if mode == _CMD and not self._line:
            # The common case, one whole command line per read: straight to dispatch.
            last = len(data) - 1
            if (0 < last <= self._ctx.limits.line_length and data[last - 1] == 0x0D
                    and data.find(b"\n") == last):
                self._dispatch(data[:last - 1])
                if self._errors >= self._ctx.limits.errors and not self._close_after:
                    self._end(EndReason.LIMIT, "too_many_errors")
                self._flush()
                return
        elif mode == _DATA:  # message text: no loop needed unless a command follows it
            pos = self._consume_data(data, 0)
            if pos < len(data):
                self._consume(data, pos)
            self._flush()
            return
        self._consume(data)
        self._flush()

    def _stash(self, data: bytes, *, unread: bool = False) -> None:
        """Keep input for later, up to ``buffer_bytes``; past that, end the session.

        ``unread`` data is the rest of a read being consumed: it goes before what
        arrived later.
        """
        if len(self._input) + len(data) > self._ctx.limits.buffer_bytes:
            self._end(EndReason.LIMIT, "too_many_errors", now=True)
            return
        self._input = data + self._input if unread else self._input + data

    def _consume(self, data: bytes, pos: int = 0) -> None:
        size = len(data)
        while pos < size:
            if self._held is not None or self._writing_paused:
                if self._held is not _TLS_PENDING:  # after STARTTLS the rest is dropped
                    self._stash(data[pos:], unread=True)
                return
            if self._close_after:
                return
            mode = self._mode
            if mode == _CMD:
                pos = self._consume_commands(data, pos)
            elif mode == _DATA:
                pos = self._consume_data(data, pos)
            else:
                pos = self._consume_bdat(data, pos)

    def _consume_commands(self, data: bytes, pos: int) -> int:
        limit = self._ctx.limits.line_length
        line_buf = self._line
        size = len(data)
        while pos < size:
            newline = data.find(b"\n", pos)
            if newline < 0:
                if not self._skipping:
                    room = limit - len(line_buf)
                    line_buf += data[pos:pos + room] if room < size - pos else data[pos:]
                    if size - pos > room:
                        self._skipping = True
                        self._record.flags |= F_LONG_LINE  # type: ignore[union-attr]
                return size
            # Whether the line ended in CRLF is decided before any cut to the limit.
            if self._skipping:
                line = bytes(line_buf)
                line_buf.clear()
                self._skipping = False
                crlf = newline == pos or data[newline - 1] == 0x0D
            elif line_buf:
                line_buf += data[pos:newline]
                crlf = line_buf.endswith(b"\r")
                line = bytes(line_buf[:limit])
                if len(line_buf) > limit:
                    self._record.flags |= F_LONG_LINE  # type: ignore[union-attr]
                line_buf.clear()
            else:
                line = data[pos:newline]
                crlf = line.endswith(b"\r")
                if len(line) > limit:
                    line = line[:limit]
                    self._record.flags |= F_LONG_LINE  # type: ignore[union-attr]
            pos = newline + 1
            if line.endswith(b"\r"):
                line = line[:-1]
            if not crlf and self._record is not None:
                self._record.flags |= F_BARE_LF
                self._record.bare_lf += 1
            verb = self._dispatch(line)
            # As Postfix does, the hard error limit is checked after every reply, so
            # the persona's 421 follows the reply that reached it at once.
            if self._errors >= self._ctx.limits.errors and not self._close_after:
                self._end(EndReason.LIMIT, "too_many_errors")
            if pos < size and self._record is not None and (
                not self._esmtp or verb in _GROUP_ENDERS
            ) and verb != b"QUIT":
                self._record.flags |= F_PIPELINING_UNASKED
            if self._mode != _CMD or self._held is not None or self._close_after:
                return pos
            if len(self._out) >= _MAX_BATCH:
                self._flush()  # may pause writing: the rest of the read then waits
                if self._writing_paused:
                    return pos
        return pos

    def _consume_data(self, data: bytes, pos: int) -> int:
        """Discard message text up to CRLF.CRLF (RFC 5321), counting size and endings."""
        tail = self._data_tail
        stop = -1
        joined = tail + data[pos:pos + 4]
        boundary = joined.find(_END_OF_DATA)
        if 0 <= boundary < len(tail):
            stop = pos + boundary + 5 - len(tail)
        else:
            found = data.find(_END_OF_DATA, pos)
            if found >= 0:
                stop = found + 5
        end = stop if stop >= 0 else len(data)
        self._data_bytes += end - pos
        self._count_endings(data, pos, end, tail, finished=stop >= 0)
        if stop < 0:
            self._data_tail = (tail + data[max(pos, end - 4):end])[-4:]
            return end
        self._end_of_data()
        return stop

    def _count_endings(self, data: bytes, start: int, stop: int, tail: bytes,
                       finished: bool = False) -> None:
        """Count bare LF and bare CR in ``data[start:stop]``; ``tail`` precedes it.

        ``finished``: the region ends with the real CRLF.CRLF, which is no smuggling.
        """
        if start >= stop:
            return
        crlf = data.count(b"\r\n", start, stop)
        if tail.endswith(b"\r") and data[start] == 0x0A:
            crlf += 1
        bare_lf = data.count(b"\n", start, stop) - crlf
        cr = data.count(b"\r", start, stop) + (1 if tail.endswith(b"\r") else 0)
        pending = 1 if data[stop - 1] == 0x0D else 0
        bare_cr = cr - crlf - pending
        if bare_lf > 0 or bare_cr > 0:
            record = self._record
            if record is None:
                return
            record.bare_lf += max(0, bare_lf)
            record.bare_cr += max(0, bare_cr)
            record.flags |= (F_BARE_LF if bare_lf > 0 else 0) | (F_BARE_CR if bare_cr > 0 else 0)
            window = tail + data[start:stop]
            if finished:
                window = window[:-5]
            if _SMUGGLING.search(window):
                record.flags |= F_SMUGGLING

    def _end_of_data(self) -> None:
        ctx = self._ctx
        self._mode = _CMD
        too_big = self._data_bytes - 3 > ctx.limits.message_size
        self._data_bytes = 0
        self._data_tail = b""
        if self._record is not None:
            self._record.last_stage = "end_of_data"
        if too_big:
            self._mail_reset()
            self._error(ctx.reply("message_too_big"), Stage.END_OF_DATA)
            return
        head, tail = ctx.queued_parts
        self._accepted(head + ctx.persona.queue_id().encode() + tail)

    def _accepted(self, reply: bytes) -> None:
        self._mail_reset()
        self._junk = 0
        if self._record is not None:
            self._record.messages += 1
        self._reply(reply, Stage.END_OF_DATA)

    def _consume_bdat(self, data: bytes, pos: int) -> int:
        take = min(self._bdat_remaining, len(data) - pos)
        end = pos + take
        self._bdat_remaining -= take
        if take:
            tail = self._bdat_tail
            # Postfix reports the stored size: every bare LF becomes CRLF.
            crlf = data.count(b"\r\n", pos, end) + (1 if tail == b"\r" and data[pos] == 0x0A else 0)
            self._bdat_size += take + data.count(b"\n", pos, end) - crlf
            self._count_endings(data, pos, end, tail)
            self._bdat_tail = data[end - 1:end]
        if self._bdat_remaining == 0:
            self._bdat_done()
        return end

    # -- commands -------------------------------------------------------------------

    def _dispatch(self, line: bytes) -> bytes:
        """Answer one command line (without its line ending). Returns the verb."""
        ctx = self._ctx
        record = self._record
        self._commands += 1
        if self._commands > ctx.limits.commands:
            self._end(EndReason.LIMIT, "too_many_errors")
            return b""
        nul = line.find(b"\0")
        if nul >= 0:
            line = line[:nul]
        parts = line.split(None, 1)
        if not parts:
            self._error(ctx.reply("bad_syntax"))
            return b""
        verb = parts[0].upper()
        arg = parts[1] if len(parts) > 1 else b""
        persona = ctx.persona
        handler = _HANDLERS.get(verb)
        if handler is None:
            # No known verb is forbidden, so these checks stay off the common path.
            if (verb in ctx.forbidden
                    or (persona.forbid_non_alpha and not 0x41 <= verb[0] <= 0x5A)
                    or (persona.forbid_header_lines and _HEADER_LINE.match(line))):
                if record is not None:
                    record.flags |= F_NON_SMTP
                self._end(EndReason.FORBIDDEN, "forbidden")
            else:
                self._error(ctx.reply("unknown"))
            return verb
        if verb in _JUNK:
            if self._junk > persona.junk_command_limit:
                self._errors += 1
            self._junk += 1
        handler(self, arg)
        return verb

    def _error(self, reply: bytes, stage: Stage = Stage.COMMAND) -> None:
        self._reply(reply, stage)
        self._errors += 1

    def _mail_reset(self) -> None:
        self._mail = False
        self._rcpts = 0
        self._declared_size = 0
        self._bdat_started = False
        self._bdat_error = False
        self._bdat_size = 0
        self._bdat_tail = b""

    def _stage(self, name: str) -> None:
        if self._record is not None:
            self._record.last_stage = name

    def _helo(self, arg: bytes) -> None:
        ctx = self._ctx
        if not arg:
            self._error(ctx.reply("helo_syntax"))
            return
        self._greet(arg)
        self._esmtp = False
        self._reply(ctx.reply("helo", helo_name=arg.decode("utf-8", "replace"),
                              client_ip=self._client_ip()))

    def _ehlo(self, arg: bytes) -> None:
        ctx = self._ctx
        if not arg:
            self._error(ctx.reply("ehlo_syntax"))
            return
        self._greet(arg)
        self._esmtp = True
        plain = self._tls or ctx.tls is None
        rendered = ctx.ehlo_plain_bytes if plain else ctx.ehlo_tls_bytes
        if rendered is not None:
            self._reply(rendered)
            return
        text = ctx.ehlo_plain if plain else ctx.ehlo_tls
        self._reply(text.format(hostname=ctx.hostname,
                                helo_name=printable(arg.decode("utf-8", "replace")),
                                client_ip=self._client_ip()).encode())

    def _client_ip(self) -> str:
        return self._record.client_ip if self._record is not None else ""

    def _greet(self, arg: bytes) -> None:
        self._mail_reset()
        if self._record is not None:
            self._record.helo = arg[:255].decode("utf-8", "replace")
            self._record.last_stage = "helo"

    def _mail_cmd(self, arg: bytes) -> None:
        ctx = self._ctx
        record = self._record
        if record is not None:
            record.last_stage = "mail"
        if self._bdat_started or self._bdat_error:
            self._error(ctx.reply("mail_after_bdat"))
            return
        if self._mail:
            self._error(ctx.reply("mail_nested"))
            return
        status, address, params = _parse_path(arg, b"FROM:")
        if status:
            self._error(ctx.reply("mail_syntax" if status == 1 else "mail_bad_address"))
            return
        seen_ret = seen_envid = False
        for param in params:
            key, _, value = param.partition(b"=")
            key = key.upper()
            if key == b"SIZE":
                if not value.isdigit():
                    self._error(ctx.reply("size_syntax"))
                    return
                self._declared_size = int(value)
            elif key == b"BODY":
                if value.upper() not in (b"7BIT", b"8BITMIME"):
                    self._error(ctx.reply("unsupported_option", option=param.decode("latin-1")))
                    return
            elif key == b"RET":
                if seen_ret or value.upper() not in (b"FULL", b"HDRS"):
                    self._error(ctx.reply("ret_syntax"))
                    return
                seen_ret = True
            elif key == b"ENVID":
                if seen_envid or not _XTEXT.match(value):
                    self._error(ctx.reply("envid_syntax"))
                    return
                seen_envid = True
            elif key not in (b"SMTPUTF8", b"AUTH") or (key == b"SMTPUTF8" and value):
                self._error(ctx.reply("unsupported_option", option=param.decode("latin-1")))
                return
        if self._declared_size > ctx.limits.message_size:
            self._error(ctx.reply("size_exceeded"))
            return
        self._mail = True
        if record is not None and len(record.mail_from) < KEEP_ADDRESSES:
            record.mail_from += (address[:320].decode("utf-8", "replace"),)
        self._reply(ctx.mail_ok)

    def _rcpt_cmd(self, arg: bytes) -> None:
        ctx = self._ctx
        record = self._record
        if record is not None:
            record.last_stage = "rcpt"
        if not self._mail:
            self._error(ctx.reply("rcpt_need_mail"))
            return
        status, address, params = _parse_path(arg, b"TO:")
        if status == 0 and not address:
            status = 2
        if status:
            self._error(ctx.reply("rcpt_syntax" if status == 1 else "rcpt_bad_address"))
            return
        for param in params:
            key, _, value = param.partition(b"=")
            key = key.upper()
            if key == b"NOTIFY":
                words = set(value.upper().split(b","))
                if not (words == {b"NEVER"} or (words and words <= _NOTIFY)):
                    self._error(ctx.reply("notify_syntax"))
                    return
            elif key == b"ORCPT":
                kind, semicolon, text = value.partition(b";")
                if not semicolon or not kind or not text:
                    self._error(ctx.reply("orcpt_syntax"))
                    return
            else:
                self._error(ctx.reply("unsupported_option", option=param.decode("latin-1")))
                return
        if self._rcpts >= ctx.limits.recipients:
            self._error(ctx.reply("too_many_recipients"))
            return
        recipient = address.decode("utf-8", "replace")
        if not ctx.accepts_domain(recipient):
            if record is not None:
                record.flags |= F_RELAY_ATTEMPT
            self._error(ctx.reply("relay_denied", address=recipient))
            return
        greylist = ctx.tarpit.greylist
        if greylist is not None and record is not None:
            sender = record.mail_from[-1] if record.mail_from else ""
            verdict = greylist.check(record.client_ip, sender, recipient)
            record.flags |= verdict
            if verdict & F_GREYLISTED:
                self._error(ctx.reply("greylisted", address=recipient, sender=sender,
                                      domain=recipient.rpartition("@")[2] or ctx.hostname,
                                      client_ip=record.client_ip))
                return
        self._rcpts += 1
        if record is not None:
            record.recipients += 1
            if len(record.first_recipients) < KEEP_ADDRESSES:
                record.first_recipients += (recipient[:320],)
        self._reply(ctx.rcpt_ok)

    def _data_cmd(self, arg: bytes) -> None:
        ctx = self._ctx
        if self._record is not None:
            self._record.last_stage = "data"
        if arg:
            self._error(ctx.reply("data_syntax"))
            return
        if self._bdat_started:
            self._error(ctx.reply("data_after_bdat"))
            return
        if not self._rcpts:
            self._error(ctx.reply("data_need_rcpt"))
            return
        self._mode = _DATA
        self._data_bytes = 0
        self._data_tail = b"\r\n"
        self._reply(ctx.data_ok, Stage.DATA_INIT)

    def _bdat_cmd(self, arg: bytes) -> None:
        self._stage("bdat")
        words = arg.split()
        last = len(words) == 2 and words[1].upper() == b"LAST"
        if not words or len(words) > 2 or (len(words) == 2 and not last) \
                or not words[0].isdigit() or int(words[0]) > _MAX_BDAT:
            self._errors += 1
            self._end(EndReason.LIMIT, "bdat_syntax")
            return
        count = int(words[0])
        if self._bdat_error:
            reply = "bdat_discarded"
        elif not self._rcpts:
            reply = "data_need_rcpt"
            self._bdat_error = True
        else:
            reply = "bdat_queued" if last else "bdat_chunk"
            self._bdat_started = True
        self._bdat_reply = reply
        self._bdat_last = last
        self._bdat_remaining = self._bdat_chunk = count
        self._mode = _BDAT
        if count == 0:
            self._bdat_done()

    def _bdat_done(self) -> None:
        ctx = self._ctx
        self._mode = _CMD
        key = self._bdat_reply
        if key == "bdat_chunk":
            self._reply(ctx.reply("bdat_chunk", count=self._bdat_chunk))
            return
        if key == "bdat_queued":
            size = self._bdat_size
            if self._bdat_tail != b"\n" and ctx.persona.bdat_reports_stored_size:
                size += 2
            if size > ctx.limits.message_size:
                self._mail_reset()
                self._error(ctx.reply("message_too_big"), Stage.END_OF_DATA)
                return
            self._accepted(ctx.reply("bdat_queued", size=size, queue_id=ctx.persona.queue_id()))
            return
        if self._bdat_last:
            self._mail_reset()
        if key == "bdat_discarded":
            self._error(ctx.reply("bdat_discarded", count=self._bdat_chunk))
        else:
            self._error(ctx.reply(key))

    def _rset(self, arg: bytes) -> None:
        ctx = self._ctx
        if arg:
            self._error(ctx.reply("rset_syntax"))
            return
        self._mail_reset()
        self._reply(ctx.reply("rset_ok"))

    def _noop(self, arg: bytes) -> None:
        self._reply(self._ctx.reply("noop_ok"))

    def _vrfy(self, arg: bytes) -> None:
        ctx = self._ctx
        if not arg:
            self._error(ctx.reply("vrfy_syntax"))
            return
        text = arg.decode("utf-8", "replace")
        address = arg.split()[0].decode("utf-8", "replace").strip("<>")
        if not ctx.accepts_domain(address):
            self._error(ctx.reply("relay_denied", address=address))
            return
        self._reply(ctx.reply("vrfy_ok", address=text))

    def _etrn(self, arg: bytes) -> None:
        ctx = self._ctx
        if self._mail:
            self._error(ctx.reply("etrn_in_transaction"))
            return
        if not arg:
            self._error(ctx.reply("etrn_syntax"))
            return
        domain = arg.split()[0].lstrip(b"@#").decode("utf-8", "replace")
        if ctx.domains is not None and not domain_accepted("x@" + domain, ctx.domains):
            self._error(ctx.reply("etrn_denied", domain=domain))
            return
        self._reply(ctx.reply("etrn_ok"))

    def _auth(self, arg: bytes) -> None:
        if self._record is not None:
            self._record.flags |= F_AUTH_ATTEMPT
        self._error(self._ctx.reply("auth_disabled"))

    def _xclient(self, arg: bytes) -> None:
        self._error(self._ctx.reply("xclient_denied"))

    def _quit(self, arg: bytes) -> None:
        if self._record is not None:
            self._record.end_reason = EndReason.QUIT
        self._reply(self._ctx.reply("quit"))
        self._close_after = True

    def _starttls(self, arg: bytes) -> None:
        ctx = self._ctx
        if arg:
            self._error(ctx.reply("starttls_syntax"))
            return
        if self._tls:
            self._error(ctx.reply("starttls_active"))
            return
        if ctx.tls is None:
            self._error(ctx.reply("starttls_unavailable"))
            return
        # Written at once, never paced or held: the handshake must follow it.
        self._out.append(ctx.reply("starttls_ok"))
        self._flush()
        # RFC 3207: anything the client pipelined after STARTTLS is discarded, and
        # nothing is processed until the handshake is done.
        self._input = b""
        self._line.clear()
        self._held = _TLS_PENDING
        transport = self._transport
        if transport is not None:
            transport.pause_reading()
            task = asyncio.ensure_future(self._upgrade(transport))
            _UPGRADES.add(task)
            task.add_done_callback(_UPGRADES.discard)

    async def _upgrade(self, transport: asyncio.Transport) -> None:
        ctx = self._ctx
        try:
            new_transport = await ctx.loop.start_tls(
                transport, self, ctx.tls, server_side=True,  # type: ignore[arg-type]
                ssl_handshake_timeout=min(60.0, ctx.limits.idle_timeout),
            )
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            log.debug("TLS handshake failed: %s", exc)
            if self._record is not None:
                self._record.end_reason = EndReason.ERROR
            transport.abort()
            self.connection_lost(None)
            return
        if new_transport is None or self._record is None:
            return
        self._transport = new_transport
        self._tls = True
        self._esmtp = False
        self._mail_reset()
        self._line.clear()
        self._note_tls()
        self._held = None
        self._input = b""
        self._last_activity = ctx.loop.time()
        self._resume_input()

    def _note_tls(self) -> None:
        transport = self._transport
        record = self._record
        if transport is None or record is None:
            return
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            record.tls_version = ssl_object.version() or ""
            cipher = ssl_object.cipher()
            record.tls_cipher = cipher[0] if cipher else ""


_HANDLERS: dict[bytes, Callable[[SMTPSession, bytes], None]] = {
    b"HELO": SMTPSession._helo,
    b"EHLO": SMTPSession._ehlo,
    b"MAIL": SMTPSession._mail_cmd,
    b"RCPT": SMTPSession._rcpt_cmd,
    b"DATA": SMTPSession._data_cmd,
    b"BDAT": SMTPSession._bdat_cmd,
    b"RSET": SMTPSession._rset,
    b"NOOP": SMTPSession._noop,
    b"VRFY": SMTPSession._vrfy,
    b"ETRN": SMTPSession._etrn,
    b"AUTH": SMTPSession._auth,
    b"STARTTLS": SMTPSession._starttls,
    b"XCLIENT": SMTPSession._xclient,
    b"XFORWARD": SMTPSession._xclient,
    b"QUIT": SMTPSession._quit,
}
