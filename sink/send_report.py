"""The summary ``spamsink send`` prints: smtpsend's three lines, then everything else.

Contract: :func:`summary` returns a dict with every measured number (what ``--json``
prints as one object); :func:`render_text` turns it into the text summary whose first
three lines are smtpsend's ("Sent N messages in S seconds", "Sending rate: X
messages/minute, Y messages/second", "Average delivery time: Z seconds/message")
with millisecond resolution. Latencies are in milliseconds.
"""

from __future__ import annotations

from typing import Any

from sink.send_config import SendConfig
from sink.send_runner import RunResult
from sink.send_stats import STAGE_LABELS, STAGES, Histogram

PERCENTILES = (50, 90, 99)
#: Alive-over-time rows shown in the text summary of a hold (JSON has every sample).
HOLD_ROWS = 20


def _latency(hist: Histogram) -> dict[str, float]:
    return {"count": hist.count,
            **{f"p{p}": round(hist.percentile(p) * 1000, 3) for p in PERCENTILES},
            "max": round(hist.max * 1000, 3), "mean": round(hist.mean * 1000, 3)}


def _by(failures: dict[str, int], part: int) -> dict[str, int]:
    out: dict[str, int] = {}
    for key, n in failures.items():
        name = key.split(" ", 1)[part]
        out[name] = out.get(name, 0) + n
    return out


def summary(result: RunResult, config: SendConfig) -> dict[str, Any]:
    """Every number of the run, JSON-ready (see the module contract)."""
    stats = result.stats
    elapsed = stats.elapsed
    rate = stats.sent / elapsed if elapsed > 0 else 0.0
    out: dict[str, Any] = {
        "host": config.host, "port": config.port,
        "sent": stats.sent, "failed": stats.failed, "unfinished": stats.unfinished,
        "not_attempted": result.not_attempted, "interrupted": result.interrupted,
        "seconds": round(elapsed, 6),
        "messages_per_minute": round(rate * 60, 3), "messages_per_second": round(rate, 3),
        "average_delivery_seconds": round(stats.delivery.mean, 6),
        "connections": {"made": stats.connections_made, "failed": stats.connections_failed,
                        "ended": dict(sorted(stats.ends.items()))},
        "failures": dict(sorted(stats.failures.items())),
        "failures_by_stage": _by(stats.failures, 0),
        "failures_by_cause": _by(stats.failures, 1),
        "bytes": {"sent": stats.bytes_out, "received": stats.bytes_in},
        "extensions": dict(stats.extensions),
        "latency_ms": {name: _latency(hist) for name, hist in zip(STAGES, stats.latency,
                                                                  strict=True) if hist.count},
        "delivery_ms": _latency(stats.delivery),
        "options": {"senders": config.senders, "messages_per_connection": config.per_connection,
                    "count": config.count, "duration": config.duration,
                    "bytes": None if config.bodies else config.body_bytes,
                    "rcpts": config.rcpts, "pipelining": config.pipelining,
                    "bdat": config.bdat, "starttls": config.starttls, "tls": config.tls,
                    "rate": config.rate, "procs": config.procs,
                    "sources": len(config.sources) if config.sources else 0},
    }
    if result.hold is not None:
        hold = result.hold
        peak = max(hold.samples, default=0)
        out["hold"] = {
            "requested": hold.requested, "opened": stats.connections_made,
            "failed_to_open": stats.connections_failed, "peak_alive": peak,
            "peak_at_seconds": round((hold.samples.index(peak) + 1) * hold.interval, 3)
            if hold.samples else 0.0,
            "interval_seconds": hold.interval,
            "alive": hold.samples, "ends": dict(sorted(hold.ends.items())),
            "messages_sent": stats.sent,
        }
    return out


def _hold_rows(samples: list[int], interval: float) -> list[tuple[float, int]]:
    if not samples:
        return []
    step = max(1, -(-len(samples) // HOLD_ROWS))
    picks = list(range(step - 1, len(samples), step))
    if picks[-1] != len(samples) - 1:
        picks.append(len(samples) - 1)
    return [((i + 1) * interval, samples[i]) for i in picks]


def render_text(data: dict[str, Any]) -> str:
    """The human summary of :func:`summary`'s ``data``."""
    lines = [
        f"Sent {data['sent']} messages in {data['seconds']:.3f} seconds",
        f"Sending rate: {data['messages_per_minute']:.3f} messages/minute, "
        f"{data['messages_per_second']:.3f} messages/second",
        f"Average delivery time: {data['average_delivery_seconds']:.6f} seconds/message",
        f"Connections: {data['connections']['made']} made, "
        f"{data['connections']['failed']} failed",
        f"Messages failed: {data['failed']}",
    ]
    for key, n in data["failures"].items():
        lines.append(f"  {key}: {n}")
    if data["unfinished"] or data["not_attempted"] or data["interrupted"]:
        why = ("interrupted" if data["interrupted"] else
               "end of hold" if data.get("hold") else "stopped")
        lines.append(f"Unfinished ({why}): {data['unfinished']} on the wire, "
                     f"{data['not_attempted']} not attempted")
    hold = data.get("hold")
    if hold is None and data["connections"]["ended"]:
        ends = ", ".join(f"{why} {n}" for why, n in data["connections"]["ended"].items())
        lines.append(f"Connections ended: {ends}")
    lines.append(f"Bytes: {data['bytes']['sent']} sent, {data['bytes']['received']} received")
    if data["extensions"]:
        used = ", ".join(f"{name} on {n}" for name, n in sorted(data["extensions"].items()))
        lines.append(f"Used (connections): {used}")
    if hold is not None:
        lines.append(f"Hold: {hold['requested']} connections requested, {hold['opened']} "
                     f"opened, {hold['failed_to_open']} failed to open; peak "
                     f"{hold['peak_alive']} alive at {hold['peak_at_seconds']:g} s")
        rows = _hold_rows(hold["alive"], hold["interval_seconds"])
        if rows:
            lines.append("Alive over time: " + ", ".join(f"{t:g}s {n}" for t, n in rows))
        ends = ", ".join(f"{reason} {n}" for reason, n in hold["ends"].items())
        lines.append(f"Connections ended: {ends or 'none'}")
    if data["latency_ms"]:
        title = "Wait per reply" if hold is not None else "Latency"
        lines.append(f"{title + ' (ms)':<18}{'count':>9}{'p50':>10}{'p90':>10}{'p99':>10}"
                     f"{'max':>10}")
        for name, row in data["latency_ms"].items():
            label = STAGE_LABELS.get(name, name)
            lines.append(f"  {label:<16}{row['count']:>9}{row['p50']:>10.3f}{row['p90']:>10.3f}"
                         f"{row['p99']:>10.3f}{row['max']:>10.3f}")
    return "\n".join(lines)
