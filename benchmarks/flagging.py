"""The no-ground-truth flagging rule and noise-count estimate, measured (issue 14, items 1-2).

For each regime, noise rate and seed: one tracked training run (the network memorizes:
no weight decay, no augmentation, long training), then :func:`csl_fast.detect.mislabeled`
with its default rule on the tracker, against the flipped-label ground truth; and
cleanlab's ``find_label_issues`` on K = 3 fold out-of-sample probabilities (a fresh model
per fold, :mod:`csl_fast.baselines.confident_learning`) on the same corrupted labels.

Regimes (all public data generated or shipped locally, no network):

``digits-mlp``
    scikit-learn's digits (1,797 samples), MLP 64-128-128-10, SGD lr 0.05 momentum 0.9,
    60 epochs (the paper reproduction's regime, ``benchmarks/paper``).
``mnist1d-cnn``
    MNIST-1D (``pip install mnist1d``; 4,000 training samples of length 40, 10 classes,
    generated locally), a small BatchNorm-free 1-D conv net, Adam lr 3e-3, 50 epochs.
    Uniform flips. Here a plain 2-component GMM on log-CSL flags nothing (the issue).
``mnist1d-mlp-pair``
    MNIST-1D with an MLP 40-256-256-10 and *pair* noise: a flipped sample of class ``c``
    gets class ``(c + 1) mod 10`` (class-conditional, structured noise, unlike the others).

Noise rates 0, 0.5, 2, 5, 10%. The rule and its constants were chosen on these three.
Held out (never looked at while choosing; they test the rule, the doubt view's constants
and the count's lower-bound warning):

``digits-mlp1-adam``
    digits with another architecture and optimiser: MLP 64-256-10, Adam lr 1e-3, batch
    64, 100 epochs.
``mnist1d-mlp``
    MNIST-1D, the MLP of ``mnist1d-mlp-pair`` with uniform flips (it does not generalise:
    no statistic ranks the flips well, the rule must say so).
``mnist1d-cnn`` at 3% and 15%
    the conv net at noise rates the rule was not tuned on.

Held out later (added after the rule was fixed; seeds 2 and 3; 0, 2, 5 and 10% flips;
networks in ``benchmarks/flagging_models.py``):

``mnist1d-poolnet-sgd``
    MNIST-1D, a conv net with max-pooling (48-48-96 channels), SGD lr 0.03 momentum 0.9,
    batch 64, 60 epochs.
``mnist1d-cnn48-adam80``
    MNIST-1D, the ``mnist1d-cnn`` net 48 channels wide, Adam lr 1e-3, batch 64, 80 epochs:
    it memorizes the flips fast (CSL's top-k precision at the true k is 0.76-0.84).
``digits-cnn2d``
    digits as 8x8 images, a 2-D conv net, Adam lr 1e-3, batch 32, 60 epochs.

Held out last (added on 2026-12-01, session 14, the rule unchanged; seeds 2 and 3):

``mnist1d-convbase``
    MNIST-1D with the conv net that ships with the benchmark and its reference training
    (``flagging_models.ConvBase1d``: three strided conv layers of 25 channels, a linear
    head; Adam lr 1e-2, batch 100, 150 epochs = the reference's 6,000 steps): what a
    user who picks up MNIST-1D as published would train. It fits every label.

Held out on real images (added on 2026-12-01, session 16, the rule unchanged; seeds 4 and
5; a fixed subset of 10,000 MNIST training images, ``benchmarks/mnist_data.py``):

``mnist-mlp``
    MNIST, MLP 784-512-512-10, Adam lr 1e-3, batch 128, 60 epochs.
``mnist-lenet``
    MNIST as 28x28 images, a LeNet-5-shaped conv net (``flagging_models.LeNetMnist``),
    Adam lr 1e-3, batch 128, 60 epochs.

More seeds (``--seeds 6 7 8 9 10 11 12 13``, ``results/flagging-mnist-seeds.md``; the
MLP's seeds 8 and 9 at every noise rate, 10-12 at 0 and 10%, and the LeNet's 6 and 7) were
trained after the doubt span's floor (``flagging.MIN_DOUBT_UNIT``), which seeds 4 and 5
led to; the MLP's 10% runs of seeds 7-9 then led to the valley settling a lower-bound
count (``flagging.settled_by_valley``), and seeds 10-12 were trained after that. The
MLP's 5% runs of seeds 4, 5 and 9 (and 10) led to raising a count without caveat to a
weaker upper mode (``flagging.WEAK_MODE``); trained after that: the MLP at 5% (seeds
11-13), 2% and 0.5% (10 and 11), the LeNet at 5% (8 and 9), and
``--regimes digits-cnn2d digits-mlp1-adam mnist1d-cnn --seeds 2 3 4 5``
(``results/flagging-later-seeds.md``: the digits conv net's seeds 4 and 5, the others'
2 and 3; the conv net's 2 and 3 repeat ``results/flagging.md``); the others' seeds 4 and
5, and every regime's 0.5% runs of seeds 2-5, were trained after the few-anchors cut
(2026-12-02).

The trained statistics are cached (``--cache``; cleanlab's K-fold baseline in its own
file), so the rule can be re-evaluated without retraining (``--no-train``); runs missing
from the cache are skipped then. ``--cleanlab-from`` takes cleanlab's figures from an
earlier results file for runs whose baseline is not cached (same seeds: same labels and
folds).

    python benchmarks/flagging.py                 # train what is missing, evaluate, write
    python benchmarks/flagging.py --regimes digits-mlp --seeds 0
    python benchmarks/flagging.py --no-train --saved ~/.cache/csl_fast/cleaning/mnist1d-*.pt

``--saved`` also evaluates trackers saved by ``benchmarks/paper/cleaning.py`` (e.g. MNIST-1D
trained 100 epochs, where no flip's mean margin is negative): the default rule, and the
margin view alone.

Writes ``benchmarks/results/flagging.json`` and ``.md`` (date, machine, commit).
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
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing

import flagging_models  # noqa: E402
import mnist1d_data  # noqa: E402
import mnist_data  # noqa: E402
from flagging_tables import TUNING, TUNING_NOISE, cell, markdown, markdown_saved  # noqa: E402
from run_meta import add_force, refuse_overwrite, results_files, run_meta, write_atomic  # noqa: E402

import csl_fast  # noqa: E402
from csl_fast import corrupt, detect, flagging  # noqa: E402
from csl_fast.baselines import confident_learning  # noqa: E402
from csl_fast.train import mlp, predict, train  # noqa: E402

RESULTS = HERE / "results"
#: regimes never looked at while choosing the rule (other architectures and optimisers)
HELD_OUT = ("digits-mlp1-adam", "mnist1d-mlp")
#: held-out regimes added after the rule was fixed (session 6), run on their own seeds
LATER_HELD_OUT = (
    "mnist1d-poolnet-sgd",
    "mnist1d-cnn48-adam80",
    "digits-cnn2d",
    "mnist1d-convbase",
)
#: held out on real MNIST (added on 2026-12-01, session 16, the rule unchanged)
MNIST_HELD_OUT = ("mnist-mlp", "mnist-lenet")
#: seeds of a regime when ``--seeds`` is not given
SEEDS = {regime: (2, 3) for regime in LATER_HELD_OUT} | {r: (4, 5) for r in MNIST_HELD_OUT}
REGIMES = TUNING + HELD_OUT + LATER_HELD_OUT + MNIST_HELD_OUT
NOISE = TUNING_NOISE
#: held-out noise rates of the harder tuning regime (the doubt view's constants, tested)
HELD_OUT_RUNS = (("mnist1d-cnn", 0.03), ("mnist1d-cnn", 0.15))
#: tracker buffers kept in the cache (everything the detection rules may read)
KEEP = (
    "csl_sum",
    "csl_count",
    "margin_sum",
    "p_true_sum",
    "p_true_sq_sum",
    "last_loss",
    "last_correct",
    "forgetting",
    "learned_epoch",
    "last_max_prob",
    "grad_norm_sum",
    "suggest_label",
    "suggest_votes",
    "suggest_hits",
)


# ------------------------------------------------------------------------------ data
def load(regime: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of a regime's training set, inputs standardised."""
    if regime.startswith("digits"):
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32)
        y = torch.tensor(d.target, dtype=torch.long)
        return (x - x.mean(0)) / (x.std(0) + 1e-3), y
    if regime in MNIST_HELD_OUT:
        x, y, _, _ = mnist_data.load()
        return x, y
    x, y, _, _ = mnist1d_data.load()
    return x, y


