"""Fused binary cross entropy with logits in Triton (csl_fast.accumulate_bce on a GPU).

Three ops with the semantics of :mod:`csl_fast.reference` (``bce_fwd``, ``bce_bwd``,
``bce_record``) and the schemas of the C++ ops (``csrc/csl_fast.cpp``):

* ``csl_fast::bce_fwd_triton(logits, target, weight, pos_weight, reduction) -> (loss,
  stats)``: one read of the ``[B, L]`` logits and targets; tiles of ``ROWS`` rows by
  ``BLOCK_L`` labels, looping over the labels, per-row sums in registers. The entry loss is
  ``[z >= 0](1 - y) z - [z < 0] p y z + (1 + (p - 1) y) log(1 + exp(-|z|))`` (times the
  weight), the form in which no large terms cancel for hard targets. 'mean' and 'sum'
  reduce per-row sums on the device (no host synchronisation).
* ``csl_fast::bce_bwd_triton(grad, logits, target, weight, pos_weight, reduction)``: the
  gradient ``g w ((1 - y) sigmoid(z) - p y sigmoid(-z))`` recomputed from the logits and
  rounded once; the upstream gradient of 'mean'/'sum' is read on the device.
* ``csl_fast::bce_record_triton(logits, target, stats, index, deterministic, csl, count,
  wrong, min_margin, label_csl, label_margin, label_prob)``: per-sample statistics and
  per-entry plain losses ``l``, signed margins and probabilities of the given targets
  (``exp(-l)`` of the same ``l``) at each valid sample's index. ``deterministic=False``:
  relaxed atomics (with duplicate indices the order of float additions may change between
  runs); ``deterministic=True``: a stable sort of the indices, then the first row of each
  run of equal indices adds the run's rows in batch order (bitwise reproducible, one writer
  per entry; a run of ``r`` duplicates is ``r`` dependent steps). An index outside
  ``[0, N)`` is skipped (the caller validates).

Computed in float32 for float16/bfloat16/float32 logits, float64 for float64. Weights are
broadcast to ``[B, L]`` as stride-0 views (no copy). Argument values are validated by the
caller (:func:`csl_fast.accumulate_bce`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..bce_ops import FAKES, register_autograd
from ..reference import BCE_NUM_STATS
from ._registry import is_interpreted, register
from .cross_entropy import _log1p, _to_out

#: Largest label tile; wider rows loop over tiles.
MAX_BLOCK_L = 1024
#: Target number of entries per program (several rows when L is small).
TILE_ELEMS = 2048
#: Cap on rows per program.
MAX_ROWS = 32


@triton.jit
def _entry_losses(z, y, w, pw):
    """(plain, weighted) entry losses of logits ``z`` and targets ``y`` (compute dtype)."""
    log_term = _log1p(tl.exp(-tl.abs(z)))
    pos = z >= 0
    # (z - z): NaN at z = -inf, as torch's form gives (csrc/cpu/bce.cpp)
    plain = tl.where(pos, (1.0 - y) * z, -y * z + (z - z)) + log_term
    linear = tl.where(pos, (1.0 - y) * z, -(pw * y) * z + (z - z))
    weighted = w * (linear + (1.0 + (pw - 1.0) * y) * log_term)
    return plain, weighted


@triton.jit
def _bce_fwd_kernel(
    z_ptr,
    y_ptr,
    w_ptr,
    pw_ptr,
    loss_ptr,
    rows_ptr,
    stats_ptr,
    B,
    L,
    sz0,
    sz1,
    sy0,
    sy1,
    sw0,
    sw1,
    sp0,
    sp1,
    HAS_W: tl.constexpr,
    HAS_PW: tl.constexpr,
    PER_ENTRY: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    MANUAL_BF16_RNE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    # Statistic k of row i at k * B + i, in int64 (k * B wraps in B's int32).
    b64 = tl.cast(B, tl.int64)
    rmask = rows < B
    plain_sum = tl.zeros([ROWS], dtype=ACC)
    weighted_sum = tl.zeros([ROWS], dtype=ACC)
    wrong = tl.zeros([ROWS], dtype=tl.int32)
    min_margin = tl.full([ROWS], float("inf"), dtype=ACC)
    for start in range(0, L, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L).to(tl.int64)
        m = rmask[:, None] & (cols < L)[None, :]
        z = tl.load(z_ptr + rows[:, None] * sz0 + cols[None, :] * sz1, mask=m, other=0.0)
        y = tl.load(y_ptr + rows[:, None] * sy0 + cols[None, :] * sy1, mask=m, other=0.0)
        z = z.to(ACC)
        y = y.to(ACC)
        w = 1.0
        pw = 1.0
        if HAS_W:
            w = tl.load(w_ptr + rows[:, None] * sw0 + cols[None, :] * sw1, mask=m, other=0.0)
        if HAS_PW:
            pw = tl.load(pw_ptr + rows[:, None] * sp0 + cols[None, :] * sp1, mask=m, other=0.0)
        plain, weighted = _entry_losses(z, y, w, pw)
        plain_sum += tl.sum(tl.where(m, plain, 0.0), 1)
        if PER_ENTRY:
            out = _to_out(weighted, loss_ptr.dtype.element_ty, MANUAL_BF16_RNE)
            tl.store(loss_ptr + rows[:, None] * L + cols[None, :], out, mask=m)
        else:
            weighted_sum += tl.sum(tl.where(m, weighted, 0.0), 1)
        bad = m & ((z >= 0) != (y >= 0.5))
        wrong += tl.sum(bad.to(tl.int32), 1)
        margin = tl.where(m, (2.0 * y - 1.0) * z, float("inf"))
        min_margin = tl.minimum(min_margin, tl.min(margin, 1))
    # finite in the float32 statistics (a float64 loss past 3.4e38 is inf there); not NaN
    valid = rmask & (tl.abs(plain_sum) <= 3.4028234663852886e38)
    zero = tl.zeros([ROWS], dtype=tl.float32)
    tl.store(stats_ptr + rows, tl.where(valid, plain_sum.to(tl.float32), zero), mask=rmask)
    tl.store(stats_ptr + b64 + rows, valid.to(tl.float32), mask=rmask)
    tl.store(stats_ptr + 2 * b64 + rows, tl.where(valid, wrong.to(tl.float32), zero), mask=rmask)
    tl.store(
        stats_ptr + 3 * b64 + rows, tl.where(valid, min_margin.to(tl.float32), zero), mask=rmask
    )
    if not PER_ENTRY:
        tl.store(rows_ptr + rows, weighted_sum, mask=rmask)


@triton.jit
def _bce_bwd_kernel(
    g_ptr,
    z_ptr,
    y_ptr,
    w_ptr,
    pw_ptr,
    out_ptr,
    B,
    L,
    n_mean,
    sg0,
    sg1,
    sz0,
    sz1,
    sy0,
    sy1,
    sw0,
    sw1,
    sp0,
    sp1,
    HAS_W: tl.constexpr,
    HAS_PW: tl.constexpr,
    PER_ENTRY: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    MANUAL_BF16_RNE: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    m = (rows < B)[:, None] & (cols < L)[None, :]
    z = tl.load(z_ptr + rows[:, None] * sz0 + cols[None, :] * sz1, mask=m, other=0.0).to(ACC)
    y = tl.load(y_ptr + rows[:, None] * sy0 + cols[None, :] * sy1, mask=m, other=0.0).to(ACC)
    w = 1.0
    pw = 1.0
    if HAS_W:
        w = tl.load(w_ptr + rows[:, None] * sw0 + cols[None, :] * sw1, mask=m, other=0.0)
    if HAS_PW:
        pw = tl.load(pw_ptr + rows[:, None] * sp0 + cols[None, :] * sp1, mask=m, other=0.0)
    if PER_ENTRY:
        g = tl.load(g_ptr + rows[:, None] * sg0 + cols[None, :] * sg1, mask=m, other=0.0)
        g = g.to(ACC)
    else:
        # 'mean' divides by n_mean = B * L, 'sum' by 1 (as the C++ kernel, in ACC). tl.cast,
        # not n_mean.to: an integer argument equal to 1 arrives as a constexpr Python int.
        g = tl.load(g_ptr).to(ACC) / tl.cast(n_mean, ACC)
    e = tl.exp(-tl.abs(z))
    big = 1.0 / (1.0 + e)
    small = e * big
    pos = z >= 0
    sig = tl.where(pos, big, small)
    sig_neg = tl.where(pos, small, big)
    d = w * ((1.0 - y) * sig - pw * y * sig_neg)
    if HAS_PW:
        # NaN, as PyTorch's form (pw y + 1 - y) sigmoid(z) - pw y (inf - inf), not -inf.
        d = tl.where(tl.abs(pw) == float("inf"), float("nan"), d)
    out = _to_out(g * d, out_ptr.dtype.element_ty, MANUAL_BF16_RNE)
    tl.store(out_ptr + rows[:, None] * L + cols[None, :], out, mask=m)


@triton.jit
def _bce_record_atomic_kernel(
    z_ptr,
    y_ptr,
    stats_ptr,
    index_ptr,
    csl_ptr,
    count_ptr,
    wrong_ptr,
    mm_ptr,
    lc_ptr,
    lm_ptr,
    lp_ptr,
    B,
    L,
    N,
    sz0,
    sz1,
    sy0,
    sy1,
    HAS_CSL: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    HAS_WRONG: tl.constexpr,
    HAS_MM: tl.constexpr,
    HAS_LC: tl.constexpr,
    HAS_LM: tl.constexpr,
    HAS_LP: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    # Statistic k of row i at k * B + i, in int64 (k * B wraps in B's int32).
    b64 = tl.cast(B, tl.int64)
    rmask = rows < B
    key = tl.load(index_ptr + rows, mask=rmask, other=0).to(tl.int64)
    valid = tl.load(stats_ptr + b64 + rows, mask=rmask, other=0.0) > 0
    ok = rmask & valid & (key >= 0) & (key < N)
    # The per-sample buffers: by the programs of the first label tile only.
    ok1 = ok & ((rows * 0 + tl.program_id(1)) == 0)
    if HAS_CSL:
        v = tl.load(stats_ptr + rows, mask=ok1, other=0.0)
        tl.atomic_add(csl_ptr + key, v.to(csl_ptr.dtype.element_ty), mask=ok1, sem="relaxed")
    if HAS_COUNT:
        v = tl.load(stats_ptr + b64 + rows, mask=ok1, other=0.0)
        tl.atomic_add(count_ptr + key, v.to(count_ptr.dtype.element_ty), mask=ok1, sem="relaxed")
    if HAS_WRONG:
        v = tl.load(stats_ptr + 2 * b64 + rows, mask=ok1, other=0.0)
        tl.atomic_add(wrong_ptr + key, v.to(wrong_ptr.dtype.element_ty), mask=ok1, sem="relaxed")
    if HAS_MM:
        v = tl.load(stats_ptr + 3 * b64 + rows, mask=ok1, other=0.0)
        tl.atomic_add(mm_ptr + key, v.to(mm_ptr.dtype.element_ty), mask=ok1, sem="relaxed")
    if HAS_LC or HAS_LM or HAS_LP:
        cols = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
        m = ok[:, None] & (cols < L)[None, :]
        z = tl.load(z_ptr + rows[:, None] * sz0 + cols[None, :] * sz1, mask=m, other=0.0)
        y = tl.load(y_ptr + rows[:, None] * sy0 + cols[None, :] * sy1, mask=m, other=0.0)
        z = z.to(ACC)
        y = y.to(ACC)
        at = key[:, None] * L + cols[None, :]
        if HAS_LC or HAS_LP:
            plain, _ = _entry_losses(z, y, 1.0, 1.0)
        if HAS_LC:
            tl.atomic_add(lc_ptr + at, plain.to(lc_ptr.dtype.element_ty), mask=m, sem="relaxed")
        if HAS_LM:
            margin = (2.0 * y - 1.0) * z
            tl.atomic_add(lm_ptr + at, margin.to(lm_ptr.dtype.element_ty), mask=m, sem="relaxed")
        if HAS_LP:
            # exp of the loss in ACC, not of a rounded label_csl entry: p(y | z) as exact
            # as the loss itself, and sigma(z)^y sigma(-z)^(1-y) for soft targets too.
            prob = tl.exp(-plain)
            tl.atomic_add(lp_ptr + at, prob.to(lp_ptr.dtype.element_ty), mask=m, sem="relaxed")


@triton.jit
def _bce_record_sorted_kernel(
    z_ptr,
    y_ptr,
    stats_ptr,
    sorted_ptr,
    perm_ptr,
    csl_ptr,
    count_ptr,
    wrong_ptr,
    mm_ptr,
    lc_ptr,
    lm_ptr,
    lp_ptr,
    B,
    L,
    N,
    sz0,
    sz1,
    sy0,
    sy1,
    HAS_CSL: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    HAS_WRONG: tl.constexpr,
    HAS_MM: tl.constexpr,
    HAS_LC: tl.constexpr,
    HAS_LM: tl.constexpr,
    HAS_LP: tl.constexpr,
    ACC: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    pos = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS).to(tl.int64)
    # Statistic k of row i at k * B + i, in int64 (k * B wraps in B's int32).
    b64 = tl.cast(B, tl.int64)
    pmask = pos < B
    key = tl.load(sorted_ptr + pos, mask=pmask, other=0).to(tl.int64)
    prev = tl.load(sorted_ptr + pos - 1, mask=pmask & (pos > 0), other=0).to(tl.int64)
    start = pmask & ((pos == 0) | (key != prev))
    # A run whose index is outside [0, N) is walked but neither read nor written.
    owner = start & (key >= 0) & (key < N)
    owner1 = owner & ((pos * 0 + tl.program_id(1)) == 0)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_L + tl.arange(0, BLOCK_L).to(tl.int64)
    cmask = (cols < L)[None, :]
    owner2 = owner[:, None] & cmask
    at = key[:, None] * L + cols[None, :]
    if HAS_CSL:
        acc_csl = tl.load(csl_ptr + key, mask=owner1, other=0.0)
    if HAS_COUNT:
        acc_count = tl.load(count_ptr + key, mask=owner1, other=0)
    if HAS_WRONG:
        acc_wrong = tl.load(wrong_ptr + key, mask=owner1, other=0)
    if HAS_MM:
        acc_mm = tl.load(mm_ptr + key, mask=owner1, other=0.0)
    if HAS_LC:
        acc_lc = tl.load(lc_ptr + at, mask=owner2, other=0.0)
    if HAS_LM:
        acc_lm = tl.load(lm_ptr + at, mask=owner2, other=0.0)
    if HAS_LP:
        acc_lp = tl.load(lp_ptr + at, mask=owner2, other=0.0)
    p = pos
    run = start
    while tl.max(run.to(tl.int32), 0) > 0:
        row = tl.load(perm_ptr + p, mask=run, other=0).to(tl.int64)
        take = run & (tl.load(stats_ptr + b64 + row, mask=run, other=0.0) > 0)
        # Every per-sample value of a row that is not valid is 0 (added, as on the CPU).
        if HAS_CSL:
            v = tl.load(stats_ptr + row, mask=run, other=0.0).to(csl_ptr.dtype.element_ty)
            acc_csl = tl.where(run, acc_csl + v, acc_csl)
        if HAS_COUNT:
            v = tl.load(stats_ptr + b64 + row, mask=run, other=0.0).to(count_ptr.dtype.element_ty)
            acc_count = tl.where(run, acc_count + v, acc_count)
        if HAS_WRONG:
            v = tl.load(stats_ptr + 2 * b64 + row, mask=run, other=0.0)
            v = v.to(wrong_ptr.dtype.element_ty)
            acc_wrong = tl.where(run, acc_wrong + v, acc_wrong)
        if HAS_MM:
            v = tl.load(stats_ptr + 3 * b64 + row, mask=run, other=0.0).to(mm_ptr.dtype.element_ty)
            acc_mm = tl.where(run, acc_mm + v, acc_mm)
        if HAS_LC or HAS_LM or HAS_LP:
            m = take[:, None] & cmask
            z = tl.load(z_ptr + row[:, None] * sz0 + cols[None, :] * sz1, mask=m, other=0.0)
            y = tl.load(y_ptr + row[:, None] * sy0 + cols[None, :] * sy1, mask=m, other=0.0)
            z = z.to(ACC)
            y = y.to(ACC)
            if HAS_LC or HAS_LP:
                plain, _ = _entry_losses(z, y, 1.0, 1.0)
            if HAS_LC:
                acc_lc = tl.where(m, acc_lc + plain.to(lc_ptr.dtype.element_ty), acc_lc)
            if HAS_LM:
                margin = ((2.0 * y - 1.0) * z).to(lm_ptr.dtype.element_ty)
                acc_lm = tl.where(m, acc_lm + margin, acc_lm)
            if HAS_LP:
                prob = tl.exp(-plain).to(lp_ptr.dtype.element_ty)
                acc_lp = tl.where(m, acc_lp + prob, acc_lp)
        p = p + 1
        nxt = tl.load(sorted_ptr + p, mask=run & (p < B), other=0).to(tl.int64)
        run = run & (p < B) & (nxt == key)
    if HAS_CSL:
        tl.store(csl_ptr + key, acc_csl, mask=owner1)
    if HAS_COUNT:
        tl.store(count_ptr + key, acc_count, mask=owner1)
    if HAS_WRONG:
        tl.store(wrong_ptr + key, acc_wrong, mask=owner1)
    if HAS_MM:
        tl.store(mm_ptr + key, acc_mm, mask=owner1)
    if HAS_LC:
        tl.store(lc_ptr + at, acc_lc, mask=owner2)
    if HAS_LM:
        tl.store(lm_ptr + at, acc_lm, mask=owner2)
    if HAS_LP:
        tl.store(lp_ptr + at, acc_lp, mask=owner2)


def _next_pow2(n) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _config(labels: int) -> tuple[int, int, int]:
    """(rows per program, label tile, num_warps) for rows of ``labels`` entries;
    independent of the batch size (a dynamic batch never specialises)."""
    block = min(_next_pow2(labels), MAX_BLOCK_L)
    rows = max(1, min(MAX_ROWS, TILE_ELEMS // block))
    num_warps = max(2, min(8, rows * block // 256))
    return rows, block, num_warps


def _acc(logits: torch.Tensor) -> tuple[torch.dtype, object]:
    return (
        (torch.float64, tl.float64)
        if logits.dtype == torch.float64
        else (torch.float32, tl.float32)
    )


def _broadcast(t: torch.Tensor | None, logits: torch.Tensor, dtype: torch.dtype):
    """``(tensor, strides)`` of an optional weight as a ``[B, L]`` view in ``dtype``
    (converted before it is broadcast: no ``[B, L]`` copy of a ``[L]`` weight)."""
    if t is None:
        return logits, (0, 0)
    view = t.to(dtype).expand(logits.shape)
    return view, tuple(view.stride())


def _manual_rne(logits: torch.Tensor, kernel) -> bool:
    return logits.dtype == torch.bfloat16 and is_interpreted(kernel)


def _check_inputs(op: str, logits, target, weight=None, pos_weight=None, reduction=0) -> None:
    """The C++ ops' checks (csrc/bce_checks.h: check_bce_inputs, check_bce_options): the
    kernels read ``B x L`` entries of the target (and of the weights, broadcast) by the
    logits' shape, so a target of another shape was read past its end."""
    if logits.dim() != 2 or target.shape != logits.shape:
        raise ValueError(
            f"{op}: logits must be 2-D [B, L] and target of their shape, got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    if target.dtype != logits.dtype:
        raise TypeError(
            f"{op}: target must have the logits' dtype {logits.dtype}, got {target.dtype}"
        )
    if logits.shape[1] == 0 and logits.shape[0] > 0:
        raise ValueError(f"{op}: logits have L = 0 labels")
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is None:
            continue
        try:
            fits = t.dim() <= 2 and torch.broadcast_shapes(t.shape, logits.shape) == logits.shape
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(
                f"{op}: {name} of shape {tuple(t.shape)} does not broadcast to the logits' "
                f"shape {tuple(logits.shape)}"
            )
        if not t.dtype.is_floating_point:
            raise TypeError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if reduction not in (0, 1, 2):
        raise ValueError(f"{op}: reduction must be 0 (none), 1 (mean) or 2 (sum), got {reduction}")
    for name, t in (("target", target), ("weight", weight), ("pos_weight", pos_weight)):
        if t is not None and t.device != logits.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but logits are on {logits.device}; move it "
                "with .to(logits.device)"
            )


