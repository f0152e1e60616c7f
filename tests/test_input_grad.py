"""Batched input-gradient norms: csl_fast.input_grad_norms and CSLTracker.watch."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import csl_fast
from csl_fast import CSLTracker

BACKENDS = csl_fast.available_backends("cpu")


def per_sample_sq(model, x, y):
    """||d l_i / d x_i||^2 from one float64 autograd call per row (no reduction involved)."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    out = []
    for i in range(x.shape[0]):
        xi = x[i : i + 1].detach().double().requires_grad_(True)
        loss = F.cross_entropy(torch.func.functional_call(model, params, (xi,)), y[i : i + 1])
        (g,) = torch.autograd.grad(loss, xi)
        out.append(g.square().sum())
    return torch.stack(out)


def _model(features=6, classes=4):
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(features, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, classes),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_grad_norms_op_and_scatter(backend):
    b = 5 if backend == "triton" else 37
    grad = torch.randn(b, 3, 7, dtype=torch.float32)
    idx = torch.randint(0, 9, (b,))
    t = CSLTracker(9, backend=backend)
    sq = csl_fast.input_grad_norms(grad, idx, t, scale=3.0)
    want = (3.0 * grad.double()).flatten(1).square().sum(1)
    torch.testing.assert_close(sq.double(), want, rtol=1e-5, atol=1e-6)
    exp_sum = torch.zeros(9, dtype=torch.float64).index_add_(0, idx, want)
    exp_norm = torch.zeros(9, dtype=torch.float64).index_add_(0, idx, want.sqrt())
    exp_count = torch.zeros(9).index_add_(0, idx, torch.ones(b))
    torch.testing.assert_close(t.input_grad_sq_sum.double(), exp_sum, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(t.input_grad_norm_sum.double(), exp_norm, rtol=1e-5, atol=1e-6)
    assert torch.equal(t.input_grad_count, exp_count)
    torch.testing.assert_close(t.loss_sensitivity.double(), exp_norm / exp_count, equal_nan=True)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_watch_undoes_the_reduction(reduction):
    model = _model()
    x = torch.randn(8, 2, 3)
    y = torch.randint(0, 4, (8,))
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 0])
    t = CSLTracker(7)
    xw = t.watch(x, idx, reduction_scale=None if reduction == "mean" else 1.0)
    assert xw is x and x.requires_grad
    csl_fast.accumulate(model(x), y, idx, t, reduction=reduction).backward()
    want = per_sample_sq(model, x, y)
    exp = torch.zeros(7, dtype=torch.float64).index_add_(0, idx, want)
    torch.testing.assert_close(t.input_grad_sq_sum.double(), exp, rtol=1e-4, atol=1e-7)
    assert t.input_grad_count.tolist() == [2, 1, 1, 1, 1, 1, 1]
    torch.testing.assert_close(t.epoch_input_grad_sq_sum, t.input_grad_sq_sum)


def test_watch_ignore_index_with_tensor_scale():
    model = _model()
    x = torch.randn(6, 6)
    y = torch.tensor([1, -100, 2, 3, -100, 0])
    idx = torch.arange(6)
    valid = y != -100
    t = CSLTracker(6)
    t.watch(x, idx, reduction_scale=valid.sum(), valid=valid)
    F.cross_entropy(model(x), y).backward()
    want = per_sample_sq(model, x[valid], y[valid])
    got = t.input_grad_sq_sum.double()
    torch.testing.assert_close(got[valid], want, rtol=1e-4, atol=1e-7)
    assert got[~valid].tolist() == [0.0, 0.0]
    assert t.input_grad_count.tolist() == [1, 0, 1, 1, 0, 1]


