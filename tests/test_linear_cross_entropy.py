"""linear_cross_entropy: same loss and gradients as F.cross_entropy(hidden @ W.T + b), chunked."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_no_worse_than_torch

import csl_fast
from csl_fast import CSLTracker
from csl_fast.linear_cross_entropy import default_chunk_size, linear_cross_entropy


def _inputs(b=2, t=13, h=8, v=19, dtype=torch.float32, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    bb = torch.randn(v, generator=g, dtype=torch.float64) if bias else None
    target = torch.randint(0, v, (b, t), generator=g)
    target[0, -3:] = -100
    target[-1, :2] = -100
    return hidden.to(dtype), weight.to(dtype), None if bb is None else bb.to(dtype), target


def _leaves(*ts):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in ts]


def _reference(hidden, weight, bias, target, reduction, label_smoothing=0.0):
    v = weight.shape[0]
    loss = F.cross_entropy(
        F.linear(hidden, weight, bias).reshape(-1, v),
        target.reshape(-1),
        reduction=reduction,
        label_smoothing=label_smoothing,
    )
    return loss.view(target.shape) if reduction == "none" else loss


def _grads(loss, up, params):
    live = [p for p in params if p is not None]
    return torch.autograd.grad((loss * up).sum(), live)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [5, 8, None], ids=["chunk5", "chunk8", "auto"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_fp32_matches_reference(reduction, chunk, bias):
    h, w, b, t = _inputs(bias=bias)
    ours_p, ref_p = _leaves(h, w, b), _leaves(h, w, b)
    loss = linear_cross_entropy(
        ours_p[0], ours_p[1], t, bias=ours_p[2], reduction=reduction, chunk_size=chunk
    )
    ref = _reference(*ref_p, t, reduction)
    assert loss.shape == ref.shape and loss.dtype == ref.dtype
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    up = torch.randn_like(ref)  # per-token upstream gradients for 'none'
    for a, r in zip(_grads(loss, up, ours_p), _grads(ref, up, ref_p), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


def test_label_smoothing_and_flat_hidden():
    h, w, b, t = _inputs()
    ours_p, ref_p = _leaves(h.reshape(-1, h.shape[-1]), w, b), _leaves(h, w, b)
    loss = linear_cross_entropy(
        ours_p[0], ours_p[1], t, bias=ours_p[2], label_smoothing=0.1, chunk_size=7
    )
    ref = _reference(*ref_p, t, "mean", label_smoothing=0.1)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(_grads(loss, 1.0, ours_p), _grads(ref, 1.0, ref_p), strict=True):
        torch.testing.assert_close(a.reshape(r.shape), r, rtol=1e-5, atol=1e-6)


def test_all_ignored_mean():
    h, w, b, t = _inputs()
    t = torch.full_like(t, -100)
    ours_p, ref_p = _leaves(h, w, b), _leaves(h, w, b)
    loss = linear_cross_entropy(ours_p[0], ours_p[1], t, bias=ours_p[2], chunk_size=4)
    ref = _reference(*ref_p, t, "mean")
    assert torch.isnan(loss) and torch.isnan(ref)
    for a, r in zip(_grads(loss, 1.0, ours_p), _grads(ref, 1.0, ref_p), strict=True):
        torch.testing.assert_close(a, r.nan_to_num(0.0))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the Triton interpreter
@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
def test_int32_targets_with_an_ignore_index_beyond_int32(backend):
    """No int32 target equals an ignore_index outside int32; compared in int32 it wrapped
    onto a class (2**32 + 2 onto 2), whose rows every backend then left out of the loss."""
    h, w, b, t = _inputs(b=1, t=5, v=5)
    t = torch.tensor([[0, 4, 2, 1, 2]])
    csl = torch.zeros(1, dtype=torch.float64)
    loss = linear_cross_entropy(h, w, t.int(), torch.arange(1), csl, bias=b,
                                ignore_index=2**32 + 2, backend=backend)  # fmt: skip
    torch.testing.assert_close(loss, _reference(h, w, b, t, "mean"))
    torch.testing.assert_close(csl, _reference(h.double(), w.double(), b.double(), t, "sum")[None])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_bf16_no_worse_than_torch(reduction):
    """Error against a float64 reference at most 2x PyTorch's own bf16 error, with a
    chunk size (48) that does not divide the 250 tokens."""
    h, w, b, t = _inputs(b=2, t=125, h=64, v=300, dtype=torch.float64)
    w = w * 0.3
    ref64_p = _leaves(h, w, b)
    exact = _reference(*ref64_p, t, reduction)
    up = torch.rand_like(exact) if reduction == "none" else torch.ones_like(exact)
    g_exact = _grads(exact, up, ref64_p)
    bf = [x.to(torch.bfloat16) for x in (h, w, b)]
    ours_p, torch_p = _leaves(*bf), _leaves(*bf)
    ours = linear_cross_entropy(
        ours_p[0], ours_p[1], t, bias=ours_p[2], reduction=reduction, chunk_size=48
    )
    theirs = _reference(*torch_p, t, reduction)
    upb = up.to(torch.bfloat16)
    assert_no_worse_than_torch(ours, theirs, exact, f"{reduction} loss")
    names = ("grad_hidden", "grad_weight", "grad_bias")
    for name, a, r, e in zip(
        names, _grads(ours, upb, ours_p), _grads(theirs, upb, torch_p), g_exact, strict=True
    ):
        assert a.dtype == torch.bfloat16
        assert_no_worse_than_torch(a, r, e, f"{reduction} {name}")


@pytest.mark.parametrize(
    ("reduction", "accum"),
    [("sum", None), ("mean", None), ("mean", torch.float16)],
    ids=["sum", "mean", "mean, float16 accumulator"],
)
def test_float16_gradients_summed_past_its_range_stay_finite(reduction, accum):
    """1,000 tokens whose summed weight gradient passes float16's 65504 before the count
    divides it: eager PyTorch scales before it rounds and stays finite; so must this (it
    saved the float16-rounded sum, inf, for the backward to scale; a float16 accumulator
    summed the mean's chunks before scaling them)."""
    n, h, v = 1000, 2, 3
    hidden = torch.full((n, h), 100.0, dtype=torch.float16)
    target = torch.zeros(n, dtype=torch.int64)
    ours_p, torch_p = (
        _leaves(torch.zeros(v, h, dtype=torch.float16), torch.zeros(v, dtype=torch.float16))
        for _ in range(2)
    )
    div = n if reduction == "sum" else 1
    ours = linear_cross_entropy(
        hidden, ours_p[0], target, bias=ours_p[1], reduction=reduction, accum_dtype=accum
    )
    (ours / div).backward()
    (_reference(hidden, *torch_p, target, reduction) / div).backward()
    for a, r in zip(ours_p, torch_p, strict=True):
        assert a.grad.isfinite().all()
        torch.testing.assert_close(a.grad, r.grad, rtol=2e-3, atol=0)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float64_keeps_float64_with_a_float32_accumulator(reduction):
    """accum_dtype is the parameter gradients' accumulator: the loss and the hidden
    gradient of float64 inputs stay float64 (the loss was summed in float32: 2.7e-4 off)."""
    h, w, b, t = _inputs(b=4, t=200, h=8, v=19, dtype=torch.float64)
    h = h * 30
    ours_p, torch_p = _leaves(h, w, b), _leaves(h, w, b)
    ours = linear_cross_entropy(
        ours_p[0], ours_p[1], t, bias=ours_p[2], reduction=reduction,
        accum_dtype=torch.float32, chunk_size=64,
    )  # fmt: skip
    theirs = _reference(*torch_p, t, reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-13, atol=0)
    ours.backward()
    theirs.backward()
    torch.testing.assert_close(ours_p[0].grad, torch_p[0].grad, rtol=1e-12, atol=1e-15)


def test_an_ignored_tokens_upstream_gradient_is_never_read():
    """A per-sequence mean of the 'none' losses over a padding sequence (0 / 0) sends NaN
    to its ignored tokens; F never reads them, and every parameter gradient was NaN."""
    h, w, b, t = _inputs(b=3, t=5)
    t[2] = -100  # a padding sequence
    ours_p, torch_p = _leaves(h, w, b), _leaves(h, w, b)
    ours = linear_cross_entropy(ours_p[0], ours_p[1], t, bias=ours_p[2], reduction="none")
    theirs = _reference(*torch_p, t, "none")
    for loss in (ours, theirs):
        n = (t != -100).sum(1, keepdim=True)
        (loss.sum(1, keepdim=True) / n).sum().backward()  # 0 / 0 for the padding sequence
    for a, r in zip(ours_p, torch_p, strict=True):
        assert a.grad.isfinite().all()
        torch.testing.assert_close(a.grad, r.grad)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_float64(reduction):
    h, w, b, t = _inputs(b=2, t=5, h=3, v=7, dtype=torch.float64)
    params = _leaves(h, w, b)

    def fn(hh, ww, bb):
        return linear_cross_entropy(hh, ww, t, bias=bb, reduction=reduction, chunk_size=3)

    assert torch.autograd.gradcheck(fn, params)


def test_records_per_sequence_csl():
    h, w, b, t = _inputs()
    index = torch.tensor([3, 1])
    csl, count = torch.zeros(4), torch.zeros(4)
    linear_cross_entropy(h, w, t, index, csl, b, count=count, chunk_size=6)
    tok = F.cross_entropy(
        F.linear(h, w, b).double().reshape(-1, w.shape[0]), t.reshape(-1), reduction="none"
    ).view(t.shape)
    expect = torch.zeros(4, dtype=torch.float64).index_add_(0, index, tok.sum(1))
    torch.testing.assert_close(csl.double(), expect, rtol=1e-5, atol=1e-5)
    assert count.tolist() == [0, 11, 0, 10]


def test_tracker_matches_accumulate_on_logits():
    """The chunked path records exactly what accumulate records from full logits."""
    h, w, b, t = _inputs()
    index = torch.tensor([0, 2])
    a, c = CSLTracker(3, w.shape[0]), CSLTracker(3, w.shape[0])
    with torch.no_grad():
        linear_cross_entropy(h, w, t, index, a, b, chunk_size=4)
        csl_fast.accumulate(F.linear(h, w, b).flatten(0, 1), t, index, c)
    for name, buf in a.buffers().items():
        torch.testing.assert_close(buf, c.buffers()[name], rtol=1e-5, atol=1e-5, msg=name)


def test_one_token_sequences_read_the_same_in_either_hidden_layout():
    """A [B, 1] target with [B*1, H] hidden was read as B rows (a suggested-label vote
    each), with [B, 1, H] hidden as B sequences (none): the same batch, two trackers."""
    h, w, b, t = _inputs(b=4, t=1, h=3, v=5)
    index = torch.arange(4)
    a, c = CSLTracker(4, w.shape[0]), CSLTracker(4, w.shape[0])
    with torch.no_grad():
        linear_cross_entropy(h, w, t, index, a, b)
        linear_cross_entropy(h.flatten(0, 1), w, t, index, c, b)
    for name, buf in a.buffers().items():
        assert torch.equal(buf, c.buffers()[name]), name
    assert not a.suggest_votes.any()  # sequences: no suggested label


def test_rows_mode_and_triton_backend():
    """Per-row samples (target [N], index [N]); the Triton kernels (interpreter) agree."""
    h, w, b, t = _inputs(b=1, t=9, h=4, v=6)
    h, t = h[0], t[0]
    index = torch.arange(9) % 4
    backends = ["reference"] + (
        ["triton"] if "triton" in csl_fast.available_backends("cpu") else []
    )
    ref_p = _leaves(h, w, b)
    ref = _reference(*ref_p, t, "sum")
    g_ref = _grads(ref, 1.0, ref_p)
    for backend in backends:
        csl = torch.zeros(4)
        p = _leaves(h, w, b)
        loss = linear_cross_entropy(
            p[0], p[1], t, index, csl, p[2], reduction="sum", chunk_size=4, backend=backend
        )
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
        for a, r in zip(_grads(loss, 1.0, p), g_ref, strict=True):
            torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-5)
        rows = F.cross_entropy(F.linear(h, w, b), t, reduction="none").detach()
        torch.testing.assert_close(csl, torch.zeros(4).index_add_(0, index, rows))


