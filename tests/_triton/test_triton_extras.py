"""csl_fast::cross_entropy_fwd_extra_triton (soft-capping, z-loss) against plain PyTorch
formulas, fused and two-pass paths, in place too (interpreter on CPU, tiny shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_no_worse_than_torch

from csl_fast import reference
from csl_fast._triton import cross_entropy, cross_entropy_fwd_extra_triton
from csl_fast._triton.cross_entropy_extra import (
    cross_entropy_fwd_extra_inplace_triton,
    cross_entropy_fwd_extra_stats_triton,
)

IGNORE = -100
RED = ("none", "mean", "sum")


def _formula(z, target, reduction, softcap, zs, smoothing=0.0, weight=None):
    zc = z if not softcap else softcap * torch.tanh(z / softcap)
    ce = F.cross_entropy(
        zc, target, weight=weight, ignore_index=IGNORE, label_smoothing=smoothing,
        reduction=RED[reduction],
    )  # fmt: skip
    active = target != IGNORE
    rows = torch.where(active, zs * torch.logsumexp(zc, 1) ** 2, torch.zeros((), dtype=z.dtype))
    zl = rows if reduction == 0 else rows.sum() if reduction == 2 else rows.sum() / active.sum()
    return ce + zl, zl


def _grad(fn, logits):
    z = logits.detach().clone().requires_grad_(True)
    loss, zl = fn(z)
    (g,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), g, zl.detach()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize(("softcap", "zs"), [(None, 1e-2), (4.0, 0.0), (2.5, 0.2)])
@pytest.mark.parametrize("two_pass", [False, True])
def test_extra_matches_formula(tdevice, monkeypatch, dtype, reduction, softcap, zs, two_pass):
    if two_pass:
        monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
        monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 8)
    batch, classes = 7, 19
    logits = (torch.randn(batch, classes, dtype=torch.float64) * 4).to(dtype).to(tdevice)
    target = torch.randint(0, classes, (batch,), device=tdevice)
    target[1::3] = IGNORE
    smoothing = 0.1 if reduction == 1 else 0.0
    loss, grad, stats, zl = cross_entropy_fwd_extra_triton(
        logits, target, None, IGNORE, smoothing, reduction, softcap or 0.0, zs
    )
    args = (target, reduction, softcap, zs, smoothing)
    ours_dtype = _grad(lambda z: _formula(z, *args), logits)
    exact = _grad(lambda z: _formula(z, *args), logits.double())
    what = f"{dtype} red={reduction} cap={softcap} zs={zs} two_pass={two_pass}"
    assert loss.dtype == zl.dtype == grad.dtype == dtype
    assert_no_worse_than_torch(loss, ours_dtype[0], exact[0], f"{what} loss")
    assert_no_worse_than_torch(zl, ours_dtype[2], exact[2], f"{what} z_loss")
    assert_no_worse_than_torch(grad, ours_dtype[1], exact[1], f"{what} grad")
    ref_stats = reference.row_statistics(logits.cpu(), target.cpu(), IGNORE, softcap or 0.0)
    torch.testing.assert_close(stats.cpu(), ref_stats, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("two_pass", [False, True])
def test_extra_in_place(tdevice, monkeypatch, two_pass):
    if two_pass:
        monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
        monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 8)
    logits = torch.randn(5, 13, device=tdevice) * 3
    target = torch.randint(0, 13, (5,), device=tdevice)
    loss, grad, stats, zl = cross_entropy_fwd_extra_triton(
        logits, target, None, IGNORE, 0.0, 0, 3.0, 0.05
    )
    z = logits.clone()
    loss2, stats2, zl2 = cross_entropy_fwd_extra_inplace_triton(
        z, target, None, IGNORE, 0.0, 0, 3.0, 0.05
    )
    assert torch.equal(z, grad) and torch.equal(loss, loss2) and torch.equal(zl, zl2)
    assert torch.equal(stats, stats2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("two_pass", [False, True])
def test_extra_stats_only(tdevice, monkeypatch, dtype, two_pass):
    """cross_entropy_fwd_extra_stats_triton (no gradient pass): the loss, statistics and
    z-loss of the op with gradient, bit for bit on both paths (the statistics within float32
    rounding on a GPU); opcheck."""
    if two_pass:
        monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
        monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 8)
    logits = (torch.randn(6, 29, device=tdevice) * 3).to(dtype)
    target = torch.randint(0, 29, (6,), device=tdevice)
    target[2] = IGNORE
    for reduction, cap, zs in [(0, 3.0, 0.05), (1, 0.0, 0.05), (2, 3.0, 0.0)]:
        args = (target, None, IGNORE, 0.1, reduction, cap, zs)
        loss, _, stats, zl = cross_entropy_fwd_extra_triton(logits, *args)
        got = cross_entropy_fwd_extra_stats_triton(logits, *args)
        assert torch.equal(got[0], loss) and torch.equal(got[2], zl)
        if tdevice == "cuda":
            # Two compiled kernels: ptxas may fuse a multiply-add in one and not the other (an
            # H200 run differed in the last bits of a float16 row's statistics).
            torch.testing.assert_close(got[1], stats, rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(got[1], stats)
    torch.library.opcheck(
        torch.ops.csl_fast.cross_entropy_fwd_extra_stats_triton.default,
        (logits, target, None, IGNORE, 0.1, 1, 3.0, 0.05),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_tanh_matches_torch(tdevice):
    """The kernel's libdevice-free tanh, through the capped logits' statistics: the
    recorded loss of z' = s tanh(z / s) at |z / s| from 1e-6 to 20."""
    s = 1.0
    mags = torch.logspace(-6, 1.3, 64, dtype=torch.float64)
    z = torch.stack([mags, -mags, torch.zeros_like(mags)], 1).float().to(tdevice)
    target = torch.zeros(64, dtype=torch.long, device=tdevice)
    _, _, stats, _ = cross_entropy_fwd_extra_triton(z, target, None, IGNORE, 0.0, 0, s, 0.0)
    zc = s * torch.tanh(z.double().cpu() / s)
    exact = torch.logsumexp(zc, 1) - zc[:, 0]
    torch.testing.assert_close(stats[0].double().cpu(), exact, rtol=4e-6, atol=1e-7)