def test_watch_sequences_with_the_documented_token_scale_and_mask():
    """A sequence's own loss is the sum of its tokens' and 'mean' divides by the batch's
    tokens: the default B was off by (B / tokens)^2, and the docstring's
    valid=target != ignore_index ([B, T]) was refused."""
    torch.manual_seed(0)
    b, length, vocab, width = 4, 5, 11, 8
    embed, head = torch.nn.Embedding(vocab, width), torch.nn.Linear(width, vocab)
    tokens = torch.randint(0, vocab, (b, length))
    target = torch.randint(0, vocab, (b, length))
    target[0, 3:] = -100
    target[2] = -100  # a sequence with no token to learn from: not recorded
    h = embed(tokens).detach().double().requires_grad_(True)
    head64 = torch.nn.Linear(width, vocab).double()
    head64.load_state_dict(head.state_dict())
    per_seq = F.cross_entropy(head64(h).transpose(1, 2), target, reduction="none").sum(1)
    want = torch.stack(
        [
            torch.autograd.grad(per_seq[i], h, retain_graph=True)[0][i].square().sum()
            for i in range(b)
        ]
    )
    t = CSLTracker(b, vocab)
    x = t.watch(embed(tokens), torch.arange(b), (target != -100).sum(), valid=target != -100)
    csl_fast.accumulate(head(x).transpose(1, 2), target, torch.arange(b), t).backward()
    recorded = target.ne(-100).any(1)
    assert t.input_grad_count.tolist() == recorded.float().tolist()
    got = t.input_grad_sq_sum.double()
    torch.testing.assert_close(got[recorded], want[recorded], rtol=1e-4, atol=1e-9)


def test_watch_takes_an_empty_batch_with_a_token_mask():
    """valid.reshape(0, -1) raised on a [0, T] mask."""
    t = CSLTracker(4, 3)
    valid = torch.ones(0, 5, dtype=torch.bool)
    x = t.watch(torch.randn(0, 5), torch.arange(0), valid.sum(), valid=valid)
    x.sum().backward()
    assert t.input_grad_count.sum() == 0


def test_watch_under_a_grad_scaler_with_the_documented_scale():
    """scaler.scale(loss).backward() multiplies x's gradient by the scale: the recorded norms
    were scale^2 too large; the docstring's reduction_scale = B / scaler.get_scale()."""
    model = _model()
    x, y = torch.randn(6, 6), torch.randint(0, 4, (6,))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    t = CSLTracker(6)
    t.watch(x, torch.arange(6), reduction_scale=6 / scaler.get_scale())
    scaler.scale(csl_fast.accumulate(model(x), y, torch.arange(6), t)).backward()
    torch.testing.assert_close(
        t.input_grad_sq_sum.double(), per_sample_sq(model, x, y), rtol=1e-4, atol=1e-9
    )


def test_watch_with_class_weights_records_each_samples_weighted_gradient():
    """F.cross_entropy's weighted mean divides by the batch's summed weight; with that as
    the scale, a sample records w_y^2 ||dl/dx||^2 whatever else is in its batch."""
    model = _model()
    w = torch.tensor([1.0, 5.0, 0.2, 2.0])
    x = torch.randn(6, 6)
    y = torch.tensor([0, 1, 2, 3, 1, -100])
    want = w[y[:5]].double() ** 2 * per_sample_sq(model, x[:5], y[:5])
    for batch in ([0, 1, 2, 3, 4, 5], [0, 2, 5], [0, 1]):
        idx = torch.tensor(batch)
        valid = y[idx] != -100
        t = CSLTracker(6)
        xb = t.watch(x[idx], idx, reduction_scale=w[y[idx][valid]].sum(), valid=valid)
        csl_fast.accumulate(model(xb), y[idx], idx, t, weight=w, ignore_index=-100).backward()
        got = t.input_grad_sq_sum.double()[idx[valid]]
        torch.testing.assert_close(got, want[idx[valid]], rtol=1e-4, atol=1e-7)


def test_watch_errors_and_nonfinite():
    t = CSLTracker(3)
    with pytest.raises(TypeError, match=r"floating.*int64.*watch the first floating-point"):
        t.watch(torch.zeros(2, dtype=torch.long), torch.arange(2))
    with pytest.raises(ValueError, match="batch"):
        t.watch(torch.zeros(3, 2), torch.arange(2))
    t.record_input_grad(torch.tensor([0, 1]), torch.tensor([float("nan"), 4.0]))
    assert t.input_grad_count.tolist() == [0, 1, 0]
    assert t.input_grad_norm_sum.tolist() == [0, 2, 0]


