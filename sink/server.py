"""Running the sink: listening sockets, one event loop per process, workers, shutdown.

``run(settings)`` is what ``spamsink serve`` calls. With ``workers == 1`` everything
runs in this process. With more, this process supervises ``workers`` copies of itself
(``python -m sink.cli serve --worker-index I ...``) that each open their own listening
sockets with ``SO_REUSEPORT`` (the kernel spreads connections over them); a worker
that dies is restarted, and SIGINT/SIGTERM stop them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import logging
import os
import signal
import socket
import ssl
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sink import STALE, engine_build
from sink.greylist import Greylist
from sink.persona import Persona
from sink.record import DiscardRecords, RecordSink, SessionRecord
from sink.recording import Recording, WorkerFleet, start_api
from sink.sessionlog import SessionLogger
from sink.smtp import ConnectionTracker, Limits, PacingTimers, ServerContext, SMTPSession
from sink.sockopts import SocketCosts, SocketOptionError, apply_listener, check_connection_costs
from sink.tarpit import Pacing, Policy, Tarpit
from sink.tls import ensure_self_signed, load_context

log = logging.getLogger("spamsink.server")


class StartupError(Exception):
    """A problem the user must fix before the sink can start; the message says how."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """A host and port to listen on; ``host == ""`` means every address."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int = 25) -> ListenAddress:
        """Parse ``:25``, ``127.0.0.1:2525``, ``[::1]:25``, ``::1`` or ``host``."""
        text = text.strip()
        if text.startswith("["):
            host, _, rest = text[1:].partition("]")
            port_text = rest.removeprefix(":")
        elif text.count(":") == 1:
            host, _, port_text = text.partition(":")
        elif text.count(":") > 1:
            host, port_text = text, ""
        else:
            host, port_text = text, ""
        try:
            port = int(port_text) if port_text else default_port
        except ValueError:
            raise ValueError(f"bad port in address {text!r}") from None
        if not 0 <= port <= 65535:
            raise ValueError(f"port out of range in address {text!r}")
        return cls(host, port)

    def __str__(self) -> str:
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class Settings:
    """Everything ``spamsink serve`` was told, after parsing and validation."""

    smtp: list[ListenAddress]
    smtps: list[ListenAddress]
    data: Path
    hostname: str
    persona: Persona
    limits: Limits
    pacing: Pacing
    domains: frozenset[str] | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    starttls: bool = True
    workers: int = 1
    worker_index: int | None = None
    grace: float = 10.0
    backlog: int = 1024
    argv: Sequence[str] = field(default_factory=list)
    policy: Policy = field(default_factory=Policy)
    costs: SocketCosts = field(default_factory=SocketCosts)
    greylist_delay: float | None = None  # None: no greylisting
    #: Recording (sink/recording.py) and the HTTP API (sink/api.py).
    record: bool = True
    retain_sessions: float = 30 * 86400.0  # 0 keeps sessions forever
    api: ListenAddress | None = None  # None: no API
    api_token: str | None = None


def open_listener(address: ListenAddress, *, reuse_port: bool, backlog: int,
                  listen: bool = True, costs: SocketCosts | None = None) -> socket.socket:
    """A bound (and listening) TCP socket for ``address``, with the listener ``costs``.

    Raises :class:`StartupError` with one line telling the user what to do when the
    port may not be bound or a socket cost needs a privilege the process lacks.
    """
    host = address.host
    family = socket.AF_INET6 if (":" in host or host == "") and socket.has_ipv6 else socket.AF_INET
    if host and ":" not in host:
        try:
            socket.inet_pton(socket.AF_INET, host)
        except OSError:
            try:
                infos = socket.getaddrinfo(host, address.port, type=socket.SOCK_STREAM)
            except OSError as exc:
                raise StartupError(f"cannot listen on {address}: unknown host ({exc})") from None
            family, host = infos[0][0], infos[0][4][0]
    try:
        sock = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        if family != socket.AF_INET6 or host:
            raise StartupError(_bind_advice(address, exc)) from None
        family, sock = socket.AF_INET, socket.socket(socket.AF_INET)  # IPv6 is off here
        host = "0.0.0.0"
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "" else 1)
        sock.bind((host or "::", address.port))
        if costs is not None:
            apply_listener(sock, costs)  # before listen(): inherited by accepted sockets
        if listen:
            sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(_bind_advice(address, exc)) from None
    except SocketOptionError as exc:
        sock.close()
        raise StartupError(f"{address}: {exc}") from None
    return sock


