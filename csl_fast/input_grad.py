r"""Per-sample input-gradient norms :math:`\|\partial\ell_i/\partial x_i\|^2`, batched.

When no layer couples the samples of a batch, row ``i`` of ``x.grad`` is the gradient of
sample ``i``'s own loss with respect to its input, times the loss reduction's factor
(``reduction='mean'`` divides every row by the batch count). So one backward pass gives
every sample's input-gradient norm: a per-row reduction of ``x.grad`` (one fused kernel,
``csl_fast.ops.input_grad_norms``) and a scatter into the tracker's dataset-sized buffers.

.. warning::
    Layers that couple samples break the identity: **BatchNorm in train mode** (each
    sample's output depends on the batch statistics, so row ``i`` of ``x.grad`` mixes in the
    other samples' losses), in-batch negatives / contrastive losses, batch-level mixup or
    cutmix. The recorded values are then the rows of the batch gradient, not per-sample
    gradients. Use GroupNorm/LayerNorm, BatchNorm in eval mode, or a per-sample method
    (``torch.func.vmap(grad)``) when exact per-sample values matter.
"""

from __future__ import annotations

import itertools
import math
import numbers
import warnings
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from . import backward_rerun
from .accumulate_checks import refuse_tracing
from .user_frame import user_stacklevel

if TYPE_CHECKING:
    from .tracker import CSLTracker

# Per tracker, the tensor watched last whose gradient has not arrived yet. Weak on both
# sides: a tracker stays picklable, and a tensor watched in a forward that was never
# backpropagated (an evaluation with grad on) is forgotten when it is freed.
_pending: weakref.WeakKeyDictionary[Any, weakref.ref[torch.Tensor]] = weakref.WeakKeyDictionary()
# Trackers warned by warn_if_default_scale (once each).
_warned_scale: weakref.WeakSet[Any] = weakref.WeakSet()
# Per tracker, its watched tensors by step (_Watches); a serial number per watch.
_watches: weakref.WeakKeyDictionary[Any, _Watches] = weakref.WeakKeyDictionary()
_serials = itertools.count()


