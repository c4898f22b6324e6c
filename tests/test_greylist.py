"""Greylisting as postgrey does it, with a fake clock."""

from __future__ import annotations

from sink.greylist import Greylist, client_network
from sink.record import Flag

DEFER = int(Flag.GREYLISTED)
RETRY = int(Flag.GREYLIST_RETRY)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


def test_first_seen_is_deferred_until_the_delay_passed() -> None:
    clock = FakeClock()
    grey = Greylist(300, clock=clock)
    assert grey.check("192.0.2.10", "a@b.example", "u@example.org") == DEFER
    clock.now += 60
    assert grey.check("192.0.2.10", "a@b.example", "u@example.org") == DEFER | RETRY  # too early
    clock.now += 241
    assert grey.check("192.0.2.10", "a@b.example", "u@example.org") == RETRY  # passes
    clock.now += 86400
    assert grey.check("192.0.2.10", "A@B.example", "U@example.org") == 0  # known, case folded


def test_triple_and_network_keys() -> None:
    clock = FakeClock()
    grey = Greylist(1, clock=clock)
    grey.check("192.0.2.10", "a@b", "u@d")
    clock.now += 2
    assert grey.check("192.0.2.99", "a@b", "u@d") == RETRY  # same /24: a retry from a pool
    assert grey.check("198.51.100.1", "a@b", "u@d") == DEFER  # another network
    assert grey.check("192.0.2.10", "other@b", "u@d") == DEFER  # another sender
    assert grey.check("192.0.2.10", "a@b", "v@d") == DEFER  # another recipient
    assert client_network("2001:db8:1:2:3:4:5:6") == "2001:db8:1:2::"
    assert client_network("::ffff:192.0.2.77") == "192.0.2.0"
    assert client_network("not-an-ip") == "not-an-ip"


def test_memory_is_bounded_and_entries_expire() -> None:
    clock = FakeClock()
    grey = Greylist(1, max_entries=2, max_age=100, clock=clock)
    for rcpt in ("a@d", "b@d", "c@d"):
        grey.check("192.0.2.1", "s@x", rcpt)
    assert len(grey) == 2
    clock.now += 2
    assert grey.check("192.0.2.1", "s@x", "a@d") == DEFER  # the oldest was forgotten
    assert grey.check("192.0.2.1", "s@x", "c@d") == RETRY
    clock.now += 200
    assert grey.check("192.0.2.1", "s@x", "c@d") == DEFER  # older than max_age: new again