@register(
    "csl_fast::bce_fwd_triton", kernel=_bce_fwd_kernel, mutates_args=(), fake=FAKES["bce_fwd"]
)
def bce_fwd_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, stats)`` as :func:`csl_fast.reference.bce_fwd` (see the module doc)."""
    _check_inputs("csl_fast.bce_fwd_triton", logits, target, weight, pos_weight, reduction)
    batch, labels = logits.shape
    acc, acc_tl = _acc(logits)
    per_entry = reduction == 0
    stats = torch.empty((BCE_NUM_STATS, batch), dtype=torch.float32, device=logits.device)
    loss = torch.empty((batch, labels) if per_entry else (0,), dtype=logits.dtype,
                       device=logits.device)  # fmt: skip
    row_sums = torch.empty((0 if per_entry else batch,), dtype=acc, device=logits.device)
    if batch > 0:
        w, w_strides = _broadcast(weight, logits, acc)
        pw, pw_strides = _broadcast(pos_weight, logits, acc)
        rows, block, num_warps = _config(labels)
        wrap_triton(_bce_fwd_kernel)[(triton.cdiv(batch, rows),)](
            logits, target, w, pw, loss, row_sums, stats, batch, labels,
            *logits.stride(), *target.stride(), *w_strides, *pw_strides,
            HAS_W=weight is not None, HAS_PW=pos_weight is not None, PER_ENTRY=per_entry,
            ACC=acc_tl, ROWS=rows, BLOCK_L=block,
            MANUAL_BF16_RNE=_manual_rne(logits, _bce_fwd_kernel), num_warps=num_warps,
        )  # fmt: skip
    if per_entry:
        return loss, stats
    total = row_sums.double().sum()  # a fixed order: deterministic
    if reduction == 1:
        total = total / (batch * labels)  # 0 / 0 = NaN, as PyTorch
    return total.to(logits.dtype), stats


@register(
    "csl_fast::bce_bwd_triton", kernel=_bce_bwd_kernel, mutates_args=(), fake=FAKES["bce_bwd"]
)
def bce_bwd_triton(
    grad: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: int,
) -> torch.Tensor:
    """``d loss / d logits`` for the upstream gradient ``grad`` (:func:`csl_fast.reference.
    bce_bwd`), contiguous ``[B, L]`` in the logits' dtype."""
    op = "csl_fast.bce_bwd_triton"
    _check_inputs(op, logits, target, weight, pos_weight, reduction)
    # reduction none reads a [B, L] upstream gradient entry by entry; the others one value
    want = tuple(logits.shape) if reduction == 0 else ()
    if tuple(grad.shape) != want or grad.device != logits.device:
        raise ValueError(
            f"{op}: grad must be the upstream gradient of the loss, shape {want} on "
            f"{logits.device}, got {tuple(grad.shape)} on {grad.device}"
        )
    batch, labels = logits.shape
    out = torch.empty((batch, labels), dtype=logits.dtype, device=logits.device)
    if batch == 0 or labels == 0:
        return out
    acc, acc_tl = _acc(logits)
    per_entry = reduction == 0
    w, w_strides = _broadcast(weight, logits, acc)
    pw, pw_strides = _broadcast(pos_weight, logits, acc)
    g_strides = tuple(grad.stride()) if per_entry else (0, 0)
    rows, block, num_warps = _config(labels)
    grid = (triton.cdiv(batch, rows), triton.cdiv(labels, block))
    wrap_triton(_bce_bwd_kernel)[grid](
        grad, logits, target, w, pw, out, batch, labels,
        batch * labels if reduction == 1 else 1,
        *g_strides, *logits.stride(), *target.stride(), *w_strides, *pw_strides,
        HAS_W=weight is not None, HAS_PW=pos_weight is not None, PER_ENTRY=per_entry,
        ACC=acc_tl, ROWS=rows, BLOCK_L=block,
        MANUAL_BF16_RNE=_manual_rne(logits, _bce_bwd_kernel), num_warps=num_warps,
    )  # fmt: skip
    return out


