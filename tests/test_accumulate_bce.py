"""csl_fast.accumulate_bce: the loss and gradient of F.binary_cross_entropy_with_logits on
every CPU-runnable backend (error against float64 at most 2x PyTorch's own, same dtype, for
random upstream gradients), the recorded buffers against csl_fast.reference and a plain
loop, trackers, bad input refused with nothing written, opcheck, gradcheck and
torch.compile. The Triton kernels: tests/_triton/test_triton_bce.py."""

import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_close_f32, assert_no_worse_than_torch, assert_tiny_no_worse_than_torch

import csl_fast
from csl_fast import reference
from csl_fast.reference import BCE_NUM_STATS, BceStat

ROOT = Path(__file__).resolve().parents[1]
CPU_BACKENDS = [b for b in ("cpu", "reference") if b in csl_fast.available_backends("cpu")]
needs_ext = pytest.mark.skipif(
    "cpu" not in csl_fast.available_backends("cpu"), reason="compiled extension not built"
)
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
SHAPES = [(5, 1), (13, 7), (3, 1037), (0, 4), (1, 3)]


def _inputs(batch, labels, dtype=torch.float32, soft=False, scale=3.0, device="cpu"):
    logits = (torch.randn(batch, labels, device=device) * scale).to(dtype)
    if soft:
        target = torch.rand(batch, labels, device=device).to(dtype)
    else:
        target = (torch.rand(batch, labels, device=device) < 0.3).to(dtype)
    return logits, target


def _options(kind, batch, labels, dtype=torch.float32):
    """weight and pos_weight of ``kind``, in float64 for float64 logits (PyTorch would
    round ``pos_weight - 1`` in float32 otherwise), else float32."""
    wd = torch.float64 if dtype == torch.float64 else torch.float32
    weight = pos_weight = None
    if "w_label" in kind:
        weight = torch.rand(labels, dtype=wd) + 0.5
    if "w_sample" in kind:
        weight = torch.rand(batch, 1, dtype=wd) + 0.5
    if "w_entry" in kind:
        weight = torch.rand(batch, labels, dtype=wd) + 0.5
    if "pos" in kind:
        pos_weight = torch.rand(labels, dtype=wd) * 3 + 0.2
    return weight, pos_weight


def _upstream(reduction, batch, labels, dtype):
    if reduction == "none":
        return (torch.randn(batch, labels) * 1.7).to(dtype)
    return torch.tensor(1.7, dtype=dtype)


def _torch_loss_and_grad(logits, target, weight, pos_weight, reduction, upstream):
    z = logits.detach().clone().requires_grad_(True)
    cast = (lambda t: None if t is None else t.to(z.dtype)) if z.dtype == torch.float64 else None
    w, pw = (cast(weight), cast(pos_weight)) if cast else (weight, pos_weight)
    loss = F.binary_cross_entropy_with_logits(
        z, target.to(z.dtype), weight=w, pos_weight=pw, reduction=reduction
    )
    (grad,) = torch.autograd.grad(loss, z, upstream.to(z.dtype))
    return loss.detach(), grad


def _ours(backend, logits, target, weight, pos_weight, reduction, upstream, n=None):
    z = logits.detach().clone().requires_grad_(True)
    batch = z.shape[0]
    n = n or max(batch, 1)
    csl = torch.zeros(n, dtype=torch.float64, device=z.device)
    index = torch.arange(batch, device=z.device) % n
    loss = csl_fast.accumulate_bce(
        z, target, index, csl, weight=weight, pos_weight=pos_weight, reduction=reduction,
        backend=backend,
    )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, z, upstream)
    return loss.detach(), grad, csl


