"""Real SMTP clients against the installed ``spamsink serve``.

swaks (plain, STARTTLS, pipelining), Python's smtplib (send_message, starttls),
Postfix's smtp-source (1000 messages over 20 sessions) and a real Postfix relaying a
queued message into the sink until its log says ``status=sent``.
"""

from __future__ import annotations

import email.message
import re
import smtplib
import ssl
import subprocess
from pathlib import Path

import pytest

from tests.postfix_peer import RealPostfix
from tests.support import SinkProcess, free_port, need_root, need_tool


def _logged_sessions(sink: SinkProcess) -> list[str]:
    """Session log lines, without the empty probe connections of SinkProcess.start."""
    return [line for line in sink.log().splitlines()
            if "spamsink.session" in line and " bytes=0 " not in line and '"bytes":0' not in line]


def _wait_sessions(sink: SinkProcess, count: int, timeout: float = 10.0) -> list[str]:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = _logged_sessions(sink)
        if len(lines) >= count:
            return lines
        time.sleep(0.1)
    return _logged_sessions(sink)


def _swaks(sink: SinkProcess, *args: str) -> str:
    result = subprocess.run(
        [need_tool("swaks"), "--server", f"{sink.host}:{sink.port}", "--to", "user@example.org",
         "--from", "spammer@example.net", "--helo", "bot.example.net", *args],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.parametrize("mode", [[], ["-tls"], ["--pipeline"], ["-tls", "--pipeline"]],
                         ids=["plain", "starttls", "pipelining", "starttls-pipelining"])
def test_swaks(sink: SinkProcess, mode: list[str]) -> None:
    output = _swaks(sink, *mode)
    assert re.search(r"<[-~]? +250 2\.0\.0 Ok: queued as [0-9A-F]{10,11}", output), output
    assert "221 2.0.0 Bye" in output
    line = _wait_sessions(sink, 1)[-1]
    assert "messages=1" in line and "helo=bot.example.net" in line
    if "-tls" in mode:
        assert "tls=TLSv1." in line


def test_smtplib_send_message_with_starttls(sink: SinkProcess) -> None:
    message = email.message.EmailMessage()
    message["From"] = "a@example.net"
    message["To"] = "b@example.org, c@example.org"
    message["Subject"] = "cheap watches"
    message.set_content("line\n.leading dot\n" * 500)
    with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
        client.ehlo("client.example.net")
        assert client.has_extn("starttls") and client.has_extn("pipelining")
        client.starttls(context=ssl._create_unverified_context())
        client.ehlo("client.example.net")
        assert not client.has_extn("starttls")
        assert client.send_message(message) == {}
        code, _ = client.noop()
        assert code == 250
    line = _wait_sessions(sink, 1)[-1]
    assert "recipients=2" in line and "messages=1" in line and "end=quit" in line


def test_smtp_source_1000_messages_over_20_sessions(sink: SinkProcess) -> None:
    tool = need_tool("smtp-source")
    result = subprocess.run([tool, "-s", "20", "-m", "1000", "-l", "1024", "-f", "a@example.net",
                             "-t", "b@example.org", f"{sink.host}:{sink.port}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = _wait_sessions(sink, 1000)
    assert sum(int(re.search(r"messages=(\d+)", line).group(1)) for line in lines) == 1000


@pytest.mark.slow
def test_real_postfix_relays_into_the_sink(sink: SinkProcess) -> None:
    need_root()
    need_tool("postfix")
    postfix = RealPostfix(free_port(), {
        "mynetworks": "127.0.0.0/8",
        "relayhost": f"[{sink.host}]:{sink.port}",
        "default_transport": "smtp",
        "relay_transport": "smtp",
        "smtp_tls_security_level": "may",
        "smtp_host_lookup": "native",
    }, accept_all=False).start()
    try:
        with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as client:
            client.sendmail("relay-test@example.net", ["victim@example.org"],
                            b"Subject: relayed\r\n\r\nthrough a real Postfix\r\n")
        assert postfix.wait_for_log("status=sent", timeout=60), postfix.log_text()
    finally:
        postfix.stop()
    relayed = [line for line in _wait_sessions(sink, 1) if "relay-test@example.net" in line]
    assert relayed and "messages=1" in relayed[-1] and "tls=TLSv1." in relayed[-1]


def test_sink_log_json(tmp_path: Path) -> None:
    import json

    with SinkProcess(tmp_path / "data", ["--log-format", "json"]) as sink:
        _swaks(sink)
        lines = _wait_sessions(sink, 1)
    entry = json.loads(lines[-1])
    assert entry["messages"] == 1 and entry["end"] == "quit"
    assert entry["client"].startswith("127.0.0.1:") and entry["helo"] == "bot.example.net"
