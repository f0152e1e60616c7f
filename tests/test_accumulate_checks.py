"""The checks of accumulate_checks: when the host-side range checks run by default, what
they cost on a GPU (one host read for valid input) and what they say; the buffer and
tracker checks every recording entry point shares."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import csl_fast
from csl_fast.accumulate_checks import _check_values, validate_by_default


@pytest.mark.parametrize(
    ("device", "backend", "checked"),
    [
        # The reference's PyTorch ops fault the GPU on a bad target or index (a device-side
        # assert): one synchronisation buys a clear error on the correctness tool.
        ("cuda", "reference", True),
        ("cpu", "reference", True),
        # The C++ CPU kernels check before writing; elsewhere checking on the host is free.
        ("cpu", "cpu", False),
        ("cpu", "triton", True),
        # The fused GPU kernels skip bad rows; a check would cost a sync on every step.
        ("cuda", "triton", False),
        ("cuda", "cuda", False),
    ],
)
def test_who_is_checked_by_default(device, backend, checked):
    assert validate_by_default(torch.device(device), backend) is checked


class _HostReads:
    """Counts reads of a tensor's value on the host (each one a synchronisation on a GPU)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("__bool__", "__int__", "item", "tolist"):
            real = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._counted(real))

    def _counted(self, real):
        def read(t, *args):
            self.count += 1
            return real(t, *args)

        return read


def test_valid_input_costs_one_host_read(monkeypatch):
    target, index = torch.tensor([0, 2, -100, 1]), torch.tensor([3, 0, 3, 1])
    reads = _HostReads(monkeypatch)
    _check_values(target, index, 3, 4, -100)
    assert reads.count == 1
    _check_values(None, index, 0, 4, 0, "record_loss")
    assert reads.count == 2


@pytest.mark.parametrize(
    ("target", "index", "match"),
    [
        ([0, 3, 1], [0, 1, 2], r"target\[1\] = 3 is outside \[0, C = 3\)"),
        ([0, -5, 1], [9, 1, 2], r"target\[1\] = -5 is outside"),  # the target first
        ([0, -100, 1], [0, 1, 4], r"index\[2\] = 4 is outside \[0, N = 4\)"),
        ([0, 1, 1], [-1, 1, 2], r"index\[0\] = -1 is outside"),
    ],
)
def test_messages_name_the_first_bad_entry(target, index, match):
    with pytest.raises(IndexError, match=match):
        _check_values(torch.tensor(target), torch.tensor(index), 3, 4, -100)


_PAST_INT32 = 2**31 + 16  # a buffer of more samples than int32 holds (not allocated here)


@pytest.mark.parametrize("compiled", [False, True])
def test_int32_indices_into_more_than_2_31_samples_are_in_range(compiled):
    """``index >= num_samples`` cast N = 2**31 + 16 to int32 (a negative number): every
    int32 index was "outside", and validate=True and backend='reference' refused index 5
    with an IndexError (in a compiled graph, check_in_graph's RuntimeError)."""

    def check(index):
        _check_values(torch.tensor([0, 1, 2]), index, 3, _PAST_INT32, -100)

    if compiled:
        check = torch.compile(check, backend="eager", fullgraph=True)
    check(torch.tensor([0, 5, 2**31 - 1], dtype=torch.int32))
    # The lower bound still holds.
    error = RuntimeError if compiled else IndexError
    with pytest.raises(error, match=r"index\[1\] = -1 is outside|an index is outside"):
        check(torch.tensor([0, -1, 2], dtype=torch.int32))


def test_reference_checks_before_writing():
    """The reference backend validates by default (on CPU tensors here, as on a GPU)."""
    csl, count = torch.zeros(4), torch.zeros(4)
    logits, target = torch.randn(3, 3), torch.tensor([0, 1, 2])
    with pytest.raises(IndexError, match=r"index\[1\] = 7 is outside"):
        csl_fast.accumulate(logits, target, torch.tensor([0, 7, 1]), csl, count=count,
                            backend="reference")  # fmt: skip
    with pytest.raises(IndexError, match=r"index\[1\] = 7 is outside"):
        csl_fast.record_loss(torch.rand(3), torch.tensor([0, 7, 1]), csl, count=count,
                             backend="reference")  # fmt: skip
    assert csl.sum() == 0 and count.sum() == 0


