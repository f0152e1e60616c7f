"""CSL for regression: corrupted targets found by :func:`csl_fast.record_loss` vs cleanlab.

Data: scikit-learn's shipped ``load_diabetes`` (442 patients, 10 standardised features,
target: disease progression after one year, 25-346). It is the only real regression set
scikit-learn ships with more than 20 samples (``load_linnerud`` has 20; the ``fetch_*``
sets need the network). Corruption of ``--noise`` (5%) of the targets, two kinds:

* ``marginal``: the target is replaced by the target of another sample drawn uniformly
  (a draw from the target's empirical marginal; a swapped or mis-joined record). Some of
  these land close to the true value and cannot be found by any method.
* ``offset``: the target is moved by 3 standard deviations of the target, up or down
  (a unit or entry error).

Model: an MLP (10 -> 256 -> 256 -> 1, ReLU), MSE on standardised targets, Adam lr 1e-3,
no weight decay, batch 32, ``--epochs`` (default 300) epochs: it memorizes (the final
training MSE is printed; ~0 against a noise floor of ~0.5 on this data).

Scores of corruption (higher = more suspicious), AUROC and AUPR against the corrupted set:

* ``csl``: CSL of the squared error, recorded each step with ``csl_fast.record_loss``
  into a ``CSLTracker`` (one training run, no extra cost);
* ``final residual``: ``|y - f(x)|`` of the trained model (the same run);
* ``cleanlab (MLP, K-fold)``: ``1 - cleanlab.regression.rank.get_label_quality_scores``
  (method ``"outre"``, its default) on K = ``--folds`` out-of-sample predictions of the
  same MLP trained the same way (cleanlab's documented workflow);
* ``cleanlab CleanLearning``: ``1 - label_quality`` of
  ``cleanlab.regression.learn.CleanLearning().find_label_issues`` with its default model
  (scikit-learn ``LinearRegression``, 5 folds, bootstrapped uncertainty).

Flagged sets without ground truth: ``csl_fast.detect_losses.corrupted_targets(tracker)``
(the tail rule: the excess over a robust normal fit of the bulk of log-CSL), the
cross-entropy module's ``csl_fast.detect.mislabeled(csl)`` (the valley rule for a plain
score, kept for comparison; it flagged nothing on this data) and CleanLearning's
``is_label_issue``.

Also the cost of ``record_loss`` in a training step: the same loop with and without it.

Usage: ``python benchmarks/paper/regression.py [--seeds 0 1 2] [--epochs 300]
[--cost-from results/regression.json]``; writes ``results/regression.json`` and
``results/regression.md``. ``--cost-from`` copies the cost section of an earlier result
file (with its date and commit) instead of measuring it again.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
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
KINDS = ("marginal", "offset")


def load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return x.astype(np.float32), y.astype(np.float64)


def corrupt(y: np.ndarray, rate: float, kind: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(noisy targets, bool mask of the corrupted ones)``: ``round(rate * N)`` targets."""
    rng = np.random.default_rng(seed)
    n = len(y)
    bad = rng.choice(n, size=round(rate * n), replace=False)
    noisy = y.copy()
    if kind == "marginal":
        # Another sample's target: j uniform over the others (j != i).
        j = (bad + rng.integers(1, n, size=len(bad))) % n
        noisy[bad] = y[j]
    else:
        noisy[bad] = y[bad] + rng.choice([-3.0, 3.0], size=len(bad)) * y.std()
    mask = np.zeros(n, dtype=bool)
    mask[bad] = True
    return noisy, mask


def mlp(seed: int, width: int = 256) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(10, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1)
    )


