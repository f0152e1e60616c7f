"""The registered ops: opcheck, torch.compile without graph breaks, float64 gradcheck."""

import pytest
import torch
import torch.nn.functional as F

import csl_fast
from csl_fast import ops
from csl_fast.stats import NUM_STATS, Stat

pytestmark = pytest.mark.skipif(
    "cpu" not in csl_fast.available_backends("cpu"), reason="compiled extension not built"
)


@pytest.fixture
def cxx_backend(device) -> str:
    """The C++ backend for ``device`` ("cpu" or "cuda": the kernels these ops dispatch to
    there); skips when csl_fast._C was built without it."""
    if device not in csl_fast.available_backends(device):
        pytest.skip(f"no {device} C++ kernels: {csl_fast._ext.backend_status(device)[device]}")
    return device


def _inputs(batch=7, classes=11, dtype=torch.float32, device="cpu"):
    logits = torch.randn(batch, classes, dtype=dtype, device=device, requires_grad=True)
    target = torch.randint(0, classes, (batch,), device=device)
    target[2] = -100
    return logits, target


@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("weighted", [False, True])
def test_opcheck_cross_entropy(device, cxx_backend, reduction, weighted):
    logits, target = _inputs(device=device)
    weight = torch.rand(11, device=device) if weighted else None
    torch.library.opcheck(
        torch.ops.csl_fast.cross_entropy_fwd.default,
        (logits, target, weight, -100, 0.1, reduction),
    )


def test_opcheck_cross_entropy_inplace(device, cxx_backend):
    logits, target = _inputs(device=device)
    loss, grad, stats = torch.ops.csl_fast.cross_entropy_fwd(logits, target, None, -100, 0.1, 1)
    buf = logits.clone()
    loss2, stats2 = torch.ops.csl_fast.cross_entropy_fwd_inplace(buf, target, None, -100, 0.1, 1)
    assert torch.equal(buf, grad) and torch.equal(loss2, loss) and torch.equal(stats2, stats)
    torch.library.opcheck(
        torch.ops.csl_fast.cross_entropy_fwd_inplace.default,
        (logits.clone(), target, None, -100, 0.1, 1),
        test_utils=("test_schema", "test_faketensor"),
    )
    with pytest.raises(ValueError, match="needs them contiguous"):
        torch.ops.csl_fast.cross_entropy_fwd_inplace(logits.t(), target[:11], None, -100, 0.0, 1)


def test_opcheck_scatter_and_norms(device, cxx_backend):
    stats = torch.rand(NUM_STATS, 9, device=device)
    index = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 0], device=device)
    torch.library.opcheck(
        torch.ops.csl_fast.scatter_stats.default,
        (stats, index, False, torch.zeros(5, device=device), torch.zeros(5, device=device)),
    )
    grad = torch.randn(9, 3, 4, 5, device=device)
    torch.library.opcheck(torch.ops.csl_fast.input_grad_norms.default, (grad, 0.5))
    torch.testing.assert_close(
        ops.input_grad_norms(grad, 0.5), (0.5 * grad).flatten(1).square().sum(1)
    )


def test_gradcheck_float64(device, cxx_backend):
    logits, target = _inputs(batch=5, classes=4, dtype=torch.float64, device=device)
    weight = torch.rand(4, dtype=torch.float64, device=device) + 0.5
    for reduction in (0, 1, 2):

        def f(z, reduction=reduction):
            return ops.cross_entropy_fwd(z, target, weight, -100, 0.15, reduction, cxx_backend)[0]

        assert torch.autograd.gradcheck(f, (logits,))


def test_double_backward_is_refused_not_wrong(device, fused_backends):
    logits, target = _inputs(device=device)
    for backend in fused_backends:
        index, csl = torch.arange(7, device=device), torch.zeros(7, device=device)
        loss = csl_fast.accumulate(logits, target, index, csl, backend=backend)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(loss, logits, create_graph=True)


def test_compile_fullgraph_training_step():
    torch._dynamo.reset()
    model = torch.nn.Linear(6, 5)
    csl = torch.zeros(20)
    count = torch.zeros(20)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def forward(x, y, idx):
        return csl_fast.accumulate(model(x), y, idx, csl, count=count)

    x = torch.randn(8, 6)
    y = torch.randint(0, 5, (8,))
    idx = torch.tensor([0, 3, 3, 7, 9, 11, 19, 0])
    loss = forward(x, y, idx)  # fullgraph=True: fails on any graph break
    loss.backward()  # through the compiled backward graph
    grad = model.weight.grad.clone()
    model.zero_grad()
    want = F.cross_entropy(model(x), y)
    want.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grad, model.weight.grad)
    per_row = F.cross_entropy(model(x), y, reduction="none").detach()
    torch.testing.assert_close(csl, torch.zeros(20).index_add_(0, idx, per_row))
    assert count.sum() == 8 and count[3] == 2 and count[0] == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("layout", ["rows", "sequences"])
