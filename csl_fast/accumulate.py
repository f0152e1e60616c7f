"""``accumulate``: ``F.cross_entropy`` that records each sample's loss at its dataset index."""

from __future__ import annotations

import contextlib
import operator
import warnings
from typing import Literal, Protocol, overload, runtime_checkable

import torch
import torch.nn.functional as F
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

from . import (
    _ext,
    backward_rerun,
    cross_entropy_args,
    cross_entropy_extras,
    ops,
    ops_extras,
    reference,
)
from ._args import check_flags
from ._ext import resolve_backend
from .accumulate_checks import (
    _buffers,
    _check_args,
    _check_values,
    adopt_classes,
    refuse_rows_into_sequences,
    refuse_tracing,
    smoothing,
    target_positions,
    validate_by_default,
    widen_for_ignore_index,
)
from .buffer_locks import buffer_lock
from .cross_entropy_extras import CrossEntropyOutput
from .input_grad import warn_if_default_scale
from .reference import REDUCTIONS
from .stats import EXACT_FLOAT32_COUNT, NUM_STATS, Stat, float64_sums, invalid_column
from .tracker import CSLTracker


@runtime_checkable
class Recorder(Protocol):
    """What ``accumulate`` needs from a tracker (see :class:`csl_fast.CSLTracker`)."""

    def training_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The (CSL sum, presentation count) buffers the fused op adds into."""
        ...

    def record(self, index: torch.Tensor, stats: torch.Tensor) -> None:
        """Update every other statistic from the batch's ``[NUM_STATS, B]`` stats."""
        ...


# Samples of several positions (sequences as [B*T, V] logits, K-dimensional logits) also
# need ``record_sequences(index [B], token_stats [NUM_STATS, B, T])`` on the tracker (see
# :meth:`csl_fast.CSLTracker.record_sequences`).


def _of_sequences(tracker: CSLTracker, logits: object, target: object) -> bool:
    """Whether this call records sequences: into a tracker of sequences, or as its first
    call, ``[B*T, V]`` logits with a ``[B, T]`` target (the step the tracker learns it
    from: the default-scale warning came a step late)."""
    if tracker.sequences:
        return True
    return (
        isinstance(logits, torch.Tensor)
        and isinstance(target, torch.Tensor)
        and logits.dim() == 2
        and target.dim() == 2
        and not target.is_floating_point()
        and logits.shape[0] == target.numel()
    )


