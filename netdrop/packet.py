"""The few header fields netdrop needs, read from raw IPv4/IPv6 bytes with ``struct``.

:func:`parse` is on the per-packet path: no objects are built, nothing beyond the IP and
TCP fixed headers (and IPv6 extension headers) is read. It returns ``None`` for anything
that is not the first fragment of a TCP segment with a complete TCP header in the
buffer; the caller passes such packets untouched.
"""

from __future__ import annotations

import struct

# TCP flag bits (byte 13 of the TCP header).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10

_TCP = 6
_V4 = struct.Struct("!BxHxxHxB")  # version/ihl, total length, flags/fragment offset, protocol
_V6 = struct.Struct("!xxxxHB")  # payload length, next header
_TCP_HDR = struct.Struct("!xxH8xBB")  # destination port, data offset, flags
_TCP_MIN = 20
# IPv6 extension headers whose length is (byte 1 + 1) * 8: hop-by-hop, routing, destination.
_EXT_8 = frozenset((0, 43, 60))
_FRAGMENT = 44
_AH = 51

Fields = tuple[bytes, int, int, int]
"""(source address as 4 or 16 packed bytes, destination port, TCP flags, payload length)."""


def parse(buf: bytes) -> Fields | None:
    """Source address, destination port, TCP flags and TCP payload length of ``buf``.

    ``buf`` is an IP packet as the kernel queues it (it may be cut after the headers:
    lengths are taken from the IP header, not from ``len(buf)``). Returns ``None`` for
    non-TCP packets, non-first fragments and truncated headers.
    """
    n = len(buf)
    if n < 20:
        return None
    version = buf[0] >> 4
    if version == 4:
        vihl, total, frag, proto = _V4.unpack_from(buf)
        if proto != _TCP or frag & 0x1FFF:
            return None
        off = (vihl & 0x0F) << 2
        if off < 20 or n < off + _TCP_MIN:
            return None
        dport, doff, flags = _TCP_HDR.unpack_from(buf, off)
        return buf[12:16], dport, flags, total - off - ((doff >> 4) << 2)
    if version == 6:
        if n < 40 + _TCP_MIN:
            return None
        plen, nxt = _V6.unpack_from(buf)
        off = 40
        while nxt != _TCP:
            if nxt in _EXT_8:
                if n < off + 8:
                    return None
                nxt, size = buf[off], (buf[off + 1] + 1) << 3
            elif nxt == _FRAGMENT:
                if n < off + 8 or (buf[off + 2] << 8 | buf[off + 3]) & 0xFFF8:
                    return None
                nxt, size = buf[off], 8
            elif nxt == _AH:
                if n < off + 8:
                    return None
                nxt, size = buf[off], (buf[off + 1] + 2) << 2
            else:
                return None
            off += size
        if n < off + _TCP_MIN:
            return None
        dport, doff, flags = _TCP_HDR.unpack_from(buf, off)
        return buf[8:24], dport, flags, 40 + plen - off - ((doff >> 4) << 2)
    return None
