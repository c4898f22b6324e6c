"""Latency histograms and counters of ``spamsink send``: accuracy and merging."""

from __future__ import annotations

import math
import random

import pytest

from sink.send_stats import (
    DOT,
    MAIL,
    STAGES,
    Histogram,
    Stats,
    _first_micro,
    _index,
    bucket_end,
)


def exact_percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * p // 100))
    return ordered[int(rank) - 1]


@pytest.mark.parametrize("p", [50, 90, 99, 100])
def test_percentiles_are_within_the_stated_error(p: float) -> None:
    rng = random.Random(7)
    values = [rng.lognormvariate(-7, 1.5) for _ in range(20_000)]  # ~1 ms, long tail
    hist = Histogram()
    for v in values:
        hist.add(v)
    exact = exact_percentile(values, p)
    assert hist.percentile(p) == pytest.approx(exact, rel=1 / 64, abs=1e-6)
    assert hist.max == max(values)
    assert hist.count == len(values)
    assert hist.mean == pytest.approx(sum(values) / len(values))


def test_small_values_are_exact_microseconds_and_empty_is_zero() -> None:
    hist = Histogram()
    assert hist.percentile(50) == 0.0
    for us in (3, 5, 7):
        hist.add(us / 1e6)
    assert hist.percentile(50) == pytest.approx(5e-6)
    assert hist.percentile(1) == pytest.approx(3e-6)


def test_huge_values_are_clamped_not_lost() -> None:
    hist = Histogram()
    hist.add(10 ** 7)  # four months
    assert hist.count == 1 and hist.max == 10 ** 7
    assert hist.percentile(99) <= hist.max


def test_each_bucket_ends_where_the_next_one_starts() -> None:
    for index in range(2047):
        first = _first_micro(index + 1)
        assert _index(first) == index + 1 and _index(first - 1) == index
        end = bucket_end(index)
        assert _index(int(end * 1_000_000)) == index + 1
        assert _index(int(math.nextafter(end, 0) * 1_000_000)) == index
    assert bucket_end(2047) == math.inf


def test_a_fold_counts_each_sample_in_its_bucket() -> None:
    """Sorting and counting runs of a bucket gives what bucketing each sample gives,
    for samples on and next to every bucket edge, negative and huge ones."""
    rng = random.Random(3)
    values = [rng.lognormvariate(-8, 3) for _ in range(5000)] + [-0.001, 0.0, 1e9, 1e12]
    for index in range(1, 400, 3):
        edge = _first_micro(index) / 1_000_000
        values += [edge, math.nextafter(edge, 0), math.nextafter(edge, 1)]
    expected = [0] * 2048
    for v in values:
        expected[_index(int(v * 1_000_000))] += 1
    hist = Histogram()
    for chunk in (values[:1000], values[1000:]):  # two folds add up
        hist.pending.extend(chunk)
        hist.fold()
    assert hist.counts == expected
    assert hist.count == len(values) and hist.max == max(values)


def test_merge_equals_recording_everything_in_one() -> None:
    rng = random.Random(1)
    a, b, both = Histogram(), Histogram(), Histogram()
    for i in range(5000):
        v = rng.expovariate(1000)
        (a if i % 2 else b).add(v)
        both.add(v)
    a.merge(Histogram.from_dict(b.to_dict()))
    assert a.counts == both.counts and a.count == both.count and a.max == both.max
    assert a.total == pytest.approx(both.total)


def test_stats_round_trip_and_merge() -> None:
    one, two = Stats(), Stats()
    one.sent, two.sent = 3, 4
    one.fail(MAIL, "4xx")
    two.fail(MAIL, "4xx")
    two.fail(DOT, "timeout")
    one.latency[MAIL].add(0.001)
    two.used("PIPELINING")
    one.started, one.finished, two.started, two.finished = 10.0, 12.0, 9.5, 11.0
    one.merge(Stats.from_dict(two.to_dict()))
    assert one.sent == 7 and one.failed == 3
    assert one.failures == {"mail 4xx": 2, "dot timeout": 1}
    assert one.extensions == {"PIPELINING": 1}
    assert one.elapsed == pytest.approx(2.5)
    assert len(one.latency) == len(STAGES)


def test_recorded_samples_are_buffered_until_read() -> None:
    hist = Histogram()
    for v in (0.001, 0.002, -0.5):
        hist.pending.append(v)  # the hot path's way of recording
    assert len(hist.pending) == 3
    assert hist.count == 3 and hist.max == 0.002  # reading folds the buffer
    assert len(hist.pending) == 0
    assert hist.percentile(1) == 0.0  # a negative duration counts as zero
    hist.add(0.004)
    assert hist.percentile(100) == pytest.approx(0.004, rel=1 / 64)


def test_stats_carry_buffered_samples_to_other_processes() -> None:
    stats = Stats()
    stats.latency[DOT].add(0.002)
    stats.delivery.add(0.003)
    copy = Stats.from_dict(stats.to_dict())
    assert copy.latency[DOT].count == 1 and copy.delivery.max == 0.003
