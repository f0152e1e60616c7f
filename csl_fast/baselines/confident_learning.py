r"""Confident learning (Northcutt et al. 2021) through cleanlab, on K-fold out-of-sample
probabilities with a **fresh model per fold**.

The authors' released code reused one model across folds, so later folds had already seen
their held-out samples; here each fold trains a new model from ``model_factory`` on the
other ``K - 1`` folds only. Cost: ``K`` trainings on ``(K-1)/K`` of the data.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .._args import integer
from ..train import predict, train
from ._checks import PROGRESS, FreshModels, check_finite, check_xy, train_options

__all__ = ["ConfidentLearningResult", "confident_learning", "out_of_sample_probs"]

ModelFactory = Callable[[int], nn.Module]


def out_of_sample_probs(
    model_factory: ModelFactory,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    k: int = 3,
    train_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """``[N, C]`` softmax probabilities, each row from the fold model that did not see it.

    Folds come from ``sklearn.model_selection.StratifiedKFold(k, shuffle=True,
    random_state=seed)`` on the (possibly noisy) labels; fold ``f`` trains
    ``model_factory(seed + f)`` with :func:`csl_fast.train.train` (``train_kwargs``, and
    ``seed=seed + f``) on the other folds.
    """
    return _fold_probs("out_of_sample_probs", model_factory, x, y, k, train_kwargs, seed, progress)


def _fold_probs(
    fn: str,
    model_factory: ModelFactory,
    x: torch.Tensor,
    y: torch.Tensor,
    k: Any,
    train_kwargs: Mapping[str, Any] | None,
    seed: Any,
    progress: bool,
) -> torch.Tensor:
    """:func:`out_of_sample_probs`, its errors named after ``fn``, the function called."""
    from sklearn.model_selection import StratifiedKFold

    k = integer(fn, "k", k, low=2)
    seed = integer(fn, "seed", seed, low=0)
    if seed >= 2**32:  # (sklearn's own message named neither the function nor the argument)
        raise ValueError(f"{fn}: seed must be below 2**32 (the fold split's), got {seed}")
    x, y = check_xy(fn, x, y)
    if x.shape[0] < k:  # sklearn's message for N = 0 was "Found array with 0 sample(s)"
        raise ValueError(f"{fn}: k = {k} folds need at least {k} samples, got {x.shape[0]}")
    kwargs = train_options(fn, train_kwargs, PROGRESS)
    y_np = y.detach().cpu().numpy()
    largest = int(np.bincount(y_np).max())
    if largest < k:  # sklearn's "n_splits=3 cannot be greater than the number of members..."
        raise ValueError(
            f"{fn}: k = {k} stratified folds need a class of at least {k} samples; the "
            f"largest has {largest}: pass a smaller k"
        )
    probs: torch.Tensor | None = None
    fresh = FreshModels(fn)
    folds = StratifiedKFold(k, shuffle=True, random_state=seed).split(np.zeros(len(y_np)), y_np)
    for f, (tr, te) in enumerate(folds):
        tr_t = torch.as_tensor(tr, device=x.device)
        te_t = torch.as_tensor(te, device=x.device)
        model = fresh(model_factory(seed + f)).to(x.device)
        train(
            model,
            x[tr_t],
            y[tr_t],
            seed=seed + f,
            progress=f"CL fold {f + 1}/{k}" if progress else False,
            **kwargs,
        )
        p = check_finite(fn, predict(model, x[te_t])).softmax(1)
        if probs is None:
            probs = torch.zeros(x.shape[0], p.shape[1], dtype=torch.float32, device=x.device)
        probs[te_t] = p
    assert probs is not None
    return probs


@dataclass
class ConfidentLearningResult:
    """Attributes:
    issues: bool ``[N]``: cleanlab's ``find_label_issues`` mask.
    scores: float ``[N]``: ``1 - p_y`` of the out-of-sample probabilities (cleanlab's
        self-confidence label quality, inverted: higher = more suspicious), a continuous
        ranking for AUROC.
    ranked: int64 indices of the issues, most severe first (cleanlab's
        ``return_indices_ranked_by``, ``"self_confidence"`` unless given).
    pred_probs: float ``[N, C]`` out-of-sample probabilities.
    """

    issues: torch.Tensor
    scores: torch.Tensor
    ranked: torch.Tensor
    pred_probs: torch.Tensor


def confident_learning(
    model_factory: ModelFactory,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    k: int = 3,
    train_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
    **find_label_issues_kwargs: Any,
) -> ConfidentLearningResult:
    """Label issues by ``cleanlab.filter.find_label_issues`` on K-fold (K = 3) probabilities.

    Args:
        model_factory: ``seed -> fresh nn.Module`` (called once per fold).
        x, y: training inputs and (noisy) labels.
        k: number of folds.
        train_kwargs: forwarded to :func:`csl_fast.train.train` (``epochs`` required; lr, ...).
        seed: fold split and per-fold seeds.
        **find_label_issues_kwargs: forwarded to cleanlab (e.g. ``filter_by``);
            ``return_indices_ranked_by`` orders :attr:`ConfidentLearningResult.ranked`
            (default ``"self_confidence"``), the mask is found without it.
    """
    from cleanlab.filter import find_label_issues

    x, y = check_xy("confident_learning", x, y)
    # a user's ranking collided with ours ("got multiple values for keyword argument")
    kwargs = dict(find_label_issues_kwargs)
    rank_by = kwargs.pop("return_indices_ranked_by", None) or "self_confidence"
    _check_cleanlab_options(find_label_issues, kwargs, rank_by)
    probs = _fold_probs("confident_learning", model_factory, x, y, k, train_kwargs, seed, progress)
    p = probs.cpu().double().numpy()
    p = p / p.sum(1, keepdims=True)
    labels = y.detach().cpu().numpy()
    mask = find_label_issues(labels, p, **kwargs)
    ranked = find_label_issues(labels, p, return_indices_ranked_by=rank_by, **kwargs)
    scores = 1.0 - probs.gather(1, y.view(-1, 1).to(probs.device)).squeeze(1)
    return ConfidentLearningResult(
        issues=torch.as_tensor(mask, dtype=torch.bool),
        scores=scores.cpu(),
        ranked=torch.as_tensor(ranked, dtype=torch.int64),
        pred_probs=probs.cpu(),
    )


def _check_cleanlab_options(
    find_label_issues: Callable[..., Any], kwargs: dict[str, Any], rank_by: str
) -> None:
    """Refuse now what cleanlab would refuse after the K trainings: an unknown option (a
    bare "unexpected keyword argument"), or a ``filter_by`` / ranking it does not know
    (``filter_by="prune_by_noise"`` failed an assertion with an empty message)."""
    fn = "confident_learning"
    try:
        inspect.signature(find_label_issues).bind(None, None, **kwargs)
    except TypeError as e:
        raise TypeError(
            f"{fn}: cleanlab.filter.find_label_issues does not take these options ({e}); "
            "the keyword arguments after train_kwargs are forwarded to it"
        ) from None
    # the two that name a method, tried on a toy problem (its answer is not used)
    labels = np.repeat([0, 1], 5)
    toy = np.eye(2)[labels] * 0.8 + 0.1
    methods = {key: kwargs[key] for key in ("filter_by",) if key in kwargs}
    try:
        find_label_issues(labels, toy, return_indices_ranked_by=rank_by, n_jobs=1, **methods)
    except (AssertionError, ValueError) as e:
        said = " ".join(str(e).split()) or "not one of its methods"
        raise ValueError(
            f"{fn}: cleanlab refused filter_by={kwargs.get('filter_by', 'its default')!r} "
            f"with return_indices_ranked_by={rank_by!r}: {said} (cleanlab 2's filter_by: "
            "prune_by_noise_rate, prune_by_class, both, confident_learning, "
            "predicted_neq_given, low_normalized_margin, low_self_confidence)"
        ) from None