def input_grad_norms(
    grad: torch.Tensor,
    index: torch.Tensor,
    tracker: CSLTracker,
    scale: float | torch.Tensor = 1.0,
    *,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Reduce a batch gradient to per-sample squared norms and record them in ``tracker``.

    Computes :math:`s_i = \|\mathrm{scale}\cdot \mathrm{grad}_i\|_2^2` over all dimensions
    but the first (float32, one fused pass over ``grad``) and adds it at ``index`` into the
    tracker's input-gradient buffers (``input_grad_sq_sum``, ``input_grad_norm_sum``,
    ``input_grad_count`` and the current epoch's accumulators, see
    :meth:`CSLTracker.record_input_grad`).

    Args:
        grad: ``[B, ...]`` gradient of the batch loss with respect to the model input
            (float16/bfloat16/float32/float64), on any device: the norms are computed
            there and the ``[B]`` result moved to the tracker's device.
        index: ``[B]`` dataset indices.
        tracker: the :class:`csl_fast.CSLTracker` to record into.
        scale: the factor that turns a row of ``grad`` into the gradient of that sample's
            own loss: ``B`` for ``reduction='mean'`` over ``B`` rows, ``1`` for
            ``reduction='sum'``, the number of non-ignored rows for ``'mean'`` with
            ``ignore_index``, their summed class weight for ``'mean'`` with ``weight=``
            (``weight[target[valid]].sum()``; may be a 0-dim tensor, so no host sync is
            needed).
        valid: optional ``[B]`` bool, False for rows not to record (e.g. ignored targets,
            whose gradient is zero).

    Returns:
        float32 ``[B]`` (also for float64 ``grad``: a float64 tracker stores them rounded
        to float32; squares under ~1e-38 lose digits, under ~1e-45 are 0): every row's
        squared norm, scaled; those of rows that ``valid``
        excludes (or that are not finite) are returned but not recorded. Duplicate
        indices add up in the tracker. Detached on every backend, also for a ``grad`` made
        with ``create_graph=True``: not differentiable (for a gradient penalty, compute
        ``(scale * grad).flatten(1).square().sum(1)`` yourself). See the module docstring
        for the BatchNorm caveat.
    """
    refuse_tracing("csl_fast.input_grad_norms")
    if not isinstance(grad, torch.Tensor) or grad.dim() < 1:
        raise ValueError("csl_fast.input_grad_norms: grad must be a [B, ...] tensor")
    if not grad.is_floating_point():
        raise TypeError(f"csl_fast.input_grad_norms: grad must be floating point, got {grad.dtype}")
    _check_tracker(tracker, "input_grad_norms")
    _check_scale(scale, "input_grad_norms")
    return _record(grad, index, tracker, _host_scale(scale), valid, validate=None)


def _host_scale(scale: float | torch.Tensor) -> float | torch.Tensor:
    """A CPU scale read to a float, at no cost: the kernel scales before it squares, as for
    a float (squared unscaled, float32 rows of 3e-23 underflowed: 56% off at a scale of
    1000). One on a GPU is not read, which would wait for the device."""
    if isinstance(scale, torch.Tensor) and scale.device.type == "cpu":
        return float(scale.detach())  # (a scale that requires grad: no warning)
    return scale


def _record(
    grad: torch.Tensor,
    index: torch.Tensor,
    tracker: CSLTracker,
    scale: float | torch.Tensor,
    valid: torch.Tensor | None,
    validate: bool | None,
) -> torch.Tensor:
    """:func:`input_grad_norms` past its argument checks (``watch`` made them once, before
    the forward: its hook runs this on every backward)."""
    from . import ops

    if isinstance(scale, torch.Tensor):
        sq = ops.input_grad_norms(grad, 1.0, backend=tracker.backend)
        sq = sq * scale.detach().to(sq.device, torch.float32).square()
    else:
        sq = ops.input_grad_norms(grad, float(scale), backend=tracker.backend)
    # A CPU batch that the model moves to the GPU (model(x.cuda())) has its gradient on the
    # CPU: B norms cross, not the gradient.
    tracker.record_input_grad(index, sq.to(tracker.device), valid, validate=validate)
    return sq


def _check_tracker(tracker: object, fn: str) -> None:
    # Checked before anything runs: from watch, a wrong object would fail only in the hook,
    # during backward, after the batch's loss was recorded.
    if not callable(getattr(tracker, "record_input_grad", None)):
        raise TypeError(
            f"csl_fast.{fn}: tracker must be a csl_fast.CSLTracker (its input-gradient "
            f"buffers take the norms), got {type(tracker).__name__}"
        )


def _check_scale(scale: float | torch.Tensor, fn: str) -> None:
    # A tensor of several elements would broadcast against the [B] norms and scale each row
    # differently; a non-finite float would make every norm non-finite, which is not recorded.
    if not isinstance(scale, (torch.Tensor, numbers.Real)) or isinstance(scale, bool):
        raise TypeError(
            f"csl_fast.{fn}: the scale must be a number or a one-element tensor (e.g. "
            f"(target != ignore_index).sum()), got {type(scale).__name__}"
        )
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(
                f"csl_fast.{fn}: the scale must be a number or a one-element tensor (e.g. "
                f"(target != ignore_index).sum()), got a tensor of shape {tuple(scale.shape)}"
            )
        if scale.device.type == "cpu" and not bool(torch.isfinite(scale).all()):
            # every row was then dropped as non-finite, silently (a GPU scale is not read:
            # that would wait for the device)
            raise ValueError(f"csl_fast.{fn}: the scale must be finite, got {scale.item()!r}")
    elif not math.isfinite(scale):
        raise ValueError(f"csl_fast.{fn}: the scale must be a finite number, got {scale!r}")


def watch(
    x: torch.Tensor,
    index: torch.Tensor,
    tracker: CSLTracker,
    reduction_scale: float | torch.Tensor | None = None,
    *,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Record per-sample input-gradient norms of ``x`` when the loss is backpropagated.

    Registers a tensor hook on ``x`` that calls :func:`input_grad_norms` with ``x``'s
    gradient. ``x`` must be floating point and not an ``nn.Parameter``; a leaf that does
    not require grad (a batch straight from the DataLoader) is switched to
    ``requires_grad_(True)``, and stays so: one tensor watched across steps (full-batch
    training on ``X``) keeps recording, and keeps the flag and a ``.grad`` that every
    backward adds to. Watch a view, ``X[:]``, to leave ``X`` itself as it was (its
    gradient then accumulates nowhere). Returns ``x`` itself, so
    ``x = tracker.watch(x, idx)`` reads naturally.

    ``reduction_scale`` undoes the loss reduction (see :func:`input_grad_norms`): the
    default ``None`` means ``reduction='mean'`` over all ``B = x.shape[0]`` rows, i.e.
    ``scale = B``. Pass ``1.0`` for ``reduction='sum'``, and for ``'mean'`` with
    ``ignore_index`` pass ``(target != ignore_index).sum()`` and
    ``valid=target != ignore_index`` (``valid`` without ``reduction_scale`` warns: the
    default ``B`` is then almost always wrong). With label smoothing the recorded gradient is that
    of the smoothed loss. With class weights and ``'mean'``, ``F.cross_entropy`` divides by
    the summed weight of the batch's valid targets, not by their number: pass
    ``reduction_scale=weight[target[valid]].sum()``, and sample :math:`i` records
    :math:`w_{y_i}^2 \|\partial\ell_i/\partial x_i\|^2`, the gradient of its own weighted
    loss (the default ``B`` would make it depend on the other samples' classes).

    Sequences (``[B, V, T]`` logits, or ``[B*T, V]`` with one index per sequence): ``'mean'``
    averages over the batch's non-ignored tokens and a sequence's own loss is the sum of its
    tokens' (what its CSL adds up), so pass ``reduction_scale=(target != ignore_index).sum()``
    and ``valid=target != ignore_index``, a ``[B, T]`` mask (a sequence is recorded if any of
    its tokens is). A ``valid`` of the target's shape is reduced so for any ``[B, ...]``.
    Likewise :func:`csl_fast.accumulate_bce` over ``L`` labels: its ``'mean'`` divides by
    ``B*L``, so pass ``reduction_scale=B * L`` (a sample's own loss sums its labels').
    Both warn once when watched at the default scale.

    Whatever multiplies the loss between its reduction and ``backward`` multiplies ``x``'s
    gradient too and must be undone here as well: gradient accumulation that divides each
    micro-batch's loss by ``k`` (Lightning's ``accumulate_grad_batches``) and AMP's
    ``GradScaler`` (``scaler.scale(loss).backward()``) need
    ``reduction_scale=B * k / scaler.get_scale()`` (``get_scale`` reads the scale to the
    host: one synchronisation per step; the scale changes only in ``scaler.update()``).
    Left out, the recorded squared norms are ``(scale / k)**2`` times the true ones (the
    norms ``scale / k`` times).

    The hook fires once per backward pass through ``x`` (twice if you backpropagate twice
    with ``retain_graph=True``, and in ``torch.autograd.grad`` calls through ``x`` too); it
    does not fire under ``torch.no_grad``. Watching the same tensor again with the same
    tracker replaces the earlier watch. Watch one tensor per step: each watched tensor's
    norms are recorded as a presentation of their own, so watching two (a model's two
    inputs, or its input and a hidden layer) counts each sample twice per step and averages
    the two norms instead of taking the joint gradient's (warned the first time); watch
    the concatenated inputs, split inside the model, or the embedding output. Inputs must
    stay per-sample down the network: BatchNorm in train mode couples samples (see the
    module docstring).
    """
    refuse_tracing("csl_fast.input_grad.watch", exports=False)
    if torch.compiler.is_exporting():
        # (the hook is not part of the exported graph: the program would record nothing)
        raise RuntimeError(
            "csl_fast.input_grad.watch cannot run under torch.export: the exported program "
            "keeps no tensor hook, so it would record no input-gradient norm. Call watch "
            "outside the exported module (on its input, before calling it), or compile the "
            "step with torch.compile, which keeps the hook"
        )
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        hint = ""
        if isinstance(x, torch.Tensor) and not x.is_complex():  # tokens, class ids, pixels
            hint = (
                "; integer inputs have no gradient: watch the first floating-point tensor "
                "made from them, e.g. x = tracker.watch(model.embed(tokens), idx)"
            )
        raise TypeError(f"csl_fast.watch: x must be a floating-point tensor, got {got}{hint}")
    if isinstance(x, torch.nn.Parameter):
        # its rows are a weight's, not samples': with a first dimension that happened to
        # be B, watch recorded rows of the weight gradient as the samples' norms
        raise TypeError(
            "csl_fast.watch: x is an nn.Parameter, whose gradient is a weight's, not the "
            "batch's; watch the input, or the first floating-point tensor the model makes "
            "from it, e.g. x = tracker.watch(model.embed(tokens), idx)"
        )
    # (functorch's levels alone: a forward-AD dual_level is no transform of the backward)
    if not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None:
        _check_transform(x)
    # Checked here, not in the hook: an error raised during backward comes after the
    # loss was already recorded, leaving the batch half in the tracker.
    if not isinstance(index, torch.Tensor) or index.dim() != 1:
        got = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(
            f"csl_fast.watch: index must be a 1-D tensor of dataset indices, got {got}"
        )
    if index.is_floating_point() or index.is_complex() or index.dtype == torch.bool:
        raise TypeError(
            f"csl_fast.watch: index must hold integer dataset indices, got {index.dtype}"
        )
    if x.dim() < 1 or x.shape[0] != index.shape[0]:
        raise ValueError(
            f"csl_fast.watch: x has shape {tuple(x.shape)} but index has {index.shape[0]} entries; "
            "the first dimension of x must be the batch"
        )
    if valid is not None and (
        not isinstance(valid, torch.Tensor) or valid.dim() < 1 or valid.shape[0] != index.shape[0]
    ):
        got = tuple(valid.shape) if isinstance(valid, torch.Tensor) else type(valid).__name__
        raise ValueError(
            f"csl_fast.watch: valid must be a [B = {index.shape[0]}] bool tensor (or of the "
            f"target's shape [B, ...], e.g. target != ignore_index), got {got}"
        )
    if valid is not None and valid.dtype != torch.bool:
        # (cast to bool, valid=target dropped every class-0 row without a word)
        raise TypeError(
            f"csl_fast.watch: valid must be a bool tensor, got {valid.dtype}; pass a mask "
            "such as target != ignore_index"
        )
    if valid is not None and valid.dim() > 1:  # a sequence counts if any of its tokens does
        valid = valid.flatten(1).any(1)
    _check_tracker(tracker, "watch")
    checked = index.device.type == "cpu" and not torch.compiler.is_compiling()
    if checked:
        # here, where reading it costs no device sync: from the hook an IndexError came
        # out of loss.backward()
        from .accumulate_checks import _check_values, signed_index

        # (int64 first: comparisons of uint16/32/64 are not implemented on the CPU)
        signed = signed_index(index, "watch", tracker.num_samples)
        _check_values(None, signed, 0, tracker.num_samples, 0, "watch", tracker=True)
    if reduction_scale is not None:
        _check_scale(reduction_scale, "watch")
    elif valid is not None:
        # rows left out by valid (ignore_index) are left out of the loss's mean too: its
        # divisor is then their count, not B, and every recorded norm was off by B / count
        warnings.warn(
            "csl_fast.watch: valid is given without reduction_scale, which then defaults "
            "to the batch size B; a 'mean' loss with ignore_index divides by the valid rows "
            "(or tokens) instead: pass reduction_scale=(target != ignore_index).sum(), or "
            "reduction_scale=float(x.shape[0]) if B is the divisor",
            stacklevel=user_stacklevel(),
        )
    if not x.requires_grad:
        x.requires_grad_(True)
    scale = float(x.shape[0]) if reduction_scale is None else _host_scale(reduction_scale)
    if reduction_scale is None and not getattr(tracker, "_watched_at_default_scale", False):
        tracker._watched_at_default_scale = True  # (CSLTracker: read by CSLCallback)
    tracker._last_watch_default = reduction_scale is None  # (read by warn_if_default_scale)
    from .accumulate_checks import copy_to

    # (the int64 indices checked above: the tracker's record need not convert them again)
    index = copy_to(signed if checked else index, tracker.device)

    def hook(grad: torch.Tensor) -> None:
        _record(grad, index, tracker, scale, valid, validate=False if checked else None)

    _register_eagerly(x, tracker, hook, index)
    return x


