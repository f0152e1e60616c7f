"""csl_fast::cross_entropy_fwd_triton against csl_fast.reference (interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import csl_fast
from csl_fast import reference
from csl_fast._triton import (
    cross_entropy,
    cross_entropy_fwd_extra_triton,
    cross_entropy_fwd_triton,
)
from csl_fast.stats import MARGIN_CAP, NUM_STATS, Stat

LOW = (torch.float16, torch.bfloat16)
IGNORE = -100


def _inputs(batch, classes, dtype, device, *, weighted=False, ignore=False, scale=3.0):
    logits = (torch.randn(batch, classes) * scale).to(dtype).to(device)
    target = torch.randint(0, classes, (batch,)).to(device)
    if ignore and batch:
        target[1::3] = IGNORE
    weight = (torch.rand(classes) + 0.5).to(device) if weighted else None
    return logits, target, weight


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _check(logits, target, weight, eps, reduction, ignore_index=IGNORE):
    loss, grad, stats = cross_entropy_fwd_triton(
        logits, target, weight, ignore_index, eps, reduction
    )
    ref_loss, ref_grad, ref_stats = reference.cross_entropy_fwd(
        logits, target, weight, ignore_index, eps, reduction
    )
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert grad.dtype == ref_grad.dtype and grad.shape == ref_grad.shape
    assert stats.dtype == torch.float32 and stats.shape == ref_stats.shape
    # Statistics are float32 computed from the same (upcast) logits in both.
    torch.testing.assert_close(stats, ref_stats, rtol=1e-5, atol=1e-6)
    if logits.dtype == torch.float32:
        torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6, equal_nan=True)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
        return
    # Low precision: error against float64 at most 2x PyTorch's own same-dtype error.
    l64, g64, _ = reference.cross_entropy_fwd(
        logits.double(), target, weight, ignore_index, eps, reduction
    )
    z = logits.detach().clone().requires_grad_(True)
    native = F.cross_entropy(
        z,
        target,
        weight=None if weight is None else weight.to(logits.dtype),
        ignore_index=ignore_index,
        label_smoothing=eps,
        reduction=("none", "mean", "sum")[reduction],
    )
    (native_grad,) = torch.autograd.grad(native.sum(), z)
    tiny = torch.finfo(logits.dtype).eps * 1e-3
    if not torch.isnan(l64).any():
        assert _max_err(loss, l64) <= 2 * _max_err(native.detach(), l64) + tiny
    assert _max_err(grad, g64) <= 2 * _max_err(native_grad, g64) + tiny


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (7, 2), (7, 97), (3, 1025)])
def test_matches_reference(tdevice, dtype, shape):
    for reduction in (0, 1, 2):
        logits, target, _ = _inputs(*shape, dtype, tdevice)
        _check(logits, target, None, 0.0, reduction)
    # weights + ignored rows + label smoothing, one reduction each
    for reduction in (0, 1, 2):
        logits, target, weight = _inputs(*shape, dtype, tdevice, weighted=True, ignore=True)
        _check(logits, target, weight, 0.1, reduction)


@pytest.mark.parametrize(
    ("shape", "chunk", "dtype"),
    [((5, 97), 32, torch.float32), ((2, 1025), 256, torch.float32), ((3, 97), 16, torch.bfloat16)],
)
def test_two_pass_path(tdevice, monkeypatch, shape, chunk, dtype):
    """Rows wider than MAX_FUSED_BLOCK: online softmax over chunks, then a gradient pass."""
    monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
    monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", chunk)
    assert not cross_entropy._config(shape[1])[0]
    logits, target, weight = _inputs(*shape, dtype, tdevice, weighted=True, ignore=True)
    _check(logits, target, weight, 0.2, 1)
    logits, target, _ = _inputs(*shape, dtype, tdevice)
    _check(logits, target, None, 0.0, 0)


@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_two_pass_path_with_negative_class_weights(tdevice, monkeypatch, reduction):
    """A lane whose weights summed below 0 skipped re-basing its smoothing sum when its
    max moved: the loss (not the gradient) was off, 4.1217 for F's 4.1155 at C = 9000."""
    monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
    monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 8)
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(6, 61, generator=g) * 4).to(tdevice)
    target = torch.randint(0, 61, (6,), generator=g).to(tdevice)
    weight = torch.rand(61, generator=g) + 0.2
    weight[torch.rand(61, generator=g) < 0.6] *= -1  # most lanes' sums below 0
    _check(logits, target, weight.to(tdevice), 0.3, reduction)


