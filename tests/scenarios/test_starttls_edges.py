"""STARTTLS done right over real sockets: no command injection, never a lost 220."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

from tests.support import SinkProcess


def _tls_after(sock: socket.socket, reader) -> tuple[ssl.SSLSocket, object]:
    assert reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
    tls = ssl._create_unverified_context().wrap_socket(sock, server_hostname="mx.example.com")
    return tls, tls.makefile("rb")


def test_commands_pipelined_after_starttls_are_discarded(sink: SinkProcess) -> None:
    sock = socket.create_connection((sink.host, sink.port), timeout=10)
    reader = sock.makefile("rb")
    assert reader.readline().startswith(b"220 ")
    sock.sendall(b"EHLO x\r\n")
    while not reader.readline().startswith(b"250 "):
        pass
    sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.example>\r\nRCPT TO:<a@b.example>\r\n")
    tls, tls_reader = _tls_after(sock, reader)
    with tls:
        tls.sendall(b"RCPT TO:<a@example.org>\r\n")
        # Had the plaintext MAIL been run over TLS, this would be 250.
        assert tls_reader.readline() == b"503 5.5.1 Error: need MAIL command\r\n"


def test_starttls_reply_is_sent_even_after_ten_errors(tmp_path: Path) -> None:
    with SinkProcess(tmp_path / "data") as sink:
        sock = socket.create_connection((sink.host, sink.port), timeout=30)
        reader = sock.makefile("rb")
        assert reader.readline().startswith(b"220 ")
        for _ in range(10):
            sock.sendall(b"FOO\r\n")
            assert reader.readline().startswith(b"500 ")
        started = time.monotonic()
        sock.sendall(b"STARTTLS\r\n")
        tls, tls_reader = _tls_after(sock, reader)
        assert time.monotonic() - started < 5
        with tls:
            tls.sendall(b"QUIT\r\n")
            assert tls_reader.readline().startswith(b"221 ")
