"""Per-row squared L2 norms of an input gradient (Triton).

``csl_fast::input_grad_norms_triton(grad, scale)`` returns float32 ``[B]`` with
``||scale * grad[i]||^2`` over all dimensions but the first, as
:func:`csl_fast.reference.input_grad_norms`. Accumulation is in float32 (float64 for
float64 gradients); any float dtype; non-contiguous inputs are copied to a contiguous
``[B, N]`` view first. One program per group of rows, one read of the gradient.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._registry import register

#: Target elements per program (rows x chunk width).
TILE_ELEMS = 4096
#: Cap on rows per program.
MAX_ROWS = 64
#: Widest chunk of a row processed per loop step.
MAX_BLOCK = 4096


@triton.jit
def _row_sqnorm_kernel(
    x_ptr,
    out_ptr,
    B,
    N,
    scale,
    IS_FP64: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    if IS_FP64:
        acc_ty: tl.constexpr = tl.float64
    else:
        acc_ty: tl.constexpr = tl.float32
    # The JIT passes a Python float as fp32, torch.compile (Inductor) as fp64, which would
    # promote the float32 accumulator to fp64 in the loop: round to fp32, as both agree.
    scale = tl.cast(scale, tl.float32).to(acc_ty)
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = rows < B
    base = x_ptr + rows * N
    cols0 = tl.arange(0, BLOCK)
    acc = tl.zeros([ROWS, BLOCK], acc_ty)
    for n0 in range(0, N, BLOCK):
        cols = n0 + cols0
        mask = row_mask[:, None] & (cols < N)[None, :]
        x = tl.load(base[:, None] + cols[None, :], mask=mask, other=0.0).to(acc_ty) * scale
        acc += x * x
    tl.store(out_ptr + rows, tl.sum(acc, 1).to(tl.float32), mask=row_mask)


def _fake_input_grad_norms(grad, scale):
    return grad.new_empty((grad.shape[0],), dtype=torch.float32)


@register(
    "csl_fast::input_grad_norms_triton",
    kernel=_row_sqnorm_kernel,
    mutates_args=(),
    fake=_fake_input_grad_norms,
)
def input_grad_norms_triton(grad: torch.Tensor, scale: float) -> torch.Tensor:
    """float32 ``[B]``: ``||scale * grad[i]||^2`` over the flattened row ``grad[i]``.

    Args:
        grad: ``[B, ...]`` float16/bfloat16/float32/float64, any strides.
        scale: multiplier applied before squaring (e.g. to undo a mean reduction).
    """
    batch = grad.shape[0]
    n = math.prod(grad.shape[1:])
    x = grad.detach().reshape(batch, n).contiguous()
    out = torch.zeros((batch,), dtype=torch.float32, device=grad.device)
    if batch == 0 or n == 0:
        return out
    block = min(1 << max(int(n) - 1, 0).bit_length(), MAX_BLOCK)
    rows = max(1, min(MAX_ROWS, TILE_ELEMS // block))
    wrap_triton(_row_sqnorm_kernel)[(triton.cdiv(batch, rows),)](
        x,
        out,
        batch,
        n,
        float(scale),
        IS_FP64=x.dtype == torch.float64,
        ROWS=rows,
        BLOCK=block,
        num_warps=4 if rows * block <= 1024 else 8,
    )
    return out
