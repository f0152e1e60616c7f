"""The CUDA kernel of csl_fast::cross_entropy_bwd (the float16/bfloat16 backward in one
elementwise pass), run on the CPU through ``csrc/cuda/testing/host_emulation.h``: against
float64 rounded once, on the statistics of the C++ forward, with weights, smoothing,
ignored rows, a bad target, strided rows, rows past the loss bound and unrecorded rows,
rows split over several warps' chunks. Compiles its own copy of the emulation library."""

from __future__ import annotations

import ctypes

import pytest
import torch
from test_cuda_compile import _DTYPE_CODES, build_emulation
from test_ops_backward import IGNORE, cancelling, exact_extra, exact_grad
from tolerances import assert_rounded_once

from csl_fast import _ext, reference
from csl_fast.stats import Stat

_P, _I64, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = build_emulation(tmp_path_factory.mktemp("emu_bwd"))
    lib.emu_cross_entropy_bwd.argtypes = [_P, _I, _I64, _I64, _I64, _P, _I64, _P, _P, _D]
    lib.emu_cross_entropy_bwd.argtypes += [_P, _P, _I, _P, _P, _D, _D]
    return lib


def _stats(logits, target, weight, eps):
    if _ext._C is not None:
        return torch.ops.csl_fast.cross_entropy_fwd(logits, target, weight, IGNORE, eps, 0)[2]
    return reference.row_statistics(logits, target, IGNORE)


def _run(lib, logits, target, weight, stats, scale, eps, softcap=0.0, zs=0.0):
    """What ops_cuda.cpp does around the launcher: (grad, error flag)."""
    batch, classes = logits.shape
    assert logits.stride(1) == 1
    w = None if weight is None else weight.float().contiguous()
    w_sum = None if w is None else w.sum().reshape(1)
    t = target.long().contiguous()
    sc = scale.reshape(-1).contiguous()
    grad = torch.full((batch, classes), float("nan"), dtype=logits.dtype)
    flag = torch.zeros(1, dtype=torch.int32)
    rc = lib.emu_cross_entropy_bwd(
        logits.data_ptr(), _DTYPE_CODES[logits.dtype], batch, classes, logits.stride(0),
        t.data_ptr(), IGNORE, None if w is None else w.data_ptr(),
        None if w_sum is None else w_sum.data_ptr(), eps, stats.contiguous().data_ptr(),
        sc.data_ptr(), int(sc.numel() == batch and batch > 1), grad.data_ptr(), flag.data_ptr(),
        softcap, zs,
    )  # fmt: skip
    assert rc == 0, f"launcher returned cudaError {rc}"
    return grad, int(flag.item())


