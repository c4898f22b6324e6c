"""Servers that refuse, drop, stall or babble: every message lands in the right bucket,
and ``sent + failed`` is exactly ``-n`` (real sockets, a scripted asyncio server)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import pytest

from tests.support import free_port, spamsink_command
from tests.test_send_support import (
    CLOSE,
    EHLO_LINES,
    SILENT,
    FakeSMTP,
    interrupted_summary,
    run_send,
    send_running,
)


def send_to(server: FakeSMTP, *args: str) -> tuple[int, dict]:
    status, out, _ = run_send(*args, "-p", str(server.port))
    return status, out


@pytest.mark.parametrize(("replies", "bucket"), [
    ({"CONNECT": b"554 5.7.1 go away\r\n"}, "greeting 5xx"),
    ({"CONNECT": b"421 4.3.2 busy\r\n"}, "greeting 4xx"),
    ({"EHLO": b"550 no\r\n"}, "ehlo 5xx"),
    ({"MAIL": b"451 4.3.0 try later\r\n"}, "mail 4xx"),
    ({"RCPT": b"550 5.1.1 <smtpsink@localhost>: Recipient address rejected\r\n"}, "rcpt 5xx"),
    ({"DATA": b"554 5.5.1 no valid recipients\r\n"}, "data 5xx"),
    ({".": b"552 5.3.4 message file too big\r\n"}, "dot 5xx"),
    ({".": b"452 4.3.1 insufficient storage\r\n"}, "dot 4xx"),
    ({"CONNECT": CLOSE}, "greeting closed"),
    ({"MAIL": CLOSE}, "mail closed"),
    ({"DATA": CLOSE}, "data closed"),
    ({".": CLOSE}, "dot closed"),
    ({"CONNECT": b"SSH-2.0-OpenSSH_9.2\r\n"}, "greeting bad reply"),
    ({"RCPT": b"250 ok\r\n250 surprise\r\n"}, "data bad reply"),
    ({"DATA": b"250 Ok\r\n"}, "data unexpected 2xx"),
])
def test_failure_buckets(replies: dict, bucket: str) -> None:
    with FakeSMTP(replies) as server:
        status, out = send_to(server, "-n", "6", "-s", "2", "-m", "3")
    assert status == 1
    assert out["sent"] == 0 and out["failed"] == 6
    assert out["failures"] == {bucket: 6}
    stage, cause = bucket.split(" ", 1)
    assert out["failures_by_stage"] == {stage: 6}
    assert out["failures_by_cause"] == {cause: 6}


def test_ehlo_refused_falls_back_to_helo() -> None:
    with FakeSMTP({"EHLO": b"502 5.5.2 command not recognized\r\n"}) as server:
        status, out = send_to(server, "-n", "3", "--pipelining")
    assert status == 0 and out["sent"] == 3
    assert out["latency_ms"]["helo"]["count"] == 3
    assert "PIPELINING" not in out["extensions"]  # HELO offers no extensions


def test_connection_refused() -> None:
    status, out, _ = run_send("-n", "5", "-s", "2", "-m", "5", "-p", str(free_port()))
    assert status == 1
    assert out["failures"] == {"connect refused": 5}
    assert out["connections"] == {"made": 0, "failed": 5, "ended": {}}


def test_silent_server_times_out() -> None:
    with FakeSMTP({"CONNECT": SILENT}) as server:
        status, out = send_to(server, "-n", "4", "-s", "4", "--timeout", "0.3")
    assert status == 1
    assert out["failures"] == {"greeting timeout": 4}


def test_stall_after_data_times_out_at_end_of_data() -> None:
    with FakeSMTP({".": SILENT}) as server:
        status, out = send_to(server, "-n", "2", "-s", "2", "--timeout", "0.3")
    assert status == 1
    assert out["failures"] == {"dot timeout": 2}


def test_mixed_outcomes_add_up_exactly() -> None:
    """Every third RCPT rejected, every fifth connection dropped at the greeting."""
    replies = {
        "RCPT": lambda n: b"550 5.1.1 rejected\r\n" if n % 3 == 0 else b"250 2.1.5 Ok\r\n",
        "CONNECT": lambda n: CLOSE if n % 5 == 0 else b"220 fake.example ESMTP\r\n",
    }
    with FakeSMTP(replies) as server:
        status, out = send_to(server, "-n", "997", "-s", "7", "-m", "10")
    assert status == 1
    assert out["sent"] + out["failed"] == 997
    assert out["sent"] == len(server.messages)
    assert out["failures"]["rcpt 5xx"] == server.counts["RCPT"] // 3
    assert out["failures"]["greeting closed"] == server.counts["CONNECT"] // 5
    assert set(out["failures"]) == {"rcpt 5xx", "greeting closed"}


def test_pipelined_rejections_recover_and_continue() -> None:
    replies = {"RCPT": lambda n: b"550 5.1.1 rejected\r\n" if n % 2 else b"250 2.1.5 Ok\r\n",
               "DATA": lambda n: b"554 5.5.1 no valid recipients\r\n" if n % 2
               else b"354 go ahead\r\n"}
    with FakeSMTP(replies) as server:
        status, out = send_to(server, "-n", "40", "-s", "2", "-m", "10", "--pipelining")
    assert status == 1
    assert (out["sent"], out["failed"]) == (20, 20)
    assert out["failures"] == {"rcpt 5xx": 20}
    assert out["latency_ms"]["rset"]["count"] == 20
    assert len(server.messages) == 20


def test_replies_one_byte_at_a_time_are_parsed_whole() -> None:
    with FakeSMTP({"EHLO": EHLO_LINES}, chunk=1) as server:
        status, out = send_to(server, "-n", "5", "-m", "5", "--pipelining", "--bdat")
    assert status == 0 and out["sent"] == 5
    assert out["extensions"] == {"PIPELINING": 1, "CHUNKING": 1}


def test_interrupt_prints_the_summary_and_exits_130() -> None:
    with FakeSMTP(delay=0.2) as server, send_running(
            "-t", "60", "-s", "3", "-m", "1000", "-p", str(server.port)) as proc:
        deadline = time.monotonic() + 30
        while server.counts.get(".", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # their replies (0.2 s late) have arrived
        proc.send_signal(signal.SIGINT)
        out = interrupted_summary(proc, timeout=20)
    assert out["unfinished"] == 3  # one message on the wire per sender
    assert out["sent"] >= 3 and out["failed"] == 0


def test_connect_timeout_when_the_listen_queue_is_full() -> None:
    """A server that never accepts: one connection fits its queue (and gets no greeting),
    the kernel drops the other SYNs, so those connects time out."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        status, out, _ = run_send("-n", "4", "-s", "4", "--timeout", "0.5",
                                  "-p", str(listener.getsockname()[1]))
    assert status == 1
    assert out["failures"] == {"connect timeout": 3, "greeting timeout": 1}
    assert out["connections"] == {"made": 1, "failed": 3, "ended": {"timeout": 1}}


