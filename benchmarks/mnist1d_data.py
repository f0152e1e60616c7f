"""MNIST-1D for the benchmarks: the data, generated locally, and the small 1-D conv net.

MNIST-1D (Greydanus, 2020; ``pip install mnist1d``) is a public benchmark that its package
generates on the spot (``make_dataset(get_dataset_args())``, seed 42, no download): 4,000
training and 1,000 test sequences of length 40, 10 classes. It is harder than digits, and a
small conv net memorizes flipped labels on it, which is the regime the flagging, suggestion
and cleaning benchmarks need.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, x_test, y_test)``; inputs standardised by the training set's mean and std."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:
        raise SystemExit("the MNIST-1D regimes need `pip install mnist1d`") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the package warns about its own pickling
        d = make_dataset(get_dataset_args())
    x = torch.tensor(d["x"], dtype=torch.float32)
    xt = torch.tensor(d["x_test"], dtype=torch.float32)
    mean, std = x.mean(), x.std()
    return (
        (x - mean) / std,
        torch.tensor(d["y"], dtype=torch.long),
        (xt - mean) / std,
        torch.tensor(d["y_test"], dtype=torch.long),
    )


class Conv1dNet(nn.Module):
    """A small 1-D conv net for MNIST-1D ``[B, 40]`` inputs (no BatchNorm, so samples stay
    independent and per-sample statistics mean what they say)."""

    def __init__(self, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv1d(1, width, 5, padding=2),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(width, width, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(width * 10, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.unsqueeze(1))
