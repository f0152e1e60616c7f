"""Out-of-range indices and targets, C = 0 and B = 0 on the Triton backend.

The documented behaviour (``csl_fast.accumulate``, ``validate=False``, the CUDA default)
is that of the CUDA C++ kernels: an index outside ``[0, N)`` is skipped, a target outside
``[0, C)`` that is not ``ignore_index`` gives a NaN loss and gradient row and is not
recorded. Every buffer here is a slice of a larger tensor whose outside (the canary) must
stay bit-identical: a kernel that writes past a buffer fails the test instead of
corrupting memory unseen.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import csl_fast
from csl_fast import ops, reference
from csl_fast._triton import (
    bce_record_triton,
    cross_entropy,
    cross_entropy_fwd_inplace_triton,
    cross_entropy_fwd_triton,
    input_grad_norms_triton,
    scatter_stats_triton,
)
from csl_fast._triton._registry import is_interpreted
from csl_fast.stats import NUM_STATS, Stat

IGNORE = -100
_ROOT = Path(__file__).resolve().parents[2]
N = 8
PAD = 5  # canary elements on each side of a buffer
# Batch rows: in range, at N, past N, negative, far out, duplicates of in-range ones.
INDEX = [0, N, 3, N + 1, -1, 3, 7, 100, -9, 7, 2]
FIRST_STATS = (Stat.LOSS, Stat.P_TRUE, Stat.MARGIN, Stat.CORRECT, Stat.GRAD_NORM_SQ, Stat.VALID)


class Canary:
    """A buffer of ``n`` entries (``stride`` apart) inside a larger random tensor."""

    def __init__(self, n, dtype, device, stride=1):
        if dtype.is_floating_point:
            self.big = torch.randn(2 * PAD + n * stride, dtype=dtype, device=device)
        elif dtype == torch.bool:
            self.big = torch.rand(2 * PAD + n * stride, device=device) > 0.5
        else:
            self.big = torch.randint(-5, 5, (2 * PAD + n * stride,), device=device).to(dtype)
        self.buf = self.big[PAD : PAD + n * stride : stride]
        self.before = self.big.clone()

    def untouched(self) -> bool:
        """True when nothing outside the buffer changed (bitwise, NaNs included)."""
        inside = torch.zeros_like(self.big, dtype=torch.bool)
        inside[PAD : PAD + self.buf.numel() * self.buf.stride(0) : self.buf.stride(0)] = True
        a, b = self.big[~inside], self.before[~inside]
        if a.is_floating_point():
            a, b = a.view(_BITS[a.dtype]), b.view(_BITS[b.dtype])
        return torch.equal(a, b)


_BITS = {torch.float64: torch.int64, torch.float32: torch.int32}


def _stats(batch, device):
    stats = torch.zeros(NUM_STATS, batch)
    stats[Stat.LOSS] = torch.rand(batch) * 5
    stats[Stat.P_TRUE] = torch.rand(batch)
    stats[Stat.MARGIN] = torch.randn(batch)
    stats[Stat.CORRECT] = (torch.rand(batch) > 0.5).float()
    stats[Stat.GRAD_NORM_SQ] = torch.rand(batch)
    stats[Stat.VALID] = 1.0
    return stats.to(device)


# ---- scatter ---------------------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_scatter_skips_out_of_range_indices(tdevice, deterministic, stride):
    index = torch.tensor(INDEX, device=tdevice)
    stats = _stats(len(INDEX), tdevice)
    csl = Canary(N, torch.float32, tdevice, stride)
    count = Canary(N, torch.int64, tdevice, stride)
    want_csl, want_count = csl.buf.cpu().clone(), count.buf.cpu().clone()
    ok = (index >= 0) & (index < N)
    reference.scatter_stats(stats[:, ok].cpu(), index[ok].cpu(), True, want_csl, want_count)
    scatter_stats_triton(stats, index, deterministic, csl.buf, count.buf)
    assert csl.untouched() and count.untouched()
    torch.testing.assert_close(csl.buf.cpu(), want_csl, rtol=1e-6, atol=1e-6)
    assert torch.equal(count.buf.cpu(), want_count)


@pytest.mark.parametrize("deterministic", [False, True])
def test_scatter_into_empty_buffers(tdevice, deterministic):
    """N = 0: every index is out of range; B = 0: nothing to add."""
    csl, count = Canary(0, torch.float64, tdevice), Canary(0, torch.float32, tdevice)
    scatter_stats_triton(_stats(4, tdevice), torch.arange(4, device=tdevice), deterministic,
                         csl.buf, count.buf)  # fmt: skip
    assert csl.untouched() and count.untouched()
    csl, count = Canary(N, torch.float32, tdevice), Canary(N, torch.int32, tdevice)
    scatter_stats_triton(_stats(0, tdevice), torch.zeros(0, dtype=torch.long, device=tdevice),
                         deterministic, csl.buf, count.buf)  # fmt: skip
    assert torch.equal(csl.big, csl.before) and torch.equal(count.big, count.before)


# ---- record_last -----------------------------------------------------------------------


def _state(device, n=N):
    return {
        "last_loss": Canary(n, torch.float32, device),
        "last_max_prob": Canary(n, torch.float32, device),
        "last_correct": Canary(n, torch.bool, device),
        "forgetting": Canary(n, torch.int32, device),
        "learned_epoch": Canary(n, torch.int32, device),
        "grad_norm_sum": Canary(n, torch.float32, device),
        "margin_sum": Canary(n, torch.float32, device),
        "p_true_sum": Canary(n, torch.float32, device),
        "p_true_sq_sum": Canary(n, torch.float32, device),
    }


def _record_last(backend, stats, index, state):
    b = {k: c.buf for k, c in state.items()}
    ops.record_last(
        stats, index, None, 3, b["last_loss"], b["last_max_prob"], b["last_correct"],
        b["forgetting"], b["learned_epoch"],
        sums=(b["grad_norm_sum"], b["margin_sum"], b["p_true_sum"], b["p_true_sq_sum"]),
        backend=backend,
    )  # fmt: skip


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_record_last_skips_out_of_range_indices(tdevice, backend):
    """Triton's one-pass kernel, and the device-only reference the ``cuda`` backend uses."""
    index = torch.tensor(INDEX, device=tdevice)
    stats = _stats(len(INDEX), tdevice)
    stats[Stat.VALID, 1::4] = 0.0
    state = _state(tdevice)
    want = {k: c.buf.cpu().clone() for k, c in state.items()}
    ok = (index >= 0) & (index < N)
    reference.record_last(
        stats[:, ok].cpu(), index[ok].cpu(), None, 3, want["last_loss"], want["last_max_prob"],
        want["last_correct"], want["forgetting"], want["learned_epoch"], want["grad_norm_sum"],
        want["margin_sum"], want["p_true_sum"], want["p_true_sq_sum"],
    )  # fmt: skip
    _record_last(backend, stats, index, state)
    for name, c in state.items():
        assert c.untouched(), name
        torch.testing.assert_close(c.buf.cpu(), want[name], rtol=1e-6, atol=1e-6, msg=name)
    state = _state(tdevice, n=0)
    _record_last(backend, stats, index, state)
    assert all(c.untouched() for c in state.values())


