"""Planted-bug check: do the tests fail when the product breaks?

Applies one named mutation at a time to the Python code of a *temporary copy* of the
checkout (never to the checkout itself), runs the tests that guard against it, and reports
which tests failed. A mutation no test catches is a blind spot. Not part of the normal
test run (pytest does not collect this file); it takes a few minutes::

    python tests/mutation/run.py                   # every mutation
    python tests/mutation/run.py variability_sign  # some of them
    python tests/mutation/run.py --list

The copy holds the tracked and untracked (not ignored) files plus the compiled extension,
so it tests the working tree as it is. It is imported through ``PYTHONPATH`` from its own
folder; each run first checks that the copy, not the checkout, is what Python imports,
and that the unmutated copy passes every selected test (else a failure means nothing).
Exit status 0 when every mutation was caught, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Mutation:
    """Replace ``old`` (which must occur exactly once) by ``new`` in ``path``, then run
    ``tests`` (pytest arguments); ``needs_extension``: meaningful only with csl_fast._C."""

    path: str
    old: str
    new: str
    tests: tuple[str, ...]
    why: str
    needs_extension: bool = False


MUTATIONS: dict[str, Mutation] = {
    "fast_step_always_raises": Mutation(
        "csl_fast/accumulate.py",
        "_ext._C.step(",
        "(lambda *args: 1 / 0)(",  # a ZeroDivisionError on every call
        # test_scores: any test whose accumulate calls fall back fails (tests/conftest.py)
        ("tests/test_accumulate_cpu_step.py", "tests/test_scores.py"),
        "the one-call CPU step fails on every call; the op-by-op path hides it",
        needs_extension=True,
    ),
    "fallback_not_counted": Mutation(
        "csl_fast/accumulate.py",
        "    _Fallbacks.count += 1\n",
        "    pass\n",
        ("tests/test_accumulate_cpu_step.py", "-k", "fallback or fast_step"),
        "a fallback from the fast step is neither counted nor warned about",
        needs_extension=True,
    ),
    "bad_input_counted_as_fallback": Mutation(
        "csl_fast/accumulate.py",
        "            fast_error = exc\n",
        "            fast_error = exc\n            _fell_back(exc)\n",
        ("tests/test_accumulate_cpu_step.py", "-k", "fallback or fast_step"),
        "every failed fast step counts, bad input (an error anyway) included",
        needs_extension=True,
    ),
    "bce_fast_step_always_raises": Mutation(
        "csl_fast/accumulate_bce.py",
        "_ext._C.bce_step(",
        "(lambda *args: 1 / 0)(",
        ("tests/test_accumulate_bce_cpu_step.py", "tests/test_accumulate_bce.py"),
        "accumulate_bce's one-call CPU step fails on every call; the op-by-op path hides it",
        needs_extension=True,
    ),
    "variability_sign": Mutation(
        "csl_fast/scores.py",
        "        return t.variability\n",
        "        return -t.variability\n",
        ("tests/test_scores.py",),
        "variability's sign flipped",
    ),
    "variability_ranked_by_default": Mutation(
        "csl_fast/scores.py",
        "        two_sided=True,\n",
        "        two_sided=False,\n",
        ("tests/test_scores.py",),
        "the two-sided variability is back in the default scores (and so in rankings)",
    ),
    "aum_sign": Mutation(
        "csl_fast/scores.py",
        "        return -t.aum\n",
        "        return t.aum\n",
        ("tests/test_scores.py",),
        "AUM not negated: a large margin ranks as suspicious",
    ),
    "threshold_learning_time_sign": Mutation(
        "csl_fast/scores.py",
        "        return torch.where(presented, t.threshold_learning_time(), nan)\n",
        "        return torch.where(presented, -t.threshold_learning_time(), nan)\n",
        ("tests/test_scores.py",),
        "threshold learning time negated (the released notebook's sign flip)",
    ),
    "never_learned_ranks_lowest": Mutation(
        "csl_fast/scores.py",
        "        top = f.max() + 1 if f.numel() else f.new_tensor(1.0)\n",
        "        top = f.new_tensor(-1.0)\n",
        ("tests/test_scores.py",),
        "forgetting: never-learned samples rank lowest instead of highest",
    ),
    "report_auroc_inverted": Mutation(
        "csl_fast/report_figures.py",
        "            auroc = float(auc(fpr, tpr))\n",
        "            auroc = 1 - float(auc(fpr, tpr))\n",
        ("tests/test_report.py",),
        "the report's AUROC table shows 1 - AUROC",
    ),
    "report_top_ascending": Mutation(
        "csl_fast/report.py",
        "    ranking = det.ranked.cpu().numpy()\n",
        "    ranking = det.ranked.cpu().numpy()[::-1]\n",
        ("tests/test_report.py",),
        "the report's top-k table lists the least suspicious samples",
    ),
    "demo_flagged_count_off_by_one": Mutation(
        "csl_fast/demo.py",
        '            "count": int(flagged.sum()),\n',
        '            "count": int(flagged.sum()) + 1,\n',
        ("tests/test_report.py", "-k", "demo"),
        "the demo's flagged count is not what csl_fast.detect flags",
    ),
    "demo_overhead_not_a_ratio": Mutation(
        "csl_fast/demo_measurements.py",
        '        "overhead_pct": {v: (med[v] / plain - 1) * 100 for v in variants},\n',
        '        "overhead_pct": {v: (med[v] - plain) * 100 for v in variants},\n',
        ("tests/test_report.py", "-k", "demo"),
        "the demo's overhead percentage is not the ratio of the step times it shows",
    ),
    "detect_ranking_ascending": Mutation(
        "csl_fast/detect.py",
        "return torch.sort(~key, stable=True).indices",
        "return torch.sort(key, stable=True).indices",
        ("tests/test_detect.py",),
        "detect ranks the least suspicious samples first",
    ),
    "in_confidence_inverted": Mutation(
        "csl_fast/scores.py",
        "        return torch.where(presented, 1 - t.last_max_prob, nan)\n",
        "        return torch.where(presented, t.last_max_prob, nan)\n",
        ("tests/test_scores.py",),
        "in_confidence (no eval pass) is the max probability, not one minus it",
    ),
    "forgetting_counts_correct_to_correct": Mutation(
        "csl_fast/reference.py",
        "        forget = sv & prev_correct & ~sc\n",
        "        forget = sv & prev_correct\n",
        (
            "tests/test_tracker.py::test_every_statistic_matches_plain_pytorch",
            "tests/test_ops.py::test_record_last_matches_reference",
            "tests/test_scores.py",
        ),
        "the reference tracker update also counts correct -> correct as a forgetting event",
    ),
    "count_ignores_ignore_index": Mutation(
        "csl_fast/reference.py",
        "        values = stats[row].to(buf.dtype)\n",
        "        values = (stats[row] if row == Stat.LOSS else torch.ones_like(stats[row]))"
        ".to(buf.dtype)\n",
        (
            "tests/test_accumulate.py::test_nonfinite_rows_are_not_recorded",
            "tests/test_sequence_accumulate.py",
        ),
        "the reference count adds ignored (and non-finite) rows too",
    ),
    "flip_labels_in_place": Mutation(
        "csl_fast/corrupt.py",
        "    noisy = y.clone()\n",
        "    noisy = y\n",
        ("tests/test_corrupt.py",),
        "flip_labels overwrites the labels it was given (CPU int64 input)",
    ),
    "duplicate_pairs_in_place": Mutation(
        "csl_fast/corrupt.py",
        "    new_x = inputs.detach().clone()\n",
        "    new_x = inputs.detach()\n",
        ("tests/test_corrupt.py",),
        "duplicate_pairs overwrites the inputs it was given",
    ),
    "bf16_loss_off_by_1pct": Mutation(
        "csl_fast/ops.py",
        "        loss, stats, _ = _RoundOnceCrossEntropy.apply(*args, name)\n"
        "        return loss, stats\n",
        "        loss, stats, _ = _RoundOnceCrossEntropy.apply(*args, name)\n"
        "        return loss * 1.01, stats\n",
        ("tests/test_sequence_accumulate.py",),
        "a fused kernel's half-precision loss is 1% too large (the old 2e-2 tolerance passed it)",
        needs_extension=True,
    ),
}


def _copy_tree(dest: Path, extension: bool) -> None:
    """Tracked and untracked-but-not-ignored files, and the compiled extension unless
    ``extension`` is False."""
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    built = [p.relative_to(ROOT) for p in (ROOT / "csl_fast").glob("_C*.so")] if extension else []
    for rel in [Path(f.decode()) for f in files if f] + built:
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)


# Without the extension, csl_fast._C is blocked: the editable install's import hook would
# otherwise find the checkout's build.
_BLOCK = "import sys; sys.modules['csl_fast._C'] = None\n"


def _python(copy: Path, extension: bool) -> list[str]:
    """The interpreter command, ``[python]`` or ``[python, launcher]``, for ``-m``-style
    arguments (a module name and its arguments)."""
    if extension:
        return [sys.executable, "-m"]
    launcher = copy.parent / "launcher.py"
    launcher.write_text(
        _BLOCK + "import runpy\nsys.argv = sys.argv[1:]\n"
        "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
    )
    return [sys.executable, str(launcher)]


def _env(copy: Path) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONSTARTUP", None)
    return env


def _check_isolated(copy: Path, extension: bool) -> bool:
    """Whether csl_fast._C loaded; exits unless what is imported comes from the copy."""
    probe = copy.parent / "probe.py"
    probe.write_text(
        "import warnings\nwarnings.simplefilter('ignore')\nimport csl_fast\n"
        "from csl_fast import _ext\nprint(csl_fast.__file__)\n"
        "print(getattr(_ext._C, '__file__', 'absent'))\n"
    )
    out = subprocess.run(
        [*_python(copy, extension), "probe"],
        cwd=copy.parent,
        env=dict(_env(copy), PYTHONPATH=f"{copy}{os.pathsep}{copy.parent}"),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for imported in (p for p in out if p != "absent"):
        if copy.resolve() not in Path(imported).resolve().parents:
            raise SystemExit(f"mutation check: Python imports {imported}, not the copy {copy}")
    return out[1] != "absent"


def _pytest(
    copy: Path, tests: tuple[str, ...], extension: bool, maxfail: int = 0
) -> tuple[int, list[str], float]:
    """(exit status, failed test ids, seconds); stops after ``maxfail`` failures if > 0."""
    t0 = time.perf_counter()
    args = ["-q", "-rfE", "-p", "no:cacheprovider", f"--maxfail={maxfail}", *tests]
    proc = subprocess.run(
        [*_python(copy, extension), "pytest", *args],
        cwd=copy,
        env=_env(copy),
        capture_output=True,
        text=True,
        timeout=1800,
    )
    # A test can fail and error (in a fixture's teardown): name it once.
    failed = list(dict.fromkeys(re.findall(r"^(?:FAILED|ERROR) (\S+)", proc.stdout, re.M)))
    return proc.returncode, failed, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument(
        "--without-extension",
        action="store_true",
        help="leave csl_fast._C out of the copy (the reference backend only)",
    )
    args = parser.parse_args(argv)
    if args.list:
        for name, m in MUTATIONS.items():
            print(f"{name:<38} {m.path}: {m.why}")
        return 0
    unknown = [n for n in args.names if n not in MUTATIONS]
    if unknown:
        parser.error(f"unknown mutations {unknown}; --list shows them")
    chosen = {n: MUTATIONS[n] for n in (args.names or MUTATIONS)}

    with tempfile.TemporaryDirectory(prefix="csl_fast_mutants_") as tmp:
        copy = Path(tmp) / "tree"
        _copy_tree(copy, extension=not args.without_extension)
        extension = not args.without_extension
        has_extension = _check_isolated(copy, extension)
        print(f"copy of {ROOT} in {copy}; csl_fast._C {'loaded' if has_extension else 'absent'}")
        # The baseline runs every selected test (a mutation's -k options only narrow it).
        selected = sorted({t for m in chosen.values() for t in m.tests if ".py" in t})
        code, failed, secs = _pytest(copy, tuple(selected), extension)
        if code != 0:
            print(f"the unmutated copy fails ({secs:.0f} s): {failed or code}; fix that first")
            return 2
        print(f"unmutated copy: {' '.join(selected)} pass ({secs:.0f} s)\n")
        missed = []
        for name, m in chosen.items():
            if m.needs_extension and not has_extension:
                print(f"{name}: not applicable without csl_fast._C")
                continue
            target = copy / m.path
            original = target.read_text()
            if original.count(m.old) != 1:
                print(f"{name}: the mutation site is gone from {m.path}; update MUTATIONS")
                missed.append(name)
                continue
            target.write_text(original.replace(m.old, m.new))
            try:
                code, failed, secs = _pytest(copy, m.tests, extension, maxfail=3)
            finally:
                target.write_text(original)
            caught = code == 1 and bool(failed)
            verdict = "CAUGHT" if caught else f"MISSED (pytest exit {code})"
            print(f"{name} ({m.why}): {verdict} in {secs:.0f} s")
            for test in failed:  # the first three (--maxfail=3)
                print(f"    {test}")
            if not caught:
                missed.append(name)
    print(
        f"\n{len(chosen) - len(missed)} of {len(chosen)} mutations caught"
        + (f"; missed: {', '.join(missed)}" if missed else "")
    )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