@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
def test_class_probability_calls_check_their_indices(backend):
    """Class probabilities have no range to check, but their dataset indices do: an index
    outside [0, N) is refused before anything is written, on every backend (the reference
    raised PyTorch's "index out of range in self" after writing csl, and interpreted
    Triton dropped the row without a word)."""
    csl, count = torch.zeros(4), torch.zeros(4)
    logits, probs = torch.randn(3, 3), torch.rand(3, 3).softmax(1)
    for bad in (7, -1):
        with pytest.raises(IndexError, match=rf"index\[1\] = {bad} is outside \[0, N = 4\)"):
            csl_fast.accumulate(logits, probs, torch.tensor([0, bad, 1]), csl, count=count,
                                backend=backend)  # fmt: skip
    assert csl.sum() == 0 and count.sum() == 0


@pytest.mark.parametrize("backend", ["auto", *csl_fast.available_backends("cpu")])
def test_a_tracker_takes_logits_of_its_own_class_count(backend):
    """A tracker made for 5 classes refuses logits of 7, in every layout, before anything
    is written: its suggested labels would otherwise hold classes 5 and 6, which cleaning,
    detection and reports read as below num_classes."""
    tracker = csl_fast.CSLTracker(4, num_classes=5, backend=backend)
    before = {name: buf.clone() for name, buf in tracker.buffers().items()}
    logits = torch.randn(2, 7)
    logits[:, 6] += 10  # confidently class 6, suggested for every row
    index, target = torch.tensor([0, 1]), torch.tensor([0, 1])
    layouts = {
        "rows": (logits, target),
        "[C]": (logits[0], target[0]),
        "[N, C, d]": (logits[:, :, None], target[:, None]),
        "sequences [B*T, V]": (logits.repeat(3, 1), torch.zeros(2, 3, dtype=torch.long)),
    }
    for layout, (z, y) in layouts.items():
        idx = index[:1] if layout == "[C]" else index
        with pytest.raises(ValueError, match=r"C = 7 classes .* num_classes=5; make the tracker "
                           r"with num_classes=7"):  # fmt: skip
            csl_fast.accumulate(z, y, idx, tracker, backend=backend)
    for name, buf in tracker.buffers().items():
        assert torch.equal(buf, before[name]), name
    csl_fast.accumulate(logits[:, :5], target, index, tracker, backend=backend)
    assert tracker.csl_count.tolist() == [1, 1, 0, 0]


@pytest.mark.parametrize("backend", ["auto", *csl_fast.available_backends("cpu")])
def test_inference_buffers_are_written_inside_inference_mode_only(backend):
    """A buffer created under torch.inference_mode() is written inside it, as PyTorch
    allows, and refused outside it with one message on every backend (the fused kernels
    wrote into it while the reference raised PyTorch's error), before anything is written."""
    from csl_fast.linear_cross_entropy import linear_cross_entropy

    with torch.inference_mode():
        csl, tracker = torch.zeros(4), csl_fast.CSLTracker(4, 3, backend=backend)
    logits, target, index = torch.randn(2, 3), torch.tensor([0, 2]), torch.tensor([1, 3])
    calls = {
        "accumulate": lambda buf: csl_fast.accumulate(logits, target, index, buf, backend=backend),
        "record_loss": lambda buf: csl_fast.record_loss(torch.rand(2), index, buf, backend=backend),
        "accumulate_bce": lambda buf: csl_fast.accumulate_bce(
            logits, torch.rand(2, 3), index, buf, backend=backend
        ),
        "linear_cross_entropy": lambda buf: linear_cross_entropy(
            torch.randn(2, 4), torch.randn(3, 4), target, index, buf, backend=backend
        ),
    }
    for call in calls.values():
        with pytest.raises(RuntimeError, match=r"inference tensor .* create csl \(or the "
                           r"tracker holding it\) outside torch.inference_mode"):  # fmt: skip
            call(csl)
    assert csl.sum() == 0
    with torch.inference_mode():
        csl_fast.accumulate(logits, target, index, csl, backend=backend)
        csl_fast.accumulate(logits, target, index, tracker, backend=backend)
    want = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(csl[index], want)
    torch.testing.assert_close(tracker.csl_sum[index], want)
    # a tracker made there holds normal tensors (test_tracker.py): it records outside too
    csl_fast.accumulate(logits, target, index, tracker, backend=backend)
    torch.testing.assert_close(tracker.csl_sum[index], 2 * want)


