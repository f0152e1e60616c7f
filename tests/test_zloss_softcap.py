"""Soft-capping, the z-loss and per-token accuracy (issue 15, item 6) in
``csl_fast.accumulate`` on every CPU-runnable backend, against plain PyTorch formulas
written here (not csl_fast.reference, which the reference backend is)."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_f32, assert_no_worse_than_torch

import csl_fast
from csl_fast import CrossEntropyOutput

IGNORE = -100
RED = ("none", "mean", "sum")
BACKENDS = ("reference", "cpu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def torch_formula(z, target, *, softcap, zs, reduction, smoothing=0.0, weight=None):
    """(loss, z_loss, token accuracy) of a language-model head in plain PyTorch, in z's dtype."""
    zc = z if softcap is None else softcap * torch.tanh(z / softcap)
    ce = F.cross_entropy(
        zc, target, weight=weight, ignore_index=IGNORE, label_smoothing=smoothing,
        reduction=reduction,
    )  # fmt: skip
    active = target != IGNORE
    zl_rows = torch.where(active, zs * torch.logsumexp(zc, 1) ** 2, torch.zeros((), dtype=z.dtype))
    correct = ((zc.argmax(1) == target) & active).float()
    if reduction == "none":
        return ce + zl_rows, zl_rows, correct
    zl = zl_rows.sum() if reduction == "sum" else zl_rows.sum() / active.sum()
    return ce + zl, zl, correct.sum() / active.sum()


def _inputs(batch, classes, dtype, *, ignore=True, scale=4.0):
    logits = (torch.randn(batch, classes, dtype=torch.float64) * scale).to(dtype)
    target = torch.randint(0, classes, (batch,))
    if ignore and batch > 2:
        target[1::3] = IGNORE
    return logits, target


def _upstream(reduction, batch):
    return (
        torch.rand(batch, dtype=torch.float64) + 0.5 if reduction == "none" else torch.tensor(1.7)
    )


def _run(fn, logits, upstream):
    z = logits.detach().clone().requires_grad_(True)
    out = fn(z)
    loss = out if isinstance(out, torch.Tensor) else out[0]
    (grad,) = torch.autograd.grad(loss, z, upstream.to(loss.dtype))
    return out, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", RED)
