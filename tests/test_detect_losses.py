"""csl_fast.detect_losses: the tail rule, corrupted regression targets and mislabeled
multi-label entries, on seeded synthetic scores with planted bad samples."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch

import csl_fast
from csl_fast.detect import DetectionWarning
from csl_fast.detect_losses import (
    EntryDetection,
    corrupted_targets,
    mislabeled_entries,
    tail_count,
)


def _scores(n: int = 2000, bad: int = 60, shift: float = 4.0, seed: int = 0):
    """Log-normal clean CSL (log sd 0.8) and ``bad`` samples ``shift`` log-sds above."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 0.8 + 2.0
    idx = torch.randperm(n, generator=g)[:bad]
    x[idx] += shift * 0.8
    truth = torch.zeros(n, dtype=torch.bool)
    truth[idx] = True
    return x.exp(), truth


def test_tail_count_finds_a_planted_group():
    values, _ = _scores()
    est = tail_count(values)
    assert est.found and est.reason is None
    assert 45 <= est.count <= 75, est.count  # 60 planted
    lo, hi = est.interval
    assert lo <= est.count <= hi and lo <= 60 <= hi
    d = est.diagnostics
    assert d["scale"] == "log"
    assert d["expected"] == pytest.approx(2000 * 0.5 * math.erfc(2 / math.sqrt(2)))
    assert d["excess"] == pytest.approx(d["observed"] - d["expected"])


def test_tail_count_on_a_clean_bulk_finds_nothing():
    values, _ = _scores(n=5000, bad=0)
    est = tail_count(values)
    assert not est.found and est.count == 0
    assert "short of the 3 standard errors" in est.reason


@pytest.mark.parametrize("share", [0.3, 0.4])
def test_exact_zeros_do_not_blind_the_tail_rule(share):
    # a hinge or epsilon-insensitive loss is exactly 0 inside its margin: on the log scale
    # the zeros were a far cluster that widened the bulk's spread and counted in its
    # expected tail (40% zeros: none of the planted group flagged, the warning blaming
    # too few scores beyond the cut)
    values, truth = _scores()
    clean = (~truth).nonzero().squeeze(1)
    pick = torch.randperm(clean.numel(), generator=torch.Generator().manual_seed(1))
    zeros = torch.zeros_like(truth)
    zeros[clean[pick[: int(share * 2000)]]] = True
    values[zeros] = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (found: no warning)
        det = corrupted_targets(values)
    flagged = det.flagged
    assert int((flagged & truth).sum()) >= 50, int((flagged & truth).sum())  # 60 planted
    assert int((flagged & ~truth).sum()) <= 5 and not (flagged & zeros).any()
    est = det.diagnostics["estimator"]
    assert det.diagnostics["zeros"] == est["zeros"] == int(zeros.sum())
    assert est["n"] == 2000 - int(zeros.sum())
    said = f"{int(zeros.sum())} of the 2000 finite 'custom' scores are 0, or under 1e-12 of"
    assert said in det.diagnostics["note"]
    # a loss's zeros have a usual cause, named; a score that is no loss gets no such guess
    assert "hinge" not in det.diagnostics["note"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        as_csl = corrupted_targets({"csl": values}, "csl")
    assert "the largest (a loss that is 0 inside a margin" in as_csl.diagnostics["note"]


def test_the_tail_rule_says_when_it_left_zeros_out_and_found_nothing():
    values, _ = _scores(bad=0)
    values[:800] = 0.0
    with pytest.warns(DetectionWarning, match=r"among 1200 positive scores \(the 800 scores of 0"):
        det = corrupted_targets(values)
    assert not det.flagged.any() and det.diagnostics["zeros"] == 800


def test_tail_count_degenerate_inputs():
    assert "only 5 finite" in tail_count(torch.rand(5)).reason
    same = torch.ones(100)
    same[:3] = 5.0
    assert "equal" in tail_count(same).reason
    nan = torch.full((50,), math.nan)
    assert not tail_count(nan).found


def test_corrupted_targets_flags_the_planted_samples():
    values, truth = _scores()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DetectionWarning)  # no warning when it finds them
        det = corrupted_targets(values)
    assert det.warning is None and det.rule == "tail"
    flagged = det.flagged
    assert int(flagged.sum()) == det.estimated_count
    precision = (flagged & truth).sum() / flagged.sum()
    assert precision >= 0.9
    # The flagged set is the top of the ranking.
    assert torch.equal(det.indices, det.ranking[: len(det)])
    assert bool(flagged[det.ranking[: len(det)]].all())
    assert det.threshold == pytest.approx(float(values[flagged].min()))


