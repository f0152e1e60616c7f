"""Suggested labels, measured (issue 14, item 4).

For each regime, noise rate and seed: one tracked training run in a regime where the
network memorizes, then the fraction of flipped samples whose suggestion is their true
label, for

- ``csl_fast``: :meth:`csl_fast.CSLTracker.suggestions` (the class the network predicted
  most often while it disagreed with the given label, kept by the tracker at 12 bytes per
  sample);
- ``last_pred``: the final model's prediction (what a user would reuse without it);
- ``cleanlab``: the argmax of K = 3 fold out-of-sample predicted probabilities (a fresh
  model per fold, :mod:`csl_fast.baselines.confident_learning`), cleanlab's suggestion.

Also reported, for each ``min_confidence`` of ``THRESHOLDS``, what the ``relabel-confident``
policy of :func:`csl_fast.clean` does with the default rule's flagged set
(``csl_fast.detect.mislabeled(tracker)``): how many flagged samples it relabels, how many of
those relabels are right, the share of all flipped samples it relabels to their true label,
and the clean samples (given label = true label) it relabels: a clean sample flagged by
mistake gets a wrong label. In ``demo`` the flagged set also holds the conflicting
duplicates, whose given label is wrong (their relabels count as right when the suggestion is
the label of the sample they copy).
The retraining side of the trade-off is ``benchmarks/paper/cleaning.py``'s sweep.

Regimes (public data, generated or shipped locally):

``demo``
    ``csl-fast demo``'s setup exactly: scikit-learn's digits, flipped labels and 20
    conflicting-label duplicate pairs (:func:`csl_fast.demo.inject`), MLP 64-512-512-10,
    Adam lr 3e-3, batch 128, 80 epochs, no weight decay (fits ~97% of the given labels).
``mnist1d-cnn``
    MNIST-1D (``pip install mnist1d``; 4,000 training samples of length 40, generated
    locally), a BatchNorm-free 1-D conv net, Adam lr 3e-3, batch 128, 50 epochs.
``mnist-mlp``, ``mnist-lenet``
    real MNIST images (a fixed subset of 10,000, ``benchmarks/mnist_data.py``), the MLP and
    the LeNet-shaped conv net of the held-out regimes of ``benchmarks/flagging.py`` (same
    data, flips and training; the model's initialisation seed is this run's seed).

    python benchmarks/suggested_labels.py --regimes demo --noise 0.02 0.05 0.1
    python benchmarks/suggested_labels.py --regimes mnist-mlp mnist-lenet --seeds 4 5 \
        --out benchmarks/results/suggested_labels-mnist

Writes ``benchmarks/results/suggested_labels.json`` and ``.md`` (date, machine, commit).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flagging as flagging_bench  # noqa: E402
import mnist1d_data  # noqa: E402
from run_meta import add_force, refuse_overwrite, results_files, write_results  # noqa: E402

import csl_fast  # noqa: E402
from csl_fast.baselines.confident_learning import out_of_sample_probs  # noqa: E402
from csl_fast.train import mlp, predict, train  # noqa: E402

REGIMES = ("demo", "mnist1d-cnn", *flagging_bench.MNIST_HELD_OUT)
#: min_confidence values measured: relabel all (0), then stricter; 0.5 asks for a strict
#: majority of the presentations before the label was fitted.
THRESHOLDS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7)


def _setup(regime: str, noise: float, seed: int):
    """``(x, noisy labels, true labels, flipped mask, model factory, train kwargs)``."""
    if regime == "demo":
        from csl_fast.demo import DemoConfig, inject, load_digits

        cfg = DemoConfig(noise=noise, seed=seed)
        x, y, _ = load_digits(cfg.samples, seed)
        data = inject(x, y, noise, cfg.pairs, seed, 10)
        kw = {"epochs": cfg.epochs, "lr": cfg.lr, "batch_size": cfg.batch_size}
        kw["optimizer"] = "adam"
        hidden = (cfg.hidden, cfg.hidden)
        return (
            data["x"],
            data["y"],
            data["true_labels"],
            data["mislabeled"],
            lambda s: mlp(64, 10, hidden, seed=s),
            kw,
        )
    if regime == "mnist1d-cnn":
        x, y, _, _ = mnist1d_data.load()
        noisy, flipped = csl_fast.corrupt.flip_labels(y, noise, num_classes=10, seed=seed)

        def make(s: int) -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                return mnist1d_data.Conv1dNet()

        kw = {"epochs": 50, "lr": 3e-3, "optimizer": "adam", "batch_size": 128}
        return x, noisy, y, flipped, make, kw
    if regime in flagging_bench.MNIST_HELD_OUT:
        x, y = flagging_bench.load(regime)
        noisy, flipped = flagging_bench.corrupt_labels(regime, y, noise, seed)
        make, kw = flagging_bench.factory(regime)
        return x, noisy, y, flipped, make, kw
    raise SystemExit(f"unknown regime {regime!r}; known: {REGIMES}")


def run_one(regime: str, noise: float, seed: int, cleanlab: bool) -> dict:
    x, noisy, true, flipped, make, kw = _setup(regime, noise, seed)
    tracker = csl_fast.CSLTracker(len(noisy), 10)
    t0 = time.perf_counter()
    model = make(seed)
    train(model, x, noisy, tracker=tracker, seed=seed, **kw)
    t_train = time.perf_counter() - t0
    last = predict(model, x).argmax(1)
    label, conf = tracker.suggestions()
    f = flipped
    row = {
        "regime": regime,
        "noise": noise,
        "seed": seed,
        "n": len(noisy),
        "flipped": int(f.sum()),
        "train_fit": float((last == noisy).float().mean()),
        "flipped_fit": float((last[f] == noisy[f]).float().mean()),
        "csl_fast": float((label[f] == true[f]).float().mean()),
        "last_pred": float((last[f] == true[f]).float().mean()),
        "t_train_s": round(t_train, 1),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csl_fast.detect.DetectionWarning)
        det = csl_fast.detect.mislabeled(tracker)
    row["flagged"], row["flagged_flipped"] = int(det.flagged.sum()), int((det.flagged & f).sum())
    right = label == true
    clean = noisy == true  # the demo's conflicting duplicates carry a wrong label too
    row["sweep"] = []
    for t in THRESHOLDS:
        relabel = det.flagged & (conf >= t)  # NaN (no suggestion) compares False
        row["sweep"].append(
            {
                "min_confidence": t,
                "relabeled": int(relabel.sum()),
                "relabel_correct": int((relabel & right).sum()),
                "flipped_relabeled_right": float(
                    (relabel & right & f).sum() / max(int(f.sum()), 1)
                ),
                "clean_relabeled": int((relabel & clean).sum()),
            }
        )
    if cleanlab:
        t0 = time.perf_counter()
        probs = out_of_sample_probs(make, x, noisy, k=3, train_kwargs=kw, seed=seed)
        row["cleanlab"] = float((probs.argmax(1)[f] == true[f]).float().mean())
        row["t_cleanlab_s"] = round(time.perf_counter() - t0, 1)
    return row


def _markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Suggested labels: fraction of flipped samples whose suggestion is the true label",
        "",
        f"{meta['date']}, {meta['machine']}, commit {meta['commit']}. `{meta['command']}`",
        "",
        "| regime | noise | seed | flipped | final fit of flipped | csl_fast | last prediction "
        "| cleanlab (K=3) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cl = f"{r['cleanlab']:.3f}" if "cleanlab" in r else "-"
        lines.append(
            f"| {r['regime']} | {r['noise']:.0%} | {r['seed']} | {r['flipped']} | "
            f"{r['flipped_fit']:.2f} | **{r['csl_fast']:.3f}** | {r['last_pred']:.3f} | {cl} |"
        )
    lines += [
        "",
        "`csl_fast.clean`'s relabel-confident policy on the default rule's flagged set, by "
        "`min_confidence`, summed over seeds: relabels (right ones, accuracy), the share of "
        "all flipped samples relabelled to their true label, clean samples relabelled.",
        "",
        "| regime | noise | flagged (flipped) | min_confidence | relabels (right) | accuracy "
        "| flipped relabelled right | clean relabelled |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for regime in dict.fromkeys(r["regime"] for r in rows):
        for noise in dict.fromkeys(r["noise"] for r in rows if r["regime"] == regime):
            rs = [r for r in rows if r["regime"] == regime and r["noise"] == noise]
            flagged = sum(r["flagged"] for r in rs)
            flagged_flipped = sum(r["flagged_flipped"] for r in rs)
            for j, t in enumerate(rs[0]["sweep"]):
                n = sum(r["sweep"][j]["relabeled"] for r in rs)
                ok = sum(r["sweep"][j]["relabel_correct"] for r in rs)
                share = sum(r["sweep"][j]["flipped_relabeled_right"] for r in rs) / len(rs)
                dirty = sum(r["sweep"][j]["clean_relabeled"] for r in rs)
                lines.append(
                    f"| {regime} | {noise:.0%} | {flagged} ({flagged_flipped}) | "
                    f"{t['min_confidence']:.3g} | {n} ({ok}) | {ok / max(n, 1):.3f} | "
                    f"{share:.0%} | {dirty} |"
                )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    ap.add_argument("--noise", nargs="+", type=float, default=[0.02, 0.05, 0.10])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0])
    ap.add_argument("--no-cleanlab", action="store_true", help="skip the K-fold baseline")
    ap.add_argument(
        "--cleanlab-from",
        help="take the cleanlab figures of matching (regime, noise, seed) rows from this "
        "earlier JSON instead of retraining (they do not depend on the tracker)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "suggested_labels"))
    add_force(ap)
    args = ap.parse_args(argv)
    refuse_overwrite(ap, args.force, *results_files(args.out))
    torch.set_num_threads(args.threads)
    earlier = {}
    if args.cleanlab_from:
        for r in json.loads(Path(args.cleanlab_from).read_text())["rows"]:
            if "cleanlab" in r:
                earlier[(r["regime"], r["noise"], r["seed"])] = r
    rows = []
    for regime in args.regimes:
        for noise in args.noise:
            for seed in args.seeds:
                old = earlier.get((regime, noise, seed))
                row = run_one(regime, noise, seed, not args.no_cleanlab and old is None)
                if old is not None:
                    row["cleanlab"], row["t_cleanlab_s"] = old["cleanlab"], old["t_cleanlab_s"]
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(write_results(args.out, rows, _markdown))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
