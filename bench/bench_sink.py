"""CPU per message of the sink against its peers, side by side in one run.

Servers: ``spamsink serve`` (recording on, per-session log off; ``spamsink-norecord``:
the engine alone, ``--no-record --api off``; ``spamsink-interpreted``: the same with
``SPAMSINK_INTERPRETED=1``, the engine's source instead of its compiled extension),
Postfix's C ``smtp-sink``,
``bare-uvloop`` (``bench/bare_sink.py``, the floor for a Python protocol on uvloop),
and aiosmtpd's discard ``Sink`` handler (on asyncio and on uvloop).
Load: Postfix's ``smtp-source -s 50 -l 1024``, once with a new connection per message
and once reusing connections (``-d``). For each we read the server process's CPU time
(utime + stime of the process and its children, from /proc) before and after, and
report µs of server CPU per message, messages per second, and the p50/p99 latency of
a HELO round trip measured by a probe client while the load runs.

Run as root (smtp-sink drops to ``nobody``)::

    .venv/bin/python bench/bench_sink.py [--messages 20000] [--rounds 3]

Needs Debian's postfix package (smtp-sink, smtp-source) and the dev extra (aiosmtpd).
Prints a Markdown table; the machine is shared, so compare the ratios.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from procstat import cpu_seconds, descendants, machine, rss_bytes

from sink import STALE, engine_build

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.support import free_port, wait_for_port  # noqa: E402

AIOSMTPD_UVLOOP = (
    "import asyncio, sys, uvloop\n"
    "from aiosmtpd.controller import Controller\n"
    "from aiosmtpd.handlers import Sink\n"
    "asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())\n"
    "async def main():\n"
    "    from aiosmtpd.smtp import SMTP\n"
    "    loop = asyncio.get_running_loop()\n"
    "    server = await loop.create_server(lambda: SMTP(Sink()), '127.0.0.1', int(sys.argv[1]))\n"
    "    await server.serve_forever()\n"
    "asyncio.run(main())\n"
)


def idle_cost(name: str, connections: int, workdir: Path) -> float:
    """Bytes of server RSS per idle connection (greeted, then silent)."""
    port = free_port()
    server = start_server(name, port, workdir)
    sockets: list[socket.socket] = []
    try:
        time.sleep(0.5)
        before = rss_bytes(descendants(server.pid))
        for index in range(connections):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10,
                                                source_address=(f"127.0.{index % 250 + 2}.1", 0))
            except OSError as exc:
                print(f"  {name}: connection {index} failed: {exc}", file=sys.stderr)
                return float("nan")
            sockets.append(sock)
        for sock in sockets:
            sock.recv(200)  # the greeting: the server has set the session up
        time.sleep(1.0)
        return (rss_bytes(descendants(server.pid)) - before) / connections
    finally:
        for sock in sockets:
            sock.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()


@dataclass
class Result:
    server: str
    shape: str
    messages: int
    seconds: float
    cpu: float
    p50_ms: float
    p99_ms: float

    @property
    def us_per_message(self) -> float:
        return self.cpu / self.messages * 1e6

    @property
    def rate(self) -> float:
        return self.messages / self.seconds


def probe_latency(port: int, stop: threading.Event, out: list[float]) -> None:
    """HELO round trips on one connection until ``stop``; times in ms into ``out``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            reader = sock.makefile("rb")
            reader.readline()
            while not stop.is_set():
                started = time.perf_counter()
                # HELO, not NOOP: Postfix (and the sink) count NOOPs past 100 as errors.
                sock.sendall(b"HELO probe.example\r\n")
                reader.readline()
                out.append((time.perf_counter() - started) * 1000)
                time.sleep(0.005)
            sock.sendall(b"QUIT\r\n")
    except OSError:
        pass


def start_server(name: str, port: int, workdir: Path) -> subprocess.Popen[bytes]:
    python = sys.executable
    env = dict(os.environ)
    if name.startswith("spamsink"):
        command = [python, "-m", "sink.cli", "serve", "--smtp", f"127.0.0.1:{port}",
                   "--data", str(workdir / "spamsink"), "--api", f"127.0.0.1:{free_port()}",
                   "--hostname", "mx.example.com", "--log-level", "warning",
                   "--max-connections-per-ip", "100000", "--max-connections", "100000"]
        if name in ("spamsink-norecord", "spamsink-interpreted"):  # no store, no API
            command += ["--no-record", "--api", "off"]
        if name == "spamsink-interpreted":
            env["SPAMSINK_INTERPRETED"] = "1"
    elif name == "smtp-sink":
        command = ["/usr/sbin/smtp-sink", "-u", "nobody", f"127.0.0.1:{port}", "1000"]
    elif name == "aiosmtpd":
        command = [python, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}",
                   "-c", "aiosmtpd.handlers.Sink"]
    elif name == "aiosmtpd-uvloop":
        command = [python, "-c", AIOSMTPD_UVLOOP, str(port)]
    elif name == "bare-uvloop":  # the floor for a Python engine on uvloop
        command = [python, str(REPO / "bench" / "bare_sink.py"), str(port)]
    else:
        raise ValueError(name)
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    wait_for_port("127.0.0.1", port, timeout=15.0)
    return proc