def _check_transform(x: torch.Tensor) -> None:
    """Inside a torch.func transform, watch's hook sees the gradient of a tensor the
    transform differentiates, ``grad(f)(x)`` with ``watch(x, index)`` in ``f``, and nothing
    else: PyTorch refused requires_grad_() on another tensor, and vmap the reading of
    its rows, with messages about functorch."""
    from torch._C._functorch import TransformType
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

    batched = any(i.key() == TransformType.Vmap for i in retrieve_all_functorch_interpreters())
    if batched or not x.requires_grad:
        why = (
            "under vmap, whose rows are not the batch's"
            if batched
            else "on a tensor the transform does not differentiate"
        )
        raise RuntimeError(
            f"csl_fast.watch: called inside a torch.func transform {why}; watch there only "
            "the argument grad() differentiates, or compute the per-sample input gradients "
            "with torch.func and pass their squared norms to tracker.record_input_grad"
        )


_eager_register: Callable[[torch.Tensor, CSLTracker, Any, torch.Tensor], None] | None = None


def _register_eagerly(x: torch.Tensor, tracker: CSLTracker, hook: Any, index: torch.Tensor) -> None:
    """:func:`_register` under ``torch.compiler.disable``, made at the first watch: as a
    decorator it imported ``torch._dynamo`` with csl_fast, 2 of the 4 s that ``import
    csl_fast`` (and with it every ``csl-fast`` command) took."""
    global _eager_register
    if _eager_register is None:
        _eager_register = torch.compiler.disable(_register)
    _eager_register(x, tracker, hook, index)


