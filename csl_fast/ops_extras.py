"""The fused cross entropy with a language-model head's extras: soft-capping and the z-loss.

``csl_fast::cross_entropy_fwd_extra`` (schema in ``csrc/csl_fast.cpp``; C++ CPU and CUDA
kernels, ``cross_entropy_fwd_extra_triton`` in ``csl_fast/_triton``) is
``cross_entropy_fwd`` with two more arguments and one more output:

- ``softcap`` ``s > 0``: the loss, its gradient and the statistics are of
  :math:`z' = s \\tanh(z / s)`; the gradient carries the chain rule
  :math:`\\partial z' / \\partial z = 1 - \\tanh^2(z / s)`. 0: off.
- ``z_loss_scale`` :math:`\\zeta \\ge 0`: :math:`\\zeta \\operatorname{lse}(z')^2` is added
  to every non-ignored row's objective (unweighted; refused with class weights), its
  gradient :math:`2 \\zeta \\operatorname{lse}(z') \\operatorname{softmax}(z')` to the row's,
  and reduced like the loss ('mean' over the non-ignored rows) it is also returned alone.

The ops with these off (``csl_fast.ops.cross_entropy_fwd``) are separate, so the hot path
pays nothing for them. Plain PyTorch semantics: :func:`csl_fast.reference.cross_entropy_extra`.
"""

from __future__ import annotations

import torch

from . import ops_backward, reference
from ._ext import _C, resolve_backend
from .accumulate_checks import widen_for_ignore_index
from .fake_kernels import register_fake
from .ops import (
    _LOW_PRECISION,
    _mean_denominator,
    _op,
    _per_row,
    _refuse_double_backward,
    _wants_grad,
    refuse_transforms,
)
from .stats import NUM_STATS

_EXTRA_OPS = {
    "cpu": "cross_entropy_fwd_extra",
    "cuda": "cross_entropy_fwd_extra",
    "triton": "cross_entropy_fwd_extra_triton",
}
# Loss, statistics and z-loss only: no logits-sized gradient formed or allocated.
_EXTRA_STATS_OPS = {
    "cpu": "cross_entropy_fwd_extra_stats",
    "cuda": "cross_entropy_fwd_extra_stats",
    "triton": "cross_entropy_fwd_extra_stats_triton",
}
_EXTRA_INPLACE_OPS = {
    "cpu": "cross_entropy_fwd_extra_inplace",
    "cuda": "cross_entropy_fwd_extra_inplace",
    "triton": "cross_entropy_fwd_extra_inplace_triton",
}


