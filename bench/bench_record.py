#!/usr/bin/env python3
"""Benchmark recording: what it costs the sink, and how fast the recorder writes.

Run from the repository: ``.venv/bin/python bench/bench_record.py``. Prints Markdown
tables (the numbers in BENCHMARKS.md come from this script).

1. **Sink CPU per message, recording on vs off**, in the same run: the real
   ``spamsink serve`` (``--log-level warning --api off``, with and without
   ``--no-record``) loaded by Postfix's ``smtp-source -s 50 -l 1024``, one new
   connection per message and, separately, 1,000 messages per connection. CPU is
   the server process's utime + stime from ``/proc/<pid>/stat`` (all threads, so the
   recorder's writer thread is included), read after the recorder has written every
   session (checked in the store), split into the event-loop thread and the rest
   (the writer). Each round runs off and on back to back (alternating which goes
   first); medians, best, and the median (with quartiles) of the rounds' own differences.
   ``--shapes`` picks the loads, ``--pin CPU`` adds a run with the server pinned,
   ``--rate R`` one at a fixed R messages/s from ``spamsink send --rate``;
   ``--api-scraped`` runs both servers with the API on and ``/metrics`` read once.
2. **Recorder throughput**: :class:`sink.record.Recorder` with the SQLite writer in
   this process, fed as fast as the queue takes records, for senders that repeat
   (1 and 1,000 addresses) and all-different addresses; sessions/s of wall time until
   every record is in the store, and the CPU per record of preparing (in the
   submitting thread, as the event loop does) and writing (``--records 0`` skips it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from procstat import CLK_TCK, cpu_seconds, machine

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sink.record import Recorder, SessionRecord  # noqa: E402
from sink.store import open_writer, store_path  # noqa: E402
from tests.support import free_port, spamsink_command, wait_for_port  # noqa: E402

SMTP_SOURCE = "/usr/sbin/smtp-source"


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """utime + stime of each thread of ``pid`` by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(task.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def recorded_sessions(data: Path) -> int:
    path = store_path(data)
    if not path.exists():
        return 0
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT sessions FROM totals").fetchone()
    except sqlite3.Error:
        return 0
    finally:
        conn.close()
    return row[0] if row else 0


def sink_run(record: bool, messages: int, per_connection: int,
             pin: int | None = None, rate: int | None = None,
             scraped: bool = False) -> dict[str, float]:
    """One server (on CPU ``pin`` if given), one load (smtp-source as fast as it can,
    or ``spamsink send --rate`` at ``rate`` messages/s); CPU µs per message and
    messages/s. With ``scraped`` the API is on and ``/metrics`` read once before the
    load, as Prometheus would: the API's reader threads then exist in both runs."""
    data = Path(tempfile.mkdtemp(prefix="rec4-bench-"))
    port = free_port()
    api_port = free_port()
    taskset = ["taskset", "-c", str(pin)] if pin is not None else []
    command = [*taskset, *spamsink_command(), "serve", "--smtp", f"127.0.0.1:{port}", "--data",
               str(data), "--hostname", "mx.example.com", "--log-level", "warning",
               "--api", f"127.0.0.1:{api_port}" if scraped else "off",
               *([] if record else ["--no-record"])]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port)
        if scraped:
            wait_for_port("127.0.0.1", api_port)
            with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/metrics", timeout=10):
                pass
        time.sleep(0.3)
        sessions = messages // per_connection
        before = cpu_seconds([proc.pid])
        threads_before = thread_cpu_seconds(proc.pid)
        started = time.perf_counter()
        load = [SMTP_SOURCE, "-s", "50", "-l", "1024", "-m", str(messages)]
        if per_connection > 1:
            load = [SMTP_SOURCE, "-s", str(min(50, sessions)), "-l", "1024", "-d", "-m",
                    str(messages)]
        if rate is not None:
            load = [*spamsink_command(), "send", "-q", "-s", "50", "-b", "1024", "-n",
                    str(messages), "-m", str(per_connection), "--rate", str(rate), "-p"]
        subprocess.run([*load, f"127.0.0.1:{port}" if rate is None else str(port)],
                       check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        # Wait for the recorder to write them all (its CPU counts), or 1.2 s when off.
        deadline = time.monotonic() + 10
        if record:
            while recorded_sessions(data) < sessions * 0.999 and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(0.6)  # the writer's last tick
        else:
            time.sleep(1.2)
        cpu = cpu_seconds([proc.pid]) - before
        threads = thread_cpu_seconds(proc.pid)
        main_cpu = threads[proc.pid] - threads_before.get(proc.pid, 0.0)
        stored = recorded_sessions(data)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        shutil.rmtree(data, ignore_errors=True)
    return {"cpu_us": cpu / messages * 1e6, "rate": messages / wall, "stored": stored,
            "loop_us": main_cpu / messages * 1e6, "other_us": (cpu - main_cpu) / messages * 1e6}


def sink_cost(rounds: int, messages: int, per_connection: int,
              pin: int | None = None, rate: int | None = None,
              scraped: bool = False) -> list[str]:
    """Table rows for one load: off and on, ``rounds`` pairs back to back (the order
    alternates between rounds). The cost row gives the difference of the medians and,
    less sensitive to load that comes and goes on a shared machine, the median of the
    rounds' own differences."""
    results: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for i in range(rounds):
        for record in ((False, True) if i % 2 == 0 else (True, False)):
            results[record].append(sink_run(record, messages, per_connection, pin, rate,
                                            scraped))
    rows = []
    summary = {}
    for record, label in ((False, "off (`--no-record`)"), (True, "on")):
        runs = results[record]
        cpu = statistics.median(r["cpu_us"] for r in runs)
        low = min(r["cpu_us"] for r in runs)
        writer = statistics.median(r["other_us"] for r in runs)
        loop = statistics.median(r["loop_us"] for r in runs)
        rate = statistics.median(r["rate"] for r in runs)
        stored = min(r["stored"] for r in runs)
        summary[record] = (cpu, low)
        rows.append(f"| {per_connection} | {label} | {cpu:.1f} | {low:.1f} | {loop:.1f} | "
                    f"{writer:.1f} | {rate:,.0f} | {stored:,} |")
    (off, off_low), (on, on_low) = summary[False], summary[True]
    differences = [(b["cpu_us"] - a["cpu_us"]) / a["cpu_us"]
                   for a, b in zip(results[False], results[True], strict=True)]
    paired = statistics.median(differences)
    low_q, _, high_q = (statistics.quantiles(differences, n=4) if len(differences) > 1
                        else (paired, paired, paired))
    rows.append(f"| {per_connection} | **cost of recording** | **{(on - off) / off * 100:+.1f} %**"
                f" | **{(on_low - off_low) / off_low * 100:+.1f} %** | | | | |")
    rows.append(f"| {per_connection} | **cost, median of the rounds' own differences** | "
                f"**{paired * 100:+.1f} %** | quartiles {low_q * 100:+.1f} / "
                f"{high_q * 100:+.1f} % | | | | |")
    return rows


def record(ip: str) -> SessionRecord:
    r = SessionRecord(start=time.time(), client_ip=ip, client_port=45000,
                      local_ip="192.0.2.25", local_port=25, persona="postfix")
    r.end = r.start + 0.4
    r.helo = "bot.example"
    r.mail_from = ["spam@example.net"]
    r.recipients = 2
    r.first_recipients = ["a@example.org", "b@example.org"]
    r.messages = 1
    r.bytes = 1400
    r.commands = 7
    r.end_reason = "quit"
    r.last_stage = "quit"
    return r


def recorder_throughput(count: int, addresses: int | None) -> tuple[float, float]:
    """Sessions/s into SQLite and CPU µs per session (preparing and writing)."""
    data = Path(tempfile.mkdtemp(prefix="rec4-bench-"))
    try:
        writer = open_writer(data)
        if addresses is None:
            ips = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]
        else:
            ips = [f"10.0.{i % addresses >> 8}.{i % addresses & 255}" for i in range(count)]
        records = [record(ip) for ip in ips]
        recorder = Recorder(writer.prepare, writer.write_prepared).start()
        process_before = time.process_time()
        started = time.perf_counter()
        for r in records:
            while recorder.depth >= recorder.capacity - 1:
                time.sleep(0.001)
            recorder.submit(r)
        recorder.close()
        wall = time.perf_counter() - started
        # Both threads: this one prepares the full batches (as the event loop does).
        cpu = time.process_time() - process_before
        assert recorder.dropped == 0 and recorder.written == count
        writer.close()
        conn = sqlite3.connect(store_path(data))
        assert conn.execute("SELECT sessions FROM totals").fetchone()[0] == count
        conn.close()
    finally:
        shutil.rmtree(data, ignore_errors=True)
    return count / wall, cpu / count * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="on/off rounds per load")
    parser.add_argument("--messages", type=int, default=20_000, help="messages per round")
    parser.add_argument("--records", type=int, default=200_000,
                        help="records per recorder throughput run (0: skip that part)")
    parser.add_argument("--shapes", default="1,1000", metavar="N,N",
                        help="messages per connection of the sink loads (comma-separated)")
    parser.add_argument("--pin", type=int, default=None, metavar="CPU",
                        help="also run the one-message-per-connection load with the server "
                        "pinned to this CPU (taskset): event loop and writer share it")
    parser.add_argument("--api-scraped", action="store_true",
                        help="run both servers with the API on, /metrics read once before "
                        "the load (its reader threads then exist with recording off too, "
                        "as in a sink Prometheus scrapes); default: --api off")
    parser.add_argument("--rate", type=int, default=None, metavar="R",
                        help="also run the one-message-per-connection load at a fixed R "
                        "messages/s (spamsink send --rate; below saturation the result "
                        "depends less on the client/server rhythm)")
    args = parser.parse_args()
    if not os.access(SMTP_SOURCE, os.X_OK):
        print(f"needs Postfix's {SMTP_SOURCE} (apt-get install postfix)", file=sys.stderr)
        return 2
    print(f"Machine: {machine(f'SQLite {sqlite3.sqlite_version}')}\n")
    shapes = [int(n) for n in args.shapes.split(",") if n]
    if shapes:
        api = "API on, /metrics read once" if args.api_scraped else "--api off"
        print(f"### Sink CPU per message, recording off vs on ({args.rounds} rounds each, "
              f"{args.messages:,} messages, smtp-source -s 50 -l 1024, {api})\n")
        print("| messages/connection | recording | CPU µs/msg, median | CPU µs/msg, best | "
              "event-loop thread | other threads (writer) | msgs/s | sessions in store |")
        print("|---|---|---|---|---|---|---|---|")
    for per_connection in shapes:
        for row in sink_cost(args.rounds, args.messages, per_connection,
                             scraped=args.api_scraped):
            print(row, flush=True)
    if args.pin is not None:
        print(f"\nServer pinned to CPU {args.pin} (`taskset -c {args.pin}`), smtp-source free:\n")
        print("| messages/connection | recording | CPU µs/msg, median | CPU µs/msg, best | "
              "event-loop thread | other threads (writer) | msgs/s | sessions in store |")
        print("|---|---|---|---|---|---|---|---|")
        for row in sink_cost(args.rounds, args.messages, 1, args.pin,
                             scraped=args.api_scraped):
            print(row, flush=True)
    if args.rate is not None:
        print(f"\nA fixed load below saturation: `spamsink send -s 50 -b 1024 --rate "
              f"{args.rate}`, one message per connection:\n")
        print("| messages/connection | recording | CPU µs/msg, median | CPU µs/msg, best | "
              "event-loop thread | other threads (writer) | msgs/s | sessions in store |")
        print("|---|---|---|---|---|---|---|---|")
        for row in sink_cost(args.rounds, args.messages, 1, rate=args.rate,
                             scraped=args.api_scraped):
            print(row, flush=True)
    if not args.records:
        return 0
    print(f"\n### Recorder into SQLite ({args.records:,} sessions per run)\n")
    print("| senders | sessions/s | CPU µs/session (prepare + write) |")
    print("|---|---|---|")
    for label, addresses in (("1 address", 1), ("1,000 addresses", 1000),
                             ("every session a new address", None)):
        rate, cpu = recorder_throughput(args.records, addresses)
        print(f"| {label} | {rate:,.0f} | {cpu:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
