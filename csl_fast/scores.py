r"""Named per-sample scores from a :class:`csl_fast.CSLTracker`, all oriented the same way.

Every score :func:`scores` returns by default is a float ``[N]`` tensor in which **higher
means more suspicious** (more likely mislabeled, duplicated with a conflicting label, or
memorized). Statistics whose natural direction is the opposite (AUM, confidence) are
transformed as listed in :data:`SCORES`, so every column can go straight into
``roc_auc_score(is_bad, score)`` or a ranking.

``variability`` is the exception: it is **two-sided** (``ScoreInfo.two_sided``), so it is
returned only when asked for by name and is left out of default rankings and detection
tables. Its sign relative to label errors depends on the regime: a flipped label the
network ends up memorizing swings from p_y ~ 0 to ~ 1 (high variability; AUROC 0.98 in the
digits demo), one it never fits stays at p_y ~ 0 (low variability; AUROC 0.05 on a small
CNN, issue 18), as do clean samples learned in the first epoch. No transform of it is
"higher = more suspicious" in both regimes; read it with ``confidence`` (a data map).

NaN marks a sample the score is undefined for: never presented in training (every
training statistic), never scored by an eval pass (``eval_csl``), or without an
input-gradient record (``learning_time``, ``loss_sensitivity``; record them with
``tracker.watch`` / ``csl_fast.train.train(..., input_grads=True)``). A score whose source
was never recorded at all is left out of the result unless asked for by name.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .tracker import CSLTracker

__all__ = [
    "LOSS_ONLY",
    "SCORES",
    "ScoreInfo",
    "Scores",
    "as_dataframe",
    "has_logit_stats",
    "recorded_names",
    "scores",
]

#: What a tracker fed only by ``record_loss`` or ``accumulate_bce`` holds, in one sentence.
LOSS_ONLY = (
    "this run recorded losses only (csl_fast.record_loss, csl_fast.accumulate_bce, or "
    "csl_fast.accumulate into the tracker's csl_sum and csl_count, as for class-probability "
    "targets), no softmax statistics: the scores that exist are CSL, its mean and the final "
    "loss (and per-label CSL with num_labels, the input-gradient scores where tracker.watch "
    "recorded norms); margins, confidences, forgetting and "
    "suggested labels need csl_fast.accumulate with class-index targets and the tracker "
    "itself (label smoothing keeps them all: label_smoothing= with class indices)"
)


@dataclass(frozen=True)
class ScoreInfo:
    """What a score is, where it comes from, and how it is oriented.

    Attributes:
        formula: the value returned, in terms of tracker statistics.
        direction: why higher is more suspicious.
        needs: ``"train"`` (training presentations: any recorder), ``"logits"`` (the
            softmax statistics of :func:`csl_fast.accumulate`'s fused cross entropy, free;
            absent from a tracker fed only by :func:`csl_fast.record_loss` or
            :func:`csl_fast.accumulate_bce`, see :func:`has_logit_stats`), ``"eval"`` (eval
            passes, :func:`csl_fast.score_epoch`), ``"input_grad"`` (``tracker.watch``) or
            ``"input_grad_epochs"`` (an epoch closed with input-gradient records:
            ``tracker.watch`` and ``tracker.end_epoch()``).
        two_sided: no direction of the score means "suspicious" in every training
            regime; such a score is returned only by name, never ranked by default.
    """

    formula: str
    direction: str
    needs: str
    two_sided: bool = False


#: The scores :func:`scores` returns, in order, with their definitions.
SCORES: dict[str, ScoreInfo] = {
    "csl": ScoreInfo(
        "tracker.csl: sum of the per-presentation training loss (in-training CSL)",
        "a sample that stays hard to fit accumulates loss",
        "train",
    ),
    "csl_mean": ScoreInfo(
        "tracker.csl_mean: CSL / number of presentations",
        "as csl; insensitive to samplers that visit some samples more often",
        "train",
    ),
    "eval_csl": ScoreInfo(
        "tracker.eval_csl: sum of the eval-mode loss after each epoch (authors' code)",
        "as csl",
        "eval",
    ),
    "eval_csl_mean": ScoreInfo(
        "tracker.eval_csl_mean: eval_csl / number of eval passes that scored the sample",
        "as eval_csl; insensitive to eval loaders that score some samples more often (a "
        "DistributedSampler's padding, drop_last)",
        "eval",
    ),
    "final_loss": ScoreInfo(
        "loss at the last eval pass that scored the sample, while no training was recorded "
        "after the tracker's last eval pass (the final model, clean input; NaN for a sample "
        "no pass scored; one the passes after training left out keeps an earlier pass's, "
        "which scores() warns of), else at the last training presentation (the model of that "
        "step)",
        "not fitted by the final model",
        "train",
    ),
    "forgetting": ScoreInfo(
        "tracker.forgetting (correct -> incorrect transitions); never-learned samples "
        "(never correct) get max(forgetting) + 1",
        "unstable samples are forgotten often; never-learned ones rank highest (Toneva)",
        "logits",
    ),
    "threshold_learning_time": ScoreInfo(
        "tracker.threshold_learning_time(): epoch from which the sample stays correct "
        "(epoch + 1 if it is not correct at the end)",
        "learned late (no sign flip)",
        "logits",
    ),
    "learning_time": ScoreInfo(
        "tracker.learning_time() (authors' code form: 1 - fraction of epochs whose "
        "running-mean ||dl/dx||^2 is below the global mean)",
        "input gradient stays large for longer",
        "input_grad_epochs",
    ),
    "loss_sensitivity": ScoreInfo(
        "tracker.loss_sensitivity: mean ||dl/dx||_2 over training (after Arpit et al.)",
        "loss reacts strongly to the input",
        "input_grad",
    ),
    "aum": ScoreInfo(
        "-tracker.aum: minus the mean margin min(z_y - max_{j != y} z_j, 1000) (Pleiss et al.)",
        "negated: a low or negative margin is suspicious",
        "logits",
    ),
    "in_confidence": ScoreInfo(
        "1 - max softmax probability of the final model, as the authors' 'In Conf.': at the "
        "last eval pass that scored the sample while no training was recorded after the "
        "tracker's last eval pass (as final_loss), else at the last training presentation",
        "the final model is unsure",
        "logits",
    ),
    "confidence": ScoreInfo(
        "1 - tracker.confidence: one minus the mean p_y over training (data maps)",
        "inverted: a label the model rarely believes is suspicious",
        "logits",
    ),
    "variability": ScoreInfo(
        "tracker.variability: std of p_y over training (data maps)",
        "two-sided: high for samples learned during training (ambiguous ones, and flipped "
        "labels the network memorizes), low both for samples fit from the start and for "
        "flipped labels never fit; not a ranking of label errors (see the module notes)",
        "logits",
        two_sided=True,
    ),
    "logit_grad_norm": ScoreInfo(
        "tracker.logit_grad_norm_mean: mean ||dl/dz||^2 over training",
        "the loss keeps pushing on the logits",
        "logits",
    ),
}

#: The definitions of :data:`SCORES` that read otherwise for a tracker of sequences, where
#: a presentation's loss is the sum of the sequence's token losses and ``csl_count``
#: counts supervised tokens (the report's table called csl_mean "CSL / number of
#: presentations" there).
_SEQUENCE_FORMULAS = {
    "csl": "tracker.csl: sum over the presentations of the sequence's summed token losses "
    "(in-training CSL; it grows with the sequence's length)",
    "csl_mean": "tracker.csl_mean: CSL / number of supervised tokens presented (the mean "
    "token loss)",
    "final_loss": "loss at the last eval pass that scored the sample, while no training was "
    "recorded after the tracker's last eval pass, else the sum of the sequence's token "
    "losses at its last training presentation",
}


def definitions(sequences: bool) -> dict[str, ScoreInfo]:
    """:data:`SCORES` as they read for a run: ``sequences`` (a tracker of sequences,
    :attr:`CSLTracker.sequences`) gives the definitions per token where they differ."""
    if not sequences:
        return SCORES
    return {
        name: replace(info, formula=_SEQUENCE_FORMULAS.get(name, info.formula))
        for name, info in SCORES.items()
    }


def has_logit_stats(tracker: CSLTracker) -> bool:
    """Whether any training presentation came with softmax statistics (through
    :func:`csl_fast.accumulate`): a cross-entropy presentation leaves a max probability
    of at least ``1 / C`` > 0, which :func:`csl_fast.record_loss` and
    :func:`csl_fast.accumulate_bce` never write. Reads one value on the host."""
    return bool(((tracker.csl_count > 0) & (tracker.last_max_prob > 0)).any())


def recorded_names(tracker: CSLTracker) -> list[str]:
    """The names :func:`scores` returns by default: every one-sided score whose source
    ``tracker`` recorded, in :data:`SCORES` order (nothing is computed)."""
    return [
        n
        for n, info in SCORES.items()
        if not info.two_sided
        and (_has(tracker, info.needs) or (n in _EVAL_FIRST and eval_is_latest(tracker)))
    ]


def diverged_reason(tracker: CSLTracker) -> str | None:
    """Why ``tracker`` holds no training record although it closed epochs, or ``None``
    when it closed none. The recorders skip a non-finite loss, so a run whose every loss
    was NaN or inf (a diverged run) leaves the tracker as it was before training: the
    advice for that state ("pass the tracker", "saved before any training step?") misled
    there."""
    if tracker.epoch == 0:
        return None
    # (nothing counts the skipped losses: end_epoch on a tracker never fed looks the same)
    return (
        f"the tracker closed {tracker.epoch} epoch(s) but recorded no finite loss: it was "
        "never passed to the recorder (csl_fast.accumulate, record_loss, accumulate_bce: "
        "pass it in the training step), or every loss it was given was NaN or inf, which "
        "the recorders skip (a diverged run: check the losses, targets and learning rate, "
        "and train again)"
    )


# Read from the last eval pass where no training was recorded after it, whatever training
# recorded before: a tracker fed by score_epoch alone (a trained model scored) or by
# record_loss (no logits) left them out of the default set.
_EVAL_FIRST = ("final_loss", "in_confidence")


def eval_is_latest(tracker: CSLTracker) -> bool:
    """Whether ``tracker``'s last eval pass scored its latest model: it made one, and no
    training presentation was recorded after it (where that is unknown,
    :attr:`CSLTracker.eval_pass_presentations` None, the pass is taken as the latest)."""
    if tracker.eval_passes == 0:
        return False
    at = getattr(tracker, "eval_pass_presentations", None)  # (None in older pickles)
    return at is None or tracker.presentations() <= at


# Tracker attribute (not saved): (eval_passes, eval_pass_presentations, [N] bool on the
# CPU) after the last pass, the samples the passes made since the last training scored.
_SCORED_SINCE_TRAINING = "_eval_scored_since_training"


def note_eval_pass(
    tracker: CSLTracker, scored: torch.Tensor, passes: int, at: float | None
) -> None:
    """Keep which samples the passes since the last training scored (``scored``: this
    pass's; ``passes`` and ``at``: the tracker's counters before it), for
    :func:`_left_out_of_the_last_passes`."""
    kept = tracker.__dict__.get(_SCORED_SINCE_TRAINING)
    same_model = at is not None and tracker.eval_pass_presentations == at
    if same_model and kept is not None and kept[:2] == (passes, at):
        scored = scored | kept[2]  # (a held-out loader scored after the training one)
    key = (tracker.eval_passes, tracker.eval_pass_presentations)
    tracker.__dict__[_SCORED_SINCE_TRAINING] = (*key, scored)


def _left_out_of_the_last_passes(tracker: CSLTracker) -> int:
    """How many samples hold eval values from a pass before training that the passes
    since left out (0 where that is not known: a loaded tracker, torch.distributed)."""
    kept = tracker.__dict__.get(_SCORED_SINCE_TRAINING)
    if kept is None or kept[:2] != (tracker.eval_passes, tracker.eval_pass_presentations):
        return 0
    return int(((tracker.eval_count.cpu() > 0) & ~kept[2]).sum())


def from_eval_pass(name: str, eval_latest: bool) -> bool:
    """Whether score ``name`` is read from the eval passes where they scored a sample, in
    a tracker whose last eval pass is (``eval_latest``, :func:`eval_is_latest`) or is not
    its latest record of the model."""
    needs = SCORES[name].needs if name in SCORES else "train"
    return needs == "eval" or (name in _EVAL_FIRST and eval_latest)


def unscored_reason(name: str, tracker: CSLTracker) -> str:
    """Why a sample of ``tracker`` has no value of score ``name`` (for messages about
    unranked samples): the source the score is read from never reached it."""
    needs = SCORES[name].needs if name in SCORES else "train"
    if from_eval_pass(name, eval_is_latest(tracker)):
        return "never scored by an eval pass (csl_fast.score_epoch)"
    if needs.startswith("input_grad"):
        return "never had an input-gradient norm recorded (tracker.watch)"
    return "never presented in training"


def _has(tracker: CSLTracker, needs: str) -> bool:
    if needs == "train":
        return bool((tracker.csl_count > 0).any())
    if needs == "logits":
        return has_logit_stats(tracker)
    if needs == "eval":
        return tracker.eval_passes > 0
    # the first epoch is marked by any record_input_grad call (marking only a call that
    # recorded something would sync the host every step), so the counts say whether one did
    recorded = tracker.input_grad_first_epoch >= 0 and bool(tracker.input_grad_count.any())
    if needs == "input_grad_epochs":
        return recorded and tracker.input_grad_first_epoch < tracker.epoch
    return recorded


def _compute(tracker: CSLTracker, name: str, use_eval: bool) -> torch.Tensor:
    """Score ``name``; ``use_eval``: final_loss and in_confidence from the last eval pass."""
    t = tracker
    nan = torch.full((t.num_samples,), float("nan"), dtype=t.dtype, device=t.device)
    presented = t.csl_count > 0
    if name == "csl":
        return torch.where(presented, t.csl, nan)
    if name == "csl_mean":
        return t.csl_mean
    if name == "eval_csl":
        return torch.where(t.eval_count > 0, t.eval_csl, nan)
    if name == "eval_csl_mean":
        return t.eval_csl_mean
    if name == "final_loss":
        if use_eval:
            return torch.where(t.eval_count > 0, t.eval_last_loss, nan)
        return torch.where(presented, t.last_loss, nan)
    if name == "forgetting":
        f = t.forgetting.to(t.dtype)
        never = ~t.ever_correct
        top = f.max() + 1 if f.numel() else f.new_tensor(1.0)
        return torch.where(presented, torch.where(never, top, f), nan)
    if name == "threshold_learning_time":
        return torch.where(presented, t.threshold_learning_time(), nan)
    if name == "learning_time":
        return t.learning_time()
    if name == "loss_sensitivity":
        return t.loss_sensitivity
    if name == "aum":
        return -t.aum
    if name == "in_confidence":
        if use_eval:
            return torch.where(t.eval_count > 0, 1 - t.eval_last_max_prob, nan)
        return torch.where(presented, 1 - t.last_max_prob, nan)
    if name == "confidence":
        return 1 - t.confidence
    if name == "variability":
        return t.variability
    if name == "logit_grad_norm":
        return t.logit_grad_norm_mean
    raise KeyError(f"csl_fast.scores: unknown score {name!r}; known: {sorted(SCORES)}")


class Scores(dict[str, torch.Tensor]):
    """The ``{name: [N]}`` dict of :func:`scores`, remembering of its tracker what the
    detectors need to rank it as they rank the tracker: ``sequences`` (a tracker of
    sequences is ranked by ``csl_mean`` and has no label-lost view), ``csl_count``
    (positions per sample, for the warning on scores summed over positions; and with
    ``eval_count``, eval passes per sample, which samples the run trained on or scored,
    for :func:`csl_fast.clean`) and
    ``losses_only`` (a run without softmax statistics: the tail rule of
    :mod:`csl_fast.detect_losses`, and no suggested labels), and ``other_loss`` (bool
    ``[N]``, or None: the samples a tracker that mixes recorders holds without softmax
    statistics, :func:`mixed_recorders`, which the detectors give no score). To save it
    for ``torch.load``'s default reader (``weights_only=True``, which refuses dict
    subclasses), save ``dict(scores)``; that plain dict keeps the scores but none of the
    above, so the detectors rank it as any mapping (a mixed tracker's other recorder's
    samples among the rest, a tracker of sequences by the score given): detect from the
    tracker, or from ``Scores`` kept with ``pickle`` or ``torch.save`` and
    ``torch.load(weights_only=False)``."""

    def __init__(self, values: dict[str, torch.Tensor], tracker: CSLTracker) -> None:
        super().__init__(values)
        self.sequences = bool(tracker.sequences)
        self.csl_count = tracker.csl_count.clone()  # of when the scores were taken
        self.eval_count = tracker.eval_count.clone()
        self.eval_latest = eval_is_latest(tracker)  # (final_loss, in_confidence from it)
        self.losses_only = bool((tracker.csl_count > 0).any()) and not has_logit_stats(tracker)
        other = other_loss(tracker)  # (kept when mixed_recorders would say something)
        self.other_loss = other if bool(other.any()) and has_logit_stats(tracker) else None


def scores(tracker: CSLTracker, names: Iterable[str] | None = None) -> Scores:
    """Per-sample scores (float ``[N]``, higher = more suspicious) from a tracker.

    Args:
        tracker: a :class:`csl_fast.CSLTracker` after (or during) training.
        names: which scores (keys of :data:`SCORES`). Default: every score whose source
            was recorded (eval-pass scores need :func:`csl_fast.score_epoch`,
            ``learning_time`` and ``loss_sensitivity`` need input-gradient records),
            except two-sided ones (``variability``), which have no "more suspicious"
            direction and come only by name.
            Asking by name for a score whose source was never recorded returns all-NaN
            (so do the ``"logits"`` scores of a tracker without softmax statistics).

    Returns:
        ``{name: tensor}`` (in :data:`SCORES` order by default, else in the order of
        ``names``, each name once), on the tracker's device, in its dtype: a
        :class:`Scores` dict, which the detectors rank as they rank the tracker (a tracker
        of sequences by ``csl_mean``). See :data:`SCORES` for each definition and direction.
    """
    from .tracker import CSLTracker

    if not isinstance(tracker, CSLTracker):
        hint = " (a mapping is already scores)" if isinstance(tracker, Mapping) else ""
        raise TypeError(
            f"csl_fast.scores: tracker must be a CSLTracker, got {type(tracker).__name__}{hint}"
        )
    if isinstance(names, str):  # an iterable of one-letter names otherwise
        raise TypeError(f"csl_fast.scores: names must be a list of names, e.g. [{names!r}]")
    if names is None:
        chosen = recorded_names(tracker)
    else:
        try:
            chosen = list(names)
        except TypeError:  # ("'int' object is not iterable")
            raise TypeError(
                "csl_fast.scores: names must be a list of names, e.g. ['csl'], or None, got "
                f"{type(names).__name__} {names!r}"
            ) from None
        unknown = [n for n in chosen if n not in SCORES]
        if unknown:
            # (the CLI's --score label_csl ranks entries: named here, it was only "unknown")
            entries = (
                "; label_csl ranks (sample, label) entries, not samples: "
                "csl_fast.detect_losses.mislabeled_entries(tracker)"
                if "label_csl" in unknown
                else ""
            )
            raise KeyError(
                f"csl_fast.scores: unknown scores {unknown}; known: {list(SCORES)}{entries}"
            )
    logits = has_logit_stats(tracker)
    nan = torch.full((tracker.num_samples,), math.nan, dtype=tracker.dtype, device=tracker.device)

    use_eval = eval_is_latest(tracker)
    if tracker.eval_passes and not use_eval and any(n in _EVAL_FIRST for n in chosen):
        # (they came from the last pass however old it was: the untrained model's losses
        # of a sanity-check pass made before training, as "the final model")
        warnings.warn(
            "csl_fast.scores: training was recorded after the last eval pass, which scored "
            "an older model: final_loss and in_confidence come from the last training "
            "presentations instead. Run csl_fast.score_epoch after the last epoch to score "
            "the final model in eval mode",
            RuntimeWarning,
            stacklevel=2,
        )

    if use_eval and any(n in _EVAL_FIRST for n in chosen):
        left = _left_out_of_the_last_passes(tracker)
        if left:
            # (they read the untrained model's losses of a first pass as the final model's)
            warnings.warn(
                f"csl_fast.scores: {left} samples scored by an eval pass before training were "
                "left out of the passes after it: their final_loss and in_confidence are "
                "the older model's. Score every sample in the eval passes after the last "
                "epoch (csl_fast.score_epoch)",
                RuntimeWarning,
                stacklevel=2,
            )

    def softmax_based(name: str) -> bool:  # eval passes give in_confidence its own softmax
        eval_conf = name == "in_confidence" and use_eval
        return SCORES[name].needs == "logits" and not eval_conf

    if "threshold_learning_time" in chosen:
        warn_no_epoch_closed(tracker, "csl_fast.scores: threshold_learning_time is 0 or 1")
    with torch.no_grad():
        with_logits = None
        if logits and any(softmax_based(n) for n in chosen):
            with_logits = _samples_with_logits(tracker)
        out = {}
        for name in chosen:
            if softmax_based(name) and not logits:
                out[name] = nan
            elif softmax_based(name) and with_logits is not None:
                out[name] = torch.where(with_logits, _compute(tracker, name, use_eval), nan)
            else:
                out[name] = _compute(tracker, name, use_eval)
        return Scores(out, tracker)


def _samples_with_logits(tracker: CSLTracker) -> torch.Tensor | None:
    """The presented samples that have softmax statistics, or None when all of them do.

    A sample recorded only by :func:`csl_fast.record_loss` or :func:`csl_fast.accumulate_bce`
    in a tracker that :func:`csl_fast.accumulate` also fed has none (:func:`mixed_recorders`):
    its margin and confidence sums are 0 over a count of presentations, which read as the
    most suspicious confidence and a forgotten label. Their softmax scores are NaN instead,
    with a warning."""
    said = mixed_recorders(tracker)
    if said is None:
        return None
    warnings.warn(f"csl_fast.scores: {said}", RuntimeWarning, stacklevel=3)
    return ~other_loss(tracker)


def other_loss(tracker: CSLTracker) -> torch.Tensor:
    """bool ``[N]``: the presented samples without softmax statistics (a cross-entropy
    presentation leaves a max probability of at least ``1 / C``): all of a losses-only
    run's, and in a tracker that mixes recorders those of the other loss
    (:func:`mixed_recorders`)."""
    return (tracker.csl_count > 0) & (tracker.last_max_prob == 0)


def mixed_recorders(tracker: CSLTracker) -> str | None:
    """Why a tracker's samples are not all on one footing, or None: some presented samples
    were recorded without softmax statistics (:func:`csl_fast.record_loss`,
    :func:`csl_fast.accumulate_bce`, or :func:`csl_fast.accumulate` with class-probability
    targets, into a tracker that :func:`csl_fast.accumulate` with class indices also
    fed). A cross-entropy presentation leaves a max probability of at least ``1 / C``, so
    theirs stayed 0. Their CSL is another loss's, on its own scale, and samples fed by
    both are not told apart (their extra presentations dilute the softmax sums): one
    tracker should take one recorder."""
    other = other_loss(tracker)
    if not bool(other.any()) or not has_logit_stats(tracker):
        return None
    return mixed_recorders_note(other, tracker.csl_count)


def mixed_recorders_note(other: torch.Tensor, csl_count: torch.Tensor | None) -> str:
    """What :func:`mixed_recorders` says of the samples ``other`` (bool ``[N]``) among the
    presented ones (``csl_count > 0``; all ``N`` when None): for a tracker, or a
    :class:`Scores` mapping that keeps both."""
    presented = other.numel() if csl_count is None else int((csl_count > 0).sum())
    return (
        f"{int(other.sum())} of {presented} samples were recorded without softmax "
        "statistics (csl_fast.record_loss, accumulate_bce, or accumulate with "
        "class-probability targets, into a tracker that accumulate with class indices also "
        "fed): their CSL is another loss's, not comparable with the "
        "others', and they have no margin, confidence or forgetting scores (NaN); samples "
        "fed by both have those sums diluted by the extra presentations. Record other "
        "losses into a tracker (or tensor) of their own"
    )


def warn_no_epoch_closed(tracker: CSLTracker, what: str) -> None:
    """A ``RuntimeWarning`` that ``what`` (a statistic that counts epochs) is degenerate
    when the tracker presented samples more than once but closed no epoch: forgetting to
    call :meth:`CSLTracker.end_epoch` leaves every epoch stamp 0 (learned or not), and
    nothing else shows it."""
    said = no_epoch_closed(tracker)
    if said is not None:
        warnings.warn(f"{what}: {said}", RuntimeWarning, stacklevel=3)


def no_epoch_closed(tracker: CSLTracker) -> str | None:
    """Why the statistics that count epochs are degenerate (the tracker presented a sample
    more than once but closed no epoch), or ``None``. A tracker of sequences counts
    tokens, not presentations, and is not judged; nor is one that recorded losses only and
    keeps no history, which has no statistic that counts epochs (forgetting and the
    learned epoch need the softmax statistics)."""
    if tracker.epoch != 0 or tracker.num_samples == 0 or tracker.sequences:
        return None
    if not tracker.history and not has_logit_stats(tracker):
        return None
    most = int(tracker.csl_count.max())
    if most <= 1:
        return None
    return (
        f"the tracker closed no epoch although it presented a sample up to {most} times "
        "(tracker.end_epoch() was never called); call it after each training epoch "
        "(csl_fast.train.train and the integrations do)"
    )


def epochs_without_loss(tracker: CSLTracker) -> str | None:
    """Which epochs recorded no finite training loss (a run that diverged: non-finite
    losses are not recorded), or None. Told by the loss history only: without one, fewer
    presentations than epochs may as well be epochs of a subset of the samples each."""
    if not tracker.history or tracker.loss_history.shape[0] == 0:
        return None
    # NaN: nothing recorded; inf: a mean past float16's range (recorded, CSL exact)
    per_epoch = (~torch.isnan(tracker.loss_history)).sum(1).tolist()
    empty = [e + 1 for e, k in enumerate(per_epoch) if k == 0]
    if not empty:
        return None
    which = f"epoch{'s' if len(empty) > 1 else ''} {_spans(empty)} of {tracker.epoch}"
    said = (
        f"no finite training loss was recorded in {which}: training diverged (non-finite "
        "losses are not recorded) or presented no sample then. CSL and every sum over "
        "training cover only the other epochs"
    )
    last = empty[0] - 1  # the epoch before the first empty one, 1-based
    if last >= 2 and 0 < per_epoch[last - 1] < per_epoch[last - 2]:
        # a run that diverged part-way through an epoch recorded it for some samples only
        said += (
            f"; epoch {last} recorded a loss for {per_epoch[last - 1]} samples, epoch "
            f"{last - 1} for {per_epoch[last - 2]} (it may have diverged part-way through)"
        )
    return said


def _spans(epochs: list[int]) -> str:
    """Ascending whole numbers as ranges: [4, 5, 6, 9] -> '4-6, 9'."""
    spans: list[list[int]] = []  # [first, last]
    for k in epochs:
        if spans and k == spans[-1][1] + 1:
            spans[-1][1] = k
        else:
            spans.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def as_dataframe(
    source: CSLTracker | Mapping[str, torch.Tensor], names: Iterable[str] | None = None
) -> Any:
    """The scores as a ``pandas.DataFrame`` (one row per sample, index = dataset index).

    ``source`` is a tracker (scores computed with :func:`scores`) or a ``{name: [N]}``
    mapping such as :func:`scores` returns. Needs pandas.
    """
    try:
        import pandas as pd
    except ImportError as exc:  # pragma: no cover - pandas is optional
        raise ImportError("csl_fast.scores.as_dataframe needs pandas: pip install pandas") from exc
    table = scores(source, names) if not isinstance(source, Mapping) else dict(source)
    if names is not None and isinstance(source, Mapping):
        if isinstance(names, str):
            raise TypeError(f"as_dataframe: names must be a list of names, e.g. [{names!r}]")
        names = list(names)  # (a generator was used up by this check: an empty frame)
        missing = [n for n in names if n not in table]
        if missing:
            raise KeyError(f"as_dataframe: no scores {missing} in the mapping ({sorted(table)})")
        table = {n: table[n] for n in names}
    sizes = {}
    for k, v in table.items():
        if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.is_complex():
            what = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            if isinstance(v, torch.Tensor) and v.is_complex():
                what = f"a complex tensor ({v.dtype}; the imaginary part was dropped)"
            raise ValueError(f"as_dataframe: score {k!r} must be a 1-D [N] real tensor, got {what}")
        sizes[k] = v.numel()
    if len(set(sizes.values())) > 1:
        raise ValueError(f"as_dataframe: the scores must all be [N], got sizes {sizes}")
    cols = {k: v.detach().cpu().double().numpy() for k, v in table.items()}
    df = pd.DataFrame(cols)
    df.index.name = "index"
    return df


# ``csl_fast.scores`` is this function (the package re-exports it over the module name),
# so also reach the helpers from it: ``csl_fast.scores.as_dataframe(tracker)``.
scores.as_dataframe = as_dataframe  # type: ignore[attr-defined]
scores.SCORES = SCORES  # type: ignore[attr-defined]
