"""LM head forward + backward: csl_fast.linear_cross_entropy (chunked, records per-sequence
CSL) against eager and torch.compile of F.cross_entropy(hidden @ W.T) and Liger-Kernel's
fused linear cross entropy. One benchmark group per (device, dtype, tokens x hidden x V);
extra_info holds the extra peak memory and its ratio to the logits' size."""

from __future__ import annotations

import pytest
from bench_suite import DEVICES, run_benchmark

from csl_fast.bench import lm as bench_lm

CASES = [(dev, *shape) for dev in DEVICES for shape in bench_lm.LCE_SHAPES[dev.split(":")[0]]]
_cache: dict[tuple, bench_lm.LinearCECase] = {}


def _case(device, tokens, hidden, vocab) -> bench_lm.LinearCECase:
    key = (device, tokens, hidden, vocab)
    if key not in _cache:
        _cache.clear()  # one shape's buffers at a time
        _cache[key] = bench_lm.LinearCECase(tokens, hidden, vocab, device)
    return _cache[key]


@pytest.mark.parametrize("impl", bench_lm.IMPLS)
@pytest.mark.parametrize(
    ("device", "tokens", "hidden", "vocab"),
    CASES,
    ids=[f"{d}-{t}x{h}x{v}" for d, t, h, v in CASES],
)
def test_linear_cross_entropy(benchmark, device, tokens, hidden, vocab, impl):
    case = _case(device, tokens, hidden, vocab)
    if impl not in case.impls:
        pytest.skip(case.skipped.get(impl, f"{impl} does not run on {device}"))
    try:
        _, wrong = case.check(impl)  # also compiles torch.compile's candidate
    except Exception as exc:
        if impl == bench_lm.COMPILED:
            pytest.skip(f"torch.compile failed here: {exc}")
        raise
    assert wrong is None, f"{impl}: {wrong}"
    benchmark.group = f"linear_cross_entropy {device} {tokens}x{hidden}x{vocab}"
    benchmark.extra_info.update(
        impl=impl, records_csl=case.has_csl[impl], chunk_size=case.chunk_size
    )
    run_benchmark(benchmark, case.impls[impl], device, rounds=5, warmup=1)
    peak = case.peak(impl)
    benchmark.extra_info["extra_peak_bytes"] = peak
    benchmark.extra_info["extra_peak_logits"] = None if peak is None else peak / case.logits_bytes
