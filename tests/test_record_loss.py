"""csl_fast.record_loss against a plain PyTorch reference (index_add_ of the finite losses)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import csl_fast
from csl_fast import _ext

pytestmark = pytest.mark.usefixtures("one_thread")

# The Triton kernels run on CPU tensors in the interpreter (tests/conftest.py sets it).
_BACKENDS = [b for b in ("cpu", "reference", "triton") if _ext.backend_status("cpu").get(b) is None]
_LOSS_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# Buffers record_loss must not touch (they need logits), with their initial values.
_LOGITS_ONLY = (
    "last_max_prob", "last_correct", "forgetting", "learned_epoch", "grad_norm_sum",
    "margin_sum", "p_true_sum", "p_true_sq_sum", "suggest_label", "suggest_votes",
    "suggest_hits",
)  # fmt: skip


def _expected(loss, index, n, dtype=torch.float32):
    """Plain PyTorch: CSL sum and count of the finite (float32-rounded) losses, and the
    last finite loss per index in batch order (NaN where none)."""
    value = loss.detach().float()
    ok = torch.isfinite(value)
    csl = torch.zeros(n, dtype=dtype).index_add_(
        0, index.long(), torch.where(ok, value, 0).to(dtype)
    )
    count = torch.zeros(n, dtype=dtype).index_add_(0, index.long(), ok.to(dtype))
    last = torch.full((n,), float("nan"), dtype=dtype)
    for i in range(loss.shape[0]):  # the rule, written as a loop
        if ok[i]:
            last[int(index[i])] = value[i].to(dtype)
    return csl, count, last


def test_backends_available():
    """The loop below must not pass by running nothing: the reference always exists, the
    C++ kernels where the extension is built."""
    assert "reference" in _BACKENDS


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("dtype", _LOSS_DTYPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_matches_index_add(backend, dtype, deterministic):
    n, batch = 13, 40  # ~3 presentations of each index per batch: duplicates
    loss = (torch.rand(batch) * 5).to(dtype)
    loss[[3, 17]] = float("nan")
    loss[25] = float("inf")
    loss[30] = -float("inf")
    index = torch.randint(0, n, (batch,))
    for buf_dtype, count_dtype in ((torch.float32, torch.int64), (torch.float64, torch.float32)):
        csl = torch.full((n,), 0.5, dtype=buf_dtype)
        count = torch.ones(n, dtype=count_dtype)
        out = csl_fast.record_loss(
            loss, index, csl, count=count, backend=backend, deterministic=deterministic
        )
        assert out is loss
        want_csl, want_count, _ = _expected(loss, index, n, torch.float64)
        torch.testing.assert_close(csl.double(), want_csl + 0.5, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(count.double(), want_count + 1)


@pytest.mark.parametrize("backend", _BACKENDS)
def test_int32_index_and_graph(backend):
    """A loss with a graph: recorded detached, returned as is (the same object), and its
    backward is the loss's own."""
    w = torch.randn(4, requires_grad=True)
    x, y = torch.randn(6, 4), torch.randn(6)
    loss = (x @ w - y).square()
    index = torch.tensor([5, 0, 5, 2, 1, 5], dtype=torch.int32)
    csl = torch.zeros(6)
    out = csl_fast.record_loss(loss, index, csl, backend=backend)
    assert out is loss and out.requires_grad
    out.mean().backward()
    torch.testing.assert_close(w.grad, (2 * (x @ w - y)[:, None] * x).mean(0).detach())
    torch.testing.assert_close(csl, _expected(loss, index, 6)[0])


@pytest.mark.parametrize("backend", _BACKENDS)
def test_empty_batch_writes_nothing(backend):
    csl, count = torch.ones(4), torch.ones(4)
    csl_fast.record_loss(
        torch.empty(0), torch.empty(0, dtype=torch.long), csl, count=count, backend=backend
    )
    assert csl.tolist() == [1.0] * 4 and count.tolist() == [1.0] * 4
    tracker = csl_fast.CSLTracker(4, history=True)
    csl_fast.record_loss(torch.empty(0), torch.empty(0, dtype=torch.long), tracker)
    assert tracker.csl_count.sum() == 0