def corrupt_labels(regime: str, y: torch.Tensor, noise: float, seed: int):
    """``(noisy, flipped)``: uniform flips, or pair flips ``c -> c + 1`` for ``*-pair``."""
    noisy, flipped = corrupt.flip_labels(y, noise, num_classes=10, seed=seed)
    if regime.endswith("-pair"):
        noisy = torch.where(flipped, (y + 1) % 10, y)
    return noisy, flipped


def factory(regime: str):
    """``(seed -> fresh model, train kwargs)`` of a regime."""
    if regime == "digits-mlp":
        kw = {"epochs": 60, "lr": 0.05, "momentum": 0.9, "batch_size": 128}
        return (lambda s: mlp(64, 10, (128, 128), seed=s)), kw
    if regime == "mnist1d-cnn":

        def make(s: int) -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                return mnist1d_data.Conv1dNet()

        return make, {"epochs": 50, "lr": 3e-3, "optimizer": "adam", "batch_size": 128}
    if regime == "digits-mlp1-adam":
        kw = {"epochs": 100, "lr": 1e-3, "optimizer": "adam", "batch_size": 64}
        return (lambda s: mlp(64, 10, (256,), seed=s)), kw
    if regime in ("mnist1d-mlp-pair", "mnist1d-mlp"):
        kw = {"epochs": 100, "lr": 3e-3, "optimizer": "adam", "batch_size": 128}
        return (lambda s: mlp(40, 10, (256, 256), seed=s)), kw
    later = {
        "mnist1d-poolnet-sgd": (
            flagging_models.PoolNet1d,
            {"epochs": 60, "lr": 0.03, "momentum": 0.9, "batch_size": 64},
        ),
        "mnist1d-cnn48-adam80": (
            lambda: mnist1d_data.Conv1dNet(width=48),
            {"epochs": 80, "lr": 1e-3, "optimizer": "adam", "batch_size": 64},
        ),
        "digits-cnn2d": (
            flagging_models.Conv2dDigits,
            {"epochs": 60, "lr": 1e-3, "optimizer": "adam", "batch_size": 32},
        ),
        "mnist1d-convbase": (
            flagging_models.ConvBase1d,
            {"epochs": 150, "lr": 1e-2, "optimizer": "adam", "batch_size": 100},
        ),
        "mnist-mlp": (
            lambda: mlp(784, 10, (512, 512)),
            {"epochs": 60, "lr": 1e-3, "optimizer": "adam", "batch_size": 128},
        ),
        "mnist-lenet": (
            flagging_models.LeNetMnist,
            {"epochs": 60, "lr": 1e-3, "optimizer": "adam", "batch_size": 128},
        ),
    }
    if regime in later:
        net, kw = later[regime]

        def make_later(s: int) -> nn.Module:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                return net()

        return make_later, kw
    raise SystemExit(f"unknown regime {regime!r}; known: {REGIMES}")


