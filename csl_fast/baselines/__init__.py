"""Baselines the tracker cannot give for free: they cost extra passes or extra models.

- :mod:`.curvature`: input-loss curvature (Garg, Ravikumar, Roy 2024), extra
  forward/backward passes at chosen epochs.
- :mod:`.confident_learning`: cleanlab's ``find_label_issues`` on K-fold out-of-sample
  probabilities (K fresh models).
- :mod:`.ssft`: second-split forgetting time (Maini et al. 2022), two extra trainings.
- :mod:`.memorization`: Feldman–Zhang stability-based memorization, ``m`` models on
  random 70% subsets (the expensive ground truth).

The retraining baselines take a ``model_factory`` (``seed -> nn.Module``) and train with
:func:`csl_fast.train.train` (``train_kwargs`` forwarded), so small models on in-memory
tensors are the intended scale. Inputs ``x`` are a tensor; labels ``y`` are class indices
``>= 0`` of any integer dtype, as a tensor, NumPy array or list (float labels are refused,
not truncated).
"""

from .confident_learning import ConfidentLearningResult, confident_learning, out_of_sample_probs
from .curvature import CurvatureAccumulator, input_curvature
from .memorization import MemorizationResult, stability_memorization
from .ssft import ssft

__all__ = [
    "ConfidentLearningResult",
    "CurvatureAccumulator",
    "MemorizationResult",
    "confident_learning",
    "input_curvature",
    "out_of_sample_probs",
    "ssft",
    "stability_memorization",
]
