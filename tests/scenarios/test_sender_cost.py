"""The asymmetry, end to end: what tarpitted senders paid, next to what the sink spent."""

from __future__ import annotations

import socket
import time
import urllib.request
from pathlib import Path

from tests.scenarios.test_recording import api_get
from tests.support import SinkProcess


def test_stats_and_metrics_show_held_seconds_against_our_cpu(tmp_path: Path) -> None:
    with SinkProcess(tmp_path / "data", ["--tarpit-who", "all", "--greeting-delay", "1",
                                         "--pregreet-wait", "0", "--jitter", "0"]) as sink:
        for _ in range(2):
            with socket.create_connection((sink.host, sink.port), timeout=10) as sock:
                reader = sock.makefile("rb")
                started = time.monotonic()
                assert reader.readline().startswith(b"220 mx.example.com")
                assert time.monotonic() - started >= 0.9
                sock.sendall(b"QUIT\r\n")
                assert reader.readline().startswith(b"221")
        deadline = time.monotonic() + 5
        while True:
            cost = api_get(sink, "/api/v1/stats")["cost"]
            # Both sessions written (the start-up probe is a tarpitted session too).
            if cost["held_seconds"] >= 1.8 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert cost["tarpitted_sessions"] >= 2
        assert cost["held_seconds"] >= 1.8
        assert cost["cpu_seconds"] > 0 and cost["held_per_cpu_second"] > 0
        sender = api_get(sink, "/api/v1/ips/127.0.0.1")
        assert sender["cost"]["held_seconds"] >= 1.8
        with urllib.request.urlopen(f"http://127.0.0.1:{sink.api_port}/metrics") as resp:
            metrics = resp.read().decode()
        held = [line for line in metrics.splitlines()
                if line.startswith("spamsink_held_seconds_total ")]
        assert held and float(held[0].split()[1]) >= 1.8
        assert "spamsink_cpu_seconds_total" in metrics
