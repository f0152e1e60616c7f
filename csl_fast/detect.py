r"""Rank and flag suspicious training samples: mislabeled, duplicated, memorized.

Each detector takes a score source (a :class:`csl_fast.CSLTracker`, a ``{name: [N]}``
mapping such as :func:`csl_fast.scores` returns, or a plain ``[N]`` tensor), picks one
score (CSL by default, its mean per presentation or position for a tracker of unequal
presentation counts or of sequences: see :func:`default_score`; higher = more
suspicious), ranks every sample by it, and flags a set with a rule that needs **no
ground truth**. Beside the flagged set, a :class:`Detection` carries an estimate of how
many samples are bad, with an interval, the diagnostics of the rule, and a warning
whenever it flags nothing or cannot apply (also raised as a :class:`DetectionWarning`);
:func:`summary` puts it in one line.

Rules (``rule=``):

``"auto"`` (default)
    The two-view rule when the source has the margin view (a tracker, or a mapping with
    ``"aum"`` and ``"csl_mean"`` or ``"csl"``), the 1-D valley rule otherwise (a tracker
    of sequences among them: :data:`SEQUENCES_HINT` says why), or when
    the two-view rule finds too few label-lost samples (then the diagnostics say so).
    Only a tracker with ``num_classes`` has the doubt view and the firm-loss test below
    (a tracker without it, or a mapping: ``diagnostics["note"]`` says so); pass the
    tracker rather than a mapping (on digits at 5% flips the mapping's margin-only view
    pinned twice as many samples and flagged 159 instead of 99, precision 0.55 instead of
    0.86).
``"two_view"``
    Estimate the number ``k`` of bad samples with :func:`csl_fast.flagging.two_view_count`
    and flag the top ``k`` of the chosen score. Two views of the same training run:

    * *label lost* (:func:`csl_fast.flagging.label_lost`): the mean margin
      ``z_y - max_{j != y} z_j`` over training is negative (the sign of AUM, Pleiss et
      al. 2020): another class beat the given label on average, *firmly*: the label's
      probability sat below ``0.6 / C`` while it was doubted (the margin alone also
      pins hard clean samples that a network trained with augmentation or stopped early
      never fits and hesitates over: 5-7% of a clean MNIST-1D set were flagged that
      way); **or** the label was *confidently doubted for long*
      (:func:`csl_fast.flagging.doubted`; needs the tracker's ``num_classes``): the
      doubt ``D = sum_t (1 - p_y)`` exceeds 3x the median sample's (counted as at
      least one presentation), and
      ``CSL / D``, a doubt-weighted average of ``-log p / (1 - p)``, says the label's
      probability sat below ``0.2 / (C - 1)`` while doubted (the network was at least
      80% sure of another class, as for a flip, rather than hesitating, as on a hard
      clean sample). Clean samples rarely lose this way (0 of 1,797 digits and 0-4 of
      4,000 MNIST-1D samples in the clean runs of ``benchmarks/flagging.py``; on real
      MNIST 8-35 of 10,000, its ambiguous digits), so
      these samples are pinned to the bad component; it is a *lower* bound (the flips
      the network memorized fastest are caught by neither view). On a clean run they
      are usually fewer than the 3 the fit needs (nothing is flagged, with a warning),
      or a handful that the count is cut to (with a warning). Under augmentation, or
      with a network that does not memorize, some hard clean samples are lost firmly
      too (1-17 pinned in the clean runs of ``benchmarks/flagging_practice.py``, 7-18
      with MNIST-1D's own conv net in ``benchmarks/flagging_limits.py``); the mixture is
      sure of almost none of the samples it would add to them, so the count is mostly
      cut to them, and 0-27 samples (up to 0.7% of 4,000, and 9 of 1,797 digits) are
      flagged there, with a warning on every run but one.

      Why two anchors: the margin sign depends on how long the user trained. Once the
      network memorizes a flip, every further epoch adds a positive, growing margin;
      on MNIST-1D trained 100 instead of 50 epochs no flip's mean margin is negative,
      and this view alone pinned nothing, so the rule fell back and flagged nothing.
      ``CSL``, ``D`` and their ratio stop growing once the label's probability is ~1,
      so the doubt view pins nearly the same samples at 50 and 100 epochs (at 5%, two
      seeds, 50-epoch runs trained before 2026-12-01: 50 and 47 flips, 49 and 46 of them
      pinned at both lengths, no clean sample), and the flagged set keeps its precision
      and recall (below).
    * *mean loss* ``CSL / presentations``: a flipped label is fitted only by memorizing
      it, late, so its mean loss is roughly (fraction of training before it was
      memorized) x (the loss while the network predicted the true class): spread
      additively, close to normal on the linear scale. A clean sample's loss decays
      geometrically once learned, so its mean loss is spread multiplicatively: a mixture
      of Gaussians in ``log``, which takes either skew (a long tail of very easy samples
      on MNIST-1D, a tail of hard ones on digits).

    A mixture of three log-scale clean Gaussians and one linear-scale bad Gaussian,
    with the label-lost samples pinned to the bad one, places the boundary where the
    clean tail ends; the count is its expected size. The top ``k`` of the score, not the
    posterior > 1/2 set, is flagged: the mean loss ranks flipped labels best of every
    tracker statistic (a cross-validated logistic regression on all of them ranks no
    better), so the count is the only thing the rule has to get right.

    When the mixture cannot settle the count (its fits with 2, 3 and 4 clean components
    disagree by over 1.5x, or fewer than 10 samples are pinned) and the score has a
    separate upper mode, the valley rule's count of that mode is flagged instead, with a
    warning (:func:`csl_fast.flagging.settled_by_valley`): where it found a mode in the
    flagging benchmarks, it counted within 30% every time. A count that is only a lower
    bound is raised to such a mode's count when that is larger; a count with no caveat
    is raised to the count of a weaker upper mode when that lies above it and inside its
    interval (the anchors, the flips rejected firmly, shape the bad component, and where
    the memorized flips sit below them the mixture counts low).
``"valley"``
    The 1-D rule, the only one for a plain score tensor:
    :func:`csl_fast.flagging.upper_mode` finds a separate upper mode of the score's
    density (``log`` scale for a non-negative score) and flags every sample above the
    valley that separates it from the clean mode. When bad samples form a shoulder of
    the clean mode rather than a mode of their own (MNIST-1D), it finds nothing and
    warns; pass the tracker then. A discrete score whose clean mode is one value
    (forgetting counts, epochs, a 0/1 flag, mostly exact zeros) has no density to
    compare: nothing is flagged, with a warning that says so.
``"fraction"``
    Flag the top ``fraction`` of samples (``ceil(fraction * N)``): a review budget or a
    prior on the noise rate. Samples without a finite score (never presented) are not
    flagged, so fewer are when some were never presented.
``"threshold"``
    Flag the samples with ``score > threshold``.

Why the rule is built this way (the alternatives measured and rejected) and its
precision, recall and count on every regime of ``benchmarks/flagging.py``, held-out
networks included: ``docs/flagging.md``.

Non-finite scores (samples never presented) rank last and are never flagged; ``+inf``
ones also get a warning (an overflowing score would drop the most suspicious samples). The
estimating rules (``auto``, ``two_view``, ``valley``) flag nothing, with a warning, when
they count more than half the finite samples: they separate a bad minority from a clean
majority, and a network stopped before it fitted the training set makes every sample it
has not learned look bad. A tracker that recorded one epoch gets a warning beside its
flagged set: each sample's CSL is then its loss at its one presentation, high for every
sample presented before the network had learned.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch

from . import duplicate_groups as dg
from . import flagging
from ._args import integer_labels
from .duplicate_groups import exact_duplicate_groups

if TYPE_CHECKING:
    import numpy as np

    from .tracker import CSLTracker

__all__ = [
    "RULES",
    "SCORE_RULE_SAID",
    "SEQUENCES_HINT",
    "Detection",
    "DetectionWarning",
    "carry_to_groups",
    "classes_in_use",
    "count_phrase",
    "default_eval_score",
    "default_score",
    "duplicates",
    "exact_duplicate_groups",
    "memorized",
    "mislabeled",
    "rule_note",
    "summary",
]

#: The flagging rules (see the module docstring).
RULES = ("auto", "two_view", "valley", "fraction", "threshold")

#: What each detector flags, for the warnings that name it: the one-epoch warning said
#: "bad labels" to a user of :func:`memorized`, who is not looking for any
_TARGETS = {
    "mislabeled": ("look bad whatever their label", "the bad labels"),
    "memorized": ("look hard to fit whatever they are", "the atypical (memorized) samples"),
    "duplicates": ("look bad whatever their label", "the conflicting duplicates"),
}


class DetectionWarning(UserWarning):
    """A detection flagged nothing, or its rule could not apply; the message says why
    and what to try (``warnings.simplefilter("ignore", DetectionWarning)`` to silence)."""


@dataclass(eq=False)  # identity: == over tensor fields raised "ambiguous" (and broke `in`)
class Detection:
    """Samples ranked by suspicion, and a flagged set.

    Attributes:
        ranking: int64 ``[N]`` dataset indices, most suspicious first (non-finite last).
        scores: float ``[N]`` the score used, by dataset index (higher = more suspicious):
            a copy taken at detection time, also of a plain tensor or a mapping's.
        flagged: bool ``[N]`` the samples the rule flags.
        threshold: the smallest flagged finite score (``inf`` when there is none: nothing
            flagged, or only never-presented members of conflicting duplicate groups).
        score_name: the score used (``"custom"`` for a plain tensor).
        rule: the threshold rule, with its parameters.
        groups: for :func:`duplicates` with ``inputs``: the groups (lists of dataset
            indices) of identical inputs that are flagged, every member of each.
        estimated_count: the rule's estimate of how many samples are bad (mislabeled, ...),
            ``None`` for rules that do not estimate one (``fraction``, ``threshold``) and
            when the rule found no separation or counted more than half the finite
            samples (it separates only a bad minority), so that the count
            is unknown (nothing is flagged then, and ``warning`` says why;
            ``diagnostics["count"]`` is ``"unknown"``). ``diagnostics["count"] == "lower
            bound"`` when the surely-bad samples make up too small a share of the count
            (or, stretched into the clean tail by samples the fit cannot call, the count
            was cut to them: ``diagnostics["estimator"]["mixture_count"]`` keeps the
            stretched one; it keeps the mixture's count too when a separate upper mode of
            the score settled it, ``["count_source"] == "valley"``, and then the count is
            that mode's, no longer a bound; and, with ``["raised"]``, when a count with no
            caveat was raised to a weaker upper mode's inside its interval),
            ``"few anchors"`` when there are too few of them to trust the count either way,
            ``"fit-dependent"`` when the mixture's fits with 2, 3 and 4 clean components
            disagree by more than 1.5x (``warning`` says so in each case, after the
            one-epoch or low-agreement warning when one of those fires first).
        count_interval: ``(low, high)`` around ``estimated_count``, or ``None``.
        diagnostics: what the rule saw and decided (the fit, the views used, the
            threshold, why nothing was flagged); plain JSON-able values. ``note``: why the
            rule does not apply to this score or its set is arbitrary (``tied_at_cut``:
            the cut splits a run of equal scores by dataset index);
            ``positive_infinite``: how many scores are ``+inf`` (never flagged);
            ``held_out``: what the note says of the held-out samples an eval pass scored,
            which are not ranked beside the trained ones (:attr:`ranked`), when there are
            any.
        warning: a sentence saying why the flagged set is empty or unreliable and what
            to try, ``None`` when the rule applied cleanly. Also emitted with
            :func:`warnings.warn` when the detection is made.
    """

    ranking: torch.Tensor
    scores: torch.Tensor
    flagged: torch.Tensor
    threshold: float
    score_name: str
    rule: str
    groups: list[list[int]] = field(default_factory=list)
    estimated_count: int | None = None
    count_interval: tuple[int, int] | None = None
    diagnostics: dict[str, Any] = field(default_factory=dict)
    warning: str | None = None

    #: What is flagged and counted, in words (``"entries"`` for (sample, label) entries).
    unit = "samples"

    @property
    def indices(self) -> torch.Tensor:
        """Flagged dataset indices, most suspicious first."""
        return self.ranking[self.flagged[self.ranking]]

    @property
    def ranked(self) -> torch.Tensor:
        """The samples the rule ranked, most suspicious first: ``ranking`` without its tail
        of samples without a score and of held-out ones an eval pass scored (listed after
        the ranked ones in index order, their positions said nothing of suspicion)."""
        n = self.diagnostics.get("finite")
        return self.ranking[: int(torch.isfinite(self.scores).sum()) if n is None else n]

    def __len__(self) -> int:
        return int(self.flagged.sum())

    def __repr__(self) -> str:
        # the generated repr printed every [N] tensor: a wall of text at any real N
        fields = [
            f"score_name={self.score_name!r}",
            f"rule={self.rule!r}",
            f"flagged={len(self)} of {self.scores.numel()}",
            f"threshold={self.threshold:.6g}",
            f"estimated_count={self.estimated_count!r}",
            f"count_interval={self.count_interval!r}",
        ]
        if self.groups:
            fields.append(f"groups={len(self.groups)}")
        if self.warning is not None:
            fields.append(f"warning={self.warning!r}")
        return f"{type(self).__name__}({', '.join(fields)})"

    def top(self, k: int) -> torch.Tensor:
        """The ``k`` most suspicious dataset indices (fewer when fewer were ranked)."""
        return self.ranked[: _count(k)]

    def to_dataframe(self) -> Any:
        """A pandas DataFrame (index, score, flagged, rank), most suspicious first.

        ``rank`` counts from 1 (the most suspicious sample is rank 1), as in ``csl-fast
        rank`` and the cleaning plan's CSV; ``self.ranking[rank - 1]`` is that sample. It
        is ``<NA>`` (a nullable ``Int64`` column) for the samples :attr:`ranked` leaves
        out, listed last: those without a score, and held-out ones an eval pass scored
        (numbered 301-400 after the ranked ones before, though the rule never ranked them).
        """
        import pandas as pd

        r = self.ranking.cpu()
        return pd.DataFrame(
            {
                "index": r.numpy(),
                "score": self.scores.cpu().double()[r].numpy(),
                "flagged": self.flagged.cpu()[r].numpy(),
                "rank": _rank_column(len(r), int(self.ranked.shape[0])),
            }
        )


def _rank_column(n: int, ranked: int) -> Any:
    """The ``rank`` column of a detection's DataFrame: 1 to ``ranked``, then ``<NA>`` for
    the ``n - ranked`` samples (or entries) listed after the ranked ones."""
    import numpy as np
    import pandas as pd

    return pd.arrays.IntegerArray(np.arange(1, n + 1), np.arange(n) >= ranked)


def _count(k: Any) -> int:
    # a negative k would slice from the end: top(-1) was every sample but the last
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise TypeError(f"Detection.top: k must be an int >= 0, got {k!r}")
    if k < 0:
        raise ValueError(f"Detection.top: k must be an int >= 0, got {k!r}")
    return int(k)


@dataclass
class _Views:
    """The second view of the two-view rule: mean loss and label-lost, ``[N]`` each."""

    mean_loss: torch.Tensor
    lost: torch.Tensor
    #: completed epochs of the tracker (``CSLTracker.epoch``), ``None`` for a mapping
    epochs: int | None = None
    #: every presented sample was presented once (whatever ``epochs`` says)
    once: bool = False
    #: why the label-lost view is the margin's sign alone, when it is (a note for the user)
    partial: str | None = None
    #: the classes the chance levels count (:func:`classes_in_use`), None when unknown
    classes: int | None = None
    #: ``classes`` was counted from given labels, not the tracker's ``num_classes``
    counted: bool = False


def _score_tensor(x: Any, what: str, where: str = "csl_fast.detect", dims: int = 1) -> torch.Tensor:
    """``x`` checked as a real score tensor of ``dims`` dimensions (a detached copy), or a
    clear error (also for :mod:`csl_fast.detect_losses`, ``where`` naming the caller).

    A copy, as the scores of a tracker are: the caller's buffer (a CSL tensor that
    :func:`csl_fast.accumulate` keeps adding to) was the Detection's ``scores``, which
    then changed as training went on (its flagged set and threshold did not)."""
    shape = "[N]" if dims == 1 else "[N, L]"
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{where}: {what} must be a torch.Tensor {shape}, got {type(x).__name__} "
            "(convert it with torch.as_tensor)"
        )
    if x.layout != torch.strided or x.is_meta or x.is_complex():
        kind = "complex" if x.is_complex() else "meta" if x.is_meta else str(x.layout)
        raise ValueError(
            f"{where}: {what} must be a dense real tensor with data, got a {kind} tensor "
            "(use .to_dense(), .real or a tensor on a real device)"
        )
    if x.dim() != dims:
        raise ValueError(f"{where}: {what} must be {dims}-D {shape}, got {x.shape}")
    return x.detach().clone()


#: Why a two-view rule that has the sign of the mean margin only is weaker (a note).
MARGIN_ONLY = (
    "the label-lost view is the sign of the mean margin alone (no confident-doubt view, no "
    "test that the label lost firmly: hard clean samples the network never fits are pinned "
    "as bad, and a run trained long past memorizing pins no flip)"
)


#: Why a tracker of sequences gets the valley rule on ``csl_mean`` (a note, and the advice).
SEQUENCES_HINT = (
    "the tracker recorded samples of several positions (token sequences, K-dimensional "
    "logits), which have no label-lost view: a token's label is one draw of what may "
    "follow, so a clean sequence can lose most of its tokens to another prediction, and "
    "the valley rule looks for samples whose mean loss per position (csl_mean) forms a "
    "separate upper mode. Where none stands apart, the csl_mean ranking is the usable "
    "output: rule='fraction' with a review budget"
)

#: What introduces the score rule's own warning inside :func:`duplicates`' warning when
#: no group held its flagged samples (the CLI, which shows that rule's warning beside it,
#: cuts the quote there).
SCORE_RULE_SAID = ". The score rule's own warning: "

#: Scores that sum over a sample's positions: on samples of different lengths they rank
#: the long ones first, whatever their quality.
_SUMMED_OVER_POSITIONS = ("csl", "final_loss")
#: Scores built on a sequence's input-gradient norm, that of the sum of its positions'
#: losses: it grows with the sequence's length too.
_INPUT_GRAD_OVER_POSITIONS = ("loss_sensitivity", "learning_time")


def default_score(source: Any) -> str:
    """The score the detectors rank ``source`` by when none is named: ``"csl"``, the sum of
    each sample's losses, or ``"csl_mean"`` (the sum over the sample's count) where the sum
    would rank by length or by presentations: for a tracker of sequences
    (:attr:`CSLTracker.sequences`; ``csl`` would grow with a sequence's length), and for a
    tracker whose presented samples' counts differ by more than 25% (a shuffled loader
    with ``drop_last=True`` on a small data set, a weighted sampler, an epoch stopped
    part-way: ``csl`` ranked the samples presented most often first), or
    :func:`csl_fast.scores` of either. With equal counts the two rank alike. A plain
    mapping or tensor: ``"csl"``."""
    if getattr(source, "sequences", False):
        return "csl_mean"
    if _unequal_counts(source) is not None and not (
        isinstance(source, Mapping) and "csl_mean" not in source
    ):  # (scores(tracker, ["csl", "aum"]): csl, with the warning that it sums)
        return "csl_mean"
    return "csl"


def default_eval_score(source: Any) -> str:
    """The eval-pass score a ``source`` (a tracker, or its :func:`csl_fast.scores`) of eval
    passes alone is ranked by: ``"eval_csl"``, or ``"eval_csl_mean"`` where the scored
    samples' eval counts differ by more than 25% (a
    DistributedSampler's padding repeats the same samples every pass with
    ``shuffle=False``: their sums doubled and ranked first)."""
    return "eval_csl" if _unequal_counts(source, "eval_count") is None else "eval_csl_mean"


def _unequal_counts(source: Any, counts_of: str = "csl_count") -> tuple[float, float] | None:
    """``(lowest, highest)`` count (``counts_of``: presentations, or eval passes with
    ``"eval_count"``) of the counted samples of ``source`` (a tracker or its
    :func:`csl_fast.scores`) where they differ by more than 25%, else None (a mapping or
    tensor without counts too). Eval counts are of the trained samples where there are
    any: held-out ones are not ranked beside them, however often they were scored."""
    counts = getattr(source, counts_of, None)
    if counts is None:
        return None
    trained = _trained(source) if counts_of != "csl_count" else None
    if trained is not None and bool(trained.any()):
        counts = counts[trained]
    counts = counts[counts > 0]
    if counts.numel() == 0:
        return None
    lo, hi = float(counts.min()), float(counts.max())
    return (lo, hi) if hi > 1.25 * lo else None


def _length_bias(t: Any, score: str) -> str | None:
    """Why ``score`` misranks the source ``t``, or ``None``: a score summed over positions
    (a tracker of sequences; also those built on input-gradient norms, which grow with a
    sequence's length) or presentations (any other), and presented samples whose
    counts differ by more than 25%: samples presented more often than others (a weighted
    sampler, an epoch stopped part-way) ranked first, and were flagged, without a word."""
    sequences = getattr(t, "sequences", False)
    if score == "eval_csl":
        unequal = _unequal_counts(t, "eval_count")
        if unequal is None:
            return None
        return (
            "score 'eval_csl' sums the eval-pass loss over the passes that scored each "
            f"sample, and those counts (eval_count) range from {unequal[0]:g} to "
            f"{unequal[1]:g}: samples scored more often (a DistributedSampler's padding, an "
            "eval loader with drop_last=True) rank first whatever their labels. Rank and "
            "detect by 'eval_csl_mean'"
        )
    unequal = _unequal_counts(t)
    if score == "label_csl" and unequal is not None:  # (mislabeled_entries)
        return (
            f"score 'label_csl' sums each entry's loss over its sample's presentations, and "
            f"the presented samples' counts (csl_count) range from {unequal[0]:g} to "
            f"{unequal[1]:g}: the entries of samples presented more often rank first "
            "whatever their labels. Rank and detect by 'label_csl_mean' (the default for "
            "such a run)"
        )
    if sequences and score in _INPUT_GRAD_OVER_POSITIONS and unequal is not None:
        return (
            f"score {score!r} is built on each sequence's input-gradient norm, the gradient "
            "of the sum of its positions' losses, and the presented sequences' position "
            f"counts (csl_count) range from {unequal[0]:g} to {unequal[1]:g}: long sequences "
            "rank first whatever their quality. Rank and detect by 'csl_mean', or by this "
            "score within sequences of one length"
        )
    if score not in (_SUMMED_OVER_POSITIONS if sequences else ("csl",)) or unequal is None:
        return None
    lo, hi = unequal
    if not sequences:
        return (
            f"score {score!r} sums the loss over each sample's presentations, and the "
            f"presented samples' presentation counts (csl_count) range from {lo:g} to {hi:g}: "
            "samples presented more often (a shuffled loader with drop_last=True, a weighted "
            "sampler, an epoch stopped part-way) rank first whatever their labels. Rank and "
            "detect by 'csl_mean' (the default for such a run)"
        )
    return (
        f"score {score!r} sums the loss over each sequence's positions, and the presented "
        f"sequences' position counts (csl_count) range from {lo:g} to {hi:g}: long sequences "
        "rank first whatever their quality. Rank and detect by 'csl_mean' (the default for "
        "a tracker of sequences)"
    )


def _losses_only_hint(entries: bool) -> str:
    """The advice of a warning on a run that recorded losses only (no margin view)."""
    from .scores import LOSS_ONLY

    tail = (
        "mislabeled_entries(tracker) for the (sample, label) entries, or corrupted_targets(tracker)"
        if entries
        else "corrupted_targets(tracker)"
    )
    binary = (
        ""
        if entries
        # (its tail rule flagged none of 30 flips that CSL ranked at AUROC 0.998, where the
        # 2-class form's two-view rule flagged 27)
        else "; for a binary classifier's BCE on [B] logits z, record the same loss and "
        "gradient as 2-class cross entropy, csl_fast.accumulate(torch.stack("
        "[torch.zeros_like(z), z], 1), y.long(), index, tracker), which keeps the softmax "
        "views this rule reads"
    )
    return (
        f"{LOSS_ONLY}. Try: csl_fast.detect_losses.{tail} (its tail rule is built for "
        f"such losses), or rule='fraction' with a prior on the noise rate{binary}"
    )


def _two_sided(
    values: torch.Tensor, score: str
) -> tuple[torch.Tensor, str, None, str | None, None] | None:
    """:func:`_select` of a two-sided score (the valley rule alone, its note the hint said
    in every warning), or None
    for any other. Its top is not the suspicious end: the two-view count applied to its
    top-k flagged clean samples (precision 0.01) with no warning, and clean() relabelled
    them."""
    from .scores import SCORES

    if score not in SCORES or not SCORES[score].two_sided:
        return None
    return values, score, None, rule_note(score, values, True), None


def classes_in_use(tracker: Any, labels: Any = None) -> int | None:
    """The number of classes the label-lost view's chance levels count
    (:func:`csl_fast.flagging.label_lost`): with ``labels`` (int ``[N]``, the given
    labels, checked by :func:`check_labels`), the distinct labels among the samples the
    tracker saw presented (``csl_count > 0``), negative ones (unlabelled, as an
    ``ignore_index``) left out; else the tracker's ``num_classes``
    (``None`` when unset), which counts the output classes no sample carries too: the
    tracker does not keep the labels.

    Why not ``num_classes`` alone: chance on 8 outputs of which 3 are used is a third, not
    an eighth, and the thresholds scaled by ``1 / C`` then pinned no flip (iris recorded
    with ``num_classes=8``: nothing flagged, 14 with 3)."""
    if labels is None:
        return tracker.num_classes
    y = check_labels(tracker, labels)
    y = y.cpu()
    used = y[(tracker.csl_count > 0).cpu() & (y >= 0)]
    if used.numel() and int(used.max()) < 2**24:
        # (a count per class: O(N), where unique's sort took 1.5 s at N = 10M)
        return int(torch.count_nonzero(torch.bincount(used.long())))
    return int(torch.unique(used).numel())


def check_labels(tracker: Any, labels: Any, where: str = "csl_fast.detect") -> torch.Tensor:
    """``labels`` as a tensor, or an error that says what is wrong with them: the int
    ``[N]`` given labels of the tracker's samples (a tensor, NumPy array or list), those
    of the presented samples in ``[0, num_classes)`` when the tracker knows
    ``num_classes`` (negative ones allowed: ``ignore_index``, unlabelled)."""
    n = int(tracker.csl_count.numel())
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        # (torch said only "too many dimensions 'str'")
        raise TypeError(
            f"{where}: labels must be the int [N] = [{n}] given labels of the tracker's "
            f"samples (a tensor, NumPy array or list of ints), got {type(labels).__name__} "
            "that is not numbers"
        ) from None
    if y.shape != (n,) or not integer_labels(y.dtype):
        raise ValueError(
            f"{where}: labels must be the int [N] = [{n}] given labels of the tracker's "
            f"samples, got {y.dtype} {tuple(y.shape)}"
        )
    # a label past the outputs is not this run's (1-based labels, another data set's):
    # counted as a class, it moved the chance levels silently
    dg.check_class_labels(where, y.cpu()[(tracker.csl_count > 0).cpu()], tracker.num_classes)
    return y


def _select(
    source: Any, score: str | None, labels: Any = None, where: str = "csl_fast.detect"
) -> tuple[torch.Tensor, str, _Views | None, str | None, str | None]:
    """``(values, name, views, hint, caveat)``; ``hint`` replaces the usual advice of a
    warning when the source cannot take it (a tracker that recorded losses only, or
    sequences); ``caveat``: why the score misranks this source, said in every case.
    ``labels`` (a tracker's): checked (:func:`check_labels`, errors from ``where``), and
    counted for the classes in use."""
    if score is None:
        score = default_score(source)
    if isinstance(source, torch.Tensor):
        return _score_tensor(source, "a score tensor"), "custom", None, None, None
    if not isinstance(score, str):
        raise TypeError(
            f"csl_fast.detect: score must be the name of one score (a str such as 'csl'), "
            f"got {type(score).__name__}"
        )
    if isinstance(source, Mapping):
        if score not in source:
            raise KeyError(f"csl_fast.detect: no score {score!r} in the mapping ({sorted(source)})")
        values = _score_tensor(source[score], f"score {score!r} of the mapping")
        if (two_sided := _two_sided(values, score)) is not None:
            return two_sided
        other, scored, mixed = _other_recorder(source, values, score) or (None, None, None)
        if getattr(source, "sequences", False):  # csl_fast.scores of sequences
            if mixed is not None:
                values, _, _, mixed = _without_other_loss(values, None, None, other, mixed, scored)
            caveat = "; ".join(filter(None, [mixed, _length_bias(source, score)])) or None
            return values, score, None, SEQUENCES_HINT, caveat
        if getattr(source, "losses_only", False):  # csl_fast.scores of a losses-only run
            # (the valley rule ran on it without a word, and the advice sent the user to
            # csl_fast.scores(tracker), what was passed)
            hint = _losses_only_hint(entries=False)
            return values, score, None, hint, _length_bias(source, score)
        loss_key = "csl_mean" if "csl_mean" in source else "csl" if "csl" in source else None
        views = None
        if "aum" in source and loss_key is not None:
            loss = _score_tensor(source[loss_key], f"score {loss_key!r} of the mapping")
            aum = _score_tensor(source["aum"], "score 'aum' of the mapping")
            for key, t in ((loss_key, loss), ("aum", aum)):
                if t.shape != values.shape:
                    raise ValueError(
                        f"csl_fast.detect: the mapping's scores must all be [N]: {score!r} has "
                        f"{values.numel()} samples, {key!r} has {t.numel()}"
                    )
            # csl_fast.scores orients "aum" as minus the mean margin: > 0 means lost
            lost = torch.isfinite(aum) & (aum > 0)
            why = f"a score mapping has no num_classes, so {MARGIN_ONLY}; pass the tracker itself"
            views = _Views(loss, lost, partial=why)
        if mixed is not None:  # ranked as from the tracker (it flagged the other loss's first)
            loss = None if views is None else views.mean_loss
            lost = None if views is None else views.lost
            values, loss, lost, mixed = _without_other_loss(
                values, loss, lost, other, mixed, scored
            )
            if views is not None:
                views = _Views(loss, lost, partial=views.partial)
        caveat = "; ".join(filter(None, [mixed, _length_bias(source, score)])) or None
        return values, score, views, None, caveat
    from .scores import scores as compute
    from .tracker import CSLTracker

    if not isinstance(source, CSLTracker):
        raise TypeError(
            "csl_fast.detect: source must be a CSLTracker, a {name: [N]} score mapping "
            f"(csl_fast.scores(tracker)) or an [N] score tensor, got {type(source).__name__}"
        )
    if labels is not None:  # (before the returns below, which do not read them)
        check_labels(source, labels, where)
    values = compute(source, [score])[score]
    if (two_sided := _two_sided(values, score)) is not None:
        return two_sided
    t = source
    presented = t.csl_count > 0
    views_read = (t.p_true_sum != 0) | (t.margin_sum != 0)
    if bool(presented.any()) and not bool((presented & views_read).any()):
        # losses only (record_loss, accumulate_bce): the views would read zeros, not margins
        return (
            values,
            score,
            None,
            _losses_only_hint(t.label_csl is not None),
            _length_bias(t, score),
        )
    other, scored, mixed = _other_recorder(t, values, score) or (None, None, None)
    if t.sequences:
        if mixed is not None:  # (they ranked first, under a note saying they had no score)
            values, _, _, mixed = _without_other_loss(values, None, None, other, mixed, scored)
        caveat = "; ".join(filter(None, [mixed, _length_bias(t, score)])) or None
        return values, score, None, SEQUENCES_HINT, caveat
    classes = classes_in_use(t, labels)
    # (one label in use: no chance level between classes, and nothing to separate; the
    # warning says so)
    chance = classes if classes is not None and classes >= 2 else t.num_classes
    if chance is not None and chance >= 2:
        lost = flagging.label_lost(t.csl_sum, t.csl_count, t.p_true_sum, t.margin_sum, chance).to(
            presented.device
        )
        partial = None
    else:  # no chance level to compare the label's probability with: the margin alone
        lost = presented & (t.margin_sum < 0)
        partial = (
            None
            if t.num_classes is not None
            else f"the tracker has no num_classes, so {MARGIN_ONLY}; load its state into a "
            "tracker that has: t = CSLTracker(N, num_classes=C); "
            "t.load_state_dict(tracker.state_dict()) (accumulate sets it from the logits)"
        )
    mean_loss = t.csl_mean
    if mixed is not None:
        values, mean_loss, lost, mixed = _without_other_loss(
            values, mean_loss, lost, other, mixed, scored
        )
    # end_epoch is optional (epoch 0 then): the presentations tell one epoch apart
    once = bool((t.csl_count[presented] <= 1).all()) and bool(presented.any())
    views = _Views(mean_loss, lost, t.epoch, once, partial, classes, labels is not None)
    caveat = "; ".join(filter(None, [mixed, _length_bias(t, score)])) or None
    return values, score, views, None, caveat


def _other_recorder(
    source: Any, values: torch.Tensor, score: str
) -> tuple[torch.Tensor, torch.Tensor | None, str] | None:
    """``(other, scored, said)`` for :func:`_without_other_loss` of a tracker that mixes
    recorders (:func:`csl_fast.scores.mixed_recorders` says ``said``) or of its
    :func:`csl_fast.scores` mapping, which keeps ``other_loss``; None for any other
    source. ``scored``: the samples whose ``score`` (of ``values``) an eval pass gave."""
    from .scores import (
        eval_is_latest,
        from_eval_pass,
        mixed_recorders,
        mixed_recorders_note,
        other_loss,
    )
    from .tracker import CSLTracker

    if isinstance(source, CSLTracker):
        said = mixed_recorders(source)
        if said is None:
            return None
        # (a score an eval pass gave them is cross-entropy on the given label, as the others')
        latest = eval_is_latest(source)
        scored = source.eval_count > 0 if from_eval_pass(score, latest) else None
        return other_loss(source), scored, said
    other = getattr(source, "other_loss", None)  # csl_fast.scores of a mixed tracker
    if not isinstance(other, torch.Tensor) or other.shape != values.shape:
        return None
    said = mixed_recorders_note(other, getattr(source, "csl_count", None))
    counts = getattr(source, "eval_count", None)
    scored = counts > 0 if isinstance(counts, torch.Tensor) else None
    # (Scores pickled before eval_latest was kept: the last pass is the latest)
    latest = scored is not None and bool(scored.any()) and getattr(source, "eval_latest", True)
    if not from_eval_pass(score, latest):
        scored = None
    return other, scored, said


def _without_other_loss(
    values: torch.Tensor,
    mean_loss: torch.Tensor | None,
    lost: torch.Tensor | None,
    other: torch.Tensor,
    said: str,
    scored: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, str]:
    """``(values, mean_loss, lost, said)`` with the ``other`` samples (recorded without
    softmax statistics in a tracker that mixes recorders, :func:`csl_fast.scores.
    mixed_recorders` says ``said``) given no score and no view: their zero sums read as a
    label lost or doubted, and their CSL is another loss's, which ranked them first (20
    flagged, all of them, and none of 20 flipped labels; clean dropped them). ``scored``:
    the samples whose value of this score an eval pass gave (cross-entropy on the given
    label, as the others'), which keep it; their training views go all the same."""
    other = other.to(values.device)
    wide = values if values.is_floating_point() else values.double()
    blank = other if scored is None else other & ~scored.to(other.device)
    values = torch.where(blank, math.nan, wide)
    if mean_loss is not None:
        mean_loss = torch.where(other, math.nan, mean_loss)
    if lost is not None:
        lost = lost & ~other
    kept = "" if scored is None else " (a score an eval pass gave them counts as the others')"
    said += (
        "; the detection gives them no score from training: they are not ranked or flagged "
        f"by it{kept} (detect them from a tensor of their CSL, NaN elsewhere)"
    )
    return values, mean_loss, lost, said


def rule_note(score_name: str, values: torch.Tensor, has_views: bool) -> str | None:
    """Why the default rule cannot give a trustworthy flagged set for the score
    ``score_name`` of ``values`` (``[N]``), or ``None`` when it can. For the CLI and the
    report, beside a ranking.

    ``has_views``: the source has the tracker's margin view (two-view rule available).
    A two-sided score of :data:`csl_fast.scores.SCORES` (``variability``) gets a note
    whatever the source: no direction of it means "suspicious" in every regime.
    """
    from .scores import SCORES

    info = SCORES.get(score_name)
    if info is not None and info.two_sided:
        return (
            f"score {score_name!r} has no suspicious direction ({info.direction}): its top "
            "samples are not the suspicious ones, whatever the rule; rank by csl"
        )
    if has_views:
        return None
    finite = values[torch.isfinite(values)]
    if finite.numel() == 0:
        return f"score {score_name!r} is undefined for every sample: nothing can be flagged"
    if bool((finite < 0).any()):
        return (
            f"score {score_name!r} is two-sided (it takes negative values): the valley rule "
            "looks for an upper mode on its raw scale, which a two-sided score need not have; "
            "detect from the tracker (or csl_fast.scores(tracker)) for the two-view count"
        )
    return (
        f"only the 1-D valley rule applies to a plain {score_name!r} tensor (no margin view); "
        "it flags only a bad group that forms a separate mode: detect from the tracker for "
        "the two-view count"
    )


def _ranking(values: torch.Tensor, finite: torch.Tensor) -> torch.Tensor:
    """Indices by descending value, ties in index order, non-finite last.

    Sorted as order-preserving integers (the float's bits with the magnitude bits of
    negative values flipped), because PyTorch's stable CPU sort of int64 keys is a radix
    sort, several times faster than its float sort at N = 10M.
    """
    v = values.detach()
    # integers in float64: float32 merged those above 2**24 (2**25 and 2**25 + 1 tied,
    # ranked by index, while the threshold rule, in float64, told them apart)
    wide = v.dtype == torch.float64 or not (v.is_floating_point() or v.dtype == torch.bool)
    v = (v.double() if wide else v.float()) + 0.0  # -0.0 -> +0.0: equal, tied
    if v.dtype == torch.float64:
        bits = v.view(torch.int64)
        mask = 0x7FFF_FFFF_FFFF_FFFF
    else:
        bits = v.view(torch.int32).long()
        mask = 0x7FFF_FFFF
    key = torch.where(bits < 0, bits ^ mask, bits)
    key = torch.where(finite, key, torch.iinfo(torch.int64).min)
    return torch.sort(~key, stable=True).indices  # ~ reverses the order without overflow


def _tie_at_cut(
    values: torch.Tensor, ranking: torch.Tensor, flagged: torch.Tensor, k: int, n_finite: int
) -> dict[str, Any] | None:
    """``{value, tied, flagged}`` when the flagged top ``k`` of ``ranking`` ends inside a
    run of equal scores (a top-``k`` rule on a discrete score), ``None`` otherwise."""
    if k == 0 or k >= n_finite:
        return None
    v = values.detach().double()
    last, after = v[ranking[k - 1]], v[ranking[k]]
    if not bool(last == after):
        return None
    tied = v == last
    return {
        "value": float(last),
        "tied": int(tied.sum()),
        "flagged": int((tied & flagged.to(tied.device)).sum()),
    }


def _note_tie_at_cut(
    diag: dict[str, Any],
    values: torch.Tensor,
    ranking: torch.Tensor,
    flagged: torch.Tensor,
    k: int,
    n_finite: int,
    name: str,
) -> None:
    """Say in ``diag`` (``tied_at_cut`` and the note) when the flagged top ``k`` splits a
    run of equal scores: which of them are flagged then depends on the dataset order."""
    tie = _tie_at_cut(values, ranking, flagged, k, n_finite)
    if tie is None:
        return
    split = (
        f"the cut falls inside a tie: {tie['tied']} samples score {name!r} = "
        f"{tie['value']:.6g} and {tie['flagged']} of them are flagged, chosen by dataset "
        "index (the ranking breaks ties in index order); rank by a finer score (csl) for "
        "a flagged set that does not depend on the order"
    )
    diag["tied_at_cut"] = {**tie, "note": split}
    diag["note"] = "; ".join(filter(None, [diag.get("note"), split]))


def _top_k(ranking: torch.Tensor, finite: torch.Tensor, k: int) -> torch.Tensor:
    flagged = torch.zeros_like(finite)
    k = min(k, int(finite.sum()))
    if k > 0:
        flagged[ranking[:k]] = True
    return flagged


#: Below this share of the mean loss's top ``k`` in a score's top ``k`` (``k`` the
#: two-view count), the flagged set is said to be mostly not what was counted. On five
#: audited digits runs (2-10 classes) the scores ranked like the loss agreed 0.61-1.0
#: (precision 0.64-1.0), in_confidence (the final model's doubt, label-blind) 0.09-0.37
#: (precision 0.09-0.22).
MIN_AGREEMENT = 0.5


def _rule_flags(
    values: torch.Tensor,
    ranking: torch.Tensor,
    finite: torch.Tensor,
    rule: str,
    views: _Views | None,
) -> tuple[torch.Tensor, flagging.Estimate, dict[str, Any]]:
    """The ``auto`` / ``two_view`` / ``valley`` rules: ``(flagged, estimate, diagnostics)``."""
    diag: dict[str, Any] = {}
    est: flagging.Estimate | None = None
    if rule in ("auto", "two_view"):
        if views is None:
            if rule == "two_view":
                raise ValueError(
                    "csl_fast.detect: rule='two_view' needs the margin view: pass the tracker "
                    "or a mapping with 'aum' and 'csl_mean' (csl_fast.scores(tracker))"
                )
            # (a plain tensor, a mapping without 'aum', or a run that recorded losses only)
            diag["views"] = "1-D only (the source has no margin view)"
        else:
            if views.mean_loss.shape != values.shape:
                raise ValueError(
                    f"csl_fast.detect: the mean loss has {views.mean_loss.numel()} samples "
                    f"but the score has {values.numel()}"
                )
            trained = torch.isfinite(views.mean_loss)
            untrained = int((finite & ~trained).sum())
            if untrained and bool(trained.any()):
                # (_detect left the held-out samples out when the score has trained ones
                # too) a score of held-out samples alone: the views are the training run's
                # and do not see them; the score itself finds their flips
                why = (
                    f"the score is defined on {untrained} samples the run never trained on "
                    "(an eval pass over held-out ones) and on none it trained on, and the "
                    "training views do not see them: counted and flagged by the valley rule on "
                    "the score alone"
                )
                if rule == "two_view":
                    raise ValueError(
                        f"csl_fast.detect: rule='two_view' needs a score of trained samples; "
                        f"{why}; use rule='auto'"
                    )
                diag["views"] = "1-D only (the score covers samples the run never trained on)"
                diag["coverage"] = why
            else:
                positive = trained & (views.mean_loss > 0)
                presented, covered = int(positive.sum()), finite & positive
                mean_loss = views.mean_loss
                if int(covered.sum()) < presented:
                    # a score defined on part of the run (an eval pass over some samples, input
                    # gradients of some): the count of all presented samples was flagged among
                    # the scored ones alone (half clean, no word), and set against their number
                    # in the majority test ('30 of 20 samples')
                    mean_loss = torch.where(finite, mean_loss, math.nan)
                    diag["coverage"] = (
                        f"the score is defined on {int(covered.sum())} of the {presented} samples "
                        "presented in training: the count and the flagged set are of those"
                    )
                est = flagging.two_view_count(mean_loss, views.lost & finite)
                diag["views"] = "two-view (mean CSL + sign of the mean margin)"
                if not est.found:
                    diag["two_view"] = {**est.diagnostics, "reason": est.reason}
                    if rule == "two_view":
                        return torch.zeros_like(finite), est, diag
                    diag["views"] += "; fell back to the 1-D valley rule"
                    est = None
                else:
                    est = flagging.settled_by_valley(est, values)
                    # (the score's top that many, also when the count is cut to the pinned
                    # samples: flagging those instead lowered precision on 4 of the 7 noisy
                    # benchmark runs where it changed the set, and raised it on none, since
                    # the pinned include confidently doubted clean samples)
                    flagged = _top_k(ranking, finite, est.count)
                    if est.count:
                        # the count is of the samples the views see as bad; another score's top
                        # that many need not be them (in_confidence: 15% of them bad, no word)
                        # (the k-th largest mean loss by topk, not a second full ranking: half a
                        # second at N = 10 million)
                        loss = views.mean_loss
                        loss = torch.where(finite & torch.isfinite(loss), loss, -math.inf)
                        kth = torch.topk(loss, est.count).values[-1]
                        diag["agreement"] = float((flagged & (loss >= kth)).sum()) / est.count
                    return flagged, est, diag
    est = flagging.upper_mode(values)
    if not est.found:
        return torch.zeros_like(finite), est, diag
    thr = math.exp(est.cut) if est.diagnostics["scale"] == "log" else est.cut
    return finite & (values.double() > thr), est, diag


def _advice(views: _Views | None, hint: str | None = None) -> str:
    """What to try, as a sentence: every warning puts it after a full stop."""
    return _sentence(_advice_text(views, hint))


def _sentence(text: str) -> str:
    """``text`` with its first letter upper-case, to follow a full stop (the hints start
    lower-case to be quoted mid-sentence: a warning read "... in this run. the tracker
    recorded ...")."""
    return text[:1].upper() + text[1:]


def _advice_text(views: _Views | None, hint: str | None) -> str:
    if hint is not None:
        return hint
    if views is None:
        return (
            "try: detect from the tracker (or csl_fast.scores(tracker)) for the two-view "
            "count, or rule='fraction' with a prior on the noise rate"
        )
    if views.epochs == 1 or views.once:
        # the advice below (fewer epochs) would be backwards for a run that never got going
        return (
            "try: train several epochs (until nearly every label is fitted) and detect again: "
            "the tracker recorded one epoch (one presentation per sample), so each sample's "
            "CSL is its loss at that presentation, before most labels were fitted"
        )
    # the anchors are labels still lost or doubted when averaged over training: a network
    # that fits every label at once (wine's 178 samples: 0 lost at 200 or 400 epochs, 3 at
    # 60) leaves none, and training longer only adds epochs in which the flips are fitted.
    # On 659 digits a third of the epochs or of the learning rate took 8-9 of 12 noisy runs
    # to precision and recall >= 0.8 (5 before); a tenth of the learning rate left clean
    # samples unfitted, and they were flagged (benchmarks/results/flagging-small-data.md)
    advice = (
        "try: if the network fitted every label within a few epochs (a small or easy data "
        "set, a high learning rate), train for fewer epochs or with a lower learning rate "
        "(a few times fewer or lower, not so far that clean labels go unfitted) so that bad "
        "labels are fitted late and stand apart; or rule='fraction' with a prior on the "
        "noise rate / review budget"
    )
    if not views.counted and views.classes is not None and views.classes > 2:
        # outputs no label uses lower the chance levels 1 / C until no flip loses firmly
        # (iris on 8 outputs: nothing flagged; the schedule advice alone was no help)
        advice += (
            f". The chance levels count all {views.classes} output classes: if the model "
            "has outputs no label uses, pass labels= (the given labels) so that they count "
            "the classes in use (csl-fast rank, clean and report read them from the run's "
            "samples.npz: RunSamples(labels=...).save(path), or, to keep what a samples.npz "
            "holds, dataclasses.replace(RunSamples.load(path), labels=...).save(path))"
        )
    return advice


def _majority_advice(target: str) -> str:
    """What to try when a majority of the samples looks bad (``target``: what the
    detector looks for)."""
    return (
        "Either the network had not fitted the training set yet (too few epochs or too low "
        "a learning rate), so every sample it had not learned looks bad: train until nearly "
        "every label is fitted and detect again; or most samples are hard for it "
        "(overlapping classes, few samples per class), and then no training length "
        f"separates {target} from hard ones; or {target} really are the majority. "
        "rule='fraction' flags a review budget"
    )


def _number(value: Any, name: str, rule: str, where: str = "csl_fast.detect") -> float:
    """``value`` as a float, refused with a clear error unless it is a real number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.is_complex():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(value):
        raise ValueError(f"{where}: rule={rule!r} needs {name}= a real number, got {value!r}")
    return float(value)


def _fraction_count(fraction: Any, n: int) -> int:
    """``ceil(fraction * n)`` as the decimal reads: ``0.07 * 100`` is ``7.000000000000001``
    in floating point, and a float32 ``0.1`` times 1,000 is ``100.0000015``; both are 7 and
    100 samples, not 8 and 101, so a relative excess of up to 1e-6 is rounding."""
    x = float(fraction) * n
    return math.ceil(x - 1e-6 * x)


def _unused(rule: str, fraction: Any, threshold: Any, where: str) -> None:
    """Refuse a ``fraction=`` or ``threshold=`` that ``rule`` would silently ignore
    (``mislabeled(t, fraction=0.05)`` ran the default rule)."""
    for name, value in (("fraction", fraction), ("threshold", threshold)):
        if value is not None and rule != name:
            raise ValueError(
                f"{where}: {name}={value!r} is read only by rule={name!r}, got rule={rule!r}: "
                f"pass rule={name!r} (or drop {name}=)"
            )


def _trained(source: Any) -> torch.Tensor | None:
    """bool ``[N]``: the samples the run of ``source`` trained on (presented at least once,
    ``csl_count > 0``) for a tracker or a :class:`csl_fast.scores.Scores` mapping, which
    keeps its tracker's counts; ``None`` for a plain tensor or mapping (the views, when it
    has them, tell: :func:`_rankable`). A loss-only run has no views: its held-out samples
    an eval pass scored were ranked among the trained ones, and flagged, without a word."""
    counts = getattr(source, "csl_count", None)
    if not isinstance(counts, torch.Tensor) or counts.dim() != 1:
        return None
    return counts > 0


def held_out_note(
    untrained: int, views: bool = True, detect_with: str = "csl_fast.detect.mislabeled"
) -> str:
    """What a detection says of the ``untrained`` samples with a score that it does not
    rank: held-out ones an eval pass scored, beside trained ones (:func:`_rankable`);
    ``views``: the detection has the training views (a loss-only run has none)."""
    why = (
        "the training views do not see them"
        if views
        else "the run never fitted them (their loss is not on the trained ones' footing)"
    )
    return (
        f"{untrained} samples with a score were never trained on (an eval pass over "
        f"held-out ones): {why}, so they are not ranked or flagged; detect among them "
        f"alone with {detect_with}(a tensor of their scores, NaN elsewhere)"
    )


def _rankable(
    values: torch.Tensor, views: _Views | None, trained: torch.Tensor | None = None
) -> tuple[torch.Tensor, int]:
    """``(ranked, held)``: bool ``[N]`` the samples a detection ranks, and how many with a
    finite score it leaves out: held-out ones an eval pass scored, when the score has
    trained ones too (the two-view count is of the trained ones: pooled, the valley rule
    found no mode and flagged none of 89 flips on digits). Every detector ranks by it:
    :func:`duplicates` with ``labels`` ranked held-out samples among trained ones.
    ``trained``: the samples trained on (:func:`_trained`), else read from the views' mean
    loss (finite where presented); neither: every finite score is ranked."""
    finite = torch.isfinite(values)
    if trained is None and views is not None:
        trained = torch.isfinite(views.mean_loss)
    if trained is None or trained.shape != values.shape:
        return finite, 0
    trained = trained.to(finite.device)
    untrained = int((finite & ~trained).sum())
    if untrained and bool((finite & trained).any()):
        return finite & trained, untrained
    return finite, 0


def _detect(
    values: torch.Tensor,
    name: str,
    rule: str,
    fraction: float | None,
    threshold: float | None,
    views: _Views | None,
    hint: str | None = None,
    detector: str = "mislabeled",
    caveat: str | None = None,
    emit: bool = True,
    trained: torch.Tensor | None = None,
) -> Detection:
    """The rule's flagged set and count; ``detector`` (a key of ``_TARGETS``) words the
    warnings for what the caller looks for; ``caveat`` (see :func:`_select`) is added to
    the note and the warning; ``emit=False`` leaves the warning to the caller (it is in
    ``Detection.warning``); ``trained``: the samples the run trained on (:func:`_trained`),
    the only ones ranked when the score has held-out ones too."""
    if rule not in RULES:
        raise ValueError(f"csl_fast.detect: rule must be one of {RULES}, got {rule!r}")
    _unused(rule, fraction, threshold, "csl_fast.detect")
    finite, untrained = _rankable(values, views, trained)
    rule_values, held_out = values, None
    if untrained:  # held-out samples an eval pass scored, beside trained ones
        wide = values if values.is_floating_point() else values.double()
        rule_values = torch.where(finite, wide, math.nan)
        held_out = held_out_note(untrained, views is not None)
    ranking = _ranking(values, finite)
    n_finite = int(finite.sum())
    diag: dict[str, Any] = {"rule": rule, "samples": values.numel(), "finite": n_finite}
    if held_out is not None:  # (also in the note: here for a page that shows the warning)
        diag["held_out"] = held_out
    if views is not None and views.classes is not None:
        # (whatever is flagged: csl_fast.clean reads it to choose its policy on two classes)
        diag["classes_in_use"] = views.classes
    count: int | None = None
    interval: tuple[int, int] | None = None
    warning: str | None = None
    if rule == "fraction":
        if fraction is None or not 0 <= _number(fraction, "fraction", rule) <= 1:
            raise ValueError("csl_fast.detect: rule='fraction' needs fraction in [0, 1]")
        flagged = _top_k(ranking, finite, _fraction_count(fraction, values.numel()))
        desc = f"fraction({fraction})"
    elif rule == "threshold":
        if threshold is None:
            raise ValueError("csl_fast.detect: rule='threshold' needs threshold=")
        thr_value = _number(threshold, "threshold", rule)
        flagged = finite & (values.double() > thr_value)
        desc = f"threshold({threshold})"
        if n_finite and not bool(flagged.any()):
            top = float(values.double()[finite].max())
            warning = (
                f"csl_fast.detect: nothing flagged by rule={rule!r}: no {name!r} score "
                f"exceeds threshold={thr_value:g} (the largest is {top:.6g}); lower it "
                "(scores are higher = more suspicious), or use rule='fraction'"
            )
    else:
        if rule == "two_view" and views is None and hint is not None:
            raise ValueError(f"csl_fast.detect: rule='two_view' needs the margin view; {hint}")
        flagged, est, extra = _rule_flags(rule_values, ranking, finite, rule, views)
        diag.update(extra)
        diag["estimator"] = {**est.diagnostics, "reason": est.reason}
        desc = f"{rule}({est.diagnostics['estimator']})"
        note = hint if hint is not None else rule_note(name, values, views is not None)
        if hint == SEQUENCES_HINT:  # (the two-sided caveat, which applies whatever the rule)
            note = "; ".join(filter(None, [rule_note(name, values, True), hint]))
        if views is not None and views.partial is not None:
            note = "; ".join(filter(None, [note, views.partial]))
        note = "; ".join(filter(None, [note, diag.get("coverage"), held_out])) or None
        if note is not None:
            diag["note"] = note
        if est.found and 2 * est.count > n_finite:
            # every estimator here separates a bad minority from a clean majority; a count
            # over half the samples contradicts that premise. Measured on digits (MLP, 5%
            # flips): 1-3 epochs of Adam or 1-5 of SGD flagged 559-1773 of 1,797 with no
            # warning, every sample the network had not learned yet. On 100 overlapping
            # classes of 20 samples a majority was counted at 15 epochs or lr 0.01 and no
            # label lost at 60 epochs and lr 0.05: no length of training helps there
            diag["count"] = "unknown"
            diag["majority_count"] = {"count": est.count, "interval": list(est.interval)}
            flagged = torch.zeros_like(finite)
            target = _TARGETS[detector][1]
            warning = (
                f"csl_fast.detect: nothing flagged by rule={rule!r}: it counted {est.count} of "
                f"{n_finite} samples among {target}, more than half, but it can only separate "
                f"a bad minority from a clean majority. {_majority_advice(target)}"
            )
        elif est.found:
            count, interval = est.count, est.interval
            also = ""
            if est.reason is not None:  # a lower bound, few anchors, a fit-dependent count
                # whatever else is warned of: the one-epoch and low-agreement warnings left
                # it unset and said nothing of it (count_phrase lost "at least" / "likely
                # more"); they now say it after their own reason
                diag["count"] = est.diagnostics.get("caveat", "lower bound")
                also = f". Also, on the count ({diag['count']}): {est.reason}"
            if views is not None and (views.epochs == 1 or views.once):
                # one presentation per sample: its CSL is its loss at that moment, so the
                # samples that came before the network had learned look bad whatever their
                # label (clean digits, one epoch of SGD: 775-848 of 1,797 flagged)
                diag["one_epoch"] = True
                look, target = _TARGETS[detector]
                warning = (
                    f"csl_fast.detect: {int(flagged.sum())} flagged by rule={rule!r}, but the "
                    "tracker recorded one epoch (one presentation per sample): each sample's "
                    "CSL is its loss at that presentation, so the samples presented before "
                    "the network had learned "
                    f"{look}, and the flagged set mixes them with {target}. Train several "
                    "epochs (until nearly every label is fitted) and detect again"
                    f"{also}"
                )
            elif diag.get("agreement", 1.0) < MIN_AGREEMENT:
                warning = (
                    f"csl_fast.detect: {int(flagged.sum())} flagged by rule={rule!r}, but the "
                    f"count ({est.count}) is of the samples the mean loss and the lost labels "
                    f"show as bad, and the top {est.count} by {name!r} hold only "
                    f"{diag['agreement']:.0%} of the top {est.count} by mean loss: {name!r} "
                    "ranks other samples first, and the flagged set is mostly not what was "
                    "counted; rank by 'csl_mean', the mean loss the count came from (it "
                    "ranks as csl where every sample was presented equally often), or check "
                    f"this score's ranking on data whose bad labels you know{also}"
                )
            elif est.reason is not None:
                # settled by the score's own upper mode: no training advice is needed
                settled = est.diagnostics.get("count_source") == "valley"
                advice = "" if settled else f" {_advice(views, hint)}"
                warning = (
                    f"csl_fast.detect: {int(flagged.sum())} flagged by rule={rule!r}, but "
                    f"{est.reason}.{advice}"
                )
        else:
            # no separation: the count is unknown, not zero (the labels may be clean, or
            # the bad ones may not stand apart in this run); the surely-bad samples, if
            # any, are a lower bound
            diag["count"] = "unknown"
            lost = int(diag.get("two_view", {}).get("label_lost", 0))
            diag["count_lower_bound"] = lost
            if views is not None and (views.epochs == 1 or views.once):
                diag["one_epoch"] = True
            why = est.reason or "the rule found no bad samples"
            fallback = diag.get("two_view", {}).get("reason")
            if fallback and est.diagnostics.get("estimator") != "two_view":
                why = f"{fallback}; and the 1-D valley rule: {why}"
            if 0 < n_finite < 3:
                # (the advice to retrain was no help: no schedule makes two samples a
                # minority and a majority)
                warning = (
                    f"csl_fast.detect: nothing flagged by rule={rule!r}: only {n_finite} "
                    "samples have a finite score, and the rule needs at least 3 to separate "
                    "bad samples from clean ones; read the ranking (detection.ranked) or use "
                    "rule='fraction' or rule='threshold'"
                )
            elif views is not None and views.classes == 1:
                # one label for every sample: none contradicts another (not a schedule issue)
                warning = (
                    f"csl_fast.detect: nothing flagged by rule={rule!r}: every presented "
                    "sample carries the same label (one class in use), so no label "
                    "contradicts the others' and no bad label can stand apart; a sample "
                    "that belongs to another class shows only when that class is trained "
                    "on too"
                )
            elif 2 * lost > n_finite:
                # most labels lost: the advice to fit bad labels later (below) was backwards
                # (5 epochs on random labels: 293 of 300 lost, "train for fewer epochs")
                target = _TARGETS[detector][1]
                warning = (
                    f"csl_fast.detect: nothing flagged by rule={rule!r}: {lost} of {n_finite} "
                    "samples lost their given label firmly (csl_fast.flagging.label_lost), "
                    "more than half, and the rule can only separate a "
                    f"bad minority from a clean majority. {_majority_advice(target)}"
                )
            else:
                # (it said the bad labels "were fitted as fast as the clean ones": a run
                # can rank them first, wine's flips at AUROC 0.99, with too few lost labels
                # for the rule to count them; it does not measure the ranking)
                maybe = (
                    ""
                    if diag.get("one_epoch")
                    else ": the labels may be clean, or too few bad ones stood apart in "
                    "the rule's views for it to count them (they may still rank first: "
                    "rule='fraction' flags the top of the ranking)"
                )
                warning = (
                    f"csl_fast.detect: nothing flagged by rule={rule!r}: {why}. The number of "
                    f"bad samples is unknown{maybe}. {_advice(views, hint)}"
                )
    if n_finite == 0:
        # whatever the rule, the one thing to say: there was nothing to rank
        why = (
            "there are no samples"
            if values.numel() == 0
            else f"score {name!r} is not finite (NaN or inf) for every sample: no sample "
            "was presented in training (pass the tracker to csl_fast.accumulate or "
            "csl_fast.record_loss) or the score's source was never recorded "
            "(csl_fast.scores.SCORES says what each score needs)"
        )
        warning = f"csl_fast.detect: nothing flagged by rule={rule!r}: {why}"
        if hint is not None:
            warning += f". {_sentence(hint)}"
    n_flagged = int(flagged.sum())
    unwarned = warning is None and n_flagged and rule not in ("fraction", "threshold")
    if unwarned and hint is not None and hint != SEQUENCES_HINT:
        # a loss-only run: the flagged set came from the valley rule on the score alone,
        # which the run's own rule (csl_fast.detect_losses) would replace
        warning = (
            f"csl_fast.detect: {n_flagged} flagged by rule={rule!r} on the score alone: {hint}"
        )
    elif unwarned and views is not None and views.partial and views.epochs is not None:
        # a tracker without num_classes (fed by update only): the set rests on the weaker
        # view (a mapping's note is enough: its caller chose the mapping over the tracker)
        warning = f"csl_fast.detect: {n_flagged} flagged by rule={rule!r}, but {views.partial}"
    thr = float(values.double()[flagged].min()) if n_flagged else math.inf
    diag.update(flagged=n_flagged, threshold=thr)
    if rule in ("fraction", "threshold"):
        two_sided = rule_note(name, values, True)  # the rest is about the estimating rules
        # (held-out samples are left out of these rules' sets too: said as the others say it)
        note = "; ".join(filter(None, [two_sided, held_out])) or None
        if note is not None:
            diag["note"] = note
    _note_tie_at_cut(diag, values, ranking, flagged, n_flagged, n_finite, name)
    pos_inf = int(torch.isposinf(values).sum()) if values.is_floating_point() else 0
    if pos_inf:
        # +inf ranks last with NaN (undefined): an overflowing score (float16 CSL) would
        # drop the samples that most likely belong to the flagged set
        diag["positive_infinite"] = pos_inf
        inf_words = (
            f"{pos_inf} samples score {name!r} = +inf and, as every non-finite score, rank "
            "last and are never flagged; if +inf is an overflow (the most suspicious) rather "
            "than undefined, clamp it (torch.nan_to_num(scores, posinf=a large finite value)) "
            "and detect again"
        )
        warning = f"{warning}; also, {inf_words}" if warning else f"csl_fast.detect: {inf_words}"
    if caveat is not None:
        diag["note"] = "; ".join(filter(None, [diag.get("note"), caveat]))
        warning = (
            f"{warning}; {caveat}"
            if warning
            else f"csl_fast.detect: {n_flagged} flagged by rule={rule!r}, but {caveat}"
        )
    if warning is not None and emit:
        warnings.warn(warning, DetectionWarning, stacklevel=3)
    return Detection(ranking, values, flagged, thr, name, desc, [], count, interval, diag, warning)


def count_phrase(det: Detection, what: str = "bad samples") -> str | None:
    """``"estimated [at least] K <what> (LOW-HIGH)"``, or ``None`` when there is no count.

    Args:
        det: a :class:`Detection`; when its ``diagnostics["count"]`` is ``"lower bound"``
            (unless the valley rule settled the count), ``at least`` where the count was
            cut to the surely bad samples (the interval starts there), else ``"estimated K
            <what> (LOW-HIGH), likely more"`` (an interval that starts below a count
            called "at least" K read as a contradiction); ``", may include clean
            samples"`` after a tail-rule count of :mod:`csl_fast.detect_losses`, and any
            other caveat after the interval (``"unreliable"``, ``"few anchors"``,
            ``"fit-dependent"``); ``None`` when its ``estimated_count`` is ``None``.
        what: the noun after the number (``"bad samples"``, ``"mislabeled samples"``).
    """
    if det.estimated_count is None or det.count_interval is None:
        return None
    lo, hi = det.count_interval
    count = det.estimated_count
    # a lower bound that a separate upper mode of the score settled is a count, not a bound
    estimator = det.diagnostics.get("estimator")
    settled = isinstance(estimator, dict) and estimator.get("count_source") == "valley"
    from .detect_losses import TAIL_CAVEAT

    caveat = det.diagnostics.get("count")
    if caveat == TAIL_CAVEAT:  # said where it is printed, as "likely more" is of a bound
        return f"estimated {count} {what} ({lo}-{hi}), {TAIL_CAVEAT}"
    if caveat != "lower bound" or settled:
        # the other caveats too ("unreliable": a count of which 28 of 49 were clean was
        # printed bare in the CLI's summary, the report and the figure's title)
        said = f", {caveat}" if caveat not in (None, "unknown") and not settled else ""
        return f"estimated {count} {what} ({lo}-{hi}){said}"
    if lo >= count:
        return f"estimated at least {count} {what} ({lo}-{hi})"
    return f"estimated {count} {what} ({lo}-{hi}), likely more"


def summary(det: Detection) -> str:
    """One line for a user about the detection ``det``: how many were flagged, the
    estimated count with its interval, and the warning or the rule's caveat when there is
    one."""
    if not isinstance(det, Detection):  # ("'NoneType' object has no attribute 'scores'")
        raise TypeError(
            "csl_fast.detect.summary: det must be a csl_fast.detect.Detection (what "
            f"detect.mislabeled and the other detectors return), got {type(det).__name__}"
        )
    n = det.scores.numel()
    parts = [f"{len(det)} of {n} flagged by {det.rule} on {det.score_name}"]
    estimate = count_phrase(det, f"bad {det.unit}")
    if estimate is not None:
        parts.append(estimate)
    elif det.diagnostics.get("count") == "unknown":
        parts.append(f"number of bad {det.unit} unknown")
    line = "; ".join(parts)
    if det.warning is not None:
        return f"{line}. {det.warning}"
    note = det.diagnostics.get("note")
    return f"{line}. Note: {note}" if note else line


def mislabeled(
    source: CSLTracker | Mapping[str, torch.Tensor] | torch.Tensor,
    score: str | None = None,
    *,
    rule: str = "auto",
    fraction: float | None = None,
    threshold: float | None = None,
    labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
) -> Detection:
    """Samples most likely to carry a wrong label, ranked by ``score`` (default CSL; its
    mean per token for a tracker of sequences).

    A flipped label contradicts every similar sample, so the network fits it late or only
    by memorizing it: its loss stays high for many epochs and CSL grows large (AUROC 0.985+
    on CIFAR in the paper). ``rule``: see the module docstring; with a tracker the
    default flags the top ``k`` of ``score`` with ``k`` the two-view estimate of the number
    of mislabeled samples (from ``csl_fast.scores(tracker)`` too, but with the margin view
    alone: pass the tracker).

    Args:
        source: a :class:`csl_fast.CSLTracker`, a ``{name: [N] tensor}`` mapping such as
            :func:`csl_fast.scores` returns, or a plain ``[N]`` score tensor (higher = more
            suspicious; ``rule="auto"`` gives it the valley rule).
        score: the name of the score that ranks and flags (:data:`csl_fast.SCORES`);
            unused for a plain tensor. ``None`` (default): ``"csl"``, or ``"csl_mean"``
            for a tracker of sequences, whose sum over tokens would rank long sequences
            first, or of unequal presentation counts (:func:`default_score`).
        rule: ``"auto"``, ``"two_view"``, ``"valley"``, ``"fraction"`` or ``"threshold"``,
            as the module docstring defines them.
        fraction: with ``rule="fraction"``, flag the top ``ceil(fraction * N)`` samples.
        threshold: with ``rule="threshold"``, flag the samples whose score exceeds it.
        labels: optional int ``[N]`` given labels, with a tracker only. The label-lost
            view compares a label's probability with chance among the classes in use,
            the distinct labels of the presented samples (:func:`classes_in_use`);
            without ``labels`` the tracker's ``num_classes``, which also counts output
            classes no sample carries (a model with more outputs than classes) and then
            flags fewer or none: pass ``labels`` there.

    Returns:
        a :class:`Detection` of the ``N`` samples.
    """
    where = "csl_fast.detect.mislabeled"
    values, name, views, hint, caveat = _select(
        source, score, _tracker_labels(source, labels, where), where
    )
    trained = _trained(source)
    det = _detect(
        values, name, rule, fraction, threshold, views, hint, caveat=caveat, trained=trained
    )
    return _with_classes_in_use(det, source, labels)


def _with_classes_in_use(det: Detection, source: Any, labels: Any) -> Detection:
    """``det`` with the classes ``labels`` use among the tracker's presented samples in its
    diagnostics, also where the rule read no view that counts them (a two-sided score, a
    run of sequences): :func:`csl_fast.clean` chooses its policy on two classes by them."""
    if labels is not None and "classes_in_use" not in det.diagnostics:
        det.diagnostics["classes_in_use"] = classes_in_use(source, labels)
    return det


def _tracker_labels(source: Any, labels: Any, where: str) -> Any:
    """``labels``, refused unless ``source`` is a tracker (the classes in use are counted
    among the samples it saw presented)."""
    from .tracker import CSLTracker

    if labels is not None and not isinstance(source, CSLTracker):
        raise TypeError(
            f"{where}: labels= counts the classes in use for the tracker's label-lost "
            f"view; pass the tracker itself as source, not a {type(source).__name__}"
        )
    return labels


def memorized(
    source: CSLTracker | Mapping[str, torch.Tensor] | torch.Tensor,
    score: str | None = None,
    *,
    rule: str = "auto",
    fraction: float | None = None,
    threshold: float | None = None,
    labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
) -> Detection:
    """Samples most likely memorized (atypical, long-tail), ranked by ``score``.

    CSL bounds stability-based memorization (the paper's Thm 5.5): a sample that the rest
    of the data does not explain must be fitted individually, which takes long and
    accumulates loss. Memorization is graded rather than binary, and the default rule
    counts the samples that stand apart like mislabeled ones; ``rule="fraction"`` (a
    review budget) is often the natural flagging rule here.

    Args:
        source, score, rule, fraction, threshold, labels: as :func:`mislabeled` (its
            rule's label-lost view counts the classes in use too).

    Returns:
        a :class:`Detection` of the ``N`` samples.
    """
    where = "csl_fast.detect.memorized"
    values, name, views, hint, caveat = _select(
        source, score, _tracker_labels(source, labels, where), where
    )
    trained = _trained(source)
    det = _detect(
        values, name, rule, fraction, threshold, views, hint, "memorized", caveat, trained=trained
    )
    return _with_classes_in_use(det, source, labels)


def duplicates(
    source: CSLTracker | Mapping[str, torch.Tensor] | torch.Tensor,
    score: str | None = None,
    *,
    inputs: torch.Tensor | np.ndarray | Sequence[Any] | None = None,
    labels: torch.Tensor | np.ndarray | Sequence[Any] | None = None,
    rule: str = "auto",
    fraction: float | None = None,
    threshold: float | None = None,
) -> Detection:
    """Samples duplicated with a conflicting label, ranked by ``score`` (default CSL; its
    mean per token for a tracker of sequences).

    Two identical inputs with different labels cannot both be fitted by generalisation;
    the network fights over them, so *both* members keep a high loss (the paper's
    duplicate experiment: AUROC 0.98 with CSL on CIFAR-10). The conflict is the group's,
    not one member's, so with ``inputs`` the flagged set is made of whole groups of
    bitwise-identical inputs (:mod:`csl_fast.duplicate_groups` says why):

    * ``inputs`` and ``labels`` (``rule="auto"``): every member of every group whose
      labels differ (``rule="auto(label_conflict)"``). This needs no score and no
      estimate: at most one of the labels is right. Groups whose members share a label
      (benign duplicates) are never flagged for being duplicated. The count is exact
      (interval ``(n, n)``); a never-presented member is flagged too.
      With another ``rule``, that rule flags samples by ``score`` and the conflicting
      groups holding a flagged sample are flagged whole.
    * ``inputs`` only: the tracker does not keep labels, so conflicts are inferred from
      the score: ``rule`` (the mislabeled rule by default) flags samples, and every group
      holding a flagged sample is flagged whole (``"...+groups"``). A benign group is
      flagged only when a member's own score flags it; the count and its interval are
      the rule's, carried through the groups (``diagnostics["sample_count"]``: the
      rule's own count and interval, per sample).
    * neither: no group is known; the flagged set is the score rule's, as
      :func:`mislabeled` (samples whose label looks bad, duplicated or not), and
      ``diagnostics["note"]`` says so.

    Args:
        source, score: as in :func:`mislabeled`.
        inputs: optional ``[N, ...]`` training inputs (a tensor, NumPy array or list),
            compared row by row by their bits.
        labels: optional ``[N]`` (or ``[N, ...]``) training labels as given to the
            network; needs ``inputs``. A negative class index (an unlabelled sample,
            ``ignore_index``) conflicts with no label.
        rule, fraction, threshold: as in :func:`mislabeled`.

    ``Detection.groups`` lists the flagged groups (every member is flagged); the ranking
    is by ``score`` alone either way, so the flagged set need not be a prefix of it.
    When no group is flagged, ``diagnostics["note"]`` (an exact zero: labels and no
    conflict) or ``warning`` (a score rule whose flagged samples lie in no group) says
    why.
    """
    where = "csl_fast.detect.duplicates"
    labels = dg.as_rows(where, "labels", labels)
    # the class labels count the classes in use, as mislabeled counts them (the score
    # rule's chance levels took the tracker's num_classes, outputs no label uses too);
    # other labels (a loss-only run's targets) are checked below
    counted = labels if _class_rows(source, labels) else None
    values, name, views, hint, caveat = _select(source, score, counted, where)
    trained = _trained(source)
    # (the label-conflict branch below reads neither; refused there as _detect does)
    _unused(rule, fraction, threshold, where)
    n = values.numel()
    inputs = dg.as_rows(where, "inputs", inputs)
    dg.check_rows(n, inputs, labels)
    classes = getattr(source, "num_classes", None)
    # a softmax classifier's class indices: not a BCE run's target rows (float 0/1 labels
    # of a binary BCE tracker that was given num_classes=2 are its targets)
    if labels is not None and classes and views is not None:
        dg.check_class_labels("csl_fast.detect.duplicates", labels, classes)
    if inputs is None:
        args = (values, name, rule, fraction, threshold, views, hint, "duplicates", caveat)
        det = _detect(*args, trained=trained)
        note = (
            "no inputs: the flagged set is the score rule's (samples whose label looks bad, "
            "duplicated or not); pass inputs= (and labels=) to flag conflicting groups"
        )
        det.diagnostics["note"] = "; ".join(filter(None, [det.diagnostics.get("note"), note]))
        return det
    ids = dg.group_ids(inputs)
    allowed = None if labels is None else dg.conflicting(ids, labels)
    diag: dict[str, Any] = {"duplicate_groups": dg.num_groups(ids)}
    if allowed is not None:
        diag["conflicting_groups"] = int(allowed.sum())
    if labels is not None and rule == "auto":
        # (held-out samples an eval pass scored, as mislabeled leaves them: its top 3 on a
        # run trained on 300 of 400 samples were held-out ones, ranked among trained ones)
        finite, _ = _rankable(values, views, trained)
        flagged = dg.whole_groups(ids >= 0, ids, allowed)
        count = int(flagged.sum())
        diag.update(rule=rule, samples=n, finite=int(finite.sum()))
        det = Detection(
            _ranking(values, finite),
            values,
            flagged,
            math.inf,
            name,
            "auto(label_conflict)",
            estimated_count=count,
            count_interval=(count, count),
            diagnostics=diag,
        )
        det = _in_groups(det, flagged, ids, True)
    else:
        # its warning is about samples, before the groups: said once, below
        args = (values, name, rule, fraction, threshold, views, hint, "duplicates", caveat)
        det = _detect(*args, emit=False, trained=trained)
        det = carry_to_groups(det, ids, allowed, diag)
    if det.warning is not None:
        warnings.warn(det.warning, DetectionWarning, stacklevel=2)
    return det


def _class_rows(source: Any, labels: torch.Tensor | None) -> bool:
    """Whether ``labels`` are one integer label per sample of the tracker ``source``."""
    from .tracker import CSLTracker

    return (
        isinstance(source, CSLTracker)
        and labels is not None
        and labels.shape == (int(source.csl_count.numel()),)
        and integer_labels(labels.dtype)
    )


def carry_to_groups(
    det: Detection,
    ids: torch.Tensor,
    allowed: torch.Tensor | None = None,
    diag: dict[str, Any] | None = None,
) -> Detection:
    """A new detection: the groups of identical inputs (``ids``, :func:`csl_fast.
    duplicate_groups.group_ids`) that hold a sample ``det`` flags, flagged whole (only
    the ``allowed`` groups, the conflicting ones, when given), with its count carried
    through them. What :func:`duplicates` does with ``inputs`` and a score rule, for any
    sample detection (``csl_fast.clean`` carries the plan's own). ``det.warning``, about
    samples, is quoted in the new one's; nothing is emitted. ``diag``: the group counts
    to record."""
    diag = {"duplicate_groups": dg.num_groups(ids)} if diag is None else diag
    out = replace(det, diagnostics={**det.diagnostics, **diag})
    if "duplicate_groups" in det.diagnostics:
        # a duplicates detection already: its count is the groups' (carrying it again
        # halved it), its flagged set whole groups (kept whole)
        return _in_groups(out, dg.whole_groups(det.flagged, ids, allowed), ids, False)
    out.diagnostics["sample_flagged"] = len(det)
    out.rule += "+groups" if allowed is None else "+conflict groups"
    if det.estimated_count is not None and det.count_interval is not None:
        out.diagnostics["sample_count"] = [det.estimated_count, *det.count_interval]
        out.estimated_count, out.count_interval = dg.carry_count(
            det.ranking, ids, det.estimated_count, det.count_interval, allowed
        )
    return _in_groups(out, dg.whole_groups(det.flagged, ids, allowed), ids, allowed is not None)


def _in_groups(det: Detection, flagged: torch.Tensor, ids: torch.Tensor, labels: bool) -> Detection:
    """``det`` with the group members ``flagged``, its threshold, groups and warning
    (why no group was flagged, or what the score rule's own warning was about)."""
    values = det.scores
    det.flagged = flagged.to(values.device)
    shown = values.double()[det.flagged & torch.isfinite(values)]
    det.threshold = float(shown.min()) if shown.numel() else math.inf
    det.groups = dg.group_lists(ids, dg.flagged_groups(flagged, ids))
    det.diagnostics.update(flagged=int(flagged.sum()), threshold=det.threshold)
    if det.groups and det.warning is not None:
        # "17 flagged by rule ..." is about the samples, not the groups' members
        det.warning = (
            f"csl_fast.detect.duplicates: {len(det)} samples in {len(det.groups)} groups "
            "flagged, the groups of the samples the score rule flagged, whose warning "
            f"applies: {det.warning}"
        )
    elif not det.groups:
        why = _no_groups(det, det.diagnostics, values.numel(), labels)
        if det.rule == "auto(label_conflict)":
            # an exact zero: the answer, not a failure to find one (the note says why)
            det.diagnostics["note"] = f"no conflicting duplicates: {why}"
        else:
            # the groups took none of the samples the score rule flagged; its own warning
            # ("12 flagged by rule ...") would have read as this detection's
            said = "" if det.warning is None else f"{SCORE_RULE_SAID}{det.warning}"
            det.warning = (
                f"csl_fast.detect.duplicates: nothing flagged: {why}. "
                "csl_fast.detect.mislabeled flags samples whose label looks bad, duplicated "
                f"or not{said}"
            )
    return det


def _no_groups(det: Detection, diag: dict[str, Any], n: int, labels: bool) -> str:
    """Why :func:`duplicates` with ``inputs`` flagged no group."""
    groups = diag["duplicate_groups"]
    if groups == 0:
        why = (
            f"no two of the {n} inputs are bitwise identical, so no group can conflict "
            "(near-duplicates, such as augmented or re-encoded copies, are not compared: "
            "deduplicate them by a feature hash first)"
        )
    elif labels and diag["conflicting_groups"] == 0:
        what = "the group" if groups == 1 else f"each of the {groups} groups"
        why = (
            f"{what} of identical inputs carries one label (benign duplicates, never "
            "flagged for being duplicated)"
        )
    else:
        which = "conflicting " if labels else ""
        flagged = det.diagnostics.get("sample_flagged", 0)
        why = (
            f"rule {det.rule.split('+')[0]!r} flagged {flagged} samples by score, none of "
            f"them in a {which}group of identical inputs "
            f"({diag.get('conflicting_groups', groups)} such groups)"
            + ("" if labels else "; pass labels= to flag every conflicting group exactly")
        )
    return why