def test_record_input_grad_skips_out_of_range_indices(tdevice):
    """The GPU path of CSLTracker.record_input_grad (ops.record_input_grad off the CPU)."""
    index = torch.tensor(INDEX, device=tdevice)
    sq = torch.rand(len(INDEX), device=tdevice)
    bufs = [Canary(N, torch.float32, tdevice) for _ in range(5)]
    want = [c.buf.cpu().clone() for c in bufs]
    ok = (index >= 0) & (index < N)
    reference.record_input_grad(sq[ok].cpu(), index[ok].cpu(), None, *want)
    ops.record_input_grad(sq, index, None, tuple(c.buf for c in bufs), backend="triton")
    for c, w in zip(bufs, want, strict=True):
        assert c.untouched()
        torch.testing.assert_close(c.buf.cpu(), w)


# ---- binary cross entropy --------------------------------------------------------------


@pytest.mark.parametrize("deterministic", [False, True])
def test_bce_record_skips_out_of_range_indices(tdevice, deterministic):
    """Per-sample buffers at k, per-entry ones (label_csl, label_margin, label_prob) at
    k * L + l: an index outside [0, N) writes neither, inside or past the [N, L] block."""
    labels = 3
    logits = torch.randn(len(INDEX), labels, device=tdevice) * 3
    target = torch.rand(len(INDEX), labels, device=tdevice)
    logits[2, 1] = float("nan")  # a row that is not recorded, at an index in range
    index = torch.tensor(INDEX, device=tdevice)
    stats = reference.bce_row_statistics(logits, target)
    f32, f64 = torch.float32, torch.float64
    per_sample = [Canary(N, dt, tdevice) for dt in (f32, torch.int64, torch.int32, f64)]
    per_entry = [Canary(N * labels, dt, tdevice) for dt in (f32, f64, f64)]  # lc, lm, lp
    canaries = per_sample + per_entry
    bufs = [c.buf for c in per_sample] + [c.buf.view(N, labels) for c in per_entry]
    want = [b.cpu().clone() for b in bufs]
    reference.bce_record(logits.cpu(), target.cpu(), stats.cpu(), index.cpu(), True, *want)
    bce_record_triton(logits, target, stats, index, deterministic, *bufs)
    for c, b, w in zip(canaries, bufs, want, strict=True):
        assert c.untouched()
        torch.testing.assert_close(b.cpu(), w, rtol=2e-6, atol=2e-6)


