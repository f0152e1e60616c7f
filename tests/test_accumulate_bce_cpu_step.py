"""accumulate_bce on the CPU in eager mode is one call into C++ (csl_fast._C.bce_step, which
makes the op calls there): the same loss, gradient, buffers and tracker state, bit for bit,
as the op-by-op path, the same errors with nothing written, and ops that autograd and
profilers still see."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from step_probes import Logged, Seen, break_step, count_steps

import csl_fast
from csl_fast import CSLTracker, _ext
from csl_fast.info import fast_step_fallbacks

pytestmark = pytest.mark.skipif(
    _ext._C is None, reason="the compiled extension csl_fast._C (its bce_step) is not built"
)

N, L = 12, 5


def _batch(dtype, seed, batch=40):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, L, generator=g, dtype=torch.float64) * 3).to(dtype)
    target = (torch.rand(batch, L, generator=g) < 0.3).to(dtype)
    target[::5, 1] = 0.25  # soft targets too
    index = torch.randint(0, N, (batch,), generator=g)  # duplicates in every batch
    return logits, target, index


@pytest.fixture
def steps(monkeypatch):
    """The calls csl_fast._C.bce_step completed."""
    return count_steps(monkeypatch, "bce_step")


def _sink(kind, dtype):
    """A tracker (with per-label buffers), or a CSL buffer (with every optional buffer for
    "buffers"), what accumulate_bce takes for it, and a function returning the state."""
    if kind == "tracker":
        tracker = CSLTracker(N, L, dtype=dtype, num_labels=L)
        return tracker, {}, tracker.buffers
    csl = torch.zeros(N, dtype=dtype)
    kwargs = {}
    if kind == "buffers":
        kwargs = {
            "count": torch.zeros(N, dtype=torch.int64),
            "wrong": torch.zeros(N, dtype=torch.int32),
            "min_margin": torch.zeros(N, dtype=dtype),
            "label_csl": torch.zeros(N, L, dtype=dtype),
            "label_margin": torch.zeros(N, L, dtype=dtype),
            "label_prob": torch.zeros(N, L, dtype=dtype),
        }
    return csl, kwargs, lambda: {"csl": csl, **kwargs}


def _run(fast, kind, dtype, sink_dtype, reduction, options, calls):
    sink, kwargs, state = _sink(kind, sink_dtype)
    losses, grads = [], []
    for epoch in range(2):
        for seed in range(2):
            logits, target, index = _batch(dtype, 10 * epoch + seed)
            if seed == 1:
                index = index.int()
                logits = logits.t().contiguous().t()  # column-major: any strides
            logits.requires_grad_(True)
            loss = csl_fast.accumulate_bce(
                logits,
                target,
                index,
                sink,
                reduction=reduction,
                validate=None if fast else True,  # validate=True keeps the op-by-op path
                **kwargs,
                **options,
            )
            (loss * torch.rand_like(loss)).sum().backward()  # a non-unit upstream gradient
            losses.append(loss.detach())
            grads.append(logits.grad)
        if kind == "tracker":
            sink.end_epoch()
    assert len(calls) == (4 if fast else 0)
    calls.clear()
    return losses, grads, state()


@pytest.mark.parametrize("kind", ["tracker", "buffer", "buffers"])
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str
)
@pytest.mark.parametrize("sink_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize(
    "options",
    [{}, {"weight": torch.rand(1, L) + 0.5, "pos_weight": torch.rand(L) + 0.5}],
    ids=["", "weights"],
)
def test_same_as_op_by_op(kind, dtype, sink_dtype, reduction, options, steps):
    torch.manual_seed(1)
    want = _run(False, kind, dtype, sink_dtype, reduction, options, steps)
    torch.manual_seed(1)
    got = _run(True, kind, dtype, sink_dtype, reduction, options, steps)
    for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True):
        assert torch.equal(a, b)
    for name, buf in want[2].items():
        assert torch.equal(got[2][name], buf), name


_ERRORS = [
    ("index", IndexError, r"index\[3\] = 12 is outside \[0, N = 12\)"),
    ("target", ValueError, "the target of row 3, label 2 is 1.5, outside"),
    ("label_csl", ValueError, r"label_csl must be a contiguous \[N, L\]"),
]
_COUNT_ERRORS = [
    ("count", ValueError, "count has 11 entries but csl has 12"),
    ("index_count", ValueError, "count shares memory with index"),
]


@pytest.mark.parametrize(
    ("kind", "change", "error", "match"),
    [(kind, *e) for kind in ("tracker", "buffers") for e in _ERRORS]
    + [("buffers", *e) for e in _COUNT_ERRORS],  # (a tracker keeps its own counts)
)
def test_errors_name_the_problem_and_write_nothing(kind, change, error, match, steps):
    """Bad input raises the op-by-op path's error (the step declines it, or raises before
    writing and the op-by-op path names the problem), with every buffer untouched."""
    sink, kwargs, state = _sink(kind, torch.float32)
    logits, target, index = _batch(torch.float32, 0)
    csl_fast.accumulate_bce(logits, target, index, sink, **kwargs)
    assert len(steps) == 1
    before = {k: v.clone() for k, v in state().items()}
    if change == "index":
        index[3] = N
    elif change == "target":
        target[3, 2] = 1.5
    elif change == "label_csl":
        kwargs = {**kwargs, "label_csl": torch.zeros(N, L + 1)}
    elif change == "count":
        kwargs = {**kwargs, "count": torch.zeros(N - 1)}
    else:  # the index's first entry is the count's last
        shared = torch.zeros(N - 1 + len(index), dtype=torch.int64)
        index = shared[N - 1 :].copy_(index)
        kwargs = {**kwargs, "count": shared[:N]}
    with pytest.raises(error, match=match):
        csl_fast.accumulate_bce(logits, target, index, sink, **kwargs)
    for name, buf in state().items():
        assert torch.equal(buf, before[name]), name


def test_gradcheck_and_grad_modes(steps):
    tracker = CSLTracker(N, L, dtype=torch.float64, num_labels=L)
    logits, target, index = _batch(torch.float64, 1, batch=8)
    x = logits.clone().requires_grad_(True)
    pos_weight = torch.rand(L, dtype=torch.float64) + 0.5
    assert torch.autograd.gradcheck(
        lambda z: csl_fast.accumulate_bce(z, target, index, tracker, pos_weight=pos_weight), (x,)
    )
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            loss = csl_fast.accumulate_bce(x, target, index, tracker)
        assert loss.grad_fn is None
        torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, target))
    assert steps


def test_not_taken_under_a_torch_function_mode(steps):
    """The C++ call skips torch.ops, which a torch function mode would see; under one,
    accumulate_bce takes the op-by-op path, whose ops the mode sees."""
    logits, target, index = _batch(torch.float32, 0)
    fast, slow = CSLTracker(N, L, num_labels=L), CSLTracker(N, L, num_labels=L)
    want = csl_fast.accumulate_bce(logits, target, index, fast)
    assert len(steps) == 1
    with Seen() as mode:
        got = csl_fast.accumulate_bce(logits, target, index, slow)
    assert len(steps) == 1
    assert any("csl_fast.bce_fwd" in n for n in mode.names), mode.names
    assert torch.equal(got, want)
    for name, buf in fast.buffers().items():
        assert torch.equal(slow.buffers()[name], buf), name


def test_autograd_and_profiler_see_the_ops(steps):
    logits, target, index = _batch(torch.float32, 0)
    tracker = CSLTracker(N, L, num_labels=L)
    with torch.profiler.profile() as prof:
        csl_fast.accumulate_bce(logits.requires_grad_(True), target, index, tracker).backward()
    names = {e.name for e in prof.events()}
    for op in ("bce_fwd", "bce_record", "record_last", "bce_bwd"):
        assert f"csl_fast::{op}" in names, sorted(names)
    assert steps and logits.grad is not None


def test_a_tracker_with_history_goes_op_by_op(steps):
    """The epoch sums of a tracker with history are the op-by-op path's to write."""
    tracker = CSLTracker(N, L, history=True)
    logits, target, index = _batch(torch.float32, 0)
    csl_fast.accumulate_bce(logits, target, index, tracker)
    assert not steps
    plain = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    want = torch.zeros(N).index_add_(0, index, plain)
    torch.testing.assert_close(tracker.csl_sum, want)
    torch.testing.assert_close(tracker.buffers()["epoch_loss_sum"], want)