def _check_no_worse(logits, target, weight, pos_weight, reduction, backend):
    upstream = _upstream(reduction, *logits.shape, logits.dtype)
    ours_loss, ours_grad, _ = _ours(
        backend, logits, target, weight, pos_weight, reduction, upstream
    )
    t_loss, t_grad = _torch_loss_and_grad(logits, target, weight, pos_weight, reduction, upstream)
    e_loss, e_grad = _torch_loss_and_grad(
        logits.double(), target.double(), weight, pos_weight, reduction, upstream.double()
    )
    assert ours_loss.dtype == logits.dtype and ours_loss.shape == t_loss.shape
    assert ours_grad.dtype == logits.dtype
    if ours_loss.dim() == 0:
        ours_loss, t_loss, e_loss = ours_loss[None], t_loss[None], e_loss[None]
    assert_no_worse_than_torch(ours_loss, t_loss, e_loss, "loss")
    assert_no_worse_than_torch(ours_grad, t_grad, e_grad, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", SHAPES)
def test_loss_and_grad_no_worse_than_torch(backend, dtype, reduction, shape):
    logits, target = _inputs(*shape, dtype=dtype, soft=True)
    _check_no_worse(logits, target, None, None, reduction, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "kind", ["w_label", "w_sample", "w_entry", "pos", "w_label+pos", "w_entry+pos"]
)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("soft", [False, True])
def test_weights_no_worse_than_torch(backend, dtype, kind, reduction, soft):
    logits, target = _inputs(11, 37, dtype=dtype, soft=soft)
    weight, pos_weight = _options(kind, 11, 37, dtype)
    _check_no_worse(logits, target, weight, pos_weight, reduction, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("logits_shape", [(9, 4), (9,)], ids=["[B, L]", "[B]"])
def test_integer_weights_are_promoted_as_pytorch_promotes_them(backend, dtype, logits_shape):
    """pos_weight=torch.tensor([3, 1, 5]): F promotes integer weights to the logits'
    dtype; they were refused as not floating point."""
    labels = logits_shape[-1] if len(logits_shape) == 2 else 1
    logits, target = _inputs(9, labels, dtype=dtype)
    logits, target = logits.view(logits_shape), target.view(logits_shape)
    weight = torch.arange(1, labels + 1)
    pos_weight = (torch.arange(labels) % 2).int()
    for w, pw in ((weight, None), (None, pos_weight), (weight.int(), weight)):
        w, pw = (t if t is None or len(logits_shape) == 2 else t[0] for t in (w, pw))
        upstream = _upstream("none", 9, labels, dtype).view(logits_shape)
        ours = _ours(backend, logits, target, w, pw, "none", upstream)
        as_float = (None if t is None else t.to(dtype) for t in (w, pw))
        promoted = _ours(backend, logits, target, *as_float, "none", upstream)
        theirs = _torch_loss_and_grad(logits, target, w, pw, "none", upstream)
        for a, b, c in zip(ours, promoted, (*theirs, None), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
            if c is not None and dtype != torch.bfloat16:  # (F rounds bf16 otherwise)
                assert a.dtype == dtype
                torch.testing.assert_close(a, c)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extreme_logits_no_worse_than_torch(backend, dtype):
    # Confident rows, right and wrong: tiny losses and gradients that a naive form cancels.
    logits = torch.tensor([[30.0, -30.0, 80.0, -80.0, 0.0, 1e-3, -17.0, 17.0]] * 2).to(dtype)
    target = torch.tensor([[1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 1.0, 0.0], [0.0, 1.0, 1.0, 0.0] * 2])
    for reduction in ("none", "sum"):
        _check_no_worse(logits, target.to(dtype), None, torch.full((8,), 2.5), reduction, backend)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("weighted", [False, True])
def test_subnormal_losses_and_gradients_as_torch(backend, weighted):
    """A gradient sigmoid(z) below float32's smallest normal (z < -87.3), or a loss term
    that small times a large weight, is kept as PyTorch keeps it; the CPU kernel's exp
    flushed them to 0 (a gradient 6e-9 at z = -88 with weight 1e30 came out 0)."""
    z = torch.cat([-torch.linspace(80, 104, 49), torch.linspace(80, 104, 49)])[None].repeat(2, 1)
    target = torch.zeros_like(z)
    target[1] = 1
    weight = torch.full_like(z, 1e30) if weighted else None
    upstream = torch.ones_like(z)
    ours_loss, ours_grad, _ = _ours(backend, z, target, weight, None, "none", upstream)
    t_loss, t_grad = _torch_loss_and_grad(z, target, weight, None, "none", upstream)
    # exactly, in float64 (F's own float64 form loses these: 1 + 1.8e-35 is 1 there too)
    zd, yd = z.double(), target.double()
    w = 1.0 if weight is None else weight.double()
    e_loss = w * (torch.log1p(torch.exp(-zd.abs())) + zd.clamp_min(0) - yd * zd)
    e_grad = w * torch.where(yd == 1, -torch.sigmoid(-zd), torch.sigmoid(zd))
    assert_tiny_no_worse_than_torch(ours_loss, t_loss, e_loss, "loss")
    assert_tiny_no_worse_than_torch(ours_grad, t_grad, e_grad, "grad")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_inputs_give_the_same_results(backend):
    logits, target = _inputs(9, 20, soft=True)
    weight = torch.rand(20, 9).t()  # [9, 20] transposed
    z_nc = torch.empty(20, 9).t()  # same values as below, other strides
    z_nc.copy_(logits)
    cols = torch.zeros(9, 40)
    cols[:, ::2] = target  # a column slice: row stride 40, column stride 2
    y_nc = cols[:, ::2]
    assert not z_nc.is_contiguous() and not y_nc.is_contiguous()
    up = torch.randn(9, 20).t().contiguous().t()
    for reduction in ("none", "mean"):
        upstream = up if reduction == "none" else torch.tensor(0.7)
        got = _ours(backend, z_nc, y_nc, weight, None, reduction, upstream)
        want = _ours(backend, logits, target, weight.contiguous(), None, reduction, upstream)
        for a, b in zip(got, want, strict=True):
            if backend == "reference":  # PyTorch's reductions follow the strides
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
            else:
                assert torch.equal(a, b)


def _loop_record(logits, target, index, n):
    """The buffers, one sample and one label at a time, in float64."""
    z, y = logits.double(), target.double()
    out = {k: torch.zeros(n, dtype=torch.float64) for k in ("csl", "count", "wrong", "min_margin")}
    out["label_csl"] = torch.zeros(n, z.shape[1], dtype=torch.float64)
    out["label_margin"] = torch.zeros(n, z.shape[1], dtype=torch.float64)
    out["label_prob"] = torch.zeros(n, z.shape[1], dtype=torch.float64)
    for i in range(z.shape[0]):
        entry = F.softplus(z[i]) - y[i] * z[i]
        if not torch.isfinite(entry.sum()):
            continue
        m = int(index[i])
        margin = (2 * y[i] - 1) * z[i]
        out["csl"][m] += entry.sum()
        out["count"][m] += 1
        out["wrong"][m] += ((z[i] >= 0) != (y[i] >= 0.5)).sum()
        out["min_margin"][m] += margin.min()
        out["label_csl"][m] += entry
        out["label_margin"][m] += margin
        out["label_prob"][m] += torch.sigmoid(z[i]) ** y[i] * torch.sigmoid(-z[i]) ** (1 - y[i])
    return out


def _record_all(backend, logits, target, index, n, dtype=torch.float32, **kw):
    labels, dev = logits.shape[1], logits.device
    bufs = {
        "csl": torch.zeros(n, dtype=dtype, device=dev),
        "count": torch.zeros(n, dtype=torch.int64, device=dev),
        "wrong": torch.zeros(n, dtype=torch.int32, device=dev),
        "min_margin": torch.zeros(n, dtype=dtype, device=dev),
        "label_csl": torch.zeros(n, labels, dtype=dtype, device=dev),
        "label_margin": torch.zeros(n, labels, dtype=dtype, device=dev),
        "label_prob": torch.zeros(n, labels, dtype=dtype, device=dev),
    }
    loss = csl_fast.accumulate_bce(
        logits, target, index, bufs["csl"], count=bufs["count"], wrong=bufs["wrong"],
        min_margin=bufs["min_margin"], label_csl=bufs["label_csl"],
        label_margin=bufs["label_margin"], label_prob=bufs["label_prob"], backend=backend,
        **kw,
    )  # fmt: skip
    return loss, bufs


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(17, 1), (13, 7), (4, 1100), (0, 3), (6, 2)])
@pytest.mark.parametrize("buffer_dtype", [torch.float32, torch.float64])
def test_recorded_buffers_match_a_loop(backend, dtype, shape, buffer_dtype):
    batch, labels = shape
    logits, target = _inputs(batch, labels, dtype=dtype, soft=True)
    if batch > 3:
        target[1] = (target[1] > 0.5).to(dtype)  # a hard row among soft ones
    n = 5 if batch != 6 else 1  # N = 1: every row at index 0
    index = torch.randint(0, n, (batch,))  # duplicates
    weight, pos_weight = _options("w_label+pos", batch, labels)
    _, bufs = _record_all(
        backend, logits, target, index, n, buffer_dtype, weight=weight, pos_weight=pos_weight
    )
    want = _loop_record(logits, target, index, n)
    # Per-sample values pass through the float32 statistics; per-entry values are added in
    # the buffer's dtype from the compute dtype (float64 only for float64 logits).
    exact_entries = dtype == torch.float64 and buffer_dtype == torch.float64
    sums = 2e-6 * max(batch, 1) if buffer_dtype == torch.float32 else 2e-6  # duplicates
    for name in ("count", "wrong"):
        assert torch.equal(bufs[name].double(), want[name]), name
    for name in ("csl", "min_margin", "label_csl", "label_margin", "label_prob"):
        assert bufs[name].dtype == buffer_dtype
        rtol = 1e-12 if exact_entries and name.startswith("label") else sums
        assert_close_f32(bufs[name], want[name], name, rtol=rtol)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_backends_record_what_the_reference_records(backend):
    logits, target = _inputs(23, 9, soft=True)
    index = torch.randint(0, 7, (23,))
    _, got = _record_all(backend, logits, target, index, 7)
    stats = reference.bce_row_statistics(logits, target)
    want = {k: torch.zeros_like(v) for k, v in got.items()}
    reference.bce_record(logits, target, stats, index, True, *want.values())
    for name in got:
        torch.testing.assert_close(got[name], want[name], rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_samples_are_not_recorded(backend):
    logits, target = _inputs(6, 4)
    logits[1, 2] = float("nan")
    logits[3, 0] = float("inf")
    target[3, 0] = 0.0  # softplus(inf) = inf
    logits[4, 1] = -float("inf")
    target[4, 1] = 0.0  # right, but 0 * inf is NaN in PyTorch's loss as in ours
    target[5, 3] = float("nan")  # not refused by the [0, 1] check: its loss is NaN
    index = torch.tensor([0, 1, 2, 3, 4, 5])
    loss, bufs = _record_all(backend, logits, target, index, 6, reduction="none")
    assert loss[4, 1].isnan() and loss[3, 0].isinf() and loss[5, 3].isnan()
    assert bufs["count"].tolist() == [1, 0, 1, 0, 0, 0]
    for name in ("csl", "label_csl", "label_margin", "label_prob", "min_margin", "wrong"):
        assert bufs[name][[1, 3, 4, 5]].eq(0).all(), name
    want = _loop_record(logits, target, index, 6)
    assert_close_f32(bufs["csl"], want["csl"], "csl")


def _float64_overflow_case():
    """float64 rows whose loss is finite in float64 but past float32's range (the first
    two), and an ordinary one."""
    logits = torch.tensor([[1e39, 0.0], [-4e38, 1.0], [1.0, -1.0]], dtype=torch.float64)
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    return logits, target


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_a_float64_loss_past_float32s_range_is_not_recorded(backend):
    """Finite in float64 but inf in the float32 statistics: recorded, it made the sample's
    CSL inf for good."""
    logits, target = _float64_overflow_case()
    loss, bufs = _record_all(backend, logits, target, torch.arange(3), 3, reduction="none")
    assert torch.isfinite(loss).all()
    assert bufs["count"].tolist() == [0, 0, 1]
    for name, buf in bufs.items():
        assert torch.isfinite(buf).all() and buf[:2].eq(0).all(), name


def _infinite_pos_weight_case(dtype):
    """Logits of both signs and targets 0, 1/2 and 1 against pos_weight +-inf, 2 and inf
    per label, a weight of 0 among them; float64 options for float64 logits."""
    logits = torch.tensor([[2.0, -3.0, 0.0, 1.0], [-1.0, 4.0, -0.5, -2.0]], dtype=dtype)
    target = torch.tensor([[1.0, 0.0, 1.0, 0.5], [0.0, 1.0, 0.5, 1.0]], dtype=dtype)
    wd = torch.float64 if dtype == torch.float64 else torch.float32
    inf = float("inf")
    pos_weight = torch.tensor([inf, -inf, 2.0, inf], dtype=wd)
    weight = torch.tensor([1.0, 0.5, 2.0, 0.0], dtype=wd)
    return logits, target, weight, pos_weight


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_infinite_pos_weight_as_pytorch(backend, dtype, reduction):
    """An infinite pos_weight: F.binary_cross_entropy_with_logits's gradient is NaN in that
    label's entries, whatever the target ((pw y + 1 - y) sigmoid(z) - pw y: inf - inf, or
    inf * 0), and its loss inf or NaN; ours gave -inf where the target is above 0. The
    loss, the gradient and their NaNs as PyTorch's; the recorded (plain) loss is finite."""
    logits, target, weight, pos_weight = _infinite_pos_weight_case(dtype)
    upstream = _upstream(reduction, *logits.shape, logits.dtype)
    for w in (None, weight):
        ours_loss, ours_grad, csl = _ours(
            backend, logits, target, w, pos_weight, reduction, upstream
        )
        t_loss, t_grad = _torch_loss_and_grad(logits, target, w, pos_weight, reduction, upstream)
        assert t_grad[:, [0, 1, 3]].isnan().all() and not t_grad[:, 2].isnan().any()
        assert torch.equal(ours_grad.isnan(), t_grad.isnan())
        assert torch.equal(ours_loss.isnan(), t_loss.isnan())
        tol = {"rtol": 2 * torch.finfo(dtype).eps, "atol": 1e-6}
        torch.testing.assert_close(ours_loss, t_loss, equal_nan=True, **tol)
        torch.testing.assert_close(ours_grad, t_grad, equal_nan=True, **tol)
        want = reference.bce_entry_losses(logits, target).sum(1)
        torch.testing.assert_close(csl, want.double(), rtol=1e-5, atol=1e-6)


def _infinite_logits_case(dtype):
    """Logits +-inf against targets 0, 0.5 and 1, and a finite column."""
    inf = math.inf
    logits = torch.tensor([[-inf, -inf, -inf, 0.3], [inf, inf, inf, -0.7]]).to(dtype)
    target = torch.tensor([[0.0, 0.5, 1.0, 1.0], [0.0, 0.5, 1.0, 0.0]]).to(dtype)
    return logits, target


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_infinite_logits_as_pytorch(backend, dtype, reduction):
    """A -inf logit: PyTorch's form (1 - y) z + max(-z, 0) + ... is -inf + inf = NaN
    whatever the target; ours gave +inf where the target is above 0."""
    logits, target = _infinite_logits_case(dtype)
    pos_weight = torch.tensor([2.0, 2.0, 2.0, 0.5]).to(dtype)
    for pw in (None, pos_weight):
        ours = csl_fast.accumulate_bce(
            logits, target, torch.arange(2), torch.zeros(2, dtype=torch.float64),
            pos_weight=pw, reduction=reduction, backend=backend,
        )  # fmt: skip
        want = F.binary_cross_entropy_with_logits(
            logits, target, pos_weight=pw, reduction=reduction
        )
        assert torch.equal(ours.isnan(), want.isnan()), (ours, want)
        torch.testing.assert_close(ours, want, equal_nan=True)


@needs_ext
def test_stats_layout_matches_the_header():
    text = (ROOT / "csrc" / "bce_stats.h").read_text()
    rows = dict(re.findall(r"kBce(\w+) = (\d+)", text))
    assert int(rows.pop("NumStats")) == BCE_NUM_STATS
    names = {re.sub(r"(?<!^)(?=[A-Z])", "_", k).upper(): int(v) for k, v in rows.items()}
    assert names == {s.name: int(s) for s in BceStat}


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("history", [False, True])
def test_tracker_is_updated_as_record_loss_updates_it(backend, history):
    logits, target = _inputs(10, 6, soft=True)
    index = torch.tensor([0, 2, 2, 5, 1, 7, 0, 3, 3, 2])
    tracker = csl_fast.CSLTracker(8, 6, history=history, num_labels=6)
    want = csl_fast.CSLTracker(8, 6, history=history)
    plain = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(1)
    loss = csl_fast.accumulate_bce(logits, target, index, tracker, backend=backend)
    csl_fast.record_loss(plain, index, want, backend=backend)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits, target))
    got_b, want_b = tracker.buffers(), want.buffers()
    for name in ("csl_sum", "csl_count", "last_loss", *(("epoch_loss_sum",) if history else ())):
        torch.testing.assert_close(got_b[name], want_b[name], msg=name)
    for name, buf in got_b.items():
        written = ("csl_sum", "csl_count", "last_loss", "epoch_loss_sum", "epoch_count")
        if name not in (*written, "label_csl_sum", "label_prob_sum"):
            assert torch.equal(buf, want_b[name]), f"{name} was written"
    torch.testing.assert_close(tracker.label_csl.sum(1), got_b["csl_sum"].float())
    entry = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    probs = torch.zeros(8, 6).index_add_(0, index, torch.exp(-entry))
    torch.testing.assert_close(tracker.label_prob, probs)


