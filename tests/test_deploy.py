"""The deployment files: systemd units, the config template, the scripts, the Vagrant rig.

The units are checked by systemd itself (``systemd-analyze verify`` and its offline
``security`` score), the config template and the units' command lines against the
real ``--help`` of both programs, the Vagrantfile by ``vagrant validate``.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO, need_tool, spamsink_command

UNITS = REPO / "deploy" / "systemd"
TEMPLATE = REPO / "deploy" / "spamsink.env"
SCRIPTS = sorted([*(REPO / "deploy").glob("*/*.sh"), *(REPO / "osv-patches").glob("*.sh")])
#: Highest `systemd-analyze security` exposure accepted per unit (0 best, 10 worst).
MAX_EXPOSURE = {"spamsink.service": 2.0, "netdrop.service": 2.5}


def _bin_dir() -> Path:
    return Path(spamsink_command()[0]).parent


def _installed_units(tmp_path: Path) -> list[Path]:
    """The units with /opt/spamsink/ pointing at this checkout's venv, as install.sh's
    --prefix would have them (verify insists that ExecStart exists)."""
    bin_dir = _bin_dir()
    if not (bin_dir / "spamsink").exists() or not (bin_dir / "netdrop").exists():
        pytest.skip("needs the spamsink and netdrop console scripts (pip install -e .)")
    out = []
    for unit in sorted(UNITS.glob("*.service")):
        path = tmp_path / unit.name
        path.write_text(unit.read_text().replace("/opt/spamsink/bin/", f"{bin_dir}/"))
        out.append(path)
    return out


def _help(*command: str) -> str:
    return subprocess.run([*command, "--help"], capture_output=True, text=True,
                          check=True, timeout=60).stdout


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = need_tool("systemd-analyze")
    units = _installed_units(tmp_path)
    result = subprocess.run([tool, "verify", *map(str, units)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


@pytest.mark.parametrize("unit", sorted(MAX_EXPOSURE))
def test_unit_security_exposure_stays_low(tmp_path: Path, unit: str) -> None:
    tool = need_tool("systemd-analyze")
    path = next(p for p in _installed_units(tmp_path) if p.name == unit)
    result = subprocess.run([tool, "security", "--offline=true", "--no-pager", str(path)],
                            capture_output=True, text=True, timeout=120)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, result.stdout + result.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE[unit], result.stdout


def _unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key, []).append(value)
    return settings


def test_sink_unit_runs_as_its_own_user_with_only_the_bind_capability() -> None:
    unit = _unit_settings("spamsink.service")
    assert unit["User"] == ["spamsink"]
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]
    assert unit["StateDirectory"] == ["spamsink"]
    assert unit["ProtectSystem"] == ["strict"]
    assert unit["NoNewPrivileges"] == ["yes"]


def test_netdrop_unit_has_only_network_admin_capabilities_and_follows_the_sink() -> None:
    unit = _unit_settings("netdrop.service")
    assert "User" not in unit, "netdrop needs root for NFQUEUE and iptables"
    assert unit["CapabilityBoundingSet"] == ["CAP_NET_ADMIN CAP_NET_RAW"]
    assert "spamsink.service" in unit["After"][0].split()
    assert unit["PartOf"] == ["spamsink.service"]


def test_unit_command_lines_use_real_options() -> None:
    """The sink takes everything from the environment file; netdrop's options exist."""
    assert _unit_settings("spamsink.service")["ExecStart"] == ["/opt/spamsink/bin/spamsink serve"]
    bin_dir = _bin_dir()
    if not (bin_dir / "netdrop").exists():
        pytest.skip("needs the netdrop console script (pip install -e .)")
    netdrop = _help(str(bin_dir / "netdrop"))
    (command,) = _unit_settings("netdrop.service")["ExecStart"]
    for option in re.findall(r"(--[a-z-]+)", command):
        assert re.search(rf"^\s+{option}\b", netdrop, re.M), f"netdrop has no {option}"


def test_config_template_names_real_serve_options() -> None:
    serve = _help(*spamsink_command(), "serve")
    names = re.findall(r"^(SPAMSINK_[A-Z_]+)=", TEMPLATE.read_text(), re.M)
    assert "SPAMSINK_SMTP" in names and "SPAMSINK_API_TOKEN" in names
    for name in names:
        option = "--" + name.removeprefix("SPAMSINK_").lower().replace("_", "-")
        assert re.search(rf"\s{option}\b", serve), f"{name}: spamsink serve has no {option}"


def test_config_template_is_a_valid_environment_file() -> None:
    """systemd's EnvironmentFile and the rig's `set -a; . FILE` read it alike: plain
    KEY=value lines, no quotes or expansions that the two would read differently."""
    for number, line in enumerate(TEMPLATE.read_text().splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        assert re.fullmatch(r"[A-Z_]+=[^\s'\"$`\\]*", line), f"line {number}: {line!r}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    shell = "bash" if script.read_text().startswith("#!/bin/bash") else "sh"
    result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_rig_scripts_explain_bad_usage() -> None:
    for script in ("install.sh", "setup-sink.sh", "run-sink.sh", "send.sh"):
        result = subprocess.run(["sh", str(REPO / "deploy" / "rig" / script), "--bogus"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 2, (script, result.stdout, result.stderr)
        assert "usage:" in result.stderr


def test_vagrantfile_validates(tmp_path: Path) -> None:
    vagrant = need_tool("vagrant")
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "home"),
           "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"), "VAGRANT_CHECKPOINT_DISABLE": "1"}
    result = subprocess.run([vagrant, "validate"], cwd=REPO / "vagrant", env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout
