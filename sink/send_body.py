"""The messages ``spamsink send`` transmits: generated ones of ``-b`` bytes, or real files.

Contract:

* :func:`normalise` turns any line endings (LF, CR, CRLF) into CRLF.
* :func:`dot_stuff` prepends a ``.`` to every line starting with ``.`` and appends the
  end-of-data marker, so the result can follow a 354 reply as is (RFC 5321 4.5.2).
  The BDAT form is the normalised text without stuffing or marker (RFC 3030).
* :class:`MessageSource` hands out, per message, the DATA payload (stuffed and
  terminated) or the BDAT payload. Generated messages have From, To, Subject, Date and
  a unique Message-ID header and a body of exactly ``body_bytes`` bytes (``-b``, headers
  not included, as smtp-source's ``-l``). Files given with ``--body`` are sent as they
  are (their own headers), round-robin, loaded once into memory at start.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from pathlib import Path

_LINE_ENDINGS = re.compile(rb"\r\n|\r|\n")
_FILLER = b"The quick brown fox jumps over the lazy dog, sent by spamsink send. 0123456789"
_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class BodyError(ValueError):
    """A --body file or directory cannot be used."""


def normalise(text: bytes) -> bytes:
    """``text`` with every line ending (LF, CR or CRLF) made CRLF."""
    return _LINE_ENDINGS.sub(b"\r\n", text)


def dot_stuff(text: bytes) -> bytes:
    """CRLF-normalised ``text``, dot-stuffed and ended with ``.<CRLF>`` for DATA."""
    text = normalise(text)
    if text.startswith(b"."):
        text = b"." + text
    text = text.replace(b"\r\n.", b"\r\n..")
    if text and not text.endswith(b"\r\n"):
        text += b"\r\n"
    return text + b".\r\n"


def filler(size: int) -> bytes:
    """Exactly ``size`` bytes of printable lines of at most 79 characters, ending in CRLF
    when ``size`` is at least 2."""
    if size < 2:
        return b"x" * size
    line = _FILLER + b"\r\n"
    whole, rest = divmod(size, len(line))
    tail = b""
    if rest == 1:  # a line cannot be one byte: lengthen the previous line by one
        whole -= 1
        tail = _FILLER + b"x\r\n"
    elif rest:
        tail = _FILLER[: rest - 2] + b"\r\n"
    return line * whole + tail


def date_header(seconds: float | None = None) -> str:
    """An RFC 5322 date in local time, e.g. ``Thu, 26 Nov 2026 23:20:00 +0100`` (what
    ``email.utils.formatdate(localtime=True)`` gives, without importing the email
    package: 4 ms of every start)."""
    tm = time.localtime(seconds)
    return (f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
            f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {time.strftime('%z', tm)}")


def load_bodies(path: Path) -> list[bytes]:
    """The raw contents of ``path`` (a file) or of every regular file in it (a directory,
    sorted by name, not recursive). Raises :class:`BodyError` with one line."""
    try:
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.is_file())
            if not files:
                raise BodyError(f"--body directory {path} has no files")
        elif path.is_file():
            files = [path]
        else:
            raise BodyError(f"--body {path}: no such file or directory")
        return [p.read_bytes() for p in files]
    except OSError as exc:
        raise BodyError(f"--body {path}: {exc.strerror or exc}") from exc


class MessageSource:
    """Per-message payloads for one process (see the module contract)."""

    __slots__ = (
        "_bdat",
        "_counter",
        "_cycle",
        "_data",
        "_generated",
        "_head",
        "_tag",
        "_tail",
        "_tail_dot",
    )

    def __init__(self, *, sender: str, recipient: str, subject: str, body_bytes: int,
                 bodies: list[bytes] | None = None, offset: int = 0) -> None:
        self._counter = itertools.count(1)
        self._tag = f"{os.getpid()}.{int(os.times().elapsed * 1000)}".encode()
        self._generated = bodies is None
        if bodies is None:
            from_header = f"<{sender}>" if sender else "<>"
            self._head = (f"From: {from_header}\r\nTo: <{recipient}>\r\nSubject: {subject}\r\n"
                          f"Date: {date_header()}\r\nMessage-ID: <").encode()
            body = filler(body_bytes)
            self._tail = b"@spamsink.send>\r\n\r\n" + body
            self._tail_dot = self._tail + (b".\r\n" if body.endswith(b"\r\n") or not body
                                           else b"\r\n.\r\n")
            self._data: list[bytes] = []
            self._bdat: list[bytes] = []
            self._cycle = itertools.count()
        else:
            self._head = self._tail = self._tail_dot = b""
            self._data = [dot_stuff(b) for b in bodies]
            self._bdat = [normalise(b) for b in bodies]
            self._cycle = itertools.count(offset)

    def _generate(self) -> bytes:
        return b"%s%d.%s%s" % (self._head, next(self._counter), self._tag, self._tail)

    def data_payload(self) -> bytes:
        """The next message, dot-stuffed and terminated, to send after a 354 reply."""
        if self._generated:
            return b"%s%d.%s%s" % (self._head, next(self._counter), self._tag, self._tail_dot)
        return self._data[next(self._cycle) % len(self._data)]

    def bdat_payload(self) -> bytes:
        """The next message as BDAT sends it: CRLF lines, no stuffing, no marker."""
        if self._generated:
            return self._generate()
        return self._bdat[next(self._cycle) % len(self._bdat)]

