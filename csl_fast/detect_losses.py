r"""Detection for losses other than softmax cross entropy: corrupted regression targets
(CSL from :func:`csl_fast.record_loss`) and mislabeled entries of multi-label data
(per-label CSL from :func:`csl_fast.accumulate_bce` into ``CSLTracker(num_labels=L)``).

Both rank by CSL (higher = more suspicious) and flag a set without ground truth. The
cross-entropy rules of :mod:`csl_fast.detect` do not carry over: the two-view rule needs
softmax margins and probabilities a loss-only tracker does not have, and the valley rule
needs the bad samples to form a separate mode, which they rarely do for these losses (on
scikit-learn's diabetes with 5% of targets moved by 3 target sd it flagged nothing in 6 of
6 runs: the corrupted targets are a tail of the clean mode, not a mode of their own).

The rule here, ``"tail"``, estimates how many scores the clean bulk cannot explain
(:func:`tail_count`): on ``x = log(score)``, the clean bulk is modelled as a normal whose
centre and spread are the median and the normalised MAD (``1.4826 * MAD``), which a few
percent of bad samples in the upper tail barely move. Beyond ``z = (x - median) / spread
> cut`` (:data:`TAIL_CUT` = 2) the model expects ``E = n * P(Z > cut)`` clean scores; the
excess ``observed - E`` is the estimated number of bad samples, and the top that many are
flagged. The excess must be at least :data:`TAIL_EVIDENCE` = 3 Poisson standard errors of
``E`` (``3 sqrt(E)``), else nothing is flagged and a :class:`~csl_fast.detect.
DetectionWarning` says why. Why these choices, measured on diabetes (``benchmarks/paper/
regression.py``, 300 epochs, an MLP that memorizes; 6 seeds each):

* a robust normal fitted to the bulk, not a two-component mixture: clean log-CSL is
  right-skewed (skewness ~0.4), and an EM fit of two normals models the skew (it put
  200-270 of 442 samples in the "bad" component on every run, clean runs included);
* cut 2: bad samples sit ~2.5-3 spreads above the median, so a cut of 3 (or the
  Iglewicz-Hoaglin 3.5) misses half of them; at 2 the clean tail is still thin and its
  expected size is subtracted;
* the 3-standard-error evidence test: clean runs (4 seeds, no corruption) exceed the
  normal tail by 2-7 samples at cut 2, within the test's noise; offset corruptions by 15-25.

Measured on diabetes: targets moved by 3 sd: flagged 15-25 of 442 for 22 corrupted,
precision 0.76-1.0, recall 0.68-0.86; no corruption: nothing flagged in 4 of 4 runs;
targets redrawn from the marginal (no score separates them, AUROC ~0.5-0.6): nothing
flagged in 6 of 6 runs, with the warning.

Measured limits on held-out data, the constants unchanged (``benchmarks/
loss_detection_limits.py``, ``benchmarks/results/loss-detection-limits.md``): scikit-
learn's ``make_friedman1`` and ``make_regression`` (N = 500; an MLP that memorizes and a
smooth one with weight decay that never fits the corrupted targets) and diabetes with an
SGD-trained 64-64 MLP (fits them only partly); 3 seeds, 0.5-10% of targets corrupted:

* precise when it flags: no clean run (normal noise) of these trainings flagged anything
  (0 of 15, all warned; but see the last point); 92 of the 94 corrupted runs that flagged
  had precision 0.81-1.0 (two at 2% corruption, 0.25 and 0.69);
* the count errs low, even with a perfect ranking: targets moved by 3 sd at 5-10%, AUROC
  0.99-1.0, flagged in 29 of 30 runs with recall 0.52-0.92. The count is the excess
  beyond ``z > 2`` only, so bad samples inside the bulk are not counted, and the clean
  tail on these sets was a little lighter than the normal model (excess -9 to +4 on
  clean runs) whose expected count is subtracted anyway (but see the next paragraph);
* a least detectable group: the excess must reach ``3 sqrt(E)``, ``E = 0.023 N``, about
  ``0.45 sqrt(N)`` bad samples beyond the cut (11 at N = 500, 45 at N = 10,000): at 0.5%
  and 2% corruption of ~500 samples 2 of 150 runs flagged anything, though targets
  shifted by 3 sd ranked at AUROC 0.98-1.0. The warning says so; the ranking
  (``Detection.top``, ``rule="fraction"``) is the usable output there;
* corruptions that move a target little (sign flips about the mean, swaps, redraws from
  the marginal; 1.5 sd shifts under SGD) rank at AUROC 0.4-0.94: at 5-10% flagged in 10-17
  of 30 runs per kind, recall 0.2-0.56, none under SGD. A limit of the score, not the rule;
* a network that memorizes is not needed: the smooth regime found about as much (the
  score is the loss summed over training, high whether a corrupted target is fitted late
  or never); the SGD network ranked worse (3 sd shifts at 5%: flagged in 2 of 3 runs,
  recall 0.55-0.64);
* heavy-tailed clean noise is flagged as corruption, without a warning: ``friedman1`` with
  Student-t noise (2 degrees of freedom) and no corruption had 16-17 clean samples flagged
  in 3 of 6 runs; they are the samples with the largest noise (mostly the top 17 of 500 by
  ``|noise|``). By its loss such a sample is as far from ``f(x)`` as a corrupted one, and
  nothing in the scores told the two apart (the excess beyond the cut looks like a planted
  group's): with heavy-tailed targets read the flagged set as outliers to review, not as
  proven corruptions;
* hard clean samples of a network that memorizes can be flagged too, without a warning:
  ``make_regression`` (N = 600, 10 features, noise 10, targets standardised, no
  corruption) under an MLP 128-128 trained with Adam 3e-3, batch 32, for 150 epochs
  flagged 26 of 600 (an audit's probe, one seed, 2026-12-03; no results file): the
  samples with the most extreme targets (mean ``|y|`` 1.9 sd against 0.7) and inputs,
  whose noise was no larger than the others', fitted last. Read a flagged set as samples
  to review.

The count is the size of a review set, not a bound either way (``diagnostics["count"]
== "may include clean samples"``, which the CLI prints after it). It errs low on the MSE
runs above, but a clean tail heavier than the normal model is counted too, and no shape
of the bulk measured told the two apart. An audit's probe (2026-12-04, no results file):
diabetes as above (5% of targets moved 3 sd, or none; 300 epochs, seeds 0-2) and a
synthetic set (N = 400, 8 features, ``sin(x0) + 0.5 x1 x2 + 0.3 x3`` plus noise 0.1,
targets standardised, 20 moved 4 sd or none; MLP 128-128, Adam 3e-3, batch 32, 60 epochs,
seeds 0-3), each with the per-sample MSE, Huber (delta 1) and L1 loss via
:func:`csl_fast.record_loss`:

* flagged (clean among them): diabetes clean runs MSE 0, Huber 0, L1 30-33 (all clean;
  25-35 in a second probe of the same settings); corrupted MSE 17-20 (1-4), Huber 21-28
  (2-8), L1 34-39 (13-19). Synthetic clean runs MSE 0 / 0 / 10 / 0, Huber 0, L1 14-23;
  corrupted (the 20 bad flagged in 11 of 12 runs, 19 in one) MSE 22-30 (2-10 clean),
  Huber 19-24 (0-4), L1 26-35 (6-15);
* the clean L1 bulk of log-CSL is right-skewed (skewness 1.07-1.63 against 0.39-0.77 for
  MSE and Huber), but 5% of bad samples move the moment skewness more (0.81-2.14 on the
  corrupted MSE and Huber runs), and the robust measures, which they barely move, do not
  separate the clean L1 runs from the others: Bowley (quartile) skewness -0.01-0.18
  against -0.03-0.22, octile 0.04-0.27 against 0.04-0.25, Kelly (decile) 0.06-0.30
  against 0.05-0.27 (corrupted runs included), medcouple 0.01-0.20 against 0.01-0.24; the
  upper decile's spread, ``(q90 - median) / 1.2816`` in robust sd, 1.12-1.54 against
  1.14-1.48 on the corrupted MSE and Huber runs. The heavier tail lies beyond z ~ 1.5,
  where the bad samples are. A null mirrored from the lower half would count more, not
  less: that tail is lighter than the normal one (0-9 samples below z = -2, ~9-10
  expected).

Non-finite CSL is ignored (never presented), and a CSL with negative values (a loss that
can be negative) is modelled on the raw scale, with a warning; values below 0 by float
rounding only (:data:`~csl_fast.flagging.NEGATIVE_TOLERANCE`) count as 0. Scores of
0 (a hinge or epsilon-insensitive loss, 0 inside its margin), or under ``1e-12`` of the
largest, which the log scale cannot tell from 0, are left out of the bulk's model and
never flagged (``diagnostics["zeros"]`` counts them, the note says so).

Multi-label entries (:func:`mislabeled_entries`): the same rule over all ``N * L`` entries
at once (or per label); see the function for what it measured, on held-out data too.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .detect import (
    Detection,
    DetectionWarning,
    _count,
    _fraction_count,
    _note_tie_at_cut,
    _number,
    _rankable,
    _score_tensor,
    _unused,
    held_out_note,
)
from .flagging import MIN_ANCHORED_SHARE, Estimate, doubted, rule_scale, two_view_count
from .scores import diverged_reason

if TYPE_CHECKING:
    from .tracker import CSLTracker

__all__ = [
    "LOSS_RULES",
    "SMALL_SAMPLE",
    "TAIL_CAVEAT",
    "TAIL_CUT",
    "TAIL_EVIDENCE",
    "EntryDetection",
    "corrupted_targets",
    "mislabeled_entries",
    "tail_count",
]

#: The rules of this module: ``"tail"`` (default, :func:`tail_count`), ``"fraction"``
#: (the top ``fraction``), ``"threshold"`` (``score > threshold``).
LOSS_RULES = ("tail", "fraction", "threshold")
#: Robust z beyond which the clean bulk's normal tail is compared with the scores.
TAIL_CUT = 2.0
#: Least excess over the expected clean tail, in Poisson standard errors.
TAIL_EVIDENCE = 3.0
#: ``diagnostics["count"]`` of a tail-rule count: a review set's size, not a bound.
TAIL_CAVEAT = "may include clean samples"
#: Fewer finite scores than this: a flagged set comes with a warning that the bulk's
#: median and spread are uncertain (see :func:`corrupted_targets`).
SMALL_SAMPLE = 200
_MAD_TO_SD = 1.4826  # MAD of a normal is 0.6745 sd
_WHERE = "csl_fast.detect_losses"


def tail_count(
    values: torch.Tensor, *, cut: float = TAIL_CUT, evidence: float = TAIL_EVIDENCE
) -> Estimate:
    """How many of ``values`` the clean bulk's robust normal tail cannot explain.

    ``values``: any float tensor of scores (higher = more suspicious; non-finite ones are
    ignored). Non-negative scores are taken in ``log`` (as
    :func:`csl_fast.flagging.rule_scale`). Returns an :class:`~csl_fast.flagging.Estimate`
    whose ``count`` is ``round(observed - expected)`` beyond ``cut`` robust standard
    deviations when that excess is at least ``evidence * sqrt(expected)``, else 0 with
    the reason. The interval spans the excess at ``cut -/+ 0.5``, widened by two Poisson
    standard errors. ``cut`` on the estimate is the log-scale (or raw) value above which
    ``z > cut``. On the log scale the bulk is the positive scores: zeros (the cleanest
    samples, no part of the bulk's shape; with them scores under ``1e-12`` of the largest,
    clipped to it) are left out, counted in ``diagnostics["zeros"]``.
    """
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"tail_count: values must be a float tensor, got {type(values).__name__}")
    if values.is_meta or values.is_complex():  # (torch's "register_meta ... nonzero()")
        kind = "meta" if values.is_meta else "complex"
        raise ValueError(
            f"tail_count: values must be a real tensor with data, got a {kind} tensor (use "
            ".real or a tensor on a real device)"
        )
    for name, value in (("cut", cut), ("evidence", evidence)):
        # NaN made int(NaN) fail far inside; a negative evidence let any excess through
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value >= 0:
            raise ValueError(f"tail_count: {name} must be a number >= 0, got {value!r}")
        if not math.isfinite(value):
            raise ValueError(f"tail_count: {name} must be finite, got {value!r}")
    x, scale = rule_scale(values)
    zeros = 0
    if scale == "log":
        # a score of 0 (what rule_scale clips to 1e-12 x the largest) is the cleanest
        # sample there is (a hinge or epsilon-insensitive loss is exactly 0 inside its
        # margin), but on the log scale it is a cluster ~27 units below the bulk that
        # widened the spread and counted in the clean tail's expected size: 40% zeros hid
        # all 50 of a group found 49 of 50 without them. The bulk is the positive scores
        v = values.detach()
        v = v[torch.isfinite(v)].double()
        positive = (v > 1e-12 * v.max()).cpu().numpy()
        zeros = int(x.size - positive.sum())
        x = x[positive]
    n = x.size
    diag: dict[str, Any] = {"estimator": "tail", "scale": scale, "n": int(n), "cut_z": cut}
    scores = f"{n} finite scores"
    if zeros:
        diag["zeros"] = zeros
        scores = (
            f"{n} positive scores (the {zeros} scores of 0, or under 1e-12 of the largest, "
            "are left out, never flagged)"
        )
    if n < 10:
        return Estimate(False, 0, (0, 0), math.inf, diag, f"only {scores}")
    med = float(np.median(x))
    spread = _MAD_TO_SD * float(np.median(np.abs(x - med)))
    diag.update(median=med, spread=spread)
    if not spread > 0:
        reason = f"at least half of the {scores} are equal (no spread to measure the bulk by)"
        return Estimate(False, 0, (0, 0), math.inf, diag, reason)
    z = (x - med) / spread

    def excess(c: float) -> tuple[float, float, int]:
        expected = n * 0.5 * math.erfc(c / math.sqrt(2))
        observed = int((z > c).sum())
        return observed - expected, expected, observed

    ex, expected, observed = excess(cut)
    need = evidence * math.sqrt(expected)
    diag.update(expected=expected, observed=observed, excess=ex, needed=need)
    at_cut = med + cut * spread
    if ex < max(need, 0.5):
        reason = (
            f"{observed} scores lie beyond {cut:g} robust standard deviations of the bulk, "
            f"where a normal bulk puts {expected:.1f}: an excess of {ex:.1f}, short of the "
            f"{evidence:g} standard errors ({need:.1f}) that would show a group of bad "
            f"samples: among {scores} fewer than ~{math.ceil(need)} bad samples beyond the "
            "cut are never flagged, however well the score ranks them, and bad samples "
            "inside the bulk (targets moved little) are not separated from the clean ones"
        )
        return Estimate(False, 0, (0, 0), at_cut, diag, reason)
    count = round(ex)
    others = [excess(cut + d)[0] for d in (-0.5, 0.5)]
    widen = 2 * math.sqrt(expected + count)
    low = max(1, math.floor(min([ex, *others]) - widen))
    high = min(n, math.ceil(max([ex, *others]) + widen))
    return Estimate(True, count, (low, high), at_cut, diag, None)


def _ranking(values: torch.Tensor) -> torch.Tensor:
    """Indices by descending value, ties in index order, non-finite last."""
    finite = torch.isfinite(values)
    key = torch.where(finite, values.double(), -math.inf)
    order = torch.sort(key, descending=True, stable=True).indices
    return torch.cat([order[finite[order]], order[~finite[order]]])


def _loss_score(
    source: CSLTracker | Mapping[str, torch.Tensor] | torch.Tensor, score: str
) -> tuple[torch.Tensor, str]:
    if isinstance(source, torch.Tensor):
        return _score_tensor(source, "a score tensor", _WHERE), "custom"
    if isinstance(source, Mapping):  # named, so that warnings and the Detection say which
        if score not in source:
            raise KeyError(f"{_WHERE}: no score {score!r} in the mapping ({sorted(source)})")
        return _score_tensor(source[score], f"score {score!r} of the mapping", _WHERE), score
    _check_tracker(source, "an [N] score tensor")
    if score not in ("csl", "csl_mean"):
        raise ValueError(
            "csl_fast.detect_losses: score must be 'csl' or 'csl_mean' for a tracker, got "
            f"{score!r}"
        )
    presented = source.csl_count > 0
    values = source.csl if score == "csl" else source.csl_mean
    return torch.where(presented, values, math.nan).detach(), score


def _check_tracker(source: Any, or_tensor: str) -> None:
    from .tracker import CSLTracker

    if not isinstance(source, CSLTracker):
        raise TypeError(
            f"{_WHERE}: source must be a CSLTracker or {or_tensor}, got {type(source).__name__}"
        )


def _flag(
    values: torch.Tensor,
    ranking: torch.Tensor,
    rule: str,
    fraction: float | None,
    threshold: float | None,
) -> tuple[torch.Tensor, Estimate | None, str]:
    finite = torch.isfinite(values)
    flagged = torch.zeros_like(finite)
    if rule not in LOSS_RULES:
        raise ValueError(f"csl_fast.detect_losses: rule must be one of {LOSS_RULES}, got {rule!r}")
    _unused(rule, fraction, threshold, _WHERE)
    if rule == "threshold":
        if threshold is None:
            raise ValueError("csl_fast.detect_losses: rule='threshold' needs threshold=")
        cut = _number(threshold, "threshold", rule, _WHERE)
        return finite & (values.double() > cut), None, f"threshold({threshold})"
    if rule == "fraction":
        if fraction is None or not 0 <= _number(fraction, "fraction", rule, _WHERE) <= 1:
            raise ValueError("csl_fast.detect_losses: rule='fraction' needs fraction in [0, 1]")
        k = min(_fraction_count(fraction, values.numel()), int(finite.sum()))
        est, desc = None, f"fraction({fraction})"
    else:
        est, desc = tail_count(values), "tail"
        k = est.count
    if k > 0:
        flagged[ranking[:k]] = True
    return flagged, est, desc


def corrupted_targets(
    source: CSLTracker | Mapping[str, torch.Tensor] | torch.Tensor,
    score: str | None = None,
    *,
    rule: str = "tail",
    fraction: float | None = None,
    threshold: float | None = None,
) -> Detection:
    """Samples whose regression target (or any per-sample loss's target) looks corrupted.

    Args:
        source: a :class:`csl_fast.CSLTracker` fed by :func:`csl_fast.record_loss` (or
            any tracker: only its CSL is read), a ``{name: [N] tensor}`` mapping such as
            :func:`csl_fast.scores` returns, or a float ``[N]`` score tensor.
        score: for a tracker, ``"csl"`` or ``"csl_mean"`` (CSL per presentation: use it
            when samples were presented unequally often); for a mapping, the key of the
            score (which the warning and the Detection name). ``None`` (default):
            ``"csl"``, or ``"csl_mean"`` for a tracker of sequences (a sequence's CSL sums
            its tokens) or of unequal presentation counts (:func:`detect.default_score`).
        rule: ``"tail"`` (default, the module's rule), ``"fraction"`` or ``"threshold"``.
        fraction, threshold: for those rules.

    Returns:
        A :class:`csl_fast.detect.Detection` (ranking, flagged set, estimated count and
        interval, diagnostics). When the rule flags nothing, ``warning`` says why and a
        :class:`~csl_fast.detect.DetectionWarning` is raised; the estimated count and
        interval are then None (unknown: bad samples may hide in the clean tail), not 0.
        A count of the tail rule is the size of a review set, neither bound
        (``diagnostics["count"] == "may include clean samples"``: it misses bad samples
        inside the bulk and counts a clean tail heavier than the normal model; the module
        doc measures both), or ``"unreliable"`` when the score has negative values (the
        rule then works on the raw scale; ``warning`` says so). Samples never presented
        rank last and are never flagged; so do ``+inf`` scores of a tensor or mapping,
        with a warning (an overflowed score), and held-out samples an eval pass scored
        (``eval_csl`` of a :func:`csl_fast.scores` mapping, which keeps the tracker's
        ``csl_count``) beside trained ones, with a note (``diagnostics["held_out"]``), as
        :func:`csl_fast.detect.mislabeled` leaves them out. In a tracker that
        :func:`csl_fast.accumulate` and another recorder both fed (or its
        :func:`csl_fast.scores` mapping), the samples without softmax statistics get no
        score either, as there, with the note and warning saying so: their CSL is
        another loss's, on its own scale (:func:`csl_fast.scores.mixed_recorders`).
    """
    from .detect import _length_bias, _other_recorder, _trained, _without_other_loss, default_score

    values, name = _loss_score(source, default_score(source) if score is None else score)
    other, scored, mixed = _other_recorder(source, values, name) or (None, None, None)
    if mixed is not None:
        # a tracker that accumulate also fed (or its csl_fast.scores mapping): ranked with
        # the cross-entropy samples, the other loss's, on its own scale, were all 92
        # flagged without a word; as detect.mislabeled, they get no score, and a note
        values, _, _, mixed = _without_other_loss(values, None, None, other, mixed, scored)
    caveat = "; ".join(filter(None, [mixed, _length_bias(source, name)])) or None
    why = _no_score(source, "csl_fast.record_loss or csl_fast.accumulate_bce")
    # (held-out samples an eval pass scored, as detect.mislabeled leaves them out: a
    # loss-only run flagged 94 of them among its 97 and 3 of 10 corrupted targets)
    trained = _trained(source)
    return _detection(values, name, rule, fraction, threshold, 3, why, caveat, trained=trained)


def _no_score(source: Any, fed_by: str) -> str:
    """Why no sample of ``source`` has a finite score, and what to do: a tracker that
    closed epochs was trained on non-finite losses, else it was never fed."""
    from .tracker import CSLTracker

    diverged = diverged_reason(source) if isinstance(source, CSLTracker) else None
    return diverged or f"no sample was presented in training (pass the tracker to {fed_by})"


def _detection(
    values: torch.Tensor,
    name: str,
    rule: str,
    fraction: float | None,
    threshold: float | None,
    stacklevel: int,
    no_score: str,
    caveat: str | None = None,
    noun: str = "samples",
    trained: torch.Tensor | None = None,
) -> Detection:
    """The detection; ``no_score``: why no score is finite and what to do
    (:func:`_no_score`); ``caveat``: why the score misranks the source (said in the note
    and the warning, :func:`csl_fast.detect._length_bias`); ``noun``: what the scores
    belong to, in the warning (``"entries"`` for multi-label entries); ``trained``: the
    samples the run trained on (:func:`csl_fast.detect._trained`): held-out ones an eval
    pass scored beside them are not ranked or flagged (:func:`csl_fast.detect._rankable`),
    and the note says so."""
    full = values
    finite, untrained = _rankable(values, None, trained)
    if untrained:  # the rule, its count and the ranking see the trained samples alone
        values = torch.where(finite, values.double(), math.nan)
    ranking = _ranking(values)
    flagged, est, desc = _flag(values, ranking, rule, fraction, threshold)
    n_flagged = int(flagged.sum())
    thr = float(values.double()[flagged].min()) if n_flagged else math.inf
    diag: dict[str, Any] = {
        "rule": rule,
        "samples": values.numel(),
        "finite": int(finite.sum()),
        "flagged": n_flagged,
        "threshold": thr,
    }
    if untrained:  # (the note, and on its own for a page that shows the warning)
        said = held_out_note(untrained, False, "csl_fast.detect_losses.corrupted_targets")
        diag["note"] = diag["held_out"] = said
    warning = None
    count = interval = None
    # (the tail rule split 50 equal scores 35 / 15 by index, with nothing to say so)
    _note_tie_at_cut(diag, values, ranking, flagged, n_flagged, diag["finite"], name)
    if est is not None:
        diag["estimator"] = {**est.diagnostics, "reason": est.reason}
        zeros = est.diagnostics.get("zeros", 0)
        if zeros:  # (the bulk's size, and the least group it can show, are the positives')
            # (a loss's zeros have a usual cause; learning_time's, a fraction, do not)
            loss = name == "final_loss" or name.startswith(("csl", "eval_csl", "label_csl"))
            why = (
                " (a loss that is 0 inside a margin, such as a hinge or epsilon-insensitive one)"
                if loss
                else ""
            )
            said = (
                f"{zeros} of the {zeros + est.diagnostics['n']} finite {name!r} scores are "
                f"0, or under 1e-12 of the largest{why}: rule='tail' modelled the bulk on the "
                "positive scores alone, and the zeros are never flagged"
            )
            diag["zeros"] = zeros
            diag["note"] = "; ".join(filter(None, [diag.get("note"), said]))
        if est.found and est.diagnostics["n"] < SMALL_SAMPLE:
            # the bulk's median and spread come from few samples: on clean log-normal
            # scores (400 seeds per size) 3-9% of sets of 10-200 flagged a sample or two,
            # 1% at 500
            diag["small_sample"] = True
            warning = (
                f"csl_fast.detect_losses: {n_flagged} flagged by rule='tail' among only "
                f"{est.diagnostics['n']} scores, where the clean bulk's median and spread are "
                "themselves uncertain: 3-9% of clean sets of 10-200 scores flag a sample or "
                "two. Read the flagged set as a short review list, not a verdict"
            )
        if est.found:
            count, interval = est.count, est.interval
            # neither bound (module doc): low by the bad samples inside the bulk, high by
            # a clean tail heavier than the normal model (an L1 loss: 25-35 of 442 clean
            # diabetes samples flagged, once printed "likely more"), and no measured shape
            # of the bulk tells which
            diag["count"] = TAIL_CAVEAT
            if est.diagnostics["scale"] == "identity":
                # no bound either way: the raw scale's clean tail is counted as bad too (a
                # Gaussian NLL run counted 84 for 25, then printed "likely more")
                diag["count"] = "unreliable"
                warning = (
                    (f"{warning}. Also, " if warning else "")
                    + f"csl_fast.detect_losses: score {name!r} has negative values (a loss that "
                    "can be negative, such as a Gaussian NLL), so rule='tail' modelled the "
                    "bulk on the raw scale instead of log: the count and the flagged set are "
                    "unreliable (a clean right-skewed bulk shifted below 0 had 4-11% of its "
                    "samples flagged, none of them bad). Record a non-negative loss (e.g. the "
                    "squared error, or the NLL minus its lower bound) or use rule='fraction'"
                )
        else:
            # no excess over the bulk's tail: bad samples may still hide in it, so the
            # count is unknown (None, as detect.mislabeled reports it), not 0
            warning = (
                f"csl_fast.detect_losses: nothing flagged by rule='tail' on {name!r}: "
                f"{est.reason}. The ranking does not depend on the rule: to review the most "
                "suspicious samples anyway, use rule='fraction' with a prior on the "
                "corruption rate or a review budget (or Detection.top(k))"
            )
    if values.numel() and not bool(finite.any()):
        warning = (
            f"csl_fast.detect_losses: nothing flagged by rule={rule!r}: score {name!r} is "
            f"not finite (NaN or inf) for every sample: {no_score}"
        )
    elif rule == "threshold" and n_flagged == 0 and values.numel():
        warning = (
            f"csl_fast.detect_losses: nothing flagged by rule='threshold': no {name!r} score "
            f"exceeds threshold={float(threshold):g} (the largest is "
            f"{float(values.double()[finite].max()):.6g}); lower it, or use rule='fraction'"
        )
    # (of every score: the held-out samples' masking above made +inf NaN, unsaid)
    overflowed = int((full == math.inf).sum())
    if overflowed and bool(finite.any()):
        note = (
            f"csl_fast.detect_losses: {overflowed} {name!r} score(s) are +inf: they rank last "
            "and are never flagged, as samples never presented are; if they overflowed (a "
            "float16 score, a sum past float32's range) they may be the most suspicious "
            "samples: compute the score in float64"
        )
        warning = note if warning is None else f"{warning}. Also, {note}"
    if warning is not None:
        warning = warning.replace("samples", noun)
    if caveat is not None:  # (in its own words: "samples" there are samples, not entries)
        diag["note"] = "; ".join(filter(None, [diag.get("note"), caveat]))
        said = f"csl_fast.detect_losses: {n_flagged} flagged by rule={rule!r}, but {caveat}"
        warning = said if warning is None else f"{warning}. Also, {caveat}"
    if warning is not None:
        warnings.warn(warning, DetectionWarning, stacklevel=stacklevel)
    # (the scores as given: a held-out sample keeps its value, listed after the ranked ones)
    return Detection(ranking, full, flagged, thr, name, desc, [], count, interval, diag, warning)


@dataclass(repr=False, eq=False)  # Detection's short repr and identity comparison
class EntryDetection(Detection):
    """A :class:`~csl_fast.detect.Detection` over the ``N * L`` (sample, label) entries.

    ``scores`` and ``flagged`` are ``[N, L]``; ``ranking`` holds flat entry ids
    ``sample * L + label``, most suspicious first. :attr:`indices` and :meth:`top` give
    ``[M, 2]`` ``(sample, label)`` pairs.
    """

    unit = "entries"

    @property
    def num_labels(self) -> int:
        return self.scores.shape[1]

    def _pairs(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.stack([flat // self.num_labels, flat % self.num_labels], 1)

    @property
    def indices(self) -> torch.Tensor:
        """int64 ``[M, 2]``: the flagged ``(sample, label)`` entries, most suspicious first."""
        flat = self.ranking[self.flagged.reshape(-1)[self.ranking]]
        return self._pairs(flat)

    def top(self, k: int) -> torch.Tensor:
        """The ``k`` most suspicious ``(sample, label)`` entries, ``[k, 2]`` (fewer when
        fewer have a score: the entries of samples never trained on are not ranked, as
        :meth:`csl_fast.detect.Detection.top` leaves such samples out)."""
        scored = int(torch.isfinite(self.scores).sum())
        return self._pairs(self.ranking[: min(_count(k), scored)])

    def to_dataframe(self) -> Any:
        """A pandas DataFrame (sample, label, score, flagged, rank), most suspicious first
        (``rank`` from 1, ``<NA>`` for the entries without a score, listed last)."""
        import pandas as pd

        from .detect import _rank_column

        r = self.ranking.cpu()
        pairs = self._pairs(r).numpy()
        return pd.DataFrame(
            {
                "sample": pairs[:, 0],
                "label": pairs[:, 1],
                "score": self.scores.cpu().double().reshape(-1)[r].numpy(),
                "flagged": self.flagged.cpu().reshape(-1)[r].numpy(),
                "rank": _rank_column(len(r), int(self.ranked.shape[0])),
            }
        )


def mislabeled_entries(
    source: CSLTracker | torch.Tensor,
    score: str | None = None,
    *,
    per_label: bool = False,
    rule: str = "tail",
    fraction: float | None = None,
    threshold: float | None = None,
) -> EntryDetection:
    r"""Which (sample, label) entries of multi-label data look mislabeled (a tag missing
    or spurious), ranked by per-entry CSL, with a flagged set.

    A flipped entry is fitted only by memorizing it, late, so its loss stays high for
    much of training while the clean entries' losses fall: per-entry CSL, the sum over
    training of the entry's plain binary cross entropy (``accumulate_bce`` records it into
    ``CSLTracker(num_labels=L).label_csl``), ranks flipped entries first.

    Args:
        source: a :class:`csl_fast.CSLTracker` with ``num_labels`` fed by
            :func:`csl_fast.accumulate_bce`, or a float ``[N, L]`` score tensor.
        score: for a tracker, ``"label_csl"`` or ``"label_csl_mean"`` (per
            presentation). ``None`` (default): ``"label_csl"``, or ``"label_csl_mean"``
            where the presented samples' counts differ by more than 25% (the sum ranked
            the entries of the samples presented most often first: 317 flagged of 100
            such samples on clean labels); ``"label_csl"`` named there gets a warning.
        per_label: apply the rule to each label's ``N`` entries separately (and add the
            counts) instead of to all ``N * L`` entries at once.
        rule, fraction, threshold: as in :func:`corrupted_targets`; ``"fraction"`` and
            ``"threshold"`` apply to all entries (or to each label with ``per_label``).

    Returns:
        An :class:`EntryDetection`; ``warning`` (and a
        :class:`~csl_fast.detect.DetectionWarning`) when nothing is flagged or the doubt
        gate cut the set (below).

    The rule, over all ``N * L`` entries (``per_label=True``: each label's ``N`` apart,
    the tail rule and the gate only):

    1. the *tail* rule (:func:`corrupted_targets`' rule on per-entry CSL) flags a set;
    2. a *doubt gate* checks it, for a tracker that recorded ``label_prob``: single-label
       detection's view (:func:`csl_fast.flagging.doubted`, constants unchanged) applied
       to each entry as a two-class problem, from ``label_csl``, the presentations and
       ``label_prob`` (the summed probability of the entry's given value): a flipped entry
       is rejected *firmly* for long (the network sure of the other value), a hard clean
       one hesitated over. When fewer than :data:`~csl_fast.flagging.MIN_ANCHORED_SHARE`
       (0.2) of the flagged entries are doubted, the set is the clean tail and only its
       doubted entries stay flagged, with a :class:`~csl_fast.detect.DetectionWarning`,
       ``diagnostics["count"] == "lower bound"``, ``["tail_flagged"]`` and
       ``["tail_threshold"]`` keeping the tail rule's (share and counts in
       ``diagnostics["doubt"]``);
    3. otherwise the count is single-label detection's two-view count on the entries
       (:func:`csl_fast.flagging.two_view_count` on the mean entry loss, the doubted
       entries pinned to the bad component; ``diagnostics["count_source"] ==
       "two_view"``, ``["two_view"]`` its fit, ``["tail_flagged"]`` the tail rule's count), and
       the top that many entries are flagged.

    Why: the tail rule alone is no test of whether anything is wrong. On two digits side
    by side with no entry flipped (``benchmarks/paper/multilabel_clean.py``) it flagged
    2.1-2.9% of the entries, without a warning: clean entries, mostly positives of the
    digits the network learns last, whose per-entry CSL has a heavier upper tail than the
    normal model of the bulk allows. And its count is off with flips: the clean entries'
    losses form two groups (negatives near 0, positives higher), which widen the bulk's
    robust spread, so at 10% flips it flagged about half of them and at 2% up to 2.2x as
    many. Measured (``benchmarks/paper/multilabel_doubt.py``, 4 trainings x 2 seeds x 0 /
    2 / 10% flips of the digit pairs' 17,970 entries): the clean runs' anchored shares
    were 0.09-0.18, every one cut, to 26-114 flagged entries (0.14-0.63%, warned); the
    noisy runs' 0.26-0.61, none cut, and their two-view counts came within -22% to +25%
    of the flips (intervals holding the truth in 16 of 16): at 2% 362-449 flagged for
    359, precision 0.69-0.81, recall 0.82-0.89; at 10% 1,404-1,730 for 1,797, precision
    0.90-0.94, recall 0.73-0.86 (the tail rule alone: F1 0.60-0.80, now 0.77-0.88). With
    5% flipped (``benchmarks/paper/multilabel.py``, 2 seeds) it flags 914 for 898, F1
    0.86 (the tail rule 0.79, per label 0.76; cleanlab 0.61). The floor and the mixture
    come from single-label detection unchanged, but using them here was chosen after
    seeing these runs. Held out, on the same digit pairs (``benchmarks/paper/results/
    multilabel-doubt-fast.md``, 2 seeds, 40 epochs of Adam at 3e-3 or 1e-2, added after an
    audit): on standardised pixels the clean runs flag nothing (warned); at 2% flips
    Adam 3e-3 flags 473 and 577 for 359 (precision 0.59-0.67, recall 0.89-0.94), Adam
    1e-2 nothing (warned); at 10% 1,634-2,350 for 1,797 (F1 0.77-0.85). On pixels scaled
    to [0, 1] instead (not standardised) the network learns the positives of some digits
    late, firmly rejecting them for long, and **clean runs flag 475-769 entries (2.6-4.3%)
    with no warning**: 28-49% of the tail's set is doubted, above the 0.2 floor (the
    noisy runs of the calibration had 0.26-0.61, so no floor separates them); at 2% flips
    481-601 for 359 (precision 0.57-0.68); at 10% the network fits too little for the gate
    (``FITTED_PROB``), which the warning now says. Standardise the inputs, and review a
    multi-label flagged set before acting on it.

    Rules the user sets (``"fraction"``, ``"threshold"``), score tensors and trackers saved
    before ``label_prob`` existed (format 2; ``diagnostics["doubt"]`` says "not
    recorded"), and runs whose typical entry's mean probability of its target is below
    :data:`FITTED_PROB` (0.9: soft targets, label smoothing, whose cap on every entry's
    probability reads as doubt everywhere; ``diagnostics["doubt"]`` says "not applied") get
    the tail rule alone, with a note that says so (and, for a tracker, a warning).

    On held-out data it can be blind (``benchmarks/loss_detection_limits.py``): scikit-
    learn's ``make_multilabel_classification`` (600 samples, 8 labels, 0.5-10% of entries
    flipped, an MLP that memorizes and a smooth one, 3 seeds) had nothing flagged in 24
    of 24 runs (each with the warning) though per-entry CSL ranked the flips at AUROC
    0.87-0.94: a flip sits only ~1 robust spread above the clean entries of its given
    value, and the mixture's tail beyond ``z > 2`` is far thinner than the normal model
    (excess -16 to -74 on clean runs). No count could have given a set to act on there:
    the ranking's top k at the true count k held 12-25% flips at 0.5% flipped and 49-61%
    at 10% (that generator draws each sample's features as random word counts from its
    labels' word distributions: many clean entries are as hard to predict as a flip).
    Review by the ranking then (:meth:`top`, ``rule="fraction"``). ``per_label=True`` is
    worse there: on clean data its tail rule flagged 34-123 entries, most of them a
    label's positives (a rare label's positives read as an excess over its negatives'
    tail), and the doubt gate cut only one of the six runs (48 to 6, warned): in the
    other five more than a fifth of the flagged clean entries were firmly rejected, and
    they stay flagged without a warning
    (``benchmarks/results/loss-detection-limits-multilabel.md``, 2026-12-03).
    """
    from .detect import _length_bias, _unequal_counts

    if score is None:
        unequal = None if isinstance(source, torch.Tensor) else _unequal_counts(source)
        score = "label_csl" if unequal is None else "label_csl_mean"
    values, name = _entry_score(source, score)
    labels = values.shape[1]
    why = _no_score(source, "csl_fast.accumulate_bce")
    caveat = None if isinstance(source, torch.Tensor) else _length_bias(source, name)
    if not per_label:
        det = _detection(
            values.reshape(-1), name, rule, fraction, threshold, 3, why, caveat, noun="entries",
        )  # fmt: skip
        return _anchored(source, _entries(det, values), rule, recount=True)
    dets = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DetectionWarning)
        for k in range(labels):
            dets.append(_detection(values[:, k], name, rule, fraction, threshold, 3, why))
    flagged = torch.stack([d.flagged for d in dets], 1)
    ranking = _ranking(values.reshape(-1))
    n_flagged = int(flagged.sum())
    thr = float(values.double()[flagged].min()) if n_flagged else math.inf
    count = interval = None
    found = [d for d in dets if d.estimated_count is not None]
    if found:
        # a label without an excess over its bulk's tail adds nothing detectable
        count = sum(d.estimated_count for d in found)
        interval = tuple(sum(d.count_interval[j] for d in found) for j in (0, 1))
    diag = {
        "rule": rule,
        "per_label": [d.diagnostics for d in dets],
        "flagged": n_flagged,
        "threshold": thr,
    }
    caveats = [d.diagnostics["count"] for d in found if "count" in d.diagnostics]
    if caveats:
        # a sum of counts of which some are lower bounds is one; any other caveat of a
        # label's count carries over to it, the weakest first (an "unreliable" label's
        # count after the tail rule's came out by label order)
        order = ("unreliable", TAIL_CAVEAT)
        ranked = sorted(dict.fromkeys(caveats), key=lambda c: order.index(c) if c in order else 2)
        diag["count"] = next((c for c in ranked if c != "lower bound"), "lower bound")
    warning = None
    if n_flagged == 0 and rule == "tail":
        # one line per label: the full reason, repeated for each, buried what differed
        reasons = "; ".join(
            f"label {k}: {_short_reason(d.diagnostics['estimator'])}" for k, d in enumerate(dets)
        )
        warning = (
            f"csl_fast.detect_losses: nothing flagged by rule='tail' per label ({reasons}). "
            "A label's entries are flagged only when their excess beyond its cut reaches what "
            "is needed, however well the score ranks them: review by the ranking "
            "(Detection.top(k)) or use rule='fraction'"
        )
    elif n_flagged == 0 and any(d.warning for d in dets):
        reasons = "; ".join(f"label {k}: {d.warning}" for k, d in enumerate(dets) if d.warning)
        warning = f"csl_fast.detect_losses: nothing flagged per label ({reasons})"
    elif n_flagged:
        # the caveats of the labels that flagged, and those that hold whatever a label
        # flagged (an overflowed score), were dropped whenever anything was flagged
        caveats = [
            f"label {k}: {(d.warning if d.flagged.any() else tail).removeprefix(_PREFIX)}"
            for k, d in enumerate(dets)
            if d.warning
            for tail in [d.warning.partition(". Also, ")[2]]
            if d.flagged.any() or tail
        ]
        if caveats:
            warning = (
                f"csl_fast.detect_losses: {n_flagged} flagged per label, with caveats "
                f"({'; '.join(caveats)})"
            )
    if caveat is not None:  # once, not per label (lost with nothing flagged, or L copies)
        diag["note"] = caveat
        said = f"csl_fast.detect_losses: {n_flagged} flagged per label, but {caveat}"
        warning = said if warning is None else f"{warning}. Also, {caveat}"
    if warning is not None:
        warnings.warn(warning, DetectionWarning, stacklevel=2)
    desc = f"{dets[0].rule} per label" if dets else rule
    det = EntryDetection(
        ranking, values, flagged, thr, name, desc, [], count, interval, diag, warning
    )
    return _anchored(source, det, rule, recount=False)


_PREFIX = "csl_fast.detect_losses: "

#: The doubt gate applies when the typical entry's mean probability of its target reaches
#: this (hard targets the network fits: ~0.99 on the digit pairs; label smoothing 0.05
#: caps it at e^-H(0.95) = 0.82).
FITTED_PROB = 0.9


def _short_reason(est: dict[str, Any]) -> str:
    """A label's tail-rule verdict in a clause: its excess and what it needed, or why none."""
    if "excess" not in est:
        return est["reason"]
    return (
        f"an excess of {est['excess']:.1f} of {est['n']} entries beyond z > {est['cut_z']:g}, "
        f"{est['needed']:.1f} needed"
    )


def _anchored(
    source: CSLTracker | torch.Tensor, det: EntryDetection, rule: str, *, recount: bool
) -> EntryDetection:
    """The tail rule's entries cut to the doubted ones when too few of them are doubted.

    The tail rule cannot tell a late-learned clean label's heavy loss tail from flips; the
    doubt view can (:func:`csl_fast.flagging.doubted` on each entry as a two-class problem,
    from ``label_csl``, ``csl_count`` and ``label_prob``): a flipped entry is rejected
    firmly for long, a hard clean one hesitated over. When fewer than
    :data:`~csl_fast.flagging.MIN_ANCHORED_SHARE` of the flagged entries are doubted, the
    set is the clean tail, and only its doubted entries stay flagged (a lower bound).
    Otherwise, with ``recount``, the count is single-label detection's two-view count on
    the entries (:func:`csl_fast.flagging.two_view_count`, the doubted entries pinned to
    the bad component) and the top that many are flagged.
    """
    if rule != "tail" or isinstance(source, torch.Tensor):
        return det
    probs = source.label_prob
    flagged = det.flagged
    n_flagged = int(flagged.sum())
    presented = source.csl_count > 0
    seen = probs[presented] if probs is not None else None
    if seen is None or not bool(seen.any()) or bool(seen.isnan().any()):
        # zeros: label_csl filled by another recorder; NaN: a tracker loaded from format 2,
        # whose earlier presentations' probabilities are unknown. Nothing to tell by.
        det.diagnostics["doubt"] = (
            "not recorded (label_prob is 0 or NaN: not filled by accumulate_bce, or the "
            "tracker was loaded from a file saved before label_prob existed)"
        )
        return _unchecked(det, n_flagged)
    per_presentation = seen.double() / source.csl_count[presented][:, None].double()
    if not bool(((per_presentation >= 0) & (per_presentation <= 1 + 1e-5)).all()):
        # a probability summed per presentation stays in [0, 1]: edited, not recorded
        det.diagnostics["doubt"] = (
            "not usable (label_prob holds values no recording gives: a sum of probabilities "
            "below 0 or above the presentations; the tracker was edited)"
        )
        return _unchecked(det, n_flagged)
    if n_flagged == 0:
        return det
    n, labels = flagged.shape
    fitted = float(per_presentation.median())
    if fitted < FITTED_PROB:
        # soft targets (label smoothing) cap each entry's probability of its target below
        # 1, so every entry reads as doubted a little at every presentation, and the
        # doubt view's scale (the median doubt) grows with training: it would cut flips
        det.diagnostics["doubt"] = (
            f"not applied: the typical entry's mean probability of its target is "
            f"{fitted:.3f}, below {FITTED_PROB} (soft targets, or a network that fits "
            "little); the doubt view needs hard targets the network fits"
        )
        return _unchecked(det, n_flagged)
    count = source.csl_count.double()[:, None].expand(n, labels).reshape(-1)
    entry_csl = source.label_csl.double().reshape(-1)
    sure = doubted(entry_csl, count, probs.double().reshape(-1), 2).reshape(n, labels)
    anchors = flagged & sure.to(flagged.device)
    n_anchors = int(anchors.sum())
    share = n_anchors / n_flagged
    det.diagnostics["doubt"] = {
        "doubted": int(sure.sum()),
        "anchors": n_anchors,
        "anchored_share": share,
        "min_anchored_share": MIN_ANCHORED_SHARE,
    }
    if share >= MIN_ANCHORED_SHARE:
        if recount:
            _recount(det, entry_csl / count, sure.reshape(-1))
        return det
    det.flagged = anchors
    det.threshold = float(det.scores.double()[anchors].min()) if n_anchors else math.inf
    diag = det.diagnostics
    diag.update(count="lower bound", tail_flagged=n_flagged, tail_threshold=diag["threshold"])
    diag.update(flagged=n_anchors, threshold=det.threshold)
    _drop_tie_note(diag)
    det.estimated_count = n_anchors
    if det.count_interval is not None:
        det.count_interval = (n_anchors, max(n_anchors, det.count_interval[1]))
    kept = (
        f"Only those {n_anchors} stay flagged (a lower bound on the flips); review the "
        "ranking below them (top(k)) if labels may be noisy"
    )
    if n_anchors == 0:  # ("estimated at least 0 bad entries (0-198)" read as a count)
        diag["count"] = "unknown"
        det.estimated_count = det.count_interval = None
        kept = (
            "Nothing stays flagged, and the count is unknown: the entries may be clean; "
            "review the ranking (top(k)) if labels may be noisy"
        )
    cut = (
        f"csl_fast.detect_losses: the tail rule flagged {n_flagged} entries but the network "
        f"firmly rejected only {n_anchors} of them ({share:.0%}, below "
        f"{MIN_ANCHORED_SHARE:.0%}): the rest are the clean entries it learned last, whose "
        f"loss has a heavier tail than the bulk's model, as on a run with no flipped entry. "
        f"{kept}"
    )
    det.warning = "; also, ".join(filter(None, [cut, det.warning]))
    det.rule = f"{det.rule}, cut to the doubted"
    warnings.warn(cut, DetectionWarning, stacklevel=3)  # (the tail rule's was said)
    return det


def _recount(det: EntryDetection, mean_loss: torch.Tensor, pinned: torch.Tensor) -> None:
    """Replace the tail rule's count of ``det`` by the two-view count, when it finds one.

    The tail rule counts only the excess beyond two robust spreads of a bulk whose spread
    the clean entries' two groups (negatives near 0, positives higher) widen: it missed
    about half the flips at 10% and over-counted at 2%. The two-view mixture models the
    clean entries with several components and shapes the bad one on the entries the
    network rejected firmly (``benchmarks/paper/results/multilabel-doubt.md``)."""
    est = two_view_count(mean_loss, pinned)
    diag = det.diagnostics
    diag["two_view"] = {**est.diagnostics, "count": est.count, "interval": list(est.interval)}
    if not est.found:
        return  # (fewer than MIN_PINNED doubted entries): the tail rule's count stands
    values = det.scores.reshape(-1)
    finite = torch.isfinite(values)
    if est.count == est.diagnostics["label_lost"]:  # cut to the pinned entries themselves
        flagged = pinned.to(finite.device) & finite
    else:
        flagged = torch.zeros_like(finite)
        flagged[det.ranking[: min(est.count, int(finite.sum()))]] = True
    k = int(flagged.sum())
    det.flagged = flagged.reshape(det.scores.shape)
    det.threshold = float(values.double()[flagged].min()) if k else math.inf
    det.estimated_count, det.count_interval = est.count, tuple(est.interval)
    det.rule = f"{det.rule}, two-view count"
    _drop_tie_note(diag)
    diag.update(
        count_source="two_view", tail_flagged=diag["flagged"], tail_threshold=diag["threshold"],
        flagged=k, threshold=det.threshold,
    )  # fmt: skip
    _note_tie_at_cut(diag, values, det.ranking, flagged, k, int(finite.sum()), det.score_name)
    diag.pop("count", None)  # the tail rule's bound: this count is the two views'
    if est.reason is not None:
        diag["count"] = est.diagnostics.get("caveat", "lower bound")
        said = f"csl_fast.detect_losses: {est.reason.replace('samples', 'entries')}"
        det.warning = "; also, ".join(filter(None, [said, det.warning]))
        warnings.warn(said, DetectionWarning, stacklevel=4)  # (the tail rule's was said)


def _drop_tie_note(diag: dict[str, Any]) -> None:
    """Drop the tail rule's note on a cut inside a tie: the set is no longer its cut."""
    tie = diag.pop("tied_at_cut", None)
    if tie is not None:
        note = diag["note"].replace(tie["note"], "").replace("; ; ", "; ").strip("; ")
        if note:
            diag["note"] = note
        else:
            del diag["note"]


def _unchecked(det: EntryDetection, n_flagged: int) -> EntryDetection:
    """Note in ``det``, and warn, that its flagged set did not pass the doubt gate: the
    tail rule alone is no test of whether anything is wrong (a warning, not only a note:
    on the digit pairs with pixels scaled to [0, 1] the gate did not apply at 10% flips,
    and the set came back without a word, ``benchmarks/paper/results/
    multilabel-doubt-fast.md``)."""
    if n_flagged:
        unchecked = (
            f"the {n_flagged} flagged entries are the tail rule's alone (the doubt gate "
            f"{det.diagnostics['doubt']}): on clean data that rule alone flagged 2-3% of the "
            "entries; review the set before acting on it"
        )
        det.diagnostics["note"] = "; ".join(filter(None, [det.diagnostics.get("note"), unchecked]))
        said = f"csl_fast.detect_losses: {unchecked}"
        det.warning = "; also, ".join(filter(None, [said, det.warning]))
        warnings.warn(said, DetectionWarning, stacklevel=4)  # (the tail rule's was said)
    return det


def _entry_score(source: CSLTracker | torch.Tensor, score: str) -> tuple[torch.Tensor, str]:
    if isinstance(source, torch.Tensor):
        values = _score_tensor(
            source, "a score tensor", "csl_fast.detect_losses.mislabeled_entries", dims=2
        )
        if values.shape[1] == 0:
            raise ValueError(
                "csl_fast.detect_losses.mislabeled_entries: the score tensor has no labels "
                f"(shape {tuple(values.shape)})"
            )
        return values, "custom"
    _check_tracker(source, "an [N, L] score tensor")
    if source.label_csl is None:
        raise ValueError(
            "csl_fast.detect_losses.mislabeled_entries: the tracker has no per-label CSL; "
            "create it with CSLTracker(N, num_labels=L) and train with csl_fast.accumulate_bce"
        )
    if score not in ("label_csl", "label_csl_mean"):
        raise ValueError(
            "csl_fast.detect_losses.mislabeled_entries: score must be 'label_csl' or "
            f"'label_csl_mean', got {score!r}"
        )
    presented = source.csl_count > 0
    if bool(presented.any()) and not bool(source.label_csl[presented].any()):
        # record_loss (or accumulate) fills csl_sum and csl_count, never label_csl: the
        # zeros would pass for a perfectly fitted model (and rule='fraction' would flag
        # arbitrary entries)
        raise ValueError(
            "csl_fast.detect_losses.mislabeled_entries: the tracker's per-label CSL is 0 "
            f"for all {int(presented.sum())} samples it recorded: it was fed by "
            "csl_fast.record_loss or csl_fast.accumulate, which record a per-sample loss "
            "only; train with csl_fast.accumulate_bce(logits, target, index, tracker), "
            "which fills tracker.label_csl"
        )
    values = source.label_csl if score == "label_csl" else source.label_csl_mean
    presented = presented[:, None]
    return torch.where(presented, values, math.nan).detach(), score


def _entries(det: Detection, values: torch.Tensor) -> EntryDetection:
    return EntryDetection(
        det.ranking,
        values,
        det.flagged.reshape(values.shape),
        det.threshold,
        det.score_name,
        det.rule,
        [],
        det.estimated_count,
        det.count_interval,
        det.diagnostics,
        det.warning,
    )
