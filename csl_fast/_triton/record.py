"""A tracker's per-presentation state in one Triton pass (after a stable sort of the batch).

``csl_fast::record_last_triton`` has the semantics of :func:`csl_fast.reference.record_last`:
valid rows are taken in batch order, so with duplicate indices the last one wins for
``last_loss``, ``last_max_prob`` and ``last_correct``, and forgetting events and the learned
epoch follow every transition in order; the optional sums add every row's statistics; the
optional vote (``suggest_*``) takes one Boyer-Moore step per valid misclassified row.

The reference reaches that result on any device with a stable sort and some forty small
segment operations, each a kernel launch on a GPU. Here: ``torch.sort(index, stable=True)``,
then one pass in which the first position of each run of equal indices reads the sample's
state, walks the run in batch order (the sort is stable) and writes the state back. Each
sample has one writer, so there are no atomics and the sums are bitwise reproducible (added
in batch order, as the CPU kernel does). A run of ``r`` duplicates is ``r`` dependent steps
in one lane. Indices outside ``[0, N)`` are skipped (the scatter kernels do the same).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._registry import register
from .scatter import check_device, check_stats_index

#: Sorted positions per program.
BLOCK = 256


@triton.jit
def _record_sorted_kernel(
    stats_ptr,
    sorted_ptr,
    perm_ptr,
    max_prob_ptr,
    last_loss_ptr,
    last_max_prob_ptr,
    last_correct_ptr,
    forgetting_ptr,
    learned_epoch_ptr,
    grad_norm_sum_ptr,
    margin_sum_ptr,
    p_true_sum_ptr,
    p_true_sq_sum_ptr,
    suggest_label_ptr,
    suggest_votes_ptr,
    suggest_hits_ptr,
    B,
    N,
    epoch,
    epoch_now_ptr,
    stride_sr,
    stride_sc,
    HAS_EPOCH_NOW: tl.constexpr,
    HAS_MAX_PROB: tl.constexpr,
    HAS_TRANSITIONS: tl.constexpr,
    HAS_GRAD_NORM_SUM: tl.constexpr,
    HAS_MARGIN_SUM: tl.constexpr,
    HAS_P_TRUE_SUM: tl.constexpr,
    HAS_P_TRUE_SQ_SUM: tl.constexpr,
    HAS_SUGGEST: tl.constexpr,
    BLOCK: tl.constexpr,
):
    f_ty = last_loss_ptr.dtype.element_ty
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < B
    sr = tl.cast(stride_sr, tl.int64)  # 6 * stride_sr wraps in int32 from B = 2**31 / 6 on
    key = tl.load(sorted_ptr + offs, mask=mask, other=0).to(tl.int64)
    prev = tl.load(sorted_ptr + offs - 1, mask=mask & (offs > 0), other=0).to(tl.int64)
    # An index outside [0, N) is skipped, as by the scatter kernels (range checks are the
    # caller's: csl_fast.accumulate(validate=True)).
    start = mask & ((offs == 0) | (key != prev)) & (key >= 0) & (key < N)

    last_loss = tl.load(last_loss_ptr + key, mask=start, other=0.0)
    last_mp = tl.load(last_max_prob_ptr + key, mask=start, other=0.0)
    correct_before = tl.load(last_correct_ptr + key, mask=start, other=0).to(tl.int32)
    last_c = correct_before
    if HAS_TRANSITIONS:
        forgot = tl.load(forgetting_ptr + key, mask=start, other=0)
        learned = tl.load(learned_epoch_ptr + key, mask=start, other=0)
        if HAS_EPOCH_NOW:  # noqa: SIM108 (a compiled graph's epoch, read at run time)
            stamp = tl.load(epoch_now_ptr).to(tl.int32)
        else:
            stamp = epoch
    if HAS_GRAD_NORM_SUM:
        g_sum = tl.load(grad_norm_sum_ptr + key, mask=start, other=0.0)
    if HAS_MARGIN_SUM:
        m_sum = tl.load(margin_sum_ptr + key, mask=start, other=0.0)
    if HAS_P_TRUE_SUM:
        p_sum = tl.load(p_true_sum_ptr + key, mask=start, other=0.0)
    if HAS_P_TRUE_SQ_SUM:
        p2_sum = tl.load(p_true_sq_sum_ptr + key, mask=start, other=0.0)
    if HAS_SUGGEST:
        s_label = tl.load(suggest_label_ptr + key, mask=start, other=0)
        s_votes = tl.load(suggest_votes_ptr + key, mask=start, other=0)
        s_hits = tl.load(suggest_hits_ptr + key, mask=start, other=0)

    pos = offs
    run = start
    while tl.max(run.to(tl.int32), 0) > 0:
        row = tl.load(perm_ptr + pos, mask=run, other=0).to(tl.int64)
        col = stats_ptr + row * stride_sc
        loss = tl.load(col + 0 * sr, mask=run, other=0.0)
        p_true = tl.load(col + 1 * sr, mask=run, other=0.0)
        margin = tl.load(col + 2 * sr, mask=run, other=0.0)
        c = (tl.load(col + 3 * sr, mask=run, other=0.0) > 0.0).to(tl.int32)
        valid = run & (tl.load(col + 5 * sr, mask=run, other=0.0) > 0.0)
        # Sums take every row (ignored and non-finite rows hold zeros), in batch order.
        if HAS_GRAD_NORM_SUM:
            g = tl.load(col + 4 * sr, mask=run, other=0.0).to(f_ty)
            g_sum = tl.where(run, g_sum + g, g_sum)
        if HAS_MARGIN_SUM:
            m_sum = tl.where(run, m_sum + margin.to(f_ty), m_sum)
        if HAS_P_TRUE_SUM:
            p_sum = tl.where(run, p_sum + p_true.to(f_ty), p_sum)
        if HAS_P_TRUE_SQ_SUM:
            p = p_true.to(f_ty)
            p2_sum = tl.where(run, p2_sum + p * p, p2_sum)
        if HAS_TRANSITIONS:
            forgot = tl.where(valid & (last_c > 0) & (c == 0), forgot + 1, forgot)
            learned = tl.where(valid & (c > 0) & (last_c == 0), stamp, learned)
            learned = tl.where(valid & (c == 0), -1, learned)
        if HAS_SUGGEST:
            # One Boyer-Moore step per valid misclassified row, for its predicted class
            # (the runner-up of y; reference.vote_step).
            r = tl.load(col + 6 * sr, mask=run, other=-1.0)
            vote = valid & (c == 0) & (r >= 0.0)
            r = r.to(tl.int32)
            same = vote & (s_label == r)
            free = vote & (s_label != r) & (s_votes == 0)
            down = vote & (s_label != r) & (s_votes != 0)
            s_label = tl.where(free, r, s_label)
            s_votes = tl.where(
                same, s_votes + 1, tl.where(free, 1, tl.where(down, s_votes - 1, s_votes))
            )
            s_hits = tl.where(same, s_hits + 1, tl.where(free, 1, s_hits))
        if HAS_MAX_PROB:
            mp = tl.load(max_prob_ptr + row, mask=run, other=0.0).to(tl.float32)
        else:
            # max_j p_j = exp(-(loss + min(margin, 0))), in log space (reference.max_prob).
            mp = tl.exp(-(loss + tl.minimum(margin, 0.0)))
        last_loss = tl.where(valid, loss.to(f_ty), last_loss)
        last_mp = tl.where(valid, mp.to(f_ty), last_mp)
        last_c = tl.where(valid, c, last_c)
        pos = pos + 1
        nxt = tl.load(sorted_ptr + pos, mask=run & (pos < B), other=0).to(tl.int64)
        run = run & (pos < B) & (nxt == key)

    tl.store(last_loss_ptr + key, last_loss, mask=start)
    tl.store(last_max_prob_ptr + key, last_mp, mask=start)
    tl.store(last_correct_ptr + key, last_c != 0, mask=start)
    if HAS_TRANSITIONS:
        tl.store(forgetting_ptr + key, forgot, mask=start)
        tl.store(learned_epoch_ptr + key, learned, mask=start)
    if HAS_GRAD_NORM_SUM:
        tl.store(grad_norm_sum_ptr + key, g_sum, mask=start)
    if HAS_MARGIN_SUM:
        tl.store(margin_sum_ptr + key, m_sum, mask=start)
    if HAS_P_TRUE_SUM:
        tl.store(p_true_sum_ptr + key, p_sum, mask=start)
    if HAS_P_TRUE_SQ_SUM:
        tl.store(p_true_sq_sum_ptr + key, p2_sum, mask=start)
    if HAS_SUGGEST:
        tl.store(suggest_label_ptr + key, s_label, mask=start)
        tl.store(suggest_votes_ptr + key, s_votes, mask=start)
        tl.store(suggest_hits_ptr + key, s_hits, mask=start)


def _check_state_buffer(
    name: str, buf: torch.Tensor, dtype: torch.dtype, n: int, device: torch.device
) -> None:
    # One test on every step (twelve buffers), the messages only on failure.
    if buf.dtype is dtype and buf.shape == (n,) and buf.is_contiguous() and buf.device == device:
        return
    if buf.dtype != dtype:
        raise TypeError(f"csl_fast.record_last_triton: {name} must be {dtype}, got {buf.dtype}")
    if buf.dim() != 1 or buf.shape[0] != n or not buf.is_contiguous():
        raise ValueError(
            f"csl_fast.record_last_triton: {name} must be a contiguous [N = {n}] tensor (N "
            f"from last_loss), got shape {tuple(buf.shape)} and strides {tuple(buf.stride())}"
        )
    check_device("record_last_triton", name, buf, device)


def _fake_record_last(*args):
    return None


@register(
    "csl_fast::record_last_triton",
    kernel=_record_sorted_kernel,
    mutates_args=(
        "last_loss",
        "last_max_prob",
        "last_correct",
        "forgetting",
        "learned_epoch",
        "grad_norm_sum",
        "margin_sum",
        "p_true_sum",
        "p_true_sq_sum",
        "suggest_label",
        "suggest_votes",
        "suggest_hits",
    ),
    fake=_fake_record_last,
)
# No defaults on mutated arguments: the dispatcher drops trailing arguments equal to their
# default before a Python kernel sees them, and torch 2.11's ADInplaceOrView kernel then
# indexes past the end of args (IndexError).
def record_last_triton(
    stats: torch.Tensor,
    index: torch.Tensor,
    max_prob: torch.Tensor | None,
    epoch: int,
    last_loss: torch.Tensor,
    last_max_prob: torch.Tensor,
    last_correct: torch.Tensor,
    forgetting: torch.Tensor | None,
    learned_epoch: torch.Tensor | None,
    grad_norm_sum: torch.Tensor | None,
    margin_sum: torch.Tensor | None,
    p_true_sum: torch.Tensor | None,
    p_true_sq_sum: torch.Tensor | None,
    suggest_label: torch.Tensor | None,
    suggest_votes: torch.Tensor | None,
    suggest_hits: torch.Tensor | None,
    epoch_now: torch.Tensor | None = None,
) -> None:
    """:func:`csl_fast.reference.record_last` in one pass (see the module doc).

    Args:
        stats: float32 ``[NUM_STATS, B]`` (any strides).
        index: ``[B]`` int32/int64 indices in ``[0, N)``.
        max_prob: optional ``[B]`` override of the per-row max probability.
        epoch: stamp for ``learned_epoch``.
        last_loss, last_max_prob: contiguous float32/float64 ``[N]``; last_correct: bool
            ``[N]``; forgetting, learned_epoch: int32 ``[N]`` (both or neither); the sums:
            optional contiguous ``[N]`` of last_loss's dtype; suggest_label,
            suggest_votes, suggest_hits: int32 ``[N]`` (all three or none), the majority
            vote over ``stats[OTHER_ARGMAX]``. All updated in place.
        epoch_now: optional 0-d integer tensor on the stats' device that replaces
            ``epoch`` (a compiled graph's epoch, read at run time).
    """
    batch = check_stats_index("record_last_triton", stats, index)
    if (forgetting is None) != (learned_epoch is None):
        # (one without the other was dropped silently, where the C++ pass refused it)
        raise ValueError("csl_fast.record_last: pass forgetting and learned_epoch together")
    n = last_loss.numel()
    f = last_loss.dtype
    if f not in (torch.float32, torch.float64):
        raise TypeError(
            f"csl_fast.record_last_triton: last_loss must be float32 or float64, got {f}"
        )
    # The kernel writes sample k of every buffer at offset k (no strides), for k < N of
    # last_loss: each buffer must be a contiguous [N] of its dtype.
    state = {
        "last_loss": (last_loss, f),
        "last_max_prob": (last_max_prob, f),
        "last_correct": (last_correct, torch.bool),
        "forgetting": (forgetting, torch.int32),
        "learned_epoch": (learned_epoch, torch.int32),
        "grad_norm_sum": (grad_norm_sum, f),
        "margin_sum": (margin_sum, f),
        "p_true_sum": (p_true_sum, f),
        "p_true_sq_sum": (p_true_sq_sum, f),
        "suggest_label": (suggest_label, torch.int32),
        "suggest_votes": (suggest_votes, torch.int32),
        "suggest_hits": (suggest_hits, torch.int32),
    }
    for name, (buf, dtype) in state.items():
        if buf is not None:
            _check_state_buffer(name, buf, dtype, n, stats.device)
    if epoch_now is not None and (
        epoch_now.dim() != 0
        or epoch_now.is_floating_point()
        or epoch_now.dtype == torch.bool
        or epoch_now.device != stats.device
    ):
        raise ValueError(
            "csl_fast.record_last_triton: epoch_now must be a 0-d integer tensor on the "
            f"stats' device, got {epoch_now.dtype} of shape {tuple(epoch_now.shape)} on "
            f"{epoch_now.device}"
        )
    if max_prob is not None and (max_prob.dim() != 1 or max_prob.shape[0] != batch):
        raise ValueError(
            f"csl_fast.record_last_triton: max_prob must be [B = {batch}], got shape "
            f"{tuple(max_prob.shape)}"
        )
    if batch == 0:
        return
    sorted_index, perm = torch.sort(index, stable=True)
    mp = max_prob.to(torch.float32).contiguous() if max_prob is not None else stats
    sums = (grad_norm_sum, margin_sum, p_true_sum, p_true_sq_sum)
    transitions = forgetting is not None
    suggest = (suggest_label, suggest_votes, suggest_hits)
    has_suggest = all(t is not None for t in suggest)
    if not has_suggest and any(t is not None for t in suggest):
        raise ValueError(
            "csl_fast.record_last: pass suggest_label, suggest_votes and suggest_hits together"
        )
    wrap_triton(_record_sorted_kernel)[(triton.cdiv(batch, BLOCK),)](
        stats,
        sorted_index,
        perm,
        mp,
        last_loss,
        last_max_prob,
        last_correct,
        forgetting if transitions else last_loss,
        learned_epoch if transitions else last_loss,
        *(s if s is not None else last_loss for s in sums),
        *(t if has_suggest else last_loss for t in suggest),
        batch,
        last_loss.numel(),
        epoch,
        epoch_now if epoch_now is not None else perm,  # (an int64 pointer, never read)
        stats.stride(0),
        stats.stride(1),
        HAS_EPOCH_NOW=epoch_now is not None,
        HAS_MAX_PROB=max_prob is not None,
        HAS_TRANSITIONS=transitions,
        HAS_GRAD_NORM_SUM=grad_norm_sum is not None,
        HAS_MARGIN_SUM=margin_sum is not None,
        HAS_P_TRUE_SUM=p_true_sum is not None,
        HAS_P_TRUE_SQ_SUM=p_true_sq_sum is not None,
        HAS_SUGGEST=has_suggest,
        BLOCK=BLOCK,
        num_warps=4,
    )
