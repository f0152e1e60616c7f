"""A run with known flips, recorded without a model: each epoch's logits are written so
that the flips' given labels lose firmly (the true class predicted, the label's
probability near 0.12) until they are memorized late. Milliseconds, where training a
network to the same effect takes seconds."""

from __future__ import annotations

import torch

import csl_fast


def flipped_run(
    num_classes: int, classes: int = 3, n: int = 120, flips: int = 12, seed: int = 0
) -> tuple[csl_fast.CSLTracker, torch.Tensor]:
    """``(tracker, labels)``: ``n`` samples of labels ``0 .. classes - 1`` recorded with
    ``num_classes >= classes`` outputs (the others' logits at -10, as a network leaves an
    output no label uses); samples ``0 .. flips - 1`` are flips, whose true class is
    ``(label + 1) % classes``. 20 epochs; the flips are memorized from epoch 17 on."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    true = (labels[:flips] + 1) % classes
    rows = torch.arange(n)
    ease = 1.0 + 5.0 * torch.rand(n, generator=g)  # clean samples from hard to easy
    tracker = csl_fast.CSLTracker(n, num_classes=num_classes)
    for epoch in range(20):
        logits = torch.full((n, num_classes), -10.0)
        logits[:, :classes] = 0.3 * torch.randn(n, classes, generator=g)
        boost = ease.clone()
        if epoch < 17:
            boost[:flips] = 0.0
            logits[rows[:flips], true] += 1.85
        logits[rows, labels] += boost
        csl_fast.accumulate(logits, labels, rows, tracker)
        tracker.end_epoch()
    return tracker, labels
