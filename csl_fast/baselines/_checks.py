"""Input checks shared by the retraining baselines."""

from __future__ import annotations

import torch


def check_xy(fn: str, x: torch.Tensor, y: torch.Tensor) -> None:
    """Refuse labels that are not one per input row (they would score the wrong samples)."""
    if y.dim() != 1 or x.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{fn}: need x of shape [N, ...] and labels y of shape [N], got x "
            f"{tuple(x.shape)} and y {tuple(y.shape)}"
        )


def check_finite(fn: str, logits: torch.Tensor) -> torch.Tensor:
    """Refuse NaN/inf logits: their argmax/softmax give scores that look valid but are not."""
    if not bool(torch.isfinite(logits).all()):
        raise FloatingPointError(
            f"{fn}: a model predicted non-finite logits (training diverged?); lower the "
            "learning rate in train_kwargs or check the model_factory"
        )
    return logits
