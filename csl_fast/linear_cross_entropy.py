r"""``linear_cross_entropy``: the LM head and its cross entropy without the ``[tokens, V]`` logits.

A language model's last step, ``F.cross_entropy(hidden @ weight.T + bias, target)``, holds
the logits ``[tokens, V]`` (16k x 128k in bf16 is 4 GB) and, in eager PyTorch, two or
three more buffers of that size for ``log_softmax``, its output and the gradient. This
module computes the same loss and the same gradients for ``hidden``, ``weight`` and
``bias`` chunk by chunk over the tokens:

for each chunk of ``chunk_size`` tokens

1. ``z = hidden_c @ weight.T + bias`` (``[chunk, V]``, the inputs' dtype: exactly the
   logits the eager reference computes);
2. the fused cross-entropy op of the active backend (C++ on the CPU, Triton or CUDA on a
   GPU, see :func:`csl_fast.available_backends`) turns ``z`` into the chunk's loss, its
   gradient ``dz`` (written over ``z``) and the per-token statistics in one pass over the
   row;
3. with ``reduction`` ``'mean'``/``'sum'`` the parameter gradients are formed at once:
   ``grad_hidden_c = dz @ weight``, ``grad_weight += dz.T @ hidden_c`` (float32
   accumulator by default), ``grad_bias += dz.sum(0)``; then ``z`` and ``dz`` are freed.

How ``grad_weight += dz.T @ hidden_c`` is formed when the accumulator is wider than the
inputs (bf16/fp16 inputs, float32 accumulator), :func:`weight_grad_path`:

- ``"out_dtype"``: ``torch.addmm(gw, dz.T, h, out_dtype=float32, out=gw)``, a bf16/fp16
  GEMM that adds its float32 result into the accumulator, nothing rounded to bf16, no
  temporary. Where torch has a kernel for ``aten::addmm.dtype_out`` on the device: CUDA
  (and XPU) from torch 2.8 on, so a GPU with torch 2.13 takes this path.
- ``"upcast"``: both chunk operands converted to the accumulator's dtype and one GEMM in
  it (``[chunk, V]`` and ``[chunk, H]`` temporaries, no ``[V, H]`` one; exact, but a
  float32 GEMM, which on a GPU is slower than a bf16 one unless TF32 is allowed). Taken on
  the CPU (no mixed-dtype GEMM there in torch 2.13) and where ``out_dtype`` is missing or
  refused; on a GPU it warns once.
- ``"same dtype"``: ``accum_dtype=weight.dtype``: ``addmm_`` in place in that dtype.

:func:`accumulation_paths` (and ``python -m csl_fast.info``) reports the paths taken.

So at most one chunk of logits (then its gradient, in the same memory) is alive at a
time; the backward pass
only scales the stored gradients by the upstream gradient. With ``reduction='none'`` the
upstream gradient is per token and unknown in the forward pass: the forward computes the
losses only, and the backward recomputes each chunk's logits (one more matmul).

The per-token statistics of every chunk (``NUM_STATS`` = 7 floats per token) are kept and
recorded after the loop exactly as :func:`csl_fast.accumulate` records them: per row, or summed per
sequence (``target`` ``[B, T]``, ``index`` ``[B]``) so that CSL is a sequence's summed
token loss over training and ``count`` its number of supervised tokens.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable
from typing import Any, Literal, overload

import torch

from . import cross_entropy_extras, ops, ops_extras
from ._args import check_flags, integer_labels
from ._ext import resolve_backend
from .accumulate import (
    Recorder,
    _any_autocast,
    _buffers,
    _check_args,
    _check_values,
    record_stats,
)
from .accumulate_checks import (
    adopt_classes,
    refuse_rows_into_sequences,
    refuse_tracing,
    smoothing,
    validate_by_default,
    widen_for_ignore_index,
)
from .cross_entropy_extras import CrossEntropyOutput
from .fake_kernels import one_device
from .reference import REDUCTIONS
from .stats import NUM_STATS
from .tracker import CSLTracker

__all__ = [
    "accumulation_paths",
    "default_chunk_size",
    "linear_cross_entropy",
    "weight_grad_path",
]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
#: Chunks hold at least this many logits when the hidden states are smaller (32 Mi).
_MIN_CHUNK_ELEMS = 1 << 25


def default_chunk_size(tokens: int, hidden: int, vocab: int) -> int:
    """Tokens per chunk when ``chunk_size`` is not given: a power of two such that one
    chunk of logits holds about as many elements as the hidden states (at least 32 Mi
    elements), between 16 and ``tokens``. At 16384 x 4096 hidden states and V = 128256
    that is 512 tokens: 32 chunks of 128 MiB bf16 logits each."""
    target = max(tokens * hidden, _MIN_CHUNK_ELEMS) / max(vocab, 1)
    chunk = 1 << max(4, math.floor(math.log2(max(target, 1.0))))
    return int(max(1, min(tokens, chunk)))


@overload
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor | None = None,
    csl: torch.Tensor | Recorder | None = None,
    bias: torch.Tensor | None = None,
    *,
    count: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
    softcap: float | None = None,
    z_loss_scale: float = 0.0,
    return_z_loss: Literal[False] = False,
    return_token_accuracy: Literal[False] = False,
) -> torch.Tensor: ...


@overload
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor | None = None,
    csl: torch.Tensor | Recorder | None = None,
    bias: torch.Tensor | None = None,
    *,
    count: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
    softcap: float | None = None,
    z_loss_scale: float = 0.0,
    return_z_loss: Literal[True],
    return_token_accuracy: bool = False,
) -> CrossEntropyOutput: ...


@overload
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor | None = None,
    csl: torch.Tensor | Recorder | None = None,
    bias: torch.Tensor | None = None,
    *,
    count: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
    softcap: float | None = None,
    z_loss_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: Literal[True],
) -> CrossEntropyOutput: ...


@overload
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor | None = None,
    csl: torch.Tensor | Recorder | None = None,
    bias: torch.Tensor | None = None,
    *,
    count: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
    softcap: float | None = None,
    z_loss_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
) -> torch.Tensor | CrossEntropyOutput: ...


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    index: torch.Tensor | None = None,
    csl: torch.Tensor | Recorder | None = None,
    bias: torch.Tensor | None = None,
    *,
    count: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    accum_dtype: torch.dtype | None = None,
    backend: str = "auto",
    deterministic: bool | None = None,
    validate: bool | None = None,
    softcap: float | None = None,
    z_loss_scale: float = 0.0,
    return_z_loss: bool = False,
    return_token_accuracy: bool = False,
) -> torch.Tensor | CrossEntropyOutput:
    r"""``F.cross_entropy(hidden @ weight.T + bias, target)`` without the full logits, and CSL.

    Returns what ``F.cross_entropy(F.linear(hidden, weight, bias).reshape(-1, V),
    target.reshape(-1), ignore_index=ignore_index, label_smoothing=label_smoothing,
    reduction=reduction)`` returns, with the same gradients for ``hidden``, ``weight`` and
    ``bias``; ``reduction='none'`` gives the target's shape. Like
    :func:`csl_fast.accumulate`, it adds the plain (unsmoothed, float32) loss of every
    supervised token into ``csl``:

    - ``target [N]`` (one row per sample; with ``hidden [B, T, H]``, ``N = B*T``, a row
      per token), ``index [N]``: ``csl[index_i] += l_i``;
    - ``target [B, T]`` (sequences; ``hidden [B, T, H]`` or ``[B*T, H]``), ``index [B]``:
      ``csl[index_b] += sum_t l_bt`` and ``count[index_b] +=`` the number of tokens whose
      target is not ``ignore_index``, so ``csl / count`` is the per-token mean. A
      :class:`csl_fast.CSLTracker` records the other statistics per sequence
      (:meth:`~csl_fast.CSLTracker.record_sequences`).

    For a causal LM pass the shifted pair, ``hidden[:, :-1]`` and ``labels[:, 1:]``, or
    the labels shifted left and padded with ``ignore_index``.

    Args:
        hidden: ``[N, H]`` or ``[B, T, H]``; float32, float16, bfloat16 or float64.
            Under ``torch.autocast`` hidden, weight and bias are first cast to autocast's
            dtype, as autocast casts ``F.linear``'s inputs (a float32 head weight with
            bfloat16 hidden states is then fine), and the loss is float32, as autocast
            gives ``F.cross_entropy``'s: each chunk's logits are cast to float32 for the
            loss (twice a chunk's memory) and their gradient back for the matmuls.
        weight: ``[V, H]`` output embedding, same dtype and device as ``hidden``: the
            linear layer's weight, as in ``F.linear`` (and Liger-Kernel's fused linear
            cross entropy), not ``F.cross_entropy``'s class weights, which this op does
            not take.
        target: ``[N]`` or ``[B, T]`` int64 token ids (int32 and uint8 are taken too)
            in ``[0, V)`` or ``ignore_index``.
        index: dataset indices, ``[N]`` or ``[B]`` (one per sequence); ignored without ``csl``
            (but an integer tensor or None: a float tensor here is a bias passed by
            position, as ``F.linear`` takes it, and raises ``TypeError``).
        csl: ``[num_samples]`` float32/float64 buffer, a :class:`csl_fast.CSLTracker`, or
            None to compute the loss only.
        bias: optional ``[V]``.
        count: optional counts buffer for a plain ``csl`` tensor (see ``accumulate``).
        ignore_index, label_smoothing, reduction: as in ``F.cross_entropy``.
        chunk_size: tokens per chunk; default :func:`default_chunk_size`. Peak memory
            above the inputs is about ``chunk_size * V`` logits-dtype elements (each
            chunk's gradient overwrites its logits; twice that with the reference backend)
            plus the gradients (and the float32 weight-gradient accumulator, see below).
        accum_dtype: dtype of the ``grad_weight`` / ``grad_bias`` accumulators summed over
            chunks. Default float32, float64 for float64 ``hidden`` (PyTorch's own bf16
            matmul accumulates all tokens in float32 and rounds once; so does this).
            ``weight.dtype`` saves ``4 V H`` bytes of peak memory at bf16 precision loss
            growing with the number of chunks; a float16 one holds ``reduction='sum'``'s
            unscaled sum (the upstream gradient is not known in the forward), which is
            inf past 65504 (``'mean'`` adds each chunk scaled by ``1 / n``, as eager
            PyTorch does).
        backend: fused cross-entropy backend per chunk (``"auto"``: C++ on the CPU,
            Triton then CUDA on a GPU; ``"reference"``: PyTorch).
        deterministic, validate: as in :func:`csl_fast.accumulate`. The gradient
            accumulation over chunks is sequential, hence deterministic.
        softcap, z_loss_scale, return_z_loss, return_token_accuracy: a language-model
            head's extras, as in :func:`csl_fast.accumulate`
            (:mod:`csl_fast.cross_entropy_extras`): the loss of
            ``softcap * tanh(logits / softcap)`` computed per chunk inside the kernel, plus
            ``z_loss_scale * logsumexp^2`` per supervised token ('mean': over their
            number); with a ``return_*`` flag a :class:`csl_fast.CrossEntropyOutput`.
            CSL records the plain loss of the soft-capped logits.

    Double backward is not supported (the gradients are formed in the forward pass), nor
    are torch.func transforms or forward-mode AD (an error says what to use).
    """
    if csl is not None:  # (without, a plain fused loss: nothing for a trace to lose)
        refuse_tracing("csl_fast.linear_cross_entropy")
    extras = cross_entropy_extras.check(
        "linear_cross_entropy", softcap, z_loss_scale, return_z_loss, return_token_accuracy
    )
    loss_dtype = None  # hidden's dtype, or float32 under autocast
    # (_any_autocast() first, as accumulate does: is_autocast_enabled("meta") raised
    # torch's "unknown device type for autocast" before meta hidden states were checked)
    if (
        _any_autocast()
        and isinstance(hidden, torch.Tensor)
        and torch.is_autocast_enabled(hidden.device.type)
    ):
        # As autocast runs F.cross_entropy(F.linear(hidden, weight, bias)): the matmul's
        # float inputs in autocast's dtype (a float32 head weight included), the loss in
        # float32 (the fused ops have no autocast rule of their own).
        low = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight, bias = (
            t.to(low) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_CAST else t
            for t in (hidden, weight, bias)
        )
        if hidden.dtype in (torch.float16, torch.bfloat16):  # (float64 stays float64)
            loss_dtype = torch.float32
    cap, zs = (0.0, 0.0) if extras is None else (extras.softcap, extras.z_loss_scale)
    if ops.transformed():
        raise RuntimeError(
            "csl_fast.linear_cross_entropy does not support torch.func transforms (grad, vmap, "
            "jvp) or forward-mode AD: its chunked gradient has no batching or tangent rule. "
            "Use csl_fast.accumulate(F.linear(hidden, weight, bias), target, index, csl), "
            "which computes the loss with F.cross_entropy under them"
        )
    for name, arg in (("hidden", hidden), ("weight", weight)):
        if not isinstance(arg, torch.Tensor):
            # (a NumPy weight read "weight must be [V, H] ..., got (4, 6)": its shape was
            # right, its type was not)
            raise TypeError(
                f"csl_fast.linear_cross_entropy: {name} must be a torch.Tensor, got "
                f"{type(arg).__name__}; pass torch.as_tensor({name})"
            )
    if not 2 <= hidden.dim() <= 3:
        # (a [T, B, 1, H] hidden passed the [B, T] target's count check and credited its
        # tokens to the wrong sequences)
        raise ValueError(
            "csl_fast.linear_cross_entropy: hidden must be [N, H] or [B, T, H], got "
            f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__}"
        )
    if hidden.dtype not in _DTYPES:
        raise TypeError(
            f"csl_fast.linear_cross_entropy: hidden must be a float tensor, got {hidden.dtype}"
        )
    size_h = hidden.shape[-1]
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != size_h:
        raise ValueError(
            f"csl_fast.linear_cross_entropy: weight must be [V, H] with H = {size_h} (the "
            f"last dimension of hidden), got {getattr(weight, 'shape', type(weight).__name__)}"
        )
    vocab = weight.shape[0]
    if bias is not None and (
        not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != vocab
    ):
        got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
        raise ValueError(f"csl_fast.linear_cross_entropy: bias must be [V] = [{vocab}], got {got}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.dtype != hidden.dtype or t.device != hidden.device:
            raise TypeError(
                f"csl_fast.linear_cross_entropy: {name} must have hidden's dtype and device "
                f"({hidden.dtype}, {hidden.device}), got ({t.dtype}, {t.device})"
            )
    if not isinstance(target, torch.Tensor):
        raise TypeError("csl_fast.linear_cross_entropy: target must be a tensor")
    if target.dtype is torch.uint8:
        # F.cross_entropy and accumulate take uint8 token ids; the chunk kernels read
        # int32/int64.
        target = target.long()
    seq: tuple[int, int] | None = None
    if target.dim() == 2:
        # always sequences, whatever T: a [B, 1] target with [B*1, H] hidden was read as
        # rows (a suggested-label vote each) and with [B, 1, H] hidden as sequences (none)
        seq = (int(target.shape[0]), int(target.shape[1]))
        if target.numel() != math.prod(hidden.shape[:-1]) or (
            hidden.dim() == 3 and tuple(hidden.shape[:2]) != seq
        ):
            raise ValueError(
                f"csl_fast.linear_cross_entropy: hidden of shape {tuple(hidden.shape)} does not "
                f"match the [B, T] = {seq} target; pass hidden [B, T, H] or [B*T, H]"
            )
    elif hidden.dim() != 2 and not (
        # a row per token, as F.cross_entropy(logits.reshape(-1, V), target.reshape(-1))
        # and accumulate read a flat target
        target.dim() == 1 and target.numel() == math.prod(hidden.shape[:-1])
    ):
        raise ValueError(
            f"csl_fast.linear_cross_entropy: hidden of shape {tuple(hidden.shape)} needs a "
            f"[B, T] target (sequences) or a [B*T] one (a row per token), got target of "
            f"shape {tuple(target.shape)}"
        )
    ignore_index, chunk_size = _int_args(ignore_index, chunk_size)
    if accum_dtype is not None and (
        not isinstance(accum_dtype, torch.dtype) or not accum_dtype.is_floating_point
    ):
        raise TypeError(
            "csl_fast.linear_cross_entropy: accum_dtype must be a floating-point torch.dtype "
            f"(torch.float32, the default, or weight.dtype), got {accum_dtype!r}"
        )
    # Not reshape(-1, H): with H = 0 (F.linear takes it: the logits are the bias) -1 is
    # ambiguous.
    h2 = hidden.reshape(math.prod(hidden.shape[:-1]), size_h)
    t1 = widen_for_ignore_index(target.reshape(-1), ignore_index)
    if (
        csl is None  # (with csl the shared checks name it)
        and index is not None
        and not (isinstance(index, torch.Tensor) and integer_labels(index.dtype))
    ):
        # linear_cross_entropy(h, W, y, b), as F.linear(x, W, b) is called, put the bias
        # here: the loss came out without it, silently
        got = index.dtype if isinstance(index, torch.Tensor) else type(index).__name__
        raise TypeError(
            "csl_fast.linear_cross_entropy: index (the 4th argument) must be an integer "
            f"tensor of dataset indices, got {got}; pass the bias as bias=b"
        )
    record = csl is not None
    if record:
        buffers = _buffers(csl, count, seq, classes=vocab, op="linear_cross_entropy")
        if seq is None:
            refuse_rows_into_sequences(
                "csl_fast.linear_cross_entropy", csl, "with a [B, 1] target (one per sequence)"
            )
        if index is None:
            raise ValueError(
                "csl_fast.linear_cross_entropy: recording into csl needs index (dataset indices)"
            )
        idx_check = index
    else:
        buffers = (torch.zeros(0, device=hidden.device), None)
        idx_check = torch.zeros(seq[0] if seq else t1.shape[0], dtype=torch.int64, device=h2.device)
    label_smoothing = smoothing(label_smoothing, "linear_cross_entropy")
    # Shape, dtype and device checks of target/index/buffers, shared with accumulate.
    _check_args(
        h2[:, :0],
        t1,
        idx_check,
        buffers,
        None,
        label_smoothing,
        reduction,
        seq,
        op="linear_cross_entropy",
    )
    name = resolve_backend(backend, hidden.device, hidden.dtype)
    check_flags("csl_fast.linear_cross_entropy", deterministic=deterministic, validate=validate)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    if validate is None:
        validate = validate_by_default(hidden.device, name)
    if validate:
        _check_values(
            t1 if seq is None else t1.view(seq),
            idx_check,
            vocab,
            buffers[0].numel() if record else 1,
            ignore_index,
            "linear_cross_entropy",
            tracker=isinstance(csl, CSLTracker),
        )
    if chunk_size is None:
        chunk_size = default_chunk_size(h2.shape[0], size_h, vocab)
    if int(chunk_size) < 1:
        raise ValueError(
            f"csl_fast.linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}"
        )
    acc = accum_dtype or (torch.float64 if hidden.dtype == torch.float64 else torch.float32)
    if not torch.is_grad_enabled():
        # apply() reports needs_input_grad from requires_grad whatever the grad mode: an
        # eval pass of a training model under no_grad formed every parameter gradient
        # (twice the time, and a [V, H] accumulator).
        h2, weight = h2.detach(), weight.detach()
        bias = None if bias is None else bias.detach()
    loss, stats, z_loss = _LinearCrossEntropy.apply(
        h2,
        weight,
        bias,
        t1,
        int(ignore_index),
        float(label_smoothing),
        REDUCTIONS[reduction],
        int(chunk_size),
        name,
        acc,
        cap,
        zs,
        loss_dtype or hidden.dtype,
        0 if seq is None else seq[1],
    )
    if record:
        record_stats(stats, index, csl, buffers, seq, deterministic, name)
        if seq is None:
            adopt_classes(csl, vocab)
    if extras is not None:
        return cross_entropy_extras.output(
            extras, loss, z_loss, stats, t1, ignore_index, reduction, tuple(target.shape)
        )
    if reduction == "none":
        loss = loss.view(target.shape)
    return loss


_AUTOCAST_CAST = (torch.float32, torch.float16, torch.bfloat16)  # float64 stays, as in autocast


def _int_args(ignore_index: object, chunk_size: object) -> tuple[int, int | None]:
    """``ignore_index`` and ``chunk_size`` as ints; a float, bool or string is refused, not
    truncated (``int(-100.5)`` would ignore the targets -100 that were not meant to be)."""
    out = []
    for name, value in (("ignore_index", ignore_index), ("chunk_size", chunk_size)):
        if value is None and name == "chunk_size":
            out.append(None)
            continue
        try:
            if isinstance(value, bool):
                raise TypeError
            out.append(operator.index(value))  # a 0-d integer tensor or NumPy int too
        except TypeError:
            raise TypeError(
                f"csl_fast.linear_cross_entropy: {name} must be an int, got "
                f"{type(value).__name__} {value!r}"
            ) from None
    return out[0], out[1]


def _supervised(target: torch.Tensor, ignore_index: int, vocab: int) -> torch.Tensor:
    """The mean's denominator: the rows whose target is in ``[0, V)`` and not
    ``ignore_index`` (an unvalidated bad target's row is NaN and left out, as by the fused
    ops; it was counted, and the valid rows' gradients came out too small)."""
    return ((target != ignore_index) & (target >= 0) & (target < vocab)).sum()


def _name_bad_target(target: torch.Tensor, vocab: int, ignore_index: int) -> None:
    """Raise the ``IndexError`` that names an out-of-range target by its position in the
    whole batch: the kernel checked one chunk of rows and named the position in that chunk
    (eagerly and in a compiled graph alike, where the chunk loop is an opaque op)."""
    try:
        no_index = torch.zeros(1, dtype=torch.int64, device=target.device)
        _check_values(target, no_index, vocab, 1, ignore_index, "linear_cross_entropy")
    except IndexError as exc:
        raise exc from None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return h @ weight.t() if bias is None else torch.addmm(bias, h, weight.t())


def weight_grad_path(dtype: torch.dtype, accum_dtype: torch.dtype, device_type: str) -> str:
    """How ``grad_weight`` (``accum_dtype``) takes a chunk's ``dz.T @ h`` (``dtype``) on a
    ``device_type`` device: ``"same dtype"``, ``"out_dtype"`` or ``"upcast"`` (see the
    module doc). ``"out_dtype"`` needs a kernel for ``aten::addmm.dtype_out`` there and
    turns into ``"upcast"`` for good if torch refuses the call."""
    if dtype == accum_dtype:
        return "same dtype"
    key = (device_type, dtype, accum_dtype)
    if key in _REFUSED or device_type.upper() not in ("CUDA", "XPU"):
        return "upcast"
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return "out_dtype" if has("aten::addmm.dtype_out", device_type.upper()) else "upcast"


def accumulation_paths() -> dict[tuple[str, torch.dtype, torch.dtype], str]:
    """``{(device type, input dtype, accumulator dtype): path}`` of every weight-gradient
    accumulation :func:`linear_cross_entropy` has run in this process."""
    return dict(_TAKEN)


_TAKEN: dict[tuple[str, torch.dtype, torch.dtype], str] = {}
_REFUSED: set[tuple[str, torch.dtype, torch.dtype]] = set()


def _add_weight_grad(gw: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """``gw += dz.T @ h`` with ``gw`` possibly wider than the inputs, by
    :func:`weight_grad_path`."""
    key = (gw.device.type, dz.dtype, gw.dtype)
    path = weight_grad_path(dz.dtype, gw.dtype, gw.device.type)
    if path == "out_dtype":
        try:  # fp32 output of a bf16/fp16 GEMM: no rounding of the partial product
            torch.addmm(gw, dz.t(), h, out_dtype=gw.dtype, out=gw)
        except (RuntimeError, TypeError, NotImplementedError) as err:
            _REFUSED.add(key)
            path = weight_grad_path(dz.dtype, gw.dtype, gw.device.type)
            _warn_slow(key, f"torch refused addmm(out_dtype={gw.dtype}): {err}")
        else:
            _TAKEN[key] = path
            return
    if path == "same dtype":
        gw.addmm_(dz.t(), h)
    else:
        if key not in _TAKEN and gw.device.type != "cpu":
            _warn_slow(key, f"this torch has no aten::addmm.dtype_out kernel for {key[0]}")
        gw.addmm_(dz.t().to(gw.dtype), h.to(gw.dtype))
    if not torch.compiler.is_compiling():  # (a traced backward may not write globals)
        _TAKEN[key] = path


def _warn_slow(key: tuple[str, torch.dtype, torch.dtype], why: str) -> None:
    warnings.warn(
        f"csl_fast.linear_cross_entropy: {why}; the {key[2]} weight gradient of {key[1]} "
        f"inputs on {key[0]} is accumulated by upcasting each chunk (a {key[2]} GEMM: exact, "
        "no [V, H] temporary, but slower than a low-precision GEMM unless TF32 is allowed). "
        "accum_dtype=weight.dtype keeps the GEMM in the inputs' dtype at some precision; "
        "python -m csl_fast.info lists the paths taken",
        RuntimeWarning,
        stacklevel=4,
    )
    _TAKEN[key] = "upcast"


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden, weight, bias, target, ignore_index, label_smoothing, red, chunk, name, acc,
        cap, zs, out_dtype, width,
    ):  # fmt: skip
        # 'none' forms no gradient here: its upstream gradient is per token (backward)
        need = [red != 0 and n for n in ctx.needs_input_grad[:3]]
        forward = _loop(_FORWARD_OP, _chunked_forward, name)
        loss, stats, z_loss, gh, gw, gb, w_scale, b_scale = forward(
            hidden, weight, bias, target, ignore_index, label_smoothing, red, chunk, name, acc,
            cap, zs, out_dtype, width, *need,
        )  # fmt: skip
        ctx.mark_non_differentiable(stats, z_loss)
        ctx.red = red
        if red == 0:
            ctx.args = (ignore_index, label_smoothing, chunk, name, acc, cap, zs)
            ctx.upcast = out_dtype != hidden.dtype
            ctx.save_for_backward(hidden, weight, bias, target)
            return loss, stats, z_loss
        half = weight.dtype == torch.float16  # (only a float16 gradient is saved scaled)
        ctx.w_scale = w_scale if half else None
        ctx.b_scale = b_scale if half else None
        ctx.save_for_backward(*(g if n else None for g, n in zip((gh, gw, gb), need, strict=True)))
        return loss, stats, z_loss

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_z_loss):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "csl_fast.linear_cross_entropy: double backward is not supported; use "
                "F.cross_entropy(F.linear(hidden, weight, bias), target) for higher-order "
                "gradients"
            )
        nones = (None,) * 11
        if grad_loss is None:  # the loss did not reach the objective
            return (None, None, None, *nones)
        if ctx.red != 0:
            gh, gw, gb = ctx.saved_tensors
            out = [
                None if g is None else g * _factor(grad_loss, g.dtype, s)
                for g, s in ((gh, None), (gw, ctx.w_scale), (gb, ctx.b_scale))
            ]
            return (*out, *nones)
        hidden, weight, bias, target = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        name = ctx.args[3]
        grads = _loop(_BACKWARD_NONE_OP, _chunked_backward_none, name)(
            hidden, weight, bias, target, grad_loss, *ctx.args, ctx.upcast, *need
        )
        return (*(g if n else None for g, n in zip(grads, need, strict=True)), *nones)


