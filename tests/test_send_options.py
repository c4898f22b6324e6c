"""``spamsink send`` command-line validation: every bad combination fails with one clear line."""

from __future__ import annotations

from pathlib import Path

import pytest

from sink.cli import build_parser, main
from sink.send_config import UsageError, config_from_options


def error_of(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    """Run ``spamsink send ARGS`` in-process; the one error line it printed (status 2)."""
    try:
        status = main(["send", *args])
    except SystemExit as exc:  # argparse
        status = exc.code
    assert status == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line
             or line.startswith("spamsink send:")]
    assert len(lines) == 1, lines
    return lines[0]


def config(*args: str):
    return config_from_options(build_parser().parse_args(["send", *args]))


def test_smtpsend_defaults() -> None:
    c = config("-n", "1")
    assert (c.host, c.port, c.senders, c.per_connection, c.body_bytes) == (
        "127.0.0.1", 25, 1, 1, 1024)
    assert (c.sender, c.recipient) == ("smtpsend@localhost", "smtpsink@localhost")
    assert c.count == 1 and c.duration is None and c.timeout == 30.0


def test_classic_options_parse() -> None:
    c = config("-s", "10", "-m", "5", "-b", "4k", "-t", "2m", "-p", "2525", "-F", "a@b",
               "-T", "c@d", "-S", "hello", "-vv", "::1")
    assert (c.senders, c.per_connection, c.body_bytes, c.duration, c.port) == (
        10, 5, 4096, 120.0, 2525)
    assert (c.sender, c.recipient, c.subject, c.verbose, c.host) == (
        "a@b", "c@d", "hello", 2, "::1")


@pytest.mark.parametrize(("args", "message"), [
    ((), "one of the arguments -n -t is required"),
    (("-n", "5", "-t", "5"), "not allowed with argument"),
    (("-n", "0"), "must be at least 1"),
    (("-n", "many"), "not a whole number"),
    (("-n", "1", "-p", "70000"), "port out of range"),
    (("-t", "0"), "-t must be more than 0"),
    (("-t", "soon"), "not a duration"),
    (("-n", "1", "--starttls", "--tls"), "not allowed with argument"),
    (("-n", "1", "--rate", "0"), "must be more than 0"),
    (("-n", "1", "--timeout", "0"), "--timeout must be more than 0"),
    (("-n", "1", "-F", "a b@c"), "must not contain spaces"),
    (("-n", "1", "-T", "<x@y>"), "must not contain spaces, '<', '>'"),
    (("-n", "1", "-S", "two\nlines"), "must not contain line breaks"),
    (("-n", "1", "-T", ""), "-T '': a recipient must not be empty"),
    (("-n", "1", "--ehlo", "x\r\nRSET"), "--ehlo 'x\\r\\nRSET': the name must be one word"),
    (("-n", "1", "--ehlo", "two words"), "must be one word of printable ASCII"),
    (("-n", "1", "--ehlo", ""), "must be one word of printable ASCII"),
    (("-n", "1", "--ehlo", "caf\u00e9.example"), "must be one word of printable ASCII"),
    (("-n", "5", "--hold", "5"), "--hold runs for -t SECONDS"),
    (("-t", "5", "--hold", "5", "-s", "3"), "-s and -m do not apply"),
    (("-t", "5", "--hold", "5", "--rate", "3"), "--rate does not apply"),
    (("-n", "1", "--source", "127.0.0.1-127.0.0.x"), "is not an IP address"),
    (("-n", "1", "--source", "127.0.0.9-127.0.0.2"), "ends before it starts"),
    (("-n", "1", "--source", "::1"), "--source addresses are IPv6 but 127.0.0.1 is IPv4"),
    (("-n", "1", "--body", "/nonexistent/msg.eml"), "no such file or directory"),
    (("-n", "1", "-b", "1e15"), "-b: at most 100M"),
    (("-n", "1", "no-such-host.invalid"), "cannot resolve host 'no-such-host.invalid'"),
    (("-n", "1", "b\u00fccher.invalid"), "cannot resolve host 'b\u00fccher.invalid'"),
])
def test_bad_command_lines(capsys: pytest.CaptureFixture[str], args: tuple[str, ...],
                           message: str) -> None:
    assert message in error_of(capsys, *args)


def test_hosts_resolve_to_the_address_connected_to() -> None:
    assert config("-n", "1", "-p", "2525", "localhost").sockaddr[:2] in (
        ("127.0.0.1", 2525), ("::1", 2525))
    assert config("-n", "1", "[::1]").sockaddr[:2] == ("::1", 25)


def test_null_sender_and_address_literal_ehlo_are_allowed() -> None:
    c = config("-n", "1", "-F", "", "--ehlo", "[192.0.2.1]")
    assert (c.sender, c.ehlo) == ("", "[192.0.2.1]")


def test_body_excludes_generated_message_options(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    body = tmp_path / "m.eml"
    body.write_bytes(b"Subject: x\n\nhi\n")
    assert "-b does not apply" in error_of(capsys, "-n", "1", "--body", str(body), "-b", "10")
    assert "-S does not apply" in error_of(capsys, "-n", "1", "--body", str(body), "-S", "x")
    assert config("-n", "1", "--body", str(body)).bodies == [b"Subject: x\n\nhi\n"]


def test_hold_defaults_to_a_patient_timeout_and_procs_never_exceed_senders() -> None:
    c = config("-t", "10", "--hold", "100", "--procs", "4")
    assert (c.senders, c.hold, c.timeout, c.procs) == (100, 100, 3600.0, 4)
    assert config("-n", "10", "-s", "2", "--procs", "8").procs == 2


def test_share_splits_counts_exactly() -> None:
    c = config("-n", "1003", "-s", "7", "--rate", "90", "--procs", "3")
    parts = [c.share(i, 3) for i in range(3)]
    assert sum(p.count for p in parts) == 1003
    assert sum(p.senders for p in parts) == 7
    assert sum(p.rate for p in parts) == pytest.approx(90)
    assert [p.worker for p in parts] == [0, 1, 2]


def test_usage_error_is_raised_for_config_problems() -> None:
    with pytest.raises(UsageError):
        config("-n", "1", "--source", "::1")


def test_environment_sets_long_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPAMSINK_EHLO", "client.example")
    monkeypatch.setenv("SPAMSINK_PIPELINING", "yes")
    c = config("-n", "1")
    assert c.ehlo == "client.example" and c.pipelining
