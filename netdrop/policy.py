"""Which segments netdrop touches, and what it does to them.

A segment is *eligible* by its kind: data segments (TCP payload > 0) by default, SYNs
with ``syn=True``, FINs with ``fin=True``, RSTs never, pure ACKs never. Its sender is
*targeted* unless allowlisted, and, with ``only_flagged``, only when it is in the
current flagged set. An eligible segment of a targeted sender is dropped with
probability ``rate``; otherwise held for ``delay`` seconds with probability
``delay_rate``; otherwise passed.

The flagged set is replaced (never mutated) by :meth:`Policy.set_flagged`, which may be
called from another thread; senders cache whether they are targeted and recompute it
when the set's generation changes.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Iterable
from dataclasses import dataclass, field

from netdrop.accounting import Sender
from netdrop.packet import FIN, RST, SYN

PASS = 0
DROP = 1
DELAY = 2

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class PolicyConfig:
    """The user's choices; validated by the CLI."""

    rate: float = 0.0
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    delay_rate: float = 0.0
    syn: bool = False
    fin: bool = False
    only_flagged: bool = False
    allow: tuple[Network, ...] = field(default_factory=tuple)


class Policy:
    """Per-packet decisions for one :class:`PolicyConfig`."""

    def __init__(self, config: PolicyConfig, rng: random.Random | None = None) -> None:
        self.config = config
        self.rate = config.rate
        self.delay_rate = config.delay_rate if config.delay_ms > 0 or config.jitter_ms > 0 else 0.0
        self.syn = config.syn
        self.fin = config.fin
        self.only_flagged = config.only_flagged
        self._allow4 = tuple(n for n in config.allow if n.version == 4)
        self._allow6 = tuple(n for n in config.allow if n.version == 6)
        self._random = (rng or random.Random()).random
        self._base = config.delay_ms / 1000.0
        self._jitter = config.jitter_ms / 1000.0
        self.flagged: frozenset[bytes] = frozenset()
        self.generation = 1

    def set_flagged(self, addresses: Iterable[bytes]) -> None:
        """Replace the flagged set (packed 4- or 16-byte addresses)."""
        self.flagged = frozenset(addresses)
        self.generation += 1

    def allowed(self, ip: bytes) -> bool:
        """True if ``ip`` (packed) is in an allowlisted network."""
        if len(ip) == 4:
            nets: tuple[Network, ...] = self._allow4
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv4Address(ip)
        else:
            nets, addr = self._allow6, ipaddress.IPv6Address(ip)
        return any(addr in net for net in nets)

    def targets(self, sender: Sender) -> bool:
        """Whether netdrop may touch this sender's segments now (cached per generation)."""
        if sender.policy_gen != self.generation:
            sender.policy_gen = self.generation
            if sender.allowed is None:
                sender.allowed = self.allowed(sender.ip)
            sender.targeted = not sender.allowed and (
                not self.only_flagged or sender.ip in self.flagged)
        return sender.targeted

    def decide(self, flags: int, payload_len: int, sender: Sender) -> int:
        """PASS, DROP or DELAY for one segment of ``sender``."""
        if flags & RST:
            return PASS
        if flags & SYN:
            if not self.syn:
                return PASS
        elif flags & FIN:
            if not self.fin:
                return PASS
        elif payload_len <= 0:
            return PASS
        if not self.targets(sender):
            return PASS
        if self.rate and self._random() < self.rate:
            return DROP
        if self.delay_rate and self._random() < self.delay_rate:
            return DELAY
        return PASS

    def delay(self) -> float:
        """Seconds to hold a DELAY packet: the base delay plus uniform +-jitter, at least 0."""
        if not self._jitter:
            return self._base
        return max(0.0, self._base + (2.0 * self._random() - 1.0) * self._jitter)
