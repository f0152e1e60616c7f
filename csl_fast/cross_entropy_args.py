"""How :func:`csl_fast.accumulate` reads its logits and targets: every layout that
``F.cross_entropy`` accepts, mapped onto rows of classes and the samples they belong to.

``F.cross_entropy(input, target)`` takes

- ``[B, C]`` input with ``[B]`` class indices (one row per sample, the fast path);
- ``[N, C, d1, ..., dk]`` input with ``[N, d1, ..., dk]`` class indices (segmentation, or
  ``logits.transpose(1, 2)`` for a language model): classes in dimension 1;
- unbatched ``[C]`` input with a 0-d class index;
- class probabilities ("soft" targets: mixup, cutmix, distillation) of the input's own
  shape and a floating dtype, in any of the layouts above.

csl_fast adds one layout that ``F.cross_entropy`` refuses, so it can never be chosen by a
coincidence of shapes: ``[B*T, V]`` logits with a ``[B, T]`` target, a batch of ``B``
sequences of ``T`` tokens (``F.cross_entropy`` wants a ``[B*T]`` target there).

Every layout becomes ``R`` rows of ``C`` logits. When a sample owns several rows (its
positions ``d1 * ... * dk``, or its tokens), ``groups = (N, P)`` says so: rows
``n * P .. n * P + P - 1`` belong to sample ``n``, whose dataset index is ``index[n]``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch


class Rows(NamedTuple):
    """A call's arguments as rows (see the module docstring)."""

    logits: torch.Tensor  #: [R, C]
    target: torch.Tensor  #: [R] class indices, or [R, C] class probabilities when ``soft``
    index: torch.Tensor  #: dataset indices: [N] with ``groups``, else [R]
    groups: tuple[int, int] | None  #: (N, P), R = N * P rows, P per sample; or None
    loss_shape: tuple[int, ...]  #: the shape of the loss with reduction='none'
    soft: bool  #: class-probability targets


def rows(logits: object, target: object, index: object) -> Rows | None:
    """The rows of a call, or None for the common ``[B, C]`` logits with ``[B]`` targets
    (nothing to rearrange; the caller's own checks apply).

    Raises ``ValueError`` for shapes that ``F.cross_entropy`` refuses too, with the layout
    that was probably meant.
    """
    if not isinstance(logits, torch.Tensor) or not isinstance(target, torch.Tensor):
        return None  # the caller's checks name the argument
    dim = logits.dim()
    if dim == 2 and target.dim() == 1:
        return None
    if dim >= 1 and logits.shape[1 if dim >= 2 else 0] == 0:
        # (the K-d and probability layouts failed in their reshapes and argmax)
        raise ValueError(
            f"csl_fast.accumulate: logits of shape {tuple(logits.shape)} have C = 0 classes "
            f"(dimension {1 if dim >= 2 else 0}): a cross entropy over no classes is undefined; "
            "check the model's output size"
        )
    soft = target.is_floating_point()
    if soft:
        return _soft(logits, target, index)
    # ([0, V] with [0, T] is an empty batch of sequences, below, T == V too)
    if dim >= 2 and target.shape == logits.shape and not (dim == 2 and logits.shape[0] == 0):
        # one-hot labels: the K-d message named the shape given as the one needed
        raise ValueError(
            f"csl_fast.accumulate: target has the logits' shape {tuple(logits.shape)} but "
            f"integer dtype {target.dtype}: one-hot labels? Pass class indices, "
            "target.argmax(1), or class probabilities, target.float()"
        )
    if dim == 1:
        if target.shape == logits.shape:
            # [1] logits, C = 1: F.cross_entropy reads a target of the logits' shape as
            # class probabilities and refuses an integer one; a [1] target of [C > 1]
            # logits is a class index it takes
            raise ValueError(
                f"csl_fast.accumulate: unbatched logits [C] = {tuple(logits.shape)} with an "
                f"integer target of the same shape, {target.dtype}: a target of the logits' "
                "shape holds class probabilities (pass target.float()); for one class index "
                "pass a 0-d target"
            )
        if target.dim() > 1 or target.numel() != 1:  # ([1] too, as F.cross_entropy takes it)
            raise ValueError(
                f"csl_fast.accumulate: unbatched logits [C] = {tuple(logits.shape)} need a 0-d "
                f"target (one class index), got target of shape {tuple(target.shape)}"
            )
        return Rows(logits[None], target.reshape(1), _one_index(index), None, (), False)
    if dim == 2:
        # (an empty batch of sequences, [0, V] logits with a [0, T] target, is one too)
        if target.dim() == 2 and (
            target.shape[0] != logits.shape[0] or target.numel() == logits.shape[0] == 0
        ):
            if target.numel() != logits.shape[0]:
                raise ValueError(
                    f"csl_fast.accumulate: a [B, T] = {tuple(target.shape)} target of sequences "
                    f"needs [B*T, V] logits with B*T = {target.numel()} rows, got logits of "
                    f"shape {tuple(logits.shape)}"
                )
            seq = (int(target.shape[0]), int(target.shape[1]))
            return Rows(logits, target.reshape(-1), index, seq, seq, False)
        return None  # [B, 1] and other misshapen targets: the caller's check names them
    if dim == 0:
        return None
    return _k_dim(logits, target, index)


