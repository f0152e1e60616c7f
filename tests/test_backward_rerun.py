"""Activation checkpointing and saved-tensor hooks around the recording calls: a
checkpointed forward rerun in the backward records nothing, the gradient is
F.cross_entropy's, and a saved-tensor hook's error reaches the caller."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import csl_fast
from csl_fast import CSLTracker, accumulate, backward_rerun
from csl_fast.accumulate import _Fallbacks
from csl_fast.stats import MARGIN_CAP

BACKENDS = csl_fast.available_backends("cpu")
MODES = ("reentrant", "non-reentrant", "non-reentrant, no early stop")
N, B, C, D = 12, 8, 5, 6


def _checkpointed(fn, x, mode):
    if mode == "reentrant":
        return checkpoint(fn, x, use_reentrant=True)
    if mode == "non-reentrant":
        return checkpoint(fn, x, use_reentrant=False)
    with set_checkpoint_early_stop(False):
        return checkpoint(fn, x, use_reentrant=False)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(D, C)
    x = torch.randn(B, D, generator=g)
    y = torch.randint(0, C, (B,), generator=g)
    idx = torch.tensor([3, 0, 7, 3, 11, 5, 2, 9])  # a duplicate
    return lin, x, y, idx


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sink", ["tracker", "tensor"])
def test_a_checkpointed_accumulate_records_once_with_the_right_gradient(backend, mode, sink):
    lin, x, y, idx = _data()
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(lin(xr), y).backward()
    plain = CSLTracker(N, C) if sink == "tracker" else torch.zeros(N)
    accumulate(lin(x), y, idx, plain, backend=backend)
    ours = CSLTracker(N, C) if sink == "tracker" else torch.zeros(N)
    xc = x.clone().requires_grad_(True)
    before = _Fallbacks.count
    loss = _checkpointed(lambda v: accumulate(lin(v), y, idx, ours, backend=backend), xc, mode)
    loss.backward()
    assert _Fallbacks.count == before
    torch.testing.assert_close(xc.grad, xr.grad, rtol=1e-5, atol=1e-7)
    if sink == "tensor":
        torch.testing.assert_close(ours, plain)
        return
    assert ours.csl_count.sum() == B
    for name, buf in plain.buffers().items():
        torch.testing.assert_close(ours.buffers()[name], buf, msg=name)


@pytest.mark.parametrize("mode", MODES)
def test_the_other_recording_calls_record_once_under_checkpointing(mode):
    lin, x, y, idx = _data(1)
    tracker_lce, count_lce = torch.zeros(N), torch.zeros(N)
    bce_csl, bce_count = torch.zeros(N), torch.zeros(N)
    loss_csl, loss_count = torch.zeros(N), torch.zeros(N)
    multi = (torch.rand(B, C) < 0.5).float()

    def region(v):
        h = torch.tanh(v)
        a = csl_fast.linear_cross_entropy(
            h, lin.weight, y, idx, tracker_lce, lin.bias, count=count_lce
        )
        b = csl_fast.accumulate_bce(lin(h), multi, idx, bce_csl, count=bce_count)
        per = F.cross_entropy(lin(h), y, reduction="none")
        csl_fast.record_loss(per, idx, loss_csl, count=loss_count)
        return a + b + per.mean()

    region(x.clone().requires_grad_(True)).backward()
    once = [t.clone() for t in (count_lce, bce_count, loss_count, tracker_lce, bce_csl)]
    for t in (tracker_lce, count_lce, bce_csl, bce_count, loss_csl, loss_count):
        t.zero_()
    _checkpointed(region, x.clone().requires_grad_(True), mode).backward()
    again = [count_lce, bce_count, loss_count, tracker_lce, bce_csl]
    for a, b in zip(again, once, strict=True):
        torch.testing.assert_close(a, b)
    assert count_lce.sum() == B


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_saved_tensor_hooks_error_reaches_the_caller_and_nothing_is_written(backend):
    lin, x, y, idx = _data(2)

    class Refused(Exception):
        pass

    def pack(t):
        raise Refused("no room to save it")

    tracker = CSLTracker(N, C)
    before = _Fallbacks.count
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        pytest.raises(Refused),
    ):
        accumulate(lin(x), y, idx, tracker, backend=backend)
    assert _Fallbacks.count == before
    assert tracker.csl_count.sum() == 0


def test_save_on_cpu_gives_the_plain_result():
    lin, x, y, idx = _data(3)
    plain, hooked = CSLTracker(N, C), CSLTracker(N, C)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    accumulate(lin(xa), y, idx, plain).backward()
    with torch.autograd.graph.save_on_cpu():
        accumulate(lin(xb), y, idx, hooked).backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    for name, buf in plain.buffers().items():
        torch.testing.assert_close(hooked.buffers()[name], buf, msg=name)


def test_the_probes():
    assert not backward_rerun.in_backward()
    assert not backward_rerun.saved_tensor_hooks_active()
    seen = []
    x = torch.randn(3, requires_grad=True)
    x.register_hook(lambda g: seen.append(backward_rerun.in_backward()))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert backward_rerun.saved_tensor_hooks_active()
        (x * 2).sum().backward()
    assert seen == [True]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("where", ["input", "intermediate"])
def test_watch_in_a_checkpointed_region_records_each_gradient_once(mode, where):
    """Reentrant checkpointing reruns the region on a detached copy of its input: watching
    that copy too counted every input gradient twice."""
    lin, x, y, idx = _data(4)
    pre = torch.nn.Linear(D, D)

    def region(v, t):
        h = t.watch(v, idx) if where == "input" else t.watch(pre(v), idx)
        return accumulate(lin(h if where == "intermediate" else pre(h)), y, idx, t)

    plain, ours = CSLTracker(N, C), CSLTracker(N, C)
    region(x.clone().requires_grad_(True), plain).backward()
    _checkpointed(lambda v: region(v, ours), x.clone().requires_grad_(True), mode).backward()
    for name in ("input_grad_count", "input_grad_sq_sum", "csl_count"):
        torch.testing.assert_close(ours.buffers()[name], plain.buffers()[name], msg=name)
    assert plain.input_grad_count.sum() == B


def test_a_compiled_region_checkpointed_eagerly_records_once():
    # eager checkpointing reruns a compiled region's whole graph in the backward, buffer
    # writes included; the graph reads whether it runs in a backward (it counted twice)
    lin, x, y, idx = _data(2)
    multi = (torch.rand(B, C, generator=torch.Generator().manual_seed(2)) < 0.5).float()
    tracker, labels, masked = CSLTracker(N, C), CSLTracker(N, num_labels=C), CSLTracker(N, C)
    lce, lce_count = torch.zeros(N), torch.zeros(N)
    rec, rec_count, ref, ref_count = (torch.zeros(N) for _ in range(4))
    buffers = (*tracker.buffers().values(), *labels.buffers().values(), lce, lce_count, rec)
    buffers += (rec_count, ref, ref_count, *masked.buffers().values())
    others = torch.ones(B, C, dtype=torch.bool).scatter_(1, y[:, None], False)

    def region(v):
        v = tracker.watch(v, idx)  # an input gradient per sample, once
        h = torch.tanh(v)
        # every other class masked: margin +inf (now capped at MARGIN_CAP), which 0 * inf
        # made NaN in the rerun
        masked_loss = accumulate(lin(h).masked_fill(others, -math.inf), y, idx, masked)
        per = F.cross_entropy(lin(h), y, reduction="none")
        csl_fast.record_loss(per, idx, rec, count=rec_count)  # the one-pass C++ op
        csl_fast.record_loss(per, idx, ref, count=ref_count, backend="reference")
        return (
            accumulate(lin(h), y, idx, tracker)
            + csl_fast.linear_cross_entropy(h, lin.weight, y, idx, lce, lin.bias, count=lce_count)
            + csl_fast.accumulate_bce(lin(h), multi, idx, labels)
            + per.mean()
            + masked_loss
        )

    compiled = torch.compile(region)  # (watch breaks the graph: its hook is eager)
    initial = [b.clone() for b in buffers]
    compiled(x.clone().requires_grad_(True)).backward()
    once = [b.clone() for b in buffers]
    assert tracker.csl_count.sum() == B and rec_count.sum() == B
    assert tracker.input_grad_count.sum() == B
    capped = MARGIN_CAP * masked.csl_count[idx]
    assert capped.min() > 0 and torch.equal(masked.margin_sum[idx], capped)
    for mode in MODES:
        for b, start in zip(buffers, initial, strict=True):
            b.copy_(start)
        _checkpointed(compiled, x.clone().requires_grad_(True), mode).backward()
        for k, (a, b) in enumerate(zip(buffers, once, strict=True)):
            torch.testing.assert_close(a, b, equal_nan=True, msg=f"{mode}: buffer {k}")