@pytest.mark.parametrize(("batch", "classes"), [(7, 5), (13, 97), (6, 33)])
@pytest.mark.parametrize(("softcap", "zs"), [(None, 1e-2), (5.0, 0.0), (3.0, 0.1)])
def test_matches_torch_formula(backend, dtype, reduction, batch, classes, softcap, zs):
    logits, target = _inputs(batch, classes, dtype)
    up = _upstream(reduction, batch)
    csl = torch.zeros(batch)
    index = torch.arange(batch)
    ours, g_ours = _run(
        lambda z: csl_fast.accumulate(
            z, target, index, csl, reduction=reduction, backend=backend, softcap=softcap,
            z_loss_scale=zs, return_z_loss=True, return_token_accuracy=True,
        ),
        logits, up,
    )  # fmt: skip
    assert isinstance(ours, CrossEntropyOutput)
    kw = dict(softcap=softcap, zs=zs, reduction=reduction)
    theirs, g_theirs = _run(lambda z: torch_formula(z, target, **kw)[0], logits, up)
    exact, g_exact = _run(lambda z: torch_formula(z, target, **kw)[0], logits.double(), up)
    _, zl_theirs, _ = torch_formula(logits, target, **kw)
    _, zl_exact, acc_exact = torch_formula(logits.double(), target, **kw)
    what = f"{backend} {dtype} {reduction}"
    assert ours.loss.dtype == dtype and ours.loss.shape == exact.shape
    assert_no_worse_than_torch(ours.loss.detach(), theirs.detach(), exact.detach(), f"{what} loss")
    assert_no_worse_than_torch(ours.z_loss, zl_theirs, zl_exact, f"{what} z_loss")
    assert_no_worse_than_torch(g_ours, g_theirs, g_exact, f"{what} grad")
    assert not ours.z_loss.requires_grad and not ours.token_accuracy.requires_grad
    assert ours.token_accuracy.dtype == torch.float32
    torch.testing.assert_close(ours.token_accuracy, acc_exact.float(), equal_nan=True)
    # CSL: the plain cross entropy of the soft-capped logits, without the z-loss.
    zc = logits.double() if softcap is None else softcap * torch.tanh(logits.double() / softcap)
    plain = F.cross_entropy(zc, target, ignore_index=IGNORE, reduction="none")
    assert_close_f32(csl, plain, f"{what} csl", rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_gradcheck(backend):
    logits, target = _inputs(5, 7, torch.float64)
    index = torch.arange(5)

    def fn(z):
        return csl_fast.accumulate(
            z, target, index, torch.zeros(5, dtype=torch.float64), backend=backend,
            softcap=2.5, z_loss_scale=0.3,
        )  # fmt: skip

    z = logits.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (z,))
    exact = torch_formula(logits, target, softcap=2.5, zs=0.3, reduction="mean")[0]
    torch.testing.assert_close(fn(logits), exact, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequences_and_smoothing(backend):
    """[B*T, V] logits with a [B, T] target: outputs per token in the target's shape, CSL
    summed per sequence; label smoothing composes with both extras."""
    b, t, v = 3, 4, 11
    logits = torch.randn(b * t, v) * 3
    target = torch.randint(0, v, (b, t))
    target[0, :2] = IGNORE
    csl, count = torch.zeros(b), torch.zeros(b)
    out = csl_fast.accumulate(
        logits, target, torch.arange(b), csl, count=count, reduction="none", backend=backend,
        softcap=4.0, z_loss_scale=0.05, label_smoothing=0.1, return_z_loss=True,
        return_token_accuracy=True,
    )  # fmt: skip
    assert out.loss.shape == out.z_loss.shape == out.token_accuracy.shape == (b, t)
    flat = target.reshape(-1)
    exp_loss, exp_zl, exp_acc = torch_formula(
        logits.double(), flat, softcap=4.0, zs=0.05, reduction="none", smoothing=0.1
    )
    torch.testing.assert_close(out.loss.reshape(-1).double(), exp_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.z_loss.reshape(-1).double(), exp_zl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.token_accuracy.reshape(-1), exp_acc.float())
    zc = 4.0 * torch.tanh(logits.double() / 4.0)
    plain = F.cross_entropy(zc, flat, ignore_index=IGNORE, reduction="none").reshape(b, t)
    assert_close_f32(csl, plain.sum(1), "per-sequence csl", rtol=1e-5)
    torch.testing.assert_close(count, (target != IGNORE).sum(1).float())


@pytest.mark.parametrize("backend", BACKENDS)
def test_tracker_records_capped_plain_loss(backend):
    logits, target = _inputs(9, 6, torch.float32, ignore=False)
    tracker = csl_fast.CSLTracker(12, 6, backend=backend)
    index = torch.tensor([0, 3, 5, 7, 8, 9, 10, 11, 1])
    csl_fast.accumulate(logits, target, index, tracker, softcap=2.0, z_loss_scale=0.01)
    zc = 2.0 * torch.tanh(logits.double() / 2.0)
    plain = F.cross_entropy(zc, target, reduction="none")
    expected = torch.zeros(12, dtype=torch.float64).index_add_(0, index, plain)
    assert_close_f32(tracker.csl_sum, expected, "tracker csl", rtol=1e-5)
    assert torch.equal(tracker.csl_count, torch.zeros(12).index_add_(0, index, torch.ones(9)))


def test_side_outputs_alone_leave_the_loss_alone():
    """return_* without softcap or z-loss: the loss is F.cross_entropy's, the z-loss 0."""
    logits, target = _inputs(8, 5, torch.float32)
    out = csl_fast.accumulate(
        logits, target, torch.arange(8), torch.zeros(8), return_z_loss=True,
        return_token_accuracy=True,
    )  # fmt: skip
    torch.testing.assert_close(out.loss, F.cross_entropy(logits, target, ignore_index=IGNORE))
    assert out.z_loss.item() == 0.0
    active = target != IGNORE
    expected = ((logits.argmax(1) == target) & active).sum() / active.sum()
    torch.testing.assert_close(out.token_accuracy, expected.float())
    plain = csl_fast.accumulate(logits, target, torch.arange(8), torch.zeros(8))
    assert isinstance(plain, torch.Tensor)


def test_all_ignored_mean_is_nan():
    logits = torch.randn(3, 4)
    target = torch.full((3,), IGNORE)
    for backend in BACKENDS:
        out = csl_fast.accumulate(
            logits, target, torch.arange(3), torch.zeros(3), backend=backend, z_loss_scale=0.1,
            return_z_loss=True, return_token_accuracy=True,
        )  # fmt: skip
        assert out.loss.isnan() and out.z_loss.isnan() and out.token_accuracy.isnan()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [0, 3])
