"""accumulate as a drop-in for F.cross_entropy (issue 15): every layout it accepts, its
refusals, torch.func transforms and forward-mode AD, buffer safety, threads, and the
bfloat16 gradient, on every backend (Triton in the interpreter, on tiny shapes)."""

from __future__ import annotations

import itertools
import math
import threading

import pytest
import torch
import torch.nn.functional as F
from overlaps import Overlaps
from torch.func import grad, jvp, vmap

import csl_fast
from csl_fast import CSLTracker, accumulate, reference

BACKENDS = csl_fast.available_backends("cpu")


def _plain_losses(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """What is recorded per row: unweighted, unsmoothed cross entropy in float64 (0 for
    ignored rows), against class indices or class probabilities."""
    if target.is_floating_point():
        return -(target.double() * logits.double().log_softmax(1)).sum(1)
    return F.cross_entropy(logits.double(), target, reduction="none")


def _both(
    backend, logits, target, index, csl, upstream=None, count=None, theirs_target=None, **kwargs
):
    """accumulate and F.cross_entropy (given ``theirs_target`` if not None) on copies of
    ``logits``: (loss, grad) pairs."""
    ours_in = logits.detach().clone().requires_grad_(True)
    theirs_in = logits.detach().clone().requires_grad_(True)
    ours = accumulate(ours_in, target, index, csl, count=count, backend=backend, **kwargs)
    theirs = F.cross_entropy(
        theirs_in, target if theirs_target is None else theirs_target, **kwargs
    )
    up = torch.rand_like(theirs) + 0.5 if upstream is None else upstream
    ours.backward(up)
    theirs.backward(up)
    return (ours, theirs), (ours_in.grad, theirs_in.grad)


def _assert_same(pairs, what, rtol=1e-5, atol=1e-6, equal_nan=False):
    for ours, theirs in pairs:
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype, what
        torch.testing.assert_close(
            ours, theirs, rtol=rtol, atol=atol, equal_nan=equal_nan, msg=what
        )


# ---------------------------------------------------------------- layouts (items 1, 2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inplace", [False, True], ids=["", "inplace"])
@pytest.mark.parametrize("extras", [False, True], ids=["", "softcap"])
def test_an_ignored_rows_upstream_gradient_is_never_read(backend, dtype, inplace, extras):
    """F.cross_entropy's backward never reads an ignored row's upstream gradient: a NaN
    there (a per-sequence mean over a padding row, 0 / 0) or an inf upstream of a sum
    leaves the row 0. The stored row times it was NaN, and every parameter after it."""
    if dtype == torch.float64 and backend == "triton":
        pytest.skip("the Triton kernels take no float64")
    if inplace and (extras or backend == "reference"):
        pytest.skip("the extras and the reference have no in-place form")
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(6, 5, generator=g).to(dtype)
    target = torch.tensor([0, -100, 2, -100, 4, 1])
    opts = {"softcap": 30.0} if extras else {}
    plain = {} if extras else {"inplace_grad": inplace}
    for reduction, up in (
        ("none", torch.tensor([1.0, float("nan"), 2.0, float("nan"), 0.5, 1.0])),
        ("sum", torch.tensor(float("inf"))),
    ):
        ours_in = logits.detach().clone().requires_grad_(True)
        theirs_in = logits.detach().clone().requires_grad_(True)
        leaf = ours_in.clone() if inplace else ours_in  # (in place: a non-leaf)
        ours = accumulate(leaf, target, torch.arange(6), torch.zeros(6), backend=backend,
                          reduction=reduction, **opts, **plain)  # fmt: skip
        z = theirs_in.float() if extras else theirs_in
        if extras:
            z = 30.0 * torch.tanh(z / 30.0)
        theirs = F.cross_entropy(z, target, reduction=reduction).to(dtype)
        ours.backward(up.to(dtype))
        theirs.backward(up.to(dtype))
        for row in (1, 3):
            assert theirs_in.grad[row].eq(0).all()
            assert ours_in.grad[row].eq(0).all(), (reduction, ours_in.grad[row])
        if reduction == "none":  # (an inf sum makes the other rows inf or NaN in both)
            torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_three_d_with_d_equal_c_is_read_as_pytorch_reads_it(backend, reduction):
    """[N, C, d] with d == C was once read as [B, T, V] sequences (a silent re-reading)."""
    x = torch.randn(2, 3, 3)
    t = torch.randint(0, 3, (2, 3))
    t[1, 0] = -100
    csl, count = torch.zeros(4, dtype=torch.float64), torch.zeros(4)
    losses, grads = _both(
        backend, x, t, torch.tensor([3, 1]), csl, reduction=reduction, count=count
    )
    _assert_same([losses, grads], f"{backend} {reduction}")
    # Per sample: the summed loss over its positions, and how many positions counted.
    per_pos = F.cross_entropy(x.double(), t, reduction="none")
    assert torch.allclose(csl[[3, 1]], per_pos.sum(1), rtol=1e-6)
    assert count.tolist() == [0.0, 2.0, 0.0, 3.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_segmentation_records_per_image_csl(backend):
    """[N, C, H, W] logits with [N, H, W] targets: per-image CSL, value and gradient of
    F.cross_entropy (class weights, label smoothing, ignored pixels)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 4, 3, generator=g)
    t = torch.randint(0, 5, (3, 4, 3), generator=g)
    t[0, :2] = -100
    w = torch.rand(5, generator=g) + 0.5
    csl, count = torch.zeros(6, dtype=torch.float64), torch.zeros(6, dtype=torch.int64)
    index = torch.tensor([5, 0, 5])  # a duplicate index adds up
    for reduction in ("mean", "none"):
        csl.zero_()
        count.zero_()
        losses, grads = _both(
            backend, x, t, index, csl, count=count, weight=w, label_smoothing=0.1,
            reduction=reduction,
        )  # fmt: skip
        _assert_same([losses, grads], f"{backend} {reduction}")
        per_image = F.cross_entropy(x.double(), t, reduction="none").sum((1, 2))
        want = torch.zeros(6, dtype=torch.float64).index_add_(0, index, per_image)
        torch.testing.assert_close(csl, want, rtol=1e-6, atol=1e-6)
        assert count.tolist() == [12, 0, 0, 0, 0, 12 + 12 - 6]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_samples_without_positions_into_a_tracker(backend, reduction):
    """[N, C, 0] logits (F.cross_entropy takes them) into a tracker: nothing is a
    presentation. record_sequences once read token 0 of each sample, an IndexError."""
    tracker = CSLTracker(4, num_classes=3)
    before = {k: v.clone() for k, v in tracker.buffers().items()}
    x, t = torch.randn(2, 3, 0), torch.zeros(2, 0, dtype=torch.long)
    losses, grads = _both(backend, x, t, torch.tensor([1, 1]), tracker, reduction=reduction)
    _assert_same([losses, grads], f"{backend} {reduction}")
    for name, buf in tracker.buffers().items():
        assert torch.equal(buf, before[name]), name


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("validate", [None, True], ids=["step", "ops"])
def test_mean_over_zero_class_weight_is_nan(backend, dtype, validate):
    """'mean' whose valid rows all have class weight 0 (D = 0): F.cross_entropy's 0 / 0, a
    NaN loss and NaN gradients in the valid rows. With label smoothing the per-row losses
    sum to more than 0, and every path divided them by D: an inf loss and inf gradient
    entries (the float16/bfloat16 rounding, then the fused float32/float64 kernels).
    (validate=True on the CPU goes op by op instead of the C++ step.)"""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton takes no float64 logits")
    x = torch.randn(3, 4).to(dtype)
    target = torch.tensor([1, -100, 1])
    weight = torch.tensor([0.5, 0.0, 1.0, 2.0], dtype=dtype)
    kwargs = {"weight": weight, "label_smoothing": 0.3}
    ours_in, theirs_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    csl = torch.zeros(3, dtype=torch.float64)
    ours = accumulate(
        ours_in, target, torch.arange(3), csl, backend=backend, validate=validate, **kwargs
    )
    theirs = F.cross_entropy(theirs_in, target, **kwargs)
    assert ours.isnan() and theirs.isnan(), f"{backend}: {ours.item()}"
    ours.backward(torch.tensor(1.5, dtype=dtype))
    theirs.backward(torch.tensor(1.5, dtype=dtype))
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, equal_nan=True, rtol=0, atol=0)
    assert theirs_in.grad[[0, 2]].isnan().all() and theirs_in.grad[1].eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_class_weight_reaches_only_the_rows_of_its_class(
    backend, dtype, reduction, bad
):
    """Without label smoothing a class's weight enters only the rows of that class, so
    F.cross_entropy's gradient is finite elsewhere; the kernels once multiplied every
    other class's weight by eps = 0, and 0 * NaN made every row's gradient NaN."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton takes no float64 logits")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 5, generator=g).to(dtype)
    weight = (torch.rand(5, generator=g) + 0.5).to(dtype)
    weight[2] = bad
    for target in (torch.tensor([-100, 2, 1, 3, 0, 2]), torch.tensor([-100, 0, 1, 3, 0, 4])):
        losses, grads = _both(
            backend,
            x,
            target,
            torch.arange(6),
            torch.zeros(6),
            weight=weight,
            reduction=reduction,
            upstream=torch.tensor(1.0, dtype=dtype).expand((6,) if reduction == "none" else ()),
        )
        what = f"{backend} {dtype} {reduction} targets {target.tolist()}"
        tol = {"rtol": 2e-2, "atol": 2e-3} if dtype.itemsize == 2 else {}
        for ours, theirs in (losses, grads):
            # where F is not finite the two may differ in kind (inf against NaN)
            finite = theirs.isfinite()
            assert torch.equal(ours.isfinite(), finite), what
            torch.testing.assert_close(ours[finite], theirs[finite], **tol, msg=what)
        # the gradient's non-finite entries are F's kind too (Triton's float32 kernel gave
        # -inf where F's -w_y + p_y w_y is NaN, at an infinite weight of the target)
        assert torch.equal(_kinds(grads[0]), _kinds(grads[1])), what
        # the rows of other classes keep a finite gradient (the ignored row a zero one)
        rows = (target != 2) & (target != -100)
        if reduction != "mean" or not (target == 2).any():
            assert grads[0][rows].isfinite().all() and grads[0][0].eq(0).all(), what


