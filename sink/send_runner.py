"""One process's share of a ``spamsink send`` run, on one event loop.

Contract: :meth:`Runner.run` drives ``config.senders`` concurrent senders (or a hold),
each opening connections one after another while the pool gives tickets, and returns
a :class:`RunResult` whose counters obey ``sent + failed + unfinished + not_attempted
== -n`` for a counted run. Connection attempts and every awaited reply time out after
``--timeout`` (a sweep over open sessions, several times per timeout, no timer per
command). SIGINT/SIGTERM stop the run early (``interrupted``): open sessions close
(aborted when the server does not take what was written within the session's grace,
see :mod:`sink.send_session`); a second signal aborts every connection at once. Either
way the run returns its result, so the summary is printed. Connection attempts in
progress when the run stops are cancelled at once and their messages counted as
``unfinished``, not as failures. ``publish``, when given,
is called a few times a second with (sent, failed, open connections).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import math
import signal
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sink.send_body import MessageSource
from sink.send_config import SendConfig
from sink.send_dialogue import Dialogue
from sink.send_hold import HoldResult, run_hold
from sink.send_pace import CountPool, DeadlinePool, PausePacer, RatePacer
from sink.send_session import SenderSession, SessionContext
from sink.send_source import SourceRotation, bound_socket, tcp_socket
from sink.send_stats import CONNECT, TLS, Stats

PUBLISH_INTERVAL = 0.2
#: Seconds between counting the buffered latency samples into their histograms.
FOLD_INTERVAL = 0.05
_perf = time.perf_counter


@dataclass(slots=True)
class RunResult:
    """What a run (or one worker's share) measured."""

    stats: Stats
    hold: HoldResult | None = None
    interrupted: bool = False
    #: Tickets of a counted run never put on the wire (after an interrupt).
    not_attempted: int = 0

    def merge(self, other: RunResult) -> None:
        self.stats.merge(other.stats)
        if other.hold is not None:
            if self.hold is None:
                self.hold = HoldResult(0, other.hold.interval)
            self.hold.merge(other.hold)
        self.interrupted = self.interrupted or other.interrupted
        self.not_attempted += other.not_attempted

    def to_dict(self) -> dict[str, Any]:
        return {"stats": self.stats.to_dict(),
                "hold": self.hold.to_dict() if self.hold else None,
                "interrupted": self.interrupted, "not_attempted": self.not_attempted}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunResult:
        hold = HoldResult.from_dict(data["hold"]) if data["hold"] else None
        return cls(Stats.from_dict(data["stats"]), hold, data["interrupted"],
                   data["not_attempted"])


def use_uvloop() -> None:
    """Run on uvloop when installed (a third of asyncio's CPU per message). The same as
    ``sink.server.install_event_loop_policy``, without importing the server's modules,
    which would double the client's start-up time."""
    try:
        import uvloop
    except ImportError:
        print("spamsink send: uvloop is not installed: using asyncio's default event loop, "
              "which costs about three times the CPU per message", file=sys.stderr)
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def client_tls_context() -> ssl.SSLContext:
    """A client context that accepts any certificate: a load tester talks to test and
    trap servers with self-signed certificates, and sends nothing secret."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _connect_cause(exc: OSError) -> str:
    """``refused``, or the errno name (``ehostunreach``, ``eaddrnotavail``, ...)."""
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    return errno.errorcode.get(exc.errno, "error").lower() if exc.errno else "error"


class Runner:
    """Senders (or a hold) of one process; see the module contract."""

    def __init__(self, config: SendConfig, *, worker_prefix: str = "",
                 publish: Callable[[int, int, int], None] | None = None) -> None:
        self.config = config
        self.stats = Stats()
        self._worker_prefix = worker_prefix
        self._publish = publish
        self.stopped = False
        self._interrupt_reason = ""
        self._stopped_at = 0.0
        #: Connection attempts in progress: the task making each, and its deadline.
        self._connecting: dict[asyncio.Task, float] = {}
        self._timed_out: set[asyncio.Task] = set()
        #: Connection attempts cancelled because the run stopped.
        self._cut: set[asyncio.Task] = set()
        self.ctx: SessionContext
        self.pool: CountPool | DeadlinePool
        self.stopping: asyncio.Event
        self._sources = (SourceRotation(config.sources, config.worker)
                         if config.sources else None)
        self._ssl = client_tls_context() if config.tls or config.starttls else None

    async def run(self) -> RunResult:
        config = self.config
        loop = asyncio.get_running_loop()
        self.stopping = asyncio.Event()
        start = time.perf_counter()
        if config.count is not None:
            self.pool = CountPool(config.count)
        else:
            assert config.duration is not None
            self.pool = DeadlinePool(start + config.duration)
        pacer: RatePacer | PausePacer | None = None
        if config.hold is not None:
            pacer = PausePacer(config.hold_pause)
        elif config.rate:
            pacer = RatePacer(config.rate)
        dialogue = None
        if config.verbose:
            dialogue = Dialogue(2 if config.json else 1, config.verbose, self._worker_prefix)
        messages = MessageSource(sender=config.sender, recipient=config.recipient,
                                 subject=config.subject, body_bytes=config.body_bytes,
                                 bodies=config.bodies, offset=config.worker)
        self.ctx = SessionContext(config, self.stats, messages, self.pool, pacer, dialogue,
                                  self._ssl)
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._on_signal)
        helpers = [asyncio.create_task(self._sweep()), asyncio.create_task(self._fold())]
        if self._publish is not None:
            helpers.append(asyncio.create_task(self._publisher()))
        hold = None
        try:
            if config.hold is not None:
                hold = await run_hold(self, start + config.duration)  # type: ignore[operator]
            else:
                await asyncio.gather(*(self._sender(pacer if config.rate else None)
                                       for _ in range(config.senders)))
        finally:
            for task in helpers:
                task.cancel()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)
        # The clock's end (see sink.send_stats): not the closing QUITs after the last
        # message; a -t run's deadline at least; nothing for a worker given nothing to do.
        stats = self.stats
        if stats.started < math.inf:
            end = max(stats.settled, self._stopped_at)
            if config.duration is not None and not self.stopped:
                end = max(end, start + config.duration)
            stats.finished = end or time.perf_counter()
        if self._publish is not None:
            self._publish(self.stats.sent, self.stats.failed, 0)
        interrupted = self._interrupt_reason == "interrupted"
        return RunResult(self.stats, hold, interrupted, self.pool.remaining)

    def _on_signal(self) -> None:
        """SIGINT/SIGTERM: stop; when already stopping, abort every connection now."""
        if not self.stopped:
            self.interrupt("interrupted")
            return
        for session in list(self.ctx.active):
            session.abort()

    def interrupt(self, reason: str) -> None:
        """Stop now: no new messages or connections; open sessions are closed."""
        if self.stopped:
            return
        self.stopped = True
        self._stopped_at = time.perf_counter()
        self._interrupt_reason = reason
        self.stopping.set()
        self.pool.close()
        for session in list(self.ctx.active):
            session.stop(reason)
        for task in self._connecting:
            if task not in self._timed_out:
                self._cut.add(task)
                task.cancel()

    async def _sender(self, pacer: RatePacer | None) -> None:
        pool, per_connection = self.pool, self.config.per_connection
        while not self.stopped:
            tickets = pool.reserve(per_connection)
            if not tickets:
                return
            if pacer is not None:
                delay = pacer.delay()
                if delay > 0:
                    late = not pool.open_at(_perf() + delay)  # its turn is after the run's end
                    if not late:
                        await self._pause(delay)
                    if late or self.stopped:
                        pool.give_back(tickets)
                        return
            session = await self.open_session(tickets - 1)
            if session is not None:
                await session.done

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less when the run stops meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    async def open_session(self, reserved: int) -> SenderSession | None:
        """Connect one session for the message whose ticket the caller took and
        ``reserved`` more; ``None`` when the connection could not be made: then the
        first message failed (or, when the run stopped while connecting, is unfinished)
        and the reserved tickets went back to the pool."""
        # The loop is passed, not looked up: get_running_loop() costs a getpid() call.
        config, stats, loop = self.config, self.stats, self.ctx.loop
        started = _perf()
        if started < stats.started:
            stats.started = started
        session = SenderSession(self.ctx, started, reserved)
        stage, cause = CONNECT, ""
        task = asyncio.current_task(loop)
        assert task is not None
        self._connecting[task] = started + config.timeout
        try:
            if self._sources is not None or config.tls:
                # TCP first: with --tls, what fails after it is the handshake's ("tls").
                sock = (bound_socket(self._sources.next()) if self._sources is not None
                        else tcp_socket(config.family))
                try:
                    await loop.sock_connect(sock, config.sockaddr)
                except BaseException:
                    sock.close()
                    raise
                if config.tls:
                    stage = TLS
                    await loop.create_connection(
                        lambda: session, sock=sock, ssl=self._ssl,
                        server_hostname=self.ctx.server_hostname,
                        ssl_handshake_timeout=self.ctx.handshake_timeout)
                else:
                    await loop.create_connection(lambda: session, sock=sock)
            else:
                await loop.create_connection(lambda: session, config.sockaddr[0], config.port)
        except asyncio.CancelledError:
            if task in self._cut:  # the run stopped
                self._cut.discard(task)
                task.uncancel()
                if not session.connected:
                    del self._connecting[task]
                    stats.unfinished += 1
                    self.pool.give_back(reserved)
                    return None
            elif task not in self._timed_out:
                del self._connecting[task]
                raise
            else:
                self._timed_out.discard(task)
                task.uncancel()
                if not session.connected:  # else it connected just as the deadline passed
                    cause = "timeout"
        except ssl.SSLError as exc:
            stage, cause = TLS, "closed" if isinstance(exc, ssl.SSLEOFError) else "error"
        except OSError as exc:
            cause = "closed" if stage == TLS else _connect_cause(exc)
        if cause:
            del self._connecting[task]
            stats.connections_failed += 1
            stats.fail(stage, cause)
            self.pool.give_back(reserved)
            if self.ctx.dialogue is not None:
                what = "TLS handshake" if stage == TLS else "connect"
                self.ctx.dialogue.note(session.number, f"{what} failed: {cause}")
            return None
        del self._connecting[task]
        if self.stopped:
            session.stop(self._interrupt_reason)
        return session

    async def _sweep(self) -> None:
        """Time out connection attempts and awaited replies that are late (see the module
        contract); a late connect is cancelled and counted by :meth:`open_session`."""
        tick = min(1.0, max(0.01, self.config.timeout / 10))
        active, connecting, timed_out = self.ctx.active, self._connecting, self._timed_out
        while True:
            await asyncio.sleep(tick)
            now = time.perf_counter()
            for task in [t for t, deadline in connecting.items() if deadline < now]:
                if task not in timed_out and not self.stopped:
                    timed_out.add(task)
                    task.cancel()
            for session in [s for s in active if s.deadline < now]:
                session.timed_out()

    async def _fold(self) -> None:
        """Count the buffered latency samples into the histograms a little at a time,
        while the client waits for replies anyway, rather than all at the end of the run
        (~40 ms for 50,000 messages) when it would add to the wall time; this also
        bounds the buffers' memory."""
        histograms = self.stats.histograms()
        while True:
            await asyncio.sleep(FOLD_INTERVAL)
            for hist in histograms:
                hist.fold()

    async def _publisher(self) -> None:
        assert self._publish is not None
        stats, active = self.stats, self.ctx.active
        while True:
            self._publish(stats.sent, stats.failed, len(active))
            await asyncio.sleep(PUBLISH_INTERVAL)
