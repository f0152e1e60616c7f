"""csl_fast::scatter_stats_triton against csl_fast.reference.scatter_stats."""

from __future__ import annotations

import pytest
import torch

from csl_fast import reference
from csl_fast._triton import scatter_stats_triton
from csl_fast.stats import NUM_STATS, Stat

N = 13


def _stats(batch, device, *, noncontiguous=False):
    stats = torch.zeros(NUM_STATS, batch)
    stats[Stat.LOSS] = torch.rand(batch) * 5
    stats[Stat.VALID] = (torch.rand(batch) > 0.2).float()
    stats[Stat.LOSS] *= stats[Stat.VALID]
    if noncontiguous:  # [6, B] view with column stride 2
        wide = torch.zeros(NUM_STATS, 2 * batch)
        wide[:, ::2] = stats
        return wide.to(device)[:, ::2]
    return stats.to(device)


def _run(stats, index, deterministic, csl_dtype, count_dtype):
    device = stats.device
    csl0 = torch.rand(N, dtype=csl_dtype, device=device) if csl_dtype else None
    count0 = torch.randint(0, 3, (N,), device=device).to(count_dtype) if count_dtype else None
    csl, count = (None if t is None else t.clone() for t in (csl0, count0))
    scatter_stats_triton(stats, index, deterministic, csl, count)
    # Reference on CPU: index_add_ in row order, the order the deterministic mode uses.
    ref_csl, ref_count = (None if t is None else t.cpu().clone() for t in (csl0, count0))
    reference.scatter_stats(stats.cpu(), index.cpu(), deterministic, ref_csl, ref_count)
    return csl, count, ref_csl, ref_count


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize(
    ("csl_dtype", "count_dtype"),
    [
        (torch.float32, torch.int64),
        (torch.float64, torch.int32),
        (torch.float32, torch.float32),
        (None, torch.float64),
    ],
)
def test_matches_reference_with_duplicates(tdevice, deterministic, csl_dtype, count_dtype):
    batch = 40
    index = torch.randint(0, 5, (batch,), device=tdevice)  # many duplicates
    index[-3:] = N - 1
    for noncontiguous in (False, True):
        stats = _stats(batch, tdevice, noncontiguous=noncontiguous)
        csl, count, ref_csl, ref_count = _run(stats, index, deterministic, csl_dtype, count_dtype)
        if csl_dtype is not None:
            assert csl.dtype == csl_dtype
            if deterministic:  # same additions in the same order: bitwise equal
                assert torch.equal(csl.cpu(), ref_csl)
            else:
                torch.testing.assert_close(csl.cpu(), ref_csl, rtol=1e-6, atol=1e-6)
        assert count.dtype == count_dtype
        assert torch.equal(count.cpu(), ref_count)


def test_deterministic_is_bitwise_repeatable(tdevice):
    batch = 300
    index = torch.randint(0, 4, (batch,), device=tdevice).int()
    stats = _stats(batch, tdevice)
    stats[Stat.LOSS] = torch.randn(batch, device=tdevice).exp() * 1e3  # wide range: order matters
    results = []
    for _ in range(2):
        csl = torch.zeros(N, device=tdevice)
        count = torch.zeros(N, dtype=torch.int64, device=tdevice)
        scatter_stats_triton(stats, index, True, csl, count)
        results.append((csl, count))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    ref = torch.zeros(N)
    reference.scatter_stats(stats.cpu(), index.cpu(), True, ref, None)
    assert torch.equal(results[0][0].cpu(), ref)


