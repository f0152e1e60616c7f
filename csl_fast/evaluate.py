r"""Evaluation helpers: detection metrics, similarity with memorization, binned trends.

Scores follow the csl_fast convention (higher = more suspicious / more memorized);
``labels`` are the ground-truth masks returned by :mod:`csl_fast.corrupt` (True = positive).
Inputs may be tensors, NumPy arrays or lists. Non-finite scores raise ``ValueError``
(drop the samples first, e.g. never-presented ones).
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch

from ._args import integer, rate, share_up

__all__ = [
    "aupr",
    "auroc",
    "binned_trend",
    "cosine_similarity",
    "detection_metrics",
    "fpr_at_tpr",
    "pearson",
    "similarity",
    "top_k_indices",
]


def _np(x: Any, name: str, dtype: Any = np.float64) -> np.ndarray:
    """``x`` as a 1-D NumPy array: per-sample values, one per sample. (They were
    flattened: [3, 2] scores against [6] labels gave an AUROC, and None read as one NaN.)"""
    if x is None or isinstance(x, str | bytes):
        raise TypeError(
            f"csl_fast.evaluate: {name} must be a 1-D array or tensor [N], got {type(x).__name__}"
        )
    if isinstance(x, torch.Tensor):
        if x.is_meta or x.is_complex() or x.layout != torch.strided:
            kind = "meta" if x.is_meta else "complex" if x.is_complex() else str(x.layout)
            raise ValueError(
                f"csl_fast.evaluate: {name} must be a dense real tensor with data, got a "
                f"{kind} tensor"
            )
        x = x.detach().cpu()
        x = x.double() if dtype is np.float64 else x
        x = x.numpy()
    if np.iscomplexobj(x):  # (a cast would keep the real part, with a warning only)
        raise ValueError(f"csl_fast.evaluate: {name} must be real, got complex values")
    a = np.asarray(x, dtype=dtype)
    if a.ndim != 1:
        raise ValueError(
            f"csl_fast.evaluate: {name} must be 1-D [N], one value per sample, got shape {a.shape}"
        )
    if dtype is np.float64 and not np.all(np.isfinite(a)):
        raise ValueError(
            f"csl_fast.evaluate: {name} has {int((~np.isfinite(a)).sum())} "
            "non-finite values; drop those samples first"
        )
    return a


def _mask(labels: Any) -> np.ndarray:
    """A ground-truth mask: bool, or numbers that are all 0 or 1. Anything else (class
    labels passed for a mask, NaN) would silently count as positive under ``bool``."""
    # (a tensor is not given to np.asarray: bfloat16, requires_grad and CUDA tensors raise)
    is_bool = (
        labels.dtype == torch.bool
        if isinstance(labels, torch.Tensor)
        else np.asarray(labels).dtype == bool
    )
    if is_bool:
        return _np(labels, "labels", dtype=bool)
    v = _np(labels, "labels")
    if not np.isin(v, (0.0, 1.0)).all():
        raise ValueError(
            "csl_fast.evaluate: labels must be a ground-truth mask (bool, or 0/1), got values "
            f"{np.unique(v[~np.isin(v, (0.0, 1.0))])[:5].tolist()}: pass labels == k, or the "
            "mask csl_fast.corrupt returns, not class labels"
        )
    return v.astype(bool)


def _same_size(a: np.ndarray, b: np.ndarray, names: str) -> None:
    if a.shape != b.shape:
        first, second = names.split()
        raise ValueError(f"csl_fast.evaluate: {first} has {a.size} entries, {second} {b.size}")
    if a.size == 0:
        raise ValueError(f"csl_fast.evaluate: {names.replace(' ', ' and ')} are empty")


def _pair(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _np(scores, "scores")
    y = _mask(labels)
    if s.shape != y.shape:
        raise ValueError(f"csl_fast.evaluate: scores has {s.size} entries, labels {y.size}")
    if y.all() or not y.any():
        raise ValueError("csl_fast.evaluate: labels need both positives and negatives")
    return s, y


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (``sklearn.metrics.roc_auc_score``); 0.5 = chance."""
    from sklearn.metrics import roc_auc_score

    s, y = _pair(scores, labels)
    return float(roc_auc_score(y, s))


