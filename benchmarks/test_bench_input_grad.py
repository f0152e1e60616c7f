"""Per-sample input-gradient norms + scatter: csl_fast's kernel per backend against
``grad.flatten(1).pow(2).sum(1)`` + ``index_add_`` (and torch.compile of it)."""

from __future__ import annotations

import pytest
from bench_suite import DEVICES, median_s, run_benchmark

from csl_fast import bench

CASES = [(dev, shape, dt) for dev in DEVICES for shape, dt in bench.GRAD_SHAPES[dev.split(":")[0]]]
IMPLS = [*(bench.fused_name(b) for b in ("cpu", "triton", "cuda")), bench.REF, bench.REF_COMPILE]
_cache: dict[tuple, bench.InputGradCase] = {}


def _case(device, shape, dtype) -> bench.InputGradCase:
    key = (device, shape, dtype)
    if key not in _cache:
        _cache.clear()
        _cache[key] = bench.InputGradCase(shape, dtype, device, compile=True)
    return _cache[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("device", "shape", "dtype"),
    CASES,
    ids=[f"{d}-{'x'.join(map(str, s))}-{bench._dt(t)}" for d, s, t in CASES],
)
def test_input_grad_norms(benchmark, device, shape, dtype, impl):
    case = _case(device, shape, dtype)
    if impl not in case.impls:
        pytest.skip(case.skipped.get(impl, f"{impl} does not run on {device}"))
    err = case.check(impl)
    if err is not None and impl == bench.REF_COMPILE and err.startswith("raised"):
        pytest.skip(f"torch.compile failed here: {err}")
    assert err is None, f"{impl} disagrees with the float64 reference: {err}"
    benchmark.group = f"input_grad_norms {device} {bench._dt(dtype)} {'x'.join(map(str, shape))}"
    benchmark.extra_info["impl"] = impl
    run_benchmark(benchmark, case.timed(impl), device)
    med = median_s(benchmark)
    if med:
        benchmark.extra_info["gbps"] = case.nbytes / med / 1e9
