"""What a real MTA says on the wire: banner, EHLO list, every reply, queue ids, limits.

A :class:`Persona` is pure data. The engine (:mod:`sink.smtp`) never branches on a
persona's name: it looks replies up by key and formats the few that carry arguments.
Templates may use ``{hostname}`` (rendered once per server); the per-call fields are
named in each template (``{address}``, ``{queue_id}``, ``{count}``...).

The ``postfix`` persona is Debian 12's Postfix 3.7 with Debian's default ``main.cf``
(``smtpd_banner = $myhostname ESMTP $mail_name (Debian/GNU)``, STARTTLS offered,
``defer_unauth_destination`` for relaying). Every reply text was captured from a real
``postfix 3.7.11`` and is re-checked by ``tests/scenarios/test_postfix_diff.py``.

The ``exim`` persona is Debian's Exim 4.96 (``exim4-daemon-light``) texts, written from
Exim's source strings; it is not diffed against a live Exim (the package conflicts with
Postfix on one machine).
"""

from __future__ import annotations

import email.utils
import random
import string
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

#: Every reply key the engine uses. A persona must define all of them.
REPLY_KEYS = frozenset(
    {
        "helo",  # 250 reply to HELO
        "helo_syntax",
        "ehlo_syntax",
        "bad_syntax",  # empty line
        "unknown",  # unknown command
        "forbidden",  # HTTP and other non-SMTP: reply and close
        "mail_ok",
        "mail_syntax",
        "mail_nested",
        "mail_bad_address",
        "mail_after_bdat",
        "size_exceeded",  # SIZE= over the limit on MAIL
        "size_syntax",
        "unsupported_option",  # {option}
        "ret_syntax",
        "envid_syntax",
        "rcpt_ok",
        "rcpt_syntax",
        "rcpt_need_mail",
        "rcpt_bad_address",
        "notify_syntax",
        "orcpt_syntax",
        "too_many_recipients",
        "relay_denied",  # {address}
        "data_ok",  # 354
        "data_syntax",
        "data_need_rcpt",
        "data_after_bdat",
        "queued",  # {queue_id}
        "message_too_big",
        "bdat_syntax",  # reply and close
        "bdat_chunk",  # {count}
        "bdat_queued",  # {size} {queue_id}
        "bdat_discarded",  # {count}
        "rset_ok",
        "rset_syntax",
        "noop_ok",
        "vrfy_ok",  # {address}
        "vrfy_syntax",
        "etrn_ok",
        "etrn_syntax",
        "etrn_in_transaction",
        "etrn_denied",  # {domain}
        "auth_disabled",
        "starttls_ok",
        "starttls_syntax",
        "starttls_active",
        "starttls_unavailable",
        "xclient_denied",
        "quit",
        "too_many_errors",  # reply and close
        "timeout",  # reply and close
        "too_many_connections",  # reply and close, sent instead of the banner
        "shutdown",  # reply and close at server shutdown
        "session_too_long",  # reply and close
        "greylisted",  # RCPT deferred by --greylist: {address} {domain} {sender} {client_ip}
    }
)


_ids = random.Random()


def hex_queue_id() -> str:
    """A classic Postfix queue id: 11 upper-case hex digits (microseconds and inode).

    Not a secret, so a seeded PRNG (no system call per message) is enough.
    """
    micro = time.time_ns() // 1000 % 1_000_000  # < 0x100000: five hex digits
    return "%011X" % (micro << 24 | _ids.getrandbits(24))


_BASE62 = string.digits + string.ascii_uppercase + string.ascii_lowercase


