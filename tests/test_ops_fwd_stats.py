"""The ops that form no gradient (csl_fast::cross_entropy_fwd_stats and
cross_entropy_fwd_extra_stats) on the C++ kernels: bit for bit the loss and statistics of
the ops that do, on every dtype, row kind and option; the float16/bfloat16 forward under
autograd (C++ step, op by op, extras) and no-grad passes use them and allocate no
logits-sized buffer; the gradient after backward is the one the forward-with-gradient path
gave, bit for bit. (Triton: tests/_triton/test_triton_cross_entropy.py and
test_triton_extras.py; the CUDA kernels through host emulation:
tests/test_cuda_extras_emulated.py.)"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import csl_fast
from csl_fast import _ext, ops_backward

pytestmark = pytest.mark.skipif(_ext._C is None, reason="compiled extension not built")

IGNORE = -100
DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
# Rows of one class, narrow blocks (C <= 32), a wide row, rows over several 512-chunks.
CLASSES = [1, 10, 33, 1500]
# (softcap, z-loss scale) of the extras' ops.
EXTRAS = [(0.0, 1e-3), (5.0, 0.0), (5.0, 1e-2)]


@pytest.fixture
def cxx(device):
    if _ext.backend_status(device).get("cpu" if device == "cpu" else "cuda") is not None:
        pytest.skip(f"no C++ kernels for {device}")
    return "cpu" if device == "cpu" else "cuda"


def _batch(batch, classes, dtype, device, strided=False):
    """Logits (a column slice when ``strided``: rows with a stride of their own), targets
    with ignored rows, class weights."""
    width = classes + 3 if strided else classes
    logits = (torch.randn(batch, width, dtype=torch.float64) * 3)[:, :classes]
    target = torch.randint(0, classes, (batch,))
    target[1::4] = IGNORE
    weight = torch.rand(classes) + 0.5
    return logits.to(dtype).to(device), target.to(device), weight.to(device)


def _same(a, b):
    return (
        a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.nan_to_num(7), b.nan_to_num(7))
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("classes", CLASSES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_bit_for_bit_the_ops_with_gradient(cxx, device, dtype, classes, reduction):
    torch.manual_seed(classes + reduction)
    for batch, strided, weighted, eps in [
        (9, False, False, 0.0),
        (70, True, True, 0.1),
        (0, 0, 0, 0),
    ]:
        logits, target, weight = _batch(batch, classes, dtype, device, strided)
        args = (target, weight if weighted else None, IGNORE, eps, reduction)
        loss, _, stats = torch.ops.csl_fast.cross_entropy_fwd(logits, *args)
        got_loss, got_stats = torch.ops.csl_fast.cross_entropy_fwd_stats(logits, *args)
        assert _same(got_loss, loss) and _same(got_stats, stats), (batch, strided, weighted)
        for cap, zs in EXTRAS:  # the z-loss is refused with class weights
            args = (target, None, IGNORE, eps, reduction, cap, zs)
            loss, _, stats, zl = torch.ops.csl_fast.cross_entropy_fwd_extra(logits, *args)
            got = torch.ops.csl_fast.cross_entropy_fwd_extra_stats(logits, *args)
            assert _same(got[0], loss) and _same(got[1], stats) and _same(got[2], zl), (cap, zs)


def test_opcheck(cxx, device):
    logits, target, weight = _batch(7, 11, torch.float32, device)
    torch.library.opcheck(
        torch.ops.csl_fast.cross_entropy_fwd_stats.default, (logits, target, weight, IGNORE, 0.1, 1)
    )
    torch.library.opcheck(
        torch.ops.csl_fast.cross_entropy_fwd_extra_stats.default,
        (logits, target, None, IGNORE, 0.1, 1, 5.0, 1e-3),
    )


def _forward_allocations(fn):
    """(the largest number of bytes any op allocated in ``fn``, net, children included; the
    csl_fast ops called), from the profiler's memory accounting on the CPU."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.events()
    largest = max((e.cpu_memory_usage for e in events), default=0)
    return largest, {e.name for e in events if e.name.startswith("csl_fast::")}


# A [B, C] logits-sized buffer: 64 * 2048 * 2 bytes = 256 KiB; everything else the forward
# allocates is [B] or [7, B] (a few KiB).
_B, _C = 64, 2048


def test_the_allocation_check_can_fail():
    logits, target, _ = _batch(_B, _C, torch.bfloat16, "cpu")
    largest, names = _forward_allocations(
        lambda: torch.ops.csl_fast.cross_entropy_fwd(logits, target, None, IGNORE, 0.0, 0)
    )
    assert largest >= logits.nbytes and names == {"csl_fast::cross_entropy_fwd"}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("path", ["step", "op_by_op", "extras", "no_grad"])