_BUFFER_NAMES = (
    "csl", "count", "wrong", "min_margin", "label_csl", "label_margin", "label_prob"
)  # fmt: skip
_FLOAT = (torch.float32, torch.float64)
_FLOAT_OR_INT = (torch.float32, torch.float64, torch.int32, torch.int64)


def _check_record_args(logits, target, stats, index, buffers) -> None:
    """The C++ op's checks (csrc/bce_checks.h): the kernels read B rows of ``stats`` and
    ``index`` and write sample k of every buffer at ``k`` (``k * L + l`` per label) for
    ``k`` below the first buffer's N, so each must be that long, contiguous and of its
    dtype, on the logits' device."""
    op = "csl_fast.bce_record_triton"
    if logits.dim() != 2 or target.shape != logits.shape:
        raise ValueError(
            f"{op}: logits must be 2-D [B, L] and target of their shape, got "
            f"{tuple(logits.shape)} and {tuple(target.shape)}"
        )
    batch, labels = logits.shape
    if stats.shape != (BCE_NUM_STATS, batch) or stats.dtype != torch.float32:
        raise ValueError(
            f"{op}: stats must be the float32 [{BCE_NUM_STATS}, B = {batch}] tensor of "
            f"bce_fwd, got {stats.dtype} {tuple(stats.shape)}"
        )
    if index.dim() != 1 or index.shape[0] != batch:
        raise ValueError(
            f"{op}: index must be 1-D with one dataset index per row (B = {batch}), got "
            f"shape {tuple(index.shape)}"
        )
    if index.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: index must be int64 or int32 dataset indices, got {index.dtype}")
    n = None
    for name, buf in buffers.items():
        if buf is None:
            continue
        per_label = name.startswith("label_")
        dtypes = _FLOAT_OR_INT if name in ("count", "wrong") else _FLOAT
        if buf.dtype not in dtypes:
            raise TypeError(
                f"{op}: {name} must be {' or '.join(str(d) for d in dtypes)}, got {buf.dtype}"
            )
        shape_ok = buf.dim() == 2 and buf.shape[1] == labels if per_label else buf.dim() == 1
        if not shape_ok or not buf.is_contiguous():
            want = f"[N, L = {labels}]" if per_label else "1-D [N]"
            raise ValueError(
                f"{op}: {name} must be a contiguous {want} tensor, one row per dataset "
                f"sample, got shape {tuple(buf.shape)} and strides {tuple(buf.stride())}"
            )
        if n is not None and buf.shape[0] != n:
            raise ValueError(
                f"{op}: {name} has {buf.shape[0]} rows but the other buffers have {n}; all "
                "need one per dataset sample"
            )
        n = buf.shape[0]
    named = {"target": target, "stats": stats, "index": index, **buffers}
    for name, t in named.items():
        if t is not None and t.device != logits.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but logits are on {logits.device}; move it "
                "with .to(logits.device)"
            )