def _fresh():
    logits, target = _inputs(6, 4)
    bufs = {
        "csl": torch.zeros(5),
        "count": torch.zeros(5),
        "wrong": torch.zeros(5),
        "min_margin": torch.zeros(5),
        "label_csl": torch.zeros(5, 4),
        "label_margin": torch.zeros(5, 4),
        "label_prob": torch.zeros(5, 4),
    }
    return logits, target, torch.tensor([0, 1, 4, 4, 2, 3]), bufs


_BAD = [
    (
        "logits 3-D",
        lambda a: a.update(logits=a["logits"][None]),
        ValueError,
        r"\[B, L\] .* or \[B\]",
    ),
    (
        "logits 1-D, target 2-D",
        lambda a: a.update(logits=a["logits"][:, 0]),
        ValueError,
        r"target must have the logits' shape \(6,\) .* pass \[B, L\] logits",
    ),
    ("logits int", lambda a: a.update(logits=a["logits"].long()), TypeError, "float32, float16"),
    ("target shape", lambda a: a.update(target=a["target"][:, :3]), ValueError, "logits' shape"),
    ("target dtype", lambda a: a.update(target=a["target"].double()), TypeError, "logits' dtype"),
    ("index float", lambda a: a.update(index=a["index"].float()), TypeError, "int64"),
    ("index length", lambda a: a.update(index=a["index"][:5]), ValueError, "B = 6"),
    ("index high", lambda a: a["index"].__setitem__(3, 5), IndexError, r"index\[3\] = 5"),
    ("index negative", lambda a: a["index"].__setitem__(0, -1), IndexError, r"index\[0\] = -1"),
    ("weight shape", lambda a: a.update(weight=torch.rand(3)), ValueError, "does not broadcast"),
    (
        "pos_weight complex",  # (an integer one is promoted, as F promotes it)
        lambda a: a.update(pos_weight=torch.ones(4, dtype=torch.complex64)),
        TypeError,
        "floating",
    ),
    (
        "weight grad",
        lambda a: a.update(weight=torch.rand(4, requires_grad=True)),
        ValueError,
        "weight.detach",
    ),
    ("reduction", lambda a: a.update(reduction="avg"), ValueError, "reduction must be"),
    (
        "csl int",
        lambda a: a["bufs"].update(csl=torch.zeros(5, dtype=torch.long)),
        TypeError,
        "csl must",
    ),
    (
        "csl grad",
        lambda a: a["bufs"].update(csl=torch.zeros(5, requires_grad=True)),
        ValueError,
        "requires grad",
    ),
    ("count size", lambda a: a["bufs"].update(count=torch.zeros(6)), ValueError, "count has 6"),
    ("wrong size", lambda a: a["bufs"].update(wrong=torch.zeros(4)), ValueError, "wrong has 4"),
    (
        "label_csl shape",
        lambda a: a["bufs"].update(label_csl=torch.zeros(5, 3)),
        ValueError,
        r"\[N, L\] = \[5, 4\]",
    ),
    (
        "label_csl strided",
        lambda a: a["bufs"].update(label_csl=torch.zeros(4, 5).t()),
        ValueError,
        "contiguous",
    ),
    (
        "label_margin f16",
        lambda a: a["bufs"].update(label_margin=torch.zeros(5, 4).half()),
        TypeError,
        "float32 or float64",
    ),
    (
        "label_prob f16",
        lambda a: a["bufs"].update(label_prob=torch.zeros(5, 4).half()),
        TypeError,
        "label_prob.*float32 or float64",
    ),
    (
        "label_prob shape",
        lambda a: a["bufs"].update(label_prob=torch.zeros(5, 3)),
        ValueError,
        "label_prob",
    ),
    (
        "alias prob",
        lambda a: a["bufs"].update(label_prob=a["bufs"]["label_margin"]),
        ValueError,
        "label_margin and label_prob share",
    ),
    (
        "label_csl grad",
        lambda a: a["bufs"].update(label_csl=torch.zeros(5, 4, requires_grad=True)),
        ValueError,
        "requires grad",
    ),
    (
        "alias labels",
        lambda a: a["bufs"].update(label_margin=a["bufs"]["label_csl"]),
        ValueError,
        "label_csl and label_margin share",
    ),
    (
        "alias csl wrong",
        lambda a: a["bufs"].update(wrong=a["bufs"]["csl"]),
        ValueError,
        "csl and wrong share",
    ),
    (
        "device",
        lambda a: a["bufs"].update(min_margin=torch.zeros(5, device="meta")),
        ValueError,
        "min_margin is on meta",
    ),
    (
        # (torch's "unknown device type for autocast", before the device check)
        "logits device",
        lambda a: a.update(logits=torch.randn(6, 4, device="meta")),
        ValueError,
        "target is on cpu but logits are on meta",
    ),
    (
        "weight device",
        lambda a: a.update(weight=torch.rand(4, device="meta")),
        ValueError,
        "weight is on meta",
    ),
    (
        "pos_weight device",
        lambda a: a.update(pos_weight=torch.rand(4, device="meta")),
        ValueError,
        "pos_weight is on meta",
    ),
    ("count list", lambda a: a["bufs"].update(count=[0.0] * 5), TypeError, "count must be"),
    (
        "target -1/+1 labels",
        lambda a: a.update(target=a["target"] * 2 - 1),
        ValueError,
        r"outside \[0, 1\].*pass \(target \+ 1\) / 2",
    ),
    (
        "target above 1",
        lambda a: a["target"].__setitem__((2, 3), 1.5),
        ValueError,
        "row 2, label 3 is 1.5, outside",
    ),
    (
        "target just above 1",  # (it read "is 1, outside [0, 1]")
        lambda a: a["target"].__setitem__((2, 3), 1.0000001),
        ValueError,
        r"row 2, label 3 is 1\.0000001192092896, outside",
    ),
    (
        "no labels",
        lambda a: a.update(logits=torch.zeros(6, 0), target=torch.zeros(6, 0)),
        ValueError,
        "L = 0",
    ),
]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", _BAD, ids=[c[0] for c in _BAD])
def test_bad_input_is_refused_with_nothing_written(backend, case):
    _, change, error, match = case
    logits, target, index, bufs = _fresh()
    args = {"logits": logits, "target": target, "index": index, "bufs": bufs,
            "weight": None, "pos_weight": None, "reduction": "mean"}  # fmt: skip
    change(args)
    before = {
        k: v.detach().clone()
        for k, v in args["bufs"].items()
        if isinstance(v, torch.Tensor) and v.device.type != "meta"
    }
    b = args["bufs"]
    with pytest.raises(error, match=match):
        csl_fast.accumulate_bce(
            args["logits"], args["target"], args["index"], b["csl"], count=b["count"],
            wrong=b["wrong"], min_margin=b["min_margin"], label_csl=b["label_csl"],
            label_margin=b["label_margin"], label_prob=b["label_prob"], weight=args["weight"],
            pos_weight=args["pos_weight"], reduction=args["reduction"], backend=backend,
        )  # fmt: skip
    for name, buf in before.items():
        assert torch.equal(b[name].detach(), buf), f"{name} was written"


