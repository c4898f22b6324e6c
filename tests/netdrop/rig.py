"""A two-namespace rig: sender ns --veth-- sink ns, with the real sink and netdrop.

``Rig`` creates two network namespaces named ``nd-s-<id>`` (sender) and ``nd-k-<id>``
(sink) joined by a veth pair, with IPv4 and IPv6 addresses (two on the sender side),
and always deletes them (and kills the processes it started) on exit. Programs run in
a namespace with ``ip netns exec``; client code runs in the sender namespace on a
thread that has joined it with ``setns(2)`` (:meth:`Rig.call_in`), so the tests and the
benchmark measure the sender's cost with the sender's own kernel counters (TCP_INFO).
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import signal
import smtplib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sink.sockopts import tcp_info
from tests.support import spamsink_command, wait_for_port

T = TypeVar("T")

SENDER4, SENDER4_B, SENDER4_C, SINK4 = "10.203.0.1", "10.203.0.3", "10.203.0.4", "10.203.0.2"
SENDER6, SENDER6_B, SINK6 = "fd0d:203::1", "fd0d:203::3", "fd0d:203::2"
SMTP_PORT = 2525

_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_ids = itertools.count()


def netdrop_command() -> list[str]:
    """How to run the installed ``netdrop`` program."""
    exe = Path(sys.executable).parent / "netdrop"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "netdrop.cli"]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@dataclass
class SendResult:
    """The sender's side of one SMTP connection (TCP_INFO read before close)."""

    messages: int
    seconds: float
    total_retrans: int
    segs_out: int
    data_segs_out: int
    bytes_sent: int


def message(size: int) -> bytes:
    """A plain message of about ``size`` bytes."""
    head = b"From: a@sender.example\r\nTo: b@sink.example\r\nSubject: rig\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def send_mail(host: str, count: int, size: int, source: str | None = None,
              port: int = SMTP_PORT, timeout: float = 60.0) -> SendResult:
    """Send ``count`` messages of ``size`` bytes on one SMTP connection; raises on refusal."""
    body = message(size)
    start = time.monotonic()
    smtp = smtplib.SMTP(timeout=timeout, source_address=(source, 0) if source else None)
    try:
        smtp.connect(host, port)
        smtp.ehlo("sender.example")
        for _ in range(count):
            smtp.sendmail("a@sender.example", ["b@sink.example"], body)
        code, _ = smtp.docmd("QUIT")
        if code != 221:
            raise smtplib.SMTPResponseException(code, b"QUIT refused")
        seconds = time.monotonic() - start
        assert smtp.sock is not None
        info = tcp_info(smtp.sock)
        assert info is not None
    finally:
        smtp.close()
    return SendResult(count, seconds, info.total_retrans, info.segs_out, info.data_segs_out,
                      info.bytes_sent)


