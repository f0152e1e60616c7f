"""The scripts under benchmarks/: each one that runs as a program answers ``--help`` at
once and writes nothing. A script without argument parsing ran its whole measurement on
``--help`` and overwrote its committed results file (bce_accuracy.py did)."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"

# One interpreter for all scripts (torch is imported once); an alarm stops a script that
# starts measuring instead of printing its usage.
DRIVER = """
import contextlib, io, runpy, signal, sys
sys.path[:0] = [{bench!r}, {paper!r}]
failed = []


def stop(*_):
    raise TimeoutError("still running after 60 s: it measures instead of printing its usage")


signal.signal(signal.SIGALRM, stop)
for path in sys.argv[1:]:
    signal.alarm(60)
    sys.argv = [path, "--help"]
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runpy.run_path(path, run_name="__main__")
        failed.append(path + ": returned without exiting")
    except SystemExit as exc:
        if exc.code not in (0, None):
            failed.append(f"{{path}}: exit {{exc.code}}")
    except Exception as exc:
        failed.append(f"{{path}}: {{exc!r}}")
    finally:
        signal.alarm(0)
print("\\n".join(failed), file=sys.stderr)
sys.exit(1 if failed else 0)
"""


def _programs() -> list[Path]:
    scripts = sorted(BENCH.glob("*.py")) + sorted((BENCH / "paper").glob("*.py"))
    return [p for p in scripts if 'if __name__ == "__main__"' in p.read_text()]


def _results_state() -> dict[Path, tuple[int, int]]:
    return {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in BENCH.rglob("results/*")}


def test_every_benchmark_program_answers_help_and_writes_nothing():
    programs = _programs()
    assert len(programs) >= 10, "the benchmark programs moved: update this test"
    before = _results_state()
    driver = DRIVER.format(bench=str(BENCH), paper=str(BENCH / "paper"))
    proc = subprocess.run(
        [sys.executable, "-c", driver, *map(str, programs)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert _results_state() == before


def _paper_script(tmp_path, script, *args):
    out = tmp_path / "results"  # (--out: never the committed results, whatever happens)
    return subprocess.run(
        [sys.executable, str(BENCH / "paper" / script), "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )


@pytest.mark.parametrize(
    ("script", "args", "setting"),
    [
        ("mislabeled.py", ["--noise", "0.05", "0"], "--noise 0 makes 0 of the 1797"),
        ("mislabeled.py", ["--noise", "0.0005"], "--noise 0.0005 makes 0 of the 1797"),
        ("mislabeled.py", ["--noise", "1"], "--noise 1 makes 1797 of the 1797"),
        ("duplicates.py", ["--pairs", "0"], "--pairs 0 makes 0 of the 1797"),
        ("regression.py", ["--noise", "0"], "--noise 0 makes 0 of the 442"),
        ("multilabel.py", ["--noise", "0"], "--noise 0 (seed 0) in entries makes 0 of"),
    ],
)
def test_a_run_without_positives_is_refused_before_training(tmp_path, script, args, setting):
    # a clean control crashed with "labels need both positives and negatives" after all
    # of its training
    proc = _paper_script(tmp_path, script, "--epochs", "1", "--seeds", "0", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert setting in proc.stderr and "positives and negatives" in proc.stderr
    assert "seed 0" not in proc.stdout  # nothing trained


def _paper_module(monkeypatch, name):
    """A module of benchmarks/paper, loaded under a private name for this test only (its
    folder's own names, such as ``common``, stay out of ``sys.modules``)."""
    spec = importlib.util.spec_from_file_location(f"_paper_{name}", BENCH / "paper" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # (dataclasses look it up)
    monkeypatch.setattr(sys, "path", [str(BENCH / "paper"), *sys.path])  # (it adds more)
    monkeypatch.setattr(sys, "modules", dict(sys.modules))  # (its imports: common, ...)
    spec.loader.exec_module(module)
    return module


def test_the_precision_of_an_empty_flagged_set_is_na_and_counted(monkeypatch):
    # mislabeled.py scored an empty set 0 and averaged it in; regression.py and
    # multilabel.py made it NaN and dropped it with nanmean, without a word
    common = _paper_module(monkeypatch, "common")
    truth = np.array([True, True, False, False])
    empty = common.flagged_set(np.zeros(4, dtype=bool), truth)
    assert math.isnan(empty["precision"]) and empty["recall"] == 0.0 and empty["f1"] == 0.0
    half = common.flagged_set(torch.tensor([True, False, True, False]), torch.as_tensor(truth))
    assert half["precision"] == 0.5
    stats = common.precision_stats([half["precision"], empty["precision"], 1.0])
    assert stats == {"mean": 0.75, "std": 0.25, "flagged_nothing": 1, "seeds": 3}
    assert common.precision_cell(stats) == "0.750, n/a in 1 of 3 (nothing flagged)"
    assert common.precision_cell(stats, std=True).startswith("0.750 (0.250), n/a in 1 of 3")
    nothing = common.precision_stats([math.nan, math.nan])
    assert common.precision_cell(nothing) == "n/a (nothing flagged)"
    # every script's flagged sets go through the one helper
    for script in ("regression.py", "multilabel.py", "mislabeled.py", "duplicates.py"):
        text = (BENCH / "paper" / script).read_text()
        assert "precision_cell(" in text and "/ max(n" not in text, script


def test_cost_compares_memorization_only_from_the_same_setup(monkeypatch):
    # cost.py set memorization.json's total against its own CSL run whatever that run's
    # dataset, epochs or label noise were
    cost = _paper_module(monkeypatch, "cost")
    cfg = sys.modules["common"].Config()
    data = {
        "config": {**dataclasses.asdict(cfg), "hidden": list(cfg.hidden), "seeds": [7]},
        "noise": cost.NOISE,
        "mem_models": 100,
        "seconds": {"stability_memorization": 200.0},
    }
    measured, lines = cost.memorization_measured(cfg, data, 2.0)
    assert measured == {"m": 100, "seconds": 200.0, "same_setup": True}
    assert "= 100x the CSL run" in lines[-1]
    data["noise"] = 0.0
    data["config"]["epochs"] = 2
    measured, lines = cost.memorization_measured(cfg, data, 2.0)
    assert not measured["same_setup"] and "x the CSL run" not in lines[-1]
    assert "epochs 2 there, 60 here" in lines[-1] and "noise 0.0 there, 0.1 here" in lines[-1]


RATE_OPTIONS = [
    ("cleaning", "--noise"),
    ("cleaning", "--sweep"),
    ("memorization", "--noise"),
    ("memorization", "--top-fraction"),
    ("mislabeled", "--noise"),
    ("multilabel", "--noise"),
    ("multilabel_doubt", "--rates"),
    ("regression", "--noise"),
]


class _Parsed(Exception):
    """Raised in place of running a script whose arguments parsed."""


def _parse_only(monkeypatch, script, argv):
    """``script``'s ``main`` on ``argv``, stopped right after its arguments parse (nothing
    trains, even where a bad value is accepted): ``(exit code, stderr lines)``."""
    module = _paper_module(monkeypatch, script)
    parse_args = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *args, **kwargs):
        raise _Parsed(parse_args(self, *args, **kwargs))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *argv])
    with pytest.raises(SystemExit) as exc:
        try:
            module.main()
        except _Parsed as parsed:
            pytest.fail(f"{script}.py {' '.join(argv)} was accepted: {parsed.args[0]}")
    return exc.value.code


