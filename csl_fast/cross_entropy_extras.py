r"""A language-model head's extras in :func:`csl_fast.accumulate` and
:func:`csl_fast.linear_cross_entropy`: logit soft-capping, the z-loss, and the z-loss and
per-token accuracy as side outputs. All off by default; keyword-only.

With logits row :math:`z`, target :math:`y`, ``softcap`` :math:`s` and ``z_loss_scale``
:math:`\zeta`:

- **soft-capping** (Gemma 2): the loss is taken on :math:`z' = s \tanh(z / s)`, computed
  in float32 inside the kernel (no capped copy of the logits); the gradient with respect
  to :math:`z` carries :math:`1 - \tanh^2(z / s)`.
- **z-loss** (PaLM; Liger-Kernel's ``lse_square_scale``): every row whose target is not
  ``ignore_index`` adds :math:`\zeta \operatorname{lse}(z')^2` to the loss, with gradient
  :math:`2 \zeta \operatorname{lse}(z') \operatorname{softmax}(z')`. Reduced like the loss:
  per row for ``'none'`` (0 on ignored rows), summed for ``'sum'``, and for ``'mean'``
  summed and divided by the number of non-ignored rows. It is unweighted; class
  weights together with a z-loss are refused (their 'mean' would divide it by the
  weights' sum). The returned loss includes it; ``return_z_loss=True`` also returns
  the term alone, detached, for logging (0 when ``z_loss_scale`` is 0).
- **per-token accuracy** (``return_token_accuracy=True``): the fraction of non-ignored
  rows whose argmax (first index on ties, as ``torch.argmax``) of :math:`z'` is the target,
  float32, detached; NaN when every row is ignored. With ``reduction='none'`` it is per
  row (1.0 or 0.0; 0.0 on ignored rows), in the loss's shape. Rows whose loss is not
  finite (NaN or inf logits) count as wrong.

**What CSL records** with the extras on: the plain cross entropy of the logits the model
trains on, the soft-capped ones, :math:`\operatorname{lse}(z') - z'_y`, without the
z-loss (as without label smoothing and class weights: training-objective terms that are
not the sample's fit); every other statistic of a tracker is of :math:`z'` too.

When ``return_z_loss`` or ``return_token_accuracy`` is set the call returns a
:class:`CrossEntropyOutput` instead of the loss alone. Soft targets (class probabilities)
and ``inplace_grad=True`` do not take the extras (a clear error says so).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

from .stats import Stat


class CrossEntropyOutput(NamedTuple):
    """What :func:`csl_fast.accumulate` and :func:`csl_fast.linear_cross_entropy` return
    when asked for a side output (a field not asked for is None)."""

    loss: torch.Tensor  #: the loss, z-loss included, differentiable
    z_loss: torch.Tensor | None  #: the z-loss term alone, detached, the loss's dtype
    token_accuracy: torch.Tensor | None  #: float32, detached; per row for 'none'


class Extras(NamedTuple):
    """A call's extras once checked (``softcap`` 0.0 when off)."""

    softcap: float
    z_loss_scale: float
    return_z_loss: bool
    return_token_accuracy: bool

    @property
    def in_kernel(self) -> bool:
        """Whether the loss itself changes (else only side outputs are asked for)."""
        return self.softcap != 0.0 or self.z_loss_scale != 0.0

    @property
    def returns_tuple(self) -> bool:
        return self.return_z_loss or self.return_token_accuracy


def check(
    caller: str,
    softcap: float | None,
    z_loss_scale: float,
    return_z_loss: bool,
    return_token_accuracy: bool,
    weight: torch.Tensor | None = None,
) -> Extras | None:
    """The extras of a call, or None when all are off (the plain path); raises
    ``ValueError``/``TypeError`` naming ``caller`` for values the kernels do not take."""
    if (
        softcap is None
        and not z_loss_scale
        and return_z_loss is False
        and return_token_accuracy is False
    ):
        return None
    for name, flag in (
        ("return_z_loss", return_z_loss),
        ("return_token_accuracy", return_token_accuracy),
    ):
        if not isinstance(flag, bool):
            raise TypeError(f"csl_fast.{caller}: {name} must be True or False, got {flag!r}")
    cap = 0.0
    if softcap is not None:
        # numbers.Real: a NumPy float32 from a config is a number too (as label_smoothing
        # takes it); a tensor is not (reading it would synchronise a GPU).
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(
                f"csl_fast.{caller}: softcap must be a number or None, got {type(softcap).__name__}"
            )
        cap = float(softcap)
        # (comparisons, not math.isfinite: torch.compile(dynamic=True) traces the number
        # as a symbolic float, which math.isfinite cannot take)
        if not 0.0 < cap < math.inf:
            raise ValueError(
                f"csl_fast.{caller}: softcap must be a finite number > 0 (the logits become "
                f"softcap * tanh(logits / softcap)), got {softcap}; pass None for no capping"
            )
    if isinstance(z_loss_scale, bool) or not isinstance(z_loss_scale, numbers.Real):
        raise TypeError(
            f"csl_fast.{caller}: z_loss_scale must be a number, got {type(z_loss_scale).__name__}"
        )
    zs = float(z_loss_scale)
    if not 0.0 <= zs < math.inf:
        raise ValueError(
            f"csl_fast.{caller}: z_loss_scale must be finite and >= 0 (e.g. 1e-4), got "
            f"{z_loss_scale}"
        )
    if zs and weight is not None:
        raise ValueError(
            f"csl_fast.{caller}: the z-loss is not supported with class weights (it is "
            "unweighted, and reduction='mean' would divide it by the weights' sum); pass "
            "weight=None or z_loss_scale=0"
        )
    return Extras(cap, zs, return_z_loss, return_token_accuracy)


def token_accuracy(
    stats: torch.Tensor, target: torch.Tensor, ignore_index: int, reduction: str
) -> torch.Tensor:
    """Per-token accuracy from a batch's ``[NUM_STATS, R]`` statistics (their ``CORRECT``
    row is the argmax test of valid rows): per row for 'none', else the fraction of the
    rows whose target is not ``ignore_index``; no host synchronisation."""
    correct = stats[Stat.CORRECT]
    if reduction == "none":
        return correct
    return correct.sum() / (target != ignore_index).sum(dtype=torch.float32)


def output(
    extras: Extras,
    loss: torch.Tensor,
    z_loss: torch.Tensor | None,
    stats: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    reduction: str,
    loss_shape: tuple[int, ...] | None = None,
) -> torch.Tensor | CrossEntropyOutput:
    """The value a call returns: the loss, or a :class:`CrossEntropyOutput`; per-row
    outputs viewed as ``loss_shape`` (the target's layout) when given."""

    def shaped(t: torch.Tensor) -> torch.Tensor:
        return t.view(loss_shape) if loss_shape is not None and reduction == "none" else t

    if not extras.returns_tuple:
        return shaped(loss)
    zl = None
    if extras.return_z_loss:
        # z_loss_scale 0: the term is off and 0, whatever the backend (some kernels give
        # their 'mean' over no valid row, 0 / 0, where others give 0).
        off = z_loss is None or not extras.z_loss_scale
        zl = torch.zeros_like(loss.detach()) if off else z_loss
        zl = shaped(zl)
    acc = None
    if extras.return_token_accuracy:
        acc = shaped(token_accuracy(stats, target, ignore_index, reduction))
    return CrossEntropyOutput(shaped(loss), zl, acc)