def _chunked_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    red: int,
    chunk: int,
    name: str,
    acc: torch.dtype,
    cap: float,
    zs: float,
    out_dtype: torch.dtype,
    width: int,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """The chunk loop of the forward pass: ``(loss, stats, z_loss, grad_hidden,
    grad_weight, grad_bias, weight_scale, bias_scale)``; ``width`` is ``T`` of a ``[B, T]``
    target flattened into ``target`` (0 for rows), for the message naming a bad one. The
    gradients (for a unit upstream gradient, in the parameters' dtypes; a float16 one
    divided by its scale, see :func:`_narrowed`) are formed where ``need_*`` asks, else
    empty."""
    rows = hidden.shape[0]
    dev = hidden.device
    need = (need_hidden, need_weight, need_bias)
    eager_grads = any(need)
    stats = torch.empty((NUM_STATS, rows), dtype=torch.float32, device=dev)
    losses = hidden.new_empty(rows, dtype=out_dtype) if red == 0 else None
    # float64 inputs keep their loss and scaled hidden gradient in float64 whatever acc
    wide = torch.float64 in (acc, hidden.dtype)
    total = torch.zeros((), dtype=torch.float64 if wide else torch.float32, device=dev)
    # The z-loss term alone, per row or summed like the loss (0 when off).
    z_loss = hidden.new_zeros(rows, dtype=out_dtype) if red == 0 else torch.zeros_like(total)
    gh = gw = gb = scale = None
    n = _supervised(target, ignore_index, weight.shape[0]) if red == 1 else None
    if eager_grads:
        if n is not None:  # mean over supervised tokens; an all-ignored batch gives 0 grads
            scale = 1.0 / n.clamp(min=1).to(total.dtype)
        gh = torch.empty_like(hidden) if need[0] else None
        gw = torch.zeros(weight.shape, dtype=acc, device=dev) if need[1] else None
        gb = torch.zeros(weight.shape[0], dtype=acc, device=dev) if need[2] else None
    upcast = out_dtype != hidden.dtype  # autocast: the loss of float32 logits
    for start in range(0, rows, chunk):
        end = min(start + chunk, rows)
        h = hidden[start:end]
        z = _logits(h, weight, bias)
        if upcast:
            z = z.float()
        # Per-row losses (summed in float32 below) and the per-row gradient for a unit
        # upstream gradient; the mean's 1/n is applied in float32 after the matmuls.
        # In place: the chunk's gradient overwrites its logits (one chunk alive, not two);
        # formed only for the eager gradients (backward recomputes it for 'none').
        try:
            loss_c, dz, st, zl_c = _chunk_fwd(
                z, target[start:end], ignore_index, label_smoothing, name, cap, zs, eager_grads
            )
        except IndexError:
            _name_bad_target(
                target.view(-1, width) if width else target, weight.shape[0], ignore_index
            )
            raise
        del z
        if upcast and dz is not None:
            dz = dz.to(hidden.dtype)  # as autocast's cast hands F.linear its gradient
        stats[:, start:end] = st
        if red == 0:
            losses[start:end] = loss_c
            z_loss[start:end] = zl_c
        else:
            total += loss_c.sum(dtype=total.dtype)
            z_loss += zl_c.sum(dtype=total.dtype)
        if eager_grads:
            if gh is not None:
                if scale is None:
                    torch.mm(dz, weight, out=gh[start:end])
                else:
                    gh[start:end] = torch.mm(dz, weight).to(scale.dtype) * scale
            if scale is not None and acc == torch.float16:
                # a float16 accumulator takes the mean's 1/n chunk by chunk, as eager
                # PyTorch's gradient does: the unscaled sum overflowed 65504
                dz.mul_(scale.to(dz.dtype))
            if gw is not None:
                _add_weight_grad(gw, dz, h)
            if gb is not None:
                gb += dz.sum(0, dtype=acc)
        del dz
    if scale is not None and acc != torch.float16:
        for g in (gw, gb):
            if g is not None:
                g.mul_(scale.to(g.dtype) if g.dtype == torch.float64 else scale)
    saved_w, w_scale = _narrowed(gw, weight.dtype)
    saved_b, b_scale = _narrowed(gb, weight.dtype)
    if red == 0:
        loss = losses
    else:
        if n is not None:
            total = total / n.to(total.dtype)
            z_loss = z_loss / n.to(total.dtype)
        loss = total.to(out_dtype)
        z_loss = z_loss.to(out_dtype)
    empty = hidden.new_empty(0)
    one = torch.ones((), dtype=torch.float32, device=dev)
    return (
        loss,
        stats,
        z_loss,
        empty.clone() if gh is None else gh,
        empty.clone() if saved_w is None else saved_w,
        empty.clone() if saved_b is None else saved_b,
        one if w_scale is None else w_scale,
        one.clone() if b_scale is None else b_scale,
    )


