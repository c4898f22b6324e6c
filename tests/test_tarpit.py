"""Pacing policy: presets, jitter, caps, who is paced, budgets, reputation, counters.

A seeded RNG and a fake clock make every decision reproducible.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import replace
from pathlib import Path

import pytest

from sink.record import Flag, SessionRecord
from sink.store import open_writer
from sink.tarpit import (
    PRESETS,
    RFC5321_TIMEOUTS,
    TIMEOUT_MARGIN,
    Pacer,
    Pacing,
    Policy,
    Stage,
    Tarpit,
    pacing_from_options,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(ip: str = "192.0.2.1", **fields: object) -> SessionRecord:
    rec = SessionRecord(start=0.0, client_ip=ip, client_port=1, local_ip="127.0.0.1",
                        local_port=25, persona="postfix", end=10.0)
    for key, value in fields.items():
        setattr(rec, key, value)
    return rec


def test_presets_and_overrides() -> None:
    assert not PRESETS["off"].active and PRESETS["off"].pregreet_wait == 0
    for name in ("polite", "spamd", "max"):
        assert PRESETS[name].active and PRESETS[name].jitter > 0, name
    assert PRESETS["spamd"].stutter_bps == 1.0
    pacing = pacing_from_options("spamd", stutter_bps=5.0, jitter=None, pregreet_wait=0.0)
    assert pacing.stutter_bps == 5.0 and pacing.jitter == PRESETS["spamd"].jitter
    assert pacing.pregreet_wait == 0.0
    with pytest.raises(ValueError, match=r"unknown tarpit preset 'slow'.*off, polite"):
        pacing_from_options("slow")
    with pytest.raises(ValueError, match="choose one of: flagged, all"):
        Policy(who="some")


def test_jitter_spreads_delays_within_bounds() -> None:
    pacer = Pacer(Pacing(command_delay=10.0, jitter=0.3), random.Random(1))
    delays = [pacer.pace(Stage.COMMAND, 0.0, 14)[0] for _ in range(2000)]
    assert 7.0 <= min(delays) < 7.2 and 12.8 < max(delays) <= 13.0
    assert len({round(d, 6) for d in delays}) > 1900  # no fixed timing to detect


def test_stage_delays_and_stutter() -> None:
    pacer = Pacer(Pacing(greeting_delay=3, command_delay=2, data_delay=5, stutter_bps=4),
                  random.Random(2))
    assert pacer.pace(Stage.GREETING, 0, 40) == (3, 0.25)
    assert pacer.pace(Stage.COMMAND, 0, 40) == (2, 0.25)
    assert pacer.pace(Stage.DATA_INIT, 0, 40) == (2, 0.25)
    assert pacer.pace(Stage.END_OF_DATA, 0, 40) == (5, 0.25)
    assert pacer.pace(Stage.COMMAND, 0, 1) == (2, 0.0)  # one byte: nothing to stutter


def test_each_reply_stays_under_its_rfc5321_timeout() -> None:
    pacer = Pacer(Pacing(greeting_delay=1000, command_delay=1000, data_delay=1000,
                         stutter_bps=1.0), random.Random(3), hold_cap=10_000)
    for stage, timeout in RFC5321_TIMEOUTS.items():
        delay, interval = pacer.pace(stage, 0.0, 200)
        assert delay == timeout * TIMEOUT_MARGIN
        assert interval == 0.0  # no time left for stuttering
    # A long reply is stuttered faster so that the whole of it fits.
    pacer = Pacer(Pacing(stutter_bps=1.0), random.Random(3), hold_cap=10_000)
    delay, interval = pacer.pace(Stage.DATA_INIT, 0.0, 201)
    assert delay == 0 and interval * 200 == pytest.approx(120 * TIMEOUT_MARGIN)


def test_hold_cap_per_session() -> None:
    pacer = Pacer(Pacing(command_delay=20, stutter_bps=1.0), random.Random(4), hold_cap=60)
    assert pacer.pace(Stage.COMMAND, 0.0, 14) == (20, 1.0)
    delay, interval = pacer.pace(Stage.COMMAND, 50.0, 11)
    assert delay == 10 and interval == 0.0
    assert pacer.pace(Stage.COMMAND, 60.0, 14) == (0.0, 0.0)
    assert pacer.pace(Stage.COMMAND, 75.0, 14) == (0.0, 0.0)


def test_realism_first_unflagged_first_timers_are_not_paced() -> None:
    tarpit = Tarpit(PRESETS["max"], Policy(who="flagged"), rng=random.Random(5))
    assert tarpit.pacer_for("192.0.2.1") is None
    assert tarpit.escalates
    pacer = tarpit.escalate()
    assert pacer is not None and tarpit.tarpitted == 1
    all_tarpit = Tarpit(PRESETS["max"], Policy(who="all"), rng=random.Random(5))
    assert all_tarpit.pacer_for("192.0.2.1") is not None
    assert not all_tarpit.escalates  # already paced from connect
    assert Tarpit(PRESETS["off"], Policy(who="all")).pacer_for("192.0.2.1") is None
    assert not Tarpit(PRESETS["off"]).escalates


def test_budget_caps_concurrent_tarpitting_and_is_given_back() -> None:
    tarpit = Tarpit(PRESETS["spamd"], Policy(who="all", max_tarpitted=2))
    first, second, third = (tarpit.pacer_for(f"192.0.2.{i}") for i in (1, 2, 3))
    assert first is not None and second is not None and third is None
    assert tarpit.stats()["budget_refusals"] == 1
    tarpit.closed(record(flags=int(Flag.TARPITTED)), None)
    assert tarpit.tarpitted == 1
    assert tarpit.pacer_for("192.0.2.4") is not None
    tarpit.closed(record(flags=0), None)  # an unpaced session gives nothing back
    assert tarpit.tarpitted == 2


def test_reputation_from_flags_and_repeat_visits() -> None:
    tarpit = Tarpit(PRESETS["spamd"], Policy(known_bad_sessions=3, remember=3))
    tarpit.observe(record("192.0.2.1", flags=int(Flag.PREGREET)))
    assert tarpit.pacer_for("192.0.2.1") is not None  # a bot last time: paced on connect
    tarpit.observe(record("192.0.2.2", flags=int(Flag.TARPITTED)))  # not a bot signal
    tarpit.observe(record("192.0.2.2"))
    assert tarpit.pacer_for("192.0.2.2") is None
    tarpit.observe(record("192.0.2.2"))
    assert tarpit.known_bad("192.0.2.2")  # third visit
    for ip in ("198.51.100.1", "198.51.100.2", "198.51.100.3"):
        tarpit.observe(record(ip))
    assert not tarpit.known_bad("192.0.2.1") and not tarpit.known_bad("192.0.2.2")  # forgotten
    tarpit.load_reputation(["203.0.113.9"])
    assert tarpit.known_bad("203.0.113.9")


def test_pregreet_wait_is_jittered_and_capped() -> None:
    tarpit = Tarpit(Pacing(pregreet_wait=6.0, jitter=0.5), rng=random.Random(6))
    waits = [tarpit.pregreet_wait() for _ in range(500)]
    assert 3.0 <= min(waits) < 3.2 and 8.8 < max(waits) <= 9.0
    assert Tarpit(Pacing()).pregreet_wait() == 0.0
    assert Tarpit(Pacing(pregreet_wait=900)).pregreet_wait() == 300 * TIMEOUT_MARGIN


def test_cost_counters_and_asymmetry() -> None:
    clock = FakeClock()
    tarpit = Tarpit(PRESETS["spamd"], clock=clock)
    clock.now += 60
    tarpit.observe(record(held=120.5, messages=2, segments_in=30, bytes=4000,
                          flags=int(Flag.TARPITTED | Flag.GREYLISTED)))
    tarpit.observe(record(held=0.0, messages=0, segments_in=6, bytes=50,
                          flags=int(Flag.GREYLIST_RETRY)))
    stats = tarpit.stats()
    assert stats["sessions"] == 2 and stats["messages"] == 2
    assert stats["held_seconds"] == 120.5 and stats["session_seconds"] == 20.0
    assert stats["segments_per_message"] == 18.0
    assert stats["greylist_deferrals"] == 1 and stats["greylist_retries"] == 1
    assert stats["uptime_seconds"] == 60
    assert stats["cpu_seconds"] > 0
    assert stats["held_per_cpu_second"] == pytest.approx(120.5 / stats["cpu_seconds"], rel=0.05)


def test_known_bad_senders_are_loaded_from_the_store(tmp_path: Path) -> None:
    now = time.time()
    writer = open_writer(tmp_path)
    writer.write([
        record("203.0.113.5", start=now - 5, end=now, flags=int(Flag.PIPELINING_UNASKED)),
        record("203.0.113.6", start=now - 5, end=now, messages=1),
        record("203.0.113.7", start=now - 5, end=now, messages=500),
    ])
    writer.close()
    tarpit = Tarpit(PRESETS["spamd"])

    async def first_refresh() -> None:
        task = asyncio.ensure_future(tarpit.refresh_from_store(tmp_path, interval=3600))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if tarpit.stats()["known_bad"]:
                break
        task.cancel()

    asyncio.run(first_refresh())
    assert tarpit.known_bad("203.0.113.5")  # a bot flag
    assert tarpit.known_bad("203.0.113.7")  # volume
    assert not tarpit.known_bad("203.0.113.6")
    assert tarpit.pacer_for("203.0.113.5") is not None


def test_write_budget_is_for_the_whole_sink_shared_among_workers() -> None:
    from sink.cli import _settings, build_parser

    def budget(*options: str) -> float:
        argv = ["serve", "--smtp", "127.0.0.1:2525", *options]
        return _settings(build_parser().parse_args(argv), argv[1:]).policy.write_budget

    assert budget() == 5_000
    assert budget("--write-budget", "900", "--workers", "3") == 300
    assert budget("--write-budget", "0", "--workers", "4") == 0  # no limit stays no limit


def test_segments_are_measured_when_any_tarpit_feature_is_on_or_asked_for() -> None:
    from sink.greylist import Greylist
    from sink.sockopts import SocketCosts

    assert not Tarpit(PRESETS["off"]).measures  # a plain sink skips the TCP_INFO read
    assert Tarpit(PRESETS["off"], Policy(tcp_info=True)).measures
    assert Tarpit(PRESETS["spamd"]).measures
    assert Tarpit(replace(PRESETS["off"], pregreet_wait=6.0)).measures
    assert Tarpit(PRESETS["off"], costs=SocketCosts(mss=536)).measures
    assert Tarpit(PRESETS["off"], greylist=Greylist(300.0)).measures