# ------------------------------------------------------------------------------ runs
def collect(regime: str, noise: float, seed: int, cache: Path, cleanlab: bool = True) -> Path:
    """Train (tracked) on one corrupted set and cache the statistics; with ``cleanlab``,
    also run cleanlab's K-fold baseline on the same labels (cached in its own file, so
    the tracked runs can be collected first and the baseline later)."""
    path = cache / f"{regime}-{noise:g}-{seed}.npz"
    x, y = load(regime)
    noisy, flipped = corrupt_labels(regime, y, noise, seed)
    make, kw = factory(regime)
    cache.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tracker = csl_fast.CSLTracker(len(y), 10)
        t0 = time.perf_counter()
        model = make(1000 + seed)
        train(model, x, noisy, tracker=tracker, seed=seed, **kw)
        t_train = time.perf_counter() - t0
        # the regime must memorize: the final model fits the flipped labels
        fit = (predict(model, x).argmax(1) == noisy).float()
        buf = tracker.buffers()
        np.savez_compressed(
            path,
            flipped=flipped.numpy(),
            labels=noisy.numpy(),
            true_labels=y.numpy(),
            t_train=t_train,
            train_fit=float(fit.mean()),
            flipped_fit=float(fit[flipped].mean()) if flipped.any() else float("nan"),
            **{k: buf[k].cpu().numpy() for k in KEEP},
        )
        print(f"  trained {path.name}: {t_train:.1f}s tracked", flush=True)
    cl_path = _cleanlab_path(path)
    if cleanlab and not cl_path.exists():
        t0 = time.perf_counter()
        cl = confident_learning(make, x, noisy, k=3, train_kwargs=kw, seed=seed)
        t_cl = time.perf_counter() - t0
        np.savez_compressed(
            cl_path, cl_issues=cl.issues.numpy(), cl_pred_probs=cl.pred_probs.numpy(), t_cl=t_cl
        )
        print(f"  cleanlab {path.name}: {t_cl:.1f}s", flush=True)
    return path


