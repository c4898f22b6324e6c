"""The tarpit end to end: the real ``spamsink serve`` on loopback, real clients, real kernel.

What each session cost the sender is read back from the store the sink wrote
(``--data``/spamsink.sqlite) after it stopped.
"""

from __future__ import annotations

import os
import smtplib
import socket
import subprocess
import time
from pathlib import Path

import pytest

from sink.record import Flag
from sink.sockopts import tcp_info
from sink.store import SessionFilter, open_reader
from tests.support import SinkProcess, free_port, need_root, spamsink_command

BANNER = b"220 mx.example.com ESMTP Postfix (Debian/GNU)\r\n"
MESSAGE = b"Subject: test\r\n\r\n" + b"spam " * 4000 + b"\r\n"  # 20 KB


def stored_sessions(sink: SinkProcess) -> dict[int, dict[str, object]]:
    """The sessions the stopped sink recorded, by client port."""
    sink.stop()
    rows = open_reader(sink.data).sessions(SessionFilter(), limit=100_000)
    return {row["client_port"]: row for row in rows}


def send_message(host: str, port: int) -> tuple[float, int, int, int]:
    """One 20 KB message as a well-behaved client: (seconds, snd_mss, retrans, data segs)."""
    started = time.monotonic()
    with smtplib.SMTP(host, port, timeout=60) as smtp:
        smtp.ehlo("client.example")
        smtp.sendmail("a@b.example", ["u@example.org"], MESSAGE)
        info = tcp_info(smtp.sock)
    assert info is not None
    return time.monotonic() - started, info.snd_mss, info.total_retrans, info.data_segs_out


def test_stuttered_greeting_arrives_at_the_configured_rate(tmp_path: Path) -> None:
    args = ["--tarpit", "spamd", "--tarpit-who", "all", "--stutter", "40", "--jitter", "0.2",
            "--pregreet-wait", "0"]
    with SinkProcess(tmp_path / "data", args) as sink, \
            socket.create_connection((sink.host, sink.port), timeout=10) as client:
        received, reads = b"", 0
        first = None
        while not received.endswith(b"\r\n"):
            chunk = client.recv(100)
            assert chunk, received
            first = first or time.monotonic()
            received += chunk
            reads += 1
        elapsed = time.monotonic() - first
    assert received == BANNER
    assert reads >= 40  # byte by byte, not one write
    nominal = (len(BANNER) - 1) / 40  # 1.15 s; each reply's rate is jittered by +-20 %
    assert nominal * 0.8 - 0.05 < elapsed < nominal * 1.2 + 0.6, elapsed  # late timers: slack


