"""The argument checks of :func:`csl_fast.accumulate` (and of
:func:`csl_fast.linear_cross_entropy`, which shares them): every input's shape, dtype,
device and range, checked before any kernel runs so that a wrong call is a one-line error
naming the argument and the fix, never a silent wrong answer or a device fault.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from .reference import REDUCTIONS
from .stats import MAX_TRACKED_CLASSES

if TYPE_CHECKING:
    from .accumulate import Recorder

_LOGIT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_INDEX_DTYPES = (torch.int64, torch.int32)


def refuse_tracing(op: str, exports: bool = True) -> None:
    """Raise under ``torch.jit.trace``: the trace keeps the ops that compute the output but
    not the writes into the dataset buffers (the one-call C++ step, in-place ops, hooks),
    so the traced module returned the right loss and recorded nothing after tracing,
    silently. ``exports``: whether ``torch.export`` records the call. Costs ~0.3 us a
    step; Dynamo reads it as a constant."""
    if torch.jit.is_tracing():
        works = "torch.compile or torch.export, which record" if exports else "torch.compile"
        raise RuntimeError(
            f"{op} cannot run under torch.jit.trace: the tracer cannot see its writes into "
            "the dataset buffers, so the traced module would compute its output but record "
            f"nothing. Use {works}, or keep the csl_fast call outside the traced module "
            "(trace the model, then call it on its output)"
        )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two contiguous buffers share memory (the same tensor, or views of one)."""
    # On every step with a count buffer: the cheap address test first.
    try:
        a0, b0 = a.data_ptr(), b.data_ptr()
    except RuntimeError:  # a torch.func wrapper (vmap, grad): no storage, no address
        return False
    overlap = a0 < b0 + b.nbytes and b0 < a0 + a.nbytes and a.device == b.device
    return overlap and not a.is_meta  # (meta tensors have no memory: their addresses are 0)


def check_count_fits(op: str, csl: torch.Tensor, count: torch.Tensor) -> None:
    """``count`` has one entry per sample of ``csl`` and shares no memory with it (the
    entry points that take a CSL buffer and a count buffer: accumulate, record_loss)."""
    if count.numel() != csl.numel():
        raise ValueError(
            f"csl_fast.{op}: count has {count.numel()} entries but csl has "
            f"{csl.numel()}; both need one entry per dataset sample"
        )
    if not torch.compiler.is_compiling() and _overlap(csl, count):
        raise ValueError(
            f"csl_fast.{op}: csl and count share memory (the same tensor, or views of "
            "one), so losses and counts would be added into the same entries; allocate "
            "them separately"
        )


def _span(t: torch.Tensor) -> tuple[int, int] | None:
    """``[first, last)`` byte addresses a strided tensor reads, or None when it has no
    memory (empty, meta, a torch.func wrapper). Strides of views are not negative."""
    if t.numel() == 0 or t.is_meta:  # (meta tensors have no memory: their addresses are 0)
        return None
    try:
        t0 = t.data_ptr()
    except RuntimeError:  # a torch.func wrapper (vmap, grad): no storage, no address
        return None
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t0, t0 + (last + 1) * t.element_size()


def check_buffers_apart(
    op: str,
    buffers: dict[str, torch.Tensor | None],
    index: torch.Tensor,
    **inputs: torch.Tensor | None,
) -> None:
    """No buffer written in place shares memory with the ``index`` of the call, whose
    entries would change under the adds (a count passed as the index too counts into it),
    nor with the other ``inputs`` it reads (``target=``, ``logits=``: count=target added
    into the user's labels without a word). Runs on every step: integer address ranges.
    Not while tracing (no addresses)."""
    if torch.compiler.is_compiling():
        return
    reads = [(name, t) for name, t in (("index", index), *inputs.items()) if t is not None]
    spans = [(name, t.device, _span(t)) for name, t in reads]
    for name, buf in buffers.items():
        span = None if buf is None else _span(buf)
        if span is None:
            continue
        for what, device, read in spans:
            if (
                read is not None
                and span[0] < read[1]
                and read[0] < span[1]
                and device == buf.device
            ):
                raise ValueError(
                    f"csl_fast.{op}: {name} shares memory with {what} (the same tensor, or "
                    f"views of one), so the call would add into the {what} it reads; "
                    f"allocate {name} separately, e.g. torch.zeros(num_samples)"
                )