def train(
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    epochs: int,
    tracker: csl_fast.CSLTracker | None = None,
    batch: int = 32,
) -> nn.Module:
    """Train the MLP with MSE; record each step's per-sample loss into ``tracker``."""
    model = mlp(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    n = len(y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch):
            idx = order[start : start + batch]
            per_sample = F.mse_loss(model(x[idx]).squeeze(1), y[idx], reduction="none")
            if tracker is not None:
                csl_fast.record_loss(per_sample, idx, tracker)
            loss = per_sample.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if tracker is not None:
            tracker.end_epoch()
    return model


def predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(x).squeeze(1).double().numpy()


def kfold_predictions(x, y, seed, epochs, folds) -> np.ndarray:
    """Out-of-sample predictions of the same MLP, K folds."""
    from sklearn.model_selection import KFold

    out = np.zeros(len(y))
    for k, (tr, te) in enumerate(KFold(folds, shuffle=True, random_state=seed).split(x)):
        model = train(x[tr], y[tr], seed * 100 + k, epochs)
        out[te] = predict(model, x[te])
    return out


def ranking_metrics(score: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    from sklearn.metrics import average_precision_score, roc_auc_score

    return {
        "auroc": float(roc_auc_score(truth, score)),
        "aupr": float(average_precision_score(truth, score)),
    }


def one_run(kind: str, seed: int, args: argparse.Namespace) -> dict:
    import warnings

    from cleanlab.regression.learn import CleanLearning
    from cleanlab.regression.rank import get_label_quality_scores

    x_np, y_clean = load()
    y_np, truth = corrupt(y_clean, args.noise, kind, seed)
    # Standardised with the statistics a user has: those of the noisy targets.
    y_std = (y_np - y_np.mean()) / y_np.std()
    x, y = torch.from_numpy(x_np), torch.from_numpy(y_std).float()
    run: dict = {"kind": kind, "seed": seed, "n": len(y), "corrupted": int(truth.sum())}
    moved = np.abs(y_np - y_clean)[truth] / y_clean.std()
    run["median_shift_in_sd"] = float(np.median(moved))

    tracker = csl_fast.CSLTracker(len(y))
    t0 = time.perf_counter()
    model = train(x, y, seed, args.epochs, tracker)
    run["seconds_csl_run"] = time.perf_counter() - t0
    residual = np.abs(y_std - predict(model, x))
    run["final_train_mse"] = float(np.mean(residual**2))
    csl = tracker.csl.double().numpy()
    scores = {"csl": csl, "final residual": residual}

    t0 = time.perf_counter()
    oos = kfold_predictions(x, y, seed, args.epochs, args.folds)
    quality = get_label_quality_scores(y_std, oos)
    run["seconds_cleanlab_mlp"] = time.perf_counter() - t0
    run["oos_mse"] = float(np.mean((y_std - oos) ** 2))
    scores["cleanlab (MLP, K-fold)"] = 1.0 - quality

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        issues = CleanLearning(seed=seed).find_label_issues(x_np, y_std)
    run["seconds_cleanlearning"] = time.perf_counter() - t0
    scores["cleanlab CleanLearning (linear)"] = 1.0 - issues["label_quality"].to_numpy()

    run["ranking"] = {name: ranking_metrics(s, truth) for name, s in scores.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tail = detect_losses.corrupted_targets(tracker)
        det = csl_fast.detect.mislabeled(torch.from_numpy(csl))
    k = int(truth.sum())
    run["tail_estimate"] = {"count": tail.estimated_count, "interval": tail.count_interval}
    run["flagged"] = {
        "csl (detect_losses.corrupted_targets, tail)": flagged_set(tail.flagged.numpy(), truth),
        "csl (detect.mislabeled, valley)": flagged_set(det.flagged.numpy(), truth),
        "cleanlab CleanLearning": flagged_set(issues["is_label_issue"].to_numpy(), truth),
    }
    # Not a rule (it is told the true count): how pure the top of each ranking is.
    for name, s in scores.items():
        top = np.zeros(len(s), dtype=bool)
        top[np.argsort(-s, kind="stable")[:k]] = True
        run["flagged"][f"top {k} of {name} (oracle count)"] = flagged_set(top, truth)
    run["csl_warning"] = tail.warning
    return run


def record_loss_cost(args: argparse.Namespace) -> dict:
    """The training loop with and without record_loss, interleaved; min of repeats."""
    x_np, y_np = load()
    x = torch.from_numpy(x_np)
    y = torch.from_numpy((y_np - y_np.mean()) / y_np.std()).float()
    epochs = args.cost_epochs
    steps = epochs * -(-len(y) // 32)
    times: dict[str, list[float]] = {
        "plain": [],
        "record_loss (tensor)": [],
        "record_loss (tracker)": [],
    }
    for _ in range(args.cost_repeats):
        for name in times:
            target = None
            if name == "record_loss (tracker)":
                target = csl_fast.CSLTracker(len(y))
            t0 = time.perf_counter()
            if name == "record_loss (tensor)":
                _train_with_buffer(x, y, epochs)
            else:
                train(x, y, 0, epochs, target)
            times[name].append(time.perf_counter() - t0)
    base = min(times["plain"])
    out = {"steps": steps, "seconds_min": {k: min(v) for k, v in times.items()}}
    out["us_per_step_extra"] = {
        k: (min(v) - base) / steps * 1e6 for k, v in times.items() if k != "plain"
    }
    out["us_per_step_plain"] = base / steps * 1e6
    # The call alone, at a larger scale (no training around it).
    out["us_per_call"] = {}
    for n, b in ((442, 32), (1_000_000, 256)):
        loss, idx = torch.rand(b), torch.randint(0, n, (b,))
        for what, dest in (("tensor", torch.zeros(n)), ("tracker", csl_fast.CSLTracker(n))):
            for _ in range(20):
                csl_fast.record_loss(loss, idx, dest)
            t0 = time.perf_counter()
            reps = 2000
            for _ in range(reps):
                csl_fast.record_loss(loss, idx, dest)
            out["us_per_call"][f"N={n}, B={b}, {what}"] = (time.perf_counter() - t0) / reps * 1e6
    # For scale, the cross-entropy path's own recording cost: accumulate minus F.cross_entropy
    # at the same batch (10 classes) into a tensor buffer, and F.mse_loss itself.
    logits, target = torch.randn(32, 10), torch.randint(0, 10, (32,))
    idx, buf = torch.randint(0, 442, (32,)), torch.zeros(442)
    pred = torch.randn(32)
    calls = {
        "F.mse_loss(reduction='none'), B=32": lambda: F.mse_loss(pred, y[:32], reduction="none"),
        "F.cross_entropy, B=32, C=10": lambda: F.cross_entropy(logits, target),
        "csl_fast.accumulate into a tensor, B=32, C=10": lambda: csl_fast.accumulate(
            logits, target, idx, buf
        ),
    }
    for name, call in calls.items():
        for _ in range(20):
            call()
        t0 = time.perf_counter()
        for _ in range(2000):
            call()
        out["us_per_call"][name] = (time.perf_counter() - t0) / 2000 * 1e6
    return out


def _train_with_buffer(x, y, epochs):
    """``train`` recording into plain csl/count tensors instead of a tracker."""
    model = mlp(0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    n = len(y)
    csl, count = torch.zeros(n), torch.zeros(n)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, 32):
            idx = order[start : start + 32]
            per_sample = F.mse_loss(model(x[idx]).squeeze(1), y[idx], reduction="none")
            csl_fast.record_loss(per_sample, idx, csl, count=count)
            opt.zero_grad(set_to_none=True)
            per_sample.mean().backward()
            opt.step()


def summarize(runs: list[dict]) -> dict:
    out: dict = {}
    for kind in KINDS:
        rs = [r for r in runs if r["kind"] == kind]
        if not rs:
            continue
        s: dict = {"seeds": [r["seed"] for r in rs], "ranking": {}, "flagged": {}, "seconds": {}}
        for name in rs[0]["ranking"]:
            for m in ("auroc", "aupr"):
                v = [r["ranking"][name][m] for r in rs]
                s["ranking"].setdefault(name, {})[m] = (float(np.mean(v)), float(np.std(v)))
        for name in rs[0]["flagged"]:
            s["flagged"][name] = {
                m: float(np.mean([r["flagged"][name][m] for r in rs]))
                for m in ("flagged", "recall", "f1")
            }
            s["flagged"][name]["precision"] = precision_stats(
                [r["flagged"][name]["precision"] for r in rs]
            )
        for key in ("seconds_csl_run", "seconds_cleanlab_mlp", "seconds_cleanlearning"):
            s["seconds"][key] = float(np.mean([r[key] for r in rs]))
        s["final_train_mse"] = float(np.mean([r["final_train_mse"] for r in rs]))
        s["oos_mse"] = float(np.mean([r["oos_mse"] for r in rs]))
        s["median_shift_in_sd"] = float(np.mean([r["median_shift_in_sd"] for r in rs]))
        out[kind] = s
    return out


def markdown(meta: dict, summary: dict, cost: dict | None) -> str:
    lines = [
        "# Regression: corrupted targets, CSL (record_loss) vs cleanlab",
        "",
        f"Date {meta['date']}, commit {meta['commit']}, {meta['machine']}, "
        f"cleanlab {meta['cleanlab']}.",
        f"Command: `{meta['command']}`",
        "",
        f"scikit-learn `load_diabetes` (N = 442), {meta['noise']:.0%} of targets corrupted "
        f"(22 samples), MLP 10-256-256-1, MSE, Adam 1e-3, no weight decay, batch 32, "
        f"{meta['epochs']} epochs; cleanlab K = {meta['folds']} folds of the same MLP. Mean "
        "(std) over seeds; each seed draws its own corruption and initialisation.",
        "",
    ]
    for kind, s in summary.items():
        lines += [
            f"## {kind} corruption (seeds {s['seeds']}; median shift of a corrupted target: "
            f"{s['median_shift_in_sd']:.2f} target sd)",
            "",
            f"Final training MSE {s['final_train_mse']:.4f} (memorized); out-of-sample MSE of "
            f"the K-fold MLP {s['oos_mse']:.3f} (standardised targets).",
            "",
            "| score | AUROC | AUPR | wall s (training + scoring) |",
            "|---|---|---|---|",
        ]
        secs = {
            "csl": s["seconds"]["seconds_csl_run"],
            "final residual": s["seconds"]["seconds_csl_run"],
            "cleanlab (MLP, K-fold)": s["seconds"]["seconds_cleanlab_mlp"],
            "cleanlab CleanLearning (linear)": s["seconds"]["seconds_cleanlearning"],
        }
        for name, r in s["ranking"].items():
            (a, asd), (p, psd) = r["auroc"], r["aupr"]
            lines.append(
                f"| {name} | {a:.3f} ({asd:.3f}) | {p:.3f} ({psd:.3f}) | {secs[name]:.1f} |"
            )
        lines += [
            "",
            "| flagged set (no ground truth) | flagged | precision | recall | F1 |",
            "|---|---|---|---|---|",
        ]
        for name, f in s["flagged"].items():
            lines.append(
                f"| {name} | {f['flagged']:.1f} | {precision_cell(f['precision'])} | "
                f"{f['recall']:.3f} | "
                f"{f['f1']:.3f} |"
            )
        lines.append("")
    if cost is not None:
        source = cost.get("from")
        lines += [
            "## Cost of record_loss in a training step",
            "",
            f"The diabetes loop above ({cost['steps']} steps of batch 32), min of "
            f"{cost.get('repeats', meta['cost_repeats'])} interleaved repeats; plain step "
            f"{cost['us_per_step_plain']:.0f} us."
            + (f" Measured {source} (copied with --cost-from)." if source else ""),
            "",
            "| variant | extra us per step | extra % |",
            "|---|---|---|",
        ]
        for k, v in cost["us_per_step_extra"].items():
            lines.append(f"| {k} | {v:.1f} | {100 * v / cost['us_per_step_plain']:.1f} |")
        lines += ["", "| call alone | us per call |", "|---|---|"]
        for k, v in cost["us_per_call"].items():
            lines.append(f"| {k} | {v:.1f} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    p.add_argument("--epochs", type=at_least_one, default=300)
    p.add_argument("--noise", type=rate_arg, default=0.05)
    p.add_argument("--folds", type=at_least(2), default=3)
    p.add_argument("--threads", type=at_least_one, default=1)
    p.add_argument("--cost-epochs", type=at_least_one, default=100)
    p.add_argument("--cost-repeats", type=int, default=3)
    p.add_argument("--no-cost", action="store_true")
    p.add_argument("--cost-from", help="copy the cost section of this earlier result json")
    p.add_argument("--out", default=str(RESULTS / "regression"))
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, args.out + ".json", args.out + ".md")
    n = len(load()[1])
    need_both_classes(p, f"--noise {args.noise:g}", round(args.noise * n), n)
    torch.set_num_threads(args.threads)
    import cleanlab

    meta = {
        **run_meta(),
        "cleanlab": cleanlab.__version__,
        "threads": args.threads,
        "command": "python benchmarks/paper/regression.py " + " ".join(sys.argv[1:]),
        **{k: getattr(args, k) for k in ("noise", "epochs", "folds", "cost_repeats")},
    }
    runs = []
    for kind in args.kinds:
        for seed in args.seeds:
            run = one_run(kind, seed, args)
            auc = {k: round(v["auroc"], 3) for k, v in run["ranking"].items()}
            print(kind, seed, f"train mse {run['final_train_mse']:.4f}", auc, flush=True)
            runs.append(run)
    summary = summarize(runs)
    if args.cost_from:
        old = json.loads(Path(args.cost_from).read_text())
        # a cost carried more than once keeps the run that measured it, not the last copy's
        when = (
            old["cost"].get("from") or f"on {old['meta']['date']} at commit {old['meta']['commit']}"
        )
        cost = {
            **old["cost"],
            "from": when,
            "repeats": old["cost"].get("repeats", old["meta"]["cost_repeats"]),
        }
    else:
        cost = None if args.no_cost else record_loss_cost(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_atomic(
        args.out + ".json",
        json.dumps({"meta": meta, "summary": summary, "cost": cost, "runs": runs}, indent=1),
    )
    md = Path(args.out + ".md")
    write_atomic(md, with_discussion(md, markdown(meta, summary, cost)))
    print(markdown(meta, summary, cost))


if __name__ == "__main__":
    main()