@pytest.mark.parametrize("backend", _BACKENDS)
@pytest.mark.parametrize("history", [False, True])
def test_tracker_buffers(backend, history):
    n = 9
    tracker = csl_fast.CSLTracker(n, num_classes=1, history=history, backend=backend)
    before = {k: v.clone() for k, v in tracker.buffers().items()}
    index = torch.tensor([4, 1, 4, 7, 4, 0, 1, 8])
    loss = torch.tensor([1.0, 2.0, 3.0, float("nan"), 0.5, 7.0, float("inf"), 6.0])
    csl_fast.record_loss(loss, index, tracker, backend=backend)
    index2 = torch.tensor([4, 7, 2])
    loss2 = torch.tensor([float("nan"), 9.0, 0.25])
    csl_fast.record_loss(loss2, index2, tracker, backend=backend)
    both_loss, both_index = torch.cat([loss, loss2]), torch.cat([index, index2])
    csl, count, last = _expected(both_loss, both_index, n)
    torch.testing.assert_close(tracker.csl_sum, csl)
    torch.testing.assert_close(tracker.csl_count, count)
    # last_loss: last finite presentation in batch order; never presented -> initial 0.
    torch.testing.assert_close(tracker.last_loss, torch.nan_to_num(last, nan=0.0))
    assert tracker.last_loss[4] == 0.5 and tracker.last_loss[1] == 2.0
    for name in _LOGITS_ONLY:
        assert torch.equal(tracker.buffers()[name], before[name]), name
    if history:
        tracker.end_epoch()
        mean = torch.where(count > 0, csl / count.clamp(min=1), float("nan"))
        torch.testing.assert_close(
            tracker.loss_history[0].float(), mean, equal_nan=True, atol=2e-3, rtol=1e-3
        )


def test_tracker_after_accumulate_keeps_logits_state():
    """Mixing: a tracker fed by accumulate, then by record_loss, keeps the logits-derived
    state accumulate wrote and adds only the loss."""
    tracker = csl_fast.CSLTracker(5, num_classes=3)
    logits, target, index = torch.randn(5, 3), torch.tensor([0, 1, 2, 0, 1]), torch.arange(5)
    csl_fast.accumulate(logits, target, index, tracker)
    before = {k: v.clone() for k, v in tracker.buffers().items()}
    extra = torch.tensor([0.5, 1.5])
    csl_fast.record_loss(extra, torch.tensor([1, 3]), tracker)
    for name in _LOGITS_ONLY:
        assert torch.equal(tracker.buffers()[name], before[name]), name
    want = before["csl_sum"].clone()
    want[[1, 3]] += extra
    torch.testing.assert_close(tracker.csl_sum, want)
    assert tracker.csl_count.tolist() == [1, 2, 1, 2, 1]
    assert tracker.last_loss[1] == 0.5 and tracker.last_loss[0] == before["last_loss"][0]


@pytest.mark.parametrize("backend", _BACKENDS)
def test_out_of_range_index_writes_nothing(backend):
    csl, count = torch.zeros(5), torch.zeros(5)
    tracker = csl_fast.CSLTracker(5)
    before = {k: v.clone() for k, v in tracker.buffers().items()}
    for bad in (5, -1):
        index = torch.tensor([0, 1, bad])
        with pytest.raises(IndexError, match=rf"index\[2\] = {bad} is outside \[0, N = 5\)"):
            csl_fast.record_loss(torch.ones(3), index, csl, count=count, backend=backend)
        with pytest.raises(IndexError, match="outside"):
            csl_fast.record_loss(torch.ones(3), index, tracker, backend=backend)
    assert csl.sum() == 0 and count.sum() == 0
    for name, buf in tracker.buffers().items():
        assert torch.equal(buf, before[name]), name


