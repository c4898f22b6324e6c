"""A 200,000-sender export streams from the real `spamsink serve` in bounded memory."""

from __future__ import annotations

import json
import sqlite3
import urllib.request
from pathlib import Path

import pytest

from sink.store import open_writer, store_path
from tests.support import SinkProcess, wait_for_port

ROWS = 200_000


def fill(data: Path, rows: int) -> None:
    """``rows`` senders written straight into a store made by the real migrations."""
    open_writer(data).close()
    conn = sqlite3.connect(store_path(data))
    conn.execute("""
        WITH RECURSIVE n(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM n WHERE i < ? - 1)
        INSERT INTO ips (ip, first_seen, last_seen, sessions, messages, recipients, bytes,
                         helo, flags, local_addresses)
        SELECT '10.' || (i >> 16) || '.' || ((i >> 8) & 255) || '.' || (i & 255),
               1.7e9 + i, 1.7e9 + i, 1 + i % 7, i % 50, i % 90, 1000 * (i % 13),
               'host-' || i || '.example', i & 4095, 1
        FROM n""", (rows,))
    conn.commit()
    conn.close()


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["json", "txt"])
def test_export_of_200k_senders_streams_in_bounded_memory(tmp_path: Path, fmt: str):
    data = tmp_path / "data"
    fill(data, ROWS)
    sink = SinkProcess(data, ["--no-record", "--log-level", "warning"])
    with sink:
        wait_for_port("127.0.0.1", sink.api_port)
        base = f"http://127.0.0.1:{sink.api_port}/api/v1"
        with urllib.request.urlopen(f"{base}/ips?limit=10", timeout=30) as resp:
            assert len(json.loads(resp.read())["items"]) == 10  # warm: imports, threads
        pid = sink.proc.pid
        if not reset_peak(pid):
            pytest.skip("cannot reset the peak RSS of the server (/proc/PID/clear_refs)")
        before = peak_rss_kb(pid)
        received = lines = 0
        with urllib.request.urlopen(f"{base}/export?format={fmt}", timeout=120) as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            while chunk := resp.read(1 << 16):
                received += len(chunk)
                lines += chunk.count(b"\n")
        growth_mb = (peak_rss_kb(pid) - before) / 1024
    assert lines >= ROWS
    # The whole answer is many megabytes; the server grew by a small, fixed amount.
    assert received > (30 if fmt == "json" else 2) * 1024 * 1024
    print(f"{fmt}: {received >> 20} MB streamed, server peak RSS grew {growth_mb:.1f} MB")
    assert growth_mb < 16, f"server memory grew {growth_mb:.1f} MB for a {received >> 20} MB export"
