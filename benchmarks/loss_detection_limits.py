"""Detection for losses other than cross entropy, measured on data its rule was not tuned on.

The tail rule of :mod:`csl_fast.detect_losses` (``TAIL_CUT`` = 2, ``TAIL_EVIDENCE`` = 3)
was chosen on scikit-learn's diabetes (``benchmarks/paper/regression.py``) and the
multi-label rule on ``benchmarks/paper/multilabel.py``'s digits. This script measures both,
unchanged and with their defaults, as a user runs them (a training loop around
:func:`csl_fast.record_loss` / :func:`csl_fast.accumulate_bce`, then
:func:`~csl_fast.detect_losses.corrupted_targets` / :func:`~csl_fast.detect_losses.
mislabeled_entries`), on held-out data generated locally (no network):

``friedman1``
    ``make_friedman1`` (500 samples, 10 features, noise 1), a non-linear target.
``linear``
    ``make_regression`` (500 samples, 20 features of which 10 informative, noise 20).
``diabetes-sgd``
    ``load_diabetes`` (442) with another network and optimiser than the tuning runs:
    MLP 10-64-64-1, SGD momentum 0.9, lr 0.01, no weight decay, 150 epochs, batch 64
    (regime ``sgd``: it fits the corrupted targets only partly).
``friedman1-t2``
    ``friedman1`` whose clean noise is Student-t with 2 degrees of freedom (scale 1)
    instead of normal: heavy-tailed *clean* targets, hard samples that are not corrupted.
``multilabel``
    ``make_multilabel_classification`` (600 samples, 20 features, 8 labels, 2 labels per
    sample on average), entries flipped (0 <-> 1); the product's rule over all entries.

Corruptions of the (regression) targets, at 0.5, 2, 5 and 10% of the samples (plus one
clean run, 0%): ``shift3`` / ``shift1.5`` (moved by +/-3 or 1.5 target sd), ``sign``
(``y -> -y`` about the targets' mean: large only for targets far from the mean), ``swap``
(pairs of corrupted samples exchange targets), ``marginal`` (redrawn from another sample's
target).

Regimes: ``memorize`` (MLP 128-128, Adam lr 1e-3, no weight decay, 150 epochs, batch
64: the corrupted targets end at a training loss ~0) and ``smooth`` (MLP 32, AdamW lr
1e-2, weight decay 0.1, 40 epochs, batch 64: it does not fit them). Targets are
standardised with the noisy targets' statistics (what a user has); MSE on them, recorded
each step with ``record_loss`` into a ``CSLTracker``. The multi-label runs use BCE through
``accumulate_bce`` into ``CSLTracker(N, num_labels=8)`` and also report ``per_label=True``.

Per run: corrupted count, flagged, precision, recall, the rule's estimated count and
interval, whether a ``DetectionWarning`` fired, the AUROC of the CSL ranking against the
truth (sklearn) and its precision at the true count (top-k: a rule failure with a high
top-k precision is the rule's, with a low one the score's; an AUROC of 0.9 can leave most
of the top k clean when the corrupted are a few percent), the training MSE at the end
(memorized or not), and the rule's own numbers (observed and expected beyond the cut,
the excess).

    python benchmarks/loss_detection_limits.py      # writes results/loss-detection-limits.*
    python benchmarks/loss_detection_limits.py --sets friedman1 --seeds 0 --out /tmp/x
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

SETS = ("friedman1", "linear", "diabetes-sgd", "friedman1-t2", "multilabel")
KINDS = ("shift3", "shift1.5", "sign", "swap", "marginal")
RATES = (0.005, 0.02, 0.05, 0.10)
REGIMES = ("memorize", "smooth")
RESULTS = HERE / "results" / "loss-detection-limits"


def load(name: str, seed: int):
    """``(x float32 [N, D] standardised, y float64 [N] or [N, L])`` of a set."""
    import numpy as np
    from sklearn import datasets

    if name.startswith("friedman1"):
        x, y = datasets.make_friedman1(500, noise=0.0, random_state=seed)
        rng = np.random.default_rng(10_000 + seed)
        noise = rng.standard_t(2, len(y)) if name.endswith("t2") else rng.standard_normal(len(y))
        y = y + noise
    elif name == "linear":
        x, y = datasets.make_regression(500, 20, n_informative=10, noise=20.0, random_state=seed)
    elif name == "diabetes-sgd":
        x, y = datasets.load_diabetes(return_X_y=True)
    else:
        x, y = datasets.make_multilabel_classification(
            600, 20, n_classes=8, n_labels=2, random_state=seed
        )
    x = (x - x.mean(0)) / x.std(0)
    return x.astype(np.float32), y.astype(np.float64)


def corrupt(y, rate: float, kind: str, seed: int):
    """``(noisy y, bool mask of the corrupted samples)``: ``round(rate * N)`` of them."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(y)
    bad = rng.choice(n, size=round(rate * n), replace=False)
    noisy = y.copy()
    sd, mean = y.std(), y.mean()
    if kind.startswith("shift"):
        noisy[bad] = y[bad] + rng.choice([-1.0, 1.0], len(bad)) * float(kind[5:]) * sd
    elif kind == "sign":
        noisy[bad] = 2 * mean - y[bad]
    elif kind == "swap":
        pairs = bad[: len(bad) // 2 * 2].reshape(-1, 2)
        noisy[pairs[:, 0]], noisy[pairs[:, 1]] = y[pairs[:, 1]], y[pairs[:, 0]]
        bad = pairs.reshape(-1)
    elif kind == "marginal":
        noisy[bad] = y[(bad + rng.integers(1, n, len(bad))) % n]
    mask = np.zeros(n, dtype=bool)
    mask[bad] = True
    return noisy, mask


def flip_entries(y, rate: float, seed: int):
    """``(noisy [N, L], bool [N, L] mask)``: ``round(rate * N * L)`` entries flipped."""
    import numpy as np

    rng = np.random.default_rng(seed)
    flat = rng.choice(y.size, size=round(rate * y.size), replace=False)
    mask = np.zeros(y.size, dtype=bool)
    mask[flat] = True
    mask = mask.reshape(y.shape)
    return np.where(mask, 1 - y, y), mask


def model_and_opt(inputs: int, outputs: int, regime: str, data: str, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    width = (64, 64) if data == "diabetes-sgd" else (128, 128) if regime == "memorize" else (32,)
    layers, w = [], inputs
    for h in width:
        layers += [nn.Linear(w, h), nn.ReLU()]
        w = h
    model = nn.Sequential(*layers, nn.Linear(w, outputs))
    if regime == "smooth":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), 40
    if regime == "sgd":
        return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), 150
    return model, torch.optim.Adam(model.parameters(), lr=1e-3), 150


