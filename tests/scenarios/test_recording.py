"""End to end: the real `spamsink serve` records senders that smtplib sends from
127.0.0.2, 127.0.0.3 and ::1; the API, `spamsink ips`, restarts and kill -9."""

from __future__ import annotations

import json
import signal
import smtplib
import socket
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sink.store import SessionFilter, open_reader, store_path
from tests.support import SinkProcess, spamsink_command, wait_for_port

SENDERS = {"127.0.0.2": 3, "127.0.0.3": 2, "::1": 4}


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def send(port: int, source: str, messages: int, host: str) -> None:
    """``messages`` messages in one session from ``source`` to the sink on ``host``."""
    with smtplib.SMTP(host, port, source_address=(source, 0), timeout=10) as client:
        client.ehlo(f"bot-{source.replace(':', '-')}.example")
        for i in range(messages):
            client.sendmail("spam@example.net", [f"victim{i}@example.org", "x@example.org"],
                            f"Subject: offer {i}\r\n\r\nbuy now\r\n")


def api_get(sink: SinkProcess, path: str, token: str | None = None) -> dict:
    # SMTP listens first (SinkProcess waits for it); the API follows a moment later.
    wait_for_port("127.0.0.1", sink.api_port)
    req = urllib.request.Request(f"http://127.0.0.1:{sink.api_port}{path}")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def wait_for_senders(sink: SinkProcess, expected: dict[str, int], within: float,
                     ) -> dict[str, dict]:
    """The API's view of ``expected`` senders once their message counts match."""
    deadline = time.monotonic() + within
    while True:
        items = {i["ip"]: i for i in api_get(sink, "/api/v1/ips?limit=100")["items"]}
        if all(ip in items and items[ip]["messages"] == n for ip, n in expected.items()):
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"after {within} s the API shows {items}, want {expected}")
        time.sleep(0.05)


def dual_stack_sink(tmp_path: Path, *args: str) -> SinkProcess:
    """A sink listening on 127.0.0.1 (which also takes 127.0.0.2/.3) and ::1."""
    sink = SinkProcess(tmp_path / "data", args)
    sink.command += ["--smtp", f"[::1]:{sink.port}"]
    return sink


def senders_for(sink: SinkProcess) -> dict[str, int]:
    if has_ipv6_loopback():
        return SENDERS
    return {ip: n for ip, n in SENDERS.items() if ":" not in ip}


def send_all(sink: SinkProcess, senders: dict[str, int]) -> None:
    for source, messages in senders.items():
        send(sink.port, source, messages, "::1" if ":" in source else "127.0.0.1")


@pytest.mark.parametrize("workers", [1, 2])
def test_senders_appear_with_their_counts_within_two_seconds(tmp_path: Path, workers: int):
    sink = dual_stack_sink(tmp_path, "--workers", str(workers))
    senders = senders_for(sink)
    with sink:
        wait_for_port("127.0.0.1", sink.api_port)
        started = time.monotonic()
        send_all(sink, senders)
        items = wait_for_senders(sink, senders, within=2.0)
        assert time.monotonic() - started < 2.0 + 1.0  # sending itself takes a moment
        for ip, n in senders.items():
            assert items[ip]["sessions"] == 1
            assert items[ip]["recipients"] == 2 * n
            assert items[ip]["helo"] == f"bot-{ip.replace(':', '-')}.example"
        detail = api_get(sink, "/api/v1/ips/127.0.0.2")
        assert detail["recent_sessions"][0]["end_reason"] == "quit"
        assert detail["recent_sessions"][0]["mail_from"] == ["spam@example.net"] * 3
        assert detail["local_ips"] == ["127.0.0.1"]
        # Prometheus sees the same, summed over workers, with no address in it.
        deadline = time.monotonic() + 3
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{sink.api_port}/metrics") as resp:
                metrics = resp.read().decode()
            total = sum(senders.values())
            if f"spamsink_messages_total {float(total)}" in metrics:
                break
            assert time.monotonic() < deadline, metrics
            time.sleep(0.1)
        assert "spamsink_active_connections" in metrics
        assert "127.0.0" not in metrics
        # Many sessions from one sender: with two workers the kernel spreads them over
        # both, which write the same aggregate row; none may be lost.
        for _ in range(30):
            send(sink.port, "127.0.0.3", 1, "127.0.0.1")
        wait_for_senders(sink, {"127.0.0.3": senders["127.0.0.3"] + 30}, within=2.0)
        assert api_get(sink, "/api/v1/ips/127.0.0.3")["sender"]["sessions"] == 31
    assert sink.proc is None