@pytest.mark.skipif("triton" not in _BACKENDS, reason="needs triton (interpreted on the CPU)")
def test_out_of_range_skipped_without_validation():
    """validate=False with the Triton kernel (the GPU default, where validating would cost a
    synchronisation): the bad row is skipped, as by accumulate's kernels, in the CSL sum,
    count and last loss alike, and the other rows are recorded."""
    tracker = csl_fast.CSLTracker(4, backend="triton")
    index = torch.tensor([0, 9, 2, -3])
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0])
    csl_fast.record_loss(loss, index, tracker, backend="triton", validate=False)
    assert tracker.csl_sum.tolist() == [1.0, 0.0, 3.0, 0.0]
    assert tracker.csl_count.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert tracker.last_loss.tolist() == [1.0, 0.0, 3.0, 0.0]


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.ones(2, 3), torch.arange(2)), {}, ValueError, "1-D tensor of per-sample"),
        ((torch.ones(3, dtype=torch.int64), torch.arange(3)), {}, TypeError, "float32"),
        ((torch.ones(3), torch.arange(3).float()), {}, TypeError, "int64"),
        ((torch.ones(3), torch.arange(2)), {}, ValueError, "B = 3"),
        ((torch.ones(3), [0, 1, 2]), {}, TypeError, "index must be a tensor"),
    ],
)
def test_bad_input_refused_before_writing(args, kwargs, error, match):
    csl, count = torch.zeros(4), torch.zeros(4)
    with pytest.raises(error, match=match):
        csl_fast.record_loss(*args, csl, count=count, **kwargs)
    assert csl.sum() == 0 and count.sum() == 0


def test_bad_buffers_refused():
    loss, index = torch.ones(2), torch.arange(2)
    with pytest.raises(TypeError, match="csl must be a tensor of dtype"):
        csl_fast.record_loss(loss, index, torch.zeros(4, dtype=torch.float16))
    with pytest.raises(TypeError, match="CSLTracker"):
        csl_fast.record_loss(loss, index, [0.0] * 4)
    with pytest.raises(ValueError, match="requires grad"):
        csl_fast.record_loss(loss, index, torch.zeros(4, requires_grad=True))
    with pytest.raises(ValueError, match="contiguous 1-D"):
        csl_fast.record_loss(loss, index, torch.zeros(8)[::2])
    with pytest.raises(ValueError, match="count has 3 entries"):
        csl_fast.record_loss(loss, index, torch.zeros(4), count=torch.zeros(3))
    buf = torch.zeros(4)
    with pytest.raises(ValueError, match="share memory"):
        csl_fast.record_loss(loss, index, buf, count=buf)
    with pytest.raises(ValueError, match="a tracker keeps its own counts"):
        csl_fast.record_loss(loss, index, csl_fast.CSLTracker(4), count=torch.zeros(4))


@pytest.mark.parametrize("where", ["csl", "count", "index", "tracker"])
def test_a_meta_tensor_is_refused_not_skipped(where):
    # A meta tensor among CPU ones sends the C++ op to its fake kernel, which writes
    # nothing and raises nothing: the call has to be refused before it gets there.
    meta = torch.device("meta")
    loss, index, csl, count = torch.ones(2), torch.arange(2), torch.zeros(4), torch.zeros(4)
    if where == "tracker":
        csl, count = csl_fast.CSLTracker(4, device=meta), None
    elif where == "index":
        index = index.to(meta)
    else:
        count = count.to(meta) if where == "count" else count
        csl = csl.to(meta) if where == "csl" else csl
    with pytest.raises(ValueError, match="is on meta but loss is on cpu"):
        csl_fast.record_loss(loss, index, csl, count=count)


def test_compile_fullgraph():
    """A regression training step with record_loss inside torch.compile(fullgraph=True):
    no graph break, and the buffers (tensor and tracker) hold what eager would write."""
    torch._dynamo.reset()
    model = torch.nn.Linear(3, 1)
    csl, count = torch.zeros(10), torch.zeros(10)
    tracker = csl_fast.CSLTracker(10)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(x, y, idx):
        per_sample = F.mse_loss(model(x).squeeze(1), y, reduction="none")
        csl_fast.record_loss(per_sample, idx, csl, count=count)
        csl_fast.record_loss(per_sample, idx, tracker)
        return per_sample.mean()

    x, y = torch.randn(6, 3), torch.randn(6)
    y[2] = float("nan")
    idx = torch.tensor([0, 4, 4, 9, 4, 1])
    loss = step(x, y, idx)  # fullgraph=True: fails on any graph break
    loss.backward()
    assert model.weight.grad is not None
    want = F.mse_loss(model(x).squeeze(1), y, reduction="none").detach()
    csl_want, count_want, last_want = _expected(want, idx, 10)
    torch.testing.assert_close(csl, csl_want)
    torch.testing.assert_close(count, count_want)
    torch.testing.assert_close(tracker.csl_sum, csl_want)
    torch.testing.assert_close(tracker.last_loss, torch.nan_to_num(last_want, nan=0.0))


