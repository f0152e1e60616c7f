r"""Act on a flagged set: one decision per suspicious sample, drop or relabel, then retrain.

:func:`clean` turns a :class:`csl_fast.detect.Detection` (by default
:func:`csl_fast.detect.mislabeled` with its no-ground-truth rule) and the tracker's
suggested labels (:meth:`csl_fast.CSLTracker.suggestions`: the class each sample should
probably have, with a confidence in [0, 1]) into a :class:`CleaningPlan`: for each flagged
sample, most suspicious first, the action ``drop`` or ``relabel``. Policies:

``"relabel-confident"`` (default, except on two classes)
    Relabel a flagged sample to its suggested label when the suggestion's confidence is at
    least ``min_confidence``; drop it otherwise. Why relabel at all: a flipped sample with
    its true label back is one more correct training sample, where dropping loses it; why
    only when confident: a wrong relabel is new label noise, a drop costs one sample.
    When two classes are in use (:func:`two_classes_in_use`) the suggestion of every
    flagged sample is "the other class", confidently, so a relabel is right only as often
    as the flagged sample is really mislabeled, which the confidence does not measure:
    a clean sample flagged by mistake gets a wrong label (make_classification, 301
    samples, 24 flips: 41 relabels, 18 right, the wrong labels went from 24 to 27). There
    the default policy is ``"drop"``, with a :class:`RelabelWarning`, for the flagged
    samples: conflicting duplicate groups (below) are still resolved, since each surely
    holds a wrong label; asking for ``"relabel-confident"`` still relabels, and
    ``"review"`` proposes relabels, with the warning.
``"drop"``
    Drop every flagged sample (no suggestions needed). The safe choice when the flagged set
    also holds atypical but correctly labelled samples.
``"review"``
    A worklist for a person with a review budget of ``budget`` samples: the ``budget``
    most suspicious samples of the *ranking*, flagged by the rule or not (so a rule that
    flags nothing still yields a worklist). A flagged row gets the action
    ``relabel-confident`` would propose; an unflagged one gets ``keep`` (its suggestion,
    if any, is still shown): the rule found no case against its label, and on the demo
    run (``csl-fast demo``, 1,437 samples, 180 flagged; measured 2026-12-05) the given
    label was right for 212 of the first 220 unflagged rows of the ranking, while their
    confident suggestions were right for 3 of 45 (3 of 81 over all unflagged rows),
    against 132 of 141 for the flagged rows. ``budget`` is required.

``budget`` (all policies) keeps only the ``budget`` most suspicious rows; the other
samples are left as they are.

Duplicates with conflicting labels (``inputs=`` and ``labels=``): the plan also covers
:func:`csl_fast.detect.duplicates`' flagged set, every member of each group of identical
inputs whose labels differ, one row per sample (a sample flagged by both detections gets
one row, the group's). Under ``"relabel-confident"`` and ``"review"`` the label the
network preferred for that input (lowest mean loss) is the group's: the members that carry
it are kept as they are (action ``keep``) and the others relabelled to it (dropped when
the group label's share, the row's confidence, is below ``min_confidence``); ``"drop"``
drops them all. A run that recorded losses only, or sequences, may give its targets as
``labels`` (a regression's values, a multi-label run's rows, a sequence's token labels):
there is no class to relabel to, so the others are dropped.
:mod:`csl_fast.cleaning_groups` says why, with the demo's figures.

The plan is a table (:meth:`CleaningPlan.to_csv`, columns ``index, action,
suggested_label, confidence, score, rank``; ``action`` is ``drop``, ``relabel`` or ``keep``:
a conflicting group's kept member, or an unflagged row of a review worklist) and can be
applied in one call:
:meth:`CleaningPlan.apply` gives the kept dataset indices and their new labels, so
retraining on the cleaned data is::

    plan = csl_fast.clean(tracker)
    keep, labels = plan.apply(y)                 # int64 [K], int64 [K]
    train(fresh_model, x[keep], labels, ...)     # or plan.apply_dataset(dataset)

``rank`` is **1-based** (the most suspicious sample has rank 1), as in ``csl-fast rank``
and :meth:`csl_fast.detect.Detection.to_dataframe`; empty (no rank) for a sample the
detection does not rank, as there: a conflicting group's member without a score, or a
held-out one an eval pass scored (:attr:`csl_fast.detect.Detection.ranked`).
"""

from __future__ import annotations

import csv
import math
import numbers
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, TextIO

import numpy as np
import torch

from . import atomic_file
from ._args import int64_labels, integer_labels
from .cleaning_groups import duplicate_decisions
from .detect import Detection, DetectionWarning, mislabeled

if TYPE_CHECKING:
    from .tracker import CSLTracker

__all__ = [
    "CSV_COLUMNS",
    "DEFAULT_MIN_CONFIDENCE",
    "POLICIES",
    "Cleaned",
    "CleanedDataset",
    "CleaningPlan",
    "RelabelWarning",
    "clean",
    "default_detection",
    "evaluate_plan",
    "two_classes_in_use",
]

POLICIES = ("relabel-confident", "drop", "review")


class RelabelWarning(UserWarning):
    """:func:`clean` on two classes in use: its relabels are right only as often as the
    flagged set is precise (the module doc, ``"relabel-confident"``)."""


def two_classes_in_use(source: Any, labels: Any = None, detection: Detection | None = None) -> bool:
    """Whether exactly two classes are in use in the run of ``source`` (a
    :class:`csl_fast.CSLTracker`; False for any other source), counted from the first of:
    ``labels`` (int ``[N]``), the distinct labels among the presented samples; the
    classes in use ``detection`` recorded (``diagnostics["classes_in_use"]``: those of
    the ``labels=`` given to :func:`csl_fast.detect.mislabeled`); the tracker's
    ``num_classes`` (:func:`csl_fast.detect.classes_in_use`)."""
    from .detect import classes_in_use
    from .tracker import CSLTracker

    if not isinstance(source, CSLTracker):
        return False
    y = _class_labels(source, labels)
    recorded = None if detection is None else detection.diagnostics.get("classes_in_use")
    if y is None and recorded is not None:
        # (the labels the detection was given: clean(t, detection=mislabeled(t, labels=y))
        # relabelled on two classes, silently, by the tracker's 10 outputs)
        return recorded == 2
    return classes_in_use(source, y) == 2


def _class_labels(source: Any, labels: Any) -> torch.Tensor | None:
    """``labels`` as int ``[N]`` class labels, or None when they are not (the targets of a
    loss-only run, ``[N, ...]`` or real, which ``clean`` also takes)."""
    if labels is None:
        return None
    try:
        y = torch.as_tensor(labels)
    except (TypeError, ValueError, RuntimeError):
        return None  # (duplicate_decisions says what is wrong with them)
    if y.dim() != 1 or y.numel() != source.num_samples or not integer_labels(y.dtype):
        return None
    return y


