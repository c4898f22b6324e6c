"""netdrop.flagged: the list format, the API URL, a real HTTP server, refresh failures."""

from __future__ import annotations

import http.server
import ipaddress
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from netdrop.flagged import FlaggedSource, Refresher, export_url, parse_list

A = ipaddress.ip_address("203.0.113.7").packed
V6 = ipaddress.ip_address("2001:db8::7").packed


def test_parse_list_skips_comments_blanks_and_junk() -> None:
    text = "# flagged senders\n203.0.113.7\n\n  2001:db8::7  # note\nnot-an-ip\n10.0.0.0/8\n"
    assert parse_list(text) == {A, V6}


def test_export_url() -> None:
    assert export_url("http://127.0.0.1:8025/", ["pregreet", "bare_lf"], 3) == (
        "http://127.0.0.1:8025/api/v1/export?format=txt&flag=pregreet&flag=bare_lf"
        "&min_messages=3")
    assert export_url("http://h:1", [], None) == "http://h:1/api/v1/export?format=txt"


@pytest.fixture
def api() -> Iterator[dict]:
    state = {"body": "203.0.113.7\n", "status": 200, "auth": None}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state["auth"] = self.headers.get("Authorization")
            state["path"] = self.path
            self.send_response(state["status"])
            self.end_headers()
            self.wfile.write(state["body"].encode())

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["url"] = f"http://127.0.0.1:{server.server_address[1]}"
    yield state
    server.shutdown()
    server.server_close()


def test_source_reads_the_api_with_token(api: dict) -> None:
    source = FlaggedSource(url=export_url(api["url"], ["pregreet"], 2), token="s3cret")
    assert source.load() == {A}
    assert api["auth"] == "Bearer s3cret"
    assert api["path"] == "/api/v1/export?format=txt&flag=pregreet&min_messages=2"


def test_source_unions_file_and_api(api: dict, tmp_path: Path) -> None:
    path = tmp_path / "flagged.txt"
    path.write_text("2001:db8::7\n")
    assert FlaggedSource(path, export_url(api["url"], [], None)).load() == {A, V6}


def test_refresher_keeps_the_last_set_when_the_source_fails(api: dict) -> None:
    got: list[set[bytes]] = []
    refresher = Refresher(FlaggedSource(url=export_url(api["url"], [], None)),
                          lambda s: got.append(set(s)))
    assert refresher.refresh()
    api["status"] = 500
    assert not refresher.refresh()
    assert got == [{A}] and refresher.failures == 1
    api["status"], api["body"] = 200, "2001:db8::7\n"
    assert refresher.refresh()
    assert got[-1] == {V6} and refresher.failures == 0


def test_missing_file_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    refresher = Refresher(FlaggedSource(tmp_path / "absent.txt"), lambda s: None)
    assert not refresher.refresh()
