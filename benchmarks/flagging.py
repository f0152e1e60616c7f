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

Noise rates 0, 0.5, 2, 5, 10%. The trained statistics are cached (``--cache``), so the
rule can be re-evaluated without retraining (``--no-train``).

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

import mnist1d_data  # noqa: E402
from run_meta import run_meta  # noqa: E402

import csl_fast  # noqa: E402
from csl_fast import corrupt, detect, flagging  # noqa: E402
from csl_fast.baselines import confident_learning  # noqa: E402
from csl_fast.train import mlp, predict, train  # noqa: E402

RESULTS = HERE / "results"
REGIMES = ("digits-mlp", "mnist1d-cnn", "mnist1d-mlp-pair")
NOISE = (0.0, 0.005, 0.02, 0.05, 0.10)
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
    if regime == "mnist1d-mlp-pair":
        kw = {"epochs": 100, "lr": 3e-3, "optimizer": "adam", "batch_size": 128}
        return (lambda s: mlp(40, 10, (256, 256), seed=s)), kw
    raise SystemExit(f"unknown regime {regime!r}; known: {REGIMES}")


# ------------------------------------------------------------------------------ runs
def collect(regime: str, noise: float, seed: int, cache: Path) -> Path:
    """Train (tracked) and run cleanlab on one corrupted set; cache the statistics."""
    path = cache / f"{regime}-{noise:g}-{seed}.npz"
    if path.exists():
        return path
    x, y = load(regime)
    noisy, flipped = corrupt_labels(regime, y, noise, seed)
    make, kw = factory(regime)
    tracker = csl_fast.CSLTracker(len(y), 10)
    t0 = time.perf_counter()
    model = make(1000 + seed)
    train(model, x, noisy, tracker=tracker, seed=seed, **kw)
    t_train = time.perf_counter() - t0
    # the regime must memorize: the final model fits the flipped labels
    fit = (predict(model, x).argmax(1) == noisy).float()
    t0 = time.perf_counter()
    cl = confident_learning(make, x, noisy, k=3, train_kwargs=kw, seed=seed)
    t_cl = time.perf_counter() - t0
    buf = tracker.buffers()
    cache.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path,
        flipped=flipped.numpy(),
        labels=noisy.numpy(),
        true_labels=y.numpy(),
        cl_issues=cl.issues.numpy(),
        cl_pred_probs=cl.pred_probs.numpy(),
        t_train=t_train,
        t_cl=t_cl,
        train_fit=float(fit.mean()),
        flipped_fit=float(fit[flipped].mean()) if flipped.any() else float("nan"),
        **{k: buf[k].cpu().numpy() for k in KEEP},
    )
    print(f"  trained {path.name}: {t_train:.1f}s tracked, {t_cl:.1f}s cleanlab", flush=True)
    return path


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


def _f(x: float | None, fmt: str = ".2f") -> str:
    return "-" if x is None else format(x, fmt)


def _mean(rows: list[dict], key: str, field: str) -> float | None:
    vals = [r[key][field] for r in rows if r[key][field] is not None]
    return sum(vals) / len(vals) if vals else None


def evaluate(path: Path) -> dict:
    """Every rule on one cached run, against the flipped-label ground truth."""
    z = np.load(path)
    truth = z["flipped"].astype(bool)
    stats = stats_of(path)
    table = score_mapping(stats)
    doubted = flagging.doubted(
        stats["csl_sum"], stats["csl_count"], stats["p_true_sum"], 10
    ).numpy()
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", detect.DetectionWarning)
        det = detect.mislabeled(tracker_of(stats), "csl")
    seconds = time.perf_counter() - t0
    flagged = det.flagged.numpy()
    k = int(truth.sum())
    lo, hi = det.count_interval or (0, 0)
    row = {
        "positives": k,
        "samples": int(truth.size),
        "flipped_fit_by_final_model": float(z["flipped_fit"]),
        "csl_fast": {
            **prf(flagged, truth),
            "rule": det.rule,
            "estimated_count": det.estimated_count,
            "count_interval": [lo, hi],
            "count_error": (det.estimated_count - k) / k if k else None,
            "interval_covers": bool(lo <= k <= hi),
            "label_lost": int((table["aum"] > 0).sum()),
            "label_doubted": int(doubted.sum()),
            "label_doubted_flipped": int(doubted[truth].sum()),
            "warning": det.warning,
            "warned": len(caught) > 0,
            "seconds": seconds,
        },
        "cleanlab": prf(z["cl_issues"].astype(bool), truth),
        "previous_gmm": prf(previous_rule(table["csl"]), truth),
        "valley_1d": prf(
            _quiet(lambda: detect.mislabeled(table["csl"], rule="valley")).flagged.numpy(), truth
        ),
        "oracle_top_k": prf(_top(table["csl"], k), truth) if k else None,
        "train_seconds": float(z["t_train"]),
        "cleanlab_seconds": float(z["t_cl"]),
    }
    return row


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


