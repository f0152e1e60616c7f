"""The report's flagged-set, composition, suggestion and retrain sections
(csl_fast/report_cleaning.py) against csl_fast.detect and csl_fast.clean on the same run."""

from __future__ import annotations

import copy
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import csl_fast
from csl_fast import detect
from csl_fast.report import RunSamples, write_report
from csl_fast.report_cleaning import format_retrain_table

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def test_format_retrain_table_gain():
    text = format_retrain_table({"noisy": 0.90, "cleaned": 0.95, "ceiling": 1.0}, 200, "note")
    lines = text.splitlines()
    assert lines[0] == "clean-test accuracy on 200 held-out samples"
    assert lines[1].endswith("0.9000") and "noisy" in lines[1]
    assert lines[2].endswith("0.9500") and "cleaned" in lines[2]
    assert lines[3].endswith("1.0000") and "ceiling" in lines[3]
    assert lines[4] == "  cleaning: +5.0 points (50% of the gap to the ceiling)"
    assert lines[5] == "note"
    worse = format_retrain_table({"noisy": 0.9, "cleaned": 0.88, "ceiling": 0.98}, 100)
    assert "-2.0 points (-25% of the gap" in worse
    # one held-out sample of gap: "-8.0 points (-4233% of the gap to the ceiling)"
    tiny = format_retrain_table({"noisy": 0.9, "cleaned": 0.82, "ceiling": 0.9019}, 530)
    assert "-8.0 points (the gap to the ceiling is 1 held-out sample(s), too few" in tiny
    no_gap = format_retrain_table({"noisy": 0.9, "cleaned": 0.9, "ceiling": 0.9}, 10)
    assert "no gap to close" in no_gap
    assert "gap" not in format_retrain_table({"noisy": 0.9}, 10)


@pytest.fixture(scope="module")
def run():
    """A tiny tracked run on separable blobs with 8% flipped labels."""
    gen = torch.Generator().manual_seed(0)
    n, c = 300, 4
    y_true = torch.arange(n) % c
    x = torch.randn(n, 8, generator=gen) * 0.6
    x[torch.arange(n), y_true] += 3.0
    noisy, flipped = csl_fast.corrupt.flip_labels(y_true, 0.08, c, seed=0)
    tracker = csl_fast.CSLTracker(n, c)
    model = csl_fast.train.mlp(8, c, (64, 64), seed=0)
    csl_fast.train.train(
        model, x, noisy, epochs=40, lr=3e-3, optimizer="adam", batch_size=64, tracker=tracker
    )
    samples = RunSamples(
        labels=noisy,
        true_labels=y_true,
        mislabeled=flipped,
        duplicate=torch.zeros(n, dtype=torch.bool),
    )
    return tracker, samples


def _table_after(page: str, heading: str) -> dict[str, str]:
    start = page.index(f"<h2>{heading}")
    table = page[start : page.index("</table>", start)]
    cells = re.findall(r"<tr><td class=l>(.*?)</td><td>(.*?)</td></tr>", table)
    return {k.replace("&gt;", ">"): v for k, v in cells}


