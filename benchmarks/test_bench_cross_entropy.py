"""Cross entropy forward + backward: the fused op per backend against the reference eager
path (F.cross_entropy + index_add_), torch.compile of it, F.cross_entropy alone and
Liger-Kernel. One benchmark group per (device, dtype, B x C)."""

from __future__ import annotations

import pytest
from bench_suite import DEVICES, median_s, run_benchmark

from csl_fast import bench

CASES = [
    (dev, b, c, bench.CE_DTYPE[dev])
    for dev in DEVICES
    for b, c in bench.CE_SHAPES[dev.split(":")[0]]
]
IMPLS = [
    *(bench.fused_name(b) for b in ("cpu", "triton", "cuda")),
    bench.REF,
    bench.REF_COMPILE,
    bench.EAGER_CE,
    bench.LIGER,
]
_cache: dict[tuple, bench.CrossEntropyCase] = {}


def _case(device, batch, classes, dtype) -> bench.CrossEntropyCase:
    key = (device, batch, classes, dtype)
    if key not in _cache:
        _cache.clear()  # one shape's buffers at a time
        _cache[key] = bench.CrossEntropyCase(batch, classes, dtype, device)
    return _cache[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("device", "batch", "classes", "dtype"),
    CASES,
    ids=[f"{d}-{b}x{c}-{bench._dt(t)}" for d, b, c, t in CASES],
)
def test_cross_entropy(benchmark, device, batch, classes, dtype, impl):
    case = _case(device, batch, classes, dtype)
    if impl not in case.impls:
        pytest.skip(case.skipped.get(impl, f"{impl} does not run on {device}"))
    err = case.check(impl)  # also compiles torch.compile's candidate
    if err is not None and impl == bench.REF_COMPILE and err.startswith("raised"):
        pytest.skip(f"torch.compile failed here: {err}")
    assert err is None, f"{impl} disagrees with F.cross_entropy: {err}"
    benchmark.group = f"cross_entropy {device} {bench._dt(dtype)} {batch}x{classes}"
    benchmark.extra_info.update(impl=impl, records_csl=case.has_csl[impl], buffers=len(case.inputs))
    run_benchmark(benchmark, case.timed(impl), device)
    med = median_s(benchmark)
    if med:
        benchmark.extra_info["gbps"] = case.bytes_moved / med / 1e9
    peak = case.peak(impl)
    benchmark.extra_info["extra_peak_logits"] = None if peak is None else peak / case.logits_bytes
