"""The live progress line of ``spamsink send`` on a terminal's stderr.

Contract: :func:`progress_wanted` is true only when stderr is a terminal and neither
``--quiet``, ``--json`` nor ``-v`` asked for other output there. :class:`ProgressLine`
redraws one line in place (carriage return, clear to end of line) with messages sent,
the rate so far, failures, open connections, elapsed and remaining time, and
:meth:`ProgressLine.clear` removes it before the summary is printed.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from sink.send_config import SendConfig


def progress_wanted(config: SendConfig, stream: TextIO = sys.stderr) -> bool:
    """Whether to draw the progress line (see the module contract)."""
    return stream.isatty() and not (config.quiet or config.json or config.verbose)


class ProgressLine:
    """One redrawn status line for a run of ``total`` messages or ``duration`` seconds."""

    def __init__(self, config: SendConfig, stream: TextIO = sys.stderr) -> None:
        self._stream = stream
        self._total = config.count
        self._duration = config.duration
        self._start = time.perf_counter()
        self._drawn = False

    def update(self, sent: int, failed: int, open_connections: int) -> None:
        elapsed = time.perf_counter() - self._start
        rate = sent / elapsed if elapsed > 0 else 0.0
        done = sent + failed
        if self._total is not None:
            of = f" ({done}/{self._total})"
            left = (self._total - done) / (done / elapsed) if done and elapsed > 0 else None
        else:
            of = ""
            left = max(0.0, (self._duration or 0.0) - elapsed)
        remaining = f", ~{left:.1f}s left" if left is not None else ""
        self._stream.write(f"\r\033[Ksent {sent}, failed {failed}{of}, {rate:,.1f}/s, "
                           f"open {open_connections}, {elapsed:.1f}s elapsed{remaining}")
        self._stream.flush()
        self._drawn = True

    def clear(self) -> None:
        if self._drawn:
            self._stream.write("\r\033[K")
            self._stream.flush()
            self._drawn = False
