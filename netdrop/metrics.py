"""Prometheus metrics for netdrop, read at scrape time (nothing counted per packet here).

No metric carries an IP address as a label: per-sender numbers live in the SQLite
ledger, not in Prometheus.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from netdrop.queue import Totals

PROC_QUEUE = Path("/proc/net/netfilter/nfnetlink_queue")


def kernel_queue_stats(queue_num: int, path: Path = PROC_QUEUE) -> dict[str, int] | None:
    """The kernel's view of queue ``queue_num``: waiting packets and its drop counters."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        cols = line.split()
        if len(cols) >= 8 and int(cols[0]) == queue_num:
            return {"waiting": int(cols[2]), "dropped": int(cols[5]),
                    "user_dropped": int(cols[6]), "id_sequence": int(cols[7])}
    return None


class QueueCollector:
    """Counters of a userspace :class:`~netdrop.queue.Consumer`."""

    def __init__(self, totals: Totals, queue_num: int, flagged: Callable[[], int]) -> None:
        self.totals = totals
        self.queue_num = queue_num
        self.flagged = flagged

    def collect(self) -> Iterator[Metric]:
        t = self.totals
        for name, value, text in (
                ("seen", t.seen, "segments received from the queue"),
                ("passed", t.passed, "TCP segments accepted at once"),
                ("dropped", t.dropped, "TCP segments dropped"),
                ("delayed", t.delayed, "TCP segments held, then accepted"),
                ("overflow", t.overflow, "delays not done because --max-held was reached"),
                ("other", t.other, "packets not parsed as TCP, accepted")):
            yield CounterMetricFamily(f"netdrop_packets_{name}", text, value=value)
        yield GaugeMetricFamily("netdrop_packets_held", "segments held right now", value=t.held)
        yield GaugeMetricFamily("netdrop_flagged_senders", "senders in the flagged set",
                                value=self.flagged())
        stats = kernel_queue_stats(self.queue_num)
        if stats is not None:
            yield GaugeMetricFamily("netdrop_kernel_queue_waiting",
                                    "packets waiting in the kernel queue", value=stats["waiting"])
            yield CounterMetricFamily("netdrop_kernel_queue_overflow",
                                      "packets the full kernel queue did not queue",
                                      value=stats["dropped"])
            yield CounterMetricFamily("netdrop_kernel_queue_user_dropped",
                                      "packets lost sending to netdrop (socket full)",
                                      value=stats["user_dropped"])


class KernelCollector:
    """Counters of ``--kernel`` mode, read from the rule's counters."""

    def __init__(self, eligible: Callable[[], int], dropped: Callable[[], int]) -> None:
        self.eligible = eligible
        self.dropped = dropped

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("netdrop_kernel_packets_seen",
                                  "segments the kernel drop rule applied to",
                                  value=self.eligible())
        yield CounterMetricFamily("netdrop_kernel_packets_dropped",
                                  "segments dropped in the kernel", value=self.dropped())


def serve(address: str, collector: QueueCollector | KernelCollector) -> None:
    """Serve ``/metrics`` on ``address`` (``HOST:PORT``, ``[V6]:PORT`` or ``:PORT``)."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    registry = CollectorRegistry()
    registry.register(collector)  # type: ignore[arg-type]
    start_http_server(int(port), addr=host, registry=registry)
