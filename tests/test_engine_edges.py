"""Edge cases of the engine found in review, driven in-process (see test_fuzz_engine)."""

from __future__ import annotations

import asyncio

from sink.persona import POSTFIX
from sink.record import Flag
from sink.smtp import Limits, ServerContext, SMTPSession
from sink.tarpit import Pacing, Tarpit
from tests.test_fuzz_engine import RecordingTransport, Records, _run

MAIL = b"MAIL FROM:<a@b.c>\r\nRCPT TO:<u@example.org>\r\nDATA\r\n"


def test_vrfy_with_unicode_whitespace_is_answered() -> None:
    for arg in (b"\x1c", b"\xc2\x85", b"\xe3\x80\x80"):
        output, records = _run([b"VRFY " + arg + b"\r\nQUIT\r\n"])
        assert output.splitlines()[1].startswith(b"252 2.0.0 ")
        assert records[0].end_reason == "quit"


def test_over_long_crlf_line_is_not_a_bare_lf() -> None:
    line = b"RCPT TO:<" + b"a" * 3000 + b"@example.org>\r\n"
    for chunks in ([line], [line[:100], line[100:]], [line[:2500], line[2500:]]):
        _, records = _run(chunks)
        assert records[0].flags & Flag.LONG_LINE
        assert not records[0].flags & Flag.BARE_LF and records[0].bare_lf == 0


def test_a_bare_lf_line_before_the_end_is_no_smuggling() -> None:
    body = b"Subject: x\r\n\r\nline one\nline two\r\n.\r\nQUIT\r\n"
    for cut in range(len(body)):
        _, records = _run([MAIL, body[:cut], body[cut:]])
        assert records[0].flags & Flag.BARE_LF
        assert not records[0].flags & Flag.SMUGGLING, cut


def test_one_read_cannot_make_an_unbounded_reply() -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        ctx = ServerContext(persona=POSTFIX, hostname="mx.example.com", limits=Limits(),
                            records=Records(), tarpit=Tarpit(Pacing()))
        session = SMTPSession(ctx)

        class StalledTransport(RecordingTransport):
            """The peer reads nothing: past 64 KiB the protocol is told to pause."""

            def write(self, data: bytes) -> None:
                super().write(data)
                if len(self.written) > 65536:
                    session.pause_writing()

        transport = StalledTransport()
        session.connection_made(transport)
        session.data_received(b"EHLO x\r\n" * 8000)  # 64 KB in, ~1.2 MB of replies
        assert len(transport.written) < 65536 + 64 * 200
        session.connection_lost(None)
    finally:
        loop.close()
        asyncio.set_event_loop(None)


def test_ipv4_mapped_clients_are_recorded_as_ipv4() -> None:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        records = Records()
        ctx = ServerContext(persona=POSTFIX, hostname="mx.example.com", limits=Limits(),
                            records=records, tarpit=Tarpit(Pacing()))
        session = SMTPSession(ctx)

        class DualStack(RecordingTransport):
            def get_extra_info(self, name: str, default: object = None) -> object:
                return {"peername": ("::ffff:192.0.2.9", 4000, 0, 0),
                        "sockname": ("::ffff:198.51.100.1", 25, 0, 0)}.get(name, default)

        session.connection_made(DualStack())
        session.connection_lost(None)
        assert records.items[0].client_ip == "192.0.2.9"
        assert records.items[0].local_ip == "198.51.100.1"
    finally:
        loop.close()
        asyncio.set_event_loop(None)