def _entry_args():
    tracker = CSLTracker(N, L, num_labels=L)
    logits, target, index = _batch(torch.float32, 0)
    csl, count = tracker.training_buffers()
    buffers = (csl, count, None, None, tracker.label_csl, None, tracker.label_prob)
    last = (tracker.last_loss, torch.zeros(N), torch.zeros(N, dtype=torch.bool))
    return (logits, target, None, None, 1, index, *buffers, last)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (lambda a: a[:13], "takes 14 arguments, got 13"),
        (lambda a: (a[0].tolist(), *a[1:]), None),  # not a tensor: declined
        (lambda a: (*a[:2], "w", *a[3:]), "weight must be a tensor, got str"),
        (lambda a: (*a[:4], "x", *a[5:]), "integer"),
        (lambda a: (*a[:7], 1.5, *a[8:]), "every buffer must be a tensor, got float"),
        (lambda a: (*a[:13], a[13][:2]), "last must be None or a tuple of 3 tensors"),
        (lambda a: (*a[:13], (*a[13][:2], None)), "every entry of last must be a tensor"),
    ],
)
def test_direct_entry_argument_errors(args, match):
    good = _entry_args()
    assert _ext._C.bce_step(*good).shape == ()
    if match is None:
        assert _ext._C.bce_step(*args(good)) is None
        return
    with pytest.raises(TypeError, match=match):
        _ext._C.bce_step(*args(good))


