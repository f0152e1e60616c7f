"""The float16/bfloat16 backward of the fused cross entropy in Triton: one elementwise pass.

``csl_fast::cross_entropy_bwd_triton`` has exactly the semantics of
:func:`csl_fast.reference.cross_entropy_bwd` (maths: :mod:`csl_fast.ops_backward`): per row,
``p_j = exp((z_j - z_y) - stats[LOSS])`` from the forward's statistics, the gradient formed
in float32, scaled by the row's upstream factor and rounded once to the logits' dtype. Rows
the forward did not record or with a loss above ``LOSS_BOUND`` take ``lse`` from the row
(a max pass and a sum pass, only in programs that hold such a row). A target outside
``[0, C)`` that is not ``ignore_index`` gives a NaN row, as the forward; an ignored row is
0, or NaN where ``F.cross_entropy``'s is (one more read, in programs that hold one). The extras
(compile-time switches): ``HAS_CAP`` takes ``z' = s tanh(z / s)`` (the forward's
``_tanh``) and multiplies the gradient by ``1 - tanh^2``; ``HAS_ZLOSS`` adds
``2 zs lse p_j``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..stats import NUM_STATS, Stat
from ._registry import is_interpreted, register
from .cross_entropy import _next_pow2, _tanh, _to_out, check_args

#: Past this loss, float32 rounding of ``stats[LOSS]`` would reach 1/100 of a float16 step.
LOSS_BOUND = 64.0
#: Column tile; several rows per program below it.
BLOCK = 2048
MAX_ROWS = 16


@triton.jit
def _expm1(x):
    # exp(x) - 1 without cancellation near 0 and without libdevice (Kahan's trick).
    u = tl.exp(x)
    return tl.where(u == 1.0, x, tl.where(u - 1.0 == -1.0, -1.0, (u - 1.0) * x / tl.log(u)))


@triton.jit
def _ce_bwd_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    wsum_ptr,
    stats_ptr,
    scale_ptr,
    grad_ptr,
    B,
    C,
    stride_lr,
    ignore_index,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    PER_ROW_SCALE: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MANUAL_BF16_RNE: tl.constexpr,
    STAT_LOSS: tl.constexpr,
    STAT_VALID: tl.constexpr,
    BOUND: tl.constexpr,
    cap,
    zs,
    HAS_CAP: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
):
    # fp32 float arguments whether the JIT (fp32) or torch.compile (fp64) passes them (see
    # _ce_fwd_kernel).
    eps = tl.cast(eps, tl.float32)
    cap = tl.cast(cap, tl.float32)
    zs = tl.cast(zs, tl.float32)
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = rows < B
    tgt = tl.load(target_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    kept = row_mask & (tgt != ignore_index)
    active = kept & (tgt >= 0) & (tgt < C)
    bad = kept & ((tgt < 0) | (tgt >= C))
    y = tl.where(active, tgt, 0)
    lrow = logits_ptr + rows * stride_lr
    grow = grad_ptr + rows * C
    cols0 = tl.arange(0, BLOCK_C)

    z_y_raw = tl.load(lrow + y, mask=active, other=0.0).to(tl.float32)
    z_y = z_y_raw
    if HAS_CAP:
        z_y = cap * _tanh(z_y_raw / cap)
    # k * B in int64: in B's int32 it wraps from B = 2**31 / STAT_VALID rows on.
    b64 = tl.cast(B, tl.int64)
    loss = tl.load(stats_ptr + STAT_LOSS * b64 + rows, mask=row_mask, other=0.0)
    valid = tl.load(stats_ptr + STAT_VALID * b64 + rows, mask=row_mask, other=0.0)
    slow = active & ~((valid > 0.0) & (loss <= BOUND))
    ref = z_y
    off = loss
    if tl.max(slow.to(tl.int32), 0) > 0:
        # lse from the row: m, then log(sum_j exp(z_j - m)).
        m = tl.full([ROWS], float("-inf"), tl.float32)
        for start in range(0, C, BLOCK_C):
            cols = start + cols0
            mask = slow[:, None] & (cols < C)[None, :]
            z = tl.load(lrow[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                z = cap * _tanh(z / cap)
            m = tl.maximum(m, tl.max(tl.where(mask, z, float("-inf")), 1))
        s = tl.zeros([ROWS], tl.float32)
        m_safe = tl.where(slow, m, 0.0)
        for start in range(0, C, BLOCK_C):
            cols = start + cols0
            mask = slow[:, None] & (cols < C)[None, :]
            z = tl.load(lrow[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_CAP:
                z = cap * _tanh(z / cap)
            s += tl.sum(tl.where(mask, tl.exp(z - m_safe[:, None]), 0.0), 1)
        log_s = tl.log(tl.where(slow, s, 1.0))
        ref = tl.where(slow, m_safe, z_y)
        off = tl.where(slow, log_s, loss)
        loss = tl.where(slow, log_s + (m_safe - z_y), loss)

    # Rows past B, bad targets (NaN) and ignored rows: their gradient row is `fill`.
    fill = tl.where(bad, float("nan"), 0.0)
    ignored = row_mask & ~kept
    if tl.max(ignored.to(tl.int32), 0) > 0:
        # An ignored row's gradient is 0, or NaN as F.cross_entropy's (0 - softmax(z) * 0)
        # where softmax(z) is: a NaN or +inf logit, or all -inf (soft-capped: a NaN only).
        mx = tl.full([ROWS], float("-inf"), tl.float32)
        nans = tl.zeros([ROWS], tl.int32)
        for start in range(0, C, BLOCK_C):
            cols = start + cols0
            mask = ignored[:, None] & (cols < C)[None, :]
            z = tl.load(lrow[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            mx = tl.maximum(mx, tl.max(tl.where(mask, z, float("-inf")), 1))
            nans += tl.sum((mask & (z != z)).to(tl.int32), 1)
        nan_row = nans > 0
        if not HAS_CAP:
            nan_row = nan_row | (mx == float("inf")) | (mx == float("-inf"))
        fill = tl.where(ignored & nan_row, float("nan"), fill)

    if PER_ROW_SCALE:
        scale = tl.load(scale_ptr + rows, mask=row_mask, other=0.0)
    else:
        scale = tl.load(scale_ptr)
    # Without label smoothing the other classes' weights are left out, not multiplied by 0:
    # a NaN or inf class weight then reaches only the rows of its class, as in F.
    w_total = C * 1.0
    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y, mask=active, other=0.0)
        if HAS_SMOOTH:
            w_total = tl.load(wsum_ptr)
    else:
        w_y = tl.where(active, 1.0, 0.0)
    smooth = eps / C
    p_y = tl.exp(-loss)
    q = -_expm1(-loss)  # 1 - p_y
    z_coef = 0.0
    if HAS_ZLOSS:
        z_coef = 2.0 * zs * (ref + off)  # the z-loss zs lse^2 adds 2 zs lse p_j
    # d objective / d z'_j = (1-eps) w_y (p_j - [j == y]) + smooth (W p_j - w_j) + z_coef p_j.
    a = ((1.0 - eps) * w_y + smooth * w_total + z_coef) * scale
    b = tl.where(active, smooth * scale, 0.0)
    g_y = (-(1.0 - eps) * w_y * q + smooth * (w_total * p_y - w_y) + z_coef * p_y) * scale
    a = tl.where(active, a, fill)  # with p = 0 and b = 0 below: g = fill * 0
    for start in range(0, C, BLOCK_C):
        cols = start + cols0
        col_mask = cols < C
        mask = row_mask[:, None] & col_mask[None, :]
        # Only active rows are read: the others' gradient is `fill` (read above if ignored).
        z_mask = active[:, None] & col_mask[None, :]
        z = tl.load(lrow[:, None] + cols[None, :], mask=z_mask, other=0.0).to(tl.float32)
        if HAS_CAP:
            t = _tanh(z / cap)
            z = cap * t
        p = tl.exp((z - ref[:, None]) - off[:, None])
        p = tl.where(active[:, None], p, 0.0)
        if HAS_WEIGHT and HAS_SMOOTH:
            w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0)
            # (an inactive row's b is 0, and 0 * an infinite class weight is NaN)
            g = a[:, None] * p - tl.where(active[:, None], b[:, None] * w[None, :], 0.0)
        else:
            g = a[:, None] * p - b[:, None]
        g = tl.where(active[:, None] & (cols[None, :] == y[:, None]), g_y[:, None], g)
        if HAS_CAP:
            g = g * (1.0 - t * t)
        out = _to_out(g, grad_ptr.dtype.element_ty, MANUAL_BF16_RNE)
        tl.store(grow[:, None] + cols[None, :], out, mask=mask)


def _fake_bwd(logits, target, weight, stats, scale, *args):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@register(
    "csl_fast::cross_entropy_bwd_triton",
    kernel=_ce_bwd_kernel,
    mutates_args=(),
    fake=_fake_bwd,
)
def cross_entropy_bwd_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    stats: torch.Tensor,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    softcap: float = 0.0,
    z_loss_scale: float = 0.0,
) -> torch.Tensor:
    """``[B, C]`` gradient of float16/bfloat16 ``logits`` as
    :func:`csl_fast.reference.cross_entropy_bwd` (``scale``: float32, ``B`` entries or one;
    ``stats``: the forward's float32 ``[NUM_STATS, B]``). One read of the logits and one
    write of the gradient; no host synchronisation."""
    if logits.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(
            f"cross_entropy_bwd_triton takes float16 or bfloat16 logits, got {logits.dtype}; "
            "the float32 op keeps the forward's gradient"
        )
    check_args("cross_entropy_bwd_triton", logits, target, weight)
    batch, num_classes = logits.shape
    if num_classes == 0 and batch != 0:
        raise ValueError("csl_fast: logits have C = 0 classes")
    if stats.dim() != 2 or stats.shape != (NUM_STATS, batch) or stats.dtype != torch.float32:
        raise ValueError(
            f"csl_fast.cross_entropy_bwd_triton: stats must be the float32 [{NUM_STATS}, B = "
            f"{batch}] statistics of the forward on these logits, got {stats.dtype} "
            f"{tuple(stats.shape)}"
        )
    if scale.dtype != torch.float32 or scale.numel() not in (1, batch):
        raise ValueError(
            f"csl_fast: scale must be float32 with one upstream factor per row (B = {batch}) "
            f"or one for all, got {scale.dtype} {tuple(scale.shape)}"
        )
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad = torch.empty((batch, num_classes), dtype=logits.dtype, device=logits.device)
    if batch == 0 or num_classes == 0:
        return grad
    w = wsum = None
    if weight is not None:
        w = weight.to(torch.float32).contiguous()
        wsum = w.sum().reshape(1)
    block = min(_next_pow2(num_classes), BLOCK)
    rows = max(1, min(MAX_ROWS, BLOCK // block))
    scale = scale.reshape(-1).contiguous()
    wrap_triton(_ce_bwd_kernel)[(triton.cdiv(batch, rows),)](
        logits,
        target.contiguous(),
        w if w is not None else scale,
        wsum if wsum is not None else scale,
        stats.contiguous(),
        scale,
        grad,
        batch,
        num_classes,
        logits.stride(0),
        ignore_index,
        float(label_smoothing),
        HAS_WEIGHT=w is not None,
        HAS_SMOOTH=label_smoothing != 0.0,
        PER_ROW_SCALE=scale.numel() == batch and batch > 1,
        ROWS=rows,
        BLOCK_C=block,
        MANUAL_BF16_RNE=logits.dtype == torch.bfloat16 and is_interpreted(_ce_bwd_kernel),
        STAT_LOSS=int(Stat.LOSS),
        STAT_VALID=int(Stat.VALID),
        BOUND=LOSS_BOUND,
        cap=float(softcap),
        zs=float(z_loss_scale),
        HAS_CAP=softcap != 0.0,
        HAS_ZLOSS=z_loss_scale != 0.0,
        num_warps=max(4, min(8, rows * block // 256)),
    )
    return grad
