"""`spamsink ips`: the store read offline, with the API's filters and export formats."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sink.cli import main
from sink.store import open_writer
from tests.support import free_port, need_root, need_tool
from tests.test_api import populate
from tests.test_store import session


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["ips", *args])
    out, err = capsys.readouterr()
    return code, out, err


def entries(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_table_lists_every_sender(tmp_path: Path, capsys):
    populate(tmp_path)
    code, out, err = run(capsys, "--data", str(tmp_path))
    assert code == 0 and not err
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["ip", "last_seen", "sessions", "messages"]
    assert [line.split()[0] for line in lines[1:]] == [
        "127.0.0.1", "192.0.2.1", "2001:db8::5", "192.0.2.2", "198.51.100.7"]
    assert "pregreet,bare_lf" in lines[2]
    code, out, _ = run(capsys, "--data", str(tmp_path), "--limit", "2")
    assert len(out.splitlines()) == 3


def test_filters_match_the_api(tmp_path: Path, capsys):
    populate(tmp_path)
    base = ["--data", str(tmp_path), "--format", "txt"]
    assert entries(run(capsys, *base, "--min-messages", "2", "--sort", "volume")[1]) == [
        "192.0.2.1", "2001:db8::5"]
    assert entries(run(capsys, *base, "--flag", "pregreet", "--flag", "bare_lf")[1]) == [
        "192.0.2.1"]
    assert entries(run(capsys, *base, "--since", "2h", "--family", "4")[1]) == [
        "127.0.0.1", "192.0.2.1", "192.0.2.2"]
    assert entries(run(capsys, *base, "--until", "1d")[1]) == ["198.51.100.7"]


def test_export_formats(tmp_path: Path, capsys):
    populate(tmp_path)
    base = ["--data", str(tmp_path), "--format"]
    rows = list(csv.DictReader(io.StringIO(run(capsys, *base, "csv")[1])))
    assert rows[1]["ip"] == "192.0.2.1" and rows[1]["flags"] == "pregreet bare_lf"
    items = json.loads(run(capsys, *base, "json")[1])
    assert [i["ip"] for i in items][:2] == ["127.0.0.1", "192.0.2.1"]
    rbl = entries(run(capsys, *base, "rbldnsd")[1])
    assert rbl[0].startswith(":127.0.0.2:") and rbl[1] == "127.0.0.2"
    nft = run(capsys, *base, "nft")[1]
    assert nft.startswith("#!/usr/sbin/nft -f\n")


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "soon"], "--since: not a time"),
    (["--since", "nan"], "--since: not a finite time"),
    (["--until", "1e400"], "--until: not a finite time"),
    (["--since", "\u00b2d"], "--since: not a time"),
    (["--min-messages", "x"], "--min-messages: not a whole number"),
    (["--flag", "nope"], "--flag: unknown flag 'nope'"),
])
def test_bad_filters_are_one_line(tmp_path: Path, capsys, args: list[str], message: str):
    populate(tmp_path)
    code, out, err = run(capsys, "--data", str(tmp_path), *args)
    assert code == 2 and not out
    assert err.startswith(f"spamsink ips: {message}")
    assert len(err.strip().splitlines()) == 1


def test_missing_store_says_where_it_looked(tmp_path: Path, capsys):
    code, _, err = run(capsys, "--data", str(tmp_path / "none"))
    assert code == 2
    assert "no store at" in err and "spamsink serve --data" in err


@contextlib.contextmanager
def nft_namespace() -> Iterator[Callable[..., str]]:
    """``nft ARGS`` run in a network namespace of our own (deleted after); skips without
    root or nft. The callable fails the test with nft's message when nft refuses."""
    need_root()
    nft = need_tool("nft")
    ip = need_tool("ip")
    namespace = f"rec4-{os.getpid()}"
    subprocess.run([ip, "netns", "add", namespace], check=True)
    try:
        def in_ns(*args: str) -> str:
            done = subprocess.run([ip, "netns", "exec", namespace, nft, *args],
                                  capture_output=True, text=True)
            assert done.returncode == 0, f"nft {' '.join(args)}: {done.stderr}"
            return done.stdout
        yield in_ns
    finally:
        subprocess.run([ip, "netns", "delete", namespace], check=False)


def test_nft_export_loads_into_a_real_ruleset(tmp_path: Path, capsys):
    """`spamsink ips --format nft` is a set nftables loads (in a namespace of our own)."""
    populate(tmp_path)
    script = tmp_path / "senders.nft"
    with nft_namespace() as in_ns:
        script.write_text(run(capsys, "--data", str(tmp_path), "--format", "nft")[1])
        in_ns("-f", str(script))
        in_ns("-f", str(script))  # reloading replaces, never fails or duplicates
        listed = in_ns("list", "set", "inet", "spamsink", "senders_v4")
        for address in ("192.0.2.1", "192.0.2.2", "198.51.100.7", "127.0.0.1"):
            assert address in listed
        assert "2001:db8::5" in in_ns("list", "set", "inet", "spamsink", "senders_v6")
        # A rule can use it.
        in_ns("add", "chain", "inet", "spamsink", "input",
              "{ type filter hook input priority 0 ; }")
        in_ns("add", "rule", "inet", "spamsink", "input", "ip", "saddr", "@senders_v4", "drop")


