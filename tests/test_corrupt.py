"""Corruption helpers: exact counts, invariants, determinism."""

import numpy as np
import pytest
import torch

from csl_fast import corrupt

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.02, 0.05, 0.1, 0.333, 1.0])
@pytest.mark.parametrize("n", [1, 97, 1797])
def test_flip_labels_counts_and_invariants(fraction, n):
    y = torch.randint(0, 10, (n,))
    before = y.clone()
    noisy, mask = corrupt.flip_labels(y, fraction, num_classes=10, seed=3)
    assert mask.dtype == torch.bool and mask.shape == (n,)
    assert int(mask.sum()) == int(fraction * n)
    assert torch.equal(mask, noisy != y)  # flipped <=> changed: always a different class
    assert noisy.dtype == y.dtype and int(noisy.min()) >= 0 and int(noisy.max()) < 10
    assert torch.equal(y, before)  # input untouched


def test_flip_labels_seeded_and_uniform():
    y = torch.zeros(20000, dtype=torch.long)
    a, ma = corrupt.flip_labels(y, 0.5, num_classes=5, seed=1)
    b, mb = corrupt.flip_labels(y, 0.5, num_classes=5, seed=1)
    c, _ = corrupt.flip_labels(y, 0.5, num_classes=5, seed=2)
    assert torch.equal(a, b) and torch.equal(ma, mb) and not torch.equal(a, c)
    counts = torch.bincount(a[ma], minlength=5).float()
    assert counts[0] == 0
    assert torch.allclose(counts[1:] / counts[1:].sum(), torch.full((4,), 0.25), atol=0.02)


def test_flip_labels_two_classes_and_errors():
    y = torch.tensor([0, 1, 0, 1])
    noisy, mask = corrupt.flip_labels(y, 1.0, num_classes=2)
    assert torch.equal(noisy, 1 - y) and bool(mask.all())
    with pytest.raises(ValueError):
        corrupt.flip_labels(y, 1.5)
    with pytest.raises(ValueError):
        corrupt.flip_labels(torch.zeros(3, dtype=torch.long), 0.5, num_classes=1)


@pytest.mark.parametrize("pairs", [0, 1, 5, 48])
def test_duplicate_pairs(pairs):
    n = 97
    x = torch.randn(n, 3, 4)
    y = torch.randint(0, 7, (n,))
    x0, y0 = x.clone(), y.clone()
    nx, ny, mask, p = corrupt.duplicate_pairs(x, y, pairs, num_classes=7, seed=0)
    assert torch.equal(x, x0) and torch.equal(y, y0)  # inputs untouched
    assert p.shape == (pairs, 2) and int(mask.sum()) == 2 * pairs
    assert p.unique().numel() == 2 * pairs  # disjoint pairs
    a, b = p[:, 0], p[:, 1]
    assert torch.equal(nx[a], x[b]) and torch.equal(nx[b], x[b])  # a := exact copy of b
    assert bool((ny[a] != ny[b]).all()) and torch.equal(ny[b], y[b])
    assert torch.equal(mask.nonzero().squeeze(1), p.reshape(-1).sort().values)
    rest = ~mask
    assert torch.equal(nx[rest], x[rest]) and torch.equal(ny[rest], y[rest])
    again = corrupt.duplicate_pairs(x, y, pairs, num_classes=7, seed=0)
    assert torch.equal(again[0], nx) and torch.equal(again[1], ny)


def test_duplicate_pairs_errors():
    x, y = torch.randn(5, 2), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError):
        corrupt.duplicate_pairs(x, y, 3)
    with pytest.raises(ValueError):
        corrupt.duplicate_pairs(x[:4], y, 1)
    # NumPy arrays and lists met "'numpy.ndarray' object has no attribute 'dim'"
    with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor \[N\], got ndarray"):
        corrupt.flip_labels(y.numpy(), 0.2)
    with pytest.raises(TypeError, match=r"labels must be a torch\.Tensor \[N\], got list"):
        corrupt.duplicate_pairs(x, y.tolist(), 1)
    with pytest.raises(ValueError, match=r"inputs must be \[N, \.\.\.\], got a 0-d tensor"):
        corrupt.duplicate_pairs(torch.tensor(1.0), y, 1)


@pytest.mark.parametrize("helper", ["flip", "dup"])
def test_bad_labels_are_refused_with_a_reason(helper):
    def call(y, num_classes=None):
        if helper == "flip":
            return corrupt.flip_labels(y, 1.0, num_classes=num_classes)
        return corrupt.duplicate_pairs(
            torch.zeros(y.numel(), 2), y, y.numel() // 2, num_classes=num_classes
        )

    with pytest.raises(TypeError, match="integer class indices"):
        call(torch.tensor([0.5, 1.5, 0.5]))  # int64 would truncate them to other classes
    with pytest.raises(ValueError, match="1-D"):
        call(torch.tensor([[0, 1], [2, 1]]))
    with pytest.raises(ValueError, match="cannot hold class 299"):
        call(torch.tensor([255, 0, 1], dtype=torch.uint8), num_classes=300)  # would wrap
    with pytest.raises(ValueError, match="pass num_classes"):
        call(torch.zeros(0, dtype=torch.long))