def test_hook_feeds_learning_time_history():
    model = _model()
    t = CSLTracker(4)
    for _epoch in range(3):
        x = torch.randn(4, 6)
        t.watch(x, torch.arange(4))
        F.cross_entropy(model(x), torch.arange(4)).backward()
        t.end_epoch()
    assert t.input_grad_history.shape == (3, 4)
    assert t.input_grad_first_epoch == 0
    lt = t.learning_time()
    assert ((lt >= 0) & (lt <= 1)).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(0,), (0, 3), (0, 2, 0), (3, 0), (4,), (3, 1, 1, 1, 2)])
def test_input_grad_norms_empty_and_odd_shapes(backend, shape):
    """An empty batch (the last batch of a shard) and one feature per sample ([B])."""
    grad = torch.randn(shape, dtype=torch.float32)
    t = CSLTracker(5, backend=backend)
    idx = torch.arange(shape[0]) % 5
    sq = csl_fast.input_grad_norms(grad, idx, t, scale=2.0)
    want = (2.0 * grad.double()).reshape(shape[0], -1 if grad.numel() else 0).square().sum(1)
    assert sq.shape == (shape[0],)
    torch.testing.assert_close(sq.double(), want, rtol=1e-6, atol=0)
    assert float(t.input_grad_count.sum()) == shape[0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_norms_of_a_create_graph_gradient_are_detached_on_every_backend(backend):
    # the kernels' result of a grad made with create_graph=True required grad through a
    # grad_fn without a backward: backward through it warned "silently incorrect" and left
    # x.grad None, where backend="reference" returned a detached tensor
    x = torch.randn(3, 4, requires_grad=True)
    (g,) = torch.autograd.grad((x**3).sum(), x, create_graph=True)
    tracker = CSLTracker(3, 2, backend=backend)
    # a scale tensor that requires grad (learnable class weights summed) too: float()
    # of it warned on the CPU
    scale = torch.nn.Parameter(torch.tensor(1.0)) * 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sq = csl_fast.input_grad_norms(g, torch.arange(3), tracker, scale)
    assert not sq.requires_grad and sq.grad_fn is None
    torch.testing.assert_close(sq, (6 * x.detach() ** 2).square().sum(1))
    assert g.requires_grad  # the caller's graph is left as it was


@pytest.mark.parametrize("backend", BACKENDS)
def test_input_grad_norms_scale_before_squaring(backend):
    """The scale undoes a mean over many rows: applied after squaring, tiny rows (float32
    squares below 1e-38) lost their digits and huge ones overflowed to inf (not recorded)."""
    grad = torch.tensor([[1e-22, -3e-22], [1e20, 2e20]], dtype=torch.float32)
    scale = torch.tensor([1e4, 1e-4], dtype=torch.float64)
    for row in range(2):
        sq = csl_fast.ops.input_grad_norms(grad[row : row + 1], float(scale[row]), backend=backend)
        want = (scale[row] * grad[row].double()).square().sum()
        torch.testing.assert_close(sq.double(), want[None], rtol=1e-6, atol=0)


@pytest.mark.parametrize("rank", [2, 3, 4, 5])
def test_watch_matches_per_sample_autograd_with_dropout_and_strides(rank):
    """Rank 2-5 inputs, non-contiguous, duplicate indices, dropout in train mode: the
    reference differentiates each sample's own loss through a forward with the same
    dropout mask (its own graph: the hook would fire in autograd.grad too)."""
    torch.manual_seed(rank)
    feats = 3 ** (rank - 1)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(feats, 5), torch.nn.Dropout(0.3), torch.nn.Linear(5, 3)
    ).train()
    x = torch.randn((3,) * (rank - 1) + (6,)).movedim(-1, 0)  # batch dim with stride 1
    assert not x.is_contiguous() or rank == 2
    y = torch.randint(0, 3, (6,))
    idx = torch.tensor([0, 1, 2, 2, 3, 0])
    xr = x.detach().clone().requires_grad_(True)
    torch.manual_seed(0)
    losses = F.cross_entropy(model(xr), y, reduction="none")
    grads = [torch.autograd.grad(losses[i], xr, retain_graph=True)[0][i] for i in range(6)]
    want = torch.stack([g.double().square().sum() for g in grads])
    t = CSLTracker(4, dtype=torch.float64)
    t.watch(x, idx)
    torch.manual_seed(0)
    F.cross_entropy(model(x), y).backward()
    exp = torch.zeros(4, dtype=torch.float64).index_add_(0, idx, want)
    torch.testing.assert_close(t.input_grad_sq_sum, exp, rtol=1e-5, atol=0)
    assert t.input_grad_count.tolist() == [2, 1, 2, 1]