def test_chunk_size_rule_and_errors():
    assert default_chunk_size(16384, 4096, 128256) == 512
    assert default_chunk_size(10, 8, 19) == 10
    h, w, _b, t = _inputs()
    with pytest.raises(ValueError, match="weight must be"):
        linear_cross_entropy(h, w[:, :-1], t)
    with pytest.raises(ValueError, match="does not match"):
        linear_cross_entropy(h[:, :-1], w, t)
    with pytest.raises(ValueError, match="needs index"):
        linear_cross_entropy(h, w, t, None, torch.zeros(3))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(h, w, t, chunk_size=0)
    with pytest.raises(TypeError, match="dtype and device"):
        linear_cross_entropy(h, w.double(), t)


@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
@pytest.mark.parametrize("shape", [(5,), (1, 5)])
@pytest.mark.parametrize("compiled", [False, True], ids=["", "compiled"])
def test_a_bad_target_is_named_at_its_place_in_the_batch_whatever_the_chunks(
    backend, shape, compiled
):
    """The C++ kernel checks each chunk and named the position within it (target[0]); in a
    compiled graph (validate=False) too, where the chunk loop is an opaque op."""
    if compiled and backend != "cpu":
        # (the reference's chunks are traced; Triton's kernel makes a bad row NaN)
        pytest.skip("unvalidated, only the C++ kernel raises")
    target = torch.tensor([0, 1, 2, 0, 7]).view(shape)
    hidden, weight = torch.randn(*shape, 2), torch.randn(3, 2)
    csl = torch.zeros(5)
    at = "target[4]" if len(shape) == 1 else "target[0, 4]"  # (a [B, T] target's [b, t])
    for chunk in (2, None):
        torch._dynamo.reset()

        def step(hidden, chunk=chunk):
            return linear_cross_entropy(
                hidden, weight, target, torch.arange(shape[0]), csl, chunk_size=chunk,
                backend=backend, validate=False if compiled else None,
            )  # fmt: skip

        run = torch.compile(step, backend="aot_eager", fullgraph=True) if compiled else step
        with pytest.raises(IndexError, match=re.escape(f"{at} = 7 is outside [0, C = 3)")):
            run(hidden)
    assert csl.eq(0).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"bias": [0.0] * 19}, ValueError, "bias must be"),
        ({"chunk_size": 2.5}, TypeError, "chunk_size must be an int"),
        ({"chunk_size": True}, TypeError, "chunk_size must be an int"),
        ({"ignore_index": -100.5}, TypeError, "ignore_index must be an int"),
        ({"accum_dtype": torch.int32}, TypeError, "accum_dtype must be"),
        ({"accum_dtype": "float32"}, TypeError, "accum_dtype must be"),
    ],
    ids=["bias list", "chunk float", "chunk bool", "ignore float", "accum int", "accum str"],
)
def test_argument_types_are_refused_not_truncated(kwargs, error, match):
    # int(-100.5) would silently ignore the -100 targets; int(2.5) would run chunks of 2.
    h, w, _b, t = _inputs()
    csl = torch.zeros(2)
    with pytest.raises(error, match=match):
        linear_cross_entropy(h, w, t, torch.arange(2), csl, **kwargs)
    assert not csl.any()


