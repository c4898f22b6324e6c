"""The HTTP API over a real listener on a real SQLite store: every route and filter,
bad input, auth on and off, and the OpenAPI description kept true."""

from __future__ import annotations

import base64
import csv
import io
import json
import logging
import socket
import sqlite3
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from sink.api import ROUTES, Api, ApiServer, ApiThread, check_exposure, openapi, read_token
from sink.metrics import SinkMetrics, exposition
from sink.query import BadParameter, decode_cursor, encode_cursor
from sink.record import Flag, as_row
from sink.store import NETDROP_FILE, open_reader, open_writer
from tests.support import free_port
from tests.test_store import session

TOKEN = "s3cret-token"


class Client:
    """Plain urllib against the API's base URL."""

    def __init__(self, base: str, token: str | None = None, now: float = 0.0) -> None:
        self.base, self.token, self.now = base, token, now

    def request(self, method: str, path: str) -> tuple[int, str, bytes]:
        req = urllib.request.Request(self.base + path, method=method)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), resp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type", ""), exc.read()

    def json(self, path: str, method: str = "GET", status: int = 200) -> dict:
        code, ctype, body = self.request(method, path)
        assert code == status, (code, body)
        assert ctype.startswith("application/json"), ctype
        return json.loads(body)

    def text(self, path: str) -> str:
        code, _, body = self.request("GET", path)
        assert code == 200, (code, body)
        return body.decode()


def populate(data: Path, now: float | None = None) -> float:
    """Six sessions from five senders, relative to ``now``; returns ``now``."""
    t = time.time() if now is None else now
    writer = open_writer(data)
    writer.write([
        session("192.0.2.1", end=t - 10, messages=5, helo="a.example", flags=Flag.PREGREET),
        session("192.0.2.1", end=t - 5, messages=5, flags=Flag.BARE_LF),
        session("192.0.2.2", end=t - 3600, messages=1, flags=Flag.RELAY_ATTEMPT),
        session("198.51.100.7", end=t - 2 * 86400, messages=0, helo="old.example"),
        session("2001:db8::5", end=t - 300, messages=2, local="2001:db8::25"),
        session("127.0.0.1", end=t - 1, messages=1),
    ])
    writer.close()
    return t


def serve(data: Path, token: str | None, metrics: SinkMetrics | None = None,
          ) -> Iterator[tuple[ApiThread, str]]:
    port = free_port()
    scrape = (lambda: exposition(metrics.registry)) if metrics else (lambda: exposition(None))
    thread = ApiThread(ApiServer(Api(open_reader(data), token, scrape), "127.0.0.1", port))
    thread.start()
    try:
        yield thread, f"http://127.0.0.1:{port}"
    finally:
        thread.stop()


@pytest.fixture
def open_api(tmp_path: Path) -> Iterator[Client]:
    now = populate(tmp_path)
    metrics = SinkMetrics()
    writer = open_writer(tmp_path)
    metrics.record_batch([writer.prepare([as_row(session(messages=3))])], 0.002)
    writer.close()
    for _, base in serve(tmp_path, None, metrics):
        yield Client(base, now=now)


@pytest.fixture
def locked_api(tmp_path: Path) -> Iterator[tuple[Client, Client]]:
    populate(tmp_path)
    for _, base in serve(tmp_path, TOKEN):
        yield Client(base, TOKEN), Client(base)


def ips_of(body: dict) -> list[str]:
    return [item["ip"] for item in body["items"]]


def test_ips_lists_senders_with_their_counts(open_api: Client):
    body = open_api.json("/api/v1/ips")
    assert ips_of(body) == ["127.0.0.1", "192.0.2.1", "2001:db8::5", "192.0.2.2",
                            "198.51.100.7"]
    first = body["items"][1]
    assert first["sessions"] == 2 and first["messages"] == 10
    assert first["flags"] == ["pregreet", "bare_lf"]
    assert first["helo"] == "bot.example"
    assert first["last_seen"].endswith("Z")
    assert body["next_cursor"] is None