def _bind_advice(address: ListenAddress, exc: OSError) -> str:
    if exc.errno == errno.EACCES:
        return (f"cannot listen on {address}: permission denied; ports below 1024 need root or "
                f"CAP_NET_BIND_SERVICE (sudo setcap cap_net_bind_service=+ep on the python "
                f"binary, or the systemd unit), or listen on a high port such as "
                f"--smtp 127.0.0.1:2525")
    if exc.errno == errno.EADDRINUSE:
        return (f"cannot listen on {address}: the address is in use (another MTA such as "
                f"Postfix or an earlier spamsink?); stop it or choose another --smtp port")
    if exc.errno == errno.EADDRNOTAVAIL:
        return f"cannot listen on {address}: no interface has that address"
    return f"cannot listen on {address}: {exc.strerror or exc}"


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context for STARTTLS/--smtps, creating the self-signed pair if needed."""
    if not settings.starttls and not settings.smtps:
        return None
    if settings.tls_cert or settings.tls_key:
        if not (settings.tls_cert and settings.tls_key):
            raise StartupError("--tls-cert and --tls-key must be given together")
        cert, key = settings.tls_cert, settings.tls_key
    else:
        try:
            cert, key = ensure_self_signed(settings.data, settings.hostname)
        except OSError as exc:
            raise StartupError(f"cannot create the TLS key in --data {settings.data}: "
                               f"{exc.strerror or exc}") from None
    try:
        return load_context(cert, key)
    except ValueError as exc:
        raise StartupError(str(exc)) from None


class SinkProcess:
    """The listeners and sessions of one process, and their orderly shutdown."""

    def __init__(self, settings: Settings, records: RecordSink,
                 on_close: Callable[[SessionRecord], None] | None = None) -> None:
        self.settings = settings
        self.records = records
        self.on_close = on_close
        self.servers: list[asyncio.Server] = []
        self.contexts: list[ServerContext] = []
        #: This process's tarpit: pacing policy, budgets, reputation, cost counters.
        self.tarpit = Tarpit(
            settings.pacing, settings.policy, costs=settings.costs,
            greylist=None if settings.greylist_delay is None else Greylist(settings.greylist_delay),
        )
        self._reputation: asyncio.Future[None] | None = None

    async def start(self, sockets: list[tuple[socket.socket, bool]]) -> None:
        """Serve SMTP on ``sockets``: (listening socket, implicit TLS) pairs."""
        settings = self.settings
        loop = asyncio.get_running_loop()
        tls = tls_context(settings)
        tracker = ConnectionTracker()
        tarpit = self.tarpit
        on_close = self.on_close
        if on_close is None:
            on_close = tarpit.observe
        else:
            def on_close(record: SessionRecord, first=on_close) -> None:
                tarpit.observe(record)
                first(record)
        timers = PacingTimers.for_tarpit(loop, tarpit)  # one write budget per process
        for sock, implicit in sockets:
            ctx = ServerContext(
                persona=settings.persona, hostname=settings.hostname, limits=settings.limits,
                records=self.records, tarpit=tarpit, domains=settings.domains,
                tls=tls if settings.starttls or implicit else None, implicit_tls=implicit,
                tracker=tracker, on_close=on_close, listening=sock.getsockname()[:2],
                pacing_timers=timers,
            )
            self.contexts.append(ctx)
            server = await loop.create_server(
                lambda ctx=ctx: SMTPSession(ctx), sock=sock,
                ssl=tls if implicit else None, backlog=settings.backlog,
            )
            self.servers.append(server)
        if settings.record and settings.pacing.active:  # known-bad senders, from the store
            self._reputation = asyncio.ensure_future(tarpit.refresh_from_store(settings.data))

    @property
    def active_sessions(self) -> int:
        """Open SMTP connections in this process."""
        return sum(len(ctx.sessions) for ctx in self.contexts)

    async def stop(self) -> None:
        """Stop accepting, let sessions finish within the grace period, then close them."""
        if self._reputation is not None:
            self._reputation.cancel()
        for server in self.servers:
            server.close()
        for ctx in self.contexts:
            ctx.shutting_down = True
        deadline = time.monotonic() + self.settings.grace
        while self.active_sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for ctx in self.contexts:
            for session in list(ctx.sessions):
                session.shutdown()
        await asyncio.sleep(0.05)
        for server in self.servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)


def bind_all(settings: Settings, *, reuse_port: bool,
             listen: bool = True) -> list[tuple[socket.socket, bool]]:
    """Open every --smtp and --smtps listener; close them all if one fails."""
    opened: list[tuple[socket.socket, bool]] = []
    try:
        for address in settings.smtp:
            opened.append((open_listener(address, reuse_port=reuse_port, costs=settings.costs,
                                         backlog=settings.backlog, listen=listen), False))
        for address in settings.smtps:
            opened.append((open_listener(address, reuse_port=reuse_port, costs=settings.costs,
                                         backlog=settings.backlog, listen=listen), True))
        check_connection_costs(settings.costs)
    except SocketOptionError as exc:
        for sock, _ in opened:
            sock.close()
        raise StartupError(str(exc)) from None
    except StartupError:
        for sock, _ in opened:
            sock.close()
        raise
    return opened


def install_event_loop_policy() -> None:
    """Use uvloop when it is installed; warn and use asyncio's loop otherwise."""
    try:
        import uvloop
    except ImportError:
        log.warning("uvloop is not installed: using asyncio's default event loop, "
                    "which costs about three times the CPU per message")
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def _serve_forever(settings: Settings, reuse_port: bool) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if settings.worker_index is not None:
        _watch_lifeline(loop, stop)
    sockets = bind_all(settings, reuse_port=reuse_port)
    session_log = SessionLogger()
    recording = (Recording.open(settings.data, retain=settings.retain_sessions)
                 if settings.record else None)
    process = SinkProcess(settings, records=recording.records if recording else DiscardRecords(),
                          on_close=session_log.write)
    if recording is not None:
        recording.active = lambda: process.active_sessions
    api = await start_api(settings, recording) if settings.worker_index is None else None
    await process.start(sockets)
    # Start-up objects live as long as the process: keep the cyclic collector off them
    # (measured: halves the collector's cost per queued session record).
    gc.collect()
    gc.freeze()
    names = ", ".join(str(a) for a in settings.smtp + settings.smtps)
    index = settings.worker_index
    who = "spamsink" if index is None else f"spamsink worker {index}"
    engine = engine_build()
    log.log(logging.WARNING if engine == STALE else logging.INFO,
            "%s listening on %s as %s (%s persona, engine %s)", who, names,
            settings.hostname, settings.persona.name, engine)
    await stop.wait()
    log.info("shutting down: letting sessions finish for up to %.0f s", settings.grace)
    await process.stop()
    if recording is not None:
        await asyncio.to_thread(recording.close)  # writes every queued record
    if api is not None:
        await api.stop()