def _kinds(x: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 +inf, 2 -inf, 3 NaN: where F.cross_entropy is not finite, which it is."""
    return x.isposinf().int() + 2 * x.isneginf().int() + 3 * x.isnan().int()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("classes", [5, 40])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_an_infinite_class_weight_with_label_smoothing_gives_what_pytorch_gives(
    backend, classes, reduction, monkeypatch
):
    """With label smoothing every row has the term w_k (lse - z_k) of an infinite weight,
    inf as in F.cross_entropy, or NaN where lse - z_k rounds to 0. The shifted smoothing
    sum took w_k (z_k - max) = inf * 0 = NaN when class k held a row's max (found by an
    outside audit). 40 classes: the C++ wide rows, and Triton's chunked lanes."""
    if backend == "triton" and classes > 8:
        from csl_fast._triton import cross_entropy

        monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
        monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 4)
    g = torch.Generator().manual_seed(classes)
    k = classes // 3
    x = torch.randn(4, classes, generator=g) * 2
    x[0, k] = x[0].max() + 1  # the infinite class holds the max, of another row's target
    x[3], x[3, k] = 0.0, 200.0  # lse - z_k rounds to 0: NaN
    target = torch.randint(0, classes, (4,), generator=g)
    target[0], target[1] = k + 1, k
    weight = torch.rand(classes, generator=g) + 0.5
    weight[k] = float("inf")
    for rows in (3, 4):
        losses, grads = _both(
            backend,
            x[:rows],
            target[:rows],
            torch.arange(rows),
            torch.zeros(rows),
            weight=weight,
            label_smoothing=0.1,
            reduction=reduction,
        )
        what = f"{backend} {classes} classes {reduction} {rows} rows"
        for ours, theirs in (losses, grads):
            assert torch.equal(_kinds(ours), _kinds(theirs)), what
            finite = theirs.isfinite()
            torch.testing.assert_close(ours[finite], theirs[finite], msg=what)
        if reduction == "none":
            assert losses[1][0].isposinf(), what  # the audit's row: F's inf, not NaN


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_an_infinite_class_weight_with_label_smoothing_in_every_dtype(backend, dtype):
    """The per-row losses of the case above are inf or NaN where F.cross_entropy's are, in
    the other dtypes (16-bit logits against F in float32, where the kernels compute)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16, bfloat16 and float32 logits")
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 5, generator=g) * 2
    x[0, 1] = x[0].max() + 1
    x[3], x[3, 1] = 0.0, 200.0
    target = torch.tensor([2, 1, 0, 0])
    weight = torch.rand(5, generator=g) + 0.5
    weight[1] = float("inf")
    wide = torch.promote_types(dtype, torch.float32)
    theirs = F.cross_entropy(
        x.to(dtype).to(wide), target, weight=weight.to(dtype).to(wide), label_smoothing=0.1,
        reduction="none",
    )  # fmt: skip
    ours = accumulate(
        x.to(dtype), target, torch.arange(4), torch.zeros(4), weight=weight.to(dtype),
        label_smoothing=0.1, reduction="none", backend=backend,
    )  # fmt: skip
    assert torch.equal(_kinds(ours.to(wide)), _kinds(theirs)), f"{backend} {dtype}"
    assert ours[0].isposinf(), f"{backend} {dtype}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_unbatched_input(backend):
    x = torch.randn(7)
    # (a one-entry [1] class index too: F.cross_entropy takes it, and it was refused)
    for target in (torch.tensor(4), torch.tensor([4]), torch.softmax(torch.randn(7), 0)):
        for reduction in ("mean", "none"):
            csl = torch.zeros(3, dtype=torch.float64)
            # (PyTorch's own backward fails on the [1] target: "size mismatch")
            same = target.reshape(()) if target.dtype == torch.long else None
            losses, grads = _both(
                backend, x, target, torch.tensor(2), csl, reduction=reduction, theirs_target=same
            )
            _assert_same([losses, grads], f"{backend} {reduction}")
            assert losses[0].dim() == 0
            want = _plain_losses(
                x[None], target.reshape(-1) if target.numel() == 1 else target[None]
            )[0]
            torch.testing.assert_close(csl[2], want, rtol=1e-6, atol=1e-7)
            assert csl[[0, 1]].eq(0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(6, 5), (2, 5, 3), (5,)], ids=str)
def test_soft_targets(backend, shape):
    """Class probabilities: F.cross_entropy's value and gradient (weights and label
    smoothing as PyTorch applies them); recorded: H(q, p), unweighted and unsmoothed."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(*shape, generator=g)
    q = torch.softmax(torch.randn(*shape, generator=g) * 2, dim=0 if len(shape) == 1 else 1)
    n = 1 if len(shape) == 1 else shape[0]
    index = torch.tensor(1) if len(shape) == 1 else torch.arange(n)
    for kwargs in ({}, {"weight": torch.rand(5, generator=g) + 0.5, "label_smoothing": 0.2}):
        for reduction in ("mean", "sum", "none"):
            csl, count = torch.zeros(n + 1, dtype=torch.float64), torch.zeros(n + 1)
            losses, grads = _both(
                backend, x, q, index, csl, count=count, reduction=reduction, **kwargs
            )
            _assert_same([losses, grads], f"{backend} {shape} {reduction} {kwargs}")
            rows_z = x.reshape(1, -1) if len(shape) == 1 else x.movedim(1, -1).reshape(-1, 5)
            rows_q = q.reshape(1, -1) if len(shape) == 1 else q.movedim(1, -1).reshape(-1, 5)
            per_sample = _plain_losses(rows_z, rows_q).reshape(n, -1)
            torch.testing.assert_close(csl[index.reshape(-1)], per_sample.sum(1))
            assert count[index.reshape(-1)].tolist() == [float(per_sample.shape[1])] * n


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("logits", "target"),
    [
        ((3, 0), torch.ones(3, 0)),
        ((2, 0, 3), torch.zeros(2, 3, dtype=torch.long)),
        ((2, 0, 3), torch.ones(2, 0, 3)),
        ((0,), torch.ones(0)),
    ],
    ids=["probabilities", "k-dim", "k-dim probabilities", "unbatched"],
)
def test_no_classes_are_refused_by_name(backend, logits, target):
    """C = 0 failed inside a reshape or an argmax ("cannot reshape tensor of 0 elements")
    for the layouts other than [B, C] with class indices."""
    csl = torch.zeros(3)
    with pytest.raises(ValueError, match=r"have C = 0 classes"):
        accumulate(
            torch.randn(logits),
            target,
            torch.arange(logits[0]).clamp(max=2)[:1]
            if len(logits) == 1
            else torch.arange(logits[0]),
            csl,
            backend=backend,
        )
    assert not csl.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_soft_targets_refuse_an_ignore_index_as_pytorch(backend):
    """F.cross_entropy refuses a class index as ignore_index with class probabilities; it
    was dropped."""
    x, q = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    with pytest.raises(RuntimeError):
        F.cross_entropy(x, q, ignore_index=1)
    csl = torch.zeros(4)
    with pytest.raises(ValueError, match="ignore_index=1 applies to class-index targets"):
        accumulate(x, q, torch.arange(4), csl, ignore_index=1, backend=backend)
    assert not csl.any()
    # a negative one names no class: F.cross_entropy takes it, and so does accumulate (a
    # code base with ignore_index=-1 everywhere broke on switching to mixup targets)
    for ignore in (-1, -255):
        want = F.cross_entropy(x, q, ignore_index=ignore)
        got = accumulate(x, q, torch.arange(4), csl, ignore_index=ignore, backend=backend)
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(csl, 2 * _plain_losses(x, q).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_soft_targets_record_by_their_own_loss(backend):
    """Whether a float16 row is recorded depends on H(q, p) (below 65520), not on the hard
    loss at argmax q. Both rows' H is finite; row 0's hard loss at its argmax (66000)
    overflows float16 and it was dropped, while row 1 (hard loss ~0) was recorded."""
    z = torch.tensor([[32000.0, -34000.0, 0.0], [32000.0, -34000.0, 31000.0]]).half()
    q = torch.tensor([[0.4, 0.6, 0.0], [0.9, 0.1, 0.0]]).half()
    csl, count = torch.zeros(2, dtype=torch.float64), torch.zeros(2)
    accumulate(z, q, torch.arange(2), csl, count=count, reduction="none", backend=backend)
    assert count.tolist() == [1.0, 1.0]
    torch.testing.assert_close(csl, _plain_losses(z.float(), q.float()), rtol=1e-6, atol=0)


def test_soft_targets_with_a_tracker_name_the_way_out():
    tracker = CSLTracker(4, 3)
    x, q = torch.randn(4, 3), torch.softmax(torch.randn(4, 3), 1)
    # (it advised csl=tracker.csl_sum, count=tracker.csl_count: the tracker's final loss
    # read 0 for those samples, and its confidence and AUM were diluted by mixed batches)
    with pytest.raises(TypeError, match=r"tensors of their own \(csl=torch.zeros\(N\), count="):
        accumulate(x, q, torch.arange(4), tracker)
    assert not tracker.csl_count.any()
    csl, count = torch.zeros(4), torch.zeros(4)
    accumulate(x, q, torch.arange(4), csl, count=count)
    assert count.tolist() == [1.0] * 4


@pytest.mark.parametrize(
    ("logits", "target", "match"),
    [
        # A [B, T] target with [B, T, V] logits (T != V): F.cross_entropy refuses it too;
        # the error names both explicit sequence forms.
        ((2, 4, 6), (2, 4), r"logits.flatten\(0, 1\) \(\[B\*T, V\]\).*transpose\(1, 2\)"),
        # K-dimensional logits with a target of the wrong shape: the expected one is named.
        ((2, 3, 4, 5), (2, 4), r"\[N, d1, \.\.\., dk\] = \(2, 4, 5\)"),
        ((2, 3), (2, 4), r"class probabilities and must have the logits' shape"),
    ],
)
def test_refused_layouts_name_the_layout(logits, target, match):
    csl = torch.zeros(4)
    t = torch.rand(target) if match.startswith("class") else torch.zeros(target, dtype=torch.long)
    with pytest.raises(ValueError, match=match):
        accumulate(torch.randn(logits), t, torch.arange(2), csl)
    assert not csl.any()


# ------------------------------------------------------------ transforms (item 3)


def _random_batch(b=4, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, c, generator=g),
        torch.randint(0, c, (b,), generator=g),
        torch.randn(b, c, generator=g),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_buffer_made_inside_a_transform_is_refused_plainly(backend):
    """A csl buffer allocated inside grad or jvp is a functorch wrapper with no storage:
    "Cannot access data pointer of Tensor that doesn't have storage" from the buffer lock."""
    x, t, v = _random_batch()

    def loss(z):
        return accumulate(z, t, torch.arange(4), torch.zeros(6), backend=backend)

    for call in (lambda: grad(loss)(x), lambda: jvp(loss, (x,), (v,))):
        with pytest.raises(ValueError, match=r"csl was created inside a torch\.func transform"):
            call()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_meta_inputs_give_meta_results_as_pytorch(backend, reduction):
    """Shape inference on the meta device: F.cross_entropy gives a meta loss; csl_fast
    said "csl shares memory with index" (every meta address is 0) or raised from .item()."""
    t = torch.zeros(4, dtype=torch.long, device="meta")
    sinks = (
        {"csl": torch.zeros(10, device="meta")},
        # a count buffer and a meta tracker: "csl and count share memory" (addresses 0)
        {"csl": torch.zeros(10, device="meta"), "count": torch.zeros(10, device="meta")},
        {"csl": csl_fast.CSLTracker(10, 3, device="meta")},
    )
    for sink in sinks:
        x = torch.randn(4, 3, device="meta", requires_grad=True)
        out = accumulate(
            x, t, torch.arange(4, device="meta"), **sink, backend=backend, reduction=reduction
        )
        want = F.cross_entropy(x, t, reduction=reduction)
        assert out.is_meta and out.shape == want.shape and out.dtype == want.dtype
        out.sum().backward()
        assert x.grad.is_meta and x.grad.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms_and_forward_ad(backend):
    """grad, vmap(grad) (per-sample gradients), jvp and forward-mode AD give PyTorch's
    answer (never a zero or missing tangent) and record each sample once."""
    x, t, v = _random_batch()
    idx = torch.arange(4)
    want_csl = F.cross_entropy(x, t, reduction="none")
    csl = torch.zeros(4)

    def loss(z):
        return accumulate(z, t, idx, csl, backend=backend)

    torch.testing.assert_close(grad(loss)(x), grad(lambda z: F.cross_entropy(z, t))(x))
    torch.testing.assert_close(csl, want_csl)

    csl.zero_()
    per_sample = vmap(grad(lambda z, y, i: accumulate(z, y, i, csl, backend=backend)))(x, t, idx)
    want = vmap(grad(lambda z, y: F.cross_entropy(z, y)))(x, t)
    torch.testing.assert_close(per_sample, want)
    torch.testing.assert_close(csl, want_csl)  # unbatched calls: [C] logits, 0-d index

    csl.zero_()
    _, tangent = jvp(loss, (x,), (v,))
    _, want_tangent = jvp(lambda z: F.cross_entropy(z, t), (x,), (v,))
    assert float(want_tangent) != 0.0
    torch.testing.assert_close(tangent, want_tangent)
    torch.testing.assert_close(csl, want_csl)

    csl.zero_()
    with torch.autograd.forward_ad.dual_level():
        out = loss(torch.autograd.forward_ad.make_dual(x, v))
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    assert tangent is not None
    torch.testing.assert_close(tangent, want_tangent)
    torch.testing.assert_close(csl, want_csl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_into_a_tracker(backend):
    x, t, _ = _random_batch(seed=1)
    tracker = CSLTracker(4, 5, backend=backend)
    vmap(lambda z, y, i: accumulate(z[None], y[None], i[None], tracker))(x, t, torch.arange(4))
    torch.testing.assert_close(tracker.csl_sum, F.cross_entropy(x, t, reduction="none"))
    assert tracker.csl_count.tolist() == [1.0] * 4


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_fused_op_under_a_transform_says_what_to_use(backend):
    x, t, v = _random_batch()
    op = csl_fast.ops.cross_entropy_fwd
    with pytest.raises(
        RuntimeError, match=r"csl_fast: the fused cross entropy .*csl_fast.accumulate"
    ):
        jvp(lambda z: op(z, t, None, -100, 0.0, 1, backend)[0], (x,), (v,))
    with pytest.raises(RuntimeError, match=r"csl_fast: .* backend='reference'"):
        grad(lambda z: op(z, t, None, -100, 0.0, 1, backend)[0])(x)
    csl = torch.zeros(4)  # outside the transform (made inside, it is refused first)
    with pytest.raises(ValueError, match=r"inplace_grad=True needs class-index targets outside"):
        grad(lambda z: accumulate(z * 1, t, torch.arange(4), csl, inplace_grad=True))(x)


def test_linear_cross_entropy_under_a_transform_says_what_to_use():
    h, w = torch.randn(6, 4), torch.randn(7, 4)
    t, idx, csl = torch.randint(0, 7, (6,)), torch.arange(6), torch.zeros(6)

    def loss(weight):
        return csl_fast.linear_cross_entropy(h, weight, t, idx, csl)

    with pytest.raises(RuntimeError, match=r"linear_cross_entropy .* csl_fast.accumulate"):
        grad(loss)(w)
    with (
        pytest.raises(RuntimeError, match=r"linear_cross_entropy .* forward-mode AD"),
        torch.autograd.forward_ad.dual_level(),
    ):
        loss(torch.autograd.forward_ad.make_dual(w, torch.randn_like(w)))
    assert not csl.any()


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_inplace_grad_on_k_dimensional_logits(backend):
    """In place over the transpose(1, 2) idiom: the [B, T, V] storage holds the gradient;
    [N, C, H, W] logits, which would be copied first, are refused."""
    g = torch.Generator().manual_seed(6)
    h = torch.randn(2, 3, 4, generator=g)
    w = torch.randn(5, 4, generator=g, requires_grad=True)
    t = torch.randint(0, 5, (2, 3), generator=g)
    logits = h @ w.T  # [B, T, V]
    loss = accumulate(logits.transpose(1, 2), t, torch.arange(2), torch.zeros(2),
                      backend=backend, inplace_grad=True)  # fmt: skip
    loss.backward()
    w_ref = w.detach().clone().requires_grad_(True)
    F.cross_entropy((h @ w_ref.T).transpose(1, 2), t).backward()
    torch.testing.assert_close(w.grad, w_ref.grad)
    image = torch.randn(2, 5, 3, 3) * 1
    with pytest.raises(ValueError, match="no rows of contiguous classes"):
        accumulate(image, t.new_zeros(2, 3, 3), torch.arange(2), torch.zeros(2),
                   backend=backend, inplace_grad=True)  # fmt: skip


# ---------------------------------------------------------------- buffers (item 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_refusals_write_nothing(backend):
    x, t, _ = _random_batch()
    idx = torch.arange(4)
    csl = torch.zeros(8)
    with pytest.raises(ValueError, match="weight requires grad"):
        accumulate(x, t, idx, csl, weight=torch.rand(5, requires_grad=True), backend=backend)
    with pytest.raises(ValueError, match="csl and count share memory"):
        accumulate(x, t, idx, csl, count=csl, backend=backend)
    with pytest.raises(ValueError, match="csl and count share memory"):
        accumulate(x, t, idx, csl[:6], count=csl[2:], backend=backend)
    leaf = torch.zeros(8, requires_grad=True)
    with pytest.raises(ValueError, match="csl requires grad"):
        accumulate(x, t, idx, leaf, backend=backend)
    with pytest.raises(ValueError, match="count requires grad"):
        accumulate(x, t, idx, csl, count=torch.zeros(8, requires_grad=True), backend=backend)
    assert not csl.any() and not leaf.detach().any()
    # Disjoint halves of one tensor are fine.
    accumulate(x, t, idx, csl[:4], count=csl[4:], backend=backend)
    assert csl[4:].tolist() == [1.0] * 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_written_buffer_has_its_version_bumped(backend):
    x, t, _ = _random_batch()
    csl, count = torch.zeros(4), torch.zeros(4, dtype=torch.int64)
    rows, sequences = CSLTracker(4, 5, backend=backend), CSLTracker(4, 5, backend=backend)
    for logits, target, tracker in (
        (x, t, rows),
        (x.reshape(2, 2, 5).transpose(1, 2), t.reshape(2, 2), sequences),  # (one kind each)
    ):
        n = logits.shape[0]
        before = (csl._version, count._version, tracker.csl_sum._version)
        accumulate(logits, target, torch.arange(n), csl, count=count, backend=backend)
        accumulate(logits, target, torch.arange(n), tracker, backend=backend)
        after = (csl._version, count._version, tracker.csl_sum._version)
        assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    versions = {k: v._version for k, v in rows.buffers().items()}
    accumulate(x, t, torch.arange(4), rows, backend=backend)
    assert rows.last_loss._version > versions["last_loss"]


# ---------------------------------------------------------------- threads (item 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sink", ["buffer", "tracker"])
def test_concurrent_threads_lose_nothing(backend, sink):
    """Several Python threads adding into one buffer (or tracker), as nn.DataParallel
    replicas that compute the loss in forward do: every count arrives."""
    # The Triton interpreter is slow: a token load there.
    threads, calls, b = (2, 3, 32) if backend == "triton" else (4, 40, 1024)
    n = 8
    if sink == "tracker":
        target_sink = CSLTracker(n, 5, backend=backend, dtype=torch.float64)
        csl, count = target_sink.training_buffers()
        kwargs = {}
    else:
        csl, count = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int64)
        target_sink, kwargs = csl, {"count": count}
    g = torch.Generator().manual_seed(3)
    batches = [
        (torch.randn(b, 5, generator=g), torch.randint(0, 5, (b,), generator=g))
        for _ in range(threads)
    ]
    index = torch.arange(b) % n
    errors = []

    def work(k):
        try:
            for _ in range(calls):
                accumulate(*batches[k], index, target_sink, backend=backend, **kwargs)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors, errors
    assert count.tolist() == [threads * calls * b / n] * n
    want = sum(
        torch.zeros(n, dtype=torch.float64).index_add_(0, index, _plain_losses(z, y))
        for z, y in batches
    )
    torch.testing.assert_close(csl, want * calls, rtol=1e-5, atol=1e-5)


def _in_threads(fn, threads=4, calls=5):
    errors = []

    def work():
        try:
            for _ in range(calls):
                fn()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=work) for _ in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors, errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_writes_into_one_recorder_take_turns(backend):
    """Deterministic form of the test above: a recorder's update never runs in two
    threads at once, on every backend."""
    overlaps = Overlaps()
    tracker = CSLTracker(8, 5, backend=backend)

    class Probe:
        def __init__(self):
            self.training_buffers = tracker.training_buffers
            self.record = overlaps.wrap(tracker.record)

    x, t, _ = _random_batch(8, seed=4)
    _in_threads(lambda: accumulate(x, t, torch.arange(8), Probe(), backend=backend))
    assert overlaps.most == 1
    assert tracker.csl_count.tolist() == [20.0] * 8


