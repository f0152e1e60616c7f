"""Evaluation helpers against scikit-learn and hand-computed values."""

import math

import numpy as np
import pytest
import torch

from csl_fast import evaluate as E

sklearn_metrics = pytest.importorskip("sklearn.metrics")  # E.auroc etc. wrap scikit-learn
average_precision_score = sklearn_metrics.average_precision_score
roc_auc_score, roc_curve = sklearn_metrics.roc_auc_score, sklearn_metrics.roc_curve

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _case(seed=0, n=500):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.1
    scores = rng.normal(size=n) + 1.5 * labels
    return torch.tensor(scores), torch.tensor(labels)


def test_auroc_aupr_match_sklearn():
    s, y = _case()
    assert E.auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()))
    assert E.aupr(s, y) == pytest.approx(average_precision_score(y.numpy(), s.numpy()))
    assert E.auroc(s.float(), y) == pytest.approx(E.auroc(s, y), abs=1e-6)


def test_hand_computed_metrics():
    s = [0.9, 0.8, 0.7, 0.6, 0.5]
    y = [1, 0, 1, 0, 0]
    # positive/negative pairs ordered correctly: (0.9 > all 3) + (0.7 > 0.6, 0.5) = 5 of 6
    assert E.auroc(s, y) == pytest.approx(5 / 6)
    # average precision: precision at each positive = 1/1, 2/3
    assert E.aupr(s, y) == pytest.approx((1 + 2 / 3) / 2)
    # TPR reaches 1 (>= 0.95) at threshold 0.7: FPR = 1/3
    assert E.fpr_at_tpr(s, y) == pytest.approx(1 / 3)
    assert E.fpr_at_tpr([1, 2, 3, 4], [0, 0, 1, 1]) == 0.0
    assert E.auroc([1, 1, 1], [0, 1, 0]) == 0.5


def test_fpr_at_tpr_matches_roc_curve():
    s, y = _case(1, 2000)
    fpr, tpr, _ = roc_curve(y.numpy(), s.numpy(), drop_intermediate=False)
    expect = fpr[tpr >= 0.95].min()
    assert E.fpr_at_tpr(s, y) == pytest.approx(expect)
    m = E.detection_metrics(s, y)
    assert set(m) == {"auroc", "aupr", "fpr@95tpr"}


def test_cosine_pearson_hand_values():
    a, b = [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]
    assert E.cosine_similarity(a, b) == pytest.approx(0.5)  # 1 / (sqrt2 sqrt2)
    assert E.pearson(a, b) == pytest.approx(-0.5)
    x = np.random.default_rng(0).normal(size=50)
    assert E.pearson(x, 3 * x + 2) == pytest.approx(1.0)
    assert E.cosine_similarity(x, -x) == pytest.approx(-1.0)
    assert E.pearson(x, x**2) == pytest.approx(np.corrcoef(x, x**2)[0, 1])
    assert math.isnan(E.pearson([1, 1, 1], [1, 2, 3]))


def test_similarity_top_k():
    mem = np.array([0.0, 0.9, 0.1, 0.8, 0.5])
    s = np.array([1.0, 2.0, 0.0, 3.0, 1.0])
    out = E.similarity(s, mem, top_k=3)  # top-3 memorized: indices 1, 3, 4
    assert out["cs_top"] == pytest.approx(E.cosine_similarity(s[[1, 3, 4]], mem[[1, 3, 4]]))
    assert out["pc_top"] == pytest.approx(np.corrcoef(s[[1, 3, 4]], mem[[1, 3, 4]])[0, 1])
    assert out["pc_all"] == pytest.approx(np.corrcoef(s, mem)[0, 1])


def test_binned_trend():
    ref = np.array([5.0, 1, 4, 2, 3, 0])
    other = ref * 10
    out = E.binned_trend(ref, other, bins=3)
    assert out["x"] == [0.5, 2.5, 4.5] and out["y"] == [5.0, 25.0, 45.0]
    assert out["count"] == [2, 2, 2] and out["y_std"] == [5.0, 5.0, 5.0]
    assert E.binned_trend(np.arange(7.0), np.arange(7.0), 3)["count"] == [3, 2, 2]


