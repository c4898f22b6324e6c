"""``spamsink send --hold``: many patient connections, alive over time, wait per reply."""

from __future__ import annotations

from pathlib import Path

from tests.support import SinkProcess
from tests.test_send_support import FakeSMTP, run_send


def test_hold_against_a_slow_server_reports_alive_and_waits() -> None:
    with FakeSMTP(delay=0.3) as server:
        status, out, _ = run_send("--hold", "20", "-t", "2", "--hold-pause", "0.2",
                                  "-p", str(server.port))
    assert status == 0, out
    hold = out["hold"]
    assert hold["requested"] == 20 and hold["opened"] == 20
    assert hold["peak_alive"] == 20
    assert hold["alive"][-1] == 20  # nobody gave up before the end
    assert hold["ends"] == {"end of hold": 20}
    assert out["failed"] == 0
    # 6 replies of 0.3 s per message: one message each, then maybe one cut off by the end
    assert out["sent"] <= 20 and out["sent"] + out["unfinished"] >= 20
    assert out["latency_ms"]["greeting"]["p50"] >= 290  # what each reply cost in waiting
    assert out["latency_ms"]["ehlo"]["p50"] >= 290
    assert server.connections == 20


def test_hold_finds_the_servers_per_address_limit(tmp_path: Path) -> None:
    """spamsink serve admits 4 connections per client address: from two source addresses
    10 held connections become 8 alive and 2 told 421."""
    with SinkProcess(tmp_path / "data", ["--max-connections-per-ip", "4",
                                         "--log-level", "warning"]) as sink:
        status, out, _ = run_send("--hold", "10", "-t", "1.5", "--hold-pause", "0.3",
                                  "--source", "127.0.0.2-127.0.0.3", "-p", str(sink.port))
    hold = out["hold"]
    assert hold["opened"] == 10
    assert hold["alive"][-1] == 8
    assert hold["ends"] == {"end of hold": 8, "421": 2}
    assert out["failures"] == {"greeting 4xx": 2}
    assert status == 1  # the two refused messages failed
    assert out["sent"] >= 8  # the admitted ones kept sending, one message per pause