def test_a_cut_inside_a_tie_and_a_small_sample_are_said():
    """The tail rule split 50 equal scores 35 / 15 by dataset index, with nothing to say
    so; and on a clean set of 12 scores it flagged one with no warning (3-9% of clean sets
    of 10-200 scores flag a sample or two)."""
    g = torch.Generator().manual_seed(1)
    bulk = torch.exp(torch.randn(1000, generator=g, dtype=torch.float64) * 0.3)
    det = corrupted_targets(torch.cat([bulk, torch.full((50,), 10.0, dtype=torch.float64)]))
    tie = det.diagnostics["tied_at_cut"]
    assert tie["tied"] == 50 and tie["flagged"] == len(det) < 50
    # a review set's size, said where the count is printed ("estimated 8 corrupted
    # samples (1-21)" of 15 read as a count)
    from csl_fast.detect import count_phrase

    assert det.diagnostics["count"] == "may include clean samples"
    assert count_phrase(det).endswith(", may include clean samples")
    assert "the cut falls inside a tie" in det.diagnostics["note"]
    small = torch.exp(torch.randn(12, generator=torch.Generator().manual_seed(5)) * 0.5)
    with pytest.warns(DetectionWarning, match="among only 12 scores"):
        det = corrupted_targets(small.double())
    assert len(det) > 0 and det.diagnostics["small_sample"] is True
    with warnings.catch_warnings():
        warnings.simplefilter("error", DetectionWarning)  # a large set says nothing
        assert "small_sample" not in corrupted_targets(_scores()[0]).diagnostics


def test_corrupted_targets_warns_when_nothing_stands_out():
    values, _ = _scores(n=3000, bad=0, seed=3)
    with pytest.warns(DetectionWarning, match="nothing flagged by rule='tail'"):
        det = corrupted_targets(values)
    assert len(det) == 0 and det.warning is not None and "fraction" in det.warning
    # no excess over the bulk's tail is no evidence of none: unknown, not 0
    assert det.estimated_count is None and det.count_interval is None
    assert math.isinf(det.threshold)
    assert "nothing flagged" in csl_fast.detect.summary(det)


def test_corrupted_targets_of_a_mapping_names_its_score():
    """A named score (what the CLI ranks by, e.g. final_loss) is named in the warning and
    the Detection; a plain tensor is 'custom'."""
    values, _ = _scores(n=3000, bad=0, seed=3)
    with pytest.warns(DetectionWarning, match="on 'final_loss'"):
        det = corrupted_targets({"final_loss": values, "csl": values}, "final_loss")
    assert det.score_name == "final_loss" and len(det) == 0
    assert torch.equal(det.ranking, corrupted_targets(values, rule="fraction", fraction=1).ranking)
    with pytest.raises(KeyError, match="no score 'aum' in the mapping"):
        corrupted_targets({"csl": values}, "aum")


def test_never_presented_samples_rank_last_and_are_never_flagged():
    tracker = csl_fast.CSLTracker(500)
    values, _ = _scores(n=500, bad=20, seed=1)
    seen = torch.arange(480)  # the last 20 samples are never presented
    for _ in range(2):
        csl_fast.record_loss(values[seen].float(), seen, tracker)
    det = corrupted_targets(tracker)
    assert torch.isnan(det.scores[480:]).all()
    assert set(det.ranking[480:].tolist()) == set(range(480, 500))
    assert not det.flagged[480:].any()
    mean = corrupted_targets(tracker, "csl_mean")
    torch.testing.assert_close(mean.scores[:480], values[:480].float())
    assert torch.equal(mean.flagged, det.flagged)  # equal counts: the same order


def _mixed_tracker():
    """Cross entropy into samples 0-199 and another loss, on its own scale, into 200-299."""
    torch.manual_seed(0)
    tracker = csl_fast.CSLTracker(300, num_classes=3)
    for _ in range(3):
        logits, target = torch.randn(200, 3), torch.randint(0, 3, (200,))
        csl_fast.accumulate(logits, target, torch.arange(200), tracker)
        csl_fast.record_loss(100 * torch.rand(100), torch.arange(200, 300), tracker)
        tracker.end_epoch()
    return tracker


def test_the_other_recorders_samples_of_a_mixed_tracker_get_no_score():
    # ranked with the cross-entropy samples, the other loss's samples were all 92 flagged,
    # without a word, where the README promises they get no score, said in note and warning
    tracker = _mixed_tracker()
    no_score = "the detection gives them no score from training: they are not ranked"
    for kwargs in ({}, {"rule": "fraction", "fraction": 0.2}):
        with pytest.warns(DetectionWarning, match="100 of 300 samples were recorded without"):
            det = corrupted_targets(tracker, **kwargs)
        assert not det.flagged[200:].any() and torch.isnan(det.scores[200:]).all()
        assert set(det.ranking[200:].tolist()) == set(range(200, 300))  # ranked last
        assert no_score in det.diagnostics["note"] and no_score in det.warning
    assert len(det) == 60  # (a fraction of all 300, as for samples never presented)
    with pytest.warns(RuntimeWarning, match="without softmax statistics"):
        scores = csl_fast.scores(tracker)
    with pytest.warns(DetectionWarning, match=no_score):
        det = corrupted_targets(scores, "csl", rule="fraction", fraction=0.2)
    assert not det.flagged[200:].any() and len(det) == 60