@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
def test_a_buffer_sharing_memory_with_an_input_is_refused(backend):
    """An index passed as the count too was counted into while it was read (the C++ kernel
    wrote past the count). Refused by name on every path (the one-call CPU step declines
    it), with nothing written."""
    big = torch.full((12,), 3, dtype=torch.long)
    index, target = big[4:8], big[:4]
    logits, csl = torch.randn(4, 5), torch.zeros(4)
    for kwargs, match in (
        (dict(csl=csl, count=index), "count shares memory with index"),
        (dict(csl=csl, count=big[2:6]), "count shares memory with index"),
        (dict(csl=index.view(torch.float64)), "csl shares memory with index"),
        # count=target by a typo added into the user's labels without a word
        (dict(csl=csl, count=target), "count shares memory with target"),
        (dict(csl=logits[0, :4]), "csl shares memory with logits"),
    ):
        with pytest.raises(ValueError, match=match):
            csl_fast.accumulate(logits, target, index, backend=backend, **kwargs)
        assert big.tolist() == [3] * 12 and not csl.any()
    with pytest.raises(ValueError, match="count shares memory with index"):
        csl_fast.record_loss(torch.rand(4), index, csl, count=index, backend=backend)
    with pytest.raises(ValueError, match="count shares memory with index"):
        csl_fast.accumulate_bce(logits, torch.ones(4, 5), index, csl, count=index, backend=backend)
    soft = torch.ones(4, 5)
    with pytest.raises(ValueError, match="count shares memory with target"):
        csl_fast.accumulate_bce(logits, soft, index, csl, count=soft[0, :4], backend=backend)
    assert big.tolist() == [3] * 12 and not csl.any() and soft.eq(1).all()


def test_flags_from_a_config_string_are_refused_not_taken_as_true():
    """CSLTracker(history="no") kept a history, deterministic="no" ran deterministically,
    and accumulate(validate="False") validated: a non-empty string is truthy."""
    with pytest.raises(TypeError, match="history must be True or False, got 'no'"):
        csl_fast.CSLTracker(4, 3, history="no")
    with pytest.raises(TypeError, match="deterministic must be True, False or None"):
        csl_fast.CSLTracker(4, 3, deterministic="no")
    logits, target, index, csl = (
        torch.randn(4, 3),
        torch.arange(4) % 3,
        torch.arange(4),
        torch.zeros(4),
    )
    h, w = torch.randn(4, 2), torch.randn(3, 2)
    calls = {
        "accumulate": lambda **kw: csl_fast.accumulate(logits, target, index, csl, **kw),
        "accumulate_bce": lambda **kw: csl_fast.accumulate_bce(
            logits, torch.ones(4, 3), index, csl, **kw
        ),
        "record_loss": lambda **kw: csl_fast.record_loss(torch.rand(4), index, csl, **kw),
        "linear_cross_entropy": lambda **kw: csl_fast.linear_cross_entropy(
            h, w, target, index, csl, **kw
        ),
    }
    for name, call in calls.items():
        for flag in ("deterministic", "validate"):
            with pytest.raises(TypeError, match=rf"{name}: {flag} must be True, False or None"):
                call(**{flag: "False"})
        call(deterministic=True, validate=False)
    assert csl.any()


def _compiled_calls():
    z, t = torch.randn(3, 5), torch.tensor([0, 1, 4])
    y = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    return {
        "accumulate reference, index": (
            lambda csl, i, bad_t: csl_fast.accumulate(z, t, i, csl, backend="reference"),
            "csl_fast.accumulate: an index is outside",
        ),
        "accumulate reference, target": (
            lambda csl, i, bad_t: csl_fast.accumulate(
                z, torch.where(bad_t, 7, t), torch.arange(3), csl, backend="reference"
            ),
            # (Inductor's own bounds check on the loss's gather may come first)
            r"(or a target outside \[0, C = 5\)|index out of bounds)",
        ),
        "record_loss reference": (
            lambda csl, i, bad_t: csl_fast.record_loss(z[:, 0], i, csl, backend="reference"),
            "csl_fast.record_loss: an index is outside",
        ),
        "accumulate_bce, index": (
            lambda csl, i, bad_t: csl_fast.accumulate_bce(
                z[:, :2], y, i, csl, validate=True, backend="reference"
            ),
            "csl_fast.accumulate_bce: an index is outside",
        ),
        "accumulate_bce, target": (
            lambda csl, i, bad_t: csl_fast.accumulate_bce(
                z[:, :2], torch.where(bad_t[:, None], 3.0, y), torch.arange(3), csl
            ),
            r"a target is outside \[0, 1\].*\(target \+ 1\) / 2",
        ),
    }


