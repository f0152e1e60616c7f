r"""Second-Split Forgetting Time (Maini et al. 2022), as the paper's baseline.

Split the data into two halves A and B (seeded). Train a model on A, then continue
training the same model on B only; after each epoch of the second phase, record whether
each sample of A is still classified correctly. The score of a sample of A is
``1 - mean correctness over the second phase``: samples whose (possibly wrong) label was
only memorized are forgotten quickly once they leave the training set. Swapping the roles
of A and B scores every sample. Cost: two models, each trained for two phases on half
the data (about two full trainings).

Maini et al. define the forgetting time as the first second-phase epoch from which the
sample stays misclassified. The mean used here (the score the CSL paper's comparison
is reproduced with) equals ``1 - t / E`` for a sample correct until epoch
``t`` of ``E`` and wrong from then on, so it ranks such samples as the forgetting time
does (earlier = higher); it differs for samples whose prediction flips back and forth,
and it separates the samples Maini et al. give no forgetting time (never forgotten: 0;
never correct: 1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from .._args import integer
from .._args import seed as seed_arg
from ..train import predict, train
from ._checks import PROGRESS, FreshModels, check_finite, check_xy, train_options

__all__ = ["ssft"]

_TAKEN = {
    **PROGRESS,
    "callback": "ssft's second phase uses the callback to watch the first half",
}


def ssft(
    model_factory: Callable[[int], nn.Module],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    first_epochs: int | None = None,
    second_epochs: int | None = None,
    train_kwargs: Mapping[str, Any] | None = None,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Per-sample SSFT score (float32 ``[N]``, higher = forgotten sooner = more suspicious).

    Args:
        model_factory: ``seed -> fresh nn.Module``.
        x, y: inputs and (noisy) labels.
        first_epochs, second_epochs: epochs of each phase (default: ``train_kwargs
            ["epochs"]`` for both).
        train_kwargs: forwarded to :func:`csl_fast.train.train` (``epochs`` overridden per
            phase).
        seed: the split (a seeded random half) and the training seeds.
    """
    x, y = check_xy("ssft", x, y)
    kwargs = train_options("ssft", train_kwargs, _TAKEN, needs_epochs=False)  # (or *_epochs)
    epochs = kwargs.pop("epochs", None)
    e1 = first_epochs if first_epochs is not None else epochs
    e2 = second_epochs if second_epochs is not None else epochs
    if e1 is None or e2 is None:
        raise ValueError("ssft: give first_epochs/second_epochs or train_kwargs['epochs']")
    e1 = integer("ssft", "first_epochs" if first_epochs is not None else "epochs", e1, low=0)
    e2 = integer("ssft", "second_epochs" if second_epochs is not None else "epochs", e2)
    if e2 < 1:  # the score is a mean over the second phase's epochs: 0/0 = NaN for all
        raise ValueError(f"ssft: the second phase needs at least 1 epoch, got {e2}")
    seed = seed_arg("ssft", seed, offset=21)  # (seed + 20 + side)
    if x.shape[0] < 2:
        raise ValueError(f"ssft: needs at least 2 samples (two halves), got {x.shape[0]}")
    n = x.shape[0]
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(x.device)
    halves = (perm[: n // 2], perm[n // 2 :])
    score = torch.full((n,), float("nan"), dtype=torch.float32, device=x.device)
    fresh = FreshModels("ssft")
    for side in range(2):
        a, b = halves[side], halves[1 - side]
        model = fresh(model_factory(seed + side)).to(x.device)
        tag = f"SSFT {side + 1}/2"
        train(
            model,
            x[a],
            y[a],
            epochs=e1,
            seed=seed + 10 + side,
            progress=f"{tag} phase 1" if progress else False,
            **kwargs,
        )
        correct = torch.zeros(a.numel(), dtype=torch.float32, device=x.device)
        xa, ya = x[a], y[a]

        def watch_a(epoch: int, m: nn.Module, xa=xa, ya=ya, correct=correct) -> None:
            correct.add_((check_finite("ssft", predict(m, xa)).argmax(1) == ya).float())

        train(
            model,
            x[b],
            y[b],
            epochs=e2,
            seed=seed + 20 + side,
            callback=watch_a,
            progress=f"{tag} phase 2" if progress else False,
            **kwargs,
        )
        score[a] = 1.0 - correct / e2
    return score