@needs_ext
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_bad_tracker_calls_write_nothing(backend):
    logits, target, index, _ = _fresh()
    tracker = csl_fast.CSLTracker(5, 4, num_labels=4)
    with pytest.raises(ValueError, match="count= is for plain csl tensors"):
        csl_fast.accumulate_bce(logits, target, index, tracker, count=torch.zeros(5))
    # another label count: named as the tracker's num_labels, not as a label_csl shape
    with pytest.raises(ValueError, match=r"tracker keeps L = 4 labels.*num_labels=3"):
        csl_fast.accumulate_bce(logits[:, :3], target[:, :3], index, tracker, backend=backend)
    index[2] = 7
    with pytest.raises(IndexError, match="outside"):
        csl_fast.accumulate_bce(logits, target, index, tracker, backend=backend)
    assert all(not b.any() for b in tracker.buffers().values() if b.dtype != torch.int32)


@needs_ext
def test_target_requiring_grad_needs_the_reference():
    logits, target = _inputs(4, 3, soft=True)
    target.requires_grad_(True)
    with pytest.raises(ValueError, match=r"target\.detach"):
        csl_fast.accumulate_bce(logits, target, torch.arange(4), torch.zeros(4), backend="cpu")
    loss = csl_fast.accumulate_bce(
        logits, target, torch.arange(4), torch.zeros(4), backend="reference"
    )
    (g,) = torch.autograd.grad(loss, target)
    assert torch.isfinite(g).all()