# ---- cross entropy ---------------------------------------------------------------------


def _bad_targets(batch, classes, device):
    target = torch.randint(0, classes, (batch,), device=device)
    target[1], target[3], target[4] = classes, -1, IGNORE  # bad, bad (padding), ignored
    target[-1] = 10 * classes
    return target


@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_bad_targets(tdevice, monkeypatch, two_pass, reduction, inplace):
    """A target outside [0, C) that is not ignore_index: NaN loss and gradient row, zero
    statistics; the other rows as if that row were ignored (the mean's denominator
    excludes it, as in the CUDA kernels)."""
    batch, classes = 7, 11
    if two_pass:
        monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
        monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 4)
    target = _bad_targets(batch, classes, tdevice)
    bad = (target != IGNORE) & ((target < 0) | (target >= classes))
    big = torch.randn(batch + 2, classes, device=tdevice) * 3
    before = big.clone()
    logits = big[1:-1]  # canary rows 0 and batch + 1
    ref_loss, ref_grad, ref_stats = reference.cross_entropy_fwd(
        logits.clone(), torch.where(bad, IGNORE, target), None, IGNORE, 0.1, reduction
    )
    if inplace:
        loss, stats = cross_entropy_fwd_inplace_triton(logits, target, None, IGNORE, 0.1, reduction)
        grad = logits
        assert torch.equal(big[[0, -1]], before[[0, -1]])
    else:
        loss, grad, stats = cross_entropy_fwd_triton(logits, target, None, IGNORE, 0.1, reduction)
        assert torch.equal(big, before)
    assert torch.isnan(grad[bad]).all()
    torch.testing.assert_close(grad[~bad], ref_grad[~bad], rtol=1e-5, atol=1e-6)
    assert torch.equal(stats[:, bad], ref_stats[:, bad])  # the statistics of an ignored row
    for k in FIRST_STATS:
        torch.testing.assert_close(stats[k], ref_stats[k], rtol=1e-5, atol=1e-6)
    if reduction == 0:
        assert torch.isnan(loss[bad]).all()
        torch.testing.assert_close(loss[~bad], ref_loss[~bad], rtol=1e-5, atol=1e-6)
    else:
        assert torch.isnan(loss)


