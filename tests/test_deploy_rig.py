"""The namespace twin of the Vagrant rig: the same deploy/rig/ scripts on one machine.

Two network namespaces take the places of the two Vagrant machines, with their
addresses (sender 192.168.56.10, sink 192.168.56.11) on a veth pair: the sink
namespace runs ``deploy/rig/run-sink.sh`` (``spamsink serve`` on port 25 with
``netdrop --rate 0.2`` in front, what the units run), the sender namespace runs
``deploy/rig/send.sh`` (``spamsink send``). Namespaces are named ``vr-*`` and always
deleted. Needs root, ``ip`` and ``iptables``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import REPO, need_root, need_tool, spamsink_command

RIG = REPO / "deploy" / "rig"
SENDER, SINK = "192.168.56.10", "192.168.56.11"  # as in vagrant/Vagrantfile
MESSAGES = 20


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _in(ns: str, *command: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", ns, *command], capture_output=True,
                          text=True, timeout=timeout, env=_env())


def _env() -> dict[str, str]:
    return {**os.environ, "SPAMSINK_BIN": str(Path(spamsink_command()[0]).parent)}


@pytest.fixture
def namespaces() -> Iterator[tuple[str, str]]:
    """(sender, sink) namespaces joined by veth, deleted afterwards whatever happens."""
    need_root()
    need_tool("ip")
    need_tool("iptables")
    tag = str(os.getpid())
    sender, sink, veth = f"vr-snd-{tag}", f"vr-sink-{tag}", f"vr{tag}"[:13]
    try:
        _ip("netns", "add", sender)
        _ip("netns", "add", sink)
        _ip("link", "add", f"{veth}a", "netns", sender, "type", "veth",
            "peer", "name", f"{veth}b", "netns", sink)
        for ns, dev, addr in ((sender, f"{veth}a", SENDER), (sink, f"{veth}b", SINK)):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")
        yield sender, sink
    finally:
        for ns in (sender, sink):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def _wait_for_banner(sender: str, timeout: float = 30.0) -> None:
    probe = (f"import socket; s = socket.create_connection(({SINK!r}, 25), 2); "
             "s.settimeout(5); assert s.recv(100).startswith(b'220 ')")
    deadline = time.monotonic() + timeout
    while _in(sender, sys.executable, "-c", probe).returncode != 0:
        assert time.monotonic() < deadline, f"no banner from {SINK}:25 in {timeout} s"
        time.sleep(0.3)


def _senders(sink: str) -> str:
    fetch = ("import urllib.request; print(urllib.request.urlopen("
             "'http://127.0.0.1:8025/api/v1/ips', timeout=10).read().decode())")
    result = _in(sink, sys.executable, "-c", fetch)
    assert result.returncode == 0, result.stderr
    return result.stdout


def _messages_from(sink: str, ip: str) -> int | None:
    items = json.loads(_senders(sink))["items"]
    return next((item["messages"] for item in items if item["ip"] == ip), None)


@pytest.mark.root
@pytest.mark.slow
def test_sender_namespace_mails_the_sink_through_netdrop(
        tmp_path: Path, namespaces: tuple[str, str]) -> None:
    sender, sink = namespaces
    if not (Path(spamsink_command()[0]).parent / "netdrop").exists():
        pytest.skip("needs the netdrop console script (pip install -e '.[netdrop]')")
    config = tmp_path / "spamsink.env"
    config.write_text(f"SPAMSINK_SMTP=:25\nSPAMSINK_DATA={tmp_path / 'data'}\n"
                      "SPAMSINK_HOSTNAME=sink.rig.example\nSPAMSINK_API=127.0.0.1:8025\n"
                      "NETDROP_RATE=0.2\nNETDROP_PORT=25\n")
    log = (tmp_path / "run-sink.log").open("wb")
    rig = subprocess.Popen(["ip", "netns", "exec", sink, "sh", str(RIG / "run-sink.sh"),
                            str(config)], stdout=log, stderr=subprocess.STDOUT, env=_env())
    try:
        _wait_for_banner(sender)
        deadline = time.monotonic() + 15
        while "NFQUEUE" not in _in(sink, "iptables", "-S").stdout:
            assert time.monotonic() < deadline, "netdrop installed no NFQUEUE rule"
            time.sleep(0.2)

        sent = _in(sender, "sh", str(RIG / "send.sh"), SINK, str(MESSAGES), timeout=300)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert f"Sent {MESSAGES} messages" in sent.stdout, sent.stdout
        assert "Messages failed: 0" in sent.stdout, sent.stdout

        # The recorder writes in batches: wait until every message is in the store.
        deadline = time.monotonic() + 15
        while _messages_from(sink, SENDER) != MESSAGES:
            assert time.monotonic() < deadline, f"not {MESSAGES} messages: {_senders(sink)}"
            time.sleep(0.3)
    finally:
        rig.send_signal(signal.SIGTERM)
        try:
            rig.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rig.kill()
            rig.wait()
        log.close()
    assert rig.returncode == 0, (tmp_path / "run-sink.log").read_text()
    # Fails open: once the rig is down, no rule is left to swallow port 25.
    assert "NFQUEUE" not in _in(sink, "iptables", "-S").stdout