@pytest.mark.parametrize(("query", "expected"), [
    ("sort=volume", ["192.0.2.1", "2001:db8::5", "192.0.2.2", "127.0.0.1", "198.51.100.7"]),
    ("min_messages=2", ["192.0.2.1", "2001:db8::5"]),
    ("flag=relay_attempt", ["192.0.2.2"]),
    ("flag=pregreet&flag=bare_lf", ["192.0.2.1"]),
    ("flag=pregreet,relay_attempt", []),
    ("since=2h", ["127.0.0.1", "192.0.2.1", "2001:db8::5", "192.0.2.2"]),
    ("since={now_minus_30}", ["127.0.0.1", "192.0.2.1"]),
    ("until=1d", ["198.51.100.7"]),
    ("family=6", ["2001:db8::5"]),
    ("family=4&sort=volume&min_messages=1", ["192.0.2.1", "192.0.2.2", "127.0.0.1"]),
])
def test_ips_filters(open_api: Client, query: str, expected: list[str]):
    query = query.format(now_minus_30=f"{open_api.now - 30:.0f}")
    body = open_api.json(f"/api/v1/ips?{query}")
    if query == "sort=volume":  # ties on messages go by address, descending
        assert ips_of(body)[:2] == expected[:2]
        assert set(ips_of(body)) == set(expected)
    else:
        assert ips_of(body) == expected


def test_ips_since_takes_iso_8601(open_api: Client):
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(open_api.now - 600))
    assert set(ips_of(open_api.json(f"/api/v1/ips?since={since}"))) == {
        "127.0.0.1", "192.0.2.1", "2001:db8::5"}


def test_ips_pages_with_a_cursor(open_api: Client):
    seen, cursor, pages = [], None, 0
    while True:
        body = open_api.json("/api/v1/ips?limit=2&sort=volume"
                             + (f"&cursor={cursor}" if cursor else ""))
        seen += ips_of(body)
        pages += 1
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert pages == 3
    assert sorted(seen) == sorted(["127.0.0.1", "192.0.2.1", "2001:db8::5", "192.0.2.2",
                                   "198.51.100.7"])


@pytest.mark.parametrize(("path", "parameter"), [
    ("/api/v1/ips?since=yesterday", "since"),
    ("/api/v1/ips?until=2026-13-45", "until"),
    ("/api/v1/ips?min_messages=-1", "min_messages"),
    ("/api/v1/ips?min_messages=many", "min_messages"),
    ("/api/v1/ips?flag=evil", "flag"),
    ("/api/v1/ips?sort=size", "sort"),
    ("/api/v1/ips?limit=0", "limit"),
    ("/api/v1/ips?limit=100001", "limit"),
    ("/api/v1/ips?cursor=garbage!", "cursor"),
    ("/api/v1/ips?cursor=WzEsMl0", "cursor"),  # [1,2]: well-formed, wrong shape
    ("/api/v1/ips?family=5", "family"),
    ("/api/v1/ips?min_messages=99999999999999999999999", "min_messages"),
    (f"/api/v1/ips?cursor={encode_cursor('last_seen', 10**30, '1')}", "cursor"),
    (f"/api/v1/ips?cursor={encode_cursor('last_seen', float('nan'), '1')}", "cursor"),
    ("/api/v1/ips?cursor=WyJsYXN0X3NlZW4iLDFlNDAwLCIxIl0", "cursor"),  # ["last_seen",1e400,"1"]
    (f"/api/v1/ips?sort=volume&cursor={encode_cursor('volume', 1.5, '1')}", "cursor"),
    ("/api/v1/ips?since=nan", "since"),
    ("/api/v1/ips?since=inf", "since"),
    ("/api/v1/ips?until=-inf", "until"),
    ("/api/v1/ips?until=1e400", "until"),
    ("/api/v1/ips?since=-Infinity", "since"),
    (f"/api/v1/ips?since={'9' * 400}d", "since"),
    ("/api/v1/sessions?since=NaN", "since"),
    ("/api/v1/ips?since=%C2%B2d", "since"),  # "²d": "²".isdigit() but float("²") fails
    ("/api/v1/sessions?until=inf", "until"),
    ("/api/v1/export?since=1e400", "since"),
    ("/api/v1/ips?min_message=3", "min_message"),
    ("/api/v1/ips/not-an-ip", "ip"),
    ("/api/v1/ips/192.0.2.1?sessions=5000", "sessions"),
    ("/api/v1/sessions?ip=999.1.1.1", "ip"),
    ("/api/v1/sessions?cursor=abc", "cursor"),
    ("/api/v1/stats?top=0", "top"),
    ("/api/v1/export?format=xml", "format"),
    ("/api/v1/export?limit=5", "limit"),
])
def test_bad_parameters_get_400_naming_them(open_api: Client, path: str, parameter: str):
    body = open_api.json(path, status=400)
    assert body["parameter"] == parameter
    assert body["error"]