def test_z_loss_mean_over_no_row(backend, dtype, batch):
    """'mean' with no non-ignored row (B = 0, or all ignored): the z-loss is 0 / 0 = NaN when
    on, as the loss; 0 when off (z_loss_scale 0, soft-capping on), on every backend and
    dtype. The C++ float32/float64 kernel gave 0 at B = 0 (NaN when all rows were ignored),
    and with the z-loss off bfloat16 gave NaN where float32 gave 0."""
    logits = torch.randn(batch, 4, dtype=dtype)
    target = torch.full((batch,), IGNORE)
    for zs, cap in ((0.1, None), (0.1, 2.0), (0.0, 2.0)):
        out = csl_fast.accumulate(
            logits, target, torch.arange(batch), torch.zeros(4), backend=backend,
            z_loss_scale=zs, softcap=cap, return_z_loss=True,
        )  # fmt: skip
        what = f"zs={zs} softcap={cap}"
        assert out.loss.isnan(), what
        assert out.z_loss.dtype == dtype, what
        assert out.z_loss.isnan() if zs else out.z_loss == 0, f"{what}: z_loss {out.z_loss}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_softcap_with_float32_class_weights(backend, dtype):
    """Class weights of another dtype than the logits (float32 weights, half logits), which
    the plain path takes, with soft-capping: as F.cross_entropy with the weights cast. The
    reference backend (and the torch.func path) raised 'expected scalar type Half but found
    Float'."""
    logits, target = _inputs(7, 5, dtype)
    weight = torch.rand(5) + 0.5
    kw = dict(softcap=3.0, zs=0.0, reduction="mean")
    z = logits.clone().requires_grad_(True)
    got = csl_fast.accumulate(
        z * 1, target, torch.arange(7), torch.zeros(7), weight=weight, softcap=3.0,
        backend=backend,
    )  # fmt: skip
    (g_got,) = torch.autograd.grad(got, z)
    exact, g_exact = _run(
        lambda w: torch_formula(w, target, weight=weight.double(), **kw)[0], logits.double(),
        torch.tensor(1.0),
    )  # fmt: skip
    theirs, g_theirs = _run(
        lambda w: torch_formula(w, target, weight=weight.to(dtype), **kw)[0], logits,
        torch.tensor(1.0),
    )  # fmt: skip
    assert_no_worse_than_torch(got.detach(), theirs.detach(), exact.detach(), f"{dtype} loss")
    assert_no_worse_than_torch(g_got, g_theirs, g_exact, f"{dtype} grad")
    csl = torch.zeros(7)
    g_func = torch.func.grad(
        lambda w: csl_fast.accumulate(
            w, target, torch.arange(7), csl, weight=weight, softcap=3.0, backend=backend
        )
    )(logits)
    assert_no_worse_than_torch(g_func, g_theirs, g_exact, f"{dtype} torch.func grad")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"softcap": 0.0}, "softcap must be a finite number > 0"),
        ({"softcap": -1.0}, "softcap must be a finite number > 0"),
        ({"softcap": float("inf")}, "softcap must be a finite number > 0"),
        ({"softcap": "3"}, "softcap must be a number"),
        ({"z_loss_scale": -1e-4}, "z_loss_scale must be finite and >= 0"),
        ({"z_loss_scale": float("nan")}, "z_loss_scale must be finite and >= 0"),
        ({"return_z_loss": 1}, "return_z_loss must be True or False"),
        ({"z_loss_scale": 1e-4, "weight": torch.ones(5)}, "not supported with class weights"),
        ({"softcap": 3.0, "inplace_grad": True}, "inplace_grad=False"),
    ],
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_refused(backend, kwargs, match):
    logits, target = _inputs(4, 5, torch.float32)
    csl = torch.zeros(4)
    with pytest.raises((ValueError, TypeError), match=match):
        csl_fast.accumulate(logits * 1, target, torch.arange(4), csl, backend=backend, **kwargs)
    assert not csl.any()


