"""The NFQUEUE consumer: one verdict per queued segment, delays on a timer heap.

One thread does everything on the packet path: it reads the queue's netlink socket
through ``netfilterqueue``, reads header fields with :func:`netdrop.packet.parse`, asks
the :class:`~netdrop.policy.Policy`, and gives the verdict at once (pass, drop) or
later (delay: the packet is kept on a heap of ``(due, seq, packet)`` and accepted when
due). At most ``max_held`` packets are held; beyond that a DELAY verdict is counted as
overflow and the packet passes. Held packets still count in the kernel's queue
length, so ``queue_maxlen`` must exceed ``max_held``.

The kernel queue is set to *fail open* (``NFQA_CFG_F_FAIL_OPEN``, sent here over the
binding's own netlink socket): when the queue is full or netdrop cannot keep up,
packets pass instead of being dropped. Once a second the consumer flushes per-sender
counters (:mod:`netdrop.accounting`).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from netfilterqueue import COPY_PACKET, NetfilterQueue

from netdrop.accounting import Ledger, SqliteWriter
from netdrop.packet import parse
from netdrop.policy import DELAY, DROP, Policy

log = logging.getLogger("netdrop")

# How often an idle consumer wakes up to release held packets and flush counters.
IDLE_WAKE_DELAYS = 0.002
IDLE_WAKE = 0.25

# Enough for an IPv6 header with a few extension headers and a full TCP header.
COPY_RANGE = 160

_NETLINK_NETFILTER = 12
_NFQNL_MSG_CONFIG = (3 << 8) | 2  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_CONFIG
_NLM_F_REQUEST, _NLM_F_ACK = 1, 4
_NFQA_CFG_MASK, _NFQA_CFG_FLAGS = 4, 5
_NFQA_CFG_F_FAIL_OPEN = 1


class QueueError(Exception):
    """The queue could not be bound or configured (one-line message)."""


def set_fail_open(sock: socket.socket, queue_num: int, enabled: bool = True) -> None:
    """Set or clear NFQA_CFG_F_FAIL_OPEN on the queue bound through netlink socket ``sock``."""
    value = _NFQA_CFG_F_FAIL_OPEN if enabled else 0
    attrs = (struct.pack("=HH", 8, _NFQA_CFG_MASK) + struct.pack("!I", _NFQA_CFG_F_FAIL_OPEN)
             + struct.pack("=HH", 8, _NFQA_CFG_FLAGS) + struct.pack("!I", value))
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(queue_num)) + attrs
    seq = int(time.time()) & 0x7FFFFFFF
    msg = struct.pack("=IHHII", 16 + len(body), _NFQNL_MSG_CONFIG,
                      _NLM_F_REQUEST | _NLM_F_ACK, seq, 0) + body
    try:
        sock.settimeout(2.0)
        sock.send(msg)
        while True:
            reply = sock.recv(8192)
            _length, kind, _, rseq, _ = struct.unpack_from("=IHHII", reply)
            if kind == 2 and rseq == seq:  # NLMSG_ERROR carries the ack
                code = -struct.unpack_from("=i", reply, 16)[0]
                if code:
                    raise QueueError(f"cannot set fail-open on queue {queue_num}: "
                                     f"{errno.errorcode.get(code, code)}")
                return
    except TimeoutError:
        raise QueueError(f"no answer setting fail-open on queue {queue_num}") from None
    finally:
        sock.setblocking(True)


@dataclass
class QueueConfig:
    queue_num: int = 0
    queue_maxlen: int = 4096
    max_held: int = 1024
    fail_open: bool = True
    flush_interval: float = 1.0


class Totals:
    """Process-wide counters (read by the metrics collector; plain ints, no locks)."""

    __slots__ = ("delayed", "dropped", "held", "other", "overflow", "passed", "seen")

    def __init__(self) -> None:
        self.seen = self.passed = self.dropped = self.delayed = 0
        self.overflow = self.other = self.held = 0


class Consumer:
    """Binds ``config.queue_num`` and gives verdicts until :meth:`run` is interrupted."""

    def __init__(self, policy: Policy, config: QueueConfig, ledger: Ledger,
                 writer: SqliteWriter | None = None) -> None:
        self.policy = policy
        self.config = config
        self.ledger = ledger
        self.writer = writer
        self.totals = Totals()
        self._heap: list[tuple[float, int, object]] = []
        self._seq = itertools.count()
        self._nfq: NetfilterQueue | None = None
        self._sock: socket.socket | None = None
        self._next_flush = self._due = 0.0

    def bind(self) -> None:
        """Bind the queue (before the rules exist, so no packet waits on us unbound)."""
        nfq = NetfilterQueue()
        try:
            nfq.bind(self.config.queue_num, self._callback(), max_len=self.config.queue_maxlen,
                     mode=COPY_PACKET, range=COPY_RANGE)
        except OSError as exc:
            raise QueueError(f"cannot bind NFQUEUE {self.config.queue_num}: {exc} "
                             "(another netdrop on this queue? try --queue-num)") from None
        self._nfq = nfq
        self._sock = socket.fromfd(nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW,
                                   _NETLINK_NETFILTER)
        set_fail_open(self._sock, self.config.queue_num, self.config.fail_open)

    def _callback(self) -> Callable[[Any], None]:
        """The per-packet function: a closure over everything it touches (no lookups)."""
        totals, heap, policy, ledger = self.totals, self._heap, self.policy, self.ledger
        senders, dirty, new_sender, decide = ledger.senders, ledger.dirty, ledger.sender, \
            policy.decide
        max_held, seq, monotonic, push, tick = self.config.max_held, self._seq, \
            time.monotonic, heapq.heappush, self._tick

        def on_packet(pkt: Any) -> None:
            totals.seen += 1
            fields = parse(pkt.get_payload())
            if fields is None:
                totals.other += 1
                pkt.accept()
                return
            sender = senders.get(fields[0]) or new_sender(fields[0])
            if not sender.dirty:
                sender.dirty = True
                dirty.append(sender)
            sender.seen += 1
            verdict = decide(fields[2], fields[3], sender)
            now = monotonic()
            if verdict == DROP:
                pkt.drop()
                totals.dropped += 1
                sender.dropped += 1
            elif verdict == DELAY and totals.held < max_held:
                due = now + policy.delay()
                push(heap, (due, next(seq), pkt))
                totals.held += 1
                totals.delayed += 1
                sender.delayed += 1
                if due < self._due:
                    self._due = due
            else:
                if verdict == DELAY:
                    totals.overflow += 1
                pkt.accept()
                totals.passed += 1
                sender.passed += 1
            if now >= self._due:
                tick(now)

        return on_packet

    def _tick(self, now: float) -> None:
        """Release the held packets that are due; flush the counters when it is time."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            heapq.heappop(heap)[2].accept()
            self.totals.held -= 1
        if now >= self._next_flush:
            self._next_flush = now + self.config.flush_interval
            self.flush()
        self._due = min(self._next_flush, heap[0][0]) if heap else self._next_flush

    def flush(self) -> None:
        """Hand the per-sender counters that moved to the writer."""
        rows = self.ledger.take()
        if self.writer is not None:
            self.writer.put(rows)

    def run(self) -> None:
        """Serve the queue until an exception (e.g. from a signal handler) stops it.

        The queue's socket gets a receive timeout (``SO_RCVTIMEO``), so the blocking
        receive loop of ``netfilterqueue`` returns when the queue is idle; under load the
        packet callback itself releases due packets and flushes.
        """
        assert self._nfq is not None and self._sock is not None, "bind() first"
        wake = IDLE_WAKE_DELAYS if self.policy.delay_rate else IDLE_WAKE
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                              struct.pack("@ll", 0, int(wake * 1e6)))
        self._next_flush = self._due = time.monotonic() + self.config.flush_interval
        nfq = self._nfq
        while True:
            nfq.run(block=True)
            self._tick(time.monotonic())

    def close(self) -> None:
        """Pass every held packet, unbind, and flush the counters (idempotent)."""
        if self._nfq is not None:
            with contextlib.suppress(RuntimeError):
                while self._heap:
                    heapq.heappop(self._heap)[2].accept()  # type: ignore[attr-defined]
            self.totals.held = 0
            self._nfq.unbind()
            self._nfq = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.flush()
