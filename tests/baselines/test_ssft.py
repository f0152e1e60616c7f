"""SSFT: samples whose label the second split contradicts are forgotten at once."""

import pytest
import torch

from csl_fast import corrupt, evaluate
from csl_fast.baselines import ssft

from ._synthetic import FAST, FLOAT_LABELS, LABEL_FORMS, blobs, diverged, linear


def test_flipped_samples_are_forgotten():
    pytest.importorskip("sklearn")  # evaluate.auroc
    x, y = blobs(120)
    noisy, flipped = corrupt.flip_labels(y, 0.1, num_classes=2, seed=0)
    s = ssft(linear(2), x, noisy, train_kwargs=FAST, seed=0)
    assert s.shape == (120,) and not bool(s.isnan().any())
    assert bool((s[flipped] == 1).all())  # never correct in the second phase
    assert bool((s[~flipped] == 0).all())  # always correct
    assert evaluate.auroc(s, flipped) == 1.0


def test_phase_lengths():
    x, y = blobs(40)
    s = ssft(linear(2), x, y, first_epochs=5, second_epochs=4, train_kwargs=FAST)
    assert bool(((s * 4).round() == s * 4).all())  # a multiple of 1 / second_epochs


def test_refuses_mismatched_labels_and_nan_predictions():
    x, y = blobs(12)
    kw = dict(FAST, epochs=1)
    with pytest.raises(ValueError, match=r"x \(12, 2\) and y \(10,\)"):
        ssft(linear(2), x, y[:10], train_kwargs=kw)
    with pytest.raises(FloatingPointError, match="non-finite"):
        ssft(diverged(2), x, y, train_kwargs=kw)


def test_refuses_an_empty_second_phase_and_a_single_sample():
    x, y = blobs(12)
    with pytest.raises(ValueError, match="at least 1 epoch"):  # every score was NaN
        ssft(linear(2), x, y, first_epochs=1, second_epochs=0, train_kwargs=FAST)
    with pytest.raises(ValueError, match="at least 2 samples"):
        ssft(linear(2), x[:1], y[:1], train_kwargs=FAST)
    # -1 epochs trained nothing in the first phase and scored what was never learned
    with pytest.raises(ValueError, match="first_epochs must be an int >= 0, got -1"):
        ssft(linear(2), x, y, first_epochs=-1, second_epochs=2, train_kwargs=FAST)
    with pytest.raises(TypeError, match=r"second_epochs must be an int, got float 2\.5"):
        ssft(linear(2), x, y, first_epochs=1, second_epochs=2.5, train_kwargs=FAST)
    with pytest.raises(ValueError, match="epochs must be an int >= 0, got -3"):
        ssft(linear(2), x, y, train_kwargs=dict(FAST, epochs=-3))


@pytest.mark.parametrize("form", LABEL_FORMS)
def test_labels_of_any_integer_dtype_array_or_list(form):
    # int32 labels failed deep inside training ("expected target dtype to be Long or Byte")
    x, y = blobs(20)
    kw = dict(FAST, epochs=2)
    want = ssft(linear(2), x, y, train_kwargs=kw)
    assert torch.equal(ssft(linear(2), x, LABEL_FORMS[form](y), train_kwargs=kw), want)


def test_refuses_float_and_negative_labels():
    x, y = blobs(12)
    with pytest.raises(TypeError, match=FLOAT_LABELS):
        ssft(linear(2), x, y.float(), train_kwargs=FAST)
    with pytest.raises(ValueError, match="class indices >= 0, got -100"):  # ignored silently
        ssft(linear(2), x, torch.where(y == 0, -100, y), train_kwargs=FAST)


@pytest.mark.parametrize("key", ["seed", "progress", "callback", "tracker"])
def test_refuses_train_kwargs_it_sets_itself(key):
    # they collided with ssft's own: "train() got multiple values for keyword argument"
    x, y = blobs(12)
    with pytest.raises(ValueError, match=f"ssft: train_kwargs may not hold '{key}'"):
        ssft(linear(2), x, y, train_kwargs={"epochs": 1, key: None})
