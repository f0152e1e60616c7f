"""A tracker of variable-length sequences with a known bad group, for the tests of what
detection, cleaning and the CLI do with sequences.

Clean sequences are long (20-47 tokens) and fitted moderately: the label's logit stands
out by ``N(1.5, 1)``, so many tokens still lose to another (a language model's next
tokens are draws, not classes). Bad sequences are short (5-10 tokens) and lost: the
label's logit is 2 below the others'. Their summed loss (``csl``) is below a long clean
sequence's; their mean loss per token (``csl_mean``) stands apart.
"""

from __future__ import annotations

import torch

import csl_fast

V = 8  # vocabulary
IGNORE = -100


def sequence_tracker(
    n: int = 600, bad: int = 30, epochs: int = 3, seed: int = 0
) -> tuple[csl_fast.CSLTracker, torch.Tensor]:
    """``(tracker, bad mask [n])`` after ``epochs`` epochs of synthetic logits."""
    g = torch.Generator().manual_seed(seed)
    is_bad = torch.zeros(n, dtype=torch.bool)
    is_bad[torch.randperm(n, generator=g)[:bad]] = True
    lengths = torch.where(
        is_bad, torch.randint(5, 11, (n,), generator=g), torch.randint(20, 48, (n,), generator=g)
    )
    t_max = int(lengths.max())
    target = torch.randint(0, V, (n, t_max), generator=g)
    target[torch.arange(t_max) >= lengths[:, None]] = IGNORE
    tracker = csl_fast.CSLTracker(n)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(50):
            tgt = target[idx]
            logits = torch.randn(len(idx), t_max, V, generator=g)
            boost = torch.where(is_bad[idx], -2.0, 1.5 + torch.randn(len(idx), generator=g))
            logits.scatter_add_(
                2, tgt.clamp(min=0)[..., None], boost[:, None, None].expand(-1, t_max, 1)
            )
            csl_fast.accumulate(logits.reshape(-1, V), tgt, idx, tracker)
        tracker.end_epoch()
    return tracker, is_bad