def train(x, y, regime: str, data: str, seed: int, multilabel: bool):
    """Train with per-sample MSE (``record_loss``) or BCE (``accumulate_bce``); returns
    ``(tracker, final per-sample training loss)``."""
    import torch
    import torch.nn.functional as F

    import csl_fast

    n = len(y)
    labels = y.shape[1] if multilabel else 1
    model, opt, epochs = model_and_opt(x.shape[1], labels, regime, data, seed)
    tracker = csl_fast.CSLTracker(n, num_labels=labels) if multilabel else csl_fast.CSLTracker(n)
    gen = torch.Generator().manual_seed(seed)
    batch = 64
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            out = model(x[idx])
            if multilabel:
                loss = csl_fast.accumulate_bce(out, y[idx], idx, tracker)
            else:
                per = F.mse_loss(out.squeeze(1), y[idx], reduction="none")
                loss = csl_fast.record_loss(per, idx, tracker).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        tracker.end_epoch()
    with torch.no_grad():
        out = model(x)
        if multilabel:
            final = F.binary_cross_entropy_with_logits(out, y, reduction="none")
        else:
            final = F.mse_loss(out.squeeze(1), y, reduction="none")
    return tracker, final.numpy()


def one_run(data: str, regime: str, kind: str, rate: float, seed: int) -> dict:
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from csl_fast import detect_losses
    from csl_fast.detect import DetectionWarning

    x_np, y_clean = load(data, seed)
    multilabel = data == "multilabel"
    corrupt_seed = 1000 * seed + round(rate * 1000) + 7 * KINDS.index(kind)
    if multilabel:
        y_np, truth = flip_entries(y_clean, rate, corrupt_seed)
        y_t = y_np
    else:
        y_np, truth = corrupt(y_clean, rate, kind, corrupt_seed)
        y_t = (y_np - y_np.mean()) / y_np.std()
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_t).float()
    t0 = time.perf_counter()
    tracker, final = train(x, y, regime, data, seed, multilabel)
    seconds = time.perf_counter() - t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DetectionWarning)
        if multilabel:
            det = detect_losses.mislabeled_entries(tracker)
        else:
            det = detect_losses.corrupted_targets(tracker)
        per_label = (
            detect_losses.mislabeled_entries(tracker, per_label=True) if multilabel else None
        )
    fired = [str(w.message) for w in caught if issubclass(w.category, DetectionWarning)]
    flagged = det.flagged.numpy()
    scores = det.scores.double().numpy()
    tp = int((flagged & truth).sum())
    n_flag, n_bad = int(flagged.sum()), int(truth.sum())
    est = det.diagnostics.get("estimator", {})
    clean_final = final[~truth]
    # what any rule could reach: the precision of the ranking's top k at the true k
    top = np.argsort(-np.nan_to_num(scores.reshape(-1), nan=-np.inf), kind="stable")[:n_bad]
    top_k = float(truth.reshape(-1)[top].mean()) if n_bad else None
    extra = {}
    if per_label is not None:
        pl = per_label.flagged.numpy()
        extra = {
            "per_label_flagged": int(pl.sum()),
            "per_label_precision": int((pl & truth).sum()) / int(pl.sum()) if pl.any() else None,
            "per_label_warning": per_label.warning,
            "per_label_flagged_given_1": int((pl & (y_np == 1)).sum()),
        }
    if data == "friedman1-t2" and n_flag:
        # where the flagged clean samples' own noise ranks (1 = the largest |noise|)
        noise = np.abs(np.random.default_rng(10_000 + seed).standard_t(2, len(truth)))
        rank = (-noise).argsort().argsort() + 1
        extra["flagged_clean_noise_ranks"] = sorted(int(r) for r in rank[flagged & ~truth])
    return {
        **extra,
        "set": data,
        "regime": regime,
        "kind": "flip" if multilabel else kind,
        "rate": rate,
        "seed": seed,
        "n": int(truth.size),
        "corrupted": n_bad,
        "flagged": n_flag,
        "precision": tp / n_flag if n_flag else None,
        "recall": tp / n_bad if n_bad else None,
        "estimated": det.estimated_count,
        "interval": det.count_interval,
        "warning": fired[0] if fired else None,
        "auroc": float(roc_auc_score(truth.reshape(-1), scores.reshape(-1))) if n_bad else None,
        "top_k_precision": top_k,
        "observed_beyond_cut": est.get("observed"),
        "expected_beyond_cut": est.get("expected"),
        "excess": est.get("excess"),
        "final_loss_clean": float(np.mean(clean_final)),
        "final_loss_corrupted": float(np.mean(final[truth])) if n_bad else None,
        "seconds": seconds,
    }