def test_cross_entropy_bad_target_with_class_weights(tdevice):
    """The mean's denominator reads w[target] only for targets in [0, C)."""
    target = _bad_targets(6, 5, tdevice)
    bad = (target != IGNORE) & ((target < 0) | (target >= 5))
    logits, weight = torch.randn(6, 5, device=tdevice), torch.rand(5, device=tdevice) + 0.5
    loss, grad, _ = cross_entropy_fwd_triton(logits, target, weight, IGNORE, 0.0, 1)
    _, ref_grad, _ = reference.cross_entropy_fwd(
        logits, torch.where(bad, IGNORE, target), weight, IGNORE, 0.0, 1
    )
    assert torch.isnan(loss)
    torch.testing.assert_close(grad[~bad], ref_grad[~bad], rtol=1e-5, atol=1e-6)


def test_zero_classes_and_empty_batch(tdevice):
    """C = 0 with rows is an error (as on the CPU and CUDA); B = 0 gives empty outputs."""
    target = torch.zeros(3, dtype=torch.long, device=tdevice)
    for fn in (cross_entropy_fwd_triton, cross_entropy_fwd_inplace_triton):
        with pytest.raises(ValueError, match="C = 0 classes"):
            fn(torch.zeros(3, 0, device=tdevice), target, None, IGNORE, 0.0, 0)
    for classes in (0, 5):
        empty = torch.zeros(0, classes, device=tdevice)
        for reduction, want in ((0, None), (1, math.nan), (2, 0.0)):
            loss, grad, stats = cross_entropy_fwd_triton(
                empty, target[:0], None, IGNORE, 0.0, reduction
            )
            assert grad.shape == (0, classes) and stats.shape == (NUM_STATS, 0)
            if want is None:
                assert loss.shape == (0,)
            else:
                torch.testing.assert_close(loss, torch.tensor(want, device=tdevice), equal_nan=True)
    csl = Canary(N, torch.float32, tdevice)
    with pytest.raises(ValueError, match="C = 0 classes"):
        csl_fast.accumulate(torch.zeros(3, 0, device=tdevice), target,
                            torch.arange(3, device=tdevice), csl.buf, backend="triton",
                            validate=False)  # fmt: skip
    assert torch.equal(csl.big, csl.before)
    norms = input_grad_norms_triton(torch.zeros(0, 4, device=tdevice), 1.0)
    assert norms.shape == (0,)
    assert torch.equal(input_grad_norms_triton(torch.zeros(3, 0, device=tdevice), 2.0),
                       torch.zeros(3, device=tdevice))  # fmt: skip


# ---- accumulate and linear_cross_entropy ------------------------------------------------


def _expected_csl(csl0, count0, loss_rows, index, ok_rows):
    want_csl, want_count = csl0.cpu().clone(), count0.cpu().clone()
    ok = ok_rows & (index >= 0) & (index < N)
    want_csl.index_add_(0, index[ok].cpu(), loss_rows[ok].cpu().float())
    want_count.index_add_(0, index[ok].cpu(), torch.ones(int(ok.sum()), dtype=want_count.dtype))
    return want_csl, want_count


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
def test_accumulate_skips_bad_rows(tdevice, deterministic, inplace):
    """Label -1 used as padding with the default ignore_index: NaN loss, not recorded (the
    Triton kernel once recorded it against class 0); an index past N: skipped."""
    batch, classes = len(INDEX), 6
    index = torch.tensor(INDEX, device=tdevice)
    target = _bad_targets(batch, classes, tdevice)
    bad = (target != IGNORE) & ((target < 0) | (target >= classes))
    logits = torch.randn(batch, classes, device=tdevice, requires_grad=True)
    csl, count = Canary(N, torch.float32, tdevice), Canary(N, torch.int64, tdevice)
    rows = reference.cross_entropy_fwd(logits.detach(), torch.where(bad, IGNORE, target), None,
                                       IGNORE, 0.0, 0)[0]  # fmt: skip
    want_csl, want_count = _expected_csl(csl.buf, count.buf, rows, index, ~bad & (target != IGNORE))
    z = logits * 1.0  # not a leaf, so inplace_grad may overwrite it
    if inplace and tdevice == "cpu":
        # On the CPU, where reading them costs no device sync, accumulate checks targets
        # and indices before an in-place gradient could overwrite the logits.
        with pytest.raises(IndexError, match="outside"):
            csl_fast.accumulate(z, target, index, csl.buf, backend="triton", validate=False,
                                inplace_grad=True)  # fmt: skip
        assert torch.equal(z, logits) and torch.equal(csl.big, csl.before)
        return
    loss = csl_fast.accumulate(z, target, index, csl.buf, count=count.buf, reduction="none",
                               backend="triton", deterministic=deterministic, validate=False,
                               inplace_grad=inplace)  # fmt: skip
    assert torch.isnan(loss[bad]).all() and torch.isfinite(loss[~bad]).all()
    assert csl.untouched() and count.untouched()
    torch.testing.assert_close(csl.buf.cpu(), want_csl, rtol=1e-5, atol=1e-5)
    assert torch.equal(count.buf.cpu(), want_count)
    loss[~bad].sum().backward()
    assert torch.isfinite(logits.grad[~bad]).all()


