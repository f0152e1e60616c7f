r"""``accumulate_bce``: a fused ``F.binary_cross_entropy_with_logits`` that records CSL.

For multi-label data (tagging, medical findings) a sample has ``L`` binary labels and the
model ``L`` logits. This is the multi-label counterpart of :func:`csl_fast.accumulate`::

    csl = torch.zeros(len(dataset))                       # 4 bytes per sample
    label_csl = torch.zeros(len(dataset), num_labels)     # 4 bytes per (sample, label)
    loss = csl_fast.accumulate_bce(model(x), y, idx, csl, label_csl=label_csl)
    loss.backward()

The loss and its gradient are those of ``F.binary_cross_entropy_with_logits``; what is
recorded is the *plain* loss (no ``weight``, no ``pos_weight``), as ``accumulate`` records
the plain cross entropy, so sample weights or class rebalancing do not change the scores.
"""

from __future__ import annotations

import torch

from . import _ext, backward_rerun, bce_ops
from ._args import check_flags
from ._ext import resolve_backend
from .accumulate import _any_autocast, _fell_back, eager_step_allowed
from .accumulate_checks import (
    BCE_BUFFER_NAMES,
    INDEX_HINT,
    _check_values,
    _overlap,
    check_buffer,
    check_buffers_apart,
    check_count_fits,
    check_in_graph,
    check_writable,
    device_mismatch,
    refuse_tracing,
    validate_by_default,
)
from .buffer_locks import buffer_lock
from .input_grad import warn_if_default_scale
from .ops import transformed
from .record_loss import _record_tracker, _scratch
from .reference import REDUCTIONS, BceStat
from .stats import NUM_STATS, Stat
from .tracker import CSLTracker

__all__ = ["accumulate_bce"]

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_HALF = (torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.int32)
_FLOAT_BUFFER = (torch.float32, torch.float64)
_COUNT_BUFFER = (torch.float32, torch.float64, torch.int64, torch.int32)
# The buffers of the recording op, in its schema's order.
_NAMES = BCE_BUFFER_NAMES


