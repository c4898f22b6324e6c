"""Pacing policy: who is slowed down, by how much, and within which budgets.

The engine (:mod:`sink.smtp`) talks to one :class:`Tarpit` per server process:

* :meth:`Tarpit.pacer_for` at connect: a :class:`Pacer` for senders that get the tarpit
  from the start (``who="all"``, or an address the tarpit already knows as bad), else
  ``None`` and the connection runs unpaced (no timers: the hot path).
* :meth:`Tarpit.pregreet_wait`: seconds between a postscreen-style ``220-`` teaser and
  the real banner (0 = no teaser). Input before the real banner is the ``PREGREET``
  bot signal.
* :meth:`Tarpit.escalate` when an unpaced session has earned a bot flag
  (:data:`BOT_FLAGS`): a pacer from now on, if the budget allows.
* :meth:`Tarpit.closed` at close: the kernel's count of what the sender spent
  (``TCP_INFO``) goes into the record, and a tarpit budget slot is given back.
* :meth:`Tarpit.observe` with every finished record (the server's ``on_close``): the
  in-memory reputation (repeat visits, bot flags) and the cost counters.

Realism first: a first-time, well-behaved sender gets Postfix's timing (replies at
once), except the optional teaser, which is what a Postfix with postscreen sends too.
Every delay carries random jitter; every reply stays under the client's RFC 5321
timeout for its stage, and a session is held at most ``Policy.hold_cap`` seconds.

A :class:`Pacer` keeps no per-connection state: one instance serves every paced
session, so a held connection costs nothing here beyond what the engine keeps.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sink import sockopts
from sink.greylist import Greylist
from sink.record import F_GREYLIST_RETRY, F_GREYLISTED, F_TARPITTED, Flag, SessionRecord

log = logging.getLogger("spamsink.tarpit")


class Stage(enum.IntEnum):
    """Where in the dialogue a reply is sent."""

    GREETING = 0
    COMMAND = 1
    END_OF_DATA = 2
    DATA_INIT = 3  # the 354 reply to DATA


#: RFC 5321 4.5.3.2 client timeouts (seconds) for the reply of each stage.
RFC5321_TIMEOUTS: dict[Stage, float] = {
    Stage.GREETING: 300.0,
    Stage.COMMAND: 300.0,
    Stage.DATA_INIT: 120.0,
    Stage.END_OF_DATA: 600.0,
}
#: A reply is held at most this fraction of its stage's timeout (margin for the network).
TIMEOUT_MARGIN = 0.8

#: Bot signals that move a session into the tarpit.
BOT_FLAGS = int(
    Flag.PREGREET | Flag.PIPELINING_UNASKED | Flag.BARE_LF | Flag.BARE_CR | Flag.NON_SMTP
    | Flag.AUTH_ATTEMPT | Flag.RELAY_ATTEMPT | Flag.SMUGGLING
)


@dataclass(frozen=True, slots=True)
class Pacing:
    """Delays (seconds) and stutter rate (bytes/s, 0 = off), each with relative jitter.

    ``pregreet_wait`` is the pause after the ``220-`` teaser; it applies to every
    connection, since it is how early talkers are found.
    """

    greeting_delay: float = 0.0
    command_delay: float = 0.0
    data_delay: float = 0.0
    stutter_bps: float = 0.0
    jitter: float = 0.0
    pregreet_wait: float = 0.0

    @property
    def active(self) -> bool:
        """True when any reply of a tarpitted session is delayed or stuttered."""
        return bool(self.greeting_delay or self.command_delay or self.data_delay
                    or self.stutter_bps)


PRESETS: dict[str, Pacing] = {
    "off": Pacing(),
    # A busy but honest server: postscreen's 6 s greet wait, a few seconds per step.
    "polite": Pacing(greeting_delay=5.0, command_delay=1.0, data_delay=5.0, jitter=0.3,
                     pregreet_wait=6.0),
    # OpenBSD spamd: every reply one byte per second.
    "spamd": Pacing(stutter_bps=1.0, jitter=0.2, pregreet_wait=6.0),
    # As long as RFC 5321 clients are obliged to wait, byte by byte.
    "max": Pacing(greeting_delay=30.0, command_delay=20.0, data_delay=60.0, stutter_bps=1.0,
                  jitter=0.3, pregreet_wait=6.0),
}

WHO = ("flagged", "all")


@dataclass(frozen=True, slots=True)
class Policy:
    """Who gets the tarpit and the budgets that keep it from being turned against us.

    ``who``: ``"flagged"`` paces only senders with a bot flag or a bad reputation,
    ``"all"`` paces every sender. ``max_tarpitted``: paced sessions at once per process
    (beyond it, normal pacing). ``hold_cap``: seconds of pacing per session.
    ``known_bad_sessions``: sessions from one address (since it was last forgotten)
    after which it is paced from connect; an address with a flagged session is paced
    on its next visit. ``remember``: addresses kept in memory (oldest forgotten first).
    ``write_budget``: stuttered bytes per second per process at most (after each
    held reply's first byte), 0 = no limit; beyond it every stuttering session waits
    its turn, so stuttering to 50,000 clients costs what stuttering to
    ``write_budget`` does.
    ``tcp_info``: read the kernel's segment counts of every session even when no
    tarpit feature is on (see :attr:`Tarpit.measures`).
    """

    who: str = "flagged"
    max_tarpitted: int = 10_000
    hold_cap: float = 600.0
    known_bad_sessions: int = 10
    remember: int = 100_000
    write_budget: float = 5_000.0
    tcp_info: bool = False

    def __post_init__(self) -> None:
        if self.write_budget < 0:
            raise ValueError("the write budget cannot be negative")
        if self.who not in WHO:
            raise ValueError(f"unknown tarpit target {self.who!r}; choose one of: {', '.join(WHO)}")


def pacing_from_options(preset: str, **overrides: float | None) -> Pacing:
    """The named preset with every override that is not ``None`` applied."""
    if preset not in PRESETS:
        raise ValueError(f"unknown tarpit preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    changes = {key: value for key, value in overrides.items() if value is not None}
    return replace(PRESETS[preset], **changes)


class Pacer:
    """Pacing decisions drawn with jitter from a :class:`Pacing`, within the caps.

    Stateless per connection: the engine passes how long the session was held so far.
    """

    __slots__ = ("_cap", "_pacing", "_random")

    def __init__(self, pacing: Pacing, rng: random.Random, hold_cap: float = 600.0) -> None:
        self._pacing = pacing
        self._random = rng
        self._cap = hold_cap

    def _jittered(self, value: float) -> float:
        if not value or not self._pacing.jitter:
            return value
        spread = value * self._pacing.jitter
        return max(0.0, value + self._random.uniform(-spread, spread))

    def pace(self, stage: Stage, held: float, size: int) -> tuple[float, float]:
        """(delay before, seconds between bytes) for a ``size``-byte reply at ``stage``.

        ``held`` is what the session was held so far. The delay plus the stuttered
        bytes stay within the stage's RFC 5321 timeout (with margin) and the session's
        hold cap; a stutter interval under 10 ms is sent as one write instead.
        """
        pacing = self._pacing
        budget = min(RFC5321_TIMEOUTS[stage] * TIMEOUT_MARGIN, self._cap - held)
        if budget <= 0:
            return 0.0, 0.0
        if stage is Stage.GREETING:
            wanted = pacing.greeting_delay
        elif stage is Stage.END_OF_DATA:
            wanted = pacing.data_delay
        else:
            wanted = pacing.command_delay
        delay = min(self._jittered(wanted), budget)
        interval = 0.0
        if pacing.stutter_bps and size > 1:
            interval = min(self._jittered(1.0 / pacing.stutter_bps), (budget - delay) / (size - 1))
            if interval < 0.01:
                interval = 0.0
        return delay, interval


def known_bad_in_store(data: Path, since: float, min_messages: int, limit: int) -> set[str]:
    """Senders in the store in ``data`` seen since ``since`` with a bot flag or volume."""
    from sink.store import IpFilter, open_reader

    reader = open_reader(data)
    filters = [IpFilter(since=since, flags=int(flag)) for flag in Flag if flag & BOT_FLAGS]
    filters.append(IpFilter(since=since, min_messages=min_messages))
    return {row[0] for flt in filters for row in reader.ips(flt, limit=limit)}


def _zero_counters() -> dict[str, float]:
    return dict.fromkeys(COUNTERS, 0)


#: The cost counters of :meth:`Tarpit.stats`, with what each means.
COUNTERS: dict[str, str] = {
    "sessions": "sessions closed",
    "messages": "messages accepted",
    "held_seconds": "seconds senders waited on our pacing (sum over sessions)",
    "session_seconds": "seconds from accept to close (sum over sessions)",
    "segments_in": "TCP segments received (kernel count, TCP_INFO)",
    "bytes_in": "bytes received (kernel count, TCP_INFO)",
    "tarpitted_sessions": "sessions paced by the tarpit",
    "escalations": "sessions moved into the tarpit after a bot signal",
    "budget_refusals": "times a session should have been paced but the budget was full",
    "greylist_deferrals": "sessions with a recipient deferred (450) by the greylist",
    "greylist_retries": "sessions that came back after a greylist deferral",
}


class Tarpit:
    """Decides which connections are paced. One per server process, shared by sessions.

    ``clock`` (monotonic seconds) and ``rng`` are injectable for tests. ``costs`` are
    the per-connection socket costs (window clamp, drop filter) applied to every
    session or only to paced ones, as ``costs.for_all`` says.
    """

    def __init__(self, pacing: Pacing, policy: Policy | None = None, *,
                 rng: random.Random | None = None,
                 costs: sockopts.SocketCosts | None = None,
                 greylist: Greylist | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.pacing = pacing
        self.policy = policy or Policy()
        self._random = rng or random.Random()
        self._clock = clock
        self.costs = costs or sockopts.SocketCosts()
        self.greylist = greylist
        self._pacer = Pacer(pacing, self._random, self.policy.hold_cap) if pacing.active else None
        #: True when a bot flag can move a session into the tarpit (engine's fast check).
        self.escalates = self._pacer is not None and self.policy.who == "flagged"
        self._per_connection_costs = self.costs.per_connection
        #: Whether sessions' TCP_INFO (segments in, retransmissions) is read at close:
        #: when any tarpit feature (pacing, the teaser, socket costs, greylisting) is on,
        #: for every session, so costs compare alike; otherwise only with
        #: ``policy.tcp_info``. The read costs the sink ~10 µs of CPU per connection
        #: (measured), a tenth of an unpaced one-message session.
        self.measures = (self.policy.tcp_info or pacing.active or pacing.pregreet_wait > 0
                         or self.costs.active or greylist is not None)
        self.tarpitted = 0
        self._visits: OrderedDict[str, int] = OrderedDict()
        self._known_bad: set[str] = set()
        self._counters = _zero_counters()
        self._cpu_start = time.process_time()
        self._started = clock()

    # -- decisions (engine) ---------------------------------------------------------

    def pregreet_wait(self) -> float:
        """Seconds between the ``220-`` teaser and the banner; 0 = send no teaser."""
        wait = self.pacing.pregreet_wait
        if not wait:
            return 0.0
        if self.pacing.jitter:
            wait = max(0.0, wait + self._random.uniform(-1, 1) * wait * self.pacing.jitter)
        return min(wait, RFC5321_TIMEOUTS[Stage.GREETING] * TIMEOUT_MARGIN)

    def pacer_for(self, client_ip: str, transport: Any = None) -> Pacer | None:
        """The pacer for a new connection from ``client_ip``; ``None`` when unpaced.

        Applies the per-connection socket costs to ``transport`` (for every session
        when ``costs.for_all``, else only when paced).
        """
        if self._per_connection_costs and self.costs.for_all and transport is not None:
            sockopts.apply_connection(transport, self.costs)
        if self._pacer is None:
            return None
        if self.policy.who == "all" or client_ip in self._known_bad:
            return self._admit(transport)
        return None

    def escalate(self, transport: Any = None) -> Pacer | None:
        """A pacer for an unpaced session that earned a bot flag; ``None`` if over budget."""
        pacer = self._admit(transport)
        if pacer is not None:
            self._counters["escalations"] += 1
        return pacer

    def _admit(self, transport: Any) -> Pacer | None:
        if self.tarpitted >= self.policy.max_tarpitted:
            self._counters["budget_refusals"] += 1
            return None
        self.tarpitted += 1
        self._counters["tarpitted_sessions"] += 1
        if self._per_connection_costs and not self.costs.for_all and transport is not None:
            sockopts.apply_connection(transport, self.costs)
        return self._pacer

    def closed(self, record: SessionRecord, transport: Any) -> None:
        """At connection loss: record the kernel's counts, give back the budget slot."""
        if record.flags & F_TARPITTED:
            self.tarpitted -= 1
        if self.measures:
            info = sockopts.tcp_info_of(transport)
            if info is not None:
                record.segments_in, record.retransmits = info.segs_in, info.total_retrans

    # -- reputation and counters (on_close) -----------------------------------------

    def observe(self, record: SessionRecord) -> None:
        """Count a finished session and update the reputation of its address."""
        counters = self._counters
        counters["sessions"] += 1
        counters["messages"] += record.messages
        counters["held_seconds"] += record.held
        counters["session_seconds"] += record.duration
        counters["segments_in"] += record.segments_in
        counters["bytes_in"] += record.bytes
        flags = record.flags
        if flags & F_GREYLISTED:
            counters["greylist_deferrals"] += 1
        if flags & F_GREYLIST_RETRY:
            counters["greylist_retries"] += 1
        ip = record.client_ip
        visits = self._visits.pop(ip, 0) + 1
        self._visits[ip] = visits
        if flags & BOT_FLAGS or visits >= self.policy.known_bad_sessions:
            self._known_bad.add(ip)
        while len(self._visits) > self.policy.remember:
            forgotten, _ = self._visits.popitem(last=False)
            self._known_bad.discard(forgotten)

    def load_reputation(self, bad_addresses: Iterable[str]) -> None:
        """Replace the externally known bad addresses (e.g. from the store), at once."""
        self._known_bad = set(bad_addresses) | {
            ip for ip in self._known_bad if ip in self._visits
        }

    async def refresh_from_store(self, data: Path, *, interval: float = 60.0,
                                 window: float = 7 * 86400, min_messages: int = 100) -> None:
        """Forever: every ``interval`` seconds load the known-bad senders from the store.

        Known bad: seen within ``window`` seconds with any bot flag, or with at least
        ``min_messages`` messages. The query runs in a thread; the event loop never waits
        on SQLite. Runs until cancelled; a missing or unreadable store is retried.
        """
        loop = asyncio.get_running_loop()
        while True:
            try:
                bad = await loop.run_in_executor(
                    None, known_bad_in_store, data, time.time() - window, min_messages,
                    self.policy.remember)
            except (OSError, sqlite3.Error, ValueError) as exc:  # StoreError is a ValueError
                log.debug("reputation refresh skipped: %s", exc)
            else:
                self.load_reputation(bad)
            await asyncio.sleep(interval)

    def known_bad(self, client_ip: str) -> bool:
        """True when ``client_ip`` is paced from connect under ``who="flagged"``."""
        return client_ip in self._known_bad

    def stats(self) -> dict[str, float]:
        """The cost counters of this process (see :data:`COUNTERS`) and the asymmetry.

        ``cpu_seconds``: this process's CPU time since the tarpit was made;
        ``held_per_cpu_second``: sender-seconds held per second of our CPU;
        ``segments_per_message``: TCP segments received per accepted message (0 when
        segments are not measured, see :attr:`measures`);
        ``tarpitted_now``: paced sessions open; ``known_bad``: addresses paced on connect.
        """
        out = dict(self._counters)
        cpu = time.process_time() - self._cpu_start
        out["cpu_seconds"] = cpu
        out["uptime_seconds"] = self._clock() - self._started
        out["held_per_cpu_second"] = out["held_seconds"] / cpu if cpu > 0 else 0.0
        out["segments_per_message"] = (out["segments_in"] / out["messages"]
                                       if out["messages"] else 0.0)
        out["tarpitted_now"] = self.tarpitted
        out["known_bad"] = len(self._known_bad)
        return out