def test_numpy_scalars_taken():
    """softcap and z_loss_scale as NumPy scalars (a config read with NumPy), as
    label_smoothing takes them: np.float32 was refused as 'must be a number'."""
    np = pytest.importorskip("numpy")
    logits, target = _inputs(6, 5, torch.float32)
    want = csl_fast.accumulate(
        logits, target, torch.arange(6), torch.zeros(6), softcap=3.0, z_loss_scale=0.25
    )
    for kind in (np.float32, np.float64, np.int64):
        got = csl_fast.accumulate(
            logits, target, torch.arange(6), torch.zeros(6), softcap=kind(3),
            z_loss_scale=kind(0.25) if kind is not np.int64 else 0.25,
        )  # fmt: skip
        torch.testing.assert_close(got, want)
    with pytest.raises(TypeError, match="softcap must be a number or None, got Tensor"):
        csl_fast.accumulate(
            logits, target, torch.arange(6), torch.zeros(6), softcap=torch.tensor(3.0)
        )


def test_soft_targets_refused():
    logits = torch.randn(4, 5)
    probs = torch.softmax(torch.randn(4, 5), 1)
    with pytest.raises(ValueError, match="class-index targets"):
        csl_fast.accumulate(logits, probs, torch.arange(4), torch.zeros(4), z_loss_scale=1e-4)


def test_torch_func_grad_with_extras():
    """Under torch.func.grad the loss comes from the plain formula (reference), extras on."""
    logits, target = _inputs(6, 5, torch.float64)
    csl = torch.zeros(6, dtype=torch.float64)

    def fn(z):
        return csl_fast.accumulate(
            z, target, torch.arange(6), csl, backend="cpu", softcap=3.0, z_loss_scale=0.1
        )

    got = torch.func.grad(fn)(logits)
    z = logits.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(
        torch_formula(z, target, softcap=3.0, zs=0.1, reduction="mean")[0], z
    )
    torch.testing.assert_close(got, want)


def test_opcheck_extra_ops():
    logits, target = _inputs(6, 5, torch.float32)
    for reduction in (0, 1):
        args = (target, None, IGNORE, 0.1, reduction, 3.0, 0.05)
        torch.library.opcheck(torch.ops.csl_fast.cross_entropy_fwd_extra.default, (logits, *args))
        torch.library.opcheck(
            torch.ops.csl_fast.cross_entropy_fwd_extra_inplace.default, (logits.clone(), *args)
        )


def test_compile_fullgraph():
    logits, target = _inputs(6, 5, torch.float32)
    csl = torch.zeros(6)

    def step(z):
        out = csl_fast.accumulate(
            z, target, torch.arange(6), csl, backend="cpu", softcap=3.0, z_loss_scale=0.05,
            return_z_loss=True, return_token_accuracy=True,
        )  # fmt: skip
        return out.loss, out.z_loss, out.token_accuracy

    z = logits.clone().requires_grad_(True)
    loss, zl, acc = torch.compile(step, fullgraph=True)(z)
    loss.backward()
    exact = torch_formula(logits, target, softcap=3.0, zs=0.05, reduction="mean")
    w = logits.clone().requires_grad_(True)
    torch_formula(w, target, softcap=3.0, zs=0.05, reduction="mean")[0].backward()
    torch.testing.assert_close(loss, exact[0])
    torch.testing.assert_close(zl, exact[1])
    torch.testing.assert_close(acc, exact[2])
    torch.testing.assert_close(z.grad, w.grad)
    assert csl.sum() > 0


