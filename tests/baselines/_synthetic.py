"""Small synthetic cases shared by the baseline tests."""

import torch
from torch import nn

from csl_fast.baselines import confident_learning, ssft, stability_memorization


def blobs(n=120, d=2, seed=0):
    """Two well-separated Gaussian blobs (labels 0/1), shuffled."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, d, generator=g) * 0.5
    x[:, 0] += torch.where(y == 1, 3.0, -3.0)
    return x, y


def linear(d, c=2):
    def factory(seed):
        torch.manual_seed(seed)
        return nn.Linear(d, c)

    return factory


FAST = {"epochs": 30, "lr": 0.5, "batch_size": 1024, "momentum": 0.0}


def diverged(d, c=2):
    """A factory whose models predict NaN logits (as after a diverged training)."""

    class NaNLinear(nn.Linear):
        def forward(self, x):
            return super().forward(x) * float("nan")

    def factory(seed):
        torch.manual_seed(seed)
        return NaNLinear(d, c)

    return factory


# labels as a user may hold them: every integer dtype (F.cross_entropy takes int64 and
# uint8 only), a NumPy array, a list
LABEL_FORMS = {
    "int32": lambda y: y.int(),
    "int16": lambda y: y.short(),
    "int8": lambda y: y.to(torch.int8),
    "uint8": lambda y: y.byte(),
    # (torch has no min() for these: the label check failed with NotImplementedError)
    "uint16": lambda y: y.to(torch.uint16),
    "uint64": lambda y: y.to(torch.uint64),
    "numpy-uint32": lambda y: y.numpy().astype("uint32"),
    "numpy-int32": lambda y: y.int().numpy(),
    "list": lambda y: y.tolist(),
    # negative strides (np.flip): torch cannot view them, the labels were refused as "got ndarray"
    "numpy-reversed-view": lambda y: y.numpy()[::-1].copy()[::-1],
}
FLOAT_LABELS = "labels y must be integer class indices, got torch.float32"


_ONE_EPOCH = {"epochs": 1, "batch_size": 1024}
#: name -> ``(model_factory, x, y) -> result`` for each baseline that retrains models.
RETRAINING = {
    "confident_learning": lambda f, x, y: confident_learning(f, x, y, train_kwargs=_ONE_EPOCH),
    "stability_memorization": lambda f, x, y: stability_memorization(
        f, x, y, m=2, train_kwargs=_ONE_EPOCH
    ),
    "ssft": lambda f, x, y: ssft(f, x, y, train_kwargs=_ONE_EPOCH),
}
