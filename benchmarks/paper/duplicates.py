"""Duplicate detection (poster table "Identifying Duplicate Samples"), small scale.

Disjoint pairs (a, b): x_a := x_b exactly and y_a := a uniformly random label different
from y_b; positives are both members of every pair. The paper uses 250 pairs in 50,000
samples (1% positives); the default keeps that rate: round(N * 250 / 50000) pairs.
Also reports the ground-truth-free flagged sets of ``csl_fast.detect.duplicates`` on the
tracked run's tracker, default ``rule="auto"`` (the Detection names the rule it used, with
its estimated count and interval): with the training inputs and labels
(``inputs=x, labels=y``: every member of every identical-input group whose labels
conflict), and with the inputs only (``inputs=x``: the mislabeled rule on CSL, every group
holding a flagged sample flagged whole). The labels are the noisy training labels the
network saw, not the ground truth.

``--benign-pairs K`` (default 0: the paper's setup) also makes K disjoint pairs of
identical inputs with the *same* label among the other samples: negatives, which a
duplicate detector must not flag for being duplicated; the tables then count them.
"""

from __future__ import annotations

import warnings

import torch
from common import (
    METHODS,
    PAPER_DUPLICATES,
    PAPER_ROW,
    Progress,
    config_from,
    config_line,
    count_arg,
    count_cell,
    detection_flags,
    detection_table,
    fmt,
    load_data,
    need_both_classes,
    parse_args,
    parser,
    precision_cell,
    precision_stats,
    run_all,
    write_results,
)

import csl_fast
from csl_fast import corrupt, detect


def benign_pairs(x, y, taken, k, seed):
    """Copies of ``x, y`` with ``k`` disjoint same-label pairs (``x_a := x_b``, ``y_a :=
    y_b``) among the samples not ``taken``, and a bool mask of their members."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    free = torch.nonzero(~taken).flatten()
    pick = free[torch.randperm(free.numel(), generator=gen)[: 2 * k]].reshape(k, 2)
    x, y = x.clone(), y.clone()
    x[pick[:, 0]], y[pick[:, 0]] = x[pick[:, 1]], y[pick[:, 1]]
    mask = torch.zeros_like(taken)
    mask[pick.flatten()] = True
    return x, y, mask


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--pairs", type=count_arg, default=None, help="default: round(N * 250 / 50000)")
    p.add_argument("--benign-pairs", type=count_arg, default=0, help="same-label pairs (negatives)")
    args = parse_args(p, "duplicates")
    cfg = config_from(args)
    x, y, c = load_data(cfg)
    pairs = args.pairs if args.pairs is not None else max(1, round(x.shape[0] * 250 / 50000))
    need_both_classes(p, f"--pairs {pairs}", 2 * pairs, x.shape[0])
    runs = []
    prog = Progress(len(cfg.seeds), f"duplicate detection on {cfg.dataset} ({pairs} pairs)")
    for seed in cfg.seeds:
        xd, yd, truth, _ = corrupt.duplicate_pairs(x, y, pairs, num_classes=c, seed=seed)
        xd, yd, benign = benign_pairs(xd, yd, truth, args.benign_pairs, seed)
        tracker = csl_fast.CSLTracker(xd.shape[0], c, device=cfg.device)
        scores, times = run_all(cfg, xd, yd, c, seed, progress=args.progress, tracker=tracker)
        table = detection_table(scores, truth)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", detect.DetectionWarning)  # kept in the JSON
            det = detect.duplicates(tracker, inputs=xd, labels=yd)
            det_inputs = detect.duplicates(tracker, inputs=xd)
        flag = detection_flags(det, truth)
        flag_inputs = detection_flags(det_inputs, truth)
        flag["benign_flagged"] = int((det.flagged.cpu() & benign).sum())
        flag_inputs["benign_flagged"] = int((det_inputs.flagged.cpu() & benign).sum())
        runs.append(
            {
                "seed": seed,
                "pairs": pairs,
                "benign_pairs": args.benign_pairs,
                "metrics": table,
                "seconds": times,
                "default_rule": flag,
                "inputs_only": flag_inputs,
            }
        )
        prog.step(
            f"seed {seed}: CSL {table['CSL (ours, in-training)']['auroc']:.4f}  "
            f"flagged {len(det)} / {len(det_inputs)} with / without labels (precision "
            f"{flag['precision']:.2f} / {flag_inputs['precision']:.2f}, recall "
            f"{flag['recall']:.2f} / {flag_inputs['recall']:.2f})"
        )

    def cell(m, k="auroc"):
        return fmt([r["metrics"][m][k] for r in runs if m in r["metrics"]])

    lines = [
        f"# Duplicate detection: AUROC, mean ± std over seeds {cfg.seeds}",
        "",
        f"Setup: {config_line(cfg)}. N = {x.shape[0]}; {pairs} disjoint pairs "
        f"({2 * pairs} positives, {2 * pairs / x.shape[0]:.1%}); {args.benign_pairs} "
        "same-label pairs (negatives).",
        "",
        "| Method | AUROC (ours) | AUPR (ours) | paper CIFAR-10 | paper CIFAR-100 |",
        "|---|---|---|---|---|",
    ]
    for m in METHODS:
        paper = PAPER_DUPLICATES.get(PAPER_ROW.get(m, ""), ("—", "—"))
        lines.append(f"| {m} | {cell(m)} | {cell(m, 'aupr')} | {paper[0]} | {paper[1]} |")
    lines += [
        "",
        "Ground-truth-free flagging with `csl_fast.detect.duplicates` (default "
        '`rule="auto"`, the rule column as the Detection reports it; flagged sets are whole '
        "groups of identical inputs): with `inputs=x, labels=y` (y: the noisy training "
        "labels), every member of every group whose labels conflict; with `inputs=x` only, "
        "the mislabeled rule on CSL, every group holding a flagged sample flagged whole.",
        "",
        "| seed | arguments | rule | estimated count [interval] | flagged | true positives "
        "| same-label duplicates flagged | precision | recall |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for args_used, f in (("inputs, labels", r["default_rule"]), ("inputs", r["inputs_only"])):
            lines.append(
                f"| {r['seed']} | {args_used} | {f['rule']} | {count_cell(f)} | {f['flagged']} "
                f"| {f['true_positives']} | {f['benign_flagged']} "
                f"| {precision_cell(precision_stats([f['precision']]), digits=2)} "
                f"| {f['recall']:.2f} |"
            )
    write_results(
        args.out or "duplicates",
        {
            "config": cfg,
            "pairs": pairs,
            "runs": runs,
            "summary": {m: {"auroc": cell(m), "aupr": cell(m, "aupr")} for m in METHODS},
        },
        "\n".join(lines),
    )


if __name__ == "__main__":
    main()