def test_restart_keeps_senders_and_ips_reads_the_store_while_serving(tmp_path: Path):
    sink = dual_stack_sink(tmp_path)
    with sink:
        send_all(sink, {"127.0.0.2": 2, "127.0.0.3": 1})
        wait_for_senders(sink, {"127.0.0.2": 2, "127.0.0.3": 1}, within=2.0)
        # `spamsink ips` reads the same store while the server writes it.
        out = subprocess.run([*spamsink_command(), "ips", "--data", str(sink.data),
                              "--format", "txt", "--min-messages", "2"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        assert [line for line in out.splitlines() if not line.startswith("#")] == ["127.0.0.2"]
    restarted = dual_stack_sink(tmp_path)
    with restarted:
        wait_for_port("127.0.0.1", restarted.api_port)
        send(restarted.port, "127.0.0.2", 1, "127.0.0.1")
        items = wait_for_senders(restarted, {"127.0.0.2": 3, "127.0.0.3": 1}, within=2.0)
        assert items["127.0.0.2"]["sessions"] == 2


def test_kill_9_loses_at_most_the_last_flush_interval(tmp_path: Path):
    sink = dual_stack_sink(tmp_path)
    with sink:
        for _ in range(5):
            send(sink.port, "127.0.0.2", 1, "127.0.0.1")
        time.sleep(1.5)  # longer than the recorder's flush interval (0.5 s)
        for _ in range(3):
            send(sink.port, "127.0.0.3", 1, "127.0.0.1")
        sink.stop(signal.SIGKILL)
    conn = sqlite3.connect(store_path(sink.data))
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
    counts: dict[str, int] = {}
    for item in open_reader(sink.data).sessions(SessionFilter(), limit=100):
        counts[item["client_ip"]] = counts.get(item["client_ip"], 0) + 1
    assert counts.get("127.0.0.2") == 5  # written before the last interval: never lost
    assert counts.get("127.0.0.3", 0) <= 3
    restarted = dual_stack_sink(tmp_path)
    with restarted:
        items = wait_for_senders(restarted, {"127.0.0.2": 5}, within=2.0)
        assert items["127.0.0.2"]["sessions"] == 5


def test_sigterm_flushes_every_session(tmp_path: Path):
    sink = dual_stack_sink(tmp_path)
    with sink:
        for _ in range(20):
            send(sink.port, "127.0.0.2", 1, "127.0.0.1")
        assert sink.stop() == 0  # SIGTERM right after the last session
    conn = sqlite3.connect(store_path(sink.data))
    assert conn.execute("SELECT sessions, messages FROM ips WHERE ip = '127.0.0.2'").fetchone() \
        == (20, 20)
    conn.close()


def test_token_protects_the_api_of_the_real_server(tmp_path: Path):
    token_file = tmp_path / "token"
    token_file.write_text("t0ken\n")
    sink = dual_stack_sink(tmp_path, "--api-token-file", str(token_file))
    with sink:
        wait_for_port("127.0.0.1", sink.api_port)
        with pytest.raises(urllib.error.HTTPError) as refused:
            api_get(sink, "/api/v1/ips")
        assert refused.value.code == 401
        send(sink.port, "127.0.0.2", 1, "127.0.0.1")
        deadline = time.monotonic() + 2
        while not api_get(sink, "/api/v1/ips", "t0ken")["items"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)


def test_an_exposed_api_without_token_refuses_to_start(tmp_path: Path):
    result = subprocess.run(
        [*spamsink_command(), "serve", "--smtp", "127.0.0.1:0", "--data", str(tmp_path),
         "--api", "0.0.0.0:0"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "without a token" in result.stderr and "--api-token" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_a_taken_api_port_is_one_clear_line(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        sink = SinkProcess(tmp_path / "data", ["--api", f"127.0.0.1:{port}"])
        sink.data.mkdir(parents=True)
        result = subprocess.run(sink.command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "cannot serve the API" in result.stderr and "in use" in result.stderr


def test_no_record_keeps_nothing_and_still_serves_the_api(tmp_path: Path):
    sink = dual_stack_sink(tmp_path, "--no-record")
    with sink:
        wait_for_port("127.0.0.1", sink.api_port)
        send(sink.port, "127.0.0.2", 2, "127.0.0.1")
        time.sleep(1.0)  # two flush intervals: nothing may appear
        assert api_get(sink, "/api/v1/ips")["items"] == []
        assert api_get(sink, "/healthz") == {"status": "ok"}
