"""Multi-label without noise: what the default entry rule flags when no entry is flipped.

The control of ``benchmarks/paper/multilabel.py``: the same data (two digits side by side,
N = 1,797, L = 10), the same MLP and training (``--epochs`` 200, Adam, batch 64, BCE through
``csl_fast.accumulate_bce``), but no entry flipped, so every flagged entry is a false
alarm. Per seed: entries flagged by ``detect_losses.mislabeled_entries`` (over all entries
and ``per_label=True``), the estimated count and interval, whether a
``DetectionWarning`` fired, how many flagged entries are positives (a digit present), the
flagged entries per digit, and samples flagged by ``corrupted_targets`` on the per-sample
CSL. The entry rule is the tail rule, then the doubt gate (``mislabeled_entries``): when
fewer than a fifth of the tail's flagged entries were firmly rejected by the network, only
those stay flagged; the table gives the tail's set, the share and the set returned.

Usage: ``python benchmarks/paper/multilabel_clean.py [--seeds 0 1 2] [--epochs 200]``;
writes ``results/multilabel-clean.json`` and ``results/multilabel-clean.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(HERE.parent))

from multilabel import LABELS, RESULTS, load, train  # noqa: E402
from run_meta import add_force, at_least_one, refuse_overwrite, run_meta, write_atomic  # noqa: E402

import csl_fast  # noqa: E402
from csl_fast import detect_losses  # noqa: E402


def _quiet(fn, *args, **kwargs):
    """``(fn(...), whether it warned)`` with DetectionWarnings caught."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", csl_fast.detect.DetectionWarning)
        out = fn(*args, **kwargs)
    return out, any(issubclass(w.category, csl_fast.detect.DetectionWarning) for w in caught)


def one_run(seed: int, epochs: int) -> dict:
    x_np, y_np = load()
    n = len(y_np)
    tracker = csl_fast.CSLTracker(n, num_labels=LABELS)
    train(torch.from_numpy(x_np), torch.from_numpy(y_np), seed, epochs, tracker)
    det, warned = _quiet(detect_losses.mislabeled_entries, tracker)
    per_label, per_label_warned = _quiet(detect_losses.mislabeled_entries, tracker, per_label=True)
    samples, samples_warned = _quiet(detect_losses.corrupted_targets, tracker)
    flagged = det.flagged.numpy()
    doubt = det.diagnostics.get("doubt", {})
    return {
        "seed": seed,
        "entries": int(y_np.size),
        "tail_flagged": det.diagnostics.get("tail_flagged", int(flagged.sum())),
        "anchored_share": doubt.get("anchored_share") if isinstance(doubt, dict) else None,
        "flagged": int(flagged.sum()),
        "estimated": det.estimated_count,
        "interval": det.count_interval,
        "warned": warned,
        "flagged_positives": int((flagged & (y_np == 1)).sum()),
        "positives": int((y_np == 1).sum()),
        "flagged_per_digit": flagged.sum(0).tolist(),
        "per_label_flagged": int(per_label.flagged.sum()),
        "per_label_warned": per_label_warned,
        "samples_flagged": int(samples.flagged.sum()),
        "samples_warned": samples_warned,
        "estimator": {
            k: det.diagnostics["estimator"][k]
            for k in ("median", "spread", "expected", "observed", "excess", "needed")
        },
    }


def markdown(meta: dict, runs: list[dict]) -> str:
    lines = [
        "# Multi-label without noise: false alarms of the entry rule",
        "",
        f"Date {meta['date']}, commit {meta['commit']}, {meta['machine']}.",
        f"Command: `{meta['command']}`",
        "",
        f"Two digits side by side (N = {meta['n']}, L = {LABELS}), no entry flipped; MLP "
        f"128-256-256-10, BCE, Adam 1e-3, batch 64, {meta['epochs']} epochs "
        "(`benchmarks/paper/multilabel.py`'s training). Every flagged entry is a false alarm.",
        "",
        "| seed | tail rule: flagged | anchored share | flagged entries (share) "
        "| estimated (interval) | warned | of them positives | per digit "
        "| per label: flagged | samples flagged (corrupted_targets) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        share = "-" if r["anchored_share"] is None else f"{r['anchored_share']:.2f}"
        lines.append(
            f"| {r['seed']} | {r['tail_flagged']} | {share} "
            f"| {r['flagged']} ({r['flagged'] / r['entries']:.2%}) "
            f"| {r['estimated']} {tuple(r['interval']) if r['interval'] else ''} "
            f"| {'yes' if r['warned'] else 'no'} "
            f"| {r['flagged_positives']} of {r['positives']} "
            f"| {r['flagged_per_digit']} | {r['per_label_flagged']} "
            f"| {r['samples_flagged']}{' (warned)' if r['samples_warned'] else ''} |"
        )
    lines += [
        "",
        "The rule's numbers (log scale: median, robust spread; beyond z > 2: expected under "
        "the normal model, observed, their excess, and the excess it needs):",
        "",
    ]
    lines += [f"- seed {r['seed']}: {r['estimator']}" for r in runs]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=at_least_one, default=200)
    p.add_argument("--threads", type=at_least_one, default=1)
    p.add_argument("--out", default=str(RESULTS / "multilabel-clean"))
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, args.out + ".json", args.out + ".md")
    torch.set_num_threads(args.threads)
    meta = {
        **run_meta(),
        "command": "python benchmarks/paper/multilabel_clean.py " + " ".join(sys.argv[1:]),
        "n": len(load()[0]),
        "epochs": args.epochs,
    }
    runs = []
    for seed in args.seeds:
        runs.append(one_run(seed, args.epochs))
        print(seed, {k: runs[-1][k] for k in ("flagged", "estimated", "warned")}, flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out + ".json", json.dumps({"meta": meta, "runs": runs}, indent=1))
    write_atomic(args.out + ".md", markdown(meta, runs))
    print(markdown(meta, runs))


if __name__ == "__main__":
    main()
