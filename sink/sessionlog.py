"""One log line per session at close, as text (key=value) or JSON.

Logging is configured by :func:`configure_logging`; the session line goes to the
``spamsink.session`` logger at INFO, so ``--log-level warning`` silences it.
"""

from __future__ import annotations

import json
import logging
import sys

from sink.record import Flag, SessionRecord
from sink.smtp import printable

session_log = logging.getLogger("spamsink.session")


class JSONFormatter(logging.Formatter):
    """Formats records as one JSON object per line; session lines carry their fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "session", None)
        if fields is not None:
            entry.update(fields)
        return json.dumps(entry, separators=(",", ":"))


def configure_logging(level: str, fmt: str) -> None:
    """Log to stderr at ``level`` (debug, info, warning, error) as ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def session_fields(record: SessionRecord) -> dict[str, object]:
    """The fields of a session log line."""
    return {
        "client": f"{record.client_ip}:{record.client_port}",
        "local": f"{record.local_ip}:{record.local_port}",
        "helo": record.helo,
        "tls": record.tls_version,
        "mail_from": list(record.mail_from),
        "recipients": record.recipients,
        "messages": record.messages,
        "bytes": record.bytes,
        "duration": round(record.duration, 3),
        "flags": Flag.names(record.flags),
        "end": str(record.end_reason),
    }


class SessionLogger:
    """Writes the line for a finished session (the engine's ``on_close`` hook)."""

    def write(self, record: SessionRecord) -> None:
        """Log ``record`` at INFO, skipping all formatting when INFO is off."""
        if not session_log.isEnabledFor(logging.INFO):
            return
        fields = session_fields(record)
        text = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        session_log.info("session %s", text, extra={"session": fields})


def _text_value(value: object) -> str:
    """A value for a key=value line: controls masked, quoted when it has spaces, = or "."""
    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
    text = printable(text)
    if any(c in text for c in ' ="'):
        return json.dumps(text, ensure_ascii=False)
    return text