def _buffers(
    csl: torch.Tensor | Recorder,
    count: torch.Tensor | None,
    seq: tuple[int, int] | None = None,
    soft: bool = False,
    classes: int | None = None,
    op: str = "accumulate",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(csl, count)`` buffers a call adds into: ``csl`` itself, or a tracker's
    (``classes``: the class count of the logits recorded into it, checked against its
    ``num_classes``; None where the logits are refused by the other checks)."""
    if isinstance(csl, torch.Tensor):
        return csl, count
    if soft:
        raise TypeError(
            f"csl_fast.{op}: class-probability targets are recorded into csl (and count) "
            "tensors only: a tracker's other statistics (correctness, margin, forgetting, last "
            "loss) need one class per sample. Record them into tensors of their own "
            "(csl=torch.zeros(N), count=torch.zeros(N)), not the tracker's csl_sum and "
            "csl_count, whose scores would then count presentations that left no statistics "
            "(a final loss of 0, diluted confidence and margin); or pass class-index targets "
            "(for label smoothing: class indices with label_smoothing=, which keeps every "
            "statistic)"
        )
    # hasattr, not isinstance(csl, Recorder): a runtime Protocol check costs ~30 us a call.
    if not (hasattr(csl, "training_buffers") and hasattr(csl, "record")):
        raise TypeError(
            f"csl_fast.{op}: csl must be a float32/float64 tensor of one entry per "
            f"dataset sample or a csl_fast.CSLTracker, got {type(csl).__name__}"
        )
    if seq is not None and not callable(getattr(csl, "record_sequences", None)):
        raise TypeError(
            f"csl_fast.{op}: sequence batches need a tracker with record_sequences(index, "
            f"token_stats); {type(csl).__name__} has none (use csl_fast.CSLTracker or a tensor)"
        )
    if count is not None:
        raise ValueError(
            f"csl_fast.{op}: count= is for plain csl tensors; a tracker keeps its own counts"
        )
    if classes is not None:
        match_tracker_classes(op, csl, classes)
    return csl.training_buffers()


def refuse_rows_into_sequences(api: str, csl: object, one_token: str | None) -> None:
    """A tracker of sequences refuses rows of one class each: a sequence's CSL sums its
    tokens and it has no suggested label, so the two kinds would rank and clean as one
    (``one_token``: how this API takes a batch of one-token sequences instead; None for
    an eval pass, which scores rows only)."""
    if getattr(csl, "sequences", False):
        how = (
            f"a batch of one-token sequences goes {one_token}"
            if one_token is not None
            else "an eval pass scores classification rows only (its eval_* buffers and "
            "final_loss would then be a row's loss, not a sequence's)"
        )
        raise ValueError(
            f"{api}: this tracker recorded sequences (samples of several positions: "
            "tracker.sequences is True) and this batch is classification rows, one class per "
            "sample; one tracker holds one kind, since a sequence's CSL sums its tokens and "
            f"it has no suggested label. Record the rows into a second CSLTracker; {how}"
        )


def match_tracker_classes(op: str, tracker: object, classes: int) -> None:
    """Logits of ``classes`` classes may be recorded into ``tracker`` only if it was made
    for that many (or for any: ``num_classes=None``, see :func:`adopt_classes`). Its
    suggested labels and votes are class indices, which cleaning, detection and reports
    take to be below num_classes."""
    if classes > MAX_TRACKED_CLASSES:
        raise ValueError(too_many_classes(f"csl_fast.{op}: the logits have", classes))
    expected = getattr(tracker, "num_classes", None)
    if expected is not None and classes != expected:
        raise ValueError(
            f"csl_fast.{op}: the logits have C = {classes} classes but the tracker was made "
            f"with num_classes={expected}; make the tracker with num_classes={classes} (or "
            "give the model as many outputs as the tracker has classes)"
        )


def too_many_classes(subject: str, classes: int) -> str:
    """Why a tracker refuses ``classes`` classes (:data:`MAX_TRACKED_CLASSES`)."""
    return (
        f"{subject} C = {classes} classes, but a CSLTracker keeps each row's predicted "
        f"class as a float32, exact only up to C = 2**24 = {MAX_TRACKED_CLASSES} (suggested "
        "labels above it would be rounded to other classes); record the loss into a plain "
        "csl tensor instead (csl_fast.accumulate(logits, target, index, csl))"
    )


def adopt_classes(tracker: object, classes: int) -> None:
    """A tracker made for any class count (``num_classes=None``) takes that of the first
    logits it records: detection's doubt view and firm-loss test compare the label's
    probability with chance, 1 / C (without it, on digits at 5% flips: precision 0.55
    instead of 0.86, :mod:`csl_fast.detect`). Called once the call has recorded, so that
    a refused call leaves the tracker as it was (it set the count, and the next call's
    logits were refused for not matching it). Not for sequences (one sample, many
    positions): their per-sample means of token probabilities are not one label's, and a
    vocabulary's chance level would pin none."""
    if getattr(tracker, "num_classes", 0) is None:
        tracker.num_classes = int(classes)


def _check_args(
    logits,
    target,
    index,
    buffers,
    weight,
    label_smoothing,
    reduction,
    seq=None,
    soft=False,
    op: str = "accumulate",
) -> None:
    """Checks of a call read as rows (:mod:`csl_fast.cross_entropy_args`): ``logits``
    ``[R, C]``, ``target`` ``[R]`` class indices (``[R, C]`` probabilities when ``soft``)."""
    # Runs on every training step: each tensor attribute is read once (a device or dtype
    # read builds a Python object), and the error messages are only formatted on failure.
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(
            f"csl_fast.{op}: logits must be a tensor of F.cross_entropy's layouts ([C], "
            f"[B, C] or [N, C, d1, ..., dk]) or [B*T, V] sequences with a [B, T] target, got "
            f"{shape}"
        )
    if logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(
            f"csl_fast.{op}: logits must be float32, float16, bfloat16 or float64, got "
            f"{logits.dtype}"
        )
    device = logits.device
    batch = logits.shape[0]
    if soft:
        _check_device("target", target, device, op)
    else:
        _check_indices("target", target, batch, device, op=op)
    if seq is None:
        _check_indices("index", index, batch, device, op=op)
    else:
        _check_indices("index", index, seq[0], device, seq, op)
    csl, count = buffers
    check_buffer(op, "csl", csl, _CSL_DTYPES, "logits")
    _check_device("csl", csl, device, op)
    if count is not None:
        check_buffer(op, "count", count, _COUNT_DTYPES, "logits")
        _check_device("count", count, device, op)
        check_count_fits(op, csl, count)
    check_buffers_apart(op, {"csl": csl, "count": count}, index, target=target, logits=logits)
    if weight is not None:
        if not isinstance(weight, torch.Tensor):
            raise TypeError(
                f"csl_fast.{op}: weight must be a tensor of C = {logits.shape[1]} class "
                f"weights, got {type(weight).__name__}; pass torch.tensor(weights, "
                "device=logits.device)"
            )
        if weight.dim() != 1 or weight.shape[0] != logits.shape[1]:
            raise ValueError(
                f"csl_fast.{op}: weight must be 1-D with C = {logits.shape[1]} class "
                f"weights, got shape {tuple(weight.shape)}"
            )
        if not weight.is_floating_point():
            # (read as float32 by the kernels: bool weights silently meant 0 and 1)
            raise TypeError(
                f"csl_fast.{op}: weight must be a floating-point tensor of class weights, got "
                f"{weight.dtype} (F.cross_entropy refuses it too); pass weight.float()"
            )
        _check_device("weight", weight, device, op)
        if weight.requires_grad and not soft and torch.is_grad_enabled():
            raise ValueError(
                f"csl_fast.{op}: weight requires grad, but cross entropy with class-index "
                "targets has no gradient for its class weights (F.cross_entropy refuses it "
                "too); pass weight.detach()"
            )
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"csl_fast.{op}: reduction must be one of {tuple(REDUCTIONS)}, got {reduction!r}"
        )
    smoothing(label_smoothing, op)


