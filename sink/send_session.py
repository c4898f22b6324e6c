"""One SMTP client connection of ``spamsink send``: an ``asyncio.Protocol`` state machine.

Contract:

* A :class:`SenderSession` is created by the runner after it took the ticket of the
  connection's first message; it sends up to ``-m`` messages, taking one more ticket
  from the pool before each later one, then QUIT. Every message it took ends in
  exactly one of: ``stats.sent``, ``stats.fail(stage, cause)``, ``stats.unfinished``
  (:meth:`stop`), or back in the pool (taken but never put on the wire).
* Replies are parsed fully (multi-line, split over reads, several per read); each one
  is matched to the command it answers and its wait is added to that stage's latency.
  A reply that answers no command (none was written before it arrived) is, when it is
  a 421, the server closing (an idle timeout between paced messages): the connection
  ends as "421" and the message in progress, which the server never answered, goes
  back to the pool for the next connection, if an earlier message ended on this
  connection; a connection's first message fails as ``4xx`` at its stage instead, so a
  server that says 421 at once cannot make the client reconnect for ever. Any other
  such reply is a protocol error ("bad reply") of the message in progress, at the
  stage it was at (``mail`` while it waits for its start time). So is a malformed
  line; the replies the same read completed before it are handled first, as the
  answers they are.
* With ``--pipelining`` and a server offering PIPELINING, MAIL, the RCPTs and DATA go
  in one write, and the message text is sent together with the next message's
  commands (or QUIT), as RFC 2920 allows: about one round trip per message. That next
  message is then on the wire: if the connection ends before its replies, it counts
  failed at MAIL (cause ``closed``, ``timeout``, ``4xx`` for a 421, or ``bad reply``),
  or unfinished when the run stops.
* A refused MAIL or RCPT fails the message (``mail``/``rcpt`` with the reply's class),
  with or without pipelining. Without it the client sends RSET at once. With it, DATA
  is already on the wire; when the server still answers 354, the client does what RFC
  2920 section 3.1 and a real MTA do: if some recipients were accepted it sends the
  message text to them (never an empty message), if none were, only the ending dot.
  Either way the message stays counted failed at its first refusal: it did not reach
  every recipient it was meant for.
* ``deadline`` is the ``perf_counter()`` time by which the awaited reply must arrive:
  ``--timeout`` after the last write or reply (infinite while nothing is awaited); the
  runner's sweep calls :meth:`timed_out`. A closing session (QUIT answered, 421, end
  of a hold, an interrupt) waits for the server to take what was written at most
  ``min(--timeout, CLOSE_GRACE)``: then :meth:`timed_out` aborts it, so a server that
  stopped reading cannot keep the run from ending.
* No coroutine or task per command: everything runs in ``data_received`` and plain
  callbacks; the only task is the STARTTLS handshake. While it runs the session is
  not the transport's protocol (``loop.start_tls`` put an SSL protocol in between,
  which tells the session nothing if the handshake fails), so the session ends itself
  when the task does not give it a TLS transport: a handshake the server drops fails
  as ``tls closed`` (``tls error`` for a TLS alert), one that stalls as ``tls timeout``
  at ``--timeout`` (the sweep's abort cancels the task), and ``done`` is set in every
  case. A reply that arrives before the handshake's end is reported (the server spoke
  before the client's EHLO) is a ``tls bad reply``.
* Cheap per reply: a read that is exactly a reply (or several) seen before is looked
  up, not parsed (servers repeat the same greeting, EHLO and ``250 Ok`` replies; at
  most :data:`KNOWN_READS` different reads of at most :data:`KNOWN_READ_BYTES` bytes
  are remembered per process, about a megabyte at most); waits are
  appended to the histograms' buffers (:class:`sink.send_stats.Histogram`).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from math import inf
from typing import cast

from sink.send_body import MessageSource
from sink.send_config import SendConfig
from sink.send_dialogue import Dialogue
from sink.send_reply import Reply, ReplyError, ReplyParser, extensions, reply_text
from sink.send_stats import (
    BDAT,
    CONNECT,
    DATA,
    DOT,
    EHLO,
    GREETING,
    HELO,
    MAIL,
    QUIT,
    RCPT,
    RSET,
    STAGES,
    STARTTLS,
    TLS,
    Stats,
)

_perf = time.perf_counter
_QUIT = b"QUIT\r\n"
_RSET = b"RSET\r\n"
_DATA = b"DATA\r\n"
_DOT_ONLY = b".\r\n"
#: Different reads whose replies a process remembers (see the module contract).
KNOWN_READS = 1024
#: The longest read remembered (a Postfix EHLO reply is about 200 bytes).
KNOWN_READ_BYTES = 1024
#: Longest wait, in seconds, for a closing connection's written data to be taken.
CLOSE_GRACE = 10.0
#: Seconds past --timeout before asyncio itself gives up on a TLS handshake: the
#: sweep's timeout (within a tick, at most 1 s) must come first, so a stalled
#: handshake is a "tls timeout" at --timeout, not asyncio's abort at its own 60 s.
HANDSHAKE_BACKSTOP = 2.0


def recipients(address: str, count: int) -> list[str]:
    """``count`` recipient addresses: ``address`` itself, or ``local+N@domain`` for N>1."""
    if count == 1:
        return [address]
    local, at, domain = address.rpartition("@")
    if not at:
        local, domain = address, ""
    return [f"{local}+{i}{at}{domain}" for i in range(1, count + 1)]


def cause_of(code: int) -> str:
    """The failure cause for an unwanted reply code: ``4xx``, ``5xx`` or ``unexpected 2xx``."""
    klass = code // 100
    return f"{klass}xx" if klass in (4, 5) else f"unexpected {klass}xx"


class SessionContext:
    """What every session of one process shares: settings, stats, pool, payloads."""

    __slots__ = (
        "active",
        "bdat",
        "close_grace",
        "config",
        "connections",
        "data_stages",
        "dialogue",
        "ehlo_cmd",
        "ehlo_offered",
        "ehlo_seen",
        "group",
        "handshake_timeout",
        "helo_cmd",
        "known",
        "loop",
        "mail_cmd",
        "messages",
        "pacer",
        "pipelining",
        "pool",
        "rcpt_block",
        "rcpt_cmds",
        "rcpts",
        "record",
        "server_hostname",
        "stats",
        "timeout",
        "tls_context",
    )

    def __init__(self, config: SendConfig, stats: Stats, messages: MessageSource, pool,
                 pacer, dialogue: Dialogue | None,
                 tls_context: ssl.SSLContext | None) -> None:
        self.config = config
        self.stats = stats
        self.messages = messages
        self.pool = pool
        self.pacer = pacer
        self.dialogue = dialogue
        self.tls_context = tls_context
        self.loop = asyncio.get_running_loop()
        self.active: set[SenderSession] = set()
        self.connections = 0
        self.timeout = config.timeout
        self.close_grace = min(config.timeout, CLOSE_GRACE)
        self.handshake_timeout = config.timeout + HANDSHAKE_BACKSTOP
        self.pipelining = config.pipelining
        self.bdat = config.bdat
        self.server_hostname = config.host.strip("[]")
        self.ehlo_cmd = f"EHLO {config.ehlo}\r\n".encode()
        self.helo_cmd = f"HELO {config.ehlo}\r\n".encode()
        self.mail_cmd = f"MAIL FROM:<{config.sender}>\r\n".encode()
        self.rcpt_cmds = [f"RCPT TO:<{r}>\r\n".encode()
                          for r in recipients(config.recipient, config.rcpts)]
        self.rcpts = len(self.rcpt_cmds)
        self.rcpt_block = b"".join(self.rcpt_cmds)
        self.group = self.mail_cmd + self.rcpt_block + _DATA
        self.data_stages = (MAIL, *([RCPT] * self.rcpts), DATA)
        self.ehlo_seen: list[bytes] = []
        self.ehlo_offered: frozenset[str] = frozenset()
        #: Per stage: records one wait (the ``append`` of its histogram's buffer).
        self.record = [hist.pending.append for hist in stats.latency]
        #: Reads that were exactly one or more whole replies -> those replies.
        self.known: dict[bytes, list[Reply]] = {}


class SenderSession(asyncio.Protocol):
    """One connection's dialogue (see the module contract)."""

    __slots__ = (
        "_chunking",
        "_closed_at",
        "_closing",
        "_ctx",
        "_expect",
        "_id",
        "_in_msg",
        "_last",
        "_later",
        "_malformed",
        "_msg_failed",
        "_msg_start",
        "_next_held",
        "_next_start",
        "_parser",
        "_partial",
        "_pipelining",
        "_rcpt_i",
        "_refused",
        "_reserved",
        "_timer",
        "_tls",
        "_tls_started",
        "_tls_task",
        "_transport",
        "done",
        "ended_by",
    )

    def __init__(self, ctx: SessionContext, started: float, reserved: int) -> None:
        self._ctx = ctx
        ctx.connections += 1
        self._id = ctx.connections
        self._transport: asyncio.Transport | None = None
        self._parser: ReplyParser | None = None  # made when a read is not a known one
        self._partial = False  # the parser holds part of a reply
        self._malformed = ""  # a protocol error in the read being handled, after its replies
        self._expect: deque[tuple[int, float]] = deque()
        self._last = 0.0  # perf_counter() of the last write or reply
        self.done: asyncio.Future[None] = ctx.loop.create_future()
        self._reserved = reserved
        self._in_msg = True  # the runner took the first message's ticket
        self._later = False  # a message after the connection's first has begun
        self._msg_failed = False
        self._msg_start = started
        self._next_held = False
        self._next_start = 0.0
        self._rcpt_i = 0
        self._refused = 0  # the current message's refused RCPTs (all when MAIL was)
        self._pipelining = False
        self._chunking = False
        self._tls = ctx.config.tls
        self._tls_started = 0.0
        self._tls_task: asyncio.Task | None = None
        self._closing = False
        self._closed_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: Why the connection ended: "quit", "closed by server", "timeout", "421", ...
        self.ended_by = ""

    @property
    def connected(self) -> bool:
        """True once the connection is made (and, with --tls, the handshake done)."""
        return self._transport is not None

    @property
    def deadline(self) -> float:
        """When the awaited reply is late (see the module contract)."""
        if self._closing:
            return self._closed_at + self._ctx.close_grace
        if not self._expect:
            return inf
        return self._last + self._ctx.timeout

    @property
    def number(self) -> int:
        """This connection's number in the process (the ``-v`` dialogue's tag)."""
        return self._id

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ctx = self._ctx
        self._transport = transport  # type: ignore[assignment]
        ctx.active.add(self)
        now = _perf()
        ctx.stats.connections_made += 1
        ctx.record[CONNECT](now - self._msg_start)
        if self._tls:
            ctx.stats.used("TLS")
        if ctx.dialogue is not None:
            ctx.dialogue.note(self._id, f"connected to {ctx.config.host} port {ctx.config.port}")
        self._expect.append((GREETING, now))
        self._last = now

    def data_received(self, data: bytes) -> None:
        ctx = self._ctx
        ctx.stats.bytes_in += len(data)
        replies = None if self._partial else ctx.known.get(data)
        if replies is None:
            replies = self._parse(data)
            if not replies:
                return
        self._last = now = _perf()
        expect = self._expect
        # Replies in this read can only answer commands written before it arrived.
        answerable = len(expect)
        for code, lines in replies:
            if self._closing:
                return
            if not answerable:
                self._unsolicited(code, lines)
                return
            answerable -= 1
            stage, sent_at = expect.popleft()
            ctx.record[stage](now - sent_at)
            if ctx.dialogue is not None:
                ctx.dialogue.received(self._id, code, lines)
            if code == 421 and stage != QUIT:
                self._fail(stage, "4xx")
                self._settle_held("4xx")
                self._close("421")
                return
            _HANDLERS[stage](self, code, lines, now)
        if self._malformed and not self._closing:
            self._protocol_error(self._malformed)

    def _parse(self, data: bytes) -> list[Reply] | None:
        """The replies ``data`` completes (``None`` when none). A protocol error in it
        is handled after the replies before it, which are real answers; a read that was
        exactly whole replies is remembered (see the module contract)."""
        parser = self._parser
        if parser is None:
            parser = self._parser = ReplyParser()
        try:
            replies = parser.feed(data)
        except ReplyError as exc:
            if not exc.replies:
                self._protocol_error(str(exc))
                return None
            self._malformed = str(exc)
            return exc.replies
        was_partial, self._partial = self._partial, parser.pending
        known = self._ctx.known
        if (replies and not (was_partial or self._partial) and len(data) <= KNOWN_READ_BYTES
                and len(known) < KNOWN_READS):
            known[data] = replies
        return replies

    def connection_lost(self, exc: Exception | None) -> None:
        if self.done.done():  # already ended by a failed STARTTLS handshake
            return
        if self._tls_task is not None:
            # A STARTTLS handshake's SSL layer reports the loss before the handshake's
            # task ends; _tls_ready books why (a TLS error or a close) and ends us.
            return
        ctx = self._ctx
        ctx.active.discard(self)
        if not self._closing:
            self.ended_by = "closed by server"
        ends = ctx.stats.ends
        ends[self.ended_by] = ends.get(self.ended_by, 0) + 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._in_msg and not self._msg_failed:
            if self._expect:
                self._fail(self._expect[0][0], "closed")
            else:  # waiting for its start time: never on the wire
                ctx.pool.give_back()
        self._in_msg = False
        self._settle_held("closed")
        self._release()
        if not self.done.done():
            self.done.set_result(None)
        if ctx.dialogue is not None:
            ctx.dialogue.note(self._id, "connection closed")

    # -- called by the runner ---------------------------------------------------------

    def timed_out(self) -> None:
        """The awaited reply did not come by ``deadline``: fail the message, abort; a
        closing connection that did not close by then is aborted."""
        if self._closing:
            self.abort()
            return
        stage = self._expect[0][0] if self._expect else GREETING
        self._fail(stage, "timeout")
        self._settle_held("timeout")
        if self._ctx.dialogue is not None:
            self._ctx.dialogue.note(self._id, f"timeout waiting for the {STAGES[stage]} reply")
        self._abort("quit timeout" if stage == QUIT else "timeout")

    def stop(self, reason: str) -> None:
        """End the session now (end of a hold, or an interrupt); a message on the wire
        (also a pipelined next one) counts as unfinished, one not yet started goes back
        to the pool."""
        ctx = self._ctx
        if self._in_msg and not self._msg_failed:
            if self._expect:
                ctx.stats.unfinished += 1
            else:
                ctx.pool.give_back()
        self._in_msg = False
        self._settle_held(None)
        self._release()
        self._close(reason)

    def abort(self) -> None:
        """Close now, discarding unsent data (a closing session past its grace, a second
        interrupt); what it counted stays counted."""
        if not self._closing:
            self._ending("interrupted")
        if self._transport is not None:
            self._transport.abort()

    def _release(self) -> None:
        """Return the tickets reserved for messages this connection will not send."""
        unused, self._reserved = self._reserved, 0
        if unused:
            self._ctx.pool.give_back(unused)

    def _settle_held(self, cause: str | None) -> None:
        """The pipelined next message, already on the wire, will not be answered on this
        connection: unfinished when the run stopped (``cause`` is None), otherwise failed
        at MAIL for ``cause``."""
        if self._next_held:
            self._next_held = False
            if cause is None:
                self._ctx.stats.unfinished += 1
            else:
                self._ctx.stats.fail(MAIL, cause)

    # -- writing ----------------------------------------------------------------------

    def _send(self, command: bytes, stage: int) -> float:
        """Write ``command``, awaiting its reply; returns when it was written."""
        ctx = self._ctx
        now = _perf()  # before the write: a fast reply can arrive while write() runs
        self._transport.write(command)  # type: ignore[union-attr]
        ctx.stats.bytes_out += len(command)
        self._expect.append((stage, now))
        self._last = now
        if ctx.dialogue is not None:
            ctx.dialogue.sent(self._id, command)
        return now

    def _send_many(self, payload: bytes, commands: bytes, stages: tuple[int, ...]) -> float:
        """Message text (may be empty) followed by commands, in one write; returns when
        it was written."""
        ctx = self._ctx
        now = _perf()
        self._transport.write(payload + commands if payload else commands)  # type: ignore[union-attr]
        ctx.stats.bytes_out += len(payload) + len(commands)
        expect = self._expect
        for stage in stages:
            expect.append((stage, now))
        self._last = now
        if ctx.dialogue is not None:
            if payload:
                ctx.dialogue.payload(self._id, payload)
            ctx.dialogue.sent(self._id, commands)
        return now

    # -- message flow -----------------------------------------------------------------

    def _start_message(self) -> None:
        """Begin the next message on this connection (after its pacing delay), or QUIT
        when there is none or its turn would come after the run's end."""
        ctx = self._ctx
        if self._reserved > 0 and ctx.pool.open():
            delay = ctx.pacer.delay() if ctx.pacer is not None else 0.0
            # A message whose turn comes after the run's end is not started (QUIT); a
            # hold keeps its connections to its end instead (its stop cancels the wait).
            if (delay <= 0 or ctx.config.hold is not None
                    or ctx.pool.open_at(_perf() + delay)):
                self._reserved -= 1
                self._in_msg = True
                self._msg_failed = False
                self._later = True
                if delay > 0:
                    self._timer = ctx.loop.call_later(delay, self._send_transaction)
                else:
                    self._send_transaction()
                return
        self._release()
        self._send(_QUIT, QUIT)

    def _send_transaction(self, restart_clock: bool = True) -> None:
        """Send MAIL (and with pipelining RCPTs and DATA/BDAT) for the current message;
        the first message of a connection keeps its clock, started at connect."""
        self._timer = None
        ctx = self._ctx
        if not self._pipelining:
            self._rcpt_i = 0
            started = self._send(ctx.mail_cmd, MAIL)
        elif self._chunking:
            started = self._send_bdat(ctx.messages.bdat_payload(),
                                      ctx.mail_cmd + ctx.rcpt_block, ctx.data_stages[:-1])
        else:
            started = self._send_many(b"", ctx.group, ctx.data_stages)
        if restart_clock:
            self._msg_start = started

    def _send_bdat(self, payload: bytes, before: bytes = b"",
                   before_stages: tuple[int, ...] = ()) -> float:
        """``before`` (pipelined MAIL and RCPTs), then BDAT LAST with ``payload``, in one
        write; returns when it was written."""
        ctx = self._ctx
        command = before + b"BDAT %d LAST\r\n" % len(payload)
        now = _perf()
        self._transport.write(command + payload)  # type: ignore[union-attr]
        ctx.stats.bytes_out += len(command) + len(payload)
        for stage in before_stages:
            self._expect.append((stage, now))
        self._expect.append((BDAT, now))
        self._last = now
        if ctx.dialogue is not None:
            ctx.dialogue.sent(self._id, command)
            ctx.dialogue.payload(self._id, payload)
        return now

    def _fail(self, stage: int, cause: str | int) -> None:
        """Count the current message failed at ``stage`` (once per message)."""
        if self._in_msg and not self._msg_failed:
            self._msg_failed = True
            self._ctx.stats.fail(stage, cause_of(cause) if isinstance(cause, int) else cause)

    def _recover(self) -> None:
        """After a failed transaction: RSET, then the next message."""
        self._refused = 0
        self._in_msg = False
        self._send(_RSET, RSET)

    def _give_up(self) -> None:
        """The server refused the session: QUIT politely and close."""
        self._in_msg = False
        self.ended_by = "refused"
        self._send(_QUIT, QUIT)

    # -- reply handlers, one per stage ------------------------------------------------

    def _on_greeting(self, code: int, lines: list[bytes], now: float) -> None:
        if code == 220:
            self._send(self._ctx.ehlo_cmd, EHLO)
        else:
            self._fail(GREETING, code)
            self._give_up()

    def _on_ehlo(self, code: int, lines: list[bytes], now: float) -> None:
        ctx = self._ctx
        if code != 250:
            if code in (500, 502):
                self._send(ctx.helo_cmd, HELO)
            else:
                self._fail(EHLO, code)
                self._give_up()
            return
        if lines == ctx.ehlo_seen:  # the same server says the same: parse it once
            offered = ctx.ehlo_offered
        else:
            offered = extensions(lines)
            ctx.ehlo_seen, ctx.ehlo_offered = lines, offered
        if ctx.config.starttls and not self._tls:
            if "STARTTLS" in offered:
                self._send(b"STARTTLS\r\n", STARTTLS)
            else:
                self._fail(STARTTLS, "not offered")
                self._give_up()
            return
        self._pipelining = ctx.pipelining and "PIPELINING" in offered
        self._chunking = ctx.bdat and "CHUNKING" in offered
        if self._pipelining:
            ctx.stats.used("PIPELINING")
        if self._chunking:
            ctx.stats.used("CHUNKING")
        self._send_transaction(False)

    def _on_helo(self, code: int, lines: list[bytes], now: float) -> None:
        if code != 250:
            self._fail(HELO, code)
            self._give_up()
        elif self._ctx.config.starttls and not self._tls:
            self._fail(STARTTLS, "not offered")
            self._give_up()
        else:
            self._send_transaction(False)

    def _on_starttls(self, code: int, lines: list[bytes], now: float) -> None:
        if code != 220:
            self._fail(STARTTLS, code)
            self._give_up()
            return
        ctx = self._ctx
        self._tls_started = now
        self._expect.append((TLS, now))  # so a timeout or close is counted at TLS
        self._last = now
        # STARTTLS is sent only on an open connection with --starttls (a TLS context).
        transport = cast(asyncio.Transport, self._transport)
        task = self._tls_task = ctx.loop.create_task(ctx.loop.start_tls(
            transport, self, cast(ssl.SSLContext, ctx.tls_context),
            server_hostname=ctx.server_hostname, ssl_handshake_timeout=ctx.handshake_timeout))
        task.add_done_callback(self._tls_ready)

    def _on_tls(self, code: int, lines: list[bytes], now: float) -> None:
        """A reply before the STARTTLS handshake's end is reported: the server spoke
        before the client's EHLO over TLS (see the module contract)."""
        self._fail(TLS, "bad reply")
        self._abort("bad reply")

    def _tls_ready(self, task: asyncio.Task) -> None:
        """The STARTTLS handshake ended: go on over TLS, or end the session (see the
        module contract)."""
        ctx = self._ctx
        self._tls_task = None
        exc = None if task.cancelled() else task.exception()
        tls_transport = None if task.cancelled() or exc is not None else task.result()
        if tls_transport is None or self._closing:
            # Cancelled (timed out or stopped: already counted), failed, or closed.
            cause = "error" if isinstance(exc, ssl.SSLError) and not isinstance(
                exc, ssl.SSLEOFError) else "closed"
            self._fail(TLS, cause)
            if ctx.dialogue is not None and not self._closing:
                ctx.dialogue.note(self._id, f"TLS handshake failed: {exc or 'connection closed'}")
            if not self._closing:
                self.ended_by = "TLS error" if cause == "error" else "closed by server"
            self._abort(self.ended_by)
            if tls_transport is not None:
                tls_transport.abort()
            self.connection_lost(exc)
            return
        self._transport = tls_transport
        self._expect.popleft()
        self._tls = True
        ctx.stats.used("STARTTLS")
        ctx.record[TLS](_perf() - self._tls_started)
        if ctx.dialogue is not None:
            ctx.dialogue.note(self._id, "TLS established")
        self._send(ctx.ehlo_cmd, EHLO)

    def _on_mail(self, code: int, lines: list[bytes], now: float) -> None:
        if code == 250:
            if not self._pipelining:
                self._rcpt_i = 1
                self._send(self._ctx.rcpt_cmds[0], RCPT)
            return
        self._fail(MAIL, code)
        self._refused = self._ctx.rcpts  # no recipient of a refused MAIL is valid
        if not self._pipelining:
            self._recover()

    def _on_rcpt(self, code: int, lines: list[bytes], now: float) -> None:
        if code not in (250, 251):
            self._fail(RCPT, code)
            self._refused += 1
            if not self._pipelining:
                self._recover()
            return
        if self._pipelining:
            return
        ctx = self._ctx
        if self._rcpt_i < ctx.rcpts:
            self._send(ctx.rcpt_cmds[self._rcpt_i], RCPT)
            self._rcpt_i += 1
        elif self._chunking:
            self._send_bdat(ctx.messages.bdat_payload())
        else:
            self._send(_DATA, DATA)

    def _on_data(self, code: int, lines: list[bytes], now: float) -> None:
        if code != 354:
            self._fail(DATA, code)
            self._recover()
            return
        ctx = self._ctx
        if self._msg_failed:  # a pipelined MAIL or RCPT was refused (module contract)
            refused, self._refused = self._refused, 0
            if refused >= ctx.rcpts:
                self._send(_DOT_ONLY, DOT)
            else:
                self._send_many(ctx.messages.data_payload(), b"", (DOT,))
            return
        payload = ctx.messages.data_payload()
        if not self._pipelining or ctx.pacer is not None:
            self._send_many(payload, b"", (DOT,))
        elif self._reserved > 0 and ctx.pool.open():
            self._reserved -= 1
            self._next_held = True
            self._next_start = _perf()
            self._send_many(payload, ctx.group, (DOT, *ctx.data_stages))
        else:
            self._release()
            self._send_many(payload, _QUIT, (DOT, QUIT))

    def _finish_message(self, ok: bool, stage: int, code: int, now: float) -> None:
        if ok and not self._msg_failed:
            stats = self._ctx.stats
            stats.sent += 1
            stats.settled = now
            stats.delivery.pending.append(now - self._msg_start)
        elif not ok:
            self._fail(stage, code)
        self._in_msg = False

    def _on_dot(self, code: int, lines: list[bytes], now: float) -> None:
        self._finish_message(code == 250, DOT, code, now)
        if self._next_held:
            self._next_held = False
            self._in_msg = True
            self._msg_failed = False
            self._msg_start = self._next_start
        elif not self._expect:
            self._start_message()

    def _on_bdat(self, code: int, lines: list[bytes], now: float) -> None:
        failed = self._msg_failed or code != 250
        self._finish_message(code == 250, BDAT, code, now)
        if failed:
            self._refused = 0
            self._send(_RSET, RSET)
        else:
            self._start_message()

    def _on_rset(self, code: int, lines: list[bytes], now: float) -> None:
        self._start_message()

    def _on_quit(self, code: int, lines: list[bytes], now: float) -> None:
        self._close(self.ended_by or "quit")

    # -- endings ----------------------------------------------------------------------

    def _unsolicited(self, code: int, lines: list[bytes]) -> None:
        """A reply that answers no command (see the module contract)."""
        ctx = self._ctx
        if code != 421:
            self._protocol_error(f"reply without a command: {reply_text(code, lines)}")
            return
        if ctx.dialogue is not None:
            ctx.dialogue.received(self._id, code, lines)
        if self._in_msg and not self._msg_failed:
            if self._later:
                ctx.pool.give_back()
                self._in_msg = False
            else:
                self._fail(self._expect[0][0] if self._expect else MAIL, "4xx")
        self._close("421")

    def _protocol_error(self, text: str) -> None:
        # Nothing awaited: past the greeting, a paced message waiting to start (at MAIL).
        stage = self._expect[0][0] if self._expect else MAIL
        self._fail(stage, "bad reply")
        self._settle_held("bad reply")
        if self._ctx.dialogue is not None:
            self._ctx.dialogue.note(self._id, text)
        self._abort("bad reply")

    def _ending(self, reason: str) -> None:
        self.ended_by = reason
        self._closing = True
        self._closed_at = _perf()
        if self._timer is not None:  # a paced message that will not start now
            self._timer.cancel()
            self._timer = None
        if self._tls_task is not None:  # a STARTTLS handshake: it ends the session
            self._tls_task.cancel()

    def _close(self, reason: str) -> None:
        """Close after what was written has been sent."""
        self._ending(reason)
        if self._transport is not None:
            self._transport.close()

    def _abort(self, reason: str) -> None:
        """Close now, discarding unsent data."""
        self._ending(reason)
        if self._transport is not None:
            self._transport.abort()


def _no_reply_expected(session: SenderSession, code: int, lines: list[bytes],
                       now: float) -> None:
    raise AssertionError("no command of this stage waits for a reply")


_BY_STAGE = {
    GREETING: SenderSession._on_greeting,
    EHLO: SenderSession._on_ehlo,
    HELO: SenderSession._on_helo,
    STARTTLS: SenderSession._on_starttls,
    MAIL: SenderSession._on_mail,
    RCPT: SenderSession._on_rcpt,
    DATA: SenderSession._on_data,
    DOT: SenderSession._on_dot,
    BDAT: SenderSession._on_bdat,
    RSET: SenderSession._on_rset,
    QUIT: SenderSession._on_quit,
    TLS: SenderSession._on_tls,
}
#: The reply handler of each stage, indexed by stage number.
_HANDLERS = tuple(_BY_STAGE.get(stage, _no_reply_expected) for stage in range(len(STAGES)))