def test_compiled_with_dynamic_shapes_one_graph_serves_every_size(dtype, reduction, layout):
    """torch.compile(dynamic=True) of a step over batch sizes (rows) or sequence lengths
    (sequences [B, C, T]): one graph, as F.cross_entropy keeps. The C++ backward of float32
    and float64 read the batch size as a plain int, which specialised the graph to it: a
    recompile per size, and FailOnRecompileLimitHit at the ninth with fullgraph=True."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(5)
    c, n = 4, 16
    weight = torch.randn(3, c, generator=g, requires_grad=True)
    csl = torch.zeros(n, dtype=torch.float64)

    def step(x, y, idx):
        z = (x @ weight).to(dtype)
        if layout == "sequences":
            z = z.transpose(1, 2)
        return csl_fast.accumulate(z, y, idx, csl, reduction=reduction)

    fast = torch.compile(step, backend="aot_eager", fullgraph=True, dynamic=True)
    want_csl = torch.zeros(n, dtype=torch.float64)
    # bfloat16: csl_fast rounds the gradient once, as torch does from float32 logits
    wide = torch.float32 if dtype == torch.bfloat16 else dtype
    tol = {"rtol": 2e-2, "atol": 1e-3} if dtype == torch.bfloat16 else {}
    for size in range(5, 16):  # past the recompile limit of 8 (a size equal to
        # another dimension, 2, 3 or 4, would share its symbol)
        shape = (size,) if layout == "rows" else (2, size)
        x = torch.randn(*shape, 3, generator=g)
        y = torch.randint(0, c, shape, generator=g)
        idx = torch.arange(shape[0])
        loss = fast(x, y, idx)
        (got,) = torch.autograd.grad(loss, weight)
        z = (x @ weight).to(dtype).to(wide)
        per = F.cross_entropy(
            z.transpose(1, 2) if layout == "sequences" else z, y, reduction="none"
        )
        want = per.mean() if reduction == "mean" else per.sum()
        (want_grad,) = torch.autograd.grad(want, weight)
        torch.testing.assert_close(loss.to(wide), want, **tol)
        torch.testing.assert_close(got, want_grad, **tol)
        per = per.detach().double()
        want_csl.index_add_(0, idx, per.sum(1) if layout == "sequences" else per)
    assert counters["stats"]["unique_graphs"] == 1
    torch.testing.assert_close(csl, want_csl, **tol)


def _last_state(n, dtype=torch.float32):
    return (
        torch.rand(n, dtype=dtype),
        torch.rand(n, dtype=dtype),
        torch.rand(n) > 0.5,
        torch.randint(0, 3, (n,), dtype=torch.int32),
        torch.randint(-1, 4, (n,), dtype=torch.int32),
        *(torch.rand(n, dtype=dtype) for _ in range(4)),  # the four sums
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_override", [False, True])
def test_record_last_matches_reference(dtype, with_override):
    """The sequential C++ pass and the sort-based reference agree, duplicates included."""
    from csl_fast import reference

    for trial in range(5):
        batch, n = 64, 10  # ~6 presentations of each sample per batch
        stats = torch.rand(NUM_STATS, batch)
        stats[Stat.CORRECT] = (torch.rand(batch) > 0.5).float()
        stats[Stat.VALID] = (torch.rand(batch) > 0.2).float()
        stats[Stat.MARGIN] = torch.randn(batch)
        index = torch.randint(0, n, (batch,))
        override = torch.rand(batch) if with_override else None
        ours, want = _last_state(n, dtype), None
        want = tuple(t.clone() for t in ours)
        torch.ops.csl_fast.record_last(stats, index, override, trial, *ours)
        reference.record_last(stats, index, override, trial, *want)
        for got, exp in zip(ours, want, strict=True):
            torch.testing.assert_close(got, exp, rtol=1e-6, atol=0)
        eval_state, eval_want = _last_state(n, dtype)[:3], None
        eval_want = tuple(t.clone() for t in eval_state)
        nones = (None,) * 6
        torch.ops.csl_fast.record_last(stats, index, override, trial, *eval_state, *nones)
        reference.record_last(stats, index, override, trial, *eval_want, *nones)
        for got, exp in zip(eval_state, eval_want, strict=True):
            torch.testing.assert_close(got, exp, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
@pytest.mark.parametrize("batch", [0, 3])
def test_record_last_refuses_half_of_the_transition_pair(backend, batch):
    """forgetting without learned_epoch (or the reverse): the C++ pass refused it, the
    Triton pass and the reference (the cuda backend's) dropped both silently."""
    n = 4
    stats = torch.zeros(NUM_STATS, batch)
    stats[Stat.VALID] = 1.0
    index = torch.arange(batch)
    state = _last_state(n, torch.float32)
    before = [t.clone() for t in state]
    for forgetting, learned in ((state[3], None), (None, state[4])):
        with pytest.raises(ValueError, match="pass forgetting and learned_epoch together"):
            ops.record_last(stats, index, None, 1, *state[:3], forgetting, learned, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(state, before, strict=True))


def test_record_last_takes_its_stamp_from_an_epoch_tensor():
    """A compiled graph passes the tracker's epoch as a 0-d tensor (epoch_now): it stamps
    learned_epoch as the int does; anything but a 0-d integer CPU tensor is refused."""
    g = torch.Generator().manual_seed(3)
    stats = torch.rand(NUM_STATS, 12, generator=g)
    stats[Stat.CORRECT] = (torch.rand(12, generator=g) > 0.4).float()
    stats[Stat.VALID] = 1.0
    index = torch.randint(0, 5, (12,), generator=g)
    by_int = _last_state(5)
    by_tensor = tuple(t.clone() for t in by_int)
    op = torch.ops.csl_fast.record_last.default
    op(stats, index, None, 6, *by_int)
    op(stats, index, None, 0, *by_tensor, None, None, None, torch.tensor(6))
    assert (by_int[4] == 6).any()
    assert all(torch.equal(a, b) for a, b in zip(by_tensor, by_int, strict=True))
    for bad in (torch.tensor(6.0), torch.tensor([6]), torch.tensor(True)):
        with pytest.raises(ValueError, match="epoch_now must be a 0-d integer CPU tensor"):
            op(stats, index, None, 0, *_last_state(5), None, None, None, bad)


def test_opcheck_record_last():
    stats = torch.rand(NUM_STATS, 9)
    index = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 0])
    torch.library.opcheck(
        torch.ops.csl_fast.record_last.default, (stats, index, None, 2, *_last_state(5))
    )