def _hard_wide_rows(classes, dtype, device):
    """Rows for the chunked path (chunks of 8 columns): maxima tied across chunks and
    lanes, the target tied with the others' max before and after it, a runner-up in the
    first chunk, -inf logits, a confident row, an ignored row and a bad target."""
    g = torch.Generator().manual_seed(7)
    z = torch.randn(12, classes, generator=g) * 2
    y = torch.randint(0, classes, (12,), generator=g)
    top = z.abs().max() + 1
    z[0, [3, 11, 27]] = top  # the same lane in three chunks: the first column wins
    y[0] = 20
    z[1, [13, 5, 30]] = top  # three lanes: column 5, in the first chunk
    y[1] = 0
    z[2, [4, 25]] = top  # y tied with the others' max after it: correct
    y[2] = 4
    z[3, [9, 33]] = top  # ... and before it: not correct, runner-up 9
    y[3] = 33
    z[4, 1] = top  # runner-up in the first chunk, target in the last (partial) one
    y[4] = classes - 1
    z[4, y[4]] = top + 1
    z[5, ::3] = float("-inf")  # -inf logits in every chunk
    y[5] = 1
    z[6] = float("-inf")  # every other column -inf: the runner-up is the first other one
    z[6, 0] = 1.0
    y[6] = 0
    z[7] = float("-inf")
    z[7, 17] = -2.0
    y[7] = 17
    z[8, 6] = z[8].max() + 30  # confident
    y[8] = 6
    y[9] = IGNORE
    y[10] = classes  # bad target
    z[11, [2, 10, 18, 26, 34]] = top  # lane 2 in every chunk; y among them
    y[11] = 18
    return z.to(dtype).to(device), y.to(device)


