"""A source checkout that hides an installed csl_fast: the import warning and
``python -m csl_fast.info`` name both folders and the command that fixes it."""

import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import csl_fast
from csl_fast import _ext

# Runs csl_fast.info as `python -m` would, without the import hook of an editable install
# (which would find the extension of the developer's own checkout): what a user of a plain
# `pip install .` has.
SCRIPT = textwrap.dedent(
    """
    import runpy, sys, warnings
    sys.meta_path[:] = [
        f for f in sys.meta_path if not str(getattr(f, "__module__", "")).startswith("__editable")
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runpy.run_module("csl_fast.info", run_name="__main__")
    for w in caught:
        if "csl_fast._C" in str(w.message):
            print("WARNING:", w.message)
    """
)


@pytest.mark.skipif(not _ext.extension_files(_ext.PACKAGE_DIR), reason="extension not built")
def test_checkout_hiding_the_installed_copy_is_explained(tmp_path):
    package = Path(csl_fast.__file__).parent
    ignore = shutil.ignore_patterns("__pycache__")
    site, checkout = tmp_path / "site", tmp_path / "checkout"
    shutil.copytree(package, site / "csl_fast", ignore=ignore)  # installed, with _C
    shutil.copytree(package, checkout / "csl_fast", ignore=ignore)
    for built in _ext.extension_files(checkout / "csl_fast"):
        built.unlink()  # a fresh clone: sources only
    (checkout / "csrc").mkdir()
    (checkout / "setup.py").write_text("")
    env = {"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=checkout, env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    text = " ".join(out.stdout.split())  # info wraps long lines
    warning = next(line for line in out.stdout.splitlines() if line.startswith("WARNING:"))
    for shown in (text, warning):
        assert f"imported from the source checkout {checkout / 'csl_fast'}" in shown
        assert f"installed copy in {site / 'csl_fast'}" in shown
        assert f"`cd {tmp_path}`" in shown
        assert f"`pip install --no-build-isolation -e {checkout}`" in shown
    assert f"csl_fast 0.1.0 (imported from {checkout / 'csl_fast'})" in text
    assert "compiled extension csl_fast._C: NOT loaded" in text


def test_advice_for_an_extension_that_does_not_load():
    advice = _ext.extension_advice("ImportError: undefined symbol: _ZN3c10")
    if _ext.extension_files(_ext.PACKAGE_DIR):
        assert "exists but did not load (ImportError: undefined symbol" in advice
        assert f"torch {torch.__version__}" in advice
    assert "pip install --no-build-isolation" in advice


def test_the_op_list_matches_the_schemas():
    source = (Path(__file__).parents[1] / "csrc" / "csl_fast.cpp").read_text()
    defined = re.findall(r'm\.def\(\s*"(\w+)\(', source)
    assert sorted(defined) == sorted(_ext.OPS)
    for op, arg in _ext.NEWER_ARGS.items():  # the schema source has the argument
        schema = re.search(rf'm\.def\(\s*"{op}\((.*?)\)\s*->', source, re.S)
        assert schema and re.search(rf"\b{arg}\b", schema[1]), (op, arg)


def test_an_extension_from_older_sources_is_named_and_rebuilt(monkeypatch):
    assert _ext.missing_ops(("scatter_stats", "no_such_op_yet")) == ["no_such_op_yet"]
    # an op whose schema gained an argument: the old build's op lacks it
    monkeypatch.setitem(_ext.NEWER_ARGS, "scatter_stats", "no_such_arg_yet")
    assert _ext.missing_ops(("scatter_stats",)) == ["scatter_stats (its no_such_arg_yet argument)"]
    advice = _ext.extension_advice(f"ImportError: csl_fast._C was {_ext.STALE}: it lacks x")
    if _ext.extension_files(_ext.PACKAGE_DIR):
        assert "was built from older csl_fast sources" in advice
        assert "did not load" not in advice
    assert "pip install --no-build-isolation" in advice


def test_an_extension_of_another_tree_is_refused(monkeypatch, tmp_path):
    """A copy of the package without its own build (a git worktree, a copied folder)
    loaded another tree's _C through the editable install's finder, silently: its kernels
    may be of other sources. It is refused, as a missing extension is (the reference runs,
    with a warning)."""
    other = tmp_path / "other" / "csl_fast" / "_C.so"
    module = type(sys)("csl_fast._C")
    module.__file__ = str(other)
    monkeypatch.setattr(_ext.importlib, "import_module", lambda name: module)
    monkeypatch.setattr(_ext, "missing_ops", lambda: [])
    with pytest.raises(ImportError, match="another csl_fast tree") as caught:
        _ext.load_extension()
    assert str(other.parent) in str(caught.value) and str(_ext.PACKAGE_DIR) in str(caught.value)
    # the warning's advice names that cause ("installed without its compiled extension ...
    # --force-reinstall" named another)
    advice = _ext.extension_advice(f"ImportError: {caught.value}")
    assert "no compiled extension of its own; the one found belongs to another" in advice
    module.__file__ = str(_ext.PACKAGE_DIR / "_C.so")
    assert _ext.load_extension() is module


@pytest.mark.skipif(_ext._C is None, reason="extension not built")
def test_info_says_whether_the_cuda_kernels_were_built(monkeypatch):
    """A build machine without a GPU can still compile the CUDA kernels (for a named
    architecture list); info said only that the cuda backend takes CUDA tensors."""
    from csl_fast import info

    def cuda_line() -> str:
        return next(x for x in info.report().splitlines() if "CUDA kernels" in x).strip()

    built = _ext._has_kernel("cross_entropy_fwd", "CUDA")
    assert cuda_line().endswith("built") == built
    monkeypatch.setattr(_ext, "_has_kernel", lambda op, key: True)
    assert cuda_line() == "CUDA kernels (csrc/cuda): built"
    monkeypatch.setattr(_ext, "_has_kernel", lambda op, key: key != "CUDA")
    monkeypatch.setattr(torch.version, "cuda", None)
    assert cuda_line().endswith("not built (this torch has no CUDA)")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert "TORCH_CUDA_ARCH_LIST" in cuda_line() and "CSL_FAST_NO_CUDA=1" in cuda_line()