#: Columns of :meth:`CleaningPlan.to_csv`, in order.
CSV_COLUMNS = ("index", "action", "suggested_label", "confidence", "score", "rank")
#: Rows of a plan :meth:`CleaningPlan.to_csv` writes at a time.
PLAN_CSV_CHUNK = 65536
#: Default ``min_confidence`` of the relabelling policies: relabel a flagged sample when the
#: network predicted its suggested class at >= 40% of the presentations before it fitted
#: the given label, counted as at least 3 (one vote is not enough;
#: :meth:`csl_fast.CSLTracker.suggestions`), drop it otherwise. That
#: confidence stops changing once a sample is memorised, so the threshold means the same
#: after 60 epochs or 120. It is the least threshold whose relabels were right ~0.85-0.9 of
#: the time on digits, MNIST-1D and the demo's setup (10 classes each; on two classes the
#: flagged set's precision bounds them, and the default policy drops: the module doc), so
#: that most flips are repaired rather than dropped (the sweep and its figures:
#: ``docs/cleaning.md``).
DEFAULT_MIN_CONFIDENCE = 0.4


class Cleaned(NamedTuple):
    """The cleaned training set as index arithmetic (:meth:`CleaningPlan.apply`).

    Attributes:
        keep: int64 ``[K]`` dataset indices that stay, ascending: every sample the run
            trained on (when the plan knows, :attr:`CleaningPlan.presented`) but the
            dropped ones.
        labels: int64 ``[K]`` the label of each kept sample, ``labels[j]`` for
            ``keep[j]``: the given label, or the suggested one where the plan relabels
            (of a plan that relabels nothing, given other targets, ``[N, ...]`` of any
            dtype: the kept ones as they are).
    """

    keep: torch.Tensor
    labels: torch.Tensor