def test_forward_allocates_no_logits_sized_buffer(dtype, path):
    """float16/bfloat16 under autograd (backward forms the gradient) and every dtype without
    grad: the ops that form no gradient, nothing of the logits' size allocated."""
    if dtype == torch.float32 and path != "no_grad":
        pytest.skip("float32's backward is a scale of the forward's gradient: it is formed")
    torch.manual_seed(0)
    logits, target, _ = _batch(_B, _C, dtype, "cpu")
    logits.requires_grad_(path != "no_grad")
    index = torch.randint(0, 16, (_B,))
    csl = torch.zeros(16)
    options = {"op_by_op": {"validate": True}, "extras": {"softcap": 30.0, "z_loss_scale": 1e-4}}
    largest, names = _forward_allocations(
        lambda: csl_fast.accumulate(logits, target, index, csl, **options.get(path, {}))
    )
    assert largest < logits.nbytes // 4, (largest, names)
    stats_op = "cross_entropy_fwd_extra_stats" if path == "extras" else "cross_entropy_fwd_stats"
    assert f"csl_fast::{stats_op}" in names, names
    assert not names & {"csl_fast::cross_entropy_fwd", "csl_fast::cross_entropy_fwd_extra"}


def _old_path(logits, target, weight, eps, reduction, cap, zs):
    """What the float16/bfloat16 forward and backward computed when the forward formed the
    gradient (and dropped it): the op with gradient per row, the one-pass backward on its
    statistics; the mean's value that of the op without the gradient (a call without grad:
    formed in float32 and rounded once, not from the rows rounded first). (loss,
    d sum(loss * 1.5) / d logits)."""
    extras = cap or zs
    if extras:
        args = (target, weight, IGNORE, eps, 0 if reduction == 1 else reduction, cap, zs)
        loss, _, stats, _ = torch.ops.csl_fast.cross_entropy_fwd_extra(logits, *args)
    else:
        args = (target, weight, IGNORE, eps, 0 if reduction == 1 else reduction)
        loss, _, stats = torch.ops.csl_fast.cross_entropy_fwd(logits, *args)
    scale = torch.tensor([1.5])
    if reduction == 1:
        active = target != IGNORE
        denom = (
            active.sum(dtype=torch.float32)
            if weight is None
            else torch.where(active, weight.float()[target.clamp(min=0)], 0.0).sum()
        )
        if extras:
            loss = torch.ops.csl_fast.cross_entropy_fwd_extra_stats(
                logits, target, weight, IGNORE, eps, 1, cap, zs
            )[0]
        else:
            loss = torch.ops.csl_fast.cross_entropy_fwd_stats(
                logits, target, weight, IGNORE, eps, 1
            )[0]
        scale = scale / denom
    elif reduction == 0:
        scale = scale.expand(logits.shape[0])
    grad = ops_backward.cross_entropy_bwd(
        logits, target, weight, stats, scale, IGNORE, eps, cap, zs, backend="cpu"
    )
    return loss, grad


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize(
    ("weighted", "eps", "cap", "zs", "validate"),
    [(False, 0.0, 0.0, 0.0, False), (True, 0.1, 0.0, 0.0, True), (False, 0.1, 5.0, 1e-2, False)],
)
def test_loss_and_gradient_as_before(dtype, reduction, weighted, eps, cap, zs, validate):
    """accumulate's loss and logits gradient (C++ step; op by op; extras) are those of the
    path that formed the forward's gradient, bit for bit."""
    torch.manual_seed(3)
    logits, target, weight = _batch(37, 300, dtype, "cpu")
    weight = weight if weighted else None
    z = logits.clone().requires_grad_(True)
    extras = {"softcap": cap, "z_loss_scale": zs} if cap or zs else {}
    loss = csl_fast.accumulate(
        z, target, torch.arange(37), torch.zeros(37), weight=weight, label_smoothing=eps,
        reduction=reduction, validate=validate, **extras,
    )  # fmt: skip
    (loss * 1.5).sum().backward()
    want_loss, want_grad = _old_path(
        logits, target, weight, eps, ("none", "mean", "sum").index(reduction), cap, zs
    )
    assert _same(loss.detach(), want_loss)
    assert _same(z.grad, want_grad)


def test_the_reference_reads_an_int32_target_against_a_wide_ignore_index():
    # int32 [0] != 2**32 wrapped the scalar to 0: row 0 counted in the loss but its
    # statistics were the ignored row's, where the kernels record it
    from csl_fast import reference

    logits = torch.randn(3, 4)
    target = torch.tensor([0, 2, 1], dtype=torch.int32)
    stats = reference.row_statistics(logits, target, 2**32)
    assert stats[csl_fast.stats.Stat.VALID].tolist() == [1.0, 1.0, 1.0]