def run(settings: Settings) -> int:
    """Serve until SIGINT/SIGTERM. Returns the process exit status."""
    install_event_loop_policy()
    if settings.workers > 1 and settings.worker_index is None:
        return _supervise(settings)
    asyncio.run(_serve_forever(settings, reuse_port=settings.workers > 1
                               or settings.worker_index is not None))
    return 0


def _worker_command(settings: Settings, index: int) -> list[str]:
    return [sys.executable, "-m", "sink.cli", "serve", *settings.argv,
            "--workers", str(settings.workers), "--worker-index", str(index)]


def _supervise(settings: Settings) -> int:
    """Run ``settings.workers`` worker processes; restart the ones that die."""
    # Bind (without listening) first, so a port we may not use fails here, once.
    for sock, _ in bind_all(settings, reuse_port=True, listen=False):
        sock.close()
    tls_context(settings)  # create the self-signed pair once, before workers race for it
    # Store created once, workers' metrics in one directory, the API served from here.
    fleet = WorkerFleet(settings)
    stopping = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    workers: dict[int, subprocess.Popen[bytes]] = {}
    restarts: dict[int, float] = {}
    for index in range(settings.workers):
        workers[index] = _start_worker(settings, index)
    log.info("supervising %d workers", settings.workers)
    while not stopping:
        time.sleep(0.2)
        for index, proc in list(workers.items()):
            status = proc.poll()
            if status is None or stopping:
                continue
            delay = 1.0 if time.monotonic() - restarts.get(index, 0.0) < 5 else 0.0
            log.warning("worker %d exited with status %s; restarting it", index, status)
            fleet.worker_exited(proc.pid)
            _close_lifeline(proc)
            time.sleep(delay)
            if stopping:
                break
            restarts[index] = time.monotonic()
            workers[index] = _start_worker(settings, index)
    for proc in workers.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + settings.grace + 5
    for proc in workers.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        _close_lifeline(proc)
    fleet.close()
    return 0


def _start_worker(settings: Settings, index: int) -> subprocess.Popen[bytes]:
    """Worker ``index``, its standard input a pipe that only this supervisor holds
    open: its *lifeline*. The pipe ends when the supervisor does, however it ends
    (``kill -9`` too), and the worker then shuts down (:func:`_watch_lifeline`)."""
    return subprocess.Popen(_worker_command(settings, index), stdin=subprocess.PIPE)


def _close_lifeline(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        proc.stdin.close()


def _watch_lifeline(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    """In a worker: set ``stop`` when the supervisor's end of standard input closes
    (the supervisor is gone), so no worker keeps serving on its own."""
    fd = sys.stdin.fileno()
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return  # not started by a supervisor (--worker-index by hand): nothing to watch

    def check() -> None:
        try:
            data = os.read(fd, 512)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            loop.remove_reader(fd)
            log.warning("the supervisor is gone: shutting down")
            stop.set()

    os.set_blocking(fd, False)
    loop.add_reader(fd, check)


def default_data_dir() -> Path:
    """systemd's $STATE_DIRECTORY, else $XDG_DATA_HOME/spamsink (~/.local/share/spamsink)."""
    state = os.environ.get("STATE_DIRECTORY")
    if state:
        return Path(state.split(":")[0])
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(Path.home(), ".local", "share")
    return Path(base) / "spamsink"