@pytest.mark.parametrize(("fraction", "n", "k"), [(0.29, 100, 29), (0.57, 100, 57), (0.1, 97, 9)])
def test_flip_labels_counts_the_fraction_as_written(fraction, n, k):
    # int(0.29 * 100) is 28: the float product fell just short of the count asked for
    _, mask = corrupt.flip_labels(torch.zeros(n, dtype=torch.long), fraction, num_classes=2)
    assert int(mask.sum()) == k


def test_k_over_n_flips_k_samples():
    # 1/3 reached the count as 0.3333333333333333: 99 flips of 300, and k - 1 for k/N in
    # 38,779 of the 80,199 pairs with N < 400
    for n in range(1, 160):
        for k in range(n + 1):
            _, mask = corrupt.flip_labels(torch.zeros(n, dtype=torch.long), k / n, num_classes=2)
            assert int(mask.sum()) == k, (k, n)
    # a fraction short of k/N by more than rounding still counts down
    _, mask = corrupt.flip_labels(torch.zeros(100, dtype=torch.long), 0.2999999, num_classes=2)
    assert int(mask.sum()) == 29


@pytest.mark.parametrize(
    "fraction",
    [
        np.float32(0.29),
        np.float64(0.29),
        torch.tensor(0.29),
        torch.tensor(0.29, dtype=torch.float64),
    ],
)
def test_a_fraction_of_any_precision_counts_as_written(fraction):
    # float(np.float32(0.29)) is 0.28999999165: 28 flips of 100, as the float product gave
    _, mask = corrupt.flip_labels(torch.zeros(100, dtype=torch.long), fraction, num_classes=2)
    assert int(mask.sum()) == 29


def test_k_over_n_in_float32_flips_k_samples():
    """A float32 k / N falls ~1e-8 short of it (a rate measured as mask.float().mean()):
    5 / 12 of 12 gave 4 flips, as 35,555 k / N with N < 400 gave k - 1."""
    for n in range(1, 80):
        for k in range(n + 1):
            for fraction in (np.float32(k / n), torch.tensor(k / n)):
                _, mask = corrupt.flip_labels(
                    torch.zeros(n, dtype=torch.long), fraction, num_classes=2
                )
                assert int(mask.sum()) == k, (k, n, fraction)


@pytest.mark.parametrize(
    ("fraction", "n"),
    [
        (np.float16(0.1), 1998),
        (torch.tensor(0.1, dtype=torch.float16), 1999),
        (np.float32(0.1), 5_000_009),
        (torch.tensor(0.1), 5_000_009),
        # one ulp of it spans samples: both neighbours read back as 0.1; the floor, as written
        (np.float16(0.1), 1_000_001),
    ],
)
def test_a_low_precision_fraction_of_many_samples_flips_no_extra_one(fraction, n):
    # a relative tolerance of 4 eps grew with N: 200 flips of 1,998 for a float16 0.1,
    # 500,001 of 5,000,009 for a float32 one (floor(0.1 N) documented)
    _, mask = corrupt.flip_labels(torch.zeros(n, dtype=torch.uint8), fraction, num_classes=2)
    assert int(mask.sum()) == n // 10


def test_k_over_n_in_float16_flips_k_samples():
    for n in range(1, 80):
        for k in range(n + 1):
            fraction = np.float16(k / n)
            _, mask = corrupt.flip_labels(torch.zeros(n, dtype=torch.long), fraction, num_classes=2)
            assert int(mask.sum()) == k, (k, n, fraction)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_a_seed_past_the_generators_range_is_named(seed):
    # torch's "Overflow when unpacking long long" named neither the function nor the seed
    y = torch.zeros(10, dtype=torch.long)
    with pytest.raises(ValueError, match=r"flip_labels: seed must be in \[-2\*\*63, 2\*\*64"):
        corrupt.flip_labels(y, 0.2, num_classes=2, seed=seed)
    with pytest.raises(ValueError, match=r"duplicate_pairs: seed must be in"):
        corrupt.duplicate_pairs(torch.randn(10, 2), torch.arange(10) % 3, 2, seed=seed)


def test_counts_and_rates_that_are_not_numbers_are_refused():
    x, y = torch.randn(10, 2), torch.randint(0, 3, (10,))
    # True is an int in Python: it flipped every label
    with pytest.raises(TypeError, match="fraction must be a number in"):
        corrupt.flip_labels(y, True)
    with pytest.raises(TypeError, match="fraction must be a number in"):
        corrupt.flip_labels(y, "0.1")
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\], got nan"):
        corrupt.flip_labels(y, float("nan"))
    # 2.5 failed in a slice, "3" in a comparison, both far from the argument
    for bad in (2.5, "3", True):
        with pytest.raises(TypeError, match="num_pairs must be an int"):
            corrupt.duplicate_pairs(x, y, bad)
    with pytest.raises(TypeError, match="num_classes must be an int"):
        corrupt.flip_labels(y, 0.5, num_classes=3.7)  # int() made it 3
    for count in (np.int64(3), torch.tensor(3)):
        assert corrupt.duplicate_pairs(x, y, count)[3].shape == (3, 2)