@needs_ext
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("options", [False, True])
def test_opcheck(reduction, options):
    logits, target = _inputs(7, 5, soft=True)
    logits.requires_grad_(True)
    weight = torch.rand(7, 1) if options else None
    pos_weight = torch.rand(5) + 0.5 if options else None
    ops = torch.ops.csl_fast
    torch.library.opcheck(ops.bce_fwd.default, (logits, target, weight, pos_weight, reduction))
    grad = torch.randn(7, 5) if reduction == 0 else torch.tensor(0.3)
    torch.library.opcheck(
        ops.bce_bwd.default, (grad, logits.detach(), target, weight, pos_weight, reduction)
    )
    stats = reference.bce_row_statistics(logits.detach(), target)
    bufs = (torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4), torch.zeros(4, 5))
    bufs += (None, torch.zeros(4, 5))  # no label_margin; label_prob
    index = torch.tensor([0, 1, 1, 3, 2, 0, 3])
    torch.library.opcheck(
        ops.bce_record.default, (logits.detach(), target, stats, index, True, *bufs)
    )


@needs_ext
def test_gradcheck_float64():
    logits, target = _inputs(5, 4, dtype=torch.float64, soft=True)
    logits.requires_grad_(True)
    weight, pos_weight = torch.rand(5, 1, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    for reduction in ("none", "mean", "sum"):

        def f(z, reduction=reduction):
            csl = torch.zeros(5, dtype=torch.float64)
            return csl_fast.accumulate_bce(
                z, target, torch.arange(5), csl, weight=weight, pos_weight=pos_weight,
                reduction=reduction, backend="cpu",
            )  # fmt: skip

        assert torch.autograd.gradcheck(f, (logits,))


@needs_ext
def test_double_backward_is_refused_not_wrong():
    logits, target = _inputs(4, 3)
    logits.requires_grad_(True)
    loss = csl_fast.accumulate_bce(logits, target, torch.arange(4), torch.zeros(4), backend="cpu")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, logits, create_graph=True)