def _base62(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, rest = divmod(number, 62)
        digits.append(_BASE62[rest])
    return "".join(reversed(digits))


def exim_message_id() -> str:
    """An Exim 4.96 message id: ``tttttt-pppppp-ff`` in base 62 (time, pid, fraction)."""
    now = time.time_ns()
    pid = _ids.getrandbits(24)
    return f"{_base62(now // 10**9, 6)}-{_base62(pid, 6)}-{_base62(now // 10**6 % 1000 // 16, 2)}"


@dataclass(frozen=True, slots=True)
class Persona:
    """Everything an MTA's SMTP server says, and the limits it enforces.

    ``banner``, ``ehlo_greeting`` and ``helo`` may also use ``{client_ip}``,
    ``{helo_name}`` and ``{date}`` (RFC 2822); they are formatted per session only
    when they do (``per_session_greeting``).
    """

    name: str
    banner: str
    ehlo_greeting: str
    ehlo_keywords: tuple[str, ...]
    replies: Mapping[str, str]
    queue_id: Callable[[], str]
    #: Commands that are answered with ``forbidden`` and a close (HTTP and proxies).
    forbidden_commands: frozenset[str] = frozenset()
    #: A command whose first character is not A-Z (after upper-casing) is forbidden.
    forbid_non_alpha: bool = False
    #: A line shaped like a mail header ("Host: x") is forbidden.
    forbid_header_lines: bool = False
    soft_error_limit: int = 10
    hard_error_limit: int = 20
    error_sleep: float = 1.0
    #: NOOP/VRFY/ETRN/RSET beyond this count increment the error counter.
    junk_command_limit: int = 100
    message_size_limit: int = 10_240_000
    recipient_limit: int = 1000
    line_length_limit: int = 2048
    idle_timeout: float = 300.0
    #: The ``size`` a BDAT LAST reply reports: Postfix counts the stored message
    #: with every line ending as CRLF and a final CRLF added.
    bdat_reports_stored_size: bool = True

    def __post_init__(self) -> None:
        missing = REPLY_KEYS - set(self.replies)
        if missing:
            raise ValueError(f"persona {self.name!r} lacks replies: {sorted(missing)}")

    @property
    def per_session_greeting(self) -> bool:
        """True when the banner or EHLO/HELO replies name the client or the date."""
        text = self.banner + self.ehlo_greeting + self.replies["helo"]
        return any(key in text for key in ("{client_ip}", "{helo_name}", "{date}"))


def rfc2822_now() -> str:
    """The current local time as Exim prints it in its banner."""
    return email.utils.formatdate(localtime=True)


POSTFIX = Persona(
    name="postfix",
    banner="220 {hostname} ESMTP Postfix (Debian/GNU)",
    ehlo_greeting="{hostname}",
    ehlo_keywords=(
        "PIPELINING",
        "SIZE {size}",
        "VRFY",
        "ETRN",
        "STARTTLS",
        "ENHANCEDSTATUSCODES",
        "8BITMIME",
        "DSN",
        "SMTPUTF8",
        "CHUNKING",
    ),
    replies=MappingProxyType(
        {
            "helo": "250 {hostname}",
            "helo_syntax": "501 Syntax: HELO hostname",
            "ehlo_syntax": "501 Syntax: EHLO hostname",
            "bad_syntax": "500 5.5.2 Error: bad syntax",
            "unknown": "500 5.5.2 Error: command not recognized",
            "forbidden": "221 2.7.0 Error: I can break rules, too. Goodbye.",
            "mail_ok": "250 2.1.0 Ok",
            "mail_syntax": "501 5.5.4 Syntax: MAIL FROM:<address>",
            "mail_nested": "503 5.5.1 Error: nested MAIL command",
            "mail_bad_address": "501 5.1.7 Bad sender address syntax",
            "mail_after_bdat": "503 5.5.1 Error: MAIL after BDAT",
            "size_exceeded": "552 5.3.4 Message size exceeds fixed limit",
            "size_syntax": "501 5.5.4 Bad message size syntax",
            "unsupported_option": "555 5.5.4 Unsupported option: {option}",
            "ret_syntax": "501 5.5.4 Bad RET parameter syntax",
            "envid_syntax": "501 5.5.4 Bad ENVID parameter syntax",
            "rcpt_ok": "250 2.1.5 Ok",
            "rcpt_syntax": "501 5.5.4 Syntax: RCPT TO:<address>",
            "rcpt_need_mail": "503 5.5.1 Error: need MAIL command",
            "rcpt_bad_address": "501 5.1.3 Bad recipient address syntax",
            "notify_syntax": "501 5.5.4 Error: Bad NOTIFY parameter syntax",
            "orcpt_syntax": "501 5.5.4 Error: Bad ORCPT parameter syntax",
            "too_many_recipients": "452 4.5.3 Error: too many recipients",
            "relay_denied": "454 4.7.1 <{address}>: Relay access denied",
            "data_ok": "354 End data with <CR><LF>.<CR><LF>",
            "data_syntax": "501 5.5.4 Syntax: DATA",
            "data_need_rcpt": "503 5.5.1 Error: need RCPT command",
            "data_after_bdat": "503 5.5.1 Error: DATA after BDAT",
            "queued": "250 2.0.0 Ok: queued as {queue_id}",
            "message_too_big": "552 5.3.4 Error: message file too big",
            "bdat_syntax": "521 5.5.4 Syntax: BDAT count [LAST]",
            "bdat_chunk": "250 2.0.0 Ok: {count} bytes",
            "bdat_queued": "250 2.0.0 Ok: {size} bytes queued as {queue_id}",
            "bdat_discarded": "551 5.0.0 Discarded {count} bytes after earlier error",
            "rset_ok": "250 2.0.0 Ok",
            "rset_syntax": "501 5.5.4 Syntax: RSET",
            "noop_ok": "250 2.0.0 Ok",
            "vrfy_ok": "252 2.0.0 {address}",
            "vrfy_syntax": "501 5.5.4 Syntax: VRFY address [SMTPUTF8]",
            "etrn_ok": "250 Queuing started",
            "etrn_syntax": "500 Syntax: ETRN domain",
            "etrn_in_transaction": "503 Error: MAIL transaction in progress",
            "etrn_denied": "459 <{domain}>: service unavailable",
            "auth_disabled": "503 5.5.1 Error: authentication not enabled",
            "starttls_ok": "220 2.0.0 Ready to start TLS",
            "starttls_syntax": "501 5.5.4 Syntax: STARTTLS",
            "starttls_active": "554 5.5.1 Error: TLS already active",
            "starttls_unavailable": "502 5.5.1 Error: command not implemented",
            "xclient_denied": "550 5.7.0 Error: insufficient authorization",
            "quit": "221 2.0.0 Bye",
            "too_many_errors": "421 4.7.0 {hostname} Error: too many errors",
            "timeout": "421 4.4.2 {hostname} Error: timeout exceeded",
            "too_many_connections": "421 4.7.0 {hostname} Error: too many connections",
            "shutdown": "421 4.3.2 {hostname} Service shutting down, closing transmission channel",
            "session_too_long": "421 4.4.2 {hostname} Error: timeout exceeded",
            "greylisted": "450 4.2.0 <{address}>: Recipient address rejected: Greylisted, see "
                          "http://postgrey.schweikert.ch/help/{domain}.html",
        }
    ),
    queue_id=hex_queue_id,
    forbidden_commands=frozenset({"CONNECT", "GET", "POST"}),
    forbid_non_alpha=True,
    forbid_header_lines=True,
)


EXIM = Persona(
    name="exim",
    banner="220 {hostname} ESMTP Exim 4.96 {date}",
    ehlo_greeting="{hostname} Hello {helo_name} [{client_ip}]",
    ehlo_keywords=(
        "SIZE {size}",
        "8BITMIME",
        "PIPELINING",
        "STARTTLS",
        "CHUNKING",
        "PRDR",
        "HELP",
    ),
    replies=MappingProxyType(
        {
            "helo": "250 {hostname} Hello {helo_name} [{client_ip}]",
            "helo_syntax": "501 Syntactically invalid HELO argument(s)",
            "ehlo_syntax": "501 Syntactically invalid EHLO argument(s)",
            "bad_syntax": "500 unrecognized command",
            "unknown": "500 unrecognized command",
            "forbidden": "554 SMTP synchronization error",
            "mail_ok": "250 OK",
            "mail_syntax": "501 MAIL must have an address operand",
            "mail_nested": "503 sender already given",
            "mail_bad_address": "501 : malformed address",
            "mail_after_bdat": "503 sender already given",
            "size_exceeded": "552 Message size exceeds maximum permitted",
            "size_syntax": "501 SIZE requires a numerical argument",
            "unsupported_option": "555 Unsupported option: {option}",
            "ret_syntax": "501 RET must be HDRS or FULL",
            "envid_syntax": "501 ENVID is malformed",
            "rcpt_ok": "250 Accepted",
            "rcpt_syntax": "501 RCPT must have an address operand",
            "rcpt_need_mail": "503 sender not yet given",
            "rcpt_bad_address": "501 : malformed address",
            "notify_syntax": "501 NOTIFY must be NEVER or SUCCESS,FAILURE,DELAY",
            "orcpt_syntax": "501 ORCPT is malformed",
            "too_many_recipients": "452 too many recipients",
            "relay_denied": "550 relay not permitted",
            "data_ok": '354 Enter message, ending with "." on a line by itself',
            "data_syntax": "501 DATA must have no operand",
            "data_need_rcpt": "503 valid RCPT command must precede DATA",
            "data_after_bdat": "503 only BDAT permissible after non-LAST BDAT",
            "queued": "250 OK id={queue_id}",
            "message_too_big": "552 Message size exceeds maximum permitted",
            "bdat_syntax": "501 missing size for BDAT command",
            "bdat_chunk": "250 {count} byte chunk received",
            "bdat_queued": "250 OK id={queue_id}",
            "bdat_discarded": "503 valid RCPT command must precede BDAT",
            "rset_ok": "250 Reset OK",
            "rset_syntax": "250 Reset OK",
            "noop_ok": "250 OK",
            "vrfy_ok": "252 Administrative prohibition",
            "vrfy_syntax": "252 Administrative prohibition",
            "etrn_ok": "458 Administrative prohibition",
            "etrn_syntax": "458 Administrative prohibition",
            "etrn_in_transaction": "458 Administrative prohibition",
            "etrn_denied": "458 Administrative prohibition",
            "auth_disabled": "503 AUTH command used when not advertised",
            "starttls_ok": "220 TLS go ahead",
            "starttls_syntax": "501 STARTTLS command must have no operand",
            "starttls_active": "503 STARTTLS command used when not advertised",
            "starttls_unavailable": "503 STARTTLS command used when not advertised",
            "xclient_denied": "500 unrecognized command",
            "quit": "221 {hostname} closing connection",
            "too_many_errors": "421 {hostname} too many syntax or protocol errors",
            "timeout": "421 {hostname} SMTP incoming data timeout - closing connection.",
            "too_many_connections":
                "421 {hostname} Too many concurrent SMTP connections; please try again later.",
            "shutdown": "421 {hostname} Service not available - closing connection",
            "session_too_long": "421 {hostname} SMTP command timeout - closing connection",
            # greylistd's suggested Exim ACL: "defer message = ..." (Exim sends 451)
            "greylisted": "451 {client_ip} is not yet authorized to deliver mail from "
                          "<{sender}> to <{address}>. Please try later.",
        }
    ),
    queue_id=exim_message_id,
    soft_error_limit=3,
    hard_error_limit=4,
    error_sleep=0.0,
    junk_command_limit=100,
    message_size_limit=52_428_800,
    bdat_reports_stored_size=False,
)

PERSONAS: Mapping[str, Persona] = MappingProxyType({p.name: p for p in (POSTFIX, EXIM)})


def get_persona(name: str) -> Persona:
    """Return the persona called ``name``; ``ValueError`` lists the known ones."""
    try:
        return PERSONAS[name]
    except KeyError:
        known = ", ".join(PERSONAS)
        raise ValueError(f"unknown persona {name!r}; choose one of: {known}") from None
