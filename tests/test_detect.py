"""Detection: ranking, the ground-truth-free threshold rules, duplicate groups."""

import math
import warnings

import pytest
import torch

import csl_fast
from csl_fast import detect
from csl_fast import duplicate_groups as dg
from csl_fast.detect_losses import corrupted_targets

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
    # one short line, not every [N] tensor of the dataclass
    text = repr(det)
    assert text.startswith("Detection(score_name='custom', rule='auto(valley)', flagged=")
    assert f"flagged={len(det)} of 400" in text and "tensor" not in text and len(text) < 300


def test_flags_nothing_without_outlier_mode():
    g = torch.Generator().manual_seed(1)
    s = torch.exp(torch.randn(400, generator=g) * 0.3)
    with pytest.warns(detect.DetectionWarning, match="no separate upper mode|one mode"):
        det = detect.memorized(s)
    assert len(det) == 0 and math.isinf(det.threshold) and det.estimated_count is None
    assert "flagged=0 of 400" in repr(det) and f"warning={det.warning!r}" in repr(det)
    with pytest.warns(detect.DetectionWarning, match="every score is equal"):
        assert len(detect.mislabeled(torch.ones(100))) == 0


@pytest.mark.parametrize(
    ("fraction", "n", "k"),
    [(0.07, 100, 7), (0.14, 100, 14), (0.28, 100, 28), (0.071, 100, 8), (0.5, 5, 3),
     (torch.tensor(0.1), 1000, 100), (torch.tensor(0.1001), 1000, 101), (1e-9, 10, 1)],
)  # fmt: skip
def test_fraction_flags_the_decimal_count(fraction, n, k):
    """``ceil(fraction * N)`` as the decimal reads: 0.07 * 100 is 7.000000000000001 in
    floating point, which flagged 8; a float32 0.1 flagged 101 of 1,000."""
    s = torch.arange(float(n))
    assert int(detect.mislabeled(s, rule="fraction", fraction=fraction).flagged.sum()) == k
    assert len(corrupted_targets(s, rule="fraction", fraction=fraction)) == k


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


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32])
def test_integer_scores_rank_by_their_exact_value(dtype):
    # float32 keys merged integers above 2**24: 2**25 + 1 ranked below 2**25 (index
    # order) while the threshold rule, in float64, flagged only the larger
    s = torch.tensor([2**25, 2**25 + 1, 5, 2**25 + 1], dtype=dtype)
    det = detect.mislabeled(s, rule="threshold", threshold=2**25)
    assert det.ranking.tolist() == [1, 3, 0, 2] and det.indices.tolist() == [1, 3]


def test_sources_tracker_and_mapping():
    t = csl_fast.CSLTracker(3, 2)
    logits = torch.tensor([[4.0, 0.0], [0.0, 4.0], [1.0, 0.0]])
    csl_fast.accumulate(logits, torch.zeros(3, dtype=torch.long), torch.arange(3), t)
    det = detect.mislabeled(t, rule="fraction", fraction=0.34)
    assert det.score_name == "csl" and det.ranking.tolist() == [1, 2, 0]
    assert det.indices.tolist() == [1, 2]
    det = detect.mislabeled(csl_fast.scores(t), "aum", rule="fraction", fraction=0.3)
    assert det.indices.tolist() == [1]