def accumulate_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor,
    csl: torch.Tensor | CSLTracker,
    *,
    count: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    pos_weight: torch.Tensor | None = None,
    reduction: str = "mean",
    label_csl: torch.Tensor | None = None,
    label_margin: torch.Tensor | None = None,
    label_prob: torch.Tensor | None = None,
    wrong: torch.Tensor | None = None,
    min_margin: torch.Tensor | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    r"""``F.binary_cross_entropy_with_logits(logits, target, weight, pos_weight=pos_weight,
    reduction=reduction)`` (same value and gradient), recording each sample's plain loss.

    With logits :math:`z_{il}` and targets :math:`y_{il} \in [0, 1]` (soft targets
    allowed), the *plain* entry loss is

    .. math::
        \ell_{il} = \log(1 + e^{z_{il}}) - y_{il} z_{il}

    (no ``weight``, no ``pos_weight``). For every sample :math:`i` whose plain loss
    :math:`\ell_i = \sum_l \ell_{il}` is finite (in float32, the statistics' dtype: a
    float64 loss past 3.4e38 is not), at :math:`n = \mathrm{index}_i`:

    ================  =========================================  =====================
    buffer            update                                     memory
    ================  =========================================  =====================
    ``csl`` [N]       :math:`\mathrel{+}= \ell_i`                4 B/sample (8: f64)
    ``count`` [N]     :math:`\mathrel{+}= 1`                     4-8 B/sample
    ``wrong`` [N]     :math:`\mathrel{+}= \#\{l: (z_{il} \ge 0)    4-8 B/sample
                      \ne (y_{il} \ge \tfrac12)\}`
    ``min_margin``    :math:`\mathrel{+}= \min_l (2y_{il}-1)       4-8 B/sample
    [N]               z_{il}` (the worst label)
    ``label_csl``     :math:`[n, l] \mathrel{+}= \ell_{il}`      4 B/entry (8: f64)
    [N, L]
    ``label_margin``  :math:`[n, l] \mathrel{+}= (2y_{il}-1)     4 B/entry (8: f64)
    [N, L]            z_{il}`
    ``label_prob``    :math:`[n,l] \mathrel{+}= e^{-\ell_{il}}`  4 B/entry (8: f64)
    [N, L]
    ================  =========================================  =====================

    Divided by ``count``: ``csl`` is the CSL (mean plain loss per presentation),
    ``label_csl`` the per-label CSL that ranks (sample, label) entries as mislabeled,
    ``label_margin`` the per-entry area under the margin (AUM's sigmoid analogue: a flipped
    label keeps a negative margin), ``label_prob`` the mean probability the model gives each
    entry's target (:math:`e^{-\ell_{il}} = \sigma(z)^y \sigma(-z)^{1-y}`; for hard targets
    the probability of the given value: the doubt view that tells a flipped entry from a
    hard one, :func:`csl_fast.detect_losses.mislabeled_entries`), ``wrong`` the mean number
    of labels the model gets wrong, ``min_margin`` the worst label's mean margin. A sample
    whose plain loss is NaN or inf is not recorded at all (one bad step cannot poison its
    scores); duplicate indices add up; nothing here is part of autograd. The recorded losses
    pass through float32 statistics whatever the logits' dtype: float64 logits' are rounded
    to float32 (about 1e-7 relative, as ``record_loss`` rounds its losses), then added in
    the buffers' dtype.

    ``csl`` may be a :class:`csl_fast.CSLTracker`: then its ``csl_sum``, ``csl_count`` and
    ``last_loss`` (and, with ``history=True``, the epoch sums) are updated as
    :func:`csl_fast.record_loss` updates them, and ``label_csl``, ``label_margin`` and
    ``label_prob``, when not given, default to the tracker's attributes of those names if
    it has them (``[N, L]``: ``label_csl`` and ``label_prob`` for a tracker with
    ``num_labels``). Its logits-derived buffers (margins, confidences, forgetting) are left
    as they are: they are softmax statistics.

    Args:
        logits: ``[B, L]`` float32, float16, bfloat16 or float64, any strides; or
            ``[B]`` (a binary classifier's one logit per sample, read as ``[B, 1]``).
            Under ``torch.autocast`` float16/bfloat16 logits, targets and weights are
            cast to float32 first, as autocast casts
            ``F.binary_cross_entropy_with_logits``'s, so the loss is float32.
        target: the logits' shape, targets in ``[0, 1]``, the logits' dtype
            (``y.to(z.dtype)``; under autocast a float32 target goes with half logits).
        index: ``[B]`` int64 (or int32) dataset indices in ``[0, N)``.
        csl: ``[N]`` contiguous float32/float64 buffer, or a :class:`csl_fast.CSLTracker`.
        count, wrong: optional ``[N]`` float32/float64/int32/int64 buffers (``count``
            only with a tensor ``csl``: a tracker keeps its own).
        weight: optional rescaling weight broadcastable to ``[B, L]``, as in PyTorch
            (an integer one is taken in the logits' dtype, as PyTorch promotes it).
        pos_weight: optional weight of positive examples broadcastable to ``[B, L]``
            (usually ``[L]``), as in PyTorch (integer: as ``weight``).
        reduction: ``"mean"`` (over all ``B * L`` entries), ``"sum"`` or ``"none"``
            (the logits' shape).
        label_csl, label_margin, label_prob: optional ``[N, L]`` contiguous
            float32/float64 buffers.
        min_margin: optional ``[N]`` float32/float64 buffer.
        backend: ``"auto"`` (C++ on the CPU, Triton on a GPU) or one of
            ``csl_fast.BACKENDS``; ``"reference"`` is ``F.binary_cross_entropy_with_logits``
            with the recording in plain PyTorch.
        deterministic: bitwise reproducible buffer updates with duplicate indices (GPU
            kernels otherwise add with atomics); default
            ``torch.are_deterministic_algorithms_enabled()``. The CPU is deterministic.
        validate: check on the host that every index is in ``[0, N)`` and every target
            in ``[0, 1]`` before anything is written; default on CPU tensors with a backend
            other than ``"cpu"`` (whose kernel checks the indices before writing), and with
            the ``"reference"`` backend on every device (its PyTorch ops would fault the
            GPU on a bad index); never on a GPU otherwise (a synchronisation; an index out
            of range is skipped there, and a target outside ``[0, 1]`` is recorded as
            given). Targets on the CPU are always checked (one pass over them, no
            synchronisation).

    Returns:
        The loss, as ``F.binary_cross_entropy_with_logits`` returns it (logits dtype).

    Raises:
        TypeError / ValueError: a wrong dtype, shape, device, a buffer that requires grad
            or shares memory with another (nothing is written).
        IndexError: an index outside ``[0, N)`` (CPU; nothing is written).
        ValueError: a target outside ``[0, 1]`` (CPU, or ``validate=True``; nothing is
            written): the loss is unbounded below there and CSL would turn negative.
        RuntimeError: under ``torch.func`` transforms or forward-mode AD.
    """
    # (_any_autocast() first, as accumulate does: is_autocast_enabled("meta") raised
    # torch's "unknown device type for autocast" before meta logits were checked)
    refuse_tracing("csl_fast.accumulate_bce")
    if (
        reduction == "mean"
        and isinstance(csl, CSLTracker)
        and isinstance(logits, torch.Tensor)
        and logits.dim() == 2
        and logits.shape[1] > 1
    ):
        labels = logits.shape[1]
        warn_if_default_scale(
            csl, "accumulate_bce", f"B*L (L = {labels} labels)", f"reduction_scale=B * {labels}"
        )
    if (
        _any_autocast()
        and isinstance(logits, torch.Tensor)
        and torch.is_autocast_enabled(logits.device.type)
    ):
        # F.binary_cross_entropy_with_logits is on autocast's float32 list: its float16 and
        # bfloat16 inputs are cast to float32 (the kernels here have no autocast rule).
        logits, target, weight, pos_weight = (
            t.float() if isinstance(t, torch.Tensor) and t.dtype in _HALF else t
            for t in (logits, target, weight, pos_weight)
        )
    if isinstance(logits, torch.Tensor) and logits.is_floating_point():
        # integer weights, which F promotes to the logits' dtype: pos_weight =
        # torch.tensor([3, 1, 5]) was refused (F refuses a bool pos_weight: so does this)
        weight, pos_weight = (
            t.to(logits.dtype)
            if isinstance(t, torch.Tensor)
            and not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)
            else t
            for t in (weight, pos_weight)
        )
    if (
        isinstance(logits, torch.Tensor)
        and logits.dim() == 1
        and isinstance(target, torch.Tensor)
        and target.shape == logits.shape
    ):
        # a binary classifier's [B] logits, as F.binary_cross_entropy_with_logits takes
        # them (model(x).squeeze(1)): one label per sample, the [B, 1] case; a weight
        # that broadcasts against [B] broadcasts against [B, 1] after unsqueeze(-1)
        def column(t: torch.Tensor | None) -> torch.Tensor | None:
            return t.unsqueeze(-1) if isinstance(t, torch.Tensor) and t.dim() else t

        for name, opt in (("weight", weight), ("pos_weight", pos_weight)):
            if opt is not None:  # named against the [B] logits given, not the column
                _check_option(name, opt, logits)

        loss = accumulate_bce(
            logits.unsqueeze(1), target.unsqueeze(1), index, csl, count=count,
            weight=column(weight), pos_weight=column(pos_weight), reduction=reduction,
            label_csl=label_csl, label_margin=label_margin, label_prob=label_prob, wrong=wrong,
            min_margin=min_margin, backend=backend, deterministic=deterministic,
            validate=validate,
        )  # fmt: skip
        return loss.squeeze(1) if reduction == "none" else loss
    check_flags("csl_fast.accumulate_bce", deterministic=deterministic, validate=validate)
    extra = (wrong, min_margin, label_csl, label_margin, label_prob)
    step = _eager_cpu_step(logits, csl, count, extra, backend, validate)
    fast_error = None
    if step is not None:
        # One C++ call: it takes the buffer lock, bumps the version counters, and declines
        # (returns None) what it does not take, which then goes op by op.
        code = REDUCTIONS.get(reduction, -1) if isinstance(reduction, str) else -1
        try:
            loss = _ext._C.bce_step(logits, target, weight, pos_weight, code, index, *step)
        except Exception as exc:
            # Nothing was written. Bad input raises again below, with the message of the
            # op-by-op path's checks; input that path takes is a gap in the C++ step,
            # counted and reported (_fell_back) instead of hidden behind a slower step.
            fast_error = exc
        else:
            if loss is not None:
                return loss
    tracker = csl if isinstance(csl, CSLTracker) else None
    if tracker is not None:
        if count is not None:
            raise ValueError(
                "csl_fast.accumulate_bce: count= is for plain csl tensors; a tracker keeps its "
                "own counts (tracker.csl_count)"
            )
        labels = getattr(tracker, "num_labels", None)
        wide = isinstance(logits, torch.Tensor) and logits.dim() == 2
        if labels is not None and wide and logits.shape[1] != labels:
            # (the label buffers' shape check named label_csl, which the caller never gave)
            raise ValueError(
                f"csl_fast.accumulate_bce: the tracker keeps L = {labels} labels per sample "
                f"(num_labels) but the logits have {logits.shape[1]}: make the tracker "
                f"with CSLTracker(N, num_labels={logits.shape[1]})"
            )
        csl, count = tracker.training_buffers()
        label_csl, label_margin, label_prob = _label_buffers(
            tracker, label_csl, label_margin, label_prob
        )
    buffers = (csl, count, wrong, min_margin, label_csl, label_margin, label_prob)
    _check(logits, target, index, buffers, weight, pos_weight, reduction)
    name = resolve_backend(backend, logits.device)
    _check_grads(target, weight, pos_weight, name)
    if transformed():
        raise RuntimeError(
            "csl_fast.accumulate_bce does not support torch.func transforms (grad, vmap, jvp) "
            "or forward-mode AD: it writes into dataset buffers outside the transform. Compute "
            "F.binary_cross_entropy_with_logits inside the transform and record the per-sample "
            "loss with csl_fast.record_loss outside it"
        )
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if validate is None:
        validate = validate_by_default(logits.device, name)
    compiling = torch.compiler.is_compiling()
    # On CPU tensors only the C++ kernel refuses an index outside [0, N): the reference and
    # the Triton interpreter skip its row (validate=False recorded the others, silently)
    host_kernel_skips = index.device.type == "cpu" and name != "cpu" and not compiling
    if validate or host_kernel_skips:
        _check_values(
            None, index, 0, csl.shape[0], 0, "accumulate_bce", tracker=tracker is not None
        )
    if validate or logits.device.type == "cpu":
        _check_targets(target)
    code = REDUCTIONS[reduction]
    with buffer_lock(csl):
        loss, stats = bce_ops.bce_loss(logits, target, weight, pos_weight, code, name)
        if not compiling and backward_rerun.in_backward():  # a checkpointed forward's rerun
            return loss
        if compiling:  # the graph may run inside a backward: then every row is invalid
            stats = backward_rerun.recorded_rows(stats, 0.0)  # (an invalid BCE row is 0)
        try:
            bce_ops.bce_record(logits, target, stats, index, deterministic, buffers, name)
        except IndexError:
            if compiling:
                raise
            # The kernel's message named neither this function nor the tracker ("the size
            # of the csl buffer"): say it as the host check does (nothing was written).
            _check_values(
                None, index, 0, csl.shape[0], 0, "accumulate_bce", tracker=tracker is not None
            )
            raise
        if tracker is not None:
            _record_tracker(tracker, index, _loss_stats(stats), name)
        if not compiling:
            # The kernels write through data pointers; make autograd see it.
            written = [b for b in buffers if b is not None]
            if tracker is not None:
                written += _tracker_written(tracker)
            torch._C._increment_version(written)
    if fast_error is not None:
        _fell_back(fast_error, "csl_fast._C.bce_step")
    return loss


