r"""``record_loss``: CSL of any per-sample loss (regression, multi-label, custom objectives).

:func:`csl_fast.accumulate` computes cross entropy and records it; models trained on any
other loss compute it themselves and pass the per-sample values here::

    per_sample = F.mse_loss(model(x), y, reduction="none").mean(1)  # [B]
    csl_fast.record_loss(per_sample, idx, tracker)
    per_sample.mean().backward()

The loss is recorded through the same ``[NUM_STATS, B]`` statistics tensor and the same
``scatter_stats`` op as cross entropy (only the ``LOSS`` and ``VALID`` rows filled), so the
buffer conventions are those of ``accumulate``: non-finite losses are not recorded,
duplicate indices add up, no host synchronisation, the same ``deterministic`` flag.
"""

from __future__ import annotations

import math

import torch
from torch._functorch.pyfunctorch import temporarily_clear_interpreter_stack

from . import _ext, backward_rerun, ops
from ._args import check_flags
from ._ext import resolve_backend
from .accumulate_checks import (
    INDEX_HINT,
    _check_values,
    check_buffer,
    check_buffers_apart,
    check_count_fits,
    device_mismatch,
    refuse_tracing,
    validate_by_default,
)
from .buffer_locks import buffer_lock
from .fake_kernels import register_fake
from .stats import NUM_STATS, Stat
from .tracker import CSLTracker, _scatter_add

__all__ = ["record_loss"]

_LOSS_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_INDEX_DTYPES = (torch.int64, torch.int32)


