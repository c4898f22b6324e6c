"""Golden SMTP transcripts: parse the files and play them against a live server.

File format, one directive per line:

* ``# text`` — a comment; ``# sink-args: ...`` adds ``spamsink serve`` options and
  ``# postfix: name=value`` sets a ``main.cf`` parameter for the reference Postfix.
* ``C: text`` — the client sends ``text`` + CRLF (Python escapes such as ``\\x00``).
* ``R: text`` / ``R*N: text`` — the client sends the raw bytes (escapes decoded, no
  CRLF added), N times. C and R lines are sent together when the next S line is read.
* ``S: line`` — the next reply line the server must send; ``<EOF>`` means the server
  closes the connection; ``<QID>`` stands for any queue id, ``<DATE>`` for an
  RFC 2822 date.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import socket
from dataclasses import dataclass, field
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"
_QUEUE_ID = re.compile(r"(queued as |id=)[0-9A-Za-z-]{6,}")
_DATE = re.compile(r"\w{3}, \d{1,2} \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}")


@dataclass
class Transcript:
    """One golden dialogue."""

    path: Path
    steps: list[tuple[str, bytes]] = field(default_factory=list)
    sink_args: list[str] = field(default_factory=list)
    postfix: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.stem}"


def _unescape(text: str) -> bytes:
    return text.encode("latin-1").decode("unicode_escape").encode("latin-1")


def load(path: Path) -> Transcript:
    """Parse a transcript file."""
    transcript = Transcript(path)
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if raw.startswith("# sink-args:"):
            transcript.sink_args += shlex.split(raw.split(":", 1)[1])
        elif raw.startswith("# postfix:"):
            name, _, value = raw.split(":", 1)[1].strip().partition("=")
            transcript.postfix[name.strip()] = value.strip()
        elif raw.startswith("#") or not raw.strip():
            continue
        elif raw.startswith("C:"):
            transcript.steps.append(("send", _unescape(raw[3:] if len(raw) > 2 else "") + b"\r\n"))
        elif raw.startswith("R"):
            head, _, body = raw.partition(": ")
            times = int(head[2:]) if head.startswith("R*") else 1
            transcript.steps.append(("send", _unescape(body) * times))
        elif raw.startswith("S: "):
            transcript.steps.append(("expect", raw[3:].encode("utf-8")))
        else:
            raise ValueError(f"{path}:{number}: cannot parse {raw!r}")
    return transcript


def all_transcripts(persona: str) -> list[Transcript]:
    """Every transcript of ``persona``, in file name order."""
    return [load(p) for p in sorted((GOLDEN / persona).glob("*.txt"))]


def normalise(line: bytes) -> bytes:
    """Mask queue ids and dates so two servers' replies compare equal."""
    text = _QUEUE_ID.sub(lambda m: m.group(1) + "<QID>", line.decode("utf-8", "replace"))
    return _DATE.sub("<DATE>", text).encode()


def play(transcript: Transcript, host: str, port: int, timeout: float = 15.0) -> list[bytes]:
    """Run the client side of ``transcript``; return the server's lines as read.

    One line is read for every ``S:`` step (``<EOF>`` when the server closed).
    """
    received: list[bytes] = []
    with socket.create_connection((host, port), timeout=timeout) as sock:
        reader = sock.makefile("rb")
        pending = b""
        for kind, data in transcript.steps:
            if kind == "send":
                pending += data
                continue
            if pending:
                with contextlib.suppress(OSError):  # a close shows in the next read
                    sock.sendall(pending)
                pending = b""
            try:
                line = reader.readline()
            except ConnectionResetError:
                line = b""
            except TimeoutError:
                received.append(b"<TIMEOUT>")
                return received  # the reader is unusable after a timeout
            received.append(normalise(line.rstrip(b"\r\n")) if line else b"<EOF>")
    return received


def expected(transcript: Transcript) -> list[bytes]:
    """The lines the transcript expects, queue ids masked."""
    return [data for kind, data in transcript.steps if kind == "expect"]