def test_the_step_declines_what_it_does_not_take():
    """Calls the C++ step does not take come back as None (the op-by-op path then takes
    them, with its own checks and errors), before anything is written."""
    logits, target, index = _batch(torch.float32, 0)
    csl, count, label = torch.zeros(N), torch.zeros(N), torch.zeros(N, L)

    class Sub(torch.Tensor):
        pass

    def args(**change):
        a = {"logits": logits, "target": target, "weight": None, "pos_weight": None}
        a |= {"reduction": 1, "index": index, "csl": csl, "count": count, "label": label}
        a.update(change)
        return (
            *(a[k] for k in ("logits", "target", "weight", "pos_weight", "reduction", "index")),
            *(a["csl"], a["count"], None, None, a["label"], None, None, None),
        )

    bad_target = target.clone()
    bad_target[0, 0] = -0.5
    nan_target = target.clone()
    nan_target[0, 0] = float("nan")
    declined = [
        args(logits=logits[None]),
        args(logits=logits.int()),
        args(logits=logits.to("meta")),
        args(logits=logits.as_subclass(Sub)),
        args(target=target.double()),
        args(target=target[:, :-1]),
        args(target=target.clone().requires_grad_(True)),
        args(target=bad_target),  # outside [0, 1]: the op-by-op path names the entry
        args(target=nan_target),  # NaN: the op-by-op path decides
        args(index=index[:-1]),
        args(index=index.float()),
        args(reduction=3),
        args(weight=torch.ones(L, requires_grad=True)),
        args(pos_weight=torch.ones(L + 1)),
        args(pos_weight=torch.ones(L, dtype=torch.int64)),
        args(csl=torch.zeros(N, requires_grad=True)),
        args(count=torch.zeros(N, requires_grad=True)),
        args(count=csl),  # shares memory with csl
        args(label=torch.zeros(N, L).requires_grad_(True)),
        args(csl=None),
    ]
    with torch.inference_mode():
        frozen = torch.zeros(N)
    declined.append(args(csl=frozen))
    for a in declined:
        assert _ext._C.bce_step(*a) is None
    assert csl.sum() == 0 and count.sum() == 0 and label.sum() == 0
    with torch.no_grad():  # a weight requiring grad is fine without grad mode
        weight = torch.ones(L, requires_grad=True)
        assert _ext._C.bce_step(*args(weight=weight)) is not None
    assert count.sum() > 0 and label.sum() > 0


@pytest.fixture
def broken_step(monkeypatch):
    """csl_fast._C.bce_step raising on every call."""
    break_step(monkeypatch, "bce_step")