def _input_grad_case(dtype, batch=64, n=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    sq = torch.rand(batch, generator=g, dtype=torch.float64).to(dtype) * 5
    sq[3], sq[7], sq[11] = float("nan"), float("inf"), 0.0
    index = torch.randint(0, n, (batch,), generator=g)  # ~6 rows per sample
    valid = torch.rand(batch, generator=g) > 0.2
    buffers = tuple(torch.rand(n, generator=g, dtype=torch.float64).to(dtype) for _ in range(5))
    return sq, index, valid, buffers


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_valid", [False, True])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_record_input_grad_matches_reference(dtype, with_valid, index_dtype):
    """Both add each sample's rows in batch order, and skipped rows (not finite, not valid)
    add nothing in one and zeros in the other: bit for bit, but for the norms, whose square
    root torch's CPU kernel does not always round correctly (std::sqrt does)."""
    from csl_fast import reference

    for seed in range(3):
        sq, index, valid, ours = _input_grad_case(dtype, seed=seed)
        index, valid = index.to(index_dtype), valid if with_valid else None
        want = tuple(t.clone() for t in ours)
        torch.ops.csl_fast.record_input_grad(sq, index, valid, *ours)
        reference.record_input_grad(sq, index, valid, *want)
        for k, (got, exp) in enumerate(zip(ours, want, strict=True)):
            if k == 1:  # norm_sum
                torch.testing.assert_close(got, exp, rtol=1e-6, atol=0)
            else:
                assert torch.equal(got, exp), k
        assert not any(t.isnan().any() for t in ours)


def test_opcheck_record_input_grad():
    sq, index, valid, buffers = _input_grad_case(torch.float32, batch=12, n=5)
    torch.library.opcheck(
        torch.ops.csl_fast.record_input_grad.default, (sq.nan_to_num(), index, valid, *buffers)
    )


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ("index", IndexError, r"index\[5\] = 10 is outside \[0, N = 10\)"),
        ("sq_dtype", TypeError, "sq_norms must be Float like the buffers, got Double"),
        ("buffer_size", ValueError, r"epoch_count must be a contiguous \[N = 10\] tensor"),
        ("valid", ValueError, r"valid must be a bool \[B = 64\] tensor"),
    ],
)
def test_record_input_grad_errors_write_nothing(change, error, match):
    sq, index, valid, buffers = _input_grad_case(torch.float32)
    if change == "index":
        index[5] = 10
    elif change == "sq_dtype":
        sq = sq.double()
    elif change == "buffer_size":
        buffers = (*buffers[:4], torch.zeros(11))
    else:
        valid = valid[:-1]
    before = [t.clone() for t in buffers]
    with pytest.raises(error, match=match):
        torch.ops.csl_fast.record_input_grad(sq, index, valid, *buffers)
    for got, exp in zip(buffers, before, strict=True):
        assert torch.equal(got, exp)