def test_watch_empty_batch():
    model = _model()
    t = CSLTracker(3)
    x = torch.randn(0, 6)
    t.watch(x, torch.zeros(0, dtype=torch.long))
    F.cross_entropy(model(x), torch.zeros(0, dtype=torch.long), reduction="sum").backward()
    assert t.input_grad_count.tolist() == [0, 0, 0]
    # nothing recorded, so no input-gradient scores (they were listed, all NaN)
    assert t.input_grad_first_epoch == -1
    assert "loss_sensitivity" not in csl_fast.scores(t)


@pytest.mark.parametrize(
    ("index", "kwargs", "error", "match"),
    [
        ([0, 1], {}, ValueError, "1-D tensor"),
        (torch.tensor([[0], [1]]), {}, ValueError, r"1-D tensor .*\(2, 1\)"),
        (torch.tensor([0.0, 1.0]), {}, TypeError, "integer"),
        (torch.tensor([0, 1]), {"valid": torch.tensor([True])}, ValueError, "valid"),
        (
            torch.tensor([0, 1]),
            {"reduction_scale": torch.tensor([1.0, 2.0])},
            ValueError,
            "one-element",
        ),
        (torch.tensor([0, 1]), {"reduction_scale": float("nan")}, ValueError, "finite"),
        # a string scale raised math.isfinite's "must be real number, not str"
        (torch.tensor([0, 1]), {"reduction_scale": "2"}, TypeError, "a number .* got str"),
        # a tensor in place of the tracker failed in the hook, during backward
        (torch.tensor([0, 1]), {"tracker": torch.zeros(3)}, TypeError, "CSLTracker.* Tensor"),
        # out of [0, N): it raised from the hook, out of loss.backward()
        (torch.tensor([0, 3]), {}, IndexError, r"watch: index\[1\] = 3 is outside"),
        (torch.tensor([-1, 1]), {}, IndexError, r"index\[0\] = -1 is outside"),
    ],
)
def test_watch_refuses_bad_arguments_before_backward(index, kwargs, error, match):
    """Refused when watch is called: an error in the backward hook would come after
    accumulate recorded the batch's loss, leaving the batch half in the tracker."""
    t = CSLTracker(3)
    x = torch.randn(2, 6)
    with pytest.raises(error, match=match):
        csl_fast.input_grad.watch(x, index, **{"tracker": t, **kwargs})
    assert not x.requires_grad and not x._backward_hooks
    with pytest.raises(ValueError, match="one-element"):
        csl_fast.input_grad_norms(torch.ones(2, 3), torch.arange(2), t, torch.ones(2))
    # [B, 1] norms read "index has 2 entries but the batch has 1 rows"
    with pytest.raises(ValueError, match=r"sq_norms must be a 1-D \[B\] tensor.*\(2, 1\)"):
        t.record_input_grad(torch.arange(2), torch.ones(2, 1))
    assert float(t.input_grad_count.sum()) == 0


def test_watching_the_same_tensor_every_epoch_records_once_per_backward():
    """Full-batch training on one fixed tensor: each epoch's watch used to add a hook, so
    epoch e recorded every norm e times (6 records in 3 epochs). A second tracker watching
    the same tensor keeps its own hook."""
    model = _model()
    x = torch.randn(5, 6)
    y = torch.randint(0, 4, (5,))
    idx = torch.arange(5)
    t, other = CSLTracker(5), CSLTracker(5)
    for _epoch in range(3):
        t.watch(x, idx)
        other.watch(x, idx)
        F.cross_entropy(model(x), y).backward()
        t.end_epoch()
    want = 3 * per_sample_sq(model, x, y)
    for tracker in (t, other):
        assert tracker.input_grad_count.tolist() == [3] * 5
        torch.testing.assert_close(tracker.input_grad_sq_sum.double(), want, rtol=1e-5, atol=0)