def _cleanlab_path(path: Path) -> Path:
    return path.with_name(path.stem + "-cleanlab.npz")


def stats_of(path: Path) -> dict[str, torch.Tensor]:
    """The cached tracker buffers as a ``{name: tensor}`` mapping (``detect`` accepts it)."""
    z = np.load(path)
    return {k: torch.from_numpy(z[k]) for k in KEEP}


def tracker_of(stats: dict[str, torch.Tensor]) -> csl_fast.CSLTracker:
    """A 10-class tracker holding the cached buffers (the others zero), so ``detect`` sees
    every view the default rule uses, as on a live tracker."""
    n = stats["csl_sum"].numel()
    tracker = csl_fast.CSLTracker(n, 10)
    live = tracker.buffers()
    for k, v in stats.items():
        live[k].copy_(v.to(live[k].dtype))
    return tracker


def score_mapping(stats: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What ``csl_fast.scores(tracker, ["csl", "csl_mean", "aum"])`` returns, from the
    cached buffers (NaN where a sample was never presented)."""
    count = stats["csl_count"].double()
    seen = count > 0
    nan = torch.full_like(count, float("nan"))
    return {
        "csl": torch.where(seen, stats["csl_sum"].double(), nan),
        "csl_mean": torch.where(seen, stats["csl_sum"].double() / count, nan),
        "aum": torch.where(seen, -stats["margin_sum"].double() / count, nan),
    }


def previous_rule(csl: torch.Tensor) -> np.ndarray:
    """The rule this one replaces (csl_fast < issue 14): a 2-component Gaussian mixture
    on ``log(CSL - min + eps)``; flag posterior(upper) > 1/2 above the lower mean, and
    nothing when the upper component is not the smaller one."""
    from sklearn.mixture import GaussianMixture

    v = csl.numpy()
    z = np.log(v - v.min() + 1e-6 * max(1.0, np.abs(v).max()) + 1e-12)[:, None]
    gmm = GaussianMixture(2, random_state=0, n_init=3, reg_covar=1e-4).fit(z)
    means = gmm.means_.ravel()
    hi, lo = int(np.argmax(means)), int(np.argmin(means))
    if gmm.weights_[hi] >= gmm.weights_[lo]:
        return np.zeros(v.size, dtype=bool)
    return (gmm.predict_proba(z)[:, hi] > 0.5) & (z[:, 0] > means[lo])


def prf(flagged: np.ndarray, truth: np.ndarray) -> dict[str, float | None]:
    """Size, precision, recall and F1 of a flagged set; on a run without positives only
    the size means something (the others are None); an empty set has precision 0."""
    tp = int((flagged & truth).sum())
    nf, nt = int(flagged.sum()), int(truth.sum())
    if nt == 0:
        return {"flagged": nf, "precision": None, "recall": None, "f1": None}
    return {
        "flagged": nf,
        "precision": tp / nf if nf else 0.0,
        "recall": tp / nt,
        "f1": 2 * tp / (nf + nt),
    }


def evaluate(path: Path, prior_cleanlab: dict | None = None) -> dict:
    """Every rule on one cached run, against the flipped-label ground truth.

    ``prior_cleanlab``: cleanlab's row for this run from an earlier results file, used
    when the cache holds no cleanlab run for it (the corruption and cleanlab's folds are
    seeded: recomputed runs reproduce the earlier figures exactly)."""
    z = np.load(path)
    truth = z["flipped"].astype(bool)
    stats = stats_of(path)
    table = score_mapping(stats)
    sums = (stats["csl_sum"], stats["csl_count"], stats["p_true_sum"])
    doubted = flagging.doubted(*sums, 10).numpy()
    negative = (table["aum"] > 0).numpy()  # mean margin < 0
    # lost firmly: a negative mean margin that label_lost pins (a doubted label is firm)
    firm = flagging.label_lost(*sums, stats["margin_sum"], 10).numpy() & negative
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", detect.DetectionWarning)
        det = detect.mislabeled(tracker_of(stats), "csl")
    seconds = time.perf_counter() - t0
    flagged = det.flagged.numpy()
    k = int(truth.sum())
    est = det.estimated_count
    lo, hi = det.count_interval or (None, None)
    estimator = det.diagnostics.get("estimator", {})
    settled = estimator.get("count_source") == "valley"  # the valley rule's count flagged
    cl_path = _cleanlab_path(path)
    cl = np.load(cl_path) if cl_path.exists() else None
    row = {
        "positives": k,
        "samples": int(truth.size),
        "flipped_fit_by_final_model": float(z["flipped_fit"]),
        "csl_fast": {
            **prf(flagged, truth),
            "rule": det.rule,
            "estimated_count": est,
            "count": det.diagnostics.get("count", "estimate"),
            "count_interval": [lo, hi],
            "count_error": (est - k) / k if k and est is not None else None,
            "interval_covers": bool(lo <= k <= hi) if est is not None else None,
            "margin_negative": int(negative.sum()),
            "margin_negative_flipped": int(negative[truth].sum()),
            "label_lost": int(firm.sum()),
            "label_lost_flipped": int(firm[truth].sum()),
            "label_doubted": int(doubted.sum()),
            "label_doubted_flipped": int(doubted[truth].sum()),
            "anchors": estimator.get("label_lost"),
            # set when the count was cut to the anchors (few, stretched by the mixture)
            "mixture_count": None if settled else estimator.get("mixture_count"),
            "count_source": estimator.get("count_source", "two_view"),
            "warning": det.warning,
            "warned": len(caught) > 0,
            "seconds": seconds,
        },
        "cleanlab": (
            {**prf(cl["cl_issues"].astype(bool), truth), "source": "computed"}
            if cl is not None
            else prior_cleanlab
        ),
        "previous_gmm": prf(previous_rule(table["csl"]), truth),
        "valley_1d": prf(
            _quiet(lambda: detect.mislabeled(table["csl"], rule="valley")).flagged.numpy(), truth
        ),
        "oracle_top_k": prf(_top(table["csl"], k), truth) if k else None,
        "ranking": ranking_evidence(path, int(path.stem.rsplit("-", 1)[1])),
        "train_seconds": float(z["t_train"]),
        "cleanlab_seconds": float(cl["t_cl"]) if cl is not None else None,
    }
    return row


def _features(z) -> np.ndarray:
    """The 12 per-sample statistics of a cached run, ``[N, 12]`` (for the supervised
    ceiling of :func:`ranking_evidence`)."""
    n = z["csl_count"].astype(np.float64)
    py = z["p_true_sum"] / n
    doubt = n - z["p_true_sum"]
    return np.stack(
        [
            np.log(z["csl_sum"] / n + 1e-9),
            -z["margin_sum"] / n,
            py,
            z["suggest_hits"] / n,
            z["suggest_votes"] / n,
            np.log(doubt + 1e-3),
            np.log(z["csl_sum"] / np.maximum(doubt, 1e-6) + 1e-9),
            z["forgetting"],
            z["learned_epoch"],
            np.log(z["grad_norm_sum"] / n + 1e-9),
            z["p_true_sq_sum"] / n - py**2,
            z["last_max_prob"],
        ],
        1,
    )


def ranking_evidence(path: Path, seed: int) -> dict | None:
    """Top-k precision (k = true flips) of single statistics and of a logistic regression
    on all of them trained on the *other* seed's ground truth; and the range of k / flips
    where CSL's top-k has precision and recall >= 0.8."""
    from sklearn.linear_model import LogisticRegression

    z = np.load(path)
    truth = z["flipped"].astype(bool)
    k = int(truth.sum())
    if k == 0:
        return None
    n = z["csl_count"].astype(np.float64)

    def top(s: np.ndarray) -> float:
        return float(truth[np.argsort(-s, kind="stable")[:k]].mean())

    out = {
        "CSL": top(z["csl_sum"]),
        "-AUM": top(-z["margin_sum"] / n),
        "1 - mean p_y": top(1 - z["p_true_sum"] / n),
        "vote hits": top(z["suggest_hits"] / n),
        "CSL / doubt": top(z["csl_sum"] / np.maximum(n - z["p_true_sum"], 1e-6)),
    }
    other = path.with_name(path.name.replace(f"-{seed}.npz", f"-{1 - seed}.npz"))
    if seed in (0, 1) and other.exists():
        zo = np.load(other)
        xo, xs = _features(zo), _features(z)
        mu, sd = xo.mean(0), xo.std(0) + 1e-9
        clf = LogisticRegression(max_iter=2000).fit((xo - mu) / sd, zo["flipped"])
        out["logistic regression (supervised)"] = top(clf.decision_function((xs - mu) / sd))
    order = np.argsort(-z["csl_sum"], kind="stable")
    tp = np.cumsum(truth[order])
    ks = np.arange(1, truth.size + 1)
    ok = ks[(tp / ks >= 0.8) & (tp / k >= 0.8)]
    window = [float(ok.min() / k), float(ok.max() / k)] if ok.size else None
    return {"top_k": out, "window": window}


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        return fn()


def _top(score: torch.Tensor, k: int) -> np.ndarray:
    out = np.zeros(score.numel(), dtype=bool)
    out[torch.argsort(score, descending=True)[:k].numpy()] = True
    return out


def evaluate_saved(path: Path) -> dict:
    """The default rule on a tracker saved by ``benchmarks/paper/cleaning.py`` (its noisy
    stage: ``{"tracker": state_dict, "flipped": bool [N], ...}``), e.g. a run trained
    longer than this script's regimes; and the same tracker with the margin view only
    (``num_classes`` unset, so the doubt view is off), the rule before the doubt view."""
    saved = torch.load(path, weights_only=False)
    state = saved["tracker"]
    truth = saved["flipped"].numpy().astype(bool)
    k = int(truth.sum())
    rows = {}
    for name, classes in (("default", state["num_classes"]), ("margin_view_only", None)):
        tracker = csl_fast.CSLTracker(state["num_samples"], classes)
        tracker.load_state_dict({**state, "num_classes": classes})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", detect.DetectionWarning)
            det = detect.mislabeled(tracker, "csl")
        rows[name] = {
            **prf(det.flagged.numpy(), truth),
            "estimated_count": det.estimated_count,
            "count_interval": list(det.count_interval or (0, 0)),
            "rule": det.rule,
            "warned": len(caught) > 0,
        }
    b = state["buffers"]
    return {
        "file": path.name,
        "epochs": int(state["epoch"]),
        "positives": k,
        "samples": int(truth.size),
        "label_lost_margin": int((b["margin_sum"] < 0).sum()),
        **rows,
        "oracle_top_k": prf(_top(b["csl_sum"].double(), k), truth) if k else None,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    p.add_argument(
        "--noise",
        type=float,
        nargs="+",
        default=None,
        help=f"flip rates (default {' '.join(f'{n:g}' for n in NOISE)}, plus the held-out "
        "runs of mnist1d-cnn at 0.03 and 0.15)",
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="seeds of every regime (default: 0 1; 2 3 for the later held-out regimes)",
    )
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "csl_fast_flagging"))
    p.add_argument("--no-train", action="store_true", help="evaluate cached runs only")
    p.add_argument("--out", default=str(RESULTS / "flagging"))
    p.add_argument(
        "--cleanlab-from",
        default=None,
        help="an earlier flagging.json: cleanlab's figures for runs whose cleanlab baseline "
        "is not cached (same seeds, so the same corrupted labels and folds)",
    )
    p.add_argument(
        "--saved-from",
        default=None,
        help="an earlier flagging.json: carry its --saved rows over (labelled with their "
        "commit) when the saved trackers are not on this machine",
    )
    p.add_argument(
        "--saved",
        nargs="*",
        default=[],
        help="trackers saved by benchmarks/paper/cleaning.py (its --cache) to evaluate too",
    )
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, *results_files(args.out))
    torch.set_num_threads(1)
    cache = Path(args.cache)
    prior: dict = {}
    if args.cleanlab_from:
        doc = json.loads(Path(args.cleanlab_from).read_text())
        source = f"{Path(args.cleanlab_from).name} at commit {doc['commit']}"
        for r in doc["runs"]:
            if r.get("cleanlab"):
                prior[r["regime"], r["noise"], r["seed"]] = {
                    **r["cleanlab"],
                    "source": (
                        source
                        if r["cleanlab"].get("source", "computed") == "computed"
                        else r["cleanlab"]["source"]
                    ),
                }
    runs = []
    plan = [(r, n) for r in args.regimes for n in args.noise or NOISE]
    if args.noise is None:  # (a --noise given had the held-out rates trained too)
        plan += [(r, n) for r, n in HELD_OUT_RUNS if r in args.regimes and (r, n) not in plan]
    missing = []
    for regime, noise in plan:
        for seed in args.seeds or SEEDS.get(regime, (0, 1)):
            path = cache / f"{regime}-{noise:g}-{seed}.npz"
            if args.no_train and not path.exists():
                missing.append(path.name)
                continue
            if not args.no_train:
                collect(regime, noise, seed, cache)
            row = {
                "regime": regime,
                "noise": noise,
                "seed": seed,
                **evaluate(path, prior.get((regime, noise, seed))),
            }
            runs.append(row)
            c = row["csl_fast"]
            cl = row["cleanlab"] or {"flagged": "-", "f1": None}
            print(
                f"{regime} {noise:.1%} seed {seed}: flagged {c['flagged']} "
                f"P {cell(c['precision'])} R {cell(c['recall'])} F1 {cell(c['f1'])} "
                f"est {c['estimated_count']} {c['count_interval']} (truth {row['positives']})"
                f" | cleanlab flagged {cl['flagged']} F1 {cell(cl['f1'])}",
                flush=True,
            )
    if missing:
        print(f"--no-train: {len(missing)} run(s) not cached in {cache}, left out", flush=True)
    if args.no_train and not runs and not args.saved:
        # (an empty results file replaced the committed one, with exit status 0)
        raise SystemExit(f"flagging.py: no cached run under {cache}; nothing written")
    meta = {**run_meta(), "command": " ".join(["python benchmarks/flagging.py", *sys.argv[1:]])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = [evaluate_saved(Path(f)) for f in args.saved]
    if not saved and args.saved_from:
        doc = json.loads(Path(args.saved_from).read_text())
        note = f"{Path(args.saved_from).name} at commit {doc['commit']}"
        saved = [{**r, "source": r.get("source", note)} for r in doc.get("saved", [])]
    for r in saved:
        d = r["default"]
        print(f"{r['file']}: flagged {d['flagged']} P {cell(d['precision'])} R {cell(d['recall'])}")
    doc = {**meta, "runs": runs, "saved": saved}
    write_atomic(out.with_suffix(".json"), json.dumps(doc, indent=1) + "\n")
    write_atomic(
        out.with_suffix(".md"), markdown(runs, meta) + (markdown_saved(saved) if saved else "")
    )
    print(f"wrote {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