def plan(sets, seeds, regimes, kinds, rates) -> list[tuple]:
    runs = []
    for data in sets:
        # diabetes-sgd has its own regime; the smooth one is measured on generated sets
        own = ["sgd"] if "memorize" in regimes else []
        for regime in own if data == "diabetes-sgd" else regimes:
            for seed in seeds:
                runs.append((data, regime, KINDS[0], 0.0, seed))
                if data == "multilabel":
                    runs += [(data, regime, KINDS[0], r, seed) for r in rates]
                elif data == "friedman1-t2":
                    # heavy-tailed clean noise: the clean run, and one corruption on top
                    runs += [(data, regime, "shift3", r, seed) for r in (0.02, 0.05)]
                else:
                    runs += [(data, regime, k, r, seed) for k in kinds for r in rates]
    return runs


def _f(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def summarize(rows: list[dict]) -> list[dict]:
    """Per (set, regime, kind, rate): the seeds' runs side by side."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["set"], r["regime"], r["kind"], r["rate"]), []).append(r)
    out = []
    for (data, regime, kind, rate), rs in groups.items():
        out.append(
            {
                "set": data,
                "regime": regime,
                "kind": "clean" if rate == 0 else kind,
                "rate": rate,
                "corrupted": [r["corrupted"] for r in rs],
                "flagged": [r["flagged"] for r in rs],
                "estimated": [r["estimated"] for r in rs],
                "precision": [r["precision"] for r in rs],
                "recall": [r["recall"] for r in rs],
                "warned": sum(r["warning"] is not None for r in rs),
                "runs": len(rs),
                "auroc": [r["auroc"] for r in rs],
                "top_k": [r["top_k_precision"] for r in rs],
                "excess": [r["excess"] for r in rs],
                "memorized": [r["final_loss_corrupted"] for r in rs],
            }
        )
    return out


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Detection for non-cross-entropy losses on held-out data",
        "",
        f"Date {meta['date']}, commit {meta['commit']}, {meta['machine']}.",
        f"Command: `{meta['command']}`; {meta['seconds']:.0f} s.",
        "",
        "The tail rule (`corrupted_targets`, `mislabeled_entries`, defaults) on data it was "
        "not tuned on; see the script's docstring for the sets, corruptions and regimes. "
        "One value per seed, separated by `/`. `est` is the rule's estimated count (`-`: "
        "nothing flagged, count unknown); `warn` how many runs raised a DetectionWarning; "
        "`excess` the observed minus expected scores beyond the cut (the clean runs show "
        "how far the clean bulk's tail departs from the normal model); `corr. loss` the "
        "final training loss of the corrupted samples (near 0: memorized); `top-k P` the "
        "precision of the score's top k at the true count k, what a rule that knew the "
        "count would reach (the ranking's limit, not the rule's).",
        "",
        "| set | regime | kind | rate | bad | flagged | est | precision | recall | warn | "
        "AUROC | top-k P | excess | corr. loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summarize(rows):

        def j(key, fmt=".2f", s=s):
            return " / ".join(_f(v, fmt) for v in s[key])

        lines.append(
            f"| {s['set']} | {s['regime']} | {s['kind']} | {s['rate']:.1%} | "
            f"{j('corrupted', 'd')} | {j('flagged', 'd')} | {j('estimated', 'd')} | "
            f"{j('precision')} | {j('recall')} | {s['warned']}/{s['runs']} | {j('auroc')} | "
            f"{j('top_k')} | {j('excess', '.1f')} | {j('memorized', '.3f')} |"
        )
    lines += ["", *headline(rows), "", *extras(rows)]
    return "\n".join(lines) + "\n"


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def headline(rows: list[dict]) -> list[str]:
    """Pooled over sets, regimes and seeds: how often the rule flags, and how well."""
    out = [
        "## Pooled by kind and rate (all sets and regimes)",
        "",
        "`flagged runs`: runs where the rule flagged anything; precision and recall are "
        "means over those runs (recall over all runs in brackets, 0 where nothing was "
        "flagged); AUROC and top-k P: means over all runs.",
        "",
        "| set group | kind | rate | flagged runs | precision | recall (all runs) | AUROC | "
        "top-k P |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        group = r["set"] if r["set"] in ("multilabel", "friedman1-t2") else "regression"
        kind = "clean" if r["rate"] == 0 else r["kind"]
        groups.setdefault((group, kind, r["rate"]), []).append(r)
    for (group, kind, rate), rs in groups.items():
        hit = [r for r in rs if r["flagged"]]
        out.append(
            f"| {group} | {kind} | {rate:.1%} | {len(hit)}/{len(rs)} | "
            f"{_f(_mean(r['precision'] for r in hit))} | "
            f"{_f(_mean(r['recall'] for r in hit))} ({_f(_mean(r['recall'] for r in rs))}) | "
            f"{_f(_mean(r['auroc'] for r in rs))} | "
            f"{_f(_mean(r['top_k_precision'] for r in rs))} |"
        )
    return out


def extras(rows: list[dict]) -> list[str]:
    out = [
        "## Multi-label, per_label=True (not the default)",
        "",
        "| regime | rate | seed | flagged | precision | flagged entries whose given label is 1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "per_label_flagged" in r:
            out.append(
                f"| {r['regime']} | {r['rate']:.1%} | {r['seed']} | {r['per_label_flagged']} | "
                f"{_f(r['per_label_precision'])} | {r['per_label_flagged_given_1']} |"
            )
    out += [
        "",
        "## Heavy-tailed clean noise (friedman1-t2): the flagged clean samples",
        "",
        "Rank of each flagged clean sample's own |noise| among all samples (1 = largest).",
        "",
    ]
    for r in rows:
        if r.get("flagged_clean_noise_ranks"):
            out.append(
                f"- {r['regime']}, {r['kind']} {r['rate']:.1%}, seed {r['seed']}: "
                f"{r['flagged_clean_noise_ranks']}"
            )
    return out


def main() -> None:
    from run_meta import (
        add_force,
        rate_arg,
        refuse_overwrite,
        results_files,
        run_meta,
        write_atomic,
    )

    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--sets", nargs="+", choices=SETS, default=list(SETS))
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=list(REGIMES))
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--rates", nargs="+", type=rate_arg, default=list(RATES))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--out", default=str(RESULTS), help="writes OUT.md and OUT.json")
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, *results_files(args.out))

    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    rows = []
    for spec in plan(args.sets, args.seeds, args.regimes, args.kinds, args.rates):
        r = one_run(*spec)
        rows.append(r)
        print(
            *spec,
            f"bad {r['corrupted']} flagged {r['flagged']} est {r['estimated']} "
            f"P {_f(r['precision'])} R {_f(r['recall'])} auroc {_f(r['auroc'])} "
            f"top-k P {_f(r['top_k_precision'])} "
            f"warn {r['warning'] is not None} {r['seconds']:.1f}s",
            flush=True,
        )
    meta = {
        **run_meta(),
        "command": "python benchmarks/loss_detection_limits.py " + " ".join(sys.argv[1:]),
        "seconds": time.perf_counter() - t0,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean = [
        {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
        for r in rows
    ]
    write_atomic(out.with_suffix(".json"), json.dumps({"meta": meta, "rows": clean}, indent=1))
    text = markdown(rows, meta)
    write_atomic(out.with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
