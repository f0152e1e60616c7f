"""Stability memorization on a case whose answer is known.

Inputs are [cluster feature, one-hot sample id]; a linear model can fit any single sample
through its id weight, but only if that sample is in the training subset. An outlier
(label 1 inside the class-0 cluster) is then right exactly when trained on: mem = 1.
Typical samples are right either way: mem = 0.
"""

import pytest
import torch

from csl_fast.baselines import stability_memorization

from ._synthetic import FAST, FLOAT_LABELS, LABEL_FORMS, blobs, diverged, linear


def test_outlier_is_memorized_typical_samples_are_not():
    n = 40
    y = (torch.arange(n) >= n // 2).long()
    feat = torch.where(y == 1, 1.0, -1.0)[:, None]
    y[0] = 1  # the outlier: a class-0 input with label 1
    x = torch.cat([feat, 3 * torch.eye(n)], 1)
    kw = {"epochs": 20, "lr": 1.0, "batch_size": 1024, "momentum": 0.0}
    res = stability_memorization(linear(n + 1), x, y, m=8, train_kwargs=kw, seed=0)
    assert torch.equal(res.n_in + res.n_out, torch.full((n,), 8))
    assert int(res.n_in.sum()) == 8 * int(0.7 * n)  # every subset has int(0.7 N) samples
    ok = (res.n_in > 0) & (res.n_out > 0)
    assert bool(ok[0])
    assert res.memorization[0] == 1.0
    assert torch.equal(
        res.memorization[1:][ok[1:]], torch.zeros(int(ok[1:].sum()), dtype=torch.float64)
    )
    assert res.seconds > 0


def test_nan_when_never_out():
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    res = stability_memorization(
        linear(2), x, y, m=1, subset_fraction=0.5, train_kwargs={"epochs": 1}, seed=0
    )
    assert int(res.memorization.isnan().sum()) == 4  # one model: each sample in or out


def test_sample_outvoted_by_identical_copies_is_not_memorized():
    """Three identical copies labelled 0 and one labelled 1: no model can tell them apart,
    the majority wins whether or not the odd one is trained on, so its stability
    memorization is ~0 (it is *never* fitted: a high-CSL sample, not a memorized one)."""
    n = 40
    y = (torch.arange(n) >= n // 2).long()
    x = torch.where(y == 1, 1.0, -1.0)[:, None] + 0.1 * torch.randn(n, 1)
    x[1:4] = x[0]
    y[0], y[1:4] = 1, 0  # sample 0 disagrees with its three identical copies
    kw = {"epochs": 20, "lr": 1.0, "batch_size": 1024, "momentum": 0.0}
    res = stability_memorization(linear(1), x, y, m=8, train_kwargs=kw, seed=0)
    assert res.p_in[0] == 0.0 and res.p_out[0] == 0.0 and res.memorization[0] == 0.0


def test_refuses_mismatched_labels_and_nan_predictions():
    x, y = blobs(12)
    kw = dict(FAST, epochs=1)
    with pytest.raises(ValueError, match=r"x \(12, 2\) and y \(10,\)"):
        stability_memorization(linear(2), x, y[:10], m=1, train_kwargs=kw)
    with pytest.raises(FloatingPointError, match="non-finite"):  # argmax(NaN) = 0 was "right"
        stability_memorization(diverged(2), x, y, m=1, train_kwargs=kw)


def test_refuses_empty_subsets():
    x, y = blobs(2)
    with pytest.raises(ValueError, match="is 0"):  # models trained on nothing: all NaN
        stability_memorization(linear(2), x, y, m=1, subset_fraction=0.3, train_kwargs=FAST)


def test_subset_size_is_the_fraction_as_written():
    x, y = blobs(90)  # int(0.7 * 90) is 62
    res = stability_memorization(linear(2), x, y, m=1, train_kwargs=dict(FAST, epochs=1))
    assert int(res.n_in.sum()) == 63


@pytest.mark.parametrize("form", LABEL_FORMS)
def test_labels_of_any_integer_dtype_array_or_list(form):
    # int32 labels failed deep inside training ("expected target dtype to be Long or Byte")
    x, y = blobs(20)
    kw = dict(FAST, epochs=2)
    want = stability_memorization(linear(2), x, y, m=2, train_kwargs=kw).memorization
    got = stability_memorization(linear(2), x, LABEL_FORMS[form](y), m=2, train_kwargs=kw)
    assert torch.equal(got.memorization.nan_to_num(-1), want.nan_to_num(-1))
    with pytest.raises(TypeError, match=FLOAT_LABELS):
        stability_memorization(linear(2), x, y.float(), m=1, train_kwargs=kw)


@pytest.mark.parametrize("m", [2.5, True])
def test_refuses_a_number_of_models_that_is_not_an_int(m):
    # m=2.5 failed in range() with "'float' object cannot be interpreted as an integer",
    # m=True trained one model
    x, y = blobs(6)
    with pytest.raises(TypeError, match="stability_memorization: m must be an int"):
        stability_memorization(linear(2), x, y, m=m, train_kwargs={"epochs": 1})


@pytest.mark.parametrize("key", ["seed", "tracker"])
def test_refuses_train_kwargs_it_sets_itself(key):
    # seed collided with the model's own ("got multiple values for keyword argument"); a
    # tracker of N samples recorded the subset's rows 0..size-1 as dataset indices
    x, y = blobs(12)
    with pytest.raises(
        ValueError, match=f"stability_memorization: train_kwargs may not hold '{key}'"
    ):
        stability_memorization(linear(2), x, y, m=1, train_kwargs={"epochs": 1, key: None})


def test_progress_in_train_kwargs_is_forwarded():
    x, y = blobs(12)
    res = stability_memorization(
        linear(2), x, y, m=1, train_kwargs={"epochs": 1, "progress": False}
    )
    assert int(res.n_in.sum()) == int(0.7 * 12)


def test_a_numpy_or_tensor_fraction_is_taken_as_written():
    """np.float32(0.7) of 90 took 62 samples per model (0.7 of 90 is 63)."""
    import numpy as np

    x, y = torch.randn(90, 2), torch.arange(90) % 2
    kw = {"train_kwargs": {"epochs": 1}, "m": 1, "seed": 0}
    for fraction in (0.7, np.float32(0.7), torch.tensor(0.7)):
        res = stability_memorization(linear(2), x, y, subset_fraction=fraction, **kw)
        assert int(res.n_in.sum()) == 63, fraction


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"seed": 1.5}, TypeError, "seed must be an int"),
        ({"subset_fraction": "0.5"}, TypeError, "subset_fraction must be a number"),
        ({"subset_fraction": 1.0}, ValueError, r"subset_fraction must be in \(0, 1\)"),
        # said "must be in [0, 1]", which reads as if 0 and 1 were taken
        ({"subset_fraction": 1.5}, ValueError, r"subset_fraction must be in \(0, 1\), got 1.5"),
        ({"subset_fraction": float("nan")}, ValueError, r"must be in \(0, 1\), got nan"),
    ],
)
def test_bad_options_are_named(kwargs, error, match):
    x, y = torch.randn(8, 2), torch.arange(8) % 2
    with pytest.raises(error, match=match):
        stability_memorization(linear(2), x, y, m=1, train_kwargs={"epochs": 1}, **kwargs)


def test_a_model_narrower_than_the_labels_is_refused_whatever_the_subsets():
    # train checks its subset's labels only: a class no subset held was never predicted
    x, _ = blobs(30)
    y = torch.zeros(30, dtype=torch.long)
    y[1] = 2
    with pytest.raises(ValueError, match="returns 2 logits, but y holds labels up to 2"):
        stability_memorization(linear(2), x, y, m=1, subset_fraction=0.5, train_kwargs=FAST)