@pytest.mark.parametrize("deterministic", [False, True])
def test_accumulate_sequences_skip_bad_rows(tdevice, deterministic):
    seqs, steps, vocab = 5, 3, 7
    index = torch.tensor([1, N, 4, -2, 4], device=tdevice)
    target = torch.randint(0, vocab, (seqs, steps), device=tdevice)
    target[0, 1], target[2, 0], target[2, 2] = -1, vocab, IGNORE
    bad = (target != IGNORE) & ((target < 0) | (target >= vocab))
    logits = torch.randn(seqs, steps, vocab, device=tdevice)
    csl, count = Canary(N, torch.float64, tdevice), Canary(N, torch.float32, tdevice)
    rows = reference.cross_entropy_fwd(logits.reshape(-1, vocab),
                                       torch.where(bad, IGNORE, target).reshape(-1), None,
                                       IGNORE, 0.0, 0)[0].reshape(seqs, steps)  # fmt: skip
    good = ~bad & (target != IGNORE)
    want_csl, want_count = csl.buf.cpu().clone(), count.buf.cpu().clone()
    ok = (index >= 0) & (index < N)
    want_csl.index_add_(0, index[ok].cpu(), (rows * good).sum(1)[ok].cpu().double())
    want_count.index_add_(0, index[ok].cpu(), good.sum(1)[ok].cpu().float())
    loss = csl_fast.accumulate(
        logits.flatten(0, 1),  # [B*T, V] with a [B, T] target: one index per sequence
        target,
        index,
        csl.buf,
        count=count.buf,
        reduction="none",
        backend="triton",
        deterministic=deterministic,
        validate=False,
    )
    assert loss.shape == (seqs, steps) and torch.isnan(loss[bad]).all()
    assert csl.untouched() and count.untouched()
    torch.testing.assert_close(csl.buf.cpu(), want_csl, rtol=1e-5, atol=1e-5)
    assert torch.equal(count.buf.cpu(), want_count)


@pytest.mark.parametrize("reduction", ["none", "sum"])
def test_linear_cross_entropy_skips_bad_rows(tdevice, reduction):
    batch, hidden, vocab = len(INDEX), 4, 9
    index = torch.tensor(INDEX, device=tdevice)
    target = _bad_targets(batch, vocab, tdevice)
    bad = (target != IGNORE) & ((target < 0) | (target >= vocab))
    h = torch.randn(batch, hidden, device=tdevice)
    w = torch.randn(vocab, hidden, device=tdevice)
    csl, count = Canary(N, torch.float32, tdevice), Canary(N, torch.int32, tdevice)
    rows = reference.cross_entropy_fwd(h @ w.t(), torch.where(bad, IGNORE, target), None,
                                       IGNORE, 0.0, 0)[0]  # fmt: skip
    want_csl, want_count = _expected_csl(csl.buf, count.buf, rows, index, ~bad & (target != IGNORE))
    loss = csl_fast.linear_cross_entropy(h, w, target, index, csl.buf, count=count.buf,
                                         reduction=reduction, chunk_size=4, backend="triton",
                                         validate=False)  # fmt: skip
    if reduction == "none":
        assert torch.isnan(loss[bad]).all() and torch.isfinite(loss[~bad]).all()
    else:
        assert torch.isnan(loss)
    assert csl.untouched() and count.untouched()
    torch.testing.assert_close(csl.buf.cpu(), want_csl, rtol=1e-5, atol=1e-5)
    assert torch.equal(count.buf.cpu(), want_count)


