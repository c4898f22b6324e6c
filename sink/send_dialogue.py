"""The ``-v`` dialogue of ``spamsink send``: every line each way, tagged by connection.

Contract: each line is written with one ``os.write`` (a whole line at a time, so lines
of several worker processes never mix within a line). ``-v`` shows commands and
replies; message text is shown only at ``-vv``, otherwise summarised as one line.
"""

from __future__ import annotations

import os


class Dialogue:
    """Writes a connection's dialogue to file descriptor ``fd``."""

    __slots__ = ("_fd", "_prefix", "show_data")

    def __init__(self, fd: int, level: int, worker_prefix: str = "") -> None:
        self._fd = fd
        self._prefix = worker_prefix
        self.show_data = level >= 2

    def _write(self, conn: int, arrow: str, text: str) -> None:
        if self._fd < 0:
            return
        try:
            os.write(self._fd, f"[{self._prefix}{conn}] {arrow} {text}\n".encode())
        except OSError:  # the reader went away (``| head``): stop showing the dialogue
            self._fd = -1

    def note(self, conn: int, text: str) -> None:
        """An event that is not a line on the wire (connect, close, TLS)."""
        self._write(conn, "--", text)

    def sent(self, conn: int, data: bytes) -> None:
        """Commands written (one or more CRLF lines)."""
        for line in data.decode("utf-8", "replace").split("\r\n")[:-1]:
            self._write(conn, ">>>", line)

    def payload(self, conn: int, data: bytes) -> None:
        """Message text written after 354 or with BDAT."""
        if not self.show_data:
            self._write(conn, ">>>", f"({len(data)} bytes of message text)")
            return
        lines = data.decode("utf-8", "replace").split("\r\n")
        if lines[-1] == "":
            lines.pop()
        for line in lines:
            self._write(conn, ">>>", line)

    def received(self, conn: int, code: int, lines: list[bytes]) -> None:
        """One reply, every line of it."""
        last = len(lines) - 1
        for i, line in enumerate(lines):
            sep = " " if i == last else "-"
            self._write(conn, "<<<", f"{code}{sep}{line.decode('utf-8', 'replace')}")
