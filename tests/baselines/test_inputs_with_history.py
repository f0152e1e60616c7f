"""Inputs that carry autograd history (features from a backbone run without no_grad):
the baselines train on them as data, never backpropagating into the caller's graph."""

import pytest
from torch import nn

from csl_fast.baselines import input_curvature

from ._synthetic import RETRAINING, blobs, linear


def _features():
    raw, y = blobs(30)
    backbone = nn.Linear(2, 2)
    return backbone, backbone(raw), y


@pytest.mark.parametrize("name", RETRAINING)
def test_retraining_baselines_leave_the_callers_graph_alone(name):
    # the second step failed with "Trying to backward through the graph a second time",
    # after the first had written backbone.weight.grad
    backbone, feats, y = _features()
    RETRAINING[name](linear(2), feats, y)
    assert backbone.weight.grad is None


def test_curvature_leaves_the_callers_graph_alone():
    backbone, feats, y = _features()
    input_curvature(linear(2)(0), feats, y, n=2)
    assert backbone.weight.grad is None
