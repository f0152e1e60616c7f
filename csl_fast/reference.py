"""Pure-PyTorch reference of every csl_fast op.

Each function here has the signature of the registered op it mirrors (see
``csl_fast/ops.py``), is written for clarity rather than speed, and is what the
tests and the benchmarks compare every kernel against. It is also the fallback
when the compiled extension is not available.

Numerics follow the kernels: statistics are computed in float32 (float64 for
float64 logits), the true-class gradient is ``-(sum_{j != y} p_j)`` rather than
``p_y - 1`` so it does not cancel as ``p_y -> 1``.
"""

from __future__ import annotations

import math
from enum import IntEnum

import torch
import torch.nn.functional as F

from .stats import MARGIN_CAP, NUM_STATS, Stat, invalid_column

REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}
REDUCTION_NAMES = {v: k for k, v in REDUCTIONS.items()}


def _compute_dtype(logits: torch.Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


_FLOAT32_MAX = torch.finfo(torch.float32).max


def _finite_in(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether ``x`` (float32 or float64) is finite once rounded to ``dtype`` and once
    stored as a float32 statistic (a float64 loss of 1e39 is inf there: recorded, it would
    make the sample's CSL inf for good)."""
    return torch.isfinite(x.to(dtype)) & (x.abs() <= _FLOAT32_MAX)


def row_statistics(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, softcap: float = 0.0
) -> torch.Tensor:
    """Per-row training dynamics of plain (unweighted, unsmoothed) cross entropy.

    Returns float32 ``[NUM_STATS, B]`` indexed by :class:`csl_fast.stats.Stat`. Rows that
    are ignored or whose loss is not finite in the logits dtype (a float16 loss of 65520 or
    more rounds to inf) or in float32 (a float64 loss past 3.4e38) are all zero (``VALID``
    = 0) but for ``OTHER_ARGMAX``, which is -1 there (as for every row when ``C == 1``).
    With ``softcap`` ``s > 0`` every statistic is of the soft-capped logits
    ``s tanh(z / s)`` (computed in float32 or float64).
    """
    z = softcapped(logits.to(_compute_dtype(logits)), softcap)
    batch, num_classes = z.shape
    # (int64 first: an int32 target compared with an ignore_index outside int32 wraps it,
    # and 2**32 ignored the class-0 rows)
    active = target.long() != ignore_index
    y = torch.where(active, target, torch.zeros_like(target)).long()
    lse = torch.logsumexp(z, dim=1)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    others = torch.ones_like(z, dtype=torch.bool)
    others[torch.arange(batch, device=z.device), y] = False
    # lse - z_y rounds tiny losses of confident rows to 0; when y holds the max,
    # log1p(sum_{j != y} exp(z_j - z_y)) keeps them (and cannot overflow).
    rel = torch.where(others, torch.exp(z - z_y[:, None]), torch.zeros_like(z))
    y_is_max = z_y[:, None] >= torch.where(others, z, torch.full_like(z, -float("inf")))
    loss = torch.where(y_is_max.all(1), torch.log1p(rel.sum(1)), lse - z_y)
    # (not exp(z - lse): at logits of 1e30, lse loses log C to rounding and every p with
    # it; the gradient norm came out 16x too large)
    p = torch.softmax(z, dim=1)
    p_other = torch.where(others, p, torch.zeros_like(p))
    one_minus_py = p_other.sum(1)
    gnorm = p_other.square().sum(1) + one_minus_py.square()
    if num_classes > 1:
        max_other = torch.where(others, z, torch.full_like(z, -float("inf"))).amax(1)
        margin = (z_y - max_other).clamp(max=MARGIN_CAP)
        # The first j != y holding that max (argmax returns the first of equal maxima).
        other_argmax = (others & (z == max_other[:, None])).to(torch.int8).argmax(1).float()
    else:
        margin = torch.zeros_like(z_y)
        other_argmax = torch.full_like(z_y, -1.0, dtype=torch.float32)
    correct = (z.argmax(1) == y).to(z.dtype) if batch else z_y
    # Not recorded unless the loss F.cross_entropy returns (lse - z_y) is finite too: a
    # +inf target logit (or C = 1 with +-inf) makes it NaN while log1p(...) above gives 0.
    # Both in the logits dtype, that of the returned loss: float16 logits [-6e4, 6e4] give
    # a float32 loss of 1.2e5 but an inf one.
    valid = active & _finite_in(loss, logits.dtype) & _finite_in(lse - z_y, logits.dtype)
    stats = torch.zeros(NUM_STATS, batch, dtype=torch.float32, device=z.device)
    stats[Stat.LOSS] = loss.float()
    stats[Stat.P_TRUE] = torch.exp(-loss).float()
    stats[Stat.MARGIN] = margin.float()
    stats[Stat.CORRECT] = correct.float()
    stats[Stat.GRAD_NORM_SQ] = gnorm.float()
    stats[Stat.VALID] = 1.0
    stats[Stat.OTHER_ARGMAX] = other_argmax
    return torch.where(valid[None, :], stats, invalid_column(stats))


def soft_row_statistics(logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    r"""Per-row statistics against class probabilities ``q`` (soft targets), float32
    ``[NUM_STATS, B]``.

    ``LOSS`` is the plain cross entropy against ``q``,
    :math:`H(q, p) = \sum_j q_j (\operatorname{lse}(z) - z_j)`, unweighted and unsmoothed
    (for a one-hot ``q`` the class-index loss); ``GRAD_NORM_SQ`` is
    :math:`\lVert \partial H / \partial z \rVert^2 = \lVert (\sum_j q_j) p - q \rVert^2`;
    ``P_TRUE = exp(-LOSS)``. The label statistics (``MARGIN``, ``CORRECT``,
    ``OTHER_ARGMAX``) are those of the most probable target class ``argmax_j q_j``. Rows
    whose loss is not finite in the logits dtype are invalid, as in :func:`row_statistics`.
    """
    z = logits.to(_compute_dtype(logits))
    q = probs.to(z.dtype)
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    loss = (q * (lse - z)).sum(1)
    p = torch.exp(z - lse)
    gnorm = (q.sum(1, keepdim=True) * p - q).square().sum(1)
    label = q.argmax(1) if q.shape[0] else q.new_zeros(0, dtype=torch.long)
    # Rows whose loss is not finite in the logits dtype are passed as ignored (-1, which
    # argmax never is), so they get row_statistics' own invalid pattern. It gets the
    # float32 logits: with float16 ones it would also drop rows whose hard loss at the
    # label (not what is recorded) is 65520 or more while H(q, p) is smaller.
    stats = row_statistics(z, torch.where(_finite_in(loss, logits.dtype), label, -1), -1)
    valid = stats[Stat.VALID] > 0
    zero = torch.zeros((), dtype=torch.float32, device=stats.device)
    stats[Stat.LOSS] = torch.where(valid, loss.float(), zero)
    stats[Stat.P_TRUE] = torch.where(valid, torch.exp(-loss).float(), zero)
    stats[Stat.GRAD_NORM_SQ] = torch.where(valid, gnorm.float(), zero)
    return stats


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``csl_fast::cross_entropy_fwd``.

    Returns ``(loss, grad, stats)``: ``loss`` as ``F.cross_entropy`` returns it (logits'
    dtype; ``[]`` for mean/sum, ``[B]`` for none), ``grad`` the gradient of ``loss`` with
    respect to ``logits`` for a unit upstream gradient (``[B, C]``, logits' dtype), and
    ``stats`` from :func:`row_statistics`.
    """
    # Differentiated inside whatever mode the caller is in: enable_grad does nothing under
    # inference_mode, whose tensors cannot be saved for backward until cloned outside it.
    with torch.inference_mode(False), torch.enable_grad():
        z = logits.detach().to(_compute_dtype(logits), copy=True).requires_grad_(True)
        objective = F.cross_entropy(
            z,
            target.to(torch.long, copy=True),
            weight=None if weight is None else weight.to(z.dtype, copy=True),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=REDUCTION_NAMES[reduction],
        )
        (grad,) = torch.autograd.grad(objective.sum(), z)
    stats = row_statistics(logits.detach(), target, ignore_index)
    return objective.detach().to(logits.dtype), grad.to(logits.dtype), stats


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
) -> torch.Tensor:
    """Reference of ``csl_fast::cross_entropy_bwd``: ``scale_i * d objective_i / d z_ij``
    ([B, C], logits' dtype) for float16/bfloat16 ``logits``, the per-row objective of
    :func:`cross_entropy_fwd` (reduction 'none'; with ``softcap`` or ``z_loss_scale``, of
    :func:`cross_entropy_extra`), computed in float32 and rounded once. ``scale`` is
    float32 with ``B`` entries or one; ``stats`` (the forward's, from which the kernels take
    ``lse = stats[LOSS] + z'_y``) does not change the result."""
    z = logits.detach().float().requires_grad_(True)
    with torch.enable_grad():
        zc = softcapped(z, softcap)
        objective = F.cross_entropy(
            zc,
            target.long(),
            weight=None if weight is None else weight.float(),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction="none",
        )
        if z_loss_scale:
            objective = objective + z_loss(zc, target, ignore_index, 0, z_loss_scale)
        upstream = scale.float().reshape(-1).expand(logits.shape[0])
        (grad,) = torch.autograd.grad(objective, z, upstream)
    return grad.to(logits.dtype)


def softcapped(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    r"""The logits a soft-capped loss is taken on, :math:`z' = s \tanh(z / s)` (Gemma 2's
    logit soft-capping), computed in ``logits``' dtype; ``softcap`` 0 (or None): ``logits``."""
    return logits if not softcap else softcap * torch.tanh(logits / softcap)


def z_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int,
    reduction: int,
    z_loss_scale: float,
) -> torch.Tensor:
    r"""The z-loss (PaLM): :math:`\zeta \operatorname{lse}(z_i)^2` per row whose target is not
    ``ignore_index`` (0 on ignored rows), in ``logits``' dtype; reduced like the loss:
    ``[B]`` (none), the sum (sum), or the sum over the number of non-ignored rows (mean;
    NaN when there is none, as ``F.cross_entropy``'s mean). Unweighted."""
    active = target != ignore_index
    lse = torch.logsumexp(logits, dim=1) if logits.shape[1] else logits.sum(1)
    rows = torch.where(active, z_loss_scale * lse.square(), torch.zeros_like(lse))
    if reduction == REDUCTIONS["none"]:
        return rows
    if reduction == REDUCTIONS["sum"]:
        return rows.sum()
    return rows.sum() / active.sum().to(rows.dtype)


def cross_entropy_extra(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    softcap: float,
    z_loss_scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Differentiable ``(loss, z_loss)`` of a language-model head, in plain PyTorch and
    ``logits``' dtype: ``F.cross_entropy`` of :func:`softcapped` logits ``z'`` plus
    :func:`z_loss` of ``z'``, and that z-loss term alone (``reduction`` 0/1/2 as the ops)."""
    z = softcapped(logits, softcap)
    loss = F.cross_entropy(
        z,
        target.long(),
        # As the fused kernels, which take class weights of any dtype (F.cross_entropy
        # wants the logits' own).
        weight=None if weight is None else weight.to(z.dtype),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        reduction=REDUCTION_NAMES[reduction],
    )
    zl = z_loss(z, target, ignore_index, reduction, z_loss_scale)
    return loss + zl, zl


def cross_entropy_fwd_extra(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    softcap: float,
    z_loss_scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``csl_fast::cross_entropy_fwd_extra``: ``(loss, grad, stats, z_loss)``
    as :func:`cross_entropy_fwd`, of :func:`cross_entropy_extra` computed in float32 (float64
    for float64 logits); ``stats`` of the soft-capped logits."""
    z = logits.detach().to(_compute_dtype(logits)).requires_grad_(True)
    with torch.enable_grad():
        objective, zl = cross_entropy_extra(
            z,
            target,
            None if weight is None else weight.to(z.dtype),
            ignore_index,
            label_smoothing,
            reduction,
            softcap,
            z_loss_scale,
        )
        (grad,) = torch.autograd.grad(objective.sum(), z)
    stats = row_statistics(logits.detach(), target, ignore_index, softcap)
    out = (objective.detach(), grad, zl.detach())
    return out[0].to(logits.dtype), out[1].to(logits.dtype), stats, out[2].to(logits.dtype)


def scatter_stats(
    stats: torch.Tensor,
    index: torch.Tensor,
    deterministic: bool,
    csl: torch.Tensor | None,
    count: torch.Tensor | None,
) -> None:
    """Reference of ``csl_fast::scatter_stats``.

    ``csl[index[i]] += stats[LOSS, i]`` and ``count[index[i]] += stats[VALID, i]``;
    duplicate indices add up.
    """
    idx = index.long()
    for buf, row in ((csl, Stat.LOSS), (count, Stat.VALID)):
        if buf is None:
            continue
        values = stats[row].to(buf.dtype)
        if deterministic and buf.device.type != "cpu":
            # index_add_ adds with atomics there (PyTorch's docs: nondeterministic unless
            # torch.use_deterministic_algorithms is on); index_put_ sorts first
            buf.index_put_((idx,), values, accumulate=True)
        else:  # in row order on the CPU
            buf.index_add_(0, idx, values)


def input_grad_norms(grad: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference of ``csl_fast::input_grad_norms``: float32 ``[B]`` of ``||scale * grad[i]||^2``
    over all dimensions but the first."""
    # Not flatten(1): a [B] gradient (one feature per sample) has no dimension 1.
    rows = grad.detach().reshape(grad.shape[0], math.prod(grad.shape[1:]))
    return (rows.to(_compute_dtype(grad)) * scale).square().sum(1).float()


def max_prob(loss: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
    r""":math:`\max_j p_j = \exp(-(\ell + \min(m, 0)))`: the top logit is ``z_y`` when the
    margin ``m = z_y - max_{j != y} z_j`` is >= 0, else ``z_y - m``; computed in log space
    so it neither overflows nor underflows to 0 * inf."""
    return torch.exp(-(loss + margin.clamp(max=0)))


def record_last(
    stats: torch.Tensor,
    index: torch.Tensor,
    max_prob_override: torch.Tensor | None,
    epoch: int | torch.Tensor,
    last_loss: torch.Tensor,
    last_max_prob: torch.Tensor,
    last_correct: torch.Tensor,
    forgetting: torch.Tensor | None,
    learned_epoch: torch.Tensor | None,
    grad_norm_sum: torch.Tensor | None = None,
    margin_sum: torch.Tensor | None = None,
    p_true_sum: torch.Tensor | None = None,
    p_true_sq_sum: torch.Tensor | None = None,
    suggest_label: torch.Tensor | None = None,
    suggest_votes: torch.Tensor | None = None,
    suggest_hits: torch.Tensor | None = None,
) -> None:
    """Reference of ``csl_fast::record_last``: a tracker's per-presentation state.

    The sums, when given, add ``stats[GRAD_NORM_SQ]``, ``stats[MARGIN]``, ``stats[P_TRUE]``
    and its square at ``index`` (every row; ignored rows hold zeros).

    Valid rows (``stats[VALID] > 0``) are taken in batch order, so with duplicate indices
    the last one wins. For each: ``last_loss``, ``last_max_prob`` (``max_prob_override`` or
    :func:`max_prob`) and ``last_correct`` are overwritten; when ``forgetting`` and
    ``learned_epoch`` are given, a correct -> incorrect change against the previous
    presentation adds a forgetting event, an incorrect -> correct change sets
    ``learned_epoch = epoch`` (an int, or a 0-d integer tensor on the buffers' device) and
    an incorrect row sets it to -1. Device-only (a stable sort and segment operations): no
    host synchronisation.

    When ``suggest_label``, ``suggest_votes`` and ``suggest_hits`` (int32, together or not)
    are given, every valid *misclassified* row (``stats[CORRECT] == 0``) is one step of a
    Boyer-Moore majority vote for its predicted class, which is then the runner-up
    ``r = stats[OTHER_ARGMAX]``, in batch order (:func:`vote_step`).
    That update is a left fold without a vectorised form: it is applied in rounds, round
    ``k`` taking the ``k``-th voting row of every index, and the number of rounds (the
    largest multiplicity of an index in the batch) is the one value read on the host.
    """
    if (forgetting is None) != (learned_epoch is None):
        # (one without the other was dropped silently, where the C++ pass refused it)
        raise ValueError("csl_fast.record_last: pass forgetting and learned_epoch together")
    if index.numel() == 0:
        return
    suggest = (suggest_label, suggest_votes, suggest_hits)
    if any(t is not None for t in suggest):
        if any(t is None for t in suggest):
            raise ValueError(
                "csl_fast.record_last: pass suggest_label, suggest_votes and suggest_hits together"
            )
        vote(stats, index.long(), suggest_label, suggest_votes, suggest_hits)
    idx = index.long()
    f = last_loss.dtype
    p_true = stats[Stat.P_TRUE].to(f)
    for buf, values in (
        (grad_norm_sum, stats[Stat.GRAD_NORM_SQ].to(f)),
        (margin_sum, stats[Stat.MARGIN].to(f)),
        (p_true_sum, p_true),
        (p_true_sq_sum, p_true * p_true),
    ):
        if buf is not None:
            index_add(buf, idx, values)
    valid = stats[Stat.VALID] > 0
    correct = (stats[Stat.CORRECT] > 0) & valid
    loss = stats[Stat.LOSS]
    mp = max_prob(loss, stats[Stat.MARGIN]) if max_prob_override is None else max_prob_override
    sidx, perm, sv, seg_id, prev, last = _segments(idx, valid)
    sc = correct[perm]
    has_last = last >= 0
    at_last = last.clamp(min=0)
    old_correct = last_correct[sidx]
    new_correct = torch.where(has_last, sc[at_last], old_correct)
    if forgetting is not None and learned_epoch is not None:
        prev_correct = torch.where(prev >= 0, sc[prev.clamp(min=0)], old_correct)
        forget = sv & prev_correct & ~sc
        onset = (sv & sc & ~prev_correct).to(torch.int32)
        seg_onsets = torch.zeros_like(onset).index_add_(0, seg_id, onset)[seg_id]
        old_epoch = learned_epoch[sidx]
        stamp = epoch.to(old_epoch.dtype) if isinstance(epoch, torch.Tensor) else epoch
        streak = torch.where(seg_onsets > 0, stamp, old_epoch)
        new_epoch = torch.where(
            has_last, torch.where(new_correct, streak, torch.full_like(old_epoch, -1)), old_epoch
        )
        forgetting.index_add_(0, sidx, forget.to(torch.int32))
        learned_epoch.index_put_((sidx,), new_epoch)
    # Every row of a segment writes the same value, so duplicate writes agree.
    for buf, values in ((last_loss, loss), (last_max_prob, mp)):
        new = torch.where(has_last, values[perm][at_last].to(f), buf[sidx])
        buf.index_put_((sidx,), new)
    last_correct.index_put_((sidx,), new_correct)


def vote_step(
    label: torch.Tensor, votes: torch.Tensor, hits: torch.Tensor, r: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Boyer-Moore majority-vote step per element: the state ``(label, votes, hits)``
    after a vote for class ``r`` (elementwise; all int32 or all int64).

    ``r == label``: ``votes + 1, hits + 1``; else ``votes == 0``: the candidate becomes
    ``r`` with ``votes = hits = 1``; else ``votes - 1``. ``hits`` counts the votes for the
    current candidate since it became the candidate; a candidate that holds a strict
    majority of all votes is the final ``label`` (Boyer and Moore, 1981).
    """
    same = label == r
    free = ~same & (votes == 0)
    one = torch.ones_like(votes)
    new_label = torch.where(free, r.to(label.dtype), label)
    new_votes = torch.where(same, votes + 1, torch.where(free, one, votes - 1))
    new_hits = torch.where(same, hits + 1, torch.where(free, one, hits))
    return new_label, new_votes, new_hits


def vote(
    stats: torch.Tensor,
    idx: torch.Tensor,
    label: torch.Tensor,
    votes: torch.Tensor,
    hits: torch.Tensor,
) -> None:
    """The vote of :func:`record_last`, in rounds of at most one row per index."""
    r = stats[Stat.OTHER_ARGMAX].to(torch.int64)
    voting = (stats[Stat.VALID] > 0) & (stats[Stat.CORRECT] <= 0) & (r >= 0)
    sidx, perm = torch.sort(idx, stable=True)
    sv = voting[perm].to(torch.int64)
    n = sidx.numel()
    new_seg = torch.ones(n, dtype=torch.bool, device=idx.device)
    new_seg[1:] = sidx[1:] != sidx[:-1]
    # Rank of each voting row among its index's voting rows (batch order: a stable sort).
    before = sv.cumsum(0) - sv
    seg_base = torch.where(new_seg, before, 0).cummax(0).values
    rank = torch.where(sv > 0, before - seg_base, -1)
    rounds = int(rank.max()) + 1 if n else 0  # the host read (see record_last)
    sr = r[perm]
    for k in range(rounds):
        rows = rank == k
        at = sidx[rows]
        new = vote_step(label[at], votes[at], hits[at], sr[rows].to(torch.int32))
        for buf, value in zip((label, votes, hits), new, strict=True):
            buf.index_put_((at,), value)


def record_input_grad(
    sq_norms: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor | None,
    sq_sum: torch.Tensor,
    norm_sum: torch.Tensor,
    count: torch.Tensor,
    epoch_sq_sum: torch.Tensor,
    epoch_count: torch.Tensor,
) -> None:
    r"""Reference of ``csl_fast::record_input_grad``: squared input-gradient norms
    :math:`s_i` (``sq_norms``, the buffers' dtype) into a tracker's buffers.

    For every row that is finite and ``valid`` (default: all rows), at ``index``:
    ``sq_sum`` and ``epoch_sq_sum`` add :math:`s_i`, ``norm_sum`` adds :math:`\sqrt{s_i}`,
    ``count`` and ``epoch_count`` add 1. Duplicate indices add up in batch order.
    """
    idx = index.long()
    ok = torch.isfinite(sq_norms)
    if valid is not None:
        ok = ok & valid
    sq = torch.where(ok, sq_norms, torch.zeros_like(sq_norms))
    one = ok.to(sq.dtype)
    for buf, values in (
        (sq_sum, sq),
        (norm_sum, sq.sqrt()),
        (count, one),
        (epoch_sq_sum, sq),
        (epoch_count, one),
    ):
        index_add(buf, idx, values)


def _segments(
    index: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group a batch by index, keeping batch order within an index (stable sort).

    Returns, for the sorted batch: ``sorted_index``, ``perm`` (sorted position -> batch
    row), ``valid`` (sorted), ``segment_id``, ``prev`` (position of the previous valid row
    with the same index, -1 if none) and ``last`` (position of the last valid row with the
    same index, -1 if none).
    """
    n = index.numel()
    sidx, perm = torch.sort(index, stable=True)
    sv = valid[perm]
    pos = torch.arange(n, device=index.device)
    new_seg = torch.ones(n, dtype=torch.bool, device=index.device)
    new_seg[1:] = sidx[1:] != sidx[:-1]
    seg_start = torch.where(new_seg, pos, 0).cummax(0).values
    seg_id = new_seg.to(torch.int64).cumsum(0) - 1
    vpos = torch.where(sv, pos, -1)
    upto = vpos.cummax(0).values.roll(1)
    upto[:1] = -1
    prev = torch.where(upto >= seg_start, upto, -1)
    last = torch.full_like(vpos, -1).scatter_reduce_(0, seg_id, vpos, "amax")[seg_id]
    return sidx, perm, sv, seg_id, prev, last


# ---------------------------------------------------------------------------------------
# Binary cross entropy with logits (csl_fast.accumulate_bce): the ops csl_fast::bce_fwd,
# bce_bwd and bce_record. Entries are (sample i, label l) of [B, L] logits z and targets
# y in [0, 1]; computed in float32 (float64 for float64 logits).


class BceStat(IntEnum):
    """Rows of the float32 ``[BCE_NUM_STATS, B]`` per-sample statistics of ``bce_fwd``;
    every row is 0 where ``VALID`` is 0."""

    #: Plain loss of the sample: :math:`\sum_l \ell_{il}`, no weight, no pos_weight.
    LOSS = 0
    #: 1 when ``LOSS`` is finite (the sample is recorded), else 0.
    VALID = 1
    #: Number of wrong labels: :math:`\#\{l : (z_{il} \ge 0) \ne (y_{il} \ge 1/2)\}`.
    WRONG = 2
    #: The smallest signed margin :math:`\min_l (2 y_{il} - 1) z_{il}` (the worst label).
    MIN_MARGIN = 3


BCE_NUM_STATS = len(BceStat)


def bce_entry_losses(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Per-entry loss of ``F.binary_cross_entropy_with_logits`` (reduction 'none'), in the
    compute dtype; without ``weight`` and ``pos_weight`` the *plain* entry loss

    .. math::
        \ell_{il} = \operatorname{softplus}(z) - y z
        = [z \ge 0] (1 - y) z - [z < 0]\, y z + \log(1 + e^{-|z|}),

    and with them :math:`w \, ([z \ge 0](1-y)z - [z<0]\, p y z + (1 + (p-1) y) \log(1 +
    e^{-|z|}))`. Written so that no large terms cancel for hard targets (the kernels use
    the same form)."""
    dtype = _compute_dtype(logits)
    z, y = logits.to(dtype), target.to(dtype)
    pw = (
        torch.ones((), dtype=dtype, device=z.device) if pos_weight is None else pos_weight.to(dtype)
    )
    log_term = torch.log1p(torch.exp(-z.abs()))
    # (z - z): 0 for a finite z, NaN at z = -inf, where torch's own form gives NaN
    linear = torch.where(z >= 0, (1 - y) * z, -(pw * y) * z + (z - z))
    loss = linear + (1 + (pw - 1) * y) * log_term
    return loss if weight is None else loss * weight.to(dtype)


def bce_entry_margins(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Signed margin :math:`(2 y - 1) z` of every entry, in the compute dtype: positive
    when the label's side of 0 agrees with the target, scaled by the target's confidence."""
    dtype = _compute_dtype(logits)
    return (2 * target.to(dtype) - 1) * logits.to(dtype)


def bce_row_statistics(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """float32 ``[BCE_NUM_STATS, B]`` per-sample statistics (:class:`BceStat`) of ``[B, L]``
    logits and targets; a sample whose plain loss is not finite is all zero."""
    plain = bce_entry_losses(logits, target)
    loss = plain.sum(1)
    valid = loss.abs() <= _FLOAT32_MAX  # finite in the float32 statistics; not NaN
    z, y = logits.to(plain.dtype), target.to(plain.dtype)
    wrong = ((z >= 0) != (y >= 0.5)).sum(1)
    margin = bce_entry_margins(logits, target)
    min_margin = margin.amin(1) if margin.shape[1] else torch.zeros_like(loss)
    stats = torch.stack([loss.float(), valid.float(), wrong.float(), min_margin.float()])
    return torch.where(valid[None, :], stats, torch.zeros_like(stats))


def bce_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``csl_fast::bce_fwd``: ``(loss, stats)``, ``loss`` as
    ``F.binary_cross_entropy_with_logits`` returns it, computed in the compute dtype and
    rounded once to the logits' dtype (``[]`` for mean/sum, ``[B, L]`` for none), and
    ``stats`` from :func:`bce_row_statistics`."""
    dtype = _compute_dtype(logits)
    loss = F.binary_cross_entropy_with_logits(
        logits.detach().to(dtype),
        target.detach().to(dtype),
        weight=None if weight is None else weight.detach().to(dtype),
        pos_weight=None if pos_weight is None else pos_weight.detach().to(dtype),
        reduction=REDUCTION_NAMES[reduction],
    )
    return loss.to(logits.dtype), bce_row_statistics(logits.detach(), target.detach())


def bce_bwd(
    grad: torch.Tensor,
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    pos_weight: torch.Tensor | None,
    reduction: int,
) -> torch.Tensor:
    r"""Reference of ``csl_fast::bce_bwd``: the logits' gradient of
    :func:`bce_fwd`'s loss for the upstream gradient ``grad`` (``[]``, or ``[B, L]`` for
    reduction 'none'), computed in the compute dtype and rounded once:
    :math:`g \, w \, ((1 - y) \sigma(z) - p\, y\, \sigma(-z))`, divided by :math:`B L` for
    'mean'."""
    dtype = _compute_dtype(logits)
    z = logits.detach().to(dtype).requires_grad_(True)
    with torch.enable_grad():
        loss = F.binary_cross_entropy_with_logits(
            z,
            target.detach().to(dtype),
            weight=None if weight is None else weight.detach().to(dtype),
            pos_weight=None if pos_weight is None else pos_weight.detach().to(dtype),
            reduction=REDUCTION_NAMES[reduction],
        )
        (dz,) = torch.autograd.grad(loss, z, grad.detach().to(dtype))
    return dz.to(logits.dtype)


def bce_record(
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
    r"""Reference of ``csl_fast::bce_record``: for every valid sample ``i`` (``stats[VALID,
    i]``) at ``n = index[i]``: ``csl[n] += LOSS``, ``count[n] += 1``, ``wrong[n] += WRONG``,
    ``min_margin[n] += MIN_MARGIN`` and, per label ``l``, ``label_csl[n, l]`` += the plain
    entry loss :math:`\ell_{il}` (:func:`bce_entry_losses`), ``label_margin[n, l] += (2 y -
    1) z`` and ``label_prob[n, l]`` += :math:`e^{-\ell_{il}} = \sigma(z)^y \sigma(-z)^{1-y}`,
    the probability of the given target. Duplicate indices add up in batch order; an index
    outside ``[0, N)`` adds nothing."""
    del deterministic  # the reference adds in row order
    valid = stats[BceStat.VALID] > 0
    per_sample = (
        (csl, stats[BceStat.LOSS]),
        (count, stats[BceStat.VALID]),
        (wrong, stats[BceStat.WRONG]),
        (min_margin, stats[BceStat.MIN_MARGIN]),
    )
    for buf, values in per_sample:
        if buf is not None:
            _add_rows(buf, index, valid, values)
    if label_csl is not None or label_prob is not None:
        entry = bce_entry_losses(logits.detach(), target.detach())
        if label_csl is not None:
            _add_rows(label_csl, index, valid, entry)
        if label_prob is not None:
            _add_rows(label_prob, index, valid, torch.exp(-entry))
    if label_margin is not None:
        _add_rows(label_margin, index, valid, bce_entry_margins(logits.detach(), target.detach()))


def _add_rows(
    buf: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, values: torch.Tensor
) -> None:
    """``buf[index[i]] += values[i]`` for the valid rows whose index is in ``[0, N)``, in
    batch order, values rounded to ``buf``'s dtype first (as the kernels add them). Batch
    order on the CPU; on CUDA, index_put_ sums a run of duplicate indices first for rows
    of up to 32 entries, then adds the sum (the same up to rounding)."""
    if buf.shape[0] == 0:
        return
    idx = index.long()
    ok = valid & (idx >= 0) & (idx < buf.shape[0])
    keep = ok.view(-1, *([1] * (values.dim() - 1)))
    values = torch.where(keep, values, torch.zeros((), dtype=values.dtype, device=values.device))
    index_add(buf, torch.where(ok, idx, 0), values.to(buf.dtype))


def index_add(buf: torch.Tensor, idx: torch.Tensor, values: torch.Tensor) -> None:
    """``buf[idx[i]] += values[i]``, duplicates added up: in row order on the CPU
    (``index_add_``, one sequential pass whatever the thread count, as the C++ kernels
    add), where ``index_put_(accumulate=True)`` adds float32 values with atomics from
    32,768 rows on when PyTorch has more than one thread, so the sums changed with
    ``torch.set_num_threads`` and from run to run. Elsewhere ``index_put_``, which sorts
    the indices first (``index_add_`` adds with atomics on CUDA)."""
    if buf.device.type == "cpu":
        buf.index_add_(0, idx, values)
    else:
        buf.index_put_((idx,), values, accumulate=True)
