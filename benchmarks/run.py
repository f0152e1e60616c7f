#!/usr/bin/env python
"""Run csl_fast's benchmarks and write a markdown + JSON report.

    python benchmarks/run.py            # CPU; writes benchmarks/results/<device>-<date>.*
    python benchmarks/run.py --device cuda --out OUTDIR
    python benchmarks/run.py --quick    # few repetitions, no torch.compile: a smoke run

A report of the name the run would write that exists already (the day's, perhaps committed)
is not replaced: run.py exits 2 before measuring unless given ``--force`` (or ``--out``
elsewhere).

The measurement code lives in ``csl_fast/bench/`` (shared with the pytest-benchmark
suites in this folder and with ``csl-fast bench``). The report is stamped with the device,
CPU/GPU model, torch/triton versions, git commit and date; the last thing printed is a
short table of the fused op against its alternatives, the step overheads and the targets.

csl_fast's rows run its compiled backends by name (``cpu`` on a CPU; ``triton`` and ``cuda``
on a GPU), never the pure-PyTorch reference it falls back to without them: when none of them
can run (the compiled extension csl_fast._C failed to load, say), run.py says why and exits
with status 3 before measuring anything; ``--allow-missing-backends`` runs anyway, with
csl_fast's rows skipped and the reason in the report. When one of a GPU's two cannot run,
its rows are skipped with the reason and the other's are timed.

The report is rewritten after each section, so a run cut short leaves its finished sections
behind: until every section asked for is done it goes to ``<name>-in-progress.md``/``.json``
and opens by saying it is incomplete and which sections are pending; the complete report is
then written under the final name and the in-progress files removed, so a killed run never
replaces a complete report (see ``write_report`` in ``csl_fast/bench/report.py``).

Provenance: set ``CSL_COMMIT`` to the commit the tree holds where ``git rev-parse HEAD`` is
wrong (a copy with stale git metadata); the report also records a SHA-256 of the sources
under csl_fast/ and csrc/ (see ``csl_fast/bench/env.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without installing

from run_meta import add_force, refuse_overwrite  # noqa: E402


def _partial_suffix(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    sections: tuple[str, ...],
    every: tuple[str, ...],
    skipped: tuple[str, ...] = (),
) -> str:
    """The report name's suffix of a run that measured less than the full report (``""``
    for a full one): it replaced the day's full report, which the results folder may hold
    committed, without a word (``-quick``, the sections, and since a run with only
    ``--no-compile``, fewer repetitions, ``--threads`` or backends ``skipped`` (their rows
    not timed) took the full name too, each such option)."""
    if args.quick:
        parts = ["quick"]
    else:
        parts = [flag for flag in ("no_compile",) if getattr(args, flag)]
        for name in ("reps", "step_reps", "budget_scale"):
            value = getattr(args, name)
            if value != parser.get_default(name):
                parts.append(f"{name}{value:g}")
    if args.no_liger:
        parts.append("no_liger")
    if args.threads:
        parts.append(f"threads{args.threads}")
    parts += [f"no_{backend}" for backend in sorted(skipped)]
    if set(sections) != set(every):
        parts += sorted(sections)
    return "".join(f"-{part.replace('_', '-')}" for part in parts)


def main(argv: list[str] | None = None) -> int:
    import torch

    from csl_fast import bench

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--out",
        default=os.path.join(ROOT, "benchmarks", "results"),
        help="folder for the .md and .json reports",
    )
    p.add_argument("--reps", type=_positive(int), default=50, help="repetitions per op candidate")
    p.add_argument(
        "--step-reps", type=_positive(int), default=20, help="repetitions per training step"
    )
    p.add_argument(
        "--budget-scale",
        type=_positive(float),
        default=1.0,
        help="scale every per-comparison time budget (default 1.0)",
    )
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile candidates")
    p.add_argument("--no-liger", action="store_true", help="skip Liger-Kernel")
    p.add_argument(
        "--sections",
        default=",".join(bench.SECTIONS),
        help=f"comma-separated subset of {','.join(bench.SECTIONS)}",
    )
    p.add_argument(
        "--threads",
        type=_positive(int),
        default=None,
        help="torch.set_num_threads (default: torch's)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 repetitions, small budgets, no torch.compile (overrides --reps, "
        "--step-reps, --budget-scale)",
    )
    p.add_argument(
        "--allow-missing-backends",
        action="store_true",
        help="run even when no compiled backend this device is meant to measure can run "
        "(csl_fast's rows are skipped, with the reason)",
    )
    add_force(p)
    args = p.parse_args(argv)
    command = " ".join(["python benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    foreign = _foreign_code()
    if foreign:
        # the commit and source hash stamped on the report are this tree's
        print(f"run.py: {foreign}; build it here (`python setup.py build_ext --inplace`) "
              "and run from this checkout", file=sys.stderr)  # fmt: skip
        return 3

    try:  # (torch's RuntimeError traceback, exit 1; meta was "build the extension")
        kind = torch.device(args.device).type
    except (RuntimeError, ValueError):
        p.error(f"--device: not a device: {args.device!r}")
    if kind not in ("cpu", "cuda"):
        p.error(f"--device {args.device}: only cpu and cuda are measured")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("run.py: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    missing = {b: why for b, why in bench.compiled_backends(args.device).items() if why}
    if bench.compiled_backend(args.device)[0] is None and not args.allow_missing_backends:
        # no csl_fast row could be timed; with one of a GPU's two backends the other's rows
        # are skipped, with the reason, and the run goes on
        from csl_fast._ext import EXTENSION_ERROR

        print(
            f"run.py: no compiled csl_fast backend this {torch.device(args.device).type} run "
            "is meant to measure can run, so every csl_fast row would be skipped (the "
            "pure-PyTorch reference fallback is never timed under csl_fast's name):\n"
            + "".join(f"  {b}: {why}\n" for b, why in missing.items())
            + (f"  extension error: {EXTENSION_ERROR}\n" if EXTENSION_ERROR else "")
            + "Build the extension (`python -m csl_fast.info` says how; for triton, install "
            "it), or pass --allow-missing-backends to run the rest anyway.",
            file=sys.stderr,
        )
        return 3
    for b, why in missing.items():
        print(f"run.py: {b}'s rows are skipped: {why}", file=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.reps, args.step_reps, args.budget_scale, args.no_compile = 3, 3, 0.1, True
    sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
    unknown = set(sections) - set(bench.SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; pick from {bench.SECTIONS}")
    if not sections:  # (an empty report replaced the day's)
        p.error(f"--sections names no section; pick from {bench.SECTIONS}")
    partial = _partial_suffix(args, p, sections, bench.SECTIONS, tuple(missing))
    # the day's report, which the results folder may hold committed (write_report replaces
    # it), under the name the run will write; the date is the run's start, as the report's
    stem = bench.report_stem(bench.environment(args.device), args.out, partial)
    refuse_overwrite(p, args.force, stem + ".md", stem + ".json")

    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f}s] {msg}", file=sys.stderr, flush=True)

    results = bench.run_full(
        args.device,
        reps=args.reps,
        step_reps=args.step_reps,
        compile=not args.no_compile,
        liger=not args.no_liger,
        sections=sections,
        budget_scale=args.budget_scale,
        log=log,
        on_section=lambda done: bench.write_report(
            {**done, "command": command}, args.out, suffix=partial
        ),
    )
    results["command"] = command
    md, js = bench.write_report(results, args.out, suffix=partial)
    log(f"wrote {md} and {js}")
    print(bench.summary_table(results), flush=True)
    return 1 if results["errors"] else 0


def _positive(kind: type) -> object:
    def parse(text: str) -> int | float:
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = kind.__name__  # (argparse names the type in its messages)
    return parse


def _foreign_code() -> str | None:
    """Why the csl_fast this process imported is not this checkout's, or None."""
    from pathlib import Path

    import csl_fast
    from csl_fast import _ext

    root = Path(ROOT).resolve()
    for what, path in (
        ("csl_fast", csl_fast.__file__),
        ("its compiled extension csl_fast._C", getattr(_ext._C, "__file__", None)),
    ):
        if path is not None and not Path(path).resolve().is_relative_to(root):
            return f"{what} came from {path}, not from this checkout ({root})"
    return None


if __name__ == "__main__":
    sys.exit(main())