def test_float64_loss_beyond_float32_range_not_recorded():
    """Documented: losses are recorded as float32, so a float64 loss above float32's range
    rounds to inf and is skipped like any non-finite loss; the rest round to float32."""
    loss = torch.tensor([1e39, 1.0 + 2.0**-40, 3.0], dtype=torch.float64)
    csl, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3)
    csl_fast.record_loss(loss, torch.arange(3), csl, count=count)
    assert csl.tolist() == [0.0, 1.0, 3.0] and count.tolist() == [0.0, 1.0, 1.0]


@pytest.mark.skipif("cpu" not in _BACKENDS, reason="the compiled extension is not built")
@pytest.mark.parametrize("dtype", _LOSS_DTYPES)
@pytest.mark.parametrize("tracker_dtype", [torch.float32, torch.float64])
def test_cpu_op_is_the_composition_it_replaces(dtype, tracker_dtype):
    """The one C++ op (csl_fast::record_loss) writes bit for bit what the composition of
    loss statistics, scatter_stats and record_last wrote, into every tracker buffer (with
    history) and into tensor buffers of every count dtype; versions are bumped."""
    from csl_fast.record_loss import _record, loss_stats

    g = torch.Generator().manual_seed(1)
    n = 11
    fused, composed = (
        csl_fast.CSLTracker(n, 3, history=True, dtype=tracker_dtype) for _ in range(2)
    )
    for step in range(3):
        loss = (torch.rand(40, generator=g, dtype=torch.float64) * 7).to(dtype)
        loss[[2, 9]] = float("nan")
        loss[step + 20] = float("inf")
        index = torch.randint(0, n, (40,), generator=g)
        if step == 1:
            index = index.int()
        versions = {k: v._version for k, v in fused.buffers().items()}
        csl_fast.record_loss(loss, index, fused)
        for name in ("csl_sum", "csl_count", "last_loss", "epoch_loss_sum", "epoch_count"):
            assert fused.buffers()[name]._version > versions[name], name
        _record(loss_stats(loss), index, composed, composed.training_buffers(), True, "cpu")
        if step == 1:
            fused.end_epoch()
            composed.end_epoch()
    for name, buf in composed.buffers().items():
        assert torch.equal(fused.buffers()[name], buf), name
    torch.testing.assert_close(
        fused.loss_history, composed.loss_history, rtol=0, atol=0, equal_nan=True
    )
    for count_dtype in (torch.float32, torch.float64, torch.int32, torch.int64):
        csl, count = torch.zeros(n, dtype=tracker_dtype), torch.zeros(n, dtype=count_dtype)
        want = (csl.clone(), count.clone())
        csl_fast.record_loss(loss, index, csl, count=count)
        _record(loss_stats(loss), index, csl, want, True, "cpu")
        assert torch.equal(csl, want[0]) and torch.equal(count, want[1])


@pytest.mark.skipif("cpu" not in _BACKENDS, reason="the compiled extension is not built")
def test_cpu_is_one_op():
    """On the CPU a call is one op (what made it cost ~40 us was several small kernels);
    profilers see it."""
    tracker = csl_fast.CSLTracker(8, history=True)
    with torch.profiler.profile() as prof:
        csl_fast.record_loss(torch.rand(8), torch.arange(8), tracker)
    names = [e.name for e in prof.events() if e.name.startswith("csl_fast::")]
    assert names == ["csl_fast::record_loss"], names


@pytest.mark.skipif("cpu" not in _BACKENDS, reason="the compiled extension is not built")
def test_correct_cpu_calls_skip_the_python_checks(monkeypatch):
    """An eager CPU call goes to the op first (whose own checks refuse everything the
    Python ones do, tested above through the same path): the Python checks, which cost
    more than the op, run only when it raises."""
    import sys

    module = sys.modules["csl_fast.record_loss"]

    def not_called(*args):
        raise AssertionError("the Python checks ran on a correct call")

    monkeypatch.setattr(module, "_check", not_called)
    csl, count = torch.zeros(4), torch.zeros(4, dtype=torch.int32)
    tracker = csl_fast.CSLTracker(4, history=True)
    loss = torch.tensor([1.0, 2.0, float("nan")])
    csl_fast.record_loss(loss, torch.tensor([3, 0, 3]), csl, count=count)
    csl_fast.record_loss(loss, torch.tensor([3, 0, 3]), tracker)
    assert csl.tolist() == [2.0, 0.0, 0.0, 1.0] and count.tolist() == [1, 0, 0, 1]
    assert tracker.csl_sum.tolist() == csl.tolist()
    with pytest.raises(AssertionError, match="Python checks ran"):
        csl_fast.record_loss(loss, torch.tensor([3, 0, 4]), csl, count=count)
    assert count.tolist() == [1, 0, 0, 1]