def _register(x: torch.Tensor, tracker: CSLTracker, hook: Any, index: torch.Tensor) -> None:
    """Put ``hook`` on ``x`` for ``tracker``, in eager mode (torch.compile cannot trace
    the per-tensor registry: a step that watches graph-breaks here), unless ``x`` is the
    detached input of a region rerun in the backward.

    Reentrant checkpointing reruns the region on a detached copy of its input, whose
    gradient then reaches the input watched in the forward: one hook is enough. (An
    intermediate made in the rerun is not a leaf and is watched: its forward ran without
    grad, so its first hook never fires.) Tested here, where every call runs eagerly, so
    that a compiled region rerun by an eager checkpoint is told too.

    Watching the same tensor again (full-batch training on one fixed tensor) replaces this
    tracker's earlier hook: hooks stay on a tensor, so each epoch would add one more and
    every backward would record the norms once per epoch so far."""
    if x.is_leaf and backward_rerun.in_backward():
        return
    state = _watches.setdefault(tracker, _Watches())
    if torch.is_grad_enabled() and not backward_rerun.in_backward():
        # (under no_grad no backward follows; a rerun in the backward is no new step)
        _pending[tracker] = weakref.ref(x)
        state.open_step()
    serial, window = next(_serials), state.window
    hooks = x.__dict__.setdefault("_csl_watch_hooks", {})
    if id(tracker) in hooks:  # the hook holds the tracker: its id is not reused meanwhile
        hooks[id(tracker)].remove()

    # (no reference to x in here: a non-leaf's hook is held by its autograd node, out of
    # the garbage collector's sight, and held x for good: a leak of one tensor a step)
    def recorded(grad: torch.Tensor) -> None:
        _pending.pop(tracker, None)
        state.arrived(tracker, serial, window, index)
        hook(grad)

    hooks[id(tracker)] = x.register_hook(recorded)


