"""Clean and retrain: how much of the accuracy lost to label noise does cleaning win back?

For each regime, noise rate and seed, with ``floor(p * N)`` training labels flipped to a
uniformly random different class, the clean test accuracy of the same model (same
initialisation, same minibatch seed, same hyperparameters; only the training labels
differ) trained on:

``noisy``
    the noisy labels (csl_fast's tracked run: this training is also what csl_fast learns
    from);
``csl_fast``
    the data :func:`csl_fast.clean` cleaned with its default policy (relabel a flagged
    sample to its suggested label when confident, drop it otherwise), retrained once;
``csl_fast drop``
    the same flagged set, all dropped;
``cleanlab``
    cleanlab's documented workflow: out-of-sample ``pred_probs`` from K = 3 folds (a fresh
    model per fold, :mod:`csl_fast.baselines.confident_learning`), ``find_label_issues``,
    drop the issues, retrain;
``true labels``
    the labels before the flips (the ceiling).

"Gap recovered" is ``(acc - acc_noisy) / (acc_ceiling - acc_noisy)`` on the means over
seeds. Also reported: the fraction of *all* flipped samples whose suggested label is their
true label, for csl_fast (:meth:`csl_fast.CSLTracker.suggestions`, ``-1`` counts as wrong)
and for cleanlab (argmax of its out-of-sample ``pred_probs``), and the training runs each
method costs (csl_fast: the tracked run + one retraining; cleanlab: K folds + one
retraining, besides the noisy run it does not need).

Regimes (public data, shipped or generated locally; the network memorizes: no weight
decay, no augmentation, long training):

``digits``
    scikit-learn's digits, a stratified 70/30 split (1,257 train / 540 test), inputs
    standardised with the training statistics, MLP 64-128-128-10, SGD lr 0.05 momentum 0.9,
    batch 128, 60 epochs (``benchmarks/paper/common.py``'s regime).
``mnist1d``
    MNIST-1D (``pip install mnist1d``; ``make_dataset(get_dataset_args())``: 4,000 train /
    1,000 test sequences of length 40, 10 classes), a small BatchNorm-free 1-D conv net,
    Adam lr 3e-3, batch 128, 50 epochs (``benchmarks/flagging.py``'s regime; the network
    memorizes: the JSON records the share of flipped labels the noisy run fits).

    At 100 epochs (3 runs, 5 and 10% flips) the network memorizes the flips so early that
    no sample's mean margin is negative; the default rule then anchors on the labels that
    were confidently doubted for long (:func:`csl_fast.flagging.doubted`) and flags
    precision 0.90-0.98 / recall 0.71-0.83 there (``benchmarks/results/flagging.md``,
    the ``--saved`` table).

``mnist-mlp``, ``mnist-lenet``
    real MNIST (a fixed subset of 10,000 training images, the 10,000 test images;
    ``benchmarks/mnist_data.py``), the MLP and LeNet-shaped conv net of the held-out
    regimes of ``benchmarks/flagging.py``, Adam lr 1e-3, batch 128, 60 epochs.

    python benchmarks/paper/cleaning.py                       # digits and MNIST-1D, 5 and 10%
    python benchmarks/paper/cleaning.py --regimes digits --seeds 0 1 2
    python benchmarks/paper/cleaning.py --regimes mnist-mlp --seeds 4 5 --sweep \
        --out cleaning-mnist                                  # held out, no sweep

Also a sweep over ``min_confidence`` (``--sweep``; retrained at each): how many flagged
samples are relabelled, how many of those relabels are right, and the clean-test accuracy
after retraining, which is how :data:`csl_fast.cleaning.DEFAULT_MIN_CONFIDENCE` was chosen.

Writes ``results/cleaning.json`` and ``.md`` (date, machine, commit). The noisy runs'
trackers and cleanlab's results do not depend on the flagging rule and are cached
(``--cache``); so are the retrainings, keyed by the cleaned training set's content (the
training is deterministic in it), so a changed rule or threshold retrains only the plans
that changed and an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from common import environment, parse_args, rate_arg, write_results
from run_meta import add_force, at_least, at_least_one
from torch import nn

import csl_fast
from csl_fast import corrupt, detect
from csl_fast.baselines import confident_learning
from csl_fast.cleaning import evaluate_plan
from csl_fast.train import mlp, predict, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: MNIST(-1D)
import flagging as flagging_bench
import mnist1d_data
import mnist_data

REGIMES = ("digits", "mnist1d", *flagging_bench.MNIST_HELD_OUT)
#: ``min_confidence`` values the sweep retrains at (``--sweep``): relabel every flagged
#: sample with a suggestion (0), then stricter: 0.5 asks for a strict majority of the
#: presentations before the label was fitted (:meth:`csl_fast.CSLTracker.suggestions`).
SWEEP = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)
ARMS = ("noisy", "csl_fast", "csl_fast_drop", "cleanlab", "ceiling")
ARM_NAMES = {
    "noisy": "trained on the noisy labels",
    "csl_fast": "csl_fast: clean (relabel-confident) + 1 retraining",
    "csl_fast_drop": "csl_fast: drop the flagged set + 1 retraining",
    "cleanlab": "cleanlab: K = 3 folds + find_label_issues, drop + 1 retraining",
    "ceiling": "trained on the true labels (ceiling)",
}


# ------------------------------------------------------------------------------ data
def load(regime: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x_train, y_train, x_test, y_test)``, inputs standardised with training statistics."""
    if regime == "digits":
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        tr, te = train_test_split(
            np.arange(len(d.target)), test_size=0.3, stratify=d.target, random_state=0
        )
        x = torch.tensor(d.data, dtype=torch.float32)
        y = torch.tensor(d.target, dtype=torch.long)
        mean, std = x[tr].mean(0), x[tr].std(0) + 1e-3
        x = (x - mean) / std
        return x[tr], y[tr], x[te], y[te]
    if regime == "mnist1d":
        return mnist1d_data.load()
    if regime in flagging_bench.MNIST_HELD_OUT:
        return mnist_data.load()
    raise SystemExit(f"unknown regime {regime!r}; known: {REGIMES}")