@pytest.mark.parametrize("classes", [37, 40])  # 4 full chunks + a partial one; 5 full
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_pass_lanes_match_reference(tdevice, monkeypatch, classes, dtype):
    """The chunked path keeps per-lane state and reduces across lanes once: first-index
    ties for correct and the runner-up across chunks and lanes, -inf logits and the rows
    with nothing but -inf besides the target, as the reference; with smoothing and class
    weights (per-lane sums of w_j (r - z_j)) and the soft-cap and z-loss extras too."""
    monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
    monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 8)
    assert not cross_entropy._config(classes)[0]
    logits, target = _hard_wide_rows(classes, dtype, tdevice)
    bad = target == classes
    _, _, stats = cross_entropy_fwd_triton(logits, target, None, IGNORE, 0.0, 0)
    ref = reference.row_statistics(logits, torch.where(bad, IGNORE, target), IGNORE)
    torch.testing.assert_close(stats, ref, rtol=1e-5, atol=1e-6)
    runner_up = [3.0, 5.0, 25.0, 9.0, 1.0, ref[Stat.OTHER_ARGMAX, 5].item(), 1.0, 0.0]
    assert stats[Stat.OTHER_ARGMAX, :8].tolist() == runner_up
    assert stats[Stat.CORRECT, :4].tolist() == [0.0, 0.0, 1.0, 0.0]
    good = ~bad
    finite = good & torch.isfinite(logits.float()).all(1)
    _check(logits[good], target[good], None, 0.0, 0)
    # Smoothing over -inf logits: an inf loss, which _check's low-precision error bound
    # cannot take (inf - inf); float32 compares it as is.
    rows = good if dtype == torch.float32 else finite
    weight = (torch.rand(classes) + 0.5).to(tdevice)
    for eps, reduction in [(0.1, 0), (0.2, 1)]:
        _check(logits[rows], target[rows], weight, eps, reduction)
    z, y = logits[finite].float(), target[finite]
    loss, grad, stats, zl = cross_entropy_fwd_extra_triton(z, y, None, IGNORE, 0.0, 0, 4.0, 0.01)
    zc = 4.0 * torch.tanh(z.double() / 4.0)
    ref = reference.row_statistics(z, y, IGNORE, 4.0)
    torch.testing.assert_close(stats, ref, rtol=1e-5, atol=1e-6)
    active = (y != IGNORE).double()
    want_zl = active * 0.01 * torch.logsumexp(zc, 1) ** 2
    torch.testing.assert_close(zl.double(), want_zl, rtol=1e-5, atol=1e-6)
    zd = z.double().requires_grad_(True)
    zcd = 4.0 * torch.tanh(zd / 4.0)
    obj = F.cross_entropy(zcd, y, ignore_index=IGNORE, reduction="none")
    obj = obj + active * 0.01 * torch.logsumexp(zcd, 1) ** 2
    (want_grad,) = torch.autograd.grad(obj.sum(), zd)
    torch.testing.assert_close(loss.double(), obj.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_two_pass_default_layout(tdevice, dtype):
    """The chunked path at its own block width: rows of an odd number of full chunks and a
    partial one (the compiled loop, unrolled twice, has a remainder)."""
    classes = 2 * cross_entropy.MAX_FUSED_BLOCK + 3 * cross_entropy.CHUNK_BLOCK // 2
    fused, _, block, _ = cross_entropy._config(classes)
    assert not fused and (classes // block) % 2 == 1 and classes % block
    logits, target, weight = _inputs(3, classes, dtype, tdevice, weighted=True)
    logits[0, 5] = logits[0, 5 + block] = logits[0].max() + 1  # tie across chunks
    _check(logits, target, weight, 0.1, 1)
    _check(logits, target, None, 0.0, 0)


def test_two_pass_several_rows_per_program(tdevice):
    """A chunked layout with 4 rows per program (benchmarks/triton_sweep.py may pass one)
    over 5 rows: the last program's rows past B read row B - 1 and store nothing."""
    logits, target = _hard_wide_rows(37, torch.float32, tdevice)
    logits, target = logits[:5], target[:5]
    grads = [torch.full_like(logits, 7.0) for _ in range(2)]
    out = [
        cross_entropy._launch(logits, target, None, IGNORE, 0.1, 0, g, config=cfg)
        for g, cfg in zip(grads, [(False, 1, 8, 4), (False, 4, 8, 4)], strict=True)
    ]
    torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-6, atol=1e-7)
    ref = reference.cross_entropy_fwd(logits, target, None, IGNORE, 0.1, 0)
    torch.testing.assert_close(grads[1], ref[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][1], ref[2], rtol=1e-5, atol=1e-6)


def test_int32_target_and_other_ignore_index(tdevice):
    logits, target, weight = _inputs(6, 10, torch.float32, tdevice, weighted=True)
    target[2] = 3
    _check(logits, target.int(), weight, 0.05, 1, ignore_index=3)


def test_noncontiguous_logits(tdevice):
    base = torch.randn(7, 2 * 97, device=tdevice) * 3
    target = torch.randint(0, 97, (7,), device=tdevice)
    _check(base[:, ::2], target, None, 0.1, 1)  # class stride 2: copied
    _check(base[:, :97], target, None, 0.0, 0)  # row stride 194: used as is
    _check(torch.randn(97, 7, device=tdevice).t(), target, None, 0.0, 2)  # transposed


def test_all_ignored_and_empty_mean(tdevice):
    logits, target, weight = _inputs(4, 9, torch.float32, tdevice, weighted=True)
    target.fill_(IGNORE)
    for w in (None, weight):
        loss, grad, stats = cross_entropy_fwd_triton(logits, target, w, IGNORE, 0.1, 1)
        ref = reference.cross_entropy_fwd(logits, target, w, IGNORE, 0.1, 1)
        assert torch.isnan(loss) and torch.isnan(ref[0])
        torch.testing.assert_close(grad, ref[1])
        assert torch.equal(stats, ref[2])  # ignored rows: zeros, no runner-up (-1)
    loss, grad, stats = cross_entropy_fwd_triton(logits[:0], target[:0], None, IGNORE, 0.0, 1)
    assert torch.isnan(loss) and grad.shape == (0, 9) and stats.shape == (NUM_STATS, 0)


def test_nonfinite_rows_get_zero_stats(tdevice):
    logits, target, _ = _inputs(4, 9, torch.float32, tdevice)
    logits[1, 3] = float("nan")
    logits[2, :] = float("-inf")
    _, _, stats = cross_entropy_fwd_triton(logits, target, None, IGNORE, 0.0, 0)
    ref = reference.row_statistics(logits, target, IGNORE)
    torch.testing.assert_close(stats, ref, rtol=1e-5, atol=1e-6)
    assert stats[Stat.VALID].tolist() == [1.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("two_pass", [False, True])
def test_margin_is_capped_where_the_label_holds_the_only_finite_logit(
    tdevice, monkeypatch, two_pass
):
    """A masked row (every class but the label at -inf) has loss 0 and margin +inf, which
    made the sample's margin sum infinite for good: the kernel emits MARGIN_CAP, as does
    the reference; finite margins past the cap are capped too."""
    if two_pass:
        monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
        monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 16)
    logits = torch.randn(4, 40, device=tdevice)
    target = torch.tensor([3, 0, 39, 7], device=tdevice)
    logits[0] = float("-inf")
    logits[0, 3] = 2.0
    logits[1, 0] = 5e3
    logits[2, :39] = float("-inf")
    _, _, stats = cross_entropy_fwd_triton(logits, target, None, IGNORE, 0.0, 0)
    ref = reference.row_statistics(logits, target, IGNORE)
    torch.testing.assert_close(stats, ref, rtol=1e-5, atol=1e-6)
    assert stats[Stat.MARGIN, :3].tolist() == [MARGIN_CAP] * 3
    assert stats[Stat.VALID].tolist() == [1.0] * 4


def _confident_oracle(logits, target):
    """Cancellation-free float64 loss, logits gradient (reduction none) and logit-gradient
    norm: everything from t = sum_{j != y} exp(z_j - z_y). (F.cross_entropy in float64
    still forms p_y - 1 and lse - z_y, which lose ~1e-4 relative at p_y = 1 - 1e-12.)"""
    z = logits.double()
    rows = torch.arange(z.shape[0], device=z.device)
    d = z - z[rows, target][:, None]
    e = torch.exp(d)
    e[rows, target] = 0.0
    t = e.sum(1)
    p = e / (1.0 + t)[:, None]
    grad = p.clone()
    grad[rows, target] = -t / (1.0 + t)
    gnorm = p.square().sum(1) + (t / (1.0 + t)).square()
    return torch.log1p(t), grad, gnorm


@pytest.mark.parametrize("two_pass", [False, True])
def test_confident_rows_match_float64(tdevice, monkeypatch, two_pass):
    """p_y -> 1: the true-class gradient, the logit-gradient norm and the loss keep their
    relative precision (the textbook p_y - 1 and lse - z_y would be 0 in float32)."""
    if two_pass:
        monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
        monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 16)
    gaps = torch.tensor([4.0, 9.0, 15.0, 22.0, 30.0])
    batch, classes = len(gaps), 37
    logits = torch.randn(batch, classes)
    target = torch.randint(0, classes, (batch,))
    logits[torch.arange(batch), target] = logits.max(1).values + gaps
    logits, target = logits.to(tdevice), target.to(tdevice)
    loss64, grad64, gnorm64 = _confident_oracle(logits, target)
    for reduction, scale in ((0, 1.0), (1, 1.0 / batch)):
        loss, grad, stats = cross_entropy_fwd_triton(logits, target, None, IGNORE, 0.0, reduction)
        rows = torch.arange(batch, device=tdevice)
        assert (grad[rows, target] < 0).all()
        torch.testing.assert_close(grad.double(), grad64 * scale, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats[Stat.LOSS].double(), loss64, rtol=1e-5, atol=0)
    torch.testing.assert_close(stats[Stat.GRAD_NORM_SQ].double(), gnorm64, rtol=1e-5, atol=0)
    torch.testing.assert_close(loss.double(), loss64.mean(), rtol=1e-5, atol=0)


