"""The registered ops, one place: fake kernels, autograd, and backend selection.

Schemas are defined once in ``csrc/csl_fast.cpp`` (``TORCH_LIBRARY(csl_fast, m)``); the
Triton ops in ``csl_fast/_triton`` take the same arguments. Everything here is
traceable by ``torch.compile(fullgraph=True)`` and passes ``torch.library.opcheck``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import ops_backward, reference
from ._ext import _C, resolve_backend
from .accumulate_checks import inside, widen_for_ignore_index
from .fake_kernels import register_fake
from .stats import NUM_STATS

_FWD_OPS = {
    "cpu": "cross_entropy_fwd",
    "cuda": "cross_entropy_fwd",
    "triton": "cross_entropy_fwd_triton",
}
_FWD_INPLACE_OPS = {
    "cpu": "cross_entropy_fwd_inplace",
    "cuda": "cross_entropy_fwd_inplace",
    "triton": "cross_entropy_fwd_inplace_triton",
}
# Loss and statistics only: no logits-sized gradient formed or allocated.
_FWD_STATS_OPS = {
    "cpu": "cross_entropy_fwd_stats",
    "cuda": "cross_entropy_fwd_stats",
    "triton": "cross_entropy_fwd_stats_triton",
}
_SCATTER_OPS = {"cpu": "scatter_stats", "cuda": "scatter_stats", "triton": "scatter_stats_triton"}
_NORM_OPS = {
    "cpu": "input_grad_norms",
    "cuda": "input_grad_norms",
    "triton": "input_grad_norms_triton",
}


_OVERLOADS: dict[str, torch._ops.OpOverload] = {}


def _op(backend: str, names: dict[str, str]) -> torch._ops.OpOverload:
    # resolve_backend has imported csl_fast._triton (registering its ops) when it chose it.
    name = names[backend]
    if torch.compiler.is_compiling():  # (a traced fill of the cache would recompile once)
        return getattr(torch.ops.csl_fast, name).default
    op = _OVERLOADS.get(name)
    if op is None:
        op = _OVERLOADS[name] = getattr(torch.ops.csl_fast, name).default
    return op


def cross_entropy_fwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused cross entropy: ``(loss, stats)``.

    ``loss`` equals ``F.cross_entropy`` (value and gradient with respect to ``logits``);
    ``stats`` is the detached float32 ``[NUM_STATS, B]`` tensor of per-row statistics
    (:class:`csl_fast.stats.Stat`). ``reduction`` is 0 (none), 1 (mean) or 2 (sum).
    """
    # An int32 target compared in int32 with an ignore_index outside int32 would wrap it
    # onto a class (Triton's mean, the reference's statistics): read it as int64 instead.
    target = widen_for_ignore_index(target, ignore_index)
    name = resolve_backend(backend, logits.device, logits.dtype)
    if name == "reference":
        loss = F.cross_entropy(
            logits,
            target.long(),
            # The fused kernels take class weights of any dtype (they read them in
            # float32); F.cross_entropy wants the logits' own.
            weight=None if weight is None else weight.to(logits.dtype),
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            reduction=reference.REDUCTION_NAMES[reduction],
        )
        return loss, reference.row_statistics(logits.detach(), target, ignore_index)
    refuse_transforms(name, logits)
    args = (logits, target, weight, ignore_index, label_smoothing, reduction)
    if not _wants_grad(logits, weight):
        return _op(name, _FWD_STATS_OPS)(*args)  # no gradient formed
    if logits.dtype in _LOW_PRECISION and logits.requires_grad:
        loss, stats, _ = _RoundOnceCrossEntropy.apply(*args, name)
        return loss, stats
    loss, _, stats = _op(name, _FWD_OPS)(*args)
    return loss, stats.detach()