# (classes, batch): one chunk per row, several chunks (kBwdChunk = 4096) per row.
@pytest.mark.parametrize(("classes", "batch"), [(1, 3), (7, 13), (100, 5), (4097, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("eps", "weighted", "per_row"), [(0.0, False, True), (0.1, True, False)])
def test_emulated_bwd(emu, classes, batch, dtype, eps, weighted, per_row):
    logits = (torch.randn(batch, classes, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, classes, (batch,))
    if batch > 2:
        target[1] = IGNORE
    weight = torch.rand(classes) + 0.5 if weighted else None
    scale = torch.randn(batch if per_row else 1) * 2
    stats = _stats(logits, target, weight, eps)
    grad, flag = _run(emu, logits, target, weight, stats, scale, eps)
    assert flag == 0
    exact = exact_grad(logits, target, weight, scale, eps)
    atol = cancelling(scale, weight, eps, batch, classes)
    assert_rounded_once(grad, exact, f"{dtype} C={classes} eps={eps}", atol=atol)


@pytest.mark.parametrize(("classes", "batch"), [(7, 13), (4097, 2)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_emulated_bwd_non_finite_class_weight_reaches_only_its_rows(
    emu, classes, batch, dtype, bad
):
    """Without label smoothing class 0's weight enters only the rows of class 0 (as in
    F.cross_entropy): the kernel once multiplied it by eps = 0 in every row's gradient."""
    logits = (torch.randn(batch, classes, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(1, classes, (batch,))
    target[1] = IGNORE
    weight = torch.rand(classes) + 0.5
    stats = _stats(logits, target, weight, 0.0)
    weight[0] = bad
    grad, flag = _run(emu, logits, target, weight, stats, torch.ones(1), 0.0)
    assert flag == 0 and grad.isfinite().all() and grad[1].eq(0).all()
    weight[0] = 1.0
    finite, _ = _run(emu, logits, target, weight, stats, torch.ones(1), 0.0)
    assert torch.equal(grad, finite)


@pytest.mark.parametrize(("classes", "batch"), [(7, 9), (4097, 2)])
@pytest.mark.parametrize(("softcap", "zs", "eps"), [(5.0, 0.0, 0.1), (3.0, 0.01, 0.0)])
def test_emulated_bwd_extras(emu, classes, batch, softcap, zs, eps):
    """Soft-capping and the z-loss, on the extra forward's statistics (spread 10)."""
    logits = (torch.randn(batch, classes, dtype=torch.float64) * 10).bfloat16()
    target = torch.randint(0, classes, (batch,))
    scale = torch.randn(batch) * 2
    args = (logits, target, None, IGNORE, eps, 0, softcap, zs)
    if _ext._C is not None:
        stats = torch.ops.csl_fast.cross_entropy_fwd_extra(*args)[2]
    else:
        stats = reference.cross_entropy_fwd_extra(*args)[2]
    grad, flag = _run(emu, logits, target, None, stats, scale, eps, softcap, zs)
    assert flag == 0
    exact, atol = exact_extra(logits, target, scale, eps, softcap, zs)
    assert_rounded_once(grad, exact, f"C={classes} softcap={softcap} zs={zs}", atol=atol)


def test_emulated_bwd_row_kinds(emu):
    """Strided rows, a loss past the bound, a float16 loss overflow (not recorded), NaN and
    infinite logits, a bad target (NaN row and the error flag)."""
    base = (torch.randn(7, 80, dtype=torch.float64) * 2).half()
    logits = base[:, :40]  # row stride 80
    target = torch.tensor([0, 1, 2, 3, 4, IGNORE, 6])
    logits[0, 3], logits[0, 0] = 60000.0, -60000.0
    logits[1, 5] = float("nan")
    logits[2, 6] = float("inf")
    logits[3] = logits[3] * 100
    scale = torch.rand(7) + 0.5
    stats = _stats(logits, target, None, 0.1)
    assert stats[Stat.VALID, 0] == 0 and stats[Stat.LOSS, 3] > 64
    grad, flag = _run(emu, logits, target, None, stats, scale, 0.1)
    assert flag == 0
    exact = exact_grad(logits, target, None, scale, 0.1)
    assert_rounded_once(grad, exact, "row kinds", atol=cancelling(scale, None, 0.1, 7, 40))
    bad = target.clone()
    bad[4] = 99
    out, flag = _run(emu, logits, bad, None, stats, scale, 0.1)
    assert flag == 1 and bool(out[4].isnan().all()) and torch.equal(out[5:], grad[5:])


@pytest.mark.parametrize("classes", [40, 9000])  # one chunk per row; three (kBwdChunk 4096)
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_emulated_bwd_ignored_non_finite_rows(emu, classes, softcap):
    """An ignored row's gradient is NaN where F.cross_entropy's is (a NaN or +inf logit, or
    all -inf; soft-capped, a NaN only: reference.cross_entropy_bwd) and 0 otherwise, the
    whole row (the output starts as NaN), with the offending logit in the last chunk."""
    logits = (torch.randn(7, classes, dtype=torch.float64) * 2).bfloat16()
    target = torch.tensor([0, IGNORE, IGNORE, IGNORE, IGNORE, IGNORE, 6])
    logits[1, classes - 1] = float("nan")
    logits[2, classes - 2] = float("inf")
    logits[3] = float("-inf")
    logits[4, 2] = float("-inf")  # p = 0 there: a zero gradient
    scale = torch.rand(7) + 0.5
    fwd = torch.ops.csl_fast.cross_entropy_fwd_extra if _ext._C is not None else None
    if fwd is not None:
        stats = fwd(logits, target, None, IGNORE, 0.1, 0, softcap, 0.0)[2]
    else:
        stats = reference.row_statistics(logits, target, IGNORE, softcap)
    grad, flag = _run(emu, logits, target, None, stats, scale, 0.1, softcap=softcap)
    assert flag == 0
    ref = reference.cross_entropy_bwd(logits, target, None, stats, scale, IGNORE, 0.1, softcap)
    nan_rows = [1] if softcap else [1, 2, 3]
    assert grad.isnan().all(1).nonzero().flatten().tolist() == nan_rows
    assert torch.equal(grad.isnan(), ref.isnan())
    assert bool((grad[[r for r in range(1, 6) if r not in nan_rows]] == 0).all())