# ---- the tracker ------------------------------------------------------------------------


def _same_state(a, b):
    for name, buf in a.buffers().items():
        other = b.buffers()[name]
        if buf.is_floating_point():
            torch.testing.assert_close(buf, other, rtol=1e-5, atol=1e-6, msg=name)
        else:
            assert torch.equal(buf, other), name


@pytest.mark.parametrize("sequences", [False, True])
def test_tracker_skips_out_of_range_indices(tdevice, sequences):
    """Every buffer of a tracker (history and input-gradient norms too) ends as if the
    rows with an index outside [0, N) were not in the batch."""
    classes, steps = 5, 3
    index = torch.tensor(INDEX, device=tdevice)
    ok = (index >= 0) & (index < N)
    rows = len(INDEX) * (steps if sequences else 1)
    logits = torch.randn(rows, classes, device=tdevice)
    target = torch.randint(0, classes, (rows,), device=tdevice)
    if sequences:
        target = target.view(len(INDEX), steps)
    sq_norms = torch.rand(len(INDEX), device=tdevice)
    trackers = [
        csl_fast.CSLTracker(N, classes, device=tdevice, history=True, backend="triton")
        for _ in range(2)
    ]
    for tracker, keep in zip(trackers, (torch.ones_like(ok), ok), strict=True):
        z, t = logits, target
        if not bool(keep.all()):
            z = logits.view(len(INDEX), -1, classes)[keep].reshape(-1, classes)
            t = target[keep]
        csl_fast.accumulate(z, t, index[keep], tracker, backend="triton", validate=False)
        tracker.record_input_grad(index[keep], sq_norms[keep], validate=False)
        tracker.end_epoch()
    _same_state(trackers[0], trackers[1])


# ---- statistics rows past 2**31 elements ----------------------------------------------

# Statistic k of row i lies at k * B + i (k * stats.stride(0) + i): past 2**31 elements for
# B > 2**31 / k, where k * B in B's int32 wrapped to an address gigabytes before the buffer
# (a segmentation fault under the interpreter, a stray write on a GPU). Each case launches
# one program (rows 0..15) over a [k, B] buffer that torch.empty leaves uncommitted, so only
# the pages written are touched, in a subprocess: a wrapped address kills it.
_HUGE_PRELUDE = """
import torch
from csl_fast._triton import bce, cross_entropy, cross_entropy_bwd, record, scatter
from csl_fast.stats import NUM_STATS, Stat
R = 16
def lazy(n):
    return torch.empty(n)
"""