class Rig:
    """Sender and sink namespaces joined by veth; use as a context manager."""

    def __init__(self, workdir: Path) -> None:
        n = f"{os.getpid()}-{next(_ids)}"
        self.sender_ns, self.sink_ns = f"nd-s-{n}", f"nd-k-{n}"
        self.workdir = workdir
        self._procs: list[subprocess.Popen[bytes]] = []
        self.sink_data: Path | None = None
        self._veth = f"ndv{os.getpid() % 100000}{next(_ids)}"[:15]

    def __enter__(self) -> Rig:
        try:
            self._up()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _up(self) -> None:
        s, k, a, b = self.sender_ns, self.sink_ns, self._veth + "a", self._veth + "b"
        _ip("netns", "add", s)
        _ip("netns", "add", k)
        _ip("link", "add", a, "netns", s, "type", "veth", "peer", "name", b, "netns", k)
        for ns, dev, addrs in ((s, a, (SENDER4, SENDER4_B, SENDER4_C, SENDER6, SENDER6_B)),
                               (k, b, (SINK4, SINK6))):
            _ip("-n", ns, "link", "set", "lo", "up")
            for addr in addrs:
                if ":" in addr:
                    _ip("-n", ns, "addr", "add", f"{addr}/64", "dev", dev, "nodad")
                else:
                    _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")

    def close(self) -> None:
        """Stop every process started here, then delete both namespaces."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        self._procs.clear()
        for ns in (self.sender_ns, self.sink_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)

    def popen(self, ns: str, cmd: Sequence[str], log: Path) -> subprocess.Popen[bytes]:
        """Start ``cmd`` in namespace ``ns`` with stdout and stderr to ``log``."""
        with open(log, "ab") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], stdout=out,
                                    stderr=subprocess.STDOUT)
        self._procs.append(proc)
        return proc

    def run(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``cmd`` in ``ns`` to completion."""
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                              check=check)

    def call_in(self, ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on a thread inside namespace ``ns``; its result or its exception."""
        box: dict[str, Any] = {}

        def target() -> None:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns({ns}) failed")
            finally:
                os.close(fd)
            try:
                box["result"] = fn(*args, **kwargs)
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target)
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["result"]

    def start_in(self, ns: str, fn: Callable[..., Any], *args: Any) -> threading.Thread:
        """Start ``fn(*args)`` on a daemon thread inside namespace ``ns`` (not joined)."""
        thread = threading.Thread(target=self.call_in, args=(ns, fn, *args), daemon=True)
        thread.start()
        return thread

    def send(self, count: int = 1, size: int = 2000, source: str | None = None,
             host: str = SINK4, timeout: float = 60.0) -> SendResult:
        """Send mail from the sender namespace to the sink."""
        return self.call_in(self.sender_ns, send_mail, host, count, size, source,
                            timeout=timeout)

    def wait_port(self, ns: str, host: str, port: int, timeout: float = 15.0) -> None:
        """Wait, inside namespace ``ns``, until something accepts on ``host:port``."""
        self.call_in(ns, wait_for_port, host, port, timeout)

    def start_sink(self, data: Path) -> subprocess.Popen[bytes]:
        """The real ``spamsink serve`` on :2525 (v4 and v6) in the sink namespace."""
        data.mkdir(parents=True, exist_ok=True)
        self.sink_data = data
        proc = self.popen(self.sink_ns, [*spamsink_command(), "serve", "--smtp",
                                         f"0.0.0.0:{SMTP_PORT}", "--smtp", f"[::]:{SMTP_PORT}",
                                         "--data", str(data), "--hostname", "mx.example.com",
                                         "--log-level", "warning"],
                          data / "serve.log")
        self.wait_port(self.sink_ns, SINK4, SMTP_PORT)
        return proc

    def start_netdrop(self, *args: str, log: Path | None = None,
                      wait: bool = True) -> subprocess.Popen[bytes]:
        """``netdrop --port 2525 ARGS`` in the sink namespace; waits for its rules."""
        log = log or self.workdir / "netdrop.log"
        start = log.stat().st_size if log.exists() else 0
        proc = self.popen(self.sink_ns, [*netdrop_command(), "--port", str(SMTP_PORT), *args],
                          log)
        if wait:
            deadline = time.monotonic() + 15
            marker = " via "
            while marker not in log.read_bytes()[start:].decode(errors="replace"):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"netdrop did not start:\n{log.read_text()}")
                time.sleep(0.05)
        return proc

    def rules_text(self) -> str:
        """Every firewall rule in the sink namespace (iptables, ip6tables and nft)."""
        parts = [self.run(self.sink_ns, tool, "-S", check=False).stdout
                 for tool in ("iptables", "ip6tables")]
        parts.append(self.run(self.sink_ns, "nft", "list", "ruleset", check=False).stdout)
        return "\n".join(parts)


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
    """Send ``sig`` and wait for the exit status."""
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout=timeout)


@contextlib.contextmanager
def rig_with_sink(tmp_path: Path) -> Iterator[Rig]:
    """A :class:`Rig` with the sink already listening."""
    with Rig(tmp_path) as rig:
        rig.start_sink(tmp_path / "data")
        yield rig