@pytest.mark.parametrize("raw", [b'[NaN,"1"]', b'[Infinity,"1"]', b'[-Infinity,"1"]',
                                 b'[1e400,"1"]'])
def test_a_cursor_holds_only_finite_numbers(raw: bytes):
    text = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(BadParameter, match="cursor: not a cursor"):
        decode_cursor("cursor", text, ((int, float), str))
    assert decode_cursor("cursor", encode_cursor(1.5, "1"), ((int, float), str)) == (1.5, "1")


@pytest.mark.parametrize(("made_for", "used_with"), [("volume", "last_seen"),
                                                     ("last_seen", "volume")])
def test_a_cursor_only_continues_its_own_sort(open_api: Client, made_for: str, used_with: str):
    cursor = open_api.json(f"/api/v1/ips?limit=2&sort={made_for}")["next_cursor"]
    assert open_api.json(f"/api/v1/ips?limit=2&sort={made_for}&cursor={cursor}")["items"]
    body = open_api.json(f"/api/v1/ips?limit=2&sort={used_with}&cursor={cursor}", status=400)
    assert body["parameter"] == "cursor" and f"sort={made_for}" in body["error"]


def test_one_sender_with_sessions_and_netdrop_counts(open_api: Client, tmp_path: Path):
    body = open_api.json("/api/v1/ips/192.0.2.1?sessions=1")
    assert body["sender"]["sessions"] == 2
    assert body["local_ips"] == ["198.51.100.1"]
    assert len(body["recent_sessions"]) == 1
    assert body["recent_sessions"][0]["flags"] == ["bare_lf"]
    assert body["netdrop"] is None
    # netdrop's own file, as netdrop writes it.
    conn = sqlite3.connect(tmp_path / NETDROP_FILE)
    conn.execute("CREATE TABLE netdrop_senders (ip TEXT PRIMARY KEY, seen INTEGER, "
                 "passed INTEGER, dropped INTEGER, delayed INTEGER, updated REAL)")
    conn.execute("INSERT INTO netdrop_senders VALUES ('192.0.2.1', 100, 70, 20, 10, 1.5)")
    conn.execute("INSERT INTO netdrop_senders VALUES ('203.0.113.9', 5, 5, 0, 0, 2.5)")
    conn.commit()
    conn.close()
    body = open_api.json("/api/v1/ips/192.0.2.1")
    assert body["netdrop"] == {"seen": 100, "passed": 70, "dropped": 20, "delayed": 10,
                               "updated": 1.5}
    # Known to netdrop only: still an answer; unknown to both: 404.
    only_netdrop = open_api.json("/api/v1/ips/203.0.113.9")
    assert only_netdrop["sender"] is None and only_netdrop["netdrop"]["seen"] == 5
    open_api.json("/api/v1/ips/203.0.113.10", status=404)
    # IPv6 in its long form finds the stored short form.
    assert open_api.json("/api/v1/ips/2001:0db8:0:0::5")["sender"]["ip"] == "2001:db8::5"


def test_sessions_list_filters_and_pages(open_api: Client):
    body = open_api.json("/api/v1/sessions")
    assert len(body["items"]) == 6
    assert body["items"][0]["client_ip"] == "127.0.0.1"
    assert body["items"][0]["start"].endswith("Z")
    assert [s["client_ip"] for s in open_api.json("/api/v1/sessions?ip=192.0.2.1")["items"]] == [
        "192.0.2.1"] * 2
    assert len(open_api.json("/api/v1/sessions?flag=relay_attempt")["items"]) == 1
    assert len(open_api.json("/api/v1/sessions?since=30s&until=0s")["items"]) == 3
    page = open_api.json("/api/v1/sessions?limit=4")
    rest = open_api.json(f"/api/v1/sessions?limit=4&cursor={page['next_cursor']}")
    assert len(page["items"]) == 4 and len(rest["items"]) == 2 and rest["next_cursor"] is None


