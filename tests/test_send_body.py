"""Message text of ``spamsink send``: CRLF normalisation, dot-stuffing, generated bodies."""

from __future__ import annotations

import time
from email.utils import formatdate
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sink.send_body import (
    BodyError,
    MessageSource,
    date_header,
    dot_stuff,
    filler,
    load_bodies,
    normalise,
)


def unstuff(stuffed: bytes) -> bytes:
    """What a server makes of dot-stuffed text before the marker (RFC 5321 4.5.2)."""
    return b"\r\n".join(line[1:] if line.startswith(b".") else line
                         for line in stuffed.split(b"\r\n"))


def test_line_endings_become_crlf() -> None:
    assert normalise(b"a\nb\r\nc\rd") == b"a\r\nb\r\nc\r\nd"
    assert normalise(b"\n\n") == b"\r\n\r\n"
    assert normalise(b"\r\r\n") == b"\r\n\r\n"


def test_dot_stuffing_of_leading_dots() -> None:
    text = b".starts with a dot\n..two\nmiddle . dot\n.\nend"
    assert dot_stuff(text) == (b"..starts with a dot\r\n...two\r\nmiddle . dot\r\n..\r\n"
                               b"end\r\n.\r\n")


def test_a_lone_dot_line_does_not_end_the_message_early() -> None:
    payload = dot_stuff(b"Subject: x\n\nbefore\n.\nafter\n")
    assert payload.count(b"\r\n.\r\n") == 1
    assert payload.endswith(b"after\r\n.\r\n")


def test_bare_cr_and_lf_dot_sequences_are_normalised_then_stuffed() -> None:
    payload = dot_stuff(b"a\n.\rb\r.\nc")
    assert payload == b"a\r\n..\r\nb\r\n..\r\nc\r\n.\r\n"


def test_empty_message_is_just_the_marker() -> None:
    assert dot_stuff(b"") == b".\r\n"


@given(st.binary(max_size=300))
def test_stuffing_round_trips_to_the_normalised_text(text: bytes) -> None:
    payload = dot_stuff(text)
    assert payload.endswith(b".\r\n")
    stuffed = payload[:-3]
    expected = normalise(text)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert unstuff(stuffed) == expected
    assert b"\r\n.\r\n" not in b"\r\n" + stuffed  # no line ends the message early


@pytest.mark.parametrize("size", [0, 1, 2, 3, 79, 80, 81, 82, 1024, 10_000])
def test_filler_has_exactly_the_size_and_crlf_lines(size: int) -> None:
    body = filler(size)
    assert len(body) == size
    if size >= 2:
        assert body.endswith(b"\r\n")
        assert all(len(line) <= 79 for line in body.split(b"\r\n"))
        assert not any(line.startswith(b".") for line in body.split(b"\r\n"))


def test_generated_messages_have_headers_unique_ids_and_the_body_size() -> None:
    source = MessageSource(sender="a@example.org", recipient="b@example.net", subject="Hi",
                           body_bytes=1024, bodies=None)
    first, second = source.data_payload(), source.data_payload()
    assert first != second
    head, body = first.split(b"\r\n\r\n", 1)
    assert b"From: <a@example.org>" in head and b"To: <b@example.net>" in head
    assert b"Subject: Hi" in head and b"Message-ID: <" in head and b"Date: " in head
    assert body.endswith(b"\r\n.\r\n")
    assert len(body) - 3 == 1024
    _, bdat_body = source.bdat_payload().split(b"\r\n\r\n", 1)
    assert len(bdat_body) == 1024 and not bdat_body.endswith(b".\r\n")


def test_files_are_sent_round_robin_stuffed_for_data_and_raw_for_bdat(tmp_path: Path) -> None:
    (tmp_path / "a.eml").write_bytes(b"Subject: a\n\n.dot\n")
    (tmp_path / "b.eml").write_bytes(b"Subject: b\r\n\r\nplain")
    source = MessageSource(sender="x@y", recipient="z@w", subject="", body_bytes=0,
                           bodies=load_bodies(tmp_path), offset=1)
    assert source.data_payload() == b"Subject: b\r\n\r\nplain\r\n.\r\n"
    assert source.data_payload() == b"Subject: a\r\n\r\n..dot\r\n.\r\n"
    assert source.bdat_payload() == b"Subject: b\r\n\r\nplain"
    assert source.bdat_payload() == b"Subject: a\r\n\r\n.dot\r\n"


def test_body_path_errors_are_one_line(tmp_path: Path) -> None:
    with pytest.raises(BodyError, match="no such file or directory"):
        load_bodies(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BodyError, match="has no files"):
        load_bodies(tmp_path / "empty")


@pytest.mark.parametrize("tz", ["UTC0", "CET-1CEST,M3.5.0,M10.5.0/3", "EST5EDT,M3.2.0,M11.1.0"])
def test_date_header_is_what_email_utils_formats(monkeypatch: pytest.MonkeyPatch,
                                                 tz: str) -> None:
    monkeypatch.setenv("TZ", tz)
    time.tzset()
    try:
        for seconds in (0, 1_700_000_000, 1_720_000_000.5):
            assert date_header(seconds) == formatdate(seconds, localtime=True)
    finally:
        monkeypatch.undo()
        time.tzset()
