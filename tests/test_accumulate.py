"""accumulate against F.cross_entropy + index_add_ over the grid of dtype x shape x options."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_f32, assert_no_worse_than_torch

import csl_fast
from csl_fast import reference
from csl_fast.stats import Stat

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# 256 x 32000 would spend minutes in the float64 comparison; 7 x 32000 covers long rows.
# C <= 32 takes the CPU kernel's narrow-row path (blocks of 64 rows), C >= 97 the wide one.
SHAPES = [
    (b, c) for b in (0, 1, 7, 256) for c in (1, 2, 32, 97, 1025, 32000) if b * c < 256 * 32000
]
REDUCTIONS = ["mean", "sum", "none"]
# (ignore_index present, label smoothing, class weights, non-contiguous logits)
OPTIONS = list(itertools.product([False, True], [0.0, 0.2], [False, True], [False, True]))
N = 50


def _backends(device, dtype=None):
    # Triton on CPU runs in the interpreter and is tested on tiny shapes in tests/_triton;
    # its cross-entropy kernels take no float64 (backend="auto" passes over them).
    return [
        b
        for b in csl_fast.available_backends(device)
        if not (b == "triton" and (device == "cpu" or dtype == torch.float64))
    ]


def _options_for(batch, classes):
    """Every option combination on small shapes; a thinner spread on large ones."""
    if batch * classes <= 7 * 1025:
        return OPTIONS
    return [OPTIONS[0], OPTIONS[-1]]


def _make(batch, classes, dtype, device, ignore, smoothing, weighted, strided, seed):
    g = torch.Generator().manual_seed(seed)
    width = classes + 3 if strided else classes
    base = torch.randn(batch, width, generator=g, dtype=torch.float64) * 4
    logits = base.to(dtype).to(device)[:, :classes]
    assert logits.is_contiguous() == (not strided or batch <= 1 or classes == width)
    target = torch.randint(0, classes, (batch,), generator=g).to(device)
    if ignore and batch > 1:
        target[::3] = -100
    # Few distinct indices: duplicates within one batch are the rule, not the exception.
    index = torch.randint(0, N, (batch,), generator=g).to(device)
    weight = (torch.rand(classes, generator=g, dtype=torch.float64) + 0.5).to(device)
    return logits, target, index, (weight if weighted else None), smoothing


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_cross_entropy(device, dtype, shape, reduction):
    batch, classes = shape
    for backend in _backends(device, dtype):
        for case, (ignore, smoothing, weighted, strided) in enumerate(_options_for(*shape)):
            logits, target, index, weight, smoothing = _make(
                batch, classes, dtype, device, ignore, smoothing, weighted, strided, seed=case
            )
            w_same = None if weight is None else weight.to(dtype)
            kwargs = dict(ignore_index=-100, label_smoothing=smoothing, reduction=reduction)
            what = f"{backend} {dtype} {shape} {reduction} case{case}"

            ours_in = logits.detach().clone().requires_grad_(True)
            csl = torch.zeros(N, device=device)
            count = torch.zeros(N, dtype=torch.int64, device=device)
            loss = csl_fast.accumulate(
                ours_in, target, index, csl, count=count, weight=w_same, backend=backend, **kwargs
            )
            upstream = torch.rand_like(loss) + 0.5  # a non-unit upstream gradient
            loss.backward(upstream)

            theirs_in = logits.detach().clone().requires_grad_(True)
            theirs = F.cross_entropy(theirs_in, target, weight=w_same, **kwargs)
            theirs.backward(upstream)

            exact_in = logits.detach().double().requires_grad_(True)
            w64 = None if weight is None else w_same.double()
            exact = F.cross_entropy(exact_in, target, weight=w64, **kwargs)
            exact.backward(upstream.double())

            assert loss.dtype == theirs.dtype and loss.shape == theirs.shape, what
            assert_no_worse_than_torch(
                loss.detach(), theirs.detach(), exact.detach(), what + " loss"
            )
            assert ours_in.grad.dtype == dtype
            assert_no_worse_than_torch(ours_in.grad, theirs_in.grad, exact_in.grad, what + " grad")

            active = target != -100
            plain = F.cross_entropy(exact_in.detach(), target, ignore_index=-100, reduction="none")
            want_csl = torch.zeros(N, dtype=torch.float64, device=device)
            want_csl.index_add_(0, index[active], plain[active])
            want_count = torch.zeros(N, dtype=torch.int64, device=device)
            want_count.index_add_(0, index[active], torch.ones_like(index[active]))
            assert_close_f32(csl, want_csl, what + " csl")
            assert torch.equal(count, want_count), what + " count"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", [(7, 1), (7, 2), (33, 97), (5, 1025)], ids=str)
def test_row_statistics_match_reference(device, dtype, shape):
    """Every backend's per-row statistics against reference.row_statistics."""
    logits = (torch.randn(*shape, dtype=torch.float64) * 5).to(dtype).to(device)
    target = torch.randint(0, shape[1], (shape[0],), device=device)
    target[1] = -100
    want = reference.row_statistics(logits, target, -100)
    for backend in _backends(device, dtype):
        _, stats = csl_fast.ops.cross_entropy_fwd(logits, target, None, -100, 0.0, 1, backend)
        assert stats.dtype == torch.float32 and stats.shape == want.shape
        torch.testing.assert_close(stats, want, rtol=1e-5, atol=1e-6, msg=backend)