@dataclass(eq=False)  # identity: == over tensor fields raised "ambiguous" (and broke `in`)
class CleaningPlan:
    """One decision per selected sample, most suspicious first (``M`` rows).

    Attributes:
        index: int64 ``[M]`` dataset indices.
        relabel: bool ``[M]`` the action: relabel (``True``) or, unless ``keep``, drop.
        suggested_label: int64 ``[M]`` the suggested class, ``-1`` where there is none
            (for a member of a conflicting duplicate group: the group's label).
        confidence: float32 ``[M]`` the suggestion's confidence in [0, 1], NaN where there
            is no suggestion (for a conflicting group's member: the group label's share,
            :mod:`csl_fast.cleaning_groups`).
        score: float64 ``[M]`` the detection score (higher = more suspicious).
        rank: int64 ``[M]`` 1-based position in the detection's ranking, ``-1`` for a
            sample it does not rank (:attr:`csl_fast.detect.Detection.ranked`: a
            conflicting group's member without a score, never presented or recorded by
            another recorder in a tracker that mixes them, or a held-out one an eval pass
            scored).
        num_samples: ``N``, the size of the dataset the plan is for.
        policy, min_confidence, budget: how the plan was made (see :func:`clean`).
        detection: the detection the plan acts on (its estimated count, diagnostics and
            warning say how far to trust the flagged set).
        keep: bool ``[M]`` the row is kept as it is (action ``keep``): a conflicting
            duplicate group's member that carries the group's label, or under
            ``"review"`` an unflagged sample (its suggestion shown, confident or not: past
            the flagged set the given label is far more often right; a held-out sample an
            eval pass scored too, which :meth:`apply` leaves out as every sample outside
            ``presented``); all False otherwise.
        duplicates: the duplicate detection merged into the plan (``inputs=``), or None.
        grouped: bool ``[M]`` the row's action is its conflicting duplicate group's
            (``inputs=`` with ``labels=``, :mod:`csl_fast.cleaning_groups`); all False
            otherwise.
        presented: bool ``[N]`` the samples the run trained on (the tracker's
            ``csl_count > 0``; in a run of eval passes alone, the samples they scored) when
            the plan was made from a tracker or :func:`csl_fast.scores` of one, else None:
            :meth:`apply` and :meth:`apply_dataset` leave the others out.
        unseen: how the samples outside ``presented`` were missed, for messages.
        groups_resolved: the conflicting duplicate groups were resolved (their
            preferred members kept, the others relabelled to the group's label or
            dropped, as the module doc says) rather than dropped whole: under every
            policy but ``"drop"``, and under the ``"drop"`` that :func:`clean`'s default
            takes on two classes in use. ``None`` (default): ``policy != "drop"``.
    """

    index: torch.Tensor
    relabel: torch.Tensor
    suggested_label: torch.Tensor
    confidence: torch.Tensor
    score: torch.Tensor
    rank: torch.Tensor
    num_samples: int
    policy: str
    min_confidence: float
    budget: int | None
    detection: Detection
    keep: torch.Tensor | None = None
    duplicates: Detection | None = None
    grouped: torch.Tensor | None = None
    presented: torch.Tensor | None = None
    unseen: str = "never presented in training"
    groups_resolved: bool | None = None

    def __post_init__(self) -> None:
        if self.groups_resolved is None:
            self.groups_resolved = self.policy != "drop"
        if self.keep is None:
            self.keep = torch.zeros_like(self.relabel)
        if self.grouped is None:
            self.grouped = torch.zeros_like(self.relabel)

    def __len__(self) -> int:
        return int(self.index.numel())

    def __repr__(self) -> str:
        # the generated repr printed every [M] tensor and the whole detection
        tally = {a: 0 for a in ("relabel", "drop", "keep")}
        for a in self.actions:
            tally[a] += 1
        counts = ", ".join(f"{n} {a}" for a, n in tally.items())
        return (
            f"CleaningPlan({len(self)} of {self.num_samples} samples: {counts}; "
            f"policy={self.policy!r}, min_confidence={self.min_confidence:g}, "
            f"budget={self.budget!r}, detection={self.detection!r})"
        )

    @property
    def actions(self) -> list[str]:
        """The action of each row: ``"relabel"``, ``"drop"`` or ``"keep"``."""
        return [
            _action(r, k) for r, k in zip(self.relabel.tolist(), self.kept.tolist(), strict=True)
        ]

    @property
    def kept(self) -> torch.Tensor:
        """bool ``[M]``: the ``keep`` rows."""
        assert self.keep is not None  # set by __post_init__
        return self.keep

    @property
    def dropped(self) -> torch.Tensor:
        """bool ``[M]``: the ``drop`` rows."""
        return ~self.relabel & ~self.kept

    def drop_reasons(self) -> dict[str, torch.Tensor]:
        """Why each ``drop`` row is dropped, bool ``[M]`` per reason (together the drop
        rows, each in one): ``"unseen"`` every drop row outside :attr:`presented`, under
        every policy (a sample the run never trained on, with nothing to relabel by: a
        conflicting duplicate group's member, or a flagged held-out sample an eval pass
        scored, in a group or not); ``"group without label"`` and ``"group share"`` (a
        group's member the run trained on, dropped because the group label's share is
        under ``min_confidence``, :mod:`csl_fast.cleaning_groups`; not where the groups
        were not resolved, :attr:`groups_resolved`: an explicit ``policy="drop"``);
        ``"suggestion"`` the other rows: no confident suggestion, or ``policy="drop"``."""
        unseen = torch.zeros_like(self.relabel)
        if self.presented is not None:
            unseen = self.dropped & ~self.presented.cpu()[self.index]
        # (under policy="drop" a group's members are dropped by the policy, whatever its
        # label, unless it was the two-class default, which resolves the groups)
        grouped = self.dropped & self.grouped & ~unseen & bool(self.groups_resolved)
        no_label = grouped & (self.suggested_label < 0)
        return {
            "unseen": unseen,
            "group without label": no_label,
            "group share": grouped & ~no_label,
            "suggestion": self.dropped & ~grouped & ~unseen,
        }

    @property
    def num_dropped(self) -> int:
        return int(self.dropped.sum())

    @property
    def num_kept(self) -> int:
        return int(self.kept.sum())

    @property
    def num_relabeled(self) -> int:
        return int(self.relabel.sum())

    @property
    def warning(self) -> str | None:
        """The detection's warning (e.g. why nothing was flagged), or None; said of the
        score's rule when the plan has rows all the same (a review worklist, conflicting
        duplicate groups), which a bare "nothing flagged" beside them contradicted."""
        said = self.detection.warning
        if said is None or len(self.detection) or not len(self):
            return said
        rows = (
            "the plan lists the most suspicious samples for review, none of them flagged"
            if self.policy == "review"
            else "the plan's rows are the members of conflicting duplicate groups"
        )
        return f"{rows}; the score's own rule: {said}"

    def rows(self) -> list[dict[str, Any]]:
        """The rows as dicts with the keys :data:`CSV_COLUMNS` (``None`` when unknown: no
        suggestion, no rank)."""
        return [
            {"index": i, "action": a, "suggested_label": k, "confidence": c, "score": s, "rank": r}
            for i, a, k, c, s, r in zip(*self._columns(0, len(self)), strict=True)
        ]

    def _columns(self, start: int, stop: int) -> list[list[Any]]:
        """The values of :meth:`rows` ``start:stop``, a list per column of
        :data:`CSV_COLUMNS`: built column by column (a million-row plan's dicts took
        seconds and hundreds of MB on their way to a CSV)."""
        lab = self.suggested_label[start:stop].tolist()
        conf = self.confidence[start:stop].tolist()
        return [
            self.index[start:stop].tolist(),
            [
                _action(r, k)
                for r, k in zip(
                    self.relabel[start:stop].tolist(), self.kept[start:stop].tolist(), strict=True
                )
            ],
            [x if x >= 0 else None for x in lab],
            [c if x >= 0 and math.isfinite(c) else None for x, c in zip(lab, conf, strict=True)],
            self.score[start:stop].tolist(),
            [r if r > 0 else None for r in self.rank[start:stop].tolist()],
        ]

    def to_csv(self, path: str | os.PathLike | TextIO) -> None:
        """Write the plan as CSV: a header :data:`CSV_COLUMNS`, then one row per decision,
        to the file ``path`` (atomically) or to an open text stream (``sys.stdout``).

        ``action`` is ``drop``, ``relabel`` or ``keep``; ``suggested_label`` and ``confidence`` are
        empty where there is no suggestion (a drop row still shows one when it exists);
        ``confidence`` is the shortest decimal that reads back as the same float32 (rounded
        to 4 decimals, a drop at 0.39996 < ``min_confidence`` 0.4 read ``0.4000``);
        ``score`` is written exactly (``repr``); ``rank`` is 1-based, empty where the
        detection does not rank the sample (see :attr:`rank`).
        """

        def fill(f: TextIO) -> None:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(CSV_COLUMNS)
            # a chunk of rows at a time, column by column
            for start in range(0, len(self), PLAN_CSV_CHUNK):
                stop = min(start + PLAN_CSV_CHUNK, len(self))
                index, action, lab, conf, score, rank = self._columns(start, stop)
                # (str of each np.float32: the shortest decimal that reads back the same)
                shown = self.confidence[start:stop].detach().cpu().double().numpy()
                conf_text = shown.astype(np.float32).astype(str).tolist()
                w.writerows(
                    zip(
                        index,
                        action,
                        ["" if x is None else x for x in lab],
                        ["" if c is None else t for c, t in zip(conf, conf_text, strict=True)],
                        map(repr, map(float, score)),
                        ["" if r is None else r for r in rank],
                        strict=True,
                    )
                )

        if hasattr(path, "write"):
            fill(path)
            return
        path = os.fspath(path)
        folder = os.path.dirname(path)
        if folder and not os.path.isdir(folder):
            raise FileNotFoundError(
                f"CleaningPlan.to_csv: the folder {folder!r} does not exist; create it first"
            )
        # atomically: a plan cut short by a full disk read as a shorter plan
        atomic_file.write_text(path, fill, "write the cleaning plan", "plan.csv")

    def to_dataframe(self) -> Any:
        """A pandas DataFrame with the columns :data:`CSV_COLUMNS` (rank 1-based, a
        nullable ``Int64`` column: ``<NA>`` where the detection does not rank the sample)."""
        import pandas as pd

        # (column by column: pandas reads each column's values as it read the rows'; an
        # empty plan's columns are objects, as from no rows)
        cols = self._columns(0, len(self))
        data = dict(zip(CSV_COLUMNS, cols, strict=True)) if len(self) else []
        df = pd.DataFrame(data, columns=list(CSV_COLUMNS))
        df["rank"] = df["rank"].astype("Int64")
        return df

    def _relabels(self, caller: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index, new label)`` of the relabel rows, checked: ``relabel`` is a public
        field, and a row set to relabel without a suggestion (``-1``) gave its sample the
        label -1, which cross entropy then refused far from the cause (or, with
        ``ignore_index=-1``, silently skipped)."""
        rows = self.relabel.cpu()
        where, to = self.index.cpu()[rows], self.suggested_label.cpu()[rows]
        if bool((to < 0).any()):
            bad = where[to < 0][:5].tolist()
            raise ValueError(
                f"CleaningPlan.{caller}: rows for samples {bad} relabel but have no suggested "
                "label (-1): set their relabel to False (drop) or give them a suggested_label"
            )
        return where, to

    def apply(self, labels: torch.Tensor | np.ndarray | Sequence[int]) -> Cleaned:
        """The cleaned training set: kept indices and their labels (see :class:`Cleaned`).

        Args:
            labels: int ``[N]`` the given (noisy) labels the plan was made for; kept as
                they are (not range-checked) except where the plan relabels. A plan that
                relabels nothing (policy drop; every plan of a run that recorded losses
                only) takes the targets of any ``[N, ...]`` shape and dtype (regression
                values, multi-hot labels) and returns the kept ones as they are.
        """
        try:
            y = torch.as_tensor(labels)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"CleaningPlan.apply: labels must be int [N] = [{self.num_samples}] (a tensor, "
                f"array or list), got {type(labels).__name__}"
            ) from exc
        if y.is_meta or y.layout != torch.strided:
            raise ValueError(
                "CleaningPlan.apply: labels must be a dense tensor with data, got a "
                f"{'meta' if y.is_meta else y.layout} tensor"
            )
        where, to = self._relabels("apply")
        class_indices = y.dim() == 1 and integer_labels(y.dtype)
        if where.numel() == 0 and not class_indices and y.dim() >= 1 and len(y) == self.num_samples:
            # nothing to relabel: regression targets and multi-hot labels were refused
            kept = torch.nonzero(self._keep_mask("apply"))[:, 0]
            return Cleaned(kept, y.detach().cpu()[kept])
        if y.dim() != 1 or y.numel() != self.num_samples:
            raise ValueError(
                f"CleaningPlan.apply: labels must be [N] = [{self.num_samples}] (the dataset "
                f"the plan was made for), got shape {tuple(y.shape)}"
            )
        if not integer_labels(y.dtype):
            raise TypeError(f"CleaningPlan.apply: labels must be integers, got {y.dtype}")
        new = y.detach().to("cpu", torch.int64).clone()
        new[where] = to
        kept = torch.nonzero(self._keep_mask("apply"))[:, 0]
        return Cleaned(kept, new[kept])

    def _keep_mask(self, caller: str) -> torch.Tensor:
        """bool ``[N]``: the samples that stay; a warning when some were never presented
        (a held-out part of the index space would have leaked into the training set)."""
        keep = torch.ones(self.num_samples, dtype=torch.bool)
        keep[self.index.cpu()[self.dropped.cpu()]] = False
        if self.presented is not None:
            unseen = int((~self.presented.cpu()).sum())
            if unseen:
                why = (
                    NO_TOKEN_WHY
                    if self.unseen == NO_SUPERVISED_TOKEN
                    else "held out, or never reached"
                )
                warnings.warn(
                    f"CleaningPlan.{caller}: {unseen} of the {self.num_samples} samples were "
                    f"{self.unseen} ({why}) and are left out of the "
                    "cleaned set; the run says nothing about them",
                    stacklevel=3,
                )
            keep &= self.presented.cpu()
        return keep

    def apply_dataset(self, dataset: Any, label_position: int | str = 1) -> CleanedDataset:
        """A map-style dataset of the kept samples with their new labels.

        ``dataset[i]`` is a tuple or list whose element ``label_position`` (an int) is the
        label (``(x, y)`` or ``(x, y, index)``, as :class:`csl_fast.data.IndexedDataset`
        yields), or a mapping whose key ``label_position`` is (``{"input": x, "label": y}``
        with ``label_position="label"``, as a Hugging Face ``datasets.Dataset`` yields).
        Item ``j`` of the result is ``dataset[keep[j]]`` with that label replaced by the new
        one, of the replaced label's type (see :class:`CleanedDataset`).

        Raises:
            TypeError: when the first relabelled sample has no label at ``label_position``
                (checked here, not at that sample's turn in an epoch).
        """
        if isinstance(label_position, bool) or not isinstance(label_position, int | str):
            raise TypeError(
                "CleaningPlan.apply_dataset: label_position must be an int (position in a "
                f"tuple item) or a str (key of a dict item), got {label_position!r}"
            )
        n = len(dataset)
        if n != self.num_samples:
            raise ValueError(
                f"CleaningPlan.apply_dataset: the dataset has {n} samples, the plan was made "
                f"for {self.num_samples}"
            )
        keep = self._keep_mask("apply_dataset")
        where, to = self._relabels("apply_dataset")
        relabel = dict(zip(where.tolist(), to.tolist(), strict=True))
        out = CleanedDataset(dataset, torch.nonzero(keep)[:, 0].tolist(), relabel, label_position)
        if relabel:
            first = min(relabel)
            out._relabelled(first, dataset[first])
        return out


def _action(relabel: bool, keep: bool) -> str:
    return "keep" if keep else "relabel" if relabel else "drop"


class CleanedDataset(torch.utils.data.Dataset):
    """``dataset`` restricted to ``keep`` with some labels replaced (made by
    :meth:`CleaningPlan.apply_dataset`). Item ``j`` is ``dataset[keep[j]]`` with element (or
    key) ``label_position`` replaced by ``relabel[keep[j]]`` when that sample is relabelled,
    as the replaced label's type (a tensor label stays a tensor of its dtype, device and
    shape, a NumPy scalar a NumPy scalar, anything else becomes an ``int``), so that a
    DataLoader can batch relabelled and untouched items together. The item's other elements
    (e.g. an original dataset index) are passed through: give the retraining a fresh index
    if it tracks CSL."""

    def __init__(
        self,
        dataset: Any,
        keep: list[int],
        relabel: Mapping[int, int],
        label_position: int | str,
    ) -> None:
        self.dataset = dataset
        self.keep = keep
        self.relabel = dict(relabel)
        self.label_position = label_position

    def __len__(self) -> int:
        return len(self.keep)

    def __getitem__(self, j: int) -> Any:
        if isinstance(j, slice):
            # self.keep[slice] is a list, which dataset[list] misreads or refuses obscurely
            raise TypeError(
                "CleanedDataset: index it with one int; for several items use "
                "torch.utils.data.Subset(cleaned, indices)"
            )
        i = self.keep[j]
        item = self.dataset[i]
        return self._relabelled(i, item) if i in self.relabel else item

    def _relabelled(self, i: int, item: Any) -> Any:
        pos = self.label_position
        if isinstance(item, Mapping):
            if pos not in item:
                raise TypeError(
                    f"CleanedDataset: item {i} of the dataset is a mapping without the key "
                    f"{pos!r} (its keys: {list(item)}); pass label_position=<the label's key> "
                    "to apply_dataset"
                )
            return {**item, pos: _like(item[pos], self.relabel[i], i)}
        if (
            not isinstance(item, tuple | list)
            or not isinstance(pos, int)
            or not -len(item) <= pos < len(item)
        ):
            raise TypeError(
                f"CleanedDataset: item {i} of the dataset is not a tuple/list with a label at "
                f"position {pos!r}; pass label_position= to apply_dataset"
            )
        parts = list(item)
        parts[pos] = _like(item[pos], self.relabel[i], i)
        if hasattr(item, "_fields"):  # a namedtuple takes its fields one by one
            return type(item)(*parts)
        return type(item)(parts) if isinstance(item, tuple) else parts


def _like(old: Any, new: int, i: int) -> Any:
    """``new`` as the type of the label it replaces: default_collate stacks a batch's labels
    by the first item's type, so an int among tensor labels crashed the DataLoader."""
    if isinstance(old, torch.Tensor | np.ndarray):
        if (old.numel() if isinstance(old, torch.Tensor) else old.size) != 1:
            raise TypeError(
                f"CleanedDataset: item {i}'s label is an array of shape {tuple(old.shape)}, not "
                "one class index (one-hot or soft labels cannot take a suggested class)"
            )
        if isinstance(old, torch.Tensor):
            return torch.full_like(old, new)
        return np.full_like(old, new)
    if isinstance(old, np.generic):
        return type(old)(new)
    return new


