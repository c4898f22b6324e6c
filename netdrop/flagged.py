"""The senders ``--only-flagged`` targets: read from the sink's API and/or a file.

Both sources are plain text, one address per line, ``#`` starting a comment. The API
is ``GET <sink-api>/api/v1/export?format=txt&flag=NAME&min_messages=N`` (bearer token
optional). :class:`Refresher` reloads every few seconds in a thread and hands each new
set to the policy; when a source fails, the last good set stays in force (before the
first success nobody is targeted: netdrop fails open).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

log = logging.getLogger("netdrop")


def parse_list(text: str) -> set[bytes]:
    """Packed addresses of the lines of ``text``; blank, ``#`` and unparsable lines skipped."""
    found = set()
    for line in text.splitlines():
        word = line.split("#", 1)[0].strip()
        if not word:
            continue
        try:
            found.add(ipaddress.ip_address(word.split()[0]).packed)
        except ValueError:
            continue
    return found


def export_url(base: str, flags: Sequence[str], min_messages: int | None) -> str:
    """The sink API's plain-text export URL for these criteria."""
    query: list[tuple[str, str]] = [("format", "txt")]
    query += [("flag", name) for name in flags]
    if min_messages is not None:
        query.append(("min_messages", str(min_messages)))
    return f"{base.rstrip('/')}/api/v1/export?{urllib.parse.urlencode(query)}"


class FlaggedSource:
    """Loads the flagged set from a file, an URL, or both (the union)."""

    def __init__(self, path: Path | None = None, url: str | None = None,
                 token: str | None = None, timeout: float = 5.0) -> None:
        self.path = path
        self.url = url
        self.token = token
        self.timeout = timeout

    def describe(self) -> str:
        return " and ".join(str(s) for s in (self.path, self.url) if s)

    def load(self) -> set[bytes]:
        """The current set; raises ``OSError`` (file or HTTP failures) or ``ValueError``."""
        found: set[bytes] = set()
        if self.path is not None:
            found |= parse_list(self.path.read_text(encoding="utf-8", errors="replace"))
        if self.url is not None:
            request = urllib.request.Request(self.url, headers={"Accept": "text/plain"})
            if self.token:
                request.add_header("Authorization", f"Bearer {self.token}")
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                found |= parse_list(response.read().decode("utf-8", errors="replace"))
        return found


class Refresher:
    """Reloads ``source`` every ``interval`` seconds and passes each set to ``apply``."""

    def __init__(self, source: FlaggedSource, apply: Callable[[Iterable[bytes]], None],
                 interval: float = 5.0) -> None:
        self.source = source
        self.apply = apply
        self.interval = interval
        self.loads = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="netdrop-flagged", daemon=True)

    def refresh(self) -> bool:
        """One load; True if it succeeded."""
        try:
            found = self.source.load()
        except (OSError, ValueError) as exc:
            if self.failures == 0:
                log.warning("netdrop: cannot read flagged senders from %s: %s (keeping %s)",
                            self.source.describe(), exc,
                            "the last list" if self.loads else "nobody targeted")
            self.failures += 1
            return False
        if self.failures:
            log.warning("netdrop: flagged senders readable again (%d addresses)", len(found))
        self.failures = 0
        self.loads += 1
        self.apply(found)
        return True

    def start(self) -> None:
        self.refresh()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.refresh()
