"""The source distribution holds what a build on another machine needs: every file under
csrc/ (the headers, and the CUDA sources setup.py leaves out of its list on a machine
without CUDA: an sdist built here could not compile there) and ``csl_fast/py.typed``
(PEP 561: type checkers read the package's annotations)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import csl_fast

ROOT = Path(csl_fast.__file__).resolve().parent.parent


def _tracked() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout (its tracked files make the sdist)")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [p for p in out.decode().split("\0") if p]


def test_sdist_holds_every_source_and_py_typed(tmp_path):
    tree = tmp_path / "tree"
    files = _tracked()
    for rel in files:
        if (ROOT / rel).is_file():  # (a file deleted but not yet staged is skipped)
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, tree / rel)
    env = {**os.environ, "CSL_FAST_NO_CUDA": "1"}
    subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path / "dist")],
        cwd=tree,
        env=env,
        check=True,
        capture_output=True,
    )
    (archive,) = (tmp_path / "dist").glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {rel for rel in files if rel.startswith("csrc/")} | {"csl_fast/py.typed"}
    assert wanted <= names, sorted(wanted - names)
