"""What benchmarked processes cost, read from /proc (Linux), and the machine they ran on.

Shared by the scripts in ``bench/``; they import it as ``procstat`` (their own
directory is first on ``sys.path`` when run as ``python bench/NAME.py``).
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def descendants(pid: int) -> list[int]:
    """``pid`` and its live descendants (a supervisor's workers, a client's processes),
    whichever of a process's threads started them."""
    children: list[str] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(OSError):
                children += (task / "children").read_text().split()
    out = [pid]
    for child in children:
        out.extend(descendants(int(child)))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of ``pids`` (every thread of each), in seconds; gone ones count 0."""
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLK_TCK


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of ``pids``, in bytes; gone ones count 0."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
    return total


def machine(*extra: str) -> str:
    """One line: host, cores and CPU model, kernel, Python, load average, then ``extra``."""
    cpu = next((line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    parts = [f"{platform.node()}: {os.cpu_count()} cores ({cpu})", f"Linux {platform.release()}",
             f"Python {platform.python_version()}",
             f"load average {os.getloadavg()[0]:.1f} at start", *extra]
    return ", ".join(parts)
