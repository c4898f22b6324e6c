#!/usr/bin/env python3
"""Benchmark ``spamsink send`` against Postfix's ``smtp-source``, and ``--hold`` at scale.

Part 1, the same target for both clients: Postfix's C ``smtp-sink`` on a loopback port;
the same message size (``-l``/``-b`` bytes of body), the same number of concurrent
sessions and messages. Three shapes:

* a new connection per message (``smtp-source -s S -m N`` vs ``spamsink send -s S -n N``),
* reused connections (``smtp-source -d``, each session keeps its connection, vs
  ``spamsink send -m N/S``, the same messages per connection),
* reused connections with ``--pipelining`` (smtp-source cannot pipeline).

Each run is repeated and interleaved (source, send, source, send, ...) and the median
reported. Rates are messages over the wall time of the whole process, start-up included
for both (spamsink's Python start-up and exit, about 80 ms, is in it; smtp-source's is
a few milliseconds: both are measured on their own at the end); "own timer" is
spamsink's own figure, first connect to last close. CPU is the client's user + system
time per message, start-up included. "smtp-sink core busy" is the server's CPU time
over the client's wall time: near 100 % the server, not the client, sets the rate.
spamsink runs with its bytecode cached, as an installed package has it.

Part 2, ``--hold``: a ``spamsink serve`` with limits raised, and ``spamsink send --hold``
with as many connections as asked (default 50,000) spread over 127.0.0.2-127.0.0.254,
reporting how many were alive at the peak and the server's and client's memory.

Run as root from the repository (smtp-sink needs root to drop to ``nobody``; the hold
raises RLIMIT_NOFILE): ``.venv/bin/python bench/bench_send.py``. Prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from procstat import cpu_seconds, descendants, machine, rss_bytes

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from tests.support import free_port, wait_for_port  # noqa: E402

SPAMSINK = str(Path(sys.executable).parent / "spamsink")


def bytecode_env() -> dict[str, str]:
    """The environment for spamsink's runs: Python's bytecode cached in a private
    directory, warmed once, as an installed package has it (pip compiles at install).
    Without it, a machine with PYTHONDONTWRITEBYTECODE set compiles every module on
    every start, about 50 ms more per run."""
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = tempfile.mkdtemp(prefix="bench-send-pycache-")
    subprocess.run([SPAMSINK, "send", "--help"], env=env, stdout=subprocess.DEVNULL,
                   check=True)
    return env


def timed(command: list[str], env: dict[str, str] | None = None) -> tuple[float, float, str]:
    """(wall seconds, client CPU seconds, stdout) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.stdout


