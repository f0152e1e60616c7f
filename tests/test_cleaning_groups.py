"""Conflicting duplicates in a cleaning plan (csl_fast.cleaning_groups, csl_fast.clean with
inputs= and labels=): the group's label, keep / relabel / drop, the CSV, and what is never
flagged (duplicates that share a label)."""

from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest
import torch

import csl_fast
from csl_fast import clean, detect
from csl_fast.cleaning_groups import resolve_conflicts
from csl_fast.duplicate_groups import conflicting

N = 12


def _setup():
    """Twelve samples with distinct inputs except: 2 and 7 identical with labels 1 / 4
    (a conflict; 7 has the lower mean loss, so 4 is the group's label), 3 and 9 identical
    with the same label 2 (benign), and 5, 6, 10 identical with labels 0 / 0 / 3 (a
    conflict won by label 0 through sample 6)."""
    x = torch.arange(N * 3, dtype=torch.float32).reshape(N, 3)
    x[7] = x[2]
    x[9] = x[3]
    x[6] = x[5]
    x[10] = x[5]
    y = torch.tensor([0, 1, 1, 2, 3, 0, 0, 4, 1, 2, 3, 2])
    y[9] = y[3]
    csl_mean = torch.tensor([0.1, 0.2, 2.0, 0.1, 0.3, 1.0, 0.4, 0.5, 0.2, 0.1, 1.5, 0.3])
    # high CSL for the conflicting members; the benign pair's CSL is the lowest
    csl = csl_mean * 10
    csl[3] = csl[9] = 0.01
    scores = {"csl": csl, "csl_mean": csl_mean}
    sugg_label = torch.tensor([-1, -1, 4, -1, -1, 3, 3, 1, -1, -1, 0, -1])
    sugg_conf = torch.where(sugg_label >= 0, torch.tensor(0.9), torch.tensor(math.nan))
    return x, y, scores, (sugg_label, sugg_conf)


def test_resolve_conflicts_group_label_share_and_ties():
    y = torch.tensor([1, 4, 0, 0, 3, 5, 6])
    loss = torch.tensor([2.0, 0.5, 1.0, 0.4, 1.5, 0.7, 0.7])
    dec = resolve_conflicts([[0, 1], [2, 3, 4], [5, 6]], y, loss)
    assert dec.index.tolist() == [0, 1, 2, 3, 4, 5, 6]
    assert dec.keep.tolist() == [False, True, True, True, False, False, False]
    # group [5, 6]: an exact tie, no label; the others: the lowest mean loss wins
    assert dec.group_label.tolist() == [4, 4, 0, 0, 0, -1, -1]
    p = torch.exp(-loss.double())
    assert dec.share[0] == pytest.approx(float(p[1] / (p[0] + p[1])), rel=1e-6)
    # label 0's best member (3) against label 3's (4); the worse 0 (2) does not count
    assert dec.share[2] == pytest.approx(float(p[3] / (p[3] + p[4])), rel=1e-6)
    assert math.isnan(dec.share[5]) and math.isnan(dec.share[6])


def test_resolve_conflicts_share_survives_huge_mean_losses():
    # exp(-loss) underflows past ~745: the share read 1e-4 and [750, 900] as a tie
    for loss in ([700.0, 900.0], [750.0, 900.0]):
        dec = resolve_conflicts([[0, 1]], torch.tensor([0, 1]), torch.tensor(loss))
        assert dec.group_label.tolist() == [0, 0]
        assert dec.share.tolist() == pytest.approx([1.0, 1.0])


