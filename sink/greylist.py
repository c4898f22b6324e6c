"""Greylisting, as postgrey does it: defer the first (client, sender, recipient) triple.

Real MTAs queue a 4xx-deferred message and retry minutes later; most spam bots never
come back. :meth:`Greylist.check` answers one RCPT with :class:`~sink.record.Flag`
bits: ``GREYLISTED`` means "answer 450" (first seen, or back before ``delay``
passed), ``GREYLIST_RETRY`` means the triple had been deferred before (the sender
came back). A triple that passed stays passed for ``max_age`` seconds.

Client addresses are keyed by network as postgrey does (IPv4 /24, IPv6 /64), since
large senders retry from a neighbouring address. State is in memory, per process,
bounded by ``max_entries`` (the oldest triples are forgotten first).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

from sink.record import F_GREYLIST_RETRY, F_GREYLISTED


def client_network(ip: str) -> str:
    """The greylisting key of a client address: its /24 (IPv4) or /64 (IPv6)."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if address.version == 6 and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    prefix = 24 if address.version == 4 else 64
    return str(ipaddress.ip_network(f"{address}/{prefix}", strict=False).network_address)


class Greylist:
    """First-seen triples are deferred for ``delay`` seconds (postgrey: 300)."""

    __slots__ = ("_clock", "_entries", "delay", "max_age", "max_entries")

    def __init__(self, delay: float = 300.0, *, max_age: float = 35 * 86400,
                 max_entries: int = 200_000, clock: Callable[[], float] = time.time) -> None:
        self.delay = delay
        self.max_age = max_age
        self.max_entries = max_entries
        self._clock = clock
        # triple -> (first seen, deferrals so far, passed)
        self._entries: OrderedDict[tuple[str, str, str], tuple[float, int, bool]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def check(self, client_ip: str, sender: str, recipient: str) -> int:
        """Flag bits for this RCPT: ``GREYLISTED`` (defer it) and/or ``GREYLIST_RETRY``."""
        now = self._clock()
        key = (client_network(client_ip), sender.lower(), recipient.lower())
        entry = self._entries.pop(key, None)
        if entry is not None and now - entry[0] > self.max_age:
            entry = None
        if entry is None:
            self._remember(key, (now, 1, False))
            return F_GREYLISTED
        first, deferrals, passed = entry
        if passed:
            self._entries[key] = entry
            return 0
        if now - first < self.delay:
            self._entries[key] = (first, deferrals + 1, False)
            return F_GREYLISTED | F_GREYLIST_RETRY
        self._entries[key] = (first, deferrals, True)
        return F_GREYLIST_RETRY

    def _remember(self, key: tuple[str, str, str], value: tuple[float, int, bool]) -> None:
        self._entries[key] = value
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
