"""``spamsink serve`` as a user meets it: options, errors, TLS, workers, shutdown, scanners."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from pathlib import Path

import pytest

from sink import smtp
from tests.support import SinkProcess, free_port, need_root, need_tool, spamsink_command


def _greeting(host: str, port: int) -> bytes:
    with socket.create_connection((host, port), timeout=5) as sock:
        return sock.makefile("rb").readline()


def test_version_and_help() -> None:
    out = subprocess.run([*spamsink_command(), "version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("spamsink ")
    compiled = not (smtp.__file__ or "").endswith(".py")
    assert out.stdout.rstrip().endswith("(engine compiled)" if compiled
                                        else "(engine interpreted)")
    helptext = subprocess.run([*spamsink_command(), "serve", "--help"], capture_output=True,
                              text=True).stdout
    for option in ("--smtp", "--smtps", "--data", "--hostname", "--persona", "--domains",
                   "--workers", "--max-message-size", "--idle-timeout", "--log-format"):
        assert option in helptext


def test_port_25_without_permission_says_what_to_do(tmp_path: Path) -> None:
    command = [*spamsink_command(), "serve", "--smtp", "127.0.0.1:25", "--data", str(tmp_path)]
    if os.geteuid() == 0:
        # Root without CAP_NET_BIND_SERVICE is refused port 25 like any other user.
        command = [need_tool("setpriv"), "--bounding-set=-net_bind_service", *command]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "permission denied" in lines[0] and "CAP_NET_BIND_SERVICE" in lines[0]


def test_address_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([*spamsink_command(), "serve", "--smtp", f"127.0.0.1:{port}",
                                 "--data", str(tmp_path), "--api", f"127.0.0.1:{free_port()}"],
                                capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "address is in use" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_bad_option_values_are_refused(tmp_path: Path) -> None:
    for args, needle in ((["--max-message-size", "lots"], "not a size"),
                         (["--idle-timeout", "-5"], "must not be negative"),
                         (["--persona", "sendmail"], "invalid choice")):
        result = subprocess.run([*spamsink_command(), "serve", *args], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 2 and needle in result.stderr, result.stderr


def test_environment_sets_options(tmp_path: Path) -> None:
    sink = SinkProcess(tmp_path / "data", env={"SPAMSINK_PERSONA": "exim",
                                                "SPAMSINK_HOSTNAME": "relay.example.net"})
    sink.command = [arg for arg in sink.command if arg not in ("--hostname", "mx.example.com")]
    with sink:
        assert _greeting(sink.host, sink.port).startswith(b"220 relay.example.net ESMTP Exim 4.96 ")


def test_self_signed_certificate_is_made_once_and_kept(tmp_path: Path) -> None:
    def fingerprint(sink: SinkProcess) -> bytes:
        with smtplib.SMTP(sink.host, sink.port, timeout=10) as client:
            client.starttls(context=ssl._create_unverified_context())
            return client.sock.getpeercert(binary_form=True)

    with SinkProcess(tmp_path / "data") as sink:
        first = fingerprint(sink)
    assert (tmp_path / "data" / "tls-key.pem").stat().st_mode & 0o777 == 0o600
    with SinkProcess(tmp_path / "data") as sink:
        assert fingerprint(sink) == first


def test_implicit_tls_and_ipv6(tmp_path: Path) -> None:
    tls_port = free_port()
    with SinkProcess(tmp_path / "data", ["--smtps", f"127.0.0.1:{tls_port}"]) as sink:
        context = ssl._create_unverified_context()
        with socket.create_connection(("127.0.0.1", tls_port), timeout=5) as raw, \
                context.wrap_socket(raw) as tls:
            assert tls.makefile("rb").readline().startswith(b"220 mx.example.com ESMTP Postfix")
    try:
        with SinkProcess(tmp_path / "data6", host="::1") as sink:
            assert _greeting("::1", sink.port).startswith(b"220 ")
    except OSError:
        pytest.skip("no IPv6 loopback on this machine")


def test_sigterm_lets_sessions_finish_then_closes_the_rest(tmp_path: Path) -> None:
    sink = SinkProcess(tmp_path / "data", ["--grace", "2"]).start()
    finishing = socket.create_connection((sink.host, sink.port), timeout=10)
    idle = socket.create_connection((sink.host, sink.port), timeout=10)
    finishing_reader, idle_reader = finishing.makefile("rb"), idle.makefile("rb")
    assert finishing_reader.readline().startswith(b"220")
    assert idle_reader.readline().startswith(b"220")
    sink.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    with pytest.raises(OSError):
        socket.create_connection((sink.host, sink.port), timeout=2).recv(1)
    finishing.sendall(b"HELO x\r\nQUIT\r\n")
    assert finishing_reader.readline() == b"250 mx.example.com\r\n"
    assert finishing_reader.readline() == b"221 2.0.0 Bye\r\n"
    assert idle_reader.readline().startswith(b"421 4.3.2 mx.example.com")
    assert sink.proc.wait(timeout=10) == 0
    sink.stop()
    for sock in (finishing, idle):
        sock.close()


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def test_workers_share_the_port_and_are_restarted(tmp_path: Path) -> None:
    with SinkProcess(tmp_path / "data", ["--workers", "2"]) as sink:
        deadline = time.monotonic() + 15
        while len(_children(sink.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _children(sink.proc.pid)
        assert len(workers) == 2
        for _ in range(20):
            assert _greeting(sink.host, sink.port).startswith(b"220 ")
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            now = _children(sink.proc.pid)
            if len(now) == 2 and victim not in now:
                break
            time.sleep(0.1)
        assert victim not in _children(sink.proc.pid) and len(_children(sink.proc.pid)) == 2
        time.sleep(1.0)
        for _ in range(20):
            assert _greeting(sink.host, sink.port).startswith(b"220 ")
        supervisor = sink.proc
        remaining = _children(supervisor.pid)
    assert supervisor.returncode == 0
    for pid in remaining:
        status = Path(f"/proc/{pid}/status")
        assert not status.exists() or "zombie" in status.read_text()


def test_workers_stop_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    sink = SinkProcess(tmp_path / "data", ["--workers", "2", "--grace", "1"]).start()
    try:
        deadline = time.monotonic() + 15
        while len(_children(sink.proc.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        workers = _children(sink.proc.pid)
        assert len(workers) == 2
        assert _greeting(sink.host, sink.port).startswith(b"220 ")
        os.kill(sink.proc.pid, signal.SIGKILL)  # no chance to stop them itself
        sink.proc.wait(10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "orphaned workers still serve"
        assert "the supervisor is gone: shutting down" in sink.log()
        with pytest.raises(OSError):
            _greeting(sink.host, sink.port)
    finally:
        sink.stop()


def _alive(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status")
    try:
        return "zombie" not in status.read_text()
    except OSError:
        return False


def test_nmap_calls_it_postfix(sink: SinkProcess) -> None:
    need_root()
    nmap = need_tool("nmap")
    result = subprocess.run([nmap, "-sV", "-Pn", "-p", str(sink.port), sink.host],
                            capture_output=True, text=True, timeout=180)
    assert "Postfix smtpd" in result.stdout, result.stdout


def test_session_local_address_on_specific_and_wildcard_listeners(tmp_path: Path) -> None:
    """A specific listener's address is taken as is; a wildcard one asks each socket."""
    wildcard = free_port("0.0.0.0")
    args = ["--smtp", f"0.0.0.0:{wildcard}", "--log-level", "info", "--log-format", "json"]
    with SinkProcess(tmp_path / "data", args, host="127.0.0.2") as sink:
        for host, port in (("127.0.0.2", sink.port), ("127.0.0.3", wildcard)):
            with smtplib.SMTP(host, port, timeout=5) as client:
                client.ehlo("client.example.net")
        deadline = time.monotonic() + 5
        ours = '"helo":"client.example.net"'  # not the start-up probe's session
        while time.monotonic() < deadline and sink.log().count(ours) < 2:
            time.sleep(0.05)
        sessions = [json.loads(line) for line in sink.log().splitlines() if ours in line]
    assert sorted(s["local"] for s in sessions) == [f"127.0.0.2:{sink.port}",
                                                    f"127.0.0.3:{wildcard}"]