def _eager_cpu_step(
    logits: torch.Tensor,
    csl: torch.Tensor | CSLTracker,
    count: torch.Tensor | None,
    extra: tuple[torch.Tensor | None, ...],
    backend: str,
    validate: bool | None,
) -> tuple[torch.Tensor | tuple[torch.Tensor, ...] | None, ...] | None:
    """The arguments after ``index`` of ``csl_fast._C.bce_step`` (the seven buffers of
    ``bce_record``, then a tracker's ``last_loss`` with two scratch buffers, or None) when
    this call may run as that one C++ call (csrc/module.cpp), else None.

    At a few labels the op calls and the Python checks around them cost more than the
    arithmetic, so eager CPU calls (a tensor buffer, or a tracker without history) make
    the same op calls from C++, under the conditions of ``csl_fast._C.step``
    (:func:`csl_fast.accumulate.eager_step_allowed`); the step declines (returns None) what
    else it does not take (csrc/module.cpp: bce_declines)."""
    if not eager_step_allowed(backend, validate):
        return None
    wrong, min_margin, label_csl, label_margin, label_prob = extra
    if type(csl) is CSLTracker:
        labels = csl.num_labels
        if count is not None or csl.history:
            return None
        if labels is not None and (
            type(logits) is not torch.Tensor or logits.dim() != 2 or logits.shape[1] != labels
        ):
            # the op-by-op path names the tracker's L; the step would record into label
            # buffers given with the logits' L (and could not say so)
            return None
        last = (csl.buffers()["last_loss"], *_scratch(csl))
        label_csl, label_margin, label_prob = _label_buffers(
            csl, label_csl, label_margin, label_prob
        )
        csl, count = csl.training_buffers()
        return (csl, count, wrong, min_margin, label_csl, label_margin, label_prob, last)
    if type(csl) is torch.Tensor:
        return (csl, count, wrong, min_margin, label_csl, label_margin, label_prob, None)
    return None  # the checks of the op-by-op path say what is wrong