def test_watch_a_batch_the_model_moves_to_the_tracker_device(device):
    """x on the CPU, moved to the tracker's device inside the forward: the gradient
    reaches the hook on the CPU (on a GPU this is the cross-device case)."""
    model = _model().to(device)
    x = torch.randn(5, 6)
    y = torch.randint(0, 4, (5,))
    t = CSLTracker(5, device=device)
    t.watch(x, torch.arange(5))
    F.cross_entropy(model(x.to(device)), y.to(device)).backward()
    want = per_sample_sq(model.cpu(), x, y)
    torch.testing.assert_close(t.input_grad_sq_sum.cpu().double(), want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_index_out_of_range_writes_nothing(backend):
    """The reference and Triton backends skipped the row and recorded the others (the
    hook of watch too), where the C++ backend refused it before writing."""
    t = CSLTracker(4, 3, backend=backend)
    with pytest.raises(IndexError, match="outside"):
        csl_fast.input_grad_norms(torch.ones(2, 3), torch.tensor([0, 4]), t)
    assert not t.input_grad_count.any() and t.input_grad_first_epoch < 0


@pytest.mark.parametrize("compiled_first", [False, True])
def test_watch_inside_a_compiled_step_records_as_eager(compiled_first, monkeypatch):
    """The hook registry cannot be traced: the step graph-breaks at watch (it raised an
    internal Dynamo error) and records what eager records, also where the first watch of
    the process is compiled (the eager registration is made at the first watch)."""
    import csl_fast.input_grad

    if compiled_first:
        monkeypatch.setattr(csl_fast.input_grad, "_eager_register", None)
    torch._dynamo.reset()
    model = _model()
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    idx = torch.tensor([3, 0, 7, 3, 11, 5, 2, 9])

    def step(t, x):
        x = t.watch(x, idx)
        return csl_fast.accumulate(model(x), y, idx, t)

    eager, compiled = CSLTracker(12, 4), CSLTracker(12, 4)
    if not compiled_first:
        step(eager, x.clone()).backward()
    torch.compile(step, backend="aot_eager")(compiled, x.clone()).backward()
    if compiled_first:
        step(eager, x.clone()).backward()
    for name in ("input_grad_sq_sum", "input_grad_count", "csl_sum", "csl_count"):
        torch.testing.assert_close(compiled.buffers()[name], eager.buffers()[name], msg=name)


def test_a_non_finite_tensor_scale_and_an_epoch_number_are_refused():
    # a NaN tensor scale dropped every row silently (a float NaN was refused); end_epoch(5)
    # passed, its group ignored outside torch.distributed
    t = csl_fast.CSLTracker(4, 3)
    x = torch.randn(4, 2, requires_grad=True)
    with pytest.raises(ValueError, match="the scale must be finite, got nan"):
        t.watch(x, torch.arange(4), torch.tensor(float("nan")))
    with pytest.raises(TypeError, match=r"group must be a torch\.distributed process group"):
        t.end_epoch(5)
    assert t.epoch == 0


def test_a_cpu_tensor_scale_scales_before_squaring_as_a_float_does():
    # squared unscaled in float32 then scaled: rows of 3e-23 underflowed (56% off)
    g = torch.full((1000, 8), 3e-23)
    want = float((g.double() * 1000).square().sum(1)[0])
    for scale in (1000.0, torch.tensor(1000)):
        sq = csl_fast.input_grad_norms(g, torch.arange(1000), CSLTracker(1000, 2), scale)
        assert float(sq[0]) == pytest.approx(want, rel=1e-5, abs=0)


def test_one_tensor_watched_across_steps_and_a_view_of_it():
    """Watched once, a full-batch tensor records at every backward (a fix that switched
    its flag back after the first backward recorded one step of three); watched as a view,
    ``X[:]``, it is left as it was."""
    g = torch.Generator().manual_seed(0)
    x, y, idx = torch.randn(8, 3, generator=g), torch.arange(8) % 2, torch.arange(8)
    model = torch.nn.Linear(3, 2)
    once = csl_fast.CSLTracker(8, 2)
    watched = once.watch(x.clone(), idx)
    viewed = csl_fast.CSLTracker(8, 2)
    for _ in range(3):
        csl_fast.accumulate(model(watched), y, idx, once).backward()
        csl_fast.accumulate(model(viewed.watch(x[:], idx)), y, idx, viewed).backward()
    assert once.input_grad_count.tolist() == viewed.input_grad_count.tolist() == [3.0] * 8
    torch.testing.assert_close(once.input_grad_sq_sum, viewed.input_grad_sq_sum)
    assert not x.requires_grad and x.grad is None


def test_watch_inside_torch_func_records_what_grad_differentiates_and_refuses_the_rest():
    """Inside grad(f)(x) with watch(x, index) in f the hook sees x's gradient, as eagerly;
    a tensor grad() does not differentiate, or rows under vmap, got PyTorch's functorch
    messages (requires_grad_ inside a transform, .item() under vmap)."""
    from torch.func import grad, vmap

    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g)
    y, idx = torch.randint(0, 3, (4,), generator=g), torch.tensor([0, 3, 6, 9])
    eager = csl_fast.CSLTracker(12, 3)
    csl_fast.accumulate(eager.watch(x.clone(), idx) @ w, y, idx, eager).backward()
    got = csl_fast.CSLTracker(12, 3)
    grad(lambda v: csl_fast.accumulate(got.watch(v, idx) @ w, y, idx, got))(x.clone())
    torch.testing.assert_close(got.input_grad_sq_sum, eager.input_grad_sq_sum)
    other = csl_fast.CSLTracker(12, 3)
    with pytest.raises(RuntimeError, match=r"does not differentiate.*record_input_grad"):
        grad(lambda m: csl_fast.accumulate(other.watch(x.clone(), idx) @ m, y, idx, other))(w)

    def one(m, xi, yi, i):
        return csl_fast.accumulate(other.watch(xi[None], i[None]) @ m, yi[None], i[None], other)

    with pytest.raises(RuntimeError, match="under vmap, whose rows are not the batch's"):
        vmap(grad(one), in_dims=(None, 0, 0, 0))(w, x, y, idx)
    assert other.input_grad_count.sum() == 0


