"""The CUDA cross-entropy kernels with soft-capping and the z-loss, run on the CPU through
``csrc/cuda/testing/host_emulation.h`` (as tests/test_cuda_compile.py runs them), against
plain PyTorch formulas on every kernel path (warp, block-in-registers, streaming) and
every logits dtype; and the launch without a gradient (``grad`` null: the glue of
``cross_entropy_fwd_stats`` and ``cross_entropy_fwd_extra_stats``) against the launch with
one. Compiles its own copy of the emulation library (about a minute)."""

from __future__ import annotations

import ctypes
import math

import pytest
import torch
import torch.nn.functional as F
from test_cuda_compile import _DTYPE_CODES, build_emulation
from tolerances import assert_close_f32, assert_no_worse_than_torch

from csl_fast import reference
from csl_fast.stats import NUM_STATS, Stat

IGNORE = -100
_P, _I64, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    lib = build_emulation(tmp_path_factory.mktemp("emu_extras"))
    lib.emu_ce_prep_size.argtypes = [_I64, _I, _I, _D]
    lib.emu_ce_prep_size.restype = _I64
    lib.emu_cross_entropy_fwd_extra.argtypes = [_P, _I, _I64, _I64, _P, _I64, _D, _I]
    lib.emu_cross_entropy_fwd_extra.argtypes += [_P, _P, _P, _P, _D, _D, _P]
    return lib


def _run(lib, logits, target, eps, reduction, softcap, zs, with_grad=True):
    """What ops_cuda.cpp does around the launcher: (loss, grad, stats, z_loss); without
    ``with_grad`` the launch gets no gradient buffer and ``grad`` is None."""
    batch, classes = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    n_prep = lib.emu_ce_prep_size(batch, reduction, 0, eps)
    prep = torch.full((max(n_prep, 1),), math.nan, dtype=acc)
    objective = torch.full((batch,), math.nan, dtype=acc)
    z_rows = torch.full((batch,), math.nan, dtype=acc)
    grad = torch.full((batch, classes), math.nan, dtype=logits.dtype) if with_grad else None
    stats = torch.full((NUM_STATS, batch), math.nan)
    t = target.long().contiguous()
    rc = lib.emu_cross_entropy_fwd_extra(
        logits.data_ptr(), _DTYPE_CODES[logits.dtype], batch, classes, t.data_ptr(), IGNORE,
        eps, reduction, prep.data_ptr() if n_prep else None, objective.data_ptr(),
        None if grad is None else grad.data_ptr(), stats.data_ptr(), softcap, zs,
        z_rows.data_ptr() if zs else None,
    )  # fmt: skip
    assert rc == 0, f"launcher returned cudaError {rc}"

    def reduce(rows):
        if reduction == 0:
            return rows.to(logits.dtype)
        total = rows.sum() if reduction == 2 else rows.sum() / prep[0]
        return total.to(logits.dtype)[None]

    return reduce(objective), grad, stats, reduce(z_rows) if zs else None


def _formula(z, target, reduction, softcap, zs, eps):
    zc = softcap * torch.tanh(z / softcap) if softcap else z
    ce = F.cross_entropy(
        zc,
        target,
        ignore_index=IGNORE,
        label_smoothing=eps,
        reduction=("none", "mean", "sum")[reduction],
    )
    active = target != IGNORE
    rows = torch.where(active, zs * torch.logsumexp(zc, 1) ** 2, torch.zeros((), dtype=z.dtype))
    zl = rows if reduction == 0 else rows.sum() if reduction == 2 else rows.sum() / active.sum()
    return (ce + zl).reshape(-1), zl.reshape(-1)


def _with_grad(z, *args):
    z = z.detach().clone().requires_grad_(True)
    loss, zl = _formula(z, *args)
    (g,) = torch.autograd.grad(loss.sum(), z)
    return loss.detach(), g, zl.detach()


# (classes, batch) per kernel path: warp N=1/4/16, block E=4, E=8 (float64: streaming), streaming.
_PATHS = [(7, 13), (100, 11), (513, 9), (5000, 3), (9000, 2)]