def _label_buffers(
    tracker: CSLTracker,
    label_csl: torch.Tensor | None,
    label_margin: torch.Tensor | None,
    label_prob: torch.Tensor | None,
) -> tuple[torch.Tensor | None, ...]:
    """The per-label buffers given, each defaulting to the tracker's of that name (None
    where it keeps none)."""
    given = {"label_csl": label_csl, "label_margin": label_margin, "label_prob": label_prob}
    return tuple(b if b is not None else getattr(tracker, n, None) for n, b in given.items())


def _loss_stats(stats: torch.Tensor) -> torch.Tensor:
    """The ``[NUM_STATS, B]`` statistics of :func:`csl_fast.record_loss` (``LOSS`` and
    ``VALID``; every other row 0) from the per-sample BCE statistics."""
    out = stats.new_zeros(NUM_STATS, stats.shape[1])
    out[Stat.LOSS] = stats[BceStat.LOSS]
    out[Stat.VALID] = stats[BceStat.VALID]
    return out


def _tracker_written(tracker: CSLTracker) -> list[torch.Tensor]:
    b = tracker.buffers()
    names = ("last_loss", "epoch_loss_sum", "epoch_count") if tracker.history else ("last_loss",)
    return [b[n] for n in names]


def _fail(kind: type[Exception], message: str) -> None:
    raise kind(f"csl_fast.accumulate_bce: {message}")