def factory(regime: str, epochs: int | None):
    """``(seed -> fresh model, train kwargs)`` of a regime."""
    if regime == "digits":
        kw = {"epochs": 60, "lr": 0.05, "momentum": 0.9, "batch_size": 128}

        def make(seed: int) -> nn.Module:
            return mlp(64, 10, (128, 128), seed=seed)

    elif regime in flagging_bench.MNIST_HELD_OUT:
        make, kw = flagging_bench.factory(regime)  # a fresh dict per call
    else:
        kw = {"epochs": 50, "lr": 3e-3, "optimizer": "adam", "batch_size": 128}

        def make(seed: int) -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return mnist1d_data.Conv1dNet()

    if epochs is not None:
        kw["epochs"] = epochs
    return make, kw


# ------------------------------------------------------------------------------ runs
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict(model, x).argmax(1) == y).float().mean())


def fit(make, kw, seed, x, y, x_test, y_test, tracker=None, fitted=None) -> tuple[float, float]:
    """Train ``make(1000 + seed)`` on ``(x, y)``: ``(clean test accuracy, seconds)``.
    ``fitted`` (a dict) receives the final model's training-set predictions."""
    model = make(1000 + seed)
    t0 = time.perf_counter()
    train(model, x, y, tracker=tracker, seed=seed, **kw)
    seconds = time.perf_counter() - t0
    if fitted is not None:
        fitted["predicted"] = predict(model, x).argmax(1)
    return accuracy(model, x_test, y_test), seconds


def retrain(regime, seed, epochs, cache, data, make, kw, keep, labels) -> tuple[float, float]:
    """:func:`fit` on the samples ``keep`` with ``labels``, cached by content: the training
    is deterministic in (regime, seed, epochs, kept samples, labels), so a plan another rule
    or threshold also produces is trained once."""
    key = hashlib.sha256(keep.numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]
    path = cache / f"retrain-{regime}-{seed}-{epochs}-{key}.json"
    if path.exists():
        r = json.loads(path.read_text())
        return float(r["accuracy"]), float(r["seconds"])
    x, x_test, y_test = data
    acc, sec = fit(make, kw, seed, x[keep], labels, x_test, y_test)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"accuracy": acc, "seconds": sec}))
    return acc, sec