def test_fraction_and_threshold_rules():
    values, _ = _scores(n=1000, bad=10)
    det = corrupted_targets(values, rule="fraction", fraction=0.05)
    assert len(det) == 50 and det.estimated_count is None
    assert torch.equal(det.indices, det.ranking[:50])
    thr = float(values.median())
    det = corrupted_targets(values, rule="threshold", threshold=thr)
    assert torch.equal(det.flagged, values > thr)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rule": "valley"}, "rule must be one of"),
        ({"rule": "fraction"}, "needs fraction"),
        ({"rule": "fraction", "fraction": 1.5}, "needs fraction"),
        ({"rule": "threshold"}, "needs threshold"),
        # NaN flagged nothing silently; a string failed in a comparison; True meant 1
        ({"rule": "threshold", "threshold": math.nan}, "threshold= a real number"),
        ({"rule": "fraction", "fraction": "0.1"}, "fraction= a real number"),
        ({"rule": "fraction", "fraction": True}, "fraction= a real number"),
        ({"fraction": 0.05}, "read only by rule='fraction', got rule='tail'"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        corrupted_targets(torch.rand(100), **kwargs)


def test_bad_sources():
    with pytest.raises(ValueError, match="1-D"):
        corrupted_targets(torch.rand(3, 4))
    with pytest.raises(ValueError, match="'csl' or 'csl_mean'"):
        corrupted_targets(csl_fast.CSLTracker(4), "aum")
    with pytest.raises(ValueError, match="2-D"):
        mislabeled_entries(torch.rand(5))
    with pytest.raises(ValueError, match="num_labels=L"):
        mislabeled_entries(csl_fast.CSLTracker(4))
    with pytest.raises(ValueError, match="'label_csl' or"):
        mislabeled_entries(csl_fast.CSLTracker(4, num_labels=2), "csl")
    # these failed inside torch (or, complex, were cast to real with a torch warning)
    for bad in (torch.rand(8, dtype=torch.cfloat), torch.rand(8, device="meta")):
        with pytest.raises(ValueError, match="dense real tensor"):
            corrupted_targets(bad)
    with pytest.raises(TypeError, match="CSLTracker or an \\[N\\] score tensor, got ndarray"):
        corrupted_targets(torch.rand(8).numpy())
    with pytest.raises(TypeError, match="got list"):
        mislabeled_entries([[1.0, 2.0]])
    with pytest.raises(ValueError, match="has no labels"):
        mislabeled_entries(torch.rand(5, 0), per_label=True)


@pytest.mark.parametrize("kwargs", [{}, {"rule": "fraction", "fraction": 0.1}])
def test_never_presented_samples_warn_whatever_the_rule(kwargs):
    with pytest.warns(DetectionWarning, match="no sample was presented"):
        assert len(corrupted_targets(csl_fast.CSLTracker(30), **kwargs)) == 0
    with pytest.warns(DetectionWarning, match="no sample was presented"):
        assert len(mislabeled_entries(csl_fast.CSLTracker(30, num_labels=2), **kwargs)) == 0
    match = "label 1: .*no sample was presented" if kwargs else "label 1: only 0 finite"
    with pytest.warns(DetectionWarning, match=match):
        mislabeled_entries(torch.full((30, 2), math.nan), per_label=True, **kwargs)


def test_entry_top_refuses_a_negative_k():
    det = mislabeled_entries(torch.rand(10, 2), rule="fraction", fraction=0.1)
    assert det.top(2).shape == (2, 2)
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        det.top(-1)
    # entries without a score (a sample never trained on) are not "most suspicious"
    scores = torch.rand(10, 2)
    scores[7:] = math.nan
    det = mislabeled_entries(scores, rule="fraction", fraction=0.1)
    assert det.top(20).shape == (14, 2) and bool((det.top(20)[:, 0] < 7).all())


def test_threshold_above_every_score_warns():
    with pytest.warns(DetectionWarning, match="largest is 3"):
        det = corrupted_targets(torch.tensor([1.0, 3.0, 2.0]), rule="threshold", threshold=5)
    assert len(det) == 0 and det.warning is not None


def _entries(n: int = 600, labels: int = 6, seed: int = 0):
    """Per-entry CSL: clean log-normal, 3% of entries planted far above."""
    values, truth = _scores(n=n * labels, bad=round(0.03 * n * labels), seed=seed)
    return values.view(n, labels), truth.view(n, labels)


def test_mislabeled_entries_over_all_entries_and_per_label():
    values, truth = _entries()
    det = mislabeled_entries(values)
    assert isinstance(det, EntryDetection)
    assert det.flagged.shape == values.shape and det.scores.shape == values.shape
    assert det.num_labels == 6 and det.warning is None
    tp = (det.flagged & truth).sum()
    assert tp / det.flagged.sum() >= 0.9 and tp / truth.sum() >= 0.7
    pairs = det.indices
    assert pairs.shape == (len(det), 2)
    assert bool(det.flagged[pairs[:, 0], pairs[:, 1]].all())
    scores_in_order = values[pairs[:, 0], pairs[:, 1]]
    assert bool((scores_in_order[:-1] >= scores_in_order[1:]).all())
    top = det.top(3)
    assert torch.equal(top, pairs[:3])
    assert repr(det).startswith("EntryDetection(score_name=") and "tensor" not in repr(det)
    assert f"flagged={len(det)} of {values.numel()}" in repr(det)
    per = mislabeled_entries(values, per_label=True)
    assert per.flagged.shape == values.shape and per.rule == "tail per label"
    assert per.estimated_count == int(per.flagged.sum())
    for k in range(6):  # each label's count is its own tail rule's
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DetectionWarning)  # a label may show too few
            alone = corrupted_targets(values[:, k])
        assert torch.equal(per.flagged[:, k], alone.flagged)