def _check(logits, target, index, buffers, weight, pos_weight, reduction) -> None:
    """Every argument's type, shape, dtype and device, before anything runs."""
    if isinstance(logits, torch.Tensor) and logits.dim() == 1:
        # [B] logits are a layout of their own; what does not match them is the target
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        _fail(
            ValueError,
            f"target must have the logits' shape {tuple(logits.shape)} (one binary label per "
            f"sample), got {got}; for [B, L] targets pass [B, L] logits",
        )
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        _fail(
            ValueError,
            f"logits must be [B, L] (one row per sample, one column per label) or [B] (one "
            f"binary label per sample, with a [B] target), got {got}; flatten extra "
            "dimensions into the batch and repeat index to match",
        )
    if logits.dtype not in _LOGIT_DTYPES:
        _fail(
            TypeError, f"logits must be float32, float16, bfloat16 or float64, got {logits.dtype}"
        )
    batch, labels = logits.shape
    device = logits.device
    if batch > 0 and labels == 0:
        _fail(ValueError, "logits have L = 0 labels; there is nothing to learn or record")
    if not isinstance(target, torch.Tensor) or target.shape != logits.shape:
        got = tuple(target.shape) if isinstance(target, torch.Tensor) else type(target).__name__
        _fail(ValueError, f"target must have the logits' shape {tuple(logits.shape)}, got {got}")
    if target.dtype != logits.dtype:
        _fail(
            TypeError,
            f"target must have the logits' dtype {logits.dtype}, got {target.dtype}; pass "
            "target.to(logits.dtype) (targets are probabilities in [0, 1])",
        )
    if not isinstance(index, torch.Tensor):
        _fail(TypeError, f"index must be a tensor, got {type(index).__name__}{INDEX_HINT}")
    if index.dtype not in _INDEX_DTYPES:
        _fail(
            TypeError,
            f"index must be a tensor of int64 (or int32) dataset indices, got {index.dtype}",
        )
    if index.shape != (batch,):
        _fail(
            ValueError,
            f"index must be 1-D with B = {batch} entries, one per row of logits, got shape "
            f"{tuple(index.shape)}",
        )
    for name, opt in (("weight", weight), ("pos_weight", pos_weight)):
        if opt is not None:
            _check_option(name, opt, logits)
    if reduction not in REDUCTIONS:
        _fail(ValueError, f"reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}")
    named = (("target", target), ("index", index), ("weight", weight), ("pos_weight", pos_weight))
    for name, t in (*named, *zip(_NAMES, buffers, strict=True)):
        # A buffer that is no tensor at all is refused by _check_buffers, with its own message.
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(device_mismatch("accumulate_bce", name, t, device))
    _check_buffers(buffers, labels)
    check_buffers_apart(
        "accumulate_bce",
        dict(zip(_NAMES, buffers, strict=True)),
        index,
        target=target,
        logits=logits,
    )


