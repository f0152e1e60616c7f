"""The report's duplicate-groups section (csl_fast/report_duplicates.py): its counts
against csl_fast.detect.duplicates and csl_fast.clean, with and without labels."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import torch

import csl_fast
from csl_fast.report import RunSamples
from csl_fast.report_duplicates import section

N, C = 60, 3


def _run():
    """A tracker fed fixed logits: samples 0/1 identical with labels 0/1, 2/3 identical
    with label 2; the network prefers class 0 for the first input."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=gen)
    x[1] = x[0]
    x[3] = x[2]
    y = torch.arange(N) % C
    y[0], y[1], y[2], y[3] = 0, 1, 2, 2
    logits = torch.full((N, C), -2.0)
    logits[torch.arange(N), y] = 2.0
    logits[1] = logits[0]  # the same input: the same answer, class 0
    tracker = csl_fast.CSLTracker(N, C)
    for _ in range(3):
        csl_fast.accumulate(logits, y, torch.arange(N), tracker)
        tracker.end_epoch()
    return tracker, x, y


def _cells(page: str) -> dict[str, str]:
    return dict(re.findall(r"<tr><td class=l>(.*?)</td><td>(.*?)</td></tr>", page))


def test_section_counts_and_decisions():
    tracker, x, y = _run()
    truth = y.clone()
    truth[1] = 0
    dup = torch.zeros(N, dtype=torch.bool)
    dup[[0, 1]] = True
    samples = RunSamples(labels=y, true_labels=truth, duplicate=dup, mislabeled=dup & False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csl_fast.detect.DetectionWarning)
        page = section(tracker, samples, x, y, "csl")
    cells = _cells(page)
    assert cells["groups of identical inputs"] == "2"
    assert cells["samples in them"] == "4"
    assert cells["groups with conflicting labels"] == "1"
    assert cells["flagged (rule auto(label_conflict))"] == "2 samples in 1 groups"
    assert cells["injected duplicates among them (ground truth)"] == "2 of 2"
    assert cells["precision"] == "1.000" and cells["recall"] == "1.000"
    assert cells["csl_fast.clean: kept (the label the network preferred)"].startswith("1 (1 hold")
    assert cells["csl_fast.clean: relabelled to the group label"] == "1"
    assert cells["csl_fast.clean: dropped (the group has no label)"] == "0"
    # the group table: labels given, the group's label (0, sample 0's) and each action
    assert "<td>0, 1</td><td>0, 1</td>" in page
    assert re.search(r"<td>0 \(0\.\d\d\): 0 keep, 1 relabel</td><td>0, 0</td>", page)
    assert "<td>2, 3</td>" not in page  # the same-label pair is not flagged


def test_section_without_labels_says_what_is_missing():
    tracker, x, _ = _run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csl_fast.detect.DetectionWarning)
        page = section(tracker, None, x, None, "csl")
    cells = _cells(page)
    assert cells["groups of identical inputs"] == "2"
    assert "groups with conflicting labels" not in cells
    assert "No labels given" in page
    assert "csl_fast.clean: kept" not in page


def test_write_report_takes_the_inputs_of_samples(tmp_path):
    import pytest

    pytest.importorskip("matplotlib")
    from csl_fast.report import write_report

    tracker, x, y = _run()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csl_fast.detect.DetectionWarning)
        page = Path(write_report(tracker, tmp_path, RunSamples(labels=y))).read_text()
        assert "Duplicate groups" not in page
        samples = RunSamples(labels=y.numpy(), inputs=x.numpy())
        page = Path(write_report(tracker, tmp_path, samples)).read_text()
    assert "Duplicate groups (identical inputs)" in page
    assert np.array_equal(samples.inputs, x.numpy())
    with pytest.raises(ValueError, match="one row per sample"):
        write_report(tracker, tmp_path, inputs=x[:10])


def test_section_of_a_loss_only_run_says_its_policy_is_drop():
    # its rows read "kept (the label the network preferred): 0" and "dropped (the group
    # has no label)", and the note spoke of relabelling, of a run that cannot relabel
    tracker, x, y = _run()
    losses = csl_fast.CSLTracker(N, C)
    for _ in range(3):
        csl_fast.record_loss(tracker.csl_mean.float(), torch.arange(N), losses)
        losses.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csl_fast.detect.DetectionWarning)
        page = section(losses, None, x, y, "csl")
    cells = _cells(page)
    assert cells["csl_fast.clean: dropped (policy drop)"] == "2"
    assert not any(k.startswith("csl_fast.clean: kept") for k in cells)
    assert "drops every member of such a group: this run recorded losses only" in page
    assert "relabels the others" not in page


def test_section_of_a_group_with_one_label_measured_shows_no_group_decision():
    # its trained member's own relabel was counted and shown as the group's decision
    x = torch.eye(6)
    x[5] = x[0]
    y = torch.tensor([0, 1, 2, 1, 0, 1])
    logits = 5 * torch.nn.functional.one_hot(y, C).float()
    logits[0] = 5 * torch.nn.functional.one_hot(torch.tensor(1), C).float()
    tracker = csl_fast.CSLTracker(6, C)
    trained = torch.arange(5)  # sample 5, 0's copy, held out
    for _ in range(3):
        csl_fast.accumulate(logits[trained], y[trained], trained, tracker)
        tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        page = section(tracker, None, x, y, "csl")
    cells = _cells(page)
    assert cells["csl_fast.clean: relabelled to the group label"] == "0"
    own = "csl_fast.clean: left to the per-sample plan (a group with one label measured)"
    assert cells[own] == "2"
    assert "<td>0, 5</td><td>0, 1</td><td>-</td>" in page
