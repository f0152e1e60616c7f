"""Fused cross entropy in Triton: loss, logits gradient and per-row statistics in one pass.

``csl_fast::cross_entropy_fwd_triton`` has exactly the semantics of
:func:`csl_fast.reference.cross_entropy_fwd`; ``cross_entropy_fwd_stats_triton`` is the same
kernel with its gradient pass compiled out (``HAS_GRAD``): the loss and statistics alone.

Maths per row ``i`` (``z`` the logits row, ``y`` its target, ``eps`` the label smoothing,
``w`` the class weights or ones, ``W = sum_j w_j``, ``p = softmax(z)``, ``lse`` =
logsumexp(z))::

    objective  L_i = (1 - eps) w_y (lse - z_y) + (eps / C) sum_j w_j (lse - z_j)
    grad j != y:     (1 - eps) w_y p_j + (eps / C)(W p_j - w_j)
    grad j == y:   -(1 - eps) w_y sum_{j != y} p_j + (eps / C)(W p_y - w_y)

all scaled by ``1 / D`` for ``mean`` (``D`` = sum of ``w_y`` over non-ignored rows, computed
on the device before the launch and read by the kernel: no host synchronisation; ``D = 0``
makes the mean and the valid rows NaN, as ``F.cross_entropy``'s ``0 / 0``). The
true-class entry is built from ``sum_{j != y} p_j`` so it does not cancel as ``p_y -> 1``;
``sum_j w_j (lse - z_j)`` is accumulated as ``W log(s) + sum_j w_j (m - z_j)`` (``m`` the
running max, ``s = sum_j exp(z_j - m)``), a sum of non-negative terms.

Statistics (float32 ``[NUM_STATS, B]``, :class:`csl_fast.stats.Stat`) are for plain CE: loss
``lse - z_y`` (via ``log1p`` when ``z_y`` is within 1 of the max, so confident rows keep
their relative precision), ``p_y``, margin ``min(z_y - max_{j != y} z_j, MARGIN_CAP)`` (0
when ``C == 1``),
correct (``argmax`` with first-index tie-break ``== y``, i.e. ``z_y > max_{j<y}`` and
``z_y >= max_{j>y}``), the logit-gradient norm ``sum_{j != y} p_j^2 + (sum_{j != y} p_j)^2``
from online-softmax accumulators over ``j != y``, valid, and the runner-up class (the first
``j != y`` at ``max_{j != y} z_j``). Rows that are ignored or whose loss is not finite in
the logits dtype (a float16 row whose float32 loss is 65520 or more included) get all-zero
statistics but for a runner-up of -1 (as every row when ``C == 1``).

With the language-model extras (``cross_entropy_fwd_extra_triton``, compile-time switches so
the plain kernel is unchanged): ``HAS_CAP`` takes every loaded row as ``z' = s tanh(z / s)``
and multiplies its gradient by ``1 - tanh^2(z / s)``; ``HAS_ZLOSS`` adds
``zs * lse(z')^2`` to the objective (stored alone too) and ``2 zs lse p_j`` to the
gradient.

Everything is computed in float32 whatever the logits dtype (float16, bfloat16, float32);
float64 logits are rejected (the C++ kernels and the reference handle them). Row offsets
are 64-bit. Small ``C``: several rows per program, the row tile stays in registers between
the statistics and the gradient (one read, one write of the logits). Large ``C``
(``next_pow2(C) > MAX_FUSED_BLOCK``): one row per program, an online-softmax pass then a
gradient pass (two reads, one write). The online-softmax pass keeps its running max, sums
and runner-up per lane of the chunk (elementwise work only, :func:`_lane_step`) and
reduces across lanes once per row, after the loop: no block-wide reduction (a shared-memory
round trip and a barrier each) per chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..stats import MARGIN_CAP, NUM_STATS
from ._registry import is_interpreted, register

#: Largest power-of-two row tile kept on chip between the statistics and gradient passes.
MAX_FUSED_BLOCK = 8192
#: Chunk width of the two-pass (online softmax) path for wider rows: 1024 columns at 4
#: warps (_config), 8 per thread. Its loop carries 4 per-lane values (running max, its
#: column, two sums: 32 registers a thread) and issues two chunks' loads at a time
#: (unrolled twice): 78 registers for bfloat16 without spills (triton 3.6's ptxas, sm_90;
#: 64 with triton 3.9), 6 programs and 24 KiB of loads in flight per SM. 4096 columns
#: at 16 warps took 103 registers: one program per SM.
CHUNK_BLOCK = 1024
#: Target number of elements per program in the fused path (several rows for small C).
TILE_ELEMS = 2048
#: Cap on rows per program.
MAX_ROWS = 16

_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _log1p(t):
    # Accurate log(1 + t) for t >= 0 without libdevice (Goldberg's trick).
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * (t / (u - 1.0)))


@triton.jit
def _tanh(x):
    # tanh without libdevice (the interpreter has none): where 1 - 2 / (exp(2|x|) + 1)
    # would cancel (|x| < 1/4), its odd Taylor polynomial, exact there to ~1e-10.
    a = tl.abs(x)
    e = tl.exp(-2.0 * a)
    far = (1.0 - e) / (1.0 + e)
    x2 = x * x
    # tanh(a) = a + a x^2 P(x^2), P's coefficients by Horner's rule, highest first.
    poly = -1382.0 / 155925.0
    poly = poly * x2 + 62.0 / 2835.0
    poly = poly * x2 - 17.0 / 315.0
    poly = poly * x2 + 2.0 / 15.0
    poly = poly * x2 - 1.0 / 3.0
    near = a + a * x2 * poly
    t = tl.where(a < 0.25, near, far)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def _to_out(x, dtype: tl.constexpr, MANUAL_BF16_RNE: tl.constexpr):
    # Triton's interpreter truncates fp32 -> bf16 casts; a GPU rounds to nearest even.
    # Under the interpreter, round by hand so that the result is the GPU's.
    if MANUAL_BF16_RNE:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


#: The most negative float32: the floor of the wide path's softmax references, so that
#: no rescale is ever exp(-inf - -inf) while every finite logit is at or above it.
_FLOOR = tl.constexpr(-3.4028234663852886e38)
_MARGIN_CAP = tl.constexpr(MARGIN_CAP)


@triton.jit
def _weighted_gap(w, gap):
    # w (m - z_j), a term of the label-smoothing sum: 0 at the max whatever w is. An infinite
    # weight there would give inf * 0 = NaN, where F's w_j (lse - z_j) is inf.
    return tl.where(gap == 0.0, 0.0, w * gap)


@triton.jit
def _lane_step(z, other, c0, w, mx, arg_c, s_o, q_o, a_o, w_o, HAS_SMOOTH: tl.constexpr):
    # One chunk of the wide-row statistics pass, elementwise: lane l of the [ROWS, BLOCK_C]
    # state sees the columns c0 + l, c0 increasing, and no value crosses lanes until the
    # loop is over. mx: max over the lane's other (j != y) columns, -inf while none;
    # arg_c: the c0 of its first column at that max (strict >: ties keep the earlier one);
    # s_o, q_o: sum exp(z_j - r), sum exp(2 (z_j - r)) over those columns, r = max(mx,
    # _FLOOR). One exp per element: a new max becomes the reference (s_o exp(r - z) + 1),
    # any other value is added (s_o + exp(z - r)); the two agree when z == r, so `up` can
    # be z > mx itself.
    z_o = tl.where(other, z, float("-inf"))
    up = z_o > mx
    arg_c = tl.where(up, c0, arg_c)
    r_old = tl.maximum(mx, _FLOOR)
    mx = tl.where(up, z_o, mx)
    t = tl.exp(-tl.abs(z_o - r_old))
    a = tl.where(up, t, 1.0)
    b = tl.where(up, 1.0, t)
    s_o = s_o * a + b
    q_o = q_o * (a * a) + b * b
    if HAS_SMOOTH:
        # sum_j w_j (r - z_j) over the lane's other columns, re-based on the new r (its
        # weights may sum to less than 0: re-based whenever not 0; y's term after the loop).
        r_new = tl.maximum(mx, _FLOOR)
        a_o = (
            a_o
            + tl.where(w_o != 0.0, _weighted_gap(w_o, r_new - r_old), 0.0)
            + tl.where(other, _weighted_gap(w[None, :], r_new - z), 0.0)
        )
        w_o = w_o + tl.where(other, w[None, :], 0.0)
    return mx, arg_c, s_o, q_o, a_o, w_o


@triton.jit
def _ce_fwd_kernel(
    logits_ptr,
    target_ptr,
    weight_ptr,
    denom_ptr,
    grad_ptr,
    loss_ptr,
    stats_ptr,
    B,
    C,
    stride_lr,
    stride_gr,
    ignore_index,
    eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTH: tl.constexpr,
    IS_MEAN: tl.constexpr,
    FUSED: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_C: tl.constexpr,
    MANUAL_BF16_RNE: tl.constexpr,
    INPLACE: tl.constexpr,
    zloss_ptr,
    cap,
    zs,
    HAS_CAP: tl.constexpr,
    HAS_ZLOSS: tl.constexpr,
    HAS_GRAD: tl.constexpr,
):
    # The JIT passes Python floats as fp32, torch.compile (Inductor) as fp64, which would
    # make the loop-carried float32 row sums fp64: fp32 everywhere, as both agree.
    eps = tl.cast(eps, tl.float32)
    cap = tl.cast(cap, tl.float32)
    zs = tl.cast(zs, tl.float32)
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    row_mask = rows < B
    tgt = tl.load(target_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    kept = row_mask & (tgt != ignore_index)
    # A target outside [0, C) that is not ignore_index gives a NaN loss and gradient row and
    # all-zero statistics (not recorded), as the CUDA C++ kernels; such a row reads its
    # logits at class 0 only so that no address leaves the row.
    bad = kept & ((tgt < 0) | (tgt >= C))
    active = kept & (tgt >= 0) & (tgt < C)
    y = tl.where(active, tgt, 0)
    lrow = logits_ptr + rows * stride_lr
    # In place, the gradient goes through the logits' own pointer (one pointer read and
    # written, never two that alias); each tile is loaded before it is stored.
    grow = lrow if INPLACE else grad_ptr + rows * stride_gr
    cols0 = tl.arange(0, BLOCK_C)

    if HAS_WEIGHT:
        w_y = tl.load(weight_ptr + y, mask=active, other=0.0).to(tl.float32)
    else:
        w_y = tl.where(active, 1.0, 0.0)
    inv_c = 1.0 / C
    a_coef = (1.0 - eps) * w_y  # [ROWS]
    b_coef = eps * inv_c  # scalar
    if IS_MEAN:
        # D = 0 (class weight 0 at every valid row's target): F.cross_entropy's 0 / 0 makes
        # the mean and the valid rows' gradients NaN, where 1 / D (label smoothing: a
        # non-zero sum of rows) gives inf; here, not in an extra launch, the scale and the
        # valid rows' objective (summed, then divided by D) turn NaN.
        d = tl.load(denom_ptr).to(tl.float32)
        mean_nan = d == 0.0
        row_scale = tl.where(active, tl.where(mean_nan, float("nan"), 1.0 / d), 0.0)
    else:
        row_scale = tl.where(active, 1.0, 0.0)

    # ---- statistics pass -------------------------------------------------------------
    if FUSED:
        cols = cols0
        col_mask = cols < C
        mask2 = row_mask[:, None] & col_mask[None, :]
        z = tl.load(lrow[:, None] + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
        if HAS_CAP:
            t_cap = _tanh(z / cap)
            z = cap * t_cap
        z = tl.where(col_mask[None, :], z, float("-inf"))
        is_y = cols[None, :] == y[:, None]
        other = col_mask[None, :] & (cols[None, :] != y[:, None])
        m = tl.max(z, 1)
        e = tl.exp(z - m[:, None])
        s = tl.sum(e, 1)
        e_o = tl.where(other, e, 0.0)
        s_o = tl.sum(e_o, 1)
        q_o = tl.sum(e_o * e_o, 1)
        z_y = tl.sum(tl.where(is_y, z, 0.0), 1)
        # Runner-up: the first other column at their max; BLOCK_C when there is none.
        max_o = tl.max(tl.where(other, z, float("-inf")), 1)
        at_max = other & (z == max_o[:, None])
        arg_o = tl.min(tl.where(at_max, cols[None, :], BLOCK_C), 1)
        if HAS_SMOOTH:
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            else:
                w = tl.where(col_mask, 1.0, 0.0)
            w_sum = tl.sum(w, 0)
            a_sum = tl.sum(
                tl.where(col_mask[None, :], _weighted_gap(w[None, :], m[:, None] - z), 0.0), 1
            )
    else:
        z_y = tl.load(lrow + y, mask=row_mask, other=0.0).to(tl.float32)
        if HAS_CAP:
            z_y = cap * _tanh(z_y / cap)
        # Per-lane state (see _lane_step), reduced across lanes once after the loop.
        mx = tl.full([ROWS, BLOCK_C], float("-inf"), tl.float32)
        arg_c = tl.full([ROWS, BLOCK_C], C, tl.int32)
        s_o = tl.zeros([ROWS, BLOCK_C], tl.float32)
        q_o = tl.zeros([ROWS, BLOCK_C], tl.float32)
        a_o = tl.zeros([ROWS, BLOCK_C], tl.float32)
        w_o = tl.zeros([ROWS, BLOCK_C], tl.float32)
        w = tl.zeros([BLOCK_C], tl.float32)
        y32 = y.to(tl.int32)  # int32: the per-element compare below stays 32-bit
        c_full = (C // BLOCK_C) * BLOCK_C
        # Rows past B (a last program's) read row B - 1 and store nothing: the full chunks'
        # loads need no mask, whose zero fill would keep the compiler from issuing the
        # unrolled chunks' loads together.
        lrow_in = logits_ptr + tl.minimum(rows, B - 1) * stride_lr
        # Full chunks need no column mask (nor its compare and select per element); unrolled
        # twice so that two chunks' loads are in flight before the arithmetic waits on one.
        for c0 in tl.range(0, c_full, BLOCK_C, loop_unroll_factor=2):
            z = tl.load(lrow_in[:, None] + (c0 + cols0)[None, :]).to(tl.float32)
            if HAS_CAP:
                z = cap * _tanh(z / cap)
            if HAS_SMOOTH:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + c0 + cols0).to(tl.float32)
                else:
                    w = tl.full([BLOCK_C], 1.0, tl.float32)
            mx, arg_c, s_o, q_o, a_o, w_o = _lane_step(
                z,
                cols0[None, :] != (y32 - c0)[:, None],
                c0,
                w,
                mx,
                arg_c,
                s_o,
                q_o,
                a_o,
                w_o,
                HAS_SMOOTH,
            )
        if c_full < C:
            cols = c_full + cols0
            col_mask = cols < C
            mask2 = row_mask[:, None] & col_mask[None, :]
            z = tl.load(lrow[:, None] + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
            if HAS_CAP:
                z = cap * _tanh(z / cap)
            z = tl.where(col_mask[None, :], z, float("-inf"))
            if HAS_SMOOTH:
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                else:
                    w = tl.where(col_mask, 1.0, 0.0)
            other = col_mask[None, :] & (cols0[None, :] != (y32 - c_full)[:, None])
            mx, arg_c, s_o, q_o, a_o, w_o = _lane_step(
                z, other, c_full, w, mx, arg_c, s_o, q_o, a_o, w_o, HAS_SMOOTH
            )
        # Across lanes: the runner-up is the first column among the lanes at the max; when
        # every other column is -inf (no lane took one), the first other column.
        max_o = tl.max(mx, 1)
        arg_o = tl.min(tl.where(mx == max_o[:, None], arg_c + cols0[None, :], C), 1)
        arg_o = tl.where(max_o == float("-inf"), tl.where(y == 0, 1, 0), arg_o)
        # The lanes' sums re-based on the row max m; y's own term last. s = s_o + exp(z_y -
        # m) adds positive terms only, as the fused path's s_o.
        m = tl.maximum(tl.maximum(max_o, z_y), _FLOOR)
        r = tl.maximum(mx, _FLOOR)
        rescale = tl.exp(r - m[:, None])
        s_o = tl.sum(s_o * rescale, 1)
        q_o = tl.sum(q_o * (rescale * rescale), 1)
        s = s_o + tl.exp(z_y - m)
        if HAS_SMOOTH:
            w_sum = tl.sum(w_o, 1) + w_y
            a_lanes = a_o + tl.where(w_o != 0.0, _weighted_gap(w_o, m[:, None] - r), 0.0)
            a_sum = tl.sum(a_lanes, 1) + _weighted_gap(w_y, m - z_y)

    # ---- per-row epilogue -------------------------------------------------------------
    inv_s = 1.0 / s
    log_s = tl.log(s)
    d = m - z_y  # >= 0
    # loss = lse - z_y = log(1 + sum_{j != y} exp(z_j - z_y)); log1p keeps confident rows exact.
    loss_near = _log1p(s_o * tl.exp(tl.minimum(d, 1.0)))
    loss = tl.where(d < 1.0, loss_near, d + log_s)
    other_p = s_o * inv_s  # sum_{j != y} p_j = 1 - p_y without cancellation
    p_y = tl.exp(-loss)
    if HAS_SMOOTH:
        objective = a_coef * loss + b_coef * (w_sum * log_s + a_sum)
        grad_y = -a_coef * other_p + b_coef * (w_sum * p_y - w_y)
    else:
        objective = a_coef * loss
        # + 0 * w_y: NaN for an infinite class weight at y, as F.cross_entropy's
        # -w_y + p_y w_y and the C++ kernel's smoothing term (it was -inf)
        grad_y = -a_coef * other_p + 0.0 * w_y
    if HAS_ZLOSS:
        # z-loss zs * lse^2, lse = m + log s; d/dz_j = 2 zs lse p_j (added below).
        lse = m + log_s
        z_row = tl.where(active, zs * lse * lse, tl.where(bad, float("nan"), 0.0))
        tl.store(zloss_ptr + rows, z_row, mask=row_mask)
        objective = objective + z_row
        z_coef2 = (2.0 * zs * lse * row_scale)[:, None]
    objective = tl.where(active, objective, tl.where(bad, float("nan"), 0.0))
    if IS_MEAN:
        objective = tl.where(active, tl.where(mean_nan, float("nan"), objective), objective)
    tl.store(loss_ptr + rows, objective, mask=row_mask)

    # Recorded only if the loss is finite in the logits dtype, the dtype of the returned
    # per-row loss: float16 logits [-6e4, 6e4] give a float32 loss of 1.2e5 but an inf one.
    loss_out = _to_out(loss, logits_ptr.dtype.element_ty, MANUAL_BF16_RNE).to(tl.float32)
    valid = active & (loss_out < float("inf"))  # loss >= 0 or NaN
    gnorm = q_o * (inv_s * inv_s) + other_p * other_p
    margin = tl.where(C > 1, tl.minimum(z_y - max_o, _MARGIN_CAP), 0.0)
    # argmax (first index) == y: z_y above every other column, or equal to their max
    # whose first column comes after y.
    correct = tl.where((z_y > max_o) | ((z_y == max_o) & (arg_o > y)), 1.0, 0.0)
    # Statistic k of row i at k * B + i in int64: k * B in B's int32 wraps (an address
    # before the buffer) from B = 2**31 / 6 rows on.
    b64 = tl.cast(B, tl.int64)
    tl.store(stats_ptr + rows, tl.where(valid, loss, 0.0), mask=row_mask)
    tl.store(stats_ptr + 1 * b64 + rows, tl.where(valid, p_y, 0.0), mask=row_mask)
    tl.store(stats_ptr + 2 * b64 + rows, tl.where(valid, margin, 0.0), mask=row_mask)
    tl.store(stats_ptr + 3 * b64 + rows, tl.where(valid, correct, 0.0), mask=row_mask)
    tl.store(stats_ptr + 4 * b64 + rows, tl.where(valid, gnorm, 0.0), mask=row_mask)
    tl.store(stats_ptr + 5 * b64 + rows, tl.where(valid, 1.0, 0.0), mask=row_mask)
    has_o = valid & (arg_o < C)
    arg_f = tl.where(has_o, arg_o.to(tl.float32), -1.0)
    tl.store(stats_ptr + 6 * b64 + rows, arg_f, mask=row_mask)

    # ---- gradient pass (off for the loss and statistics alone) --------------------------
    if HAS_GRAD:
        a2 = (a_coef * row_scale)[:, None]
        gy2 = (grad_y * row_scale)[:, None]
        active2 = active[:, None]
        # Bad targets NaN; ignored rows 0, or NaN as F.cross_entropy's (0 - softmax(z) * 0)
        # where softmax(z) is: a NaN or +inf logit (s is NaN), or all -inf (s is NaN, or 0 on
        # the wide path, whose max is floored); s >= 1 otherwise.
        g_inactive = tl.where(bad | ~(s > 0.0), float("nan"), 0.0)[:, None]
        if FUSED:
            p = e * inv_s[:, None]
            if HAS_SMOOTH:
                g = a2 * p + (b_coef * row_scale)[:, None] * (w_sum * p - w[None, :])
            else:
                g = a2 * p
            g = tl.where(is_y, gy2, g)
            if HAS_ZLOSS:
                g = g + z_coef2 * p
            if HAS_CAP:
                g = g * (1.0 - t_cap * t_cap)
            g = tl.where(active2, g, g_inactive)
            tl.store(
                grow[:, None] + cols[None, :],
                _to_out(g, logits_ptr.dtype.element_ty, MANUAL_BF16_RNE),
                mask=mask2,
            )
        else:
            for c0 in range(0, C, BLOCK_C):
                cols = c0 + cols0
                col_mask = cols < C
                mask2 = row_mask[:, None] & col_mask[None, :]
                z = tl.load(lrow[:, None] + cols[None, :], mask=mask2, other=0.0).to(tl.float32)
                if HAS_CAP:
                    t_cap = _tanh(z / cap)
                    z = cap * t_cap
                p = tl.exp(z - m[:, None]) * inv_s[:, None]
                if HAS_SMOOTH:
                    if HAS_WEIGHT:
                        w = tl.load(weight_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
                    else:
                        w = tl.where(col_mask, 1.0, 0.0)
                    g = a2 * p + (b_coef * row_scale)[:, None] * (w_sum[:, None] * p - w[None, :])
                else:
                    g = a2 * p
                g = tl.where(cols[None, :] == y[:, None], gy2, g)
                if HAS_ZLOSS:
                    g = g + z_coef2 * p
                if HAS_CAP:
                    g = g * (1.0 - t_cap * t_cap)
                g = tl.where(active2, g, g_inactive)
                tl.store(
                    grow[:, None] + cols[None, :],
                    _to_out(g, logits_ptr.dtype.element_ty, MANUAL_BF16_RNE),
                    mask=mask2,
                )


#: Targets per program of :func:`_denom_kernel` (per step, unweighted).
DENOM_BLOCK = 1024


@triton.jit
def _denom_kernel(
    target_ptr, weight_ptr, out_ptr, B, C, ignore_index, HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    # The mean's denominator in one launch instead of PyTorch's two to ten elementwise and
    # indexing ops, over the rows with a target in [0, C) that is not ignore_index (as
    # csl_fast.ops._mean_denominator). Unweighted: D itself, one program counting in
    # integers (exact; torch's float32 sum of the mask is too below 2^24 rows). Weighted:
    # each row's term w[y] or 0 into out[B], for torch's sum, so that D is added in torch's
    # order as before.
    offs = tl.arange(0, BLOCK)
    if HAS_WEIGHT:
        rows = tl.program_id(0).to(tl.int64) * BLOCK + offs
        # (rows past B are masked by hand: other=ignore_index, cast into an int32 target's
        # type, wrapped for an ignore_index outside int32, and those rows counted)
        tgt = tl.load(target_ptr + rows, mask=rows < B, other=0).to(tl.int64)
        active = (tgt != ignore_index) & (tgt >= 0) & (tgt < C) & (rows < B)
        y = tl.where(active, tgt, 0)
        w_y = tl.load(weight_ptr + y, mask=active, other=0.0)
        tl.store(out_ptr + rows, w_y, mask=rows < B)
    else:
        n = tl.zeros([BLOCK], tl.int32)
        for start in range(0, B, BLOCK):
            rows = start + offs
            tgt = tl.load(target_ptr + rows, mask=rows < B, other=0).to(tl.int64)
            active = (tgt != ignore_index) & (tgt >= 0) & (tgt < C) & (rows < B)
            n += active.to(tl.int32)
        d = tl.sum(n, 0).to(tl.float32)
        # D = 0: NaN, as csl_fast.ops._mean_denominator gives it (the mean's 0 / 0)
        tl.store(out_ptr, tl.where(d == 0.0, float("nan"), d))


def _denominator(target, w, ignore_index, num_classes) -> torch.Tensor:
    """float32 ``[1]`` mean denominator (see :func:`_denom_kernel`) of contiguous
    ``target`` and float32 contiguous class weights ``w`` (or None)."""
    batch = target.shape[0]
    if w is None:
        out = torch.empty((1,), dtype=torch.float32, device=target.device)
        grid = (1,)
    else:
        out = torch.empty((batch,), dtype=torch.float32, device=target.device)
        grid = (triton.cdiv(batch, DENOM_BLOCK),)
    if grid[0] > 0:
        wrap_triton(_denom_kernel)[grid](
            target, w if w is not None else out, out, batch, num_classes, ignore_index,
            HAS_WEIGHT=w is not None, BLOCK=DENOM_BLOCK,
        )  # fmt: skip
    # weighted D = 0 (every row's class weight 0): the callers map it to NaN (the forward
    # kernel in place, csl_fast.ops._mean_denominator with one more op)
    return out if w is None else out.sum().reshape(1)


def _fake_denominator(target, weight, ignore_index, num_classes):
    return target.new_empty((), dtype=torch.float32)


@register(
    "csl_fast::mean_denominator_triton",
    kernel=_denom_kernel,
    mutates_args=(),
    fake=_fake_denominator,
)
def mean_denominator_triton(
    target: torch.Tensor, weight: torch.Tensor | None, ignore_index: int, num_classes: int
) -> torch.Tensor:
    """float32 ``[]`` ``D`` of :func:`csl_fast.ops._mean_denominator` in one launch (two
    with ``weight``): the number of rows whose target is in ``[0, C)`` and not
    ``ignore_index`` (NaN where that is 0), or the sum of their class weights."""
    if weight is not None and weight.shape != (num_classes,):
        # the kernel reads w[y] for y in [0, num_classes)
        raise ValueError(
            f"csl_fast.mean_denominator_triton: weight must be a 1-D tensor of C = "
            f"{num_classes} class weights, got shape {tuple(weight.shape)}"
        )
    w = None if weight is None else weight.to(torch.float32).contiguous()
    return _denominator(target.contiguous(), w, ignore_index, num_classes).reshape(())


def _next_pow2(n) -> int:
    # int(): a SymInt class count specialises (the block width is a compile-time constant).
    return 1 << max(int(n) - 1, 0).bit_length()


def _config(num_classes: int) -> tuple[bool, int, int, int]:
    """(fused, rows per program, block width, num_warps) for rows of ``num_classes``.

    Independent of the batch size, so a dynamic batch dimension never specialises."""
    block = _next_pow2(num_classes)
    fused = block <= MAX_FUSED_BLOCK
    if not fused:
        block = CHUNK_BLOCK
    rows = 1
    if fused:
        rows = max(1, min(MAX_ROWS, TILE_ELEMS // block))
    elems = rows * block
    # ~8 fp32 tile elements per thread; 8192-wide rows at 16 warps stay under 128 registers
    # (and CHUNK_BLOCK columns get 4 warps).
    num_warps = max(4, min(16, elems // 256))
    return fused, rows, block, num_warps


def _require_supported(
    op: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    label_smoothing: float,
    reduction: int,
) -> None:
    # as the C++ ops (csrc/checks.h): reduction=3 ran as a sum, smoothing 2.0 as given
    if reduction not in (0, 1, 2):
        raise ValueError(
            f"csl_fast.{op}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"csl_fast.{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    if logits.dtype not in _SUPPORTED:
        raise TypeError(
            f"{op} supports float16, bfloat16 and float32 logits, got {logits.dtype}; use "
            "the C++ kernels or csl_fast.reference for float64"
        )
    check_args(op, logits, target, weight)


def check_args(
    op: str, logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None
) -> None:
    """The C++ ops' checks (csrc/checks.h) of what the kernels read by the logits' shape:
    ``B`` targets, ``C`` class weights, all on the logits' device. A shorter one would be
    read past its end."""
    if logits.dim() != 2:
        raise ValueError(
            f"csl_fast.{op}: logits must be 2-D [B, C], got shape {tuple(logits.shape)}; "
            "flatten extra dimensions into the batch"
        )
    batch, num_classes = logits.shape
    if target.dim() != 1 or target.shape[0] != batch:
        raise ValueError(
            f"csl_fast.{op}: target must be 1-D with B = {batch} entries to match logits, "
            f"got shape {tuple(target.shape)}"
        )
    if target.dtype not in (torch.int64, torch.int32):
        raise TypeError(
            f"csl_fast.{op}: target must hold class indices as int64 or int32, got "
            f"{target.dtype}; class-probability targets are not supported"
        )
    if weight is not None and (weight.dim() != 1 or weight.shape[0] != num_classes):
        raise ValueError(
            f"csl_fast.{op}: weight must be a 1-D tensor of C = {num_classes} class weights, "
            f"got shape {tuple(weight.shape)}"
        )
    for name, t in (("target", target), ("weight", weight)):
        if t is not None and t.device != logits.device:
            raise ValueError(
                f"csl_fast.{op}: {name} is on {t.device} but logits are on {logits.device}; "
                "move it with .to(logits.device)"
            )


def _fake_cross_entropy(logits, target, weight, ignore_index, label_smoothing, reduction):
    batch = logits.shape[0]
    loss = logits.new_empty((batch,) if reduction == 0 else ())
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    stats = logits.new_empty((NUM_STATS, batch), dtype=torch.float32)
    return loss, grad, stats


@register(
    "csl_fast::cross_entropy_fwd_triton",
    kernel=_ce_fwd_kernel,
    mutates_args=(),
    fake=_fake_cross_entropy,
)
def cross_entropy_fwd_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused cross entropy: ``(loss, grad, stats)`` as :func:`csl_fast.reference.cross_entropy_fwd`.

    Args:
        logits: ``[B, C]`` float16/bfloat16/float32 (any strides; the class dim is made
            contiguous if it is not).
        target: ``[B]`` int32/int64 class indices; ``ignore_index`` marks ignored rows. A
            target outside ``[0, C)`` that is not ``ignore_index`` gives that row a NaN loss
            and gradient and an ignored row's statistics (not recorded), as the CUDA C++
            kernels do; ``C == 0`` with rows raises ``ValueError``.
        weight: optional ``[C]`` class weights (any float dtype, used in float32).
        ignore_index: target value whose rows contribute nothing.
        label_smoothing: ``eps`` in ``[0, 1]``.
        reduction: 0 none, 1 mean, 2 sum.

    Returns:
        ``loss`` (logits dtype; ``[B]`` for none, ``[]`` otherwise; NaN for a mean over no
        rows as ``F.cross_entropy``), ``grad`` (``[B, C]`` logits dtype, d loss / d logits for
        a unit upstream gradient, zero on ignored rows) and ``stats`` (float32
        ``[NUM_STATS, B]``).

    No host synchronisation: the mean's denominator is reduced on the device and read by
    the kernel. One read and one write of the logits when ``next_pow2(C) <=
    MAX_FUSED_BLOCK``, two reads and one write otherwise.
    """
    _require_supported(
        "cross_entropy_fwd_triton", logits, target, weight, label_smoothing, reduction
    )
    batch, num_classes = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    grad = torch.empty((batch, num_classes), dtype=logits.dtype, device=logits.device)
    loss, stats = _launch(logits, target, weight, ignore_index, label_smoothing, reduction, grad)
    return loss, grad, stats