def test_binned_trend_keeps_ties_in_one_bin_whatever_the_sample_order():
    # split by dataset order, the tied zeros' bin means changed with the sample order
    ref = np.array([0.0, 0, 0, 0, 0, 0, 1, 2])
    other = np.array([1.0, 0, 0, 1, 0, 0, 5, 6])
    out = E.binned_trend(ref, other, bins=4)
    assert out["count"] == [6, 2] and out["x"] == [0.0, 1.5]
    assert out["y"] == pytest.approx([1 / 3, 5.5])
    for perm in ([1, 2, 4, 5, 0, 3, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]):
        assert E.binned_trend(ref[perm], other[perm], bins=4) == pytest.approx(out)
    # a cut inside a run moves to its nearer end: [0 0 0 1 | 1 1 1 1 2 2]
    ref = np.array([0.0, 0, 0, 1, 1, 1, 1, 1, 2, 2])
    assert E.binned_trend(ref, ref, bins=2)["count"] == [3, 7]
    assert E.binned_trend(ref, ref, bins=5)["count"] == [3, 5, 2]


def test_top_k_leaves_out_a_run_of_ties_across_the_kth():
    # ties broken by index put 30 zero-memorization samples of the published digits run
    # in its "179 most memorized"
    mem = np.array([0.0, 0.9, 0.0, 0.5, 0.0, 0.5])
    assert E.top_k_indices(mem, 2).tolist() == [1]
    assert E.top_k_indices(mem, 3).tolist() == [1, 3, 5]
    assert E.top_k_indices(mem, 4).tolist() == [1, 3, 5]
    assert sorted(E.top_k_indices(np.zeros(5), 2).tolist()) == list(range(5))  # all tied
    s = np.array([1.0, 3.0, 2.0, 2.0, 0.5, 1.5])
    out = E.similarity(s, mem, top_k=4)
    assert out["n_top"] == 3
    assert out["cs_top"] == pytest.approx(E.cosine_similarity(s[[1, 3, 5]], mem[[1, 3, 5]]))
    perm = np.array([5, 4, 3, 2, 1, 0])
    assert E.similarity(s[perm], mem[perm], top_k=4) == pytest.approx(out)


def test_errors():
    with pytest.raises(ValueError, match="non-finite"):
        E.auroc([0.1, float("nan")], [0, 1])
    with pytest.raises(ValueError, match="both"):
        E.auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError):
        E.binned_trend([1, 2], [1, 2], bins=3)


