"""Layout of the per-row statistics every cross-entropy kernel emits.

The kernels return a float32 ``[NUM_STATS, B]`` tensor (one row per statistic, so that
consecutive samples are adjacent in memory). The C++ kernels mirror this enum in
``csrc/stats.h``; ``tests/test_stats.py`` checks that the two agree.
"""

from enum import IntEnum

import torch


class Stat(IntEnum):
    """Row of the statistics tensor. All refer to plain (unweighted, unsmoothed) CE."""

    LOSS = 0  #: l_i = logsumexp(z_i) - z_{i, y_i}
    P_TRUE = 1  #: p_y = exp(-l_i)
    MARGIN = 2  #: z_y - max_{j != y} z_j (0 when C == 1)
    CORRECT = 3  #: 1.0 if argmax_j z_j == y (first index on ties) else 0.0
    GRAD_NORM_SQ = 4  #: ||dl_i/dz_i||^2 = sum_{j != y} p_j^2 + (1 - p_y)^2
    VALID = 5  #: 1.0 if the row was recorded (not ignored, finite loss) else 0.0
    #: runner-up class: the smallest j != y with z_j = max_{j != y} z_j, as a float (exact
    #: for C < 2**24); -1.0 when C == 1 or the row is not valid. The predicted class when
    #: the row is misclassified; the tracker votes over it for suggested labels.
    OTHER_ARGMAX = 6


NUM_STATS = len(Stat)
#: The most classes a tracker records: ``OTHER_ARGMAX`` is a float32, which holds every
#: class index below ``2**24`` exactly (above, suggested labels came out rounded).
MAX_TRACKED_CLASSES = 2**24


def invalid_column(like: torch.Tensor) -> torch.Tensor:
    """The statistics of a row that records nothing, ``[NUM_STATS, 1]`` in ``like``'s
    dtype and device: every statistic 0 but ``OTHER_ARGMAX``, -1 (as the kernels write)."""
    column = torch.zeros(NUM_STATS, 1, dtype=like.dtype, device=like.device)
    column[Stat.OTHER_ARGMAX] = -1.0
    return column