@pytest.mark.parametrize("kind", ["tracker", "buffers"])
def test_a_failing_fast_step_is_counted_and_warned_once(kind, broken_step):
    """The op-by-op path still gives the right answer, but the fallback is not silent:
    counted with its reason (csl_fast.info) and one RuntimeWarning per process."""
    sink, kwargs, state = _sink(kind, torch.float32)
    ref, ref_kwargs, ref_state = _sink(kind, torch.float32)
    logits, target, index = _batch(torch.float32, 0)
    with pytest.warns(RuntimeWarning, match="planted failure") as caught:
        loss = csl_fast.accumulate_bce(logits, target, index, sink, **kwargs)
        csl_fast.accumulate_bce(logits, target, index, sink, **kwargs)
    warned = [str(w.message) for w in caught if "one-call CPU step" in str(w.message)]
    assert len(warned) == 1 and "csl_fast._C.bce_step" in warned[0]
    assert fast_step_fallbacks() == (2, "RuntimeError: planted failure")
    for _ in range(2):
        want = csl_fast.accumulate_bce(logits, target, index, ref, validate=True, **ref_kwargs)
    assert torch.equal(loss, want)
    for name, buf in ref_state().items():
        assert torch.equal(state()[name], buf), name


def test_bad_input_is_an_error_not_a_fallback(broken_step):
    """Input the op-by-op path refuses raises its error and counts as no fallback."""
    tracker = CSLTracker(N, L, num_labels=L)
    logits, target, index = _batch(torch.float32, 0)
    index[3] = N
    with pytest.raises(IndexError, match="outside"):
        csl_fast.accumulate_bce(logits, target, index, tracker)
    assert fast_step_fallbacks() == (0, None)


def test_autograd_sees_the_writes(steps):
    """The kernels write through data pointers; the version counters say they wrote (a
    buffer saved for backward elsewhere would otherwise be used stale, unnoticed)."""
    tracker = CSLTracker(N, L, num_labels=L)
    logits, target, index = _batch(torch.float32, 0)
    written = ("csl_sum", "csl_count", "last_loss", "label_csl_sum", "label_prob_sum")
    before = {name: tracker.buffers()[name]._version for name in written}
    csl_fast.accumulate_bce(logits, target, index, tracker)
    assert steps
    for name in written:
        assert tracker.buffers()[name]._version > before[name], name


def test_a_tracker_of_other_labels_is_refused_even_with_label_buffers_given(steps):
    """The tracker's L is checked before anything runs, also when every label buffer is
    given with the logits' L (the step cannot see the tracker's, and would record)."""
    tracker = CSLTracker(N, L, num_labels=L - 2)
    logits, target, index = _batch(torch.float32, 0)
    given = {"label_csl": torch.zeros(N, L), "label_prob": torch.zeros(N, L)}
    with pytest.raises(ValueError, match=f"keeps L = {L - 2} labels per sample"):
        csl_fast.accumulate_bce(logits, target, index, tracker, **given)
    assert tracker.csl_count.sum() == 0 and tracker.csl_sum.sum() == 0 and not steps


@pytest.mark.parametrize("which", ["weight", "pos_weight", "count", "label_csl"])
def test_a_tensor_subclass_anywhere_goes_op_by_op(which, steps):
    """A subclass among the options or buffers must see the ops, as on the op-by-op path."""
    logits, target, index = _batch(torch.float32, 0)
    sink, kwargs, _ = _sink("buffers", torch.float32)
    if which in ("weight", "pos_weight"):
        kwargs[which] = torch.ones(L)
    kwargs[which] = kwargs[which].as_subclass(Logged)
    Logged.seen.clear()
    csl_fast.accumulate_bce(logits, target, index, sink, **kwargs)
    assert not steps
    assert any("bce_fwd" in name or "bce_record" in name for name in Logged.seen)


def test_a_first_call_under_inference_mode_keeps_the_step(steps):
    """The tracker's scratch buffers, made on its first call, are never inference tensors,
    which later calls outside inference mode could not write."""
    tracker = CSLTracker(N, L, num_labels=L)
    logits, target, index = _batch(torch.float32, 0)
    with torch.inference_mode():
        csl_fast.accumulate_bce(logits, target, index, tracker)
    steps.clear()
    csl_fast.accumulate_bce(logits, target, index, tracker)
    assert len(steps) == 1
