"""eval_mode: eval inside, each submodule's own mode back after (an exception included)."""

from __future__ import annotations

import pytest
import torch

from csl_fast.model_modes import eval_mode


def _partly_frozen() -> torch.nn.Module:
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)), torch.nn.Linear(4, 2)
    )
    model.train()
    model[0].eval()  # a frozen backbone
    return model


def test_each_submodule_gets_its_own_mode_back():
    model = _partly_frozen()
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before


def test_the_modes_come_back_after_an_exception():
    model = _partly_frozen()
    before = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError, match="boom"), eval_mode(model):
        raise RuntimeError("boom")
    assert [m.training for m in model.modules()] == before
