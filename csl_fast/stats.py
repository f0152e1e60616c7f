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
    MARGIN = 2  #: min(z_y - max_{j != y} z_j, MARGIN_CAP) (0 when C == 1)
    CORRECT = 3  #: 1.0 if argmax_j z_j == y (first index on ties) else 0.0
    GRAD_NORM_SQ = 4  #: ||dl_i/dz_i||^2 = sum_{j != y} p_j^2 + (1 - p_y)^2
    VALID = 5  #: 1.0 if the row was recorded (not ignored, finite loss) else 0.0
    #: runner-up class: the smallest j != y with z_j = max_{j != y} z_j, as a float (exact
    #: for C < 2**24); -1.0 when C == 1 or the row is not valid. The predicted class when
    #: the row is misclassified; the tracker votes over it for suggested labels.
    OTHER_ARGMAX = 6


NUM_STATS = len(Stat)
#: The largest margin a kernel emits. Past about 745 even float64's softmax is one-hot, so
#: no larger margin says more about the label; and a row whose label holds its only finite
#: logit (a masked class set, a forced token) has margin +inf, which made the sample's
#: margin sum, AUM and every later margin +inf for good (csrc/stats.h: kMarginCap).
MARGIN_CAP = 1000.0
#: The most classes a tracker records: ``OTHER_ARGMAX`` is a float32, which holds every
#: class index below ``2**24`` exactly (above, suggested labels came out rounded).
MAX_TRACKED_CLASSES = 2**24


def invalid_column(like: torch.Tensor) -> torch.Tensor:
    """The statistics of a row that records nothing, ``[NUM_STATS, 1]`` in ``like``'s
    dtype and device: every statistic 0 but ``OTHER_ARGMAX``, -1 (as the kernels write)."""
    column = torch.zeros(NUM_STATS, 1, dtype=like.dtype, device=like.device)
    column[Stat.OTHER_ARGMAX] = -1.0
    return column


#: float32 holds every integer up to ``2**24``: a float32 sum of at most this many 0/1
#: statistics (``VALID``, ``CORRECT``) is exact, in any order.
EXACT_FLOAT32_COUNT = 2**24
#: Entries summed in float32 before :func:`float64_sums` goes on in float64.
_RUN = 4096


def float64_sums(x: torch.Tensor) -> torch.Tensor:
    """float64 ``[B]``: the sums of the float32 ``[B, T]`` ``x`` over its last dimension.

    Up to ``T = 4096`` a float64 sum of every entry; longer rows (volumes of positions)
    summed in float32 over runs of 4096 entries, then in float64: a float64 sum of every
    entry converts each (~10x a float32 sum on the CPU), the runs cost what a float32 sum
    does. Either way a count (0/1 entries) comes out exact up to ``2**53``, where a float32
    sum rounds it past ``2**24`` (a 512x512x64 volume), and a sum of other values keeps
    about float32's precision of one run's sum rather than of the whole row's."""
    rows, t = x.shape
    runs = t // _RUN
    if runs <= 1:
        return x.sum(1, dtype=torch.float64)
    head = x[:, : runs * _RUN].reshape(rows, runs, _RUN).sum(2)
    return head.sum(1, dtype=torch.float64) + x[:, runs * _RUN :].sum(1, dtype=torch.float64)
