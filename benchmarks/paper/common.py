"""Shared pieces of the paper reproduction: data, model, one run of every method, tables.

Defaults are sized for a 2-core CPU on scikit-learn's digits (1,797 samples, 8x8 images,
10 classes) in a regime where the network memorizes (as the paper's experiments need): a
ReLU MLP, no weight decay, no augmentation, long training (100% train accuracy on flipped labels).
Knobs for larger runs: ``--dataset cifar10 --data-dir DIR`` (the python-pickle batches of
CIFAR-10, ``data_batch_1..5``), ``--arch cnn``, ``--device cuda``, ``--epochs``,
``--mem-models``, ``--threads``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(HERE.parent))  # run_meta

import run_meta  # noqa: E402
from run_meta import add_force, at_least, at_least_one, refuse_overwrite  # noqa: E402
from run_meta import rate_arg as rate_arg  # noqa: E402  (the paper scripts import it from here)

import csl_fast  # noqa: E402
from csl_fast import evaluate  # noqa: E402
from csl_fast.baselines import (  # noqa: E402
    CurvatureAccumulator,
    confident_learning,
    ssft,
)
from csl_fast.train import mlp, train  # noqa: E402

RESULTS = HERE / "results"


# ----------------------------------------------------------------------------- config
@dataclass
class Config:
    dataset: str = "digits"
    data_dir: str | None = None
    arch: str = "mlp"
    hidden: tuple[int, ...] = (128, 128)
    epochs: int = 60
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    input_noise: float = 0.0
    curv_every: int = 10
    curv_probes: int = 10
    curv_h: float = 1e-3
    cl_folds: int = 3
    device: str = "cpu"
    threads: int = 1
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    def train_kwargs(self) -> dict:
        return {
            "epochs": self.epochs,
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "batch_size": self.batch_size,
            "input_noise": self.input_noise,
        }


def add_args(p: argparse.ArgumentParser) -> None:
    d = Config()
    p.add_argument("--dataset", choices=["digits", "cifar10"], default=d.dataset)
    p.add_argument("--data-dir", default=None, help="CIFAR-10 python batches (cifar10 only)")
    p.add_argument("--arch", choices=["mlp", "cnn"], default=d.arch)
    p.add_argument("--hidden", type=int, nargs="+", default=list(d.hidden))
    p.add_argument("--epochs", type=at_least_one, default=d.epochs)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--momentum", type=float, default=d.momentum)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--batch-size", type=at_least_one, default=d.batch_size)
    p.add_argument("--input-noise", type=float, default=d.input_noise)
    p.add_argument("--curv-every", type=int, default=d.curv_every)
    p.add_argument("--curv-probes", type=int, default=d.curv_probes)
    p.add_argument("--cl-folds", type=at_least(2), default=d.cl_folds)
    p.add_argument("--device", default=d.device)
    p.add_argument("--threads", type=at_least_one, default=d.threads)
    p.add_argument("--seeds", type=int, nargs="+", default=d.seeds)
    p.add_argument("--out", default=None, help="results file stem (default: the script's)")
    p.add_argument("--progress", action="store_true", help="tqdm bars inside each training")
    add_force(p)


def parser(description: str | None) -> argparse.ArgumentParser:
    """The argument parser of a paper script: ``description`` (its docstring) and the shared
    knobs of :func:`add_args`; the script adds its own and calls ``parse_args``."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    add_args(p)
    return p


