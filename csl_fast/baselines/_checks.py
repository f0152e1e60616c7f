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
    """Refuses a ``model_factory`` model that is, or trains Parameters of, a model the
    factory built before in the same call. A factory returning one module every call
    (the authors' confident-learning code did) trains later folds/subsets on samples they
    hold out, and so does a shared trainable backbone; a frozen one
    (``requires_grad=False``) is not trained, so it is allowed.

    It remembers each object by ``id`` with a weak reference: the reference keeps no model
    alive, and it tells a reused object (still alive, so ``ref() is obj``) from a new one
    that got the ``id`` of a collected object (``ref()`` is then ``None``).
    """

    def __init__(self, fn: str) -> None:
        self.fn = fn
        self._seen: dict[int, weakref.ref[Any]] = {}

    def __call__(self, model: nn.Module) -> nn.Module:
        params = model.parameters() if isinstance(model, nn.Module) else ()
        objects = [model, *(p for p in params if p.requires_grad)]
        for obj in objects:
            ref = self._seen.get(id(obj))
            if ref is not None and ref() is obj:
                what = "the same model" if obj is model else "a model sharing trainable parameters"
                raise ValueError(
                    f"{self.fn}: model_factory returned {what} as an earlier call, so each "
                    "model would train on samples another held out (they leak into the "
                    "scores); build a new model in the factory, e.g. "
                    "lambda seed: copy.deepcopy(template), and freeze a shared backbone "
                    "(requires_grad_(False))"
                )
        for obj in objects:
            self._seen[id(obj)] = weakref.ref(obj)
        return model
