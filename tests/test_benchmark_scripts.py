"""The scripts under benchmarks/: each one that runs as a program answers ``--help`` at
once and writes nothing. A script without argument parsing ran its whole measurement on
``--help`` and overwrote its committed results file (bce_accuracy.py did)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
    ],
)
def test_a_run_without_positives_is_refused_before_training(tmp_path, script, args, setting):
    # a clean control crashed with "labels need both positives and negatives" after all
    # of its training
    proc = _paper_script(tmp_path, script, "--epochs", "1", "--seeds", "0", *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert setting in proc.stderr and "positives and negatives" in proc.stderr
    assert "seed 0" not in proc.stdout  # nothing trained