def noisy_stage(regime: str, noise: float, seed: int, epochs: int | None, folds: int, cache):
    """What does not depend on the flagging rule: the tracked noisy run (its tracker saved
    to ``cache``) and cleanlab's whole workflow. Cached, so a changed rule reruns only
    :func:`clean_stage`."""
    path = cache / f"{regime}-{noise:g}-{seed}-{epochs}-{folds}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    x, y, x_test, y_test = load(regime)
    make, kw = factory(regime, epochs)
    noisy, flipped = corrupt.flip_labels(y, noise, num_classes=10, seed=seed)
    acc, sec = {}, {}
    tracker = csl_fast.CSLTracker(len(y), 10)
    fitted: dict = {}
    acc["noisy"], sec["noisy"] = fit(make, kw, seed, x, noisy, x_test, y_test, tracker, fitted)
    # memorization: the share of flipped labels the noisy run's final model reproduces
    memorized = float((fitted["predicted"] == noisy)[flipped].float().mean())
    t0 = time.perf_counter()
    cl = confident_learning(make, x, noisy, k=folds, train_kwargs=kw, seed=seed)
    sec["cleanlab_folds"] = time.perf_counter() - t0
    keep_cl = torch.nonzero(~cl.issues)[:, 0]
    acc["cleanlab"], sec["cleanlab"] = fit(
        make, kw, seed, x[keep_cl], noisy[keep_cl], x_test, y_test
    )
    flips = flipped.numpy()
    cl_flag = cl.issues.numpy()
    n_flip = max(int(flips.sum()), 1)
    out = {
        "tracker": tracker.state_dict(),
        "noisy": noisy,
        "flipped": flipped,
        "commit": environment()["commit"],
        "flipped_fitted": memorized,
        "accuracy": acc,
        "seconds": sec,
        "cleanlab": {
            "flagged": int(cl_flag.sum()),
            "flagged_flipped": int((cl_flag & flips).sum()),
            "suggestion_right_on_flipped": float(
                (cl.pred_probs.argmax(1).numpy()[flips] == y.numpy()[flips]).sum() / n_flip
            ),
        },
    }
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def clean_stage(regime, noise, seed, epochs, folds, cache, sweep):
    """csl_fast's side: the default rule on the saved tracker, :func:`csl_fast.clean` with
    the default policy, with ``drop`` and at each ``min_confidence`` of ``sweep``, one
    retraining each (shared between identical plans)."""
    stage = noisy_stage(regime, noise, seed, epochs, folds, cache)
    x, y, x_test, y_test = load(regime)
    make, kw = factory(regime, epochs)
    noisy, flipped = stage["noisy"], stage["flipped"]
    acc, sec = dict(stage["accuracy"]), dict(stage["seconds"])
    tracker = csl_fast.CSLTracker(len(y), 10)
    tracker.load_state_dict(stage["tracker"])
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)  # kept in the results
        det = detect.mislabeled(tracker)
    plan = csl_fast.clean(tracker, detection=det)
    drop = csl_fast.clean(tracker, detection=det, policy="drop")
    sec["clean"] = time.perf_counter() - t0

    def retrain_on(p):
        keep, labels = p.apply(noisy)
        return retrain(regime, seed, epochs, cache, (x, x_test, y_test), make, kw, keep, labels)

    acc["csl_fast"], sec["csl_fast"] = retrain_on(plan)
    acc["csl_fast_drop"], sec["csl_fast_drop"] = retrain_on(drop)
    flips = flipped.numpy()
    n_flip = max(int(flips.sum()), 1)
    swept = []
    for t in sweep:
        p = csl_fast.clean(tracker, detection=det, min_confidence=t)
        ev = evaluate_plan(p, y, flipped)
        relabel_idx = p.index[p.relabel].numpy()
        right = p.suggested_label[p.relabel].numpy() == y.numpy()[relabel_idx]
        swept.append(
            {
                "min_confidence": t,
                "accuracy": retrain_on(p)[0],
                "relabeled": p.num_relabeled,
                "relabel_correct": ev["relabel_correct"],
                "relabeled_clean": int((~flips[relabel_idx]).sum()),
                "flipped_relabeled_right": float((flips[relabel_idx] & right).sum() / n_flip),
            }
        )
    sugg_label, sugg_conf = tracker.suggestions()
    true = y.numpy()
    plan_eval = evaluate_plan(plan, y, flipped)
    csl_flag = det.flagged.numpy()
    return {
        "regime": regime,
        "noise": noise,
        "seed": seed,
        "train_size": len(y),
        "test_size": len(y_test),
        "flipped": int(flips.sum()),
        "trained_at_commit": stage["commit"],
        "flipped_fitted_by_noisy_run": stage["flipped_fitted"],
        "accuracy": acc,
        "seconds": sec,
        "csl_fast": {
            "rule": det.rule,
            "warning": det.warning,
            "min_confidence": plan.min_confidence,
            "flagged": int(csl_flag.sum()),
            "flagged_flipped": int((csl_flag & flips).sum()),
            "estimated_count": det.estimated_count,
            "count_interval": det.count_interval,
            "relabeled": plan.num_relabeled,
            "relabel_correct": plan_eval["relabel_correct"],
            "dropped": plan.num_dropped,
            "dropped_clean": plan_eval["drop_clean"],
            "suggestion_right_on_flipped": float(
                (sugg_label.numpy()[flips] == true[flips]).sum() / n_flip
            ),
            "suggestion_confidence_median_on_flipped": float(np.nanmedian(sugg_conf.numpy()[flips]))
            if flips.any()
            else None,
        },
        "sweep": swept,
        "cleanlab": stage["cleanlab"],
        "trainings": {"csl_fast": 2, "cleanlab": folds + 1},
    }