@pytest.mark.parametrize("case", list(_compiled_calls()))
def test_compiled_calls_check_ranges_on_the_cpu(case):
    """Under torch.compile the host checks were skipped: the reference backend dropped an
    out-of-range index with validate=True, and accumulate_bce recorded a target of 3 as a
    negative CSL. The compiled graph now raises before anything is written."""
    call, match = _compiled_calls()[case]
    csl = torch.zeros(6)
    compiled = torch.compile(call, fullgraph=True)
    good, bad_rows = torch.tensor([0, 1, 2]), torch.tensor([False, False, True])
    compiled(csl, good, torch.zeros(3, dtype=torch.bool))
    written = csl.clone()
    assert bool(written.any())
    with pytest.raises(RuntimeError, match=match):
        compiled(csl, torch.tensor([0, 1, 9]), bad_rows)
    assert torch.equal(csl, written)


class _NonBlocking(torch.overrides.TorchFunctionMode):
    """Records the ``non_blocking`` argument of every ``Tensor.to`` call."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.to:
            self.seen.append(kwargs.get("non_blocking", False))
        return func(*args, **kwargs)


def test_copies_to_the_host_are_synchronous():
    # A GPU-to-host copy with non_blocking=True may not have landed when the host reads
    # it (the range checks, the CPU kernels): only copies to a GPU may be asynchronous.
    n, c = 6, 3
    x, y, index = torch.randn(n, c), torch.arange(n) % c, torch.arange(n)
    tracker = csl_fast.CSLTracker(n, c)
    with _NonBlocking() as mode:
        csl_fast.score_epoch(torch.nn.Identity(), [(x, y, index)], tracker)
        watched = tracker.watch(x.clone(), index)
        csl_fast.accumulate(watched, y, index, tracker).backward()
    assert mode.seen and not any(mode.seen)


_I3 = torch.arange(3)
_TRACED_CALLS = {
    "accumulate": lambda z, csl: csl_fast.accumulate(z, torch.tensor([0, 2, 1]), _I3, csl),
    "accumulate_bce": lambda z, csl: csl_fast.accumulate_bce(z, (z > 0).float(), _I3, csl),
    "record_loss": lambda z, csl: csl_fast.record_loss(z.sum(1), _I3, csl),
    "linear_cross_entropy": lambda z, csl: csl_fast.linear_cross_entropy(
        z, torch.eye(3), torch.tensor([0, 2, 1]), _I3, csl
    ),
    "input_grad.watch": lambda z, csl: csl.watch(z.clone().requires_grad_(), _I3),
    "input_grad_norms": lambda z, csl: csl_fast.input_grad.input_grad_norms(z, _I3, csl),
    # the tracker's own recording methods, which the docs offer instead of accumulate
    "CSLTracker.update": lambda z, csl: csl.update(_I3, _row_stats(z)),
    "CSLTracker.record": lambda z, csl: csl.record(_I3, _row_stats(z)),
    "CSLTracker.record_eval": lambda z, csl: csl.record_eval(_I3, _row_stats(z)),
}
_TRACKER_ONLY = ("input_grad", "CSLTracker.")


def _row_stats(z: torch.Tensor) -> torch.Tensor:
    from csl_fast import reference

    return reference.row_statistics(z, torch.tensor([0, 2, 1]), -100)


@pytest.mark.parametrize(
    "name, into",
    [(name, "tracker") for name in _TRACED_CALLS]
    + [(name, "tensor") for name in _TRACED_CALLS if not name.startswith(_TRACKER_ONLY)],
)
def test_jit_trace_is_refused(name, into):
    """Under torch.jit.trace the recorders raise: the trace kept the loss but not the
    writes into the buffers, and the traced module recorded nothing after tracing."""
    csl = torch.zeros(5) if into == "tensor" else csl_fast.CSLTracker(5, 3)
    buffers = [csl] if into == "tensor" else list(csl.buffers().values())
    before = [b.clone() for b in buffers]
    call = _TRACED_CALLS[name]
    with pytest.raises(RuntimeError, match=r"cannot run under torch\.jit\.trace.*torch\.compile"):
        torch.jit.trace(lambda z: call(z, csl), (torch.randn(3, 3),), check_trace=False)
    assert all(torch.equal(b, b0) for b, b0 in zip(buffers, before, strict=True))
    call(torch.randn(3, 3), csl)  # (eagerly, it runs)


def test_jit_trace_of_linear_cross_entropy_without_csl_runs():
    """With nothing to record it is a plain fused loss, which a trace keeps whole."""
    w = torch.randn(3, 4)
    target = torch.tensor([0, 2, 1])
    traced = torch.jit.trace(
        lambda h: csl_fast.linear_cross_entropy(h, w, target),
        (torch.randn(3, 4),),
        check_trace=False,  # (its graphs differ between runs in constants torch records)
    )
    h = torch.randn(3, 4)
    torch.testing.assert_close(traced(h), F.cross_entropy(h @ w.T, target))