def _check_option(name: str, opt: object, logits: torch.Tensor) -> None:
    if not isinstance(opt, torch.Tensor) or not opt.is_floating_point():
        got = opt.dtype if isinstance(opt, torch.Tensor) else type(opt).__name__
        _fail(TypeError, f"{name} must be a floating-point tensor, got {got}")
    try:
        shape = torch.broadcast_shapes(opt.shape, logits.shape)
    except RuntimeError:
        shape = None
    if shape != logits.shape:
        shapes = "[L] per label, [B, 1] per sample, or [B, L]" if logits.dim() == 2 else "[B]"
        _fail(
            ValueError,
            f"{name} of shape {tuple(opt.shape)} does not broadcast to the logits' shape "
            f"{tuple(logits.shape)} (e.g. {shapes})",
        )


def _check_buffers(buffers: tuple[torch.Tensor | None, ...], labels: int) -> None:
    csl, count, wrong, min_margin, label_csl, label_margin, label_prob = buffers
    check_buffer("accumulate_bce", "csl", csl, _FLOAT_BUFFER, "logits")
    if count is not None:
        check_buffer("accumulate_bce", "count", count, _COUNT_BUFFER, "logits")
        check_count_fits("accumulate_bce", csl, count)
    n = csl.shape[0]
    for name, buf, dtypes in (
        ("wrong", wrong, _COUNT_BUFFER),
        ("min_margin", min_margin, _FLOAT_BUFFER),
    ):
        if buf is not None:
            check_buffer("accumulate_bce", name, buf, dtypes, "logits")
            if buf.shape[0] != n:
                _fail(
                    ValueError,
                    f"{name} has {buf.shape[0]} entries but csl has {n}; both need one per sample",
                )
    for name, buf in (
        ("label_csl", label_csl),
        ("label_margin", label_margin),
        ("label_prob", label_prob),
    ):
        if buf is not None:
            _check_label_buffer(name, buf, n, labels)
    given = [(name, b) for name, b in zip(_NAMES, buffers, strict=True) if b is not None]
    if torch.compiler.is_compiling():
        return  # no addresses while tracing
    for k, (name_a, a) in enumerate(given):
        for name_b, b in given[k + 1 :]:
            if _overlap(a, b):
                _fail(
                    ValueError,
                    f"{name_a} and {name_b} share memory (the same tensor, or views of one), so "
                    "two statistics would be added into the same entries; allocate them separately",
                )


