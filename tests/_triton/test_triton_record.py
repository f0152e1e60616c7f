"""csl_fast::record_last_triton against csl_fast.reference.record_last."""

from __future__ import annotations

import pytest
import torch

from csl_fast import reference
from csl_fast._triton import record_last_triton
from csl_fast.stats import NUM_STATS, Stat

N = 11


def _stats(batch, device, *, noncontiguous=False):
    stats = torch.rand(NUM_STATS, batch)
    stats[Stat.CORRECT] = (torch.rand(batch) > 0.5).float()
    stats[Stat.VALID] = (torch.rand(batch) > 0.2).float()
    stats[Stat.MARGIN] = torch.randn(batch)
    stats[:, stats[Stat.VALID] == 0] = 0.0  # ignored rows hold zeros, as the kernels write
    if noncontiguous:  # [6, B] view with column stride 2
        wide = torch.zeros(NUM_STATS, 2 * batch)
        wide[:, ::2] = stats
        return wide.to(device)[:, ::2]
    return stats.to(device)


def _state(dtype, device, transitions=True, sums=True):
    g = torch.Generator().manual_seed(1)
    state = [
        torch.rand(N, generator=g, dtype=dtype),
        torch.rand(N, generator=g, dtype=dtype),
        torch.rand(N, generator=g) > 0.5,
    ]
    state += (
        [
            torch.randint(0, 3, (N,), generator=g, dtype=torch.int32),
            torch.randint(-1, 4, (N,), generator=g, dtype=torch.int32),
        ]
        if transitions
        else [None, None]
    )
    state += [torch.rand(N, generator=g, dtype=dtype) if sums else None for _ in range(4)]
    state += [None, None, None]  # no vote (suggest_*): passed, the schema has no defaults
    return [None if t is None else t.to(device) for t in state]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("override", [False, True])
@pytest.mark.parametrize(("transitions", "sums"), [(True, True), (False, False), (True, False)])
def test_matches_reference_with_duplicates(tdevice, dtype, override, transitions, sums):
    for trial, noncontiguous in enumerate((False, True, False)):
        batch = 48  # ~4 presentations of each sample per batch, in batch order
        stats = _stats(batch, tdevice, noncontiguous=noncontiguous)
        index = torch.randint(0, N, (batch,), device=tdevice)
        if trial == 2:
            index = index.int()
        mp = torch.rand(batch, device=tdevice) if override else None
        ours = _state(dtype, tdevice, transitions, sums)
        want = [None if t is None else t.cpu().clone() for t in ours]
        record_last_triton(stats, index, mp, trial + 3, *ours)
        reference.record_last(
            stats.cpu(), index.cpu(), None if mp is None else mp.cpu(), trial + 3, *want
        )
        for got, exp in zip(ours, want, strict=True):
            if exp is None:
                assert got is None
            elif exp.is_floating_point():
                # Sums in batch order either way; exp() may differ in the last ulp.
                torch.testing.assert_close(got.cpu(), exp, rtol=2e-6, atol=0)
            else:
                assert torch.equal(got.cpu(), exp)


def test_an_epoch_tensor_stamps_as_the_int(tdevice):
    """epoch_now (a compiled graph's epoch, read when the kernel runs) stamps
    learned_epoch as the int epoch does; the int is then ignored."""
    stats = _stats(48, tdevice)
    index = torch.randint(0, N, (48,), device=tdevice)
    with_int, with_tensor = _state(torch.float32, tdevice), _state(torch.float32, tdevice)
    record_last_triton(stats, index, None, 7, *with_int)
    now = torch.tensor(7, device=tdevice)
    record_last_triton(stats, index, None, 0, *with_tensor, now)
    assert (with_int[4] == 7).any()
    for a, b in zip(with_tensor, with_int, strict=True):
        assert a is b is None or torch.equal(a, b)
    with pytest.raises(ValueError, match="epoch_now must be a 0-d integer tensor"):
        record_last_triton(stats, index, None, 0, *with_tensor, now.float())


def test_sums_are_added_in_batch_order(tdevice):
    """Bitwise equal to a sequential index_add_ in row order, run after run."""
    batch = 200
    index = torch.randint(0, 3, (batch,), device=tdevice)
    stats = _stats(batch, tdevice)
    stats[Stat.GRAD_NORM_SQ] = torch.randn(batch, device=tdevice).exp() * 1e3  # order matters
    results = []
    for _ in range(2):
        state = _state(torch.float32, tdevice)
        record_last_triton(stats, index, None, 0, *state)
        results.append(state[5])
    assert torch.equal(results[0], results[1])
    want = _state(torch.float32, "cpu")[5]
    for i in range(batch):  # the CPU kernel's order
        want[index[i]] += stats[Stat.GRAD_NORM_SQ, i].cpu()
    assert torch.equal(results[0].cpu(), want)