def test_capped_loss_over_the_tanh_range():
    """The CPU kernel's vectorised tanh, through the recorded loss of z' = tanh(z) at |z|
    from 1e-6 to 20 (the polynomial below 1/4, the exponential form above)."""
    mags = torch.logspace(-6, 1.3, 64, dtype=torch.float64)
    z = torch.stack([mags, -mags, torch.zeros_like(mags)], 1)
    target = torch.zeros(64, dtype=torch.long)
    for dtype in (torch.float32, torch.float64):
        op = torch.ops.csl_fast.cross_entropy_fwd_extra.default
        stats = op(z.to(dtype), target, None, IGNORE, 0.0, 0, 1.0, 0.0)[2]
        zc = torch.tanh(z.to(dtype).double())
        exact = torch.logsumexp(zc, 1) - zc[:, 0]
        torch.testing.assert_close(stats[0].double(), exact, rtol=4e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ("cpu", "triton"))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_gradient_small_batches_any_upstream(backend, dtype):
    """Small batches, every reduction, upstream gradients that are not 1, soft-capping and
    z-loss: at most 2x the plain formula's own error against float64 in each case (a
    gradient kept rounded from forward and scaled in backward rounded twice: 28 bfloat16 and
    37 float16 cases of 972 failed). Floor: gradients both compute exactly but for ~1e-19."""
    if backend not in csl_fast.available_backends("cpu"):
        pytest.skip(f"backend {backend!r} is not available here")
    g = torch.Generator().manual_seed(3)
    failures = []
    for b, c, reduction, up, spread, (cap, zs) in itertools.product(
        [1, 3, 5], [2, 100], ["mean", "sum", "none"], [1.7, -2.5], [0.5, 20.0],
        [(5.0, 0.0), (None, 1e-3), (5.0, 1e-3)],
    ):  # fmt: skip
        x = (torch.randn(b, c, generator=g, dtype=torch.float64) * spread).to(dtype)
        t = torch.randint(0, c, (b,), generator=g)
        upstream = torch.full((b,) if reduction == "none" else (), up, dtype=dtype)
        kw = {"softcap": cap, "zs": zs, "reduction": reduction}
        exact_in, theirs_in, ours_in = (z.clone().requires_grad_(True) for z in (x.double(), x, x))
        torch_formula(exact_in, t, **kw)[0].backward(upstream.double())
        torch_formula(theirs_in, t, **kw)[0].backward(upstream)
        csl_fast.accumulate(
            ours_in, t, torch.arange(b), torch.zeros(b), reduction=reduction, backend=backend,
            softcap=cap, z_loss_scale=zs,
        ).backward(upstream)  # fmt: skip
        err_ours = (ours_in.grad.double() - exact_in.grad).abs().max()
        err_torch = (theirs_in.grad.double() - exact_in.grad).abs().max()
        if err_ours > 2 * err_torch + 1e-12:
            failures.append((b, c, reduction, up, spread, cap, zs, float(err_ours)))
    assert not failures, failures


@pytest.mark.parametrize("options", [{"softcap": 5.0}, {"z_loss_scale": 1e-3}])
def test_compiles_with_dynamic_shapes(options):
    # the range check took math.isfinite of a number torch.compile(dynamic=True) traces
    # as a symbolic float: "torch.* op returned non-Tensor"
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=g, requires_grad=True)
    x, y, idx = (
        torch.randn(5, 3, generator=g),
        torch.randint(0, 4, (5,), generator=g),
        torch.arange(5),
    )

    def step(x, y, idx):
        return csl_fast.accumulate(x @ w, y, idx, torch.zeros(8), **options)

    fast = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    torch.testing.assert_close(fast(x, y, idx), step(x, y, idx))
