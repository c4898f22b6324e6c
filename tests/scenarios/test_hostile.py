"""Hostile clients: each gets the persona's answer or a close, nobody else waits,
and the sink's memory stays bounded."""

from __future__ import annotations

import os
import resource
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import SinkProcess


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _connect(sink: SinkProcess, source: str | None = None) -> tuple[socket.socket, object]:
    sock = socket.create_connection((sink.host, sink.port), timeout=10,
                                    source_address=(source, 0) if source else None)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220 ")
    return sock, reader


def _served_normally(sink: SinkProcess) -> None:
    """A well-behaved client gets prompt answers."""
    started = time.monotonic()
    sock, reader = _connect(sink)
    with sock:
        sock.sendall(b"HELO ok.example\r\nQUIT\r\n")
        assert reader.readline() == b"250 mx.example.com\r\n"
        assert reader.readline() == b"221 2.0.0 Bye\r\n"
    assert time.monotonic() - started < 2.0


def _read_until_close(reader, limit: int = 10_000_000) -> bytes:
    data = b""
    while len(data) < limit:
        chunk = reader.read1(65536)
        if not chunk:
            return data
        data += chunk
    raise AssertionError("server kept talking")


@pytest.fixture
def strict_sink(tmp_path: Path) -> Iterator[SinkProcess]:
    with SinkProcess(tmp_path / "data", ["--idle-timeout", "2", "--max-session-time", "6",
                                         "--max-errors", "12", "--log-level", "warning"]) as sink:
        yield sink


def test_megabyte_line_is_cut_and_answered(strict_sink: SinkProcess) -> None:
    before = _rss_kb(strict_sink.proc.pid)
    sock, reader = _connect(strict_sink)
    with sock:
        sock.sendall(b"X" * 1_000_000 + b"\r\nNOOP\r\n")
        assert reader.readline() == b"500 5.5.2 Error: command not recognized\r\n"
        assert reader.readline() == b"250 2.0.0 Ok\r\n"
        _served_normally(strict_sink)
    assert _rss_kb(strict_sink.proc.pid) - before < 8_000


def test_nul_bytes_and_binary_garbage(strict_sink: SinkProcess) -> None:
    sock, reader = _connect(strict_sink)
    with sock:
        sock.sendall(b"MAIL FROM:<a\x00b@example.net>\r\n")
        assert reader.readline() == b"501 5.1.7 Bad sender address syntax\r\n"
        sock.sendall(bytes(range(1, 256)) * 64 + b"\r\n")
        assert reader.readline() == b"221 2.7.0 Error: I can break rules, too. Goodbye.\r\n"
        assert reader.read() == b""
    _served_normally(strict_sink)


def test_tls_client_hello_on_the_plain_port(strict_sink: SinkProcess) -> None:
    raw = socket.create_connection((strict_sink.host, strict_sink.port), timeout=10)
    context = ssl._create_unverified_context()
    started = time.monotonic()
    with pytest.raises((ssl.SSLError, OSError)), \
            context.wrap_socket(raw, server_hostname="mx.example.com") as tls:
        tls.recv(10)
    assert time.monotonic() - started < 8
    _served_normally(strict_sink)


def test_ten_thousand_commands_end_in_421(strict_sink: SinkProcess) -> None:
    sock, reader = _connect(strict_sink)
    with sock:
        sock.sendall(b"NOOP\r\n" * 10_000)
        replies = _read_until_close(reader).splitlines()
    # 100 NOOPs are free, then each adds an error; the 12th error ends the session.
    assert replies[-1] == b"421 4.7.0 mx.example.com Error: too many errors"
    assert all(line == b"250 2.0.0 Ok" for line in replies[:-1])
    assert len(replies) < 200


def test_command_limit(tmp_path: Path) -> None:
    with SinkProcess(tmp_path / "data", ["--max-commands", "50"]) as sink:
        sock, reader = _connect(sink)
        with sock:
            sock.sendall(b"HELO x\r\n" * 200)
            replies = _read_until_close(reader).splitlines()
    assert replies.count(b"250 mx.example.com") == 50
    assert replies[-1] == b"421 4.7.0 mx.example.com Error: too many errors"