@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
def test_int32_targets_with_an_ignore_index_beyond_int32(backend):
    """No int32 target equals an ignore_index outside int32, so every row counts, as with
    the same targets in int64; compared in int32, 2**32 + 2 wrapped onto class 2 (Triton's
    mean counted padding rows, the reference's statistics dropped class-2 rows)."""
    from csl_fast import ops_extras

    ignore = 2**32 + 2
    logits = torch.randn(4, 5, requires_grad=True)
    target = torch.tensor([2, 2, 1, 0], dtype=torch.int32)

    def both(fn):
        return [fn(target), fn(target.long())]

    def fwd(t):
        loss, stats = ops.cross_entropy_fwd(logits, t, None, ignore, 0.1, 1, backend)
        return loss, stats, torch.autograd.grad(loss, logits)[0]

    def with_grad(t):
        with torch.no_grad():
            return ops.cross_entropy_fwd_with_grad(logits, t, None, ignore, 0.1, 1, backend)

    def extra(t):
        loss, stats, z_loss = ops_extras.cross_entropy_fwd_extra(
            logits, t, None, ignore, 0.1, 1, 3.0, 1e-2, backend
        )
        return loss, stats, z_loss, torch.autograd.grad(loss, logits)[0]

    calls = [fwd, with_grad, extra]
    if backend != "reference":  # the reference has no in-place form

        def inplace(t):
            z = logits.detach().clone().requires_grad_(True) * 1  # not a leaf
            loss, stats = ops.cross_entropy_fwd_inplace(z, t, None, ignore, 0.1, 1, backend)
            return loss, stats, z.detach().clone()

        calls.append(inplace)
    for fn in calls:
        got, want = both(fn)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, msg=fn.__name__)
    assert both(fwd)[0][1][Stat.VALID].tolist() == [1.0] * 4


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("op", ["scatter_stats", "bce_record"])
def test_an_index_that_is_also_the_count_is_read_before_the_writes(device, op, deterministic):
    """The C++ kernels check every index, then add into the buffers. An index tensor passed
    as the count as well changed under those adds: [3, 3, 3, 3] counted into itself read
    index 6 at row 3, a write 2 entries past the count. The kernel now reads a copy (the
    Python entry points refuse such a call; the ops are the last line). The CUDA glue
    read the index in place too (audit helper-113)."""
    if device == "cpu" and not deterministic:
        pytest.skip("the CPU kernels add in row order either way")
    big = torch.full((12,), 100, dtype=torch.long, device=device)
    shared = big[4:8]
    shared.fill_(3)
    csl = torch.zeros(4, device=device)
    if op == "scatter_stats":
        stats = torch.ones(NUM_STATS, 4, device=device)
        torch.ops.csl_fast.scatter_stats(stats, shared, deterministic, csl, shared)
    else:
        logits, target = torch.randn(4, 5, device=device), torch.ones(4, 5, device=device)
        stats = csl_fast.reference.bce_row_statistics(logits, target)
        torch.ops.csl_fast.bce_record(logits, target, stats, shared, deterministic, csl,
                                      shared, None, None, None, None, None)  # fmt: skip
    # four presentations of sample 3 counted there; nothing outside the four entries
    assert big.tolist() == [100] * 4 + [3, 3, 3, 7] + [100] * 4


