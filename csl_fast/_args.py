"""Checks of the plain-number arguments of the public functions (counts, sizes, rates).

What a user passes for a number may be a Python number, a NumPy scalar or a 0-d tensor;
a bool is refused although Python counts it as an int (``flip_labels(y, True)`` flipped
every label), and so is a float or a string where a count is meant (``2.5`` pairs).
"""

from __future__ import annotations

import math
import numbers
import operator
from fractions import Fraction
from typing import Any

import numpy as np
import torch


def _is_bool(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return value.dtype == torch.bool
    return isinstance(value, bool | np.bool_)


def check_flags(op: str, none_ok: bool = True, **flags: Any) -> None:
    """Each flag is True or False (or None, the default's choice, where ``none_ok``): a
    string from a config ("False", "no") is truthy, and was taken as True."""
    for name, value in flags.items():
        if not (isinstance(value, bool | np.bool_) or (none_ok and value is None)):
            allowed = "True, False or None" if none_ok else "True or False"
            raise TypeError(f"{op}: {name} must be {allowed}, got {value!r}")


def integer_labels(dtype: torch.dtype) -> bool:
    """Whether a tensor of ``dtype`` holds integer class labels (not float, complex, whose
    real part a cast keeps silently, or bool)."""
    return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)


def class_indices(labels: torch.Tensor) -> bool:
    """Whether ``labels`` are one integer class index per sample (1-D, :func:`integer_labels`)."""
    return labels.dim() == 1 and integer_labels(labels.dtype)


def label_range(labels: torch.Tensor) -> tuple[int, int]:
    """``(min, max)`` of a non-empty integer label tensor of any integer dtype, exactly
    (torch has no min/max for uint16/uint32/uint64, and a cast to int64 would wrap uint64
    values past its range)."""
    values = labels.detach().cpu().numpy()
    return int(values.min()), int(values.max())


def int64_labels(fn: str, labels: torch.Tensor) -> torch.Tensor:
    """Integer ``labels`` of any integer dtype as int64 (the dtype torch's ops take; uint16
    and uint32 have no comparisons), refusing uint64 values that int64 would wrap."""
    if labels.dtype == torch.uint64 and labels.numel():  # the one dtype .long() can wrap
        high = label_range(labels)[1]
        if high > torch.iinfo(torch.int64).max:
            raise ValueError(f"{fn}: labels past int64's range ({high})")
    return labels.long()


def device(fn: str, value: Any, advice: str) -> torch.device:
    """The device ``value`` names, as tensors land on it ("cuda" becomes "cuda:0", the
    current device), or a ``ValueError`` naming ``fn``: torch's own errors ("Expected one of
    cpu, cuda, ...", "Torch not compiled with CUDA enabled") named neither the function nor
    the argument. ``advice`` says where to run instead ("create the tracker")."""
    try:
        return torch.empty(0, device=value).device
    except (AssertionError, RuntimeError, TypeError) as exc:
        # torch's lazy CUDA init asserts ("Torch not compiled with CUDA enabled")
        raise ValueError(
            f"{fn}: cannot allocate on device {value!r} ({exc}); {advice} on 'cpu' or on a "
            "device this torch build and machine have"
        ) from None


def integer(fn: str, name: str, value: Any, low: int | None = None) -> int:
    """``value`` as an int (a Python int, NumPy integer or 0-d integer tensor) ``>= low``."""
    try:
        if _is_bool(value):
            raise TypeError
        out = operator.index(value)
    except TypeError:
        raise TypeError(
            f"{fn}: {name} must be an int, got {type(value).__name__} {value!r}"
        ) from None
    if low is not None and out < low:
        raise ValueError(f"{fn}: {name} must be an int >= {low}, got {out}")
    return out


class Rate(Fraction):
    """A :func:`rate`: the number as written, and ``dtype``, the floating-point type it was
    given in (float64 for a Python number), in which ``k / N`` reads back as it."""

    dtype: type = np.float64


def _reads_as(p: Fraction, k: int, n: int) -> bool:
    """Whether ``k / n`` written in ``p``'s precision is the number ``p`` was given as: a
    relative tolerance let the slack grow with ``n`` (a float32 0.1 of 5,000,009 samples
    flipped 500,001, a float16 one of 1,998 flipped 200)."""
    t = getattr(p, "dtype", np.float64)
    return n > 0 and t(k / n) == t(float(p))


def seed(fn: str, value: Any, offset: int = 0) -> int:
    """A seed for ``torch.Generator.manual_seed``, which takes ``[-2**63, 2**64)``, checked
    with the largest ``offset`` the caller adds to it (``seed + epoch``): past the range,
    torch's "Overflow when unpacking long long" named neither the function nor the seed,
    and ``CurvatureAccumulator`` raised it only after the first epoch of training."""
    out = integer(fn, "seed", value)
    if not -(2**63) <= out <= 2**64 - 1 - offset:
        plus = f" (it adds up to {offset} to it)" if offset else ""
        raise ValueError(f"{fn}: seed must be in [-2**63, 2**64 - {1 + offset}]{plus}, got {out}")
    return out


def share(p: Fraction, n: int) -> int:
    """``floor(p * n)`` for a :func:`rate` ``p``, or the integer ``k`` just above the
    product when ``k / n`` reads back as ``p`` in its precision: ``k / N`` reaches
    :func:`rate` as its float's shortest decimal (``1 / 3`` as ``0.3333333333333333``),
    whose product with ``N`` falls just short of ``k`` (99 samples for a third of 300; a
    float32 ``5 / 12`` of 12 gave 4)."""
    product = p * n
    up, down = math.ceil(product), math.floor(product)
    # (at a large N both read back, as one ulp of p spans samples: the floor, as written)
    return up if _reads_as(p, up, n) and not _reads_as(p, down, n) else down


def share_up(p: Fraction, n: int) -> int:
    """``ceil(p * n)``, the fewest of ``n`` that reach the :func:`rate` ``p``, or the
    integer ``k`` just below the product when ``k / n`` reads back as ``p`` in its precision,
    as :func:`share` reads one above."""
    product = p * n
    up, down = math.ceil(product), math.floor(product)
    return down if _reads_as(p, down, n) and not _reads_as(p, up, n) else up


def rate(fn: str, name: str, value: Any) -> Fraction:
    """A rate in ``[0, 1]`` as written: the shortest decimal of its own precision.

    ``int(0.29 * 100)`` is 28 and so is ``int(float(np.float32(0.29)) * 100)``; the shortest
    decimal that reads back as the same number (``0.29`` for both) gives 29.
    """
    v = value.detach().cpu() if isinstance(value, torch.Tensor) else value
    if isinstance(v, torch.Tensor) and v.dim() == 0 and not _is_bool(v):
        v = v.float().numpy()[()] if v.dtype == torch.bfloat16 else v.numpy()[()]
    if _is_bool(v) or not isinstance(v, numbers.Real):
        raise TypeError(f"{fn}: {name} must be a number in [0, 1], got {type(value).__name__}")
    if not 0 <= v <= 1:  # NaN too
        raise ValueError(f"{fn}: {name} must be in [0, 1], got {value}")
    if isinstance(v, np.floating):
        out = Rate(np.format_float_positional(v, unique=True, trim="0"))
        out.dtype = v.dtype.type
        return out
    return Rate(repr(float(v)))
