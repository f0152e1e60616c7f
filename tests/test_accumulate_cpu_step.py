"""accumulate on the CPU in eager mode is one call into C++ (csl_fast._C.step, which makes the
op calls there): the same loss, gradient, buffers and tracker state, bit for bit, as the
op-by-op path, the same errors with nothing written, and ops that autograd and profilers
still see."""

from __future__ import annotations

import pytest
import torch
from step_probes import Logged, Seen, break_step, count_steps

import csl_fast
from csl_fast import CSLTracker, _ext
from csl_fast.info import fast_step_fallbacks

pytestmark = pytest.mark.skipif(
    _ext._C is None, reason="the compiled extension csl_fast._C (its step) is not built"
)

N, C = 12, 9


def _batch(dtype, seed, batch=40):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, C, generator=g, dtype=torch.float64) * 3).to(dtype)
    target = torch.randint(0, C, (batch,), generator=g)
    target[::7] = -100
    index = torch.randint(0, N, (batch,), generator=g)  # duplicates in every batch
    return logits, target, index


@pytest.fixture
def steps(monkeypatch):
    """The calls csl_fast._C.step completed."""
    return count_steps(monkeypatch, "step")


def _sink(kind, dtype):
    """A tracker, or a CSL buffer (with a count buffer for "buffer+count"), and what
    accumulate takes for it."""
    if kind == "tracker":
        tracker = CSLTracker(N, C, dtype=dtype)
        return tracker, {}, tracker.buffers
    csl = torch.zeros(N, dtype=dtype)
    count = torch.zeros(N, dtype=torch.int64) if kind == "buffer+count" else None
    kwargs = {} if count is None else {"count": count}
    return csl, kwargs, lambda: {"csl": csl, **kwargs}


def _run(fast, kind, dtype, sink_dtype, reduction, options, calls):
    sink, kwargs, state = _sink(kind, sink_dtype)
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
                sink,
                reduction=reduction,
                validate=None if fast else True,  # validate=True keeps the op-by-op path
                **kwargs,
                **options,
            )
            loss.sum().backward()
            losses.append(loss.detach())
            grads.append(logits.grad)
        if kind == "tracker":
            sink.end_epoch()
    assert len(calls) == (6 if fast else 0)
    calls.clear()
    return losses, grads, state()


@pytest.mark.parametrize("kind", ["tracker", "buffer", "buffer+count"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str
)
@pytest.mark.parametrize("sink_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options", [{}, {"label_smoothing": 0.2, "weight": torch.rand(C) + 0.5}], ids=["", "opts"]
)
def test_same_as_op_by_op(kind, dtype, sink_dtype, reduction, options, steps):
    want = _run(False, kind, dtype, sink_dtype, reduction, options, steps)
    got = _run(True, kind, dtype, sink_dtype, reduction, options, steps)
    for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True):
        assert torch.equal(a, b)
    for name, buf in want[2].items():
        assert torch.equal(got[2][name], buf), name


@pytest.mark.parametrize("kind", ["tracker", "buffer+count"])
@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"index": N}, IndexError, r"index\[3\] = 12 is outside \[0, N = 12\)"),
        ({"target": C}, IndexError, r"target\[3\] = 9 is outside \[0, C = 9\)"),
        ({"index_dtype": torch.float32}, TypeError, "index must hold int64"),
    ],
)
def test_errors_name_the_problem_and_write_nothing(kind, change, error, match):
    sink, kwargs, state = _sink(kind, torch.float32)
    logits, target, index = _batch(torch.float32, 0)
    csl_fast.accumulate(logits, target, index, sink, **kwargs)
    before = {k: v.clone() for k, v in state().items()}
    if "index" in change:
        index[3] = change["index"]
    if "target" in change:
        target[3] = change["target"]
    if "index_dtype" in change:
        index = index.to(change["index_dtype"])
    with pytest.raises(error, match=match):
        csl_fast.accumulate(logits, target, index, sink, **kwargs)
    for name, buf in state().items():
        assert torch.equal(buf, before[name]), name


def test_gradcheck_and_grad_modes(steps):
    tracker = CSLTracker(N, C, dtype=torch.float64)
    logits, target, index = _batch(torch.float64, 1, batch=8)
    x = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda z: csl_fast.accumulate(z, target, index, tracker, label_smoothing=0.1), (x,)
    )
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            loss = csl_fast.accumulate(x, target, index, tracker)
        assert loss.grad_fn is None
        assert torch.allclose(loss, torch.nn.functional.cross_entropy(logits, target))
    assert steps