@needs_ext
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_training_step(backend):
    torch._dynamo.reset()
    model = torch.nn.Linear(6, 5)
    csl, count = torch.zeros(20), torch.zeros(20)
    label_csl = torch.zeros(20, 5)
    pos_weight = torch.rand(5) + 0.5

    @torch.compile(fullgraph=True, backend="aot_eager")
    def forward(x, y, idx):
        return csl_fast.accumulate_bce(
            model(x), y, idx, csl, count=count, label_csl=label_csl, pos_weight=pos_weight,
            backend=backend,
        )  # fmt: skip

    x, y = torch.randn(8, 6), torch.rand(8, 5)
    idx = torch.tensor([0, 3, 3, 7, 9, 11, 19, 0])
    loss = forward(x, y, idx)  # fullgraph=True: fails on any graph break
    loss.backward()
    grad = model.weight.grad.clone()
    model.zero_grad()
    want = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=pos_weight)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, model.weight.grad)
    plain = F.binary_cross_entropy_with_logits(model(x), y, reduction="none").detach()
    torch.testing.assert_close(label_csl, torch.zeros(20, 5).index_add_(0, idx, plain))
    torch.testing.assert_close(csl, torch.zeros(20).index_add_(0, idx, plain.sum(1)))
    assert count.sum() == 8 and count[3] == 2 and count[0] == 2


