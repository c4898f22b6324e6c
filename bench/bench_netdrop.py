#!/usr/bin/env python3
"""Benchmark netdrop: its capacity per core, and what it costs the sender.

Run as root from the repository: ``.venv/bin/python bench/bench_netdrop.py``.
Prints Markdown tables (the numbers in BENCHMARKS.md come from this script).

1. **Per-packet cost in-process**: header parsing with ``struct`` (netdrop.packet) vs
   a scapy parse, and the full parse + ledger + policy decision, no kernel involved.
2. **Capacity** (packets/s at 100 % of one core): bulk TCP streams from the sender
   namespace to a discard server in the sink namespace, through NFQUEUE, for each
   consumer: the bare ``netfilterqueue`` accept loop, and netdrop in several modes.
   Packets counted by the kernel (``id_sequence`` of the queue), CPU time of the
   consumer process from ``/proc/<pid>/stat``: capacity = packets / CPU seconds.
3. **Cost to the sender**: real mail (smtplib) from the sender namespace to the real
   ``spamsink serve``, through netdrop at drop rates 0.05-0.3, with and without
   delays, and in ``--kernel`` mode, compared with no netdrop. Time per message,
   retransmissions and segments from the sender's own TCP_INFO.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from netdrop.accounting import Ledger  # noqa: E402
from netdrop.packet import parse  # noqa: E402
from netdrop.policy import Policy, PolicyConfig  # noqa: E402
from tests.netdrop.rig import SENDER4, SINK4, Rig, stop  # noqa: E402

DISCARD_PORT = 2526
CLK_TCK = os.sysconf("SC_CLK_TCK")

BARE = """
import sys
from netfilterqueue import NetfilterQueue
q = NetfilterQueue()
q.bind(int(sys.argv[1]), lambda p: p.accept(), max_len=4096, range=160)
print("bare consumer via bound", flush=True)
q.run()
"""


def micro() -> list[tuple[str, float]]:
    """Microseconds per packet for the in-process steps."""
    from scapy.all import IP, TCP

    raw = bytes(IP(src="203.0.113.7", dst="192.0.2.1") / TCP(dport=25, flags="PA")
                / (b"x" * 1400))
    n = 200_000
    rows = [("parse with struct (netdrop.packet.parse)",
             min(timeit.repeat(lambda: parse(raw), number=n, repeat=3)) / n * 1e6)]
    rows.append(("parse with scapy (IP(raw)), for comparison",
                 min(timeit.repeat(lambda: IP(raw), number=2000, repeat=3)) / 2000 * 1e6))
    ledger = Ledger()
    policy = Policy(PolicyConfig(rate=0.2, delay_ms=100, delay_rate=0.1))

    def step() -> int:
        fields = parse(raw)
        assert fields is not None
        sender = ledger.senders.get(fields[0]) or ledger.sender(fields[0])
        if not sender.dirty:
            sender.dirty = True
            ledger.dirty.append(sender)
        sender.seen += 1
        return policy.decide(fields[2], fields[3], sender)

    rows.append(("parse + ledger + policy decision",
                 min(timeit.repeat(step, number=n, repeat=3)) / n * 1e6))
    return rows


def _discard_server(ready: threading.Event, stop_flag: threading.Event) -> None:
    srv = socket.create_server((SINK4, DISCARD_PORT), backlog=64)
    srv.settimeout(0.2)
    ready.set()

    def drain(conn: socket.socket) -> None:
        buf = bytearray(1 << 20)
        with conn:
            while conn.recv_into(buf):
                pass

    with srv:
        while not stop_flag.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            threading.Thread(target=drain, args=(conn,), daemon=True).start()


def _blaster(stop_flag: threading.Event) -> None:
    chunk = b"\0" * (1 << 18)
    try:
        with socket.create_connection((SINK4, DISCARD_PORT), timeout=5) as sock:
            sock.settimeout(None)
            while not stop_flag.is_set():
                sock.sendall(chunk)
    except OSError:
        pass


def _cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def _queued(pid: int, queue_num: int) -> int:
    for line in Path(f"/proc/{pid}/net/netfilter/nfnetlink_queue").read_text().splitlines():
        cols = line.split()
        if int(cols[0]) == queue_num:
            return int(cols[7])
    return 0


def capacity_modes(work: Path) -> list[tuple[str, list[str] | None]]:
    """The consumers compared (None: the bare netfilterqueue loop)."""
    flagged = work / "flagged.txt"
    flagged.write_text(f"{SENDER4}\n")
    allow = [a for i in range(20) for a in ("--allow", f"198.18.{i}.0/24")]
    return [
        ("bare netfilterqueue accept loop", None),
        ("netdrop --rate 0 (parse, ledger, policy; all pass)", ["--rate", "0"]),
        ("netdrop --rate 0.01", ["--rate", "0.01"]),
        ("netdrop --rate 0.01 --only-flagged, 20 --allow nets",
         ["--rate", "0.01", "--only-flagged", "--flagged-file", str(flagged), *allow]),
        ("netdrop --rate 0.01 --delay 2 --delay-rate 0.1",
         ["--rate", "0.01", "--delay", "2", "--delay-rate", "0.1"]),
    ]


def capacity(rig: Rig, work: Path, seconds: float, streams: int,
             modes: list[tuple[str, list[str] | None]]) -> list[dict]:
    """Packets/s and CPU per packet of each consumer under bulk TCP load."""
    stop_server = threading.Event()
    ready = threading.Event()
    rig.start_in(rig.sink_ns, _discard_server, ready, stop_server)
    ready.wait(5)
    results = []
    try:
        for name, args in modes:
            log = work / "capacity.log"
            if args is None:
                rig.run(rig.sink_ns, "iptables", "-I", "INPUT", "-p", "tcp", "--dport",
                        str(DISCARD_PORT), "-j", "NFQUEUE", "--queue-num", "7",
                        "--queue-bypass")
                proc = rig.popen(rig.sink_ns, [sys.executable, "-c", BARE, "7"], log)
                time.sleep(1.0)
                queue_num = 7
            else:
                proc = rig.start_netdrop("--queue-num", "3", "--port", str(DISCARD_PORT),
                                         *args, log=log)
                queue_num = 3
            stop_flag = threading.Event()
            for _ in range(streams):
                rig.start_in(rig.sender_ns, _blaster, stop_flag)
            time.sleep(1.0)
            q0, c0, t0 = _queued(proc.pid, queue_num), _cpu_seconds(proc.pid), time.monotonic()
            time.sleep(seconds)
            q1, c1, t1 = _queued(proc.pid, queue_num), _cpu_seconds(proc.pid), time.monotonic()
            stop_flag.set()
            stop(proc)
            if args is None:
                rig.run(rig.sink_ns, "iptables", "-F", "INPUT")
            packets, user, system = q1 - q0, c1[0] - c0[0], c1[1] - c0[1]
            cpu = user + system
            results.append({"mode": name, "pps": packets / (t1 - t0),
                            "cpu": cpu / (t1 - t0), "user_share": user / cpu if cpu else 0,
                            "us_per_packet": cpu / packets * 1e6 if packets else float("nan"),
                            "capacity": packets / cpu if cpu else float("nan")})
            time.sleep(0.5)
    finally:
        stop_server.set()
    return results


def sender_cost(rig: Rig, work: Path, connections: int, messages: int,
                size: int) -> list[dict]:
    """Time, retransmissions and segments per message for each netdrop configuration."""
    configs: list[tuple[str, list[str] | None]] = [("no netdrop", None)]
    for rate in (0.05, 0.1, 0.2, 0.3):
        configs.append((f"--rate {rate}", ["--rate", str(rate)]))
    configs.append(("--delay 100:50 (every data segment)", ["--delay", "100:50"]))
    for rate in (0.05, 0.1, 0.2, 0.3):
        configs.append((f"--rate {rate} --delay 100:50 --delay-rate 0.3",
                        ["--rate", str(rate), "--delay", "100:50", "--delay-rate", "0.3"]))
    configs.append(("--kernel --rate 0.2", ["--kernel", "--rate", "0.2"]))
    rows = []
    for name, args in configs:
        proc = rig.start_netdrop(*args, log=work / "cost.log") if args is not None else None
        total = [0.0, 0, 0, 0, 0]
        try:
            for _ in range(connections):
                r = rig.send(messages, size, source=SENDER4, timeout=120)
                for i, v in enumerate((r.seconds, r.total_retrans, r.segs_out,
                                       r.data_segs_out, r.bytes_sent)):
                    total[i] += v
        finally:
            if proc is not None:
                stop(proc)
        n = connections * messages
        rows.append({"config": name, "seconds": total[0] / n, "retrans": total[1] / n,
                     "segs": total[2] / n, "data_segs": total[3] / n, "bytes": total[4] / n})
    return rows


def plot_svg(rows: list[dict], path: Path) -> None:
    """Two bar charts (seconds and retransmissions per message) by drop rate, as SVG."""
    rates = ["0", "0.05", "0.1", "0.2", "0.3"]
    series = {"drop only": [rows[0]] + [r for r in rows if r["config"] in
                                        {f"--rate {x}" for x in rates}],
              "drop + delay 100:50 on 30 %": [rows[0]] + [
                  r for r in rows if r["config"].endswith("--delay-rate 0.3")]}
    colours = {"drop only": "#4477aa", "drop + delay 100:50 on 30 %": "#ee6677"}
    panels = [("seconds per message", "seconds"), ("retransmissions per message", "retrans")]
    width, height, pad = 380, 260, 45
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * width}" height="{height + 40}" '
           'font-family="sans-serif" font-size="11">']
    for p, (title, key) in enumerate(panels):
        x0 = p * width + pad
        top = max(r[key] for values in series.values() for r in values) or 1
        plot_h, plot_w = height - 2 * pad, width - pad - 15
        out.append(f'<text x="{x0}" y="20" font-size="13">{title}</text>')
        out.append(f'<line x1="{x0}" y1="{height - pad}" x2="{x0 + plot_w}" '
                   f'y2="{height - pad}" stroke="black"/>')
        out.append(f'<text x="{x0 - 5}" y="{pad + 4}" text-anchor="end">{top:.2g}</text>')
        group = plot_w / len(rates)
        for i, rate in enumerate(rates):
            out.append(f'<text x="{x0 + group * (i + 0.5)}" y="{height - pad + 15}" '
                       f'text-anchor="middle">{rate}</text>')
            for j, (name, values) in enumerate(series.items()):
                if i >= len(values):
                    continue
                h = values[i][key] / top * plot_h
                x = x0 + group * i + 6 + j * (group - 12) / 2
                out.append(f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" '
                           f'width="{(group - 12) / 2:.1f}" height="{h:.1f}" '
                           f'fill="{colours[name]}"/>')
        out.append(f'<text x="{x0 + plot_w / 2}" y="{height - pad + 30}" '
                   'text-anchor="middle">--rate</text>')
    for j, (name, colour) in enumerate(colours.items()):
        out.append(f'<rect x="{pad + j * 220}" y="{height + 15}" width="10" height="10" '
                   f'fill="{colour}"/><text x="{pad + j * 220 + 14}" y="{height + 24}">'
                   f'{name}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="capacity window per mode")
    ap.add_argument("--streams", type=int, default=8, help="parallel bulk TCP streams")
    ap.add_argument("--connections", type=int, default=10, help="SMTP connections per config")
    ap.add_argument("--messages", type=int, default=2, help="messages per connection")
    ap.add_argument("--size", type=int, default=20_000, help="bytes per message")
    ap.add_argument("--plot", type=Path, help="also draw the sender's cost as an SVG here")
    ap.add_argument("--skip", choices=("micro", "capacity", "cost"), action="append",
                    default=[])
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_netdrop: needs root (network namespaces, NFQUEUE)", file=sys.stderr)
        return 1
    print(f"machine: {os.cpu_count()} cores, kernel {os.uname().release}, "
          f"Python {sys.version.split()[0]}\n")
    if "micro" not in args.skip:
        print("| in-process step | µs per packet |\n|---|---|")
        for name, us in micro():
            print(f"| {name} | {us:.2f} |")
        print()
    with tempfile.TemporaryDirectory(prefix="bench-netdrop-") as tmp, Rig(Path(tmp)) as rig:
        work = Path(tmp)
        if "capacity" not in args.skip:
            rows = capacity(rig, work, args.seconds, args.streams, capacity_modes(work))
            base = rows[0]["capacity"]
            print(f"Capacity ({args.streams} TCP streams over veth, {args.seconds:g} s each):\n")
            print("| consumer | packets/s seen | consumer CPU (user share) | µs CPU per packet | "
                  "packets/s at 100 % of one core | vs bare |\n|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['mode']} | {r['pps']:,.0f} | {r['cpu'] * 100:.0f} % "
                      f"({r['user_share'] * 100:.0f} % user) | "
                      f"{r['us_per_packet']:.2f} | {r['capacity']:,.0f} | "
                      f"{r['capacity'] / base:.2f}x |")
            print()
        if "cost" not in args.skip:
            rig.start_sink(work / "data")
            rows = sender_cost(rig, work, args.connections, args.messages, args.size)
            base = rows[0]
            print(f"Cost to the sender ({args.connections} connections x {args.messages} "
                  f"messages of {args.size:,} bytes, per message):\n")
            print("| netdrop | seconds | x | retransmissions | segments sent | x | "
                  "bytes sent | x |\n|---|---|---|---|---|---|---|---|")
            for r in rows:
                print(f"| {r['config']} | {r['seconds']:.3f} | "
                      f"{r['seconds'] / base['seconds']:.0f} | {r['retrans']:.1f} | "
                      f"{r['segs']:.1f} | {r['segs'] / base['segs']:.2f} | "
                      f"{r['bytes']:,.0f} | {r['bytes'] / base['bytes']:.2f} |")
            if args.plot:
                plot_svg(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