@pytest.mark.parametrize(
    "hidden, weight, error, match",
    [
        # torch's "unknown device type for autocast", before the device check
        ("meta", None, TypeError, r"weight must have hidden's dtype and device .*meta"),
        # "weight must be [V, H] ..., got (19, 8)": the shape was right, the type was not
        (None, "numpy", TypeError, r"weight must be a torch\.Tensor, got ndarray"),
        ("numpy", None, TypeError, r"hidden must be a torch\.Tensor, got ndarray"),
    ],
    ids=["meta hidden", "numpy weight", "numpy hidden"],
)
def test_hidden_and_weight_are_refused_by_name(hidden, weight, error, match):
    h, w, _b, t = _inputs()
    h = {"meta": h.to("meta"), "numpy": h.numpy(), None: h}[hidden]
    w = {"numpy": w.numpy(), None: w}[weight]
    csl = torch.zeros(2)
    with pytest.raises(error, match=r"^csl_fast\.linear_cross_entropy: " + match):
        linear_cross_entropy(h, w, t, torch.arange(2), csl)
    assert not csl.any()


def test_a_bias_passed_by_position_is_refused_not_dropped():
    """linear_cross_entropy(h, W, y, b), as F.linear(x, W, b) is called, put the bias in
    the index slot, which is ignored without csl: the loss came out without the bias."""
    h, w, b, t = _inputs()
    for fourth in (b, "junk", torch.ones(2, dtype=torch.bool)):
        with pytest.raises(TypeError, match=r"index \(the 4th argument\) must be an integer"):
            linear_cross_entropy(h, w, t, fourth)
    want = F.cross_entropy(F.linear(h, w, b).reshape(-1, w.shape[0]), t.reshape(-1))
    torch.testing.assert_close(linear_cross_entropy(h, w, t, bias=b), want)