def smoothing(label_smoothing: object, op: str) -> float:
    """``label_smoothing`` as ``F.cross_entropy`` applies it: a value of 0 or less, or NaN,
    smooths nothing (PyTorch takes it without a word and computes the plain loss; so does
    csl_fast, where it refused it); one above 1 is refused, as PyTorch refuses it."""
    try:
        above = label_smoothing > 1.0
        applied = label_smoothing > 0.0
    except TypeError:  # None or a string from a config, say
        raise TypeError(
            f"csl_fast.{op}: label_smoothing must be a float in [0, 1], got "
            f"{type(label_smoothing).__name__}; pass 0.0 for none"
        ) from None
    if above:
        raise ValueError(f"csl_fast.{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    return float(label_smoothing) if applied else 0.0


_CSL_DTYPES = (torch.float32, torch.float64)
#: Buffer names of the ops that a tracker supplies (CE's and BCE's).
BCE_BUFFER_NAMES = (
    "csl",
    "count",
    "wrong",
    "min_margin",
    "label_csl",
    "label_margin",
    "label_prob",
)
TRACKER_BUFFERS = frozenset(BCE_BUFFER_NAMES)
_COUNT_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32)


def widen_for_ignore_index(target: object, ignore_index: int) -> object:
    """``target`` as int64 when it is int32 and ``ignore_index`` lies outside int32: no
    int32 target equals it, but a kernel or PyTorch op comparing in int32 would wrap it
    onto a class (2**32 + 2 onto 2) and ignore that class's rows."""
    if not -(2**31) <= ignore_index < 2**31 and getattr(target, "dtype", None) is torch.int32:
        return target.long()
    return target