def test_sections_match_detect_and_clean(run, tmp_path):
    tracker, samples = run
    path = write_report(tracker, tmp_path, samples)
    page = Path(path).read_text(encoding="utf-8")
    assert (tmp_path / "flagging.png").stat().st_size > 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)  # the rule's, if any
        det = detect.mislabeled(tracker)
    flagged = det.flagged.numpy()
    mis = samples.mislabeled
    made_of = _table_after(page, "What the flagged set is made of")
    assert made_of["flagged"] == str(int(flagged.sum()))
    assert made_of["flipped labels among them"] == str(int((flagged & mis).sum()))
    assert made_of["clean samples"] == str(int((flagged & ~mis).sum()))
    if flagged.any():
        assert float(made_of["precision (corrupted / flagged)"]) == pytest.approx(
            (flagged & mis).sum() / flagged.sum(), abs=5e-4
        )
    plan = csl_fast.clean(tracker, detection=det)
    sugg = _table_after(page, "Suggested labels")
    assert sugg["flagged samples"] == str(len(plan))
    relabel_key = next(k for k in sugg if k.startswith("relabel ("))
    assert sugg[relabel_key] == str(plan.num_relabeled)
    assert sugg["drop (no confident suggestion)"] == str(plan.num_dropped)
    label = tracker.suggestions()[0].numpy()
    right = int((label[mis] == samples.true_labels[mis]).sum())
    key = next(k for k in sugg if k.startswith("flipped samples whose suggestion"))
    assert sugg[key].startswith(f"{right} (")
    # the rule's estimate is printed beside the flagged set
    if det.estimated_count is not None:
        bound = " at least" if det.diagnostics.get("count") == "lower bound" else ""
        assert f"Estimated{bound} {det.estimated_count} bad samples (" in page


def test_sections_without_ground_truth(run, tmp_path):
    tracker, _ = run
    page = Path(write_report(tracker, tmp_path)).read_text(encoding="utf-8")
    assert "Needs the ground truth" in page
    sugg = _table_after(page, "Suggested labels")
    assert "relabels that give the true label" not in sugg
    assert int(sugg["flagged samples"]) == len(detect.mislabeled(tracker))
    # the caption said "the class the model ranked second most often", which is not what
    # tracker.suggestions() returns
    assert "predicted most often while it disagreed with the given label" in page


