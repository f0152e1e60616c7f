"""The default flagging rule on long-tailed classes, and on small data.

One tracked training per row, uniformly flipped labels (``csl_fast.corrupt.flip_labels``),
then ``csl_fast.detect.mislabeled(tracker)`` with its default rule, ``csl_fast.clean``'s
suggested labels, CSL's precision at the true count (top-k: the ranking's ceiling) and,
with ``--cleanlab``, cleanlab's ``find_label_issues`` on K = 3 fold out-of-sample
probabilities of the same network (``csl_fast.baselines.confident_learning``). Every
network is an MLP 256-256, Adam 1e-3, batch 64, 60 epochs by default (it fits every clean
label).

Setups (the data fixed by ``random_state`` 0; the flips and the network vary by seed):

``digits-lt``
    scikit-learn's ``load_digits``, class ``c`` keeping a share ``15 ** (-c / 9)`` of its
    samples (178 down to 12 per class, N = 658): long-tailed and small.
``digits-bal``
    the same N drawn evenly from every class: small, not long-tailed (the control).
``mkc-lt``, ``mkc-bal``
    ``make_classification``, 4,000 samples, 10 classes, 20 features (10 informative),
    ``class_sep`` 2, one cluster per class; class weights ``15 ** (-c / 9)`` (1,094 down
    to 72 samples) or equal.
``mkc-lt-s15``, ``mkc-bal-s15``
    the same at ``class_sep`` 1.5 (overlapping classes).

Per run the clean samples flagged are also split by class size: the three largest
classes (head) against the three smallest (tail), and the recall of the flips whose
*true* class is a tail class (the network barely predicts a rare class, so such a flip
is fitted fast).

    python benchmarks/flagging_imbalance.py --cleanlab          # ~30 min on 2 cores
    python benchmarks/flagging_imbalance.py --setups digits-lt --seeds 0 --out /tmp/x

``--train EPOCHS:LR ...`` runs other trainings (the tracked network's and cleanlab's folds'
alike): what the detection warning advises when a small data set is fitted within a few
epochs (``results/flagging-small-data.md``)::

    python benchmarks/flagging_imbalance.py --setups digits-bal digits-lt --cleanlab \
        --train 60:1e-3 20:1e-3 60:3e-4 60:1e-4 --out benchmarks/results/flagging-small-data.md
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
sys.path.insert(0, str(HERE))

from run_meta import add_force, refuse_overwrite, results_files, write_results  # noqa: E402

import csl_fast  # noqa: E402
from csl_fast import corrupt, detect  # noqa: E402
from csl_fast.train import mlp, train  # noqa: E402

SETUPS = ("digits-lt", "digits-bal", "mkc-lt", "mkc-bal", "mkc-lt-s15", "mkc-bal-s15")
NOISE = (0.0, 0.005, 0.02, 0.05, 0.1)
CLASSES = 10
RATIO = 15.0  # largest class / smallest
HEAD, TAIL = (0, 1, 2), (7, 8, 9)  # classes by size, largest first
TRAIN = {"epochs": 60, "lr": 1e-3, "optimizer": "adam", "batch_size": 64}
OUT = HERE / "results" / "flagging-imbalance"


def shares(long_tailed: bool) -> np.ndarray:
    """Each class's share of its samples kept (digits) or its weight (make_classification)."""
    if not long_tailed:
        return np.ones(CLASSES)
    return RATIO ** (-np.arange(CLASSES) / (CLASSES - 1))


def standardise(x: np.ndarray) -> torch.Tensor:
    return torch.tensor((x - x.mean(0)) / (x.std(0) + 1e-3), dtype=torch.float32)


