"""Where a warning should point: the first frame outside csl_fast (and torch), whatever
public entry point led to it (``load``, ``from_file``, ``load_state_dict``, a hook)."""

from __future__ import annotations

import os
import sys

import torch

# csl_fast's own frames and torch's (torch.compiler.disable's wrapper, autograd hooks)
_OWN_FRAMES = (os.path.dirname(__file__), os.path.dirname(torch.__file__))


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` made by the caller of this function that
    names the user's line."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and frame.f_code.co_filename.startswith(_OWN_FRAMES):
        level, frame = level + 1, frame.f_back
    return level