def test_resolve_conflicts_leaves_out_groups_with_one_measured_label_and_empty():
    # label 2 never measured: label 3 won with share 1.0, as if the network had rejected 2
    for loss in ([math.nan, 0.3], [math.nan, math.nan]):
        dec = resolve_conflicts([[0, 1]], torch.tensor([2, 3]), torch.tensor(loss))
        assert dec.index.numel() == 0
    # a triple with two labels measured: the share is over those two
    loss = torch.tensor([0.1, 2.0, math.nan])
    dec = resolve_conflicts([[0, 1, 2]], torch.tensor([0, 1, 2]), loss)
    assert dec.group_label.tolist() == [0, 0, 0] and dec.keep.tolist() == [True, False, False]
    assert dec.share[0] == pytest.approx(1 / (1 + math.exp(0.1 - 2.0)), rel=1e-6)
    assert resolve_conflicts([], torch.tensor([1]), torch.tensor([0.0])).index.numel() == 0


def _held_out_twin(eval_pass: bool):
    """Sample 0 (label 0) trained, its copy 5 (label 1) held out; the network gives the
    input class 1 at p = 0.98 (label 0 is wrong)."""
    x = torch.eye(6)
    x[5] = x[0]
    y = torch.tensor([0, 1, 2, 1, 0, 1])
    model = torch.nn.Linear(6, 3, bias=False)
    with torch.no_grad():
        model.weight.zero_()
        model.weight[1, 0] = 5.0
        for i in range(1, 5):
            model.weight[y[i], i] = 5.0
    tracker = csl_fast.CSLTracker(6, 3)
    trained = torch.arange(5)
    for _ in range(2):
        csl_fast.accumulate(model(x[trained]), y[trained], trained, tracker)
        tracker.end_epoch()
    if eval_pass:
        csl_fast.score_epoch(model, [(x, y, torch.arange(6))], tracker)
    return tracker, x, y


def _rows(plan):
    return {r["index"]: (r["action"], r["suggested_label"]) for r in plan.rows()}


