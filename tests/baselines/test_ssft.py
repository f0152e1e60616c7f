"""SSFT: samples whose label the second split contradicts are forgotten at once."""

import pytest

from csl_fast import corrupt, evaluate
from csl_fast.baselines import ssft

from ._synthetic import FAST, blobs, linear


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