def record_loss(
    loss: torch.Tensor,
    index: torch.Tensor,
    csl: torch.Tensor | CSLTracker,
    *,
    count: torch.Tensor | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
) -> torch.Tensor:
    r"""Add each sample's loss into ``csl`` at its dataset index; returns ``loss`` unchanged.

    For every row :math:`i` whose loss :math:`\ell_i` is finite:

    .. math::
        \mathrm{csl}[\mathrm{index}_i] \mathrel{+}= \ell_i, \qquad
        \mathrm{count}[\mathrm{index}_i] \mathrel{+}= 1.

    The value recorded is ``loss.detach()`` rounded to float32 (the statistics format every
    kernel shares, as for :func:`csl_fast.accumulate`), then added in the buffer's dtype; a
    float64 loss beyond float32's range (about 3.4e38) rounds to inf and is not recorded.
    Rows whose loss is NaN or inf are not recorded at all (one bad step cannot poison a
    sample's CSL). Duplicate indices in a batch add up. Nothing here takes part in autograd:
    the returned tensor *is* ``loss`` (same object, graph intact), so the call can wrap the
    loss expression or stand alone.

    What the loss is, is the caller's choice: CSL is the sum over training of whatever is
    passed, so pass the *plain* per-sample loss (before sample weights or a mean) for the
    score to compare samples. ``F.mse_loss(pred, y, reduction="none")`` of ``[B, D]``
    outputs has to be reduced per sample first (``.sum(1)`` or ``.mean(1)``). Negative
    losses (a Gaussian NLL) are recorded as they are, but
    :func:`csl_fast.detect_losses.corrupted_targets` models CSL on a log scale and, on a
    CSL with negative values, warns that its count is unreliable: pass a non-negative loss.

    One tracker takes one recorder. Into a tracker that :func:`csl_fast.accumulate` also
    feeds, each call adds presentations without softmax statistics: the count that divides
    the margin and confidence sums grows, so those scores of samples fed by both are
    diluted, and samples fed by ``record_loss`` alone have none (:func:`csl_fast.scores`
    gives them NaN, with a warning). Record an auxiliary loss into a tracker or tensor of
    its own, or the whole per-sample objective here alone.

    With a :class:`csl_fast.CSLTracker`, these buffers are updated:

    - ``csl_sum``, ``csl_count`` (as above), so :attr:`~csl_fast.CSLTracker.csl` and
      :attr:`~csl_fast.CSLTracker.csl_mean` are meaningful;
    - ``last_loss``: the loss at the sample's last valid presentation (with duplicates
      in a batch, the last valid one in batch order wins, as in ``accumulate``);
    - with ``history=True``: ``epoch_loss_sum``/``epoch_count``, hence
      :attr:`~csl_fast.CSLTracker.loss_history` after :meth:`~csl_fast.CSLTracker.end_epoch`.

    Every other training buffer needs logits and is left untouched: ``last_max_prob``,
    ``last_correct``, ``forgetting``, ``learned_epoch``, ``margin_sum``, ``p_true_sum``,
    ``p_true_sq_sum``, ``grad_norm_sum`` and ``suggest_*``. Scores derived from them
    (``aum``, ``confidence``, ``variability``, ``forgetting``, suggested labels, threshold
    learning time) mean nothing for a tracker fed only by ``record_loss``: they divide
    untouched sums by counts that did grow. Input-gradient norms (:meth:`~csl_fast.
    CSLTracker.watch`) and the eval buffers are independent of this call and keep working.
    On the CPU the whole call is one C++ op (``csl_fast::record_loss``: the sums, counts,
    last loss and epoch sums in one pass). Elsewhere the last-loss rule runs as the op
    ``accumulate`` uses (one Triton pass on a GPU), whose max-probability and correctness
    outputs go to scratch buffers allocated on the tracker's first ``record_loss`` call:
    5 bytes per sample (9 in float64), not saved with the tracker and not counted by
    ``nbytes()``.

    Args:
        loss: ``[B]`` per-sample losses, float32, float64, float16 or bfloat16, with or
            without a graph; on the buffers' device.
        index: ``[B]`` dataset indices, int64 (or int32), in ``[0, N)``.
        csl: ``[N]`` contiguous float32/float64 buffer, or a :class:`csl_fast.CSLTracker`.
        count: optional ``[N]`` buffer (float32/float64/int32/int64) counting how often
            each sample was recorded; only with a tensor ``csl`` (a tracker keeps its own).
        backend: the kernels (the scatter, and a tracker's last-loss pass): ``"auto"``
            (C++ on the CPU, Triton on a GPU) or one of ``csl_fast.BACKENDS``.
        deterministic: bitwise reproducible buffer updates with duplicate indices (GPU
            kernels otherwise use atomics); default
            ``torch.are_deterministic_algorithms_enabled()``. The CPU is always deterministic.
        validate: check in Python that every index is in ``[0, N)`` before anything is
            written (reads the indices on the host). Default as in ``accumulate``: on CPU
            tensors with a backend other than ``"cpu"`` (whose C++ kernel checks the range
            itself before writing), and with ``"reference"`` on any device (its PyTorch
            ops would fault a GPU; one synchronisation). Otherwise not on a GPU, where it
            would cost a synchronisation and an out-of-range index is skipped instead.

    Cost: no host synchronisation. On the CPU one op; on a loaded shared 2-core CPU (B = 64)
    11.5 us a call into a tensor and 13.3 us into a tracker, where the few small kernels it
    replaced took 94 and 133 us in the same run (``benchmarks/results/per-call-2026-11-30.md``).
    Elsewhere a few small kernels (the statistics rows, the scatter, for a tracker the
    last-loss pass).

    Under ``torch.func`` transforms (``vmap``, ``grad``) and forward-mode AD the plain
    values are recorded, each vmapped call as a batch of its own (as
    :func:`csl_fast.accumulate` does): a per-sample-gradient loop records every sample once.

    Returns:
        ``loss``, the same tensor object.

    Raises:
        TypeError / ValueError: wrong dtype, shape, device or buffer (nothing is written).
        IndexError: an index outside ``[0, N)`` when validating (nothing is written).
    """
    refuse_tracing("csl_fast.record_loss")
    if not torch.compiler.is_compiling() and backward_rerun.in_backward():
        return loss  # a checkpointed forward's rerun: checked and recorded the first time
    check_flags("csl_fast.record_loss", deterministic=deterministic, validate=validate)
    if ops.transformed() and isinstance(loss, torch.Tensor) and isinstance(index, torch.Tensor):
        # The buffers live outside the transform, and the C++ op has no batching rule
        # (vmap raised PyTorch's "Batching rule not implemented"): record the plain values
        # there, each vmapped call a batch of its own, as accumulate does.
        detached = loss.detach()
        with temporarily_clear_interpreter_stack():
            (values, rows), _ = ops.escape_transforms(detached, index)
            # (not record_loss again: inside a forward-AD dual_level the stack cleared
            # above does not end the level, and it recursed until RecursionError)
            _record_plain(values, rows, csl, count, backend, deterministic, validate)
        return loss
    _record_plain(loss, index, csl, count, backend, deterministic, validate)
    return loss