def test_stats(open_api: Client):
    body = open_api.json("/api/v1/stats?top=2")
    assert body["totals"] == {"sessions": 6, "messages": 14, "recipients": 6, "bytes": 6000,
                              "senders": 5}
    assert body["rates"]["1m"]["messages"] == 11
    assert body["rates"]["24h"]["messages"] == 14
    assert [s["ip"] for s in body["top_senders"]] == ["192.0.2.1", "2001:db8::5"]


def test_export_formats(open_api: Client):
    txt = open_api.text("/api/v1/export?format=txt&min_messages=1&sort=volume")
    lines = [line for line in txt.splitlines() if not line.startswith("#")]
    assert lines == ["192.0.2.1", "2001:db8::5", "192.0.2.2", "127.0.0.1"]
    # netdrop's query: one address per line, comments start with '#'.
    txt = open_api.text("/api/v1/export?format=txt&flag=bare_lf&min_messages=3")
    assert [line for line in txt.splitlines() if not line.startswith("#")] == ["192.0.2.1"]
    csv_text = open_api.text("/api/v1/export?format=csv&family=6")
    assert csv_text.splitlines()[0].startswith("ip,first_seen,last_seen,sessions,messages")
    assert csv_text.splitlines()[1].startswith("2001:db8::5,")
    items = json.loads(open_api.text("/api/v1/export?format=json"))
    assert len(items) == 5 and items[0]["ip"] == "127.0.0.1"
    rbl = open_api.text("/api/v1/export?format=rbldnsd").splitlines()
    entries = [line for line in rbl if line and not line.startswith(("#", ":"))]
    assert entries[0] == "127.0.0.2"  # RFC 5782 test entry
    assert "127.0.0.1" not in entries  # RFC 5782: never list 127.0.0.1
    assert set(entries) == {"127.0.0.2", "192.0.2.1", "192.0.2.2", "198.51.100.7"}
    assert rbl[-1] == "# 1 IPv6 senders left out (an ip4set holds IPv4 only)"
    # Only IPv6 asked for: the ip4set holds just the test entry.
    rbl6 = open_api.text("/api/v1/export?format=rbldnsd&family=6").splitlines()
    assert [x for x in rbl6 if x and not x.startswith(("#", ":"))] == ["127.0.0.2"]
    nft6 = open_api.text("/api/v1/export?format=nft&family=6")
    assert "senders_v4" not in nft6  # loading it leaves the IPv4 set alone
    assert "flush set inet spamsink senders_v6\n" in nft6
    assert "add element inet spamsink senders_v6 { 2001:db8::5 }" in nft6
    assert "senders_v6" not in open_api.text("/api/v1/export?format=nft&family=4")
    nft = open_api.text("/api/v1/export?format=nft")
    assert "add element inet spamsink senders_v6 { 2001:db8::5 }" in nft
    assert "flush set inet spamsink senders_v4" in nft


FORMULAS = ['=HYPERLINK("http://evil.example/","x")', "+1+2", "-2+3", "@SUM(1)",
            "\tx", "\rx"]


def test_csv_export_neutralises_formulas(open_api: Client, tmp_path: Path):
    """OWASP CSV injection: a text cell starting with = + - @ TAB or CR gets a leading
    single quote in the csv export, so a spreadsheet shows it instead of running it;
    json keeps the stored value."""
    writer = open_writer(tmp_path)
    writer.write([session(f"203.0.113.{i}", helo=helo) for i, helo in enumerate(FORMULAS)])
    writer.close()
    rows = list(csv.DictReader(io.StringIO(open_api.text("/api/v1/export?format=csv"))))
    helos = {row["ip"]: row["helo"] for row in rows}
    assert [helos[f"203.0.113.{i}"] for i in range(len(FORMULAS))] == [
        "'" + helo for helo in FORMULAS]
    assert helos["192.0.2.1"] == "bot.example"
    assert rows[0]["first_seen"].endswith("Z") and rows[0]["sessions"].isdigit()
    items = json.loads(open_api.text("/api/v1/export?format=json"))
    assert {i["helo"] for i in items} >= set(FORMULAS)


