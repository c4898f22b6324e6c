"""netdrop against the real kernel: sender namespace -> veth -> sink namespace.

The real ``spamsink serve`` and the real ``netdrop`` run in the sink namespace; real
mail (smtplib) comes from the sender namespace, whose kernel counters (TCP_INFO) tell
what the sender paid. Needs root, ``ip``, ``iptables`` and the NetfilterQueue binding.
"""

from __future__ import annotations

import json
import math
import signal
import smtplib
import sqlite3
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netdrop.rig import (
    SENDER4,
    SENDER4_B,
    SENDER4_C,
    SENDER6,
    SINK4,
    SINK6,
    SMTP_PORT,
    Rig,
    stop,
)
from tests.support import free_port, need_root, need_tool

pytestmark = [pytest.mark.root]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    need_root()
    for tool in ("ip", "iptables", "ip6tables", "nft"):
        need_tool(tool)
    pytest.importorskip("netfilterqueue", reason="needs the NetfilterQueue binding "
                        "(pip install '.[netdrop]', needs libnetfilter-queue-dev)")
    workdir = tmp_path_factory.mktemp("netdrop-rig")
    with Rig(workdir) as r:
        r.start_sink(workdir / "data")
        yield r


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return tmp_path


def _senders(data: Path) -> dict[str, tuple[int, int, int, int]]:
    path = data / "netdrop.sqlite"
    if not path.exists():
        return {}
    with sqlite3.connect(path) as db:
        rows = db.execute("SELECT ip, seen, passed, dropped, delayed FROM netdrop_senders")
        return {ip: (seen, passed, dropped, delayed) for ip, seen, passed, dropped, delayed in rows}


def _assert_clean(rig: Rig) -> None:
    text = rig.rules_text()
    assert "netdrop" not in text and "NFQUEUE" not in text, text


def _within(observed: int, n: int, rate: float, sigmas: float = 4.5) -> bool:
    return abs(observed / n - rate) <= sigmas * math.sqrt(rate * (1 - rate) / n)


def _metrics(rig: Rig, port: int) -> dict[str, float]:
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    text = rig.call_in(rig.sink_ns, fetch)
    assert SENDER4 not in text and SINK4 not in text  # never an address as a label
    return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
            if line.startswith("netdrop_")}


@pytest.mark.slow
def test_drop_fraction_matches_the_rate_and_the_kernel_counters(rig: Rig, data: Path) -> None:
    port = free_port()
    proc = rig.start_netdrop("--rate", "0.3", "--data", str(data), "--metrics",
                             f"127.0.0.1:{port}")
    result = rig.send(8, 20_000, source=SENDER4)
    # The kernel's own count of packets it queued (GSO packets count per segment here,
    # as netdrop sees them; the iptables rule counter counts them before segmentation).
    queued = int(rig.run(rig.sink_ns, "cat", "/proc/net/netfilter/nfnetlink_queue")
                 .stdout.split()[7])
    m = _metrics(rig, port)
    assert stop(proc) == 0
    _assert_clean(rig)
    seen, passed, dropped, delayed = _senders(data)[SENDER4]
    # Every segment the kernel queued was seen by netdrop and counted for the sender.
    assert m["netdrop_packets_seen_total"] == queued == seen
    assert m["netdrop_packets_dropped_total"] == dropped
    assert seen == passed + dropped and delayed == 0
    # netdrop only drops data segments: the fraction is of the sender's data segments.
    assert _within(dropped, result.data_segs_out, 0.3), (dropped, result)
    # Every dropped segment cost the sender a retransmission, counted by its own kernel.
    assert result.total_retrans >= dropped > 0


def test_no_netdrop_no_retransmissions(rig: Rig) -> None:
    result = rig.send(3, 20_000, source=SENDER4)
    assert result.total_retrans == 0


def test_delay_adds_the_configured_latency(rig: Rig, data: Path) -> None:
    baseline = rig.send(1, 500, source=SENDER4)
    proc = rig.start_netdrop("--delay", "150", "--data", str(data))
    delayed = rig.send(1, 500, source=SENDER4)
    assert stop(proc) == 0
    _assert_clean(rig)
    counts = _senders(data)[SENDER4]
    # EHLO, MAIL, RCPT, DATA, message, QUIT: each a data segment, each held 150 ms.
    assert counts[3] == delayed.data_segs_out >= 6
    assert counts[2] == 0
    assert 0.15 * counts[3] <= delayed.seconds - baseline.seconds < 0.15 * counts[3] + 1.0