def aupr(scores: Any, labels: Any) -> float:
    """Area under the precision-recall curve as average precision
    (``sklearn.metrics.average_precision_score``); chance = the positive rate."""
    from sklearn.metrics import average_precision_score

    s, y = _pair(scores, labels)
    return float(average_precision_score(y, s))


def fpr_at_tpr(scores: Any, labels: Any, tpr: float = 0.95) -> float:
    """False-positive rate at the first ROC operating point whose true-positive rate is
    at least ``tpr`` (FPR@95TPR by default; lower is better). From
    ``sklearn.metrics.roc_curve`` with all thresholds kept."""
    from sklearn.metrics import roc_curve

    if isinstance(tpr, torch.Tensor) and tpr.numel() == 1 and tpr.is_floating_point():
        tpr = tpr.reshape(())  # a rate computed with torch
    try:
        # as written, within its own precision: float32 0.8 is 0.800000011920929, which
        # skipped the point where 4 of 5 positives are found
        wanted = rate("csl_fast.evaluate.fpr_at_tpr", "tpr", tpr)
    except (TypeError, ValueError):
        raise ValueError(
            f"csl_fast.evaluate.fpr_at_tpr: tpr must be a number in [0, 1], got {tpr!r}"
        ) from None
    s, y = _pair(scores, labels)
    fpr, tpr_curve, _ = roc_curve(y, s, drop_intermediate=False)
    positives = int(y.sum())
    found = np.rint(tpr_curve * positives)  # true positives at each point
    return float(fpr[np.searchsorted(found, share_up(wanted, positives), side="left")])


def detection_metrics(scores: Any, labels: Any) -> dict[str, float]:
    """``{"auroc", "aupr", "fpr@95tpr"}`` of one score against a ground-truth mask."""
    return {
        "auroc": auroc(scores, labels),
        "aupr": aupr(scores, labels),
        "fpr@95tpr": fpr_at_tpr(scores, labels, 0.95),
    }


def cosine_similarity(a: Any, b: Any) -> float:
    """Raw (uncentred) cosine similarity :math:`a\\cdot b / (\\|a\\|\\|b\\|)` (the paper's
    CS; NaN if either vector is zero)."""
    x, y = _np(a, "a"), _np(b, "b")
    _same_size(x, y, "a b")
    return _cosine(x, y)


def pearson(a: Any, b: Any) -> float:
    """Pearson correlation (the paper's PC; NaN if either vector is constant)."""
    x, y = _np(a, "a"), _np(b, "b")
    _same_size(x, y, "a b")
    # tested on the values: a constant's centred copy can keep a rounding residue (269.78...
    # minus its mean), which made the correlation 0.0
    if x.size == 0 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    # scaled first (the correlation does not change): the mean of values near the float
    # maximum overflowed to inf, which made it NaN
    x, y = x / np.abs(x).max(), y / np.abs(y).max()
    return _cosine(x - x.mean(), y - y.mean())


def _cosine(x: np.ndarray, y: np.ndarray) -> float:
    # Each vector scaled to its largest entry first: ||x|| ||y|| under- or overflowed for
    # values below 1e-154 or above 1e154, which gave NaN for non-zero vectors.
    x_max, y_max = np.abs(x).max(initial=0.0), np.abs(y).max(initial=0.0)
    if x_max == 0 or y_max == 0:
        return math.nan
    x, y = x / x_max, y / y_max
    return float(np.clip(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)), -1.0, 1.0))


