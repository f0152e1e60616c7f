"""The binary-cross-entropy Triton ops (csl_fast/_triton/bce.py) against csl_fast.reference,
and csl_fast.accumulate_bce(backend="triton") against F.binary_cross_entropy_with_logits;
tiny shapes (the interpreter is slow). The kernels also compile for sm_90 (a subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_accumulate_bce import (
    _float64_overflow_case,
    _infinite_logits_case,
    _infinite_pos_weight_case,
)
from tolerances import assert_close_f32, assert_no_worse_than_torch

import csl_fast
from csl_fast import reference
from csl_fast._triton import bce_bwd_triton, bce_fwd_triton, bce_record_triton

ROOT = Path(__file__).resolve().parents[2]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _inputs(batch, labels, dtype, device, soft=True):
    logits = (torch.randn(batch, labels) * 4).to(dtype).to(device)
    target = torch.rand(batch, labels) if soft else (torch.rand(batch, labels) < 0.3).float()
    return logits, target.to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("shape", [(5, 1), (3, 37), (2, 1030), (0, 3)])
def test_forward_and_backward_match_the_reference(tdevice, dtype, reduction, shape):
    logits, target = _inputs(*shape, dtype, tdevice)
    weight = torch.rand(shape[1], device=tdevice) + 0.5
    pos_weight = torch.rand(shape[0], 1, device=tdevice) * 2 + 0.2  # broadcast per sample
    loss, stats = bce_fwd_triton(logits, target, weight, pos_weight, reduction)
    ref_loss, ref_stats = reference.bce_fwd(logits, target, weight, pos_weight, reduction)
    exact = reference.bce_fwd(logits.double(), target.double(), weight, pos_weight, reduction)
    assert loss.dtype == dtype and loss.shape == ref_loss.shape
    one = (lambda t: t[None]) if loss.dim() == 0 else (lambda t: t)
    assert_no_worse_than_torch(one(loss), one(ref_loss), one(exact[0]), "loss")
    for k in (reference.BceStat.VALID, reference.BceStat.WRONG):
        assert torch.equal(stats[k], ref_stats[k])
    for k in (reference.BceStat.LOSS, reference.BceStat.MIN_MARGIN):
        assert_close_f32(stats[k], exact[1][k], reference.BceStat(k).name, rtol=4e-6)
    upstream = torch.randn(shape, device=tdevice) * 1.7 if reduction == 0 else torch.tensor(1.7)
    upstream = upstream.to(dtype).to(tdevice)
    grad = bce_bwd_triton(upstream, logits, target, weight, pos_weight, reduction)
    ref_grad = reference.bce_bwd(upstream, logits, target, weight, pos_weight, reduction)
    exact_grad = reference.bce_bwd(
        upstream.double(), logits.double(), target.double(), weight, pos_weight, reduction
    )
    assert_no_worse_than_torch(grad, ref_grad, exact_grad, "grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_infinite_pos_weight_gives_nan(tdevice, dtype):
    """An infinite pos_weight gives NaN gradient entries whatever the target, as PyTorch's
    (tests/test_accumulate_bce.py: test_infinite_pos_weight_as_pytorch); -inf before."""
    logits, target, weight, pos_weight = _infinite_pos_weight_case(dtype)
    args = [t.to(tdevice) for t in (logits, target, weight, pos_weight)]
    upstream = torch.tensor(1.7, dtype=dtype, device=tdevice)
    grad = bce_bwd_triton(upstream, *args, 2)
    ref = reference.bce_bwd(upstream, *args, 2)
    assert ref[:, [0, 1, 3]].isnan().all() and torch.equal(grad.isnan(), ref.isnan())
    torch.testing.assert_close(grad, ref, equal_nan=True, rtol=2 * torch.finfo(dtype).eps, atol=0)


def test_infinite_logits_give_what_pytorch_gives(tdevice):
    """A -inf logit: NaN whatever the target, as PyTorch's (tests/test_accumulate_bce.py:
    test_infinite_logits_as_pytorch); +inf before where the target is above 0."""
    logits, target = (t.to(tdevice) for t in _infinite_logits_case(torch.float32))
    loss, _ = bce_fwd_triton(logits, target, None, None, 0)
    want = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    assert torch.equal(loss.isnan(), want.isnan()), (loss, want)
    torch.testing.assert_close(loss, want, equal_nan=True)


def test_a_float64_loss_past_float32s_range_is_invalid(tdevice):
    """Finite in float64 but inf in the float32 statistics: recorded, it made the sample's
    CSL inf for good."""
    logits, target = _float64_overflow_case()
    _, stats = bce_fwd_triton(logits.to(tdevice), target.to(tdevice), None, None, 0)
    assert stats[1].tolist() == [0.0, 0.0, 1.0]  # BceStat.VALID
    assert stats[:, :2].eq(0).all() and torch.isfinite(stats).all()


def test_strided_inputs_and_upstream(tdevice):
    logits, target = _inputs(6, 9, torch.float32, tdevice)
    wide = torch.zeros(6, 18, device=tdevice)
    wide[:, ::2] = logits
    z = wide[:, ::2]  # column stride 2
    y = target.t().contiguous().t()  # column-major
    upstream = torch.randn(9, 6, device=tdevice).t()
    got = bce_fwd_triton(z, y, None, None, 0)
    want = bce_fwd_triton(logits, target, None, None, 0)
    assert torch.equal(got[0], want[0])  # entry losses: elementwise, the same instructions
    for k in reference.BceStat:
        if k == reference.BceStat.LOSS:
            # A row sum: the compiler lays the tile out after the loads' contiguity (y is
            # column-major here) and tl.sum's order follows the layout, so strided and
            # contiguous inputs may round differently (one compiled kernel is still
            # reproducible run to run). Positive terms: within a few ulps.
            torch.testing.assert_close(got[1][k], want[1][k], rtol=1e-6, atol=0)
        else:  # counts, and a minimum: independent of the order
            assert torch.equal(got[1][k], want[1][k]), k.name
    grad = bce_bwd_triton(upstream, z, y, None, None, 0)
    assert torch.equal(grad, bce_bwd_triton(upstream.contiguous(), logits, target, None, None, 0))


def _buffers(n, labels, device):
    return [
        torch.rand(n, device=device),
        torch.randint(0, 3, (n,), device=device),
        torch.randint(0, 3, (n,), device=device, dtype=torch.int32),
        torch.rand(n, device=device, dtype=torch.float64),
        torch.rand(n, labels, device=device),
        torch.rand(n, labels, device=device, dtype=torch.float64),
        torch.rand(n, labels, device=device),
    ]


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("labels", [1, 7, 1030])
def test_record_matches_the_reference(tdevice, deterministic, dtype, labels):
    batch, n = 12, 4
    logits, target = _inputs(batch, labels, dtype, tdevice)
    logits[5, 0] = float("nan")  # a sample that is not recorded
    index = torch.randint(0, n, (batch,), device=tdevice)  # duplicates
    index[-1] = n  # out of range: skipped
    stats = reference.bce_row_statistics(logits, target)
    got = _buffers(n, labels, tdevice)
    want = [b.cpu().clone() for b in got]
    bce_record_triton(logits, target, stats, index, deterministic, *got)
    got = [b.cpu() for b in got]
    keep = (index < n).cpu()
    # On the CPU the reference adds in batch order, as the deterministic mode. Not on CUDA:
    # there index_put_(accumulate=True) sums each run of duplicate indices first, then adds
    # the run's sum, for rows of up to 32 entries (other roundings).
    reference.bce_record(
        *(t.cpu()[keep] for t in (logits, target)), stats.cpu()[:, keep], index.cpu()[keep],
        True, *want,
    )  # fmt: skip
    names = ("csl", "count", "wrong", "mm", "lc", "lm", "lp")
    for name, a, b in zip(names, got, want, strict=True):
        if deterministic and name not in ("lc", "lp"):
            assert torch.equal(a, b), name
        else:  # float additions in another order, or Triton's own log1p
            torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6, msg=name)
    again = _buffers(n, labels, tdevice)
    for a, b in zip(again, want, strict=True):
        a.copy_(b)
    if deterministic:  # bitwise reproducible
        first = [b.clone() for b in again]
        bce_record_triton(logits, target, stats, index, True, *first)
        second = [b.clone() for b in again]
        bce_record_triton(logits, target, stats, index, True, *second)
        assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_record_with_some_buffers(tdevice):
    logits, target = _inputs(5, 3, torch.float32, tdevice)
    stats = reference.bce_row_statistics(logits, target)
    index = torch.tensor([0, 1, 1, 2, 0], device=tdevice)
    for keep in ([0], [4], [1, 5], [2, 3], [6], [5, 6]):
        got = [b if k in keep else None for k, b in enumerate(_buffers(3, 3, tdevice))]
        want = [None if b is None else b.clone() for b in got]
        bce_record_triton(logits, target, stats, index, False, *got)
        reference.bce_record(logits, target, stats, index, True, *want)
        for a, b in zip(got, want, strict=True):
            if a is not None:
                torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


def test_forward_and_backward_refuse_what_they_would_read_past(tdevice):
    """Called directly, bce_fwd_triton and bce_bwd_triton read B x L entries of the target
    and of the upstream gradient by the logits' shape: a [1, L] target beside [4, L]
    logits gave losses from the memory after it (1,000s here), and an int64 target or
    reduction=5 were taken; each is refused naming the argument, as by the C++ ops."""
    logits, target = _inputs(4, 3, torch.float32, tdevice)
    after = torch.full((4, 3), 1000.0, device=tdevice)
    short = after[:1]
    grad = torch.ones(4, 3, device=tdevice)
    for call, error, said in [
        (lambda: bce_fwd_triton(logits, short, None, None, 0), ValueError, "target of their"),
        (lambda: bce_fwd_triton(logits, target.long(), None, None, 2), TypeError, "dtype"),
        (lambda: bce_fwd_triton(logits, target, None, None, 5), ValueError, "reduction"),
        (lambda: bce_fwd_triton(logits, target, after[0, :2], None, 0), ValueError, "weight"),
        (lambda: bce_bwd_triton(grad[:1], logits, target, None, None, 0), ValueError, "grad"),
        (lambda: bce_bwd_triton(grad, logits, short, None, None, 0), ValueError, "target"),
        (lambda: bce_bwd_triton(grad.sum(), logits, target, None, None, 3), ValueError, "redu"),
    ]:
        with pytest.raises(error, match=said):
            call()


@pytest.mark.parametrize("deterministic", [False, True])
def test_record_refuses_buffers_it_would_write_past(tdevice, deterministic):
    """Every buffer is written at index k < N of the first one given: a shorter, strided or
    [N, L'] one (a slice of a larger tensor here) is refused before any write, by name, as
    by the C++ op; so are stats and an index of another batch."""
    logits, target = _inputs(4, 3, torch.float32, tdevice)
    stats = reference.bce_row_statistics(logits, target)
    index = torch.tensor([0, 3, 3, 1], device=tdevice)
    big = torch.zeros(20, device=tdevice)
    csl = torch.zeros(4, device=tdevice)
    cases = [
        (dict(csl=csl, count=big[:2]), ValueError, "count has 2 rows"),
        (dict(csl=csl, wrong=big[:8:2]), ValueError, r"wrong must be a contiguous 1-D"),
        (dict(csl=csl, label_csl=big[:8].view(4, 2)), ValueError, r"\[N, L = 3\]"),
        (dict(csl=csl, min_margin=big[:4].long()), TypeError, "min_margin must be"),
        (dict(csl=csl, label_prob=big[:6].view(2, 3)), ValueError, "label_prob has 2 rows"),
        (
            dict(csl=csl, label_prob=big[:8].view(4, 2)),
            ValueError,
            r"label_prob must be a contiguous \[N, L = 3\]",
        ),
        (
            dict(csl=csl, label_prob=big[:12].view(3, 4).t()),
            ValueError,
            r"label_prob must be a contiguous \[N, L = 3\]",
        ),
        (
            dict(csl=csl, label_prob=big[:12].view(4, 3).half()),
            TypeError,
            "label_prob must be torch.float32 or torch.float64",
        ),
        (dict(csl=csl, stats=stats[:2]), ValueError, r"stats must be the float32 \[4, B = 4\]"),
        (dict(csl=csl, index=index[:2]), ValueError, r"index must be 1-D .*B = 4"),
        (dict(csl=csl, index=index.float()), TypeError, "int64 or int32"),
    ]
    names = ("csl", "count", "wrong", "min_margin", "label_csl", "label_margin", "label_prob")
    for given, exc, match in cases:
        s, i = given.pop("stats", stats), given.pop("index", index)
        before = big.clone(), csl.clone()
        with pytest.raises(exc, match=match):
            bce_record_triton(logits, target, s, i, deterministic, *map(given.get, names))
        assert torch.equal(big, before[0]) and torch.equal(csl, before[1]), match


@pytest.mark.parametrize("soft", [True, False], ids=["soft", "hard"])
@pytest.mark.parametrize("buf_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", [False, True])
def test_record_label_prob(tdevice, deterministic, dtype, buf_dtype, soft):
    """label_prob alone adds exp(-plain entry loss), the model's probability of the given
    target, at each valid row's index: against torch.exp of the reference's entry losses
    (the kernel's precision) and against sigma(z)^y sigma(-z)^(1-y) in float64. 1030
    labels: two label tiles, which a launch sized for the per-sample buffers only misses."""
    batch, labels, n = 9, 1030, 4
    logits, target = _inputs(batch, labels, dtype, tdevice, soft=soft)
    logits[2, 7] = float("nan")  # row 2 is not recorded
    index = torch.tensor([0, 3, 1, 3, 0, 3, n, -1, 3], device=tdevice)  # duplicates, outside
    stats = reference.bce_row_statistics(logits, target)
    start = torch.rand(n, labels, dtype=buf_dtype, device=tdevice)
    got = start.clone()
    bce_record_triton(logits, target, stats, index, deterministic, *[None] * 6, got)
    got = got.cpu()
    ok = (stats[reference.BceStat.VALID] > 0).cpu() & (index >= 0).cpu() & (index < n).cpu()
    assert ok.tolist() == [True, True, False, True, True, True, False, False, True]
    rows, at = ok.nonzero()[:, 0], index.cpu()[ok]
    prob = torch.exp(-reference.bce_entry_losses(logits, target)).cpu()
    want = start.cpu().clone()
    for i, k in zip(rows.tolist(), at.tolist(), strict=True):  # batch order
        want[k] += prob[i].to(buf_dtype)
    z, y = logits.cpu().double(), target.cpu().double()
    exact_prob = torch.exp(y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z))
    exact = start.cpu().double().index_add(0, at, exact_prob[ok])
    # float64 logits: float64 throughout; else float32 entry losses (Triton's log1p, exp).
    tol = 1e-12 if dtype == torch.float64 and buf_dtype == torch.float64 else 2e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert_close_f32(got, exact, "label_prob", rtol=1e-12 if tol == 1e-12 else 4e-6)
    if deterministic:  # bitwise reproducible
        again = start.clone()
        bce_record_triton(logits, target, stats, index, True, *[None] * 6, again)
        assert torch.equal(again.cpu(), got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_accumulate_bce_on_triton(tdevice, dtype, reduction):
    logits, target = _inputs(7, 5, dtype, tdevice)
    pos_weight = torch.rand(5, device=tdevice) + 0.5
    index = torch.tensor([0, 2, 2, 5, 1, 0, 3], device=tdevice)
    bufs = {
        "csl": torch.zeros(6, device=tdevice),
        "count": torch.zeros(6, device=tdevice),
        "label_csl": torch.zeros(6, 5, device=tdevice),
    }
    z = logits.clone().requires_grad_(True)
    loss = csl_fast.accumulate_bce(
        z, target, index, bufs["csl"], count=bufs["count"], label_csl=bufs["label_csl"],
        pos_weight=pos_weight, reduction=reduction, backend="triton",
    )  # fmt: skip
    upstream = torch.randn_like(loss) * 1.7
    (grad,) = torch.autograd.grad(loss, z, upstream)
    zt = logits.clone().requires_grad_(True)
    want = F.binary_cross_entropy_with_logits(
        zt, target, pos_weight=pos_weight, reduction=reduction
    )
    (want_grad,) = torch.autograd.grad(want, zt, upstream)
    z64 = logits.double().requires_grad_(True)
    exact = F.binary_cross_entropy_with_logits(
        z64, target.double(), pos_weight=pos_weight.double(), reduction=reduction
    )
    (exact_grad,) = torch.autograd.grad(exact, z64, upstream.double())
    one = (lambda t: t.detach()[None]) if loss.dim() == 0 else (lambda t: t.detach())
    assert_no_worse_than_torch(one(loss), one(want), one(exact), "loss")
    assert_no_worse_than_torch(grad, want_grad, exact_grad, "grad")
    plain = F.binary_cross_entropy_with_logits(logits.double(), target.double(), reduction="none")
    want_lc = torch.zeros(6, 5, dtype=torch.float64, device=tdevice).index_add_(0, index, plain)
    assert_close_f32(bufs["label_csl"], want_lc, "label_csl", rtol=4e-6)
    assert_close_f32(bufs["csl"], want_lc.sum(1), "csl", rtol=4e-6)
    assert bufs["count"].tolist() == [2, 1, 2, 1, 0, 1]


def test_kernels_compile_for_sm90():
    if os.environ.get("CSL_FAST_TRITON_AOT", "minimal") == "off":
        pytest.skip("CSL_FAST_TRITON_AOT=off")
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton build has no NVIDIA backend")
    env = dict(
        os.environ,
        TRITON_INTERPRET="0",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    script = Path(__file__).with_name("compile_bce_sm90.py")
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok bce") == 24
