"""Detection: ranking, the ground-truth-free threshold rules, duplicate groups."""

import math

import pytest
import torch

import csl_fast
from csl_fast import detect

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _bimodal(n_clean=380, n_bad=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    clean = torch.exp(torch.randn(n_clean, generator=g) * 0.4)
    bad = torch.exp(3 + torch.randn(n_bad, generator=g) * 0.3)
    s = torch.cat([clean, bad])
    truth = torch.zeros(s.numel(), dtype=torch.bool)
    truth[n_clean:] = True
    return s, truth


def test_ranking_and_valley_rule_flags_upper_mode():
    pytest.importorskip("pandas")
    s, truth = _bimodal()
    det = detect.mislabeled(s)
    assert torch.equal(det.ranking, torch.argsort(s, descending=True, stable=True))
    assert det.score_name == "custom" and det.rule == "auto(valley)"
    # the upper mode (log-mean 3 vs 0, well separated) is recovered almost exactly
    assert (det.flagged == truth).float().mean() > 0.99
    assert len(det) == int(det.flagged.sum())
    assert bool((s[det.flagged] >= det.threshold).all())
    assert torch.equal(det.indices, det.ranking[: len(det)])
    assert list(det.to_dataframe().columns) == ["index", "score", "flagged", "rank"]


def test_flags_nothing_without_outlier_mode():
    g = torch.Generator().manual_seed(1)
    s = torch.exp(torch.randn(400, generator=g) * 0.3)
    with pytest.warns(detect.DetectionWarning, match="no separate upper mode|one mode"):
        det = detect.memorized(s)
    assert len(det) == 0 and math.isinf(det.threshold) and det.estimated_count is None
    with pytest.warns(detect.DetectionWarning, match="every score is equal"):
        assert len(detect.mislabeled(torch.ones(100))) == 0


def test_fraction_and_threshold_rules_and_nans():
    s = torch.tensor([0.1, 5.0, float("nan"), 3.0, 3.0, 0.2])
    det = detect.memorized(s, rule="fraction", fraction=0.5)  # ceil(3) = 3
    assert det.flagged.tolist() == [False, True, False, True, True, False]
    assert int(det.ranking[-1]) == 2  # NaN ranks last
    det = detect.mislabeled(s, rule="threshold", threshold=3.0)
    assert det.flagged.tolist() == [False, True, False, False, False, False]
    with pytest.raises(ValueError):
        detect.mislabeled(s, rule="fraction")
    with pytest.raises(ValueError):
        detect.mislabeled(s, rule="bogus")


def test_sources_tracker_and_mapping():
    t = csl_fast.CSLTracker(3, 2)
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 0.0]])
    csl_fast.accumulate(logits, torch.zeros(3, dtype=torch.long), torch.arange(3), t)
    det = detect.mislabeled(t, rule="fraction", fraction=0.34)
    assert det.score_name == "csl" and det.ranking.tolist() == [1, 2, 0]
    assert det.indices.tolist() == [1, 2]
    det = detect.mislabeled(csl_fast.scores(t), "aum", rule="fraction", fraction=0.3)
    assert det.indices.tolist() == [1]


def test_duplicates_with_inputs():
    x = torch.arange(12.0).reshape(6, 2)
    x[4] = x[1]  # 1 and 4 identical
    x[5] = x[1]
    assert detect.exact_duplicate_groups(x) == [[1, 4, 5]]
    s = torch.tensor([0.0, 9.0, 8.0, 0.0, 9.0, 0.0])
    det = detect.duplicates(s, inputs=x, rule="threshold", threshold=1.0)
    assert det.flagged.tolist() == [False, True, False, False, True, False]  # 2 has no twin
    assert det.groups == [[1, 4, 5]]
