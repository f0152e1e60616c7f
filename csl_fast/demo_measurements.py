"""The demo's two measurements (:mod:`csl_fast.demo`): the training-time overhead of CSL
tracking against plain ``F.cross_entropy`` (:func:`measure_overhead`), and the clean-test
accuracy won back by cleaning and retraining once (:func:`retrain_gain`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ._args import integer

__all__ = ["measure_overhead", "retrain_gain"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_overhead(
    x: torch.Tensor,
    y: torch.Tensor,
    make_model: Callable[[], torch.nn.Module],
    *,
    num_classes: int,
    batch_size: int,
    lr: float,
    rounds: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Median training-epoch time of plain ``F.cross_entropy`` versus tracked training.

    Each round trains one epoch of a fresh copy of the same model in each variant, in an
    order that alternates between rounds (so drift in machine load hits every variant
    alike); one warm-up round is discarded. Variants: ``plain`` (``F.cross_entropy``),
    ``tracker`` (:func:`csl_fast.accumulate` into a :class:`csl_fast.CSLTracker`: CSL and
    every free statistic) and ``tracker+input_grads`` (plus per-sample input-gradient
    norms, as the demo trains). Returns milliseconds per step and overhead in percent.
    """
    from .tracker import CSLTracker
    from .train import train

    # only the discarded warm-up ran at 0: NumPy's "zero-size array" from the median
    rounds = integer("csl_fast.demo.measure_overhead", "rounds", rounds, low=1)
    device = x.device
    n = x.shape[0]
    steps = math.ceil(n / batch_size)
    variants = ("plain", "tracker", "tracker+input_grads")
    base = make_model()
    times: dict[str, list[float]] = {v: [] for v in variants}
    it: Any = range(rounds + 1)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="overhead", leave=False)
    for r in it:
        order = variants if r % 2 == 0 else variants[::-1]
        for v in order:
            model = copy.deepcopy(base)
            tracker = None if v == "plain" else CSLTracker(n, num_classes, device=device)
            _sync(device)
            t0 = time.perf_counter()
            train(
                model,
                x,
                y,
                epochs=1,
                lr=lr,
                batch_size=batch_size,
                optimizer="adam",
                tracker=tracker,
                input_grads=v == "tracker+input_grads",
                seed=seed + r,
            )
            _sync(device)
            if r > 0:
                times[v].append(time.perf_counter() - t0)
    med = {v: float(np.median(t)) for v, t in times.items()}
    plain = med["plain"]
    return {
        "rounds": rounds,
        "steps_per_epoch": steps,
        "batch_size": batch_size,
        "device": str(device),
        "ms_per_step": {v: med[v] / steps * 1e3 for v in variants},
        "overhead_pct": {v: (med[v] / plain - 1) * 100 for v in variants},
        # half the range of the plain epochs' own times: differences within it are noise
        "noise_pct": float(np.ptp(times["plain"]) / 2 / plain * 100),
    }


def retrain_gain(
    x: torch.Tensor,
    y: torch.Tensor,
    true_labels: torch.Tensor,
    plan: Any,
    x_test: torch.Tensor,
    y_test: torch.Tensor,
    make_model: Callable[[], torch.nn.Module],
    noisy_model: torch.nn.Module,
    *,
    train_kwargs: dict[str, Any],
    seed: int,
    progress: bool = False,
) -> dict[str, Any]:
    """Clean-test accuracy of ``noisy_model`` (trained on ``y``), of a fresh model trained
    on ``plan`` applied to ``y`` (:meth:`csl_fast.cleaning.CleaningPlan.apply`), and of a fresh
    model trained on ``true_labels`` (the ceiling).

    ``make_model()`` must return the same initialisation as ``noisy_model`` had and the
    trainings use the same ``seed`` and ``train_kwargs``, so only the labels differ.
    Returns ``accuracy`` (``noisy``, ``cleaned``, ``ceiling``), ``test_size``, ``kept``
    (training samples after the drops) and ``seconds`` (of the two trainings).
    """
    from .train import predict, train

    def accuracy(model: torch.nn.Module) -> float:
        return float((predict(model, x_test).argmax(1).cpu() == y_test.cpu()).float().mean())

    acc = {"noisy": accuracy(noisy_model)}
    t0 = time.perf_counter()
    keep, labels = plan.apply(y.cpu())
    keep_d = keep.to(x.device)
    for arm, xs, ys in (
        ("cleaned", x[keep_d], labels.to(x.device)),
        ("ceiling", x, true_labels.to(x.device)),
    ):
        model = make_model()
        train(model, xs, ys, seed=seed, progress=arm if progress else False, **train_kwargs)
        acc[arm] = accuracy(model)
    return {
        "accuracy": acc,
        "test_size": int(y_test.numel()),
        "kept": int(keep.numel()),
        "seconds": time.perf_counter() - t0,
    }


def _fmt_overhead(ov: dict[str, Any], eval_ms_per_step: float | None) -> str:
    names = {
        "plain": "plain F.cross_entropy",
        "tracker": "csl_fast.accumulate + CSLTracker (CSL + free stats)",
        "tracker+input_grads": "  + per-sample input-gradient norms (this run)",
    }
    epochs = f"{ov['rounds']} interleaved epoch{'' if ov['rounds'] == 1 else 's'}"
    lines = [
        f"Training-time overhead (median of {epochs}, {ov['device']}, "
        f"batch {ov['batch_size']}, {ov['steps_per_epoch']} steps/epoch)"
    ]
    for v, label in names.items():
        ms = ov["ms_per_step"][v]
        pct = "" if v == "plain" else f"{ov['overhead_pct'][v]:+7.1f}%"
        lines.append(f"  {label:<54}{ms:8.2f} ms/step {pct}")
    if eval_ms_per_step is not None:
        plain = ov["ms_per_step"]["plain"]
        label = "eval pass after each epoch (eval-pass CSL, optional)"
        lines.append(
            f"  {label:<54}{eval_ms_per_step:8.2f} ms/step {eval_ms_per_step / plain * 100:+7.1f}%"
        )
    noise = ov.get("noise_pct")
    if noise is not None and min(ov["overhead_pct"].values()) < 0:
        # tracked training cannot be faster than plain: such a figure is the machine's
        lines.append(
            f"  (a negative figure is timing noise: the plain epochs alone spread by "
            f"+-{noise:.1f}%{'' if ov['rounds'] > 1 else '; one round measures no spread'})"
        )
    lines.append(
        "  (a tiny MLP on a CPU: fixed per-step costs dominate; `csl-fast bench` measures "
        "realistic sizes)"
    )
    return "\n".join(lines)