def test_mail_arrives_complete_through_drops(rig: Rig, data: Path) -> None:
    proc = rig.start_netdrop("--rate", "0.2", "--delay", "20:10", "--delay-rate", "0.3")
    try:
        result = rig.send(3, 50_000, source=SENDER4)  # raises unless every message is queued
    finally:
        assert stop(proc) == 0
    assert result.messages == 3 and result.bytes_sent >= 150_000


def test_only_flagged_leaves_other_senders_untouched(rig: Rig, data: Path) -> None:
    flagged = data / "flagged.txt"
    flagged.write_text(f"# test list\n{SENDER4_B}\n")
    proc = rig.start_netdrop("--rate", "0.3", "--only-flagged", "--flagged-file", str(flagged),
                             "--refresh", "0.3", "--data", str(data))
    try:
        clean = rig.send(2, 20_000, source=SENDER4)
        hit = rig.send(4, 20_000, source=SENDER4_B)
        flagged.write_text(f"{SENDER4_B}\n{SENDER4}\n")
        time.sleep(1.0)
        now_hit = rig.send(4, 20_000, source=SENDER4)
    finally:
        assert stop(proc) == 0
    counts = _senders(data)
    assert clean.total_retrans == 0
    assert hit.total_retrans > 0 and counts[SENDER4_B][2] > 0
    assert now_hit.total_retrans > 0 and counts[SENDER4][2] > 0


def _api(rig: Rig, path: str) -> object:
    def fetch() -> object:
        with urllib.request.urlopen(f"http://127.0.0.1:8025{path}", timeout=5) as r:
            body = r.read().decode()
            return json.loads(body) if "json" in r.headers.get("Content-Type", "") else body
    return rig.call_in(rig.sink_ns, fetch)


def test_only_flagged_from_the_sink_api_and_counts_shown_there(rig: Rig) -> None:
    assert rig.sink_data is not None
    proc = rig.start_netdrop("--rate", "0.3", "--only-flagged", "--min-messages", "1",
                             "--sink-api", "http://127.0.0.1:8025", "--refresh", "0.3",
                             "--data", str(rig.sink_data))
    try:
        first = rig.send(1, 20_000, source=SENDER4_C)  # unknown to the sink: untouched
        deadline = time.monotonic() + 15
        while SENDER4_C not in str(_api(rig, "/api/v1/export?format=txt&min_messages=1")):
            assert time.monotonic() < deadline, "the sink never listed the sender"
            time.sleep(0.2)
        time.sleep(1.0)  # netdrop's next refresh
        second = rig.send(4, 20_000, source=SENDER4_C)
        time.sleep(1.5)  # netdrop flushes its counts every second
        shown = _api(rig, f"/api/v1/ips/{SENDER4_C}")
    finally:
        assert stop(proc) == 0
    assert first.total_retrans == 0
    assert second.total_retrans > 0
    assert isinstance(shown, dict) and shown["netdrop"]["dropped"] > 0, shown


def test_allowlisted_addresses_never_reach_the_queue(rig: Rig, data: Path) -> None:
    proc = rig.start_netdrop("--rate", "0.3", "--allow", f"{SENDER4_B}/32", "--allow",
                             "fd0d:203::/64", "--data", str(data))
    try:
        allowed = rig.send(2, 20_000, source=SENDER4_B)
        allowed6 = rig.send(1, 20_000, source=SENDER6, host=SINK6)
        other = rig.send(4, 20_000, source=SENDER4)
    finally:
        assert stop(proc) == 0
    counts = _senders(data)
    assert allowed.total_retrans == allowed6.total_retrans == 0
    assert SENDER4_B not in counts and SENDER6 not in counts
    assert other.total_retrans > 0 and counts[SENDER4][2] > 0


def test_ipv6_segments_are_dropped_too(rig: Rig, data: Path) -> None:
    proc = rig.start_netdrop("--rate", "0.3", "--data", str(data))
    try:
        result = rig.send(4, 20_000, source=SENDER6, host=SINK6)
    finally:
        assert stop(proc) == 0
    _assert_clean(rig)
    seen, passed, dropped, _ = _senders(data)[SENDER6]
    assert seen == passed + dropped
    assert _within(dropped, result.data_segs_out, 0.3)
    assert result.total_retrans >= dropped > 0


