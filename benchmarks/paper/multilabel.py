"""Multi-label: flipped label entries found by per-label CSL vs cleanlab's multi-label scores.

Data (derived deterministically from scikit-learn's shipped ``load_digits``, no download):
"two digits side by side", a Multi-MNIST-style construction. Composite ``i`` (``i`` in
``[0, 1797)``) is digit image ``i`` (8x8) beside digit image ``pi(i)``, where ``pi`` is
the permutation ``numpy.random.default_rng(0).permutation(1797)``; its input is the two
standardised 64-pixel images concatenated (128 features) and its label set is the set of
digits present, a multi-hot row over ``L = 10`` labels (one or two positives; one when
both digits are the same). ``--copies 2`` adds a second composite per image with the
permutation of ``default_rng(1)`` (N = 3,594).

Noise: ``--noise`` (5%) of the ``N * L`` label entries, drawn uniformly without
replacement (seeded per run), are flipped (0 <-> 1): a missing tag or a spurious one.
Positives: the flipped entries. Per-sample positives: samples with any flipped entry.

Model: MLP 128 -> 256 -> 256 -> 10 (ReLU), binary cross entropy with logits (mean over
entries), Adam lr 1e-3, no weight decay, batch 64, ``--epochs`` epochs: it memorizes the
flipped entries (the final training accuracy on the noisy entries is printed).

Scores of a flipped entry (higher = more suspicious), per entry ``(i, k)``:

* ``label csl``: per-entry CSL, the sum over training of the entry's plain BCE, recorded
  by ``csl_fast.accumulate_bce`` into ``CSLTracker(num_labels=L).label_csl`` during the
  one training run (no extra cost);
* ``label margin``: minus the mean over training of the entry's signed margin
  ``(2y - 1) z`` (``accumulate_bce``'s optional ``label_margin`` buffer, AUM's sigmoid
  analogue; the same run);
* ``final entry loss``: the trained model's BCE on the entry (the same run);
* ``cleanlab (K-fold)``: ``1 - cleanlab.multilabel_classification.rank.
  get_label_quality_scores_per_class`` (self-confidence) on K = ``--folds`` out-of-sample
  sigmoid probabilities of the same MLP trained the same way (cleanlab's documented
  workflow: out-of-sample ``pred_probs``, then its scores).

Per sample (any entry flipped): ``csl`` (the tracker's per-sample CSL, the sum over labels)
vs ``1 - cleanlab.multilabel_classification.get_label_quality_scores``.

Flagged sets without ground truth: ``csl_fast.detect_losses.mislabeled_entries`` (rule
``tail``, over all entries and per label) vs ``cleanlab.multilabel_classification.
filter.find_multilabel_issues_per_class`` for entries; ``find_label_issues`` (multi-label)
for samples.

Usage: ``python benchmarks/paper/multilabel.py [--seeds 0 1] [--epochs 200]``; writes
``results/multilabel.json`` and ``results/multilabel.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(HERE.parent))

from common import (  # noqa: E402
    flagged_set,
    need_both_classes,
    precision_cell,
    precision_stats,
    rate_arg,
)
from run_meta import (  # noqa: E402
    add_force,
    at_least,
    at_least_one,
    refuse_overwrite,
    run_meta,
    with_discussion,
    write_atomic,
)

import csl_fast  # noqa: E402
from csl_fast import detect_losses  # noqa: E402

RESULTS = HERE / "results"
LABELS = 10


def load(copies: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``(x [N, 128] float32, targets [N, 10] float32 multi-hot)``, see the module doc."""
    from sklearn.datasets import load_digits

    images, digits = load_digits(return_X_y=True)
    images = (images - images.mean(0)) / (images.std(0) + 1e-8)
    n = len(digits)
    xs, ys = [], []
    for c in range(copies):
        partner = np.random.default_rng(c).permutation(n)
        xs.append(np.concatenate([images, images[partner]], 1))
        y = np.zeros((n, LABELS), dtype=np.float32)
        y[np.arange(n), digits] = 1
        y[np.arange(n), digits[partner]] = 1
        ys.append(y)
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def flip(targets: np.ndarray, rate: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(noisy targets, bool [N, L] mask of the flipped entries)``."""
    rng = np.random.default_rng(seed)
    flat = targets.reshape(-1)
    bad = rng.choice(flat.size, size=round(rate * flat.size), replace=False)
    noisy = flat.copy()
    noisy[bad] = 1 - noisy[bad]
    mask = np.zeros(flat.size, dtype=bool)
    mask[bad] = True
    return noisy.reshape(targets.shape), mask.reshape(targets.shape)


def mlp(seed: int, inputs: int = 128, width: int = 256) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(inputs, width),
        nn.ReLU(),
        nn.Linear(width, width),
        nn.ReLU(),
        nn.Linear(width, LABELS),
    )


def train(x, y, seed, epochs, tracker=None, batch=64, label_margin=None) -> nn.Module:
    """Train the MLP with BCE; ``accumulate_bce`` records into ``tracker`` (and the
    per-entry margin sums into ``label_margin``) when given."""
    model = mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            logits = model(x[idx])
            if tracker is not None:
                loss = csl_fast.accumulate_bce(
                    logits, y[idx], idx, tracker, label_margin=label_margin
                )
            else:
                loss = F.binary_cross_entropy_with_logits(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if tracker is not None:
            tracker.end_epoch()
    return model


def probabilities(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.sigmoid(model(x)).double().numpy()


def kfold_probabilities(x, y, seed, epochs, folds) -> np.ndarray:
    """Out-of-sample sigmoid probabilities of the same MLP, K folds (a fresh model each)."""
    from sklearn.model_selection import KFold

    out = np.zeros(tuple(y.shape))
    for k, (tr, te) in enumerate(KFold(folds, shuffle=True, random_state=seed).split(x)):
        model = train(x[tr], y[tr], seed * 100 + k, epochs)
        out[te] = probabilities(model, x[te])
    return out


def ranking_metrics(score: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    s, t = score.reshape(-1), truth.reshape(-1)
    return {"auroc": float(roc_auc_score(t, s)), "aupr": float(average_precision_score(t, s))}


def label_lists(targets: np.ndarray) -> list[list[int]]:
    return [list(np.flatnonzero(row)) for row in targets]


def one_run(seed: int, args: argparse.Namespace) -> dict:
    from cleanlab.multilabel_classification import get_label_quality_scores
    from cleanlab.multilabel_classification.filter import (
        find_label_issues,
        find_multilabel_issues_per_class,
    )
    from cleanlab.multilabel_classification.rank import get_label_quality_scores_per_class

    x_np, y_clean = load(args.copies)
    y_np, truth = flip(y_clean, args.noise, seed)
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_np)
    n = len(y)
    run: dict = {"seed": seed, "n": n, "entries": int(y_np.size), "flipped": int(truth.sum())}
    run["flipped_to_positive"] = int((truth & (y_np == 1)).sum())
    sample_truth = truth.any(1)

    tracker = csl_fast.CSLTracker(n, num_labels=LABELS)
    margin = torch.zeros(n, LABELS)
    t0 = time.perf_counter()
    model = train(x, y, seed, args.epochs, tracker, label_margin=margin)
    run["seconds_csl_run"] = time.perf_counter() - t0
    p = probabilities(model, x)
    run["train_entry_accuracy"] = float(((p > 0.5) == (y_np > 0.5)).mean())
    run["train_flipped_entries_fitted"] = float(((p > 0.5) == (y_np > 0.5))[truth].mean())
    label_csl = tracker.label_csl.double().numpy()
    final = -(y_np * np.log(np.clip(p, 1e-12, 1)) + (1 - y_np) * np.log(np.clip(1 - p, 1e-12, 1)))
    mean_margin = (margin / tracker.csl_count[:, None]).double().numpy()
    entry_scores = {
        "label csl": label_csl,
        "label margin (minus the mean, AUM-style)": -mean_margin,
        "final entry loss": final,
    }

    t0 = time.perf_counter()
    oos = kfold_probabilities(x, y, seed, args.epochs, args.folds)
    labels = label_lists(y_np)
    per_class = get_label_quality_scores_per_class(labels, oos)
    run["seconds_cleanlab"] = time.perf_counter() - t0
    entry_scores["cleanlab (K-fold)"] = 1.0 - per_class
    sample_scores = {
        "csl": tracker.csl.double().numpy(),
        "cleanlab (K-fold)": 1.0 - get_label_quality_scores(labels, oos),
    }
    run["entry_ranking"] = {k: ranking_metrics(s, truth) for k, s in entry_scores.items()}
    run["sample_ranking"] = {k: ranking_metrics(s, sample_truth) for k, s in sample_scores.items()}

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csl_fast.detect.DetectionWarning)
        det = detect_losses.mislabeled_entries(tracker)
        det_label = detect_losses.mislabeled_entries(tracker, per_label=True)
        alone = detect_losses.mislabeled_entries(tracker.label_csl)  # a tensor: not gated
    run["seconds_rule"] = time.perf_counter() - t0
    run["rule_warning"] = det.warning
    run["rule_estimated"] = det.estimated_count
    issues = find_multilabel_issues_per_class(labels, oos)
    # [N, K] in cleanlab 2.9 (its docstring says a list of K masks of length N)
    cl_entries = np.asarray(issues, dtype=bool)
    if cl_entries.shape != truth.shape:
        cl_entries = cl_entries.T
    k = int(truth.sum())
    run["entry_flagged"] = {
        "label csl, default rule over all entries": flagged_set(det.flagged.numpy(), truth),
        "label csl, per_label=True": flagged_set(det_label.flagged.numpy(), truth),
        "label csl, the tail rule alone": flagged_set(alone.flagged.numpy(), truth),
        "cleanlab find_multilabel_issues_per_class": flagged_set(cl_entries, truth),
    }
    for name, s in entry_scores.items():  # not a rule: told the true count
        top = np.zeros(s.size, dtype=bool)
        top[np.argsort(-s.reshape(-1), kind="stable")[:k]] = True
        run["entry_flagged"][f"top {k} of {name} (oracle count)"] = flagged_set(top, truth)
    cl_samples = find_label_issues(labels, oos)
    run["sample_flagged"] = {
        "csl_fast rule (sample has a flagged entry)": flagged_set(
            det.flagged.numpy().any(1), sample_truth
        ),
        "cleanlab find_label_issues": flagged_set(cl_samples, sample_truth),
    }
    return run


def mean_std(values) -> list[float]:
    v = np.asarray(values, dtype=float)
    return [float(np.nanmean(v)), float(np.nanstd(v))]


def summarize(runs: list[dict]) -> dict:
    out: dict = {"seeds": [r["seed"] for r in runs]}
    for part in ("entry_ranking", "sample_ranking"):
        out[part] = {
            name: {m: mean_std([r[part][name][m] for r in runs]) for m in ("auroc", "aupr")}
            for name in runs[0][part]
        }
    for part in ("entry_flagged", "sample_flagged"):
        out[part] = {
            name: {
                **{
                    m: mean_std([r[part][name][m] for r in runs])
                    for m in ("flagged", "recall", "f1")
                },
                "precision": precision_stats([r[part][name]["precision"] for r in runs]),
            }
            for name in runs[0][part]
        }
    for key in (
        "seconds_csl_run",
        "seconds_cleanlab",
        "seconds_rule",
        "train_entry_accuracy",
        "train_flipped_entries_fitted",
        "flipped",
        "flipped_to_positive",
    ):
        out[key] = mean_std([r[key] for r in runs])
    return out


def _row(name: str, r: dict, cols: tuple[str, ...], extra: str = "") -> str:
    cells = [
        precision_cell(r[c], std=True)
        if c == "precision"
        else f"{r[c][0]:.{1 if c == 'flagged' else 3}f} ({r[c][1]:.{1 if c == 'flagged' else 3}f})"
        for c in cols
    ]
    return f"| {name} | " + " | ".join(cells) + (f" | {extra}" if extra else "") + " |"


def markdown(meta: dict, s: dict) -> str:
    n, entries = meta["n"], meta["n"] * LABELS
    lines = [
        "# Multi-label: flipped label entries, per-label CSL (accumulate_bce) vs cleanlab",
        "",
        f"Date {meta['date']}, commit {meta['commit']}, {meta['machine']}, "
        f"cleanlab {meta['cleanlab']}.",
        f"Command: `{meta['command']}`",
        "",
        f"Two digits side by side from scikit-learn's `load_digits` (N = {n} composites, "
        f"L = 10 labels = digits present, {entries} entries), {meta['noise']:.0%} of entries "
        f"flipped ({s['flipped'][0]:.0f}, of which {s['flipped_to_positive'][0]:.0f} to "
        f"positive); MLP 128-256-256-10, BCE, Adam 1e-3, no weight decay, batch 64, "
        f"{meta['epochs']} epochs; cleanlab on K = {meta['folds']} folds of the same MLP. "
        f"Mean (std) over seeds {s['seeds']}; each seed draws its own flips and initialisation.",
        "",
        f"Training fits {s['train_entry_accuracy'][0]:.1%} of the noisy entries and "
        f"{s['train_flipped_entries_fitted'][0]:.1%} of the flipped ones"
        + (" (memorized)." if s["train_flipped_entries_fitted"][0] > 0.95 else "."),
        "",
        "## Which entries are flipped (per entry)",
        "",
        "| score | AUROC | AUPR | wall s |",
        "|---|---|---|---|",
    ]
    secs = {
        "label csl": s["seconds_csl_run"][0],
        "label margin (minus the mean, AUM-style)": s["seconds_csl_run"][0],
        "final entry loss": s["seconds_csl_run"][0],
        "cleanlab (K-fold)": s["seconds_cleanlab"][0],
    }
    for name, r in s["entry_ranking"].items():
        lines.append(_row(name, r, ("auroc", "aupr"), f"{secs[name]:.1f}"))
    lines += ["", "## Which samples have a flipped entry", "", "| score | AUROC | AUPR |"]
    lines.append("|---|---|---|")
    for name, r in s["sample_ranking"].items():
        lines.append(_row(name, r, ("auroc", "aupr")))
    for part, title in (("entry_flagged", "entries"), ("sample_flagged", "samples")):
        lines += [
            "",
            f"## Flagged {title} (no ground truth)",
            "",
            "| flagged set | flagged | precision | recall | F1 |",
            "|---|---|---|---|---|",
        ]
        for name, r in s[part].items():
            lines.append(_row(name, r, ("flagged", "precision", "recall", "f1")))
    lines += [
        "",
        f"Wall seconds: the CSL run (training with accumulate_bce) "
        f"{s['seconds_csl_run'][0]:.1f}, the flagging rule {s['seconds_rule'][0]:.2f}; "
        f"cleanlab's K-fold trainings and scoring {s['seconds_cleanlab'][0]:.1f}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--epochs", type=at_least_one, default=200)
    p.add_argument("--noise", type=rate_arg, default=0.05)
    p.add_argument("--folds", type=at_least(2), default=3)
    p.add_argument("--copies", type=int, default=1)
    p.add_argument("--threads", type=at_least_one, default=1)
    p.add_argument("--out", default=str(RESULTS / "multilabel"))
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, args.out + ".json", args.out + ".md")
    targets = load(args.copies)[1]
    for seed in args.seeds:  # (entries and samples: both are ranked)
        truth = flip(targets, args.noise, seed)[1]
        setting = f"--noise {args.noise:g} (seed {seed})"
        need_both_classes(p, setting + " in entries", int(truth.sum()), truth.size)
        need_both_classes(p, setting + " in samples", int(truth.any(1).sum()), len(truth))
    torch.set_num_threads(args.threads)
    import cleanlab

    meta = {
        **run_meta(),
        "cleanlab": cleanlab.__version__,
        "command": "python benchmarks/paper/multilabel.py " + " ".join(sys.argv[1:]),
        "n": len(load(args.copies)[0]),
        **{k: getattr(args, k) for k in ("noise", "epochs", "folds", "copies")},
    }
    runs = []
    for seed in args.seeds:
        run = one_run(seed, args)
        auc = {k: round(v["auroc"], 3) for k, v in run["entry_ranking"].items()}
        print(seed, auc, run["entry_flagged"], flush=True)
        runs.append(run)
    summary = summarize(runs)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        args.out + ".json", json.dumps({"meta": meta, "summary": summary, "runs": runs}, indent=1)
    )
    md = Path(args.out + ".md")
    write_atomic(md, with_discussion(md, markdown(meta, summary)))
    print(markdown(meta, summary))


if __name__ == "__main__":
    main()