def run_load(name: str, shape: str, messages: int, workdir: Path) -> Result:
    port = free_port()
    server = start_server(name, port, workdir)
    try:
        time.sleep(0.3)
        before = cpu_seconds(descendants(server.pid))
        latencies: list[float] = []
        stop = threading.Event()
        probe = threading.Thread(target=probe_latency, args=(port, stop, latencies))
        probe.start()
        command = ["/usr/sbin/smtp-source", "-s", "50", "-l", "1024", "-m", str(messages),
                   "-f", "bench@example.net", "-t", "sink@example.org"]
        if shape == "reused":
            command.append("-d")
        started = time.monotonic()
        subprocess.run([*command, f"127.0.0.1:{port}"], check=True, timeout=600,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seconds = time.monotonic() - started
        stop.set()
        probe.join()
        time.sleep(0.3)
        cpu = cpu_seconds(descendants(server.pid)) - before
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    ordered = sorted(latencies) or [0.0]
    return Result(name, shape, messages, seconds, cpu,
                  statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3, help="median of this many runs")
    parser.add_argument("--servers", default="spamsink,spamsink-norecord,spamsink-interpreted,"
                        "smtp-sink,bare-uvloop,aiosmtpd,aiosmtpd-uvloop")
    parser.add_argument("--idle", type=int, default=5000,
                        help="idle connections for the memory measurement (0 = skip)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, max(soft, 2 * args.idle + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    if "spamsink" in args.servers and engine_build() == STALE:
        print(f"spamsink's engine is {STALE}", file=sys.stderr)
        return 2
    for tool in ("/usr/sbin/smtp-sink", "/usr/sbin/smtp-source"):
        if not os.access(tool, os.X_OK):
            print(f"needs {tool} (apt-get install postfix)", file=sys.stderr)
            return 2
    host = machine()
    servers = args.servers.split(",")
    workdir = Path(tempfile.mkdtemp(prefix="bench-sink-"))
    results: dict[tuple[str, str], list[Result]] = {}
    try:
        for _ in range(args.rounds):
            for shape in ("per-message", "reused"):
                for name in servers:  # interleaved, so noise hits every server alike
                    result = run_load(name, shape, args.messages, workdir)
                    results.setdefault((name, shape), []).append(result)
                    print(f"  {name:16} {shape:11} {result.us_per_message:7.1f} µs/msg "
                          f"{result.rate:8.0f} msg/s", file=sys.stderr)
        idle = {name: idle_cost(name, args.idle, workdir) for name in servers} if args.idle else {}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    def median(name: str, shape: str, attr: str) -> float:
        return statistics.median(getattr(r, attr) for r in results[(name, shape)])

    print(f"\nMachine: {host}; {args.messages} messages of 1 KB, "
          f"smtp-source -s 50 -l 1024, median of {args.rounds} interleaved rounds.\n")
    print("| server | shape | µs server CPU / message | vs smtp-sink | vs aiosmtpd "
          "| messages/s | HELO p50 ms | HELO p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    for shape in ("per-message", "reused"):
        base = median("smtp-sink", shape, "us_per_message") if "smtp-sink" in servers else None
        peer = median("aiosmtpd", shape, "us_per_message") if "aiosmtpd" in servers else None
        for name in servers:
            us = median(name, shape, "us_per_message")
            print(f"| {name} | {shape} | {us:.1f} | "
                  f"{us / base:.2f}x | " if base else f"| {name} | {shape} | {us:.1f} | - | ",
                  end="")
            print(f"{us / peer:.2f}x | " if peer else "- | ", end="")
            print(f"{median(name, shape, 'rate'):.0f} | {median(name, shape, 'p50_ms'):.2f} | "
                  f"{median(name, shape, 'p99_ms'):.2f} |")
    if idle:
        print(f"\n| server | server RSS per idle connection ({args.idle} connections) |")
        print("|---|---|")
        for name, cost in idle.items():
            shown = "n/a (refused connections)" if cost != cost else f"{cost / 1024:.2f} KiB"
            print(f"| {name} | {shown} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
