"""Socket-level costs for the sender, and the kernel's count of what it spent (Linux).

* ``TCP_MAXSEG`` on the listener is advertised in the SYN-ACK: the peer sends segments
  of at most that many bytes (kernel minimum 88). Listener-wide: every session.
* ``SO_RCVBUF`` set before ``listen()`` is inherited by accepted sockets and shrinks
  the window the peer may fill (kernel minimum 2,304 after doubling). Listener-wide.
* A small window per accepted connection (``--window-clamp``): ``SO_RCVBUF`` and
  ``TCP_WINDOW_CLAMP`` on the accepted socket, for every session or only tarpitted ones.
  Measured on Linux 6.18 (loopback): ``TCP_WINDOW_CLAMP`` alone changes nothing, while
  ``SO_RCVBUF`` on the accepted socket turned a 200 KB transfer from 139 segments in
  0.3 ms into 203 segments in 230 ms. The window already offered is never taken back,
  so this bites only beyond the first ~64 KB the peer sends.
* A classic BPF socket filter that drops a random fraction of incoming packets
  (``SO_ATTACH_FILTER``, ``SKF_AD_RANDOM``): on the listener it is inherited by every
  accepted socket (every session); attached to one accepted socket it costs only that
  sender. Needs root or ``CAP_NET_ADMIN``. The filter decides per packet as the socket
  receives it: after GRO (a real NIC) or with GSO (loopback) one packet may carry
  several segments, which are then lost and retransmitted together.
* :func:`tcp_info` reads ``TCP_INFO``: segments and bytes received, retransmissions.

Everything here raises :class:`SocketOptionError` with a one-line explanation.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import socket
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_SKF_AD_OFF = -0x1000
_SKF_AD_RANDOM = 56
_BPF_LD_W_ABS = 0x20
_BPF_JGE_K = 0x35
_BPF_RET_K = 0x06
TCP_INFO_LEN = 232
MIN_MSS = 88


class SocketOptionError(Exception):
    """A socket option could not be set; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class SocketCosts:
    """Which socket-level costs to impose, and on whom.

    ``mss`` and ``rcvbuf`` are set on the listener and so apply to every session.
    ``window_clamp`` is set per connection; ``drop_rate`` is a listener filter when
    ``for_all`` and a per-connection filter for tarpitted sessions otherwise.
    """

    mss: int | None = None
    rcvbuf: int | None = None
    window_clamp: int | None = None
    drop_rate: float = 0.0
    for_all: bool = False

    def __post_init__(self) -> None:
        if self.mss is not None and not MIN_MSS <= self.mss <= 65535:
            raise ValueError(f"--mss must be between {MIN_MSS} and 65535, not {self.mss}")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"--drop-rate must be at least 0 and below 1, not {self.drop_rate}")

    @property
    def active(self) -> bool:
        """True when any socket cost is set."""
        return bool(self.mss or self.rcvbuf or self.window_clamp or self.drop_rate)

    @property
    def per_connection(self) -> bool:
        """True when something is set on each accepted socket."""
        return bool(self.window_clamp or (self.drop_rate and not self.for_all))


def drop_filter(rate: float) -> bytes:
    """The classic BPF program (``struct sock_filter[]``) that drops ``rate`` of packets."""
    threshold = min(0xFFFFFFFF, int(rate * 2**32))
    program = [
        (_BPF_LD_W_ABS, 0, 0, (_SKF_AD_OFF + _SKF_AD_RANDOM) & 0xFFFFFFFF),  # A = random u32
        (_BPF_JGE_K, 0, 1, threshold),  # A >= threshold: keep, else drop
        (_BPF_RET_K, 0, 0, 0xFFFFFFFF),  # keep the whole packet
        (_BPF_RET_K, 0, 0, 0),  # drop
    ]
    return b"".join(struct.pack("HBBI", *insn) for insn in program)


