"""``--rate`` pacing in ``spamsink send``: an interrupt or the end of a ``-t`` run stops
messages that are still waiting for their turn (real client, scripted server)."""

from __future__ import annotations

import signal
import time

import pytest

from tests.test_send_support import FakeSMTP, interrupted_summary, run_send, send_running


def test_an_interrupt_ends_a_wait_for_the_next_rate_slot() -> None:
    """One message per connection at 0.05/s: after the first, the sender waits 20 s for
    its slot. SIGINT ends that wait at once (before: about 18 s later)."""
    with FakeSMTP() as server, send_running(
            "-n", "3", "--rate", "0.05", "-p", str(server.port)) as proc:
        deadline = time.monotonic() + 30
        while server.counts.get("QUIT", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        interrupted = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out = interrupted_summary(proc, timeout=20)
    assert time.monotonic() - interrupted < 5
    assert (out["sent"], out["not_attempted"]) == (1, 2)


@pytest.mark.parametrize(("spread", "connections"), [
    (("-s", "10"), 2), (("-m", "100"), 1)], ids=["between connections", "on a connection"])
def test_a_timed_run_starts_no_message_after_its_end(spread: tuple[str, ...],
                                                     connections: int) -> None:
    """-t 1 at 2 messages/s: turns at 0 and 0.5 s fall in the run, later ones do not.
    Ten senders waiting for turns up to 4.5 s stop at once, and a connection whose next
    turn is at 1 s QUITs instead of waiting for it (before: the run went on for 5 s and
    sent all 10, and reported the time until it stopped, not the run's second)."""
    with FakeSMTP() as server:
        began = time.monotonic()
        status, out, _ = run_send("-t", "1", *spread, "--rate", "2", "-p", str(server.port))
        wall = time.monotonic() - began
    assert status == 0
    assert out["sent"] == 2 and wall < 3.5
    assert out["seconds"] >= 0.99  # the run's second, not the half second they took
    assert out["connections"] == {"made": connections, "failed": 0,
                                  "ended": {"quit": connections}}
