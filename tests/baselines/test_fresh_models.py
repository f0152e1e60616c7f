"""Every retraining baseline needs a fresh model per fold/subset/half: a factory that
hands back one module (or one trainable backbone) every call trains later models on the
samples they hold out, which leaks them into the scores without a word."""

import gc
import weakref

import pytest
import torch
from torch import nn

from csl_fast.baselines._checks import FreshModels

from ._synthetic import RETRAINING as BASELINES
from ._synthetic import blobs


def _shared_backbone(trainable):
    backbone = nn.Linear(2, 4).requires_grad_(trainable)
    return lambda seed: nn.Sequential(backbone, nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("name", BASELINES)
def test_the_same_model_every_call_is_refused(name):
    x, y = blobs(30)
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"{name}: model_factory returned the same model"):
        BASELINES[name](lambda seed: net, x, y)


@pytest.mark.parametrize("name", BASELINES)
def test_a_shared_trainable_backbone_is_refused(name):
    x, y = blobs(30)
    with pytest.raises(ValueError, match=r"share memory with an earlier model's.*deepcopy"):
        BASELINES[name](_shared_backbone(trainable=True), x, y)


@pytest.mark.parametrize("name", BASELINES)
def test_new_parameters_over_one_trainable_tensor_are_refused(name):
    # Embedding.from_pretrained(w, freeze=False): a new Parameter each call, over the same
    # table, which each model then trained in place
    x, y = blobs(30)
    table = torch.randn(2, 4)

    def factory(seed):
        head = nn.Linear(2, 4)
        head.weight = nn.Parameter(table.T)
        return nn.Sequential(head, nn.ReLU(), nn.Linear(4, 2))

    with pytest.raises(ValueError, match=r"share memory with an earlier model's"):
        BASELINES[name](factory, x, y)


@pytest.mark.parametrize("name", BASELINES)
def test_a_frozen_shared_backbone_is_taken(name):
    x, y = blobs(30)
    BASELINES[name](_shared_backbone(trainable=False), x, y)


def test_a_new_model_at_a_collected_models_address_is_taken():
    # CPython reuses a freed object's address at once: the id alone would call it reused
    fresh = FreshModels("f")
    ids = set()
    for _ in range(50):
        model = fresh(nn.Linear(2, 2))
        ids.update(id(p) for p in (model, *model.parameters()))
        ids.update(p.data_ptr() for p in model.parameters())
        del model
        gc.collect()
    assert len(ids) < 250  # (addresses were reused, so the test tests something)


def test_it_keeps_no_model_alive():
    fresh = FreshModels("f")
    model = fresh(nn.Linear(2, 2))
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None