def test_mislabeled_entries_from_a_tracker_and_dataframe():
    values, _ = _entries(n=300, labels=4, seed=2)
    tracker = csl_fast.CSLTracker(300, num_labels=4)
    idx = torch.arange(300)
    tracker.label_csl.index_put_((idx,), values.float(), accumulate=True)  # as accumulate_bce
    csl_fast.record_loss(values.sum(1).float(), idx, tracker)
    det = mislabeled_entries(tracker)
    assert det.score_name == "label_csl"
    torch.testing.assert_close(det.scores, values.float())
    torch.testing.assert_close(mislabeled_entries(tracker, "label_csl_mean").scores, det.scores)
    df = det.to_dataframe()
    assert list(df.columns) == ["sample", "label", "score", "flagged", "rank"]
    assert len(df) == 1200 and int(df.flagged.sum()) == len(det)
    first = df.iloc[0]
    assert first["score"] == pytest.approx(float(values.max()), rel=1e-6)
    assert (first["sample"], first["label"]) == tuple(det.top(1)[0].tolist())


def test_mislabeled_entries_warns_when_nothing_stands_out():
    values, _ = _scores(n=4000, bad=0, seed=5)
    with pytest.warns(DetectionWarning):
        det = mislabeled_entries(values.view(1000, 4))
    assert len(det) == 0
    # it counts entries, not samples (it read "a group of bad samples")
    assert "bad entries" in det.warning and "samples" not in det.warning
    with pytest.warns(DetectionWarning, match="per label"):
        per = mislabeled_entries(values.view(1000, 4), per_label=True)
    assert len(per) == 0
    # one clause per label with its own figures, not the whole reason four times over
    assert len(re.findall(r"\d needed", per.warning)) == 4 and "standard errors" not in per.warning
    for k, d in enumerate(per.diagnostics["per_label"]):
        assert f"label {k}: an excess of {d['estimator']['excess']:.1f} of 1000" in per.warning


@pytest.mark.parametrize("score", ["label_csl", "label_csl_mean"])
def test_mislabeled_entries_refuses_a_tracker_fed_per_sample_only(score):
    # record_loss fills csl_sum/csl_count, never label_csl: the zeros passed for a
    # perfectly fitted model (a warning to train longer; rule='fraction' flagged entries)
    tracker = csl_fast.CSLTracker(40, num_labels=3)
    csl_fast.record_loss(torch.rand(40), torch.arange(40), tracker)
    with pytest.raises(ValueError, match=r"per-label CSL is 0 for all 40 samples.*accumulate_bce"):
        mislabeled_entries(tracker, score)
    with pytest.raises(ValueError, match="per-label CSL is 0"):
        mislabeled_entries(tracker, score, rule="fraction", fraction=0.1)


def test_mislabeled_entries_of_a_fresh_tracker_names_accumulate_bce_only():
    tracker = csl_fast.CSLTracker(30, num_labels=2)
    for per_label in (False, True):
        with pytest.warns(DetectionWarning) as caught:
            mislabeled_entries(tracker, per_label=per_label, rule="fraction", fraction=0.1)
        message = str(caught[0].message)
        assert "accumulate_bce" in message and "record_loss" not in message, message


def test_tail_rule_on_a_score_with_negative_values_warns():
    # a loss that can be negative (Gaussian NLL) moves the rule to the raw scale, where a
    # clean right-skewed bulk exceeds the normal tail: clean samples were flagged silently
    g = torch.Generator().manual_seed(0)
    clean = (torch.randn(2000, generator=g, dtype=torch.float64) * 0.5 + 2).exp()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DetectionWarning)
        assert len(corrupted_targets(clean, rule="fraction", fraction=0.01)) == 20
    shifted = clean - 1.01 * clean.min()
    with pytest.warns(DetectionWarning, match="negative values .* raw scale"):
        det = corrupted_targets(shifted)
    assert len(det) > 0 and "unreliable" in det.warning
    assert det.diagnostics["estimator"]["scale"] == "identity"
    # not read as a lower bound ("..., likely more"): that scale over-counts the clean tail
    assert det.diagnostics["count"] == "unreliable"
    # said with the count wherever it is printed (the CLI's summary, the report), not bare
    assert csl_fast.detect.count_phrase(det).endswith(", unreliable")


def test_tail_rule_takes_a_rounding_error_below_zero_as_zero():
    # F.kl_div of identical rows gives -1.7e-7 in float32: one such value sent the whole
    # score to the raw scale (the planted group flagged with clean samples, "unreliable")
    values, truth = _scores(n=1000, bad=30, shift=6.0, seed=5)
    values = values * 1e-4  # a final-loss-sized score, where the rounding error weighs most
    fitted = int((~truth).nonzero()[0])
    found = {}
    for at_zero in (1.7e-7, -1.7e-7):
        values[fitted] = at_zero
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            found[at_zero] = corrupted_targets(values)
        assert not any("negative values" in str(w.message) for w in said)
    det = found[-1.7e-7]
    assert det.diagnostics["estimator"]["scale"] == "log"
    assert det.diagnostics["count"] != "unreliable"
    assert torch.equal(det.flagged, found[1.7e-7].flagged)
    assert len(det) >= 15 and not (det.flagged & ~truth).any()  # (40 flagged, 20 clean)