@pytest.mark.parametrize(("classes", "batch"), _PATHS)
@pytest.mark.parametrize("dtype", list(_DTYPE_CODES), ids=str)
@pytest.mark.parametrize(
    ("softcap", "zs", "eps", "red"), [(0.0, 1e-2, 0.0, 1), (5.0, 0.0, 0.1, 0), (3.0, 0.1, 0.0, 2)]
)
def test_emulated_extras(emu, classes, batch, dtype, softcap, zs, eps, red):
    logits = (torch.randn(batch, classes, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, classes, (batch,))
    target[1] = IGNORE
    loss, grad, stats, zl = _run(emu, logits, target, eps, red, softcap, zs)
    args = (target, red, softcap, zs, eps)
    same = _with_grad(logits, *args)
    exact = _with_grad(logits.double(), *args)
    what = f"{dtype} C={classes} cap={softcap} zs={zs} red={red}"
    assert_no_worse_than_torch(loss, same[0], exact[0], f"{what} loss")
    assert_no_worse_than_torch(grad, same[1], exact[1], f"{what} grad")
    if zs:
        assert_no_worse_than_torch(zl, same[2], exact[2], f"{what} z_loss")
    want = reference.row_statistics(logits, target, IGNORE, softcap)
    want64 = reference.row_statistics(logits.double(), target, IGNORE, softcap)
    for k in (Stat.CORRECT, Stat.VALID, Stat.OTHER_ARGMAX):
        assert torch.equal(stats[k], want[k]), Stat(k).name
    for k in (Stat.LOSS, Stat.P_TRUE, Stat.MARGIN, Stat.GRAD_NORM_SQ):
        assert_close_f32(stats[k], want64[k], Stat(k).name, rtol=3e-5)


@pytest.mark.parametrize(("classes", "batch"), _PATHS)
@pytest.mark.parametrize("dtype", list(_DTYPE_CODES), ids=str)
@pytest.mark.parametrize(
    ("softcap", "zs", "eps", "red"), [(0.0, 0.0, 0.1, 1), (0.0, 0.0, 0.0, 0), (3.0, 0.1, 0.1, 2)]
)
def test_emulated_without_gradient(emu, classes, batch, dtype, softcap, zs, eps, red):
    """No gradient buffer: loss, statistics and z-loss bit for bit those of the launch that
    writes the gradient, on every kernel path (the plain kernel with the extras off)."""
    logits = (torch.randn(batch, classes, dtype=torch.float64) * 4).to(dtype)
    target = torch.randint(0, classes, (batch,))
    target[1] = IGNORE
    loss, _, stats, zl = _run(emu, logits, target, eps, red, softcap, zs)
    got = _run(emu, logits, target, eps, red, softcap, zs, with_grad=False)
    assert got[1] is None
    assert torch.equal(got[0], loss) and torch.equal(got[2], stats)
    assert (zl is None and got[3] is None) or torch.equal(got[3], zl)


@pytest.mark.parametrize("classes", [7, 100, 513, 5000, 9000])  # every kernel path
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_emulated_ignored_non_finite_rows(emu, classes, softcap):
    """An ignored row's gradient is NaN where the reference's is (a NaN or +inf logit, or all
    -inf; soft-capped logits are finite, so a NaN only) and 0 otherwise."""
    logits = torch.randn(7, classes)
    logits[1, classes - 1] = math.nan
    logits[2, 1] = math.inf
    logits[3] = -math.inf
    logits[4, 2] = -math.inf  # p = 0 there: a zero gradient
    target = torch.randint(0, classes, (7,))
    target[1:6] = IGNORE
    _, grad, _, _ = _run(emu, logits, target, 0.1, 1, softcap, 0.01)
    args = (target, None, IGNORE, 0.1, 1, softcap, 0.01)
    _, ref, _, _ = reference.cross_entropy_fwd_extra(logits, *args)
    nan_rows = [1] if softcap else [1, 2, 3]
    assert grad.isnan().all(1).nonzero().flatten().tolist() == nan_rows
    assert torch.equal(grad.isnan(), ref.isnan())
    assert bool((grad[[r for r in range(1, 6) if r not in nan_rows]] == 0).all())