@pytest.mark.parametrize("deterministic", [False, True])
def test_empty_and_none(tdevice, deterministic):
    csl = torch.ones(N, device=tdevice)
    count = torch.ones(N, dtype=torch.int64, device=tdevice)
    # An empty batch changes nothing.
    scatter_stats_triton(
        _stats(0, tdevice),
        torch.zeros(0, dtype=torch.long, device=tdevice),
        deterministic,
        csl,
        count,
    )
    assert (csl == 1).all() and (count == 1).all()
    # Neither buffer: nothing to write, and no error.
    scatter_stats_triton(
        _stats(3, tdevice), torch.arange(3, device=tdevice), deterministic, None, None
    )
    # count only: the counts at the batch's indices grow by VALID; csl is not passed.
    stats = _stats(3, tdevice)
    stats[Stat.VALID] = torch.tensor([1.0, 0.0, 1.0], device=tdevice)
    scatter_stats_triton(stats, torch.tensor([4, 4, 0], device=tdevice), deterministic, None, count)
    want = torch.ones(N, dtype=torch.int64)
    want[4], want[0] = 2, 2
    assert torch.equal(count.cpu(), want)
    # csl only: the losses are added; count is not passed and keeps its values.
    scatter_stats_triton(stats, torch.tensor([1, 1, 2], device=tdevice), deterministic, csl, None)
    want_csl = torch.ones(N)
    want_csl[1] += stats[Stat.LOSS, 0].cpu() + stats[Stat.LOSS, 1].cpu()
    want_csl[2] += stats[Stat.LOSS, 2].cpu()
    torch.testing.assert_close(csl.cpu(), want_csl)
    assert torch.equal(count.cpu(), want)


def test_opcheck_and_compile(tdevice):
    stats = _stats(8, tdevice)
    index = torch.randint(0, N, (8,), device=tdevice)
    csl = torch.zeros(N, device=tdevice)
    count = torch.zeros(N, device=tdevice)
    op = torch.ops.csl_fast.scatter_stats_triton.default
    torch.library.opcheck(
        op, (stats, index, True, csl, count), test_utils=("test_schema", "test_faketensor")
    )

    def f(stats, index, csl, count):
        torch.ops.csl_fast.scatter_stats_triton(stats * 1.0, index, True, csl, count)
        return csl.sum()

    backend = "aot_eager" if tdevice == "cpu" else "inductor"
    csl.zero_(), count.zero_()
    got = torch.compile(f, fullgraph=True, backend=backend)(stats, index, csl, count)
    ref = torch.zeros(N)
    reference.scatter_stats(stats.cpu(), index.cpu(), True, ref, None)
    assert torch.equal(csl.cpu(), ref)
    torch.testing.assert_close(got.cpu(), ref.sum())


def _bad_calls(device):
    """(what is wrong, stats, index, csl, count, expected error) of calls the kernels would
    have read past a tensor's end for, or written where no sample's entry is."""
    stats, index = _stats(4, device), torch.arange(4, device=device)
    csl = torch.zeros(N, device=device)
    wide = torch.zeros(NUM_STATS + 3, 4, device=device)
    wide[NUM_STATS:] = 1000.0  # read as VALID by a kernel given the first 3 rows
    return [
        ("stats rows", wide[:3], index, csl, csl.clone(), (ValueError, r"\[7, B\]")),
        ("stats columns", stats[:, :2], index, csl, None, (ValueError, "B = 2")),
        ("stats dtype", stats.double(), index, csl, None, (ValueError, "float32")),
        ("index 2-D", stats, index.view(2, 2), csl, None, (ValueError, "1-D")),
        ("index float", stats, index.float(), csl, None, (TypeError, "int64 or int32")),
        ("index bool", stats, index.bool(), csl, None, (TypeError, "int64 or int32")),
        ("csl float16", stats, index, csl.half(), None, (TypeError, "float32 or")),
        ("csl 2-D", stats, index, torch.zeros(N, 2, device=device), None, (ValueError, "1-D")),
        (
            "csl expanded",
            stats,
            index,
            torch.zeros(1, device=device).expand(N),
            None,
            (ValueError, "expanded"),
        ),
        (
            "count size",
            stats,
            index,
            csl,
            torch.zeros(3, device=device),
            (ValueError, "count has 3 entries"),
        ),
        (
            "count bool",
            stats,
            index,
            None,
            torch.zeros(N, dtype=torch.bool, device=device),
            (TypeError, "count must"),
        ),
    ]


@pytest.mark.parametrize("deterministic", [False, True])
def test_refuses_what_it_would_read_or_write_out_of_bounds(tdevice, deterministic):
    """Each refused before any write, naming the argument (as the C++ op's checks)."""
    for what, stats, index, csl, count, (exc, match) in _bad_calls(tdevice):
        before = [None if t is None else t.clone() for t in (csl, count)]
        with pytest.raises(exc, match=match):
            scatter_stats_triton(stats, index, deterministic, csl, count)
        for t, b in zip((csl, count), before, strict=True):
            assert t is None or torch.equal(t, b), what