def _wants_grad(logits: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether autograd records the fused op (the logits, or a weight, require grad in grad
    mode); otherwise the ops that form no gradient serve."""
    return torch.is_grad_enabled() and (
        logits.requires_grad or (weight is not None and weight.requires_grad)
    )


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def transformed() -> bool:
    """True inside a ``torch.func`` transform (grad, vmap, jvp, ...) or a forward-mode AD
    ``dual_level``: there the fused ops cannot say how to batch or push tangents through,
    and :func:`csl_fast.accumulate` computes the loss with the reference instead."""
    if torch.compiler.is_compiling():
        return False
    return (
        torch._C._functorch.maybe_current_level() is not None
        or torch.autograd.forward_ad._current_level >= 0
    )


def refuse_transforms(name: str, logits: torch.Tensor) -> None:
    """Raise, naming the way out, when a fused op is called under a transform: its autograd
    formula has no vmap or jvp rule, and an error beats a missing or zero tangent."""
    if transformed():
        raise RuntimeError(
            f"csl_fast: the fused cross entropy (backend {name!r}) does not support torch.func "
            "transforms (grad, vmap, jvp) or forward-mode AD (torch.autograd.forward_ad): it "
            "has no batching or tangent rule. csl_fast.accumulate handles them by computing "
            "the loss with F.cross_entropy (backend='reference'); call that, or pass "
            "backend='reference' here"
        )


def escape_transforms(*tensors: torch.Tensor) -> tuple[list[torch.Tensor], int]:
    """The plain values behind the functorch wrappers of a batch's tensors (each with its
    rows in dimension 0: logits, target, index), for computing statistics and recording
    them into buffers that live outside the transform.

    Under ``grad``/``jvp`` they are the primal values. Under ``vmap`` each vmapped call is a
    batch of its own: the ``V`` calls' rows are laid end to end, call-major (a tensor that
    is not vmapped is repeated), and ``V`` is returned with them. Call with the
    interpreter stack cleared
    (``torch._functorch.pyfunctorch.temporarily_clear_interpreter_stack``)."""
    unwrapped = [_unwrap(t) for t in tensors]
    sizes: dict[int, int] = {}
    for t, levels in unwrapped:
        sizes.update({lvl: t.shape[k] for k, lvl in enumerate(levels)})
    levels = sorted(sizes)
    copies = math.prod(sizes.values())
    plain = []
    for (t, have), logical in zip(unwrapped, tensors, strict=True):
        t = _align(t, have, levels, sizes)
        plain.append(t.reshape(copies * logical.shape[0], *logical.shape[1:]))
    return plain, copies


def _unwrap(t: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """``t`` without functorch wrappers, its vmap dimensions in front (outermost level
    first), and those levels. Call with the interpreter stack cleared."""
    ft = torch._C._functorch
    chain: list[tuple[int, int]] = []  # (level, bdim), innermost wrapper last
    while ft.is_functorch_wrapped_tensor(t):
        if ft.is_batchedtensor(t):
            chain.append((ft.maybe_get_level(t), ft.maybe_get_bdim(t)))
        t = ft.get_unwrapped(t)
    # Each wrapper's bdim indexes its physical tensor, which is the logical tensor of the
    # wrapper inside it: map them, innermost first, onto the plain tensor's dimensions.
    remaining = list(range(t.dim()))
    at = {level: remaining.pop(bdim) for level, bdim in reversed(chain)}
    levels = sorted(at)
    return t.permute([at[level] for level in levels] + remaining), levels


def _align(
    t: torch.Tensor, have: list[int], levels: list[int], sizes: dict[int, int]
) -> torch.Tensor:
    """``t`` (its vmap dimensions ``have`` in front) with a dimension for every level, in
    ``levels`` order, expanded where it had none."""
    for k, lvl in enumerate(levels):
        if lvl not in have:
            t = t.unsqueeze(k)
    return t.expand([sizes[lvl] for lvl in levels] + list(t.shape[len(levels) :]))


class _RoundOnceCrossEntropy(torch.autograd.Function):
    """The fused op for float16/bfloat16 logits, with the gradient rounded once.

    The kernel's gradient for a unit upstream gradient is already rounded to the logits'
    dtype; scaling it by the upstream gradient (and, for 'mean', by 1 / D) would round it
    again and double PyTorch's own error (issue 15: 3x at bfloat16, B = 5, C = 4097,
    upstream 1.7). Keeping that rounded gradient and scaling it in float32 still rounds
    twice (32 of 1080 small-batch bfloat16 cases above 2x PyTorch's error). So forward runs
    the kernel that forms no gradient (``cross_entropy_fwd_stats``, the op of a call
    without grad, so the loss is the same value bit for bit: its mean is formed in float32
    and rounded once; a 'none' kernel summed here rounded each row first, and 55 of 400
    small half-precision batches came out one ulp apart with and without grad) and saves
    the logits, the statistics and, for 'mean', the denominator ``D``; backward computes
    the gradient from them in float32 in one elementwise pass, scales it and rounds once
    (:func:`csl_fast.ops_backward.cross_entropy_bwd`).
    """

    @staticmethod
    def forward(logits, target, weight, ignore_index, label_smoothing, reduction, name):
        loss, stats = _op(name, _FWD_STATS_OPS)(
            logits, target, weight, ignore_index, label_smoothing, reduction
        )
        denom = None
        if reduction == 1:
            denom = _mean_denominator(target, weight, ignore_index, logits.shape[1], name)
        return loss, stats, denom

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        logits, target, weight, ctx.ignore_index, ctx.smoothing, ctx.reduction, ctx.name = inputs
        _, stats, denom = output
        ctx.mark_non_differentiable(stats)
        ctx.save_for_backward(logits, target, weight, stats, denom)

    @staticmethod
    def backward(ctx, grad_loss, _stats, _denom):
        _refuse_double_backward()
        if grad_loss is None:
            return (None,) * 7
        logits, target, weight, stats, denom = ctx.saved_tensors
        # float32 either way; the division promotes by itself (one kernel, not two).
        scale = grad_loss.float() if denom is None else torch.div(grad_loss, denom)
        grad = ops_backward.cross_entropy_bwd(
            logits, target, weight, stats, scale, ctx.ignore_index, ctx.smoothing,
            backend=ctx.name,
        )  # fmt: skip
        return grad, None, None, None, None, None, None


def _div_rounded(num: torch.Tensor, denom: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(num / denom).to(dtype)`` for float32 scalars in one kernel: the quotient is
    computed in float32 and rounded once into the output, as the cast would."""
    return torch.div(num, denom, out=num.new_empty((), dtype=dtype))


def _mean_denominator(
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    num_classes: int,
    name: str,
) -> torch.Tensor:
    """float32 ``D`` of reduction 'mean': the number of non-ignored rows, or the sum of
    their class weights (as ``F.cross_entropy``, with or without label smoothing); NaN
    where that is 0. On the Triton backend one kernel (two with weights) instead of two
    (five) ATen ops. Rows whose target is outside ``[0, C)`` (unvalidated bad input: a
    NaN loss) are left out, as the float32 kernels leave them: with them in, the valid
    rows' float16 gradients came out smaller than their float32 ones.

    D = 0 (no valid row, or class weight 0 at every valid row's target) makes the mean
    F.cross_entropy's 0 / 0, a NaN loss and NaN gradients in the valid rows; but with label
    smoothing the per-row losses sum to more than 0, and dividing by 0 would give inf."""
    if name == "triton":
        d = torch.ops.csl_fast.mean_denominator_triton.default(
            target, weight, ignore_index, num_classes
        )
        if weight is None:
            return d  # NaN for D = 0 from the kernel itself: no launch more per call
    else:
        active = (target != ignore_index) & (target >= 0) & (target < num_classes)
        if weight is None:
            d = active.sum(dtype=torch.float32)
        else:
            d = torch.where(active, weight.float()[torch.where(active, target, 0).long()], 0.0)
            d = d.sum()
    return torch.where(d == 0, torch.nan, d)


# Rows of float32 scratch per step of _scale_once on the CPU (4 MiB): bounded, never
# logits-sized.
_SCALE_CHUNK = 1 << 20


def _scale_once(
    grad: torch.Tensor, scale: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``grad * scale`` computed in float32 and rounded once to ``grad``'s dtype (``scale``
    float32, ``[]`` or ``[B, 1]``), into ``out`` (may be ``grad``) or a new tensor.

    On CUDA one mixed-dtype multiplication does it (TensorIterator casts on the fly in the
    kernel, no temporary); the CPU casts mixed-dtype operands through temporaries, so there
    the rows go through a bounded float32 buffer chunk by chunk."""
    if out is None:
        out = torch.empty_like(grad)
    if scale.dim() == 0:
        scale = scale.reshape(1)  # a 0-d tensor would be cast to grad's dtype first
    if grad.device.type == "cuda":
        return torch.mul(grad, scale, out=out)
    rows = max(1, _SCALE_CHUNK // max(grad.shape[-1], 1))
    for start in range(0, grad.shape[0], rows):
        part = scale if scale.shape[0] == 1 else scale[start : start + rows]
        out[start : start + rows] = grad[start : start + rows].float().mul_(part)
    return out


def cross_entropy_fwd_inplace(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`cross_entropy_fwd` that writes the logits gradient over the logits instead of
    a new buffer: no logits-sized allocation in forward or backward.

    Afterwards ``logits`` holds ``d loss / d logits`` (times the upstream gradient once
    backward has run), not the logits. Safe under autograd: the logits' version counter is
    bumped, so if the graph saved them for a backward of its own (``tanh``, ``softmax``,
    ...), that backward raises "modified by an inplace operation" instead of computing a
    wrong gradient. Backward can run once (it scales the gradient in place). Needs
    contiguous logits that are not a leaf requiring grad, a fused backend, and eager mode.
    """
    target = widen_for_ignore_index(target, ignore_index)  # as cross_entropy_fwd
    name = resolve_backend(backend, logits.device, logits.dtype)
    if name == "reference":
        raise ValueError(
            "csl_fast: inplace_grad=True needs a fused backend (cpu, triton or cuda); the "
            "reference backend is plain F.cross_entropy"
        )
    if logits.is_leaf and logits.requires_grad:
        raise ValueError(
            "csl_fast: inplace_grad=True would overwrite a leaf tensor that requires grad (a "
            "parameter or an input you created); pass logits computed by the model, or "
            "inplace_grad=False"
        )
    if torch.compiler.is_compiling():
        raise RuntimeError(
            "csl_fast: inplace_grad=True is for eager mode; under torch.compile leave it False "
            "and let the compiler plan the buffers"
        )
    refuse_transforms(name, logits)
    return _InplaceCrossEntropy.apply(
        logits, target, weight, ignore_index, label_smoothing, reduction, name
    )


class _InplaceCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, ignore_index, label_smoothing, reduction, name):
        # float16/bfloat16: the gradient unscaled, scaled once in backward (as
        # _RoundOnceCrossEntropy does).
        low = logits.dtype in _LOW_PRECISION
        kernel_reduction = 0 if low and reduction == 1 else reduction
        loss, stats = _op(name, _FWD_INPLACE_OPS)(
            logits, target, weight, ignore_index, label_smoothing, kernel_reduction
        )
        ctx.denom = None
        if low and reduction == 1:
            ctx.denom = _mean_denominator(target, weight, ignore_index, logits.shape[1], name)
            loss = _div_rounded(loss.float().sum(), ctx.denom, logits.dtype)
        # The kernel wrote through the data pointer; make autograd see the mutation.
        torch.autograd.graph.increment_version(logits)
        ctx.set_materialize_grads(False)
        ctx.reduction = reduction
        ctx.used = False
        ctx.save_for_backward(logits, target)
        ctx.ignore_index = ignore_index
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats):
        _refuse_double_backward()
        if grad_loss is None:
            return (None,) * 7
        if ctx.used:
            raise RuntimeError(
                "csl_fast: with inplace_grad=True backward can run once (the gradient lives in "
                "the logits' storage and is scaled in place); use inplace_grad=False to "
                "backpropagate twice"
            )
        ctx.used = True
        grad, target = ctx.saved_tensors
        if grad.dtype in _LOW_PRECISION:
            if ctx.denom is None:
                scale = _per_row(grad_loss.float(), ctx.reduction, target, ctx.ignore_index)
            else:
                # The kernel's rows are unscaled ('none'). D = 0 (every row ignored, or class
                # weight 0 at every valid row's target) makes 1 / D NaN, which must not reach
                # the ignored rows: F.cross_entropy gives them 0 (NaN only where their logits
                # are not finite, which the stored row already holds), so they keep it.
                active = target != ctx.ignore_index
                scale = torch.where(active, torch.div(grad_loss, ctx.denom), 1.0)[:, None]
            _scale_once(grad, scale, out=grad)
        else:
            grad.mul_(_per_row(grad_loss, ctx.reduction, target, ctx.ignore_index))
        return grad.detach(), None, None, None, None, None, None