def test_client_that_never_reads(strict_sink: SinkProcess) -> None:
    pid = strict_sink.proc.pid
    before = _rss_kb(pid)
    sock, _ = _connect(strict_sink)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    sent = 0
    payload = b"EHLO flood.example\r\n" * 1000
    deadline = time.monotonic() + 3
    closed_by_sink = False
    while time.monotonic() < deadline and not closed_by_sink:
        try:
            sent += sock.send(payload)
        except BlockingIOError:
            time.sleep(0.05)
        except ConnectionError:
            closed_by_sink = True  # over --max-buffer of unanswered input: a close
    # The sink stopped reading (or hung up): far less went in than a reader would take.
    assert sent < 20_000_000
    _served_normally(strict_sink)
    assert _rss_kb(pid) - before < 8_000
    sock.close()


def test_slowloris_is_cut_by_session_time(strict_sink: SinkProcess) -> None:
    sock, reader = _connect(strict_sink)
    stop = threading.Event()

    def drip() -> None:
        for byte in b"HELO slow.example.net and on and on and on":
            if stop.is_set():
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(1.0)

    dripper = threading.Thread(target=drip, daemon=True)
    started = time.monotonic()
    dripper.start()
    try:
        assert reader.readline() == b"421 4.4.2 mx.example.com Error: timeout exceeded\r\n"
        assert 5 < time.monotonic() - started < 9
        _served_normally(strict_sink)
    finally:
        stop.set()
        sock.close()


def test_idle_timeout(strict_sink: SinkProcess) -> None:
    sock, reader = _connect(strict_sink)
    with sock:
        started = time.monotonic()
        assert reader.readline() == b"421 4.4.2 mx.example.com Error: timeout exceeded\r\n"
        assert 1.5 < time.monotonic() - started < 4
        assert reader.read() == b""


def test_connections_per_ip_and_in_total(tmp_path: Path) -> None:
    with SinkProcess(tmp_path / "data", ["--max-connections-per-ip", "3",
                                         "--max-connections", "5"]) as sink:
        held = [_connect(sink, "127.0.0.2") for _ in range(3)]
        over = socket.create_connection((sink.host, sink.port), timeout=5,
                                        source_address=("127.0.0.2", 0))
        refusal = b"421 4.7.0 mx.example.com Error: too many connections\r\n"
        assert over.makefile("rb").read() == refusal
        over.close()
        held += [_connect(sink, "127.0.0.3") for _ in range(2)]
        over = socket.create_connection((sink.host, sink.port), timeout=5,
                                        source_address=("127.0.0.4", 0))
        assert over.makefile("rb").read().startswith(b"421 4.7.0 ")
        over.close()
        for sock, reader in held:
            reader.close()  # the reader holds the socket open too
            sock.close()
        time.sleep(0.3)
        _served_normally(sink)


def test_out_of_file_descriptors_recovers(tmp_path: Path) -> None:
    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    sink = SinkProcess(tmp_path / "data", ["--log-level", "warning"])
    sink.data.mkdir(parents=True)
    import subprocess

    log = open(sink.log_path, "ab")  # noqa: SIM115 - closed below
    sink.proc = subprocess.Popen(sink.command, stdout=log, stderr=subprocess.STDOUT,
                                 preexec_fn=low_fd_limit, env=sink.env)
    sink._log = log
    try:
        from tests.support import wait_for_port

        wait_for_port(sink.host, sink.port)
        crowd = []
        for _ in range(120):
            try:
                crowd.append(socket.create_connection((sink.host, sink.port), timeout=2))
            except OSError:
                break
        time.sleep(0.5)
        assert sink.proc.poll() is None, sink.log()
        for sock in crowd:
            sock.close()
        time.sleep(1.5)
        _served_normally(sink)
    finally:
        sink.stop()
    assert os.path.exists(sink.log_path)


def test_non_reader_is_aborted_after_its_timeout(tmp_path: Path) -> None:
    """Its 421 cannot be delivered, so the close must not wait for it forever."""
    with SinkProcess(tmp_path / "data", ["--idle-timeout", "1", "--max-session-time", "2",
                                         "--log-level", "warning"]) as sink:
        sock = socket.create_connection((sink.host, sink.port), timeout=10)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
        sock.setblocking(False)
        payload = b"EHLO x\r\n" * 10_000
        started = time.monotonic()
        aborted = False
        while time.monotonic() - started < 30 and not aborted:
            try:
                sock.send(payload)
            except BlockingIOError:
                time.sleep(0.2)
            except OSError:
                aborted = True  # reset by the sink
        sock.close()
        assert aborted, "a client that never reads kept its connection"
        _served_normally(sink)
