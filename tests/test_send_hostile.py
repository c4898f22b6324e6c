"""``spamsink send`` against servers that misbehave at the edges of a session: endless
replies, stalled or dropped TLS handshakes, servers that stop reading, idle 421s.

Each server is a few lines of asyncio on a real loopback socket (:class:`StreamServer`);
every run must end by itself, with the right buckets.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sink.cli import build_parser
from sink.send_config import config_from_options
from sink.send_runner import Runner
from sink.tls import ensure_self_signed, load_context
from tests.support import free_port
from tests.test_send_support import interrupted_summary, run_send, send_running

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class StreamServer:
    """``handler(reader, writer)`` for every connection, on a loop in its own thread."""

    def __init__(self, handler: Handler) -> None:
        self.port = free_port()
        self.connections = 0
        self._handler = handler
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._handler(reader, writer)
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.transport.abort()

    def __enter__(self) -> StreamServer:
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        async def shutdown() -> None:
            self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def test_a_reply_that_never_ends_is_a_bad_reply() -> None:
    """A greeting of endless 220- lines: cut off at MAX_LINES as a protocol error, long
    before --timeout (before the cap, the client buffered it until the timeout)."""
    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        chunk = (b"220-" + b"x" * 200 + b"\r\n") * 100
        while True:
            writer.write(chunk)
            await writer.drain()

    with StreamServer(babble) as server:
        status, out, _ = run_send("-n", "2", "--timeout", "20", "-p", str(server.port),
                                  timeout=15)
    assert status == 1
    assert out["failures"] == {"greeting bad reply": 2}


def starttls_server(then: str, context: ssl.SSLContext | None = None) -> StreamServer:
    """Offers STARTTLS, answers it 220, then ``then``: "stall" (reads the ClientHello and
    says nothing), "close" (drops the connection), "plain" (answers the ClientHello in
    plain text, which the client's TLS layer refuses) or "speak first" (completes the
    handshake with ``context`` and at once sends a reply, before any EHLO)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 tls.example ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-tls.example\r\n250 STARTTLS\r\n")
            elif verb == b"STAR":
                writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                await writer.drain()
                if then == "close":
                    return
                if then == "speak first":
                    await writer.start_tls(context)
                    writer.write(b"250 surprise\r\n")
                    await writer.drain()
                    await asyncio.sleep(0.5)
                    return
                if then == "plain":
                    await reader.read(4096)
                    writer.write(b"500 5.5.2 what is this?\r\n")
                    await writer.drain()
                while await reader.read(4096):
                    pass
            else:
                writer.write(b"250 ok\r\n")

    return StreamServer(handler)


def test_a_stalled_starttls_handshake_times_out() -> None:
    with starttls_server("stall") as server:
        status, out, _ = run_send("-n", "2", "-s", "2", "--starttls", "--timeout", "0.5",
                                  "-p", str(server.port), timeout=15)
    assert status == 1
    assert out["failures"] == {"tls timeout": 2}
    assert out["connections"]["made"] == 2


def test_a_dropped_starttls_handshake_ends_the_session() -> None:
    with starttls_server("close") as server:
        status, out, _ = run_send("-n", "3", "-s", "1", "--starttls", "--timeout", "20",
                                  "-p", str(server.port), timeout=15)
    assert status == 1
    assert out["failures"] == {"tls closed": 3}
    assert server.connections == 3  # each failed session ended, and the next one began


def test_a_failed_starttls_handshake_is_a_tls_error() -> None:
    """The SSL layer reports the lost connection before the handshake's task ends;
    that used to book a 'tls closed' and 'closed by server' ending."""
    with starttls_server("plain") as server:
        status, out, _ = run_send("-n", "2", "--starttls", "--timeout", "20",
                                  "-p", str(server.port), timeout=15)
    assert status == 1
    assert out["failures"] == {"tls error": 2}
    assert out["connections"]["ended"] == {"TLS error": 2}


