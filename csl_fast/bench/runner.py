"""Running the sections: the full run behind ``benchmarks/run.py`` and the short one
behind ``csl-fast bench``."""

from __future__ import annotations

import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

from . import lm
from .cases import CE_SHAPES, GRAD_SHAPES, bench_cross_entropy, bench_input_grad
from .env import _loadavg, environment
from .harness import _why, copy_bandwidth
from .report import markdown
from .targets import check_failure, targets
from .training import (
    SHORT_VARIANTS,
    WORKLOADS,
    bench_tracker_memory,
    bench_tracking_cost,
    bench_training,
)

SECTIONS = (
    "copy_bandwidth",
    "cross_entropy",
    "training",
    "tracking_cost",
    "input_grad",
    "memory",
    "linear_cross_entropy",
)


def run_full(
    device: torch.device | str,
    *,
    reps: int = 50,
    step_reps: int = 20,
    compile: bool = True,
    liger: bool = True,
    sections: tuple[str, ...] = SECTIONS,
    budget_scale: float = 1.0,
    log: Callable[[str], None] = lambda s: None,
    on_section: Callable[[dict], None] | None = None,
) -> dict:
    """Every section on ``device``; returns the results dict :func:`write_report` takes.

    ``on_section(results)`` is called after each section's part (e.g. to write a partial
    report, so a run cut short by a time limit still leaves its finished sections behind).
    ``env["settings"]["sections"]`` records the sections asked for and ``results["pending"]``
    those not finished yet, so such a report says it is incomplete (:func:`markdown`) and
    is written under an in-progress name (:func:`write_report`); the returned results have
    no ``pending``."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"env": environment(dev), "errors": {}}
    results["env"]["settings"] = {
        "reps": reps,
        "step_reps": step_reps,
        "compile": compile,
        "budget_scale": budget_scale,
        "sections": [s for s in SECTIONS if s in sections],
    }
    results["pending"] = list(results["env"]["settings"]["sections"])

    def checkpoint(key: str) -> None:
        """Write the partial report; a failure is recorded, not raised: raised outside the
        section's try, it ended the run with its remaining sections unmeasured."""
        if on_section is None:
            return
        try:
            results["targets"] = targets(results)
            on_section(results)
        except Exception as exc:
            results["errors"][f"{key} report"] = traceback.format_exc()
            log(f"partial report after {key} failed: {_why(exc)}")

    def section(name, fn, parts=(None,)):
        """Run ``fn(part)`` for each part (e.g. each shape), appending rows, and write a
        partial report after each part."""
        if name not in sections:
            return
        t = time.perf_counter()
        for i, part in enumerate(parts, 1):
            key = name if part is None else f"{name} {part}"
            try:
                got = fn(part)
                if isinstance(got, list):
                    results.setdefault(name, []).extend(got)
                    failed = _failed_checks(got)
                    if failed:
                        results["errors"][f"{key} checks"] = failed
                        log(f"section {key}: {failed}")
                else:
                    results[name] = got
            except Exception as exc:
                results["errors"][key] = traceback.format_exc()
                log(f"section {key} failed: {_why(exc)}")
            if i == len(parts):
                results["pending"].remove(name)  # (before the checkpoint that shows it done)
            checkpoint(key)
        log(f"section {name}: {time.perf_counter() - t:.1f}s")

    section("copy_bandwidth", lambda _: copy_bandwidth(dev))
    section(
        "cross_entropy",
        lambda shape: bench_cross_entropy(
            dev,
            [shape],
            reps=reps,
            budget_s=20 * budget_scale,
            compile=compile,
            liger=liger,
            log=log,
        ),
        CE_SHAPES[dev.type],
    )
    section(
        "training",
        lambda kind: bench_training(
            dev, (kind,), reps=step_reps, budget_s=40 * budget_scale, log=log
        ),
        WORKLOADS,
    )
    section(
        "tracking_cost",
        lambda kind: bench_tracking_cost(dev, (kind,), budget_s=10 * budget_scale, log=log),
        WORKLOADS,
    )
    section(
        "input_grad",
        lambda shape: bench_input_grad(dev, [shape], reps=reps, budget_s=8 * budget_scale, log=log),
        GRAD_SHAPES[dev.type],
    )
    section("memory", lambda _: bench_tracker_memory(dev))
    section(
        "linear_cross_entropy",
        lambda shape: lm.bench_linear_cross_entropy(
            dev,
            shapes=[shape],
            reps=max(3, reps // 5),
            budget_s=30 * budget_scale,
            compile=compile,
            liger=liger,
            log=log,
        ),
        lm.LCE_SHAPES[dev.type],
    )
    del results["pending"]
    results["env"]["loadavg_end"] = _loadavg()
    results["env"]["wall_s"] = round(time.perf_counter() - t0, 1)
    results["targets"] = targets(results)
    return results


def _failed_checks(rows: list[dict]) -> str | None:
    """The failed correctness checks among ``rows`` (a training workload's once), or None.
    They are errors of the run: a build that computes wrong answers must not exit 0."""
    lines = dict.fromkeys(
        f"{r.get('impl') or r['workload']}: {why}" for r in rows if (why := check_failure(r))
    )
    return "correctness checks failed:\n" + "\n".join(lines) if lines else None


def run_short(device: torch.device | str | None = None, quiet: bool = False) -> str:
    """A short overhead report (< 1 min on a CPU): the cross-entropy comparison without
    torch.compile, the MLP training step and its tracking cost, tracker memory. Returns
    the markdown; prints it unless ``quiet``."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = (lambda s: None) if quiet else (lambda s: print(f"[bench] {s}", file=sys.stderr))
    results: dict[str, Any] = {"env": environment(dev), "errors": {}}
    shapes = CE_SHAPES[dev.type]
    results["cross_entropy"] = bench_cross_entropy(
        dev, shapes, reps=15, budget_s=3.0, compile=False, liger=True, log=log
    )
    results["training"] = bench_training(
        dev, ("mlp",), SHORT_VARIANTS, reps=6, budget_s=8.0, log=log
    )
    results["tracking_cost"] = bench_tracking_cost(dev, ("mlp",), reps=60, budget_s=3.0, log=log)
    results["memory"] = bench_tracker_memory(dev)
    results["env"]["loadavg_end"] = _loadavg()  # (the busy warning read the start alone)
    results["targets"] = targets(results)
    text = markdown(results, short=True)
    if not quiet:
        print(text)
    return text