def test_watch_records_inside_a_forward_ad_dual_level():
    # taken for a torch.func transform and refused (d049857): a dual level transforms no
    # backward, and the hook records as outside it
    import torch.autograd.forward_ad as fwAD

    x, w = torch.randn(4, 2), torch.randn(2, 3)
    y, idx = torch.tensor([0, 1, 2, 0]), torch.arange(4)
    want, got = csl_fast.CSLTracker(4, 3), csl_fast.CSLTracker(4, 3)
    csl_fast.accumulate(want.watch(x.clone(), idx) @ w, y, idx, want).backward()
    with fwAD.dual_level():
        csl_fast.accumulate(got.watch(x.clone(), idx) @ w, y, idx, got).backward()
    torch.testing.assert_close(got.input_grad_sq_sum, want.input_grad_sq_sum)


def test_a_valid_mask_that_is_not_bool_is_refused():
    # valid=target (the labels for the mask) was cast to bool: every class-0 row dropped
    tracker = csl_fast.CSLTracker(4, 3)
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 0])
    with pytest.raises(
        TypeError, match=r"csl_fast.watch: valid must be a bool tensor, got torch.int64"
    ):
        tracker.watch(x, torch.arange(4), valid=y)
    with pytest.raises(
        TypeError, match=r"record_input_grad: valid must be a bool \[B\] tensor, got torch.float32"
    ):
        tracker.record_input_grad(torch.arange(4), torch.ones(4), valid=torch.ones(4))
    assert not tracker.input_grad_count.any()


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_watch_takes_unsigned_indices(dtype):
    # "lt_cpu" not implemented for 'UInt16', where record_input_grad took them
    tracker = csl_fast.CSLTracker(4, 3)
    x = tracker.watch(torch.randn(4, 3), torch.arange(4).to(dtype))
    csl_fast.accumulate(x, torch.tensor([0, 1, 2, 0]), torch.arange(4), tracker).backward()
    assert tracker.input_grad_count.tolist() == [1.0] * 4
    if dtype == torch.uint64:  # past 2**63 - 1: named as given, not wrapped to a negative
        with pytest.raises(IndexError, match=rf"index\[1\] = {2**63 + 5} is outside"):
            tracker.watch(torch.randn(2, 3), torch.tensor([1, 2**63 + 5], dtype=dtype))
    if dtype == torch.uint64:  # past 2**63 - 1: named as given, not wrapped to a negative
        with pytest.raises(IndexError, match=rf"index\[1\] = {2**63 + 5} is outside"):
            tracker.watch(torch.randn(2, 3), torch.tensor([1, 2**63 + 5], dtype=dtype))


