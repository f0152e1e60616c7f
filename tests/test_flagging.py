"""The ground-truth-free rules on synthetic score distributions with a known answer.

Every case is seeded; the bad samples are known, so each assertion checks the flagged
set, the count estimate or the warning against the truth (and can fail).
"""

import json
import math
import warnings

import numpy as np
import pytest
import torch

from csl_fast import CSLTracker, detect, flagging

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _prf(flagged, truth):
    tp = int((flagged & truth).sum())
    return tp / max(int(flagged.sum()), 1), tp / max(int(truth.sum()), 1)


def _two_modes(seed=0, n_clean=1900, n_bad=100):
    g = _gen(seed)
    clean = torch.exp(torch.randn(n_clean, generator=g) * 0.4)
    bad = torch.exp(3 + torch.randn(n_bad, generator=g) * 0.3)
    truth = torch.cat([torch.zeros(n_clean, dtype=torch.bool), torch.ones(n_bad, dtype=torch.bool)])
    return torch.cat([clean, bad]), truth


def _left_skewed(seed=0, n_clean=3800, n_bad=200):
    """Clean log-score = -Gamma(2, 1) * 0.8: a long tail of very easy samples (the
    MNIST-1D shape the old log-GMM rule failed on); a small upper mode of bad samples."""
    g = _gen(seed)
    gamma = torch.distributions.Gamma(2.0, 1.0)
    torch.manual_seed(seed)  # Gamma.sample has no generator argument
    clean_log = -0.8 * gamma.sample((n_clean,))
    bad_log = 2.0 + 0.25 * torch.randn(n_bad, generator=g)
    truth = torch.cat([torch.zeros(n_clean, dtype=torch.bool), torch.ones(n_bad, dtype=torch.bool)])
    return torch.cat([clean_log, bad_log]).exp(), truth


def _two_view_table(seed=0, n=6000, rate=0.05, caught=0.5):
    """A memorizing run's statistics: clean mean loss log-normal (two groups, one of
    very easy samples), bad mean loss normal on the linear scale and overlapping the
    clean tail; ``caught`` of the bad samples have a negative mean margin."""
    g = _gen(seed)
    bad = torch.rand(n, generator=g) < rate
    easy = torch.rand(n, generator=g) < 0.3
    clean_log = torch.where(
        easy, -3.0 + 0.8 * torch.randn(n, generator=g), -1.5 + 0.45 * torch.randn(n, generator=g)
    )
    bad_mean = (1.8 + 0.6 * torch.randn(n, generator=g)).clamp_min(0.2)
    mean = torch.where(bad, bad_mean, clean_log.exp())
    lost = bad & (torch.rand(n, generator=g) < caught)
    margin = torch.where(
        lost, -1 - torch.rand(n, generator=g), 0.5 + 4 * torch.rand(n, generator=g)
    )
    return {"csl": 40 * mean, "csl_mean": mean, "aum": -margin}, bad


# ------------------------------------------------------------------------ 1-D valley
def test_valley_two_separated_modes():
    s, truth = _two_modes()
    det = detect.mislabeled(s)
    assert det.rule == "auto(valley)" and det.warning is None
    p, r = _prf(det.flagged, truth)
    assert p >= 0.98 and r >= 0.98
    assert abs(det.estimated_count - 100) <= 5
    lo, hi = det.count_interval
    assert lo <= 100 <= hi
    assert det.threshold == float(s[det.flagged].min())
    assert "1-D valley rule" in det.diagnostics["note"]  # a plain tensor: 1-D only


def test_valley_left_skewed_clean_mode_with_small_upper_mode():
    s, truth = _left_skewed()
    det = detect.mislabeled(s)
    p, r = _prf(det.flagged, truth)
    assert p >= 0.95 and r >= 0.95, (p, r, det.diagnostics)
    assert abs(det.estimated_count - 200) <= 20


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_mode_flags_nothing_and_warns(seed):
    g = _gen(seed)
    shapes = [
        torch.exp(torch.randn(4000, generator=g)),  # log-normal
        torch.exp(-0.8 * torch.distributions.Gamma(2.0, 1.0).sample((4000,))),  # left skew
        -torch.log(torch.rand(4000, generator=g)),  # exponential, mode at 0
    ]
    for s in shapes:
        with pytest.warns(detect.DetectionWarning, match="nothing flagged") as rec:
            det = detect.mislabeled(s)
        # no separation: the count is unknown (None), not zero
        assert len(det) == 0 and det.estimated_count is None and det.count_interval is None
        assert math.isinf(det.threshold) and det.diagnostics["count"] == "unknown"
        assert det.warning is not None and det.warning == str(rec[0].message)
        assert "number of bad samples is unknown" in det.warning
        assert "number of bad samples unknown" in detect.summary(det)
        assert "Try:" in det.warning and det.diagnostics["estimator"]["reason"]
        json.dumps(det.diagnostics)  # plain values, for the report and the CLI


def test_valley_ignores_a_sparse_heavy_tail():
    # isolated far samples of a heavy tail are no mode: nothing, not a few outliers
    t = torch.distributions.StudentT(3.0)
    torch.manual_seed(3)
    s = torch.exp(0.5 * t.sample((4000,)))
    with pytest.warns(detect.DetectionWarning):
        assert len(detect.mislabeled(s)) == 0


@pytest.mark.parametrize(
    "name",
    ["geometric count", "forgetting counts with zeros", "0/1 flag", "97% exact zeros"],
)
def test_valley_refuses_a_discrete_score(name):
    """Each value of a discrete score is a spike of the smoothed density, so the valley
    rule called every value above the most common one a separate mode: a unimodal
    geometric count flagged 997 of 2,000, a score 97% zeros every positive sample."""
    g = _gen(0)
    u = torch.rand(2000, generator=g)
    s = {
        "geometric count": 1 + torch.floor(torch.log(u) / math.log(0.5)),
        "forgetting counts with zeros": torch.floor(torch.log(u) / math.log(0.3)),
        "0/1 flag": (u < 0.05).float(),
        "97% exact zeros": torch.where(
            u < 0.97, 0.0, torch.exp(0.4 * torch.randn(2000, generator=g))
        ),
    }[name]
    with pytest.warns(detect.DetectionWarning, match="the clean mode is a point mass") as rec:
        det = detect.mislabeled(s)
    assert len(det) == 0 and det.estimated_count is None
    mode = float(torch.mode(s).values)
    assert det.diagnostics["estimator"]["point_mass"] == {
        "value": mode,
        "samples": int((s == mode).sum()),
    }
    assert "rule='threshold'" in str(rec[0].message)
    # a fine-grained count is not a point mass: the kernel bridges its values
    clean = torch.exp(0.4 * torch.randn(1900, generator=g))
    bad = torch.exp(3 + 0.3 * torch.randn(100, generator=g))
    assert len(detect.mislabeled(torch.round(10 * torch.cat([clean, bad])))) == pytest.approx(
        100, abs=5
    )