def _record_plain(
    loss: torch.Tensor,
    index: torch.Tensor,
    csl: torch.Tensor | CSLTracker,
    count: torch.Tensor | None,
    backend: str,
    deterministic: bool | None,
    validate: bool | None,
) -> None:
    """:func:`record_loss` of tensors outside any transform."""
    fast = _eager_cpu_args(loss, index, csl, count, backend, validate)
    if fast is not None:
        try:
            _RECORD_LOSS_OP(loss.detach(), index, *fast)
        except Exception:
            pass  # nothing was written; the checks below say what is wrong
        else:
            return
    buffers = _buffers(csl, count)
    _check(loss, index, buffers)
    name = resolve_backend(backend, loss.device)
    if validate is None:
        validate = validate_by_default(loss.device, name)

    def check_indices() -> None:
        tracked = isinstance(csl, CSLTracker)
        _check_values(None, index, 0, buffers[0].numel(), 0, "record_loss", tracker=tracked)

    if validate:
        check_indices()
    if name == "cpu":
        # One pass in C++, which checks the indices before writing, takes the buffer lock
        # and bumps the version counters (csrc/cpu/record_loss.cpp). A compiled graph may
        # run inside a backward (checkpointed): NaN losses there, which are not recorded.
        values = loss.detach()
        compiling = torch.compiler.is_compiling()
        if compiling:
            values = backward_rerun.recorded_rows(values, math.nan)
        try:
            _RECORD_LOSS_OP(values, index, *buffers, *_tracker_state(csl))
        except IndexError:
            if not compiling:  # (the kernel's message, "csl_fast: index...", named no function)
                check_indices()
            raise
        return
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    stats = loss_stats(loss)
    if torch.compiler.is_compiling():
        # No addresses to lock on while tracing; the graph's writes are copies at its end.
        # It may run inside a backward (checkpointed): then every row is invalid.
        stats = backward_rerun.recorded_rows(stats, 0.0)  # (loss_stats' invalid rows)
        _record(stats, index, csl, buffers, deterministic, name)
        return
    with buffer_lock(buffers[0]):
        _record(stats, index, csl, buffers, deterministic, name)
        written = [b for b in buffers if b is not None]
        if isinstance(csl, CSLTracker):
            written += _tracker_written(csl)
        # The kernels write through data pointers; make autograd see it.
        torch._C._increment_version(written)


def _eager_cpu_args(loss, index, csl, count, backend, validate) -> tuple | None:
    """The C++ op's arguments after ``index`` when this call can go to it straight away
    (eager, CPU tensors, backend "auto" or "cpu", no validation asked), else None.

    The op refuses, before writing, everything the checks in Python refuse, so on a
    correct call they would cost more than the op itself (~10 us); they run only when the
    op raises, for their messages (a correct call never gets there)."""
    if (
        validate
        or backend not in _CPU
        or _ext._C is None
        or type(loss) is not torch.Tensor
        or not loss.is_cpu
        or not getattr(index, "is_cpu", True)
        or torch.compiler.is_compiling()
    ):
        return None
    # Every tensor on the CPU too: one on the meta device would send the call to the op's
    # fake kernel, which writes nothing and raises nothing.
    if type(csl) is CSLTracker:
        buffers = csl.training_buffers()
        if count is not None or not buffers[0].is_cpu:  # a tracker's buffers share a device
            return None
        return (*buffers, *_tracker_state(csl))
    if type(csl) is torch.Tensor and csl.is_cpu and getattr(count, "is_cpu", True):
        return csl, count, None, None, None
    return None