def _launch(
    logits, target, weight, ignore_index, label_smoothing, reduction, grad, config=None,
    softcap=0.0, z_loss_scale=0.0, z_rows=None, store_grad=True,
):  # fmt: skip
    """(loss, stats), the gradient written into ``grad`` (``None``: over the logits;
    ``store_grad=False``: not formed at all).
    ``config``: (fused, rows, block, num_warps) instead of :func:`_config`'s (for
    ``benchmarks/triton_sweep.py``). ``softcap``, ``z_loss_scale``: the extras (0: off);
    with a z-loss the per-row z-loss goes into ``z_rows`` (float32 ``[B]``), not reduced."""
    batch, num_classes = logits.shape
    if num_classes == 0 and batch != 0:
        # As the C++ kernels: no class to take a loss over (empty outputs would otherwise
        # reach the buffers uninitialised).
        raise ValueError("csl_fast: logits have C = 0 classes")
    inplace = store_grad and grad is None
    loss_rows = torch.empty((batch,), dtype=torch.float32, device=logits.device)
    stats = torch.empty((NUM_STATS, batch), dtype=torch.float32, device=logits.device)
    target = target.contiguous()
    w = None if weight is None else weight.to(torch.float32).contiguous()

    # The mean's denominator counts rows with a target in [0, C) (a bad target's row is
    # NaN); loss_rows stands in, never read, for the other reductions.
    denom = _denominator(target, w, ignore_index, num_classes) if reduction == 1 else loss_rows

    if batch > 0 and num_classes > 0:
        fused, rows, block, num_warps = config or _config(num_classes)
        grid = (triton.cdiv(batch, rows),)
        wrap_triton(_ce_fwd_kernel)[grid](
            logits,
            target,
            w if w is not None else loss_rows,
            denom,
            logits if inplace else grad if store_grad else loss_rows,  # the last: never read
            loss_rows,
            stats,
            batch,
            num_classes,
            logits.stride(0),
            grad.stride(0) if store_grad and not inplace else logits.stride(0),
            ignore_index,
            float(label_smoothing),
            HAS_WEIGHT=w is not None,
            HAS_SMOOTH=label_smoothing > 0.0,
            IS_MEAN=reduction == 1,
            FUSED=fused,
            ROWS=rows,
            BLOCK_C=block,
            MANUAL_BF16_RNE=logits.dtype == torch.bfloat16 and is_interpreted(_ce_fwd_kernel),
            INPLACE=inplace,
            zloss_ptr=z_rows if z_loss_scale else loss_rows,
            cap=float(softcap),
            zs=float(z_loss_scale),
            HAS_CAP=softcap != 0.0,
            HAS_ZLOSS=z_loss_scale != 0.0,
            HAS_GRAD=store_grad,
            num_warps=num_warps,
        )

    if reduction == 0:
        loss = loss_rows.to(logits.dtype)
    elif reduction == 1:
        loss = (loss_rows.sum() / denom.reshape(())).to(logits.dtype)
    else:
        loss = loss_rows.sum().to(logits.dtype)
    return loss, stats