def top_k_indices(values: Any, k: int) -> np.ndarray:
    """Indices of the ``k`` largest ``values`` (all ``N`` for a ``k`` of ``N`` or more), in
    descending order, less the run of ties across the ``k``-th: at most ``k`` of them
    (the samples strictly above the tied value), unless every one of the top ``k`` is
    tied, when the whole run is taken.

    Picking some of the tied samples by index made the set, and whatever is measured on
    it, depend on the dataset's order: of digits' 1797 samples 1648 have memorization 0,
    so its "179 most memorized" held 30 of them, the lowest-indexed; this takes the 149
    memorized ones (taking the whole run instead would take all 1797).
    """
    v = _np(values, "values")
    k = integer("csl_fast.evaluate.top_k_indices", "k", k, low=1)
    order = np.argsort(-v, kind="stable")
    if k >= v.size or v[order[k]] != v[order[k - 1]]:
        return order[:k]
    above = int(np.count_nonzero(v > v[order[k - 1]]))
    return order[: above or int(np.count_nonzero(v >= v[order[k - 1]]))]


def similarity(score: Any, memorization: Any, top_k: int | None = None) -> dict[str, float]:
    """Cosine similarity and Pearson correlation of ``score`` with ``memorization``.

    Returns ``{"cs_all", "pc_all"}`` and, with ``top_k``, ``{"cs_top", "pc_top"}`` on the
    samples :func:`top_k_indices` picks by memorization: the ``top_k`` most memorized, less
    a run of ties across the ``top_k``-th (the paper's "Top 5k" rows), with ``"n_top"``
    their number (``top_k`` of ``N`` or more takes every sample, as ``cs_all``).
    """
    s, m = _np(score, "score"), _np(memorization, "memorization")
    _same_size(s, m, "score memorization")
    if top_k is not None:
        top_k = integer("csl_fast.evaluate.similarity", "top_k", top_k, low=1)
    out = {"cs_all": cosine_similarity(s, m), "pc_all": pearson(s, m)}
    if top_k is not None:
        top = top_k_indices(m, top_k)
        out["cs_top"] = cosine_similarity(s[top], m[top])
        out["pc_top"] = pearson(s[top], m[top])
        out["n_top"] = top.size
    return out


def binned_trend(reference: Any, other: Any, bins: int = 10) -> dict[str, list[float]]:
    """Bins of ``reference`` (sorted ascending) and the mean of ``other`` in each.

    For the paper's theorem plots (e.g. memorization against CSL): samples are sorted by
    ``reference`` and split into contiguous groups of (almost) equal size, except that
    tied reference values always share a bin: each cut of ``numpy.array_split`` that falls
    inside a run of ties moves to the nearer end of that run. Bins may so be unequal in
    size, and fewer than ``bins`` (a run longer than a bin swallows cuts). (Split by
    dataset order, the same samples in another order gave other bin means.) Returns lists
    ``x`` (mean reference per bin), ``y`` (mean ``other``), ``y_std`` (std of ``other``)
    and ``count``.
    """
    r, o = _np(reference, "reference"), _np(other, "other")
    _same_size(r, o, "reference other")
    if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or not 1 <= bins <= r.size:
        raise ValueError(f"csl_fast.evaluate: bins must be an int in [1, {r.size}], got {bins!r}")
    order = np.argsort(r, kind="stable")
    out: dict[str, list[float]] = {"x": [], "y": [], "y_std": [], "count": []}
    for part in np.split(order, _tie_cuts(r[order], bins)):
        out["x"].append(float(r[part].mean()))
        out["y"].append(float(o[part].mean()))
        out["y_std"].append(float(o[part].std()))
        out["count"].append(int(part.size))
    return out


def _tie_cuts(ascending: np.ndarray, bins: int) -> list[int]:
    """``array_split``'s cut positions into ``ascending``, each moved out of its run of
    ties to the run's nearer end (the start on a draw), without repeats or empty bins."""
    n = ascending.size
    sizes = np.full(bins, n // bins)
    sizes[: n % bins] += 1
    cuts = []
    for c in np.cumsum(sizes)[:-1]:
        start = int(np.searchsorted(ascending, ascending[c], side="left"))
        end = int(np.searchsorted(ascending, ascending[c], side="right"))
        c = start if c - start <= end - c else end
        if 0 < c < n and (not cuts or c > cuts[-1]):
            cuts.append(c)
    return cuts