def _duplicated_data(seed=0, n=400):
    """Scores and inputs with a known answer: 12 conflicting pairs (the member whose label
    the network rejects far in an upper mode, its partner inside the clean bulk), one
    conflicting triple, 3 benign same-label pairs, and 7 mislabeled samples with no twin."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    s = torch.exp(torch.randn(n, generator=g) * 0.4)
    perm = torch.randperm(n, generator=g).tolist()
    conflict = [perm[2 * k : 2 * k + 2] for k in range(12)] + [perm[24:27]]
    benign = [perm[27 + 2 * k : 29 + 2 * k] for k in range(3)]
    lone = perm[33:40]
    for members in conflict + benign:
        x[members] = x[members[0]].clone()
        y[members] = y[members[0]].clone()
    for a, *rest in conflict:
        y[rest[-1]] = (y[a] + 1) % 10
        s[rest[-1]] = math.exp(3 + 0.3 * float(torch.randn(1, generator=g)))
    s[lone] = torch.exp(3 + torch.randn(7, generator=g) * 0.3)
    truth = torch.zeros(n, dtype=torch.bool)
    truth[[i for m in conflict for i in m]] = True
    return s, x, y, truth, sorted(sorted(m) for m in conflict), benign


def test_duplicates_with_labels_flags_every_member_of_conflicting_groups():
    s, x, y, truth, conflict, benign = _duplicated_data()
    s[benign[0]] = 1e3  # a benign group is not flagged for its score when labels are known
    det = detect.duplicates(s, inputs=x, labels=y)
    assert det.rule == "auto(label_conflict)"
    assert torch.equal(det.flagged, truth) and det.groups == conflict
    assert det.estimated_count == 27 and det.count_interval == (27, 27) and det.warning is None
    assert det.diagnostics["duplicate_groups"] == 16 and det.diagnostics["conflicting_groups"] == 13
    assert det.threshold == float(s[truth].min())
    assert torch.equal(det.ranking, detect.mislabeled(s, rule="fraction", fraction=0).ranking)
    assert detect.summary(det).startswith("27 of 400 flagged by auto(label_conflict)")
    # benign duplicates only: nothing flagged, an exact zero (no warning)
    y2 = y.clone()
    for members in conflict:
        y2[members] = y2[members[0]].clone()
    det = detect.duplicates(s, inputs=x, labels=y2)
    assert len(det) == 0 and det.estimated_count == 0 and det.groups == []
    # a never-presented member of a conflicting group is flagged; it ranks last
    s[conflict[0][0]] = float("nan")
    det = detect.duplicates(s, inputs=x, labels=y)
    assert torch.equal(det.flagged, truth) and int(det.ranking[-1]) == conflict[0][0]
    assert det.threshold == float(s[truth & ~s.isnan()].min())


def test_duplicates_with_labels_and_an_explicit_rule():
    s, x, y, truth, conflict, benign = _duplicated_data(seed=1)
    s[benign[0][0]] = 1e3
    det = detect.duplicates(s, inputs=x, labels=y, rule="threshold", threshold=5.0)
    # the upper-mode members pull their partners in; the benign pair and the lone ones drop
    assert det.rule == "threshold(5.0)+conflict groups"
    assert torch.equal(det.flagged, truth) and det.groups == conflict


def test_duplicates_inputs_only_flags_whole_groups_by_score():
    s, x, _, truth, conflict, benign = _duplicated_data(seed=2)
    det = detect.duplicates(s, inputs=x)  # plain tensor: the valley rule, then groups
    assert det.rule == "auto(valley)+groups"
    assert torch.equal(det.flagged, truth) and det.groups == conflict
    per_sample = detect.mislabeled(s)
    assert len(per_sample) == 20  # 13 rejected members + 7 lone: half the pairs' members
    assert det.estimated_count == 27 and det.count_interval is not None
    assert det.count_interval[0] <= 27 <= det.count_interval[1]
    assert det.diagnostics["sample_count"][0] == per_sample.estimated_count
    assert not bool(det.flagged[[i for m in benign for i in m]].any())


def test_duplicates_without_inputs_is_the_score_rule_and_says_so():
    s, _, _, _, _, _ = _duplicated_data(seed=3)
    det = detect.duplicates(s)
    assert torch.equal(det.flagged, detect.mislabeled(s).flagged) and det.groups == []
    assert "no inputs" in det.diagnostics["note"] and "no inputs" in detect.summary(det)


def test_duplicates_says_why_no_group_is_flagged():
    """A score rule that flags samples outside every (conflicting) group left the set
    empty with no word; an exact zero (labels, no conflict) says why in its note."""
    s, x, y, _, conflict, _ = _duplicated_data(seed=4)
    top = torch.argsort(s, descending=True)[:2]
    s[top[0]] = s[top[1]] = 1e4  # two lone samples on top: the rule flags only them
    x[top] += 100.0  # with no identical partner
    with pytest.warns(detect.DetectionWarning, match="flagged 2 samples by score, none of"):
        det = detect.duplicates(s, inputs=x, labels=y, rule="fraction", fraction=0.005)
    assert len(det) == 0 and "conflicting group" in det.warning
    assert det.warning in detect.summary(det)
    with pytest.warns(detect.DetectionWarning, match="pass labels="):
        det = detect.duplicates(s, inputs=x, rule="fraction", fraction=0.005)
    assert len(det) == 0
    # labels and no conflict: the exact answer is none (no warning); the note says why
    y2 = y.clone()
    for members in conflict:
        y2[members] = y2[members[0]].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error", detect.DetectionWarning)
        det = detect.duplicates(s, inputs=x, labels=y2)
        unique = detect.duplicates(s, inputs=torch.arange(400.0)[:, None], labels=y)
    assert "carries one label (benign duplicates" in det.diagnostics["note"]
    assert "no conflicting duplicates" in detect.summary(det)
    assert "no two of the 400 inputs are bitwise identical" in unique.diagnostics["note"]


def test_duplicates_bad_arguments():
    s, x, y, _, _, _ = _duplicated_data()
    with pytest.raises(ValueError, match="labels= needs inputs="):
        detect.duplicates(s, labels=y)
    with pytest.raises(ValueError, match="inputs must have one row per sample"):
        detect.duplicates(s, inputs=x[:-1])
    with pytest.raises(ValueError, match="labels must have one row per sample"):
        detect.duplicates(s, inputs=x, labels=y[:-1])
    assert detect.exact_duplicate_groups(torch.tensor([[1.0], [2.0], [1.0]])) == [[0, 2]]
    # the label-conflict rule reads neither: refused, not silently ignored
    for extra in ({"fraction": 0.5}, {"threshold": 0.0}):
        with pytest.raises(ValueError, match="is read only by rule="):
            detect.duplicates(s, inputs=x, labels=y, **extra)


@pytest.mark.parametrize(
    "source, error, match",
    [
        (torch.rand(8, dtype=torch.cfloat), ValueError, "complex"),
        (torch.rand(8, device="meta"), ValueError, "meta"),
        (torch.rand(8).to_sparse(), ValueError, "sparse"),
        (torch.rand(8).numpy(), TypeError, "got ndarray"),
        ([1.0, 2.0], TypeError, "got list"),
        ("run.pt", TypeError, "got str"),
        ({"csl": torch.rand(4, 2)}, ValueError, "1-D"),
        ({"csl": [1.0, 2.0]}, TypeError, "'csl' of the mapping must be a torch.Tensor"),
        ({"csl": torch.rand(50), "aum": torch.rand(40)}, ValueError, "'aum' has 40"),
        (
            {"csl": torch.rand(5), "aum": torch.rand(5), "csl_mean": torch.rand(4)},
            ValueError,
            "'csl_mean' has 4",
        ),
    ],
)
def test_bad_sources_are_refused_plainly(source, error, match):
    with pytest.raises(error, match=match):
        detect.mislabeled(source)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rule": "threshold", "threshold": math.nan}, "threshold= a real number, got nan"),
        ({"rule": "threshold", "threshold": "1"}, "threshold= a real number"),
        ({"rule": "fraction", "fraction": "0.1"}, "fraction= a real number"),
        ({"rule": "fraction", "fraction": True}, "fraction= a real number"),
        ({"rule": "fraction", "fraction": math.nan}, "fraction= a real number"),
        # silently ignored: the default rule ran, or the fraction rule without the threshold
        ({"fraction": 0.05}, "fraction=0.05 is read only by rule='fraction', got rule='auto'"),
        ({"rule": "fraction", "fraction": 0.1, "threshold": 3}, "threshold=3 is read only"),
    ],
)
def test_bad_rule_parameters_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        detect.mislabeled(torch.rand(20), **kwargs)


def test_a_score_that_is_not_a_name_is_refused_plainly():
    # a list met "unhashable type: 'list'" from the mapping lookup
    for source in ({"csl": torch.rand(20)}, csl_fast.CSLTracker(20, 3)):
        with pytest.raises(TypeError, match="score must be the name of one score"):
            detect.mislabeled(source, score=["csl"])


def test_a_cut_inside_a_tie_and_a_two_sided_score_get_a_note():
    """A top-k rule on a discrete score cuts a run of equal scores by dataset index, and
    variability has no suspicious direction: both flagged sets came with no note."""
    s = torch.tensor([1.0, 2.0, 3.0, 2.0, 0.5, 2.0, 0.1, 0.2])
    det = detect.mislabeled({"forgetting": s}, "forgetting", rule="fraction", fraction=0.25)
    assert det.indices.tolist() == [2, 1]  # ties in index order: 1 of the three 2s
    tie = det.diagnostics["tied_at_cut"]
    assert {k: tie[k] for k in ("value", "tied", "flagged")} == {
        "value": 2.0,
        "tied": 3,
        "flagged": 1,
    }
    assert tie["note"] in det.diagnostics["note"]  # its sentence, to drop when a set is recut
    assert "the cut falls inside a tie: 3 samples score 'forgetting' = 2" in detect.summary(det)
    det = detect.mislabeled(s, rule="fraction", fraction=0.5)  # the tie flagged whole
    assert "tied_at_cut" not in det.diagnostics and "note" not in det.diagnostics
    s, truth = _bimodal()
    table = {"csl_mean": s, "aum": torch.where(truth, 1.0, -1.0), "variability": s.clone()}
    for kwargs in ({}, {"rule": "fraction", "fraction": 0.1}):
        det = detect.mislabeled(table, "variability", **kwargs)
        assert "'variability' has no suspicious direction" in det.diagnostics["note"]
    assert (
        "note"
        not in detect.mislabeled(table, "csl_mean", rule="fraction", fraction=0.1).diagnostics
    )


@pytest.mark.parametrize(
    "kwargs", [{}, {"rule": "fraction", "fraction": 0.1}, {"rule": "threshold", "threshold": 0.0}]
)
def test_never_presented_tracker_warns_whatever_the_rule(kwargs):
    t = csl_fast.CSLTracker(50, 3)
    with pytest.warns(detect.DetectionWarning, match="no sample was presented"):
        det = detect.mislabeled(t, **kwargs)
    assert len(det) == 0 and "no sample was presented" in det.warning


def test_positive_infinite_scores_are_not_dropped_silently():
    """+inf ranked last and unflagged like NaN with no word: a float16 CSL that overflows
    lost its most suspicious samples from a flagged set that looked complete."""
    s, _ = _bimodal()
    s[-3:] = float("inf")  # three of the upper mode overflow
    with pytest.warns(detect.DetectionWarning, match="3 samples score 'custom' = \\+inf"):
        det = detect.mislabeled(s)
    assert len(det) == 17 and not bool(det.flagged[-3:].any())
    assert det.diagnostics["positive_infinite"] == 3 and "nan_to_num" in det.warning
    with warnings.catch_warnings():
        warnings.simplefilter("error", detect.DetectionWarning)
        s[-3:] = float("nan")  # undefined: no warning
        assert len(detect.mislabeled(s)) == 17


def test_threshold_above_every_score_warns_with_the_largest():
    with pytest.warns(detect.DetectionWarning, match="largest is 3"):
        det = detect.mislabeled(torch.tensor([1.0, 3.0, 2.0]), rule="threshold", threshold=5)
    assert len(det) == 0 and det.warning is not None
    # an explicit empty request is not a failure to say anything about
    with warnings.catch_warnings():
        warnings.simplefilter("error", detect.DetectionWarning)
        assert len(detect.mislabeled(torch.rand(5), rule="fraction", fraction=0)) == 0


def test_loss_only_tracker_points_to_the_tail_rule():
    g = torch.Generator().manual_seed(0)
    t = csl_fast.CSLTracker(200)
    csl_fast.record_loss(torch.rand(200, generator=g), torch.arange(200), t)
    with pytest.warns(detect.DetectionWarning, match="corrupted_targets") as rec:
        det = detect.mislabeled(t)
    assert det.rule == "auto(valley)" and "recorded losses only" in det.diagnostics["note"]
    assert all("train longer" not in str(w.message) for w in rec)
    with pytest.raises(ValueError, match="margin view; this run recorded losses only"):
        detect.mislabeled(t, rule="two_view")


def test_samples_recorded_without_softmax_statistics_are_no_anchors_and_are_named():
    # record_loss into a tracker that accumulate also fed: their zero softmax sums read as
    # labels lost, so the two-view rule flagged all of them (drops in csl-fast clean) and
    # nothing said the tracker mixed two losses
    g = torch.Generator().manual_seed(0)
    t = csl_fast.CSLTracker(60, 3)
    y = torch.arange(40) % 3
    for _ in range(4):
        logits = torch.randn(40, 3, generator=g) + 3 * torch.nn.functional.one_hot(y, 3)
        csl_fast.accumulate(logits, y, torch.arange(40), t)
        csl_fast.record_loss(torch.rand(20, generator=g) * 50, torch.arange(40, 60), t)
        t.end_epoch()
    with pytest.warns(detect.DetectionWarning, match="20 of 60 samples were recorded without"):
        det = detect.mislabeled(t)
    assert det.diagnostics["count_lower_bound"] == 0  # none of them pinned
    assert "another loss's" in det.diagnostics["note"]
    accumulated = csl_fast.CSLTracker(40, 3)
    csl_fast.accumulate(torch.randn(40, 3, generator=g), y, torch.arange(40), accumulated)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        det = detect.mislabeled(accumulated)
    assert not any("without softmax" in str(w.message) for w in caught)


def test_samples_recorded_without_softmax_statistics_get_no_score_in_detection():
    # their CSL is another loss's: ranked by it, they took the 20 flipped labels' places
    # (20 flagged, all of them record_loss samples, no flip; clean dropped them)
    from cli_calls import mixed_run

    t = mixed_run()
    with pytest.warns(detect.DetectionWarning, match="they are not ranked or flagged"):
        det = detect.mislabeled(t)
    assert sorted(det.indices.tolist()) == list(range(20))
    assert det.ranked.numel() == 200 and int(det.ranked.max()) < 200
    assert torch.isnan(det.scores[200:]).all()
    assert "not ranked or flagged" in det.diagnostics["note"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        by_eval = detect.mislabeled(t, rule="fraction", fraction=0.1)
        plan = csl_fast.clean(t, policy="drop")
        review = csl_fast.clean(t, policy="review", budget=300)
    assert int(by_eval.ranked.max()) < 200 and not by_eval.flagged[200:].any()
    assert sorted(plan.index.tolist()) == list(range(20))
    assert len(review) == 200 and int(review.index.max()) < 200
    # csl_fast.scores(t), which the detectors rank as the tracker, ranked and flagged them
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = csl_fast.scores(t)
        for source, score in ((kept, None), (csl_fast.scores(t, ["csl"]), "csl")):
            det = detect.mislabeled(source, score)
            assert int(det.ranked.max()) < 200 and not det.flagged[200:].any()
            assert "not ranked or flagged" in det.diagnostics["note"]
        plan = csl_fast.clean(kept, policy="drop")
    assert int(plan.index.max()) < 200


def test_another_recorders_samples_in_sequences_and_eval_scores_of_a_mixed_tracker():
    # a tracker of sequences returned before the mixed-recorder handling: record_loss
    # samples ranked first under a note saying they had no score
    g = torch.Generator().manual_seed(0)
    seqs = csl_fast.CSLTracker(12)
    y = torch.randint(0, 5, (6, 4), generator=g)
    for _ in range(2):
        csl_fast.accumulate(torch.randn(6, 5, 4, generator=g), y, torch.arange(6), seqs)
        csl_fast.record_loss(torch.full((2,), 10.0), torch.arange(6, 8), seqs)
        seqs.end_epoch()
    # and a tracker of rows with an eval pass over every sample: the eval pass's scores of
    # the record_loss samples (cross-entropy on the given label, as the others') were
    # blanked with their training scores
    rows = csl_fast.CSLTracker(20, 3)
    y = torch.randint(0, 3, (20,), generator=g)
    for _ in range(3):
        logits = torch.randn(14, 3, generator=g) + 3 * torch.eye(3)[y[:14]]
        csl_fast.accumulate(logits, y[:14], torch.arange(14), rows)
        csl_fast.record_loss(torch.full((6,), 10.0), torch.arange(14, 20), rows)
        rows.end_epoch()
    scored = torch.randn(20, 3, generator=g) + 3 * torch.eye(3)[y]
    scored[14] = 8 * torch.eye(3)[(y[14] + 1) % 3]  # an eval pass finds it wrong
    csl_fast.score_epoch(torch.nn.Identity(), [(scored, y, torch.arange(20))], rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for source in (seqs, csl_fast.scores(seqs)):
            det = detect.mislabeled(source, rule="fraction", fraction=0.2)
            assert int(det.ranked.max()) < 6 and "not ranked or flagged" in det.diagnostics["note"]
        for source in (rows, csl_fast.scores(rows)):
            det = detect.mislabeled(source, "final_loss", rule="fraction", fraction=0.05)
            assert det.ranked.numel() == 20 and det.indices.tolist() == [14]
            det = detect.mislabeled(source, "csl", rule="fraction", fraction=0.05)
            assert int(det.ranked.max()) < 14


def test_multi_label_tracker_points_to_the_entries_and_top_refuses_negative_k():
    t = csl_fast.CSLTracker(50, num_labels=3)
    csl_fast.record_loss(
        torch.rand(50, generator=torch.Generator().manual_seed(0)), torch.arange(50), t
    )
    with pytest.warns(detect.DetectionWarning, match="mislabeled_entries"):
        det = detect.mislabeled(t)
    assert det.top(3).tolist() == det.ranking[:3].tolist() and det.top(0).numel() == 0
    # top(-1) sliced from the end: every sample but the least suspicious
    with pytest.raises(ValueError, match="k must be an int >= 0"):
        det.top(-1)
    for k in (1.5, True, None):  # a wrong type, as Python's own
        with pytest.raises(TypeError, match="k must be an int >= 0"):
            det.top(k)


def test_no_label_lost_advice_is_to_fit_later_not_longer():
    # wine (178 samples), 5-10% flips: the MLP fitted every flip within a few epochs, no
    # label lost on average, nothing flagged; the advice was "train longer", but 400
    # epochs flagged nothing either while 60 epochs (or lr 0.01 instead of 0.05) flagged
    # 9 (8 flips) and 20 (17 flips)
    g = torch.Generator().manual_seed(0)
    csl = torch.exp(torch.randn(300, generator=g) * 0.4)
    source = {"csl": csl, "csl_mean": csl / 60, "aum": -1 - torch.rand(300, generator=g)}
    with pytest.warns(detect.DetectionWarning, match="only 0 samples") as rec:
        det = detect.mislabeled(source)
    assert len(det) == 0
    assert "train for fewer epochs or with a lower learning rate" in det.warning
    assert all("train longer" not in str(w.message) for w in rec)


def _lost_share(n_bad: int, n: int = 1000) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    clean = torch.exp(-3 + 0.5 * torch.randn(n - n_bad, generator=g))
    bad = (2 + 0.3 * torch.randn(n_bad, generator=g)).clamp_min(0.1)
    mean = torch.cat([clean, bad])
    lost = torch.cat([-torch.ones(n - n_bad), torch.ones(n_bad)])  # aum > 0: label lost
    return {"csl": mean * 40, "csl_mean": mean, "aum": lost}


def test_a_majority_count_flags_nothing_and_says_train_longer():
    # digits, MLP, 5% flips, stopped after 1-3 epochs of Adam (1-5 of SGD): 559-1773 of
    # 1,797 samples flagged and no warning, every sample the network had not learned yet
    with pytest.warns(detect.DetectionWarning, match="more than half") as rec:
        det = detect.mislabeled(_lost_share(700))
    assert len(det) == 0 and det.estimated_count is None and det.count_interval is None
    assert det.diagnostics["count"] == "unknown"
    assert det.diagnostics["majority_count"]["count"] > 500
    assert "train until nearly every label is fitted" in str(rec[0].message)
    # and where training longer only fits the bad labels as fast as the hard ones, it says
    # so (make_classification, 100 classes of 20 samples: longer training lost no label)
    assert "overlapping classes" in det.warning
    assert "number of bad samples unknown" in detect.summary(det)
    with warnings.catch_warnings():
        warnings.simplefilter("error", detect.DetectionWarning)
        det = detect.mislabeled(_lost_share(300))  # a minority is still flagged
    assert 280 <= len(det) <= 320


def test_most_labels_lost_says_train_until_fitted_not_fit_later():
    """So many labels lost that the two-view fit had no clean samples left (random labels,
    5 epochs: 293 of 300): the count was unknown and the advice was to fit bad labels
    later (lower learning rate, fewer epochs), the opposite of what the run needs."""
    with pytest.warns(detect.DetectionWarning, match="990 of 1000 samples lost") as rec:
        det = detect.mislabeled(_lost_share(990))
    assert len(det) == 0 and det.diagnostics["count_lower_bound"] == 990
    assert "train until nearly every label is fitted" in str(rec[0].message)
    assert "fewer epochs" not in det.warning


def test_the_majority_warning_names_what_each_detector_looks_for():
    # memorized() said "most labels really are wrong", which it does not look for
    for fn, target in (
        (detect.mislabeled, "the bad labels"),
        (detect.memorized, "the atypical (memorized) samples"),
    ):
        with pytest.warns(detect.DetectionWarning, match="more than half"):
            det = fn(_lost_share(700))
        assert len(det) == 0
        assert f"or {target} really are the majority" in det.warning, (fn.__name__, det.warning)
        assert "labels really are wrong" not in det.warning


def test_a_tracker_of_sequences_is_ranked_and_flagged_by_its_mean_token_loss():
    """Summed over tokens, CSL ranks long clean sequences above short bad ones (AUROC
    0.23 on this run): the default score of a sequence tracker is csl_mean, flagged by
    the valley rule (a token's label has no label-lost view)."""
    from sequence_runs import sequence_tracker

    tracker, bad = sequence_tracker()
    assert tracker.sequences
    assert detect.default_score(tracker) == "csl_mean"
    with warnings.catch_warnings():
        warnings.simplefilter("error", detect.DetectionWarning)
        det = detect.mislabeled(tracker)
    assert det.score_name == "csl_mean" and det.rule == "auto(valley)"
    assert int((det.flagged & bad).sum()) >= 28 and int((det.flagged & ~bad).sum()) <= 2
    lo, hi = det.count_interval
    assert lo <= int(bad.sum()) <= hi
    assert "no label-lost view" in det.diagnostics["note"]
    assert detect.memorized(tracker).score_name == "csl_mean"
    assert detect.duplicates(tracker).score_name == "csl_mean"
    assert csl_fast.detect_losses.corrupted_targets(tracker).score_name == "csl_mean"
    with pytest.raises(ValueError, match="rule='two_view' needs the margin view; the tracker"):
        detect.mislabeled(tracker, rule="two_view")


def test_csl_named_on_sequences_of_different_lengths_says_why_it_misranks():
    from sequence_runs import sequence_tracker

    tracker, _ = sequence_tracker()
    with pytest.warns(detect.DetectionWarning, match="sums the loss over each sequence") as rec:
        det = detect.mislabeled(tracker, "csl")
    assert len(rec) == 1  # one warning, the caveat inside it
    assert "rank first whatever their quality" in det.warning
    assert det.diagnostics["note"].endswith("(the default for a tracker of sequences)")
    assert "; score 'csl' sums the loss" in det.diagnostics["note"]
    # a score that does not grow with length, or sequences of one length: no caveat
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        detect.mislabeled(tracker, "aum", rule="fraction", fraction=0.05)
    assert not [w for w in rec if "sums the loss" in str(w.message)]
    assert detect._length_bias(tracker, "csl_mean") is None
    with pytest.warns(detect.DetectionWarning, match="sums the loss over each sequence"):
        det = corrupted_targets(tracker, "csl")
    assert "sums the loss" in det.diagnostics["note"]
    # a two-sided score keeps its caveat on a tracker of sequences too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        det = detect.mislabeled(tracker, "variability")
    assert det.diagnostics["note"].startswith("score 'variability' has no suspicious direction")


def _watched_sequences(lengths):
    # two epochs of sequences whose input-gradient norms are recorded (tracker.watch)
    g = torch.Generator().manual_seed(0)
    n, positions = len(lengths), max(lengths)
    model = torch.nn.Linear(8, 5)
    x = torch.randn(n, positions, 8, generator=g)
    target = torch.randint(0, 5, (n, positions), generator=g)
    target[torch.arange(positions) >= torch.tensor(lengths)[:, None]] = -100
    idx, valid = torch.arange(n), target != -100
    tracker = csl_fast.CSLTracker(n, num_classes=5)
    for _ in range(2):
        xw = tracker.watch(x.clone(), idx, valid.sum(), valid=valid)
        csl_fast.accumulate(model(xw).transpose(1, 2), target, idx, tracker).backward()
        tracker.end_epoch()
    return tracker


@pytest.mark.parametrize("score", ["loss_sensitivity", "learning_time"])
def test_input_grad_scores_on_sequences_of_different_lengths_say_why_they_misrank(score):
    # a sequence's input gradient is that of the sum of its positions' losses: the
    # 20-token sequences ranked first (all top 10 by loss_sensitivity), without a word
    tracker = _watched_sequences([2, 20] * 16)
    said = "built on each sequence's input-gradient norm"
    with pytest.warns(detect.DetectionWarning, match=said):
        det = detect.mislabeled(tracker, score, rule="fraction", fraction=0.1)
    assert said in det.diagnostics["note"]
    with pytest.warns(detect.DetectionWarning, match=said):  # csl_fast.scores of it too
        detect.mislabeled(csl_fast.scores(tracker), score, rule="fraction", fraction=0.1)
    assert detect._length_bias(_watched_sequences([20] * 32), score) is None


def test_the_scores_of_a_tracker_of_sequences_are_flagged_as_the_tracker_is():
    """csl_fast.scores(tracker) of sequences was ranked by summed csl with the margin
    view, which the README says does not apply to sequences: 9 of 12 bad, no warning."""
    from sequence_runs import sequence_tracker

    tracker, _ = sequence_tracker()
    mapping = csl_fast.scores(tracker)
    assert mapping.sequences and detect.default_score(mapping) == "csl_mean"
    with warnings.catch_warnings():
        warnings.simplefilter("error", detect.DetectionWarning)
        det, want = detect.mislabeled(mapping), detect.mislabeled(tracker)
    assert (
        (det.score_name, det.rule) == (want.score_name, want.rule) == ("csl_mean", "auto(valley)")
    )
    assert torch.equal(det.flagged, want.flagged)
    assert "no label-lost view" in det.diagnostics["note"]
    with pytest.warns(detect.DetectionWarning, match="sums the loss over each sequence"):
        detect.mislabeled(mapping, "csl")
    # a plain dict of the same scores is a mapping like any other
    assert detect.default_score(dict(mapping)) == "csl"


def test_duplicates_with_inputs_that_flag_no_group_say_so_once():
    """The score rule's own warning ("N flagged by rule ...") was the detection's, which
    flagged nothing; now one warning says nothing was flagged, and quotes it."""
    g = torch.Generator().manual_seed(0)
    s, _ = _bimodal()
    scores = {"csl": s}
    inputs = torch.randn(s.numel(), 3, generator=g)
    inputs[1] = inputs[0]  # one benign group, among the clean samples (not flagged)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        det = detect.duplicates(scores, inputs=inputs, rule="fraction", fraction=0.05)
    assert len(det) == 0 and det.groups == []
    said = [str(w.message) for w in rec if issubclass(w.category, detect.DetectionWarning)]
    assert said == [det.warning]
    assert det.warning.startswith(
        "csl_fast.detect.duplicates: nothing flagged: rule 'fraction(0.05)' flagged 20 samples"
    )
    # a score rule that warned: its warning is quoted, not emitted as the detection's own
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        det = detect.duplicates(torch.ones(s.numel()), inputs=inputs)
    said = [str(w.message) for w in rec if issubclass(w.category, detect.DetectionWarning)]
    assert said == [det.warning] and len(det) == 0
    assert "The score rule's own warning: csl_fast.detect: nothing flagged" in det.warning


def test_a_duplicates_detection_is_not_carried_to_groups_twice():
    """A duplicates detection carried to groups again (clean(detection=duplicates(...),
    inputs=) did) kept its count: it was carried a second time (8 flagged, a count of 4)."""
    s, _ = _bimodal()
    inputs = torch.arange(s.numel(), dtype=torch.float32)[:, None]
    inputs[0] = inputs[390]  # a clean sample and a bad one: one group of two
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        dup = detect.duplicates({"csl": s}, inputs=inputs)
    assert len(dup.groups) == 1 and 0 in dup.groups[0]
    again = detect.carry_to_groups(dup, dg.group_ids(inputs))
    assert (again.estimated_count, again.count_interval) == (
        dup.estimated_count,
        dup.count_interval,
    )
    assert again.rule == dup.rule and torch.equal(again.flagged, dup.flagged)


def test_duplicates_quote_a_warning_about_samples_the_groups_did_not_take():
    """The auditor's case: the score rule flagged samples with a warning ("30 flagged by
    rule ..., but ..."), no group held them, and that warning stood for a detection that
    flagged nothing."""
    from sequence_runs import sequence_tracker

    tracker, bad = sequence_tracker()
    inputs = torch.arange(tracker.num_samples, dtype=torch.float32)[:, None]
    clean = (~bad).nonzero().flatten()
    inputs[clean[1]] = inputs[clean[0]]
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        det = detect.duplicates(tracker, "csl", inputs=inputs, rule="fraction", fraction=0.05)
    said = [str(w.message) for w in rec if issubclass(w.category, detect.DetectionWarning)]
    assert said == [det.warning] and len(det) == 0
    assert det.warning.startswith("csl_fast.detect.duplicates: nothing flagged: rule 'fraction")
    assert "own warning: csl_fast.detect: 30 flagged by rule='fraction', but score 'csl'" in (
        det.warning
    )


def test_a_two_sided_score_gets_the_valley_rule_and_a_warning():
    """variability took the two-view count from CSL and flagged its own top-k (clean
    samples: precision 0.01 on an audited run) with no warning, and clean() relabelled
    them; the README says a two-sided score gets the valley rule alone."""
    s, truth = _bimodal()
    table = {"csl_mean": s, "aum": torch.where(truth, 1.0, -1.0), "variability": s.clone()}
    with pytest.warns(detect.DetectionWarning, match="'variability' has no suspicious direction"):
        det = detect.mislabeled(table, "variability")
    assert det.rule == "auto(valley)" and len(det) > 0
    assert "flagged by rule='auto' on the score alone" in det.warning
    tracker = _tracker_with_flips()
    assert detect.mislabeled(tracker).rule.startswith("auto(two_view")  # csl: both views
    with pytest.warns(detect.DetectionWarning, match="'variability' has no suspicious direction"):
        det = detect.mislabeled(tracker, "variability")
    assert "two_view" not in det.rule
    with pytest.warns(detect.DetectionWarning, match="no suspicious direction"):
        plan = csl_fast.clean(tracker, score="variability")
    assert plan.warning is not None and "no suspicious direction" in plan.warning


def _tracker_with_flips(n=300, classes=3, flips=30, epochs=6, seed=0):
    """A tracker of synthetic logits: the network learns the true class from epoch to
    epoch, so the ``flips`` samples given another label lose it."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, classes, (n,), generator=g)
    given = true.clone()
    given[:flips] = (true[:flips] + 1) % classes
    t = csl_fast.CSLTracker(n, classes)
    for epoch in range(epochs):
        logits = torch.randn(n, classes, generator=g)
        logits[torch.arange(n), true] += 1.0 + epoch
        csl_fast.accumulate(logits, given, torch.arange(n), t)
        t.end_epoch()
    return t


def test_a_score_that_ranks_other_samples_than_the_count_is_warned():
    """The count is the two views' (mean loss, lost labels); the flagged set is the score's
    top that many. in_confidence (the final model's doubt, blind to the label) put clean
    samples there: 15% of its set bad on an audited run, and clean() relabelled the rest,
    with no warning."""
    tracker = _tracker_with_flips()
    with warnings.catch_warnings():
        warnings.simplefilter("error", detect.DetectionWarning)
        det = detect.mislabeled(tracker)
    assert det.diagnostics["agreement"] == 1.0
    with pytest.warns(detect.DetectionWarning, match=r"the top \d+ by 'in_confidence' hold only"):
        det = detect.mislabeled(tracker, "in_confidence")
    assert det.diagnostics["agreement"] < detect.MIN_AGREEMENT


def test_unequal_presentation_counts_are_said_of_a_summed_score():
    """csl sums the loss over presentations: samples presented three times as often (a
    weighted sampler) ranked first, and were flagged, without a word; csl_mean is said."""
    g = torch.Generator().manual_seed(0)
    n, c = 300, 3
    y = torch.arange(n) % c
    fed = csl_fast.CSLTracker(n, c)
    losses = csl_fast.CSLTracker(n)
    for _ in range(4):
        for idx in (torch.arange(n), torch.arange(60)):  # samples 0-59 twice per epoch
            logits = torch.randn(idx.numel(), c, generator=g) + 3 * torch.eye(c)[y[idx]]
            csl_fast.accumulate(logits, y[idx], idx, fed)
            csl_fast.record_loss(torch.rand(idx.numel(), generator=g), idx, losses)
        fed.end_epoch()
        losses.end_epoch()
    for source in (fed, csl_fast.scores(fed), losses):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det = csl_fast.detect.mislabeled(source, "csl")
        said = " ".join(str(w.message) for w in caught)
        assert "presentation counts (csl_count) range from 4 to 8" in said, type(source)
        assert "Rank and detect by 'csl_mean'" in det.warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        csl_fast.detect.mislabeled(fed, "csl_mean")
    assert not any("presentation counts" in str(w.message) for w in caught)
    # the default follows the advice (it was csl, which the warning then faulted: a loader
    # with drop_last=True on a small data set ranked its samples by how often they came)
    for source in (fed, csl_fast.scores(fed), losses):
        assert csl_fast.detect.default_score(source) == "csl_mean", type(source)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            det = csl_fast.detect.mislabeled(source)
        assert det.score_name == "csl_mean"
        assert not any("presentation counts" in str(w.message) for w in caught)
    even = csl_fast.CSLTracker(n, c)
    csl_fast.accumulate(torch.randn(n, c, generator=g), y, torch.arange(n), even)
    assert csl_fast.detect.default_score(even) == "csl"
    # scores without csl_mean keep csl, with the warning (a KeyError for the missing mean)
    some = csl_fast.scores(fed, ["csl", "aum"])
    assert csl_fast.detect.default_score(some) == "csl"
    with pytest.warns(csl_fast.detect.DetectionWarning, match="presentation counts"):
        assert csl_fast.detect.mislabeled(some).score_name == "csl"


def test_a_score_of_part_of_the_run_counts_and_flags_among_its_samples():
    """An eval pass over the even-indexed half: the count was of all 300 presented samples
    (30 bad), the flagged set the top 30 among the 150 scored, so half of it was clean,
    with no word; now both are of the scored samples, and the note says so."""
    g = torch.Generator().manual_seed(0)
    n, classes = 300, 3
    true = torch.randint(0, classes, (n,), generator=g)
    given = true.clone()
    given[:30] = (true[:30] + 1) % classes
    tracker = csl_fast.CSLTracker(n, classes)
    half = torch.arange(0, n, 2)
    for epoch in range(6):
        logits = torch.randn(n, classes, generator=g)
        logits[torch.arange(n), true] += 1.0 + epoch
        csl_fast.accumulate(logits, given, torch.arange(n), tracker)
        tracker.end_epoch()
        csl_fast.score_epoch(torch.nn.Identity(), [(logits[half], given[half], half)], tracker)
    for score in ("eval_csl", "final_loss"):
        det = detect.mislabeled(tracker, score)
        assert det.flagged.nonzero().flatten().tolist() == list(range(0, 30, 2))
        assert det.estimated_count == 15
        assert "defined on 150 of the 300 samples" in det.diagnostics["note"]
    assert "coverage" not in detect.mislabeled(tracker).diagnostics


@pytest.mark.parametrize("first_scored", [100, 200])
def test_a_score_of_held_out_samples(first_scored):
    """An eval pass over held-out samples in the training tracker. With trained samples
    too (first_scored=100), the two-view count is of those, and the held-out ones are left
    out, said in the note (the valley rule on the pooled score flagged none of 89 flips on
    digits). Alone (200), the valley rule on the score counts and flags them (the training
    views do not see them: 'not finite for every sample' was said before)."""
    g = torch.Generator().manual_seed(0)
    n, classes, trained = 300, 3, 200
    true = torch.randint(0, classes, (n,), generator=g)
    given = true.clone()
    given[100:120] = (true[100:120] + 1) % classes
    given[200:215] = (true[200:215] + 1) % classes
    tracker = csl_fast.CSLTracker(n, classes)
    scored = torch.arange(first_scored, n)
    for epoch in range(6):
        logits = torch.randn(n, classes, generator=g)
        logits[torch.arange(n), true] += 1.0 + epoch
        csl_fast.accumulate(logits[:trained], given[:trained], torch.arange(trained), tracker)
        tracker.end_epoch()
        csl_fast.score_epoch(
            torch.nn.Identity(), [(logits[scored], given[scored], scored)], tracker
        )
    alone = first_scored >= trained
    flips = list(range(200, 215)) if alone else list(range(100, 120))
    said = "100 samples the run never trained on" if alone else "100 samples with a score were"
    for source in (tracker, csl_fast.scores(tracker)):
        with warnings.catch_warnings():
            warnings.simplefilter("error", detect.DetectionWarning)
            det = detect.mislabeled(source, "eval_csl")
        assert sorted(det.indices.tolist()) == flips
        assert said in det.diagnostics["note"]
        if not alone:  # ranked last, with the NaN scores
            assert set(det.ranking[trained - first_scored :].tolist()) >= set(range(trained, n))
    if alone:
        with pytest.raises(ValueError, match="rule='two_view' needs a score of trained samples"):
            detect.mislabeled(tracker, "eval_csl", rule="two_view")


def _one_epoch_tracker(n=400, classes=4, flips=5, seed=1, ramp=6.0):
    """One epoch of synthetic logits that the network learns as it goes (the later a
    sample is presented, the more its true class leads)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, classes, (n,), generator=g)
    given = true.clone()
    flipped = torch.randperm(n, generator=g)[:flips]
    given[flipped] = (true[flipped] + 1) % classes
    t = csl_fast.CSLTracker(n, classes)
    logits = torch.randn(n, classes, generator=g)
    logits[torch.arange(n), true] += ramp * torch.arange(n) / n
    csl_fast.accumulate(logits, given, torch.arange(n), t)
    t.end_epoch()
    return t


def test_the_count_caveat_is_kept_when_another_warning_fires_first():
    """The one-epoch and low-agreement warnings came first in an if/elif chain whose last
    branch alone set diagnostics['count'] and quoted the estimator's caveat: with either,
    diagnostics['count'] was None, count_phrase said "estimated 8" of a lower bound (not
    "at least 8") and the warning said nothing of the count."""
    cases = (
        (_tracker_with_flips(flips=3, epochs=3, seed=0), "in_confidence", "lower bound"),
        (_one_epoch_tracker(), None, "fit-dependent"),
    )
    for tracker, score, caveat in cases:
        with pytest.warns(detect.DetectionWarning) as rec:
            det = detect.mislabeled(tracker, score)
        est = det.diagnostics["estimator"]
        assert est["caveat"] == caveat and det.diagnostics["count"] == caveat
        other = "recorded one epoch" if score is None else "hold only"
        said = " ".join(str(w.message) for w in rec)
        for text in (det.warning, said):
            assert other in text and f"Also, on the count ({caveat}): {est['reason']}" in text
        if caveat == "lower bound":
            assert detect.count_phrase(det).startswith("estimated at least ")


def test_a_detection_of_a_tensor_or_mapping_keeps_its_scores_as_they_were():
    """det.scores was the caller's buffer itself (x.detach()): as training went on adding
    to that CSL tensor, the detection's scores changed under its flagged set and
    threshold, and to_dataframe() and a cleaning plan made later read the new ones."""
    pytest.importorskip("pandas")
    csl = torch.arange(10, dtype=torch.float32)
    for source in (csl, {"csl": csl}):
        det = detect.mislabeled(source, rule="fraction", fraction=0.2)
        before = csl.clone()
        csl += torch.linspace(5, -5, 10)  # training continues: the ranking reverses
        assert torch.equal(det.scores, before)
        assert det.to_dataframe()["score"].tolist() == [float(v) for v in range(9, -1, -1)]
        csl.copy_(before)


def test_held_out_and_unscored_samples_get_no_rank_anywhere():
    """An eval pass over samples 100-299 of a run trained on 0-199: mislabeled() leaves
    the held-out 200-299 out of its ranking, but to_dataframe() numbered them 101-300
    (and the never-scored 0-99 after them), and duplicates(labels=) ranked them among the
    trained ones (on an audited run its top 3 were held-out samples)."""
    pytest.importorskip("pandas")
    g = torch.Generator().manual_seed(0)
    n, classes = 300, 3
    true = torch.randint(0, classes, (n,), generator=g)
    given = true.clone()
    given[100:120] = (true[100:120] + 1) % classes
    tracker = csl_fast.CSLTracker(n, classes)
    scored = torch.arange(100, n)
    for epoch in range(6):
        logits = torch.randn(n, classes, generator=g)
        logits[torch.arange(n), true] += 1.0 + epoch
        logits[200:] = -logits[200:]  # held-out samples that look bad: they topped dup
        csl_fast.accumulate(logits[:200], given[:200], torch.arange(200), tracker)
        tracker.end_epoch()
        csl_fast.score_epoch(
            torch.nn.Identity(), [(logits[scored], given[scored], scored)], tracker
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        det = detect.mislabeled(tracker, "eval_csl")
        inputs = torch.arange(n, dtype=torch.float32)[:, None]
        dup = detect.duplicates(tracker, "eval_csl", inputs=inputs, labels=given)
    assert det.ranked.numel() == 100 and set(det.ranked.tolist()) == set(range(100, 200))
    df = det.to_dataframe()
    assert df["rank"].dtype == "Int64"
    assert df["rank"][:100].tolist() == list(range(1, 101))
    assert bool(df["rank"][100:].isna().all())
    assert set(df["index"][100:]) == set(range(100)) | set(range(200, 300))
    assert torch.equal(dup.ranked, det.ranked) and torch.equal(dup.top(3), det.top(3))


def test_eval_csl_of_unequal_eval_counts_is_warned_and_its_mean_is_a_score():
    """A DistributedSampler's padding scores the same samples twice every pass (shuffle=False):
    their eval_csl, a sum, ranked first without a word, and the docs' advice (rank by the
    mean) had no score the CLI could take."""
    n, c = 30, 3
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % c
    tracker = csl_fast.CSLTracker(n, c)
    for _ in range(3):
        logits = torch.randn(n, c, generator=g)
        pad = torch.arange(2)  # samples 0 and 1 padded in again
        batches = [(logits, y, torch.arange(n)), (logits[pad], y[pad], pad)]
        csl_fast.score_epoch(torch.nn.Identity(), batches, tracker)
    assert csl_fast.detect.default_eval_score(tracker) == "eval_csl_mean"
    with pytest.warns(csl_fast.detect.DetectionWarning, match=r"eval_count\) range from 3 to 6"):
        csl_fast.detect.mislabeled(tracker, "eval_csl", rule="fraction", fraction=0.1)
    mean = csl_fast.scores(tracker)["eval_csl_mean"]
    torch.testing.assert_close(mean, tracker.eval_csl_sum / tracker.eval_count)
    even = csl_fast.CSLTracker(n, c)
    csl_fast.score_epoch(torch.nn.Identity(), [(logits, y, torch.arange(n))], even)
    assert csl_fast.detect.default_eval_score(even) == "eval_csl"
    # held-out samples scored more often are not ranked beside the trained ones: no word
    trained = torch.arange(20)
    for _ in range(3):
        csl_fast.accumulate(logits[trained], y[trained], trained, even)
        even.end_epoch()
        held = torch.tensor([25, 26])
        csl_fast.score_epoch(torch.nn.Identity(), [(logits[held], y[held], held)], even)
    with warnings.catch_warnings():
        warnings.simplefilter("error", csl_fast.detect.DetectionWarning)
        csl_fast.detect.mislabeled(even, "eval_csl", rule="fraction", fraction=0.1)


def test_duplicates_take_a_binary_bce_runs_float_targets_as_labels():
    # a BCE tracker given num_classes=2 had its float 0/1 targets refused as "not class
    # indices", which softmax classifiers' labels must be
    n = 20
    x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
    x[1] = x[0]
    y = (torch.arange(n) % 2).float()
    y[1] = 1 - y[0]
    tracker = csl_fast.CSLTracker(n, num_classes=2)
    for _ in range(3):
        csl_fast.accumulate_bce(torch.randn(n), y, torch.arange(n), tracker)
        tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        det = csl_fast.detect.duplicates(tracker, inputs=x, labels=y)
    assert {0, 1} <= set(det.indices.tolist())


def test_a_binary_bce_run_is_pointed_to_its_two_class_form():
    """A binary classifier's BCE run has only the losses-only tail rule, which can flag
    nothing where CSL ranks the flips well; its 2-class cross entropy form, which the
    warning now names, is the same loss and gradient."""
    n = 12
    z = torch.randn(n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(n) % 2
    bce = csl_fast.CSLTracker(n)
    csl_fast.accumulate_bce(z, y.double(), torch.arange(n), bce)
    bce.end_epoch()
    with pytest.warns(csl_fast.detect.DetectionWarning, match=r"binary classifier's BCE"):
        csl_fast.detect.mislabeled(bce)
    z2 = torch.stack([torch.zeros_like(z), z], 1)
    ce = csl_fast.CSLTracker(n, 2, dtype=torch.float64)
    loss = csl_fast.accumulate(z2, y, torch.arange(n), ce)
    want = torch.nn.functional.binary_cross_entropy_with_logits(z, y.double())
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(ce.csl, bce.csl.double(), rtol=1e-5, atol=1e-6)


def test_a_hint_after_a_full_stop_starts_a_sentence():
    # the sequences' note, quoted mid-sentence elsewhere, was joined on as "... fitted as
    # fast as the clean ones in this run. the tracker recorded samples of several positions"
    torch.manual_seed(0)
    n, t, v = 200, 6, 5
    tracker = csl_fast.CSLTracker(n, num_classes=v)
    target = torch.randint(0, v, (n, t))
    for _ in range(3):
        csl_fast.accumulate(torch.randn(n * t, v), target, torch.arange(n), tracker)
        tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        det = detect.mislabeled(tracker)
    assert len(det) == 0 and "the top of the ranking). The tracker recorded samples" in det.warning
    # and the loss-only run's hint ("this run recorded losses only")
    tracker = csl_fast.CSLTracker(n, num_classes=v)
    for _ in range(3):
        csl_fast.record_loss(torch.rand(n) + 1, torch.arange(n), tracker)
        tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        det = detect.mislabeled(tracker)
    assert len(det) == 0 and "the top of the ranking). This run recorded losses only" in det.warning


@pytest.mark.parametrize("det", [None, "3 flagged", torch.zeros(3)])
def test_summary_of_what_is_no_detection_is_refused_by_name(det):
    # "'NoneType' object has no attribute 'scores'"
    with pytest.raises(TypeError, match=r"^csl_fast\.detect\.summary: det must be a csl_fast"):
        detect.summary(det)


def test_output_classes_no_label_uses_do_not_switch_flagging_off():
    """The label-lost thresholds scale with 1 / C: counted over 8 outputs of which 3 are
    used, no flip lost firmly and nothing was flagged (iris: 14 flagged with
    num_classes=3, 0 with 8). Given the labels, the classes in use count."""
    from flip_runs import flipped_run

    used, labels = flipped_run(3)
    padded, _ = flipped_run(8)
    expected = detect.mislabeled(used).indices.tolist()
    assert sorted(expected) == list(range(12))
    with pytest.warns(detect.DetectionWarning, match="nothing flagged"):
        assert len(detect.mislabeled(padded)) == 0  # the tracker does not keep the labels
    given = detect.mislabeled(padded, labels=labels)
    assert given.indices.tolist() == expected
    assert given.diagnostics["estimator"]["label_lost"] == 12


def test_classes_in_use_counts_the_labels_of_presented_samples():
    t = csl_fast.CSLTracker(4, num_classes=8)
    csl_fast.accumulate(torch.randn(3, 8), torch.tensor([1, 4, 4]), torch.arange(3), t)
    assert detect.classes_in_use(t) == 8
    # sample 3 was never presented: its label is not in use
    assert detect.classes_in_use(t, torch.tensor([1, 4, 4, 7])) == 2
    assert detect.classes_in_use(t, [1, 4, 7, 7]) == 3
    # labels no per-class count can hold (negative, huge), uint8, nothing presented
    assert detect.classes_in_use(t, [-1, 4, 4, 7]) == 1  # (-1: unlabelled, no class)
    assert detect.classes_in_use(t, [-1, 0, 2, 2**40]) == 2  # (never presented: unread)
    assert detect.classes_in_use(t, torch.tensor([3, 3, 5, 0], dtype=torch.uint8)) == 2
    assert detect.classes_in_use(csl_fast.CSLTracker(4, num_classes=8), [1, 4, 4, 7]) == 0
    with pytest.raises(ValueError, match=r"labels must be the int \[N\] = \[4\]"):
        detect.classes_in_use(t, torch.tensor([1, 4]))
    with pytest.raises(TypeError, match="pass the tracker itself"):
        detect.mislabeled(csl_fast.scores(t), labels=[0, 1, 2, 3])


def test_nothing_flagged_says_why_for_two_samples_and_one_label():
    """Both warnings blamed the schedule ("train for fewer epochs"): no schedule makes two
    samples, or one label, separable."""
    t = csl_fast.CSLTracker(2, num_classes=3)
    for _ in range(3):
        csl_fast.accumulate(torch.randn(2, 3), torch.tensor([0, 1]), torch.arange(2), t)
        t.end_epoch()
    with pytest.warns(detect.DetectionWarning) as said:
        detect.mislabeled(t)
    assert "only 2 samples have a finite score" in str(said[0].message)
    assert "fewer epochs" not in str(said[0].message)

    one = csl_fast.CSLTracker(30, num_classes=3)
    y = torch.zeros(30, dtype=torch.long)
    for _ in range(5):
        csl_fast.accumulate(torch.randn(30, 3) + 3 * torch.eye(3)[0], y, torch.arange(30), one)
        one.end_epoch()
    with pytest.warns(detect.DetectionWarning) as said:
        assert len(detect.mislabeled(one, labels=y)) == 0
    assert "one class in use" in str(said[0].message)
    assert "fewer epochs" not in str(said[0].message)


def test_nothing_flagged_does_not_claim_the_bad_labels_were_fitted_as_fast():
    """It said the bad labels "were fitted as fast as the clean ones" whatever the run:
    here the flips rank first (the top 12 by CSL), and it is too few lost labels that
    leave the rule without a count."""
    from flip_runs import flipped_run

    padded, _ = flipped_run(8)
    with pytest.warns(detect.DetectionWarning) as said:
        det = detect.mislabeled(padded)
    assert sorted(det.ranking[:12].tolist()) == list(range(12))
    message = str(said[0].message)
    assert "fitted as fast" not in message
    assert "too few bad ones stood apart in the rule's views" in message


def test_classes_in_use_is_public():
    # docs/flagging.md names it; it was missing from __all__
    assert "classes_in_use" in detect.__all__


def test_a_detection_records_the_classes_in_use_whatever_it_flags():
    """Recorded only when nothing was flagged, so clean could not read them to choose its
    policy on two classes in use."""
    from flip_runs import flipped_run

    used, _ = flipped_run(3)
    padded, y = flipped_run(8)
    assert detect.mislabeled(used).diagnostics["classes_in_use"] == 3
    det = detect.mislabeled(padded, labels=y)
    assert len(det) == 12 and det.diagnostics["classes_in_use"] == 3
    # a two-sided score reads no view that counts them: recorded all the same
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        two_sided = detect.mislabeled(padded, "variability", labels=y)
        memorized = detect.memorized(padded, "variability", labels=y)
    assert two_sided.diagnostics["classes_in_use"] == memorized.diagnostics["classes_in_use"] == 3


def test_memorized_and_duplicates_count_the_classes_in_use():
    """Both counted the tracker's 8 outputs (of which 3 are used) and flagged nothing,
    where mislabeled given the labels flags the 12 flips."""
    from flip_runs import flipped_run

    used, y = flipped_run(3)
    padded, _ = flipped_run(8)
    assert detect.memorized(padded, labels=y).indices.tolist() == (
        detect.memorized(used).indices.tolist()
    )
    assert len(detect.memorized(used)) == 12
    x = (torch.arange(120) % 60).float()[:, None]
    given = y.clone()
    given[60:72] = (y[:12] + 1) % 3  # flip i and clean 60 + i: same input, other label
    dup = detect.duplicates(padded, inputs=x, labels=given, rule="two_view")
    assert sorted(dup.indices.tolist()) == list(range(12)) + list(range(60, 72))
    with pytest.raises(TypeError, match="memorized: labels= counts the classes in use"):
        detect.memorized(csl_fast.scores(used), labels=y)


def test_nothing_flagged_on_unused_outputs_says_to_pass_labels():
    """It advised only fewer epochs; outputs no label uses were the cause."""
    from flip_runs import flipped_run

    padded, y = flipped_run(8)
    with pytest.warns(detect.DetectionWarning, match="8 output classes.*labels=.*samples.npz"):
        detect.mislabeled(padded)
    # given labels: counted, nothing to advise (a run whose labels are all clean)
    clean_run, _ = flipped_run(8, flips=0)
    with pytest.warns(detect.DetectionWarning) as said:
        detect.mislabeled(clean_run, labels=y)
    assert "pass labels=" not in str(said[0].message)


def test_labels_are_checked_whatever_the_tracker():
    """Labels past the outputs were counted as classes, silently; strings gave torch's
    "too many dimensions 'str'"; a sequence or loss-only tracker ignored any labels."""
    from flip_runs import flipped_run
    from sequence_runs import sequence_tracker

    used, y = flipped_run(3)
    with pytest.raises(ValueError, match=r"mislabeled: labels must be class indices in \[0, 3\)"):
        detect.mislabeled(used, labels=y + 1)
    with pytest.raises(ValueError, match=r"memorized: labels must be class indices in \[0, 3\)"):
        detect.memorized(used, labels=torch.arange(120) % 10)
    with pytest.raises(TypeError, match=r"labels must be the int \[N\] = \[120\].*list of ints"):
        detect.mislabeled(used, labels=["x"] * 120)
    seq, _ = sequence_tracker(60, 3, 2)
    with pytest.raises(TypeError, match=r"labels must be the int \[N\] = \[60\]"):
        detect.mislabeled(seq, labels=["x"])
    loss_only = csl_fast.CSLTracker(10)
    for _ in range(3):
        csl_fast.record_loss(torch.rand(10), torch.arange(10), loss_only)
        loss_only.end_epoch()
    with pytest.raises(ValueError, match=r"labels must be the int \[N\] = \[10\].*float"):
        detect.mislabeled(loss_only, labels=[0.5])
