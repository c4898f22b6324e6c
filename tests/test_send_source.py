"""``--source`` parsing and binding, and the ticket pools behind exact ``-n`` accounting."""

from __future__ import annotations

import socket
import time

import pytest

from sink.send_pace import CountPool, DeadlinePool, RatePacer
from sink.send_source import SourceError, SourceRotation, bound_socket, parse_sources


def test_list_and_ranges() -> None:
    assert parse_sources("127.0.0.2-127.0.0.4,127.0.0.9") == [
        "127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9"]
    assert parse_sources("::1") == ["::1"]
    assert len(parse_sources("127.0.0.2-127.0.0.254")) == 253
    assert parse_sources("10.0.0.255-10.0.1.1") == ["10.0.0.255", "10.0.1.0", "10.0.1.1"]


@pytest.mark.parametrize(("text", "message"), [
    ("127.0.0.300", "not an IP address"),
    ("127.0.0.9-127.0.0.2", "ends before it starts"),
    ("127.0.0.1-::1", "mixes IPv4 and IPv6"),
    ("127.0.0.1,::1", "all IPv4 or all IPv6"),
    ("10.0.0.0-10.255.255.255", "more than 65536"),
    (",", "no addresses"),
])
def test_bad_sources_fail_with_one_line(text: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        parse_sources(text)


def test_rotation_is_round_robin_from_an_offset() -> None:
    rotation = SourceRotation(["a", "b", "c"], offset=1)
    assert [rotation.next() for _ in range(5)] == ["b", "c", "a", "b", "c"]


def test_bound_socket_connects_from_the_source_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server:
        sock = bound_socket("127.0.0.7")
        sock.setblocking(True)
        sock.connect(server.getsockname())
        conn, peer = server.accept()
        assert peer[0] == "127.0.0.7"
        conn.close()
        sock.close()


def test_count_pool_reserves_and_takes_back_exactly() -> None:
    pool = CountPool(25)
    assert [pool.reserve(10) for _ in range(4)] == [10, 10, 5, 0]
    pool.give_back(3)
    assert pool.reserve(10) == 3 and pool.remaining == 0
    pool.give_back(2)
    pool.close()
    assert pool.reserve(1) == 0 and not pool.open() and pool.remaining == 2


def test_deadline_pool_closes_at_its_deadline() -> None:
    pool = DeadlinePool(time.perf_counter() + 60)
    assert pool.reserve(7) == 7 and pool.open()
    assert DeadlinePool(time.perf_counter() - 1).reserve(7) == 0
    pool.close()
    assert not pool.open()


def test_rate_pacer_spaces_starts() -> None:
    pacer = RatePacer(100.0)
    delays = [pacer.delay() for _ in range(5)]
    assert delays[0] == pytest.approx(0.0, abs=1e-3)
    assert delays[4] == pytest.approx(0.04, abs=2e-3)