@pytest.mark.parametrize("value", ["nan", "-0.1", "1.5"])
@pytest.mark.parametrize(("script", "option"), RATE_OPTIONS)
def test_a_rate_outside_0_1_is_a_usage_error(monkeypatch, capsys, script, option, value):
    # --noise nan crashed with "cannot convert float NaN to integer" (regression.py,
    # multilabel.py), -0.1 with "negative dimensions" (multilabel.py) or in flip_labels
    # (mislabeled.py), or read "makes -22 of the 442 positive"; others trained on them
    code = _parse_only(monkeypatch, script, [option, value])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"{script}.py: error: argument {option}: {value!r} is not a rate in [0, 1]"
    )


@pytest.mark.parametrize("option", ["--pairs", "--benign-pairs"])
def test_a_negative_pair_count_is_a_usage_error(monkeypatch, capsys, option):
    # --pairs -11 read "makes -22 of the 1797 positive"
    code = _parse_only(monkeypatch, "duplicates", [option, "-11"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"duplicates.py: error: argument {option}: '-11' is negative: a count is 0 or more"
    )


def test_the_benchmark_suites_collect_beside_tests():
    # their `from conftest import ...` found tests/conftest.py when both were collected in
    # one session (ImportError: cannot import name 'median_s'; audit helper-231)
    suites = sorted(map(str, BENCH.glob("test_bench_*.py")))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         *suites, str(ROOT / "tests" / "test_bench.py")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0 and "ImportError" not in proc.stdout, proc.stdout[-3000:]
