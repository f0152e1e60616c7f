"""The scripts under benchmarks/: each one that runs as a program answers ``--help`` at
once and writes nothing. A script without argument parsing ran its whole measurement on
``--help`` and overwrote its committed results file (bce_accuracy.py did)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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
