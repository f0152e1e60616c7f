"""The float16/bfloat16 backward of the fused cross entropy: one elementwise pass.

``csl_fast::cross_entropy_bwd`` (schema in ``csrc/csl_fast.cpp``; C++ CPU and CUDA kernels,
``cross_entropy_bwd_triton`` in ``csl_fast/_triton``) computes, for half logits ``z``
``[B, C]`` and a float32 upstream factor ``scale_i`` per row (or one for all)::

    grad_ij = scale_i * ((1 - eps) w_y (p_j - [j == y]) + (eps / C)(W p_j - w_j))

(``p = softmax(z_i)``, ``y`` the row's target, ``w`` the class weights or ones, ``W`` their
sum; zero on ignored rows) in float32 and rounds it once to the logits' dtype. With the
extras of :mod:`csl_fast.ops_extras`, ``z`` is the soft-capped ``z' = s tanh(z / s)`` and
the gradient is multiplied by ``1 - tanh^2(z / s)``; the z-loss adds ``2 zs lse p_j``. ``p_j`` comes
from the forward's statistics, ``p_j = exp((z_j - z_y) - stats[LOSS])`` (``stats[LOSS]`` is
``lse - z_y`` in float32 for every recorded row whatever the weights or smoothing), so the
kernels read the half logits once and write the half gradient once: no max, no sum, no
float32 copy. Rows the forward did not record (a loss not finite in the logits' dtype) or
with a loss above 64 (where its float32 rounding would reach 1/100 of a float16 step) take
``lse`` from the row itself. Semantics: :func:`csl_fast.reference.cross_entropy_bwd`.
"""

from __future__ import annotations

import torch

from . import reference
from ._ext import _C, resolve_backend
from .fake_kernels import register_fake

_BWD_OPS = {"cpu": "cross_entropy_bwd", "cuda": "cross_entropy_bwd"}
_TRITON_OP = "cross_entropy_bwd_triton"


def cross_entropy_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float = 0.0,
    z_loss_scale: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """``d loss / d logits`` ``[B, C]`` (logits' dtype, contiguous) of the per-row cross
    entropy of float16/bfloat16 ``logits`` (with ``softcap`` or ``z_loss_scale``: of
    :func:`csl_fast.ops_extras.cross_entropy_fwd_extra`'s objective) times the float32
    upstream ``scale`` (``B`` entries or one), rounded once; ``stats`` are the forward's on
    the same logits and target (float32 ``[NUM_STATS, B]``)."""
    name = resolve_backend(backend, logits.device, logits.dtype)
    args = (ignore_index, label_smoothing, softcap, z_loss_scale)
    if name == "reference":
        return reference.cross_entropy_bwd(logits, target, weight, stats, scale, *args)
    op_name = _TRITON_OP if name == "triton" else _BWD_OPS[name]
    op = getattr(torch.ops.csl_fast, op_name).default
    return op(logits, target, weight, stats, scale.reshape(-1), *args)


def _fake_cross_entropy_bwd(logits, target, weight, stats, scale, *args):
    return logits.new_empty(logits.shape)


if _C is not None:
    register_fake("csl_fast::cross_entropy_bwd")(_fake_cross_entropy_bwd)