def device_mismatch(
    op: str, name: str, t: torch.Tensor, device: torch.device, source: str = ""
) -> str:
    """The message for ``t`` off the device of ``source`` (``op``'s main input: logits,
    or hidden for linear_cross_entropy). A buffer named in ``TRACKER_BUFFERS`` comes from
    a tracker, which has no ``.to`` (the fix is where it is created), or is a tensor the
    caller passed: the message gives both fixes."""
    source = source or ("hidden" if op == "linear_cross_entropy" else "logits")
    fix = f"move it with .to({source}.device)"
    if name in TRACKER_BUFFERS:
        fix = (
            f"{fix} if you passed it, or, for a CSLTracker's buffer, create the tracker with "
            f"device={str(device)!r} (or move the inputs to {t.device})"
        )
    verb = "are" if source == "logits" else "is"
    return f"csl_fast.{op}: {name} is on {t.device} but {source} {verb} on {device}; {fix}"


def _check_device(name: str, t: torch.Tensor, device: torch.device, op: str = "accumulate") -> None:
    if t.device != device:
        raise ValueError(device_mismatch(op, name, t, device))


#: After "index must be a tensor, got int": the usual slip is Lightning's batch_idx.
INDEX_HINT = (
    " (not the batch's number): the dataset indices of the batch's samples; have the "
    "dataset return each sample's index (csl_fast.data.IndexedDataset)"
)