def test_a_quit_never_answered_is_reported_and_not_timed() -> None:
    """The messages are sent; the QUITs time out. That shows as connections ended by
    'quit timeout' (text and JSON), and the run's clock stops at the last message's 250,
    not after the QUIT wait (before: counted nowhere, and 'seconds' included --timeout)."""
    with FakeSMTP({"QUIT": SILENT}) as server:
        status, out = send_to(server, "-n", "2", "-s", "2", "--timeout", "1.5")
        text = subprocess.run([*spamsink_command(), "send", "-n", "1", "--timeout", "0.5",
                               "-p", str(server.port)], capture_output=True, text=True,
                              timeout=30, check=False)
    assert status == 0 and out["sent"] == 2 and out["failed"] == 0
    assert out["connections"]["ended"] == {"quit timeout": 2}
    assert out["seconds"] < 1.0
    assert "Connections ended: quit timeout 1" in text.stdout.splitlines()


def test_a_timed_run_is_timed_to_its_end_while_senders_wait_for_quit() -> None:
    """Each sender's message is done in milliseconds, then its QUIT is never answered
    until -t has passed: the rate divides by the run's second, not by those milliseconds
    (before: 'Sent 3 messages in 0.002 seconds')."""
    with FakeSMTP({"QUIT": SILENT}) as server:
        status, out = send_to(server, "-t", "1", "-s", "3", "--timeout", "2")
    assert status == 0 and out["sent"] == 3
    assert 0.9 <= out["seconds"] < 1.9


def test_a_worker_with_nothing_to_send_adds_no_time() -> None:
    """-n 1 over eight processes: seven workers get no message; their exit times used to
    stretch the run's clock to theirs."""
    with FakeSMTP() as server:
        status, out = send_to(server, "-n", "1", "-s", "8", "--procs", "8")
    assert status == 0 and out["sent"] == 1
    assert out["seconds"] * 1000 <= out["delivery_ms"]["max"] + 0.5


def test_replies_before_a_malformed_line_in_the_same_read_count() -> None:
    """The 250 for the message and a line of garbage arrive in one read: the message is
    sent, and the garbage ends the connection as a protocol error afterwards."""
    with FakeSMTP({".": b"250 2.0.0 Ok: queued\r\n?? garbage\r\n"}) as server:
        status, out = send_to(server, "-n", "3")
    assert status == 0 and out["sent"] == 3 and out["failures"] == {}
    assert out["connections"]["ended"] == {"bad reply": 3}


