"""Input-loss curvature against the exact input Hessian of a linear softmax model."""

import numpy as np
import pytest
import torch
from torch import nn

from csl_fast.baselines import CurvatureAccumulator, input_curvature

from ._synthetic import FLOAT_LABELS, LABEL_FORMS


def _hessian_probe(model, x, y, h, n, seed):
    """mean_k ||H_i (h v_k)|| with the same Rademacher draws as input_curvature."""
    w = model.weight.detach()
    p = model(x).softmax(1).detach()
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(x.shape[0], dtype=x.dtype)
    for _ in range(n):
        v = torch.randint(0, 2, x.shape, generator=gen).to(x.dtype) * 2 - 1
        for i in range(x.shape[0]):
            hess = w.T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ w
            total[i] += (hess @ (h * v[i])).norm()
    return total / n


def test_matches_hessian_of_linear_model():
    torch.manual_seed(0)
    model = nn.Linear(3, 4).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 4, (7,))
    got = input_curvature(model, x, y, h=1e-3, n=5, batch_size=1024, seed=11)
    expect = _hessian_probe(model, x, y, 1e-3, 5, 11).float()
    torch.testing.assert_close(got, expect, rtol=1e-3, atol=1e-9)
    assert model.training  # mode restored


def test_a_frozen_submodule_stays_in_eval_mode():
    """model.train(was_training) set a backbone frozen with .eval() back to training."""
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Linear(4, 2))
    model[0].eval()
    before = [m.training for m in model.modules()]
    input_curvature(model, torch.randn(5, 3), torch.randint(0, 2, (5,)), n=2)
    assert [m.training for m in model.modules()] == before


def test_saturated_sample_is_flat_boundary_sample_is_curved():
    model = nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    x = torch.tensor([[20.0], [0.0]])  # confidently class 0 / on the decision boundary
    c = input_curvature(model, x, torch.tensor([0, 0]), n=10)
    assert c[0] < 1e-9 and c[1] == pytest.approx(1e-3 * 4 * 0.25, rel=1e-3)


def test_accumulator_averages_over_chosen_epochs():
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(9, 3), torch.randint(0, 4, (9,))
    acc = CurvatureAccumulator(x, y, epochs=[0, 2], n=3, seed=5)
    with pytest.warns(
        UserWarning, match=r"no curvature measured yet \(it measures at epochs \[0, 2\]"
    ):
        assert bool(acc.value.isnan().all())
    for e in range(4):
        acc(e, model)
    assert acc.count == 2
    a = input_curvature(model, x, y, n=3, seed=5)
    b = input_curvature(model, x, y, n=3, seed=7)
    torch.testing.assert_close(acc.value, (a + b) / 2)


def test_a_seed_near_the_generators_end_wraps_over_the_epochs():
    """seed + epoch past 2**64 - 1 raised torch's overflow after the first training epoch;
    it wraps to the start of manual_seed's range, and a seed outside it is named."""
    torch.manual_seed(0)
    model = nn.Linear(3, 4)
    x, y = torch.randn(9, 3), torch.randint(0, 4, (9,))
    acc = CurvatureAccumulator(x, y, epochs=[1], n=3, seed=2**64 - 1)
    acc(1, model)
    torch.testing.assert_close(acc.value, input_curvature(model, x, y, n=3, seed=0))
    with pytest.raises(ValueError, match=r"input_curvature: seed must be in \[-2\*\*63"):
        input_curvature(model, x, y, seed=2**64)


def test_refuses_a_zero_step_and_an_empty_batch():
    model, x, y = nn.Linear(2, 2), torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="h must be a finite step > 0"):  # all 0 before
        input_curvature(model, x, y, h=0.0)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
        input_curvature(model, x, y, batch_size=0)


