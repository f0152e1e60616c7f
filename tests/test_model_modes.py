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


def test_a_module_s_own_train_runs_when_its_mode_comes_back():
    """A LoRA-style layer merges its adapter on eval() and takes it apart on train();
    setting the flags alone left it merged, its adapter without gradient."""

    class Merging(torch.nn.Linear):
        merged = False

        def train(self, mode: bool = True):
            self.merged = not mode
            return super().train(mode)

    model = torch.nn.Sequential(Merging(3, 3), torch.nn.Linear(3, 2))
    model.train()
    with eval_mode(model):
        assert model[0].merged
    assert model[0].training and not model[0].merged