@pytest.fixture
def fresh_paths(monkeypatch):
    """Empty records of the weight-gradient accumulation paths, restored after the test."""
    lce = importlib.import_module("csl_fast.linear_cross_entropy")
    monkeypatch.setattr(lce, "_TAKEN", {})
    monkeypatch.setattr(lce, "_REFUSED", set())
    return lce


def test_weight_grad_path_choice(fresh_paths, monkeypatch):
    lce = fresh_paths
    bf16, f32 = torch.bfloat16, torch.float32
    assert lce.weight_grad_path(bf16, bf16, "cuda") == "same dtype"
    assert lce.weight_grad_path(bf16, f32, "cpu") == "upcast"  # no addmm(out_dtype) on CPU
    has_cuda_kernel = torch._C._dispatch_has_kernel_for_dispatch_key(
        "aten::addmm.dtype_out", "CUDA"
    )
    want = "out_dtype" if has_cuda_kernel else "upcast"
    assert lce.weight_grad_path(bf16, f32, "cuda") == want
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: True)
    assert lce.weight_grad_path(bf16, f32, "cuda") == "out_dtype"
    assert lce.weight_grad_path(bf16, f32, "cpu") == "upcast"


def test_accumulation_path_is_reported(fresh_paths):
    lce = fresh_paths
    hidden, weight, bias, target = _inputs(dtype=torch.bfloat16)
    h, w, b = _leaves(hidden, weight, bias)
    linear_cross_entropy(h, w, target, bias=b, chunk_size=8).backward()
    linear_cross_entropy(h, w, target, chunk_size=8, accum_dtype=torch.bfloat16).backward()
    paths = lce.accumulation_paths()
    assert paths[("cpu", torch.bfloat16, torch.float32)] == "upcast"
    assert paths[("cpu", torch.bfloat16, torch.bfloat16)] == "same dtype"
    from csl_fast import info

    assert "cpu bfloat16 -> torch.float32: upcast" in info.report()


