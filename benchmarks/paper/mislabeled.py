"""Mislabeled detection (poster table "Identifying Mislabeled"), small scale.

floor(p * N) labels flipped to a uniformly random different class, p in {1, 2, 5, 10}%,
3 seeds; AUROC (and AUPR, FPR@95TPR in the JSON) of every method against the flipped
mask. Default: digits, ~10 min on one CPU core. ``python benchmarks/paper/mislabeled.py
--help`` for the knobs.

Also the ground-truth-free flagged set a user gets: ``csl_fast.detect.mislabeled(tracker)``
on the tracked run's tracker (the default ``rule="auto"``: the two-view rule with its
estimated count and interval; the Detection names the rule it used), beside confident
learning's ``find_label_issues`` set (K-fold, the same runs).
"""

from __future__ import annotations

import warnings

import numpy as np
from common import (
    METHODS,
    PAPER_MISLABELED_C10,
    PAPER_ROW,
    Progress,
    config_from,
    config_line,
    count_cell,
    detection_flags,
    detection_table,
    flagged_set,
    fmt,
    load_data,
    need_both_classes,
    parse_args,
    parser,
    precision_cell,
    precision_stats,
    rate_arg,
    run_all,
    write_results,
)

import csl_fast
from csl_fast import corrupt, detect

STATS = ("flagged", "recall", "f1")  # (precision: precision_stats)


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--noise", type=rate_arg, nargs="+", default=[0.01, 0.02, 0.05, 0.10])
    args = parse_args(p, "mislabeled")
    cfg = config_from(args)
    x, y, c = load_data(cfg)
    for noise in args.noise:
        flipped = corrupt.flip_labels(y, noise, num_classes=c, seed=0)[1]  # (any seed: one count)
        need_both_classes(p, f"--noise {noise:g}", int(flipped.sum()), x.shape[0])
    runs = []
    prog = Progress(len(args.noise) * len(cfg.seeds), f"mislabeled detection on {cfg.dataset}")
    for noise in args.noise:
        for seed in cfg.seeds:
            noisy, flipped = corrupt.flip_labels(y, noise, num_classes=c, seed=seed)
            tracker = csl_fast.CSLTracker(x.shape[0], c, device=cfg.device)
            scores, times = run_all(cfg, x, noisy, c, seed, progress=args.progress, tracker=tracker)
            table = detection_table(scores, flipped)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", detect.DetectionWarning)  # kept in the JSON
                det = detect.mislabeled(tracker)
            runs.append(
                {
                    "noise": noise,
                    "seed": seed,
                    "positives": int(flipped.sum()),
                    "metrics": table,
                    "seconds": times,
                    "default_rule": detection_flags(det, flipped),
                    "cleanlab_find_label_issues": flagged_set(scores["cl"] > 0, flipped),
                }
            )
            csl = table["CSL (ours, in-training)"]["auroc"]
            prog.step(
                f"noise {noise:.0%} seed {seed}: CSL {csl:.4f}"
                f"  final loss {table['Final sample loss']['auroc']:.4f}"
                f"  curv {table['Curv.']['auroc']:.4f}  ({times['tracked_run_total']:.0f}s tracked)"
            )

    def cell(method, noise, metric="auroc"):
        return fmt(
            [
                r["metrics"][method][metric]
                for r in runs
                if r["noise"] == noise and method in r["metrics"]
            ]
        )

    summary = {
        m: {
            f"{n:g}": {k: cell(m, n, k) for k in ("auroc", "aupr", "fpr@95tpr")} for n in args.noise
        }
        for m in METHODS
    }
    head = " | ".join(f"{n:.0%} noise" for n in args.noise)
    lines = [
        f"# Mislabeled detection: AUROC, mean ± std over seeds {cfg.seeds}",
        "",
        f"Setup: {config_line(cfg)}. N = {x.shape[0]}; positives = int(p·N) flipped labels.",
        "",
        f"| Method | {head} | paper, CIFAR-10 (1% / 2% / 5% / 10%) |",
        "|---|" + "---|" * len(args.noise) + "---|",
    ]
    for m in METHODS:
        paper = PAPER_MISLABELED_C10.get(PAPER_ROW.get(m, ""), None)
        cells = " | ".join(cell(m, n) for n in args.noise)
        lines.append(f"| {m} | {cells} | {' / '.join(paper) if paper else '—'} |")
    lines += [
        "",
        "AUPR (chance = the noise rate):",
        "",
        f"| Method | {head} |",
        "|---|" + "---|" * len(args.noise),
    ]
    for m in METHODS:
        lines.append(f"| {m} | " + " | ".join(cell(m, n, "aupr") for n in args.noise) + " |")
    lines += [
        "",
        "Ground-truth-free flagging: `csl_fast.detect.mislabeled(tracker)` (default "
        '`rule="auto"`; the rule column is the one the Detection reports) next to '
        "cleanlab's `find_label_issues` (K = 3 folds, out-of-sample), mean over seeds:",
        "",
        "| noise | positives | rule | estimated count [interval] | flagged | precision | recall "
        "| F1 | cleanlab: flagged | precision | recall | F1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n in args.noise:
        rs = [r for r in runs if r["noise"] == n]
        d = {k: np.mean([r["default_rule"][k] for r in rs]) for k in STATS}
        cl = {k: np.mean([r["cleanlab_find_label_issues"][k] for r in rs]) for k in STATS}
        precision = {
            key: precision_cell(precision_stats([r[key]["precision"] for r in rs]))
            for key in ("default_rule", "cleanlab_find_label_issues")
        }
        rules = ", ".join(sorted({r["default_rule"]["rule"] for r in rs}))
        counts = "; ".join(count_cell(r["default_rule"]) for r in rs)
        lines.append(
            f"| {n:.0%} | {rs[0]['positives']} | {rules} | {counts} | {d['flagged']:.1f} | "
            f"{precision['default_rule']} | {d['recall']:.3f} | {d['f1']:.3f} | "
            f"{cl['flagged']:.1f} | {precision['cleanlab_find_label_issues']} | "
            f"{cl['recall']:.3f} | {cl['f1']:.3f} |"
        )
    lines += [
        "",
        "Mean wall-clock per run (seconds): "
        + ", ".join(
            f"{k} {sum(r['seconds'][k] for r in runs) / len(runs):.1f}" for k in runs[0]["seconds"]
        ),
    ]
    write_results(
        args.out or "mislabeled",
        {"config": cfg, "noise": args.noise, "runs": runs, "summary": summary},
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