def test_float64_rejected(tdevice):
    logits, target, _ = _inputs(2, 3, torch.float64, tdevice)
    with pytest.raises(TypeError, match="float64"):
        cross_entropy_fwd_triton(logits, target, None, IGNORE, 0.0, 0)


def test_opcheck(tdevice):
    logits, target, weight = _inputs(5, 11, torch.float32, tdevice, weighted=True, ignore=True)
    op = torch.ops.csl_fast.cross_entropy_fwd_triton.default
    torch.library.opcheck(
        op, (logits, target, weight, IGNORE, 0.1, 1), test_utils=("test_schema", "test_faketensor")
    )


def test_torch_compile_fullgraph(tdevice):
    backend = "aot_eager" if tdevice == "cpu" else "inductor"

    def f(logits, target, weight):
        loss, grad, stats = torch.ops.csl_fast.cross_entropy_fwd_triton(
            logits, target, weight, IGNORE, 0.1, 1
        )
        return loss * 2, grad + 1, stats[Stat.LOSS].sum()

    logits, target, weight = _inputs(5, 11, torch.float32, tdevice, weighted=True, ignore=True)
    got = torch.compile(f, fullgraph=True, backend=backend)(logits, target, weight)
    torch.testing.assert_close(got, f(logits, target, weight))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("two_pass", [False, True])
