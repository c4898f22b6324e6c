"""The compiled engine: which one runs, a stale build, and the fallback when it
cannot be compiled (a real ``pip wheel`` of this tree)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from sink import stale_extensions
from tests.support import spamsink_command

REPO = Path(__file__).resolve().parent.parent


def test_an_extension_older_than_its_source_is_stale(tmp_path: Path) -> None:
    source, compiled = tmp_path / "smtp.py", tmp_path / "smtp.cpython-311-x86_64-linux-gnu.so"
    runtime = tmp_path / "smtp__mypyc.cpython-311-x86_64-linux-gnu.so"  # has no source
    for path in (source, compiled, runtime):
        path.write_text("")
    os.utime(compiled, (1000.0, 1000.0))
    os.utime(runtime, (1000.0, 1000.0))
    os.utime(source, (1001.5, 1001.5))  # a wheel install: written in either order
    assert stale_extensions(tmp_path) == []
    os.utime(source, (1010.0, 1010.0))  # edited after the build
    assert stale_extensions(tmp_path) == [compiled]


def test_spamsink_interpreted_runs_the_source_even_when_compiled() -> None:
    env = {**os.environ, "SPAMSINK_INTERPRETED": "1"}
    out = subprocess.run([*spamsink_command(), "version"], capture_output=True, text=True,
                         env=env, check=True).stdout
    assert out.rstrip().endswith("(engine interpreted)")
    where = subprocess.run([sys.executable, "-c", "import sink.smtp; print(sink.smtp.__file__)"],
                           capture_output=True, text=True, env=env, check=True).stdout
    assert where.strip() == str(REPO / "sink" / "smtp.py")


def _wheel(tmp_path: Path, name: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``pip wheel`` of a copy of this tree's committed files, with ``env`` added."""
    tree = tmp_path / "tree"
    if not tree.exists():
        files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                               check=True).stdout.split()
        for path in files:
            (tree / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / path, tree / path)
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w",
                           str(tmp_path / name), str(tree)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=600)


@pytest.mark.slow
def test_without_a_compiler_the_engine_installs_interpreted_or_ci_refuses(tmp_path: Path):
    if not os.environ.get("SPAMSINK_BUILD_TEST"):
        pytest.skip("builds wheels from PyPI's setuptools and mypy (a minute): "
                    "set SPAMSINK_BUILD_TEST=1 to run")
    built = _wheel(tmp_path, "plain", CC="/bin/false")
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    assert "the SMTP engine will run interpreted: building it failed" in built.stdout + built.stderr
    (wheel,) = (tmp_path / "plain").glob("spamsink-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sink/smtp.py" in names and not [n for n in names if n.endswith(".so")]

    refused = _wheel(tmp_path, "required", CC="/bin/false", SPAMSINK_REQUIRE_COMPILED="1")
    assert refused.returncode != 0
    assert "cannot compile the SMTP engine" in refused.stdout + refused.stderr