def test_fused_backends_on_each_device(device, fused_backends):
    """Every compiled backend of the device (on a GPU: Triton and CUDA C++) against
    PyTorch and the reference, deterministic mode bitwise reproducible."""
    logits, target = _inputs(37, 45, soft=True, device=device)
    pos_weight = torch.rand(45, device=device) + 0.5
    index = torch.randint(0, 9, (37,), device=device)
    for backend in fused_backends:
        for dtype in (torch.float32, torch.bfloat16):
            z, y = logits.to(dtype), target.to(dtype)
            upstream = torch.tensor(1.7, dtype=dtype, device=device)
            got = _ours(backend, z, y, None, pos_weight, "mean", upstream)
            want = _torch_loss_and_grad(z, y, None, pos_weight, "mean", upstream)
            exact = _torch_loss_and_grad(
                z.double(), y.double(), None, pos_weight.double(), "mean", upstream.double()
            )
            assert_no_worse_than_torch(got[0][None], want[0][None], exact[0][None], "loss")
            assert_no_worse_than_torch(got[1], want[1], exact[1], "grad")
        runs = []
        for _ in range(2):
            _, bufs = _record_all(backend, logits, target, index, 9, deterministic=True)
            runs.append(bufs)
        stats = reference.bce_row_statistics(logits, target)
        want_bufs = {k: torch.zeros_like(v) for k, v in runs[0].items()}
        reference.bce_record(logits, target, stats, index, True, *want_bufs.values())
        for name, buf in runs[0].items():
            assert torch.equal(buf, runs[1][name]), f"{backend}: {name} not reproducible"
            torch.testing.assert_close(buf, want_bufs[name], rtol=2e-6, atol=2e-6, msg=name)


@needs_ext
def test_compile_fullgraph_into_a_tracker():
    torch._dynamo.reset()
    model = torch.nn.Linear(6, 5)
    tracker = csl_fast.CSLTracker(20, 5, num_labels=5)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def forward(x, y, idx):
        return csl_fast.accumulate_bce(model(x), y, idx, tracker)

    x, y = torch.randn(8, 6), torch.rand(8, 5)
    idx = torch.tensor([0, 3, 3, 7, 9, 11, 19, 0])
    forward(x, y, idx).backward()
    plain = F.binary_cross_entropy_with_logits(model(x), y, reduction="none").detach()
    b = tracker.buffers()
    torch.testing.assert_close(tracker.label_csl, torch.zeros(20, 5).index_add_(0, idx, plain))
    torch.testing.assert_close(b["csl_sum"], torch.zeros(20).index_add_(0, idx, plain.sum(1)))
    assert b["csl_count"].sum() == 8
    # The last presentation in batch order: rows 7, 2, 3 for samples 0, 3, 7.
    torch.testing.assert_close(b["last_loss"][[0, 3, 7]], plain.sum(1)[[7, 2, 3]])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weights", [None, "sample", "scalar_pos"])
