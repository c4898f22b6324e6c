"""netdrop.policy: which segments are eligible, who is targeted, rates and delays."""

from __future__ import annotations

import ipaddress
import math
import random

import pytest

from netdrop.accounting import Sender
from netdrop.packet import ACK, FIN, PSH, RST, SYN
from netdrop.policy import DELAY, DROP, PASS, Policy, PolicyConfig

A = ipaddress.ip_address("203.0.113.7").packed
B = ipaddress.ip_address("198.51.100.9").packed
V6 = ipaddress.ip_address("2001:db8::7").packed


def policy(**kw) -> Policy:
    return Policy(PolicyConfig(**kw), random.Random(1))


def test_always_drop_touches_only_data_segments_by_default() -> None:
    p, s = policy(rate=1.0), Sender(A)
    assert p.decide(PSH | ACK, 100, s) == DROP
    assert p.decide(ACK, 0, s) == PASS  # pure ACK
    assert p.decide(SYN, 0, s) == PASS
    assert p.decide(FIN | ACK, 0, s) == PASS
    assert p.decide(RST, 0, s) == PASS
    assert p.decide(RST | ACK, 50, s) == PASS


def test_syn_and_fin_when_asked_and_rst_never() -> None:
    p, s = policy(rate=1.0, syn=True, fin=True), Sender(A)
    assert p.decide(SYN, 0, s) == DROP
    assert p.decide(FIN | ACK, 0, s) == DROP
    assert p.decide(RST, 0, s) == PASS
    assert p.decide(SYN | RST, 0, s) == PASS


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
def test_drop_fraction_follows_the_rate(rate: float) -> None:
    p, s, n = policy(rate=rate), Sender(A), 20000
    dropped = sum(p.decide(ACK, 1000, s) == DROP for _ in range(n))
    sigma = math.sqrt(rate * (1 - rate) / n)
    assert abs(dropped / n - rate) < 5 * sigma


def test_delay_rate_applies_to_segments_not_dropped() -> None:
    p, s, n = policy(rate=0.2, delay_ms=100, delay_rate=0.5), Sender(A), 20000
    verdicts = [p.decide(ACK, 10, s) for _ in range(n)]
    assert abs(verdicts.count(DROP) / n - 0.2) < 0.02
    assert abs(verdicts.count(DELAY) / n - 0.4) < 0.02


def test_delay_rate_without_a_delay_does_nothing() -> None:
    p = policy(delay_rate=1.0)
    assert p.decide(ACK, 10, Sender(A)) == PASS


def test_delay_with_jitter_stays_in_bounds_and_varies() -> None:
    p = policy(delay_ms=200, jitter_ms=50, delay_rate=1.0)
    values = [p.delay() for _ in range(2000)]
    assert min(values) >= 0.150 and max(values) <= 0.250
    assert max(values) - min(values) > 0.09
    assert policy(delay_ms=200, delay_rate=1.0).delay() == 0.2
    assert min(policy(delay_ms=10, jitter_ms=50).delay() for _ in range(200)) == 0.0


def test_allowlist_is_never_touched() -> None:
    p = policy(rate=1.0, allow=(ipaddress.ip_network("203.0.113.0/24"),
                                ipaddress.ip_network("2001:db8::/32")))
    assert p.decide(ACK, 10, Sender(A)) == PASS
    assert p.decide(ACK, 10, Sender(V6)) == PASS
    assert p.decide(ACK, 10, Sender(B)) == DROP


def test_only_flagged_follows_the_current_set() -> None:
    p = policy(rate=1.0, only_flagged=True)
    a, b = Sender(A), Sender(B)
    assert p.decide(ACK, 10, a) == PASS  # nobody flagged yet: fail open
    p.set_flagged([A])
    assert p.decide(ACK, 10, a) == DROP
    assert p.decide(ACK, 10, b) == PASS
    p.set_flagged([B])
    assert p.decide(ACK, 10, a) == PASS
    assert p.decide(ACK, 10, b) == DROP


def test_allowlist_beats_the_flagged_set() -> None:
    p = policy(rate=1.0, only_flagged=True, allow=(ipaddress.ip_network("203.0.113.7/32"),))
    p.set_flagged([A])
    assert p.decide(ACK, 10, Sender(A)) == PASS