def _fake_forward(
    hidden, weight, bias, target, ignore_index, label_smoothing, red, chunk, name, acc, cap, zs,
    out_dtype, width, need_hidden, need_weight, need_bias,
):  # fmt: skip
    rows = hidden.shape[0]
    loss = hidden.new_empty((rows,) if red == 0 else (), dtype=out_dtype)
    empty = hidden.new_empty(0)
    return (
        loss,
        hidden.new_empty((NUM_STATS, rows), dtype=torch.float32),
        torch.empty_like(loss),
        torch.empty_like(hidden) if need_hidden else empty,
        weight.new_empty(weight.shape) if need_weight else empty.clone(),
        weight.new_empty(weight.shape[0]) if need_bias else empty.clone(),
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty((), dtype=torch.float32),
    )


def _chunked_backward_none(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target: torch.Tensor,
    grad_loss: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    chunk: int,
    name: str,
    acc: torch.dtype,
    cap: float,
    zs: float,
    upcast: bool,
    need_hidden: bool,
    need_weight: bool,
    need_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``reduction='none'``'s gradients ``(hidden, weight, bias)`` for per-token upstream
    gradients ``grad_loss``: each chunk's logits and their gradient recomputed. Those not
    asked for are empty."""
    gh = torch.empty_like(hidden) if need_hidden else None
    gw = torch.zeros(weight.shape, dtype=acc, device=hidden.device) if need_weight else None
    gb = torch.zeros(weight.shape[0], dtype=acc, device=hidden.device) if need_bias else None
    for start in range(0, hidden.shape[0], chunk):
        end = min(start + chunk, hidden.shape[0])
        h = hidden[start:end]
        z = _logits(h, weight, bias)
        if upcast:
            z = z.float()
        _, dz, _, _ = _chunk_fwd(z, target[start:end], ignore_index, label_smoothing, name, cap, zs)
        del z
        # an ignored token keeps its stored row, whatever its upstream gradient (a NaN
        # there made every parameter gradient NaN; F never reads it: ops._per_row)
        dz.mul_(ops._per_row(grad_loss[start:end], 0, target[start:end], ignore_index).to(dz.dtype))
        if upcast:
            dz = dz.to(hidden.dtype)
        if gh is not None:
            torch.mm(dz, weight, out=gh[start:end])
        if gw is not None:
            _add_weight_grad(gw, dz, h)
        if gb is not None:
            gb += dz.sum(0, dtype=acc)
    empty = hidden.new_empty(0)
    wdt = weight.dtype
    return (
        empty.clone() if gh is None else gh,
        empty.clone() if gw is None else gw.to(wdt),
        empty.clone() if gb is None else gb.to(wdt),
    )


def _fake_backward_none(
    hidden, weight, bias, target, grad_loss, ignore_index, label_smoothing, chunk, name, acc,
    cap, zs, upcast, need_hidden, need_weight, need_bias,
):  # fmt: skip
    empty = hidden.new_empty(0)
    return (
        torch.empty_like(hidden) if need_hidden else empty,
        weight.new_empty(weight.shape) if need_weight else empty.clone(),
        weight.new_empty(weight.shape[0]) if need_bias else empty.clone(),
    )


# While tracing, each chunk loop is one opaque op, so a compiled graph does not unroll it:
# one graph then serves every number of tokens under dynamic shapes (the unrolled loop made
# each its own graph, past recompile_limit an error with fullgraph=True). Eagerly the same
# function runs directly: the op's dispatch cost about 0.1 ms a call. The reference backend
# stays Python: its gradient comes from torch.autograd.grad, which needs autograd inside.
_FORWARD_OP = torch.library.custom_op(
    "csl_fast::linear_cross_entropy_forward", _chunked_forward, mutates_args=()
)
_FORWARD_OP.register_fake(one_device("csl_fast::linear_cross_entropy_forward", _fake_forward))
_BACKWARD_NONE_OP = torch.library.custom_op(
    "csl_fast::linear_cross_entropy_backward_none", _chunked_backward_none, mutates_args=()
)
_BACKWARD_NONE_OP.register_fake(
    one_device("csl_fast::linear_cross_entropy_backward_none", _fake_backward_none)
)


def _loop(op: Any, fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """The opaque ``op`` while tracing, else its function ``fn`` (see above)."""
    return op if torch.compiler.is_compiling() and name != "reference" else fn


def _narrowed(
    g: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """An accumulated parameter gradient in its parameter's ``dtype``, kept until the
    backward scales it by the upstream gradient; for float16, divided first by a power of
    two (returned, a 0-d float32 tensor, else None) that brings its largest entry within
    range: a summed float16 gradient past 65504 was saved as inf, where eager PyTorch,
    scaling before it rounds, gives finite gradients after a later division by the count.
    A new tensor while tracing (``.to`` of one already in ``dtype`` returns it, and a saved
    tensor made and mutated in place in here must be one of its own)."""
    if g is None:
        return None, None
    if dtype != torch.float16:
        return g.to(dtype, copy=torch.compiler.is_compiling()), None
    big = g.abs().amax() if g.numel() else g.new_zeros(())
    scale = torch.exp2(torch.ceil(torch.log2(big.float() / 2**15)).clamp(min=0))
    scale = torch.where(scale.isfinite(), scale, 1.0)  # a NaN or inf entry stays itself
    return (g / scale.to(g.dtype)).to(dtype), scale


def _factor(grad_loss: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None):
    """The 0-d upstream gradient (times a saved gradient's scale) in the precision a
    ``dtype`` tensor is multiplied in: float32 for 16-bit ones (a 0-d float32 factor keeps
    the product in ``dtype``, rounded once), so the factor is not rounded to 16 bits."""
    f = grad_loss.to(torch.promote_types(dtype, torch.float32))
    return f if scale is None else f * scale.to(f.dtype)


def _chunk_fwd(z, target, ignore_index, label_smoothing, name, cap, zs, grad=True):
    """A chunk's per-row ``(loss, dz, stats, z_loss)``, ``dz`` written over ``z``; the
    extras' op only when they change the loss. ``grad=False`` (a fused backend): ``dz`` is
    None, not formed (the ops that form no gradient)."""
    if not grad and name != "reference":
        args = (z, target, None, ignore_index, label_smoothing, 0)
        if cap or zs:
            loss, st, zl = ops._op(name, ops_extras._EXTRA_STATS_OPS)(*args, cap, zs)
            return loss, None, st, zl
        loss, st = ops._op(name, ops._FWD_STATS_OPS)(*args)
        return loss, None, st, torch.zeros((), dtype=loss.dtype, device=loss.device)
    if cap or zs:
        return ops_extras.cross_entropy_fwd_extra_with_grad(
            z, target, ignore_index, label_smoothing, 0, cap, zs, name, inplace=True
        )
    loss, dz, stats = ops.cross_entropy_fwd_with_grad(
        z, target, None, ignore_index, label_smoothing, 0, name, inplace=True
    )
    return loss, dz, stats, torch.zeros((), dtype=loss.dtype, device=loss.device)
