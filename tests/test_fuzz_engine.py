"""Fuzzing the engine's parser in-process with hypothesis, seeded from the golden corpus.

Whatever bytes arrive, in whatever chunks, the engine must not raise, must only ever
write well-formed SMTP reply lines, and must hand over exactly one session record.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sink.persona import EXIM, POSTFIX
from sink.record import SessionRecord
from sink.smtp import Limits, ServerContext, SMTPSession, _parse_path, domain_accepted
from sink.tarpit import Pacing, Tarpit
from tests import transcript

REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -][^\r\n]*$")
SEEDS = [b"".join(data for kind, data in t.steps if kind == "send")
         for persona in ("postfix", "exim") for t in transcript.all_transcripts(persona)]


class RecordingTransport(asyncio.Transport):
    """A transport that keeps what the engine writes (the test's end of the wire)."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.written += data

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"peername": ("192.0.2.7", 40000), "sockname": ("198.51.100.1", 25)}.get(
            name, default)


class Records:
    def __init__(self) -> None:
        self.items: list[SessionRecord] = []

    def submit(self, record: SessionRecord) -> None:
        self.items.append(record)


def _run(chunks: list[bytes], persona=POSTFIX, domains=None) -> tuple[bytes, list[SessionRecord]]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        records = Records()
        ctx = ServerContext(persona=persona, hostname="mx.example.com",
                            limits=Limits(line_length=persona.line_length_limit, commands=500,
                                          errors=persona.hard_error_limit),
                            records=records, tarpit=Tarpit(Pacing()), domains=domains)
        session = SMTPSession(ctx)
        transport = RecordingTransport()
        session.connection_made(transport)
        for chunk in chunks:
            if transport.closed:
                break
            session.data_received(chunk)
        session.connection_lost(None)
        return bytes(transport.written), records.items
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def _check(output: bytes, records: list[SessionRecord]) -> None:
    assert len(records) == 1
    assert output.endswith(b"\r\n")
    for line in output[:-2].split(b"\r\n"):
        assert REPLY_LINE.match(line), line


smtp_words = st.sampled_from([
    b"HELO x", b"EHLO x", b"MAIL FROM:<a@b.c>", b"MAIL FROM:<>", b"RCPT TO:<u@example.org>",
    b"RCPT TO:<u@elsewhere.net>", b"DATA", b"BDAT 5", b"BDAT 0 LAST", b"BDAT 3 LAST", b"RSET",
    b"NOOP", b"VRFY root", b"ETRN example.org", b"AUTH PLAIN", b"QUIT", b"GET / HTTP/1.0",
    b".", b"..", b"Subject: x", b"", b"MAIL FROM:<a@b.c> SIZE=99999999999", b"STARTTLS x",
    b"MAIL FROM:<a@b.c> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=x",
])
endings = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n.\r\n", b"\n.\n"])
lines = st.lists(st.tuples(smtp_words, endings).map(lambda t: t[0] + t[1]), max_size=40)
garbage = st.binary(max_size=3000)


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    parts, last = [], 0
    for point in points:
        parts.append(data[last:point])
        last = point
    parts.append(data[last:])
    return [p for p in parts if p]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(lines.map(b"".join), garbage), st.lists(st.integers(0, 10_000), max_size=8))
def test_engine_survives_anything(data: bytes, cuts: list[int]) -> None:
    _check(*_run(_split(data, cuts)))


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(SEEDS), st.lists(st.integers(0, 10_000), max_size=12), st.booleans())
@example(SEEDS[0], [], False)
def test_golden_corpus_in_any_chunking(seed: bytes, cuts: list[int], exim: bool) -> None:
    _check(*_run(_split(seed, cuts), persona=EXIM if exim else POSTFIX,
                 domains=frozenset({"example.org"})))


def test_chunking_does_not_change_the_answers() -> None:
    for seed in SEEDS:
        whole, _ = _run([seed])
        bytewise, _ = _run([bytes([b]) for b in seed])
        mask = re.compile(rb"queued as [0-9A-F]+")
        assert mask.sub(b"", whole) == mask.sub(b"", bytewise)


@given(st.binary(max_size=600))
def test_path_parser_never_raises(arg: bytes) -> None:
    status, address, params = _parse_path(arg, b"FROM:")
    assert status in (0, 1, 2)
    assert isinstance(address, bytes) and isinstance(params, list)


@given(st.text(max_size=200), st.frozensets(st.text(max_size=30), max_size=5))
def test_domain_matching_never_raises(address: str, domains: frozenset[str]) -> None:
    assert domain_accepted(address, domains) in (True, False)


def test_data_end_marker_split_everywhere() -> None:
    head = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"
    body = b"x\r\n..y\r\n.\r\nQUIT\r\n"
    for cut in range(len(body) + 1):
        output, records = _run([head, body[:cut], body[cut:]])
        assert output.count(b"queued as") == 1, cut
        assert output.endswith(b"221 2.0.0 Bye\r\n")
        assert records[0].messages == 1


def test_smuggling_is_flagged_not_ended() -> None:
    from sink.record import Flag

    data = (b"MAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.org>\r\nDATA\r\nx\n.\nMAIL FROM:<x@y>\r\n"
            b"\r\n.\r\nQUIT\r\n")
    output, records = _run([data])
    assert output.count(b"queued as") == 1  # the bare-LF dot did not end the message
    assert records[0].flags & Flag.SMUGGLING and records[0].bare_lf == 2


def test_seed_corpus_is_present() -> None:
    assert len(SEEDS) >= 20
    assert all(Path(t.path).exists() for t in transcript.all_transcripts("postfix"))
