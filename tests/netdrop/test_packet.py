"""netdrop.packet.parse against packets built by scapy (no root needed)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

scapy_all = pytest.importorskip("scapy.all")
IP, IPv6, TCP, UDP = scapy_all.IP, scapy_all.IPv6, scapy_all.TCP, scapy_all.UDP
IPv6ExtHdrHopByHop = scapy_all.IPv6ExtHdrHopByHop
IPv6ExtHdrDestOpt = scapy_all.IPv6ExtHdrDestOpt
IPv6ExtHdrRouting = scapy_all.IPv6ExtHdrRouting
IPv6ExtHdrFragment = scapy_all.IPv6ExtHdrFragment

from netdrop.packet import ACK, FIN, PSH, RST, SYN, parse  # noqa: E402

TCP_OPTIONS = [[], [("MSS", 1460)], [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))],
               [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (5, 6)), ("WScale", 7)]]


def _expect(pkt, src: str) -> tuple[bytes, int, int, int]:
    tcp = pkt[TCP]
    return (ipaddress.ip_address(src).packed, tcp.dport, int(tcp.flags), len(bytes(tcp.payload)))


@settings(max_examples=120, deadline=None)
@given(src=st.ip_addresses(v=4), dport=st.integers(1, 65535), flags=st.integers(0, 0xFF),
       payload=st.binary(max_size=1500), options=st.sampled_from(TCP_OPTIONS),
       ip_options=st.booleans())
def test_ipv4_fields_match_scapy(src, dport, flags, payload, options, ip_options) -> None:
    opts = [scapy_all.IPOption_RR(routers=["1.2.3.4"])] if ip_options else []
    pkt = IP(src=str(src), dst="192.0.2.1", options=opts) / TCP(
        dport=dport, flags=flags, options=options) / payload
    raw = bytes(pkt)
    assert parse(raw) == _expect(IP(raw), str(src))


@settings(max_examples=120, deadline=None)
@given(src=st.ip_addresses(v=6), dport=st.integers(1, 65535), flags=st.integers(0, 0xFF),
       payload=st.binary(max_size=1500), options=st.sampled_from(TCP_OPTIONS),
       ext=st.lists(st.sampled_from(["hop", "dst", "rt", "frag"]), max_size=3))
def test_ipv6_fields_match_scapy(src, dport, flags, payload, options, ext) -> None:
    headers = {"hop": IPv6ExtHdrHopByHop, "dst": IPv6ExtHdrDestOpt,
               "rt": lambda: IPv6ExtHdrRouting(addresses=["2001:db8::9"]),
               "frag": lambda: IPv6ExtHdrFragment(offset=0, m=0)}
    pkt = IPv6(src=str(src), dst="2001:db8::1")
    for name in ext:
        pkt = pkt / headers[name]()
    pkt = pkt / TCP(dport=dport, flags=flags, options=options) / payload
    raw = bytes(pkt)
    assert parse(raw) == _expect(IPv6(raw), str(src))


def test_flags_and_lengths_of_common_segments() -> None:
    syn = bytes(IP(src="203.0.113.7", dst="192.0.2.1") / TCP(dport=25, flags="S"))
    assert parse(syn) == (bytes([203, 0, 113, 7]), 25, SYN, 0)
    data = bytes(IP(src="203.0.113.7") / TCP(dport=25, flags="PA") / b"EHLO x\r\n")
    assert parse(data)[2:] == (PSH | ACK, 8)
    fin = bytes(IPv6(src="2001:db8::7") / TCP(dport=587, flags="FA"))
    assert parse(fin)[1:] == (587, FIN | ACK, 0)
    rst = bytes(IP() / TCP(flags="R"))
    assert parse(rst)[2] == RST


def test_headers_cut_after_tcp_still_give_the_full_payload_length() -> None:
    raw = bytes(IP(src="198.51.100.1") / TCP(dport=25, flags="A") / (b"x" * 1400))
    assert parse(raw[:60]) == (bytes([198, 51, 100, 1]), 25, ACK, 1400)


@pytest.mark.parametrize("raw", [
    bytes(IP() / UDP(dport=25) / b"x"),
    bytes(IPv6() / UDP(dport=25)),
    bytes(IP(frag=100, proto=6) / (b"x" * 40)),
    bytes(IPv6() / IPv6ExtHdrFragment(offset=10, nh=6) / (b"x" * 40)),
    bytes(IP() / TCP())[:30],
    bytes(IPv6() / TCP())[:50],
    b"",
    b"\x00" * 60,
], ids=["udp4", "udp6", "fragment4", "fragment6", "short4", "short6", "empty", "version0"])
def test_not_a_first_tcp_fragment_is_none(raw: bytes) -> None:
    assert parse(raw) is None


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(raw: bytes) -> None:
    result = parse(raw)
    assert result is None or (len(result[0]) in (4, 16) and 0 <= result[2] <= 0xFF)


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=20, max_size=120), st.sampled_from([0x45, 0x46, 0x4F, 0x60]))
def test_arbitrary_headers_with_a_valid_version_never_raise(raw: bytes, first: int) -> None:
    raw = bytes([first]) + raw[1:9] + b"\x06" + raw[10:] if first & 0xF0 == 0x40 else \
        bytes([first]) + raw[1:6] + b"\x06" + raw[7:]
    parse(raw)