# -------------------------------------------------------- low precision (item 1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_gradient_with_a_non_unit_upstream(backend, seed):
    """B = 5, C = 4097, mean, upstream 1.7: the gradient was rounded to bfloat16 twice
    (3x PyTorch's own error against float64); the rule is at most 2x, with no floor."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(5, 4097, generator=g, dtype=torch.float64) * 3).bfloat16()
    t = torch.randint(0, 4097, (5,), generator=g)
    up = torch.tensor(1.7, dtype=torch.bfloat16)
    exact_in = x.double().requires_grad_(True)
    F.cross_entropy(exact_in, t).backward(up.double())
    _, (ours, theirs) = _both(backend, x, t, torch.arange(5), torch.zeros(5), upstream=up)
    err_ours = (ours.double() - exact_in.grad).abs().max()
    err_torch = (theirs.double() - exact_in.grad).abs().max()
    assert err_ours <= 2 * err_torch, f"{float(err_ours):.3g} vs torch's {float(err_torch):.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_gradient_small_batches_any_upstream(backend, dtype):
    """Small batches, few to many classes, every reduction and upstream gradients that are
    not 1: at most 2x PyTorch's own error against float64 in each case (the gradient kept
    rounded from forward and scaled in backward rounded twice: 21 bfloat16 and 26 float16
    cases of 1080 failed). The float64 reference takes the same rounded upstream; the floor
    only covers gradients both compute exactly but for ~1e-19 of underflow."""
    g = torch.Generator().manual_seed(11)
    failures = []
    for b, c, reduction, up, spread in itertools.product(
        [1, 2, 3, 5], [2, 4, 100], ["mean", "sum", "none"], [1.7, 0.3, -2.5], [0.5, 3.0, 20.0]
    ):
        x = (torch.randn(b, c, generator=g, dtype=torch.float64) * spread).to(dtype)
        t = torch.randint(0, c, (b,), generator=g)
        shape = (b,) if reduction == "none" else ()
        upstream = torch.full(shape, up, dtype=dtype)
        exact_in = x.double().requires_grad_(True)
        F.cross_entropy(exact_in, t, reduction=reduction).backward(upstream.double())
        _, (ours, theirs) = _both(
            backend, x, t, torch.arange(b), torch.zeros(b), upstream=upstream, reduction=reduction
        )
        err_ours = (ours.double() - exact_in.grad).abs().max()
        err_torch = (theirs.double() - exact_in.grad).abs().max()
        if err_ours > 2 * err_torch + 1e-12:
            failures.append((b, c, reduction, up, spread, float(err_ours), float(err_torch)))
    assert not failures, failures


# ------------------------------------------------ found by an outside audit


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_computes_in_float32_as_pytorch(backend, dtype):
    """Under torch.autocast, F.cross_entropy casts float16/bfloat16 logits to float32 and
    returns a float32 loss (the fused ops returned one in the logits' dtype, rounded):
    the same dtype, value and gradient for class indices, K-dimensional logits and class
    probabilities."""
    cases = [
        (torch.randn(6, 5), torch.tensor([0, 4, -100, 1, 2, 3]), torch.arange(6)),
        (torch.randn(2, 5, 3), torch.tensor([[0, 4, 1], [-100, 2, 3]]), torch.arange(2)),
        (torch.randn(3, 5), torch.rand(3, 5).softmax(1), torch.arange(3)),
    ]
    for logits, target, index in cases:
        csl = torch.zeros(6, dtype=torch.float64)
        what = f"{tuple(logits.shape)} {target.dtype}"
        with torch.autocast("cpu", dtype=dtype):
            (ours, theirs), grads = _both(
                backend, logits.to(dtype), target, index, csl, weight=torch.rand(5),
                label_smoothing=0.1, reduction="none",
            )  # fmt: skip
        assert theirs.dtype == torch.float32, what
        _assert_same([(ours, theirs)], what)
        # Both gradients are formed in float32 and rounded once to the logits' dtype.
        _assert_same([grads], what, rtol=0, atol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_class_indices(backend):
    """F.cross_entropy takes uint8 class indices (segmentation masks with ignore_index=255)
    for [B, C] and [C] logits; accumulate refused them. It takes them in every layout and
    records what it records for int64 ones."""
    logits = torch.randn(4, 5)
    target = torch.tensor([1, 255, 4, 0], dtype=torch.uint8)
    want = F.cross_entropy(logits.double(), target.long(), ignore_index=255, reduction="none")
    csl = torch.zeros(4, dtype=torch.float64)
    losses, grads = _both(backend, logits, target, torch.arange(4), csl, ignore_index=255)
    _assert_same([losses, grads], "[B, C]")
    torch.testing.assert_close(csl, want)

    csl = torch.zeros(4, dtype=torch.float64)
    losses, grads = _both(backend, logits[2], target[2], torch.tensor(3), csl)
    _assert_same([losses, grads], "[C]")
    torch.testing.assert_close(csl, torch.tensor([0, 0, 0, float(want[2])], dtype=torch.float64))

    seg = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 255, 4], [0, 255, 2]], dtype=torch.uint8)  # F.cross_entropy: int64
    csl = torch.zeros(2, dtype=torch.float64)
    ours = accumulate(seg, mask, torch.arange(2), csl, ignore_index=255, backend=backend)
    torch.testing.assert_close(ours, F.cross_entropy(seg, mask.long(), ignore_index=255))
    per_pixel = F.cross_entropy(seg.double(), mask.long(), ignore_index=255, reduction="none")
    torch.testing.assert_close(csl, per_pixel.sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_int32_targets_with_an_ignore_index_beyond_int32(backend, reduction):
    """No int32 target equals an ignore_index outside int32, but comparing in int32 wrapped
    it onto a class: 2**32 + 2 ignored the rows of class 2 in the reference's statistics,
    and the Triton mean counted its padding rows (a loss ~100 times too small)."""
    logits = torch.randn(4, 5)
    target = torch.tensor([0, 4, 2, 1])
    ignore = 2**32 + 2
    csl = torch.zeros(4, dtype=torch.float64)
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    ours = accumulate(a, target.int(), torch.arange(4), csl, ignore_index=ignore,
                      reduction=reduction, backend=backend)  # fmt: skip
    theirs = F.cross_entropy(b, target, ignore_index=ignore, reduction=reduction)
    ours.backward()
    theirs.backward()
    _assert_same([(ours, theirs), (a.grad, b.grad)], reduction)
    torch.testing.assert_close(csl, _plain_losses(logits, target))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("tracked", [False, True])
def test_half_gradients_with_int32_targets_and_an_ignore_index_beyond_int32(dtype, tracked):
    """The one-call CPU step of half-precision logits counted the mean's denominator in
    int32: ignore_index 2**32 wrapped onto class 0, whose rows left it, and the gradient
    came out twice too large (the loss was right)."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 2.0], [1.0, 0.0, 0.0]])
    target = torch.tensor([0, 1, 2, 0])
    weight = torch.tensor([1.0, 2.0, 3.0])
    exact = logits.double().requires_grad_(True)
    F.cross_entropy(exact, target, weight=weight.double(), ignore_index=2**32).backward()
    x = logits.to(dtype).requires_grad_(True)
    into = csl_fast.CSLTracker(4, 3) if tracked else torch.zeros(4)
    accumulate(x, target.int(), torch.arange(4), into, weight=weight, ignore_index=2**32).backward()
    torch.testing.assert_close(x.grad.double(), exact.grad, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_class_weights_of_another_dtype(backend):
    """The fused kernels read class weights in float32 whatever their dtype; the reference
    backend, F.cross_entropy, refused a weight not of the logits' dtype (bfloat16 logits
    with float32 weights, the usual mixed-precision case). Every backend takes them, in
    eager mode and under torch.func transforms."""
    target, index = torch.tensor([0, 4, -100, 1, 2, 3]), torch.arange(6)
    weight = torch.rand(5) + 0.5
    logits = torch.randn(6, 5).bfloat16()
    ours = accumulate(logits, target, index, torch.zeros(6), weight=weight, backend=backend)
    exact = F.cross_entropy(logits.double(), target, weight=weight.double())
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.double(), exact, rtol=2 * 2**-8, atol=0)

    z = torch.randn(6, 5, dtype=torch.float64)
    csl = torch.zeros(6)
    want = grad(lambda x: F.cross_entropy(x, target, weight=weight.double()))(z)
    got = grad(lambda x: accumulate(x, target, index, csl, weight=weight, backend=backend))(z)
    torch.testing.assert_close(got, want)


# ------------------------------------------- PyTorch's own sample inputs (item 7)


@pytest.fixture(scope="module")
def torch_samples():
    """PyTorch's OpInfo for nn.functional.cross_entropy (its own test inputs: class
    indices and probabilities, K-dimensional inputs, weights, ignore_index, reductions)."""
    pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")
    try:
        from torch.testing._internal.common_methods_invocations import op_db
    except Exception as exc:  # an installed torch without its testing internals
        pytest.skip(f"torch.testing._internal is not usable here: {exc}")
    infos = [op for op in op_db if op.name == "nn.functional.cross_entropy"]
    if not infos:
        pytest.skip("this torch has no OpInfo for nn.functional.cross_entropy")
    return infos[0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pytorch_sample_inputs(torch_samples, backend, dtype):
    """Every sample input PyTorch tests F.cross_entropy with: the same value and gradient
    on every backend, and CSL recorded by the documented rule (each sample's plain loss
    summed over its positions)."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16, bfloat16 and float32 logits")
    samples = list(torch_samples.sample_inputs("cpu", dtype, requires_grad=True))
    assert samples
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-12}
    for k, sample in enumerate(samples):
        x, (target,), kwargs = sample.input, sample.args, sample.kwargs
        n = x.shape[0] if x.dim() > 1 else 1
        index = torch.arange(n) if x.dim() > 1 else torch.tensor(0)
        csl = torch.zeros(n, dtype=torch.float64)
        what = f"sample {k}: {tuple(x.shape)} {tuple(target.shape)} {sorted(kwargs)}"
        losses, grads = _both(backend, x, target.detach(), index, csl, **kwargs)
        _assert_same([losses, grads], what, **tol)
        rows_z = x.detach().reshape(1, -1) if x.dim() == 1 else x.detach().movedim(1, -1)
        rows_z = rows_z.reshape(-1, x.shape[0 if x.dim() == 1 else 1])
        if target.is_floating_point():
            rows_t = target.reshape(1, -1) if x.dim() == 1 else target.movedim(1, -1)
            per_row = _plain_losses(rows_z, rows_t.reshape(rows_z.shape))
        else:
            ignore = kwargs.get("ignore_index", -100)
            per_row = F.cross_entropy(
                rows_z.double(), target.reshape(-1), ignore_index=ignore, reduction="none"
            )
        torch.testing.assert_close(csl, per_row.reshape(n, -1).sum(1), msg=what)


# ---------------------------------- ignored rows with non-finite logits (outside audit)

_INF, _NAN = float("inf"), float("nan")
# Ignored rows whose F.cross_entropy gradient is NaN (log_softmax's backward forms
# 0 - softmax(z) * 0, and softmax(z) is NaN), then ignored rows whose gradient is 0.
_IGNORED_NAN_ROWS = {"a NaN": (3, _NAN), "a +inf": (1, _INF), "all -inf": (slice(None), -_INF)}
_IGNORED_ZERO_ROWS = {"one -inf": (2, -_INF), "finite": (0, 1.0)}


def _ignored_non_finite_batch(classes: int, dtype: torch.dtype):
    """Two ordinary rows around one ignored row of each kind above: (logits, target)."""
    g = torch.Generator().manual_seed(classes)
    kinds = [*_IGNORED_NAN_ROWS.values(), *_IGNORED_ZERO_ROWS.values()]
    logits = torch.randn(len(kinds) + 2, classes, generator=g, dtype=torch.float64) * 2
    for i, (col, value) in enumerate(kinds, start=1):
        logits[i, col] = value
    target = torch.full((len(kinds) + 2,), -100)
    target[0], target[-1] = 1, classes - 1
    return logits.to(dtype), target


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_half_precision_loss_does_not_depend_on_whether_grad_is_wanted(backend):
    """The loss of float16/bfloat16 logits under grad was the sum of the rows' losses, each
    rounded to the logits' dtype, over D; without grad the kernel's float32 mean, rounded
    once: the same call gave values one unit in the last place apart (55 of 400 small
    batches, audit helper-109), on the one-call C++ step and op by op (validate=True)."""
    gen = torch.Generator().manual_seed(5)
    differ = []
    for trial, dtype in itertools.product(range(30), [torch.bfloat16, torch.float16]):
        rows, classes = trial % 7 + 2, 3 + 5 * (trial % 6)
        logits = (torch.randn(rows, classes, generator=gen) * 3).to(dtype)
        target = torch.randint(0, classes, (rows,), generator=gen)
        target[0] = -100 if trial % 4 == 0 else target[0]
        kw = {
            "weight": torch.rand(classes, generator=gen) + 0.1 if trial % 2 else None,
            "label_smoothing": 0.1 if trial % 3 == 0 else 0.0,
            "validate": trial % 5 == 0,
        }
        extras = [{}] + ([{"z_loss_scale": 1e-3}] if kw["weight"] is None else [])
        for extra in extras:
            got = []
            for wanted in (True, False):
                z = logits.clone().requires_grad_(wanted)
                loss = accumulate(z, target, torch.arange(rows), CSLTracker(rows, classes),
                                  backend=backend, **kw, **extra)  # fmt: skip
                got.append(loss.detach())
            if not torch.equal(got[0], got[1]):
                differ.append((trial, dtype, extra, got))
    assert not differ, differ[:3]


def _loss_and_grad(fn, logits, dtype, upstream):
    """``fn(z)`` and its gradient for ``z`` = ``logits`` in ``dtype``, rounded to the logits'
    dtype (a float32 computation rounded once is what the kernels return for 16-bit logits)."""
    z = logits.to(dtype, copy=True).requires_grad_(True)
    loss = fn(z)
    loss.backward(upstream.to(dtype))
    return loss.detach().to(logits.dtype), z.grad.to(logits.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str
)
@pytest.mark.parametrize("classes", [5, 40])
def test_ignored_rows_with_non_finite_logits(backend, dtype, classes):
    """An ignored row's gradient in F.cross_entropy is NaN where its softmax is (a NaN or a
    +inf logit, or every logit -inf) and 0 otherwise, with or without weights, smoothing,
    in place, for every reduction; its loss is 0. The C++ CPU kernels gave 0 for every
    ignored row. With the extras (no PyTorch equivalent) the definition is
    reference.cross_entropy_extra: soft-capped logits are finite, so only a NaN remains.
    Values are compared with PyTorch in float32 (float64) rounded once to the logits' dtype
    (in bfloat16, F.cross_entropy's weighted mean is itself ~10x further from float64), but
    for the reference backend, which is PyTorch in the logits' dtype."""
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the Triton kernels take float16, bfloat16 and float32 logits")
    logits, target = _ignored_non_finite_batch(classes, dtype)
    rows = len(target)
    wide = torch.promote_types(dtype, torch.float32)
    weight = torch.rand(classes, generator=torch.Generator().manual_seed(1)) + 0.5
    tol = {"rtol": 1e-5, "atol": 1e-6}
    if dtype in (torch.bfloat16, torch.float16):
        tol = {"rtol": 2 * torch.finfo(dtype).eps, "atol": torch.finfo(dtype).eps / 64}
    nan_rows = torch.zeros(rows, dtype=torch.bool)
    nan_rows[1 : 1 + len(_IGNORED_NAN_ROWS)] = True
    inplace = [False] if backend == "reference" else [False, True]
    for eps, w, reduction, in_place in itertools.product(
        [0.0, 0.1], [None, weight], ["none", "mean", "sum"], inplace
    ):
        what = f"eps={eps} weighted={w is not None} {reduction} in_place={in_place}"
        up = torch.full((rows,) if reduction == "none" else (), 1.5, dtype=dtype)

        def ours_fn(z, w=w, eps=eps, reduction=reduction, in_place=in_place):
            # In place, the gradient overwrites a non-leaf: a copy of the logits.
            return accumulate(z * 1 if in_place else z, target, torch.arange(rows),
                              torch.zeros(rows), backend=backend, reduction=reduction,
                              weight=None if w is None else w.to(dtype), label_smoothing=eps,
                              inplace_grad=in_place)  # fmt: skip

        def theirs_fn(z, w=w, eps=eps, reduction=reduction):
            weight = None if w is None else w.to(z.dtype)
            return F.cross_entropy(z, target, weight, label_smoothing=eps, reduction=reduction)

        ours = _loss_and_grad(ours_fn, logits, dtype, up)
        same_dtype = _loss_and_grad(theirs_fn, logits, dtype, up)
        theirs = _loss_and_grad(theirs_fn, logits, wide, up)
        for got in (ours, same_dtype, theirs):
            assert torch.equal(got[1].isnan().all(1), nan_rows), what
            assert not got[1][~nan_rows].isnan().any() and not got[0].isnan().any(), what
        want = same_dtype if backend == "reference" else theirs  # the former is F.cross_entropy
        _assert_same(zip(ours, want, strict=True), what, **tol, equal_nan=True)
    # The extras: NaN rows of the reference's definition (capped: the NaN row only).
    for softcap, zs in [(None, 1e-3), (4.0, 0.0), (4.0, 1e-3)]:
        what = f"softcap={softcap} z_loss_scale={zs}"
        up = torch.tensor(1.5, dtype=dtype)

        def ours_fn(z, softcap=softcap, zs=zs):
            return accumulate(z, target, torch.arange(rows), torch.zeros(rows),
                              backend=backend, softcap=softcap, z_loss_scale=zs)  # fmt: skip

        def theirs_fn(z, softcap=softcap, zs=zs):
            mean = reference.REDUCTIONS["mean"]
            return reference.cross_entropy_extra(z, target, None, -100, 0.0, mean, softcap, zs)[0]

        ours = _loss_and_grad(ours_fn, logits, dtype, up)
        theirs = _loss_and_grad(theirs_fn, logits, dtype if backend == "reference" else wide, up)
        want_nan = torch.zeros(rows, dtype=torch.bool)
        want_nan[1 if softcap else slice(1, 1 + len(_IGNORED_NAN_ROWS))] = True
        for got in (ours, theirs):
            assert torch.equal(got[1].isnan().all(1), want_nan), what
            assert not got[1][~want_nan].isnan().any(), what
        _assert_same(zip(ours, theirs, strict=True), what, **tol, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_k_dimensional_ignored_positions(backend):
    """[N, C, d1, d2] logits with [N, d1, d2] targets: ignore_index a class id, weights,
    non-finite logits at ignored positions (NaN gradient columns where PyTorch has them),
    and every position ignored (mean: NaN, as PyTorch's 0 / 0); CSL and counts per image."""
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 5, 3, 4, generator=g)
    target = torch.randint(0, 5, (2, 3, 4), generator=g)
    target[0, 1], target[1, :, 0] = 2, 2  # ignore_index = 2 below
    logits[0, 1, 1, 0] = float("nan")
    logits[0, 3, 1, 2] = float("inf")
    logits[1, :, 2, 0] = float("-inf")
    logits[1, 4, 0, 0] = float("-inf")  # p = 0 there: a zero gradient column
    weight = torch.rand(5, generator=g) + 0.5
    for reduction, ignore_all in itertools.product(["none", "mean", "sum"], [False, True]):
        what = f"{reduction} every position ignored: {ignore_all}"
        t = torch.full_like(target, 2) if ignore_all else target
        csl, count = torch.zeros(2, dtype=torch.float64), torch.zeros(2)
        losses, grads = _both(backend, logits, t, torch.arange(2), csl, count=count,
                              weight=weight, ignore_index=2, reduction=reduction)  # fmt: skip
        _assert_same([losses, grads], what, equal_nan=True)
        nan_cols = grads[1].isnan().all(1)  # [N, d1, d2]: PyTorch's NaN gradient columns
        assert nan_cols.sum() == 3 and torch.equal(grads[0].isnan().any(1), nan_cols), what
        assert bool(losses[0].isnan().all()) == (ignore_all and reduction == "mean"), what
        kept = t != 2
        plain = F.cross_entropy(logits.double(), t, ignore_index=2, reduction="none")
        torch.testing.assert_close(csl, plain.sum((1, 2)), msg=what)
        assert torch.equal(count, kept.sum((1, 2)).float()), what


def test_class_probabilities_compile_with_fullgraph():
    """Soft targets (mixup, distillation) in torch.compile(fullgraph=True): the same loss,
    gradient and CSL as eager (functorch's stack clearing, needed only under a transform,
    broke the graph)."""
    g = torch.Generator().manual_seed(9)
    z0 = torch.randn(6, 5, generator=g)
    p = torch.softmax(torch.randn(6, 5, generator=g), 1)
    idx = torch.tensor([0, 3, 3, 1, 5, 2])
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        z = z0.clone().requires_grad_(True)
        csl, count = torch.zeros(6), torch.zeros(6)

        def f(z, csl=csl, count=count):
            return accumulate(z, p, idx, csl, count=count)

        loss = (torch.compile(f, backend="aot_eager", fullgraph=True) if compiled else f)(z)
        loss.backward()
        results.append((loss.detach(), z.grad, csl, count))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)
    torch.testing.assert_close(results[0][0], F.cross_entropy(z0, p))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the Triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing", [-0.3, -5.0, float("nan"), float("-inf")])
@pytest.mark.parametrize("soft", [False, True], ids=["indices", "probabilities"])
def test_a_label_smoothing_of_zero_or_less_smooths_nothing_as_in_pytorch(backend, smoothing, soft):
    # F.cross_entropy takes it and computes the plain loss; csl_fast refused it
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 5, generator=g)
    target = torch.tensor([0, 4, 2, -100, 1, 3])
    if soft:
        target = torch.softmax(torch.randn(6, 5, generator=g), 1)
    for kwargs in ({}, {"weight": torch.rand(5, generator=g) + 0.1}, {"reduction": "sum"}):
        csl = torch.zeros(6, dtype=torch.float64)
        losses, grads = _both(
            backend, logits, target, torch.arange(6), csl, label_smoothing=smoothing, **kwargs
        )
        _assert_same([losses, grads], (backend, smoothing, kwargs))
        plain = torch.zeros(6, dtype=torch.float64)
        accumulate(logits, target, torch.arange(6), plain, backend=backend, **kwargs)
        torch.testing.assert_close(csl, plain, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\], got inf"):
        accumulate(logits, target, torch.arange(6), csl, label_smoothing=float("inf"))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the Triton interpreter