def test_reference_scatter_is_reproducible_when_deterministic(device):
    """The reference's scatter_stats ignored deterministic=True and used index_add_, which
    adds with atomics on CUDA (bit-for-bit different sums of duplicate indices from run to
    run); it sorts there now (audit helper-113). Trivially true on the CPU."""
    from csl_fast import reference

    gen = torch.Generator().manual_seed(0)
    stats = (torch.rand(NUM_STATS, 50_000, generator=gen) * 1e3).to(device)
    index = torch.randint(0, 7, (50_000,), generator=gen).to(device)
    sums = []
    for _ in range(3):
        csl, count = torch.zeros(7, device=device), torch.zeros(7, device=device)
        reference.scatter_stats(stats, index, True, csl, count)
        sums.append(csl.cpu())
    assert all(torch.equal(sums[0], s) for s in sums[1:])
    want = torch.zeros(7, dtype=torch.float64).index_add_(0, index.cpu(), stats[0].cpu().double())
    torch.testing.assert_close(sums[0].double(), want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_runner_up_is_the_first_of_tied_maxima_across_blocks(backend, dtype):
    """OTHER_ARGMAX is torch.argmax's first index among the classes but y, whatever block
    of the row (64 classes each in the C++ search) holds it, on either side of y, on the
    plain and the soft-capped rows."""
    from csl_fast import ops_extras, reference

    c, spots = 200, [0, 1, 62, 63, 64, 65, 127, 128, 129, 190, 199]
    rows, targets = [], []
    for first in spots:
        for second in (None, *[s for s in spots if s > first][:3]):
            for y in {0, first, 100, c - 1}:
                z = torch.linspace(-3, 2, c)[torch.randperm(c)]
                z[first] = 5.0
                if second is not None:
                    z[second] = 5.0
                rows.append(z)
                targets.append(y)
    logits = torch.stack(rows).to(dtype)
    target = torch.tensor(targets)
    masked = logits.float().scatter(1, target[:, None], float("-inf"))
    want = masked.argmax(1).float()
    _, stats = ops.cross_entropy_fwd(logits, target, None, -100, 0.0, 0, backend)
    torch.testing.assert_close(stats[Stat.OTHER_ARGMAX], want, rtol=0, atol=0)
    ref = reference.row_statistics(logits, target, -100)
    torch.testing.assert_close(ref[Stat.OTHER_ARGMAX], want, rtol=0, atol=0)
    _, stats, _ = ops_extras.cross_entropy_fwd_extra(
        logits, target, None, -100, 0.0, 0, 50.0, 0.0, backend
    )
    capped = reference.row_statistics(logits, target, -100, softcap=50.0)
    torch.testing.assert_close(stats[Stat.OTHER_ARGMAX], capped[Stat.OTHER_ARGMAX], rtol=0, atol=0)


@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
def test_a_masked_row_does_not_make_the_margin_infinite(backend):
    """The label holding a row's only finite logit (a masked class set) gives loss 0 and
    margin +inf: that once made the sample's margin sum, AUM and every later margin +inf
    for good, and evaluate refused the score. The margin is capped at MARGIN_CAP."""
    from csl_fast.stats import MARGIN_CAP

    masked = torch.tensor([[2.0, float("-inf"), float("-inf")], [0.5, 1.0, 0.0]])
    free = torch.tensor([[2.0, 1.0, 0.0], [0.5, 1.0, 0.0]])
    target, index = torch.tensor([0, 1]), torch.arange(2)
    tracker = csl_fast.CSLTracker(2, 3, backend=backend)
    for logits in (masked, free):
        loss = csl_fast.accumulate(logits, target, index, tracker, reduction="none")
        torch.testing.assert_close(loss, F.cross_entropy(logits, target, reduction="none"))
        tracker.end_epoch()
    torch.testing.assert_close(tracker.margin_sum, torch.tensor([MARGIN_CAP + 1.0, 1.0]))
    aum = csl_fast.scores(tracker)["aum"]
    assert torch.isfinite(aum).all()
    assert 0.0 < csl_fast.evaluate.auroc(aum, torch.tensor([False, True])) <= 1.0


def test_int32_indices_into_more_than_2_31_rows_are_not_skipped():
    """The reference path's in-range mask compared an int32 index with N = 2**31 + 16 cast
    to int32 (a negative number): every row was skipped, so backend='reference' with
    validate=False (and the GPU reference paths) silently dropped them."""
    index = torch.tensor([0, 5, 2**31 - 1, -1], dtype=torch.int32)
    idx, ok = ops._skip_out_of_range(index, 2**31 + 16)
    assert ok.tolist() == [True, True, True, False]
    assert idx.tolist() == [0, 5, 2**31 - 1, 0] and idx.dtype == torch.int32
    _, ok = ops._skip_out_of_range(index, 5)  # a bound that fits int32: both ends checked
    assert ok.tolist() == [True, False, False, False]
