"""csl_fast::cross_entropy_bwd_triton (the float16/bfloat16 backward in one elementwise
pass) against float64, rounded once, and the reference (interpreter on CPU: tiny shapes)."""

from __future__ import annotations

import pytest
import torch
from test_ops_backward import IGNORE, cancelling, exact_extra, exact_grad
from tolerances import assert_rounded_once

from csl_fast import reference
from csl_fast._triton import cross_entropy_bwd as bwd_module
from csl_fast._triton import (
    cross_entropy_bwd_triton,
    cross_entropy_fwd_extra_triton,
    cross_entropy_fwd_triton,
)
from csl_fast.stats import Stat

LOW = [torch.float16, torch.bfloat16]


def _run(logits, target, weight, scale, eps, ignore_index=IGNORE):
    _, _, stats = cross_entropy_fwd_triton(logits, target, weight, ignore_index, eps, 0)
    args = (logits, target, weight, stats, scale, ignore_index, eps)
    return cross_entropy_bwd_triton(*args), reference.cross_entropy_bwd(*args), stats


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(("b", "c"), [(1, 1), (7, 3), (5, 33), (3, 70)])
@pytest.mark.parametrize(("eps", "weighted", "per_row"), [(0.0, False, True), (0.2, True, False)])
def test_rounded_once(tdevice, dtype, b, c, eps, weighted, per_row):
    logits = (torch.randn(b, c, dtype=torch.float64) * 3).to(dtype).to(tdevice)
    target = torch.randint(0, c, (b,), device=tdevice)
    if b > 2:
        target[1] = IGNORE
    weight = (torch.rand(c) + 0.5).to(tdevice) if weighted else None
    scale = (torch.randn(b if per_row else 1) * 2).to(tdevice)
    ours, ref, _ = _run(logits, target, weight, scale, eps)
    assert ours.dtype == dtype and ours.shape == (b, c)
    what = f"{dtype} B={b} C={c} eps={eps}"
    atol = cancelling(scale, weight, eps, b, c)
    exact = exact_grad(logits, target, weight, scale, eps).cpu()
    assert_rounded_once(ours.cpu(), exact, what, atol=atol)
    info = torch.finfo(dtype)  # one step apart at most (subnormals: one subnormal step)
    step = info.eps * ref.double().abs().clamp_min(info.smallest_normal)
    assert bool(((ours.double() - ref.double()).abs().cpu() <= step.cpu() + 64 * atol).all())


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize(
    ("softcap", "zs", "eps"), [(5.0, 0.0, 0.1), (0.0, 0.1, 0.0), (3.0, 0.01, 0.0)]
)
def test_extras_rounded_once(tdevice, dtype, softcap, zs, eps):
    """Soft-capping and the z-loss on the extra forward's statistics (spread 10: some rows
    past the loss bound)."""
    logits = (torch.randn(6, 37, dtype=torch.float64) * 10).to(dtype).to(tdevice)
    target = torch.randint(0, 37, (6,), device=tdevice)
    target[2] = IGNORE
    scale = torch.randn(6, device=tdevice) * 2
    stats = cross_entropy_fwd_extra_triton(logits, target, None, IGNORE, eps, 0, softcap, zs)[2]
    args = (logits, target, None, stats, scale, IGNORE, eps, softcap, zs)
    ours = cross_entropy_bwd_triton(*args)
    exact, atol = exact_extra(logits, target, scale, eps, softcap, zs)
    assert_rounded_once(ours.cpu(), exact, f"{dtype} softcap={softcap} zs={zs}", atol=atol)


def test_column_tiles_unrecorded_rows_and_strides(tdevice, monkeypatch):
    """Rows wider than the tile (a smaller BLOCK), losses past the bound, a float16 loss
    overflow, NaN and infinite logits, strided logits, a bad target (a NaN row)."""
    monkeypatch.setattr(bwd_module, "BLOCK", 16)
    base = (torch.randn(8, 80, dtype=torch.float64) * 2).half()
    logits = base[:, :40].to(tdevice)  # row stride 80
    target = torch.tensor([0, 1, 2, 3, 4, 5, 6, IGNORE], device=tdevice)
    logits[0, 3], logits[0, 0] = 60000.0, -60000.0  # loss 120000: not recorded
    logits[1, 5] = float("nan")
    logits[2, 6] = float("inf")
    logits[3] = logits[3] * 100  # loss past the bound
    scale = torch.rand(8, device=tdevice) + 0.5
    ours, ref, stats = _run(logits, target, None, scale, 0.1)
    assert stats[Stat.VALID, 0] == 0 and stats[Stat.LOSS, 3] > 64
    exact = exact_grad(logits, target, None, scale, 0.1).cpu()
    assert_rounded_once(ours.cpu(), exact, "rows", atol=cancelling(scale, None, 0.1, 8, 40))
    assert torch.equal(ours.isnan(), ref.isnan())
    bad = target.clone()
    bad[4] = 99
    out = cross_entropy_bwd_triton(logits, bad, None, stats, scale, IGNORE, 0.1)
    assert bool(out[4].isnan().all()) and torch.equal(out[5:], ours[5:])


