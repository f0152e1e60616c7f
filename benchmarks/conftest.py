"""Shared fixtures of the pytest-benchmark suites (``python -m pytest benchmarks``).

The suites time the same cases as ``benchmarks/run.py`` (built by ``csl_fast.bench``), one
candidate per test, grouped by op, shape, dtype and device. ``run.py`` is the reference
measurement (it interleaves candidates, which resists drifting machine load); these suites
plug csl_fast into pytest-benchmark's tooling (``--benchmark-compare``, histograms, CI).

Environment:
    CSL_BENCH_DEVICES  comma-separated devices (default: cpu, plus cuda when available)
    CSL_BENCH_ROUNDS   timed rounds per benchmark (default 30)
"""

from __future__ import annotations

import os

import pytest
import torch

DEVICES = [
    d.strip()
    for d in os.environ.get(
        "CSL_BENCH_DEVICES", "cpu,cuda" if torch.cuda.is_available() else "cpu"
    ).split(",")
    if d.strip()
]
ROUNDS = int(os.environ.get("CSL_BENCH_ROUNDS", "30"))


def synced(fn, device: str):
    """``fn`` followed by a device synchronisation, so wall-clock timing is honest on CUDA."""
    if not device.startswith("cuda"):
        return fn

    def run():
        fn()
        torch.cuda.synchronize()

    return run


def run_benchmark(benchmark, fn, device: str, rounds: int = ROUNDS, warmup: int = 3) -> None:
    benchmark.pedantic(synced(fn, device), rounds=rounds, warmup_rounds=warmup, iterations=1)


def median_s(benchmark) -> float | None:
    """The measured median in seconds (None under ``--benchmark-disable``)."""
    try:
        return float(benchmark.stats.stats.median) if benchmark.stats else None
    except AttributeError:
        return None


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
