"""Run a model in eval mode for a while and give every submodule its own mode back."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` inside the block; afterwards (an exception included) each submodule
    has the mode it had before, set through its own ``train()``.

    ``model.train(was_training)`` would set every submodule to the top module's mode: a
    backbone frozen with ``.eval()`` would come back training, its BatchNorm updating its
    running statistics. Setting the ``training`` flags alone would skip the ``train()``
    that a module overrides (a LoRA layer that merges its adapter into the weight on
    ``eval()`` and takes it apart on ``train()`` would stay merged, its adapter without
    gradient)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        # modules() lists parents first: a parent's train() sets its children, each of
        # which is then put back in its own turn
        for m, training in modes:
            if m.training != training:
                m.train(training)
