"""accumulate into a CPU CSLTracker runs as one op (csl_fast::track_cross_entropy): the same
loss, gradient and tracker state, bit for bit, as the op-by-op path, and the same errors
with nothing written."""

from __future__ import annotations

import pytest
import torch

import csl_fast
from csl_fast import CSLTracker
from csl_fast.stats import NUM_STATS

N, C = 12, 9


def _batch(dtype, seed, batch=40):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, C, (batch,), generator=g)
    target[::7] = -100
    index = torch.randint(0, N, (batch,), generator=g)  # duplicates in every batch
    return logits, target, index


def _run(one_op, dtype, tracker_dtype, reduction, options, monkeypatch):
    calls = []
    if one_op:
        real = CSLTracker._track
        monkeypatch.setattr(
            CSLTracker, "_track", lambda self, *a: calls.append(1) or real(self, *a)
        )
    tracker = CSLTracker(N, C, dtype=tracker_dtype)
    losses, grads = [], []
    for epoch in range(3):
        for seed in range(2):
            logits, target, index = _batch(dtype, 10 * epoch + seed)
            logits.requires_grad_(True)
            if seed == 1:
                index = index.int()
            loss = csl_fast.accumulate(
                logits,
                target,
                index,
                tracker,
                reduction=reduction,
                validate=None if one_op else True,  # validate=True keeps the op-by-op path
                **options,
            )
            loss.sum().backward()
            losses.append(loss.detach())
            grads.append(logits.grad)
        tracker.end_epoch()
    assert bool(calls) == one_op
    return losses, grads, tracker.buffers()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("tracker_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.2, "weight": torch.rand(C) + 0.5}], ids=["", "opts"]
)
def test_same_as_op_by_op(dtype, tracker_dtype, reduction, options, monkeypatch):
    want = _run(False, dtype, tracker_dtype, reduction, options, monkeypatch)
    got = _run(True, dtype, tracker_dtype, reduction, options, monkeypatch)
    for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True):
        assert torch.equal(a, b)
    for name, buf in want[2].items():
        assert torch.equal(got[2][name], buf), name


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"index": N}, IndexError, r"index\[3\] = 12 is outside \[0, N = 12\)"),
        ({"target": C}, IndexError, r"target\[3\] = 9 is outside \[0, C = 9\)"),
        ({"index_dtype": torch.float32}, TypeError, "index must hold int64"),
    ],
)
def test_errors_name_the_problem_and_write_nothing(change, error, match):
    tracker = CSLTracker(N, C)
    logits, target, index = _batch(torch.float32, 0)
    csl_fast.accumulate(logits, target, index, tracker)
    before = {k: v.clone() for k, v in tracker.buffers().items()}
    if "index" in change:
        index[3] = change["index"]
    if "target" in change:
        target[3] = change["target"]
    if "index_dtype" in change:
        index = index.to(change["index_dtype"])
    with pytest.raises(error, match=match):
        csl_fast.accumulate(logits, target, index, tracker)
    for name, buf in tracker.buffers().items():
        assert torch.equal(buf, before[name]), name


def test_op_checks_and_gradcheck():
    tracker = CSLTracker(N, C, dtype=torch.float64)
    b = tracker.buffers()
    logits, target, index = _batch(torch.float64, 1, batch=8)
    names = ("csl_sum", "csl_count")
    state = ("last_loss", "last_max_prob", "last_correct", "forgetting", "learned_epoch")
    sums = ("grad_norm_sum", "margin_sum", "p_true_sum", "p_true_sq_sum")
    args = (
        logits, target, None, -100, 0.1, 1, index, *(b[n] for n in names), 0,
        *(b[n] for n in state), *(b[n] for n in sums),
    )  # fmt: skip
    torch.library.opcheck(
        torch.ops.csl_fast.track_cross_entropy.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: csl_fast.accumulate(z, target, index, tracker, label_smoothing=0.1), (x,)
    )
    loss, grad, stats = torch.ops.csl_fast.track_cross_entropy(*args)
    assert loss.shape == () and grad.shape == logits.shape and stats.shape == (NUM_STATS, 8)