def _suggestions_of(
    source: Any, suggestions: tuple[torch.Tensor, torch.Tensor] | None, n: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(label int64 [N], confidence float32 [N])`` on the CPU, checked, or None."""
    if suggestions is None:
        from .tracker import CSLTracker

        if not isinstance(source, CSLTracker):
            return None
        # (clean words the warning of a tracker without epochs itself, for relabels only)
        suggestions = source._suggestions()
    if not isinstance(suggestions, tuple | list) or len(suggestions) != 2:
        raise TypeError(
            "csl_fast.clean: suggestions must be a pair (label int [N], confidence float [N]), "
            "as CSLTracker.suggestions() returns"
        )
    label = torch.as_tensor(suggestions[0]).detach().cpu()
    conf = torch.as_tensor(suggestions[1]).detach().cpu()
    if label.shape != (n,) or conf.shape != (n,):
        raise ValueError(
            f"csl_fast.clean: suggestions must be two [N] = [{n}] tensors, got shapes "
            f"{tuple(label.shape)} and {tuple(conf.shape)}"
        )
    if not integer_labels(label.dtype):
        raise TypeError(f"csl_fast.clean: suggested labels must be integers, got {label.dtype}")
    conf = conf.float()
    label = int64_labels("csl_fast.clean", label)
    has = label >= 0
    classes = getattr(source, "num_classes", None)
    if classes and bool((label >= classes).any()):
        # a relabel to a class the model has no output for: the retraining's cross entropy
        # fails on it, or worse, a one-hot encoding silently widens
        raise ValueError(
            f"csl_fast.clean: suggested labels must be classes in [0, {classes}) (the "
            f"tracker's num_classes) or -1 for none, got up to {int(label.max())}"
        )
    if bool(((conf[has] < 0) | (conf[has] > 1) | conf[has].isnan()).any()):
        raise ValueError("csl_fast.clean: suggestion confidences must lie in [0, 1]")
    return label.long(), torch.where(has, conf, torch.full_like(conf, math.nan))


#: Why a tracker of sequences has no suggested labels.
SEQUENCES_NO_LABELS = (
    "this run recorded sequences (samples of several positions, "
    "CSLTracker.record_sequences): a sequence's label is its whole token string, not one "
    "class"
)


#: Why a run of eval passes alone has no suggested labels.
EVAL_PASSES_ONLY = (
    "this run has eval passes only (csl_fast.score_epoch): suggested labels are votes cast "
    "in training presentations, and it has none"
)


def no_suggestions(source: Any) -> str | None:
    """Why the tracker ``source`` has no suggested labels (it recorded losses only,
    sequences, or eval passes alone), or ``None`` (it has them, or it is not a tracker)."""
    from .scores import LOSS_ONLY, has_logit_stats
    from .tracker import CSLTracker

    if getattr(source, "losses_only", False):  # csl_fast.scores of such a run
        return LOSS_ONLY
    if not isinstance(source, CSLTracker):
        return None
    trained = bool((source.csl_count > 0).any())
    if trained and not has_logit_stats(source):
        return LOSS_ONLY
    if not trained and bool((source.eval_count > 0).any()):
        return EVAL_PASSES_ONLY
    return SEQUENCES_NO_LABELS if source.sequences else None


def presented(source: Any) -> torch.Tensor | None:
    """bool ``[N]``: the samples a tracker ``source``, or :func:`csl_fast.scores` of one,
    trained on; None for other scores. A run scored by eval passes alone
    (:func:`csl_fast.score_epoch`, no training) says something about the samples they
    scored: those (every sample counted as never presented, the cleaned set of such a run
    was empty)."""
    trained, scored = _presence(source)
    if trained is None or bool(trained.any()):
        return trained
    return scored


def _presence(source: Any) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """bool ``[N]`` the samples trained on and those an eval pass scored, None where the
    source does not say. :func:`csl_fast.scores` carries the tracker's counts: read
    without it, a never-trained group member got a relabel row that apply then kept."""
    from .scores import Scores
    from .tracker import CSLTracker

    if not isinstance(source, (CSLTracker, Scores)):
        return None, None
    # (a Scores pickled before it kept eval_count: no eval pass known)
    evals = getattr(source, "eval_count", None)
    scored = None if evals is None else (evals > 0).cpu()
    return (source.csl_count > 0).cpu(), scored


#: How a tracker of sequences missed the samples it recorded no loss for: its counts are of
#: supervised tokens, so a sequence presented with every token ``ignore_index`` looks as
#: one never presented (they were all called "never presented (held out, or never
#: reached)"), and :data:`NO_TOKEN_WHY` says which it may be.
NO_SUPERVISED_TOKEN = "never presented in training with a supervised token"
NO_TOKEN_WHY = "every token ignore_index, held out, or never reached"


def unseen_phrase(source: Any) -> str:
    """How the samples outside :func:`presented` were missed, for messages."""
    trained, _ = _presence(source)
    if trained is not None and not bool(trained.any()):
        return "never scored by an eval pass (this run has eval passes only)"
    return (
        NO_SUPERVISED_TOKEN
        if getattr(source, "sequences", False)
        else "never presented in training"
    )


def _num_samples(source: Any) -> int | None:
    """How many samples ``source`` scores, when that can be read without computing."""
    from .tracker import CSLTracker

    if isinstance(source, CSLTracker):
        return source.num_samples
    if isinstance(source, torch.Tensor):
        return int(source.shape[0]) if source.dim() else None
    if isinstance(source, Mapping):
        sizes = {
            int(v.shape[0]) for v in source.values() if isinstance(v, torch.Tensor) and v.dim()
        }
        return sizes.pop() if len(sizes) == 1 else None
    return None


def binary_policy(
    source: Any,
    policy: str | None,
    labels: Any = None,
    detection: Detection | None = None,
) -> tuple[str | None, str | None]:
    """``(policy, warning)``: the policy :func:`clean` takes for ``policy`` on the run of
    ``source`` and its :class:`RelabelWarning` (None when there is none): on two classes in
    use (:func:`two_classes_in_use` of ``labels`` and ``detection``), ``None`` becomes
    ``"drop"``, and ``"relabel-confident"`` and ``"review"`` stay, with the warning."""
    relabelling = (None, "relabel-confident", "review")
    if policy not in relabelling or not two_classes_in_use(source, labels, detection):
        return policy, None
    return policy or "drop", binary_relabel_warning(policy)


def binary_relabel_warning(policy: str | None) -> str:
    """:func:`clean`'s :class:`RelabelWarning` for ``policy`` as asked (``None``: the
    default); ``csl-fast clean`` prints it too."""
    why = (
        "two classes are in use, so every flagged sample's suggestion is the other class, "
        "confidently: a relabel is right only as often as the flagged sample is really "
        "mislabeled, and a clean sample flagged by mistake gets a wrong label"
    )
    if policy is None:
        # (a conflicting duplicate group surely holds a wrong label: not what this is about)
        return (
            f"csl_fast.clean: every flagged sample is dropped (policy drop): {why}. A "
            "conflicting duplicate group (inputs= and labels=) is still resolved: its "
            "members with the label the network preferred are kept and the others "
            "relabelled to it. To relabel flagged samples anyway, pass "
            "policy='relabel-confident' (csl-fast clean --policy relabel-confident), after "
            "checking the flagged set's precision"
        )
    if policy == "review":
        return (
            f"csl_fast.clean: policy='review' proposes relabels, but {why}. Review them "
            "as such: the flagged set's precision decides how many are right"
        )
    return (
        f"csl_fast.clean: policy='relabel-confident' relabels, but {why}. Check the "
        "flagged set's precision first, or use policy='drop' (the default on two classes)"
    )


def default_detection(
    source: Any, score: str | None = None, labels: Any = None, **detect_kwargs: Any
) -> Detection:
    """The flagged set :func:`clean` (and ``csl-fast clean``) act on when none is given:
    :func:`csl_fast.detect.mislabeled` (given ``labels``, when they are int ``[N]`` class
    labels: its chance levels count the classes in use), or for a tracker that recorded
    losses only (no softmax statistics: :func:`csl_fast.record_loss`,
    :func:`csl_fast.accumulate_bce`) the tail rule of
    :func:`csl_fast.detect_losses.corrupted_targets`, whose views it has (the
    cross-entropy rule's need margins and probabilities of a class)."""
    from .scores import LOSS_ONLY

    if no_suggestions(source) == LOSS_ONLY:
        from .detect import default_score
        from .detect_losses import corrupted_targets
        from .scores import scores

        # any score the tracker keeps (final_loss too), named as asked in the warning
        name = default_score(source) if score is None else score
        kept = source if isinstance(source, Mapping) else scores(source, [name])
        return corrupted_targets(kept, name, **detect_kwargs)
    from .tracker import CSLTracker

    if isinstance(source, CSLTracker):
        detect_kwargs["labels"] = _class_labels(source, labels)
    return mislabeled(source, score, **detect_kwargs)


def clean(
    source: CSLTracker | Mapping[str, torch.Tensor] | torch.Tensor,
    *,
    detection: Detection | None = None,
    policy: str | None = None,
    min_confidence: float = DEFAULT_MIN_CONFIDENCE,
    budget: int | None = None,
    score: str | None = None,
    suggestions: tuple[torch.Tensor, torch.Tensor] | None = None,
    inputs: torch.Tensor | np.ndarray | Sequence[Any] | None = None,
    labels: torch.Tensor | np.ndarray | Sequence[int] | None = None,
    **detect_kwargs: Any,
) -> CleaningPlan:
    """What to do with each suspicious sample: drop it or relabel it (see the module doc).

    Args:
        source: a :class:`csl_fast.CSLTracker` (gives both the scores and the suggested
            labels), or a ``{name: [N]}`` score mapping / an ``[N]`` score tensor, as
            :func:`csl_fast.detect.mislabeled` takes (then relabelling needs
            ``suggestions``).
        detection: a detection to act on; default :func:`default_detection`
            (``detect.mislabeled(source, score, **detect_kwargs)``, or
            ``detect_losses.corrupted_targets`` for a tracker that recorded losses only).
        policy: ``"relabel-confident"``, ``"drop"`` or ``"review"``; ``None``
            (default): ``"relabel-confident"``, or ``"drop"`` with a
            :class:`RelabelWarning` when two classes are in use
            (:func:`two_classes_in_use`: two distinct ``labels``, else the classes in use
            ``detection`` recorded, else a tracker of ``num_classes=2``), where a relabel
            is right only as often as the flagged set is precise (module doc); that
            default still resolves conflicting duplicate groups (``inputs=`` and
            ``labels=``) as ``"relabel-confident"`` does, since each surely holds a wrong
            label. ``"relabel-confident"`` and ``"review"`` asked for there relabel (or
            propose relabels), with the warning. A tracker
            that recorded losses only (no softmax statistics) or sequences has no
            suggested labels (:func:`no_suggestions`): ``None`` is ``"drop"`` there,
            ``"review"`` is taken, and ``"relabel-confident"`` raises.
        min_confidence: the least suggestion confidence, in [0, 1], at which a sample is
            relabelled rather than dropped (default :data:`DEFAULT_MIN_CONFIDENCE`).
        budget: at most this many rows, the most suspicious (``>= 0``); required for
            ``"review"``.
        score: the score of the default detection; ``None`` (default): ``"csl"``, or
            ``"csl_mean"`` for a tracker of sequences or of unequal presentation counts
            (:func:`csl_fast.detect.default_score`).
            With ``detection=`` it must be that detection's score (``ValueError``
            otherwise: the plan ranks and scores by the detection's).
        suggestions: ``(label int [N] with -1 for none, confidence float [N] in [0, 1])``;
            default ``source.suggestions()`` when ``source`` is a tracker.
        inputs: optional ``[N, ...]`` training inputs (a tensor, NumPy array or list, as
            ``labels``): the plan also acts on
            ``detect.duplicates(source, score, inputs=inputs, labels=labels)`` (module
            doc). Without ``labels`` the groups holding a sample of ``detection`` are
            reported in ``plan.duplicates`` but not added to the plan: which member carries
            the wrong label takes the labels, and a member's own suggestion is the wrong
            tool (:mod:`csl_fast.cleaning_groups`; added, they made the cleaned set worse).
        labels: optional int ``[N]`` given labels (tensor, array or list; needs
            ``inputs``, else ``ValueError``: to count the classes in use without
            inputs, pass ``detection=csl_fast.detect.mislabeled(source, labels=y)``;
            they count them here too): each group of
            identical inputs with conflicting labels is flagged and resolved
            (:mod:`csl_fast.cleaning_groups`). A member the run never trained on gets the
            action ``drop`` (its suggested label, the group's, shown): the cleaned set of
            :meth:`CleaningPlan.apply` leaves such samples out. It votes for its label by
            its eval-pass loss where an eval pass scored it; a group with one label
            measured keeps the per-sample plan (under ``policy="drop"``, which trusts no
            label, every member of every conflicting group is dropped). For a run that
            recorded losses only (a regression's, a multi-label one's) or sequences,
            ``labels`` may be the targets it trained on, ``[N]`` or ``[N, ...]`` of any
            real dtype (a sequence's token labels ``[N, T]``), compared by their bits: the
            member whose target the network fitted best is kept under ``"review"`` and the
            others are dropped, having no class to be relabelled to.
        **detect_kwargs: forwarded to the default detection when ``detection`` is None:
            ``rule``, ``fraction``, ``threshold`` (any other name raises ``TypeError``).

    Returns:
        a :class:`CleaningPlan`. Empty when nothing is flagged; then ``plan.warning`` (the
        detection's) says why.
    """
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"csl_fast.clean: policy must be one of {POLICIES}, got {policy!r}")
    asked, policy = policy, policy or "relabel-confident"  # (checked as relabelling)
    # numbers.Real / Integral: numpy scalars are numbers too (np.float32(0.5) was refused
    # as "not in [0, 1]")
    # a wrong type is a TypeError and a wrong value a ValueError, as Python's own
    if isinstance(min_confidence, bool) or not isinstance(min_confidence, numbers.Real):
        raise TypeError(
            f"csl_fast.clean: min_confidence must be a number in [0, 1], got {min_confidence!r}"
        )
    if not 0.0 <= min_confidence <= 1.0:
        raise ValueError(
            f"csl_fast.clean: min_confidence must be a number in [0, 1], got {min_confidence!r}"
        )
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, numbers.Integral)
    ):
        raise TypeError(f"csl_fast.clean: budget must be None or an int >= 0, got {budget!r}")
    if budget is not None and budget < 0:
        raise ValueError(f"csl_fast.clean: budget must be None or an int >= 0, got {budget!r}")
    budget = None if budget is None else int(budget)
    if policy == "review" and budget is None:
        raise ValueError(
            "csl_fast.clean: policy='review' needs budget= (how many samples a person will review)"
        )
    missing = no_suggestions(source) if suggestions is None else None
    if asked is None and missing is not None:
        # no suggested labels to relabel by: the default drops, as csl-fast clean's does
        # (it raised an error naming policy='relabel-confident', which was never passed)
        asked = policy = "drop"
    if policy == "relabel-confident" and missing is not None:
        # its suggestions are all -1: every row would be a drop under a relabelling policy
        raise ValueError(
            "csl_fast.clean: policy='relabel-confident' relabels, which needs suggested labels, "
            f"but {missing}: use policy='drop' (or 'review', or pass suggestions=)"
        )
    unknown = sorted(set(detect_kwargs) - {"rule", "fraction", "threshold"})
    if unknown:
        # (a misspelt keyword was reported as "mislabeled() got an unexpected keyword")
        raise TypeError(
            f"csl_fast.clean: unexpected keyword argument(s) {unknown}; the default "
            "detection takes rule=, fraction= and threshold="
        )
    if labels is not None and inputs is None:
        # (checked before any warning: the RelabelWarning said every flagged sample was
        # dropped, then this refused the call)
        raise ValueError(
            "csl_fast.clean: labels= needs inputs= (the identical-input groups whose "
            "labels are compared); to count the classes in use from the labels alone, "
            "pass detection=csl_fast.detect.mislabeled(source, labels=labels)"
        )
    from .tracker import CSLTracker

    if isinstance(source, CSLTracker) and _class_labels(source, labels) is not None:
        # (checked here, not by the default detection: its error named detect.mislabeled)
        from .detect import check_labels

        check_labels(source, labels, "csl_fast.clean")
    if detection is None:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", DetectionWarning)
            detection = default_detection(source, score, labels, **detect_kwargs)
        for w in caught:  # at the caller's line (it named csl_fast/cleaning.py)
            if issubclass(w.category, DetectionWarning):
                warnings.warn(w.message, w.category, stacklevel=2)
            else:
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    elif detect_kwargs:
        raise TypeError(
            f"csl_fast.clean: {sorted(detect_kwargs)} configure the default detection; "
            "they cannot be combined with detection="
        )
    if not isinstance(detection, Detection):
        raise TypeError(
            "csl_fast.clean: detection must be a csl_fast.detect.Detection (what "
            f"detect.mislabeled returns), got {type(detection).__name__}"
        )
    if detection.scores.dim() != 1:
        # detect_losses.mislabeled_entries: its [N, L] entries are no per-sample plan
        raise ValueError(
            "csl_fast.clean: detection ranks (sample, label) entries "
            f"({tuple(detection.scores.shape)}), but clean acts on samples; list the "
            "suspicious entries with detection.top(k) (or csl-fast rank RUN --score "
            "label_csl), or clean the samples with detect_losses.corrupted_targets(source)"
        )
    if score is not None and score != detection.score_name:
        # the plan ranks and scores by the detection's score: score= was silently ignored
        raise ValueError(
            f"csl_fast.clean: score={score!r} but the detection ranks by "
            f"{detection.score_name!r}; leave score= out to act on the detection as it is, "
            f"or detect with score={score!r}"
        )
    if detection.groups and labels is None and "duplicate_groups" in detection.diagnostics:
        # its members would each get their own suggestion, the partner's label
        raise ValueError(
            "csl_fast.clean: detection is a duplicates detection (groups of identical "
            "inputs); pass inputs= and labels= instead, so that each conflicting group is "
            "resolved as a group (csl_fast.cleaning_groups), or detection=mislabeled(...) "
            "for the per-sample plan"
        )
    n = int(detection.scores.numel())
    size = _num_samples(source)
    if size is not None and size != n:
        raise ValueError(
            f"csl_fast.clean: the detection ranks {n} samples but the source has {size}: "
            "pass the detection made from this source"
        )
    policy, binary = binary_policy(source, asked, labels, detection)
    policy = policy or "relabel-confident"
    # the two-class default drops the per-sample relabels only: a conflicting group surely
    # holds a wrong label, and its resolution does not rest on the flagged set's precision
    resolve_groups = policy != "drop" or (asked is None and binary is not None)
    sugg = _suggestions_of(source, suggestions, n)
    if suggestions is None and sugg is not None and policy != "drop":
        from .scores import warn_no_epoch_closed

        what = "csl_fast.clean: the suggestions' confidence is underestimated (more drops)"
        warn_no_epoch_closed(source, what)
    if sugg is None and policy != "drop":
        raise ValueError(
            f"csl_fast.clean: policy={policy!r} relabels, which needs suggested labels: pass "
            "a CSLTracker as source, or suggestions=(label, confidence), or use policy='drop'"
        )

    ranking = detection.ranking.cpu()
    values = detection.scores.detach().cpu().double()
    dup, group = duplicate_decisions(source, score, inputs, labels, detection)
    # (review: the ranked samples, not held-out ones an eval pass scored)
    chosen = (detection.ranked if policy == "review" else detection.indices).cpu()
    # (the order of the rows: the detection's ranking, unranked samples last)
    rank_of = torch.empty(n, dtype=torch.int64)
    rank_of[ranking] = torch.arange(1, n + 1)
    if group is not None and policy != "review":
        # (without labels the groups are reported, not added: which member is wrong takes
        # the labels, and a member's own suggestion is the partner's label)
        union = torch.zeros(n, dtype=torch.bool)
        union[chosen] = True
        # (a group too little measured to decide leaves its members to the detection,
        # which relabels by one measured label; a drop trusts no label and takes it whole)
        union[group.index] = True
        if not resolve_groups:
            union |= dup.flagged.cpu()
        chosen = torch.nonzero(union)[:, 0]
        chosen = chosen[torch.argsort(rank_of[chosen])]
    if budget is not None:
        chosen = chosen[:budget]

    if sugg is None:
        label = torch.full((chosen.numel(),), -1, dtype=torch.int64)
        conf = torch.full((chosen.numel(),), math.nan)
    else:
        label, conf = sugg[0][chosen], sugg[1][chosen]
    if policy == "drop":
        relabel = torch.zeros(chosen.numel(), dtype=torch.bool)
    else:
        relabel = (label >= 0) & (conf >= min_confidence)
    keep = torch.zeros(chosen.numel(), dtype=torch.bool)
    grouped = torch.zeros(chosen.numel(), dtype=torch.bool)
    if policy == "review":
        keep = ~detection.flagged.cpu()[chosen]
        relabel &= ~keep
    if group is not None and group.index.numel():
        # a conflicting group's members: the group's decision, not their own suggestion
        row_of = torch.full((n,), -1, dtype=torch.long)
        row_of[chosen] = torch.arange(chosen.numel())
        rows = row_of[group.index]
        at = rows >= 0
        rows = rows[at]
        grouped[rows] = True
        label[rows] = group.group_label[at]
        conf[rows] = group.share[at]
        relabel[rows] = False
        if resolve_groups:
            keep[rows] = group.keep[at]
            has = (group.group_label[at] >= 0) & (group.share[at] >= min_confidence)
            relabel[rows] = ~group.keep[at] & has
    seen = presented(source)
    if seen is not None:
        # a never-presented member of a conflicting group: apply leaves it out, and a
        # relabel or keep row said otherwise. Not an unflagged review row of a held-out
        # sample an eval pass scored (score="eval_csl" of a run trained on a subset): its
        # label stands, "keep" as the docs say (it was "drop", reason "unseen"); apply
        # leaves it out too, as every sample the run did not train on
        unseen = ~seen.cpu()[chosen]
        relabel &= ~unseen
        keep &= ~(unseen & grouped)
    if binary is not None:  # (after every argument check: the call goes through)
        warnings.warn(binary, RelabelWarning, stacklevel=2)
    return CleaningPlan(
        index=chosen.long(),
        relabel=relabel,
        suggested_label=label,
        confidence=conf,
        score=values[chosen],
        # a sample the detection does not rank (a never-presented group member, a held-out
        # one an eval pass scored) has no rank: it was numbered after the ranked ones
        rank=torch.where(rank_of[chosen] <= detection.ranked.numel(), rank_of[chosen], -1),
        num_samples=n,
        policy=policy,
        min_confidence=float(min_confidence),
        budget=budget,
        detection=detection,
        keep=keep,
        duplicates=dup,
        grouped=grouped,
        presented=seen,
        unseen=unseen_phrase(source),
        groups_resolved=resolve_groups,
    )


