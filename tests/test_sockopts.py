"""Socket-level costs on real loopback sockets, and TCP_INFO decoding."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from sink.sockopts import (
    SocketCosts,
    SocketOptionError,
    apply_listener,
    apply_to_socket,
    attach_drop_filter,
    drop_filter,
    tcp_info,
)
from tests.support import need_root


def test_drop_filter_program() -> None:
    code = drop_filter(0.25)
    insns = [struct.unpack_from("HBBI", code, i) for i in range(0, len(code), 8)]
    assert insns[0] == (0x20, 0, 0, 0xFFFFF000 + 56)  # ld random
    assert insns[1] == (0x35, 0, 1, 1 << 30)  # jge 2^32 / 4
    assert insns[2][3] == 0xFFFFFFFF and insns[3][3] == 0  # keep, drop
    assert struct.unpack_from("HBBI", drop_filter(0.99999999999), 8)[3] == 0xFFFFFFFF


def test_costs_are_validated() -> None:
    with pytest.raises(ValueError, match="--mss must be between 88 and 65535, not 40"):
        SocketCosts(mss=40)
    with pytest.raises(ValueError, match="--drop-rate must be at least 0 and below 1"):
        SocketCosts(drop_rate=1.0)
    assert SocketCosts(window_clamp=2048).per_connection
    assert SocketCosts(drop_rate=0.1).per_connection
    assert not SocketCosts(drop_rate=0.1, for_all=True).per_connection
    assert not SocketCosts(mss=88, rcvbuf=4096).per_connection


def _serve_one(listener: socket.socket, received: list[int]) -> None:
    conn, _ = listener.accept()
    with conn:
        total = 0
        while chunk := conn.recv(65536):
            total += len(chunk)
        received.append(total)
        info = tcp_info(conn)
        assert info is not None
        received.append(info.segs_in)
        received.append(info.bytes_received)


def test_small_mss_makes_the_client_send_small_segments() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    apply_listener(listener, SocketCosts(mss=88, rcvbuf=4096))
    listener.listen()
    received: list[int] = []
    server = threading.Thread(target=_serve_one, args=(listener, received))
    server.start()
    client = socket.create_connection(listener.getsockname())
    client.sendall(b"x" * 20_000)
    info = tcp_info(client)
    client.close()
    server.join(10)
    listener.close()
    assert info is not None and info.snd_mss <= 88
    total, segs_in, bytes_received = received
    assert total == 20_000 and bytes_received in (20_000, 20_001)  # FIN counts one
    assert segs_in >= 20_000 // 88  # the kernel counted every small segment


def test_tcp_info_of_a_closed_socket_is_none() -> None:
    sock = socket.socket()
    sock.close()
    assert tcp_info(sock) is None


def test_drop_filter_makes_the_client_retransmit() -> None:
    need_root()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    apply_listener(listener, SocketCosts(mss=536))  # ~40 segments, not one 64 KB one
    listener.listen()
    received: list[int] = []

    def serve() -> None:
        conn, _ = listener.accept()
        attach_drop_filter(conn, 0.2)  # per connection, as for tarpitted senders
        with conn:
            conn.sendall(b"go")  # the client talks after our greeting, as in SMTP
            while conn.recv(65536):
                pass
            conn.sendall(b"ok")
        received.append(1)

    server = threading.Thread(target=serve)
    server.start()
    client = socket.create_connection(listener.getsockname())
    client.settimeout(30)
    assert client.recv(2) == b"go"
    # Loopback passes GSO super-packets: one filter decision for many segments. Small
    # paced writes make each segment a packet of its own (40 decisions, not one or two).
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(40):
        client.sendall(b"x" * 500)
        time.sleep(0.002)
    client.shutdown(socket.SHUT_WR)
    assert client.recv(2) == b"ok"
    info = tcp_info(client)
    client.close()
    server.join(30)
    listener.close()
    assert info is not None and info.total_retrans > 0


def test_missing_privilege_is_named() -> None:
    class Unprivileged:
        def setsockopt(self, *args: object) -> None:
            raise PermissionError(1, "Operation not permitted")

    with pytest.raises(SocketOptionError, match="needs root or CAP_NET_ADMIN"):
        attach_drop_filter(Unprivileged(), 0.2)


def _segments_for(size: int, costs: SocketCosts | None) -> int:
    """Data segments a client needs for ``size`` bytes sent after the server's greeting."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    apply_listener(listener, SocketCosts(mss=1460))  # an Ethernet-sized MSS on loopback
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        if costs is not None:
            apply_to_socket(conn, costs)
        with conn:
            conn.sendall(b"go")
            while conn.recv(65536):
                pass

    server = threading.Thread(target=serve)
    server.start()
    with socket.create_connection(listener.getsockname()) as client:
        client.settimeout(30)
        assert client.recv(2) == b"go"
        client.sendall(b"x" * size)
        client.shutdown(socket.SHUT_WR)
        server.join(30)
        raw = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 232)
    listener.close()
    return struct.unpack_from("I", raw, 156)[0]  # tcpi_data_segs_out


def test_window_clamp_on_an_accepted_connection_shrinks_the_window() -> None:
    plain = _segments_for(200_000, None)
    clamped = _segments_for(200_000, SocketCosts(window_clamp=1152))
    assert clamped > plain * 1.2, (plain, clamped)