def test_rules_gone_after_sigterm_and_sigint(rig: Rig) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        proc = rig.start_netdrop("--rate", "0.1")
        assert "NFQUEUE" in rig.rules_text()
        assert stop(proc, sig) == 0
        _assert_clean(rig)


def test_rules_gone_after_an_exception(rig: Rig, data: Path) -> None:
    # Fault injection: the policy raises on the first packet, inside the queue callback.
    code = ("import sys, netdrop.policy as p\n"
            "def boom(self, *a):\n    raise RuntimeError('injected fault')\n"
            "p.Policy.decide = boom\n"
            "from netdrop.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    log = data / "fault.log"
    proc = rig.popen(rig.sink_ns, [sys.executable, "-c", code, "--port", str(SMTP_PORT),
                                   "--rate", "0.2"], log)
    deadline = time.monotonic() + 10
    while " via " not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    rig.send(1, 2000, source=SENDER4)  # the faulted packet is retransmitted after exit
    assert proc.wait(10) == 1
    assert "injected fault" in log.read_text()
    _assert_clean(rig)


def test_mail_flows_after_sigkill_and_the_next_start_cleans_up(rig: Rig, data: Path) -> None:
    proc = rig.start_netdrop("--rate", "0.3")
    stop(proc, signal.SIGKILL)
    assert "NFQUEUE" in rig.rules_text()  # the rule is left behind ...
    result = rig.send(3, 20_000, source=SENDER4)  # ... but bypass lets mail through untouched
    assert result.total_retrans == 0
    log = data / "restart.log"
    proc = rig.start_netdrop("--rate", "0.1", log=log)
    assert "removed leftover rules" in log.read_text()
    assert rig.rules_text().count("-j netdrop-q0") == 2  # one jump per family, not two
    assert stop(proc) == 0
    _assert_clean(rig)


@pytest.mark.slow
def test_full_queue_fails_open(rig: Rig, data: Path) -> None:
    # A stopped consumer: its queue fills after 2 packets (each stuck one costs the
    # sender a retransmission timeout); the rest must pass.
    proc = rig.start_netdrop("--rate", "0", "--queue-maxlen", "2", "--max-held", "1")
    proc.send_signal(signal.SIGSTOP)
    try:
        result = rig.send(2, 50_000, source=SENDER4, timeout=20)
        assert result.messages == 2
    finally:
        proc.send_signal(signal.SIGCONT)
        assert stop(proc) == 0
    # Control: the same with --no-fail-open blackholes the port while netdrop is stopped.
    proc = rig.start_netdrop("--rate", "0", "--queue-maxlen", "2", "--max-held", "1",
                             "--no-fail-open")
    proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises((TimeoutError, smtplib.SMTPException, OSError)):
            rig.send(2, 50_000, source=SENDER4, timeout=3)
    finally:
        proc.send_signal(signal.SIGCONT)
        assert stop(proc) == 0
    _assert_clean(rig)


def _nft_counters(rig: Rig) -> list[int]:
    out = rig.run(rig.sink_ns, "nft", "list", "table", "inet", "netdrop_k0").stdout
    return [int(line.split("packets")[1].split()[0]) for line in out.splitlines()
            if "counter packets" in line]


@pytest.mark.slow
def test_kernel_mode_drops_at_the_rate_without_userspace(rig: Rig, data: Path) -> None:
    port = free_port()
    proc = rig.start_netdrop("--kernel", "--rate", "0.3", "--metrics", f"127.0.0.1:{port}")
    try:
        assert "NFQUEUE" not in rig.rules_text()
        result = rig.send(8, 20_000, source=SENDER4)
        eligible, dropped = _nft_counters(rig)
        m = _metrics(rig, port)
        queues = rig.run(rig.sink_ns, "cat", "/proc/net/netfilter/nfnetlink_queue").stdout
    finally:
        assert stop(proc) == 0
    assert queues.strip() == ""  # no queue bound: no packet went to userspace
    assert _within(dropped, eligible, 0.3)
    assert m["netdrop_kernel_packets_dropped_total"] == dropped
    assert m["netdrop_kernel_packets_seen_total"] == eligible
    # Pure ACKs are eligible in kernel mode too, so drops and retransmissions differ.
    assert dropped > 0 and result.total_retrans > 0
    _assert_clean(rig)
    # SIGKILL: the kernel removes the owner table with netdrop's netlink socket.
    proc = rig.start_netdrop("--kernel", "--rate", "0.3")
    stop(proc, signal.SIGKILL)
    time.sleep(0.2)
    _assert_clean(rig)


def test_nft_queue_mechanism_fails_clearly_or_works(rig: Rig, data: Path) -> None:
    log = data / "nft.log"
    proc = rig.start_netdrop("--rate", "0.1", "--mechanism", "nft", log=log, wait=False)
    try:
        code = proc.wait(10)
    except Exception:
        code = None
    if code is None:  # the kernel has CONFIG_NFT_QUEUE: it must work like the xtables rule
        assert "queue num 0 bypass" in rig.rules_text()
        assert stop(proc) == 0
    else:
        assert code == 1
        lines = log.read_text().strip().splitlines()
        assert lines == ["netdrop: cannot install rules: no mechanism works: nftables queue "
                         "(needs CONFIG_NFT_QUEUE): Error: Could not process rule: "
                         "No such file or directory"], lines
    _assert_clean(rig)


def test_kernel_mode_xtables_fallback(rig: Rig, data: Path) -> None:
    proc = rig.start_netdrop("--kernel", "--rate", "0.3", "--mechanism", "iptables")
    try:
        assert "-m statistic --mode random --probability 0.29999" in rig.rules_text()
        # Ten messages: with segmentation offload two 20 KB messages can cross the rule
        # as a handful of packets, too few for a 0.3 drop rate to hit for sure.
        result = rig.send(10, 20_000, source=SENDER4)
    finally:
        assert stop(proc) == 0
    assert result.total_retrans > 0
    _assert_clean(rig)


@pytest.mark.parametrize("mode", [[], ["--kernel"]], ids=["queue", "kernel"])
def test_a_second_netdrop_on_the_same_queue_fails_and_leaves_the_first_alone(
        rig: Rig, data: Path, mode: list[str]) -> None:
    first = rig.start_netdrop("--rate", "0.1", *mode)
    before = rig.rules_text()
    log = data / "second.log"
    second = rig.start_netdrop("--rate", "0.2", *mode, log=log, wait=False)
    try:
        assert second.wait(10) == 1
        assert rig.rules_text() == before
        message = log.read_text().strip().splitlines()[-1]
        assert message.startswith("netdrop: ") and ("another" in message), message
    finally:
        assert stop(first) == 0
    _assert_clean(rig)


def test_held_segments_are_bounded_and_overflow_passes(rig: Rig, data: Path) -> None:
    port = free_port()
    proc = rig.start_netdrop("--delay", "200", "--max-held", "3", "--metrics",
                             f"127.0.0.1:{port}")
    try:
        result = rig.send(1, 100_000, source=SENDER4)
        busy = _metrics(rig, port)
        time.sleep(0.5)
        idle = _metrics(rig, port)
    finally:
        assert stop(proc) == 0
    assert result.messages == 1
    assert busy["netdrop_packets_held"] <= 3
    assert idle["netdrop_packets_held"] == 0  # all released once due
    assert idle["netdrop_packets_overflow_total"] > 0
    assert idle["netdrop_packets_delayed_total"] > 0
    assert idle["netdrop_packets_dropped_total"] == 0


def test_syn_and_fin_reach_the_queue_only_when_asked(rig: Rig, data: Path) -> None:
    proc = rig.start_netdrop("--rate", "0")
    text = rig.rules_text()
    assert stop(proc) == 0
    assert "--tcp-flags SYN SYN -j RETURN" in text and "--tcp-flags FIN FIN -j RETURN" in text
    proc = rig.start_netdrop("--rate", "0", "--syn", "--fin", "--data", str(data))
    text = rig.rules_text()
    try:
        result = rig.send(1, 2000, source=SENDER4)
    finally:
        assert stop(proc) == 0
    assert "SYN SYN" not in text and "FIN FIN" not in text
    assert "--tcp-flags RST RST -j RETURN" in text  # never RST
    # The SYN and the FIN were queued too: more segments seen than data segments sent.
    assert _senders(data)[SENDER4][0] >= result.data_segs_out + 2