def test_openapi_describes_exactly_the_routes_served(open_api: Client):
    spec = open_api.json("/api/v1/openapi.json")
    assert spec == json.loads(json.dumps(openapi()))
    documented = {(method.upper(), path) for path, ops in spec["paths"].items() for method in ops}
    served = {(route.method, route.path) for route in ROUTES}
    assert documented == served
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            # Every documented route answers (not 404/405), and accepts every documented
            # query parameter with its documented default or an example value.
            query = "&".join(f"{p['name']}={_example(path, p)}" for p in op["parameters"]
                             if p["in"] == "query")
            url = path.replace("{ip}", "192.0.2.2") + (f"?{query}" if query else "")
            if method == "delete":
                status, _, _ = open_api.request("DELETE", url)
                assert status == 403  # no token configured: deletes are refused
                continue
            status, ctype, body = open_api.request("GET", url)
            assert status == 200, (url, body)
            media = op["responses"]["200"]["content"]
            assert ctype.split(";")[0] in media, (url, ctype, list(media))
    # The export answers in the media type of each format, and documents every one.
    export = spec["paths"]["/api/v1/export"]["get"]
    formats = next(p for p in export["parameters"] if p["name"] == "format")["schema"]["enum"]
    answered = set()
    for fmt in formats:
        status, ctype, _ = open_api.request("GET", f"/api/v1/export?format={fmt}")
        assert status == 200
        answered.add(ctype.split(";")[0])
    assert answered == set(export["responses"]["200"]["content"]) == {
        "text/plain", "text/csv", "application/json"}


def test_openapi_describes_each_routes_own_time_filters():
    """/sessions filters on when a session ended, /ips and /export on when a sender was
    seen: each route documents its own meaning."""
    paths = openapi()["paths"]

    def described(path: str) -> dict[str, str]:
        return {p["name"]: p["description"] for p in paths[path]["get"]["parameters"]}
    sessions, ips = described("/api/v1/sessions"), described("/api/v1/ips")
    assert sessions["since"].startswith("only sessions that ended at or after this time")
    assert sessions["until"].startswith("only sessions that ended before this time")
    assert ips["since"].startswith("only senders seen at or after this time")
    assert ips["until"].startswith("only senders first seen before this time")
    assert described("/api/v1/export")["since"] == ips["since"]


def test_head_answers_wherever_get_does(open_api: Client):
    for route in ROUTES:
        if route.method != "GET":
            continue
        path = route.path.replace("{ip}", "192.0.2.1")
        get_status, get_type, _ = open_api.request("GET", path)
        status, ctype, body = open_api.request("HEAD", path)
        assert (status, ctype, body) == (get_status, get_type, b""), path
    status, ctype, _ = open_api.request("HEAD", "/api/v1/export?format=csv")
    assert status == 200 and ctype.startswith("text/csv")
    assert open_api.request("HEAD", "/api/v1/ips?nope=1")[0] == 400  # same checks as GET
    assert open_api.request("HEAD", "/api/v1/ips?since=nan")[0] == 400


def _example(path: str, param: dict) -> str:
    if param["name"] == "cursor":  # as the route itself makes them
        if path.endswith("sessions"):
            return encode_cursor(10**9)
        return encode_cursor("last_seen", 1, "1")
    schema = param["schema"]
    if "default" in schema:
        return str(schema["default"])
    if "enum" in schema:
        return schema["enum"][0]
    if schema.get("type") == "array":
        return schema["items"]["enum"][0]
    if schema.get("type") == "integer":
        return str(schema.get("minimum", 1))
    return {"since": "1d", "until": "0s", "ip": "192.0.2.2"}[param["name"]]


def test_healthz_and_metrics(open_api: Client):
    assert open_api.json("/healthz") == {"status": "ok"}
    code, ctype, body = open_api.request("GET", "/metrics")
    assert code == 200 and ctype.startswith("text/plain")
    text = body.decode()
    assert "spamsink_messages_total 3.0" in text
    assert "spamsink_store_write_seconds_count 1.0" in text
    for line in text.splitlines():  # never an address in a label
        assert "192.0.2" not in line and "ip=" not in line


def test_unknown_route_is_json_404(open_api: Client):
    assert open_api.json("/api/v1/nothing", status=404)["error"]


