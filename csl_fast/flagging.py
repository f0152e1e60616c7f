r"""The ground-truth-free count and threshold behind :func:`csl_fast.detect.mislabeled`.

Two estimators of how many samples are bad (mislabeled, conflicting duplicates), both
on fixed-size histograms: binning is O(N), every fit is O(bins), so 10 million scores
take about a second. :mod:`csl_fast.detect` explains when each is used; this module holds
the mathematics; ``docs/flagging.md`` holds the evidence for each constant and each
clause below (the runs they were chosen on, the runs held out, the alternatives rejected).

:func:`two_view_count` (needs the tracker's margin view)
    ``x = log(mean CSL)``. Samples whose given label *lost* (:func:`label_lost`: firmly
    on average over training, or confidently doubted for long) are pinned to the bad
    component; every other sample is shared by EM between ``K`` clean Gaussians on the
    log scale and one bad Gaussian on the *linear* mean-loss scale, whose density on the
    log scale carries the Jacobian ``e^x``:

    .. math::
        p(x) = \sum_{k=1}^{K} \pi_k\,\mathcal N(x; \mu_k, \sigma_k^2)
             + \pi_b\,\mathcal N(e^x; m_b, s_b^2)\,e^x .

    The bad component's weight ``pi_b`` counts the pinned samples too, and the free
    samples are shared with that weight as their prior. That is a choice, not the
    missing-at-random model (which would give the free samples the prior
    ``pi_b - n_pinned / N``): the label-lost samples are the bad samples with the
    *highest* loss, and under the missing-at-random prior the bad component shrinks onto
    them and counts little more than they are. Where the label-lost view is independent
    of the loss (synthetic scores) the pinned prior over-counts by about 10-15%.

    The estimate is the expected number of bad samples, ``n_pinned + sum_i P(bad | x_i)``
    over the free samples, for ``K = 2, 3, 4``; the ``K = 3`` value is reported. The
    interval spans the three widened by two Poisson standard errors (``2 sqrt(count)``)
    and the reported fit's overlap (the free samples in bins with ``0.1 < P(bad) < 0.9``,
    which could go either way).

    With ``n`` pinned, ``share = n / count``, and the reported fit *sure* of ``s`` of the
    free samples it adds (bins with ``P(bad) >= 0.9``) and *unsure* of ``u``
    (``0.1 < P(bad) < 0.9``), the count is

    * **cut to the pinned samples**, a lower bound (``diagnostics["caveat"] == "lower
      bound"``, the mixture's count and interval in ``["mixture_count"]`` and
      ``["mixture_interval"]``), when the bad component is the clean tail stretched from
      a few hard samples rather than a group of bad samples: ``share <``
      :data:`MIN_ANCHORED_SHARE`, ``n <`` :data:`MIN_ANCHORS_SURE` and ``s < u``; or
      ``share <`` :data:`UNSURE_SHARE` and ``s <`` :data:`MIN_SURE_RATIO` ``* u``; or
      ``n <`` :data:`MIN_ANCHORS_SURE`, ``count > n`` and ``s <`` :data:`MIN_SURE_RATIO`
      ``* u``;
    * else kept and called a **lower bound** when ``share <`` :data:`MIN_ANCHORED_SHARE`
      and ``s < u`` (the bad component's shape rests on few samples, and the flips the
      network memorized hide in the clean tail);
    * else kept with the caveat **"few anchors"** when ``n <`` :data:`MIN_ANCHORS_SURE`
      (too few to shape the bad component: the count may be off either way);
    * else kept with the caveat **"fit-dependent"** when the fits with 2, 3 and 4 clean
      components disagree by more than :data:`MAX_FIT_SPREAD` and by more than two
      Poisson standard errors of the largest (a group between the clean bulk and the
      pinned samples is a clean component in one fit and bad in another).

    Each caveat comes with a ``reason`` that says why and what to try;
    :func:`settled_by_valley` may then settle the count from the score's upper mode.
:func:`upper_mode` (any 1-D score)
    The valley (antimode) between the clean mode and a separate upper mode of a
    kernel-smoothed histogram; samples above the valley are counted. An upper mode must
    show excess mass over the valley level of at least :data:`MIN_EVIDENCE` Poisson
    standard errors, and a peak that beats the valley by :data:`MIN_LOCAL` standard
    errors in equal windows (so a sparse tail of isolated samples is no mode).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = [
    "BINS",
    "CLEAN_COMPONENTS",
    "DOUBT_PROB",
    "DOUBT_SPAN",
    "LOST_PROB",
    "MAX_BINS",
    "MAX_FIT_SPREAD",
    "MIN_ANCHORED_SHARE",
    "MIN_ANCHORS_SURE",
    "MIN_DOUBT_UNIT",
    "MIN_PINNED",
    "MIN_SURE_RATIO",
    "MIXTURE_BINS",
    "NEGATIVE_FLOOR",
    "NEGATIVE_TOLERANCE",
    "TOL",
    "UNSETTLED",
    "UNSURE_SHARE",
    "Estimate",
    "doubted",
    "label_lost",
    "rule_scale",
    "settled_by_valley",
    "two_view_count",
    "upper_mode",
]

#: Histogram bins of both estimators (resolution ``range / BINS`` on the fitted scale).
BINS = 4096
#: Histogram bins of the two-view mixture (the EM runs over bins, not samples).
MIXTURE_BINS = 256
#: Most histogram bins either estimator takes.
MAX_BINS = 1 << 16
#: Clean components of the two-view mixture: the reported fit, then the interval's others.
CLEAN_COMPONENTS = (3, 2, 4)
#: EM stops when the expected bad count moves by less than this in one iteration. EM
#: crawls on these fits: the count is reproducible for a given input and lies within a few
#: percent of the fully converged optimum (which costs 10-100x more iterations).
TOL = 1e-4
#: Fewest label-lost samples the two-view fit needs (fewer: the 1-D rule is used).
MIN_PINNED = 3
#: Least share of the count that the pinned samples must make up for the count to be
#: more than a lower bound (see :func:`two_view_count`).
MIN_ANCHORED_SHARE = 0.2
#: Fewer pinned samples than this: the count is returned with a caveat that it rests on
#: too few of them to be trusted either way (see :func:`two_view_count`).
MIN_ANCHORS_SURE = 10
#: Below this anchored share the count is also cut to the anchors, however many, when the
#: fit is sure (``P(bad) >= 0.9``) of fewer than :data:`MIN_SURE_RATIO` times the free
#: samples it adds as it is unsure of (see :func:`two_view_count`).
UNSURE_SHARE = 0.4
#: ... see :data:`UNSURE_SHARE`.
MIN_SURE_RATIO = 0.1
#: When the fits with 2, 3 and 4 clean components disagree by more than this factor (and
#: by more than two Poisson standard errors), the count is returned with a caveat that it
#: depends on the fit (see :func:`two_view_count`).
MAX_FIT_SPREAD = 1.5
#: A confidently doubted label had probability below ``DOUBT_PROB / (C - 1)`` on average
#: while it was doubted (the network at least 80% sure of another class, the rest shared
#: by the ``C - 1`` others: 0.022 on 10 classes, 0.2 on 2), see :func:`doubted`.
DOUBT_PROB = 0.2
#: ... for at least this many times the median sample's doubt, see :func:`doubted`.
DOUBT_SPAN = 3.0
#: ... the median doubt counted as at least this many presentations (one epoch's worth
#: of doubt), see :func:`doubted`.
MIN_DOUBT_UNIT = 1.0
#: A negative mean margin pins a sample only when the label's probability sat below
#: ``LOST_PROB / C`` on average while it was doubted, see :func:`label_lost`.
LOST_PROB = 0.6
#: Least excess mass of an upper mode, in Poisson standard errors (1-D rule).
MIN_EVIDENCE = 3.0
#: Least peak-over-valley contrast in equal windows, in standard errors (1-D rule).
MIN_LOCAL = 2.0
#: Largest valley-to-peak density ratio of an upper mode (1-D rule).
MAX_VALLEY_RATIO = 0.7
#: What a *weaker* upper mode needs, one that may only raise a two-view count that has
#: no caveat and whose interval already holds the mode's count (see
#: :func:`settled_by_valley`): one standard error of excess mass and of peak-vs-valley
#: contrast, and no bound on the valley's depth.
WEAK_MODE = (1.0, 1.0, 1.0)


@dataclass
class Estimate:
    """An estimated number of bad samples and what it rests on.

    Attributes:
        found: the estimator found bad samples (``count > 0``).
        count: the estimated number of bad samples.
        interval: ``(low, high)`` around ``count``.
        cut: for :func:`upper_mode`, the valley on the rule's scale (``z > cut`` are
            counted); ``inf`` when nothing is, ``nan`` for :func:`two_view_count`.
        diagnostics: the numbers behind the decision (JSON-able).
        reason: why nothing was found; when something was, why the count is only a
            lower bound (``None`` when it is an estimate).
    """

    found: bool
    count: int
    interval: tuple[int, int]
    cut: float = math.nan
    diagnostics: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None


#: Tolerance of :func:`rule_scale` for values below 0, relative to the median ``|value|``
#: (the bulk's scale, which a tail of bad samples cannot stretch, as it did the largest
#: value's: a signed loss with targets 40 sd off then passed for rounding, went to the log
#: scale and flagged nothing). A loss that is >= 0 in exact arithmetic rounds a hair below
#: it in float32 (``F.kl_div`` of identical rows: -1.7e-7, ~1.7e-4 of its bulk), and one
#: such value sent the whole score to the raw scale; a loss that is negative by nature has
#: negatives on its bulk's scale (a Gaussian NLL's CSL near 0: ~0.35 of it; a bulk shifted
#: just below 0: 2e-3).
NEGATIVE_TOLERANCE = 1e-3
#: The least tolerance of :func:`rule_scale`, absolute: float32 rounding of a loss whose
#: terms are of order 1 cancels to at most ~3e-7 below 0 whatever the result (``F.kl_div``
#: of identical rows, C = 10 to 32000), so a score fitted near 0 (a final KL with median
#: ~1e-5) went to the raw scale on it; a signed loss's negatives are far larger.
NEGATIVE_FLOOR = 1e-6


def rule_scale(values: torch.Tensor) -> tuple[np.ndarray, str]:
    """The finite ``values`` (float64 numpy) on the 1-D rule's scale, and its name.

    A non-negative score (CSL, mean loss, ...) is taken in ``log`` (zeros clipped to
    ``1e-12 * max``): its clean mode is compact there and bad samples sit a roughly
    constant factor above it. A score with negative values (two-sided, such as the
    negated AUM) keeps its own scale, ``"identity"``, where the valley test is weaker.
    Values below 0 by at most :data:`NEGATIVE_TOLERANCE` of the median ``|value|``, or
    :data:`NEGATIVE_FLOOR`, are rounding errors of a non-negative loss and count as 0.
    """
    v = values.detach()
    v = v[torch.isfinite(v)].double().cpu().numpy()
    tol = max(NEGATIVE_TOLERANCE * np.median(np.abs(v)), NEGATIVE_FLOOR) if v.size else 0.0
    if v.size and v.max() > 0 and v.min() >= -tol:
        return np.log(np.maximum(v, 1e-12 * v.max())), "log"
    return v, "identity"


def _check_tensors(where: str, **tensors: Any) -> None:
    """Refuse with a clear error anything but real tensors with data."""
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"csl_fast.flagging.{where}: {name} must be a torch.Tensor, got "
                f"{type(t).__name__} (convert it with torch.as_tensor)"
            )
        if t.is_complex() or t.is_meta:
            raise ValueError(
                f"csl_fast.flagging.{where}: {name} must be a real tensor with data, got "
                f"{'a complex' if t.is_complex() else 'a meta'} tensor"
            )


def _check_bins(bins: Any, where: str) -> int:
    # the valley search is quadratic in the bins (1e6 bins ran for minutes), and 2**16
    # resolves a score's range far finer than any mode it looks for
    if (
        isinstance(bins, bool)
        or not isinstance(bins, numbers.Integral)
        or not 2 <= bins <= MAX_BINS
    ):
        raise ValueError(
            f"csl_fast.flagging.{where}: bins must be an int in [2, {MAX_BINS}], got {bins!r}"
        )
    return int(bins)


# ------------------------------------------------------------------- anchors
def doubted(
    csl_sum: torch.Tensor, csl_count: torch.Tensor, p_true_sum: torch.Tensor, num_classes: int
) -> torch.Tensor:
    r"""bool ``[N]``: the given label was *confidently doubted for long*, a view of the
    training run that stops changing once the network has fitted every sample.

    With ``p_t`` the probability of the given label at presentation ``t``,
    ``D = sum_t (1 - p_t) = csl_count - p_true_sum`` measures how long (in presentations)
    and how much the label was doubted, and

    .. math::
        \frac{\text{CSL}}{D} = \frac{\sum_t -\log p_t}{\sum_t (1 - p_t)}
        = \sum_t w_t\, g(p_t), \quad w_t \propto 1 - p_t,\ g(p) = \frac{-\log p}{1 - p}

    is a doubt-weighted average of ``g``, which decreases from ``inf`` (p = 0) to 1
    (p = 1): it reads how *low* the label's probability was while it was doubted. A label
    is confidently doubted when ``CSL / D > g(p*)``, ``p* = DOUBT_PROB / (C - 1)`` (the
    network preferred another class firmly, as it does for a flipped label, rather than
    hesitating as on a hard clean sample: with ``1 - q`` left over from its preferred
    class and shared by the ``C - 1`` classes it did not prefer, ``p* `` is the given
    label's share at ``q = 1 - DOUBT_PROB = 0.8``), and
    ``D > DOUBT_SPAN * max(median(D), MIN_DOUBT_UNIT)`` (for longer than a brief
    instability early in training; the median over a strided subsample of at most ~100k
    presented samples, O(1) in N).

    The median counts as at least one presentation (``MIN_DOUBT_UNIT``): a network that
    fits the typical sample within its first presentation would otherwise call a label
    hesitated over for an epoch or two doubted for long, while a flip is doubted for
    several presentations (never fewer than 7 on the flagging benchmarks). ``p*`` is over
    ``C - 1``, not ``C``: a fifth of chance on two classes would ask for a network 90%
    sure of the other class, and binary flips, memorized from a loss of only ``log 2``,
    are rarely doubted that firmly.

    Why this view and not only the sign of the mean margin: once the network memorizes a
    flipped label, every further epoch adds a growing positive margin, so the mean margin
    of every flip turns positive if the run is long enough (MNIST-1D at 100 epochs: 0 of
    200 flips). ``CSL``, ``D`` and their ratio stop growing once ``p_t`` is ~1, so this
    view gives the same answer at 50 and 100 epochs (``benchmarks/flagging.py``).

    The constants' working range is narrow (``docs/flagging.md``, "The doubt view's
    constants"): a longer span pins no flip of a run trained long after memorizing,
    a shorter one or a higher probability pins hard clean samples on clean runs.

    Args:
        csl_sum, csl_count, p_true_sum: the tracker's float ``[N]`` buffers.
        num_classes: ``C >= 2``.
    """
    presented, csl, d = _doubt(csl_sum, csl_count, p_true_sum, num_classes, "doubted")
    return _doubted(presented, csl, d, num_classes)


def _doubted(
    presented: torch.Tensor, csl: torch.Tensor, d: torch.Tensor, num_classes: int
) -> torch.Tensor:
    """:func:`doubted` on the checked float64 ``(presented, CSL, D)`` of :func:`_doubt`."""
    if not bool(presented.any()):
        return presented
    pd = d[presented]
    med = float(pd[:: max(1, pd.numel() // 100_000)].median())
    p = DOUBT_PROB / (int(num_classes) - 1)
    return presented & (d > DOUBT_SPAN * max(med, MIN_DOUBT_UNIT)) & _firm(csl, d, p)


def label_lost(
    csl_sum: torch.Tensor,
    csl_count: torch.Tensor,
    p_true_sum: torch.Tensor,
    margin_sum: torch.Tensor,
    num_classes: int,
) -> torch.Tensor:
    r"""bool ``[N]``: the samples :func:`two_view_count` pins to the bad component (its
    ``lost`` argument, as :func:`csl_fast.detect.mislabeled` forms it from a tracker).

    A sample is pinned when its label **lost firmly**: the mean margin over training is
    negative (another class beat the label on average, the sign of AUM) *and* the label's
    probability sat below ``LOST_PROB / C`` while it was doubted (``CSL / D > g(LOST_PROB
    / C)``, with ``D`` and ``g`` as in :func:`doubted`); **or** it was confidently
    doubted for long (:func:`doubted`).

    Why the margin alone is not enough: it says that the network did not fit the label,
    not why. A flipped label is rejected firmly (the network predicts the true class),
    but a hard clean sample that the network never fits (data augmentation, weight
    decay, overlapping classes, a run stopped before the labels are fitted) is hesitated
    over, its label's probability near chance or above; pinned, such samples made clean
    training sets trained with augmentation flag several percent of their samples.
    ``LOST_PROB = 0.6`` sits between 0.5, which leaves label smoothing's flips (smoothing
    keeps a flip's probability near a tenth on 10 classes) too few anchors, and 1.0
    (chance), which pins hesitant clean samples again. Its limit is stronger smoothing,
    under which few flips lose firmly (``docs/flagging.md``, "Under common training
    practice").

    Args:
        csl_sum, csl_count, p_true_sum, margin_sum: the tracker's float ``[N]`` buffers.
        num_classes: ``C >= 2``.
    """
    presented, csl, d = _doubt(csl_sum, csl_count, p_true_sum, num_classes, "label_lost")
    _check_tensors("label_lost", margin_sum=margin_sum)
    if margin_sum.shape != csl_sum.shape:
        raise ValueError(
            "csl_fast.flagging.label_lost: margin_sum must be [N] like csl_sum, got "
            f"{tuple(margin_sum.shape)} and {tuple(csl_sum.shape)}"
        )
    firm = (
        presented
        & (margin_sum.detach().to(csl.device) < 0)
        & _firm(csl, d, LOST_PROB / int(num_classes))
    )
    return firm | _doubted(presented, csl, d, num_classes)


def _doubt(
    csl_sum: torch.Tensor,
    csl_count: torch.Tensor,
    p_true_sum: torch.Tensor,
    num_classes: int,
    where: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(presented, CSL, D)`` in float64, the arguments checked."""
    if (
        isinstance(num_classes, bool)
        or not isinstance(num_classes, numbers.Integral)
        or num_classes < 2
    ):
        raise ValueError(
            f"csl_fast.flagging.{where}: num_classes must be an int >= 2, got {num_classes!r}"
        )
    _check_tensors(where, csl_sum=csl_sum, csl_count=csl_count, p_true_sum=p_true_sum)
    if not csl_sum.shape == csl_count.shape == p_true_sum.shape:
        raise ValueError(
            f"csl_fast.flagging.{where}: csl_sum, csl_count and p_true_sum must all be [N], "
            f"got {tuple(csl_sum.shape)}, {tuple(csl_count.shape)} and "
            f"{tuple(p_true_sum.shape)}"
        )
    count = csl_count.detach().double()
    d = count - p_true_sum.detach().double()
    csl = csl_sum.detach().double()
    presented = (count > 0) & torch.isfinite(csl) & torch.isfinite(d)
    return presented, csl, d


def _firm(csl: torch.Tensor, d: torch.Tensor, p: float) -> torch.Tensor:
    """``CSL > g(p) D``: the label's probability sat below ``p`` on average while it was
    doubted (see :func:`doubted`)."""
    return csl > (-math.log(p) / (1.0 - p)) * d


# ------------------------------------------------------------------- two-view mixture
def _norm_logpdf(x: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    return -0.5 * (np.log(2 * math.pi * var) + (x - mu) ** 2 / var)


def _fit(
    c: np.ndarray, free: np.ndarray, pinned: tuple[int, float, float], k: int, iters: int = 1000
) -> tuple[float, dict[str, Any]]:
    """EM on bin centres ``c`` (log mean loss) with ``free`` counts per bin and ``k``
    clean components; ``pinned = (n, sum L, sum L^2)`` of the samples fixed to the bad
    component (L = mean loss). Returns ``(expected bad count among the free samples,
    fitted parameters)``.
    """
    lin = np.exp(c)
    n_pinned, s1p, s2p = pinned
    total = free.sum()
    cum = np.cumsum(free) / max(total, 1.0)
    # clean components start on equal-mass slices of the free samples
    edges = np.searchsorted(cum, np.linspace(0, 1, k + 1)[1:-1])
    r = np.zeros((c.size, k + 1))
    r[np.arange(c.size), np.searchsorted(edges, np.arange(c.size), side="right")] = 1.0
    floor = (c[1] - c[0]) ** 2 if c.size > 1 else 1e-6
    prev = None
    for it in range(iters):  # noqa: B007 (it is reported)
        w = r * free[:, None]
        nk = w[:, :k].sum(0) + 1e-12
        mu = (w[:, :k] * c[:, None]).sum(0) / nk
        var = np.maximum((w[:, :k] * (c[:, None] - mu) ** 2).sum(0) / nk, floor)
        nb = w[:, k].sum() + n_pinned
        mb = ((w[:, k] * lin).sum() + s1p) / nb
        vb = max(((w[:, k] * lin**2).sum() + s2p) / nb - mb**2, 1e-12 + 1e-6 * mb**2)
        n_all = total + n_pinned
        lp = np.empty_like(r)
        lp[:, :k] = np.log(nk / n_all) + _norm_logpdf(c[:, None], mu, var)
        lp[:, k] = np.log(nb / n_all) + _norm_logpdf(lin, mb, vb) + c
        lp -= lp.max(1, keepdims=True)
        r = np.exp(lp)
        r /= r.sum(1, keepdims=True)
        bad = float((r[:, k] * free).sum())
        if prev is not None and abs(bad - prev) < TOL:
            break
        prev = bad
    params = {
        "clean_means": mu.tolist(),
        "clean_sds": np.sqrt(var).tolist(),
        "clean_weights": (nk / n_all).tolist(),
        "bad_mean_loss": float(mb),
        "bad_sd_loss": float(math.sqrt(vb)),
        "bad_weight": float(nb / n_all),
    }
    params["em_iterations"] = it + 1
    # the overlap: free samples whose bin the fit cannot call (0.1 < P(bad) < 0.9)
    amb = (r[:, k] > 0.1) & (r[:, k] < 0.9)
    params["ambiguous_bad"] = float((r[amb, k] * free[amb]).sum())
    params["ambiguous_clean"] = float(((1 - r[amb, k]) * free[amb]).sum())
    sure = r[:, k] >= 0.9
    params["confident_bad"] = float((r[sure, k] * free[sure]).sum())
    return bad, params


def two_view_count(
    mean_loss: torch.Tensor, lost: torch.Tensor, *, bins: int = MIXTURE_BINS
) -> Estimate:
    """How many samples are bad, from the mean loss and the label-lost view.

    Args:
        mean_loss: float ``[N]`` mean training loss per sample (CSL / presentations);
            non-finite or non-positive entries (never presented) are left out.
        lost: bool ``[N]``: the sample's given label lost: its mean margin is negative
            (another class won on average over training) or it was confidently doubted
            for long (:func:`doubted`). These samples are pinned to the bad component.
        bins: histogram bins of the mixture, an int in ``[2, MAX_BINS]``.

    Returns:
        an :class:`Estimate`; ``found`` is False (with a reason) when fewer than
        :data:`MIN_PINNED` usable samples lost, when the caller should use the 1-D rule.
    """
    _check_tensors("two_view_count", mean_loss=mean_loss, lost=lost)
    bins = _check_bins(bins, "two_view_count")
    if mean_loss.shape != lost.shape or mean_loss.dim() != 1:
        raise ValueError(
            "csl_fast.flagging.two_view_count: mean_loss and lost must both be [N], got shapes "
            f"{tuple(mean_loss.shape)} and {tuple(lost.shape)}"
        )
    if lost.dtype != torch.bool:
        # astype(bool) counted 0.5 and NaN entries as lost, pinning them
        raise TypeError(
            f"csl_fast.flagging.two_view_count: lost must be a bool mask [N], got {lost.dtype}; "
            "pass a comparison's result (label_lost(...) gives one)"
        )
    m = mean_loss.detach().double().cpu().numpy()
    lost_np = lost.detach().cpu().numpy()
    ok = np.isfinite(m) & (m > 0)
    x = np.log(m[ok])
    pin = lost_np[ok]
    n_pinned = int(pin.sum())
    diag: dict[str, Any] = {"estimator": "two_view", "finite": int(x.size), "label_lost": n_pinned}
    if x.size == 0:
        fitted = int(np.isfinite(m).sum())
        why = (
            f"the mean loss of every one of the {fitted} presented samples is 0 or less (one "
            "class, or every label fitted from the first presentation): no sample stands out"
            if fitted
            else "no sample has a finite mean loss (none was presented in training)"
        )
    elif n_pinned < MIN_PINNED:
        one = n_pinned == 1
        why = (
            f"only {n_pinned} sample{'' if one else 's'} lost {'its' if one else 'their'} "
            "label firmly (a negative mean margin, the label's probability far below chance "
            f"while doubted) or {'was' if one else 'were'} confidently doubted "
            f"(csl_fast.flagging.label_lost); the two-view fit needs >= {MIN_PINNED}"
        )
    elif x.size - n_pinned < 20:
        why = (
            f"{n_pinned} of the {x.size} presented samples lost their label: "
            "too few others are left to fit the clean samples' distribution (needs >= 20)"
        )
    else:
        why = None
    if why is not None:
        return Estimate(False, 0, (0, 0), diagnostics=diag, reason=why)
    # the easiest 0.1% (surely clean) share the first bin, so a far lower tail does not
    # spend the bins; the quantile comes from a strided subsample (O(1) in N)
    lo = max(float(x.min()), float(np.quantile(x[:: max(1, x.size // 100_000)], 0.001)))
    hi = float(x.max())
    if hi <= lo:
        hi = lo + 1e-9
    free, edges = np.histogram(np.clip(x[~pin], lo, hi), bins, (lo, hi))
    # The bad component's squares overflow past a mean loss of ~1e154 (float64 scores
    # only: a tracker's float32 CSL is inf long before); the mixture is shift-invariant on
    # the log scale and scale-equivariant on the linear one, so such scores are fitted in
    # units of the largest.
    unit = hi if hi > 300.0 else 0.0
    c = 0.5 * (edges[1:] + edges[:-1]) - unit
    lp = np.exp(x[pin] - unit)
    pinned = (n_pinned, float(lp.sum()), float((lp**2).sum()))
    counts: list[float] = []
    fits: list[dict[str, Any]] = []
    for k in CLEAN_COMPONENTS:
        bad, params = _fit(c, free.astype(np.float64), pinned, k)
        if unit:
            params["clean_means"] = [mu + unit for mu in params["clean_means"]]
            params["bad_mean_loss"] *= math.exp(unit)
            params["bad_sd_loss"] *= math.exp(unit)
        counts.append(n_pinned + bad)
        fits.append({"clean_components": k, "count": n_pinned + bad, **params})
    count = round(counts[0])
    diag["anchored_share"] = n_pinned / max(count, 1)
    # the interval spans (a) the fits with 2, 3 and 4 clean components, widened by two
    # Poisson standard errors, and (b) the reported fit's overlap: the free samples in
    # bins it cannot call (0.1 < P(bad) < 0.9) could all go either way
    noise = 2.0 * math.sqrt(max(count, 1))
    low = min(min(counts) - noise, counts[0] - fits[0]["ambiguous_bad"])
    high = max(max(counts) + noise, counts[0] + fits[0]["ambiguous_clean"])
    low, high = max(n_pinned, math.floor(low)), min(x.size, math.ceil(high))
    diag.update(fits=fits)
    caveat = None
    sure, unsure = fits[0]["confident_bad"], fits[0]["ambiguous_bad"]
    share = diag["anchored_share"]
    if (
        (share < MIN_ANCHORED_SHARE and n_pinned < MIN_ANCHORS_SURE and sure < unsure)
        or (share < UNSURE_SHARE and sure < MIN_SURE_RATIO * unsure)
        or (n_pinned < MIN_ANCHORS_SURE and count > n_pinned and sure < MIN_SURE_RATIO * unsure)
    ):
        # the anchors stretched by samples the fit cannot call: the clean tail, not a group
        # of bad samples (a clean run whose network doubted 4 hard samples counted 66 of
        # 4,000, 46 of them unsure; one that rejected 18 firmly, 77, none sure; one that
        # rejected 9, 22 of 1,797, none sure), so only the anchors count
        diag.update(caveat="lower bound", mixture_count=count, mixture_interval=[low, high])
        caveat = (
            f"only {n_pinned} samples lost their label firmly or were confidently doubted, "
            f"and the mixture would count {count}, {count / n_pinned:.1f}x as many, adding "
            "mostly samples it cannot call (P(bad) between 0.1 and 0.9: "
            f"{unsure:.0f}, against {sure:.0f} it is sure of): the clean tail, as on a "
            "clean run with a few hard samples that lost firmly, not a group of bad "
            f"samples. The count is cut to those {n_pinned}: a lower bound. If the labels "
            "may be noisy, the rest hide in the clean tail (labels memorized as fast as "
            "clean ones: class-pair flips, a network that does not generalise): review the "
            "ranking below them"
        )
        count, low = n_pinned, n_pinned
    elif share < MIN_ANCHORED_SHARE and sure < unsure:
        # a low share alone is no alarm: under label smoothing few flips lose firmly but
        # the fit is sure of most of what it adds, and those counts were within 15%
        diag["caveat"] = "lower bound"
        caveat = (
            f"only {n_pinned} of the {count} counted samples lost their label or were "
            "confidently doubted, and the fit is unsure (P(bad) between 0.1 and 0.9) of "
            f"more of the samples it adds ({unsure:.0f}) than it is sure of ({sure:.0f}): "
            "the bad component's shape rests on few samples, so the "
            "count rests on the mixture's shape more than on the run. Usually the rest of "
            "the bad labels hide in the clean tail (labels memorized fast: class-pair flips, "
            "a network that does not generalise): treat the count as a lower bound. But "
            "when only a handful lost, as on a nearly clean run (or one trained with data "
            "augmentation, where a few hard clean samples lose firmly too), the flagged set "
            "may be mostly hard clean samples: review it before acting on it"
        )
    elif n_pinned < MIN_ANCHORS_SURE:
        # (digits trained with label smoothing 0.2, which keeps flipped labels from
        # losing firmly: 3 pinned, a count of 3 for 89 flips)
        diag["caveat"] = "few anchors"
        caveat = (
            f"only {n_pinned} samples lost their label firmly or were confidently doubted "
            f"(fewer than {MIN_ANCHORS_SURE}): the bad component's shape rests on so few "
            "that the count could be off either way; review the flagged set and the ranking "
            "just below it"
        )
    elif max(counts) > MAX_FIT_SPREAD * min(counts) and max(counts) - min(counts) > 2.0 * (
        math.sqrt(max(counts))
    ):
        # a group between the clean bulk and the surely bad samples, which one fit gives a
        # clean component of its own and another gives the bad one: the run cannot say
        # which (MNIST, an MLP at 10% flips: 2 / 3 / 4 clean components counted 830 / 448
        # / 435 for 1,000 flips, the group was flips memorized part-way)
        diag["caveat"] = "fit-dependent"
        by_k = " / ".join(
            str(round(n)) for _, n in sorted(zip(CLEAN_COMPONENTS, counts, strict=True))
        )
        caveat = (
            "the count depends on the mixture's shape: with 2, 3 or 4 clean components it "
            f"comes out as {by_k}, more than "
            f"{MAX_FIT_SPREAD:g}x apart. A group of samples between the clean bulk and the "
            "surely bad ones is clean in one fit and bad in another, and the run does not "
            "say which (on MNIST with an MLP at 10% flips it was flips memorized part-way: "
            f"the count was 0.45x the truth, the largest fit 0.83x). The interval {low}-{high} "
            f"holds both readings: review the ranking down to {round(max(counts))} before "
            "acting on the flagged set"
        )
    return Estimate(count > 0, count, (low, high), diagnostics=diag, reason=caveat)


#: The caveats of :func:`two_view_count` under which its count could be off either way,
#: so that a separate upper mode of the score settles it (see :func:`settled_by_valley`,
#: which also raises a ``"lower bound"`` to such a mode).
UNSETTLED = ("fit-dependent", "few anchors")


def settled_by_valley(est: Estimate, values: torch.Tensor) -> Estimate:
    """The two-view estimate ``est``, its count replaced by the 1-D valley rule's when the
    mixture could not settle it and the score ``values`` (float ``[N]``, the one ranked)
    has a separate upper mode.

    Applies when ``est`` carries a caveat of :data:`UNSETTLED` (the fits with 2, 3 and 4
    clean components disagree, or too few samples are pinned to shape the bad component)
    and :func:`upper_mode` of ``values`` (only run then) finds a mode: its count, which
    rests on no mixture shape, is used (never below the pinned samples), the interval
    spans both, and ``reason`` says so (``diagnostics["count_source"] == "valley"``, the
    mixture's count in ``["mixture_count"]``). A count with the caveat ``"lower bound"``
    is settled the same way when the mode holds more samples than it (a lower bound is
    only raised). A count with no caveat is raised, with no warning, to the count of a
    weaker upper mode (:data:`WEAK_MODE`: one standard error of evidence on each test)
    when that count is above it and inside its interval (``["raised"]``, the interval
    kept). Otherwise ``est`` is returned as it is.

    Why: the valley's count rests on no mixture shape, only on a dip in the score's
    density, and where the valley rule found an upper mode on the flagging benchmarks its
    count was within 30% of the flips every time. A separate upper mode also contradicts
    a lower bound's reading that the mixture stretched its anchors into the clean tail.
    And a count without caveat can be low because the bad component is shaped by its
    anchors, the flips rejected firmly, at the top of the bad group: where the memorized
    flips sit lower, overlapping the clean tail, a clean component takes the lowest of
    them; a weak mode whose count the mixture's interval holds says where the group ends.
    Only raising: a weak valley below the count cuts inside the bad group. The raise can
    overshoot by up to about a seventh when the weak valley sits where the clean tail ends;
    ``diagnostics["raised"]`` marks it. Evidence: ``docs/flagging.md``, "When the mixture
    cannot settle the count, a separate upper mode of the score does".
    """
    caveat = est.diagnostics.get("caveat")
    if not est.found:
        return est
    if caveat is None:
        return _raised_by_weak_mode(est, values)
    if not (caveat in UNSETTLED or caveat == "lower bound"):
        return est
    valley = upper_mode(values)
    # a lower bound is only ever raised: a mode that holds fewer samples says nothing new
    if not valley.found or (caveat == "lower bound" and valley.count <= est.count):
        return est
    pinned = int(est.diagnostics.get("label_lost", 0))
    count = max(valley.count, pinned)
    low = min(est.interval[0], valley.interval[0], count)
    high = max(est.interval[1], valley.interval[1], count)
    diag = _valley_diagnostics(est, valley)
    if caveat == "lower bound":
        unsettled = (
            f"the two-view count, {est.count}, is only a lower bound ({pinned} samples lost "
            "their label firmly or were confidently doubted, and the mixture could not say "
            "how many of the others are bad)"
        )
    elif caveat == "fit-dependent":
        fits = sorted(est.diagnostics["fits"], key=lambda f: f["clean_components"])
        unsettled = (
            "the mixture's count depends on its shape (with 2, 3 or 4 clean components: "
            + " / ".join(str(round(f["count"])) for f in fits)
            + ")"
        )
    else:
        unsettled = (
            f"only {pinned} samples lost their label firmly or were confidently doubted, "
            f"too few to shape the mixture's bad component (it counted {est.count})"
        )
    reason = (
        f"{unsettled}. The score's histogram has a separate upper mode, though, and the "
        f"1-D valley rule, which rests on no mixture shape, counts {valley.count} above its "
        f"valley: {count} are flagged (interval {low}-{high}). Review the flagged set's "
        "lower end, where bad and hard clean samples meet"
    )
    return Estimate(True, count, (low, high), diagnostics=diag, reason=reason)


def _raised_by_weak_mode(est: Estimate, values: torch.Tensor) -> Estimate:
    """``est`` (a two-view count without a caveat) raised to the count of a weaker upper
    mode of ``values`` (:data:`WEAK_MODE`) when that count is larger and inside ``est``'s
    interval; ``est`` itself otherwise. See :func:`settled_by_valley`."""
    _check_tensors("settled_by_valley", values=values)
    valley = _upper_mode(values, BINS, WEAK_MODE)
    if not valley.found or not est.count < valley.count <= est.interval[1]:
        return est
    diag = {**_valley_diagnostics(est, valley), "raised": True}
    return Estimate(True, valley.count, est.interval, diagnostics=diag)


def _valley_diagnostics(est: Estimate, valley: Estimate) -> dict[str, Any]:
    """``est``'s diagnostics once ``valley``'s count replaces its own: the mixture's count
    and interval kept (from before a cut to the anchors, when there was one)."""
    return {
        **est.diagnostics,
        "count_source": "valley",
        "mixture_count": est.diagnostics.get("mixture_count", est.count),
        "mixture_interval": list(est.diagnostics.get("mixture_interval", est.interval)),
        "valley": valley.diagnostics,
    }


# ------------------------------------------------------------------------ 1-D valley
def _smoothed(z: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """``(counts, density, bin centres, bandwidth)``: a histogram of ``z`` padded by 4
    bandwidths on each side and smoothed with a Gaussian of Silverman's robust bandwidth
    ``0.9 min(sd, IQR / 1.34) n^{-1/5}`` (sd and IQR read off the histogram)."""
    lo, hi = float(z.min()), float(z.max())
    counts, edges = np.histogram(z, bins, (lo, hi))
    centres = 0.5 * (edges[1:] + edges[:-1])
    n = z.size
    cum = np.cumsum(counts)
    q1, q3 = centres[np.searchsorted(cum, [0.25 * n, 0.75 * n])]
    mean = float((counts * centres).sum() / n)
    sd = math.sqrt(max(float((counts * (centres - mean) ** 2).sum() / n), 0.0))
    spread = min(sd, (q3 - q1) / 1.34) if q3 > q1 else sd
    bw = (hi - lo) / bins
    h = max(0.9 * spread * n**-0.2, 2 * bw)
    pad = math.ceil(4 * h / bw)
    counts = np.concatenate([np.zeros(pad), counts, np.zeros(pad)])
    centres = lo + bw * (np.arange(-pad, bins + pad) + 0.5)
    x = np.arange(-pad, pad + 1) * bw
    kernel = np.exp(-0.5 * (x / h) ** 2)
    density = np.convolve(counts, kernel / kernel.sum(), mode="same")
    return counts, density, centres, h


def _point_mass(z: np.ndarray, at: float, h: float) -> np.ndarray | None:
    """bool mask of the samples tied at ``at`` when every sample within two bandwidths of
    it has one value (at least two samples); ``None`` otherwise. Two equal Gaussian
    kernels further apart than ``2 h`` leave a dip between them, so the smoothed density
    falls on both sides of such a value: it is a "mode" whatever its neighbours."""
    near = np.abs(z - at) <= 2 * h
    if int(near.sum()) < 2:
        return None
    values = z[near]
    if float(values.min()) != float(values.max()):
        return None
    return z == values[0]


def _discrete(
    values: torch.Tensor, z: np.ndarray, mode: float, h: float
) -> tuple[dict[str, Any], str] | None:
    """``(point mass, reason)`` when the clean mode of :func:`upper_mode` is a point mass
    of ``z`` (:func:`_point_mass`), ``None`` otherwise."""
    spike = _point_mass(z, mode, h)
    if spike is None:
        return None
    v = values.detach()
    tied = v[torch.isfinite(v)].double().cpu().numpy()[spike]
    same = float(tied.min()) == float(tied.max())
    mass = {"value": float(tied[0]) if same else None, "samples": int(spike.sum())}
    what = (
        f"equal {float(tied[0]):.6g}"
        if same  # else below 1e-12 x the largest: rule_scale's floor
        else "lie on the log scale's floor (1e-12 x the largest score)"
    )
    why = (
        f"{mass['samples']} of the {z.size} finite scores {what}, with no other value within "
        "two bandwidths: the clean mode is a point mass (a count, a flag, epochs, or exact "
        "zeros, which the log scale puts far below every positive score), and the valley "
        "rule, which compares the modes of a density, would call each higher value a "
        "separate mode; rule='threshold' flags the scores above a value of your choice"
    )
    return mass, why


def _running_argmin(d: np.ndarray) -> np.ndarray:
    """``out[j]`` = index of the minimum of ``d[0..j]`` (the first one on ties)."""
    running = np.minimum.accumulate(d)
    is_new = np.empty(d.size, dtype=bool)
    is_new[0] = True
    is_new[1:] = d[1:] < running[:-1]
    return np.maximum.accumulate(np.where(is_new, np.arange(d.size), 0))


def upper_mode(values: torch.Tensor, *, bins: int = BINS) -> Estimate:
    """Count the samples of a separate upper mode of ``values`` (float ``[N]``;
    non-finite entries ignored), on the :func:`rule_scale` scale.

    The clean mode is the global maximum of the smoothed density (bad samples are
    assumed to be a minority); each local maximum above it is a candidate, its valley
    the lowest density between the two. A candidate's evidence is the smaller of
    (a) its excess mass over the valley level, ``sum_{j >= v} max(d_j - d_v, 0)``, in
    units of ``sqrt(n_above + 1)`` and (b) the contrast of the counts within one
    bandwidth of the peak and of the valley, ``(n_p - n_v) / sqrt(n_p + n_v + 1)``; the
    best candidate is accepted when (a) >= :data:`MIN_EVIDENCE`, (b) >= :data:`MIN_LOCAL`
    and the valley is at most :data:`MAX_VALLEY_RATIO` of the peak. Its ``cut`` is the
    valley; the interval adds the samples within two bandwidths of it on either side.

    A discrete score is refused (``found`` False, with the reason): when every sample
    within two bandwidths of the clean mode has one value (a count, a flag, or exact
    zeros, which the log scale puts ~28 units below every positive score), the smoothed
    density dips on both sides of each value and every higher value would pass for a
    separate mode (a geometric count flagged half its samples).
    """
    _check_tensors("upper_mode", values=values)
    if values.dim() != 1:
        raise ValueError(
            f"csl_fast.flagging.upper_mode: values must be [N], got shape {tuple(values.shape)}"
        )
    bins = _check_bins(bins, "upper_mode")
    return _upper_mode(values, bins, (MIN_EVIDENCE, MIN_LOCAL, MAX_VALLEY_RATIO))


def _upper_mode(values: torch.Tensor, bins: int, need: tuple[float, float, float]) -> Estimate:
    """:func:`upper_mode` on checked arguments; ``need`` = (least excess-mass evidence,
    least peak-vs-valley evidence, largest valley/peak ratio) of an accepted mode."""
    min_evidence, min_local, max_ratio = need
    z, scale = rule_scale(values)
    diag: dict[str, Any] = {"estimator": "valley", "scale": scale, "finite": int(z.size)}
    if z.size < 20 or float(z.max() - z.min()) <= 0:
        why = (
            f"only {z.size} finite scores"
            if z.size < 20
            else "every score is equal (the score gives no separation)"
        )
        return Estimate(False, 0, (0, 0), math.inf, diag, why)
    counts, d, centres, h = _smoothed(z, bins)
    diag["bandwidth"] = float(h)
    g = int(np.argmax(d))
    diag["clean_mode"] = float(centres[g])
    discrete = _discrete(values, z, float(centres[g]), h)
    if discrete is not None:
        diag["point_mass"] = discrete[0]
        return Estimate(False, 0, (0, 0), math.inf, diag, discrete[1])
    valley_of = g + _running_argmin(d[g:])  # valley_of[p - g]: valley towards peak p
    is_peak = np.zeros(d.size, dtype=bool)
    is_peak[1:-1] = (d[1:-1] >= d[:-2]) & (d[1:-1] > d[2:])
    is_peak[: g + 1] = False
    peaks = np.flatnonzero(is_peak)
    diag["candidates"] = int(peaks.size)
    if peaks.size == 0:
        return Estimate(False, 0, (0, 0), math.inf, diag, "the score's density has one mode")
    bw = float(centres[1] - centres[0])
    w = max(1, round(h / bw))
    csum = np.concatenate([[0.0], np.cumsum(counts)])
    above = csum[-1] - csum[:-1]  # samples in bins j..end

    def near(j: int) -> float:
        return float(csum[min(j + w + 1, counts.size)] - csum[max(j - w, 0)])

    best: tuple[float, float, float, int, int] | None = None
    for p in peaks:
        v = int(valley_of[p - g])
        excess = float(np.clip(d[v:] - d[v], 0.0, None).sum()) / math.sqrt(above[v] + 1.0)
        n_p, n_v = near(int(p)), near(v)
        local = (n_p - n_v) / math.sqrt(n_p + n_v + 1.0)
        if best is None or min(excess, local) > min(best[0], best[1]):
            best = (excess, local, float(d[v] / d[p]), v, int(p))
    assert best is not None
    excess, local, ratio, v, p = best
    cut = float(centres[v])
    n_above = int((z > cut).sum())
    diag.update(
        excess_evidence=excess,
        local_evidence=local,
        valley=cut,
        upper_peak=float(centres[p]),
        valley_to_peak=ratio,
        above_valley=n_above,
    )
    if excess < min_evidence or local < min_local or ratio > max_ratio:
        why = (
            f"no separate upper mode: the best candidate (peak {centres[p]:.3g} on the "
            f"{scale} scale, {n_above} samples above its valley) has excess-mass evidence "
            f"{excess:.2f} (needs >= {min_evidence:g}), peak-vs-valley evidence {local:.2f} "
            f"(needs >= {min_local:g}) and valley/peak {ratio:.2f} (needs <= {max_ratio:g})"
        )
        return Estimate(False, 0, (0, 0), math.inf, diag, why)
    band_above = int(((z > cut) & (z <= cut + 2 * h)).sum())
    band_below = int(((z <= cut) & (z > cut - 2 * h)).sum())
    noise = 2.0 * math.sqrt(n_above)
    low = max(0, math.floor(n_above - band_above - noise))
    high = math.ceil(n_above + band_below + noise)
    diag.update(band_above_cut=band_above, band_below_cut=band_below)
    return Estimate(True, n_above, (low, high), cut, diag)
