"""``spamsink send`` end to end against real servers: ``spamsink serve``, aiosmtpd and
Postfix's ``smtp-sink``, all on loopback sockets."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import (
    SinkProcess,
    free_port,
    need_root,
    need_tool,
    spamsink_command,
    wait_for_port,
)
from tests.test_send_support import FakeSMTP, run_send


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SinkProcess]:
    """One real ``spamsink serve`` for the module (sessions do not affect each other)."""
    process = SinkProcess(tmp_path_factory.mktemp("send") / "data",
                          ["--log-level", "warning"]).start()
    yield process
    process.stop()


def test_exact_count_over_reused_connections(sink: SinkProcess) -> None:
    status, out, _ = run_send("-n", "1000", "-s", "10", "-m", "10", "-p", str(sink.port))
    assert status == 0
    assert (out["sent"], out["failed"], out["unfinished"]) == (1000, 0, 0)
    assert out["connections"] == {"made": 100, "failed": 0, "ended": {"quit": 100}}
    for stage in ("connect", "greeting", "ehlo", "mail", "rcpt", "data", "dot", "quit"):
        assert out["latency_ms"][stage]["count"] == (1000 if stage in
                                                     ("mail", "rcpt", "data", "dot") else 100)
    assert out["bytes"]["sent"] > 1000 * 1024


def test_m_not_dividing_n_still_sends_exactly_n_with_pipelining(sink: SinkProcess) -> None:
    status, out, _ = run_send("-n", "1003", "-s", "7", "-m", "10", "--pipelining",
                              "-p", str(sink.port))
    assert status == 0
    assert (out["sent"], out["failed"]) == (1003, 0)
    assert out["connections"]["made"] == 101  # 100 of 10 messages, one of 3
    assert out["extensions"] == {"PIPELINING": 101}


def test_bdat_starttls_and_several_recipients(sink: SinkProcess) -> None:
    status, out, _ = run_send("-n", "20", "-m", "5", "--bdat", "--starttls", "--rcpts", "3",
                              "-p", str(sink.port))
    assert status == 0, out
    assert out["sent"] == 20
    assert out["extensions"] == {"CHUNKING": 4, "STARTTLS": 4}
    assert out["latency_ms"]["tls"]["count"] == 4
    assert out["latency_ms"]["rcpt"]["count"] == 60
    assert out["latency_ms"]["bdat"]["count"] == 20


def test_worker_processes_split_exactly(sink: SinkProcess) -> None:
    status, out, _ = run_send("-n", "1001", "-s", "4", "-m", "50", "--procs", "2",
                              "-p", str(sink.port))
    assert status == 0
    assert out["sent"] == 1001 and out["options"]["procs"] == 2


def test_timed_run_stops_starting_messages_at_the_deadline(sink: SinkProcess) -> None:
    status, out, _ = run_send("-t", "1", "-s", "4", "-m", "20", "-p", str(sink.port))
    assert status == 0
    assert out["sent"] > 0 and out["failed"] == 0
    # Messages start until 1 s after the run began; "seconds" counts from the first
    # connection (a few ms later) to the last reply, so it can end just short of 1.0.
    assert 0.9 <= out["seconds"] < 5.0


def test_rate_limits_message_starts(sink: SinkProcess) -> None:
    status, out, _ = run_send("-n", "25", "-s", "5", "-m", "5", "--rate", "50",
                              "-p", str(sink.port))
    assert status == 0 and out["sent"] == 25
    assert out["seconds"] >= 0.45  # the 25th start is 24/50 s after the first


def test_text_summary_has_smtpsend_lines_first(sink: SinkProcess) -> None:
    proc = subprocess.run([*spamsink_command(), "send", "-n", "100", "-p", str(sink.port)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"Sent 100 messages in \d+\.\d{3} seconds", lines[0])
    assert re.fullmatch(r"Sending rate: \d+\.\d{3} messages/minute, \d+\.\d{3} "
                        r"messages/second", lines[1])
    assert re.fullmatch(r"Average delivery time: \d+\.\d{6} seconds/message", lines[2])
    assert lines[3] == "Connections: 100 made, 0 failed"
    assert lines[4] == "Messages failed: 0"
    assert any(re.match(r"  end of data\s+100\s", line) for line in lines)
    assert proc.stderr == ""  # no progress line when stderr is not a terminal


def test_verbose_shows_the_dialogue_and_message_text_only_at_vv(sink: SinkProcess) -> None:
    def dialogue(flag: str) -> str:
        return subprocess.run([*spamsink_command(), "send", "-n", "2", "-s", "2", flag,
                               "-S", "marker-subject", "-p", str(sink.port)],
                              capture_output=True, text=True, timeout=60, check=True).stdout

    one = dialogue("-v")
    assert "<<< 220 mx.example.com ESMTP Postfix (Debian/GNU)" in one
    assert ">>> MAIL FROM:<smtpsend@localhost>" in one
    assert "<<< 250-PIPELINING" in one and "<<< 250 CHUNKING" in one  # every line of EHLO
    assert "[1] " in one and "[2] " in one
    assert "marker-subject" not in one and "bytes of message text" in one
    two = dialogue("-vv")
    assert ">>> Subject: marker-subject" in two
    assert ">>> ." in two


def test_source_addresses_are_used_round_robin() -> None:
    with FakeSMTP() as server:
        status, out, _ = run_send("-n", "8", "--source", "127.0.0.2-127.0.0.5",
                                  "-p", str(server.port))
    assert status == 0 and out["sent"] == 8
    assert sorted(server.peers) == sorted(["127.0.0.2", "127.0.0.3", "127.0.0.4",
                                           "127.0.0.5"] * 2)


class _Counting:
    """aiosmtpd handler that discards messages, keeping their text for the test."""

    def __init__(self) -> None:
        self.contents: list[bytes] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.contents.append(envelope.original_content)
        return "250 2.0.0 Ok: discarded"


@pytest.fixture
def aiosmtpd_server() -> Iterator[tuple[int, _Counting]]:
    from aiosmtpd.controller import Controller

    handler = _Counting()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield controller.port, handler
    controller.stop()


def test_against_aiosmtpd(aiosmtpd_server: tuple[int, _Counting]) -> None:
    port, handler = aiosmtpd_server
    status, out, _ = run_send("-n", "1000", "-s", "10", "-m", "10", "--pipelining",
                              "-p", str(port), timeout=120)
    assert status == 0
    assert (out["sent"], out["failed"], out["connections"]["made"]) == (1000, 0, 100)
    assert len(handler.contents) == 1000  # the server agrees


def test_body_files_arrive_intact(aiosmtpd_server: tuple[int, _Counting],
                                  tmp_path: Path) -> None:
    port, handler = aiosmtpd_server
    bodies = tmp_path / "bodies"
    bodies.mkdir()
    (bodies / "1.eml").write_bytes(b"Subject: one\n\n.leading dot\n..two dots\n.\nend")
    (bodies / "2.eml").write_bytes(b"Subject: two\r\n\r\nbare\rCR\r\n")
    status, out, _ = run_send("-n", "4", "--body", str(bodies), "-p", str(port))
    assert status == 0 and out["sent"] == 4
    one = b"Subject: one\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
    two = b"Subject: two\r\n\r\nbare\r\nCR\r\n"
    assert handler.contents == [one, two, one, two]


@pytest.fixture
def smtp_sink() -> Iterator[int]:
    """Postfix's smtp-sink on a free loopback port (it needs root to drop to nobody)."""
    binary = need_tool("smtp-sink")
    need_root()
    port = free_port()
    proc = subprocess.Popen([binary, "-u", "nobody", f"127.0.0.1:{port}", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port)
        time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("extra", [(), ("--pipelining",)], ids=["plain", "pipelining"])
def test_against_postfix_smtp_sink(smtp_sink: int, extra: tuple[str, ...]) -> None:
    status, out, _ = run_send("-n", "1000", "-s", "10", "-m", "10", *extra,
                              "-p", str(smtp_sink))
    assert status == 0
    assert (out["sent"], out["failed"], out["connections"]["made"]) == (1000, 0, 100)
    if extra:
        assert out["extensions"] == {"PIPELINING": 100}


def test_implicit_tls(tmp_path: Path) -> None:
    smtps_port = free_port()
    with SinkProcess(tmp_path / "data", ["--smtps", f"127.0.0.1:{smtps_port}",
                                         "--log-level", "warning"]):
        wait_for_port("127.0.0.1", smtps_port)
        status, out, _ = run_send("-n", "6", "-s", "2", "-m", "3", "--tls",
                                  "-p", str(smtps_port))
    assert status == 0, out
    assert out["sent"] == 6 and out["extensions"] == {"TLS": 2}


def test_progress_line_only_on_a_terminal(sink: SinkProcess) -> None:
    master, slave = pty.openpty()
    proc = subprocess.Popen([*spamsink_command(), "send", "-t", "1", "-s", "2",
                             "-p", str(sink.port)],
                            stdout=subprocess.PIPE, stderr=slave, text=True)
    os.close(slave)
    stdout, _ = proc.communicate(timeout=60)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.returncode == 0
    assert b"\r\x1b[Ksent " in seen and b"s elapsed" in seen and b"left" in seen
    assert seen.endswith(b"\r\x1b[K")  # cleared before the summary
    assert stdout.startswith("Sent ")
