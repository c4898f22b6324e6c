"""The OSv netdrop patch applies to the pinned OSv commit.

OSv's source is never committed here: the test uses a local mirror of
cloudius-systems/osv (``$SPAMSINK_OSV_GIT``, default the path the project's tooling
fetches it to) and skips when there is none. It applies the patch to the pinned
commit's tree in a throwaway index, without a work tree or touching the mirror.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support import REPO, need_tool

PATCHES = sorted((REPO / "osv-patches").glob("0*.patch"))
README = REPO / "osv-patches" / "README.md"
DEFAULT_MIRROR = "/work/.mirror/cloudius-systems+osv/repo"


def _pinned_commit() -> str:
    match = re.search(r"^Pinned OSv commit: `([0-9a-f]{40})`", README.read_text(), re.M)
    assert match, "osv-patches/README.md must name the pinned commit"
    return match.group(1)


def _mirror() -> Path:
    path = Path(os.environ.get("SPAMSINK_OSV_GIT", DEFAULT_MIRROR))
    if not (path / "objects").is_dir() and not (path / ".git").is_dir():
        pytest.skip(f"no OSv git mirror at {path} (set SPAMSINK_OSV_GIT to a clone of "
                    "cloudius-systems/osv)")
    return path


def test_patch_series_exists_and_touches_the_classifier_and_loader() -> None:
    assert PATCHES, "osv-patches/ has no patch"
    text = "".join(p.read_text() for p in PATCHES)
    for path in ("core/net_channel.cc", "loader.cc", "core/netdrop.cc", "Makefile"):
        assert f"diff --git a/{path} b/{path}" in text, path
    for option in ("netdrop-rate", "netdrop-ports", "netdrop-delay"):
        assert f'"{option}"' in text, option


def test_patch_applies_to_the_pinned_commit(tmp_path: Path) -> None:
    git = need_tool("git")
    mirror = _mirror()
    commit = _pinned_commit()
    # New objects (the applied blobs) go to a throwaway store; the mirror is only read.
    (tmp_path / "objects").mkdir()
    env = {**os.environ, "GIT_INDEX_FILE": str(tmp_path / "index"),
           "GIT_OBJECT_DIRECTORY": str(tmp_path / "objects"),
           "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(mirror / "objects")}
    # The mirror may belong to another user (root's fetch): trust it for this read.
    base = [git, "-c", f"safe.directory={mirror}", f"--git-dir={mirror}"]
    known = subprocess.run([*base, "cat-file", "-e", f"{commit}^{{commit}}"],
                           capture_output=True, text=True, env=env)
    if known.returncode != 0:
        pytest.skip(f"the OSv mirror at {mirror} lacks the pinned commit {commit}")
    subprocess.run([*base, "read-tree", commit], check=True, capture_output=True, env=env)
    for patch in PATCHES:
        result = subprocess.run([*base, "apply", "--cached", "--check", str(patch)],
                                capture_output=True, text=True, env=env)
        assert result.returncode == 0, f"{patch.name}: {result.stderr}"
        subprocess.run([*base, "apply", "--cached", str(patch)], check=True,
                       capture_output=True, env=env)