def markdown_saved(rows: list[dict]) -> str:
    lines = [
        "",
        "## Saved trackers trained longer (`--saved`)",
        "",
        "Trackers saved by `benchmarks/paper/cleaning.py` (noisy stage). The default rule, and "
        "the same tracker with the margin view only (the rule before the doubt view of "
        "`csl_fast.flagging.doubted`).",
        "",
        "| file | epochs | flips | margin-lost | flagged | P | R | F1 | est. count [interval] "
        "| margin view only: flagged / F1 | top-k P=R |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d, m = r["default"], r["margin_view_only"]
        lo, hi = d["count_interval"]
        top = _f(r["oracle_top_k"]["precision"]) if r["oracle_top_k"] else "-"
        lines.append(
            f"| {r['file']} | {r['epochs']} | {r['positives']} | {r['label_lost_margin']} "
            f"| {d['flagged']} | {_f(d['precision'])} | {_f(d['recall'])} | {_f(d['f1'])} "
            f"| {d['estimated_count']} [{lo}, {hi}] | {m['flagged']} / {_f(m['f1'])} | {top} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------- report


def markdown(runs: list[dict], meta: dict) -> str:
    lines = [
        "# No-ground-truth flagging: csl_fast's default rule vs cleanlab",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. "
        "`python benchmarks/flagging.py` (see its docstring for the regimes). Per run: "
        "precision / recall / F1 of the flagged set against the flipped labels; the estimated "
        "count with its interval; cleanlab's `find_label_issues` on K = 3 fold out-of-sample "
        "probabilities (fresh model per fold) on the same labels; the previous rule "
        "(2-component GMM on log-CSL); the 1-D valley rule alone (what a plain score tensor "
        "gets); CSL's top-k at the true k (the ceiling of any count-based rule).",
        "",
        "| regime | noise | seed | flips | flagged | P | R | F1 | est. count [interval] "
        "| cleanlab flagged | P | R | F1 | previous GMM flagged / F1 | valley F1 "
        "| top-k P=R |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        c, cl, g = r["csl_fast"], r["cleanlab"], r["previous_gmm"]
        top = _f(r["oracle_top_k"]["precision"]) if r["oracle_top_k"] else "-"
        lo, hi = c["count_interval"]
        lines.append(
            f"| {r['regime']} | {r['noise']:.1%} | {r['seed']} | {r['positives']} "
            f"| {c['flagged']} | {_f(c['precision'])} | {_f(c['recall'])} | {_f(c['f1'])} "
            f"| {c['estimated_count']} [{lo}, {hi}] | {cl['flagged']} | {_f(cl['precision'])} "
            f"| {_f(cl['recall'])} | {_f(cl['f1'])} | {g['flagged']} / {_f(g['f1'])} "
            f"| {_f(r['valley_1d']['f1'])} | {top} |"
        )
    lines += ["", "## Summary per regime (mean over seeds)", ""]
    lines += [
        "| regime | noise | F1 csl_fast | F1 cleanlab | P csl_fast | R csl_fast "
        "| mean abs count error | interval covers truth | flagged % csl_fast "
        "| flagged % cleanlab |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime in dict.fromkeys(r["regime"] for r in runs):
        for noise in dict.fromkeys(r["noise"] for r in runs if r["regime"] == regime):
            rs = [r for r in runs if r["regime"] == regime and r["noise"] == noise]
            err = [abs(r["csl_fast"]["count_error"]) for r in rs if r["positives"]]
            share = [r["csl_fast"]["flagged"] / r["samples"] for r in rs]
            share_cl = [r["cleanlab"]["flagged"] / r["samples"] for r in rs]
            lines.append(
                f"| {regime} | {noise:.1%} | {_f(_mean(rs, 'csl_fast', 'f1'))} "
                f"| {_f(_mean(rs, 'cleanlab', 'f1'))} "
                f"| {_f(_mean(rs, 'csl_fast', 'precision'))} "
                f"| {_f(_mean(rs, 'csl_fast', 'recall'))} "
                f"| {_f(sum(err) / len(err) if err else None, '.0%')} "
                f"| {sum(r['csl_fast']['interval_covers'] for r in rs)}/{len(rs)} "
                f"| {sum(share) / len(share):.2%} | {sum(share_cl) / len(share_cl):.2%} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=REGIMES)
    p.add_argument("--noise", type=float, nargs="+", default=list(NOISE))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "csl_fast_flagging"))
    p.add_argument("--no-train", action="store_true", help="evaluate cached runs only")
    p.add_argument("--out", default=str(RESULTS / "flagging"))
    p.add_argument(
        "--saved",
        nargs="*",
        default=[],
        help="trackers saved by benchmarks/paper/cleaning.py (its --cache) to evaluate too",
    )
    args = p.parse_args()
    torch.set_num_threads(1)
    cache = Path(args.cache)
    runs = []
    for regime in args.regimes:
        for noise in args.noise:
            for seed in args.seeds:
                path = cache / f"{regime}-{noise:g}-{seed}.npz"
                if not path.exists():
                    if args.no_train:
                        continue
                    collect(regime, noise, seed, cache)
                row = {"regime": regime, "noise": noise, "seed": seed, **evaluate(path)}
                runs.append(row)
                c = row["csl_fast"]
                print(
                    f"{regime} {noise:.1%} seed {seed}: flagged {c['flagged']} "
                    f"P {_f(c['precision'])} R {_f(c['recall'])} F1 {_f(c['f1'])} "
                    f"est {c['estimated_count']} {c['count_interval']} (truth {row['positives']})"
                    f" | cleanlab flagged {row['cleanlab']['flagged']}"
                    f" F1 {_f(row['cleanlab']['f1'])}",
                    flush=True,
                )
    meta = run_meta()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = [evaluate_saved(Path(f)) for f in args.saved]
    for r in saved:
        d = r["default"]
        print(f"{r['file']}: flagged {d['flagged']} P {_f(d['precision'])} R {_f(d['recall'])}")
    doc = {**meta, "runs": runs, "saved": saved}
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    out.with_suffix(".md").write_text(
        markdown(runs, meta) + (markdown_saved(saved) if saved else "")
    )
    print(f"wrote {out.with_suffix('.json')} and .md")


if __name__ == "__main__":
    main()
