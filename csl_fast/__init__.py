"""csl_fast: Cumulative Sample Loss for free.

``csl_fast.accumulate`` is a drop-in for ``F.cross_entropy`` that also adds each
sample's loss into a dataset-sized buffer at its dataset index (Ravikumar et al.,
"Towards Memorization Estimation: Fast, Formal and Free", ICML 2025).
"""

from . import baselines, corrupt, data, detect, distributed, evaluate, train
from ._ext import BACKENDS, available_backends
from .accumulate import accumulate
from .clean import clean
from .input_grad import input_grad_norms
from .linear_cross_entropy import linear_cross_entropy
from .merge import merge
from .scores import SCORES, scores
from .scoring import score_epoch
from .stats import Stat
from .tracker import CSLTracker, TrackerFileError, TrackerStateError

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "SCORES",
    "CSLTracker",
    "Stat",
    "TrackerFileError",
    "TrackerStateError",
    "__version__",
    "accumulate",
    "available_backends",
    "baselines",
    "clean",
    "corrupt",
    "data",
    "detect",
    "distributed",
    "evaluate",
    "input_grad_norms",
    "linear_cross_entropy",
    "merge",
    "score_epoch",
    "scores",
    "train",
]