@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_label_smoothing_past_65504_as_the_readme_says(backend):
    """README, deviation (2): with label smoothing F.cross_entropy sums the smoothing term
    (-log p_j over all classes) in float16, inf once a row's (8,000 near-uniform classes)
    or the batch's (10 rows of 1,000) reaches 65520, rows with reduction='none' in the
    first case; the fused backends return the finite losses, the reference backend F's.
    The README named only sums past 65504 and rows whose own loss reaches 65520, and said
    reduction='none' gives such rows inf as F does."""
    for rows, classes in ((2, 8000), (10, 1000)):
        row_inf = classes * math.log(classes) >= 65520  # a row's own term: 71,900 and 6,900
        z = torch.zeros(rows, classes, dtype=torch.float16)  # every loss is log C
        target = torch.arange(rows)
        for reduction in ("none", "mean", "sum"):
            what = (rows, classes, reduction)
            theirs = F.cross_entropy(z, target, label_smoothing=0.1, reduction=reduction)
            assert theirs.isinf().all() == (row_inf or reduction != "none"), what
            ours = accumulate(
                z, target, torch.arange(rows), torch.zeros(rows), label_smoothing=0.1,
                reduction=reduction, backend=backend,
            )  # fmt: skip
            assert ours.dtype == torch.float16, what
            if backend == "reference":
                assert torch.equal(ours, theirs), what
                continue
            want = math.log(classes) * (rows if reduction == "sum" else 1)
            expected = torch.full(ours.shape, want, dtype=torch.float64)
            torch.testing.assert_close(ours.double(), expected, rtol=2**-10, atol=0, msg=str(what))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_integer_and_bool_class_weights_are_refused(backend, dtype):
    """F.cross_entropy refuses them; the kernels read them as float32, so bool weights
    silently meant 0 and 1. A float weight of another dtype is taken (README)."""
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 1, 0])
    csl = torch.zeros(5)
    with pytest.raises(TypeError, match=rf"weight must be a floating-point .* got {dtype}"):
        accumulate(logits, target, torch.arange(5), csl, weight=torch.ones(3, dtype=dtype),
                   backend=backend)  # fmt: skip
    assert not csl.any()
    weight = torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)
    got = accumulate(logits, target, torch.arange(5), csl, weight=weight, backend=backend)
    want = F.cross_entropy(logits.double(), target, weight=weight).float()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)
