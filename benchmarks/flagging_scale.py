"""Scale of the no-ground-truth rule (issue 14, item 7): ``detect.mislabeled`` with its
default rule (ranking, two-view count and interval, flagged set) on N synthetic samples,
on 2 CPU threads; the 1-D valley rule on a plain tensor too; and what a user runs on a
trained tracker: ``detect.mislabeled(tracker)`` (the label-lost anchors from its buffers)
then ``csl_fast.clean(tracker, detection=det)`` (the suggested labels and the plan).

The scores mimic a memorizing run: clean mean losses log-normal (a mixture of two, with a
long easy tail), 5% bad samples with a normal mean loss around 2 of which 60% have a
negative mean margin. The scores are float32, as a default tracker keeps them. The tracker
(10 classes, 50 epochs, every sample presented once per epoch) holds the same mean losses
and margins, the label's probability summed as ``50 exp(-mean loss)``, and a suggestion
voted for at every epoch before the sample was fitted.

    python benchmarks/flagging_scale.py                 # N = 1M and 10M
    python benchmarks/flagging_scale.py --sizes 100000

Writes ``benchmarks/results/flagging_scale.json`` and ``.md`` (date, machine, commit);
memory is the peak resident-set growth of the call, per sample (Linux: the peak is reset
just before the call).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from run_meta import (  # noqa: E402
    add_force,
    at_least_one,
    refuse_overwrite,
    results_files,
    run_meta,
    write_atomic,
)

import csl_fast  # noqa: E402
from csl_fast import detect  # noqa: E402

RESULTS = HERE / "results"


def synthetic(n: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``({"csl", "csl_mean", "aum"}, bad mask)`` of ``n`` samples, float32."""
    g = torch.Generator().manual_seed(seed)
    bad = torch.rand(n, generator=g) < 0.05
    easy = torch.rand(n, generator=g) < 0.3
    log_clean = torch.where(
        easy, -3.0 + 0.9 * torch.randn(n, generator=g), -1.4 + 0.5 * torch.randn(n, generator=g)
    )
    mean_bad = (2.0 + 0.6 * torch.randn(n, generator=g)).clamp_min(0.05)
    mean = torch.where(bad, mean_bad, log_clean.exp())
    lost = bad & (torch.rand(n, generator=g) < 0.6)
    margin = torch.where(
        lost, -1.0 - torch.rand(n, generator=g), 1.0 + 4 * torch.rand(n, generator=g)
    )
    table = {"csl": 50 * mean, "csl_mean": mean, "aum": -margin}
    return {k: v.float() for k, v in table.items()}, bad


def synthetic_tracker(
    n: int, epochs: int = 50, seed: int = 0
) -> tuple[csl_fast.CSLTracker, torch.Tensor]:
    """``(tracker, bad mask)``: a 10-class tracker after ``epochs`` epochs whose buffers
    follow :func:`synthetic` (see the module doc)."""
    table, bad = synthetic(n, seed)
    g = torch.Generator().manual_seed(seed + 1)
    tracker = csl_fast.CSLTracker(n, 10)
    live = tracker.buffers()
    live["csl_count"].fill_(epochs)
    live["csl_sum"].copy_(table["csl_mean"] * epochs)
    live["margin_sum"].copy_(-table["aum"] * epochs)
    live["p_true_sum"].copy_(torch.exp(-table["csl_mean"]) * epochs)
    live["last_correct"].fill_(True)
    live["last_max_prob"].fill_(0.9)  # softmax statistics were recorded (cross entropy)
    # bad samples are fitted late (memorized), clean ones in the first epochs
    learned = torch.where(
        bad,
        torch.randint(5, epochs, (n,), generator=g),
        torch.randint(0, 5, (n,), generator=g),
    )
    live["learned_epoch"].copy_(learned)
    # a suggestion only where votes were cast, as a run leaves it (save() refuses others)
    suggested = torch.randint(0, 10, (n,), generator=g)
    live["suggest_label"].copy_(torch.where(learned > 0, suggested, -1))
    live["suggest_votes"].copy_(learned)
    live["suggest_hits"].copy_(learned)
    tracker.epoch = epochs
    return tracker, bad


def measure_tracker(n: int) -> dict:
    """Wall and CPU seconds of ``detect.mislabeled(tracker)`` and of ``csl_fast.clean``."""
    tracker, bad = synthetic_tracker(n)
    before = _reset_peak_kb()
    det, rule_s, rule_cpu = _timed(detect.mislabeled, tracker)
    plan, clean_s, clean_cpu = _timed(csl_fast.clean, tracker, detection=det)
    grown = (_peak_kb() - before) * 1024
    tp = int((det.flagged & bad).sum())
    return {
        "seconds_tracker_rule": rule_s,
        "cpu_seconds_tracker_rule": rule_cpu,
        "seconds_clean": clean_s,
        "cpu_seconds_clean": clean_cpu,
        "tracker_load_average_1min": os.getloadavg()[0],
        "tracker_peak_rss_growth_bytes_per_sample": grown / n,
        "tracker_rule": det.rule,
        "tracker_estimated_count": det.estimated_count,
        "tracker_precision": tp / max(len(det), 1),
        "tracker_recall": tp / max(int(bad.sum()), 1),
        "plan_rows": len(plan),
    }


def _reset_peak_kb() -> int:
    """Reset the process's peak resident set to its current size and return that size
    (kB). Without the reset, the peak that building the synthetic data had set hid
    part of the call's own: 38 bytes per sample measured where the call took 72-83."""
    with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to VmRSS
        f.write("5")
    return _peak_kb()