def ceiling(regime: str, seed: int, epochs: int | None, cache: Path) -> float:
    """Clean-test accuracy of the model trained on the true labels (cached)."""
    path = cache / f"ceiling-{regime}-{seed}-{epochs}.json"
    if path.exists():
        return float(json.loads(path.read_text())["accuracy"])
    x, y, x_test, y_test = load(regime)
    make, kw = factory(regime, epochs)
    a, s = fit(make, kw, seed, x, y, x_test, y_test)
    cache.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"accuracy": a, "seconds": s}))
    return a


# ------------------------------------------------------------------------------ tables
def _sweep_means(rs: list[dict], noisy: float, gap: float) -> list[dict]:
    """Means over seeds of each ``min_confidence`` of the sweep, with the gap recovered."""
    out = []
    for j, first in enumerate(rs[0]["sweep"]):
        mean = {
            k: float(np.mean([r["sweep"][j][k] for r in rs]))
            for k in (
                "accuracy",
                "relabeled",
                "relabel_correct",
                "relabeled_clean",
                "flipped_relabeled_right",
            )
        }
        mean["gap_recovered"] = (mean["accuracy"] - noisy) / gap if gap > 0 else None
        out.append({"min_confidence": first["min_confidence"], **mean})
    return out


def summarise(runs: list[dict], ceilings: dict[str, float]) -> list[dict]:
    """Per (regime, noise): means over seeds of every arm, the gap recovered, suggestions."""
    rows = []
    for regime in dict.fromkeys(r["regime"] for r in runs):
        for noise in sorted({r["noise"] for r in runs if r["regime"] == regime}):
            rs = [r for r in runs if r["regime"] == regime and r["noise"] == noise]
            seeds = [r["seed"] for r in rs]
            acc = {
                a: float(np.mean([r["accuracy"][a] for r in rs])) for a in ARMS if a != "ceiling"
            }
            acc["ceiling"] = float(np.mean([ceilings[f"{regime}/{s}"] for s in seeds]))
            std = {a: float(np.std([r["accuracy"][a] for r in rs])) for a in ARMS if a != "ceiling"}
            gap = acc["ceiling"] - acc["noisy"]
            rec = {
                a: (acc[a] - acc["noisy"]) / gap if gap > 0 else None
                for a in ("csl_fast", "csl_fast_drop", "cleanlab")
            }

            def mean(path: tuple[str, str], rs: list[dict] = rs) -> float:
                return float(np.mean([r[path[0]][path[1]] for r in rs]))

            rows.append(
                {
                    "regime": regime,
                    "noise": noise,
                    "seeds": seeds,
                    "accuracy": acc,
                    "accuracy_std": std,
                    "gap_recovered": rec,
                    "suggestion_right_on_flipped": {
                        "csl_fast": mean(("csl_fast", "suggestion_right_on_flipped")),
                        "cleanlab": mean(("cleanlab", "suggestion_right_on_flipped")),
                    },
                    "flagged": {
                        "csl_fast": mean(("csl_fast", "flagged")),
                        "cleanlab": mean(("cleanlab", "flagged")),
                        "flipped": float(np.mean([r["flipped"] for r in rs])),
                        "csl_fast_flipped": mean(("csl_fast", "flagged_flipped")),
                        "cleanlab_flipped": mean(("cleanlab", "flagged_flipped")),
                    },
                    "relabels": {
                        "csl_fast": mean(("csl_fast", "relabeled")),
                        "csl_fast_correct": mean(("csl_fast", "relabel_correct")),
                    },
                    "sweep": _sweep_means(rs, acc["noisy"], gap),
                    "trained_at_commit": sorted({r["trained_at_commit"] for r in rs}),
                    "flipped_fitted_by_noisy_run": float(
                        np.mean([r["flipped_fitted_by_noisy_run"] for r in rs])
                    ),
                    "seconds": {
                        "csl_fast": float(
                            np.mean([r["seconds"]["noisy"] + r["seconds"]["csl_fast"] for r in rs])
                        ),
                        "cleanlab": float(
                            np.mean(
                                [
                                    r["seconds"]["cleanlab_folds"] + r["seconds"]["cleanlab"]
                                    for r in rs
                                ]
                            )
                        ),
                    },
                }
            )
    return rows


