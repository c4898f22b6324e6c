"""The ``netdrop`` command line: help, one-line usage errors, the root check."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.netdrop.rig import netdrop_command


def run(*args: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*prefix, *netdrop_command(), *args], capture_output=True,
                          text=True, timeout=30)


def test_help_explains_the_options() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for option in ("--rate", "--delay", "--kernel", "--only-flagged", "--allow", "--max-held",
                   "--no-fail-open", "--data", "--metrics"):
        assert option in proc.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--kernel", "--rate", "0.1", "--delay", "10"], "--kernel only drops at random"),
    (["--kernel"], "--kernel needs --rate above 0"),
    (["--delay-rate", "0.5"], "--delay-rate needs --delay"),
    (["--rate", "1.5"], "must be between 0 and 1"),
    (["--delay", "ten"], "expected MS or MS:JITTER"),
    (["--port", "70000"], "port out of range"),
    (["--allow", "not-a-net"], "not an address or network"),
    (["--flagged-file", "/x"], "--flagged-file and --sink-api need --only-flagged"),
    (["--max-held", "10", "--queue-maxlen", "10"], "--max-held must be below --queue-maxlen"),
    (["--only-flagged", "--flag", "nosuchflag"], "unknown flag 'nosuchflag'"),
])
def test_bad_options_fail_with_one_line(args: list[str], message: str) -> None:
    proc = run(*args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("netdrop: error:")


def test_without_root_one_clear_line() -> None:
    prefix: tuple[str, ...] = ()
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("needs setpriv (util-linux) to drop root")
        prefix = (setpriv, "--reuid=65534", "--regid=65534", "--clear-groups")
    proc = run("--rate", "0.2", prefix=prefix)
    if proc.returncode != 1 and "Permission denied" in proc.stderr:
        pytest.skip("the virtualenv is not readable by nobody")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "netdrop: needs root (CAP_NET_ADMIN) to install firewall rules and read the queue; "
        "run it with sudo"]