def test_empty_batch_and_out_of_range_index(tdevice):
    state = _state(torch.float32, tdevice)
    before = [None if t is None else t.clone() for t in state]
    empty = torch.zeros(0, dtype=torch.long, device=tdevice)
    record_last_triton(_stats(0, tdevice), empty, None, 1, *state)
    for a, b in zip(state, before, strict=True):
        assert a is b is None or torch.equal(a, b)
    # An index outside [0, N) is skipped (callers validate ranges), never written out of bounds.
    stats = _stats(3, tdevice)
    stats[Stat.VALID] = 1.0
    record_last_triton(stats, torch.tensor([N, -1, 2], device=tdevice), None, 1, *state)
    changed = [i for i in range(N) if state[0][i] != before[0][i]]
    assert changed == [2]


def test_tracker_uses_it_with_the_triton_backend(tdevice):
    import csl_fast

    logits = torch.randn(30, 4, device=tdevice)
    target = torch.randint(0, 4, (30,), device=tdevice)
    index = torch.randint(0, 7, (30,), device=tdevice)
    trackers = {}
    for backend in ("triton", "reference"):
        tr = csl_fast.CSLTracker(7, 4, device=tdevice, backend=backend, deterministic=True)
        for _ in range(3):
            csl_fast.accumulate(logits, target, index, tr, backend=backend)
            tr.end_epoch()
        trackers[backend] = tr
    for name, buf in trackers["reference"].buffers().items():
        got = trackers["triton"].buffers()[name]
        torch.testing.assert_close(got, buf, rtol=1e-5, atol=1e-6, msg=name)


def test_opcheck_and_compile(tdevice):
    stats = _stats(9, tdevice)
    index = torch.tensor([0, 1, 1, 2, 3, 3, 3, 4, 0], device=tdevice)
    op = torch.ops.csl_fast.record_last_triton.default
    torch.library.opcheck(
        op,
        (stats, index, None, 2, *_state(torch.float32, tdevice)),
        test_utils=("test_schema", "test_faketensor"),
    )

    def f(stats, index, *state):
        torch.ops.csl_fast.record_last_triton(stats * 1.0, index, None, 2, *state, *[None] * 3)
        return state[0].sum()

    backend = "aot_eager" if tdevice == "cpu" else "inductor"
    state = _state(torch.float32, tdevice)[:-3]  # without the vote's three Nones
    want = [t.cpu().clone() for t in state]
    got = torch.compile(f, fullgraph=True, backend=backend)(stats, index, *state)
    reference.record_last(stats.cpu(), index.cpu(), None, 2, *want)
    for a, b in zip(state, want, strict=True):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-6, atol=0)
    torch.testing.assert_close(got.cpu(), want[0].sum())


def test_mutated_arguments_have_no_default():
    """A Python kernel gets its arguments with trailing defaults dropped, even when given
    explicitly, and torch 2.11's ADInplaceOrView kernel of a custom/triton op then indexes
    past them (``increment_version(args[idx])``: IndexError). So no Triton op may give a
    mutated argument a default."""
    names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("csl_fast::")]
    names = [n.split("::")[1] for n in names if n.endswith("_triton")]
    assert "record_last_triton" in names
    for name in names:
        for arg in getattr(torch.ops.csl_fast, name).default._schema.arguments:
            mutated = arg.alias_info is not None and arg.alias_info.is_write
            assert not (mutated and arg.has_default_value()), f"{name}: {arg.name}"


def test_refuses_what_it_would_read_or_write_out_of_bounds(tdevice):
    """The kernel writes sample k of every buffer at offset k for k < N of last_loss: a
    shorter, strided or other-dtype buffer is refused before any write, by name."""
    stats, index = _stats(4, tdevice), torch.arange(4, device=tdevice)
    big = torch.zeros(2 * N, device=tdevice)

    def call(stats=stats, index=index, max_prob=None, **swap):
        state = dict(zip(_NAMES, _state(torch.float32, tdevice), strict=True))
        state.update(swap)
        before = {k: None if t is None else t.clone() for k, t in state.items()}
        try:
            record_last_triton(stats, index, max_prob, 1, *state.values())
        finally:
            for k, t in state.items():
                assert t is None or torch.equal(t, before[k]), k

    with pytest.raises(ValueError, match=r"last_max_prob must be a contiguous \[N = 11\]"):
        call(last_max_prob=big[:2])
    with pytest.raises(ValueError, match=r"margin_sum must be a contiguous \[N = 11\].*\(2,\)"):
        call(margin_sum=big[::2][:N])
    with pytest.raises(TypeError, match=r"forgetting must be torch\.int32"):
        call(forgetting=torch.zeros(N, dtype=torch.int64, device=tdevice))
    with pytest.raises(TypeError, match=r"last_correct must be torch\.bool"):
        call(last_correct=torch.zeros(N, device=tdevice))
    with pytest.raises(ValueError, match=r"\[7, B\]"):
        call(stats=stats[:3])
    with pytest.raises(ValueError, match="B = 4"):
        call(index=index[:2])
    with pytest.raises(TypeError, match="int64 or int32"):
        call(index=index.float())
    with pytest.raises(ValueError, match="max_prob"):
        call(max_prob=torch.ones(2, device=tdevice))


_NAMES = (
    "last_loss", "last_max_prob", "last_correct", "forgetting", "learned_epoch",
    "grad_norm_sum", "margin_sum", "p_true_sum", "p_true_sq_sum",
    "suggest_label", "suggest_votes", "suggest_hits",
)  # fmt: skip