@pytest.mark.parametrize("offset", [10, 80])
def test_a_signed_loss_stays_signed_however_far_its_bad_samples_lie(offset):
    # the tolerance was relative to the largest value, which the bad samples set: targets
    # 80 sd off let a Gaussian NLL's real negatives pass as rounding, the log scale
    # clamped them to one floor, and nothing was flagged, without a warning
    g = torch.Generator().manual_seed(1)
    clean = (0.02 + 0.03 * torch.randn(480, generator=g, dtype=torch.float64)) * 10
    bad = (offset * (1 + 0.2 * torch.rand(20, generator=g, dtype=torch.float64))) ** 2 * 5
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        det = corrupted_targets(torch.cat([clean, bad]).float())
    assert det.diagnostics["estimator"]["scale"] == "identity"
    assert any("negative values" in str(w.message) for w in said)
    assert int(det.flagged[-20:].sum()) >= 10


@pytest.mark.parametrize("labels", [None, 2])
def test_a_tracker_trained_on_non_finite_losses_is_called_diverged(labels):
    # the recorders skip NaN and inf, so every score of a diverged run is NaN: the advice
    # was to "pass the tracker to csl_fast.record_loss", which the run had done
    tracker = csl_fast.CSLTracker(30, num_labels=labels)
    find = corrupted_targets if labels is None else mislabeled_entries
    with pytest.warns(DetectionWarning, match="pass the tracker"):
        find(tracker)
    for _ in range(3):
        csl_fast.record_loss(torch.full((30,), math.inf), torch.arange(30), tracker)
        tracker.end_epoch()
    # (end_epoch on a tracker never fed looks the same: both causes are named)
    pattern = r"closed 3 epoch\(s\).*never passed to the recorder.*NaN or inf"
    with pytest.warns(DetectionWarning, match=pattern) as said:
        find(tracker)
    assert all("pass the tracker" not in str(w.message) for w in said)


def test_a_tail_count_on_a_heavy_tailed_clean_bulk_is_not_called_a_lower_bound():
    # an L1 loss's clean log-CSL has a heavier upper tail than the rule's normal model:
    # 30-37 of 442 clean diabetes samples flagged, the count called a "lower bound" and
    # printed "likely more". No bulk shape measured tells that tail from bad samples, so
    # no tail-rule count is called a bound
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(4, 2000, generator=g, dtype=torch.float64)
    student_t3 = normal[0] / (normal[1:] ** 2).mean(0).sqrt()
    clean = (0.5 * student_t3).exp()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DetectionWarning)
        det = corrupted_targets(clean)
    assert len(det) > 0  # all clean
    assert det.diagnostics["count"] == "may include clean samples"
    phrase = csl_fast.detect.count_phrase(det, "corrupted samples")
    assert phrase.endswith("may include clean samples") and "likely more" not in phrase


def test_tail_warning_says_how_many_bad_samples_the_rule_can_see():
    # 10 targets moved far (AUROC 1) among 500: below what the rule can show at this N.
    # The advice was "train without weight decay and long enough", which measured no
    # better than a smooth regime on held-out regression (loss_detection_limits.py)
    values, truth = _scores(n=500, bad=8, shift=6.0, seed=3)
    with pytest.warns(DetectionWarning, match=r"fewer than ~11 bad samples beyond the cut") as w:
        det = corrupted_targets(values)
    assert len(det) == 0 and bool(truth[det.top(8)].all())
    assert "weight decay" not in str(w[0].message) and "rule='fraction'" in str(w[0].message)


def test_infinite_scores_are_not_dropped_silently():
    # a float16 score overflows to +inf for the largest losses: they ranked last and were
    # never flagged, like samples never presented, with no word about it
    values, truth = _scores()
    big = values.clone()
    big[truth.nonzero()[:3, 0]] = math.inf
    with pytest.warns(DetectionWarning, match=r"3 'custom' score\(s\) are \+inf") as w:
        det = corrupted_targets(big)
    assert len(det) > 0 and "float64" in det.warning and len(w) == 1
    with pytest.warns(DetectionWarning, match=r"\+inf"):
        mislabeled_entries(big.view(-1, 4), rule="fraction", fraction=0.01)