def _check_label_buffer(name: str, buf: object, n: int, labels: int) -> None:
    if not isinstance(buf, torch.Tensor) or buf.dtype not in _FLOAT_BUFFER:
        got = buf.dtype if isinstance(buf, torch.Tensor) else type(buf).__name__
        _fail(
            TypeError,
            f"{name} must be a float32 or float64 tensor, got {got}; allocate it with "
            "torch.zeros(num_samples, num_labels, device=logits.device)",
        )
    if buf.requires_grad:
        _fail(
            ValueError,
            f"{name} requires grad, but it is a buffer written in place with no gradient; "
            "allocate it with torch.zeros(num_samples, num_labels) or pass it detached",
        )
    check_writable("accumulate_bce", name, buf)
    if buf.shape != (n, labels) or not buf.is_contiguous():
        _fail(
            ValueError,
            f"{name} must be a contiguous [N, L] = [{n}, {labels}] tensor (N the size of csl, "
            f"L the logits' columns), got shape {tuple(buf.shape)} "
            f"(contiguous={buf.is_contiguous()})",
        )


def _check_grads(target, weight, pos_weight, name: str) -> None:
    """The fused kernels differentiate the logits only; PyTorch's own kernel has no
    gradient for weight and pos_weight either, but one for the target."""
    if not torch.is_grad_enabled():
        return
    for what, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None and t.requires_grad:
            _fail(
                ValueError,
                f"{what} requires grad, but binary cross entropy has no gradient for it "
                f"(F.binary_cross_entropy_with_logits refuses it too); pass {what}.detach()",
            )
    if target.requires_grad and name != "reference":
        _fail(
            ValueError,
            "target requires grad, but the fused kernels differentiate the logits only; pass "
            "target.detach(), or backend='reference' for a gradient with respect to the target",
        )


def _check_targets(target: torch.Tensor) -> None:
    """Every target in ``[0, 1]`` (NaN passes: its loss is NaN and is not recorded)."""
    if not target.numel():
        return
    if torch.compiler.is_compiling():
        outside = ((target < 0) | (target > 1)).any()
        check_in_graph("accumulate_bce", ~outside, f"a target is outside [0, 1]; {_PROBABILITIES}")
        return
    lo, hi = (float(v) for v in torch.aminmax(target.detach()))
    if lo >= 0 and hi <= 1:  # one pass (the masks below cost 8x more); NaN falls through
        return
    bad = (target < 0) | (target > 1)
    if bool(bad.any()):
        i = int(bad.reshape(-1).nonzero()[0, 0])
        row, label = divmod(i, target.shape[1])
        value = float(target.reshape(-1)[i])
        _fail(
            ValueError,
            f"the target of row {row}, label {label} is {value!r}, outside [0, 1]: "
            f"{_PROBABILITIES}",
        )


_PROBABILITIES = (
    "the plain loss log(1 + e^z) - y z has no lower bound there (the model can drive it to "
    "-inf), so the recorded CSL would be negative and rank nothing; targets are "
    "probabilities (for -1/+1 labels pass (target + 1) / 2)"
)