def compare(args: argparse.Namespace) -> list[str]:
    source, sink = shutil.which("smtp-source") or "/usr/sbin/smtp-source", \
        shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not (os.access(source, os.X_OK) and os.access(sink, os.X_OK)):
        return ["smtp-source/smtp-sink not installed (Debian package postfix): skipped"]
    port = free_port()
    server = subprocess.Popen([sink, "-u", "nobody", "-m", str(max(256, 4 * args.sessions)),
                               f"127.0.0.1:{port}", "4096"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = bytecode_env()
    try:
        wait_for_port("127.0.0.1", port, timeout=20.0)
        n, s, size = args.messages, args.sessions, args.bytes
        per_conn = -(-n // s)
        target = f"127.0.0.1:{port}"
        send = [SPAMSINK, "send", "--json", "-n", str(n), "-s", str(s), "-b", str(size),
                "-p", str(port)]
        shapes = [
            ("new connection per message", [source, "-s", str(s), "-m", str(n), "-l",
                                            str(size), target], send),
            ("reused connections (-d / -m N/S)",
             [source, "-d", "-s", str(s), "-m", str(n), "-l", str(size), target],
             [*send, "-m", str(per_conn)]),
            ("reused connections, spamsink --pipelining",
             [source, "-d", "-s", str(s), "-m", str(n), "-l", str(size), target],
             [*send, "-m", str(per_conn), "--pipelining"]),
        ]
        if args.procs > 1:
            shapes += [
                (f"new connection per message, spamsink --procs {args.procs}",
                 shapes[0][1], [*send, "--procs", str(args.procs)]),
                (f"reused connections, spamsink --procs {args.procs}",
                 shapes[1][1], [*send, "-m", str(per_conn), "--procs", str(args.procs)]),
            ]
        if args.shapes:
            shapes = [shapes[int(i) - 1] for i in args.shapes.split(",")]
        rows = [f"{n} messages, {s} sessions, {size}-byte body, against Postfix smtp-sink; "
                f"median of {args.repeat} interleaved runs.", "",
                "| shape | smtp-source msg/s | spamsink send msg/s | ratio | spamsink send "
                "msg/s, own timer | smtp-source CPU µs/msg | spamsink send CPU µs/msg | "
                "smtp-sink core busy, smtp-source / spamsink |",
                "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for label, source_cmd, send_cmd in shapes:
            walls: dict[str, list[float]] = {"source": [], "send": []}
            cpus: dict[str, list[float]] = {"source": [], "send": []}
            busy: dict[str, list[float]] = {"source": [], "send": []}
            own: list[float] = []
            for _ in range(args.repeat):
                for name, command in (("source", source_cmd), ("send", send_cmd)):
                    server_before = cpu_seconds([server.pid])
                    wall, cpu, stdout = timed(command, env if name == "send" else None)
                    busy[name].append((cpu_seconds([server.pid]) - server_before) / wall)
                    walls[name].append(wall)
                    cpus[name].append(cpu)
                    if name == "send":
                        result = json.loads(stdout)
                        if result["sent"] != n:
                            raise SystemExit(f"spamsink send sent {result['sent']} of {n}")
                        own.append(result["messages_per_second"])
            rate = {k: n / statistics.median(v) for k, v in walls.items()}
            cpu_us = {k: statistics.median(v) / n * 1e6 for k, v in cpus.items()}
            rows.append(f"| {label} | {rate['source']:,.0f} | {rate['send']:,.0f} | "
                        f"{rate['send'] / rate['source']:.2f}x | {statistics.median(own):,.0f} | "
                        f"{cpu_us['source']:.0f} | {cpu_us['send']:.0f} | "
                        f"{statistics.median(busy['source']):.0%} / "
                        f"{statistics.median(busy['send']):.0%} |")
            print(rows[-1], file=sys.stderr, flush=True)
        one_source = [source, "-m", "1", "-l", str(size), target]
        one_send = [SPAMSINK, "send", "-q", "-n", "1", "-b", str(size), "-p", str(port)]
        startup = {"source": [], "send": []}
        for _ in range(max(5, args.repeat)):
            startup["source"].append(timed(one_source)[0])
            startup["send"].append(timed(one_send, env)[0])
        rows += ["", "Start to exit with one message (the fixed cost in every rate above): "
                 f"smtp-source {statistics.median(startup['source']) * 1000:.0f} ms, "
                 f"spamsink send {statistics.median(startup['send']) * 1000:.0f} ms "
                 f"(median of {len(startup['send'])})."]
        rows += ["", "Commands (PORT is smtp-sink's):", "",
                 *(f"- `{' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}`"
                   .replace(str(port), "PORT") for _, a, b in shapes for cmd in (a, b))]
        return rows
    finally:
        server.terminate()
        server.wait(10)
        shutil.rmtree(env["PYTHONPYCACHEPREFIX"], ignore_errors=True)


def hold(args: argparse.Namespace) -> list[str]:
    wanted = args.hold + 10_000
    limit_note = ""
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, wanted))
        limit = wanted
    except (ValueError, OSError) as exc:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
        limit_note = (f"RLIMIT_NOFILE could not be raised to {wanted:,} ({exc}); its hard "
                      f"limit here is {limit:,} per process, so the connections are spread "
                      "over more client processes and server workers.")
    per_process_capacity = limit - 1_000
    procs = max(args.procs, -(-args.hold // per_process_capacity))
    workers = max(args.server_workers, -(-args.hold // per_process_capacity))
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="bench-send-hold-"))
    per_process = min(args.hold // workers + 1000, per_process_capacity)
    serve = subprocess.Popen(
        [SPAMSINK, "serve", "--smtp", f"127.0.0.1:{port}", "--data", str(data),
         "--hostname", "mx.example.com", "--api", "off", "--log-level", "warning",
         "--workers", str(workers), "--backlog", "4096",
         "--max-connections", str(per_process), "--max-connections-per-ip", "100000"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peaks = {"server": 0, "client": 0}
    stop = threading.Event()
    try:
        wait_for_port("127.0.0.1", port, timeout=20.0)
        command = [SPAMSINK, "send", "--json", "-q", "--hold", str(args.hold),
                   "-t", str(args.hold_seconds), "--hold-pause", str(args.hold_pause),
                   "--source", "127.0.0.2-127.0.0.254", "--procs", str(procs),
                   "-p", str(port)]
        client = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)

        def sample() -> None:
            while not stop.wait(1.0):
                peaks["server"] = max(peaks["server"], rss_bytes(descendants(serve.pid)) // 1024)
                peaks["client"] = max(peaks["client"], rss_bytes(descendants(client.pid)) // 1024)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = client.communicate(timeout=args.hold_seconds + 600)
        stop.set()
        sampler.join()
        out = json.loads(stdout)
    finally:
        stop.set()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(60)
        except subprocess.TimeoutExpired:
            serve.kill()
        shutil.rmtree(data, ignore_errors=True)
    h = out["hold"]
    lat = out["latency_ms"]
    rows = [f"`spamsink send --hold {args.hold} -t {args.hold_seconds} --hold-pause "
            f"{args.hold_pause} --source 127.0.0.2-127.0.0.254 --procs {procs}` against "
            f"`spamsink serve --workers {workers} --max-connections {per_process} "
            f"--max-connections-per-ip 100000`:", "",
            "| requested | opened | failed to open | peak alive | peak at | alive at end | "
            "messages sent | server RSS at most | client RSS at most |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
            f"| {h['requested']:,} | {h['opened']:,} | {h['failed_to_open']:,} | "
            f"{h['peak_alive']:,} | {h['peak_at_seconds']:g} s | "
            f"{h['alive'][-1] if h['alive'] else 0:,} | {out['sent']:,} | "
            f"{peaks['server'] / 1024:,.0f} MiB | {peaks['client'] / 1024:,.0f} MiB |", "",
            f"Connections ended: {', '.join(f'{k} {v:,}' for k, v in h['ends'].items())}; "
            f"failures: {out['failures'] or 'none'}.", "",
            "Wait per reply (ms): " + ", ".join(
                f"{name} p50 {row['p50']:.1f} / p99 {row['p99']:.1f}"
                for name, row in lat.items()), "",
            "Alive every " + f"{h['interval_seconds']:g} s: " + " ".join(
                f"{n:,}" for n in h["alive"])]
    if limit_note:
        rows += ["", limit_note]
    if stderr.strip():
        rows += ["", f"Client said: {stderr.strip()[-500:]}"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--sessions", type=int, default=50)
    parser.add_argument("--bytes", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2,
                        help="spamsink send worker processes for the extra rows and the hold")
    parser.add_argument("--hold", type=int, default=50_000)
    parser.add_argument("--hold-seconds", type=float, default=60.0)
    parser.add_argument("--hold-pause", type=float, default=20.0)
    parser.add_argument("--server-workers", type=int, default=2)
    parser.add_argument("--shapes", default="",
                        help="only these rows of the comparison, e.g. '2' or '1,2' (1-3 are "
                        "the three shapes, 4-5 the --procs rows)")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument("--skip-hold", action="store_true")
    args = parser.parse_args()
    lines = [f"Machine: {machine()}.", ""]
    if not args.skip_compare:
        lines += [*compare(args), ""]
    if not args.skip_hold:
        lines += hold(args)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