def test_not_taken_under_a_torch_function_mode(steps):
    """The C++ call skips torch.ops, which a torch function mode would see; under one,
    accumulate takes the op-by-op path, whose ops the mode sees."""
    logits, target, index = _batch(torch.float32, 0)
    fast, slow = CSLTracker(N, C), CSLTracker(N, C)
    want = csl_fast.accumulate(logits, target, index, fast)
    assert len(steps) == 1
    with Seen() as mode:
        got = csl_fast.accumulate(logits, target, index, slow)
    assert len(steps) == 1
    assert any("csl_fast.cross_entropy_fwd" in n for n in mode.names), mode.names
    assert torch.equal(got, want)
    for name, buf in fast.buffers().items():
        assert torch.equal(slow.buffers()[name], buf), name


def test_autograd_and_profiler_see_the_ops(steps):
    logits, target, index = _batch(torch.float32, 0)
    tracker = CSLTracker(N, C)
    with torch.profiler.profile() as prof:
        csl_fast.accumulate(logits.requires_grad_(True), target, index, tracker).backward()
    names = {e.name for e in prof.events()}
    for op in ("cross_entropy_fwd", "scatter_stats", "record_last"):
        assert f"csl_fast::{op}" in names, sorted(names)
    assert steps and logits.grad is not None


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (lambda a: a[:10], "takes 11 arguments, got 10"),
        (lambda a: (a[0].tolist(), *a[1:]), "logits must be a tensor, got list"),
        (lambda a: (*a[:2], "w", *a[3:]), "weight must be a tensor, got str"),
        (lambda a: (*a[:3], "x", *a[4:]), "integer"),
        (lambda a: (*a[:8], 1.5, *a[9:]), "count must be a tensor, got float"),
        (lambda a: (*a[:10], a[10][:8]), "state must be None or a tuple of 12 tensors"),
        (lambda a: (*a[:10], (*a[10][:11], None)), "every state entry must be a tensor"),
    ],
)
def test_direct_entry_argument_errors(args, match):
    tracker = CSLTracker(N, C)
    logits, target, index = _batch(torch.float32, 0)
    csl, count = tracker.training_buffers()
    good = (logits, target, None, -100, 0.0, 1, index, csl, count, 0, tracker._step_state)
    assert _ext._C.step(*good).shape == ()
    with pytest.raises(TypeError, match=match):
        _ext._C.step(*args(good))


def test_copies_of_a_tracker_step_into_their_own_buffers(steps):
    """The tracker hands the C++ call its buffers as a tuple kept beside them; a deep copy or
    a pickle round trip must keep the two pointing at the same (new) tensors."""
    import copy
    import pickle

    logits, target, index = _batch(torch.float32, 0)
    original = CSLTracker(N, C)
    for clone in (copy.deepcopy(original), pickle.loads(pickle.dumps(original))):
        csl_fast.accumulate(logits, target, index, clone)
        assert clone.csl_count.sum() > 0 and clone.last_loss.abs().sum() > 0
    assert len(steps) == 2
    assert original.csl_count.sum() == 0 and original.last_loss.abs().sum() == 0


def test_sequences_go_op_by_op(steps):
    """[B*T, V] logits with [B, T] targets are sequences: recorded per sequence by the
    op-by-op path, without a failed C++ call first."""
    logits, target, _ = _batch(torch.float32, 0, batch=12)
    csl = torch.zeros(N)
    seq_index = torch.tensor([1, 5, 5])
    loss = csl_fast.accumulate(logits, target.view(3, 4), seq_index, csl)
    assert not steps
    per_token = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(loss, per_token[target != -100].mean())
    want = torch.zeros(N).index_add_(0, seq_index, per_token.view(3, 4).sum(1))
    torch.testing.assert_close(csl, want)


@pytest.fixture
def broken_step(monkeypatch):
    """csl_fast._C.step raising on every call."""
    break_step(monkeypatch, "step")


@pytest.mark.parametrize("kind", ["tracker", "buffer+count"])
def test_a_failing_fast_step_is_counted_and_warned_once(kind, broken_step):
    """The op-by-op path still gives the right answer, but the fallback is not silent:
    counted with its reason (csl_fast.info) and one RuntimeWarning per process."""
    sink, kwargs, state = _sink(kind, torch.float32)
    ref, ref_kwargs, ref_state = _sink(kind, torch.float32)
    logits, target, index = _batch(torch.float32, 0)
    with pytest.warns(RuntimeWarning, match="planted failure") as caught:
        loss = csl_fast.accumulate(logits, target, index, sink, **kwargs)
        csl_fast.accumulate(logits, target, index, sink, **kwargs)
    assert len([w for w in caught if "one-call CPU step" in str(w.message)]) == 1
    assert fast_step_fallbacks() == (2, "RuntimeError: planted failure")
    assert "fallbacks in this process: 2 (last: RuntimeError: planted failure)" in (
        csl_fast.info.report()
    )
    for _ in range(2):
        want = csl_fast.accumulate(logits, target, index, ref, validate=True, **ref_kwargs)
    assert torch.equal(loss, want)
    for name, buf in ref_state().items():
        assert torch.equal(state()[name], buf), name


