"""Local source addresses for ``--source``: parsing, round-robin, and bound sockets.

Contract:

* :func:`parse_sources` accepts ``ADDR[,ADDR...]`` where each item is one IPv4/IPv6
  address or an inclusive range ``FIRST-LAST`` of the same family, and returns the
  addresses in order; it raises :class:`SourceError` with one line for anything else,
  mixed families, or more than :data:`MAX_SOURCES` addresses.
* :class:`SourceRotation` hands out the addresses round-robin from an offset.
* :func:`tcp_socket` returns a non-blocking TCP socket without Nagle's delay, as
  ``create_connection`` makes; :func:`bound_socket` one bound to a source address
  with ``IP_BIND_ADDRESS_NO_PORT``, so the kernel picks the local port at connect time
  from the whole 4-tuple: each source address has its own ~28,000 ephemeral ports
  towards one server port, which is what lets one machine open more connections.
"""

from __future__ import annotations

import ipaddress
import socket

MAX_SOURCES = 65536
_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class SourceError(ValueError):
    """A --source value that cannot be used."""


def _address(text: str) -> Address:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        raise SourceError(f"--source: {text.strip()!r} is not an IP address") from None


def parse_sources(text: str) -> list[str]:
    """The addresses named by ``text`` (see the module contract)."""
    out: list[str] = []
    family = None
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        first_text, dash, last_text = item.partition("-")
        first = _address(first_text)
        last = _address(last_text) if dash else first
        if first.version != last.version:
            raise SourceError(f"--source: range {item!r} mixes IPv4 and IPv6")
        if int(last) < int(first):
            raise SourceError(f"--source: range {item!r} ends before it starts")
        if family is not None and first.version != family:
            raise SourceError("--source: addresses must be all IPv4 or all IPv6")
        family = first.version
        count = int(last) - int(first) + 1
        if len(out) + count > MAX_SOURCES:
            raise SourceError(f"--source: more than {MAX_SOURCES} addresses")
        cls = type(first)
        out.extend(str(cls(n)) for n in range(int(first), int(last) + 1))
    if not out:
        raise SourceError("--source: no addresses given")
    return out


class SourceRotation:
    """Round-robin over source addresses, starting at ``offset``."""

    __slots__ = ("_addresses", "_next")

    def __init__(self, addresses: list[str], offset: int = 0) -> None:
        self._addresses = addresses
        self._next = offset % len(addresses)

    def __len__(self) -> int:
        return len(self._addresses)

    def next(self) -> str:
        address = self._addresses[self._next]
        self._next = (self._next + 1) % len(self._addresses)
        return address


def tcp_socket(family: int) -> socket.socket:
    """A non-blocking TCP socket of ``family`` with TCP_NODELAY."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        sock.close()
        raise
    return sock


def bound_socket(source: str) -> socket.socket:
    """A non-blocking TCP socket bound to ``source`` (port chosen at connect)."""
    sock = tcp_socket(socket.AF_INET6 if ":" in source else socket.AF_INET)
    try:
        sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
        sock.bind((source, 0))
    except OSError:
        sock.close()
        raise
    return sock