def cross_entropy_fwd_with_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: int,
    backend: str = "auto",
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused op itself: ``(loss, grad, stats)`` with ``grad = d loss / d logits`` for a
    unit upstream gradient as an output, for callers that build their own backward (such
    as :func:`csl_fast.linear_cross_entropy`). Call it with autograd off.

    ``inplace``: ``grad`` is ``logits`` itself, overwritten (contiguous logits that nothing
    else needs; the reference backend still returns a new buffer)."""
    target = widen_for_ignore_index(target, ignore_index)  # as cross_entropy_fwd
    name = resolve_backend(backend, logits.device, logits.dtype)
    if name == "reference":
        return reference.cross_entropy_fwd(
            logits, target, weight, ignore_index, label_smoothing, reduction
        )
    args = (target, weight, ignore_index, label_smoothing, reduction)
    if inplace:
        loss, stats = _op(name, _FWD_INPLACE_OPS)(logits, *args)
        return loss, logits, stats
    return _op(name, _FWD_OPS)(logits, *args)


def scatter_stats(
    stats: torch.Tensor,
    index: torch.Tensor,
    deterministic: bool,
    csl: torch.Tensor | None,
    count: torch.Tensor | None,
    backend: str = "auto",
) -> None:
    """``csl[index[i]] += stats[LOSS, i]``, ``count[index[i]] += stats[VALID, i]``."""
    name = resolve_backend(backend, stats.device)
    if name == "reference":
        # An index outside [0, N) is skipped, as by the kernels: index_add_ faults on CUDA,
        # and on the CPU raises with csl already added into.
        for buf, is_count in ((csl, False), (count, True)):
            if buf is not None and buf.shape[0] > 0:
                idx, ok = _skip_out_of_range(index, buf.shape[0])
                zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
                pair = (None, buf) if is_count else (buf, None)
                reference.scatter_stats(torch.where(ok, stats, zero), idx, deterministic, *pair)
    else:
        _op(name, _SCATTER_OPS)(stats, index, deterministic, csl, count)
        mark_written(csl, count)


def input_grad_norms(grad: torch.Tensor, scale: float, backend: str = "auto") -> torch.Tensor:
    """float32 ``[B]``: ``||scale * grad[i]||^2`` over all dimensions but the first;
    detached on every backend (not differentiable, as the reference)."""
    name = resolve_backend(backend, grad.device)
    if name == "reference":
        return reference.input_grad_norms(grad, scale)
    # detached: a grad made with create_graph=True gave the kernels' result a grad_fn
    # without a backward (autograd's "silently incorrect" warning, and no x.grad)
    return _op(name, _NORM_OPS)(grad.detach(), scale)


def record_last(
    stats: torch.Tensor,
    index: torch.Tensor,
    max_prob: torch.Tensor | None,
    epoch: int | torch.Tensor,
    last_loss: torch.Tensor,
    last_max_prob: torch.Tensor,
    last_correct: torch.Tensor,
    forgetting: torch.Tensor | None,
    learned_epoch: torch.Tensor | None,
    sums: tuple[torch.Tensor | None, ...] = (None, None, None, None),
    suggest: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    backend: str = "auto",
) -> None:
    """A tracker's per-presentation state (:func:`csl_fast.reference.record_last`);
    ``sums`` are the optional (grad_norm_sum, margin_sum, p_true_sum, p_true_sq_sum),
    ``suggest`` the optional (suggest_label, suggest_votes, suggest_hits) of the vote.

    One sequential C++ pass on the CPU; with the Triton backend (the GPU default) a stable
    sort and one Triton pass; elsewhere (the ``cuda`` and ``reference`` backends) the
    device-only reference, a stable sort and ~40 small kernels. None synchronises with the
    host, except the ``reference`` backend's vote (one read, see
    :func:`csl_fast.reference.record_last`; the ``cuda`` backend's vote is a CUDA kernel,
    ``csl_fast::record_vote``); the C++ and Triton passes add the sums in batch order
    (deterministic). ``epoch`` may be a 0-d integer tensor on the buffers' device (a
    tracker's, under torch.compile): the kernels then read it when they run, so one graph
    serves every epoch, where an int is a constant of the graph.
    """
    # The kernels take an int stamp and, where given, a tensor that replaces it; the
    # reference takes either.
    now = epoch if isinstance(epoch, torch.Tensor) else None
    stamp = 0 if now is not None else epoch
    last = (last_loss, last_max_prob, last_correct)
    state = (forgetting, learned_epoch, *sums, *(suggest or (None, None, None)))
    name = resolve_backend(backend, stats.device)
    if name == "cpu":
        torch.ops.csl_fast.record_last.default(stats, index, max_prob, stamp, *last, *state, now)
        mark_written(*last, *state)
    elif name == "triton":
        op = torch.ops.csl_fast.record_last_triton.default
        op(stats, index, max_prob, stamp, *last, *state, now)
        mark_written(*last, *state)
    elif last_loss.shape[0] > 0:
        args = (max_prob, epoch, *last)
        # An index outside [0, N) is skipped, as by the kernels (index_put_ faults on CUDA):
        # it becomes 0 with all-zero statistics, which adds 0 and changes no state.
        idx, ok = _skip_out_of_range(index, last_loss.shape[0])
        kept = torch.where(ok, stats, torch.zeros((), dtype=stats.dtype, device=stats.device))
        if name == "cuda" and suggest is not None:
            # The vote is a left fold: on the GPU a kernel walks each index's rows in
            # batch order, where the reference would read its number of rounds on the host.
            reference.record_last(kept, idx, *args, *state[:-3])
            torch.ops.csl_fast.record_vote.default(stats, index, *suggest)
            mark_written(*suggest)
        elif suggest is not None and torch.compiler.is_compiling():
            # The reference's vote reads its number of rounds on the host, which a traced
            # graph cannot (fullgraph=True failed): under compilation it is one opaque op.
            reference.record_last(kept, idx, *args, *state[:-3])
            reference_vote(kept, idx, *suggest)
        else:
            reference.record_last(kept, idx, *args, *state)


@torch.library.custom_op(
    "csl_fast::reference_vote", mutates_args=("suggest_label", "suggest_votes", "suggest_hits")
)
def reference_vote(
    stats: torch.Tensor,
    index: torch.Tensor,
    suggest_label: torch.Tensor,
    suggest_votes: torch.Tensor,
    suggest_hits: torch.Tensor,
) -> None:
    """The suggested-label vote of :func:`csl_fast.reference.record_last` as one op, for
    the ``reference`` backend under ``torch.compile`` (see :func:`record_last`)."""
    reference.vote(stats, index.long(), suggest_label, suggest_votes, suggest_hits)


@reference_vote.register_fake
def _(stats, index, suggest_label, suggest_votes, suggest_hits) -> None:
    return None


def record_input_grad(
    sq_norms: torch.Tensor,
    index: torch.Tensor,
    valid: torch.Tensor | None,
    buffers: tuple[torch.Tensor, ...],
    backend: str = "auto",
) -> None:
    """Squared input-gradient norms into a tracker's ``buffers`` (sq_sum, norm_sum, count,
    epoch_sq_sum, epoch_count; :func:`csl_fast.reference.record_input_grad`): one C++ pass
    on the CPU, the device-only reference elsewhere (a few small kernels, no host sync)."""
    if resolve_backend(backend, sq_norms.device) == "cpu":
        torch.ops.csl_fast.record_input_grad.default(sq_norms, index, valid, *buffers)
        mark_written(*buffers)
    elif buffers[0].shape[0] > 0:
        # An index outside [0, N) is skipped, as by the kernels (index_put_ faults on CUDA).
        idx, ok = _skip_out_of_range(index, buffers[0].shape[0])
        reference.record_input_grad(sq_norms, idx, ok if valid is None else valid & ok, *buffers)


def mark_written(*buffers: torch.Tensor | None) -> None:
    """Bump the autograd version counters of ``buffers`` (None: skipped), which a kernel
    has just written through their data pointers: a graph that saved one for its backward
    refuses to run it (as after a PyTorch in-place op) instead of silently using the new
    values. Not while torch.compile traces: a compiled graph's writes are copies at its
    end, which bump them. About 0.1 us a buffer."""
    if not torch.compiler.is_compiling():
        torch._C._increment_version([b for b in buffers if b is not None])


def _skip_out_of_range(index: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index with entries outside [0, n) replaced by 0, in-range mask)``, on the device
    (an int32 index compared with ``n >= 2**31`` wrapped it: every index was skipped)."""
    ok = inside(index, n)
    return torch.where(ok, index, torch.zeros_like(index)), ok