def test_early_talker_is_tarpitted_while_a_postfix_like_client_is_not(tmp_path: Path) -> None:
    args = ["--tarpit", "spamd", "--pregreet-wait", "0.5", "--stutter", "50"]
    sink = SinkProcess(tmp_path / "data", args).start()
    try:
        with smtplib.SMTP(sink.host, sink.port, timeout=30) as smtp:
            good_port = smtp.sock.getsockname()[1]
            started = time.monotonic()
            smtp.ehlo("client.example")
            ehlo_time = time.monotonic() - started
            smtp.sendmail("a@b.example", ["u@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
        with socket.create_connection((sink.host, sink.port), timeout=30) as bot:
            bot_port = bot.getsockname()[1]
            teaser = bot.recv(100)
            bot.sendall(b"EHLO bot.example\r\n")  # before the real banner
            received = b""
            while BANNER not in received:
                received += bot.recv(100)
            started = time.monotonic()
            while len(received) < len(teaser) + len(BANNER) + 40:
                received += bot.recv(100)
            bot_time = time.monotonic() - started
    finally:
        sessions = stored_sessions(sink)
    assert teaser == b"220-mx.example.com ESMTP Postfix (Debian/GNU)\r\n"
    assert ehlo_time < 0.3  # Postfix's timing for the well-behaved first-timer
    assert bot_time > 0.5  # 40 bytes at 50 bytes/s
    assert sessions[good_port]["flags"] == 0
    bot_flags = sessions[bot_port]["flags"]
    assert bot_flags & Flag.PREGREET and bot_flags & Flag.TARPITTED
    assert sessions[bot_port]["held"] > 1.0
    assert sessions[good_port]["segments_in"] >= 6


def test_budget_holds_when_twice_the_cap_connect(tmp_path: Path) -> None:
    args = ["--tarpit", "spamd", "--tarpit-who", "all", "--max-tarpitted", "4",
            "--stutter", "2", "--pregreet-wait", "0"]
    with SinkProcess(tmp_path / "data", args) as sink:
        time.sleep(0.3)  # the start-up probe's session has closed
        clients = [socket.create_connection((sink.host, sink.port), timeout=5) for _ in range(8)]
        time.sleep(1.0)
        got = []
        for client in clients:
            client.setblocking(False)
            try:
                got.append(client.recv(200))
            except BlockingIOError:
                got.append(b"")
            client.close()
    full = [g for g in got if g == BANNER]
    stuttering = [g for g in got if len(g) <= 4]
    assert len(full) == 4 and len(stuttering) == 4, got


def test_write_budget_bounds_stuttered_bytes_per_second(tmp_path: Path) -> None:
    """Ten clients on two listeners that would get 20 bytes/s each share 40 writes/s."""
    other = free_port()
    args = ["--tarpit", "spamd", "--tarpit-who", "all", "--stutter", "20", "--jitter", "0",
            "--pregreet-wait", "0", "--write-budget", "40", "--smtp", f"127.0.0.1:{other}"]
    with SinkProcess(tmp_path / "data", args) as sink:
        time.sleep(0.3)  # the start-up probe's session has closed
        clients = [socket.create_connection((sink.host, port), timeout=5)
                   for port in (sink.port, other) for _ in range(5)]
        window = 2.0
        time.sleep(window)
        received = []
        for client in clients:
            client.setblocking(False)
            try:
                received.append(len(client.recv(200)))
            except BlockingIOError:
                received.append(0)
            client.close()
    total = sum(received)
    # Unbudgeted this would be ~400 bytes; the budget allows 40/s plus a 4-write burst.
    assert 40 <= total <= 40 * (window + 0.5) + 4, received
    assert min(received) >= 2, f"a client was starved: {received}"  # everyone waits its turn


def test_an_honest_greeting_is_not_queued_behind_stuttering_bots(tmp_path: Path) -> None:
    """Bots flagged for talking early stutter within a tiny budget; the banner of a
    client that waits still comes when the teaser's wait is over."""
    args = ["--tarpit", "spamd", "--stutter", "20", "--jitter", "0", "--pregreet-wait", "0.3",
            "--write-budget", "5"]
    with SinkProcess(tmp_path / "data", args) as sink:
        time.sleep(0.5)  # the start-up probe's session has closed
        bots = [socket.create_connection((sink.host, sink.port), timeout=5) for _ in range(10)]
        for bot in bots:
            bot.sendall(b"EHLO bot.example\r\n")  # before the banner: flagged, tarpitted
        time.sleep(1.0)  # their EHLO replies now stutter, far over the budget
        with socket.create_connection((sink.host, sink.port), timeout=5) as honest:
            started = time.monotonic()
            received = b""
            while BANNER not in received:
                chunk = honest.recv(200)
                assert chunk, received
                received += chunk
            waited = time.monotonic() - started
        for bot in bots:
            bot.close()
    assert 0.25 < waited < 0.8, waited  # the teaser's wait, not the bots' backlog


def test_segments_recorded_with_tcp_info_and_skipped_by_a_plain_sink(tmp_path: Path) -> None:
    ports = {}
    for name, args in (("plain", []), ("tcp-info", ["--tcp-info"])):
        sink = SinkProcess(tmp_path / name, args).start()
        try:
            with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
                ports[name] = smtp.sock.getsockname()[1]
                smtp.sendmail("a@b.example", ["u@example.org"], b"Subject: hi\r\n\r\nhello\r\n")
        finally:
            ports[name] = stored_sessions(sink)[ports[name]]["segments_in"]
    assert ports["plain"] == 0  # not measured: the read costs ~10 us per connection
    assert ports["tcp-info"] >= 6  # EHLO, MAIL, RCPT, DATA, text, QUIT at least


def test_small_mss_makes_the_client_send_small_segments(tmp_path: Path) -> None:
    with SinkProcess(tmp_path / "data", ["--mss", "88"]) as sink:
        _, snd_mss, _, data_segs = send_message(sink.host, sink.port)
    assert snd_mss <= 88
    assert data_segs > len(MESSAGE) // 88


@pytest.mark.slow
def test_drop_rate_makes_a_message_take_far_longer(tmp_path: Path) -> None:
    need_root()

    def run(args: list[str], name: str) -> tuple[float, int]:
        with SinkProcess(tmp_path / name, args) as sink:
            results = [send_message(sink.host, sink.port) for _ in range(5)]
        return sum(r[0] for r in results), sum(r[2] for r in results)

    plain_time, plain_retrans = run([], "plain")
    drop_time, drop_retrans = run(["--drop-rate", "0.2", "--socket-costs-for", "all"], "drop")
    assert plain_retrans == 0
    assert drop_retrans >= 1
    assert drop_time > 10 * plain_time and drop_time > 0.2, (plain_time, drop_time)


def test_drop_rate_without_privilege_names_it(tmp_path: Path) -> None:
    need_root()  # to become an unprivileged user
    data = tmp_path / "data"
    data.mkdir()
    os.chmod(tmp_path, 0o777)
    os.chmod(data, 0o777)
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *spamsink_command(),
         "serve", "--smtp", "127.0.0.1:0", "--data", str(data), "--api", "off",
         "--drop-rate", "0.2"],
        capture_output=True, text=True, timeout=30)
    if "Permission denied" in proc.stderr and "python" in proc.stderr.lower():
        pytest.skip("the unprivileged user cannot run this Python")
    assert proc.returncode == 2, proc.stderr
    assert "root or CAP_NET_ADMIN" in proc.stderr and "--drop-rate" in proc.stderr


def test_greylisting_defers_first_timers_and_records_retries(tmp_path: Path) -> None:
    sink = SinkProcess(tmp_path / "data", ["--greylist", "--greylist-delay", "1"]).start()
    ports, replies = [], []
    try:
        for pause in (0.0, 0.0, 1.2):
            time.sleep(pause)
            with smtplib.SMTP(sink.host, sink.port, timeout=10) as smtp:
                ports.append(smtp.sock.getsockname()[1])
                smtp.ehlo("mta.example")
                smtp.mail("a@b.example")
                replies.append(smtp.rcpt("u@example.org"))
    finally:
        sessions = stored_sessions(sink)
    assert replies[0] == (450, b"4.2.0 <u@example.org>: Recipient address rejected: "
                               b"Greylisted, see http://postgrey.schweikert.ch/help/example.org.html")
    assert replies[1][0] == 450 and replies[2] == (250, b"2.1.5 Ok")
    flags = [sessions[port]["flags"] for port in ports]
    assert flags[0] == Flag.GREYLISTED
    assert flags[1] == Flag.GREYLISTED | Flag.GREYLIST_RETRY  # back too early
    assert flags[2] == Flag.GREYLIST_RETRY  # came back and passed, as real MTAs do
