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


def test_a_family_6_export_keeps_the_ipv4_set(open_api: Client, tmp_path: Path):
    full, v6 = tmp_path / "all.nft", tmp_path / "v6.nft"
    full.write_text(open_api.text("/api/v1/export?format=nft"))
    v6.write_text(open_api.text("/api/v1/export?format=nft&family=6"))
    with nft_namespace() as in_ns:
        in_ns("-f", str(full))
        in_ns("-f", str(v6))
        assert "192.0.2.1" in in_ns("list", "set", "inet", "spamsink", "senders_v4")
        assert "2001:db8::5" in in_ns("list", "set", "inet", "spamsink", "senders_v6")
