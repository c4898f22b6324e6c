"""The session log line: one per finished session, text or JSON fields."""

from __future__ import annotations

import logging

from sink.record import EndReason, SessionRecord
from sink.sessionlog import SessionLogger, session_fields


def finished(mail_from: tuple[str, ...]) -> SessionRecord:
    r = SessionRecord(start=100.0, client_ip="192.0.2.7", client_port=4000,
                      local_ip="198.51.100.1", local_port=25, persona="postfix")
    r.end = 100.5
    r.helo = "bot.example"
    r.mail_from = mail_from
    r.end_reason = EndReason.QUIT
    return r


def test_the_text_line_lists_sender_addresses_comma_separated(caplog):
    caplog.set_level(logging.INFO, "spamsink.session")
    SessionLogger().write(finished(("a@example.net", "b@example.net")))
    SessionLogger().write(finished(()))
    lines = [r.getMessage() for r in caplog.records]
    assert "mail_from=a@example.net,b@example.net " in lines[0]
    assert "mail_from= " in lines[1]


def test_the_fields_hold_the_addresses_as_a_list():
    assert session_fields(finished(("a@example.net",)))["mail_from"] == ["a@example.net"]
