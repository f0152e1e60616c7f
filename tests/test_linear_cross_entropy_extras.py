"""linear_cross_entropy with soft-capping, the z-loss and per-token accuracy (issue 15,
item 6): loss, z-loss and the gradients of hidden, weight and bias against the plain
PyTorch formula on the full logits, on every CPU-runnable backend."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_f32, assert_no_worse_than_torch

import csl_fast
from csl_fast import CrossEntropyOutput
from csl_fast.linear_cross_entropy import linear_cross_entropy

IGNORE = -100


def _backends():
    have = csl_fast.available_backends("cpu")
    return [b for b in ("reference", "cpu", "triton") if b in have]


def _inputs(b=2, t=7, h=6, v=23, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    target = torch.randint(0, v, (b, t), generator=g)
    target[0, -2:] = IGNORE
    return [x.to(dtype) for x in (hidden, weight, bias)], target


def _formula(hidden, weight, bias, target, reduction, softcap, zs):
    z = F.linear(hidden, weight, bias).flatten(0, 1)
    zc = softcap * torch.tanh(z / softcap)
    flat = target.reshape(-1)
    ce = F.cross_entropy(zc, flat, ignore_index=IGNORE, reduction=reduction)
    active = flat != IGNORE
    rows = torch.where(active, zs * torch.logsumexp(zc, 1) ** 2, torch.zeros((), dtype=z.dtype))
    acc = ((zc.argmax(1) == flat) & active).float()
    if reduction == "none":
        return (ce + rows).view(target.shape), rows.view(target.shape), acc.view(target.shape)
    zl = rows.sum() if reduction == "sum" else rows.sum() / active.sum()
    return ce + zl, zl, acc.sum() / active.sum()


def _leaves(ts):
    return [t.detach().clone().requires_grad_(True) for t in ts]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_formula(backend, dtype, reduction):
    if backend == "triton" and (dtype != torch.float32 or reduction == "sum"):
        pytest.skip("the interpreter is slow: one dtype and two reductions for triton")
    params64, target = _inputs()
    params64[1] = params64[1] * 0.7
    cap, zs = 3.0, 0.05
    index = torch.tensor([1, 0])
    csl, count = torch.zeros(2), torch.zeros(2)
    ours_p = _leaves([p.to(dtype) for p in params64])
    out = linear_cross_entropy(
        ours_p[0], ours_p[1], target, index, csl, ours_p[2], count=count, reduction=reduction,
        chunk_size=5, backend=backend, softcap=cap, z_loss_scale=zs, return_z_loss=True,
        return_token_accuracy=True,
    )  # fmt: skip
    assert isinstance(out, CrossEntropyOutput)
    torch_p = _leaves([p.to(dtype) for p in params64])
    exact_p = _leaves(params64)
    theirs = _formula(*torch_p, target, reduction, cap, zs)
    exact = _formula(*exact_p, target, reduction, cap, zs)
    up = torch.rand(exact[0].shape, dtype=torch.float64) + 0.5
    what = f"{backend} {dtype} {reduction}"
    assert out.loss.shape == exact[0].shape and out.loss.dtype == dtype
    assert_no_worse_than_torch(out.loss.detach(), theirs[0].detach(), exact[0].detach(), what)
    # detached as documented: it held the step's graph ('mean', or a cast to out's dtype)
    assert not out.z_loss.requires_grad and out.z_loss.grad_fn is None, what
    assert_no_worse_than_torch(out.z_loss, theirs[1].detach(), exact[1].detach(), f"{what} z")
    torch.testing.assert_close(out.token_accuracy, exact[2].float())
    grads = [
        torch.autograd.grad((loss * up.to(loss.dtype)).sum(), p)
        for loss, p in ((out.loss, ours_p), (theirs[0], torch_p), (exact[0], exact_p))
    ]
    for name, a, r, e in zip(("hidden", "weight", "bias"), *grads, strict=True):
        assert_no_worse_than_torch(a, r, e, f"{what} grad_{name}")
    # CSL: each sequence's summed plain loss of the capped logits, without the z-loss.
    z = F.linear(*[p.to(dtype).double() for p in params64]).flatten(0, 1)
    tok = F.cross_entropy(
        cap * torch.tanh(z / cap), target.reshape(-1), ignore_index=IGNORE, reduction="none"
    ).view(target.shape)
    expect = torch.zeros(2, dtype=torch.float64).index_add_(0, index, tok.sum(1))
    assert_close_f32(csl, expect, f"{what} csl", rtol=1e-5)
    torch.testing.assert_close(count, torch.tensor([7.0, 5.0]))


def test_gradcheck_float64():
    params, target = _inputs(b=1, t=5, h=3, v=7)

    def fn(h, w, b):
        return linear_cross_entropy(
            h, w, target, bias=b, chunk_size=2, softcap=2.0, z_loss_scale=0.1, reduction="sum"
        )

    assert torch.autograd.gradcheck(fn, _leaves(params))


def test_refused():
    params, target = _inputs()
    with pytest.raises(ValueError, match="softcap must be a finite number > 0"):
        linear_cross_entropy(*params[:2], target, softcap=-2.0)
    with pytest.raises(ValueError, match="z_loss_scale must be finite and >= 0"):
        linear_cross_entropy(*params[:2], target, z_loss_scale=-1.0)
