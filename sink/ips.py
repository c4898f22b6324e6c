"""``spamsink ips``: recorded senders from the store, offline, with the API's filters.

Reads the SQLite store in ``--data`` through its own read-only connection, so it
works whether or not ``spamsink serve`` is running, and never holds up its writer.
``--format table`` (the default) is for people; the others are the API's export
formats (``GET /api/v1/export``) byte for byte, apart from the header comment.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TextIO

from sink import __version__
from sink.argtypes import positive_int
from sink.export import FORMATS, family_rows, query_comment, render, sender_item
from sink.query import BadParameter, ip_query, iso
from sink.smtp import printable
from sink.store import SORTS, StoreError, open_reader


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``spamsink ips``."""
    parser.add_argument("--data", type=Path, default=None, metavar="DIR",
                        help="the data directory of spamsink serve "
                        "[default: $STATE_DIRECTORY or ~/.local/share/spamsink]")
    parser.add_argument("--since", default=None, metavar="TIME",
                        help="only senders seen at or after TIME: Unix seconds, ISO 8601 or "
                        "an age such as 30m, 24h, 7d")
    parser.add_argument("--until", default=None, metavar="TIME",
                        help="only senders first seen before TIME")
    parser.add_argument("--min-messages", default=None, metavar="N",
                        help="only senders with at least N messages")
    parser.add_argument("--flag", action="append", default=None, metavar="NAME",
                        help="only senders with this bot signal (repeatable), e.g. pregreet, "
                        "bare_lf, auth_attempt, relay_attempt")
    parser.add_argument("--family", choices=("4", "6"), default=None,
                        help="only IPv4 or only IPv6 senders")
    parser.add_argument("--sort", choices=SORTS, default="last_seen",
                        help="last_seen: latest first (default); volume: most messages first")
    parser.add_argument("--format", choices=("table", *FORMATS), default="table",
                        help="table for people (default); txt, csv, json, rbldnsd or nft "
                        "as the API's export")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N",
                        help="at most N senders in the table [default: all]")
    parser.set_defaults(handler=run)



def run(args: argparse.Namespace, argv: Sequence[str] = ()) -> int:
    """Print the senders; 2 with one line on stderr for bad input or a missing store."""
    from sink.server import default_data_dir

    data = args.data or default_data_dir()
    get: dict[str, list[str]] = {"sort": [args.sort]}
    for name in ("since", "until", "min_messages", "family"):
        value = getattr(args, name)
        if value is not None:
            get[name] = [value]
    if args.flag:
        get["flag"] = args.flag
    try:
        query = ip_query(get)
        reader = open_reader(data)
    except BadParameter as exc:
        print(f"spamsink ips: --{exc.name.replace('_', '-')}: {exc.message}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"spamsink ips: {exc}", file=sys.stderr)
        return 2

    def rows(family: int | None) -> Iterator[list[tuple]]:
        return family_rows(reader, query, family)

    out = sys.stdout
    try:
        if args.format == "table":
            _table(rows(None), args.limit, out)
        else:
            header = [f"spamsink {__version__} ips at {iso(time.time())} from {reader.path}",
                      query_comment((k, v) for k, values in get.items() for v in values)]
            for chunk in render(args.format, rows, header, query.filter.family):
                out.write(chunk)
        out.flush()
    except BrokenPipeError:  # `spamsink ips | head`
        sys.stdout = None  # type: ignore[assignment]
    return 0


def _table(chunks: Iterator[list[tuple]], limit: int | None, out: TextIO) -> None:
    """The senders as a table for a terminal: the HELO (the one text a client chose)
    has its control characters (C0, DEL, C1, as any non-printable) shown as ``?``,
    as the SMTP side echoes them, so no escape sequence reaches the terminal."""
    columns = ("ip", "last_seen", "sessions", "messages", "recipients", "bytes", "flags", "helo")
    out.write(f"{columns[0]:<39} {columns[1]:<24} {columns[2]:>8} {columns[3]:>8} "
              f"{columns[4]:>10} {columns[5]:>12}  {columns[6]:<20} {columns[7]}\n")
    shown = 0
    for chunk in chunks:
        for row in chunk:
            if limit is not None and shown >= limit:
                return
            item = sender_item(row)
            out.write(f"{item['ip']:<39} {item['last_seen']:<24} {item['sessions']:>8} "
                      f"{item['messages']:>8} {item['recipients']:>10} {item['bytes']:>12}  "
                      f"{','.join(item['flags']) or '-':<20} {printable(item['helo'])}\n")
            shown += 1
