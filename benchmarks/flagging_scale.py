"""Scale of the no-ground-truth rule (issue 14, item 7): ``detect.mislabeled`` with its
default rule (ranking, two-view count and interval, flagged set) on N synthetic samples,
on 2 CPU threads; the 1-D valley rule on a plain tensor too.

The scores mimic a memorizing run: clean mean losses log-normal (a mixture of two, with a
long easy tail), 5% bad samples with a normal mean loss around 2 of which 60% have a
negative mean margin. The scores are float32, as a default tracker keeps them.

    python benchmarks/flagging_scale.py                 # N = 1M and 10M
    python benchmarks/flagging_scale.py --sizes 100000

Writes ``benchmarks/results/flagging_scale.json`` and ``.md`` (date, machine, commit);
memory is the peak resident-set growth of the call, per sample.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from run_meta import run_meta  # noqa: E402

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


def _peak_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def measure(n: int) -> dict:
    table, bad = synthetic(n)
    before = _peak_kb()
    t0, c0 = time.perf_counter(), time.process_time()
    det = detect.mislabeled(table, "csl")
    two_view, two_view_cpu = time.perf_counter() - t0, time.process_time() - c0
    grown = (_peak_kb() - before) * 1024
    t0, c0 = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        valley = detect.mislabeled(table["csl"], rule="valley")
    valley_s, valley_cpu = time.perf_counter() - t0, time.process_time() - c0
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
    p.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "flagging_scale"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        rows.append(measure(n))
        r = rows[-1]
        print(
            f"N={n:,}: default rule {r['seconds_default_rule']:.2f}s "
            f"({r['cpu_seconds_default_rule']:.2f} CPU s), "
            f"valley {r['seconds_valley_rule']:.2f}s "
            f"({r['cpu_seconds_valley_rule']:.2f} CPU s), "
            f"load {r['load_average_1min']:.1f}, "
            f"peak memory +{r['peak_rss_growth_bytes_per_sample']:.0f} B/sample; "
            f"est {r['estimated_count']} {r['count_interval']} for {r['bad']}, "
            f"P {r['precision']:.3f} R {r['recall']:.3f}",
            flush=True,
        )
    meta = run_meta()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, "rows": rows}, indent=1) + "\n")
    lines = [
        "# Scale of the no-ground-truth rule",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. "
        "`python benchmarks/flagging_scale.py`: `detect.mislabeled(scores)` (default rule: "
        "ranking, two-view count and interval, flagged set) on synthetic float32 scores; "
        "the previous rule (a scikit-learn GMM on every point) took 127 s at N = 10M. "
        "Memory: peak resident-set growth during the call. Wall seconds depend on how many "
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
            f"| {r['peak_rss_growth_bytes_per_sample']:.0f} | {r['estimated_count']:,} "
            f"[{lo:,}, {hi:,}] | {r['bad']:,} | {r['precision']:.3f} | {r['recall']:.3f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
