"""Networks of the held-out regimes of ``benchmarks/flagging.py``: architectures and
optimisers the default flagging rule was never looked at with (added after the rule was
fixed, to test it). None uses BatchNorm, so each sample's statistics are its own."""

from __future__ import annotations

import torch
from torch import nn


class PoolNet1d(nn.Module):
    """MNIST-1D ``[B, 40]``: three conv layers (48, 48, 96 channels, kernels 7/5/3) with
    max-pooling, then a 64-unit hidden layer: a wider receptive field than
    ``mnist1d_data.Conv1dNet``'s strided convolutions."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, 48, 7, padding=3),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(48, 48, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),
            nn.Conv1d(48, 96, 3, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(96 * 10, 64), nn.ReLU(), nn.Linear(64, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)))


class ConvBase1d(nn.Module):
    """MNIST-1D ``[B, 40]``: the shape of the conv net that ships with the MNIST-1D benchmark
    (Greydanus 2020, ``ConvBase``): three strided ReLU conv layers of 25 channels (kernels
    5/3/3, stride 2, padding 1: 40 -> 19 -> 10 -> 5) and a linear head on the 125 features,
    about 5,000 parameters. Trained as its reference does (Adam lr 1e-2, batch 100, 6,000
    steps = 150 epochs), it fits every training label, flips included."""

    def __init__(self, num_classes: int = 10, channels: int = 25) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv1d(1, channels, 5, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv1d(channels, channels, 3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.head = nn.Linear(channels * 5, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x.unsqueeze(1)).flatten(1))


class GRU1d(nn.Module):
    """MNIST-1D ``[B, 40]`` read as a sequence of 40 scalars: a bidirectional GRU (hidden
    size 64 each way), its outputs averaged over the positions, and a linear head. A
    recurrent network fits the clean labels more slowly than the conv nets do (99% of them
    after 40 epochs of Adam lr 3e-3, all after 100)."""

    def __init__(self, num_classes: int = 10, hidden: int = 64) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Linear(2 * hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(x.unsqueeze(-1))
        return self.head(out.mean(1))


class Conv2dDigits(nn.Module):
    """scikit-learn digits ``[B, 64]`` seen as 8x8 images: two 3x3 conv layers (16, 32
    channels), a 2x2 max-pool and a 64-unit hidden layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 16, 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, 8, 8))


class LeNetMnist(nn.Module):
    """MNIST ``[B, 784]`` seen as 28x28 images: LeNet-5's shape (LeCun et al. 1998) with
    ReLU and max-pooling: two 5x5 conv layers (16, 32 channels), each followed by a 2x2
    max-pool (28 -> 24 -> 12 -> 8 -> 4), then a 128-unit hidden layer."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 16, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(32 * 16, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.view(-1, 1, 28, 28))