def count_arg(text: str) -> int:
    """Argparse type of a count option (``--pairs``): a whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative: a count is 0 or more")
    return value


def config_from(args: argparse.Namespace) -> Config:
    cfg = Config(
        dataset=args.dataset,
        data_dir=args.data_dir,
        arch=args.arch,
        hidden=tuple(args.hidden),
        epochs=args.epochs,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        input_noise=args.input_noise,
        curv_every=args.curv_every,
        curv_probes=args.curv_probes,
        cl_folds=args.cl_folds,
        device=args.device,
        threads=args.threads,
        seeds=list(args.seeds),
    )
    torch.set_num_threads(cfg.threads)
    return cfg


# ------------------------------------------------------------------------------- data
def load_data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(x, y, num_classes)`` on ``cfg.device``; inputs standardised per feature."""
    if cfg.dataset == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.data, dtype=torch.float32)
        y = torch.tensor(d.target, dtype=torch.long)
        x = (x - x.mean(0)) / (x.std(0) + 1e-3)
        if cfg.arch == "cnn":
            x = x.reshape(-1, 1, 8, 8)
        return x.to(cfg.device), y.to(cfg.device), 10
    if cfg.dataset == "cifar10":
        if not cfg.data_dir:
            raise SystemExit("--dataset cifar10 needs --data-dir (the cifar-10-batches-py folder)")
        xs, ys = [], []
        for i in range(1, 6):
            with open(os.path.join(cfg.data_dir, f"data_batch_{i}"), "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            xs.append(np.asarray(batch[b"data"], dtype=np.float32))
            ys.extend(batch[b"labels"])
        x = torch.from_numpy(np.concatenate(xs)).reshape(-1, 3, 32, 32) / 255.0
        mean = x.mean((0, 2, 3), keepdim=True)
        std = x.std((0, 2, 3), keepdim=True)
        x = (x - mean) / std
        if cfg.arch == "mlp":
            x = x.reshape(x.shape[0], -1)
        return x.to(cfg.device), torch.tensor(ys).to(cfg.device), 10
    raise SystemExit(f"unknown dataset {cfg.dataset}")


def small_cnn(in_ch: int, num_classes: int, width: int = 64) -> nn.Module:
    """A BatchNorm-free CNN (per-sample input gradients stay exact)."""
    return nn.Sequential(
        nn.Conv2d(in_ch, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, width, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(width, 2 * width, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(2 * width, num_classes),
    )


def model_factory(cfg: Config, x: torch.Tensor, num_classes: int):
    def make(seed: int) -> nn.Module:
        if cfg.arch == "cnn":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = small_cnn(x.shape[1], num_classes)
        else:
            model = mlp(x[0].numel(), num_classes, cfg.hidden, seed=seed)
        return model.to(cfg.device)

    return make


# ----------------------------------------------------------------------- one run, all
#: Display name -> key in the per-run score dict. The paper's rows first.
METHODS = {
    "Thr. Learning Time": "threshold_learning_time",
    "In Conf.": "in_confidence",
    "CL (find_label_issues)": "cl",
    "SSFT": "ssft",
    "Curv.": "curvature",
    "CSL (ours, in-training)": "csl",
    "CSL (eval-pass)": "eval_csl",
    "Final sample loss": "final_loss",
    "Forgetting": "forgetting",
    "AUM": "aum",
    "Loss sensitivity": "loss_sensitivity",
    "Learning time": "learning_time",
    "CL self-confidence": "cl_self_confidence",
    "Confidence (data maps)": "confidence",
    "Logit-grad norm": "logit_grad_norm",
}
PAPER_ROW = {
    "Thr. Learning Time": "Thr. Learning Time",
    "In Conf.": "In Conf.",
    "CL (find_label_issues)": "CL",
    "SSFT": "SSFT",
    "Curv.": "Curv.",
    "CSL (ours, in-training)": "CSL (Ours)",
}


def run_all(
    cfg: Config,
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    seed: int,
    *,
    baselines: bool = True,
    progress: bool = False,
    tracker: csl_fast.CSLTracker | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Every method on one (corrupted) training set: ``(scores, seconds)``.

    One tracked training run gives every tracker score (in-training CSL, eval-pass CSL,
    input-gradient scores) and, through a callback, the curvature baseline; confident
    learning and SSFT retrain their own models. ``tracker``: a fresh
    ``CSLTracker(N, num_classes)`` the run records into, for a caller that needs more than
    the scores (``csl_fast.detect``'s default rule reads the tracker's views); by default
    a private one.
    """
    make = model_factory(cfg, x, num_classes)
    kw = cfg.train_kwargs()
    times: dict[str, float] = {}
    if tracker is None:
        tracker = csl_fast.CSLTracker(x.shape[0], num_classes, device=cfg.device)
    elif tracker.num_samples != x.shape[0] or tracker.num_classes != num_classes:
        raise ValueError(
            f"run_all: the tracker is for {tracker.num_samples} samples and "
            f"{tracker.num_classes} classes, the data has {x.shape[0]} and {num_classes}"
        )
    curv = CurvatureAccumulator(
        x,
        y,
        epochs={*range(cfg.curv_every - 1, cfg.epochs, cfg.curv_every), cfg.epochs - 1},
        h=cfg.curv_h,
        n=cfg.curv_probes,
        seed=seed,
    )
    t0 = time.perf_counter()
    res = train(
        make(1000 + seed),
        x,
        y,
        tracker=tracker,
        input_grads=True,
        eval_each_epoch=True,
        callback=curv if baselines else None,
        seed=seed,
        progress="tracked run" if progress else False,
        **kw,
    )
    times["tracked_run_total"] = time.perf_counter() - t0
    times["train_with_tracker"] = res.train_time
    times["eval_passes"] = res.eval_time
    times["curvature"] = res.callback_time
    out = {k: v.cpu() for k, v in csl_fast.scores(tracker).items()}
    if baselines:
        out["curvature"] = curv.value.cpu()
        t0 = time.perf_counter()
        cl = confident_learning(
            make, x, y, k=cfg.cl_folds, train_kwargs=kw, seed=seed, progress=progress
        )
        times["cl"] = time.perf_counter() - t0
        out["cl"] = cl.issues.float()
        out["cl_self_confidence"] = cl.scores
        t0 = time.perf_counter()
        out["ssft"] = ssft(make, x, y, train_kwargs=kw, seed=seed, progress=progress).cpu()
        times["ssft"] = time.perf_counter() - t0
    return out, times


def detection_table(scores: dict[str, torch.Tensor], truth: torch.Tensor) -> dict[str, dict]:
    """``{method display name: {auroc, aupr, fpr@95tpr}}`` for the methods present."""
    table = {}
    for name, key in METHODS.items():
        if key in scores:
            s = scores[key]
            ok = torch.isfinite(s)
            if not bool(ok.any()):
                continue
            table[name] = evaluate.detection_metrics(s[ok], truth.cpu()[ok])
    return table


def need_both_classes(p: argparse.ArgumentParser, setting: str, positives: int, n: int) -> None:
    """Refuse, before any training, a ``setting`` whose ground truth is one class (``positives``
    of ``n``): AUROC needs positives and negatives, and such a run (a clean control,
    ``--noise 0``) crashed in :func:`detection_table` after all of its training."""
    if not 0 < positives < n:
        p.error(
            f"{setting} makes {positives} of the {n} positive: detection needs positives "
            "and negatives"
        )


def flagged_set(flagged: Any, truth: Any) -> dict:
    """Size, true positives, precision, recall and F1 of a flagged set (bool, any shape,
    a tensor or an array) against the truth. The precision of an empty set is undefined:
    NaN (see :func:`precision_stats`), where it was 0 here and NaN in other scripts."""
    flagged = torch.as_tensor(flagged).cpu().bool().reshape(-1)
    truth = torch.as_tensor(truth).cpu().bool().reshape(-1)
    hit = int((flagged & truth).sum())
    n, pos = int(flagged.sum()), int(truth.sum())
    precision, recall = hit / n if n else math.nan, hit / max(pos, 1)
    f1 = 2 * precision * recall / (precision + recall) if hit else 0.0
    return {"flagged": n, "true_positives": hit, "precision": precision, "recall": recall, "f1": f1}


def precision_stats(values: list[float]) -> dict:
    """Mean and std of per-seed precisions over the seeds that flagged something, and how
    many flagged nothing (NaN: no precision). A mean counting those as 0 and a ``nanmean``
    dropping them silently read differently; both are now said."""
    v = np.asarray(values, dtype=np.float64)
    some = v[~np.isnan(v)]
    return {
        "mean": float(some.mean()) if some.size else math.nan,
        "std": float(some.std()) if some.size else math.nan,
        "flagged_nothing": int(v.size - some.size),
        "seeds": int(v.size),
    }


def precision_cell(stats: dict, digits: int = 3, std: bool = False) -> str:
    """A table cell of :func:`precision_stats`: the mean (and std), with the seeds that
    flagged nothing; ``n/a`` when none flagged anything."""
    if stats["flagged_nothing"] == stats["seeds"]:
        return "n/a (nothing flagged)"
    cell = f"{stats['mean']:.{digits}f}" + (f" ({stats['std']:.{digits}f})" if std else "")
    if stats["flagged_nothing"]:
        cell += f", n/a in {stats['flagged_nothing']} of {stats['seeds']} (nothing flagged)"
    return cell


def detection_flags(det: csl_fast.detect.Detection, truth: torch.Tensor) -> dict:
    """:func:`flagged_set` of a :class:`csl_fast.detect.Detection`, with the rule it
    reports, its estimated count and interval, threshold and warning."""
    return {
        "rule": det.rule,
        **flagged_set(det.flagged, truth),
        "estimated_count": det.estimated_count,
        "count_interval": list(det.count_interval) if det.count_interval else None,
        "threshold": det.threshold,
        "warning": det.warning,
    }


def count_cell(flags: dict) -> str:
    """``estimate [low–high]`` of a :func:`detection_flags` dict, ``–`` without one."""
    if flags["estimated_count"] is None:
        return "–"
    low, high = flags["count_interval"]
    return f"{flags['estimated_count']} [{low}–{high}]"


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=0)) if a.size > 1 else 0.0


def fmt(values: list[float]) -> str:
    m, s = mean_std(values)
    return f"{m:.4f} ± {s:.4f}" if not math.isnan(m) else "n/a"


# ------------------------------------------------------------------------- results
def environment() -> dict:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "commit": run_meta.commit(),
        "command": run_meta.command(),
        "torch": torch.__version__,
        "csl_fast": csl_fast.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def environment_line(env: dict) -> str:
    line = (
        f"{env['date']}, commit {env['commit']}, {env['machine']} with {env['cpu_count']} "
        f"CPUs, torch {env['torch']}, {env['torch_threads']} thread(s)."
    )
    return line + (f" `{env['command']}`" if env.get("command") else "")


def results_stem(stem: str) -> Path:
    """Where :func:`write_results` writes ``stem``'s .json and .md: under results/, or at
    ``stem`` itself when it is an absolute path (``--out``)."""
    return RESULTS / stem


def parse_args(
    p: argparse.ArgumentParser, stem: str, extra: tuple[str, ...] = ()
) -> argparse.Namespace:
    """``p``'s arguments; a usage error (exit 2) when the results files of ``--out`` (else
    ``stem``) exist and ``--force`` was not given (:func:`run_meta.refuse_overwrite`);
    ``extra``: the suffixes of files the script writes beside them (``.png``)."""
    args = p.parse_args()
    out = results_stem(args.out or stem)
    refuse_overwrite(p, args.force, *(f"{out}{s}" for s in (".json", ".md", *extra)))
    return args


def write_results(stem: str, payload: dict, markdown: str) -> None:
    out = results_stem(stem)
    out.parent.mkdir(parents=True, exist_ok=True)
    env = environment()
    payload = {"environment": env, **payload}
    # A figure quoted from the .md must name when and on what it was measured; the scripts
    # whose own heading does not say so get the line under their title.
    if env["date"][:10] not in markdown:
        title, _, rest = markdown.partition("\n")
        markdown = f"{title}\n\n{environment_line(env)}\n{rest}"
    run_meta.write_atomic(f"{out}.json", json.dumps(payload, indent=2, default=_json) + "\n")
    run_meta.write_atomic(f"{out}.md", markdown.rstrip() + "\n")
    print(f"wrote {out}.json and {out}.md", flush=True)


def _json(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(type(o).__name__)


def config_line(cfg: Config) -> str:
    arch = f"MLP {list(cfg.hidden)}" if cfg.arch == "mlp" else "small CNN"
    return (
        f"{cfg.dataset}, {arch}, SGD lr {cfg.lr} momentum {cfg.momentum}, weight decay "
        f"{cfg.weight_decay}, batch {cfg.batch_size}, {cfg.epochs} epochs, input noise "
        f"{cfg.input_noise}, curvature every {cfg.curv_every} epochs with "
        f"{cfg.curv_probes} probes (h = {cfg.curv_h}), CL K = {cfg.cl_folds}, "
        f"{torch.get_num_threads()} torch thread(s) on {cfg.device}"
    )


class Progress:
    """One line per finished unit of work, with elapsed time and an ETA."""

    def __init__(self, total: int, what: str) -> None:
        self.total, self.what, self.done, self.t0 = total, what, 0, time.perf_counter()
        print(f"{what}: {total} runs", flush=True)

    def step(self, label: str) -> None:
        self.done += 1
        el = time.perf_counter() - self.t0
        eta = el / self.done * (self.total - self.done)
        print(
            f"[{self.done}/{self.total}] {label}  elapsed {el:6.0f}s  eta {eta:6.0f}s",
            flush=True,
        )


# ------------------------------------------------------------------ paper numbers
#: Poster table "Identifying Mislabeled", CIFAR-10 (AUROC mean ± std over 3 seeds).
PAPER_MISLABELED_C10 = {
    "Thr. Learning Time": [
        "0.4951 ± 0.0248", "0.4954 ± 0.0044", "0.4911 ± 0.0071", "0.4948 ± 0.0057"
    ],
    "In Conf.": ["0.8781 ± 0.0177", "0.8072 ± 0.0130", "0.7254 ± 0.0214", "0.6528 ± 0.0042"],
    "CL": ["0.8651 ± 0.0127", "0.8905 ± 0.0115", "0.8874 ± 0.0019", "0.8551 ± 0.0030"],
    "SSFT": ["0.9626 ± 0.0018", "0.9551 ± 0.0020", "0.9498 ± 0.0042", "0.9360 ± 0.0020"],
    "Curv.": ["0.9715 ± 0.0045", "0.9776 ± 0.0033", "0.9800 ± 0.0003", "0.9819 ± 0.0006"],
    "CSL (Ours)": ["0.9845 ± 0.0026", "0.9864 ± 0.0004", "0.9870 ± 0.0003", "0.9869 ± 0.0005"],
}  # fmt: skip
#: Poster table "Identifying Duplicate Samples" (AUROC), CIFAR-10 and CIFAR-100.
PAPER_DUPLICATES = {
    "Thr. Learning Time": ("0.7029 ± 0.0058", "0.7419 ± 0.0059"),
    "In Conf.": ("0.9237 ± 0.0114", "0.8623 ± 0.0131"),
    "CL": ("0.5533 ± 0.0031", "0.5873 ± 0.0090"),
    "SSFT": ("0.8490 ± 0.0034", "0.7938 ± 0.0045"),
    "Curv.": ("0.9536 ± 0.0030", "0.9639 ± 0.0030"),
    "CSL (Ours)": ("0.9821 ± 0.0006", "0.9886 ± 0.0008"),
}
#: Poster table "Similarity with Memorization": (CS, PC) for CIFAR-100/Inception top 5k
#: and all, ImageNet/ResNet50 top 50k and all.
PAPER_SIMILARITY = {
    "Final sample loss": ((0.33, 0.06), (0.24, 0.17), (0.78, 0.12), (0.64, 0.5)),
    "Curv.": ((0.87, 0.16), (0.69, 0.49), (0.84, 0.05), (0.62, 0.33)),
    "Loss sensitivity": ((0.97, 0.39), (0.81, 0.76), (0.79, 0.04), (0.49, 0.17)),
    "Forgetting": ((0.96, 0.29), (0.76, 0.59), (0.68, 0.15), (0.49, 0.04)),
    "CSL (ours, in-training)": ((0.93, 0.4), (0.87, 0.79), (0.94, 0.21), (0.79, 0.64)),
}