def test_a_broadcast_square_loss_is_refused_with_the_right_advice():
    # F.mse_loss of a [B, 1] prediction and a [B] target is [B, B]; the error advised
    # reducing it per sample (.mean(1)), which records a wrong loss without complaint
    pred, target = torch.randn(4, 1), torch.randn(4)
    with pytest.warns(UserWarning, match="target size"):
        square = F.mse_loss(pred, target, reduction="none")
    csl = torch.zeros(8)
    with pytest.raises(ValueError, match=r"B x B for B = 4 .*pred\.squeeze\(1\)"):
        csl_fast.record_loss(square, torch.arange(4), csl)
    assert not csl.any()
    with pytest.raises(ValueError, match=r"reduce any other dimension per sample"):
        csl_fast.record_loss(torch.ones(4, 3), torch.arange(4), csl)


def test_a_square_loss_error_also_offers_reducing_a_per_sample_dimension():
    # a [B, T] per-token loss whose T happens to equal B was told only to squeeze a
    # prediction it never broadcast; both causes are offered now
    tokens = F.cross_entropy(
        torch.randn(4, 5, 4), torch.randint(0, 5, (4, 4)), reduction="none"
    )  # [B, T] = [4, 4]
    with pytest.raises(ValueError, match=r"B x B for B = 4") as err:
        csl_fast.record_loss(tokens, torch.arange(4), torch.zeros(8))
    assert "pred.squeeze(1)" in str(err.value)
    assert "reduce it per sample (e.g. .mean(1))" in str(err.value)


def test_records_under_vmap_and_grad_as_outside_them():
    """Under torch.func.vmap the C++ op met PyTorch's "Batching rule not implemented for
    csl_fast::record_loss"; each vmapped call is now a batch of its own, as in accumulate."""
    from torch.func import grad, vmap

    x = torch.randn(5, 3)
    want = csl_fast.CSLTracker(8)
    csl_fast.record_loss((x**2).sum(1), torch.arange(5), want)

    def one(w, xi, i, tracker):  # a per-sample loss, recorded as it is computed
        return csl_fast.record_loss(((xi * w) ** 2).sum()[None], i[None], tracker).sum()

    got = csl_fast.CSLTracker(8)
    per_sample = vmap(grad(one), in_dims=(None, 0, 0, None))(torch.ones(3), x, torch.arange(5), got)
    torch.testing.assert_close(per_sample, 2 * x**2)
    for name in ("csl_sum", "csl_count", "last_loss"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name))
    # an index the vmapped function closes over counts once per call
    csl = torch.zeros(8)
    vmap(lambda xi: csl_fast.record_loss((xi**2).sum()[None], torch.tensor([6]), csl))(x)
    torch.testing.assert_close(csl[6], (x**2).sum())
    assert int((csl != 0).sum()) == 1


def test_records_the_primal_values_under_forward_mode_ad():
    """Inside a dual_level the transform branch called record_loss again, which took the
    same branch (the level outlives the cleared interpreter stack): RecursionError."""
    import torch.autograd.forward_ad as fwAD

    csl = torch.zeros(4)
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.tensor([1.0, 2.0, 3.0]), torch.ones(3))
        loss = csl_fast.record_loss(x**2, torch.tensor([0, 1, 1]), csl)
        tangent = fwAD.unpack_dual(loss).tangent
        csl_fast.record_loss(torch.ones(2), torch.tensor([2, 3]), csl)  # no tangent at all
    torch.testing.assert_close(csl, torch.tensor([1.0, 13.0, 1.0, 1.0]))
    torch.testing.assert_close(tangent, torch.tensor([2.0, 4.0, 6.0]))


def test_an_index_past_a_plain_buffer_names_record_loss():
    # the CPU kernel's message began "csl_fast: index[2]", naming no function
    with pytest.raises(IndexError, match=r"^csl_fast\.record_loss: index\[2\] = 5 .* csl buffer"):
        csl_fast.record_loss(torch.rand(3), torch.tensor([0, 1, 5]), torch.zeros(5))
