"""Exports from the real API that nftables must accept: `nft -c -f` (and loads) in a
network namespace of our own."""

from __future__ import annotations

from pathlib import Path

from tests.test_api import Client
from tests.test_api import open_api as open_api  # the fixture
from tests.test_ips import nft_namespace


def test_query_with_line_breaks_stays_in_the_header_comment(open_api: Client, tmp_path: Path):
    """A decoded query holding line breaks must not put a bare line into the file."""
    query = "since=%0A1%0A&min_messages=%0D0"
    for fmt in ("txt", "rbldnsd", "nft"):
        text = open_api.text(f"/api/v1/export?format={fmt}&{query}")
        assert f"# query: format={fmt}&since=%0A1%0A&min_messages=%0D0\n" in text, text
        assert "\r" not in text
        assert not [x for x in text.splitlines() if x.strip() in ("0", "1")], (fmt, text)
    script = tmp_path / "senders.nft"
    script.write_text(open_api.text(f"/api/v1/export?format=nft&{query}"))
    with nft_namespace() as in_ns:
        in_ns("-c", "-f", str(script))