def test_bad_input_is_an_error_not_a_fallback(broken_step):
    """Input the op-by-op path refuses raises its error and counts as no fallback."""
    tracker = CSLTracker(N, C)
    logits, target, index = _batch(torch.float32, 0)
    index[3] = N
    with pytest.raises(IndexError, match="outside"):
        csl_fast.accumulate(logits, target, index, tracker)
    assert fast_step_fallbacks() == (0, None)


def test_no_fallback_where_the_fast_step_applies(steps):
    """Every eager CPU call the fast step covers completes there: in each test, the autouse
    fixture in tests/conftest.py also fails on any fallback."""
    before = fast_step_fallbacks()[0]
    for kind in ("tracker", "buffer", "buffer+count"):
        sink, kwargs, _ = _sink(kind, torch.float64)
        for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            logits, target, index = _batch(dtype, 3)
            csl_fast.accumulate(logits.requires_grad_(True), target, index, sink, **kwargs)
    assert len(steps) == 12 and fast_step_fallbacks()[0] == before


def test_the_step_declines_what_it_does_not_take():
    """Calls the C++ step does not take come back as None (the op-by-op path then takes
    them, with its own checks and errors), before anything is written."""
    logits, target, index = _batch(torch.float32, 0)
    csl, count = torch.zeros(N), torch.zeros(N)

    class Sub(torch.Tensor):
        pass

    def args(**change):
        a = {"logits": logits, "target": target, "weight": None, "index": index}
        a.update(change)
        buf = change.get("csl", csl)
        cnt = change.get("count", count)
        return (a["logits"], a["target"], a["weight"], -100, 0.0, 1, a["index"], buf, cnt, 0, None)

    declined = [
        args(logits=logits[None]),  # [N, C, d] layouts
        args(target=target.view(4, 10)),  # sequences
        args(logits=logits.int()),  # the op-by-op path names the dtype
        args(logits=logits.to("meta")),
        args(logits=logits.as_subclass(Sub)),
        args(csl=torch.zeros(N, requires_grad=True)),
        args(count=torch.zeros(N, requires_grad=True)),
        args(count=csl),  # shares memory with csl
        args(weight=torch.ones(C, requires_grad=True)),
    ]
    with torch.inference_mode():
        frozen = torch.zeros(N)
    declined.append(args(csl=frozen))
    for a in declined:
        assert _ext._C.step(*a) is None
    assert csl.sum() == 0 and count.sum() == 0
    with torch.no_grad():  # a weight requiring grad is fine without grad mode
        assert _ext._C.step(*args(weight=torch.ones(C, requires_grad=True))) is not None
    assert count.sum() > 0


def test_half_precision_steps_round_the_gradient_once(steps):
    """float16/bfloat16 logits take the step, with the op-by-op path's round-once
    backward: bit for bit the same gradient for a non-unit upstream gradient."""
    for dtype in (torch.float16, torch.bfloat16):
        for reduction in ("mean", "sum", "none"):
            got, want = [], []
            for fast in (True, False):
                logits, target, index = _batch(dtype, 7)
                x = logits.requires_grad_(True)
                loss = csl_fast.accumulate(
                    x, target, index, torch.zeros(N), reduction=reduction,
                    validate=None if fast else True,
                )  # fmt: skip
                loss.backward(torch.full_like(loss, 1.7))
                (got if fast else want).append((loss.detach(), x.grad))
            for a, b in zip(got[0], want[0], strict=True):
                assert torch.equal(a, b), (dtype, reduction)
    assert len(steps) == 6


@pytest.mark.parametrize("which", ["weight", "count"])
def test_a_tensor_subclass_weight_or_count_goes_op_by_op(which, steps):
    """A subclass among the options or buffers must see the ops, as on the op-by-op path."""
    logits, target, index = _batch(torch.float32, 0)
    kwargs = {"weight": torch.ones(C), "count": torch.zeros(N)}
    kwargs[which] = kwargs[which].as_subclass(Logged)
    Logged.seen.clear()
    csl_fast.accumulate(logits, target, index, torch.zeros(N), **kwargs)
    assert not steps
    assert any("csl_fast." in name for name in Logged.seen), Logged.seen