def _check_indices(
    name: str,
    t: object,
    rows: int,
    device: torch.device,
    seq: tuple[int, int] | None = None,
    op: str = "accumulate",
) -> None:
    """``target`` or ``index``: a 1-D int64/int32 tensor of ``rows`` entries on ``device``
    (``seq``: the index of a [B, T] batch of sequences, one entry per sequence)."""
    if not isinstance(t, torch.Tensor):
        hint = INDEX_HINT if name == "index" else ""
        raise TypeError(f"csl_fast.{op}: {name} must be a tensor, got {type(t).__name__}{hint}")
    if t.dtype not in _INDEX_DTYPES:
        hint = (
            "; class probabilities need the logits' shape"
            if name == "target" and t.is_floating_point()
            else ""
        )
        # (accumulate and linear_cross_entropy widen uint8 class indices before here)
        kinds = (
            "int64 (or int32, uint8)"
            if name == "target" and op in ("accumulate", "linear_cross_entropy")
            else "int64 (or int32)"
        )
        raise TypeError(f"csl_fast.{op}: {name} must hold {kinds} indices, got {t.dtype}{hint}")
    if t.dim() != 1 or t.shape[0] != rows:
        if seq is not None:
            raise ValueError(
                f"csl_fast.{op}: index must be 1-D with B = {rows} entries, one dataset "
                f"index per sequence of the [B, T] = {seq} target, got shape {tuple(t.shape)}"
            )
        # [B, 1] could be B sequences of one token each or a misshapen per-row target: the
        # [B*T, V] layout cannot tell, so the error names both unambiguous forms.
        one_token = name == "target" and op == "accumulate" and t.shape == (rows, 1)
        hint = (
            "; for B sequences of one token pass logits.unsqueeze(-1) ([B, V, 1], the "
            "[B, V, T] layout) with this target, for one class per row target.squeeze(1)"
            if one_token
            else ""
        )
        raise ValueError(
            f"csl_fast.{op}: {name} must be 1-D with B = {rows} entries to match logits "
            f"of {rows} rows, got shape {tuple(t.shape)}{hint}"
        )
    _check_device(name, t, device, op)


def check_buffer(
    op: str, name: str, buf: object, dtypes: tuple[torch.dtype, ...], source: str
) -> None:
    """A dataset-sized buffer written in place: a tensor of one of ``dtypes``, contiguous,
    1-D, not requiring grad (``op`` and ``source``, the input it must sit beside, name the
    call in the message)."""
    if not isinstance(buf, torch.Tensor) or buf.dtype not in dtypes:
        got = buf.dtype if isinstance(buf, torch.Tensor) else type(buf).__name__
        raise TypeError(
            f"csl_fast.{op}: {name} must be a tensor of dtype "
            f"{' or '.join(str(d) for d in dtypes)}, got {got}; allocate it with "
            f"torch.zeros(num_samples, device={source}.device)"
        )
    if not torch.compiler.is_compiling() and torch._C._functorch.is_functorch_wrapped_tensor(buf):
        # (the kernels write through its storage, which a transform's wrapper does not have)
        raise ValueError(
            f"csl_fast.{op}: {name} was created inside a torch.func transform (grad or "
            "jvp), so it is the transform's value, with no storage to record into; create "
            f"{name} (or the tracker) outside the transformed function and let the function "
            "use it, as it would any captured tensor"
        )
    if buf.requires_grad:
        raise ValueError(
            f"csl_fast.{op}: {name} requires grad, but it is a buffer written in place "
            "with no gradient; allocate it with torch.zeros(num_samples) (requires_grad=False) "
            "or pass it detached"
        )
    check_writable(op, name, buf)
    if buf.dim() != 1 or not buf.is_contiguous():
        raise ValueError(
            f"csl_fast.{op}: {name} must be a contiguous 1-D tensor with one entry per "
            f"dataset sample, got shape {tuple(buf.shape)} (contiguous={buf.is_contiguous()})"
        )