def load(setup: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn import datasets

    long_tailed = "-lt" in setup
    if setup.startswith("digits"):
        d = datasets.load_digits()
        keep_share = shares(True)
        if not long_tailed:  # the long-tailed set's size, drawn evenly
            n = sum(round(s * (d.target == c).sum()) for c, s in enumerate(keep_share))
            keep_share = np.full(CLASSES, n / d.target.size)
        rng = np.random.RandomState(0)
        keep = []
        for c, s in enumerate(keep_share):
            idx = rng.permutation(np.flatnonzero(d.target == c))
            keep.append(idx[: max(1, round(s * idx.size))])
        keep = np.sort(np.concatenate(keep))
        return standardise(d.data[keep].astype(np.float64)), torch.tensor(d.target[keep])
    w = shares(long_tailed)
    x, y = datasets.make_classification(
        n_samples=4000, n_features=20, n_informative=10, n_redundant=0, n_classes=CLASSES,
        n_clusters_per_class=1, weights=list(w / w.sum()), flip_y=0.0,
        class_sep=1.5 if setup.endswith("-s15") else 2.0, random_state=0,
    )  # fmt: skip
    return standardise(x), torch.tensor(y)


def _prf(flagged: np.ndarray, truth: np.ndarray) -> dict:
    tp, nf, nt = int((flagged & truth).sum()), int(flagged.sum()), int(truth.sum())
    return {
        "flagged": nf,
        "precision": tp / nf if nf else None,
        "recall": tp / nt if nt else None,
        "f1": 2 * tp / (nf + nt) if nt else None,
    }


def one_run(setup: str, noise: float, seed: int, cleanlab: bool, kw: dict) -> dict:
    x, y = load(setup)
    noisy, flipped = corrupt.flip_labels(y, noise, num_classes=CLASSES, seed=seed)
    tracker = csl_fast.CSLTracker(len(y), CLASSES)
    t0 = time.perf_counter()
    train(mlp(x.shape[1], CLASSES, (256, 256), seed=1000 + seed), x, noisy, tracker=tracker,
          seed=seed, **kw)  # fmt: skip
    seconds = time.perf_counter() - t0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", detect.DetectionWarning)
        det = detect.mislabeled(tracker)
    warned = [str(w.message) for w in caught if issubclass(w.category, detect.DetectionWarning)]
    truth, flagged = flipped.numpy().astype(bool), det.flagged.numpy().astype(bool)
    y_np, given = y.numpy(), noisy.numpy()
    k = int(truth.sum())
    order = np.argsort(-tracker.csl_sum.double().numpy(), kind="stable")
    suggested = tracker.suggestions()[0].numpy()
    tail_flips = truth & np.isin(y_np, TAIL)
    row = {
        "setup": setup,
        "noise": noise,
        "seed": seed,
        "train": kw,
        "samples": len(y),
        "flips": k,
        **_prf(flagged, truth),
        "estimated": det.estimated_count,
        "interval": list(det.count_interval) if det.count_interval else None,
        "count": det.diagnostics.get("count"),
        "warned": bool(warned),
        "warning": warned[0] if warned else None,
        "top_k_precision": float(truth[order[:k]].mean()) if k else None,
        "suggestion_right": float((suggested[truth] == y_np[truth]).mean()) if k else None,
        "clean_flagged_head": int((flagged & ~truth & np.isin(given, HEAD)).sum()),
        "clean_head": int((~truth & np.isin(given, HEAD)).sum()),
        "clean_flagged_tail": int((flagged & ~truth & np.isin(given, TAIL)).sum()),
        "clean_tail": int((~truth & np.isin(given, TAIL)).sum()),
        "tail_flips": int(tail_flips.sum()),
        "tail_flips_flagged": int((tail_flips & flagged).sum()),
        "seconds": seconds,
    }
    if cleanlab:
        from csl_fast.baselines import confident_learning

        make = lambda s: mlp(x.shape[1], CLASSES, (256, 256), seed=s)  # noqa: E731
        issues = confident_learning(make, x, noisy, k=3, train_kwargs=kw, seed=seed).issues
        row["cleanlab"] = _prf(issues.numpy().astype(bool), truth)
    return row


def _f(v, fmt=".2f") -> str:
    return "-" if v is None else format(v, fmt)


def _name(row: dict) -> str:
    """setup-noise-seed, with the training when it is not the default."""
    kw = row.get("train", TRAIN)
    name = f"{row['setup']}-{row['noise']:g}-{row['seed']}"
    return name if kw == TRAIN else f"{name}, {kw['epochs']} ep, lr {kw['lr']:g}"


def _training_key(row: dict) -> tuple:
    """The row's training as a sortable, hashable key (rows of before --train: TRAIN)."""
    return tuple(sorted(row.get("train", TRAIN).items()))


def _training(rows: list[dict]) -> str:
    kws = {_training_key(r) for r in rows}
    return "; ".join(
        "Adam lr {lr:g}, batch {batch_size}, {epochs} epochs".format(**dict(kw))
        for kw in sorted(kws)
    )


def _summary(rows: list[dict]) -> list[str]:
    """Per training: noisy runs (2-10% flips) passing precision and recall >= 0.8, those
    flagging nothing, mean F1 against cleanlab's at each rate, and the clean runs' flags."""
    lines = [
        "",
        "| training | P and R >= 0.8 at 2-10% | nothing flagged at 2-10% | mean F1 at 2 / 5 / 10% "
        "(cleanlab) | flagged at 0% (most) | flagged at 0.5% (truth 3) |",
        "|---|---|---|---|---|---|",
    ]
    for kw in sorted({_training_key(r) for r in rows}):
        mine = [r for r in rows if _training_key(r) == kw]
        noisy = [r for r in mine if r["noise"] >= 0.02]
        passed = sum(
            r["precision"] is not None and r["precision"] >= 0.8 and r["recall"] >= 0.8
            for r in noisy
        )
        empty = sum(r["flagged"] == 0 for r in noisy)
        f1 = []
        for rate in (0.02, 0.05, 0.1):
            at = [r for r in mine if r["noise"] == rate]
            ours = np.mean([r["f1"] for r in at]) if at else None
            theirs = [r["cleanlab"]["f1"] for r in at if r.get("cleanlab")]
            f1.append(f"{_f(ours)} ({_f(np.mean(theirs)) if theirs else '-'})")
        clean = [r["flagged"] for r in mine if r["noise"] == 0]
        small = [str(r["flagged"]) for r in mine if r["noise"] == 0.005]
        k = dict(kw)
        lines.append(
            f"| {k['epochs']} epochs, lr {k['lr']:g} | {passed} of {len(noisy)} | {empty} | "
            f"{' / '.join(f1)} | {max(clean) if clean else '-'} | {', '.join(small) or '-'} |"
        )
    return lines


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# The default flagging rule on long-tailed classes, and on small data",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. `{meta['command']}` "
        f"(see its docstring for the setups; training: {_training(rows)}). One tracked run "
        "per row, "
        "`csl_fast.detect.mislabeled(tracker)` with its default rule; P / R of the flagged "
        "set against the flipped labels; top-k P: CSL's precision at the true count; "
        "sugg.: the share of flipped samples whose suggested label is their true one; "
        "clean flagged head / tail: clean samples flagged among the three largest / three "
        "smallest classes' clean samples; tail flips: flips whose true class is one of the "
        "three smallest, flagged / all.",
        "",
        "| run | N | flips | flagged | P | R | est. [interval] | warned | top-k P | sugg. | "
        "clean flagged head / tail | tail flips | cleanlab F1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        est = "unknown" if r["estimated"] is None else f"{r['estimated']} {r['interval']}"
        cl = r.get("cleanlab")
        lines.append(
            f"| {_name(r)} | {r['samples']} | {r['flips']} | "
            f"{r['flagged']} | {_f(r['precision'])} | {_f(r['recall'])} | {est} | "
            f"{'yes' if r['warned'] else 'no'} | {_f(r['top_k_precision'])} | "
            f"{_f(r['suggestion_right'])} | {r['clean_flagged_head']}/{r['clean_head']} / "
            f"{r['clean_flagged_tail']}/{r['clean_tail']} | "
            f"{r['tail_flips_flagged']}/{r['tail_flips']} | "
            f"{_f(cl['f1']) if cl else '-'} |"
        )
    if len({_training_key(r) for r in rows}) > 1:
        lines += _summary(rows)
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    p.add_argument("--noise", nargs="+", type=float, default=list(NOISE))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--cleanlab", action="store_true", help="cleanlab's K = 3 fold baseline too")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--train",
        nargs="+",
        default=[f"{TRAIN['epochs']}:{TRAIN['lr']:g}"],
        metavar="EPOCHS:LR",
        help="trainings to run, each as epochs:Adam learning rate (default %(default)s)",
    )
    p.add_argument("--out", default=str(OUT), help="writes OUT.md and OUT.json")
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, *results_files(args.out))
    torch.set_num_threads(args.threads)
    trainings = []
    for spec in args.train:
        epochs, _, lr = spec.partition(":")
        trainings.append({**TRAIN, "epochs": int(epochs), "lr": float(lr)})
    rows = []
    for kw, setup, noise, seed in itertools.product(trainings, args.setups, args.noise, args.seeds):
        r = one_run(setup, noise, seed, args.cleanlab, kw)
        rows.append(r)
        print(
            f"{_name(r)}: flips {r['flips']} flagged {r['flagged']} "
            f"P {_f(r['precision'])} R {_f(r['recall'])} est {r['estimated']} "
            f"warned {r['warned']} top-k {_f(r['top_k_precision'])} "
            f"{r['seconds']:.1f}s",
            flush=True,
        )
    print(write_results(args.out, rows, markdown))


if __name__ == "__main__":
    main()