@pytest.mark.parametrize(
    "call, match",
    [
        # class labels or NaN passed for a mask counted as positives under bool()
        (lambda: E.auroc([0.1, 0.5, 0.2], [0, 2, 0]), "ground-truth mask"),
        (lambda: E.auroc([0.1, 0.5, 0.2], [0.0, 0.7, 0.0]), "ground-truth mask"),
        (lambda: E.auroc([0.1, 0.5, 0.2], [math.nan, 1, 0]), "labels has 1 non-finite"),
        (lambda: E.auroc(torch.rand(3, device="meta"), [0, 1, 0]), "meta tensor"),
        (lambda: E.auroc(torch.rand(3, dtype=torch.cfloat), [0, 1, 0]), "complex tensor"),
        # IndexError from inside the ROC curve, or a silent 0.0
        (
            lambda: E.fpr_at_tpr([0.1, 0.5, 0.2], [0, 1, 0], tpr=1.5),
            r"number in \[0, 1\]",
        ),
        (
            lambda: E.fpr_at_tpr([0.1, 0.5, 0.2], [0, 1, 0], tpr=-1),
            r"number in \[0, 1\]",
        ),
        # top_k=-1 took all but the last sample, 0 gave NaN with RuntimeWarnings
        (lambda: E.similarity([1.0, 2, 3], [1.0, 2, 4], top_k=-1), "top_k must be an int >= 1"),
        (lambda: E.similarity([1.0, 2, 3], [1.0, 2, 4], top_k=0), "top_k must be an int >= 1"),
        # numpy's matmul error, or NaN with RuntimeWarnings
        (lambda: E.pearson([1.0, 2, 3], [1.0, 2]), "a has 3 entries, b 2"),
        (lambda: E.cosine_similarity([1.0, 2, 3], [1.0, 2]), "a has 3 entries, b 2"),
        (lambda: E.pearson([], []), "are empty"),
        (lambda: E.binned_trend([], [], bins=1), "are empty"),
        (lambda: E.binned_trend([1.0, 2, 3], [1.0, 2, 3], bins=1.5), "bins must be an int in"),
    ],
)
def test_bad_inputs_are_refused_plainly(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_masks_of_numbers_and_bools_agree():
    s, y = _case()
    assert E.auroc(s, y.int()) == E.auroc(s, y.numpy()) == E.auroc(s, y.tolist()) == E.auroc(s, y)


def test_inputs_must_be_one_value_per_sample():
    """Scores and labels were flattened: [3, 2] scores against [6] labels, or [2, 3]
    against [3, 2], gave an AUROC; None read as one NaN; complex lost its imaginary part."""
    s = np.arange(6.0)
    y = np.array([0, 1, 0, 1, 1, 0], dtype=bool)
    with pytest.raises(ValueError, match=r"scores must be 1-D \[N\].*got shape \(3, 2\)"):
        E.auroc(s.reshape(3, 2), y)
    with pytest.raises(ValueError, match=r"labels must be 1-D \[N\].*got shape \(3, 2\)"):
        E.aupr(s, y.reshape(3, 2))
    with pytest.raises(TypeError, match="labels must be a 1-D array or tensor"):
        E.auroc(s, None)
    with pytest.raises(ValueError, match="scores must be real"):
        E.auroc(s + 1j, y)
    assert E.auroc(torch.tensor(s), torch.tensor(y)) == E.auroc(s, y)


def test_pearson_of_a_constant_with_a_rounding_residue_is_nan():
    """Centring left a residue in this constant vector, and the correlation read 0.0."""
    constant = np.full(42, 269.7867137638703)
    assert math.isnan(E.pearson(constant, np.arange(42.0)))
    assert math.isnan(E.similarity(constant, np.arange(42.0))["pc_all"])


@pytest.mark.parametrize(
    "labels",
    [
        torch.tensor([0, 1, 0, 1], dtype=torch.bfloat16),
        torch.tensor([0.0, 1, 0, 1], requires_grad=True),
        torch.tensor([0, 1, 0, 1], dtype=torch.float16),
    ],
    ids=["bfloat16", "requires-grad", "float16"],
)
def test_masks_of_any_float_tensor(labels):
    # np.asarray(labels) ran before .detach().cpu(): bfloat16 raised a TypeError,
    # requires_grad "Can't call numpy() on Tensor that requires grad"
    assert E.auroc([0.1, 0.9, 0.2, 0.8], labels) == 1.0


def test_tpr_and_top_k_as_tensors():
    # "tpr must be in [0, 1], got tensor(0.5000)"; top_k=tensor(2) refused
    s, y = [0.1, 0.9, 0.2, 0.8], [0, 1, 0, 1]
    assert E.fpr_at_tpr(s, y, tpr=torch.tensor(0.5)) == E.fpr_at_tpr(s, y, tpr=0.5)
    assert E.similarity(s, s, top_k=torch.tensor(2)) == E.similarity(s, s, top_k=2)
    with pytest.raises(TypeError, match="top_k must be an int, got float"):
        E.similarity(s, s, top_k=2.5)


@pytest.mark.parametrize("scale", [1e-200, 1e200, 1.0])
def test_similarity_of_tiny_and_huge_vectors(scale):
    # the norm product under- or overflowed: NaN for vectors that are neither zero nor
    # constant (scipy's pearsonr gives 1.0)
    a = np.array([1.0, -1.0, 0.0, 2.0]) * scale
    assert E.pearson(a, a) == 1.0
    assert E.cosine_similarity(a, a) == 1.0
    assert E.pearson(a, -a) == -1.0
    b = np.array([2.0, 1.0, 0.5, -1.0]) * scale
    want = float(np.corrcoef([1.0, -1.0, 0.0, 2.0], [2.0, 1.0, 0.5, -1.0])[0, 1])
    assert E.pearson(a, b) == pytest.approx(want, rel=1e-12)
    assert math.isnan(E.cosine_similarity(a, np.zeros(4)))


@pytest.mark.parametrize("tpr", [0.8, np.float32(0.8), torch.tensor(0.8)])
def test_fpr_at_tpr_reads_a_float32_rate_as_written(tpr):
    # float32 0.8 is 0.800000011920929: the point where 4 of 5 positives are found (FPR 0)
    # was skipped for the next one (FPR 0.8)
    s, y = [10, 9, 8, 7, 6, 5, 4, 3, 2, 1], [1, 1, 1, 1, 0, 0, 0, 0, 1, 0]
    assert E.fpr_at_tpr(s, y, tpr) == 0.0
    third = [1, 0, 1, 0, 1, 0]
    assert E.fpr_at_tpr([6, 5, 4, 3, 2, 1], third, torch.tensor(2.0) / 3) == pytest.approx(1 / 3)
    assert E.fpr_at_tpr(s, y, np.float32(0.81)) == 0.8  # past 4 of 5, it takes the 5th


def test_pearson_of_values_near_the_float_maximum():
    # x.mean() overflowed to inf: NaN for finite values
    assert E.pearson([1e308, 1.7e308, 1.5e308], [1, 2, 3]) == pytest.approx(
        E.pearson([1.0, 1.7, 1.5], [1, 2, 3])
    )
