"""A float tensor's bits as integers, for comparisons and checksums that neither NaN nor
the order of a float sum can disturb (-0.0 and 0.0 differ, a NaN equals the same NaN)."""

from __future__ import annotations

import torch

_SAME_SIZE_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bits as a signed integer tensor of the same element size and shape (a
    contiguous copy when ``t`` is not contiguous); an integer or bool ``t`` as it is."""
    if not t.is_floating_point():
        return t
    return t.contiguous().view(_SAME_SIZE_INT[t.element_size()])