@register(
    "csl_fast::bce_record_triton",
    kernel=_bce_record_atomic_kernel,
    mutates_args=_BUFFER_NAMES,
    fake=FAKES["bce_record"],
)
def bce_record_triton(
    logits: torch.Tensor,
    target: torch.Tensor,
    stats: torch.Tensor,
    index: torch.Tensor,
    deterministic: bool,
    csl: torch.Tensor | None,
    count: torch.Tensor | None,
    wrong: torch.Tensor | None,
    min_margin: torch.Tensor | None,
    label_csl: torch.Tensor | None,
    label_margin: torch.Tensor | None,
    label_prob: torch.Tensor | None,
) -> None:
    """The recording pass of :func:`csl_fast.reference.bce_record` (see the module doc);
    buffers contiguous, ``stats`` the contiguous ``[BCE_NUM_STATS, B]`` of ``bce_fwd``."""
    buffers = (csl, count, wrong, min_margin, label_csl, label_margin, label_prob)
    _check_record_args(logits, target, stats, index, dict(zip(_BUFFER_NAMES, buffers, strict=True)))
    given = [b for b in buffers if b is not None]
    batch, labels = logits.shape
    if batch == 0 or not given:
        return
    _, acc_tl = _acc(logits)
    stats = stats.contiguous()  # the kernels read its rows at offsets k * B
    per_entry = any(b is not None for b in (label_csl, label_margin, label_prob))
    rows, block, num_warps = _config(labels)
    grid = (triton.cdiv(batch, rows), triton.cdiv(labels, block) if per_entry else 1)
    ptrs = [b if b is not None else given[0] for b in buffers]
    flags = dict(
        HAS_CSL=csl is not None, HAS_COUNT=count is not None, HAS_WRONG=wrong is not None,
        HAS_MM=min_margin is not None, HAS_LC=label_csl is not None,
        HAS_LM=label_margin is not None, HAS_LP=label_prob is not None, ACC=acc_tl,
        ROWS=rows, BLOCK_L=block, num_warps=num_warps,
    )  # fmt: skip
    sizes = (batch, labels, given[0].shape[0], *logits.stride(), *target.stride())
    if deterministic:
        sorted_index, perm = torch.sort(index, stable=True)
        wrap_triton(_bce_record_sorted_kernel)[grid](
            logits, target, stats, sorted_index, perm, *ptrs, *sizes, **flags
        )
    else:
        wrap_triton(_bce_record_atomic_kernel)[grid](
            logits, target, stats, index.contiguous(), *ptrs, *sizes, **flags
        )


register_autograd("triton")