def warn_if_default_scale(tracker: CSLTracker, op: str, divisor: str, fix: str) -> None:
    """Warn (once per tracker) where ``op``'s ``'mean'`` divides by ``divisor``, not by the
    ``B`` that :func:`watch` assumed at its default scale for the tensor it watched in
    this step: the recorded squared norms come out ``(divisor / B)**2`` too small."""
    if not getattr(tracker, "_last_watch_default", False) or tracker in _warned_scale:
        return
    pending = _pending.get(tracker)
    if pending is None or pending() is None:
        return
    _warned_scale.add(tracker)
    warnings.warn(
        f"csl_fast.{op}: reduction='mean' divides by {divisor}, but the tensor watched in this "
        "step was watched at the default reduction_scale, the batch size B: its recorded "
        "input-gradient norms come out (that divisor / B)**2 too small, unless the loss is "
        f"multiplied back before backward. Pass {fix}",
        RuntimeWarning,
        stacklevel=user_stacklevel(),
    )


class _Watches:
    """A tracker's watched tensors, by step, to tell two tensors watched in one step.

    Each watched tensor's hook records its own squared norms as one presentation: two
    tensors watched in one step (the two inputs of a model, or its input and a hidden
    layer) record two presentations of every sample, each with part of its gradient. The
    input_grad_count then doubles, input_grad_sq_mean is about half the joint squared norm
    and loss_sensitivity averages the tensors' norms, which reorders the samples.

    A step (``window``) is the watches made before the first of their gradients arrives:
    two gradients of one window, of tensors whose indices overlap, are a second tensor
    watched. Told when the second gradient arrives: told at watch time, a tensor whose
    backward was skipped (a non-finite loss) and never came was a false second, and the
    warning (given once) was then spent; micro-batches of distinct samples summed into one
    backward are no second either."""

    def __init__(self) -> None:
        self.window = 0
        self.fired = False  # a gradient arrived since the window's last watch
        self.seen: list[tuple[int, torch.Tensor]] = []  # (serial, index) arrived this window

    def open_step(self) -> None:
        """A watch in the forward: after a gradient arrived, a new step."""
        if self.fired:
            self.window, self.fired, self.seen = self.window + 1, False, []

    def arrived(self, tracker: Any, serial: int, window: int, index: torch.Tensor) -> None:
        self.fired = True
        if window != self.window:  # (a late gradient of an earlier step)
            return
        second = any(s != serial and bool(torch.isin(index, seen).any()) for s, seen in self.seen)
        self.seen.append((serial, index))
        if not second or getattr(tracker, "_warned_several_watched", True):
            return
        tracker._warned_several_watched = True  # (CSLTracker: once per tracker)
        warnings.warn(
            "csl_fast.watch: the gradients of two tensors watched in one step arrived, for "
            "the same samples: each watched tensor is recorded as a presentation of its "
            "own (input_grad_count counts both, input_grad_sq_mean and loss_sensitivity average "
            "their norms instead of taking the joint gradient's). Watch one tensor per step, "
            "e.g. the concatenated inputs (x = tracker.watch(torch.cat([x1, x2], 1), idx), "
            "split inside the model) or the embedding output, not the input and a hidden layer",
            stacklevel=user_stacklevel(),
        )