def test_garbage_after_the_221_still_ends_the_connection_by_quit() -> None:
    with FakeSMTP({"QUIT": b"221 2.0.0 Bye\r\nnot smtp\r\n"}) as server:
        status, out = send_to(server, "-n", "2", "-s", "2")
    assert status == 0 and out["connections"]["ended"] == {"quit": 2}


def test_an_interrupt_counts_the_pipelined_next_message_as_unfinished() -> None:
    """With --pipelining the next message's MAIL, RCPT and DATA go out with the text of
    the one before: an interrupt before their replies leaves two messages on the wire,
    both unfinished (before: the second counted as never attempted)."""
    with FakeSMTP(delay=0.5) as server, send_running(
            "-n", "5", "-m", "5", "--pipelining", "-p", str(server.port)) as proc:
        deadline = time.monotonic() + 30
        while server.counts.get("DATA", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        out = interrupted_summary(proc, timeout=20)
    assert (out["sent"], out["unfinished"], out["not_attempted"]) == (0, 2, 3)


def test_a_pipelined_next_message_fails_when_the_connection_drops() -> None:
    """The server drops the connection instead of answering the end of data: the message
    and the pipelined one after it both failed; neither is sent again."""
    with FakeSMTP({".": CLOSE}) as server:
        status, out = send_to(server, "-n", "2", "-m", "2", "--pipelining")
    assert status == 1
    assert out["failures"] == {"dot closed": 1, "mail closed": 1}
    assert server.connections == 1


IDLE_421 = b"250 2.0.0 Ok: queued\r\n421 4.4.2 fake.example Error: timeout exceeded\r\n"


@pytest.mark.parametrize("paced", [True, False])
def test_an_idle_421_between_messages_ends_the_connection(paced: bool) -> None:
    """The server times the connection out right after a message: its 421 answers no
    command. The connection ends as '421' and the next message, never answered, is sent
    on the next connection (before: 'greeting bad reply')."""
    rate = ("--rate", "4") if paced else ()
    with FakeSMTP({".": IDLE_421}) as server:
        status, out = send_to(server, "-n", "2", "-m", "2", *rate)
    assert status == 0, out
    assert (out["sent"], out["failed"]) == (2, 0)
    assert out["connections"]["ended"] == {"421": 2}
    assert len(server.messages) == 2


def test_a_reply_without_a_command_past_the_greeting_fails_the_next_message() -> None:
    with FakeSMTP({".": b"250 2.0.0 Ok: queued\r\n250 surprise\r\n"}) as server:
        status, out = send_to(server, "-n", "2", "-m", "2", "--rate", "4")
    assert status == 1
    assert (out["sent"], out["failed"]) == (1, 1)
    assert out["failures"] == {"mail bad reply": 1}
    assert out["connections"]["ended"] == {"bad reply": 1}


def test_a_421_right_after_the_greeting_fails_the_message_and_does_not_loop() -> None:
    """220 and 421 in one read: the 421 answers no command, and no message ended on the
    connection yet, so the message fails instead of going back to the pool (which would
    reconnect for ever)."""
    with FakeSMTP({"CONNECT": b"220 fake.example ESMTP\r\n421 4.3.2 busy\r\n"}) as server:
        status, out = send_to(server, "-n", "3", "-m", "2")
    assert status == 1
    assert out["failures"] == {"ehlo 4xx": 3}
    assert out["connections"]["ended"] == {"421": 3}
    assert server.connections == 3


def test_pipelining_with_a_refused_recipient_sends_the_text_to_the_accepted_ones() -> None:
    """One of three recipients refused, DATA still accepted: the real message goes to the
    two accepted ones (RFC 2920), never an empty one, and the message is counted failed
    as without pipelining (where the client sends RSET instead)."""
    refuse_second = {"RCPT": lambda n: b"550 5.1.1 rejected\r\n" if n == 2 else b"250 ok\r\n"}
    with FakeSMTP(refuse_second) as server:
        status, out = send_to(server, "-n", "1", "--rcpts", "3", "--pipelining")
    with FakeSMTP(refuse_second) as plain:
        plain_status, plain_out = send_to(plain, "-n", "1", "--rcpts", "3")
    assert (status, out["failures"]) == (plain_status, plain_out["failures"]) == (
        1, {"rcpt 5xx": 1})
    assert out["extensions"] == {"PIPELINING": 1}
    [text] = server.messages
    assert b"Subject: spamsink send test message" in text and len(text) > 1024
    assert plain.messages == [] and plain.counts.get("RSET") == 1


def test_pipelining_with_every_recipient_refused_sends_only_the_dot() -> None:
    with FakeSMTP({"RCPT": b"550 5.1.1 rejected\r\n"}) as server:
        status, out = send_to(server, "-n", "2", "-m", "2", "--rcpts", "2", "--pipelining")
    assert status == 1 and out["failures"] == {"rcpt 5xx": 2}
    assert server.messages == [b"", b""]