def _peak_kb() -> int:
    """The peak resident set since the last :func:`_reset_peak_kb` (kB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _timed(fn, *args, **kwargs) -> tuple[Any, float, float]:
    """``(fn(*args, **kwargs), wall seconds, CPU seconds of all threads)``, the rule's
    warnings silenced (they are expected on these scores)."""
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, time.process_time() - c0


def measure(n: int) -> dict:
    table, bad = synthetic(n)
    before = _reset_peak_kb()
    det, two_view, two_view_cpu = _timed(detect.mislabeled, table, "csl")
    grown = (_peak_kb() - before) * 1024
    valley, valley_s, valley_cpu = _timed(detect.mislabeled, table["csl"], rule="valley")
    k = int(bad.sum())
    tp = int((det.flagged & bad).sum())
    return {
        "n": n,
        "threads": torch.get_num_threads(),
        "seconds_default_rule": two_view,
        "seconds_valley_rule": valley_s,
        "cpu_seconds_default_rule": two_view_cpu,
        "cpu_seconds_valley_rule": valley_cpu,
        "load_average_1min": os.getloadavg()[0],
        "peak_rss_growth_bytes_per_sample": grown / n,
        "rule": det.rule,
        "bad": k,
        "estimated_count": det.estimated_count,
        "count_interval": list(det.count_interval or (0, 0)),
        "precision": tp / max(len(det), 1),
        "recall": tp / max(k, 1),
        "valley_flagged": len(valley),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=at_least_one, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--threads", type=at_least_one, default=2)
    p.add_argument("--out", default=str(RESULTS / "flagging_scale"))
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, *results_files(args.out))
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        rows.append({**measure(n), **measure_tracker(n)})
        r = rows[-1]
        print(
            f"N={n:,}: default rule {r['seconds_default_rule']:.2f}s "
            f"({r['cpu_seconds_default_rule']:.2f} CPU s), "
            f"valley {r['seconds_valley_rule']:.2f}s "
            f"({r['cpu_seconds_valley_rule']:.2f} CPU s), "
            f"load {r['load_average_1min']:.1f}, "
            f"peak memory +{r['peak_rss_growth_bytes_per_sample']:.0f} B/sample; "
            f"est {r['estimated_count']} {r['count_interval']} for {r['bad']}, "
            f"P {r['precision']:.3f} R {r['recall']:.3f}; from a tracker: rule "
            f"{r['seconds_tracker_rule']:.2f}s ({r['cpu_seconds_tracker_rule']:.2f} CPU s), "
            f"clean {r['seconds_clean']:.2f}s ({r['cpu_seconds_clean']:.2f} CPU s), "
            f"+{r['tracker_peak_rss_growth_bytes_per_sample']:.0f} B/sample",
            flush=True,
        )
    meta = run_meta()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out.with_suffix(".json"), json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Scale of the no-ground-truth rule",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. "
        "`python benchmarks/flagging_scale.py`: `detect.mislabeled(scores)` (default rule: "
        "ranking, two-view count and interval, flagged set) on synthetic float32 scores; "
        "the previous rule (a scikit-learn GMM on every point) took 127 s at N = 10M. "
        "Memory: peak resident-set growth during the call (the peak reset just before "
        "it, Linux's /proc/self/clear_refs). Wall seconds depend on how many "
        "other processes share the cores (the 1-minute load average is given); CPU seconds "
        "(all threads summed) bound the wall time on idle cores from above.",
        "",
        "| N | default rule: wall s (CPU s) | 1-D valley rule: wall s (CPU s) | load "
        "| peak memory growth (B/sample) | estimated count [interval] | true count "
        "| precision | recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lo, hi = r["count_interval"]
        lines.append(
            f"| {r['n']:,} | {r['seconds_default_rule']:.2f} ({r['cpu_seconds_default_rule']:.2f}) "
            f"| {r['seconds_valley_rule']:.2f} ({r['cpu_seconds_valley_rule']:.2f}) "
            f"| {r['load_average_1min']:.1f} "
            f"| {r['peak_rss_growth_bytes_per_sample']:.0f} | {_count(r['estimated_count'])} "
            f"[{lo:,}, {hi:,}] | {r['bad']:,} | {r['precision']:.3f} | {r['recall']:.3f} |"
        )
    lines += [
        "",
        "From a tracker (what a user runs after training; the tracker's own buffers, about "
        "90 bytes per sample, are not counted in the memory growth): "
        "`det = detect.mislabeled(tracker)`, then `plan = csl_fast.clean(tracker, "
        "detection=det)` (suggested labels and one decision per flagged sample).",
        "",
        "| N | rule: wall s (CPU s) | clean: wall s (CPU s) | both: wall s | load "
        "| peak memory growth (B/sample) | rule | estimated count | precision | recall "
        "| plan rows |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['seconds_tracker_rule']:.2f} "
            f"({r['cpu_seconds_tracker_rule']:.2f}) | {r['seconds_clean']:.2f} "
            f"({r['cpu_seconds_clean']:.2f}) "
            f"| {r['seconds_tracker_rule'] + r['seconds_clean']:.2f} "
            f"| {r['tracker_load_average_1min']:.1f} "
            f"| {r['tracker_peak_rss_growth_bytes_per_sample']:.0f} | {r['tracker_rule']} "
            f"| {_count(r['tracker_estimated_count'])} | {r['tracker_precision']:.3f} "
            f"| {r['tracker_recall']:.3f} | {r['plan_rows']:,} |"
        )
    write_atomic(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and .md")


def _count(n: int | None) -> str:
    """A count with thousands separators; ``unknown`` where the rule gave none (small N:
    the tracker's rule may find no count, which the table's format crashed on)."""
    return "unknown" if n is None else f"{n:,}"


if __name__ == "__main__":
    main()