def _doubt_tracker(firm: int, hesitant: int, n: int = 400, labels: int = 5, seed: int = 0):
    """A multi-label tracker after T = 20 presentations of every sample: the bulk of
    entries fitted from the start (loss ~e^-4 per presentation), ``firm`` entries
    rejected firmly for 8 presentations (p = 0.03, as a flip before it is memorized) and
    ``hesitant`` ones hesitated over for 16 (p = 0.4, as a hard clean entry); both far
    above the bulk's tail. Returns the tracker and the firm entries' mask."""
    g = torch.Generator().manual_seed(seed)
    t_ = 20
    loss = (torch.randn(n, labels, generator=g, dtype=torch.float64) * 0.5 - 4).exp()
    csl, prob = t_ * loss, t_ * torch.exp(-loss)
    picked = torch.randperm(n * labels, generator=g)[: firm + hesitant]
    kinds = ((picked[:firm], 8, 0.03), (picked[firm:], 16, 0.4))
    mask = torch.zeros(n * labels, dtype=torch.bool)
    mask[picked[:firm]] = True
    for entries, steps, p in kinds:
        fitted = t_ - steps
        csl.view(-1)[entries] = steps * -math.log(p) + fitted * -math.log(0.99)
        prob.view(-1)[entries] = steps * p + fitted * 0.99
    tracker = csl_fast.CSLTracker(n, num_labels=labels)
    idx = torch.arange(n)
    tracker.label_csl.copy_(csl)
    tracker.label_prob.copy_(prob)
    for _ in range(t_):
        csl_fast.record_loss((csl / t_).sum(1).float(), idx, tracker)
    return tracker, mask.view(n, labels)


@pytest.mark.parametrize("per_label", [False, True])
def test_mislabeled_entries_keeps_a_set_the_network_firmly_rejected(per_label):
    tracker, firm = _doubt_tracker(firm=60, hesitant=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DetectionWarning)
        det = mislabeled_entries(tracker, per_label=per_label)
    assert int(det.flagged.sum()) >= 40 and int((det.flagged & firm).sum()) >= 40
    assert det.diagnostics["doubt"]["anchored_share"] >= 0.2
    assert det.warning is None
    if per_label:  # the tail rule's count per label (it errs low: 45 of the 66 planted)
        assert "count_source" not in det.diagnostics
        assert det.diagnostics["count"] == "may include clean samples"  # (each label's)
    else:  # the two-view count, the firmly rejected entries pinned (the tail rule: 58)
        assert det.diagnostics["count_source"] == "two_view" and "count" not in det.diagnostics
        assert det.diagnostics["tail_flagged"] == 58 and torch.equal(det.flagged, firm)
        assert det.rule == "tail, two-view count" and "tie" not in det.diagnostics.get("note", "")
        assert det.estimated_count == 60 and det.count_interval[0] <= 60 <= det.count_interval[1]
        assert det.diagnostics["flagged"] == 60 and det.threshold == det.diagnostics["threshold"]


def test_a_clean_tail_with_nothing_firmly_rejected_has_an_unknown_count():
    # cut to 0 entries, it read "estimated at least 0 bad entries (0-198)"
    tracker, firm = _doubt_tracker(firm=0, hesitant=60)
    with pytest.warns(DetectionWarning, match=r"firmly rejected only 0 of them.*count is unknown"):
        det = mislabeled_entries(tracker)
    assert len(det) == 0 and not bool(firm.any())
    assert det.estimated_count is None and det.count_interval is None
    assert det.diagnostics["count"] == "unknown"
    assert csl_fast.detect.count_phrase(det, "bad entries") is None


@pytest.mark.parametrize("per_label", [False, True])
def test_mislabeled_entries_cuts_a_clean_tail_to_the_firmly_rejected(per_label):
    # the clean runs' false alarms: late-learned clean entries make a heavy loss tail
    # that the tail rule flags (benchmarks/paper/results/multilabel-doubt.md)
    tracker, firm = _doubt_tracker(firm=4, hesitant=60)
    with pytest.warns(DetectionWarning, match=r"firmly rejected only 4 of them.*lower bound"):
        det = mislabeled_entries(tracker, per_label=per_label)
    assert torch.equal(det.flagged, firm)
    assert det.estimated_count == 4 and det.count_interval[0] == 4
    assert det.diagnostics["count"] == "lower bound" and det.diagnostics["tail_flagged"] >= 40
    assert det.diagnostics["flagged"] == 4 and det.diagnostics["threshold"] == det.threshold
    assert det.threshold == pytest.approx(float(det.scores[firm].min()))
    assert torch.equal(det.indices[:, 0] * 5 + det.indices[:, 1], det.ranking[: len(det)])
    # a rule the user sets is theirs: not cut
    top = mislabeled_entries(tracker, rule="fraction", fraction=0.03)
    assert len(top) == 60 and "doubt" not in top.diagnostics


def test_mislabeled_entries_with_soft_targets_is_not_cut():
    # label smoothing caps every entry's probability of its target (0.82 at 0.05/0.95):
    # each reads as doubted a little at every presentation, and the gate cut real flips
    tracker, _ = _doubt_tracker(firm=4, hesitant=60)
    tracker.label_prob.mul_(0.82)
    with pytest.warns(DetectionWarning, match="tail rule's alone") as rec:
        det = mislabeled_entries(tracker)
    assert not any("firmly rejected only" in str(w.message) for w in rec)  # not cut
    assert det.warning is not None and "review the set" in det.warning
    assert len(det) >= 40 and det.diagnostics["doubt"].startswith("not applied")
    assert "the tail rule's alone (the doubt gate not applied" in det.diagnostics["note"]