@pytest.mark.parametrize("softcap", [0.0, 4.0])
@pytest.mark.parametrize("block", [16, 2048])  # a row over column tiles; several rows per tile
def test_ignored_rows_with_non_finite_logits(tdevice, monkeypatch, softcap, block):
    """An ignored row's gradient is NaN where F.cross_entropy's is (a NaN or +inf logit, or
    all -inf; soft-capped, a NaN only: reference.cross_entropy_bwd) and 0 otherwise, also
    when a program holds ignored rows of both kinds; it was always 0."""
    monkeypatch.setattr(bwd_module, "BLOCK", block)
    logits = (torch.randn(7, 40, dtype=torch.float64) * 2).bfloat16().to(tdevice)
    target = torch.tensor([0, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 6], device=tdevice)
    logits[1, 35] = float("nan")
    logits[2, 1] = float("inf")
    logits[3] = float("-inf")
    logits[4, 2] = float("-inf")  # p = 0 there: a zero gradient
    stats = cross_entropy_fwd_extra_triton(logits, target, None, IGNORE, 0.1, 0, softcap, 0.0)[2]
    scale = torch.rand(7, device=tdevice) + 0.5
    args = (logits, target, None, stats, scale, IGNORE, 0.1, softcap, 0.0)
    ours = cross_entropy_bwd_triton(*args)
    ref = reference.cross_entropy_bwd(*args)
    nan_rows = [1] if softcap else [1, 2, 3]
    assert ours.isnan().all(1).nonzero().flatten().tolist() == nan_rows
    assert torch.equal(ours.isnan(), ref.isnan())
    assert bool((ours[[r for r in range(1, 6) if r not in nan_rows]] == 0).all())


def test_empty_and_bad_arguments(tdevice):
    stats = torch.empty(len(Stat), 0, device=tdevice)
    for shape in ((0, 5), (0, 0)):
        logits = torch.empty(shape, dtype=torch.bfloat16, device=tdevice)
        target = torch.empty(0, dtype=torch.long, device=tdevice)
        out = cross_entropy_bwd_triton(logits, target, None, stats, torch.ones(1), IGNORE, 0.0)
        assert out.shape == shape
    logits = torch.randn(3, 4, device=tdevice)
    target = torch.zeros(3, dtype=torch.long, device=tdevice)
    stats = torch.zeros(len(Stat), 3, device=tdevice)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        cross_entropy_bwd_triton(logits, target, None, stats, torch.ones(1), IGNORE, 0.0)
    with pytest.raises(ValueError, match="scale must be float32"):
        cross_entropy_bwd_triton(logits.half(), target, None, stats, torch.ones(2), IGNORE, 0.0)


@pytest.mark.parametrize(("weighted", "softcap", "zs"), [(True, 0.0, 0.0), (False, 4.0, 0.1)])
def test_opcheck(tdevice, weighted, softcap, zs):
    logits = (torch.randn(5, 9) * 3).bfloat16().to(tdevice)
    target = torch.tensor([0, 3, IGNORE, 8, 1], device=tdevice)
    weight = (torch.rand(9) + 0.5).to(tdevice) if weighted else None
    stats = cross_entropy_fwd_extra_triton(logits, target, weight, IGNORE, 0.1, 0, softcap, zs)[2]
    torch.library.opcheck(
        torch.ops.csl_fast.cross_entropy_bwd_triton.default,
        (logits, target, weight, stats, torch.rand(5, device=tdevice), IGNORE, 0.1, softcap, zs),
    )


def test_refuses_what_it_would_read_past(tdevice):
    """B targets, C class weights and [NUM_STATS, B] statistics: shorter ones (slices of
    a tensor whose next entries would have been read) are refused by name."""
    logits = torch.randn(4, 5, device=tdevice, dtype=torch.float16)
    target = torch.zeros(4, dtype=torch.long, device=tdevice)
    _, _, stats = cross_entropy_fwd_triton(logits, target, None, IGNORE, 0.0, 0)
    tail = torch.full((10,), 3, dtype=torch.long, device=tdevice)
    weight = torch.full((10,), 1000.0, device=tdevice)
    scale = torch.ones(1, device=tdevice)
    with pytest.raises(ValueError, match="target must be 1-D with B = 4"):
        cross_entropy_bwd_triton(logits, tail[:2], None, stats, scale, IGNORE, 0.0)
    with pytest.raises(ValueError, match="C = 5 class weights"):
        cross_entropy_bwd_triton(logits, target, weight[:2], stats, scale, IGNORE, 0.1)
    with pytest.raises(ValueError, match=r"stats must be the float32 \[7, B = 4\]"):
        cross_entropy_bwd_triton(logits, target, None, stats[:3], scale, IGNORE, 0.0)


def test_an_infinite_class_weight_leaves_ignored_rows_zero_with_smoothing(tdevice):
    """With label smoothing an ignored row's gradient was NaN in the column of an infinite
    class weight (0 * inf), where the C++ backwards (and this kernel's forward) give 0
    (audit helper-113)."""
    logits = torch.randn(3, 5, generator=torch.Generator().manual_seed(0)).half().to(tdevice)
    target = torch.tensor([1, IGNORE, 2], device=tdevice)
    weight = torch.ones(5, device=tdevice)
    weight[4] = float("inf")
    _, _, stats = cross_entropy_fwd_triton(logits, target, weight, IGNORE, 0.1, 0)
    scale = torch.ones(3, device=tdevice)
    ours = cross_entropy_bwd_triton(logits, target, weight, stats, scale, IGNORE, 0.1)
    assert bool((ours[1] == 0).all()), ours[1]
    cpu = torch.ops.csl_fast.cross_entropy_bwd(
        logits.cpu(), target.cpu(), weight.cpu(), stats.cpu(), scale.cpu(), IGNORE, 0.1
    )
    assert torch.equal(ours[1].cpu(), cpu[1])