def _fake_cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, reduction):
    batch = logits.shape[0]
    loss = logits.new_empty((batch,) if reduction == 0 else ())
    grad = logits.new_empty(logits.shape)
    return loss, grad, logits.new_empty((NUM_STATS, batch), dtype=torch.float32)


def _setup_cross_entropy(ctx, inputs, output):
    # Without this, autograd would allocate and zero a logits-sized gradient for the
    # unused `grad` output: an extra buffer and a full extra write of the logits.
    ctx.set_materialize_grads(False)
    ctx.reduction, ctx.ignore_index = inputs[5], inputs[3]
    ctx.save_for_backward(output[1], inputs[1])


def _backward_cross_entropy(ctx, grad_loss, _grad_grad, _grad_stats):
    # The forward already holds d loss / d logits; backward is a scale by the upstream
    # gradient (per row for reduction='none').
    _refuse_double_backward()
    if grad_loss is None:  # the loss took no part in what is differentiated
        return None, None, None, None, None, None
    grad, target = ctx.saved_tensors
    factor = _per_row(grad_loss, ctx.reduction, target, ctx.ignore_index)
    return grad * factor, None, None, None, None, None


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        # create_graph=True: the saved gradient has no graph back to the logits, so a
        # second derivative would silently come out as zero.
        raise RuntimeError(
            "csl_fast: double backward through the fused cross entropy is not supported; "
            "use backend='reference' (plain F.cross_entropy) for higher-order gradients"
        )