def test_one_family_export_leaves_the_other_set_alone(tmp_path: Path, capsys):
    """Loading a --family 6 export replaces senders_v6 and keeps senders_v4 (and the
    reverse): each export declares and flushes only its own family's set."""
    populate(tmp_path)
    scripts = {}
    for family in ("all", "4", "6"):
        scripts[family] = tmp_path / f"senders-{family}.nft"
        args = [] if family == "all" else ["--family", family]
        scripts[family].write_text(run(capsys, "--data", str(tmp_path), "--format", "nft",
                                       *args)[1])
    assert "senders_v4" not in scripts["6"].read_text()
    assert "senders_v6" not in scripts["4"].read_text()
    with nft_namespace() as in_ns:
        def listed(family: str) -> str:
            return in_ns("list", "set", "inet", "spamsink", f"senders_v{family}")
        for only, other, kept in (("6", "4", "192.0.2.1"), ("4", "6", "2001:db8::5")):
            in_ns("-f", str(scripts["all"]))
            in_ns("-f", str(scripts[only]))
            assert kept in listed(other), (only, listed(other))
        # Into an empty ruleset a one-family export loads on its own too.
        in_ns("flush", "ruleset")
        in_ns("-f", str(scripts["6"]))
        assert "2001:db8::5" in listed("6")


def test_header_comment_holds_no_line_break(tmp_path: Path, capsys):
    """Filters and the store path with line breaks stay inside the header comment, so
    every line of an nft or rbldnsd export is a comment or an entry."""
    data = tmp_path / "odd\ndir"
    populate(data)
    for fmt in ("txt", "rbldnsd", "nft"):
        out = run(capsys, "--data", str(data), "--format", fmt, "--since", "\n1\n")[1]
        assert "since=%0A1%0A" in out
        lines = out.splitlines()
        assert not [x for x in lines if x.strip() in ("1", "dir")], (fmt, out)
        assert not any(c in out for c in "\r\x0b\x0c\x1b"), fmt
    with nft_namespace() as in_ns:
        script = tmp_path / "senders.nft"
        script.write_text(run(capsys, "--data", str(data), "--format", "nft",
                              "--since", "\n1\n")[1])
        in_ns("-c", "-f", str(script))


def test_rbldnsd_serves_the_export(tmp_path: Path, capsys):
    """rbldnsd loads the ip4set and answers the RFC 5782 test query and a listed sender."""
    rbldnsd = need_tool("rbldnsd")
    need_tool("dig")
    populate(tmp_path)
    # rbldnsd refuses to run as root and then reads the zone as another user.
    zone_dir = Path(tempfile.mkdtemp(prefix="rec4-rbl-"))
    zone_dir.chmod(0o755)
    zone = zone_dir / "senders.rbl"
    zone.write_text(run(capsys, "--data", str(tmp_path), "--format", "rbldnsd")[1])
    zone.chmod(0o644)
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([rbldnsd, "-n", "-f", *user, "-b", f"127.0.0.1/{port}",
                             "-w", str(zone_dir), "bl.example:ip4set:senders.rbl"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def query(name: str) -> str:
            for _ in range(50):
                out = subprocess.run(["dig", "+short", "+tries=1", "+time=1", "-p", str(port),
                                      "@127.0.0.1", name, "A"], capture_output=True,
                                     text=True).stdout.strip()
                if "timed out" not in out and "connection refused" not in out:
                    return out
            return out
        assert query("2.0.0.127.bl.example") == "127.0.0.2"
        assert query("1.2.0.192.bl.example") == "127.0.0.2"
        assert query("1.0.0.127.bl.example") == ""  # RFC 5782: 127.0.0.1 is never listed
        assert query("9.9.9.203.bl.example") == ""
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(zone_dir)


HOSTILE_HELO = "\x1b]0;owned\x07\x1b[2J\x9b31m\x7fend"


def test_table_escapes_control_characters_in_helo(tmp_path: Path, capsys):
    """A HELO holding terminal escapes (C0, DEL, C1) never reaches the terminal raw in
    the table; the machine formats keep the stored value."""
    writer = open_writer(tmp_path)
    writer.write([session("192.0.2.9", helo=HOSTILE_HELO)])
    writer.close()
    code, out, _ = run(capsys, "--data", str(tmp_path))
    assert code == 0
    row = out.splitlines()[1]
    assert row.endswith(" ?]0;owned??[2J?31m?end")
    assert not any(c in out for c in "\x1b\x07\x9b\x7f")
    items = json.loads(run(capsys, "--data", str(tmp_path), "--format", "json")[1])
    assert items[0]["helo"] == HOSTILE_HELO