@pytest.mark.parametrize("value", [-1.0, 100.0, math.inf])
def test_mislabeled_entries_with_impossible_probabilities_is_not_cut(value):
    # an edited tracker: sums of probabilities outside [0, presentations] emptied the set
    tracker, _ = _doubt_tracker(firm=60, hesitant=6)
    tracker.label_prob.fill_(value)
    with pytest.warns(DetectionWarning, match="tail rule's alone") as rec:
        det = mislabeled_entries(tracker)
    assert not any("firmly rejected only" in str(w.message) for w in rec)  # not cut
    assert len(det) >= 40 and det.diagnostics["doubt"].startswith("not usable")


def test_mislabeled_entries_without_recorded_probabilities_is_not_cut():
    tracker, _ = _doubt_tracker(firm=4, hesitant=60)
    tracker.label_prob.zero_()  # label_csl filled by another recorder: no probabilities
    with pytest.warns(DetectionWarning, match="tail rule's alone") as rec:
        det = mislabeled_entries(tracker)
    assert not any("firmly rejected only" in str(w.message) for w in rec)  # not cut
    assert len(det) >= 40 and det.diagnostics["doubt"].startswith("not recorded")
    assert "review the set before acting on it" in det.diagnostics["note"]


def test_per_label_caveats_are_said_when_something_is_flagged():
    # per_label=True dropped every label's warning once anything was flagged: the small
    # sample of label 0's flags and label 1's overflowed entry went unsaid
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(150, 3, generator=g) * 0.5).exp()
    values[:12, 0] *= 50
    values[20, 1] = float("inf")
    with pytest.warns(DetectionWarning) as caught:
        det = mislabeled_entries(values, per_label=True)
    assert int(det.flagged.sum()) > 0
    said = str(caught[-1].message)
    assert said == det.warning and said.startswith(
        f"csl_fast.detect_losses: {int(det.flagged.sum())} flagged per label"
    )
    assert "label 0: " in said and "among only 150 scores" in said
    assert "label 1: 1 'custom' score(s) are +inf" in said
    assert "label 2" not in said  # (nothing flagged there, nothing beyond that to say)


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"cut": float("nan")}, "cut must be a number >= 0"),
        ({"cut": -1.0}, "cut must be a number >= 0"),
        ({"cut": float("inf")}, "cut must be finite"),
        ({"evidence": -1.0}, "evidence must be a number >= 0"),
        ({"evidence": float("nan")}, "evidence must be a number >= 0"),
        ({"evidence": "3"}, "evidence must be a number >= 0"),
    ],
)
def test_tail_count_refuses_bad_arguments_by_name(kwargs, error):
    # cut=NaN raised "cannot convert float NaN to integer"; evidence=-1 or NaN was taken
    values = torch.rand(100, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=error):
        tail_count(values, **kwargs)
    with pytest.raises(TypeError, match="values must be a float tensor, got list"):
        tail_count([1.0, 2.0])


def test_per_label_counts_keep_their_caveat_in_the_sum():
    """Each label's tail count is a review set's size; their sum was reported without the
    caveat (as a lower bound, whose 'likely more' the summary did not say)."""
    g = torch.Generator().manual_seed(0)
    values = (torch.randn(2000, 2, generator=g) * 0.5).exp()
    values[:60] *= 20
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        per = mislabeled_entries(values, per_label=True)
    caveat = "may include clean samples"
    assert [d["count"] for d in per.diagnostics["per_label"]] == [caveat] * 2
    assert per.diagnostics["count"] == caveat
    assert caveat in csl_fast.detect.summary(per) and "likely more" not in csl_fast.detect.summary(
        per
    )