def test_refused_out_dtype_falls_back_to_upcast_once(fresh_paths, monkeypatch):
    """A torch that lists addmm(out_dtype) but refuses the call: one warning, then the
    upcast path for good, with the exact float32 result and no [V, H] temporary."""
    lce = fresh_paths
    real = lce.weight_grad_path
    monkeypatch.setattr(
        lce,
        "weight_grad_path",
        lambda d, a, t: "upcast" if (t, d, a) in lce._REFUSED else "out_dtype",
    )
    dz = torch.randn(6, 11).bfloat16()
    h = torch.randn(6, 4).bfloat16()
    gw = torch.zeros(11, 4)
    with pytest.warns(RuntimeWarning, match="refused addmm"):
        lce._add_weight_grad(gw, dz, h)  # the CPU has no addmm.dtype_out kernel: refused
    lce._add_weight_grad(gw, dz, h)  # no second warning (pytest's -W error would raise)
    want = 2 * (dz.t().double() @ h.double())
    torch.testing.assert_close(gw.double(), want, rtol=1e-6, atol=1e-6)
    assert lce.accumulation_paths() == {("cpu", torch.bfloat16, torch.float32): "upcast"}
    monkeypatch.setattr(lce, "weight_grad_path", real)


def test_a_tracker_takes_a_vocabulary_of_its_own_size():
    """The logits' class count is the weight's rows: a tracker made for another vocabulary
    is refused before anything is written (its suggested labels are token ids below its
    num_classes)."""
    h, w, b, t = _inputs()
    tracker = CSLTracker(3, w.shape[0] - 2)
    with pytest.raises(ValueError, match=rf"linear_cross_entropy: the logits have C = "
                       rf"{w.shape[0]} classes .* num_classes={w.shape[0] - 2}"):  # fmt: skip
        linear_cross_entropy(h, w, t, torch.tensor([0, 2]), tracker, b)
    assert tracker.csl_count.sum() == 0 and tracker.suggest_label.eq(-1).all()


def test_argument_errors_name_linear_cross_entropy():
    # the checks shared with accumulate said "csl_fast.accumulate: ..." to a caller of
    # linear_cross_entropy, who never called accumulate
    h, w = torch.randn(8, 5), torch.randn(7, 5)
    t, idx, csl = torch.randint(0, 7, (8,)), torch.arange(8), torch.zeros(10)
    cases = [
        ((h, w, t, idx, csl), dict(reduction="avg"), ValueError, "reduction must be one of"),
        ((h, w, t, idx, csl), dict(label_smoothing=2.0), ValueError, "label_smoothing must be"),
        ((h, w, t[:4], idx, csl), {}, ValueError, "target must be 1-D with B = 8"),
        ((h, w, t, idx.float(), csl), {}, TypeError, "index must hold int64"),
        ((h, w, t, idx, [0.0] * 10), {}, TypeError, "csl must be a float32/float64 tensor"),
        ((h, w, t, idx, csl), dict(count=torch.zeros(11)), ValueError, "count has 11 entries"),
        # a [T, B, 1, H] hidden with a [B, T] target passed the count check, its tokens
        # credited to other sequences
        ((h.view(4, 2, 1, 5), w, t.view(2, 4), idx[:2], csl), {}, ValueError, "hidden must be"),
    ]
    for args, kwargs, exc, message in cases:
        with pytest.raises(exc, match=rf"^csl_fast\.linear_cross_entropy: {message}"):
            csl_fast.linear_cross_entropy(*args, **kwargs)