def attach_drop_filter(sock: Any, rate: float) -> None:
    """Attach the random-drop filter to ``sock`` (a socket or a transport's socket)."""
    code = drop_filter(rate)
    buffer = ctypes.create_string_buffer(code, len(code))
    fprog = struct.pack("HL", len(code) // 8, ctypes.addressof(buffer))
    _set(sock, socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog, "--drop-rate (SO_ATTACH_FILTER)")


def _set(sock: Any, level: int, option: int, value: int | bytes, what: str) -> None:
    try:
        sock.setsockopt(level, option, value)
    except OSError as exc:
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise SocketOptionError(
                f"cannot set {what}: permission denied; it needs root or CAP_NET_ADMIN "
                f"(run as root, or grant the capability with setcap/AmbientCapabilities)"
            ) from None
        raise SocketOptionError(f"cannot set {what}: {exc.strerror or exc}") from None


def apply_listener(sock: socket.socket, costs: SocketCosts) -> None:
    """Set the listener-wide costs on ``sock``; call after ``bind()``, before ``listen()``."""
    if costs.mss is not None:
        _set(sock, socket.IPPROTO_TCP, socket.TCP_MAXSEG, costs.mss, f"--mss {costs.mss}")
    if costs.rcvbuf is not None:
        _set(sock, socket.SOL_SOCKET, socket.SO_RCVBUF, costs.rcvbuf, f"--rcvbuf {costs.rcvbuf}")
    if costs.drop_rate and costs.for_all:
        attach_drop_filter(sock, costs.drop_rate)


def check_connection_costs(costs: SocketCosts) -> None:
    """Fail at startup, not per connection, when the per-connection costs are not allowed."""
    if not costs.per_connection:
        return
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        apply_to_socket(probe, costs)


def apply_to_socket(sock: Any, costs: SocketCosts) -> None:
    """Set the per-connection costs on ``sock``; :class:`SocketOptionError` if refused."""
    if costs.window_clamp:
        what = f"--window-clamp {costs.window_clamp}"
        _set(sock, socket.SOL_SOCKET, socket.SO_RCVBUF, costs.window_clamp, what)
        _set(sock, socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, costs.window_clamp, what)
    if costs.drop_rate and not costs.for_all:
        attach_drop_filter(sock, costs.drop_rate)


def apply_connection(transport: Any, costs: SocketCosts) -> None:
    """Set the per-connection costs on an accepted connection; never raises.

    Privileges were checked at startup (:func:`check_connection_costs`); a connection
    that is already gone is simply skipped.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(SocketOptionError):
        apply_to_socket(sock, costs)


class TcpInfo(NamedTuple):
    """The parts of Linux ``struct tcp_info`` the sink records and its tests read."""

    state: int
    snd_mss: int
    rcv_mss: int
    total_retrans: int  # segments this side retransmitted
    bytes_received: int
    segs_out: int
    segs_in: int
    data_segs_in: int
    data_segs_out: int
    bytes_sent: int  # 0 before Linux 4.19
    rcv_ooopack: int  # out-of-order packets received: the sender's lost segments


def parse_tcp_info(raw: bytes) -> TcpInfo:
    """Decode the first 232 bytes of ``struct tcp_info`` (Linux 5.4 or later)."""
    state = raw[0]
    snd_mss, rcv_mss = struct.unpack_from("II", raw, 16)
    (total_retrans,) = struct.unpack_from("I", raw, 100)
    (bytes_received,) = struct.unpack_from("Q", raw, 128)
    segs_out, segs_in = struct.unpack_from("II", raw, 136)
    data_segs_in, data_segs_out = struct.unpack_from("II", raw, 152)
    (bytes_sent,) = struct.unpack_from("Q", raw, 200) if len(raw) >= 208 else (0,)
    (ooopack,) = struct.unpack_from("I", raw, 224) if len(raw) >= 228 else (0,)
    return TcpInfo(state, snd_mss, rcv_mss, total_retrans, bytes_received, segs_out, segs_in,
                   data_segs_in, data_segs_out, bytes_sent, ooopack)


def tcp_info(sock: Any) -> TcpInfo | None:
    """``TCP_INFO`` of ``sock``; ``None`` when the socket is closed or not TCP."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    except (OSError, ValueError):
        return None
    if len(raw) < 160:
        return None
    return parse_tcp_info(raw)


def tcp_info_of(transport: Any) -> TcpInfo | None:
    """``TCP_INFO`` of a transport's socket (uvloop keeps it open in ``connection_lost``)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    return tcp_info(sock) if sock is not None else None
