"""The default flagging rule under common training practice, measured (issue 14; held out).

``benchmarks/flagging.py`` trains without augmentation or regularisation, so that every
label, flipped or not, is fitted in the end. Real training runs rarely look like that.
This script trains the two conv nets of ``benchmarks/flagging.py`` (digits as 8x8 images,
``digits-cnn2d``; MNIST-1D, ``mnist1d-cnn``) with the usual additions, each alone and all
together, and measures :func:`csl_fast.detect.mislabeled` on the tracker against the
flipped labels (uniform flips, 0 / 2 / 5 / 10%, seeds 0 and 1):

``aug``
    data augmentation, a fresh draw per batch: digits shifted by up to one pixel (zero
    padding), MNIST-1D rolled by up to 2 positions with Gaussian noise of sd 0.05. The
    network never sees a sample twice, so it fits hard clean samples late or never, and
    flipped labels are rarely memorized.
``wd``
    AdamW with weight decay 5e-4 and a cosine learning-rate schedule.
``ls``
    label smoothing 0.1 in the training loss (CSL records the plain cross entropy).
``ls2``
    label smoothing 0.2 (a smoothed network keeps a flipped label's probability high while
    it doubts it, so few flips lose firmly: the limit of :func:`csl_fast.flagging.label_lost`).
``all``
    the three together.

Held out (``--data mnist1d-pool``): the pooling conv net of ``benchmarks/flagging.py``
(``mnist1d-poolnet-sgd``: SGD lr 0.03, momentum 0.9, batch 64, 60 epochs, seeds 2 and 3)
with ``aug`` and ``all`` (run after ``LOST_PROB`` was chosen on the runs above), and with
``ls``, ``ls2`` and ``wd`` (run after the count's cut to a handful of anchors was chosen).

Per row: the flagged count, its precision and recall, the estimate and interval, whether
the rule warned, the samples it pins as bad (:func:`csl_fast.flagging.label_lost`: flips /
clean), CSL's top-k precision at the true k, the share of labels fitted at the last
presentation, and, for comparison, the flagged set when every sample with a negative mean
margin is pinned (the rule before ``label_lost`` asked for a firm loss): its size, P, R.

    python benchmarks/flagging_practice.py     # ~12 min on one core; results/flagging-practice.*
    python benchmarks/flagging_practice.py --data mnist1d-pool --variants aug all ls ls2 wd \
        --name flagging-practice-held-out      # ~13 min; results/flagging-practice-held-out.*
    python benchmarks/flagging_practice.py --data mnist1d --variants aug --out /tmp/x

Trained runs are cached (``--cache``, default ``~/.cache/csl_fast_practice``: the tracker
file of each run and its flips), so the rule can be measured again without training.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from flagging import corrupt_labels, factory, load
from flagging_tables import cell
from run_meta import add_force, refuse_overwrite, results_files, write_results
from tqdm import tqdm

# this checkout's csl_fast, not an installed one (the results are stamped with its commit)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import csl_fast
from csl_fast import detect, flagging

RESULTS = Path(__file__).resolve().parent / "results"
DATA = {"digits": "digits-cnn2d", "mnist1d": "mnist1d-cnn", "mnist1d-pool": "mnist1d-poolnet-sgd"}
EPOCHS = {"digits": 60, "mnist1d": 50, "mnist1d-pool": 60}
#: the data sets of the default run (``mnist1d-pool`` is the held-out check, ``--data``)
DEFAULT_DATA = ["digits", "mnist1d"]
VARIANTS = ("aug", "wd", "ls", "ls2", "all")
NOISE = (0.0, 0.02, 0.05, 0.1)
SEEDS = {"mnist1d-pool": (2, 3)}  # its regime's seeds in benchmarks/flagging.py; else 0, 1


def augment(x: torch.Tensor, regime: str, g: torch.Generator) -> torch.Tensor:
    """One random draw of the augmentation for the whole batch."""
    if regime.startswith("digits"):
        img = F.pad(x.view(-1, 1, 8, 8), (1, 1, 1, 1))
        dx, dy = torch.randint(0, 3, (2,), generator=g).tolist()
        return img[:, :, dy : dy + 8, dx : dx + 8].reshape(x.shape)
    shift = int(torch.randint(-2, 3, (1,), generator=g))
    return torch.roll(x, shift, dims=-1) + 0.05 * torch.randn(x.shape, generator=g)


def train_tracked(data: str, variant: str, noise: float, seed: int):
    regime = DATA[data]
    x, y = load(regime)
    noisy, flipped = corrupt_labels(regime, y, noise, seed)
    make, kw = factory(regime)
    model = make(1000 + seed)
    epochs = EPOCHS[data]
    decay = 5e-4 if variant in ("wd", "all") else 0.0
    if kw.get("optimizer") == "adam":
        opt = (torch.optim.AdamW if decay else torch.optim.Adam)(
            model.parameters(), lr=kw["lr"], **({"weight_decay": decay} if decay else {})
        )
    else:  # the regime's SGD with momentum
        opt = torch.optim.SGD(
            model.parameters(), lr=kw["lr"], momentum=kw["momentum"], weight_decay=decay
        )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs) if decay else None
    smoothing = {"ls": 0.1, "ls2": 0.2, "all": 0.1}.get(variant, 0.0)
    g = torch.Generator().manual_seed(seed)
    tracker = csl_fast.CSLTracker(len(y), 10)
    for _ in range(epochs):
        for b in torch.randperm(len(y), generator=g).split(kw["batch_size"]):
            xb = augment(x[b], DATA[data], g) if variant in ("aug", "all") else x[b]
            loss = csl_fast.accumulate(model(xb), noisy[b], b, tracker, label_smoothing=smoothing)
            loss.backward()
            opt.step()
            opt.zero_grad()
        if sched is not None:
            sched.step()
        tracker.end_epoch()
    return tracker, flipped.numpy()


def _pr(flagged: np.ndarray, truth: np.ndarray) -> tuple[float | None, float | None]:
    hits = int((flagged & truth).sum())
    return (
        hits / flagged.sum() if flagged.any() else None,
        hits / truth.sum() if truth.any() else None,
    )


def margin_alone(tracker: csl_fast.CSLTracker, order: np.ndarray) -> np.ndarray:
    """The flagged set when every negative mean margin is pinned (and every doubted label)."""
    t = tracker
    lost = ((t.margin_sum < 0) & (t.csl_count > 0)) | flagging.doubted(
        t.csl_sum, t.csl_count, t.p_true_sum, 10
    )
    est = flagging.two_view_count(t.csl_mean, lost)
    flagged = np.zeros(len(order), dtype=bool)
    flagged[order[: est.count if est.found else 0]] = True
    return flagged


def tracked(data: str, variant: str, noise: float, seed: int, cache: Path | None):
    """``(tracker, flipped, training seconds)``: from ``cache`` when the run is there (the
    tracker file and the flips beside it), else trained (and saved there)."""
    path = None if cache is None else cache / f"{data}-{variant}-{noise:g}-{seed}.pt"
    if path is not None and path.exists():
        saved = np.load(path.with_suffix(".npz"))
        tracker = csl_fast.CSLTracker(len(saved["flipped"]), 10)
        tracker.load(path)
        return tracker, saved["flipped"], float(saved["seconds"])
    start = time.perf_counter()
    tracker, truth = train_tracked(data, variant, noise, seed)
    seconds = time.perf_counter() - start
    if path is not None:
        cache.mkdir(parents=True, exist_ok=True)
        np.savez(path.with_suffix(".npz"), flipped=truth, seconds=seconds)
        tracker.save(path)
    return tracker, truth, seconds


def measure(data: str, variant: str, noise: float, seed: int, cache: Path | None) -> dict:
    tracker, truth, seconds = tracked(data, variant, noise, seed, cache)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = detect.mislabeled(tracker)
    flagged = det.flagged.numpy()
    p, r = _pr(flagged, truth)
    t = tracker
    pinned = flagging.label_lost(t.csl_sum, t.csl_count, t.p_true_sum, t.margin_sum, 10).numpy()
    order = det.ranking.numpy()
    old = margin_alone(tracker, order)
    old_p, old_r = _pr(old, truth)
    k = int(truth.sum())
    return {
        "run": f"{data}-{variant}-{noise:g}-{seed}",
        "data": data,
        "variant": variant,
        "noise": noise,
        "seed": seed,
        "samples": len(truth),
        "flips": k,
        "flagged": int(flagged.sum()),
        "precision": p,
        "recall": r,
        "estimated": det.estimated_count,
        "interval": list(det.count_interval) if det.count_interval is not None else None,
        "warned": any(issubclass(w.category, detect.DetectionWarning) for w in caught),
        "pinned_flips": int((pinned & truth).sum()),
        "pinned_clean": int((pinned & ~truth).sum()),
        "topk_precision": float(truth[order[:k]].mean()) if k else None,
        "fitted": float(tracker.last_correct.float().mean()),
        "margin_alone_flagged": int(old.sum()),
        "margin_alone_precision": old_p,
        "margin_alone_recall": old_r,
        "train_seconds": round(seconds, 1),
    }


def report(rows: list[dict], meta: dict, command: str) -> str:
    noisy = [r for r in rows if r["flips"]]
    passed = sum((r["precision"] or 0) >= 0.8 and (r["recall"] or 0) >= 0.8 for r in noisy)
    old = sum(
        (r["margin_alone_precision"] or 0) >= 0.8 and (r["margin_alone_recall"] or 0) >= 0.8
        for r in noisy
    )
    clean = [r for r in rows if not r["flips"]]
    lines = [
        "# The default flagging rule under common training practice",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. `{command}` "
        "(see its docstring for the variants). One tracked run per row, "
        "`csl_fast.detect.mislabeled(tracker)` with its default rule; P / R of the flagged "
        "set against the flipped labels; pinned: `csl_fast.flagging.label_lost` (flips / "
        "clean); top-k P: CSL's precision at the true k; fitted: the share of labels right "
        "at their last presentation; margin alone: the flagged set when every negative "
        "mean margin is pinned (the rule before `label_lost`).",
        "",
        f"Noisy runs with P and R >= 0.8: {passed} of {len(noisy)} (margin alone: {old}). "
        "Clean runs: flagged "
        + ", ".join(f"{r['flagged']} ({r['run']})" for r in clean)
        + " of "
        + ", ".join(sorted({str(r["samples"]) for r in clean}))
        + " samples; margin alone "
        + ", ".join(str(r["margin_alone_flagged"]) for r in clean)
        + ".",
        "",
        "| run | flips | flagged | P | R | est. [interval] | warned | pinned flips / clean "
        "| top-k P | fitted | margin alone: flagged, P, R |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        est = "unknown" if r["estimated"] is None else f"{r['estimated']} {r['interval']}"
        lines.append(
            f"| {r['run']} | {r['flips']} | {r['flagged']} | {cell(r['precision'])} | "
            f"{cell(r['recall'])} | {est} | {'yes' if r['warned'] else 'no'} | "
            f"{r['pinned_flips']} / {r['pinned_clean']} | {cell(r['topk_precision'])} | "
            f"{r['fitted']:.3f} | {r['margin_alone_flagged']}, "
            f"{cell(r['margin_alone_precision'])}, {cell(r['margin_alone_recall'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", choices=sorted(DATA), default=DEFAULT_DATA)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the results")
    parser.add_argument("--name", default="flagging-practice", help="results file name")
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path.home() / ".cache" / "csl_fast_practice",
        help="trained runs are kept here (tracker files), and read back instead of "
        "training again; --no-cache trains every run",
    )
    parser.add_argument("--no-cache", action="store_true")
    parser.add_argument(
        "--seeds", nargs="+", type=int, help="seeds of each run (default: 0 1; mnist1d-pool: 2 3)"
    )
    add_force(parser)
    args = parser.parse_args()
    refuse_overwrite(parser, args.force, *results_files(args.out / args.name))
    torch.set_num_threads(1)
    runs = [
        (d, v, p, s)
        for d in args.data
        for v in args.variants
        for s in args.seeds or SEEDS.get(d, (0, 1))
        for p in NOISE
    ]
    cache = None if args.no_cache else args.cache
    rows = [measure(*r, cache) for r in tqdm(runs, desc="runs")]
    command = "python benchmarks/flagging_practice.py"
    if args.data != DEFAULT_DATA:
        command += f" --data {' '.join(args.data)}"
    if args.variants != list(VARIANTS):
        command += f" --variants {' '.join(args.variants)}"
    if args.seeds:
        command += f" --seeds {' '.join(map(str, args.seeds))}"
    if args.name != "flagging-practice":
        command += f" --name {args.name}"
    print(write_results(args.out / args.name, rows, lambda rows, meta: report(rows, meta, command)))


if __name__ == "__main__":
    main()