def check_writable(op: str, name: str, buf: torch.Tensor) -> None:
    """PyTorch refuses to update an inference tensor in place outside inference mode; the
    fused kernels, writing through data pointers, would not notice, so every backend
    refuses it here, as the reference backend's PyTorch ops do. Not while tracing (Dynamo
    cannot read it), where the graph's writes are PyTorch copies that check it."""
    if (
        not torch.compiler.is_compiling()
        and buf.is_inference()
        and not torch.is_inference_mode_enabled()
    ):
        raise RuntimeError(
            f"csl_fast.{op}: {name} is an inference tensor (created under "
            "torch.inference_mode()), which PyTorch lets be updated in place only inside "
            f"inference_mode; create {name} (or the tracker holding it) outside "
            "torch.inference_mode()"
        )


def copy_to(
    tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``tensor.to(device, dtype)``, asynchronous only where ``device`` is not the CPU: a
    GPU-to-host copy with ``non_blocking=True`` may not have landed when the host reads
    it (nothing here synchronises), and the host then read stale indices or targets."""
    device = torch.device(device)
    return tensor.to(device, dtype, non_blocking=device.type != "cpu")


def signed_index(
    index: torch.Tensor, op: str, num_samples: int, device: torch.device | None = None
) -> torch.Tensor:
    """``index`` as int64 (on ``device``, if given), for APIs that take unsigned indices.
    A uint64 value past 2**63 - 1 wraps to a negative one, which the range check then
    named (``index[1] = -9223372036854775803``): refused here as given (one read of the
    values, for uint64 only)."""
    signed = copy_to(index, index.device if device is None else device, torch.int64)
    if index.dtype == torch.uint64 and bool((signed < 0).any()):
        i = int((signed < 0).nonzero()[0, 0])
        raise IndexError(
            f"csl_fast.{op}: index[{i}] = {int(signed[i]) + 2**64} is outside [0, N = "
            f"{num_samples}) where N is the tracker's num_samples"
        )
    return signed


def bounded_by(values: torch.Tensor, n: int) -> bool:
    """Whether ``values >= n`` and ``values < n`` compare as meant for the integer tensor
    ``values``: PyTorch casts the Python int into the tensor's dtype first, so past its
    largest value ``n`` wraps (``2**31 + 16`` to a negative number for int32, and every
    index was "outside" a buffer of that size). There, no entry can reach ``n`` and only
    the lower bound is compared (no int64 copy of the indices). A float or bool tensor
    (refused by the caller's dtype check, which may come after the range check) compares
    as it is: ``torch.iinfo`` raised its own TypeError for it."""
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        return True
    return n <= torch.iinfo(values.dtype).max


def outside(values: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the entries of the integer tensor ``values`` outside ``[0, n)``."""
    below = values < 0
    return below | (values >= n) if bounded_by(values, n) else below


def inside(values: torch.Tensor, n: int) -> torch.Tensor:
    """Bool mask of the entries of the integer tensor ``values`` in ``[0, n)``."""
    above = values >= 0
    return above & (values < n) if bounded_by(values, n) else above


def _check_values(
    target: torch.Tensor | None,
    index: torch.Tensor,
    num_classes: int,
    num_samples: int,
    ignore_index: int,
    op: str = "accumulate",
    *,
    tracker: bool = False,
) -> None:
    """Range checks of targets (None: class probabilities, nothing to check) and indices
    (reads them on the host: one synchronisation on a GPU when both are in range; in a
    compiled graph, :func:`check_in_graph`). ``tracker``: ``num_samples`` is a tracker's,
    which the message names (the user made a tracker, not a buffer)."""
    if index.numel() == 0 or index.is_meta:  # (meta tensors have shapes, not values)
        return
    bad_index = outside(index, num_samples)
    bad = None
    if target is not None:
        # (int32 targets compared with an ignore_index past int32 wrapped it onto a class:
        # 2**32 + 5 ignored target 5, and score_epoch's check let it through)
        target = widen_for_ignore_index(target, ignore_index)
        bad = (target != ignore_index) & outside(target, num_classes)
    found = bad_index.any() if bad is None else bad.any() | bad_index.any()
    if torch.compiler.is_compiling():
        classes = (
            ""
            if bad is None
            else f", or a target outside [0, C = {num_classes}) and not ignore_index "
            f"({ignore_index})"
        )
        check_in_graph(
            op,
            ~found,
            f"an index is outside [0, N = {num_samples}){classes} (found in a compiled "
            "graph, which cannot say which row; run it eagerly to see)",
        )
        return
    if not bool(found):
        return
    if bad is not None and bool(bad.any()):
        at = tuple(bad.nonzero()[0].tolist())  # (a [B, T] target: its [b, t])
        raise IndexError(
            f"csl_fast.{op}: target[{', '.join(map(str, at))}] = {int(target[at])} is outside "
            f"[0, C = {num_classes}) and is not ignore_index ({ignore_index}); fix the labels "
            "or pass the right ignore_index"
        )
    i = int(bad_index.nonzero()[0, 0])
    n_is, fix = (
        (
            "the tracker's num_samples",
            "a tracker of the whole indexed dataset (num_samples=len(dataset))",
        )
        if tracker
        else ("the size of the csl buffer", "a buffer with one entry per dataset sample")
    )
    raise IndexError(
        f"csl_fast.{op}: index[{i}] = {int(index[i])} is outside [0, N = {num_samples}) where "
        f"N is {n_is}; pass dataset indices (csl_fast.data.IndexedDataset) and {fix}"
    )


def check_in_graph(op: str, ok: torch.Tensor, message: str) -> None:
    """A range check inside ``torch.compile``, which cannot read values on the host: on
    the CPU the graph raises ``RuntimeError("csl_fast.<op>: <message>")`` when the 0-d
    bool ``ok`` is False, before anything is written. Not on a GPU, where it would be a
    device-side assert that ends the process's CUDA context: there the kernels skip an
    out-of-range index (README, "torch.compile")."""
    if ok.device.type == "cpu":
        torch._assert_async(ok, f"csl_fast.{op}: {message}")


@contextlib.contextmanager
def target_positions(shape: tuple[int, ...] | None) -> Iterator[None]:
    """An out-of-range target found among the flattened rows (``target[5]``) named by its
    position in the caller's target of ``shape`` (``target[1, 1]`` of a ``[2, 4]`` one: a
    ``[B, T]`` sequence batch or an ``[N, d1, ...]`` segmentation map), where ``target[5]``
    does not exist. ``None`` (or a 1-D shape): nothing to rename."""
    try:
        yield
    except IndexError as exc:
        found = re.search(r"target\[(\d+)\]", str(exc))
        if shape is None or len(shape) < 2 or found is None:
            raise
        flat, position = int(found.group(1)), []
        for size in reversed(shape):
            flat, at = divmod(flat, max(size, 1))
            position.append(str(at))
        named = f"target[{', '.join(reversed(position))}]"
        raise IndexError(str(exc).replace(found.group(0), named, 1)) from None


def validate_by_default(device: torch.device, backend: str) -> bool:
    """Whether targets and indices are range-checked on the host when the caller did not
    say (``validate=None``): where nothing else checks them before a write and it costs no
    device synchronisation (CPU tensors, a backend other than the C++ ``"cpu"``, whose
    kernels check), and on the ``"reference"`` backend everywhere. The reference is the
    correctness tool, and its PyTorch ops fault the GPU on a bad target or index (a
    device-side assert, after which the process's CUDA context is lost): one
    synchronisation buys a clear error there."""
    return backend == "reference" or (device.type == "cpu" and backend != "cpu")