def test_two_sided_score_gets_a_note():
    s, _ = _two_modes()
    two_sided = torch.log(s)  # negative values: the valley works on the raw scale
    det = detect.mislabeled(two_sided)
    assert det.diagnostics["estimator"]["scale"] == "identity"
    assert "two-sided" in detect.rule_note("custom", two_sided, has_views=False)
    assert "Note: score 'custom' is two-sided" in detect.summary(det)
    assert detect.rule_note("aum", two_sided, has_views=True) is None


# ------------------------------------------------------------------------- two-view
@pytest.mark.parametrize("seed,rate", [(0, 0.02), (1, 0.05), (2, 0.10)])
def test_two_view_count_and_flagged_set(seed, rate):
    table, bad = _two_view_table(seed, rate=rate)
    det = detect.mislabeled(table)
    assert det.rule == "auto(two_view)" and det.warning is None
    k = int(bad.sum())
    assert abs(det.estimated_count - k) <= 0.15 * k, (det.estimated_count, k)
    lo, hi = det.count_interval
    assert lo <= det.estimated_count <= hi
    p, r = _prf(det.flagged, bad)
    assert p >= 0.8 and r >= 0.8, (p, r)
    # the flagged set is the top-k of the score
    assert torch.equal(det.indices, det.ranking[: det.estimated_count])
    assert det.diagnostics["views"].startswith("two-view")
    json.dumps(det.diagnostics)


def test_two_view_flags_by_any_score_with_the_same_count():
    table, bad = _two_view_table(1)
    by_csl = detect.mislabeled(table, "csl")
    # two-sided, but the count is the two-view one; here half the bad samples keep a
    # random positive margin, so aum's top that many are mostly not the counted ones
    with pytest.warns(detect.DetectionWarning, match=r"the top \d+ by 'aum' hold only"):
        by_aum = detect.mislabeled(table, "aum")
    assert by_aum.estimated_count == by_csl.estimated_count == len(by_aum)
    assert by_csl.warning is None
    assert _prf(by_aum.flagged, bad)[0] < 0.6 < _prf(by_csl.flagged, bad)[0]
    # no note that aum is two-sided (the count is the two-view one), but one that a score
    # mapping has the margin view only (it said nothing, where on digits it flagged 159
    # for the tracker's 99)
    for det in (by_csl, by_aum):
        assert "two-sided" not in det.diagnostics["note"]
        assert "score mapping has no num_classes" in det.diagnostics["note"]


def test_two_view_clean_run_falls_back_and_warns():
    table, bad = _two_view_table(4, rate=0.0)
    assert not bad.any()
    with pytest.warns(detect.DetectionWarning, match="negative mean margin") as rec:
        det = detect.mislabeled(table)
    assert len(det) == 0 and det.rule == "auto(valley)"
    assert "fell back to the 1-D valley rule" in det.diagnostics["views"]
    assert "1-D valley rule" in str(rec[0].message)
    with pytest.warns(detect.DetectionWarning):
        det = detect.mislabeled(table, rule="two_view")
    assert len(det) == 0 and det.estimated_count is None
    assert det.diagnostics["count"] == "unknown" and det.diagnostics["count_lower_bound"] <= 2


@pytest.mark.parametrize("seed", [0, 1])
def test_two_view_few_anchors_warns_that_the_count_is_a_lower_bound(seed):
    # the bad samples overlap the clean tail and only the 10% with the highest loss lost
    # their label: the count rests on ~30 anchors of ~300, and the fit is unsure of more
    # of the samples it adds than it is sure of
    table, bad = _two_view_table(seed, rate=0.05)
    g = _gen(300 + seed)
    spread = (0.6 + 0.25 * torch.randn(len(bad), generator=g)).clamp_min(0.05)
    mean = torch.where(bad, spread, table["csl_mean"])
    lost = bad & (mean > mean[bad].quantile(0.9))
    aum = torch.where(lost, torch.tensor(1.5), torch.tensor(-2.0))
    with pytest.warns(detect.DetectionWarning, match="lower bound") as rec:
        det = detect.mislabeled({"csl": 40 * mean, "csl_mean": mean, "aum": aum})
    est = det.diagnostics["estimator"]
    assert est["anchored_share"] < flagging.MIN_ANCHORED_SHARE
    fit = est["fits"][0]
    assert fit["confident_bad"] < fit["ambiguous_bad"] and "mixture_count" not in est
    assert det.diagnostics["count"] == "lower bound" and det.warning == str(rec[0].message)
    assert len(det) == det.estimated_count > 0  # still flagged: the top-k of the score
    lo, hi = det.count_interval
    k = det.estimated_count
    # "at least K" beside an interval starting below K read as a contradiction (audit
    # helper-112: "at least 515 (257-784)")
    assert lo < k and f"estimated {k} bad samples ({lo}-{hi}), likely more" in detect.summary(det)