def cross_entropy_fwd_extra(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    softcap: float,
    z_loss_scale: float,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(loss, stats, z_loss)``: ``loss`` (differentiable, z-loss included) and the detached
    ``z_loss`` as :func:`csl_fast.reference.cross_entropy_extra`, ``stats`` of the
    soft-capped logits. ``reduction`` 0 (none), 1 (mean) or 2 (sum)."""
    target = widen_for_ignore_index(target, ignore_index)  # as ops.cross_entropy_fwd
    name = resolve_backend(backend, logits.device, logits.dtype)
    if name == "reference":
        loss, zl = reference.cross_entropy_extra(
            logits, target, weight, ignore_index, label_smoothing, reduction, softcap, z_loss_scale
        )
        stats = reference.row_statistics(logits.detach(), target, ignore_index, softcap)
        return loss, stats, zl.detach()
    refuse_transforms(name, logits)
    args = (target, weight, ignore_index, label_smoothing, reduction, softcap, z_loss_scale)
    if logits.dtype not in _LOW_PRECISION and not _wants_grad(logits, weight):
        return _op(name, _EXTRA_STATS_OPS)(logits, *args)  # no gradient formed
    # float16/bfloat16, grad or not: the Function, whose forward forms no gradient either and
    # reduces 'mean' in float32, as it always has.
    loss, _, stats, zl, _ = _ExtraCrossEntropy.apply(logits, *args, name)
    return loss, stats, zl


class _ExtraCrossEntropy(torch.autograd.Function):
    """The extras' fused op under autograd: backward scales the forward's gradient by the
    upstream gradient; for float16/bfloat16 the forward forms no gradient, and backward
    forms it from the saved logits and statistics in float32, one elementwise pass, and
    rounds once after the scale (as ``csl_fast.ops._RoundOnceCrossEntropy``, which says
    why)."""

    @staticmethod
    def forward(logits, target, weight, ignore_index, smoothing, reduction, softcap, zs, name):
        low = logits.dtype in _LOW_PRECISION
        args = (logits, target, weight, ignore_index, smoothing, reduction, softcap, zs)
        if low:
            grad = None
            loss, stats, zl = _op(name, _EXTRA_STATS_OPS)(*args)
        else:
            loss, grad, stats, zl = _op(name, _EXTRA_OPS)(*args)
        denom = None
        if low and reduction == 1:
            # The z-loss is refused with class weights, so D counts its rows too.
            denom = _mean_denominator(target, weight, ignore_index, logits.shape[1], name)
        return loss, grad, stats, zl, denom

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        logits, target, weight, ctx.ignore_index, ctx.smoothing, ctx.reduction = inputs[:6]
        ctx.softcap, ctx.zs, ctx.name = inputs[6:]
        _, grad, stats, zl, denom = output
        ctx.mark_non_differentiable(*(t for t in (grad, stats, zl) if t is not None))
        if grad is None:
            ctx.save_for_backward(logits, target, weight, stats, denom)
        else:
            ctx.save_for_backward(grad, target)

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        _refuse_double_backward()
        if grad_loss is None:
            return (None,) * 9
        if len(ctx.saved_tensors) == 2:
            grad, target = ctx.saved_tensors
            factor = _per_row(grad_loss, ctx.reduction, target, ctx.ignore_index)
            return (grad * factor, *(None,) * 8)
        logits, target, weight, stats, denom = ctx.saved_tensors
        scale = grad_loss.float()
        scale = scale if denom is None else scale / denom
        args = (ctx.ignore_index, ctx.smoothing, ctx.softcap, ctx.zs)
        grad = ops_backward.cross_entropy_bwd(
            logits, target, weight, stats, scale, *args, backend=ctx.name
        )
        return (grad, *(None,) * 8)


def cross_entropy_fwd_extra_with_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    softcap: float,
    z_loss_scale: float,
    backend: str = "auto",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The extras' fused op itself, ``(loss, grad, stats, z_loss)`` with ``grad`` the
    gradient for a unit upstream gradient, for callers that build their own backward
    (:func:`csl_fast.linear_cross_entropy`); call it with autograd off. ``inplace``:
    ``grad`` is ``logits``, overwritten (the reference backend returns a new buffer)."""
    target = widen_for_ignore_index(target, ignore_index)  # as ops.cross_entropy_fwd
    name = resolve_backend(backend, logits.device, logits.dtype)
    args = (target, None, ignore_index, label_smoothing, reduction, softcap, z_loss_scale)
    if name == "reference":
        return reference.cross_entropy_fwd_extra(logits, *args)
    if inplace:
        loss, stats, zl = _op(name, _EXTRA_INPLACE_OPS)(logits, *args)
        return loss, logits, stats, zl
    return _op(name, _EXTRA_OPS)(logits, *args)


def _fake_extra(logits, target, weight, ignore_index, smoothing, reduction, softcap, zs):
    batch = logits.shape[0]
    loss = logits.new_empty((batch,) if reduction == 0 else ())
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    stats = logits.new_empty((NUM_STATS, batch), dtype=torch.float32)
    return loss, grad, stats, torch.empty_like(loss)


def _fake_extra_inplace(logits, target, weight, ignore_index, smoothing, reduction, softcap, zs):
    loss, _, stats, zl = _fake_extra(
        logits, target, weight, ignore_index, smoothing, reduction, softcap, zs
    )
    return loss, stats, zl


if _C is not None:
    register_fake("csl_fast::cross_entropy_fwd_extra")(_fake_extra)
    register_fake("csl_fast::cross_entropy_fwd_extra_inplace")(_fake_extra_inplace)
    register_fake("csl_fast::cross_entropy_fwd_extra_stats")(_fake_extra_inplace)