_CPU = ("auto", "cpu")


def _tracker_state(csl: torch.Tensor | CSLTracker) -> tuple[torch.Tensor | None, ...]:
    """What the C++ op writes besides csl and count: ``(last_loss, epoch_loss_sum,
    epoch_count)`` of a tracker (the epoch sums with ``history=True`` only)."""
    if not isinstance(csl, CSLTracker):
        return None, None, None
    b = csl._buffers
    if csl.history:
        return b["last_loss"], b["epoch_loss_sum"], b["epoch_count"]
    return b["last_loss"], None, None


if _ext._C is not None:
    _RECORD_LOSS_OP = torch.ops.csl_fast.record_loss.default

    @register_fake("csl_fast::record_loss")
    def _fake_record_loss(loss, index, csl, count, last_loss, epoch_loss_sum, epoch_count):
        return None


def loss_stats(loss: torch.Tensor) -> torch.Tensor:
    """float32 ``[NUM_STATS, B]`` statistics of per-sample losses: ``LOSS`` holds the
    finite losses (0 elsewhere), ``VALID`` 1 where the loss is finite; every other row is
    0 and is never read (no logits-derived statistic is implied)."""
    value = loss.detach().float()
    stats = value.new_zeros(NUM_STATS, value.shape[0])
    # Written in place through row views, in two kernels (this runs on every step): the
    # finite losses are those nan_to_num leaves equal to themselves (NaN != 0, inf != 0).
    loss_row = stats[Stat.LOSS]
    torch.nan_to_num(value, nan=0.0, posinf=0.0, neginf=0.0, out=loss_row)
    torch.eq(loss_row, value, out=stats[Stat.VALID])
    return stats


def _record(stats, index, csl, buffers, deterministic, name) -> None:
    # The scatter first: the C++ kernel's range check is the one that runs by default on the
    # CPU, and it raises before writing, so a bad index leaves the tracker untouched too.
    ops.scatter_stats(stats, index, deterministic, *buffers, backend=name)
    if isinstance(csl, CSLTracker):
        _record_tracker(csl, index, stats, name)


def _record_tracker(
    tracker: CSLTracker, index: torch.Tensor, stats: torch.Tensor, backend: str
) -> None:
    """The tracker's loss-only buffers: ``last_loss`` (last valid row in batch order wins)
    and, with history, the epoch sums. No host synchronisation; an index outside
    ``[0, N)`` is skipped, as by the kernels."""
    b = tracker.buffers()
    if tracker.history:
        f = tracker.dtype
        _scatter_add(b["epoch_loss_sum"], index, stats[Stat.LOSS].to(f))
        _scatter_add(b["epoch_count"], index, stats[Stat.VALID].to(f))
    # The last-value rule (duplicates in batch order) is the op accumulate uses: one C++
    # pass on the CPU, one Triton pass on a GPU. It also writes a max probability and a
    # correctness, which have no meaning here: they go to scratch buffers, never to the
    # tracker's own.
    max_prob, correct = _scratch(tracker)
    # (Epoch 0: without learned_epoch no stamp is written, and a compiled graph holding
    # tracker.epoch would be compiled again after every end_epoch.)
    ops.record_last(
        stats, index, None, 0, b["last_loss"], max_prob, correct, None, None, backend=backend
    )