def test_held_out_member_votes_with_its_eval_pass_loss():
    tracker, x, y = _held_out_twin(eval_pass=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = clean(tracker, inputs=x, labels=y)
    # sample 0 was kept at confidence 1.0: its twin's eval-pass loss was ignored
    assert _rows(plan) == {0: ("relabel", 1), 5: ("drop", 1)}
    assert float(plan.confidence[0]) == pytest.approx(0.99, abs=0.01)


def test_group_with_one_measured_label_keeps_the_per_sample_plan():
    tracker, x, y = _held_out_twin(eval_pass=False)
    det = csl_fast.detect.mislabeled(tracker, rule="fraction", fraction=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alone = clean(tracker, detection=det)
        plan = clean(tracker, detection=det, inputs=x, labels=y)
    # the inputs turned sample 0's relabel to 1 into a keep at share 1.0
    assert _rows(alone)[0] == ("relabel", 1)
    assert _rows(plan) == _rows(alone)
    assert plan.duplicates.groups == [[0, 5]]


def test_conflicting_pair_flagged_and_acted_on_benign_pair_never():
    x, y, scores, sugg = _setup()
    det = detect.mislabeled(scores["csl"], rule="fraction", fraction=0.0)  # flags nothing
    plan = clean(scores, detection=det, suggestions=sugg, inputs=x, labels=y)
    assert plan.duplicates is not None and plan.duplicates.rule == "auto(label_conflict)"
    rows = {r["index"]: r for r in plan.rows()}
    assert set(rows) == {2, 7, 5, 6, 10}  # both conflicting groups, whole; not 3 and 9
    assert rows[7]["action"] == "keep" and rows[7]["suggested_label"] == 4
    # the other member: relabelled to the group's label, not to its own suggestion (4 here
    # too) -- and in the 3-member group, 10's own suggestion (0) agrees by chance
    assert rows[2]["action"] == "relabel" and rows[2]["suggested_label"] == 4
    assert [rows[i]["action"] for i in (5, 6, 10)] == ["keep", "keep", "relabel"]
    assert all(rows[i]["suggested_label"] == 0 for i in (5, 6, 10))
    assert 0.5 < rows[7]["confidence"] <= 1
    keep, labels = plan.apply(y)
    assert keep.tolist() == list(range(N))  # nothing dropped
    assert labels[2] == 4 and labels[7] == 4 and labels[10] == 0 and labels[3] == labels[9]
    assert (plan.num_kept, plan.num_relabeled, plan.num_dropped) == (3, 2, 0)


def test_group_decision_overrides_the_per_sample_action_and_drop_policy():
    x, y, scores, sugg = _setup()
    # the mislabeled rule flags the top 3 by CSL: 2 (conflict), 10 (conflict), 5 (conflict)
    det = detect.mislabeled(scores["csl"], rule="fraction", fraction=0.25)
    assert set(det.indices.tolist()) == {2, 10, 5}
    plan = clean(scores, detection=det, suggestions=sugg, inputs=x, labels=y)
    rows = {r["index"]: r for r in plan.rows()}
    assert rows[5]["action"] == "keep"  # its own suggestion (3, confident) would relabel it
    assert [r["rank"] for r in plan.rows()] == sorted(r["rank"] for r in plan.rows())
    dropped = clean(scores, detection=det, policy="drop", inputs=x, labels=y)
    assert set(dropped.actions) == {"drop"} and len(dropped) == 5
    assert dropped.suggested_label[dropped.index == 7].item() == 4  # still shown


def test_without_inputs_the_plan_is_unchanged_and_csv_writes_keep(tmp_path):
    x, y, scores, sugg = _setup()
    det = detect.mislabeled(scores["csl"], rule="fraction", fraction=0.25)
    plain = clean(scores, detection=det, suggestions=sugg)
    assert plain.duplicates is None and plain.num_kept == 0
    assert plain.index.tolist() == det.indices.tolist()
    plan = clean(scores, detection=det, suggestions=sugg, inputs=x, labels=y)
    path = tmp_path / "plan.csv"
    plan.to_csv(path)
    with open(path, newline="") as f:
        got = {int(r["index"]): r for r in csv.DictReader(f)}
    assert got[7]["action"] == "keep" and got[7]["suggested_label"] == "4"
    assert got[2]["action"] == "relabel"


def test_inputs_only_report_the_groups_and_add_no_member():
    """Without labels, the unflagged member of a group holding a flagged sample was added
    with its own suggestion (here 7's, the partner's label): an audit's cleaned set then
    held more wrong labels than with no inputs at all. Now the groups are reported only."""
    x, _, scores, sugg = _setup()
    det = detect.mislabeled(scores["csl"], rule="fraction", fraction=0.05)  # 2 only
    plan = clean(scores, detection=det, suggestions=sugg, inputs=x)
    assert plan.index.tolist() == [2] and plan.num_kept == 0
    assert plan.duplicates is not None and plan.duplicates.groups == [[2, 7]]
    assert plan.duplicates.rule.endswith("+groups")


def test_a_duplicates_detection_needs_the_labels_to_be_cleaned():
    """clean(detection=duplicates(inputs=, labels=)) without labels= gave each member of a
    conflicting group its own suggestion, the method cleaning_groups rejects."""
    x, y, scores, sugg = _setup()
    dup = detect.duplicates(scores, inputs=x, labels=y)
    assert dup.groups
    with pytest.raises(ValueError, match="pass inputs= and labels= instead"):
        clean(scores, detection=dup, suggestions=sugg)


def test_bad_arguments():
    x, y, scores, sugg = _setup()
    det = detect.mislabeled(scores["csl"], rule="fraction", fraction=0.1)
    with pytest.raises(ValueError, match="labels= needs inputs="):
        clean(scores, detection=det, suggestions=sugg, labels=y)
    # complex labels met torch's "min_all not implemented for ComplexFloat"
    for bad in (y.float(), y.to(torch.complex64)):
        with pytest.raises(ValueError, match="labels must be int"):
            clean(scores, detection=det, suggestions=sugg, inputs=x, labels=bad)
    with pytest.raises(ValueError, match="one row per sample"):
        clean(scores, detection=det, suggestions=sugg, inputs=x[:5], labels=y)
    with pytest.raises(ValueError, match="mean loss"):
        clean(scores["csl"], detection=det, suggestions=sugg, inputs=x, labels=y)


def test_labels_outside_the_classes_are_refused():
    # a conflicting group was relabelled to its preferred label whatever it was: labels
    # with a 99 in a 5-class run put "relabel to 99" in the plan
    import warnings

    import csl_fast

    x, y, scores, sugg = _setup()
    det = detect.mislabeled(scores["csl"], rule="fraction", fraction=0.25)
    bad = y.clone()
    bad[7] = -100  # unlabelled (ignore_index), as the run trained on it: never a group's label
    plan = clean(scores, detection=det, suggestions=sugg, inputs=x, labels=bad)
    assert bool((plan.suggested_label >= -1).all())
    tracker = csl_fast.CSLTracker(N, 5)
    csl_fast.accumulate(torch.randn(N, 5), y, torch.arange(N), tracker)
    bad[7] = 99
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        with pytest.raises(
            ValueError,
            match=r"class indices in \[0, 5\) \(or negative .*\), got values in \[0, 99\]",
        ):
            clean(tracker, inputs=x, labels=bad)
        assert clean(tracker, inputs=x, labels=y).keep.any()


def test_inputs_and_labels_take_arrays_and_lists_alike():
    # labels= took a NumPy array or a list, inputs= refused them ("must be a torch.Tensor")
    x, y, scores, sugg = _setup()
    det = detect.mislabeled(scores["csl"], rule="fraction", fraction=0.25)
    want = clean(scores, detection=det, suggestions=sugg, inputs=x, labels=y).rows()
    for inputs, labels in ((x.numpy(), y.numpy()), (x.tolist(), y.tolist()), (x.numpy(), y)):
        plan = clean(scores, detection=det, suggestions=sugg, inputs=inputs, labels=labels)
        assert plan.rows() == want
    # compact unsigned labels: torch has no min/max for uint16/uint32 (a crash, not a plan)
    for dtype in (np.uint16, np.uint32):
        plan = clean(
            scores, detection=det, suggestions=sugg, inputs=x, labels=y.numpy().astype(dtype)
        )
        assert plan.rows() == want
    with pytest.raises(TypeError, match="inputs must be a tensor, a NumPy array or a list"):
        clean(scores, detection=det, suggestions=sugg, inputs=[[1.0], [2.0, 3.0]], labels=y)


def test_an_unlabelled_member_takes_the_group_label():
    # a negative label (ignore_index) voted and won: the unlabelled sample was kept and the
    # labelled ones relabelled to -100
    labels = torch.tensor([1, -100, 2, 5, -1, -1])
    loss = torch.tensor([0.5, 0.01, 2.0, 0.3, 0.1, 0.2])
    d = resolve_conflicts([[0, 1, 2], [4, 5]], labels, loss)
    # (the second group, unlabelled alone, measures no label: no decision)
    assert d.index.tolist() == [0, 1, 2]
    assert d.group_label.tolist() == [1, 1, 1]
    assert d.keep.tolist() == [True, False, False]
    # clean(labels=) with tensor([c]) per sample, as a Dataset yields them
    x, y, scores, sugg = _setup()
    det = detect.mislabeled(scores["csl"], rule="fraction", fraction=0.25)
    want = clean(scores, detection=det, suggestions=sugg, inputs=x, labels=y).rows()
    rows = [torch.tensor([int(c)]) for c in y]
    assert clean(scores, detection=det, suggestions=sugg, inputs=x, labels=rows).rows() == want


def test_resolve_conflicts_refuses_mismatched_inputs():
    y, loss = torch.tensor([0, 1, 1]), torch.tensor([0.1, 0.2, 0.3])
    # IndexError from inside torch, or float labels truncated by .long()
    with pytest.raises(ValueError, match=r"indices in \[0, 3\)"):
        resolve_conflicts([[0, 5]], y, loss)
    with pytest.raises(ValueError, match=r"mean_loss must be \[N\] = \[3\]"):
        resolve_conflicts([[0, 1]], y, loss[:2])
    with pytest.raises(ValueError, match="labels must be int"):
        resolve_conflicts([[0, 1]], y.float() + 0.5, loss)


def test_a_never_presented_member_is_dropped_as_apply_leaves_it_out():
    """Sample 7 (identical to 2, another label) was never trained on: its row said
    relabel, while apply left it out of the cleaned set (it says nothing about it). An eval
    pass measured it (without one its group has one measured label and decides nothing)."""
    import csl_fast

    x, y, _, _ = _setup()
    tracker = csl_fast.CSLTracker(N, num_classes=5)
    seen = torch.tensor([i for i in range(N) if i != 7])
    for _ in range(3):
        logits = 4 * torch.nn.functional.one_hot(y[seen], 5).float()
        csl_fast.accumulate(logits, y[seen], seen, tracker)
        tracker.end_epoch()
    logits = 4 * torch.nn.functional.one_hot(y, 5).float()
    logits[7] = logits[2]  # the model sides with 2
    csl_fast.score_epoch(torch.nn.Identity(), [(logits, y, torch.arange(N))], tracker)
    with pytest.warns(UserWarning, match="never presented"):
        warnings.simplefilter("ignore", detect.DetectionWarning)  # (11 scores: no rule)
        plan = clean(tracker, inputs=x, labels=y)
        keep, _ = plan.apply(y)
    # the rule flagged nothing; the rows are the group's (not "nothing flagged" alone)
    assert plan.warning.startswith("the plan's rows are the members of conflicting")
    assert "nothing flagged" in plan.warning
    rows = {r["index"]: r for r in plan.rows()}
    assert rows[7]["action"] == "drop" and rows[7]["suggested_label"] == 1  # the group's
    assert rows[2]["action"] == "keep"
    assert 7 not in keep.tolist()
    # every row the plan keeps or relabels is in the cleaned set
    kept = set(keep.tolist())
    assert all(r["index"] in kept for r in plan.rows() if r["action"] != "drop")


def test_a_run_of_eval_passes_alone_resolves_its_groups_by_the_eval_loss():
    """Without training every member's mean loss was NaN: every conflicting group was
    undecided and all its members dropped."""
    import csl_fast

    x, y, _, _ = _setup()
    tracker = csl_fast.CSLTracker(N, num_classes=5)
    logits = 4 * torch.nn.functional.one_hot(y, 5).float()
    logits[7] = 4 * torch.nn.functional.one_hot(y[2], 5).float()  # the model sides with 2
    csl_fast.score_epoch(torch.nn.Identity(), [(logits, y, torch.arange(N))], tracker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        # (eval passes cast no suggested-label votes: the relabelling policy is refused)
        with pytest.raises(ValueError, match="this run has eval passes only"):
            clean(tracker, score="eval_csl", inputs=x, labels=y, policy="relabel-confident")
        plan = clean(tracker, score="eval_csl", inputs=x, labels=y, policy="review", budget=N)
    rows = {r["index"]: r for r in plan.rows()}
    assert rows[2]["action"] == "keep"
    assert rows[7]["action"] == "relabel" and rows[7]["suggested_label"] == int(y[2])


def test_scores_of_a_run_give_the_tracker_plan_for_a_held_out_member():
    # from csl_fast.scores the held-out copy had no eval mean and no presence: its group
    # decided nothing, or (measured) it got a keep row that apply kept
    tracker, x, y = _held_out_twin(eval_pass=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = clean(tracker, inputs=x, labels=y)
        plan = clean(
            csl_fast.scores(tracker), suggestions=tracker.suggestions(), inputs=x, labels=y
        )
        keep, _ = plan.apply(y)
    assert _rows(plan) == _rows(want) == {0: ("relabel", 1), 5: ("drop", 1)}
    assert 5 not in keep.tolist()
    assert plan.drop_reasons()["unseen"].tolist() == [False, True]


def test_an_unlabelled_member_is_dropped_through_clean_as_never_presented():
    # what resolve_conflicts' docstring says of an ignore_index member through clean
    x = torch.tensor([[0.0], [1.0], [0.0], [0.0]])
    y = torch.tensor([0, 1, 1, -100])
    logits = torch.tensor([[0.0, 3.0], [0.0, 3.0], [0.0, 3.0], [0.0, 3.0]])
    tracker = csl_fast.CSLTracker(4, 2)
    for _ in range(2):
        csl_fast.accumulate(logits, y, torch.arange(4), tracker)
        tracker.end_epoch()
    assert tracker.csl_count[3] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = clean(tracker, inputs=x, labels=y)
    assert _rows(plan)[3] == ("drop", 1)
    assert plan.drop_reasons()["unseen"][plan.index.tolist().index(3)]


def test_policy_drop_takes_a_group_with_one_label_measured_whole():
    # a group left undecided (its held-out member unmeasured) fell to the per-sample
    # plan under policy='drop' too: its trained member was kept with its conflicting label
    n, c = 12, 3
    y = torch.arange(n) % c
    inputs = torch.randn(n, 5, generator=torch.Generator().manual_seed(1))
    inputs[11] = inputs[0]
    given = y.clone()
    given[11] = (y[0] + 1) % c
    t = csl_fast.CSLTracker(n, c)
    trained = torch.arange(11)  # sample 11 held out, no eval pass
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = torch.randn(11, c, generator=g) + 3 * torch.nn.functional.one_hot(given[:11], c)
        csl_fast.accumulate(logits, given[:11], trained, t)
        t.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = clean(t, policy="drop", inputs=inputs, labels=given, rule="fraction", fraction=0.1)
        kept, _ = plan.apply(given)
    assert {0, 11} <= set(plan.index.tolist()) and not plan.relabel.any()
    assert 0 not in kept.tolist()


def test_a_scores_mapping_pickled_before_it_kept_eval_counts_is_cleaned():
    t = csl_fast.CSLTracker(12, 3)
    for _ in range(3):
        csl_fast.accumulate(torch.randn(12, 3), torch.arange(12) % 3, torch.arange(12), t)
        t.end_epoch()
    s = csl_fast.scores(t)
    del s.eval_count  # (as an older pickle loads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = clean(s, policy="drop", rule="fraction", fraction=0.25)
    assert len(plan) == 3


def _sequence_run(targets: torch.Tensor, fitted: dict[int, float]) -> csl_fast.CSLTracker:
    """A tracker of sequences over ``targets`` [N, T] whose logits favour each sample's own
    tokens by ``fitted[i]`` (default 0: chance), for three epochs."""
    n, t = targets.shape
    gen = torch.Generator().manual_seed(0)
    tracker = csl_fast.CSLTracker(n, 5)
    for _ in range(3):
        logits = torch.randn(n, t, 5, generator=gen) * 0.1
        for i, margin in fitted.items():
            logits[i] += margin * torch.nn.functional.one_hot(targets[i].clamp(min=0), 5)
        csl_fast.accumulate(logits.flatten(0, 1), targets, torch.arange(n), tracker)
        tracker.end_epoch()
    return tracker


def _actions(plan) -> dict[int, str]:
    return dict(zip(plan.index.tolist(), plan.actions, strict=True))


def test_targets_agreeing_where_both_label_are_kept_with_the_best_fitted_member():
    """Three copies of one sequence: 4 masks its prompt, 9 labels it and agrees with 4
    everywhere both label, 10 conflicts. detect.duplicates says 4 and 9 agree; clean
    compared whole rows and dropped 9 with 10."""
    targets = torch.randint(0, 5, (12, 4), generator=torch.Generator().manual_seed(1))
    targets[9] = targets[4]
    targets[4, 0] = -100
    targets[10] = (targets[9] + 1) % 5
    x = torch.randn(12, 3)
    x[9] = x[10] = x[4]
    tracker = _sequence_run(targets, {4: 6.0, 9: 3.0})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = clean(tracker, inputs=x, labels=targets, policy="review", budget=12)
        assert {i: a for i, a in _actions(plan).items() if i in (4, 9, 10)} == {
            4: "keep",
            9: "keep",
            10: "drop",
        }
        # [N] integer labels of a run of sequences are no class to relabel to either
        plan = clean(tracker, inputs=x, labels=targets[:, 1], policy="review", budget=12)
        assert plan.relabel.sum() == 0 and _actions(plan)[10] == "drop"
        # csl_fast.scores of the run: its [N, T] labels were refused as "int [N]"
        plan = clean(csl_fast.scores(tracker), inputs=x, labels=targets, policy="drop")
        assert {4, 9, 10} <= set(plan.index.tolist())


def test_regression_targets_of_zero_and_minus_zero_agree():
    """-0.0 and 0.0 are one target (the same loss and gradient): as bits they conflicted,
    and clean dropped one of two identical samples that agreed."""
    n = 10
    tracker = csl_fast.CSLTracker(n)
    for _ in range(2):
        csl_fast.record_loss(torch.linspace(0.5, 1.5, n), torch.arange(n), tracker)
        tracker.end_epoch()
    x = torch.randn(n, 3)
    x[9] = x[4]
    y = torch.linspace(-1, 1, n)
    y[4], y[9] = -0.0, 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert detect.duplicates(tracker, inputs=x, labels=y).groups == []
        y[9] = 0.5
        assert detect.duplicates(tracker, inputs=x, labels=y).groups == [[4, 9]]


def test_evaluate_plan_judges_a_member_kept_with_its_own_target_by_the_ground_truth():
    """A group of targets has no label: its kept member keeps its given target, right
    unless `mislabeled` marks it. It was compared with the group label -1 and counted
    wrong."""
    from csl_fast.cleaning import evaluate_plan

    n = 10
    tracker = csl_fast.CSLTracker(n)
    loss = torch.ones(n)
    loss[9] = 0.1  # the member the network fits
    for _ in range(2):
        csl_fast.record_loss(loss, torch.arange(n), tracker)
        tracker.end_epoch()
    x = torch.randn(n, 3)
    x[9] = x[4]
    y = torch.arange(n, dtype=torch.float32)
    truth = y.long()
    truth[4] = 9  # 4 carries the wrong target
    mislabeled = y.long() != truth
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = clean(tracker, inputs=x, labels=y, policy="review", budget=n)
    assert _actions(plan)[9] == "keep" and _actions(plan)[4] == "drop"
    got = evaluate_plan(plan, truth, mislabeled)
    assert got["keep_correct"] == got["kept"] == n - 1


@pytest.mark.parametrize("swap", [False, True])
def test_the_kept_targets_never_conflict_whatever_the_order(swap):
    """A best member with a masked token ([1, -100]) agrees with [1, 2] and with [1, 3],
    which conflict: both were kept, and which member went on a tie depended on the rows'
    order. Now each kept member agrees with every other kept one."""
    targets = torch.tensor([[1, -100], [1, 2], [1, 3], [2, 2], [0, 0]])
    loss = torch.tensor([0.1, 0.1, 0.5, 1.0, 0.2])
    if swap:  # the two equally best rows in the other order
        targets[[0, 1]] = targets[[1, 0]]
    tracker = csl_fast.CSLTracker(5)
    for _ in range(2):
        csl_fast.record_loss(loss, torch.arange(5), tracker)
        tracker.end_epoch()
    x = torch.zeros(5, 2)
    x[4] = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = clean(tracker, inputs=x, labels=targets, policy="review", budget=5)
    actions = _actions(plan)
    assert [actions[i] for i in range(4)] == ["keep", "keep", "drop", "drop"]
    kept = [i for i in range(4) if actions[i] == "keep"]
    assert not bool(conflicting(torch.zeros(len(kept), dtype=torch.long), targets[kept]).any())