def test_confident_rows_keep_precision(device, fused_backends):
    """As p_y -> 1 the true-class gradient and the logit-gradient norm must not cancel."""
    logits = torch.zeros(4, 10, device=device)
    logits[:, 3] = torch.tensor([15.0, 20.0, 30.0, 40.0])
    target = torch.full((4,), 3, device=device)
    exact_p = torch.softmax(logits.double(), 1)
    one_minus = exact_p[:, torch.arange(10) != 3].sum(1)
    want_norm = exact_p[:, torch.arange(10) != 3].square().sum(1) + one_minus.square()
    # The reference backend is F.cross_entropy itself, whose gradient p_y - 1 cancels.
    for backend in fused_backends:
        z = logits.clone().requires_grad_(True)
        loss = csl_fast.accumulate(
            z,
            target,
            torch.arange(4, device=device),
            torch.zeros(4, device=device),
            reduction="sum",
            backend=backend,
        )
        loss.backward()
        torch.testing.assert_close(z.grad[:, 3].double(), -one_minus, rtol=1e-5, atol=0)
        _, stats = csl_fast.ops.cross_entropy_fwd(logits, target, None, -100, 0.0, 2, backend)
        torch.testing.assert_close(stats[Stat.GRAD_NORM_SQ].double(), want_norm, rtol=1e-4, atol=0)
        torch.testing.assert_close(stats[Stat.LOSS].double(), one_minus, rtol=1e-4, atol=0)


def test_nonfinite_rows_are_not_recorded(device):
    logits = torch.randn(4, 5, device=device)
    logits[1, 2] = float("nan")
    target = torch.tensor([0, 1, 2, 3], device=device)
    for backend in _backends(device):
        csl = torch.zeros(4, device=device)
        count = torch.zeros(4, device=device)
        loss = csl_fast.accumulate(
            logits,
            target,
            torch.arange(4, device=device),
            csl,
            count=count,
            reduction="none",
            backend=backend,
        )
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3]]).all()
        assert torch.equal(count, torch.tensor([1.0, 0.0, 1.0, 1.0], device=device))
        assert csl[1] == 0 and (csl[[0, 2, 3]] > 0).all()


def test_float64_buffers_and_int32_indices(device):
    logits = torch.randn(9, 6, device=device)
    target = torch.randint(0, 6, (9,), device=device, dtype=torch.int32)
    index = torch.tensor([0, 1, 1, 2, 2, 2, 3, 3, 3], device=device, dtype=torch.int32)
    csl = torch.zeros(4, dtype=torch.float64, device=device)
    count = torch.zeros(4, dtype=torch.float32, device=device)
    csl_fast.accumulate(logits, target, index, csl, count=count)
    per_row = F.cross_entropy(logits.double(), target.long(), reduction="none")
    want = torch.zeros(4, dtype=torch.float64, device=device).index_add_(0, index.long(), per_row)
    torch.testing.assert_close(csl, want, rtol=1e-6, atol=1e-7)
    assert count.tolist() == [1.0, 2.0, 3.0, 3.0]


def test_empty_batch_adds_nothing(device):
    csl = torch.ones(3, device=device)
    z = torch.randn(0, 4, device=device, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    loss = csl_fast.accumulate(z, empty, empty, csl)
    assert torch.isnan(loss)  # F.cross_entropy's mean over no rows
    loss = csl_fast.accumulate(z, empty, empty, csl, reduction="sum")
    loss.backward()
    assert loss.item() == 0 and z.grad.shape == (0, 4)
    assert torch.equal(csl, torch.ones(3, device=device))