def test_binary_classifier_logits_b_are_read_as_b_by_1(backend, reduction, weights):
    # model(x).squeeze(1) with F.binary_cross_entropy_with_logits is the usual binary
    # classifier (breast cancer, 569 samples); it was refused with advice to flatten
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, generator=g, dtype=torch.float64) * 3
    y = (torch.rand(6, generator=g) < 0.5).double()
    w = torch.rand(6, generator=g, dtype=torch.float64) + 0.5 if weights == "sample" else None
    pw = torch.tensor([2.5], dtype=torch.float64) if weights == "scalar_pos" else None
    index = torch.tensor([3, 0, 7, 3, 1, 5])
    z1 = z.clone().requires_grad_(True)
    csl, count = torch.zeros(8, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    loss = csl_fast.accumulate_bce(
        z1, y, index, csl, count=count, weight=w, pos_weight=pw, reduction=reduction,
        backend=backend,
    )  # fmt: skip
    z2 = z.clone().requires_grad_(True)
    want = F.binary_cross_entropy_with_logits(z2, y, w, pos_weight=pw, reduction=reduction)
    assert loss.shape == want.shape
    torch.testing.assert_close(loss, want)
    up = torch.randn(want.shape, generator=g, dtype=torch.float64)
    loss.backward(up)
    want.backward(up)
    torch.testing.assert_close(z1.grad, z2.grad)
    csl2, count2 = torch.zeros_like(csl), torch.zeros_like(count)
    csl_fast.accumulate_bce(z[:, None], y[:, None], index, csl2, count=count2, backend=backend)
    torch.testing.assert_close(csl, csl2, rtol=0, atol=0)
    assert torch.equal(count, count2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_under_autocast_as_torch(backend, dtype):
    """F.binary_cross_entropy_with_logits is on autocast's float32 list: half logits with a
    float32 target (the usual mixed-precision call) give the float32 loss and gradient it
    gives, and record the float32 losses."""
    g = torch.Generator().manual_seed(5)
    lin = torch.nn.Linear(4, 3)
    x, y = torch.randn(6, 4, generator=g), torch.rand(6, 3, generator=g)
    w, pw = torch.rand(3, generator=g) + 0.5, torch.rand(3, generator=g) + 0.5
    idx = torch.tensor([0, 4, 2, 4, 1, 5])
    grads, losses = [], []
    for ours in (False, True):
        lin.zero_grad()
        csl = torch.zeros(7)
        with torch.autocast("cpu", dtype=dtype):
            z = lin(x)
            assert z.dtype == dtype
            if ours:
                loss = csl_fast.accumulate_bce(
                    z, y, idx, csl, weight=w, pos_weight=pw, backend=backend
                )
            else:
                loss = F.binary_cross_entropy_with_logits(z, y, weight=w, pos_weight=pw)
                per = F.binary_cross_entropy_with_logits(z, y, reduction="none")  # plain
        assert loss.dtype == torch.float32
        loss.backward()
        grads.append(lin.weight.grad.clone())
        losses.append(loss)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    want = torch.zeros(7).index_add_(0, idx, per.detach().float().sum(1))
    torch.testing.assert_close(csl, want, rtol=1e-5, atol=1e-6)


def test_a_binary_classifiers_weight_error_names_the_shapes_given():
    # [B] logits with a [B, 1] weight (PyTorch refuses it too) were reported as
    # "weight of shape (8, 1, 1) does not broadcast to the logits' shape (8, 1)"
    logits, target = torch.randn(8), (torch.rand(8) < 0.5).float()
    for name in ("weight", "pos_weight"):
        with pytest.raises(
            ValueError, match=rf"{name} of shape \(8, 1\) .* shape \(8,\) \(e.g. \[B\]\)"
        ):
            csl_fast.accumulate_bce(
                logits, target, torch.arange(8), torch.zeros(8), **{name: torch.ones(8, 1)}
            )


def test_a_binary_classifiers_target_error_blames_the_target():
    # [B] logits with a [B, 1] target read "logits must be [B, L] ... or [B], got (4,)":
    # the logits were a documented layout; the target was what did not match
    for target in (torch.rand(4, 1), torch.rand(3)):
        with pytest.raises(ValueError, match=r"target must have the logits' shape \(4,\)"):
            csl_fast.accumulate_bce(torch.randn(4), target, torch.arange(4), torch.zeros(4))


@pytest.mark.parametrize("into", ["tracker", "tensor"])
def test_an_index_past_the_buffers_is_named_for_what_was_passed(into):
    # the CPU kernel's message said "csl_fast: ... the size of the csl buffer" into a
    # tracker too, which the user never sized as a buffer
    t = csl_fast.CSLTracker(5, num_labels=2) if into == "tracker" else torch.zeros(5)
    n_is = "the tracker's num_samples" if into == "tracker" else "the size of the csl buffer"
    with pytest.raises(
        IndexError, match=rf"csl_fast\.accumulate_bce: index\[2\] = 5 .* N is {n_is}"
    ):
        csl_fast.accumulate_bce(torch.randn(3, 2), torch.rand(3, 2), torch.tensor([0, 1, 5]), t)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("into", ["tracker", "tensor"])
def test_an_index_past_the_buffers_is_refused_without_validation(backend, into):
    # validate=False on CPU tensors: the reference (and the Triton interpreter) skipped the
    # row and recorded the others, silently; only the C++ kernel refused it
    t = csl_fast.CSLTracker(4, num_labels=2) if into == "tracker" else torch.zeros(4)
    before = (t.csl_count if into == "tracker" else t).clone()
    with pytest.raises(IndexError, match=r"index\[1\] = 4"):
        csl_fast.accumulate_bce(
            torch.randn(2, 2),
            torch.rand(2, 2),
            torch.tensor([0, 4]),
            t,
            validate=False,
            backend=backend,
        )
    assert torch.equal(t.csl_count if into == "tracker" else t, before)


def test_reference_adds_in_row_order_whatever_the_thread_count():
    """The reference's bce_record ("the reference adds in row order") added with
    index_put_(accumulate=True), which on the CPU adds float32 rows with atomics from
    32,768 rows on: csl and the per-label sums differed bitwise between 1 and 2 threads."""
    g = torch.Generator().manual_seed(0)
    rows = 40_000
    logits, target = torch.randn(rows, 2, generator=g), torch.rand(rows, 2, generator=g)
    index = torch.randint(0, 7, (rows,), generator=g)

    def run(threads):
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            csl, tracker = torch.zeros(7), csl_fast.CSLTracker(7, 2, num_labels=2)
            csl_fast.accumulate_bce(logits, target, index, csl, backend="reference")
            csl_fast.accumulate_bce(logits, target, index, tracker, backend="reference")
            return {"csl": csl, **tracker.buffers()}
        finally:
            torch.set_num_threads(old)

    one = run(1)
    for _ in range(3):  # (the atomics' order, and so their sums, varied from run to run)
        two = run(2)
        assert [name for name, buf in one.items() if not torch.equal(two[name], buf)] == []