def markdown(rows: list[dict], env: dict, args: argparse.Namespace) -> str:
    def pct(v: float | None) -> str:
        return "n/a" if v is None else f"{100 * v:.0f}%"

    lines = [
        "# Clean and retrain: clean-test accuracy (mean over seeds)",
        "",
        f"{env['date']}, commit {env['commit']}, {env['machine']} with {env['cpu_count']} CPUs, "
        f"torch {env['torch']}, {env['torch_threads']} thread(s). Written by "
        "`benchmarks/paper/cleaning.py` (its docstring has the regimes).",
        "",
        "Each arm trains the same model (initialisation, minibatch seed, hyperparameters); "
        "only the training labels differ. Gap recovered = (acc - noisy) / (ceiling - noisy).",
        "",
        "| regime | flips | noisy | csl_fast (relabel-confident) | csl_fast (drop) | cleanlab "
        "(drop) | true labels | gap recovered: csl_fast / drop / cleanlab |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, s, g = r["accuracy"], r["accuracy_std"], r["gap_recovered"]
        lines.append(
            f"| {r['regime']} | {r['noise']:.0%} | {a['noisy']:.4f} ± {s['noisy']:.4f} | "
            f"{a['csl_fast']:.4f} ± {s['csl_fast']:.4f} | "
            f"{a['csl_fast_drop']:.4f} ± {s['csl_fast_drop']:.4f} | "
            f"{a['cleanlab']:.4f} ± {s['cleanlab']:.4f} | {a['ceiling']:.4f} | "
            f"{pct(g['csl_fast'])} / {pct(g['csl_fast_drop'])} / {pct(g['cleanlab'])} |"
        )
    lines += [
        "",
        "Suggested labels: fraction of all flipped samples whose suggestion is their true "
        "label (csl_fast: the tracker's vote; cleanlab: argmax of its out-of-sample "
        "pred_probs); flagged sets (flipped among them); csl_fast's relabels (right ones); "
        "seconds of training per method (csl_fast: tracked run + 1 retraining = 2 "
        f"trainings; cleanlab: {args.folds} folds + 1 retraining).",
        "",
        "| regime | flips | flipped (fitted by the noisy run) | suggestion right: csl_fast "
        "| cleanlab | flagged: csl_fast | cleanlab | relabels: csl_fast | seconds: csl_fast "
        "| cleanlab |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        sg, fl, sec, rl = (
            r["suggestion_right_on_flipped"],
            r["flagged"],
            r["seconds"],
            r["relabels"],
        )
        lines.append(
            f"| {r['regime']} | {r['noise']:.0%} | {fl['flipped']:.1f} "
            f"({r['flipped_fitted_by_noisy_run']:.0%}) | {sg['csl_fast']:.3f} | "
            f"{sg['cleanlab']:.3f} | {fl['csl_fast']:.1f} ({fl['csl_fast_flipped']:.1f}) | "
            f"{fl['cleanlab']:.1f} ({fl['cleanlab_flipped']:.1f}) | "
            f"{rl['csl_fast']:.1f} ({rl['csl_fast_correct']:.1f}) | "
            f"{sec['csl_fast']:.0f} | {sec['cleanlab']:.0f} |"
        )
    if any(r["sweep"] for r in rows):  # ``--sweep`` with no values: none
        lines += [
            "",
            "`min_confidence` sweep (the relabel-confident policy on the same flagged sets, one "
            "retraining each): relabels (right ones), the share of all flipped samples "
            "relabelled to their true label, clean samples relabelled (new noise), clean-test "
            "accuracy and gap recovered; the rest of the flagged set is dropped.",
            "",
            "| regime | flips | min_confidence | relabels (right) | flipped relabelled right "
            "| clean relabelled | accuracy | gap recovered |",
            "|---|---|---|---|---|---|---|---|",
        ]
    for r in rows:
        for w in r["sweep"]:
            lines.append(
                f"| {r['regime']} | {r['noise']:.0%} | {w['min_confidence']:.3g} | "
                f"{w['relabeled']:.1f} ({w['relabel_correct']:.1f}) | "
                f"{w['flipped_relabeled_right']:.0%} | {w['relabeled_clean']:.1f} | "
                f"{w['accuracy']:.4f} | {pct(w['gap_recovered'])} |"
            )
    trained = sorted({c for r in rows for c in r["trained_at_commit"]})
    lines += [
        "",
        f"Noisy runs and cleanlab trained at commit(s) {', '.join(trained)}; the rule and the "
        f"cleaning at {env['commit']}. The script caches the noisy runs and the retrainings "
        "(see its --cache; a retraining is keyed by the cleaned training set's content, the "
        "training being deterministic in it).",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--regimes", nargs="+", choices=REGIMES, default=["digits", "mnist1d"])
    p.add_argument("--noise", type=rate_arg, nargs="+", default=[0.05, 0.10])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument(
        "--epochs", type=at_least_one, default=None, help="override every regime's epochs"
    )
    p.add_argument("--folds", type=at_least(2), default=3, help="cleanlab's K (default 3)")
    p.add_argument(
        "--sweep",
        type=rate_arg,
        nargs="*",
        default=list(SWEEP),
        help="min_confidence values to retrain at (default: 0, 0.3, 0.4, 0.5, 0.6, 0.7)",
    )
    p.add_argument("--threads", type=at_least_one, default=1)
    p.add_argument("--out", default="cleaning", help="results/OUT.json and .md")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "csl_fast" / "cleaning",
        help="trackers and cleanlab results of the noisy runs (rule-independent), retrainings",
    )
    p.add_argument(
        "--noisy-only",
        action="store_true",
        help="only train the rule-independent part (noisy runs, cleanlab, ceilings) into the cache",
    )
    add_force(p)
    args = parse_args(p, "cleaning")
    torch.set_num_threads(args.threads)
    todo = [(g, n, s) for g in args.regimes for n in args.noise for s in args.seeds]
    t_start = time.perf_counter()
    ceilings = {
        f"{regime}/{seed}": ceiling(regime, seed, args.epochs, args.cache)
        for regime in args.regimes
        for seed in args.seeds
    }
    print("ceilings: " + ", ".join(f"{k} {v:.4f}" for k, v in ceilings.items()), flush=True)
    if args.noisy_only:
        for regime, noise, seed in todo:
            noisy_stage(regime, noise, seed, args.epochs, args.folds, args.cache)
            print(f"noisy stage {regime}/{noise:g}/{seed} cached", flush=True)
        return
    runs = []
    for i, (regime, noise, seed) in enumerate(todo):
        r = clean_stage(regime, noise, seed, args.epochs, args.folds, args.cache, args.sweep)
        runs.append(r)
        print(
            f"[{i + 1}/{len(todo)}] {regime}/{noise:g}/{seed}: "
            + ", ".join(f"{a} {v:.4f}" for a, v in r["accuracy"].items())
            + "; sweep "
            + ", ".join(f"{w['min_confidence']:.3g}: {w['accuracy']:.4f}" for w in r["sweep"])
            + f"  ({time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
    rows = summarise(runs, ceilings)
    env = environment()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    write_results(
        args.out,
        {"args": settings, "summary": rows, "runs": runs, "ceilings": ceilings},
        markdown(rows, env, args),
    )
    print(markdown(rows, env, args))


if __name__ == "__main__":
    main()