@pytest.mark.parametrize("seed", [0, 1])
def test_two_view_few_anchors_apart_from_the_clean_tail_is_an_estimate(seed):
    # 5% of the bad samples lost their label (~15 anchors of ~300), but the bad samples
    # stand apart from the clean tail: the fit is sure of what it adds, the count is close,
    # and a low anchored share alone raises no warning (label smoothing's case)
    table, bad = _two_view_table(seed, rate=0.05, caught=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error", detect.DetectionWarning)
        det = detect.mislabeled(table)
    est = det.diagnostics["estimator"]
    assert est["anchored_share"] < flagging.MIN_ANCHORED_SHARE
    fit = est["fits"][0]
    assert fit["confident_bad"] >= fit["ambiguous_bad"]
    assert "count" not in det.diagnostics and "at least" not in detect.summary(det)
    k = int(bad.sum())
    assert abs(det.estimated_count - k) <= 0.15 * k, (det.estimated_count, k)
    # the same run with half the bad samples anchored: an estimate, no warning
    table, _ = _two_view_table(seed, rate=0.05, caught=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", detect.DetectionWarning)
        det = detect.mislabeled(table)
    est = det.diagnostics["estimator"]
    assert est["anchored_share"] >= flagging.MIN_ANCHORED_SHARE and "mixture_count" not in est
    assert "count" not in det.diagnostics and "at least" not in detect.summary(det)


@pytest.mark.parametrize("seed", [0, 1])
def test_two_view_on_a_handful_of_anchors_warns_either_way(seed):
    # a nearly clean run (8 bad of 6,000): most bad samples lost their label, so the share
    # is high, but ~6 anchors are too few to trust the count either way
    table, bad = _two_view_table(seed, rate=0.0015, caught=0.8)
    n_lost = int((table["aum"] > 0).sum())
    assert 3 <= n_lost < flagging.MIN_ANCHORS_SURE
    with pytest.warns(detect.DetectionWarning, match="could be off either way") as rec:
        det = detect.mislabeled(table)
    assert det.diagnostics["count"] == "few anchors" and det.warning == str(rec[0].message)
    assert f"only {n_lost} samples lost" in det.warning
    assert len(det) == det.estimated_count > 0  # still flagged: the top-k of the score
    assert int((det.flagged & bad).sum()) >= 0.75 * int(bad.sum())
    assert "at least" not in detect.summary(det)  # not said to be a lower bound


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_two_view_does_not_stretch_a_handful_of_anchors_on_a_clean_run(seed):
    # a clean run where 4 hard clean samples in the loss tail lost their label: the mixture
    # stretches them to 10-33x as many, into the clean tail (samples it cannot call); the
    # count is cut to the 4 (a lower bound, warned)
    table, bad = _two_view_table(seed, rate=0.0)
    assert not bad.any()
    order = torch.argsort(table["csl_mean"], descending=True)
    table["aum"][order[torch.tensor([3, 9, 22, 38])]] = 1.5  # margin -1.5: lost
    with pytest.warns(detect.DetectionWarning, match="count is cut to those 4") as rec:
        det = detect.mislabeled(table)
    est = det.diagnostics["estimator"]
    assert est["mixture_count"] > 4 / flagging.MIN_ANCHORED_SHARE
    fit = est["fits"][0]
    assert fit["confident_bad"] < fit["ambiguous_bad"]
    assert len(det) == det.estimated_count == 4 == det.count_interval[0]
    assert det.count_interval[1] == est["mixture_interval"][1] >= est["mixture_count"]
    assert torch.equal(det.indices, det.ranking[:4])  # still the top of the score
    assert det.diagnostics["count"] == "lower bound" and det.warning == str(rec[0].message)
    assert "estimated at least 4 bad samples" in detect.summary(det)
    lo, hi = det.count_interval
    assert detect.count_phrase(det, "mislabeled") == f"estimated at least 4 mislabeled ({lo}-{hi})"
    # with 10 anchors (MIN_ANCHORS_SURE) too: they make up less than UNSURE_SHARE of the
    # mixture's count, and it is sure of almost none of the samples it adds
    table["aum"][order[torch.tensor([45, 50, 60, 70, 80, 90])]] = 1.5
    with pytest.warns(detect.DetectionWarning, match="count is cut to those 10"):
        det = detect.mislabeled(table)
    est = det.diagnostics["estimator"]
    assert flagging.UNSURE_SHARE * est["mixture_count"] > 10
    fit = est["fits"][0]
    assert fit["confident_bad"] < flagging.MIN_SURE_RATIO * fit["ambiguous_bad"]
    assert len(det) == det.estimated_count == 10 and det.diagnostics["count"] == "lower bound"


@pytest.mark.parametrize("seed", [1, 2])
def test_two_view_cuts_a_handful_of_anchors_stretched_by_samples_it_cannot_call(seed):
    # a clean run where 8 hard clean samples in the loss tail lost their label and the
    # mixture stretches them only 2-2.5x (their share stays above UNSURE_SHARE), adding
    # samples it cannot call and none it is sure of: with so few anchors, the count is cut
    # to them all the same (a clean digits run with augmentation: 9 -> 22 of 1,797)
    g = _gen(seed)
    mean = (0.6 * torch.randn(3000, generator=g) - 2.5).exp()
    order = torch.argsort(mean, descending=True)
    aum = torch.full_like(mean, -2.0)
    aum[order[20:44:3]] = 1.5  # margin -1.5: lost
    table = {"csl": 40 * mean, "csl_mean": mean, "aum": aum}
    with pytest.warns(detect.DetectionWarning, match="count is cut to those 8") as rec:
        det = detect.mislabeled(table)
    est = det.diagnostics["estimator"]
    assert 8 < est["mixture_count"] <= 8 / flagging.UNSURE_SHARE  # the share test passes
    fit = est["fits"][0]
    assert fit["confident_bad"] < flagging.MIN_SURE_RATIO * fit["ambiguous_bad"]
    assert len(det) == det.estimated_count == 8 == det.count_interval[0]
    assert det.diagnostics["count"] == "lower bound" and det.warning == str(rec[0].message)
    assert torch.equal(det.indices, det.ranking[:8])


@pytest.mark.parametrize(("seed", "lowest"), [(1, 0.6), (3, 0.8)])
def test_two_view_does_not_cut_a_handful_of_anchors_it_adds_nothing_to(seed, lowest):
    # 6 anchors above a clean bulk: the mixture adds a fraction of a sample (unsure, none
    # sure), so its count is the anchors' own; nothing was stretched, and it stays an
    # estimate that rests on few anchors, not a cut ("1.0x as many")
    g = _gen(seed)
    mean = (0.5 * torch.randn(3000, generator=g) - 2.5).exp()
    mean[:6] = torch.linspace(lowest, 2.0, 6)
    lost = torch.zeros(3000, dtype=torch.bool)
    lost[:6] = True
    est = flagging.two_view_count(mean, lost)
    fit = est.diagnostics["fits"][0]
    assert fit["confident_bad"] < flagging.MIN_SURE_RATIO * fit["ambiguous_bad"]
    assert est.count == 6 and est.diagnostics["caveat"] == "few anchors"
    assert "mixture_count" not in est.diagnostics and "cut" not in est.reason


@pytest.mark.parametrize("seed", [0, 1])
def test_two_view_keeps_a_separate_group_counted_from_a_handful_of_anchors(seed):
    # label smoothing's case: few bad samples lose firmly (4 here), but the bad ones stand
    # apart from the clean tail; the fit is sure of them, so the count stands, warned only
    # that it rests on few anchors (not that it is a lower bound)
    table, bad = _two_view_table(seed, rate=0.05)
    g = _gen(100 + seed)
    mean = torch.where(bad, 3.0 + 0.4 * torch.randn(len(bad), generator=g), table["csl_mean"])
    aum = torch.full_like(table["aum"], -2.0)
    aum[torch.nonzero(bad).flatten()[:4]] = 1.5
    table = {"csl": 40 * mean, "csl_mean": mean, "aum": aum}
    with pytest.warns(detect.DetectionWarning, match="too few to shape the mixture's bad"):
        det = detect.mislabeled(table)
    assert det.diagnostics["count"] == "few anchors"
    fit = det.diagnostics["estimator"]["fits"][0]
    assert fit["confident_bad"] > fit["ambiguous_bad"]
    # not cut to the anchors: the group forms a separate mode of the score, whose count
    # (the 1-D valley rule's) settles the one that rests on 4 anchors
    est = det.diagnostics["estimator"]
    assert est["count_source"] == "valley" and est["mixture_count"] > 4
    assert "1-D valley rule" in det.warning
    k = int(bad.sum())
    assert abs(det.estimated_count - k) <= 0.05 * k, (det.estimated_count, k)
    p, r = _prf(det.flagged, bad)
    assert p >= 0.95 and r >= 0.95, (p, r)


def _middle_group_table(seed: int, middle: float) -> dict[str, torch.Tensor]:
    # 9,000 clean samples (log mean loss N(-3.3, 1)), 550 in a group at log mean loss
    # `middle` (sd 0.3) and 175 surely bad ones (mean loss N(2, 0.6), label lost)
    g = _gen(seed)
    log_loss = torch.cat(
        [
            torch.randn(9000, generator=g) - 3.3,
            0.3 * torch.randn(550, generator=g) + middle,
            (0.6 * torch.randn(175, generator=g) + 2.0).clamp_min(0.3).log(),
        ]
    )
    aum = torch.full_like(log_loss, -2.0)
    aum[-175:] = 1.5  # margin -1.5: lost
    mean = log_loss.exp()
    return {"csl": 40 * mean, "csl_mean": mean, "aum": aum}


def _views(table: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``two_view_count``'s inputs from a table: the mean loss, and the lost labels (a
    negative mean margin)."""
    return table["csl_mean"], table["aum"] > 0


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_two_view_count_depends_on_the_fit(seed):
    # MNIST's case (an MLP at 10% flips): a group between the clean bulk and the surely bad
    # samples is a clean component with 3 or 4 clean components and bad with 2; the count
    # stands with a caveat, and its interval holds both readings
    table = _middle_group_table(seed, -0.26)
    est = flagging.two_view_count(*_views(table))
    assert est.diagnostics["caveat"] == "fit-dependent"
    counts = [f["count"] for f in est.diagnostics["fits"]]
    assert max(counts) > flagging.MAX_FIT_SPREAD * min(counts)
    assert est.count == round(counts[0]) and "depends on the mixture's shape" in est.reason
    lo, hi = est.interval
    assert lo <= min(counts) and hi >= max(counts)
    assert f"review the ranking down to {round(max(counts))}" in est.reason
    # the group well apart from the surely bad samples: every fit calls it clean
    est = flagging.two_view_count(*_views(_middle_group_table(seed, -0.6)))
    counts = [f["count"] for f in est.diagnostics["fits"]]
    assert max(counts) < flagging.MAX_FIT_SPREAD * min(counts)
    assert est.reason is None and "caveat" not in est.diagnostics


@pytest.mark.parametrize("seed", [0, 1, 3])
def test_a_fit_dependent_count_is_settled_by_an_upper_mode(seed):
    # the same group forms a separate mode of the score with the surely bad samples: the
    # 1-D valley rule's count, which needs no mixture shape, is the one flagged, warned
    table = _middle_group_table(seed, -0.26)
    valley = flagging.upper_mode(table["csl"])
    assert valley.found
    with pytest.warns(detect.DetectionWarning, match="separate upper mode") as rec:
        det = detect.mislabeled(table)
    est = det.diagnostics["estimator"]
    assert est["count_source"] == "valley" and det.diagnostics["count"] == "fit-dependent"
    assert det.estimated_count == valley.count == len(det)
    assert torch.equal(det.indices, det.ranking[: valley.count])
    lo, hi = det.count_interval
    counts = [f["count"] for f in est["fits"]]
    assert lo <= min(counts) and hi >= max(max(counts), valley.count)
    assert est["mixture_count"] == round(counts[0]) and est["valley"]["estimator"] == "valley"
    assert det.warning == str(rec[0].message) and "try:" not in det.warning.lower()
    # with the group apart from the surely bad samples there is no caveat to settle
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = detect.mislabeled(_middle_group_table(seed, -0.6))
    assert det.warning is None and "count_source" not in det.diagnostics["estimator"]


def test_settled_by_valley_leaves_a_settled_count_alone():
    table = _middle_group_table(0, -0.26)
    est = flagging.two_view_count(*_views(table))
    valley = flagging.upper_mode(table["csl"])
    one_mode = torch.randn(5000, generator=_gen(1)).exp()
    assert not flagging.upper_mode(one_mode).found and valley.found
    assert flagging.settled_by_valley(est, one_mode) is est
    settled = flagging.two_view_count(*_views(_middle_group_table(0, -0.6)))
    assert flagging.settled_by_valley(settled, table["csl"]) is settled
    out = flagging.settled_by_valley(est, table["csl"])
    assert out.count == valley.count and out.diagnostics["mixture_count"] == est.count
    assert "caveat" in out.diagnostics and out.interval[0] <= est.count <= out.interval[1]


@pytest.mark.parametrize("seed, bad_seed", [(3, 102), (5, 102), (3, 104)])
def test_a_count_without_caveat_is_raised_to_a_weak_mode_inside_its_interval(seed, bad_seed):
    # MNIST's MLP at 5% flips: the two-view count (no caveat) was 0.79x the flips, and the
    # score had an upper mode too weak to stand on its own whose count was in the
    # interval; the count is raised to it, never lowered, never past the interval
    z = torch.cat(
        [
            torch.randn(5000, generator=_gen(seed)),
            3.05 + 0.4 * torch.randn(300, generator=_gen(bad_seed)),
        ]
    ).double()
    values = z.exp()
    assert not flagging.upper_mode(values).found  # no separate mode: a weak one
    mode = flagging._upper_mode(values, flagging.BINS, flagging.WEAK_MODE)
    assert mode.found and abs(mode.count - 300) <= 25

    def estimate(count, interval, caveat=None):
        diag = {"label_lost": 90} | ({"caveat": caveat} if caveat else {})
        return flagging.Estimate(True, count, interval, diagnostics=diag, reason=caveat)

    low = estimate(240, (150, 380))
    out = flagging.settled_by_valley(low, values)
    assert out.count == mode.count and out.interval == (150, 380) and out.reason is None
    assert out.diagnostics["count_source"] == "valley" and out.diagnostics["raised"]
    assert out.diagnostics["mixture_count"] == 240
    assert out.diagnostics["valley"]["above_valley"] == mode.count
    for unchanged in (
        estimate(240, (150, mode.count - 1)),  # the mode's count is outside the interval
        estimate(mode.count + 20, (150, 380)),  # a count is never lowered
        estimate(240, (150, 380), "lower bound"),  # a bound is raised by a separate mode only
    ):
        assert flagging.settled_by_valley(unchanged, values) is unchanged
    one_mode = torch.randn(5300, generator=_gen(1)).double().exp()
    assert flagging.settled_by_valley(low, one_mode) is low


def test_detect_reports_a_count_raised_to_a_weak_mode_without_a_warning():
    # a two-view table shaped like MNIST's MLP at 5% (anchors above memorized flips, a
    # clean log-normal tail): the mixture's count, no caveat, is raised to the score's
    # weaker upper mode inside its interval; the Detection flags that many, warns of
    # nothing, and its diagnostics keep the mixture's own count
    clean = -3.0 + 0.9 * torch.randn(9500, generator=_gen(1), dtype=torch.float64)
    free = -0.2 + 0.3 * torch.randn(350, generator=_gen(201), dtype=torch.float64)
    anchors = 0.45 + 0.35 * torch.randn(150, generator=_gen(101), dtype=torch.float64)
    mean = torch.cat([clean, free, anchors]).exp()
    aum = torch.full_like(mean, -2.0)
    aum[-150:] = 1.5  # margin -1.5: lost
    table = {"csl": 40 * mean, "csl_mean": mean, "aum": aum}
    est = flagging.two_view_count(*_views(table))
    mode = flagging._upper_mode(table["csl"], flagging.BINS, flagging.WEAK_MODE)
    assert "caveat" not in est.diagnostics and est.count < mode.count <= est.interval[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        det = detect.mislabeled(table)
    assert det.warning is None and det.estimated_count == mode.count == len(det)
    assert det.count_interval == est.interval
    estimator = det.diagnostics["estimator"]
    assert estimator["raised"] and estimator["count_source"] == "valley"
    assert estimator["mixture_count"] == est.count
    lo, hi = est.interval
    assert detect.count_phrase(det) == f"estimated {mode.count} bad samples ({lo}-{hi})"


def test_settled_by_valley_raises_a_lower_bound_only():
    # a count cut to its anchors (a lower bound) while the score has a separate upper
    # mode holding more samples: the mode is a group of bad samples, not the clean tail,
    # so its count is flagged and the mixture's own count is kept from before the cut
    table = _middle_group_table(0, -0.26)
    valley = flagging.upper_mode(table["csl"])
    assert valley.found and valley.count > 60

    def lower_bound(count):
        diag = {"caveat": "lower bound", "label_lost": 40, "mixture_count": 150}
        diag["mixture_interval"] = [70, 300]
        return flagging.Estimate(True, count, (count, 300), diagnostics=diag, reason="cut")

    out = flagging.settled_by_valley(lower_bound(40), table["csl"])
    assert out.count == valley.count and out.diagnostics["count_source"] == "valley"
    assert out.diagnostics["mixture_count"] == 150
    assert out.diagnostics["mixture_interval"] == [70, 300]
    assert out.interval[0] <= 40 and out.interval[1] >= max(300, valley.interval[1])
    assert out.reason.startswith("the two-view count, 40, is only a lower bound")
    # a mode that holds no more than the bound says nothing new
    high = lower_bound(valley.count)
    assert flagging.settled_by_valley(high, table["csl"]) is high
    with pytest.warns(detect.DetectionWarning):
        det = detect.mislabeled(table)
    det.diagnostics.update(count="lower bound", estimator=out.diagnostics)
    assert "at least" not in detect.count_phrase(det)
    assert "likely more" not in detect.count_phrase(det)
    det.diagnostics["estimator"] = {"caveat": "lower bound"}
    assert "likely more" in detect.count_phrase(det)  # the interval starts below the count


def test_two_view_needs_the_margin_view():
    s, _ = _two_modes()
    with pytest.raises(ValueError, match="needs the margin view"):
        detect.mislabeled(s, rule="two_view")
    with pytest.raises(ValueError, match="rule must be one of"):
        detect.mislabeled(s, rule="gmm")


def test_count_estimators_directly():
    table, bad = _two_view_table(5, rate=0.05)
    est = flagging.two_view_count(*_views(table))
    k = int(bad.sum())
    assert est.found and abs(est.count - k) <= 0.15 * k
    assert est.diagnostics["label_lost"] == int((table["aum"] > 0).sum())
    assert [f["clean_components"] for f in est.diagnostics["fits"]] == list(
        flagging.CLEAN_COMPONENTS
    )
    s, truth = _two_modes()
    assert flagging.upper_mode(s).count == pytest.approx(int(truth.sum()), abs=5)


def test_nan_scores_are_never_flagged_and_rank_last():
    table, _ = _two_view_table(2, rate=0.05)
    table = {k: v.clone() for k, v in table.items()}
    for v in table.values():
        v[:10] = float("nan")  # never presented
    det = detect.mislabeled(table)
    assert not det.flagged[:10].any()
    assert set(det.ranking[-10:].tolist()) == set(range(10))


def test_ranking_matches_a_stable_float_sort():
    g = _gen(7)
    for dtype in (torch.float32, torch.float64, torch.float16):
        v = (torch.randn(5000, generator=g) * 3).to(dtype)
        v[::11] = v[2]  # ties
        v[3], v[4], v[5], v[6], v[7] = float("nan"), float("inf"), -float("inf"), -0.0, 0.0
        key = torch.where(
            torch.isfinite(v), v.double(), torch.tensor(-math.inf, dtype=torch.float64)
        )
        want = torch.sort(key, descending=True, stable=True).indices
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", detect.DetectionWarning)
            got = detect.mislabeled(v, rule="fraction", fraction=0.1).ranking
        assert torch.equal(got, want), dtype


def _trajectories(seed=0, n=4000, rate=0.05, epochs=100):
    """Per-presentation probabilities ``p [N, T]`` of the given label, and the flips.

    Clean samples are learned geometrically (``p_t = 1 - 0.9 exp(-t / tau)``, ``tau``
    log-normal around 2 epochs); flips are predicted as another class firmly
    (``p ~ 0.001-0.01``) until the network memorizes them at epoch ``L ~ U(15, 35)``,
    then learned like clean ones. Every flip is fitted long before the end, so with a
    positive margin after memorization its mean margin over 100 epochs would be positive.
    """
    g = _gen(seed)
    t = torch.arange(epochs, dtype=torch.float64)
    tau = torch.exp(math.log(2.0) + 0.6 * torch.randn(n, 1, generator=g, dtype=torch.float64))
    bad = torch.rand(n, generator=g) < rate
    start = torch.where(bad, 15 + 20 * torch.rand(n, generator=g), torch.zeros(n))[:, None]
    low = (0.001 + 0.009 * torch.rand(n, 1, generator=g, dtype=torch.float64)).expand(-1, epochs)
    learned = 1 - 0.9 * torch.exp(-(t - start).clamp(min=0) / tau)
    p = torch.where(bad[:, None] & (t < start), low, learned)
    return p, bad


def _sums(p):
    """The tracker buffers ``(csl_sum, csl_count, p_true_sum)`` of probabilities ``p``."""
    count = torch.full((p.shape[0],), float(p.shape[1]), dtype=torch.float64)
    return -torch.log(p).sum(1), count, p.sum(1)


def test_doubted_finds_memorized_flips_and_does_not_fade_with_training():
    p, bad = _trajectories(0)
    d50 = flagging.doubted(*_sums(p[:, :50]), num_classes=10)
    d100 = flagging.doubted(*_sums(p), num_classes=10)
    # the view stops changing once every sample is fitted (here long before epoch 50)
    assert torch.equal(d50, d100)
    prec, rec = _prf(d100, bad)
    assert prec == 1.0 and rec > 0.9
    # a hesitant hard clean label (p = 0.35 for 30 epochs) and a brief blow-up early in
    # training (p = 1e-5 for two epochs) are not confidently doubted for long
    hard = torch.cat([torch.full((30,), 0.35), torch.full((70,), 0.99)]).double()
    blip = torch.cat([torch.full((2,), 1e-5), torch.full((98,), 0.99)]).double()
    d = flagging.doubted(*_sums(torch.cat([p, hard[None], blip[None]])), num_classes=10)
    assert not d[-2:].any()
    with pytest.raises(ValueError, match="num_classes"):
        flagging.doubted(*_sums(p), num_classes=1)


def test_doubted_threshold_is_the_wrong_classes_share():
    # p* = DOUBT_PROB / (C - 1), the given label's share when the network is 80% sure of
    # other classes: on two classes a label held at 0.15 for 40 of 100 epochs is doubted,
    # one held at 0.3 is not; on ten classes neither is
    fitted = torch.full((200, 100), 0.99, dtype=torch.float64)

    def held(v):
        return torch.cat([torch.full((40,), v), torch.full((60,), 0.99)]).double()[None]

    p = torch.cat([fitted, held(0.15), held(0.3)])
    assert flagging.doubted(*_sums(p), num_classes=2)[-2:].tolist() == [True, False]
    assert not flagging.doubted(*_sums(p), num_classes=10).any()


def test_doubted_span_counts_the_median_as_one_presentation_at_least(monkeypatch):
    # a network that fits the typical sample at its first presentation (median doubt
    # 0.06): a label rejected firmly for 2 presentations is a hesitation, not doubt for
    # long; one rejected for 5 is doubted. Without the floor both would be (3 x 0.06).
    fitted = torch.full((300, 60), 0.999, dtype=torch.float64)

    def rejected(epochs):
        return torch.cat([torch.full((epochs,), 1e-3), torch.full((60 - epochs,), 0.999)])

    p = torch.cat([fitted, rejected(2).double()[None], rejected(5).double()[None]])
    assert flagging.doubted(*_sums(p), num_classes=10)[-2:].tolist() == [False, True]
    assert not flagging.doubted(*_sums(p), num_classes=10)[:-2].any()
    monkeypatch.setattr(flagging, "MIN_DOUBT_UNIT", 0.0)
    assert flagging.doubted(*_sums(p), num_classes=10)[-2:].tolist() == [True, True]


def _tracker_of(p, margin_sum, num_classes=10):
    t = CSLTracker(p.shape[0], num_classes)
    csl, count, p_sum = _sums(p)
    b = t.buffers()
    for k, v in (("csl_sum", csl), ("csl_count", count), ("p_true_sum", p_sum)):
        b[k].copy_(v)
    b["margin_sum"].copy_(margin_sum)
    return t


@pytest.mark.parametrize("seed,rate", [(0, 0.05), (1, 0.10)])
def test_tracker_rule_survives_longer_training(seed, rate):
    """Every mean margin is positive (the network memorized every flip early), so the
    sign of the mean margin pins nothing; the doubt view still anchors the two-view fit."""
    p, bad = _trajectories(seed, rate=rate)
    det = detect.mislabeled(_tracker_of(p, torch.full((p.shape[0],), 50.0)))
    assert det.rule == "auto(two_view)" and det.warning is None
    prec, rec = _prf(det.flagged, bad)
    assert prec >= 0.9 and rec >= 0.9, (prec, rec, det.estimated_count, int(bad.sum()))
    # a tracker without num_classes has only the margin view: nothing is pinned and the
    # rule falls back to the 1-D valley rule, saying why
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        det = detect.mislabeled(_tracker_of(p, torch.full((p.shape[0],), 50.0), None))
    assert det.rule == "auto(valley)"
    assert "negative mean margin" in det.diagnostics["two_view"]["reason"]
    # ... and the detection says what the missing num_classes costs
    assert "has no num_classes" in det.diagnostics["note"]


def test_tracker_rule_on_a_clean_run_flags_nothing():
    p, bad = _trajectories(2, rate=0.0)
    assert not bad.any()
    with pytest.warns(detect.DetectionWarning):
        det = detect.mislabeled(_tracker_of(p, torch.full((p.shape[0],), 50.0)))
    assert len(det) == 0


def test_estimators_refuse_mismatched_inputs_and_take_numpy_ints():
    # IndexError from a boolean mask of the wrong length
    with pytest.raises(ValueError, match=r"must both be \[N\]"):
        flagging.two_view_count(torch.rand(30), torch.zeros(20, dtype=torch.bool))
    # astype(bool) pinned 0.5 and NaN entries of a float mask
    half = torch.full((30,), 0.5)
    with pytest.raises(TypeError, match=r"lost must be a bool mask \[N\], got torch\.float32"):
        flagging.two_view_count(torch.rand(30), half)
    # np.int64(10) (a tracker loaded from numpy metadata) was refused as not an int
    p, _ = _trajectories(0)
    assert torch.equal(
        flagging.doubted(*_sums(p), num_classes=np.int64(10)),
        flagging.doubted(*_sums(p), num_classes=10),
    )


def test_estimators_refuse_bad_arguments_plainly():
    # numpy's "`bins` must be positive", AttributeError for a list, RuntimeError for a
    # short buffer: the caller's mistake in a library's words, or none at all (bins=1)
    s, _ = _two_modes()
    lost = torch.zeros(s.numel(), dtype=torch.bool)
    # (a million bins ran the valley search for minutes)
    for bins in (0, 1, 2.5, True, flagging.MAX_BINS + 1, 10**6):
        with pytest.raises(ValueError, match=r"bins must be an int in \[2, 65536\]"):
            flagging.upper_mode(s, bins=bins)
        with pytest.raises(ValueError, match=r"bins must be an int in \[2, 65536\]"):
            flagging.two_view_count(s, lost, bins=bins)
    assert flagging.upper_mode(s, bins=flagging.MAX_BINS).found
    with pytest.raises(TypeError, match=r"values must be a torch\.Tensor, got list"):
        flagging.upper_mode(s.tolist())
    with pytest.raises(ValueError, match=r"values must be \[N\], got shape \(2, "):
        flagging.upper_mode(s.reshape(2, -1))  # was flattened silently
    with pytest.raises(TypeError, match=r"mean_loss must be a torch\.Tensor"):
        flagging.two_view_count(s.numpy(), lost)
    p, _ = _trajectories(0, n=50)
    csl, count, p_sum = _sums(p)
    with pytest.raises(ValueError, match=r"must all be \[N\], got \(50,\), \(49,\)"):
        flagging.doubted(csl, count[:-1], p_sum, num_classes=10)
    # no usable mean loss is said as such, not as "only 0 samples lost their label"
    est = flagging.two_view_count(torch.zeros(30), torch.ones(30, dtype=torch.bool))
    # presented samples with loss 0 (one class) are not "never presented"
    assert not est.found and "every one of the 30 presented samples is 0" in est.reason
    est = flagging.two_view_count(torch.full((30,), math.nan), torch.ones(30, dtype=torch.bool))
    assert not est.found and "none was presented in training" in est.reason


def test_two_view_count_does_not_depend_on_the_unit_of_the_loss():
    # float64 mean losses above ~1e154 overflowed the bad component's squares, and the
    # count's NaN became a raw "cannot convert float NaN to integer"
    g = _gen(3)
    z = torch.randn(2000, generator=g, dtype=torch.float64) * 0.5
    lost = torch.zeros(2000, dtype=torch.bool)
    lost[-50:] = True
    z[-50:] += 2
    want = flagging.two_view_count(z.exp(), lost)
    assert want.found
    for shift in (250.0, 400.0, 700.0):
        est = flagging.two_view_count((z + shift).exp(), lost)
        assert (est.count, est.interval) == (want.count, want.interval), shift
        fit, ref = est.diagnostics["fits"][0], want.diagnostics["fits"][0]
        assert fit["clean_means"] == pytest.approx([m + shift for m in ref["clean_means"]])


def test_a_one_epoch_tracker_warns_that_early_samples_look_bad():
    # clean digits, one epoch of SGD: each sample's CSL is its loss at its one
    # presentation, and 775-848 of 1,797 clean samples were flagged with no warning
    p, _ = _trajectories(0, rate=0.05)
    t = _tracker_of(p, torch.full((p.shape[0],), 50.0))
    t.epoch = 1
    with pytest.warns(detect.DetectionWarning, match="recorded one epoch") as rec:
        det = detect.mislabeled(t)
    assert len(det) > 0 and det.diagnostics["one_epoch"] is True
    assert det.warning == str(rec[0].message) and "Train several epochs" in det.warning
    for epochs in (0, 2):  # unknown (end_epoch never called), or several
        t.epoch = epochs
        with warnings.catch_warnings():
            warnings.simplefilter("error", detect.DetectionWarning)
            assert detect.mislabeled(t).warning is None
    # end_epoch never called, one presentation each: still one epoch (no warning before)
    one = _tracker_of(p[:, 5:6], torch.full((p.shape[0],), 1.0))
    assert one.epoch == 0
    with pytest.warns(detect.DetectionWarning, match="one presentation per sample"):
        det = detect.mislabeled(one)
    assert len(det) > 0 and det.diagnostics["one_epoch"] is True


def test_a_one_epoch_tracker_that_flags_nothing_says_to_train_longer():
    # the nothing-flagged warning advised "a lower learning rate or fewer epochs", which
    # is backwards for a run of one epoch; and rule='two_view' said that the valley rule,
    # which it never runs, had failed for the two-view fit's reason
    p, _ = _trajectories(0, rate=0.0)
    t = _tracker_of(p[:, 5:6], torch.full((p.shape[0],), 1.0))
    t.epoch = 1
    for rule in ("auto", "two_view"):
        with pytest.warns(detect.DetectionWarning, match="train several epochs") as rec:
            det = detect.mislabeled(t, rule=rule)
        assert len(det) == 0 and det.diagnostics["one_epoch"] is True
        assert det.warning == str(rec[0].message) and "fewer epochs" not in det.warning
        assert ("valley rule" in det.warning) == (rule == "auto"), det.warning
        assert det.warning.count("the two-view fit needs") == 1


def test_the_one_epoch_warning_names_what_each_detector_looks_for():
    # memorized() and duplicates() said "the bad labels", which they do not look for
    p, _ = _trajectories(0, rate=0.05)
    t = _tracker_of(p, torch.full((p.shape[0],), 50.0))
    t.epoch = 1
    targets = {
        detect.mislabeled: "with the bad labels",
        detect.memorized: "with the atypical (memorized) samples",
        detect.duplicates: "with the conflicting duplicates",
    }
    for fn, target in targets.items():
        with pytest.warns(detect.DetectionWarning, match="recorded one epoch"):
            det = fn(t)
        assert target in det.warning, (fn.__name__, det.warning)
        if fn is detect.memorized:
            assert "label" not in det.warning.split("recorded one epoch")[1].split(".")[0]


def _never_fitted(seed=0, n=4000, rate=0.03, hard=0.03, epochs=60):
    """As under data augmentation: flips are never memorized (their label's probability
    stays at 0.002-0.02, the network firmly predicts the true class), and a share
    ``hard`` of clean samples is never fitted either but hesitated over (the label's
    probability stays at 0.25-0.45). Both keep a negative mean margin."""
    g = _gen(seed)
    p, _ = _trajectories(seed, n=n, rate=0.0, epochs=epochs)
    kind = torch.rand(n, generator=g)
    bad, hesitant = kind < rate, (kind >= rate) & (kind < rate + hard)
    firm = 0.002 + 0.018 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    unsure = 0.25 + 0.2 * torch.rand(n, 1, generator=g, dtype=torch.float64)
    p = torch.where(bad[:, None], firm, torch.where(hesitant[:, None], unsure, p))
    margin = torch.where(bad | hesitant, -1.0 * epochs, 5.0 * epochs)
    return p, margin, bad, hesitant


def test_label_lost_pins_firm_losses_not_hesitant_ones():
    p, margin, bad, hesitant = _never_fitted()
    csl, count, p_sum = _sums(p)
    lost = flagging.label_lost(csl, count, p_sum, margin, num_classes=10)
    assert torch.equal(lost, bad)  # every flip, no hesitant clean sample
    # the margin alone pins both, and the count follows the anchors
    alone = flagging.two_view_count(csl / count, margin < 0)
    assert alone.count >= 1.8 * int(bad.sum())
    det = detect.mislabeled(_tracker_of(p, margin))
    assert det.rule == "auto(two_view)" and det.warning is None
    prec, rec = _prf(det.flagged, bad)
    assert prec >= 0.95 and rec >= 0.95, (prec, rec, det.estimated_count, int(bad.sum()))
    # chance is the scale: on 2 classes a constant probability below 0.6 / 2 is firm
    lost2 = flagging.label_lost(csl, count, p_sum, margin, num_classes=2)
    assert torch.equal(lost2, bad | (hesitant & (p[:, 0] < 0.3)))
    assert 0 < int((lost2 & hesitant).sum()) < int(hesitant.sum())


def test_a_tracker_without_num_classes_pins_by_the_margin_alone_and_says_so():
    p, margin, bad, hesitant = _never_fitted()
    without = _tracker_of(p, margin, None)  # fed by update(): no logits gave it C
    with pytest.warns(detect.DetectionWarning, match="has no num_classes") as caught:
        det = detect.mislabeled(without)
    # the hesitant clean samples are pinned too: the count follows them
    assert det.rule == "auto(two_view)" and det.estimated_count >= int((bad | hesitant).sum())
    assert det.warning == str(caught[0].message)
    assert det.warning.startswith(f"csl_fast.detect: {len(det)} flagged")
    assert "CSLTracker(N, num_classes=C)" in det.diagnostics["note"]
    assert detect.summary(det).count("has no num_classes") == 1  # the warning, not the note too
    # the advice works: the same run's state in a tracker with C has both views
    t = CSLTracker(without.num_samples, num_classes=10)
    t.load_state_dict(without.state_dict())
    again = detect.mislabeled(t)
    assert again.warning is None and "note" not in again.diagnostics
    assert torch.equal(again.flagged, detect.mislabeled(_tracker_of(p, margin)).flagged)


def test_label_lost_refuses_bad_arguments_plainly():
    p, margin, _, _ = _never_fitted(n=50)
    csl, count, p_sum = _sums(p)
    with pytest.raises(ValueError, match=r"margin_sum must be \[N\] like csl_sum"):
        flagging.label_lost(csl, count, p_sum, margin[:-1], num_classes=10)
    with pytest.raises(TypeError, match=r"margin_sum must be a torch\.Tensor"):
        flagging.label_lost(csl, count, p_sum, margin.numpy(), num_classes=10)
    with pytest.raises(ValueError, match="label_lost: num_classes must be an int >= 2"):
        flagging.label_lost(csl, count, p_sum, margin, num_classes=1)