def test_accumulator_refuses_mismatched_labels_at_construction():
    # the mismatch surfaced at the first measurement, after an epoch of training
    with pytest.raises(ValueError, match=r"x \(4, 2\) and y \(3,\)"):
        CurvatureAccumulator(torch.randn(4, 2), torch.tensor([0, 1, 0]))


@pytest.mark.parametrize("form", LABEL_FORMS)
def test_labels_of_any_integer_dtype_array_or_list(form):
    # int32 labels failed inside F.cross_entropy ("expected target dtype to be Long or Byte")
    torch.manual_seed(0)
    model, x, y = nn.Linear(3, 4), torch.randn(9, 3), torch.randint(0, 4, (9,))
    want = input_curvature(model, x, y, n=2)
    assert torch.equal(input_curvature(model, x, LABEL_FORMS[form](y), n=2), want)
    acc = CurvatureAccumulator(x, LABEL_FORMS[form](y), n=2)
    acc.update(model, seed=0)
    assert torch.equal(acc.value, want)
    with pytest.raises(TypeError, match=FLOAT_LABELS):
        input_curvature(model, x, y.float())
    with pytest.raises(TypeError, match=FLOAT_LABELS):
        CurvatureAccumulator(x, y.float())


def test_refuses_integer_inputs_by_name():
    # torch said only "only Tensors of floating point dtype can require gradients", from
    # inside the probe loop (and, for the accumulator, after the first training epoch)
    model, x, y = (
        nn.Linear(2, 2),
        torch.randint(0, 255, (4, 2), dtype=torch.uint8),
        torch.tensor([0, 1, 0, 1]),
    )
    with pytest.raises(TypeError, match=r"input_curvature: x must be floating-point.*torch.uint8"):
        input_curvature(model, x, y)
    with pytest.raises(TypeError, match=r"CurvatureAccumulator: x must be floating-point"):
        CurvatureAccumulator(x, y)


def test_refuses_a_model_with_non_finite_logits():
    # a diverged model gave an all-NaN curvature that ranked like a valid one
    model, x, y = nn.Linear(2, 2), torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="input_curvature: a model predicted non-finite"):
        input_curvature(model, x, y, n=2)
    acc = CurvatureAccumulator(x, y, n=2)
    with pytest.raises(FloatingPointError, match="non-finite logits"):
        acc(0, model)
    assert acc.count == 0
    with pytest.warns(UserWarning, match="no curvature measured yet"):
        assert bool(acc.value.isnan().all())


@pytest.mark.parametrize("arg", [{"n": 2.5}, {"n": True}, {"batch_size": 8.0}])
def test_refuses_counts_that_are_not_ints(arg):
    # n=2.5 failed in range() with "'float' object cannot be interpreted as an integer",
    # n=True ran one probe
    model, x, y = nn.Linear(2, 2), torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    (name,) = arg
    with pytest.raises(TypeError, match=f"input_curvature: {name} must be an int"):
        input_curvature(model, x, y, **arg)


def test_accumulator_refuses_a_number_of_epochs():
    # epochs=5 (read as "every 5 epochs" or "5 epochs") said "'int' object is not iterable"
    with pytest.raises(
        TypeError, match=r"epochs must be the epochs to measure at.*range\(0, total, 5\)"
    ):
        CurvatureAccumulator(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), epochs=5)


@pytest.mark.parametrize(
    ("option", "error", "match"),
    [
        ({"n": 0}, ValueError, "n must be an int >= 1"),
        ({"h": 0.0}, ValueError, "h must be a finite step > 0"),
        ({"h": "1e-3"}, TypeError, "h must be a number"),
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1"),
        ({"seed": 1.5}, TypeError, "seed must be an int"),
    ],
)
def test_options_are_checked_before_training(option, error, match):
    """CurvatureAccumulator took n=0, h=0, batch_size=0 and seed=1.5, and failed at its
    first measurement, after training had run."""
    x, y = torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    with pytest.raises(error, match=f"CurvatureAccumulator: {match}"):
        CurvatureAccumulator(x, y, **option)
    with pytest.raises(error, match=f"input_curvature: {match}"):
        input_curvature(nn.Linear(3, 2), x, y, **option)