def _scratch(tracker: CSLTracker) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N]`` float and bool buffers that take ``record_last``'s max probability and
    correctness for a loss-only batch (5 or 9 bytes per sample, allocated on the first
    :func:`record_loss` into the tracker, not saved, not in :meth:`CSLTracker.nbytes`)."""
    scratch = getattr(tracker, "_record_loss_scratch", None)
    if scratch is None or scratch[0].shape[0] != tracker.num_samples:
        n, device = tracker.num_samples, tracker.device
        # Never inference tensors (a first call under torch.inference_mode): later calls
        # outside it could not write them, and accumulate_bce's one-call step declines them.
        with torch.inference_mode(False):
            scratch = (
                torch.zeros(n, dtype=tracker.dtype, device=device),
                torch.zeros(n, dtype=torch.bool, device=device),
            )
        tracker._record_loss_scratch = scratch
    return scratch


def _tracker_written(tracker: CSLTracker) -> list[torch.Tensor]:
    b = tracker.buffers()
    names = ("last_loss", "epoch_loss_sum", "epoch_count") if tracker.history else ("last_loss",)
    return [b[name] for name in names]


def _buffers(
    csl: torch.Tensor | CSLTracker, count: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(csl, CSLTracker):
        if count is not None:
            raise ValueError(
                "csl_fast.record_loss: count= is for plain csl tensors; a tracker keeps its "
                "own counts (tracker.csl_count)"
            )
        return csl.training_buffers()
    if not isinstance(csl, torch.Tensor):
        raise TypeError(
            "csl_fast.record_loss: csl must be a float32/float64 tensor of one entry per "
            f"dataset sample or a csl_fast.CSLTracker, got {type(csl).__name__}"
        )
    return csl, count


def _check(loss: object, index: object, buffers: tuple[torch.Tensor, torch.Tensor | None]) -> None:
    if not isinstance(loss, torch.Tensor) or loss.dim() != 1:
        got = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        b = index.numel() if isinstance(index, torch.Tensor) else None
        if isinstance(loss, torch.Tensor) and b and b > 1 and loss.shape == (b, b):
            # .mean(1) of a broadcast would be a wrong per-sample loss, silently; but a
            # [B, T] sequence loss with T == B (or a [B, B] pair matrix) is this shape too
            raise ValueError(
                f"csl_fast.record_loss: loss must be a 1-D tensor of per-sample losses [B], "
                f"got {got}, B x B for B = {b} indices. If it is a [B, 1] prediction "
                "broadcast against a [B] target (F.mse_loss warns 'Using a target size ... "
                "different to the input size'), squeeze the prediction (pred.squeeze(1)) "
                "instead of reducing the loss; if its second dimension is per sample (tokens "
                "of a sequence, a pair matrix's row), reduce it per sample (e.g. .mean(1))"
            )
        raise ValueError(
            f"csl_fast.record_loss: loss must be a 1-D tensor of per-sample losses [B], got "
            f"{got}; compute the loss with reduction='none' and reduce any other dimension "
            "per sample (e.g. .mean(1))"
        )
    if loss.dtype not in _LOSS_DTYPES:
        raise TypeError(
            f"csl_fast.record_loss: loss must be float32, float64, float16 or bfloat16, got "
            f"{loss.dtype}"
        )
    if not isinstance(index, torch.Tensor):
        raise TypeError(
            f"csl_fast.record_loss: index must be a tensor, got {type(index).__name__}{INDEX_HINT}"
        )
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(
            f"csl_fast.record_loss: index must hold int64 (or int32) dataset indices, got "
            f"{index.dtype}"
        )
    if index.shape != loss.shape:
        raise ValueError(
            f"csl_fast.record_loss: index must be 1-D with B = {loss.shape[0]} entries, one "
            f"per loss, got shape {tuple(index.shape)}"
        )
    device = loss.device
    for name, t in (("index", index), *zip(("csl", "count"), buffers, strict=True)):
        if isinstance(t, torch.Tensor) and t.device != device:
            raise ValueError(device_mismatch("record_loss", name, t, device, "loss"))
    csl, count = buffers
    check_buffer("record_loss", "csl", csl, (torch.float32, torch.float64), "loss")
    if count is not None:
        check_buffer(
            "record_loss",
            "count",
            count,
            (torch.float32, torch.float64, torch.int64, torch.int32),
            "loss",
        )
        check_count_fits("record_loss", csl, count)
    check_buffers_apart("record_loss", {"csl": csl, "count": count}, index)
