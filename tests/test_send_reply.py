"""Reply parsing of ``spamsink send``: multi-line, split reads, pipelined batches, garbage."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sink.send_reply import ReplyError, ReplyParser, extensions, reply_text

POSTFIX_EHLO = (b"250-mx.example.com\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n250-VRFY\r\n"
                b"250-ETRN\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250-8BITMIME\r\n"
                b"250-DSN\r\n250-SMTPUTF8\r\n250 CHUNKING\r\n")


def test_single_line_reply() -> None:
    assert ReplyParser().feed(b"250 2.1.0 Ok\r\n") == [(250, [b"2.1.0 Ok"])]


def test_multi_line_reply_is_read_to_its_last_line() -> None:
    parser = ReplyParser()
    [(code, lines)] = parser.feed(POSTFIX_EHLO)
    assert code == 250
    assert lines[0] == b"mx.example.com"
    assert lines[-1] == b"CHUNKING"
    assert len(lines) == 11
    assert extensions(lines) == {"PIPELINING", "SIZE", "VRFY", "ETRN", "STARTTLS",
                                 "ENHANCEDSTATUSCODES", "8BITMIME", "DSN", "SMTPUTF8",
                                 "CHUNKING"}


def test_reply_split_over_reads_comes_out_once_complete() -> None:
    parser = ReplyParser()
    assert parser.feed(b"250-mx.example.com\r\n250-PIPE") == []
    assert parser.pending
    assert parser.feed(b"LINING\r\n250 ") == []
    assert parser.feed(b"CHUNKING\r") == []
    assert parser.feed(b"\n") == [(250, [b"mx.example.com", b"PIPELINING", b"CHUNKING"])]
    assert not parser.pending


def test_pipelined_replies_in_one_read() -> None:
    data = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data with <CR><LF>.<CR><LF>\r\n"
    assert [code for code, _ in ReplyParser().feed(data)] == [250, 250, 354]


def test_code_only_line_and_bare_lf_are_accepted() -> None:
    assert ReplyParser().feed(b"250\r\n") == [(250, [b""])]
    assert ReplyParser().feed(b"221 Bye\n") == [(221, [b"Bye"])]


@pytest.mark.parametrize("garbage", [
    b"hello\r\n", b"25\r\n", b"2x0 Ok\r\n", b"650 no such class\r\n", b"150 one\r\n",
    b"250_Ok\r\n", b"SSH-2.0-OpenSSH_9.2\r\n", b"\r\n",
])
def test_malformed_lines_raise(garbage: bytes) -> None:
    with pytest.raises(ReplyError):
        ReplyParser().feed(garbage)


def test_code_change_inside_multi_line_reply_raises() -> None:
    with pytest.raises(ReplyError, match="changed from 250 to 220"):
        ReplyParser().feed(b"250-one\r\n220 two\r\n")


def test_overlong_line_raises_even_without_line_end() -> None:
    parser = ReplyParser(max_line=100)
    with pytest.raises(ReplyError, match="longer than 100"):
        parser.feed(b"250-" + b"x" * 200)
    with pytest.raises(ReplyError, match="longer than 100"):
        ReplyParser(max_line=100).feed(b"250 " + b"x" * 200 + b"\r\n")


def test_reply_text_joins_lines() -> None:
    assert reply_text(550, [b"5.1.1 <a@b>:", b"User unknown"]) == "550 5.1.1 <a@b>: / User unknown"


replies = st.lists(st.tuples(
    st.integers(200, 599),
    st.lists(st.binary(max_size=30).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
             min_size=1, max_size=5)), min_size=1, max_size=8)


@given(replies, st.lists(st.integers(1, 50), max_size=30))
def test_any_split_of_a_reply_stream_gives_the_same_replies(
        expected: list[tuple[int, list[bytes]]], cuts: list[int]) -> None:
    stream = b"".join(
        b"".join(b"%d%s%s\r\n" % (code, b" " if i == len(lines) - 1 else b"-", line)
                 for i, line in enumerate(lines))
        for code, lines in expected)
    parser, got, pos = ReplyParser(), [], 0
    for cut in cuts:
        got += parser.feed(stream[pos:pos + cut])
        pos += cut
    got += parser.feed(stream[pos:])
    assert got == expected


@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_ever_raise_reply_error(data: bytes) -> None:
    parser = ReplyParser(max_line=64)
    try:
        for code, lines in parser.feed(data):
            assert 200 <= code <= 599 and lines
    except ReplyError:
        pass


def test_a_reply_of_more_than_max_lines_raises() -> None:
    parser = ReplyParser(max_lines=5)
    assert parser.feed(b"250-a\r\n" * 4) == []
    assert parser.feed(b"250 last\r\n") == [(250, [b"a"] * 4 + [b"last"])]
    parser.feed(b"220-x\r\n" * 5)
    with pytest.raises(ReplyError, match="longer than 5 lines"):
        parser.feed(b"220-x\r\n")