def test_accumulator_takes_epochs_as_a_tensor():
    # set(torch.arange(4)) held 0-d tensors, which hash by identity: it never measured
    model, x, y = nn.Linear(2, 2), torch.randn(4, 2), torch.tensor([0, 1, 0, 1])
    acc = CurvatureAccumulator(x, y, epochs=torch.arange(0, 4, 2), n=1)
    for e in range(4):
        acc(e, model)
    assert acc.count == 2
    with pytest.raises(TypeError, match=r"each of epochs must be an int, got float 1\.5"):
        CurvatureAccumulator(x, y, epochs=[1.5])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_refuses_inputs_too_coarse_for_the_step(dtype):
    # x + 1e-3 v rounded back to x: in bfloat16, 60% of the curvatures came out exactly 0
    model = nn.Linear(2, 2).to(dtype)
    x, y = torch.randn(4, 2, dtype=dtype), torch.tensor([0, 1, 0, 1])
    with pytest.raises(TypeError, match=f"x is {dtype}, too coarse.*deepcopy"):
        input_curvature(model, x, y)
    with pytest.raises(TypeError, match="too coarse"):
        CurvatureAccumulator(x, y)


def test_inputs_too_large_for_the_step_are_refused():
    """float32 inputs near 2e4 are 2e-3 apart: x + h v moved by a spacing, not h, and the
    curvatures came out about twice the float64 ones, silently."""
    model = nn.Linear(2, 3)
    y = torch.tensor([0, 1, 2, 0])
    x = torch.randn(4, 2) * 5 + 2e4
    with pytest.raises(ValueError, match=r"values up to 2e\+04.*float64 copy"):
        input_curvature(model, x, y, n=1)
    with pytest.raises(ValueError, match="too coarse for the finite-difference step"):
        CurvatureAccumulator(x, y)
    input_curvature(model.double(), x.double(), y, n=1)  # float64 has room there
    input_curvature(model.float(), x.float(), y, n=1, h=0.1)  # so has a larger step
    input_curvature(model, torch.full((4, 2), 255.0), y, n=1)  # unscaled 8-bit pixels pass


@pytest.mark.parametrize("epochs", [np.int64(5), torch.tensor(5), 5, 5.0])
def test_a_single_epoch_number_is_refused_by_name(epochs):
    with pytest.raises(TypeError, match="epochs must be the epochs to measure at"):
        CurvatureAccumulator(torch.randn(4, 2), torch.tensor([0, 1, 0, 1]), epochs=epochs)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_measures_under_no_grad_and_inference_mode(mode):
    # both raised from inside autograd ("does not require grad", "inference tensor")
    torch.manual_seed(0)
    model, y = nn.Linear(3, 4), torch.randint(0, 4, (6,))
    x = torch.randn(6, 3)
    want = input_curvature(model, x, y, n=2)
    with mode():
        x_in_mode = x.clone()  # an inference tensor under inference_mode
        got = input_curvature(model, x_in_mode, y, n=2)
        # labels converted there (int32, NumPy, a list) are inference tensors too, which
        # the loss could not save for backward
        for labels in (y.int(), y.numpy(), y.tolist(), y.clone()):
            assert torch.equal(input_curvature(model, x_in_mode, labels, n=2), want)
    assert torch.equal(got, want)
    with torch.inference_mode():
        y_made_there = y.clone()
    assert torch.equal(input_curvature(model, x, y_made_there, n=2), want)


def test_a_label_past_the_model_width_is_named():
    # F.cross_entropy said only "Target 7 is out of bounds"
    model, x = nn.Linear(2, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match=r"logits of shape \(4, 3\), but y holds labels up to 7"):
        input_curvature(model, x, torch.tensor([0, 7, 1, 2]), n=1)
