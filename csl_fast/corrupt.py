r"""Seeded dataset corruptions for the paper's detection experiments; each returns the
ground-truth mask of corrupted samples.

Both helpers leave their inputs untouched (they return copies) and draw every random
number from a ``torch.Generator`` seeded with ``seed`` on the CPU, so the corruption is
identical across machines and devices.
"""

from __future__ import annotations

import torch

from ._args import integer, rate, share
from ._args import seed as seed_arg

__all__ = ["duplicate_pairs", "flip_labels"]

_FN = "csl_fast.corrupt"


def _tensor(name: str, x: object, dims: str) -> torch.Tensor:
    """``x`` if it is a tensor with at least one dimension, else a clear error (a NumPy
    array or a list met ``'numpy.ndarray' object has no attribute 'dim'``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"csl_fast.corrupt: {name} must be a torch.Tensor {dims}, got {type(x).__name__}; "
            "convert it with torch.as_tensor"
        )
    if x.dim() == 0:
        raise ValueError(f"csl_fast.corrupt: {name} must be {dims}, got a 0-d tensor")
    return x


def _labels(labels: torch.Tensor, num_classes: int | None) -> tuple[torch.Tensor, int]:
    """Checked int64 CPU copy of ``labels`` and the class count ``C``."""
    labels = _tensor("labels", labels, "[N]")
    if labels.dim() != 1:
        raise ValueError(
            f"csl_fast.corrupt: labels must be 1-D [N], got shape {tuple(labels.shape)}"
        )
    # int64(float labels) would truncate 0.5 to 0 and corrupt the wrong classes silently
    if labels.dtype.is_floating_point or labels.dtype.is_complex:
        raise TypeError(
            f"csl_fast.corrupt: labels must be integer class indices, got {labels.dtype}; "
            "convert them with labels.long() if they hold whole numbers"
        )
    if num_classes is None and not labels.numel():
        raise ValueError("csl_fast.corrupt: labels is empty; pass num_classes")
    y = labels.detach().cpu().long()
    c = int(y.max()) + 1 if num_classes is None else integer(_FN, "num_classes", num_classes)
    if c < 2:
        raise ValueError("csl_fast.corrupt: need at least 2 classes to pick a different label")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"csl_fast.corrupt: labels must be in [0, {c})")
    # the new labels are cast back to labels.dtype, which would wrap classes it cannot hold
    top = 1 if labels.dtype == torch.bool else torch.iinfo(labels.dtype).max
    if c - 1 > top:
        raise ValueError(
            f"csl_fast.corrupt: {labels.dtype} labels cannot hold class {c - 1} of "
            f"num_classes={c}; pass labels.long()"
        )
    return y, c


def _different(labels: torch.Tensor, num_classes: int, gen: torch.Generator) -> torch.Tensor:
    """A uniformly random class different from each label: ``(y + U{1..C-1}) mod C``."""
    shift = torch.randint(1, num_classes, labels.shape, generator=gen)
    return (labels + shift) % num_classes


def flip_labels(
    labels: torch.Tensor,
    fraction: float,
    num_classes: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give ``floor(fraction * N)`` random samples a uniformly random *different* class.

    The samples are the first ``floor(fraction * N)`` of a seeded random permutation; each
    new label is drawn uniformly from the ``C - 1`` other classes. The product is taken
    with ``fraction`` as its shortest decimal (``0.29 * 100 = 29``, where the float
    product ``int(0.29 * 100)`` is 28), and ``k / N`` gives ``k`` flips (``1 / 3`` reads
    as ``0.3333333333333333``, whose product with 300 falls just short of 100: the
    integer just above the product counts when ``k / N`` reads back as ``fraction`` in
    its precision, so ``0.3333333333`` of 3000 is 999 flips, not 1000).

    Args:
        labels: ``[N]`` int labels in ``[0, C)``.
        fraction: noise rate ``p`` in ``[0, 1]``.
        num_classes: ``C`` (default ``labels.max() + 1``).
        seed: seeds the choice of samples and of the new labels.

    Returns:
        ``(noisy_labels, flipped)``: a new ``[N]`` label tensor (same dtype and device)
        and a bool ``[N]`` mask with exactly ``floor(fraction * N)`` True entries, which are
        exactly the samples whose label changed.
    """
    # the fraction as written, not its binary float: int(0.29 * 100) is 28
    p = rate("csl_fast.corrupt.flip_labels", "fraction", fraction)
    seed = seed_arg("csl_fast.corrupt.flip_labels", seed)
    y, c = _labels(labels, num_classes)
    n = y.numel()
    k = share(p, n)
    gen = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(n, generator=gen)[:k]
    noisy = y.clone()
    noisy[chosen] = _different(y[chosen], c, gen)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[chosen] = True
    return noisy.to(labels.device, labels.dtype), mask.to(labels.device)


def duplicate_pairs(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    num_pairs: int,
    num_classes: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Make ``num_pairs`` disjoint duplicate pairs with conflicting labels (the paper's setup).

    ``2 * num_pairs`` distinct samples are drawn (a seeded random permutation) and split
    into pairs ``(a, b)``. Sample ``a`` is overwritten with an exact copy of ``x_b`` and
    given a uniformly random label different from ``y_b``; sample ``b`` is untouched. The
    paper uses 250 pairs in CIFAR's 50,000 samples (1% of the samples are positives).

    Args:
        inputs: ``[N, ...]``; labels: ``[N]`` int labels in ``[0, C)``.
        num_pairs: number of pairs, ``0 <= 2 * num_pairs <= N``.
        num_classes: ``C`` (default ``labels.max() + 1``).
        seed: seeds the pairs and the new labels.

    Returns:
        ``(new_inputs, new_labels, mask, pairs)``: copies of the inputs and labels, a bool
        ``[N]`` mask that is True for both members of every pair (``2 * num_pairs``
        entries), and the int64 ``[num_pairs, 2]`` pairs ``(a, b)``.
    """
    fn = "csl_fast.corrupt.duplicate_pairs"
    num_pairs = integer(fn, "num_pairs", num_pairs)
    seed = seed_arg(fn, seed)
    inputs = _tensor("inputs", inputs, "[N, ...]")
    n = _tensor("labels", labels, "[N]").numel()
    if inputs.shape[0] != n:
        raise ValueError(
            f"csl_fast.corrupt.duplicate_pairs: inputs has {inputs.shape[0]} rows, labels {n}"
        )
    if num_pairs < 0 or 2 * num_pairs > n:
        raise ValueError(
            f"csl_fast.corrupt.duplicate_pairs: need 0 <= 2 * num_pairs <= N = {n}, got "
            f"num_pairs={num_pairs}"
        )
    y, c = _labels(labels, num_classes)
    gen = torch.Generator().manual_seed(seed)
    pairs = torch.randperm(n, generator=gen)[: 2 * num_pairs].reshape(num_pairs, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    new_y = y.clone()
    new_y[a] = _different(y[b], c, gen)
    new_x = inputs.detach().clone()
    dev_a, dev_b = a.to(inputs.device), b.to(inputs.device)
    new_x[dev_a] = new_x[dev_b]
    mask = torch.zeros(n, dtype=torch.bool)
    mask[pairs.reshape(-1)] = True
    return new_x, new_y.to(labels.device, labels.dtype), mask.to(labels.device), pairs