def _per_row(
    grad_loss: torch.Tensor, reduction: int, target: torch.Tensor, ignore_index: int
) -> torch.Tensor:
    """The ``[B, 1]`` factor of each row's stored gradient: the upstream gradient, and 1 at
    an ignored row, which keeps its stored value (0, or NaN where its logits are not
    finite), as ``F.cross_entropy``'s backward never reads that row's upstream gradient: a
    NaN there (``torch.where(n > 0, loss / n, 0)`` over a padding row with ``n = 0``) made
    the row's gradient NaN, and the parameters after it."""
    rows = grad_loss if reduction == 0 else grad_loss.expand(target.shape[0])
    # (int64: an int32 target compared with an ignore_index past int32 would wrap onto it)
    return torch.where(target.long() != ignore_index, rows, 1)[:, None]


if _C is not None:
    # Its autograd is registered in C++ (csrc/autograd.cpp), with the same formula as
    # _backward_cross_entropy below, which serves the Triton op.
    register_fake("csl_fast::cross_entropy_fwd")(_fake_cross_entropy_fwd)

    @register_fake("csl_fast::cross_entropy_fwd_inplace")
    def _fake_cross_entropy_fwd_inplace(logits, target, weight, ignore, smoothing, reduction):
        loss, _, stats = _fake_cross_entropy_fwd(
            logits, target, weight, ignore, smoothing, reduction
        )
        return loss, stats

    register_fake("csl_fast::cross_entropy_fwd_stats")(_fake_cross_entropy_fwd_inplace)

    @register_fake("csl_fast::scatter_stats")
    def _fake_scatter_stats(stats, index, deterministic, csl, count):
        return None

    @register_fake("csl_fast::record_last")
    def _fake_record_last(*args):
        return None

    @register_fake("csl_fast::record_vote")
    def _fake_record_vote(*args):
        return None

    @register_fake("csl_fast::record_input_grad")
    def _fake_record_input_grad(*args):
        return None

    @register_fake("csl_fast::input_grad_norms")
    def _fake_input_grad_norms(grad, scale):
        return grad.new_empty((grad.shape[0],), dtype=torch.float32)


def register_triton_autograd() -> None:
    """Give the Triton cross-entropy op the shared autograd formula (called once, by
    ``csl_fast._ext`` right after it imports the Triton ops)."""
    torch.library.register_autograd(
        "csl_fast::cross_entropy_fwd_triton",
        _backward_cross_entropy,
        setup_context=_setup_cross_entropy,
    )