@pytest.mark.parametrize("layout", ["[N, H]", "[B, T, H]", "[B*T, H] with [B, T] target"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_zero_hidden_features(layout, reduction):
    """H = 0, which F.linear takes (the logits are the bias): the loss and gradients of the
    reference, CSL of every sequence. hidden.reshape(-1, 0) raised 'cannot reshape tensor
    of 0 elements into shape [-1, 0]', and [B*T, 0] hidden was refused as not matching."""
    h, w, b, t = _inputs(b=2, t=3, h=0, v=5)
    if layout == "[N, H]":
        h, t = h.reshape(6, 0), t.reshape(6)
    elif layout != "[B, T, H]":
        h = h.reshape(6, 0)
    index = torch.arange(t.shape[0])
    csl = torch.zeros(t.shape[0])
    ours_in, ref_in = _leaves(h, w, b), _leaves(h, w, b)
    got = linear_cross_entropy(*ours_in[:2], t, index, csl, ours_in[2], reduction=reduction)
    want = _reference(*ref_in, t, reduction)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    want.sum().backward()
    for a, e in zip(ours_in, ref_in, strict=True):
        assert a.grad.shape == e.grad.shape
        torch.testing.assert_close(a.grad, e.grad)
    plain = F.cross_entropy(b.expand(6, 5), t.reshape(-1), reduction="none").view(t.shape)
    want_csl = plain if plain.dim() == 1 else plain.sum(1)
    torch.testing.assert_close(csl, want_csl)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
def test_under_autocast_as_the_eager_pair(backend, reduction):
    """Mixed precision: bfloat16 hidden states and a float32 head. The eager pair under
    autocast runs the matmul in bfloat16 and the loss in float32; so does the fused op,
    loss, gradients (to the float32 head too) and recorded CSL."""
    g = torch.Generator().manual_seed(7)
    body, head = torch.nn.Linear(6, 6), torch.nn.Linear(6, 13)
    x = torch.randn(3, 5, 6, generator=g)
    y = torch.randint(0, 13, (3, 5), generator=g)
    y[0, :2] = -100
    idx = torch.tensor([2, 0, 2])
    results = []
    for ours in (False, True):
        body.zero_grad()
        head.zero_grad()
        csl, count = torch.zeros(4), torch.zeros(4)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            h = body(x)
            assert h.dtype == torch.bfloat16
            if ours:
                loss = linear_cross_entropy(
                    h, head.weight, y, idx, csl, head.bias, count=count,
                    label_smoothing=0.1, reduction=reduction, chunk_size=4, backend=backend,
                )  # fmt: skip
            else:
                logits = head(h)
                loss = F.cross_entropy(
                    logits.transpose(1, 2), y, label_smoothing=0.1, reduction=reduction
                )
                plain = F.cross_entropy(logits.transpose(1, 2).float(), y, reduction="none")
                csl.index_add_(0, idx, plain.detach().sum(1))
        assert loss.dtype == torch.float32
        (loss.sum() if reduction == "none" else loss).backward()
        grads = [p.grad.clone() for p in (*body.parameters(), *head.parameters())]
        results.append((loss.detach(), grads, csl))
    (want, want_g, want_csl), (got, got_g, got_csl) = results
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(got_g, want_g, strict=True):
        assert a.dtype == torch.float32
        # within a bfloat16 rounding or two (eps 2**-7): the mean's 1/n is applied after
        # the bfloat16 matmul here, before it in the eager pair
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(got_csl, want_csl, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_inside_torch_compile_as_eager(reduction):
    """fullgraph=True: loss, gradients and recorded CSL as in eager (tracing failed on an
    accumulator saved for backward that the forward had mutated in place)."""
    g = torch.Generator().manual_seed(8)
    head = torch.nn.Linear(8, 13)
    h0 = torch.randn(6, 8, generator=g)
    y = torch.randint(0, 13, (6,), generator=g)
    idx = torch.tensor([1, 0, 1, 5, 2, 3])
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        head.zero_grad()
        h = h0.clone().requires_grad_(True)
        csl, count = torch.zeros(7), torch.zeros(7)

        def f(h, csl=csl, count=count):
            return linear_cross_entropy(
                h, head.weight, y, idx, csl, head.bias, count=count, reduction=reduction,
                chunk_size=4,
            )  # fmt: skip

        loss = (torch.compile(f, backend="aot_eager", fullgraph=True) if compiled else f)(h)
        loss.sum().backward()
        results.append((loss.detach(), h.grad, head.weight.grad.clone(), csl, count))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)


def test_float64_stays_float64_under_autocast():
    """Autocast casts float32 and half inputs, never float64: neither does the fused op."""
    g = torch.Generator().manual_seed(10)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g)
    w = torch.randn(9, 5, dtype=torch.float64, generator=g)
    y = torch.randint(0, 9, (7,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = F.cross_entropy(F.linear(h, w), y, reduction="none")
        got = linear_cross_entropy(h, w, y, reduction="none")
    assert got.dtype == want.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_the_reference_backend_runs_under_no_grad_and_inference_mode(mode):
    # the reference's gradient came from torch.autograd.grad under enable_grad, which
    # inference_mode overrides: "element 0 of tensors does not require grad"
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 4, generator=g), torch.randn(5, 4, generator=g)
    t, idx = torch.randint(0, 5, (6,), generator=g), torch.arange(6)
    want = F.cross_entropy(h @ w.T, t)
    with mode():
        csl = torch.zeros(8)
        got = csl_fast.linear_cross_entropy(h, w, t, idx, csl, backend="reference")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(csl[:6], F.cross_entropy(h @ w.T, t, reduction="none"))


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_no_parameter_gradient_is_formed_without_grad_mode(mode, reduction, monkeypatch):
    """An eval pass of a training model: parameters that require grad, under no_grad. The
    forward formed the weight, hidden and bias gradients all the same (twice the time and
    a [V, H] accumulator), as needs_input_grad ignores the grad mode."""
    lce = importlib.import_module("csl_fast.linear_cross_entropy")
    formed = []
    real = lce._add_weight_grad
    monkeypatch.setattr(lce, "_add_weight_grad", lambda gw, *a: (formed.append(1), real(gw, *a)))
    hidden, weight, bias, target = _inputs(dtype=torch.float32)
    hidden, weight, bias = _leaves(hidden, weight, bias)
    want = _reference(hidden, weight, bias, target, reduction)
    with mode():
        got = linear_cross_entropy(hidden, weight, target, bias=bias, reduction=reduction)
    assert not formed and not got.requires_grad
    torch.testing.assert_close(got, want.detach())
    got = linear_cross_entropy(hidden, weight, target, bias=bias, reduction=reduction)
    assert formed  # with grad mode on, the same call forms them in the forward
    params = [hidden, weight, bias]
    for a, b in zip(_grads(got, 1.0, params), _grads(want, 1.0, params), strict=True):
        torch.testing.assert_close(a, b)


def test_a_label_smoothing_of_zero_or_less_smooths_nothing_as_in_pytorch():
    g = torch.Generator().manual_seed(4)
    h, w = torch.randn(6, 8, generator=g), torch.randn(5, 8, generator=g)
    t = torch.randint(0, 5, (6,), generator=g)
    for smoothing in (-0.2, float("nan")):
        w1 = w.clone().requires_grad_(True)
        w2 = w.clone().requires_grad_(True)
        csl = torch.zeros(6, dtype=torch.float64)
        ours = csl_fast.linear_cross_entropy(
            h, w1, t, torch.arange(6), csl, label_smoothing=smoothing
        )
        theirs = torch.nn.functional.cross_entropy(h @ w2.t(), t, label_smoothing=smoothing)
        ours.backward()
        theirs.backward()
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(w1.grad, w2.grad)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_one_compiled_graph_serves_every_number_of_tokens(reduction):
    """dynamic=True: the chunk loop is one opaque op, so a graph does not depend on the
    number of tokens (the loop was unrolled while tracing: a graph per count, and
    fullgraph=True failed at the ninth). Losses, gradients and CSL as in eager."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    g = torch.Generator().manual_seed(3)
    head = torch.nn.Linear(8, 13)
    csl = {mode: torch.zeros(40) for mode in ("eager", "compiled")}

    def step(h, y, idx, csl):
        loss = linear_cross_entropy(
            h, head.weight, y, idx, csl, head.bias, reduction=reduction, chunk_size=4
        )
        return loss.sum()

    compiled = torch.compile(step, backend=counter, fullgraph=True, dynamic=True)
    for n in range(3, 15):
        h0 = torch.randn(n, 8, generator=g)
        y = torch.randint(0, 13, (n,), generator=g)
        idx = torch.randint(0, 40, (n,), generator=g)
        results = []
        for mode, fn in (("eager", step), ("compiled", compiled)):
            head.zero_grad()
            h = h0.clone().requires_grad_(True)
            loss = fn(h, y, idx, csl[mode])
            loss.backward()
            results.append((loss.detach(), h.grad, head.weight.grad.clone(), head.bias.grad))
        for got, want in zip(results[1], results[0], strict=True):
            torch.testing.assert_close(got, want)
    torch.testing.assert_close(csl["compiled"], csl["eager"])
    assert counter.frame_count == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
@pytest.mark.parametrize("red", [0, 1, 2])
@pytest.mark.parametrize("need", [(True, True, True), (True, False, False), (False,) * 3])
@pytest.mark.parametrize("transposed", [False, True], ids=["", "weight.t()"])
def test_opcheck_of_the_chunk_loops(dtype, red, need, transposed):
    """The two opaque ops: schema, fake kernel (shapes, dtypes and strides of every output,
    placeholders included) and dispatch, as torch.compile relies on them. A transposed
    weight (a head stored [H, V]) gave a weight gradient of its strides in the fake kernel,
    a contiguous one in the real: Inductor's stride assertion failed."""
    ops = torch.ops.csl_fast
    g = torch.Generator().manual_seed(5)
    h, w, b = (torch.randn(s, generator=g).to(dtype) for s in ((7, 4), (6, 4), (6,)))
    w = w.t().contiguous().t() if transposed else w
    y = torch.tensor([0, 5, -100, 2, 3, 1, 4])
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    common = (-100, 0.1)
    fwd = (h, w, b, y, *common, red, 3, "cpu", acc, 0.0, 0.0, dtype, 0, *need)
    torch.library.opcheck(ops.linear_cross_entropy_forward.default, fwd)
    bwd = (h, w, b, y, torch.rand(7, generator=g).to(dtype), *common, 3, "cpu", acc, 0.0, 0.0)
    torch.library.opcheck(ops.linear_cross_entropy_backward_none.default, (*bwd, False, *need))


@pytest.mark.parametrize("layout", ["uint8 [B, T]", "flat [B*T]", "uint8 flat [B*T]"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_targets_f_cross_entropy_takes(layout, reduction):
    """uint8 token ids, and a flat [B*T] target with [B, T, H] hidden (a row per token),
    which F.cross_entropy(F.linear(...).reshape(-1, V), target.reshape(-1)) and accumulate
    take, were refused. Loss, gradients and CSL as those two give."""
    g = torch.Generator().manual_seed(5)
    hidden0, weight = torch.randn(2, 3, 4, generator=g), torch.randn(7, 4, generator=g)
    target = torch.randint(0, 7, (2, 3), generator=g)
    target[0, 1] = 255  # ignored, as uint8 segmentation masks mark it
    if layout.startswith("uint8"):
        target = target.to(torch.uint8)
    if "flat" in layout:
        target = target.reshape(-1)
    index = torch.arange(6) if "flat" in layout else torch.tensor([3, 1])
    ours, theirs = hidden0.clone().requires_grad_(), hidden0.clone().requires_grad_()
    csl, want_csl, count = torch.zeros(6), torch.zeros(6), torch.zeros(6)
    loss = linear_cross_entropy(
        ours, weight, target, index, csl, count=count, ignore_index=255, reduction=reduction
    )
    logits = F.linear(theirs, weight).reshape(-1, 7)
    want = F.cross_entropy(logits, target.reshape(-1), ignore_index=255, reduction=reduction)
    torch.testing.assert_close(loss, want if reduction == "mean" else want.view(target.shape))
    loss.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)
    # (accumulate reads [B*T, V] logits with a [B, T] target as sequences, with a flat
    # one as rows)
    csl_fast.accumulate(logits.detach(), target, index, want_csl, ignore_index=255)
    torch.testing.assert_close(csl, want_csl)
    assert count.sum() == 5
