r"""Input-loss curvature (Garg, Ravikumar, Roy 2024), a finite-difference Hessian probe.

For a sample :math:`(x, y)` and the current weights,

.. math::
    \mathrm{Curv}(x) = \frac{1}{n}\sum_{k=1}^{n}
        \big\|\nabla_x \ell(x + h v_k, y) - \nabla_x \ell(x, y)\big\|_2,
    \qquad v_k \in \{-1, +1\}^{d} \text{ Rademacher},

with :math:`h = 10^{-3}` and :math:`n = 10` (the paper's defaults), the model in eval mode.
It approximates :math:`h\,\|H_x v\|`; large values mean a sharp loss around the sample
(memorized, mislabeled). The paper averages it over epochs of training:
:class:`CurvatureAccumulator` does that as a :func:`csl_fast.train.train` callback. Cost:
``n + 1`` forward and backward passes over the data every time it is taken.

The per-sample input gradients come from one backward of the *summed* loss, which is
exact when no layer couples samples (no BatchNorm in train mode; the model is put in eval
mode here). The authors' released code differentiates the batch-*mean* loss instead, which
divides every value by the batch size: the same ranking within equal-sized batches, a
different scale, and a last partial batch weighted differently.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._args import integer
from .._args import seed as seed_arg
from ..model_modes import eval_mode
from ._checks import check_finite, check_xy

__all__ = ["CurvatureAccumulator", "input_curvature"]


def _options(fn: str, h: Any, n: Any, batch_size: Any, seed: Any) -> tuple[float, int, int, int]:
    """``(h, n, batch_size, seed)`` checked, or an error that names the argument."""
    if isinstance(h, bool) or not isinstance(h, numbers.Real):
        raise TypeError(f"{fn}: h must be a number (paper: 1e-3), got {type(h).__name__}")
    # h = 0 made every curvature exactly 0, a valid-looking but empty ranking
    if not (math.isfinite(h) and h > 0):
        raise ValueError(f"{fn}: h must be a finite step > 0 (paper: 1e-3), got {h}")
    return (
        float(h),
        integer(fn, "n", n, low=1),
        integer(fn, "batch_size", batch_size, low=1),
        seed_arg(fn, seed),
    )


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor, top: int) -> torch.Tensor:
    # (a measurement: it must work when called under no_grad or inference_mode, where
    # clone() turns an inference tensor into one that can require grad, or that the loss
    # can save for backward: labels converted under inference_mode are inference tensors)
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone().requires_grad_(True)
        y = y.clone() if y.is_inference() else y
        logits = check_finite(
            "input_curvature",
            model(x),
            "check the model's weights (a NaN weight, or training with too high a learning "
            "rate) and its inputs",
        )
        _check_width(logits, top)
        loss = F.cross_entropy(logits, y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x)
    return g.reshape(g.shape[0], -1)


def _check_width(logits: torch.Tensor, top: int) -> None:
    # F.cross_entropy said only "Target 7 is out of bounds"
    if logits.dim() != 2 or top >= logits.shape[1]:
        raise ValueError(
            f"input_curvature: the model returns logits of shape {tuple(logits.shape)}, but y "
            f"holds labels up to {top}: it needs [B, C] logits with C > {top}"
        )


def _check_float_inputs(fn: str, x: torch.Tensor, h: float) -> None:
    # torch's own refusal ("only Tensors of floating point dtype can require gradients")
    # comes from inside the probe loop and does not say which argument
    if not x.is_floating_point():
        raise TypeError(
            f"{fn}: x must be floating-point inputs (the curvature differentiates the loss "
            f"with respect to them), got {x.dtype}; convert them as the model expects, "
            "e.g. x.float() / 255 for uint8 images"
        )
    if torch.finfo(x.dtype).eps > 1e-4:
        # x + h v rounds back to x: bfloat16 steps by 0.008 near 1, so h = 1e-3 moved 81%
        # of the coordinates nowhere and 60% of the curvatures came out exactly 0
        raise TypeError(
            f"{fn}: x is {x.dtype}, too coarse for the finite-difference step h (x + h v "
            "rounds back to x); measure on a float32 copy of the model: "
            "copy.deepcopy(model).float() with x.float()"
        )
    # The same rounding from the inputs' magnitude: float32 inputs near 2e4 are 2e-3
    # apart, so x + h v moved by one spacing, not h, and the curvatures came out ~2x off.
    # Refused where rounding can move the step by more than 5% of h.
    top = float(x.detach().abs().max()) if x.numel() else 0.0  # (a host sync, once)
    if top * torch.finfo(x.dtype).eps / 2 > 0.05 * h:
        limit = 0.1 * h / torch.finfo(x.dtype).eps
        raise ValueError(
            f"{fn}: x holds values up to {top:.3g}, where {x.dtype} is too coarse for the "
            f"finite-difference step h = {h:g} (x + h v rounds by more than 5% of h past "
            f"|x| = {limit:.3g}); normalise the inputs (and the model with them), measure "
            "on a float64 copy (copy.deepcopy(model).double() with x.double()), or pass a "
            "larger h"
        )


def input_curvature(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    h: float = 1e-3,
    n: int = 10,
    batch_size: int = 1024,
    seed: int = 0,
) -> torch.Tensor:
    """Per-sample input-loss curvature of ``model`` at its current weights.

    Args:
        model: maps ``[B, ...]`` to ``[B, C]`` logits (evaluated in eval mode; its mode is
            restored).
        x: ``[N, ...]`` float32 or float64 inputs; y: ``[N]`` labels. Works under
            ``torch.no_grad`` and ``torch.inference_mode`` too (it differentiates inside).
        h: finite-difference step (paper: 1e-3).
        n: number of Rademacher probes (paper: 10).
        batch_size: samples per forward/backward.
        seed: seeds the probes (a CPU generator: identical across devices). The probes
            are drawn batch by batch, so the same seed with another ``batch_size`` draws
            other probes: the values differ by the estimator's noise (about
            ``1 / sqrt(n)`` relative), not in expectation.

    Returns:
        float32 ``[N]``: mean over the probes of
        ``||grad_x l(x + h v) - grad_x l(x)||`` (higher = sharper = more suspicious).

    Raises:
        TypeError: ``x`` is not floating point (no input gradient exists), or float16 /
            bfloat16, whose rounding is coarser than the step ``h``.
        ValueError: a label is not a class of the model's logits, or ``x`` is so large
            that its dtype's rounding moves the step ``h`` by more than 5% (float32 past
            ``|x| = 0.1 h / eps``, 839 for the default ``h``).
        FloatingPointError: the model predicts non-finite logits, which would make
            every curvature NaN.
    """
    h, n, batch_size, seed = _options("input_curvature", h, n, batch_size, seed)
    x, y = check_xy("input_curvature", x, y)
    _check_float_inputs("input_curvature", x, h)
    top = int(y.max()) if y.numel() else -1  # once: a host sync
    gen = torch.Generator().manual_seed(seed)
    out = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    with eval_mode(model):
        for s in range(0, x.shape[0], batch_size):
            xb, yb = x[s : s + batch_size], y[s : s + batch_size]
            g0 = _input_grad(model, xb, yb, top)
            acc = torch.zeros(xb.shape[0], dtype=torch.float32, device=x.device)
            for _ in range(n):
                v = torch.randint(0, 2, xb.shape, generator=gen).to(xb.device, xb.dtype) * 2 - 1
                gv = _input_grad(model, xb + h * v, yb, top)
                acc += (gv - g0).float().norm(dim=1)
            out[s : s + batch_size] = acc / n
    return out


class CurvatureAccumulator:
    """Average :func:`input_curvature` over the epochs at which it is taken.

    Use as a :func:`csl_fast.train.train` callback::

        curv = CurvatureAccumulator(x, y, epochs=range(0, 200, 10))
        train(model, x, y, epochs=200, callback=curv)
        scores = curv.value  # [N]

    Args:
        x, y: the training inputs and labels (dataset order).
        epochs: the epochs (0-based, after that epoch's training) at which to measure;
            ``None`` = every epoch.
        h, n, batch_size: see :func:`input_curvature`.
        seed: base seed; the probes of epoch ``e`` use ``seed + e``.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        epochs: Iterable[int] | None = None,
        h: float = 1e-3,
        n: int = 10,
        batch_size: int = 1024,
        seed: int = 0,
    ) -> None:
        # now, not after the first training epoch
        self.h, self.n, self.batch_size, self.seed = _options(
            "CurvatureAccumulator", h, n, batch_size, seed
        )
        self.x, self.y = check_xy("CurvatureAccumulator", x, y)
        _check_float_inputs("CurvatureAccumulator", x, self.h)
        # set(5) said only "'int' object is not iterable" (np.int64(5), a 0-d tensor alike)
        if isinstance(epochs, numbers.Number) or getattr(epochs, "ndim", None) == 0:
            raise TypeError(
                f"CurvatureAccumulator: epochs must be the epochs to measure at (an iterable "
                f"such as range(0, total, {epochs!r}) or [{epochs!r}]) or None, got "
                f"{type(epochs).__name__} {epochs!r}"
            )
        # (0-d tensors hash by identity: set(torch.arange(4)) never contained 2)
        self.epochs = (
            None
            if epochs is None
            else {integer("CurvatureAccumulator", "each of epochs", e) for e in epochs}
        )
        self.total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        self.count = 0

    def __call__(self, epoch: int, model: nn.Module) -> None:
        if self.epochs is not None and epoch not in self.epochs:
            return
        # wrapped into manual_seed's range: a seed near 2**64 overflowed there, after the
        # first epoch of training (torch reads a negative seed as its two's complement)
        self.update(model, seed=(self.seed + epoch) % 2**64)

    def update(self, model: nn.Module, seed: int | None = None) -> None:
        """Measure once at the model's current weights and add to the average."""
        c = input_curvature(
            model,
            self.x,
            self.y,
            h=self.h,
            n=self.n,
            batch_size=self.batch_size,
            seed=self.seed if seed is None else seed,
        )
        self.total += c.double()
        self.count += 1

    @property
    def value(self) -> torch.Tensor:
        """float32 ``[N]``: the mean curvature over the measurements (NaN before any,
        with a warning)."""
        if self.count == 0:
            when = "" if self.epochs is None else f" at epochs {sorted(self.epochs)}"
            warnings.warn(
                f"CurvatureAccumulator: no curvature measured yet (it measures{when}, "
                "after that epoch's training); the value is NaN",
                stacklevel=2,
            )
            return torch.full_like(self.total, float("nan"), dtype=torch.float32)
        return (self.total / self.count).float()