@overload
def accumulate(
    logits: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor,
    csl: torch.Tensor | Recorder,
    *,
    count: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
    inplace_grad: bool = False,
    softcap: float | None = None,
    z_loss_scale: float = 0.0,
    return_z_loss: Literal[False] = False,
    return_token_accuracy: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def accumulate(
    logits: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor,
    csl: torch.Tensor | Recorder,
    *,
    count: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
    inplace_grad: bool = False,
    softcap: float | None = None,
    z_loss_scale: float = 0.0,
    return_z_loss: Literal[True],
    return_token_accuracy: bool = False,
) -> CrossEntropyOutput: ...


@overload
def accumulate(
    logits: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor,
    csl: torch.Tensor | Recorder,
    *,
    count: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
    inplace_grad: bool = False,
    softcap: float | None = None,
    z_loss_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: Literal[True],
) -> CrossEntropyOutput: ...


@overload
def accumulate(
    logits: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor,
    csl: torch.Tensor | Recorder,
    *,
    count: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
    inplace_grad: bool = False,
    softcap: float | None = None,
    z_loss_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
) -> torch.Tensor | CrossEntropyOutput: ...


def accumulate(
    logits: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor,
    csl: torch.Tensor | Recorder,
    *,
    count: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
    inplace_grad: bool = False,
    softcap: float | None = None,
    z_loss_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
) -> torch.Tensor | CrossEntropyOutput:
    r"""Cross entropy that also adds each sample's loss into ``csl`` at its dataset index.

    Returns exactly what ``F.cross_entropy(logits, target, weight=weight,
    ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction)``
    returns, value and gradient with respect to ``logits``. As a side effect, for every
    row :math:`i` whose target is not ``ignore_index``:

    .. math::
        \mathrm{csl}[\mathrm{index}_i] \mathrel{+}= \ell_i
            = \log\sum_j e^{z_{ij}} - z_{i y_i},
        \qquad \mathrm{count}[\mathrm{index}_i] \mathrel{+}= 1.

    The recorded :math:`\ell_i` is the *plain* cross entropy: unweighted, unsmoothed,
    float32, detached. CSL measures how hard a sample is to fit, which class weights and
    label smoothing (training-objective choices) would distort (float32 for float64
    logits too: a float64 buffer holds sums of float32-rounded losses). Rows, or positions
    of a sample with several, whose loss is not finite in the logits dtype (NaN or inf
    logits; with float16 logits, a loss of 65520 or more, which rounds to inf) or in
    float32 (a float64 loss past 3.4e38) are not recorded, so one bad step cannot poison
    a sample's CSL; the returned loss still shows the NaN/inf, as ``F.cross_entropy``'s
    would. Duplicate indices in a batch add up.
    Calls under ``torch.no_grad()`` record too (an evaluation loop should call
    ``F.cross_entropy`` or :func:`csl_fast.score_epoch`); a forward that activation
    checkpointing reruns inside the backward records nothing
    (:mod:`csl_fast.backward_rerun`).

    **Samples with several positions.** Every layout ``F.cross_entropy`` accepts is read
    as it reads it (:mod:`csl_fast.cross_entropy_args`): ``[B, C]`` logits with ``[B]``
    targets (one row per sample), ``[N, C, d1, ..., dk]`` logits with ``[N, d1, ..., dk]``
    targets (classes in dimension 1: segmentation, or ``logits.transpose(1, 2)`` for a
    language model), and unbatched ``[C]`` logits with a 0-d target and a 0-d (or
    one-entry) index. A batch of sequences can also be passed as ``[B*T, V]`` logits with
    a ``[B, T]`` target, a form ``F.cross_entropy`` refuses, so it is never chosen by a
    coincidence of shapes. Whenever a sample owns several positions, ``index`` holds one
    dataset index per *sample* (``[N]``) and its position losses are summed and counted
    before they are recorded:

    .. math::
        \mathrm{csl}[\mathrm{index}_n] \mathrel{+}= \sum_{t:\,y_{nt} \ne \mathrm{ignore}}
            \ell_{nt}, \qquad \mathrm{count}[\mathrm{index}_n] \mathrel{+}=
            |\{t : y_{nt} \ne \mathrm{ignore}\}|,

    so CSL is the summed loss of the image (segmentation) or the summed token loss
    (negative log-likelihood) of the sequence over training, and ``csl / count`` its
    per-position mean. Ignored pixels, padding and prompt tokens count for nothing. The
    returned loss (value and gradient) is ``F.cross_entropy``'s for the call; with
    ``reduction='none'`` it has the target's shape. A tracker records the other
    statistics per sample (:meth:`csl_fast.CSLTracker.record_sequences`). Per-sample sums
    are formed on the device (a reshape and a sum), so the buffer update is as
    deterministic as in the per-row case.

    **Class probabilities** (soft targets: mixup, cutmix, distillation): a floating-point
    target of the logits' shape. The loss is ``F.cross_entropy``'s (its weight and
    label-smoothing semantics included); what is recorded per row is the plain cross
    entropy against the given probabilities, :math:`H(q, p) = -\sum_j q_j \log p_j`
    (unweighted, unsmoothed; for a one-hot ``q`` the class-index loss), the loss of the
    input the sample's index names, and ``count`` counts it once (once per position in
    the ``[N, C, d1, ..., dk]`` layout). As ``F.cross_entropy``, an ``ignore_index``
    that could be a class (``>= 0``) is refused; a negative one is unused. No kernel takes
    probabilities, so these calls run as ``F.cross_entropy`` plus the statistics in
    PyTorch; a tracker is refused (its correctness, margin and forgetting need one class
    per sample): pass ``csl`` and ``count`` tensors of their own instead, not the
    tracker's ``csl_sum`` and ``csl_count`` (its scores would count presentations that
    left none of its other statistics).

    **torch.func and forward-mode AD.** Under ``grad``, ``vmap``, ``jvp`` (or any
    functorch transform) and inside ``torch.autograd.forward_ad.dual_level``, the loss is
    computed by ``F.cross_entropy`` whatever the backend (no fused op has a batching or
    tangent rule), so every transform gives PyTorch's answer; the statistics are
    recorded outside the transform from the primal values, each vmapped call as a batch
    of its own (``vmap(grad(...))`` over single samples records each sample once). Not
    inside ``torch.compile``: compiling fails with PyTorch's ``TorchRuntimeError``, whose
    message depends on the backend (a C++ or Python ``autograd.Function`` that functorch
    cannot run, or a missing batching rule); run the transform eagerly.

    **Threads.** Calls from several Python threads into the same buffer or tracker take
    turns (a lock keyed on the buffer, :mod:`csl_fast.buffer_locks`; the one-call CPU step
    takes it in C++ and waits without the GIL), so no update is lost; so do the tracker's
    own methods that write it (``watch``'s input-gradient records, ``end_epoch``,
    ``update``, ``save``, ``load``, ...). Every buffer written has its autograd version
    counter bumped.

    Args:
        logits: ``[B, C]`` float32, float16, bfloat16 or float64 (on a GPU by the CUDA
            kernels or the reference: Triton's take no float64),
            ``[N, C, d1, ..., dk]``, ``[C]``, or ``[B*T, V]`` for sequences.
            Statistics are computed in float32 (float64 for float64 logits, the
            recorded loss then rounded to float32, as above). Under
            ``torch.autocast`` float16/bfloat16 logits are first cast to float32, as
            autocast casts ``F.cross_entropy``'s input: the loss is float32, as PyTorch's
            (with ``inplace_grad`` the gradient then overwrites that float32 copy).
        target: ``[B]`` class indices, int64 (int32 and uint8 are taken too, and widened:
            ``F.cross_entropy`` refuses int32, and uint8 in the N-d layouts), in
            ``[0, C)`` or ``ignore_index``;
            ``[N, d1, ..., dk]`` or 0-d for those layouts, ``[B, T]`` for sequences; or
            class probabilities of the logits' shape.
        index: ``[B]`` dataset indices, int64 (or int32), in ``[0, N)`` (one per row, or
            one per sample of several positions).
        csl: ``[N]`` contiguous float32/float64 buffer on the logits' device, or a
            :class:`csl_fast.CSLTracker` (which then records every statistic it keeps;
            its ``num_classes``, when set, must be the logits' ``C``; when not, it
            takes ``C`` from the first ``[B, C]`` logits). A buffer created
            under ``torch.inference_mode()`` is written only inside it, as PyTorch allows.
        count: optional ``[N]`` buffer (float32/float64/int32/int64) counting how often
            each sample was recorded, so that ``csl / count`` is the mean loss.
        weight, ignore_index, label_smoothing, reduction: as in ``F.cross_entropy``
            (they shape the returned loss and gradient, not what is recorded).
        backend: ``"auto"`` (fastest available: ``"cpu"`` for CPU tensors, ``"triton"``
            then ``"cuda"`` for CUDA tensors), or one of ``csl_fast.BACKENDS``.
        deterministic: make the buffer updates bitwise reproducible even with duplicate
            indices. Default: ``torch.are_deterministic_algorithms_enabled()``. CPU
            updates are always deterministic; on a GPU the default atomics are not.
        validate: check in Python that targets and indices are in range, which reads them
            on the host. Default: only where nothing else checks and it costs no device
            synchronisation: the C++ CPU kernels check ranges themselves before writing
            anything; on CUDA, ``validate=True`` (or ``CSL_FAST_VALIDATE=1`` for the CUDA
            C++ kernels) costs a synchronisation per call, and without it an
            out-of-range target gives a NaN loss and an out-of-range index is skipped.
            The ``"reference"`` backend validates by default on every device (one
            synchronisation on a GPU): its PyTorch ops would fault the device instead.

        inplace_grad: write the logits gradient over the logits instead of into a new
            logits-sized buffer, so cross entropy allocates nothing logits-sized in forward
            or backward (what a [tokens, vocabulary] language-model head needs). Default
            False. After the call ``logits`` holds the gradient, not the logits. Safe under
            autograd: the logits' version counter is bumped, so a graph that saved them for
            its own backward (``tanh``, ``softmax``, ...) raises "modified by an inplace
            operation" rather than computing a wrong gradient. Needs contiguous logits that
            are not a leaf requiring grad, a fused backend and eager mode; backward can run
            only once. For float16/bfloat16 logits the gradient is rounded twice (to the
            logits' dtype in forward, where the logits are overwritten, and again after
            the upstream scale), up to about twice PyTorch's own error; the default
            forms it in backward and rounds once. Their ``'mean'`` is the sum of the
            rows' losses rounded to the logits' dtype (the kernel leaves the gradient
            unscaled, for a ``GradScaler``'s large upstream scale), so it can differ from
            the default's by one unit in the last place, and a row whose own loss is past
            the dtype's range makes it inf.

        softcap, z_loss_scale, return_z_loss, return_token_accuracy: a language-model
            head's extras, all off by default (:mod:`csl_fast.cross_entropy_extras`): the
            loss taken on ``softcap * tanh(logits / softcap)``; the z-loss
            ``z_loss_scale * logsumexp^2`` per non-ignored row added to it; with a
            ``return_*`` flag the call returns a :class:`CrossEntropyOutput` ``(loss,
            z_loss, token_accuracy)``. CSL then records the plain cross entropy of the
            soft-capped logits, without the z-loss.

    On the CPU in eager mode (``[B, C]`` logits, a tensor buffer or a tracker without
    ``history``, no torch function mode) the whole step (cross entropy, CSL sum and count,
    the tracker's other statistics) is one call into C++, which makes the op calls there:
    at a few classes the calls from Python would cost more than the arithmetic.

    Gradients are computed in the forward pass (one fused pass over each row), so
    backward is a multiplication by the upstream gradient; for float16/bfloat16 logits
    backward instead forms the gradient in float32 from the saved logits and the forward's
    per-row losses, one elementwise pass, and rounds it once after the upstream scale (see
    ``ops._RoundOnceCrossEntropy``, :mod:`csl_fast.ops_backward`), and their forward
    forms no gradient (no logits-sized buffer), as no call without grad does; like any op
    that saves its input, such a call then refuses (PyTorch's "modified by an inplace
    operation") a backward after the logits were changed in place. Sums and means are
    formed in float32 for float16/bfloat16 logits and rounded once, so where
    ``F.cross_entropy``'s half-precision reduction overflows to inf (a batch whose losses
    sum past 65504, or, for the mean, a row whose own loss is 65520 or more, float16
    logits some 6e4 apart, in a batch whose mean stays below 65504) the loss here is the
    finite value, on the fused backends (the ``"reference"`` backend is PyTorch's
    arithmetic); such a row is still not recorded. With ``label_smoothing > 0`` and float16
    logits ``F.cross_entropy`` also forms the smoothing term (the sum of :math:`-\log p_j`
    over the classes, per row and then over the batch) in float16: once that reaches 65520
    a row (``reduction='none'`` too), the mean or the sum is inf although the loss is small
    (10 rows of 1,000 near-uniform classes; README, *Use*), where the fused
    backends return the finite values. Double backward is not supported.
    Buffers must not require grad or share memory with each other or with ``index``; a
    ``weight`` that requires grad is refused, as ``F.cross_entropy`` refuses it.
    """
    refuse_tracing("csl_fast.accumulate")
    if (
        reduction == "mean"
        and getattr(csl, "_last_watch_default", False)  # (first: one read when nothing is watched)
        and _of_sequences(csl, logits, target)
    ):
        warn_if_default_scale(
            csl,
            "accumulate",
            "the batch's non-ignored tokens (a tracker of sequences)",
            "reduction_scale=(target != ignore_index).sum() and valid=target != ignore_index",
        )
    if (
        _any_autocast()
        and isinstance(logits, torch.Tensor)
        and logits.dtype in (torch.float16, torch.bfloat16)
        and torch.is_autocast_enabled(logits.device.type)
    ):
        # Under autocast F.cross_entropy computes in float32 and returns a float32 loss
        # (cross entropy is on autocast's float32 list); the fused ops have no autocast
        # rule, so their input is cast here as autocast casts F.cross_entropy's.
        logits = logits.float()
    extras = None
    if softcap is not None or z_loss_scale or return_z_loss or return_token_accuracy:
        extras = cross_entropy_extras.check(
            "accumulate", softcap, z_loss_scale, return_z_loss, return_token_accuracy, weight
        )
    if inplace_grad is not False and inplace_grad is not True:
        # Truthy strings ("False" from a config) would overwrite the caller's logits.
        raise TypeError(
            f"csl_fast.accumulate: inplace_grad must be True or False, got {inplace_grad!r}"
        )
    check_flags("csl_fast.accumulate", deterministic=deterministic, validate=validate)
    label_smoothing = smoothing(label_smoothing, "accumulate")
    fast_error = None
    step = None
    if (
        extras is None
        and type(ignore_index) is not bool  # (refused below; C++ reads 1)
        # (refused below: the C++ step reads any weight as float32, bool ones as 0 and 1)
        and not (isinstance(weight, torch.Tensor) and not weight.is_floating_point())
    ):
        step = _eager_cpu_step(logits, csl, count, backend, validate, inplace_grad)
    if step is not None:
        # One C++ call: it takes the buffer lock, bumps the version counters, and declines
        # (returns None) what it does not take, which then goes op by op.
        try:
            loss = _ext._C.step(
                logits, target, weight, ignore_index, label_smoothing,
                REDUCTIONS.get(reduction, -1), index, *step,
            )  # fmt: skip
        except Exception as exc:
            # Nothing was written. Bad input raises again below, with the message of the
            # op-by-op path's checks; input that path takes is a gap in the C++ step,
            # counted and reported (_fell_back) instead of hidden behind a slower step.
            fast_error = exc
        else:
            if loss is not None:
                return loss
    if isinstance(target, torch.Tensor) and target.dtype is torch.uint8:
        # F.cross_entropy takes uint8 class indices (segmentation masks with
        # ignore_index=255); the kernels, the one-call step's included (which refused
        # them), read int32/int64. Read here, off the common path's cost.
        target = target.long()
        fast_error = None
    given = (logits, target)
    rows = cross_entropy_args.rows(logits, target, index)
    seq = None
    if rows is not None:
        logits, target, index, seq = rows.logits, rows.target, rows.index, rows.groups
        if seq is None and given[0].dim() > 2 and getattr(csl, "sequences", False):
            # [B, V, 1] into a tracker of sequences (a batch of one-token sequences, a short
            # last batch): sequences still, as linear_cross_entropy records it, not the
            # classifications that [N, C, 1] is elsewhere
            seq = (int(logits.shape[0]), 1)
    soft = rows is not None and rows.soft
    classes = logits.shape[1] if isinstance(logits, torch.Tensor) and logits.dim() == 2 else None
    buffers = _buffers(csl, count, seq, soft, classes)
    try:
        if isinstance(ignore_index, bool):  # operator.index takes True as 1
            raise TypeError
        ignore_index = operator.index(ignore_index)  # a 0-d integer tensor or NumPy int too
    except TypeError:
        raise TypeError(
            f"csl_fast.accumulate: ignore_index must be an int, got "
            f"{type(ignore_index).__name__}; use a class index that never occurs, e.g. the "
            "default -100"
        ) from None
    if not -(2**63) <= ignore_index < 2**63:  # the ops take an int64
        raise ValueError(
            f"csl_fast.accumulate: ignore_index must fit in int64 (|value| < 2**63), got "
            f"{ignore_index}; use a class index that never occurs, e.g. the default -100"
        )
    if soft and ignore_index >= 0:
        # as F.cross_entropy: a class index has no meaning for a probability row (it would
        # be dropped without a word); a negative one names no class and is taken, unused
        raise ValueError(
            f"csl_fast.accumulate: ignore_index={ignore_index} applies to class-index targets, "
            "not to class probabilities; drop it. To leave padded rows out, pass only the "
            "real rows, or class indices with ignore_index: an all-zero probability row adds "
            "a loss of 0 but still counts, in the mean and in CSL's count (csl / count)"
        )
    target = widen_for_ignore_index(target, ignore_index)
    _check_args(logits, target, index, buffers, weight, label_smoothing, reduction, seq, soft)
    if seq is None:
        refuse_rows_into_sequences(
            "csl_fast.accumulate", csl, "as [B, V, 1] logits with a [B, 1] target"
        )
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    name = resolve_backend(backend, logits.device, logits.dtype)
    transformed = ops.transformed()
    if (soft or transformed) and inplace_grad:
        raise ValueError(
            "csl_fast.accumulate: inplace_grad=True needs class-index targets outside "
            "torch.func transforms and forward-mode AD (no fused kernel takes class "
            "probabilities or has a batching or tangent rule); use inplace_grad=False"
        )
    if inplace_grad and rows is not None and logits.data_ptr() != given[0].data_ptr():
        raise ValueError(
            f"csl_fast.accumulate: inplace_grad=True writes the gradient over the logits, but "
            f"logits of shape {tuple(given[0].shape)} have no rows of contiguous classes (they "
            "would be copied first); pass [B, C] or [B*T, V] logits, or logits.transpose(1, 2) "
            "of contiguous [B, T, V] ones, or inplace_grad=False"
        )
    if extras is not None and (soft or inplace_grad or (transformed and return_token_accuracy)):
        raise ValueError(
            "csl_fast.accumulate: softcap, z_loss_scale, return_z_loss and "
            "return_token_accuracy need class-index targets and inplace_grad=False, and "
            "return_token_accuracy is not available under torch.func transforms; compute "
            "(logits.argmax(1) == target) yourself there"
        )
    if transformed:
        # No fused op has a batching or tangent rule; F.cross_entropy has them all.
        name = "reference"
    if validate is None:
        # The C++ kernels check ranges themselves before writing; elsewhere check here
        # unless that would cost a device synchronisation.
        validate = validate_by_default(logits.device, name)
    # In place, the gradient overwrites the caller's logits before the scatter's own range
    # check runs, so on the CPU (where reading them costs no device sync) check first.
    given_shape = tuple(given[1].shape) if rows is not None and not soft else None
    with target_positions(given_shape):
        if (validate or (inplace_grad and logits.device.type == "cpu")) and not transformed:
            # Class probabilities have no range to check; their indices do.
            checked = None if soft else target
            _check_values(
                checked,
                index,
                logits.shape[1],
                buffers[0].numel(),
                ignore_index,
                tracker=isinstance(csl, CSLTracker),
            )
        # Calls from several threads into the same buffers take turns, from the forward on
        # (the Triton interpreter, for one, cannot run two launches at once).
        with buffer_lock(buffers[0]):
            loss, stats, z_loss = _forward_and_record(
                given, logits, target, index, csl, buffers, seq, soft, transformed, weight,
                ignore_index, label_smoothing, reduction, deterministic, name, inplace_grad,
                extras,
            )  # fmt: skip
    if classes is not None and seq is None:
        adopt_classes(csl, classes)
    if extras is not None:
        shape = None if rows is None else rows.loss_shape
        return cross_entropy_extras.output(
            extras, loss, z_loss, stats, target, ignore_index, reduction, shape
        )
    if rows is not None and reduction == "none":
        loss = loss.view(rows.loss_shape)
    if fast_error is not None:
        _fell_back(fast_error)
    return loss


def _forward_and_record(
    given, logits, target, index, csl, buffers, seq, soft, transformed, weight, ignore_index,
    label_smoothing, reduction, deterministic, name, inplace_grad, extras,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """accumulate's work once its arguments are checked and read as rows: (loss, the rows'
    statistics, the z-loss term or None)."""
    z_loss = None
    cap = 0.0 if extras is None else extras.softcap
    if soft or transformed:
        if extras is None:
            loss = _composite_loss(
                given if soft else (logits, target.long()), weight, ignore_index,
                label_smoothing, reduction, soft,
            )  # fmt: skip
        else:  # not soft (refused): F.cross_entropy's formula with the extras
            loss, z_loss = reference.cross_entropy_extra(
                logits, target, weight, ignore_index, label_smoothing, REDUCTIONS[reduction],
                cap, extras.z_loss_scale,
            )  # fmt: skip
            z_loss = z_loss.detach()
        detached = (logits.detach(), target.detach())
        # (only under a transform: torch.compile cannot trace functorch's internals)
        with temporarily_clear_interpreter_stack() if transformed else contextlib.nullcontext():
            # The buffers live outside any transform: statistics of the plain values (under
            # vmap, each vmapped call as a batch of its own), recorded outside it.
            if transformed:
                (z, t, index), copies = ops.escape_transforms(*detached, index)
            else:
                (z, t), copies = detached, 1
            stats = (
                reference.soft_row_statistics(z, t)
                if soft
                else reference.row_statistics(z, t, ignore_index, cap)
            )
            seq = None if seq is None else (seq[0] * copies, seq[1])
            record_stats(stats, index, csl, buffers, seq, deterministic, name)
    elif extras is not None and extras.in_kernel:
        loss, stats, z_loss = ops_extras.cross_entropy_fwd_extra(
            logits, target, weight, ignore_index, label_smoothing, REDUCTIONS[reduction], cap,
            extras.z_loss_scale, name,
        )  # fmt: skip
        record_stats(stats, index, csl, buffers, seq, deterministic, name)
    else:
        fwd = ops.cross_entropy_fwd_inplace if inplace_grad else ops.cross_entropy_fwd
        loss, stats = fwd(
            logits, target, weight, ignore_index, label_smoothing, REDUCTIONS[reduction], name
        )
        record_stats(stats, index, csl, buffers, seq, deterministic, name)
    return loss, stats, z_loss


def _composite_loss(
    given: tuple[torch.Tensor, torch.Tensor],
    weight: torch.Tensor | None,
    ignore_index: int,
    label_smoothing: float,
    reduction: str,
    soft: bool,
) -> torch.Tensor:
    """``F.cross_entropy`` itself, for what no fused kernel can do: class probabilities
    (``given`` as the caller passed them) and torch.func transforms or forward-mode AD
    (class indices as rows), where it brings its batching and tangent rules."""
    kwargs = {} if soft else {"ignore_index": ignore_index}
    if not soft and weight is not None:
        # As the fused kernels, which take class weights of any dtype; F.cross_entropy
        # wants the logits' own with class indices (it casts them with probabilities).
        weight = weight.to(given[0].dtype)
    return F.cross_entropy(
        *given, weight=weight, label_smoothing=label_smoothing, reduction=reduction, **kwargs
    )


def _eager_cpu_step(logits, csl, count, backend, validate, inplace_grad):
    """``(csl, count, epoch, state)``, the arguments after ``index`` of ``csl_fast._C.step``,
    when this call may run as that one C++ call (csrc/module.cpp), else None.

    At a few classes the op calls and their Python glue cost more than the work, so eager
    calls on the CPU (a tensor buffer or a tracker without history) make the same three op
    calls from C++. That skips torch.ops, and with it any torch function mode, functorch
    transform, forward-mode AD or saved-tensor hook, so it is not taken under one, nor in
    a backward pass (a checkpointed forward's rerun records nothing). The step itself declines
    (returns None) what else it does not take (csrc/module.cpp: declines): other layouts,
    devices and dtypes, buffers the checks refuse, tensor subclasses."""
    if inplace_grad or not eager_step_allowed(backend, validate):
        return None
    if type(csl) is CSLTracker:
        if (
            csl._step_state is None
            or count is not None
            or csl.backend not in _CPU_STEP
            or csl.sequences  # (rows into sequences: refused op by op)
        ):
            return None
        # Logits of another class count go op by op, whose checks refuse them (the step
        # would record their classes), and so does a tracker's first call when it was made
        # without num_classes, which the op-by-op path sets. One read of the logits, the
        # least it costs (+0.7-1.0 us a call, B = 64, C = 10): the step takes [B, C] logits
        # only, so C is the last.
        c = csl.num_classes
        try:
            other = c is None or type(logits) is not torch.Tensor or logits.shape[-1] != c
        except IndexError:  # 0-d logits
            return None
        if other:
            return None
        return (*csl.training_buffers(), csl.epoch, csl._step_state)
    if type(csl) is torch.Tensor:
        return csl, count, 0, None
    return None  # the checks of the op-by-op path say what is wrong


def eager_step_allowed(backend: str, validate: bool | None) -> bool:
    """Whether an eager call may run as one C++ step (``csl_fast._C.step`` or ``bce_step``):
    the C++ backend, no host validation asked for, and nothing that must see the ops go
    through ``torch.ops`` (compilation, a functorch transform, forward-mode AD, a saved-tensor
    hook) nor a backward pass (a checkpointed forward's rerun records nothing)."""
    return not (
        validate
        or backend not in _CPU_STEP
        or _ext._C is None
        or torch.compiler.is_compiling()
        or _functorch_level() is not None
        or _forward_ad._current_level >= 0
        or backward_rerun.in_backward()
        or backward_rerun.saved_tensor_hooks_active()
    )


_CPU_STEP = ("auto", "cpu")
# Read on every eager step; bound once (each attribute lookup costs ~0.05 us).
_functorch_level = torch._C._functorch.maybe_current_level
# Outside autocast (nearly every call) one C call, where reading logits.dtype cost ~0.4 us.
_any_autocast = torch._C._is_any_autocast_enabled
_forward_ad = torch.autograd.forward_ad


class _Fallbacks:
    """Calls that should have been one C++ step but went op by op; read through
    :func:`csl_fast.info.fast_step_fallbacks`."""

    count = 0
    last_reason: str | None = None


def _fell_back(exc: Exception, step: str = "csl_fast._C.step") -> None:
    """Counts a call the op-by-op path completed after the one-call step ``step`` raised on
    it, and warns the first time: the results are right, but the step is several times
    slower (README, Performance), which a user would otherwise only see as slower training."""
    _Fallbacks.count += 1
    _Fallbacks.last_reason = f"{type(exc).__name__}: {exc}"
    if _Fallbacks.count == 1:
        warnings.warn(
            f"csl_fast: the one-call CPU step ({step}) failed on input the op-by-op "
            f"path accepts ({_Fallbacks.last_reason}); such calls take the op-by-op path, "
            "with the same results but slower. Please report this as a bug; "
            "after `import csl_fast.info`, csl_fast.info.fast_step_fallbacks() counts them "
            "in this process.",
            RuntimeWarning,
            stacklevel=3,
        )


def record_stats(
    stats: torch.Tensor,
    index: torch.Tensor,
    csl: torch.Tensor | Recorder,
    buffers: tuple[torch.Tensor, torch.Tensor | None],
    seq: tuple[int, int] | None,
    deterministic: bool,
    backend: str,
) -> None:
    """Add a batch's per-row ``stats`` (``[NUM_STATS, rows]``) into ``buffers`` and the
    tracker: per row at ``index``, or (``seq = (B, T)``) summed per sequence first.

    Shared by :func:`accumulate` and :func:`csl_fast.linear_cross_entropy`; arguments are
    assumed checked (``buffers`` from :func:`_buffers`). Calls from several threads into
    the same buffers take turns; every buffer written has its version counter bumped.
    Inside a backward pass nothing is written (:mod:`csl_fast.backward_rerun`)."""
    if torch.compiler.is_compiling():
        # A compiled graph's writes are functional copies into the buffers at its end: the
        # copies bump the versions, and there is no address to lock on while tracing. The
        # graph may run inside a backward (checkpointed): then every row is invalid.
        stats = backward_rerun.recorded_rows(stats, invalid_column(stats))
        _record(stats, index, csl, buffers, seq, deterministic, backend)
        return
    if backward_rerun.in_backward():
        return
    with buffer_lock(buffers[0]):
        _record(stats, index, csl, buffers, seq, deterministic, backend)
        written = [b for b in buffers if b is not None]
        if not isinstance(csl, torch.Tensor) and callable(getattr(csl, "buffers", None)):
            written += [b for b in csl.buffers().values() if isinstance(b, torch.Tensor)]
        # The kernels write through data pointers; make autograd see it.
        torch._C._increment_version(written)


def _record(stats, index, csl, buffers, seq, deterministic, backend) -> None:
    # A CSLTracker records first: its CPU op refuses an index out of range before writing
    # anything, where the scatter of another backend (validate=False) skips that row, and
    # a refusal after the scatter left samples counted that no other statistic saw.
    if seq is None:
        # a CSLTracker skips the class check its stats pass by construction
        fused = getattr(csl, "_record_fused", None)
        if fused is not None:
            fused(index, stats)
        ops.scatter_stats(stats, index, deterministic, *buffers, backend=backend)
        if fused is None and not isinstance(csl, torch.Tensor):
            csl.record(index, stats)  # any other recorder (training_buffers and record)
        return
    tokens = stats.reshape(NUM_STATS, *seq)
    # A sequence whose token losses each fit float32 but whose sum does not (two of 2e38)
    # records none of its tokens, as a token that does not fit: inf would stay in its CSL.
    fits = torch.isfinite(tokens[Stat.LOSS].sum(1))
    tokens = torch.where(fits[None, :, None], tokens, invalid_column(stats)[:, :, None])
    # Ignored and non-finite rows hold zero LOSS and VALID, so the sums count valid tokens only:
    # LOSS -> summed token loss, VALID -> number of valid tokens.
    per_sequence = tokens.sum(2)
    tracker = type(csl) is CSLTracker
    if tracker:
        csl.record_sequences(index, tokens, validate=False)  # (the call decided above)
    ops.scatter_stats(per_sequence, index, deterministic, *buffers, backend=backend)
    _scatter_remainders(tokens, per_sequence, index, deterministic, buffers, backend)
    if not tracker and not isinstance(csl, torch.Tensor):
        csl.record_sequences(index, tokens)


def _scatter_remainders(tokens, per_sequence, index, deterministic, buffers, backend) -> None:
    """Add into the float64 or integer ``buffers`` (csl, count) what the float32 sums
    ``per_sequence`` (``tokens.sum(2)``) that the scatter added miss of the sums of the
    float32 ``[NUM_STATS, B, T]`` ``tokens`` taken in float64 (:func:`float64_sums`).

    The kernels take float32 statistics, so a count of more than 2**24 valid positions
    (one sample a 3-D volume) came out rounded to float32 even in an int64 count, and a
    float64 CSL got a float32 sum: a second scatter adds the remainders (float32 holds
    them: they are that small). float32 buffers (the default) take no second pass, and a
    count none (float32 counts up to 2**24 exactly) when no sample has more positions."""
    csl, count = buffers
    wide_csl = csl is not None and csl.dtype != torch.float32
    wide_count = (
        count is not None and count.dtype != torch.float32 and tokens.shape[2] > EXACT_FLOAT32_COUNT
    )
    if not (wide_csl or wide_count):
        return
    rest = torch.zeros_like(per_sequence)
    for row, wide in ((Stat.LOSS, wide_csl), (Stat.VALID, wide_count)):
        if wide:
            exact = float64_sums(tokens[row])
            rest[row] = (exact - per_sequence[row].double()).float()
    pair = (csl if wide_csl else None, count if wide_count else None)
    ops.scatter_stats(rest, index, deterministic, *pair, backend=backend)