_HUGE_CASES = {
    "cross_entropy_fwd": """
B, C = 2**31 // 6 + 1, 4
stats = lazy(NUM_STATS * B)
z = torch.tensor([[0.0, 1.0, 3.0, 2.0]]).expand(B, C)
tgt, loss = torch.zeros(R, dtype=torch.long), torch.empty(R)
cross_entropy._ce_fwd_kernel[(1,)](
    z, tgt, loss, loss, loss, loss, stats, B, C, 0, 0, -100, 0.0, HAS_WEIGHT=False,
    HAS_SMOOTH=False, IS_MEAN=False, FUSED=True, ROWS=R, BLOCK_C=4, MANUAL_BF16_RNE=False,
    INPLACE=False, zloss_ptr=loss, cap=0.0, zs=0.0, HAS_CAP=False, HAS_ZLOSS=False,
    HAS_GRAD=False)
assert (stats[6 * B : 6 * B + R] == 2.0).all()  # the runner-up of target 0: column 2
assert (stats[5 * B : 5 * B + R] == 1.0).all()
""",
    "cross_entropy_bwd": """
B, C = 2**31 // 5 + 1, 4
stats = lazy((Stat.VALID + 1) * B)
stats[:R] = 4.0
stats[Stat.VALID * B : Stat.VALID * B + R] = 1.0
z = torch.zeros(1, C, dtype=torch.bfloat16).expand(B, C)
tgt, scale = torch.zeros(R, dtype=torch.long), torch.ones(1)
grad = torch.full((R, C), float("nan"), dtype=torch.bfloat16)
cross_entropy_bwd._ce_bwd_kernel[(1,)](
    z, tgt, scale, scale, stats, scale, grad, B, C, 0, -100, 0.0, HAS_WEIGHT=False,
    HAS_SMOOTH=False, PER_ROW_SCALE=False, ROWS=R, BLOCK_C=4, MANUAL_BF16_RNE=True,
    STAT_LOSS=int(Stat.LOSS), STAT_VALID=int(Stat.VALID), BOUND=64.0, cap=0.0, zs=0.0,
    HAS_CAP=False, HAS_ZLOSS=False)
# p_j = exp(z_j - z_y - loss) = exp(-4) off the target: the loss was read at row LOSS
torch.testing.assert_close(grad[:, 1:].float(), torch.full((R, C - 1), 0.0183), rtol=1e-2, atol=0)
""",
    "bce_fwd": """
B, L = 2**31 // 3 + 1, 2
stats = lazy(4 * B)
z, y = torch.tensor([[1.0, -2.0]]).expand(B, L), torch.tensor([[0.0, 0.0]]).expand(B, L)
rows_out = torch.empty(R)
bce._bce_fwd_kernel[(1,)](
    z, y, z, z, z, rows_out, stats, B, L, 0, 1, 0, 1, 0, 0, 0, 0, HAS_W=False, HAS_PW=False,
    PER_ENTRY=False, ACC=bce.tl.float32, ROWS=R, BLOCK_L=2, MANUAL_BF16_RNE=False)
assert (stats[2 * B : 2 * B + R] == 1.0).all()  # one wrong label (z = 1, y = 0)
assert (stats[3 * B : 3 * B + R] == -1.0).all()  # min margin (2y - 1) z
""",
    "scatter_stats": """
S = 2**31 // 5 + 1
base = lazy(NUM_STATS * S)
stats = base.as_strided((NUM_STATS, 4), (S, 1))
base[:4] = 2.0
base[Stat.VALID * S : Stat.VALID * S + 4] = 1.0
csl, count = torch.zeros(4), torch.zeros(4)
scatter.scatter_stats_triton(stats, torch.arange(4), False, csl, count)
assert csl.tolist() == [2.0] * 4 and count.tolist() == [1.0] * 4, (csl, count)
""",
    "record_last": """
S = 2**31 // 6 + 1
base = lazy(NUM_STATS * S)
stats = base.as_strided((NUM_STATS, 4), (S, 1))
for k in range(NUM_STATS):
    base[k * S : k * S + 4] = 0.0
base[:4] = 0.5
base[Stat.VALID * S : Stat.VALID * S + 4] = 1.0
base[Stat.OTHER_ARGMAX * S : Stat.OTHER_ARGMAX * S + 4] = 3.0
n = 4
f = lambda dt: torch.zeros(n, dtype=dt)
label, votes, hits = f(torch.int32), f(torch.int32), f(torch.int32)
last = f(torch.float32)
record.record_last_triton(stats, torch.arange(4), None, 1, last, f(torch.float32),
    f(torch.bool), None, None, None, None, None, None, label, votes, hits)
assert last.tolist() == [0.5] * 4 and label.tolist() == [3] * 4, (last, label)
""",
}


@pytest.mark.parametrize("case", sorted(_HUGE_CASES))
def test_statistics_rows_past_int32_offsets(case):
    if not is_interpreted(cross_entropy._ce_fwd_kernel):
        pytest.skip("launches one program of a huge batch on CPU tensors (the interpreter)")
    code = _HUGE_PRELUDE + _HUGE_CASES[case]
    path = os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=path)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, timeout=300)  # fmt: skip
    if "DefaultCPUAllocator" in proc.stderr:
        pytest.skip("this machine refuses a ~10 GB uncommitted allocation")
    why = " (SIGSEGV: an address outside the buffers)" if proc.returncode == -11 else ""
    assert proc.returncode == 0, f"exit {proc.returncode}{why}: {proc.stderr[-3000:]}"
