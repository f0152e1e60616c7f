r"""Stability-based memorization (Feldman 2020; Feldman & Zhang 2020), by subsampling.

.. math::
    \mathrm{mem}_i = \Pr[h(x_i) = y_i \mid i \in S] - \Pr[h(x_i) = y_i \mid i \notin S],

estimated by training ``m`` models, each on a random subset ``S`` with
``floor(subset_fraction * N)`` samples (70% by default; the fraction taken as written:
0.7 of 90 is 63), and averaging the 0/1 correctness on sample ``i`` over the models
whose subset did / did not contain ``i``. This is the
expensive ground truth CSL approximates: the paper's ImageNet/CIFAR estimates use
2,000–10,000 models; for small models on small data a few hundred are enough for a rough
estimate (the standard error of each term is about ``sqrt(p(1-p) / count)``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
from torch import nn

from .._args import integer, rate, share
from .._args import seed as seed_arg
from ..train import predict, train
from ._checks import FreshModels, check_finite, check_xy, train_options

__all__ = ["MemorizationResult", "stability_memorization"]


@dataclass
class MemorizationResult:
    """Attributes (all ``[N]``, float64 unless said):
    memorization: ``p_in - p_out`` (NaN where a sample was never in, or never out).
    p_in, p_out: accuracy on the sample over the models that did / did not train on it.
    n_in, n_out: int64 number of such models.
    seconds: wall-clock of the whole estimate.
    """

    memorization: torch.Tensor
    p_in: torch.Tensor
    p_out: torch.Tensor
    n_in: torch.Tensor
    n_out: torch.Tensor
    seconds: float


def stability_memorization(
    model_factory: Callable[[int], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    m: int = 100,
    subset_fraction: float = 0.7,
    train_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> MemorizationResult:
    """Feldman–Zhang memorization of every sample from ``m`` subset-trained models.

    Args:
        model_factory: ``seed -> fresh nn.Module`` (model ``j`` gets ``seed + j``).
        x, y: inputs and labels (the labels the memorization is about, noisy or not).
        m: number of models.
        subset_fraction: fraction of the data each model trains on (paper: 0.7).
        train_kwargs: forwarded to :func:`csl_fast.train.train` (``epochs`` required).
        seed: subsets and training seeds.
        progress: a tqdm bar over the models.
    """
    m = integer("stability_memorization", "m", m, low=1)
    seed = seed_arg("stability_memorization", seed, offset=m - 1)  # model j: seed + j
    # the fraction as written, not its binary float (int(0.7 * 90) is 62), as corrupt reads it
    try:
        fraction = rate("stability_memorization", "subset_fraction", subset_fraction)
    except ValueError:  # (its "[0, 1]" read as if 0 and 1 were taken)
        fraction = Fraction(0)
    if not 0 < fraction < 1:
        raise ValueError(
            f"stability_memorization: subset_fraction must be in (0, 1), got {subset_fraction}"
        )
    x, y = check_xy("stability_memorization", x, y)
    kwargs = train_options("stability_memorization", train_kwargs)
    n = x.shape[0]
    size = share(fraction, n)
    if size < 1:
        raise ValueError(
            f"stability_memorization: int(subset_fraction * N) = int({subset_fraction} * {n}) "
            "is 0, so no model would train on anything; raise subset_fraction or N"
        )
    top = int(y.max())  # (n >= 1 here)
    gen = torch.Generator().manual_seed(seed)
    hits_in = torch.zeros(n, dtype=torch.float64)
    hits_out = torch.zeros(n, dtype=torch.float64)
    n_in = torch.zeros(n, dtype=torch.int64)
    n_out = torch.zeros(n, dtype=torch.int64)
    models: Any = range(m)
    if progress:
        from tqdm.auto import tqdm

        models = tqdm(models, desc="stability memorization", leave=False)
    fresh = FreshModels("stability_memorization")
    t0 = time.perf_counter()
    for j in models:
        subset = torch.randperm(n, generator=gen)[:size]
        member = torch.zeros(n, dtype=torch.bool)
        member[subset] = True
        sub = subset.to(x.device)
        model = fresh(model_factory(seed + j)).to(x.device)
        # train checks the width against its subset's labels only: a class no subset held
        # was silently never predicted
        width = predict(model, x[:1]).shape[1]
        if width <= top:
            raise ValueError(
                f"stability_memorization: the model returns {width} logits, but y holds labels "
                f"up to {top}: build it with as many outputs as classes"
            )
        train(model, x[sub], y[sub], seed=seed + j, **kwargs)
        logits = check_finite("stability_memorization", predict(model, x))
        correct = (logits.argmax(1) == y).cpu().double()
        hits_in += torch.where(member, correct, 0.0)
        hits_out += torch.where(member, 0.0, correct)
        n_in += member.long()
        n_out += (~member).long()
    seconds = time.perf_counter() - t0
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    p_in = torch.where(n_in > 0, hits_in / n_in.clamp(min=1), nan)
    p_out = torch.where(n_out > 0, hits_out / n_out.clamp(min=1), nan)
    return MemorizationResult(p_in - p_out, p_in, p_out, n_in, n_out, seconds)