def test_second_tensor_watched_in_one_step_warns_once():
    # a two-input model watched on both inputs recorded two presentations per sample and
    # step, each with part of the gradient (input_grad_sq_mean half the joint squared norm)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(2, 3)
    idx, y = torch.arange(6), torch.arange(6) % 3
    tracker = CSLTracker(6, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            x1 = tracker.watch(torch.randn(6, 4), idx)
            x2 = tracker.watch(torch.randn(6, 2), idx)
            csl_fast.accumulate(a(x1) + b(x2), y, idx, tracker).backward()
    several = [w for w in caught if "two tensors watched in one step arrived" in str(w.message)]
    assert len(several) == 1 and several[0].filename == __file__
    assert torch.equal(tracker.input_grad_count, torch.full((6,), 4.0))  # (as recorded)


def test_a_skipped_backward_is_no_second_watched_tensor():
    # a step whose backward is skipped (non-finite loss) left its watched tensor awaiting
    # a gradient: the next step's watch warned falsely, and the warning, given once, was
    # spent before a real second watch
    lin, idx, y = torch.nn.Linear(4, 3), torch.arange(6), torch.arange(6) % 3
    tracker = CSLTracker(6, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = csl_fast.accumulate(lin(tracker.watch(torch.randn(6, 4), idx)), y, idx, tracker)
        # (skipped: no backward; loss still holds its graph)
        loss = csl_fast.accumulate(lin(tracker.watch(torch.randn(6, 4), idx)), y, idx, tracker)
        loss.backward()
        assert not caught
        x1, x2 = tracker.watch(torch.randn(6, 4), idx), tracker.watch(torch.randn(6, 4), idx)
        csl_fast.accumulate(lin(x1) + lin(x2), y, idx, tracker).backward()
    assert [str(w.message)[:40] for w in caught] == ["csl_fast.watch: the gradients of two ten"]


def test_one_tensor_watched_per_step_does_not_warn():
    # the same tensor watched again (full-batch training), a forward under no_grad, and a
    # forward with grad but no backward (its tensor freed) are no second watched tensor
    model, idx, y = _model(), torch.arange(6), torch.arange(6) % 4
    tracker = CSLTracker(6, 4)
    X = torch.randn(6, 6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            csl_fast.accumulate(model(tracker.watch(X, idx)), y, idx, tracker).backward()
        with torch.no_grad():
            model(tracker.watch(torch.randn(6, 6), idx))
        model(tracker.watch(torch.randn(6, 6), idx))
        csl_fast.accumulate(model(tracker.watch(X, idx)), y, idx, tracker).backward()
        csl_fast.accumulate(
            model(tracker.watch(torch.randn(6, 6), idx)), y, idx, tracker
        ).backward()
    assert torch.equal(tracker.input_grad_count, torch.full((6,), 4.0))


def test_watch_refuses_a_parameter():
    # a weight whose first dimension happened to be B was watched: its gradient's rows,
    # not the samples', were recorded as their norms
    weight = torch.nn.Parameter(torch.randn(6, 3))
    with pytest.raises(TypeError, match=r"nn\.Parameter"):
        CSLTracker(6, 3).watch(weight, torch.arange(6))


def test_valid_without_reduction_scale_warns_that_the_scale_is_b():
    # with ignore_index the mean divides by the valid rows, not by B: every norm was off
    tracker, target = CSLTracker(4, 3), torch.tensor([0, -100, 2, 1])
    with pytest.warns(UserWarning, match="defaults to the batch size B") as rec:
        tracker.watch(torch.randn(4, 2), torch.arange(4), valid=target != -100)
    assert rec[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tracker.watch(torch.randn(4, 2), torch.arange(4), 3.0, valid=target != -100)


def test_importing_csl_fast_leaves_dynamo_unloaded():
    """watch's compiler.disable decorator imported torch._dynamo with csl_fast: 2 of the
    4 s of `import csl_fast`, which every csl-fast command paid."""
    probe = "import sys, csl_fast; print('torch._dynamo' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip() == "False"


def test_watch_is_refused_under_torch_export():
    """torch.export keeps no tensor hook: an exported module that watched its input would
    record nothing, silently. watch raises instead; eagerly, the same module records."""
    tracker = csl_fast.CSLTracker(4, 3)

    class Watched(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 3)

        def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
            return self.lin(tracker.watch(x, idx))

    x, idx = torch.randn(4, 2), torch.arange(4)
    with pytest.raises(Exception, match=r"watch cannot run under torch\.export"):
        torch.export.export(Watched(), (x, idx))
    Watched()(x, idx).sum().backward()
    assert tracker.input_grad_count.tolist() == [1, 1, 1, 1]


def test_a_mean_over_more_than_the_batch_warns_at_the_default_scale():
    """accumulate_bce's mean divides by B*L and a sequence batch's by its tokens: watched
    at the default B, the norms came out (divisor / B)**2 too small, silently."""
    lin, idx = torch.nn.Linear(3, 4), torch.arange(5)
    y = (torch.rand(5, 4) > 0.5).float()
    tracker = CSLTracker(5, num_labels=4)
    with pytest.warns(RuntimeWarning, match=r"divides by B\*L \(L = 4 labels\)") as said:
        for _ in range(2):  # (once per tracker)
            x = tracker.watch(torch.randn(5, 3), idx)
            csl_fast.accumulate_bce(lin(x), y, idx, tracker).backward()
    assert len([w for w in said if "B*L" in str(w.message)]) == 1
    assert said[0].filename == __file__
    given = CSLTracker(5, num_labels=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = given.watch(torch.randn(5, 3), idx, reduction_scale=5 * 4)
        csl_fast.accumulate_bce(lin(x), y, idx, given).backward()
    emb, seq = torch.nn.Embedding(7, 7), CSLTracker(5, 7)
    tokens = torch.randint(0, 7, (5, 3))
    # at the first step, where the tracker learns that it records sequences (it came late)
    with pytest.warns(RuntimeWarning, match="divides by the batch's non-ignored tokens"):
        x = seq.watch(emb(tokens), idx)
        csl_fast.accumulate(x.flatten(0, 1), tokens, idx, seq).backward()


def test_a_second_watched_tensor_is_told_across_backward_calls_and_not_for_other_samples():
    """Told by graph task, two heads stepped by separate backward calls doubled the counts
    silently; micro-batches of distinct samples summed into one backward were told as a
    second tensor."""
    lin, y = torch.nn.Linear(4, 3), torch.arange(6) % 3
    idx = torch.arange(6)
    heads = CSLTracker(12, 3)
    with pytest.warns(UserWarning, match="two tensors watched in one step arrived"):
        x1, x2 = heads.watch(torch.randn(6, 4), idx), heads.watch(torch.randn(6, 4), idx)
        csl_fast.accumulate(lin(x1), y, idx, heads).backward()
        F.cross_entropy(lin(x2), y).backward()
    micro = CSLTracker(12, 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m1, m2 = micro.watch(torch.randn(6, 4), idx), micro.watch(torch.randn(6, 4), idx + 6)
        loss = csl_fast.accumulate(lin(m1), y, idx, micro)
        (loss + csl_fast.accumulate(lin(m2), y, idx + 6, micro)).backward()
    assert micro.input_grad_count.tolist() == [1.0] * 12


def test_a_watched_intermediate_is_freed():
    """The hook closed over the watched tensor; a non-leaf's hook is held by its autograd
    node, out of the garbage collector's sight: every watched embedding output lived on."""
    import gc
    import weakref

    emb, tracker = torch.nn.Embedding(5, 4), CSLTracker(3, 5)
    tokens, idx = torch.tensor([1, 2, 3]), torch.arange(3)
    x = tracker.watch(emb(tokens), idx)
    csl_fast.accumulate(x @ emb.weight.T, tokens, idx, tracker).backward()
    alive = weakref.ref(x)
    del x
    gc.collect()
    assert alive() is None and tracker.input_grad_count.tolist() == [1.0] * 3