@pytest.mark.parametrize(("then", "bucket"), [
    ("close", "tls closed"), ("plain", "tls error"), ("stall", "tls timeout")])
def test_a_failed_tls_handshake_on_connect_is_booked_at_tls(then: str, bucket: str) -> None:
    """--tls: the TCP connection is made, then the server drops it, answers in plain
    text, or says nothing. That is the handshake's failure, not the connect's (before:
    'connect econnreset' for the drop, 'connect timeout' for the silence)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if then == "plain":
            writer.write(b"220 plain.example ESMTP\r\n")
        if then != "close":
            while await reader.read(4096):
                pass

    with StreamServer(handler) as server:
        status, out, _ = run_send("-n", "2", "--tls", "--timeout", "0.5",
                                  "-p", str(server.port), timeout=15)
    assert status == 1
    assert out["failures"] == {bucket: 2}
    assert out["connections"]["failed"] == 2


def stalled_tls_server() -> StreamServer:
    """Accepts and reads a ClientHello, never answers it."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(4096):
            pass

    return StreamServer(handler)


@pytest.mark.parametrize("mode", ["--tls", "--starttls"])
def test_a_stalled_handshake_times_out_at_timeout_not_at_asyncios_limit(
        mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """asyncio gives up on a TLS handshake at its own limit (60 s) unless told
    otherwise: with a --timeout above it, a stalled handshake ended as 'tls closed' at
    60 s. Here that limit is made 0.3 s and --timeout is 1 s (in-process, asyncio's
    loop)."""
    monkeypatch.setattr(asyncio.constants, "SSL_HANDSHAKE_TIMEOUT", 0.3)
    server = starttls_server("stall") if mode == "--starttls" else stalled_tls_server()
    with server:
        config = config_from_options(build_parser().parse_args(
            ["send", "-n", "1", mode, "--timeout", "1", "-p", str(server.port)]))
        result = asyncio.run(Runner(config).run())
    assert result.stats.failures == {"tls timeout": 1}


def test_a_reply_right_after_the_starttls_handshake_is_no_crash(tmp_path: Path) -> None:
    """The server speaks first over TLS. When that reply comes before the handshake's
    end is reported, it is a 'tls bad reply' (before: an AssertionError in the callback,
    the message given back to the pool, and reconnects without end)."""
    context = load_context(*ensure_self_signed(tmp_path, "tls.example"))
    with starttls_server("speak first", context) as server:
        status, out, err = run_send("-n", "40", "-s", "4", "--starttls", "--timeout", "3",
                                    "-p", str(server.port), timeout=60)
    assert status == 1 and "Traceback" not in err
    assert out["sent"] + out["failed"] == 40
    assert out["connections"]["made"] == 40


def deaf_after_data(in_data: threading.Event) -> StreamServer:
    """Answers until DATA's 354, then never reads again: a large message text stays in
    the client's write buffer."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 deaf.example ESMTP\r\n")
        while line := await reader.readline():
            if line[:4].upper() == b"DATA":
                writer.write(b"354 go ahead\r\n")
                in_data.set()
                await asyncio.sleep(3600)
            writer.write(b"250 ok\r\n")

    return StreamServer(handler)


def test_end_of_hold_aborts_a_connection_the_server_stopped_reading() -> None:
    """The end of the hold closes the connection; its 16 MiB text is never taken, so the
    close is an abort after the grace (min(--timeout, CLOSE_GRACE) = 2 s). Before, the
    run waited for the write buffer forever."""
    in_data = threading.Event()
    with deaf_after_data(in_data) as server:
        status, out, _ = run_send("--hold", "1", "-t", "0.5", "--timeout", "2", "-b", "16M",
                                  "-p", str(server.port), timeout=20)
    assert in_data.is_set()
    assert status == 0, out
    assert out["hold"]["ends"] == {"end of hold": 1}
    assert (out["sent"], out["failed"], out["unfinished"]) == (0, 0, 1)


def test_a_second_interrupt_aborts_at_once() -> None:
    """The first SIGINT closes the stalled connection gracefully (a 10 s grace with
    --timeout 30); the second aborts it now, and the summary is printed."""
    in_data = threading.Event()
    with deaf_after_data(in_data) as server, send_running(
            "-n", "1", "-b", "16M", "--timeout", "30", "-p", str(server.port)) as proc:
        assert in_data.wait(15)
        time.sleep(0.3)  # the text is being written
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
        assert proc.poll() is None  # still waiting for the server to take the text
        proc.send_signal(signal.SIGINT)
        out = interrupted_summary(proc, timeout=6)
    assert (out["sent"], out["failed"], out["unfinished"]) == (0, 0, 1)


def full_listen_queue() -> socket.socket:
    """A listener that never accepts: one connect fits its queue, the others hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    return listener


def test_end_of_hold_cancels_connects_in_progress() -> None:
    """Before, the hold lasted until the connects timed out (--timeout 30) and counted them
    as connect failures (exit status 1)."""
    with full_listen_queue() as listener:
        status, out, _ = run_send("--hold", "4", "-t", "0.5", "--timeout", "30",
                                  "-p", str(listener.getsockname()[1]), timeout=15)
    assert status == 0, out
    assert out["failures"] == {}
    assert out["connections"]["made"] == 1 and out["connections"]["failed"] == 0
    assert out["hold"]["ends"] == {"end of hold": 1, "cut while connecting": 3}
    assert out["unfinished"] == 4


def test_interrupt_cancels_connects_in_progress() -> None:
    with full_listen_queue() as listener, send_running(
            "-n", "4", "-s", "4", "--timeout", "30", "-p", str(listener.getsockname()[1])) as proc:
        time.sleep(1.0)
        proc.send_signal(signal.SIGINT)
        out = interrupted_summary(proc, timeout=8)
    assert out["failures"] == {}
    assert (out["sent"], out["failed"], out["unfinished"], out["not_attempted"]) == (0, 0, 4, 0)


def test_an_idle_timeout_421_during_a_paced_wait() -> None:
    """/tmp/rev3/idle421.py's server: 421 and close 0.3 s after each message, while the
    client waits (--rate 2) to start the next one. Before: 'greeting bad reply'."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 idle.example ESMTP\r\n")
        while line := await reader.readline():
            if line[:4].upper() == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 2.0.0 Ok: queued\r\n")
                await asyncio.sleep(0.3)
                writer.write(b"421 4.4.2 idle.example Error: timeout exceeded\r\n")
                await writer.drain()
                return
            writer.write(b"250 ok\r\n")

    with StreamServer(handler) as server:
        status, out, _ = run_send("-n", "2", "-m", "2", "--rate", "2", "-p", str(server.port),
                                  timeout=15)
    assert status == 0, out
    assert (out["sent"], out["failed"]) == (2, 0)
    # the second connection's QUIT, sent at once, is what that 421 answers
    assert out["connections"]["ended"] == {"421": 1, "quit": 1}


def test_ctrl_c_with_procs_closes_gracefully_then_a_second_aborts() -> None:
    """A terminal's Ctrl-C goes to the whole process group. Before, --procs workers got
    it from the terminal and again from the parent, and aborted at once."""
    in_data = threading.Event()
    with deaf_after_data(in_data) as server, send_running(
            "--procs", "2", "-n", "2", "-s", "2", "-b", "16M", "--timeout", "30", "-p",
            str(server.port), new_session=True) as proc:
        assert in_data.wait(15)
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does
        time.sleep(0.6)
        assert proc.poll() is None  # closing gracefully: waiting for the server
        proc.send_signal(signal.SIGINT)
        out = interrupted_summary(proc, timeout=8)
    assert out["sent"] == 0 and out["unfinished"] >= 1
