"""SMTP reply parsing for ``spamsink send``: bytes in, complete replies out.

Contract:

* :meth:`ReplyParser.feed` takes whatever a read returned and yields every reply
  completed by it, in order, as ``(code, lines)``: ``code`` is the three-digit reply
  code as an ``int``, ``lines`` the text after ``NNN-``/``NNN `` of every line of a
  multi-line reply (RFC 5321 section 4.2.1). A reply split over several reads, or
  several replies in one read (pipelining), come out the same.
* Lines end with CRLF; a bare LF is tolerated, as most clients do.
* A malformed line (fewer than three digits, a first digit outside 2-5, a fourth byte
  other than space or hyphen, a continuation with another code), a line longer than
  ``max_line`` or a reply of more than ``max_lines`` lines raises :class:`ReplyError`,
  which carries the replies the same read completed before it (they are real answers
  and count); the parser is then unusable, as the connection it reads is. Together the
  two caps bound what one reply can hold (``MAX_LINES * MAX_LINE`` bytes, 8 MiB): a
  server that never ends a multi-line reply is a protocol error, not unbounded memory.
"""

from __future__ import annotations

Reply = tuple[int, list[bytes]]

#: Longest reply line accepted (RFC 5321 allows 512; real servers send longer).
MAX_LINE = 8192
#: Most lines in one reply; a Postfix EHLO reply has about a dozen, so 1,000 is far
#: above any real server.
MAX_LINES = 1000
_CODES = {b"%d" % code: code for code in range(200, 600)}


class ReplyError(ValueError):
    """The server sent something that is not an SMTP reply; ``replies`` are those the
    same read completed before it, in order."""

    def __init__(self, message: str, replies: list[Reply] | None = None) -> None:
        super().__init__(message)
        self.replies: list[Reply] = replies or []


def _split(line: bytes) -> tuple[int, bool, bytes]:
    """``(code, is_last_line, text)`` of one reply line without its line ending."""
    head = line[:3]
    if len(head) != 3 or not head.isdigit() or not 50 <= head[0] <= 53:
        raise ReplyError(f"malformed reply line {line[:80]!r}")
    if len(line) == 3:
        return int(head), True, b""
    sep = line[3]
    if sep == 32:  # b" "
        return int(head), True, line[4:]
    if sep == 45:  # b"-"
        return int(head), False, line[4:]
    raise ReplyError(f"malformed reply line {line[:80]!r}")


class ReplyParser:
    """Incremental parser of the replies on one connection (see the module contract)."""

    __slots__ = ("_buf", "_code", "_lines", "max_line", "max_lines")

    def __init__(self, max_line: int = MAX_LINE, max_lines: int = MAX_LINES) -> None:
        self.max_line = max_line
        self.max_lines = max_lines
        self._buf = b""
        self._code = 0
        self._lines: list[bytes] = []

    @property
    def pending(self) -> bool:
        """True while part of a reply has been read but not all of it."""
        return bool(self._buf or self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        """Every reply completed by ``data``, in order; raises :class:`ReplyError`."""
        # Fast path: one complete single-line reply, the common case.
        size = len(data)
        if (size > 5 and data[3] == 32 and data.find(b"\n") == size - 1
                and data[size - 2] == 13 and size - 2 <= self.max_line
                and not self._buf and not self._lines):
            code = _CODES.get(data[:3])
            if code is not None:
                return [(code, [data[4:-2]])]
        replies: list[Reply] = []
        try:
            self._feed(self._buf + data if self._buf else data, replies)
        except ReplyError as exc:
            exc.replies = replies
            raise
        return replies

    def _feed(self, buf: bytes, replies: list[Reply]) -> None:
        """Append the replies ``buf`` (the unparsed rest and a new read) completes."""
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            line = buf[start:end - 1] if end > start and buf[end - 1] == 13 else buf[start:end]
            start = end + 1
            if len(line) > self.max_line:
                raise ReplyError(f"reply line longer than {self.max_line} bytes")
            code, last, text = _split(line)
            if self._lines and code != self._code:
                raise ReplyError(f"reply code changed from {self._code} to {code} "
                                 "within a multi-line reply")
            self._code = code
            self._lines.append(text)
            if len(self._lines) > self.max_lines:
                raise ReplyError(f"reply longer than {self.max_lines} lines")
            if last:
                replies.append((code, self._lines))
                self._lines = []
        rest = buf[start:]
        if len(rest) > self.max_line:
            raise ReplyError(f"reply line longer than {self.max_line} bytes")
        self._buf = rest


def extensions(lines: list[bytes]) -> frozenset[str]:
    """The upper-case EHLO keywords of a 250 reply's ``lines`` (the first is the greeting)."""
    words = (line.split(None, 1) for line in lines[1:])
    return frozenset(w[0].decode("ascii", "replace").upper() for w in words if w)


def reply_text(code: int, lines: list[bytes]) -> str:
    """A reply as one printable line, e.g. ``550 5.1.1 No such user``."""
    return f"{code} " + " / ".join(line.decode("utf-8", "replace") for line in lines)