def test_retrain_note_in_demo_results(tmp_path, capsys):
    """The demo's clean-and-retrain numbers: the report note, results.json and a recomputed
    cleaning plan agree."""
    import json

    from csl_fast import demo

    out = tmp_path / "run"
    cfg = demo.DemoConfig(
        samples=300, epochs=6, pairs=3, hidden=64, overhead_rounds=0, out=str(out), quiet=True
    )
    results = demo.run(cfg)
    printed = capsys.readouterr().out
    cleaning = results["cleaning"]
    acc = cleaning["accuracy"]
    assert cleaning["test_size"] == 1797 - 300
    assert set(acc) == {"noisy", "cleaned", "ceiling"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["cleaning"]["accuracy"] == pytest.approx(acc)
    note = dict(on_disk["report_notes"])["Clean and retrain"]
    assert f"{acc['cleaned']:8.4f}" in note and f"{acc['ceiling']:8.4f}" in note
    assert "Clean and retrain" in printed
    # clean.csv is the plan csl-fast clean writes for the same run: the mislabeled rule's
    # flagged set and the conflicting duplicates, with the inputs samples.npz keeps
    tracker = csl_fast.CSLTracker.from_file(out / "tracker.csl")
    z = np.load(out / "samples.npz")
    assert {"labels", "true_labels", "mislabeled", "duplicate", "inputs"} <= set(z.files)
    inputs, labels = torch.from_numpy(z["inputs"]), torch.from_numpy(z["labels"])
    assert inputs.shape == (300, 64)
    plan = csl_fast.clean(tracker, inputs=inputs, labels=labels)
    rows = (out / "clean.csv").read_text().splitlines()
    assert len(rows) == len(plan) + 1
    assert cleaning["relabeled"] == plan.num_relabeled
    assert cleaning["kept"] == 300 - plan.num_dropped
    # every injected pair is a conflicting group: flagged whole, one member kept
    dup = results["flagged_duplicates"]
    assert dup == {"rule": "auto(label_conflict)", "count": 6, "groups": 3, "injected": 6}
    assert cleaning["duplicates_kept"] == plan.num_kept == 3
    assert sum(",keep," in r for r in rows) == 3
    assert re.search(
        r"Duplicates flagged without ground truth \(rule auto\(label_conflict\).*: 6 samples "
        r"in 3 groups; 6 of them injected duplicate-conflict samples \(precision 1\.00\), "
        r"100% of all 6 found",
        printed,
    )
    assert "3 kept (the member of a conflicting duplicate group" in printed


def test_format_retrain_table_refuses_unknown_arms():
    with pytest.raises(ValueError, match=r"unknown arms \['clean'\]"):  # was left out silently
        format_retrain_table({"noisy": 0.9, "clean": 0.95}, 10)


def _hist_bins(monkeypatch) -> list[np.ndarray]:
    import matplotlib.axes

    seen: list[np.ndarray] = []
    hist = matplotlib.axes.Axes.hist

    def spy(ax, x, bins, **kw):
        seen.append(np.asarray(bins))
        return hist(ax, x, bins, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "hist", spy)
    return seen


def test_flagged_bars_start_at_the_lowest_flagged_score(run, tmp_path, monkeypatch):
    # a bin across the rule's cut drew a red bar left of the dashed threshold line
    tracker, samples = run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        det = detect.mislabeled(tracker)
    assert len(det) > 0
    seen = _hist_bins(monkeypatch)
    write_report(tracker, tmp_path, samples)
    bins = seen[-1]  # flagging.png is drawn last, its flagged bars last
    assert float(det.scores[det.flagged].min()) in bins


def test_a_score_nan_everywhere_still_has_its_flagging_figure(run, tmp_path):
    # min() of no finite score raised ValueError: `csl-fast report` ended with a traceback
    tracker = copy.deepcopy(run[0])
    tracker.csl_sum.fill_(math.nan)
    page = Path(write_report(tracker, tmp_path)).read_text(encoding="utf-8")
    assert (tmp_path / "flagging.png").stat().st_size > 1000
    assert "0 flagged." in page and "<b>Warning:</b>" in page


def test_a_rule_that_declines_to_cut_prints_no_threshold(tmp_path):
    # the caption read "threshold inf", a number the rule never computed
    n = 2
    tracker = csl_fast.CSLTracker(n, 3)
    csl_fast.accumulate(torch.randn(n, 3), torch.arange(n), torch.arange(n), tracker)
    page = Path(write_report(tracker, tmp_path)).read_text(encoding="utf-8")
    assert "no threshold; 0 flagged." in page and "threshold inf" not in page


def test_a_plan_with_duplicates_is_not_called_the_flagged_set(run, tmp_path):
    # "flagged samples 142" (the plan: flagged set + conflicting groups) sat under
    # "flagged 123" (the score's flagged set) with nothing to tell them apart
    tracker, samples = run
    n = tracker.num_samples
    inputs = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    labels = torch.as_tensor(samples.labels).clone()
    inputs[1] = inputs[0]
    labels[1] = (labels[0] + 1) % 4
    page = Path(write_report(tracker, tmp_path, samples, inputs=inputs, labels=labels)).read_text(
        encoding="utf-8"
    )
    sugg = _table_after(page, "Suggested labels")
    plan = csl_fast.clean(tracker, inputs=inputs, labels=labels)
    assert "flagged samples" not in sugg
    assert sugg["samples in the plan (flagged by csl, or in a conflicting group)"] == str(len(plan))
    # a group's relabel is the group label's, apart from the suggestion-confidence relabels
    by_group = int((plan.relabel & plan.grouped).sum())
    assert by_group >= 1
    assert sugg["relabel to the label of its conflicting duplicate group"] == str(by_group)
    relabel_key = next(k for k in sugg if k.startswith("relabel (suggestion confidence"))
    assert sugg[relabel_key] == str(plan.num_relabeled - by_group)


def test_a_group_member_never_trained_on_is_dropped_for_that(tmp_path):
    # both tables put every drop down to "no confident suggestion" / "the group has no
    # label", also for a conflicting group's member that the run held out (its group had
    # a label: the member was dropped because it was never presented)
    pytest.importorskip("matplotlib")
    g = torch.Generator().manual_seed(0)
    n, c = 120, 3
    labels = torch.arange(n) % c
    inputs = torch.randn(n, 4, generator=g)
    inputs[n - 1] = inputs[0]
    labels[n - 1] = (labels[0] + 1) % c  # a conflicting pair, its second member held out
    tracker = csl_fast.CSLTracker(n, c)
    seen = torch.arange(n - 1)
    for epoch in range(8):
        logits = torch.randn(n - 1, c, generator=g)
        logits[seen, labels[seen]] += 1.0 + epoch
        csl_fast.accumulate(logits, labels[seen], seen, tracker)
        tracker.end_epoch()
    # an eval pass measures the held-out member (unmeasured, its group decides nothing)
    logits = 9.0 * torch.nn.functional.one_hot(labels, c).float()
    logits[n - 1] = logits[0]
    csl_fast.score_epoch(torch.nn.Identity(), [(logits, labels, torch.arange(n))], tracker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = Path(write_report(tracker, tmp_path, inputs=inputs, labels=labels)).read_text(
            encoding="utf-8"
        )
        plan = csl_fast.clean(tracker, inputs=inputs, labels=labels)
    assert plan.drop_reasons()["unseen"].tolist() == (plan.index == n - 1).tolist()
    sugg = _table_after(page, "Suggested labels")
    assert sugg["drop (never presented in training: nothing to relabel by)"] == "1"
    assert sugg["drop (its conflicting duplicate group has no label)"] == "0"
    assert sugg["drop (no confident suggestion)"] == str(plan.num_dropped - 1)
    groups = _table_after(page, "Duplicate groups")
    assert groups["csl_fast.clean: dropped (never presented in training)"] == "1"
    assert groups["csl_fast.clean: dropped (the group has no label)"] == "0"


def _identical_inputs_run(group_labels: list[int], group_logits: list[float]):
    """A 3-class run of 60 samples whose first ``len(group_labels)`` share one input and
    carry ``group_labels``, the network giving each of them ``group_logits`` (the others
    fitted at once): ``(tracker, inputs, labels)``."""
    n, c, k = 60, 3, len(group_labels)
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, c, (n,), generator=g)
    labels[:k] = torch.tensor(group_labels)
    inputs = torch.randn(n, 4, generator=g)
    inputs[1:k] = inputs[0]
    tracker = csl_fast.CSLTracker(n, c)
    for _ in range(5):
        logits = torch.full((n, c), -3.0)
        logits[torch.arange(n), labels] = 3.0
        logits[:k] = torch.tensor(group_logits)
        csl_fast.accumulate(logits, labels, torch.arange(n), tracker)
        tracker.end_epoch()
    return tracker, inputs, labels


def test_a_group_whose_label_has_too_small_a_share_is_said_so():
    # three identical inputs labelled 0, 1 and 2 that the network cannot tell apart: the
    # group has a label (0, share 0.36), and two members are dropped as its share is under
    # min_confidence; the row said "its conflicting duplicate group has no label"
    tracker, inputs, labels = _identical_inputs_run([0, 1, 2], [0.10, 0.0, -0.05])
    from csl_fast.report_cleaning import _suggestion_rows

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = detect.mislabeled(tracker)
        rows = dict(_suggestion_rows(tracker, det, None, inputs, labels))
        plan = csl_fast.clean(tracker, detection=det, inputs=inputs, labels=labels)
    assert plan.drop_reasons()["group share"].sum() == 2
    assert rows["drop (its group label's share is under 0.4)"] == "2"
    assert rows["drop (its conflicting duplicate group has no label)"] == "0"


def test_drop_reasons_under_policy_drop_name_the_policy():
    # a conflicting pair whose label (0, share 0.62) is confident was said dropped because
    # "its group label's share is under min_confidence"
    tracker, inputs, labels = _identical_inputs_run([0, 1], [0.5, 0.0, -0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = csl_fast.clean(tracker, policy="drop", inputs=inputs, labels=labels)
    why = plan.drop_reasons()
    assert plan.grouped.sum() == 2 and why["suggestion"][plan.grouped].all()
    assert not why["group share"].any() and not why["group without label"].any()


def test_corrupted_samples_an_eval_pass_did_not_score_are_not_called_never_presented(tmp_path):
    # --score eval_csl over an eval pass of a quarter of the samples: the 6 flipped samples
    # it did not score, trained on 3 times, were "never presented", and recall said nothing
    # of why it covered 2 of the 8
    n, c = 40, 3
    y = torch.arange(n) % c
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[[0, 4, 1, 2, 3, 5, 6, 7]] = True  # 0 and 4 scored by the eval pass
    noisy = torch.where(flipped, (y + 1) % c, y)
    logits = torch.nn.functional.one_hot(y, c) * 3.0
    tracker = csl_fast.CSLTracker(n, c)
    held = torch.arange(0, n, 4)
    for _ in range(3):
        csl_fast.accumulate(logits, noisy, torch.arange(n), tracker)
        tracker.end_epoch()
        csl_fast.score_epoch(torch.nn.Identity(), [(logits[held], noisy[held], held)], tracker)
    _, rows = _composition_of(
        tracker, RunSamples(labels=noisy, true_labels=y), "eval_csl", tmp_path
    )
    assert "recall (of the 2 corrupted that eval_csl scores)" in rows
    assert rows["corrupted samples trained on that eval_csl does not score (not flagged)"] == "6"
    assert not any("never presented" in row for row in rows)


def _composition_of(tracker, samples, score, out):
    """The page of ``score`` and its table of what the flagged set is made of."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = Path(write_report(tracker, out, samples, score=score)).read_text()
    return page, _table_after(page, "What the flagged set is made of")


def test_held_out_samples_an_eval_pass_scored_are_not_counted_in_the_recall(tmp_path, monkeypatch):
    # --score final_loss after an eval pass over every sample: the rule ranks the 20
    # trained samples only, yet the recall counted the 4 held-out flips it never ranked
    # (they have a finite final_loss), and the header said they had no score
    n, c = 40, 2
    y = torch.arange(n) % c
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[[0, 2, 21, 23, 25, 27]] = True  # 2 trained on, 4 held out
    noisy = torch.where(flipped, 1 - y, y)
    logits = torch.nn.functional.one_hot(y, c) * 3.0
    tracker = csl_fast.CSLTracker(n, c)
    seen = torch.arange(20)
    for _ in range(3):
        csl_fast.accumulate(logits[seen], noisy[seen], seen, tracker)
        tracker.end_epoch()
    csl_fast.score_epoch(torch.nn.Identity(), [(logits, noisy, torch.arange(n))], tracker)
    page, rows = _composition_of(
        tracker, RunSamples(labels=noisy, true_labels=y), "final_loss", tmp_path
    )
    assert "recall (of the 2 corrupted the run trained on)" in rows
    held = "corrupted samples never presented (held out, scored by an eval pass: not ranked, "
    assert rows[held + "not flagged)"] == "4"
    assert "they have no score" not in page
    assert "An eval pass scored 20 of them" in page
    # flagging.png drew the 20 held-out samples as "not flagged" beside the 20 ranked
    from csl_fast.report_cleaning import _fig_flagging

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = detect.mislabeled(tracker, "final_loss")
    drawn = _hist_values(monkeypatch)
    _fig_flagging(det, str(tmp_path / "f.png"))
    assert sum(len(x) for x in drawn) == 20


def _hist_values(monkeypatch) -> list[np.ndarray]:
    import matplotlib.axes

    seen: list[np.ndarray] = []
    hist = matplotlib.axes.Axes.hist

    def spy(ax, x, *args, **kw):
        seen.append(np.asarray(x))
        return hist(ax, x, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "hist", spy)
    return seen


def test_a_constant_negative_score_gets_a_readable_axis():
    # a constant -2.0 (record_loss of a negative loss) got an axis 1e-12 wide
    from csl_fast.report_cleaning import _bins

    for value in (-2.0, 2.0, 0.0):
        edges = _bins(value, value, False, None)
        assert edges[-1] - edges[0] >= 0.99, value


@pytest.mark.parametrize("top", [10, 1])
def test_flagged_bar_at_the_largest_score_is_drawn_a_bin_wide(top, tmp_path, monkeypatch):
    # a discrete score tied at its maximum (threshold_learning_time: 10 samples at 6), or
    # one flagged sample: the bin edge at the lowest flagged score sat 1e-12 under the
    # last edge, and the flagged bar was that wide (invisible)
    from csl_fast import report
    from csl_fast.report_cleaning import _fig_flagging

    drawn = {}

    def spy(fig, path):
        ax = fig.axes[0]
        to_axes = ax.transData + ax.transAxes.inverted()
        red = [p for p in ax.patches if p.get_facecolor()[0] > 0.8 and p.get_height() > 0]
        edges = [(p.get_x(), p.get_x() + p.get_width()) for p in red]
        drawn["widths"] = [
            float(np.diff(to_axes.transform([(a, 0), (b, 0)])[:, 0])[0]) for a, b in edges
        ]
        drawn["bottom"] = ax.get_ylim()[0]
        return "png"

    monkeypatch.setattr(report, "_png", spy)
    values = torch.tensor([0.0] * 50 + [1.0] * 20 + [3.0] * (10 - top) + [6.0] * top)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        det = detect.mislabeled(values, rule="threshold", threshold=5)
    assert len(det) == top
    _fig_flagging(det, str(tmp_path / "f.png"))
    assert drawn["widths"] and max(drawn["widths"]) > 0.5 / 60
    assert drawn["bottom"] == pytest.approx(0.3)


def test_a_loss_only_run_says_what_its_flagged_set_is_made_of(tmp_path):
    # record_loss with the ground truth known: the page drew the ROC and AUROC table but
    # never gave the tail rule's flagged set's precision and recall, as a cross-entropy
    # run's page does from the same samples
    n = 200
    bad = torch.zeros(n, dtype=torch.bool)
    bad[:10] = True
    tracker = csl_fast.CSLTracker(n)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        loss = torch.rand(n, generator=g) * 0.2 + 0.1 + bad * 3.0
        csl_fast.record_loss(loss, torch.arange(n), tracker)
        tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = Path(write_report(tracker, tmp_path, RunSamples(mislabeled=bad.numpy()))).read_text()
        det = csl_fast.detect_losses.corrupted_targets(tracker)
    rows = _table_after(page, "What the flagged set is made of")
    flagged = det.flagged
    assert rows["flagged"] == str(len(det)) and len(det) > 0
    assert rows["flipped labels among them"] == str(int((flagged & bad).sum()))
    assert rows["recall (of all 10 corrupted)"] == f"{int((flagged & bad).sum()) / 10:.3f}"


def test_two_classes_in_use_the_plan_shown_is_the_default_drop(tmp_path):
    """The section showed relabels and said clean relabels by default, where csl_fast.clean
    and csl-fast clean now drop (two classes in use: 4 outputs, the samples' labels)."""
    from flip_runs import flipped_run

    tracker, labels = flipped_run(4, classes=2)
    samples = RunSamples(labels=labels.numpy())
    with warnings.catch_warnings():
        warnings.simplefilter("error", csl_fast.cleaning.RelabelWarning)
        page = Path(write_report(tracker, tmp_path, samples=samples)).read_text(encoding="utf-8")
    assert "does with the flagged set by default on this run: drop every flagged sample" in page
    assert re.search(r"drop \(policy drop\)</td><td>[1-9]", page)