def test_token_is_required_on_every_route(locked_api: tuple[Client, Client]):
    with_token, without = locked_api
    for route in ROUTES:
        path = route.path.replace("{ip}", "192.0.2.2")
        status, _, body = without.request(route.method, path)
        assert status == 401, (route.path, body)
        assert json.loads(body)["parameter"] == "Authorization"
    assert without.request("HEAD", "/api/v1/ips")[0] == 401
    assert with_token.request("HEAD", "/api/v1/ips")[0] == 200
    wrong = Client(with_token.base, "not-it")
    assert wrong.request("GET", "/api/v1/ips")[0] == 401
    assert ips_of(with_token.json("/api/v1/ips?family=6")) == ["2001:db8::5"]
    assert with_token.request("GET", "/metrics")[0] == 200


def raw_get(base: str, path: str, authorization: bytes) -> tuple[int, bytes]:
    """GET with an ``Authorization`` header of exactly these bytes."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"GET " + path.encode() + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                     b"Authorization: " + authorization + b"\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_non_utf8_token_is_a_plain_401(locked_api: tuple[Client, Client], caplog):
    """Bytes that are not UTF-8 in the header are a wrong token: 401, nothing logged."""
    with_token, _ = locked_api
    caplog.set_level(logging.WARNING)
    for header in (b"Bearer \xff\xfe", b"\xff\xfe", b"Bearer " + TOKEN.encode() + b"\xff"):
        status, body = raw_get(with_token.base, "/api/v1/ips", header)
        assert status == 401, body
        assert b'"parameter": "Authorization"' in body
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_the_bearer_scheme_is_case_insensitive(locked_api: tuple[Client, Client]):
    with_token, _ = locked_api
    for scheme in (b"bearer", b"BEARER", b"BeArEr"):
        status, body = raw_get(with_token.base, "/api/v1/ips", scheme + b" " + TOKEN.encode())
        assert status == 200, (scheme, body)
    for wrong in (b"Basic " + TOKEN.encode(), b"Bearer", b"Bearer " + TOKEN.encode()[:-1],
                  TOKEN.encode()):
        assert raw_get(with_token.base, "/api/v1/ips", wrong)[0] == 401, wrong


def test_delete_forgets_a_sender_with_the_token(locked_api: tuple[Client, Client]):
    with_token, _ = locked_api
    assert with_token.json("/api/v1/ips/192.0.2.1", "DELETE") == {"deleted": "192.0.2.1"}
    with_token.json("/api/v1/ips/192.0.2.1", status=404)
    with_token.json("/api/v1/ips/192.0.2.1", "DELETE", status=404)
    assert "192.0.2.1" not in ips_of(with_token.json("/api/v1/ips"))
    assert with_token.json("/api/v1/stats")["totals"]["sessions"] == 4


def test_delete_without_a_configured_token_is_refused(open_api: Client):
    body = open_api.json("/api/v1/ips/192.0.2.1", "DELETE", status=403)
    assert "--api-token" in body["error"]
    assert open_api.json("/api/v1/ips/192.0.2.1")["sender"]["sessions"] == 2


def test_exposure_rules(tmp_path: Path):
    check_exposure("127.0.0.1", 8025, None)
    check_exposure("::1", 8025, None)
    check_exposure("localhost", 8025, None)
    check_exposure("0.0.0.0", 8025, "t")
    for host in ("0.0.0.0", "", "192.0.2.1", "::"):
        with pytest.raises(ValueError, match="without a token"):
            check_exposure(host, 8025, None)
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    assert read_token(None, str(token_file)) == "from-file"
    assert read_token("given", None) == "given"
    token_file.write_text("\n")
    with pytest.raises(ValueError, match="is empty"):
        read_token(None, str(token_file))
    with pytest.raises(ValueError, match="cannot read"):
        read_token(None, str(tmp_path / "missing"))
    token_file.write_bytes(b"tok\xff\n")  # a header could not carry it: refused at start
    with pytest.raises(ValueError, match="printable ASCII"):
        read_token(None, str(token_file))
    for bad in ("tok\udcff", "two words", "t\u00e9"):
        with pytest.raises(ValueError, match="printable ASCII"):
            read_token(bad, None)
