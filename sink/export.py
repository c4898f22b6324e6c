"""Export formats for recorded senders, produced as a stream of text chunks.

Contract: :func:`render` takes ``rows(family)``, which yields lists of aggregate rows
(columns :data:`sink.store.IP_COLUMNS`) for one address family (4, 6, or ``None``
for both), and yields text chunks, one per list, so memory stays bounded however
many senders there are. Comment lines start with ``#`` in every format but JSON.

* ``txt``: one address per line.
* ``csv``: RFC 4180 (CRLF), a header, then one sender per line; times ISO 8601 UTC,
  flags space-separated; a text cell starting with ``= + - @``, TAB or CR gets a
  leading ``'`` so spreadsheets do not run it as a formula (OWASP CSV injection).
* ``json``: one JSON array of sender objects (as ``GET /api/v1/ips`` items).
* ``rbldnsd``: an ``ip4set`` dataset answering 127.0.0.2, with the RFC 5782 test
  entry 127.0.0.2 and without 127.0.0.1 (which RFC 5782 forbids listing); IPv6
  senders cannot go in an ``ip4set`` and are counted in a closing comment.
* ``nft``: an ``nft -f`` script that creates (if needed) table ``inet spamsink``
  with sets ``senders_v4`` and ``senders_v6``, empties them and loads the senders;
  reloading replaces the contents. For one family only that family's set is
  declared, emptied and loaded; the other set is left as it was.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from urllib.parse import quote, urlencode

from sink.query import IpQuery, iso
from sink.record import Flag
from sink.smtp import printable
from sink.store import IP_COLUMNS, StoreReader

FORMATS = ("txt", "csv", "json", "rbldnsd", "nft")
CONTENT_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "csv": "text/csv; charset=utf-8",
    "json": "application/json",
    "rbldnsd": "text/plain; charset=utf-8",
    "nft": "text/plain; charset=utf-8",
}
NFT_TABLE = "spamsink"

Rows = Callable[[int | None], Iterator[list[tuple]]]


def sender_item(row: tuple) -> dict[str, object]:
    """One aggregate row (``IP_COLUMNS``) as the JSON object the API returns."""
    item = dict(zip(IP_COLUMNS, row, strict=True))
    item["first_seen"] = iso(item["first_seen"])  # type: ignore[arg-type]
    item["last_seen"] = iso(item["last_seen"])  # type: ignore[arg-type]
    item["flags"] = Flag.names(item["flags"])  # type: ignore[arg-type]
    return item


def family_rows(reader: StoreReader, query: IpQuery, family: int | None,
                ) -> Iterator[list[tuple]]:
    """The rows of ``query`` restricted to ``family`` (4, 6 or ``None``): nothing when
    the query itself asks for the other family."""
    wanted = query.filter.family
    if family is not None and wanted is not None and family != wanted:
        return iter(())
    flt = query.filter if family is None else replace(query.filter, family=family)
    return reader.iter_ips(flt, query.sort)


def render(fmt: str, rows: Rows, header: list[str], family: int | None = None,
           ) -> Iterator[str]:
    """The export in format ``fmt``; ``header`` lines become leading comments.
    ``family`` is the one the query asks for (4, 6 or ``None`` for both): an ``nft``
    script then declares and flushes only that family's set, so loading it leaves the
    other set as it was."""
    if fmt == "nft":
        return _nft(rows, header, family)
    return _RENDERERS[fmt](rows, header)


def query_comment(pairs: Iterable[tuple[str, str]]) -> str:
    """The header line naming a query: its parameters URL-encoded again, so no line
    break or other control character a client sent can leave the comment."""
    encoded = urlencode(list(pairs), quote_via=quote, errors="surrogatepass")
    return f"query: {encoded or '(all senders)'}"


def _comments(lines: list[str]) -> str:
    """``lines`` as ``#`` comments; a control character in one (a data directory's
    name, say) is shown as ``?`` so every line stays a comment."""
    return "".join(f"# {printable(line)}\n" for line in lines)


def _txt(rows: Rows, header: list[str]) -> Iterator[str]:
    yield _comments(header)
    for chunk in rows(None):
        yield "".join(f"{row[0]}\n" for row in chunk)


#: What a spreadsheet may take for the start of a formula (OWASP, CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _csv_cell(value: object) -> object:
    """``value`` for a CSV cell: text that a spreadsheet would run as a formula gets a
    leading single quote, so it is shown as text."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def _csv(rows: Rows, header: list[str]) -> Iterator[str]:
    buffer = io.StringIO()
    # RFC 4180's CRLF: csv then also quotes a field holding a lone CR (with "\n" as the
    # terminator Python 3.11 writes a CR unquoted, which splits the row for readers).
    writer = csv.writer(buffer, lineterminator="\r\n")
    writer.writerow(IP_COLUMNS)
    for chunk in rows(None):
        for row in chunk:
            item = sender_item(row)
            item["flags"] = " ".join(item["flags"])  # type: ignore[arg-type]
            writer.writerow([_csv_cell(value) for value in item.values()])
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
    yield buffer.getvalue()


def _json(rows: Rows, header: list[str]) -> Iterator[str]:
    yield "["
    separator = "\n"
    for chunk in rows(None):
        parts = []
        for row in chunk:
            parts.append(separator + json.dumps(sender_item(row), separators=(",", ":")))
            separator = ",\n"
        yield "".join(parts)
    yield "\n]\n"


def _rbldnsd(rows: Rows, header: list[str]) -> Iterator[str]:
    yield (_comments([*header, "rbldnsd ip4set dataset; RFC 5782 test entry 127.0.0.2"])
           + ":127.0.0.2:Listed by spamsink: sent to a spam sink\n127.0.0.2\n")
    for chunk in rows(4):
        yield "".join(f"{row[0]}\n" for row in chunk if row[0] not in ("127.0.0.1", "127.0.0.2"))
    skipped = sum(len(chunk) for chunk in rows(6))
    if skipped:
        yield _comments([f"{skipped} IPv6 senders left out (an ip4set holds IPv4 only)"])


def _nft(rows: Rows, header: list[str], family: int | None) -> Iterator[str]:
    table = f"inet {NFT_TABLE}"
    families = (4, 6) if family is None else (family,)
    rules = " and ".join(f"{'ip' if f == 4 else 'ip6'} saddr @senders_v{f} drop"
                        for f in families)
    yield ("#!/usr/sbin/nft -f\n"
           + _comments([*header, f"load with: nft -f FILE; then e.g. {rules} in your chains"])
           + f"table {table} {{\n"
           + "".join(f"\tset senders_v{f} {{\n\t\ttype ipv{f}_addr\n\t}}\n" for f in families)
           + "}\n"
           + "".join(f"flush set {table} senders_v{f}\n" for f in families))
    for f in families:
        for chunk in rows(f):
            yield (f"add element {table} senders_v{f} {{ "
                   + ", ".join(row[0] for row in chunk) + " }\n")


_RENDERERS: dict[str, Callable[[Rows, list[str]], Iterator[str]]] = {
    "txt": _txt, "csv": _csv, "json": _json, "rbldnsd": _rbldnsd,
}