def evaluate_plan(
    plan: CleaningPlan,
    true_labels: torch.Tensor | np.ndarray | None,
    mislabeled: torch.Tensor | np.ndarray | None = None,
    duplicate: torch.Tensor | np.ndarray | None = None,
) -> dict[str, int | None]:
    """What a plan's rows are made of, against the ground truth (when it is known).

    Args:
        true_labels: int ``[N]`` the clean labels, or None.
        mislabeled, duplicate: bool ``[N]`` ground-truth masks, or None.

    Returns:
        ``rows``; ``mislabeled``, ``duplicate`` and ``clean`` (rows of each kind; a
        kind whose mask is None counts as absent); ``relabel_correct``: relabels whose
        suggested label is the true label (None without ``true_labels``); ``drop_clean``:
        clean samples the plan drops (a cost: data thrown away); ``kept``: ``keep`` rows;
        ``keep_correct``: those whose kept label is the true label (None without
        ``true_labels``): for a conflicting duplicate group's member the group's label,
        its suggested label; for an unflagged review row, and a group member kept with
        its own target (a group of targets, which has no label), its given label, right
        unless ``mislabeled`` marks it (None when such rows exist and ``mislabeled`` is
        None).
    """
    if not isinstance(plan, CleaningPlan):  # ("'NoneType' has no attribute 'num_samples'")
        raise TypeError(
            "csl_fast.cleaning.evaluate_plan: plan must be a CleaningPlan (what "
            f"csl_fast.clean returns), got {type(plan).__name__}"
        )
    n = plan.num_samples

    def mask(m: Any) -> np.ndarray:
        if m is None:
            return np.zeros(n, dtype=bool)
        m = np.asarray(torch.as_tensor(m).cpu())
        if m.shape != (n,):
            raise ValueError(f"evaluate_plan: ground truth must be [N] = [{n}], got {m.shape}")
        # under astype(bool) class labels or NaN would count as positives
        if m.dtype != bool and not np.isin(m, (0, 1)).all():
            raise ValueError(
                "evaluate_plan: ground truth must be a bool mask (or 0/1), got values "
                f"{np.unique(m[~np.isin(m, (0, 1))])[:5].tolist()}"
            )
        return m.astype(bool)

    idx = plan.index.cpu().numpy()
    mis, dup = mask(mislabeled)[idx], mask(duplicate)[idx]
    clean_rows = ~mis & ~dup
    relabel = plan.relabel.cpu().numpy()
    kept = plan.kept.cpu().numpy()
    correct = keep_correct = None
    if true_labels is not None:
        t = np.asarray(torch.as_tensor(true_labels).cpu())
        if t.shape != (n,):
            raise ValueError(f"evaluate_plan: true_labels must be [N] = [{n}], got {t.shape}")
        # 2.5 never equals a suggested label: relabel_correct would read 0; 2.0 is label 2
        if t.dtype.kind not in "iu" and not (
            t.dtype.kind == "f" and np.isfinite(t).all() and (t == np.round(t)).all()
        ):
            raise TypeError(
                f"evaluate_plan: true_labels must be integer class labels, got {t.dtype}"
            )
        right = plan.suggested_label.cpu().numpy() == t[idx]
        correct = int(right[relabel].sum())
        # not plan.duplicates.flagged: with inputs= alone it also holds unflagged review rows
        # kept with their given label, which their suggestion misjudged
        assert plan.grouped is not None  # set by __post_init__
        in_group = plan.grouped.cpu().numpy()
        # an unflagged review row keeps its given label, which only `mislabeled` judges; so
        # does a group member kept with its own target (a group of targets has no label)
        as_given = kept & (~in_group | (plan.suggested_label.cpu().numpy() < 0))
        if mislabeled is not None or not as_given.any():
            keep_correct = int((right & kept & ~as_given).sum() + (~mis & as_given).sum())
    return {
        "rows": len(plan),
        "mislabeled": int(mis.sum()),
        "duplicate": int(dup.sum()),
        "clean": int(clean_rows.sum()),
        "relabel_correct": correct,
        "drop_clean": int((clean_rows & plan.dropped.cpu().numpy()).sum()),
        "kept": int(kept.sum()),
        "keep_correct": keep_correct,
    }