def _fake_loss_stats(logits, target, weight, ignore_index, label_smoothing, reduction):
    loss, _, stats = _fake_cross_entropy(
        logits, target, weight, ignore_index, label_smoothing, reduction
    )
    return loss, stats


@register(
    "csl_fast::cross_entropy_fwd_stats_triton",
    kernel=_ce_fwd_kernel,
    mutates_args=(),
    fake=_fake_loss_stats,
)
def cross_entropy_fwd_stats_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_fwd_triton` without the gradient: ``(loss, stats)``, the kernel's
    gradient pass compiled out (one read of the logits, no write, no logits-sized buffer)."""
    _require_supported(
        "cross_entropy_fwd_stats_triton", logits, target, weight, label_smoothing, reduction
    )
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    args = (logits, target, weight, ignore_index, label_smoothing, reduction, None)
    return _launch(*args, store_grad=False)


@register(
    "csl_fast::cross_entropy_fwd_inplace_triton",
    kernel=_ce_fwd_kernel,
    mutates_args=("logits",),
    fake=_fake_loss_stats,
)
def cross_entropy_fwd_inplace_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_fwd_triton` with the gradient written over the (contiguous)
    logits: ``(loss, stats)``; no logits-sized buffer is allocated."""
    _require_supported(
        "cross_entropy_fwd_inplace_triton", logits, target, weight, label_smoothing, reduction
    )
    if not logits.is_contiguous():
        raise ValueError(
            "csl_fast: inplace_grad=True writes the gradient over the logits and needs them "
            f"contiguous, got strides {tuple(logits.stride())}; pass inplace_grad=False (or "
            "contiguous logits)"
        )
    return _launch(logits, target, weight, ignore_index, label_smoothing, reduction, None)