def test_in_place_gradient(tdevice, monkeypatch, dtype, two_pass):
    """cross_entropy_fwd_inplace_triton: the gradient over the logits, bitwise what the
    out-of-place op writes into its new buffer, on both paths."""
    if two_pass:
        monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
        monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 16)
    for reduction in (0, 1):
        logits, target, weight = _inputs(5, 37, dtype, tdevice, weighted=True, ignore=True)
        loss, grad, stats = cross_entropy_fwd_triton(logits, target, weight, IGNORE, 0.1, reduction)
        buf = logits.clone()
        loss2, stats2 = cross_entropy.cross_entropy_fwd_inplace_triton(
            buf, target, weight, IGNORE, 0.1, reduction
        )
        assert torch.equal(buf, grad) and torch.equal(stats2, stats) and torch.equal(loss2, loss)
    with pytest.raises(ValueError, match="needs them contiguous"):
        cross_entropy.cross_entropy_fwd_inplace_triton(logits[:, :5], target, None, IGNORE, 0.0, 1)
    torch.library.opcheck(
        torch.ops.csl_fast.cross_entropy_fwd_inplace_triton.default,
        (logits.clone(), target, weight, IGNORE, 0.1, 1),
        test_utils=("test_schema", "test_faketensor"),
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("two_pass", [False, True])
def test_stats_only(tdevice, monkeypatch, dtype, two_pass):
    """cross_entropy_fwd_stats_triton (the gradient pass compiled out): the loss and
    statistics of the op with gradient, bit for bit, on both paths, strided rows too."""
    if two_pass:
        monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
        monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 16)
    for reduction, weighted, eps in [(0, False, 0.0), (1, True, 0.1), (2, True, 0.0)]:
        logits, target, weight = _inputs(7, 37, dtype, tdevice, weighted=weighted, ignore=True)
        wide = torch.zeros(7, 40, dtype=dtype, device=tdevice)
        logits = wide[:, :37].copy_(logits)  # rows with a stride of their own
        args = (target, weight, IGNORE, eps, reduction)
        loss, _, stats = cross_entropy_fwd_triton(logits, *args)
        got_loss, got_stats = cross_entropy.cross_entropy_fwd_stats_triton(logits, *args)
        assert torch.equal(got_loss, loss) and torch.equal(got_stats, stats)
    torch.library.opcheck(
        torch.ops.csl_fast.cross_entropy_fwd_stats_triton.default,
        (logits, target, weight, IGNORE, 0.1, 1),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_half_accumulate_calls_the_stats_op(tdevice):
    """A bfloat16 accumulate on the Triton backend: the forward runs the op without the
    gradient (never the one with it); the loss is that op's mean (as without grad) and the
    gradient that of the path that formed the forward's gradient."""
    import csl_fast
    from csl_fast import ops_backward

    logits, target, _ = _inputs(6, 37, torch.bfloat16, tdevice, ignore=True)
    z = logits.clone().requires_grad_(True)
    with torch.profiler.profile() as prof:
        loss = csl_fast.accumulate(
            z, target, torch.arange(6, device=tdevice), torch.zeros(6, device=tdevice),
            backend="triton",
        )  # fmt: skip
    names = {e.name for e in prof.events() if e.name.startswith("csl_fast::")}
    assert "csl_fast::cross_entropy_fwd_stats_triton" in names, names
    assert "csl_fast::cross_entropy_fwd_triton" not in names, names
    loss.backward()
    _, _, stats = cross_entropy_fwd_triton(logits, target, None, IGNORE, 0.0, 0)
    denom = (target != IGNORE).sum(dtype=torch.float32)
    mean = torch.ops.csl_fast.cross_entropy_fwd_stats_triton(logits, target, None, IGNORE, 0.0, 1)
    assert torch.equal(loss.detach(), mean[0])
    want = ops_backward.cross_entropy_bwd(
        logits, target, None, stats, (1.0 / denom).reshape(1), IGNORE, 0.0, backend="triton"
    )
    assert torch.equal(z.grad, want)


def test_accumulate_in_place_with_the_triton_backend(tdevice):
    import csl_fast

    grads = []
    for inplace in (False, True):
        torch.manual_seed(0)
        layer = torch.nn.Linear(6, 13).to(tdevice)
        x = torch.randn(9, 6, device=tdevice)
        target = torch.randint(0, 13, (9,), device=tdevice)
        csl = torch.zeros(4, device=tdevice)
        index = torch.randint(0, 4, (9,), device=tdevice)
        loss = csl_fast.accumulate(
            layer(x), target, index, csl, backend="triton", inplace_grad=inplace
        )
        loss.backward()
        grads.append((loss.detach(), layer.weight.grad, csl))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("batch", [0, 3, 2500])
def test_mean_denominator(tdevice, weighted, batch):
    """The mean is the rows' sum over D, D being the rows with a target in [0, C) (or the
    sum of their weights, added by torch in its order), bitwise, int32 or int64 targets,
    over more rows than one block of the denominator kernel."""
    logits, target, weight = _inputs(batch, 5, torch.float32, tdevice, weighted=weighted)
    target[::4] = IGNORE
    target[1::7] = 5  # a bad target: a NaN row, outside D
    target[2::9] = 0
    keep = (target != IGNORE) & (target >= 0) & (target < 5)
    for tgt in (target, target.int()):
        rows = cross_entropy_fwd_triton(logits, tgt, weight, IGNORE, 0.0, 0)[0]
        rows = torch.where(keep, rows, 0.0)  # the bad rows' NaN left out
        if weight is None:
            denom = keep.sum(dtype=torch.float32)
        else:
            denom = torch.where(keep, weight[torch.where(keep, target, 0)], 0.0).sum()
        good = torch.where(keep, tgt, IGNORE)
        loss = cross_entropy_fwd_triton(logits, good, weight, IGNORE, 0.0, 1)[0]
        assert torch.equal(loss, rows.sum() / denom) or (batch == 0 and loss.isnan())
        # With the bad rows (every batch here has one), or over no rows: NaN.
        assert cross_entropy_fwd_triton(logits, tgt, weight, IGNORE, 0.0, 1)[0].isnan()
        # The half path's D (csl_fast.ops._mean_denominator): the same rows (the bad ones
        # were counted there, so the valid rows' float16 gradients were smaller than
        # their float32 ones).
        want = torch.where(denom == 0, torch.nan, denom) if weight is None else denom
        got = torch.ops.csl_fast.mean_denominator_triton(tgt, weight, IGNORE, 5)
        assert got.shape == () and (torch.equal(got, want) or (want.isnan() and got.isnan()))
    if batch == 3:
        op = torch.ops.csl_fast.mean_denominator_triton.default
        torch.library.opcheck(op, (target, weight, IGNORE, 5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("two_pass", [False, True])
@pytest.mark.parametrize("softcap", [0.0, 4.0])
def test_ignored_rows_with_non_finite_logits(tdevice, monkeypatch, dtype, two_pass, softcap):
    """An ignored row's gradient is NaN where F.cross_entropy's is (log_softmax's backward
    forms 0 - softmax(z) * 0: a NaN or +inf logit, or all -inf; soft-capped logits are
    finite, so a NaN only) and 0 otherwise, in place too; it was always 0. The two-pass
    path floors its max, so an all -inf row's sum is 0 there, not NaN."""
    if two_pass:
        monkeypatch.setattr(cross_entropy, "MAX_FUSED_BLOCK", 8)
        monkeypatch.setattr(cross_entropy, "CHUNK_BLOCK", 16)
    logits, target, _ = _inputs(7, 37, dtype, tdevice)
    logits[1, 3] = float("nan")
    logits[2, 20] = float("inf")
    logits[3] = float("-inf")
    logits[4, 2] = float("-inf")  # p = 0 there: a zero gradient
    target[1:6] = IGNORE
    args = (target, None, IGNORE, 0.1, 1, softcap, 0.0)
    _, grad, _, _ = cross_entropy_fwd_extra_triton(logits, *args)
    _, ref, _, _ = reference.cross_entropy_fwd_extra(logits, *args)
    nan_rows = [1] if softcap else [1, 2, 3]
    assert grad.isnan().all(1).nonzero().flatten().tolist() == nan_rows
    assert torch.equal(grad.isnan(), ref.isnan())
    assert bool((grad[[r for r in range(1, 6) if r not in nan_rows]] == 0).all())
    buf = logits.clone()
    cross_entropy.cross_entropy_fwd_inplace_triton(buf, target, None, IGNORE, 0.1, 1)
    plain = cross_entropy_fwd_triton(logits, target, None, IGNORE, 0.1, 1)[1]
    assert torch.equal(buf.isnan(), plain.isnan())
    assert plain.isnan().all(1).nonzero().flatten().tolist() == [1, 2, 3]


def test_refuses_targets_and_weights_it_would_read_past(tdevice):
    """The kernel reads B targets and C class weights; shorter ones (slices of a tensor
    whose next entries would have been read) are refused by name, as by the C++ op."""
    logits = torch.randn(4, 5, device=tdevice)
    tail = torch.full((10,), 3, dtype=torch.long, device=tdevice)
    weight = torch.full((10,), 1000.0, device=tdevice)
    good = torch.zeros(4, dtype=torch.long, device=tdevice)
    cases = [
        ((logits, tail[:2], None), ValueError, r"target must be 1-D with B = 4"),
        ((logits, good.view(2, 2), None), ValueError, r"target must be 1-D with B = 4"),
        ((logits, good.float(), None), TypeError, "int64 or int32"),
        ((logits, good, weight[:2]), ValueError, r"C = 5 class weights, got shape \(2,\)"),
        ((logits[None], good, None), ValueError, r"logits must be 2-D"),
    ]
    for fn in (cross_entropy_fwd_triton, cross_entropy_fwd_extra_triton):
        extra = (0.0, 0.0) if fn is cross_entropy_fwd_extra_triton else ()
        for args, exc, match in cases:
            with pytest.raises(exc, match=match):
                fn(*args, IGNORE, 0.1, 1, *extra)
    with pytest.raises(ValueError, match="C = 5 class weights"):
        torch.ops.csl_fast.mean_denominator_triton(good, weight[:2], IGNORE, 5)


def test_refuses_a_smoothing_or_reduction_the_cpp_op_refuses(tdevice):
    """Called directly, reduction=3 ran as a sum and label_smoothing 2.0 or NaN as given,
    where the C++ op refuses them; now both backends do."""
    logits = torch.randn(4, 5, device=tdevice)
    target = torch.zeros(4, dtype=torch.long, device=tdevice)
    for fn in (cross_entropy_fwd_triton, cross_entropy_fwd_extra_triton):
        extra = (0.0, 0.0) if fn is cross_entropy_fwd_extra_triton else ()
        for smoothing, reduction, match in [
            (-0.5, 1, "label_smoothing must be in"),
            (2.0, 1, "label_smoothing must be in"),
            (float("nan"), 1, "label_smoothing must be in"),
            (0.0, 3, "reduction must be 0"),
            (0.0, -1, "reduction must be 0"),
        ]:
            with pytest.raises(ValueError, match=match):
                fn(logits, target, None, IGNORE, smoothing, reduction, *extra)


@pytest.mark.parametrize("weighted", [False, True])
def test_mean_of_an_int32_target_with_an_ignore_index_past_int32(tdevice, weighted):
    """The denominator's padding lanes were loaded as ignore_index cast to int32: 2**40
    wrapped to 0, a class, and the lanes past B counted (D = 1024 for 2 rows)."""
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 5, generator=g).to(tdevice)
    target = torch.tensor([1, 3], dtype=torch.int32, device=tdevice)
    weight = (torch.rand(5, generator=g) + 0.5).to(tdevice) if weighted else None
    loss, _, _ = cross_entropy_fwd_triton(logits, target, weight, 2**40, 0.0, 1)
    want = F.cross_entropy(logits, target.long(), weight=weight)
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    d = torch.ops.csl_fast.mean_denominator_triton(target, weight, 2**40, 5)
    want_d = 2.0 if weight is None else float(weight[[1, 3]].sum())
    assert float(d.sum()) == pytest.approx(want_d, rel=1e-6)


@pytest.mark.parametrize("weighted", [False, True])
def test_unvalidated_bad_targets_scale_the_valid_rows_alike_in_every_dtype(tdevice, weighted):
    """validate=False, 'mean', two of four targets out of range: the loss is NaN, and the
    valid rows' gradients are F.cross_entropy's over those rows in every dtype. The
    float16/bfloat16 backward divided by the four rows (half the gradient), float32 by two."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 5, generator=g).to(tdevice)
    target = torch.tensor([0, 7, 1, -3], device=tdevice)
    weight = (torch.rand(5, generator=g) + 0.5).to(tdevice) if weighted else None
    good = x0[[0, 2]].clone().requires_grad_(True)
    F.cross_entropy(good, target[[0, 2]], weight=weight).backward()
    for dtype, tol in ((torch.float32, 1e-6), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)):
        x = x0.to(dtype, copy=True).requires_grad_(True)
        csl = torch.zeros(4, device=tdevice)
        loss = csl_fast.accumulate(
            x, target, torch.arange(4, device=tdevice), csl, weight=weight, backend="triton",
            validate=False,
        )  # fmt: skip
        assert loss.isnan()
        loss.backward()
        torch.testing.assert_close(x.grad[[0, 2]].float(), good.grad, rtol=tol, atol=tol)


def test_linear_cross_entropy_with_unvalidated_bad_targets_scales_the_valid_rows_right(tdevice):
    """linear_cross_entropy's own mean (its hidden gradient, the z-loss) divided by the rows
    not ignored, bad ones included: the valid rows' gradients came out 3/4 of F's."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 3, generator=g).to(tdevice)
    h0 = torch.randn(4, 3, generator=g).to(tdevice)
    target = torch.tensor([0, 7, 1, 3], device=tdevice)
    good = h0[[0, 2, 3]].clone().requires_grad_(True)
    F.cross_entropy(good @ weight.t(), target[[0, 2, 3]]).backward()
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 2e-2)):
        h = h0.to(dtype, copy=True).requires_grad_(True)
        loss = csl_fast.linear_cross_entropy(
            h, weight.to(dtype), target, backend="triton", validate=False
        )
        assert loss.isnan()
        loss.backward()
        torch.testing.assert_close(h.grad[[0, 2, 3]].float(), good.grad, rtol=tol, atol=tol)
