r"""What :func:`csl_fast.clean` does with a group of identical inputs whose labels conflict.

:func:`csl_fast.detect.duplicates` with ``inputs`` and ``labels`` flags every member of
such a group, exactly: at most one of its labels is right. Dropping every member (what
``policy="drop"`` does) throws the input away; relabelling each member to its own
suggested label is unreliable, because a member's suggestion is the class the network
predicted when it *disagreed* with that member's label
(:meth:`csl_fast.CSLTracker.suggestions`), which for a pair is the partner's label: on
the demo (seed 0, 20 injected pairs, both members of 19 flagged by the mislabeled rule)
the default relabel-confident policy relabelled both members of 7 pairs, swapping their
labels (still conflicting, the right member now wrong; 3 of 20 with seed 1:
``benchmarks/results/cleaning_groups.md``). The group
has one input, so the network gave one answer to both members; which of their labels it
preferred is what decides:

* **the group's label** is the label of the member with the lowest *mean* loss
  (``CSL / presentations``; for a member the run never trained on, its mean eval-pass loss
  where :func:`csl_fast.score_epoch` scored it, the network's word on a held-out copy):
  the label the network gave the most probability to, on average over training, for this
  input (an exact tie between labels leaves the group without one, below). On the demo
  it is the true label of 20 of 20 pairs with seed 0 and 20 of 20 with seed 1.
* **keep** the members that carry the group's label (the row says ``keep``) and
  **relabel** the others to it, as a flipped sample is relabelled. Relabelling rather than
  dropping leaves the inputs as often in the data as they were (cleaning fixes labels; it
  should not reweight inputs), and it retrains about as well: clean-test accuracy after one
  retraining on the demo, mean over demo seeds 0 and 1 and training seeds 0-2, 0.973
  relabelling, 0.972 dropping the copies and 0.977 with the previous plan (no groups): 2102,
  2100 and 2110 of 2160 test predictions right; a training seed moves a plan by up to 3 of
  the 360 test digits (0.008; pooled over demo and training seeds, the previous plan
  spreads by 5, 0.014), about as much as the plans differ
  (``benchmarks/results/cleaning_groups.md``, 2026-12-02, from
  ``benchmarks/cleaning_groups.py``; its first run, at 4fe9cc9 with the rule of then, gave
  0.974 for all three, and a first, unscripted run 0.975, 0.971 and 0.976). A group
  with no label (below) is dropped whole; a member is dropped rather than relabelled when
  the share below is under ``min_confidence`` (the confidence column means the same for
  every relabel: with the default 0.4 a pair is always relabelled, as its share is at least
  1/2).
* the row's ``suggested_label`` is the group's label and its ``confidence`` the group
  label's share of the members' geometric-mean probability, ``exp(-mean loss)``
  (the best member of each label, over the labels measured): ``1/2`` for a pair the
  network could not tell apart, near 1 when it clearly preferred one label. A group whose
  best labels tie exactly has no label: every member is dropped.
* a group with fewer than two of its labels measured (the other labels' members neither
  trained on nor scored by an eval pass) compares nothing, and the lone measured label
  would win with share 1 whatever the network said of it: such a group adds no rows, its
  members keep the per-sample plan (:attr:`csl_fast.CleaningPlan.duplicates` still lists
  it). A group with two labels measured decides between those; a member of an unmeasured
  label is dropped (never presented).

The group's label needs no threshold of its own: unlike a single flagged sample's
relabel, it never invents a label, it picks one the data already gives, and the network's
choice between them was right for every pair measured. ``policy="drop"`` drops every
member instead (it trusts no label).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

from . import duplicate_groups as dg
from ._args import class_indices, int64_labels
from .detect import Detection, carry_to_groups, duplicates

__all__ = ["GroupDecision", "duplicate_decisions", "resolve_conflicts"]


class GroupDecision(NamedTuple):
    """One row per member of a conflicting group (``K`` rows, by dataset index).

    Attributes:
        index: int64 ``[K]`` dataset indices.
        keep: bool ``[K]`` the member carries the group's label and is kept as it is.
        group_label: int64 ``[K]`` the group's label, ``-1`` where the group has none.
        share: float32 ``[K]`` the group label's share of the members' probability, NaN
            where the group has none.
    """

    index: torch.Tensor
    keep: torch.Tensor
    group_label: torch.Tensor
    share: torch.Tensor


def resolve_conflicts(
    groups: list[list[int]], labels: torch.Tensor, mean_loss: torch.Tensor
) -> GroupDecision:
    """The keep/drop decision of every member of ``groups`` (see the module doc).

    Args:
        groups: lists of dataset indices, one per conflicting group (each of size >= 2),
            as :attr:`csl_fast.detect.Detection.groups` lists them.
        labels: int ``[N]`` the given labels; a negative one (an unlabelled sample,
            ``ignore_index``) never votes and gets the group's label here. Through
            :func:`csl_fast.clean` of a tracker such a member is dropped as never
            presented: the tracker counts no presentation of an ``ignore_index`` row, and
            :meth:`csl_fast.CleaningPlan.apply` leaves every such sample out.
        mean_loss: float ``[N]`` each sample's mean loss over training (``csl_mean``), or
            over the eval passes for a sample never trained on; NaN: never measured.

    Returns:
        the members of the groups with at least two labels measured (the others compare
        nothing and are left out).
    """
    empty = torch.empty(0, dtype=torch.long)
    if not groups:
        return GroupDecision(
            empty, torch.empty(0, dtype=torch.bool), empty, torch.empty(0, dtype=torch.float32)
        )
    n = labels.shape[0] if labels.dim() else 0
    if not class_indices(labels):
        raise ValueError(
            "resolve_conflicts: labels must be int [N] class indices, got "
            f"{labels.dtype} of shape {tuple(labels.shape)}"
        )
    if mean_loss.shape != labels.shape:
        raise ValueError(
            f"resolve_conflicts: mean_loss must be [N] = [{n}] as labels, got "
            f"{tuple(mean_loss.shape)}"
        )
    members = torch.tensor([i for g in groups for i in g], dtype=torch.long)
    if members.numel() and not bool(((members >= 0) & (members < n)).all()):
        raise ValueError(f"resolve_conflicts: group members must be dataset indices in [0, {n})")
    gid = torch.repeat_interleave(torch.arange(len(groups)), torch.tensor([len(g) for g in groups]))
    lab = labels.detach().cpu().long()[members]
    loss = mean_loss.detach().cpu().double()[members]
    # a member never presented, or unlabelled (a negative label, ignore_index), has no
    # label to vote for; an unlabelled one takes the group's label
    votes = torch.isfinite(loss) & (lab >= 0)
    # the best (lowest mean loss) voting member of each (group, label)
    pair_keys, pair_of = torch.unique(
        torch.stack([gid[votes], lab[votes]], 1), dim=0, return_inverse=True
    )
    best = torch.full((pair_keys.shape[0],), math.inf, dtype=torch.float64)
    best.scatter_reduce_(0, pair_of, loss[votes], reduce="amin")
    pair_group = pair_keys[:, 0]
    top = torch.full((len(groups),), math.inf, dtype=torch.float64)
    top.scatter_reduce_(0, pair_group, best, reduce="amin")
    winners = torch.zeros(len(groups), dtype=torch.long)
    winners.index_add_(0, pair_group, (best == top[pair_group]).long())
    # a group with fewer than two measured labels compares nothing: the lone measured
    # label would win with share 1, overriding what the network said of that member
    measured = torch.zeros(len(groups), dtype=torch.long)
    measured.index_add_(0, pair_group, torch.ones_like(pair_group))
    judged = measured >= 2
    # the group's label: the label of its best pair; none on an exact tie
    decided = (winners == 1) & judged
    label_of = torch.full((len(groups),), -1, dtype=torch.long)
    win = (best == top[pair_group]) & decided[pair_group]
    label_of[pair_group[win]] = pair_keys[win, 1]
    # the share, softmax of -loss over the labels, in log space: exp(-loss) underflows
    # past a mean loss of ~745 (a diverged run), where a clear winner read as a tie
    total = torch.zeros(len(groups), dtype=torch.float64)
    total.index_add_(0, pair_group, torch.exp(top[pair_group] - best))
    share = torch.where(decided, 1 / total, torch.nan).float()
    rows = judged[gid]
    members, lab, gid = members[rows], lab[rows], gid[rows]
    group_label = label_of[gid]
    order = torch.argsort(members)
    return GroupDecision(
        members[order],
        ((lab == group_label) & (group_label >= 0))[order],
        group_label[order],
        share[gid][order],
    )


def duplicate_decisions(
    source: Any,
    score: str | None,
    inputs: Any,
    labels: Any,
    detection: Detection,
) -> tuple[Detection | None, GroupDecision | None]:
    """For :func:`csl_fast.clean`: the duplicate detection a plan merges (None without
    ``inputs``) and, with ``labels``, the decision of every member of its conflicting
    groups.

    With ``labels``: :func:`csl_fast.detect.duplicates`' exact rule (every conflicting
    group). Without: the groups holding a sample that ``detection`` flags, whole (what
    ``duplicates`` does with ``inputs`` only, here with the plan's own flagged set)."""
    n = int(detection.scores.numel())
    if inputs is None:
        if labels is not None:
            raise ValueError(
                "csl_fast.clean: labels= needs inputs= (the identical-input groups whose "
                "labels are compared)"
            )
        return None, None
    # inputs and labels alike: a tensor, a NumPy array or a (nested) list
    inputs = dg.as_rows("csl_fast.clean", "inputs", inputs)
    lab = None
    if labels is not None:
        lab = dg.as_rows("csl_fast.clean", "labels", labels).detach().cpu()
        if targets_not_classes(source, lab):
            return _target_decisions(source, score, inputs, lab, n)
        if lab.dim() != 1:
            raise ValueError(
                f"csl_fast.clean: labels must be int [N] = [{n}] class indices, got "
                f"{lab.dtype} of shape {tuple(lab.shape)}"
            )
        dg.check_class_labels("csl_fast.clean", lab, getattr(source, "num_classes", None))
        lab = int64_labels("csl_fast.clean", lab)
    dg.check_rows(n, inputs, lab)
    if lab is None:
        # (the plan's rows are its flagged samples and these groups' members)
        return carry_to_groups(detection, dg.group_ids(inputs)), None
    dup = duplicates(source, score, inputs=inputs, labels=lab)
    return dup, resolve_conflicts(dup.groups, lab, _mean_loss(source))


def targets_not_classes(source: Any, labels: torch.Tensor) -> bool:
    """Whether ``labels`` (a tensor, one row per sample) are targets to compare rather than
    one class per sample to relabel with: always for a run of sequences (a label per
    token; ``[N]`` labels there named a class no sample has), and for a run that recorded
    losses only (a regression, a multi-label run) unless they are 1-D integers, which are
    read as class labels (a classifier trained with a loss of its own, record_loss), a
    negative one unlabelled. One rule for :func:`csl_fast.clean` and the CLI: the plan was
    another for the same targets given another way."""
    from .cleaning import no_suggestions
    from .scores import LOSS_ONLY

    if getattr(source, "sequences", False):  # a tracker, or csl_fast.scores of one
        return True
    return not class_indices(labels) and no_suggestions(source) == LOSS_ONLY


def _target_decisions(
    source: Any, score: str | None, inputs: torch.Tensor, targets: torch.Tensor, n: int
) -> tuple[Detection, GroupDecision]:
    """:func:`duplicate_decisions` for targets (:func:`targets_not_classes`): a regression's
    values, a multi-label run's rows, a sequence's token labels. In each conflicting group
    the measured members are taken from the best fitted (the lowest mean loss) on, each
    kept when its target agrees with every member kept before it (by
    :func:`duplicate_groups.agree`, the rule that found the conflict: a masked token, a
    negative label, agrees with any), then the unmeasured ones alike; the others are
    dropped, having no class to be relabelled to (group label -1). Against every kept
    member, not the best one alone: a best member with a masked token agreed with two
    members that conflict with each other, and both were kept. A group where no measured
    member is dropped, or whose equally best members disagree, decides nothing (its
    members keep the score's plan), whatever the dataset order.

    The share (the row's confidence) is the best member's weight in a softmax of ``-loss``
    over it and the measured members dropped."""
    dg.check_rows(n, inputs, targets)
    dup = duplicates(source, score, inputs=inputs, labels=targets)
    loss = _mean_loss(source)
    index, keep, share = [], [], []
    for group in dup.groups:
        members = torch.tensor(group, dtype=torch.long)
        measured = torch.isfinite(loss[members])
        if not bool(measured.any()):
            continue
        # measured first, from the lowest loss (a stable sort: ties by dataset index)
        key = torch.where(measured, loss[members], math.inf)
        order = members[torch.sort(key, stable=True).indices]
        kept: list[int] = []
        for i in order.tolist():
            if not kept or bool(
                dg.agree(targets, torch.full((len(kept),), i), torch.tensor(kept)).all()
            ):
                kept.append(i)
        kept_set = set(kept)
        best = float(key.min())
        dropped = [i for i in group if i not in kept_set and math.isfinite(float(loss[i]))]
        tied_out = any(float(loss[i]) == best for i in dropped)
        if not dropped or tied_out:
            continue
        # in log space, as resolve_conflicts': exp(-loss) underflows past ~745
        total = 1 + sum(math.exp(best - float(loss[i])) for i in dropped)
        index += group
        keep += [i in kept_set for i in group]
        share += [1 / total] * len(group)
    order = torch.argsort(torch.tensor(index, dtype=torch.long))
    return dup, GroupDecision(
        torch.tensor(index, dtype=torch.long)[order],
        torch.tensor(keep, dtype=torch.bool)[order],
        torch.full((len(index),), -1, dtype=torch.long),
        torch.tensor(share, dtype=torch.float32)[order],
    )


def _mean_loss(source: Any) -> torch.Tensor:
    """Each sample's mean training loss; for a sample never trained on (held out, or a run
    of eval passes alone), its mean eval-pass loss where an eval pass scored it (NaN
    otherwise; a scores mapping other than :func:`csl_fast.scores`' has no eval mean)."""
    from .scores import Scores
    from .tracker import CSLTracker

    if isinstance(source, CSLTracker):
        train, evals = source.csl_mean, source.eval_csl_mean
    elif isinstance(source, Mapping) and "csl_mean" in source:
        train = torch.as_tensor(source["csl_mean"])
        evals = torch.full_like(train, math.nan)
        counts = getattr(source, "eval_count", None)  # (absent: pickled before it was kept)
        if isinstance(source, Scores) and "eval_csl" in source and counts is not None:
            evals = source["eval_csl"] / counts
    else:
        raise ValueError(
            "csl_fast.clean: resolving conflicting duplicates needs each sample's mean loss: "
            "pass the tracker (or csl_fast.scores(tracker)) as source"
        )
    # the eval pass measured what the network says of a held-out member; ignored, its
    # trained twin's label won unopposed (kept although the network rejected it)
    mean = torch.where(torch.isfinite(train), train, evals)
    return mean.detach().cpu().double()