def test_an_unreliable_label_count_makes_the_sum_unreliable_in_any_label_order():
    # the first caveat that was not "lower bound" won: with the tail rule's own caveat
    # first, a signed label's "unreliable" was lost
    g = torch.Generator().manual_seed(0)
    positive = torch.exp(0.3 * torch.randn(1000, generator=g))
    positive[:60] *= 20
    signed = torch.randn(1000, generator=g)
    signed[:60] += 12
    for values in (torch.stack([positive, signed], 1), torch.stack([signed, positive], 1)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            det = mislabeled_entries(values, per_label=True)
        assert det.diagnostics["count"] == "unreliable"


def test_a_score_fitted_near_zero_keeps_its_rounding_errors_as_zero():
    # float32 rounding of a KL cancels to ~-3e-7 whatever the result: against 1e-3 of a
    # median of 1e-5 it read as a signed loss (raw scale, "unreliable", clean samples
    # flagged, advice to record a non-negative loss)
    g = torch.Generator().manual_seed(0)
    values = 1e-5 * torch.exp(0.5 * torch.randn(1000, generator=g, dtype=torch.float64))
    values[:50] = 1e-3 * (1 + torch.rand(50, generator=g, dtype=torch.float64))
    values[100:105] = -1.7e-7
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        det = corrupted_targets(values.float())
    assert det.diagnostics["estimator"]["scale"] == "log"
    assert not any("negative values" in str(w.message) for w in said)
    assert not det.flagged[50:].any() and int(det.flagged[:50].sum()) >= 40


def _loss_only_held_out_run():
    """A loss-only run (record_loss) trained on samples 0-299 of 400 (0-9 mislabeled),
    with an eval pass over all 400 after each epoch; the held-out 300-399 are ones the
    model gets wrong (a high eval loss)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    n, classes = 400, 4
    true = torch.randint(0, classes, (n,), generator=g)
    given = true.clone()
    given[:10] = (true[:10] + 1) % classes
    t = csl_fast.CSLTracker(n, classes)
    trained = torch.arange(300)
    for epoch in range(4):
        logits = torch.randn(n, classes, generator=g)
        logits[torch.arange(n), true] += 1.0 + epoch
        logits[300:] = -logits[300:]
        loss = F.cross_entropy(logits[trained], given[trained], reduction="none")
        csl_fast.record_loss(loss, trained, t)
        t.end_epoch()
        csl_fast.score_epoch(torch.nn.Identity(), [(logits, given, torch.arange(n))], t)
    return t


def test_a_loss_only_run_leaves_held_out_samples_out_of_the_ranking():
    # a loss-only run has no training views, which alone told held-out samples apart: by
    # eval_csl they were ranked among the trained ones and flagged (94 of 97, 3 of the 10
    # flips), by every detector, the plan, csl-fast rank and the report, without a word
    t = _loss_only_held_out_run()
    said = "100 samples with a score were never trained on"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dets = [
            corrupted_targets(csl_fast.scores(t, ["eval_csl"]), "eval_csl"),
            corrupted_targets(
                csl_fast.scores(t, ["eval_csl"]), "eval_csl", rule="fraction", fraction=0.025
            ),
            csl_fast.detect.mislabeled(t, "eval_csl"),
            csl_fast.detect.mislabeled(t, "eval_csl", rule="fraction", fraction=0.025),
            csl_fast.detect.memorized(t, "eval_csl"),
        ]
        plans = [
            csl_fast.clean(t, score="eval_csl", policy="drop"),
            csl_fast.clean(t, score="eval_csl", policy="review", budget=400),
        ]
    for det in dets:
        assert det.ranked.numel() == 300 and int(det.ranked.max()) < 300, det
        assert not det.flagged[300:].any(), det
        assert said in det.diagnostics["note"] and said in det.diagnostics["held_out"]
        assert torch.isfinite(det.scores).all()  # the held-out scores are kept, not ranked
    for det in (dets[1], dets[3]):  # the top 10 of the trained samples: the flips
        assert sorted(det.indices.tolist()) == list(range(10))
    assert not (plans[0].index >= 300).any()
    assert len(plans[1]) == 300 and int(plans[1].index.max()) < 300
    assert plans[1].rank.tolist() == list(range(1, 301))


def test_an_overflowed_score_is_said_beside_held_out_samples(tmp_path):
    # the held-out samples' masking turned a trained sample's +inf into NaN before it was
    # counted: the warning that it ranks last (maybe the most suspicious) went unsaid
    from cli_calls import held_out_run

    held_out_run(tmp_path / "run.csl", loss_only=True, first_scored=0)
    t = csl_fast.CSLTracker.from_file(tmp_path / "run.csl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = csl_fast.scores(t, ["eval_csl"])
    kept["eval_csl"] = kept["eval_csl"].clone()
    kept["eval_csl"][5] = math.inf
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = corrupted_targets(kept, "eval_csl")
    assert det.diagnostics.get("held_out") and "+inf" in det.warning


def test_entries_of_unequal_presentation_counts_rank_by_the_mean():
    # samples 0-9 presented 5 times, the rest once, every label clean: their entries'
    # summed CSL ranked first and 317 of them were flagged, without a caveat
    g = torch.Generator().manual_seed(0)
    n, labels = 60, 4
    tracker = csl_fast.CSLTracker(n, num_labels=labels)
    target = torch.randint(0, 2, (n, labels), generator=g).double()
    for idx in [torch.arange(n)] + [torch.arange(10)] * 4:
        logits = (2 * target[idx] - 1) * 3 + torch.randn(len(idx), labels, generator=g)
        csl_fast.accumulate_bce(logits, target[idx], idx, tracker)
    tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert csl_fast.detect_losses.mislabeled_entries(tracker).score_name == "label_csl_mean"
    with pytest.warns(DetectionWarning, match=r"counts \(csl_count\) range from 1 to 5") as got:
        csl_fast.detect_losses.mislabeled_entries(tracker, "label_csl")
    # in its own words ("entries of entries presented more often" after a noun swap)
    assert "the entries of samples presented more often" in str(got[-1].message)
    for rule in ("tail", "fraction"):  # per label: said once (lost, or once per label)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det = csl_fast.detect_losses.mislabeled_entries(
                tracker, "label_csl", per_label=True, rule=rule,
                fraction=0.1 if rule == "fraction" else None,
            )  # fmt: skip
        said = " ".join(str(w.message) for w in caught)
        assert said.count("range from 1 to 5") == 1, rule
        assert "range from 1 to 5" in det.diagnostics["note"]


@pytest.mark.parametrize(
    "values", [torch.rand(16, device="meta"), torch.rand(16, dtype=torch.complex64)]
)
def test_tail_count_refuses_values_without_real_data_by_name(values):
    # a meta tensor met torch's "register_meta function for torch.nonzero()"
    with pytest.raises(ValueError, match=r"^tail_count: values must be a real tensor with data"):
        tail_count(values)
