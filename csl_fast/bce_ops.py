"""The binary-cross-entropy ops behind :func:`csl_fast.accumulate_bce`: backend selection,
fake kernels and autograd.

Schemas are in ``csrc/csl_fast.cpp`` (``bce_fwd``, ``bce_bwd``, ``bce_record``); the
Triton ops (``csl_fast/_triton/bce.py``) take the same arguments under a ``_triton``
suffix; :mod:`csl_fast.reference` holds the pure-PyTorch versions. Backward recomputes the
gradient from the logits instead of keeping a ``[B, L]`` gradient from the forward: the
same memory traffic, nothing logits-sized held between forward and backward, and the
gradient of 16-bit logits rounded once for any upstream gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import reference
from ._ext import _C
from .fake_kernels import register_fake

_OPS = {
    "cpu": ("bce_fwd", "bce_bwd", "bce_record"),
    "cuda": ("bce_fwd", "bce_bwd", "bce_record"),
    "triton": ("bce_fwd_triton", "bce_bwd_triton", "bce_record_triton"),
}
_FWD, _BWD, _RECORD = range(3)


def _op(name: str, which: int) -> torch._ops.OpOverload:
    return getattr(torch.ops.csl_fast, _OPS[name][which]).default


def bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: int,
    name: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, stats)``: ``loss`` equals ``F.binary_cross_entropy_with_logits`` (value and
    gradient with respect to ``logits``), ``stats`` the detached float32 ``[BCE_NUM_STATS,
    B]`` per-sample statistics (:class:`csl_fast.reference.BceStat`); ``name`` a concrete
    backend."""
    if name == "reference":
        loss = F.binary_cross_entropy_with_logits(
            logits,
            target,
            weight=weight,
            pos_weight=pos_weight,
            reduction=reference.REDUCTION_NAMES[reduction],
        )
        return loss, reference.bce_row_statistics(logits.detach(), target.detach())
    return _op(name, _FWD)(logits, target, weight, pos_weight, reduction)


def bce_record(
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    index: torch.Tensor,
    deterministic: bool,
    buffers: tuple[torch.Tensor | None, ...],
    name: str,
) -> None:
    """The recording pass (``buffers``: csl, count, wrong, min_margin, label_csl,
    label_margin, label_prob, each optional)."""
    logits, target = logits.detach(), target.detach()
    if name == "reference":
        reference.bce_record(logits, target, stats, index, deterministic, *buffers)
    else:
        _op(name, _RECORD)(logits, target, stats, index, deterministic, *buffers)


def _setup_context(ctx, inputs, output):
    logits, target, weight, pos_weight, reduction = inputs
    ctx.set_materialize_grads(False)
    ctx.reduction = reduction
    ctx.save_for_backward(logits, target, weight, pos_weight)
    ctx.mark_non_differentiable(output[1])


def _backward_of(name: str):
    """Autograd of backend ``name``'s ``bce_fwd``: its ``bce_bwd`` on the saved inputs."""

    def backward(ctx, grad_loss, _grad_stats):
        if torch.is_grad_enabled():
            # create_graph=True: the backward kernel has no graph of its own, so a second
            # derivative would silently come out as zero.
            raise RuntimeError(
                "csl_fast: double backward through the fused binary cross entropy is not "
                "supported; use backend='reference' for higher-order gradients"
            )
        if grad_loss is None:  # the loss took no part in what is differentiated
            return None, None, None, None, None
        logits, target, weight, pos_weight = ctx.saved_tensors
        grad = _op(name, _BWD)(grad_loss, logits, target, weight, pos_weight, ctx.reduction)
        return grad, None, None, None, None

    return backward


def register_autograd(name: str) -> None:
    """Give backend ``name``'s ``bce_fwd`` its autograd formula (called for the Triton op
    by :mod:`csl_fast._triton.bce`)."""
    torch.library.register_autograd(
        f"csl_fast::{_OPS[name][_FWD]}", _backward_of(name), setup_context=_setup_context
    )


def _fake_bce_fwd(logits, target, weight, pos_weight, reduction):
    batch = logits.shape[0]
    loss = logits.new_empty(logits.shape if reduction == 0 else ())
    return loss, logits.new_empty((reference.BCE_NUM_STATS, batch), dtype=torch.float32)


def _fake_bce_bwd(grad, logits, target, weight, pos_weight, reduction):
    return logits.new_empty(logits.shape)


def _fake_bce_record(*args):
    return None


FAKES = {"bce_fwd": _fake_bce_fwd, "bce_bwd": _fake_bce_bwd, "bce_record": _fake_bce_record}

if _C is not None:
    for _name, _fake in FAKES.items():
        register_fake(f"csl_fast::{_name}")(_fake)
    # The C++ op's autograd (CPU and CUDA) is registered in C++ (csrc/bce_autograd.cpp),
    # with the formula of _backward_of below, which serves the Triton op.
