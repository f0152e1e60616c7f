"""csl_fast: Cumulative Sample Loss for free.

``csl_fast.accumulate`` is a drop-in for ``F.cross_entropy`` that also adds each
sample's loss into a dataset-sized buffer at its dataset index (Ravikumar et al.,
"Towards Memorization Estimation: Fast, Formal and Free", ICML 2025).
"""

import os
from typing import Any

import torch

from . import baselines, corrupt, data, detect, detect_losses, distributed, evaluate, train
from ._ext import BACKENDS, available_backends
from .accumulate import accumulate
from .accumulate_bce import accumulate_bce
from .cleaning import clean
from .cross_entropy_extras import CrossEntropyOutput
from .eval_pass import score_epoch
from .input_grad import input_grad_norms
from .linear_cross_entropy import linear_cross_entropy
from .merge import merge
from .record_loss import record_loss
from .scores import SCORES, scores
from .stats import Stat
from .tracker import CSLTracker, TrackerFileError, TrackerStateError

__version__ = "0.1.0"


def load(path: str | os.PathLike, device: torch.device | str = "cpu", **kwargs: Any) -> CSLTracker:
    """Restore the tracker that :meth:`CSLTracker.save` wrote to ``path``
    (:meth:`CSLTracker.from_file`).

    The number of samples, classes, dtype and history flag come from the file; ``device``
    and ``kwargs`` go to the :class:`CSLTracker` constructor. Raises
    :class:`TrackerFileError` for a truncated, foreign or newer-format file.

    >>> tracker.save("run.csl")  # doctest: +SKIP
    >>> tracker = csl_fast.load("run.csl")  # doctest: +SKIP
    """
    return CSLTracker.from_file(path, device=device, **kwargs)


__all__ = [
    "BACKENDS",
    "SCORES",
    "CSLTracker",
    "CrossEntropyOutput",
    "Stat",
    "TrackerFileError",
    "TrackerStateError",
    "__version__",
    "accumulate",
    "accumulate_bce",
    "available_backends",
    "baselines",
    "clean",
    "corrupt",
    "data",
    "detect",
    "detect_losses",
    "distributed",
    "evaluate",
    "input_grad_norms",
    "linear_cross_entropy",
    "load",
    "merge",
    "record_loss",
    "score_epoch",
    "scores",
    "train",
]
