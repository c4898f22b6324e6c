"""Tarpit benchmarks: what a held connection costs us, and what the tarpit costs the sender.

``hold``: ``spamsink serve --tarpit spamd --tarpit-who all`` holds N connections opened
by ``spamsink send --hold N`` from 127.0.0.2-127.0.0.254 (no ephemeral-port limit),
every reply stuttered at 1 byte/s within the sink's ``--write-budget`` (its default
unless ``--sink-args`` says otherwise). Reported: sink RSS per held connection (all
worker processes, held minus idle), sink CPU while holding (percent of one core,
sampled over ``--window`` seconds), the sink's write system calls per second in that
window (each a stuttered byte) and so the seconds between bytes per connection and
the CPU per write, kernel TCP memory. RLIMIT_NOFILE is raised as far as the
process may; when a process may not hold N sockets, the sink runs ``--workers`` and the
client ``--procs`` so that each process stays under its limit.

``costs``: for each preset and each socket option, one sink per configuration (all in
parallel), three 20 KB messages on three concurrent connections from a smtplib client
that reads its own socket's TCP_INFO. Reported per message: seconds, segments the
client sent, retransmissions, and the multipliers against the unpaced sink.

    .venv/bin/python bench/bench_hold.py hold --counts 10000,50000,100000
    .venv/bin/python bench/bench_hold.py costs
    .venv/bin/python bench/bench_hold.py floor --count 9000

``floor``: the CPU of writing one byte per second to each of N uvloop transports, with a
timer per transport (the engine's shape) or one loop over all: what stuttering costs
at the least.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import resource
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from procstat import cpu_seconds, descendants, machine, rss_bytes

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from sink.sockopts import tcp_info  # noqa: E402
from tests.support import free_port  # noqa: E402

SPAMSINK = [sys.executable, "-m", "sink.cli"]
MESSAGE = b"Subject: bench\r\n\r\n" + b"spam " * 4000 + b"\r\n"  # 20 KB


def raise_nofile() -> int:
    """Raise RLIMIT_NOFILE as far as allowed; return the soft limit reached."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for wanted in (1_048_576, 262_144):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
            return wanted
        except (ValueError, OSError):
            continue
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def write_calls(pids: list[int]) -> int:
    """Write system calls the processes made so far (``syscw`` in /proc/PID/io)."""
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/io").read_text().splitlines():
                if line.startswith("syscw:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def open_fds(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += len(os.listdir(f"/proc/{pid}/fd"))
    return total


def kernel_slab_bytes() -> int:
    """The kernel's slab memory (sockets, files, ...), machine-wide: both ends of loopback."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1]) * 1024
    return 0


def start_sink(port: int, data: Path, args: list[str]) -> subprocess.Popen[bytes]:
    command = [*SPAMSINK, "serve", "--smtp", f"127.0.0.1:{port}", "--data", str(data),
               "--hostname", "mx.example.com", "--api", "off", "--log-level", "warning", *args]
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=open(data / "serve.log", "ab"))  # noqa: SIM115
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"sink did not start: {(data / 'serve.log').read_text()}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- hold ----------------------------------------------------------------------------


def hold(count: int, nofile: int, window: float, extra: list[str]) -> dict[str, object]:
    per_process = max(1000, nofile - 200)
    processes = -(-count // per_process)
    workers = processes if processes == 1 else processes + 1  # SO_REUSEPORT spreads unevenly
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bench-hold-"))
    args = ["--tarpit", "spamd", "--tarpit-who", "all", "--max-tarpitted", str(count),
            "--max-connections", str(count), "--max-connections-per-ip", str(count),
            "--backlog", "4096", "--no-record", "--idle-timeout", "3600", *extra]
    if workers > 1:
        args += ["--workers", str(workers)]
    sink = start_sink(port, data, args)
    try:
        time.sleep(2.0)
        pids = descendants(sink.pid)
        idle_rss = rss_bytes(pids)
        idle_slab = kernel_slab_bytes()
        idle_fds = open_fds(pids)
        ramp = max(30, count // 500)
        hold_seconds = ramp + window + 30
        client = subprocess.Popen(
            [*SPAMSINK, "send", "--hold", str(count), "-t", str(hold_seconds), "--json",
             "--source", "127.0.0.2-127.0.0.254", "--procs", str(processes), "-p", str(port),
             "127.0.0.1"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started = time.monotonic()
        while time.monotonic() - started < ramp + 20:
            time.sleep(1.0)
            if open_fds(descendants(sink.pid)) - idle_fds >= count:
                break
        ramp_seconds = time.monotonic() - started
        time.sleep(5.0)
        held_fds = open_fds(descendants(sink.pid)) - idle_fds
        pids = descendants(sink.pid)
        cpu_before, writes_before = cpu_seconds(pids), write_calls(pids)
        wall_before = time.monotonic()
        time.sleep(window)
        pids = descendants(sink.pid)
        elapsed = time.monotonic() - wall_before
        cpu = (cpu_seconds(pids) - cpu_before) / elapsed
        writes = (write_calls(pids) - writes_before) / elapsed
        held_rss = rss_bytes(pids)
        held_slab = kernel_slab_bytes()
        held_fds = open_fds(pids) - idle_fds
        out, err = client.communicate(timeout=hold_seconds + 120)
        report = json.loads(out) if out.strip() else {"error": err.decode()[-500:]}
    finally:
        stop(sink)
        shutil.rmtree(data, ignore_errors=True)
    connections = held_fds  # sink-side sockets when RSS was sampled
    return {
        "connections": count,
        "sink_options": " ".join(["--tarpit spamd --tarpit-who all", *extra]),
        "sink_processes": workers,
        "sink_writes_per_second": round(writes),
        "seconds_between_writes_per_connection": round(held_fds / writes, 2) if writes else None,
        "cpu_us_per_write": round(cpu * 1e6 / writes, 1) if writes else None,
        "client_processes": processes,
        "ramp_seconds": round(ramp_seconds, 1),
        "peak_alive_client": report.get("hold", {}).get("peak_alive"),
        "held_at_sample": held_fds,
        "sink_rss_idle_mb": round(idle_rss / 2**20, 1),
        "sink_rss_held_mb": round(held_rss / 2**20, 1),
        "rss_per_held_connection_bytes": round((held_rss - idle_rss) / max(1, connections)),
        "sink_cpu_percent_of_one_core": round(100 * cpu, 1),
        "kernel_slab_per_connection_bytes_both_ends": round((held_slab - idle_slab)
                                                            / max(1, connections)),
        "hold_ends": report.get("hold", {}).get("ends"),
    }


# -- costs ---------------------------------------------------------------------------

CONFIGS: list[tuple[str, list[str]]] = [
    ("off (unpaced)", []),
    ("polite", ["--tarpit", "polite", "--tarpit-who", "all"]),
    ("spamd", ["--tarpit", "spamd", "--tarpit-who", "all"]),
    ("max", ["--tarpit", "max", "--tarpit-who", "all"]),
    ("--pregreet-wait 6 (teaser only)", ["--pregreet-wait", "6"]),
    ("--mss 88", ["--mss", "88"]),
    ("--rcvbuf 2304", ["--rcvbuf", "2304"]),
    ("--window-clamp 1152 (all)", ["--window-clamp", "1152", "--socket-costs-for", "all"]),
    ("--drop-rate 0.05 (all)", ["--drop-rate", "0.05", "--socket-costs-for", "all"]),
    ("--drop-rate 0.2 (all)", ["--drop-rate", "0.2", "--socket-costs-for", "all"]),
    ("--mss 88 --drop-rate 0.2 (all)",
     ["--mss", "88", "--drop-rate", "0.2", "--socket-costs-for", "all"]),
]


def one_message(port: int) -> tuple[float, int, int]:
    started = time.monotonic()
    with smtplib.SMTP("127.0.0.1", port, timeout=700) as smtp:
        smtp.ehlo("client.example")
        smtp.sendmail("a@b.example", ["u@example.org"], MESSAGE)
        info = tcp_info(smtp.sock)
    assert info is not None
    return time.monotonic() - started, info.segs_out, info.total_retrans


def cost(name: str, args: list[str], messages: int) -> dict[str, object]:
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bench-cost-"))
    sink = start_sink(port, data, [*args, "--no-record"])
    try:
        with concurrent.futures.ThreadPoolExecutor(messages) as pool:
            results = list(pool.map(lambda _: one_message(port), range(messages)))
    finally:
        stop(sink)
        shutil.rmtree(data, ignore_errors=True)
    return {
        "config": name,
        "seconds_per_message": sum(r[0] for r in results) / messages,
        "segments_per_message": sum(r[1] for r in results) / messages,
        "retransmits_per_message": sum(r[2] for r in results) / messages,
    }


def costs(messages: int) -> list[dict[str, object]]:
    base = cost(*CONFIGS[0], messages)  # alone first: the others start together
    with concurrent.futures.ThreadPoolExecutor(len(CONFIGS)) as pool:
        rows = [base, *pool.map(lambda c: cost(c[0], c[1], messages), CONFIGS[1:])]
    for row in rows:
        row["time_x"] = round(row["seconds_per_message"] / base["seconds_per_message"], 1)
        row["segments_x"] = round(row["segments_per_message"] / base["segments_per_message"], 1)
        for key in ("seconds_per_message", "segments_per_message", "retransmits_per_message"):
            row[key] = round(row[key], 3)
    return rows


# -- floor ---------------------------------------------------------------------------


def floor(count: int, mode: str, seconds: float = 10.0) -> dict[str, object]:
    """CPU of writing one byte per second to each of ``count`` uvloop transports.

    ``mode`` "timer": one ``call_later`` per transport and byte (the engine's shape);
    "loop": one timer per second writing to every transport. The floor of stuttering.
    """
    import asyncio

    import uvloop

    class Held(asyncio.Protocol):
        __slots__ = ("transport",)

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = transport  # type: ignore[assignment]

    async def run() -> dict[str, object]:
        loop = asyncio.get_running_loop()
        held: list[Held] = []

        def accept() -> Held:
            held.append(Held())
            return held[-1]

        server = await loop.create_server(accept, "127.0.0.1", 0, backlog=4096)
        port = server.sockets[0].getsockname()[1]
        clients = []
        for i in range(count):
            client = socket.socket()
            client.setblocking(False)
            client.bind((f"127.0.0.{2 + i % 250}", 0))
            with contextlib.suppress(BlockingIOError):
                client.connect(("127.0.0.1", port))
            clients.append(client)
            if i % 500 == 0:
                await asyncio.sleep(0.01)
        while len(held) < count:
            await asyncio.sleep(0.1)
        stopping = False

        def each(protocol: Held) -> None:
            if not stopping:
                protocol.transport.write(b"x")
                loop.call_later(1.0, each, protocol)

        def every() -> None:
            if not stopping:
                for protocol in held:
                    protocol.transport.write(b"x")
                loop.call_later(1.0, every)

        if mode == "timer":
            for i, protocol in enumerate(held):
                loop.call_later(i / count, each, protocol)
        else:
            loop.call_later(0, every)
        await asyncio.sleep(3)
        cpu, wall = time.process_time(), time.monotonic()
        await asyncio.sleep(seconds)
        cpu, wall = time.process_time() - cpu, time.monotonic() - wall
        stopping = True
        for client in clients:
            client.close()
        server.close()
        return {"floor": mode, "connections": count, "cpu_percent": round(100 * cpu / wall, 1),
                "us_per_write": round(1e6 * cpu / (count * wall), 1)}

    return uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    hold_parser = sub.add_parser("hold", help="held connections: sink memory and CPU")
    hold_parser.add_argument("--counts", default="10000,50000,100000")
    hold_parser.add_argument("--window", type=float, default=30.0,
                             help="seconds over which CPU is sampled once all are held")
    hold_parser.add_argument("--sink-args", default="",
                             help="more `spamsink serve` options, e.g. '--stutter 0.1'")
    cost_parser = sub.add_parser("costs", help="sender's time and segments per message")
    cost_parser.add_argument("--messages", type=int, default=3)
    floor_parser = sub.add_parser("floor", help="CPU floor of one byte/s to N transports")
    floor_parser.add_argument("--count", type=int, default=9000)
    args = parser.parse_args()
    print(f"# {machine()}", flush=True)
    if args.mode == "hold":
        nofile = raise_nofile()
        print(f"# RLIMIT_NOFILE reached: {nofile}", flush=True)
        for count in (int(c) for c in args.counts.split(",")):
            print(json.dumps(hold(count, nofile, args.window, args.sink_args.split())),
                  flush=True)
    elif args.mode == "floor":
        raise_nofile()
        for mode in ("timer", "loop"):
            print(json.dumps(floor(args.count, mode)), flush=True)
    else:
        for row in costs(args.messages):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
