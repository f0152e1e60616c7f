"""The Triton cross entropy with a language-model head's extras: soft-capping and the
z-loss (``csl_fast::cross_entropy_fwd_extra_triton`` and its in-place variant), the same
kernel as :mod:`csl_fast._triton.cross_entropy` with its ``HAS_CAP``/``HAS_ZLOSS``
switches on. Semantics: :func:`csl_fast.reference.cross_entropy_fwd_extra`."""

from __future__ import annotations

import torch

from ._registry import register
from .cross_entropy import _ce_fwd_kernel, _fake_cross_entropy, _launch, _require_supported


def _fake_extra(logits, target, weight, ignore_index, label_smoothing, reduction, softcap, zs):
    loss, grad, stats = _fake_cross_entropy(
        logits, target, weight, ignore_index, label_smoothing, reduction
    )
    return loss, grad, stats, torch.empty_like(loss)


def _fake_extra_inplace(logits, target, weight, ignore, smoothing, reduction, softcap, zs):
    loss, _, stats, zl = _fake_extra(
        logits, target, weight, ignore, smoothing, reduction, softcap, zs
    )
    return loss, stats, zl


def _run(
    logits, target, weight, ignore_index, label_smoothing, reduction, softcap, zs, grad,
    store_grad=True,
):  # fmt: skip
    _require_supported(
        "cross_entropy_fwd_extra_triton", logits, target, weight, label_smoothing, reduction
    )
    batch = logits.shape[0]
    z_rows = torch.zeros((batch,), dtype=torch.float32, device=logits.device)
    loss, stats = _launch(
        logits, target, weight, ignore_index, label_smoothing, reduction, grad,
        softcap=softcap, z_loss_scale=zs, z_rows=z_rows, store_grad=store_grad,
    )  # fmt: skip
    if reduction == 0:
        zl = z_rows
    elif reduction == 2:
        zl = z_rows.sum()
    else:  # the z-loss is refused with class weights: the mean is over the loss's rows
        active = (target != ignore_index) & (target >= 0) & (target < logits.shape[1])
        zl = z_rows.sum() / active.sum(dtype=torch.float32)
    return loss, stats, zl.to(logits.dtype)


@register(
    "csl_fast::cross_entropy_fwd_extra_triton",
    kernel=_ce_fwd_kernel,
    mutates_args=(),
    fake=_fake_extra,
)
def cross_entropy_fwd_extra_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    softcap: float,
    z_loss_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, grad, stats, z_loss)``: :func:`csl_fast._triton.cross_entropy_fwd_triton`
    of the soft-capped logits (``softcap`` 0: off) plus the z-loss (``z_loss_scale`` 0:
    off), which ``z_loss`` holds alone, reduced like the loss."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    loss, stats, zl = _run(
        logits, target, weight, ignore_index, label_smoothing, reduction, softcap,
        z_loss_scale, grad,
    )  # fmt: skip
    return loss, grad, stats, zl


@register(
    "csl_fast::cross_entropy_fwd_extra_stats_triton",
    kernel=_ce_fwd_kernel,
    mutates_args=(),
    fake=_fake_extra_inplace,
)
def cross_entropy_fwd_extra_stats_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    softcap: float,
    z_loss_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_fwd_extra_triton` without the gradient: ``(loss, stats,
    z_loss)``, no logits-sized buffer."""
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    return _run(
        logits, target, weight, ignore_index, label_smoothing, reduction, softcap,
        z_loss_scale, None, store_grad=False,
    )  # fmt: skip


@register(
    "csl_fast::cross_entropy_fwd_extra_inplace_triton",
    kernel=_ce_fwd_kernel,
    mutates_args=("logits",),
    fake=_fake_extra_inplace,
)
def cross_entropy_fwd_extra_inplace_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    softcap: float,
    z_loss_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_fwd_extra_triton` with the gradient written over the
    (contiguous) logits: ``(loss, stats, z_loss)``."""
    if not logits.is_contiguous():
        raise ValueError(
            "csl_fast: the in-place gradient is written over the logits and needs them "
            f"contiguous, got strides {tuple(logits.stride())}"
        )
    return _run(
        logits, target, weight, ignore_index, label_smoothing, reduction, softcap,
        z_loss_scale, None,
    )  # fmt: skip
