"""Run a model in eval mode for a while and give every submodule its own mode back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block; afterwards (an exception included) each submodule
    has the mode it had before. ``model.train(was_training)`` would set every submodule to
    the top module's mode: a backbone frozen with ``.eval()`` would come back training, its
    BatchNorm updating its running statistics."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
