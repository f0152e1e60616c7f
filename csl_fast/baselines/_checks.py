"""Input checks shared by the retraining baselines."""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from .._args import int64_labels, label_range


def check_xy(fn: str, x: Any, y: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` detached, and ``y`` as int64 class indices on ``x``'s device, checked to be
    one per input row.

    Detached because inputs with autograd history (features from a backbone run without
    ``no_grad``) were backpropagated into: the first training step wrote the caller's
    gradients, the second failed with "Trying to backward through the graph a second time".

    Any integer dtype is taken (``F.cross_entropy`` takes int64 and uint8 only, and
    refused int32 labels from deep inside training); float, complex and bool labels are
    refused rather than truncated, and negative ones because ``F.cross_entropy`` silently
    ignores ``-100`` in training.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{fn}: x must be a torch.Tensor of inputs [N, ...], got {type(x).__name__} "
            "(convert it with torch.as_tensor(x, dtype=torch.float32))"
        )
    if not isinstance(y, torch.Tensor):
        try:
            # (a copy of NumPy's negative strides, np.flip(y), which torch cannot view)
            y = torch.as_tensor(np.ascontiguousarray(y) if isinstance(y, np.ndarray) else y)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                f"{fn}: labels y must be int class indices [N] (a tensor, NumPy array or "
                f"list), got {type(y).__name__}"
            ) from None
    if y.dim() != 1 or x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{fn}: need x of shape [N, ...] and labels y of shape [N], got x "
            f"{tuple(x.shape)} and y {tuple(y.shape)}"
        )
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(
            f"{fn}: labels y must be integer class indices, got {y.dtype}; convert them with "
            "y.long() if they hold whole numbers"
        )
    low = label_range(y)[0] if y.numel() else 0
    if low < 0:
        raise ValueError(f"{fn}: labels y must be class indices >= 0, got {low}")
    return x.detach(), int64_labels(fn, y).to(x.device)


def check_finite(
    fn: str,
    logits: torch.Tensor,
    fix: str = "lower the learning rate in train_kwargs or check the model_factory",
) -> torch.Tensor:
    """Refuse NaN/inf logits: their argmax/softmax give scores that look valid but are not.
    ``fix`` is the advice the error gives."""
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            f"{fn}: a model predicted non-finite logits (training diverged?); {fix}"
        )
    return logits


_NO_TRACKER = (
    "the models train on subsets, whose rows are not the dataset's indices; record a tracker "
    "with csl_fast.train.train on the full data instead"
)
#: train() arguments every retraining baseline sets itself, with what to do instead.
_SET_BY_BASELINE = {
    "seed": "pass seed= to {fn} itself (each model's seed derives from it)",
    "tracker": _NO_TRACKER,
    # (train's own refusal, "need a tracker", sent the user to the tracker refused above)
    "input_grads": "it records into a tracker, which {fn} cannot take: " + _NO_TRACKER,
    "eval_each_epoch": "it records into a tracker, which {fn} cannot take: " + _NO_TRACKER,
}
#: ``progress``, for the baselines that pass their own ``progress=`` to every training.
PROGRESS = {"progress": "pass progress= to {fn} itself"}


def train_options(
    fn: str,
    train_kwargs: Mapping[str, Any] | None,
    taken: Mapping[str, str] | None = None,
    needs_epochs: bool = True,
) -> dict[str, Any]:
    """``train_kwargs`` as a dict, refusing the keys the baseline sets itself (``taken``
    adds its own, with advice): they collided with a bare "got multiple values for keyword
    argument" TypeError from ``train``, or (``tracker``) recorded subset rows as if they
    were dataset indices."""
    kwargs = dict(train_kwargs or {})
    rules = {**_SET_BY_BASELINE, **(taken or {})}
    for key in kwargs:
        if key in ("input_grads", "eval_each_epoch") and kwargs[key] is False:
            continue  # (off, as the baseline runs it: nothing to refuse)
        if key in rules:
            raise ValueError(f"{fn}: train_kwargs may not hold {key!r}; {rules[key].format(fn=fn)}")
    if needs_epochs and "epochs" not in kwargs:
        # (the default None met train's "missing 1 required keyword-only argument")
        raise TypeError(
            f"{fn}: train_kwargs must say how long each model trains, e.g. "
            "train_kwargs={'epochs': 30, 'lr': 0.05} (forwarded to csl_fast.train.train)"
        )
    return kwargs


class FreshModels:
    """Refuses a ``model_factory`` model that is a model the factory built before in the
    same call, or whose trainable Parameters share memory with such a model's. A factory
    returning one module every call (the authors' confident-learning code did) trains
    later folds/subsets on samples they hold out, and so does a shared trainable backbone,
    as the same Parameter or as a new one over the same tensor
    (``nn.Embedding.from_pretrained(w, freeze=False)``); a frozen one
    (``requires_grad=False``) is not trained, so it is allowed.

    Earlier models and Parameters are held by weak references and compared only while
    alive: a collected one's ``id`` or memory may be handed to a new object, which shares
    nothing with it (the baselines keep the last model alive until the next is built).
    """

    def __init__(self, fn: str) -> None:
        self.fn = fn
        self._models: list[weakref.ref[nn.Module]] = []
        self._params: list[weakref.ref[torch.Tensor]] = []

    def __call__(self, model: nn.Module) -> nn.Module:
        self._models = [ref for ref in self._models if ref() is not None]
        self._params = [ref for ref in self._params if ref() is not None]
        if any(ref() is model for ref in self._models):
            raise ValueError(
                f"{self.fn}: model_factory returned the same model object as an earlier "
                "call; each call must build a new model (one object carries its state, "
                "trained on samples the next model holds out, unless the factory resets "
                "all of it), e.g. lambda seed: copy.deepcopy(template)"
            )
        params = [p for p in model.parameters() if p.requires_grad]
        taken = {_memory(ref()) for ref in self._params} - {None}
        if any(_memory(p) in taken for p in params):
            raise ValueError(
                f"{self.fn}: model_factory returned a model whose trainable parameters share "
                "memory with an earlier model's (the same Parameter, or one made over the "
                "same tensor, as nn.Embedding.from_pretrained(w, freeze=False) does), so "
                "each model would train on samples another held out (they leak into the "
                "scores); build new weights in the factory (copy.deepcopy(template), "
                "w.clone()), and freeze a shared backbone (requires_grad_(False))"
            )
        self._models.append(weakref.ref(model))
        self._params += [weakref.ref(p) for p in params]
        return model


def _memory(t: torch.Tensor | None) -> int | None:
    """The address of the memory behind ``t`` (None: no tensor, or no memory)."""
    if t is None:
        return None
    storage = t.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else None