def _k_dim(logits: torch.Tensor, target: torch.Tensor, index: object) -> Rows:
    """``[N, C, d1..dk]`` logits with ``[N, d1..dk]`` class indices."""
    n, c, *extra = logits.shape
    want = (n, *extra)
    if tuple(target.shape) != want:
        if logits.dim() == 3 and tuple(target.shape) == tuple(logits.shape[:2]):
            raise ValueError(
                f"csl_fast.accumulate: 3-D logits {tuple(logits.shape)} are read as "
                f"F.cross_entropy reads them, [N, C, d] (classes in dimension 1), which needs "
                f"target [N, d] = {want}; got {tuple(target.shape)}. For a batch of sequences "
                "with logits [B, T, V] pass logits.flatten(0, 1) ([B*T, V]) with the [B, T] "
                "target, or logits.transpose(1, 2) ([B, V, T]); see README, Migration"
            )
        raise ValueError(
            f"csl_fast.accumulate: logits of shape {tuple(logits.shape)} are [N, C, d1, ..., dk] "
            f"(classes in dimension 1) and need a target of class indices [N, d1, ..., dk] = "
            f"{want} or of class probabilities {tuple(logits.shape)}, got target of shape "
            f"{tuple(target.shape)}"
        )
    flat = logits.movedim(1, -1).reshape(-1, c)
    return Rows(flat, target.reshape(-1), index, _groups(n, extra), want, False)


def _soft(logits: torch.Tensor, target: torch.Tensor, index: object) -> Rows:
    """Class probabilities: the target has the logits' shape."""
    if target.shape != logits.shape:
        raise ValueError(
            f"csl_fast.accumulate: a floating-point target holds class probabilities and must "
            f"have the logits' shape {tuple(logits.shape)}, got {tuple(target.shape)}; for "
            "class indices pass an int64 target"
        )
    dim = logits.dim()
    if dim == 0:
        raise ValueError("csl_fast.accumulate: logits need a class dimension, got a 0-d tensor")
    if dim == 1:
        return Rows(logits[None], target[None], _one_index(index), None, (), True)
    if dim == 2:
        return Rows(logits, target, index, None, (int(logits.shape[0]),), True)
    n, c, *extra = logits.shape
    flat_z = logits.movedim(1, -1).reshape(-1, c)
    flat_q = target.movedim(1, -1).reshape(-1, c)
    return Rows(flat_z, flat_q, index, _groups(n, extra), (int(n), *extra), True)


def _groups(n: int, extra: list[int]) -> tuple[int, int] | None:
    """``(N, P)`` for ``N`` samples of ``P = d1 * ... * dk`` positions each, or None when
    every sample has one position (``[N, C, 1]``): one row per sample is the ``[B, C]``
    case, whose samples the tracker records as classifications (a suggested-label vote,
    ``num_classes`` taken from C) where a sequence would record neither."""
    positions = math.prod(extra)
    return None if positions == 1 else (int(n), positions)


def _one_index(index: object) -> object:
    """The dataset index of an unbatched call: a 0-d or one-entry tensor, as ``[1]``."""
    if isinstance(index, torch.Tensor) and index.numel() == 1 and index.dim() <= 1:
        return index.reshape(1)
    shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
    raise ValueError(
        f"csl_fast.accumulate: unbatched logits [C] are one sample and need one dataset index "
        f"(a 0-d or one-entry tensor), got {shape}"
    )
