"""Helpers of the pytest-benchmark suites (``benchmarks/test_bench_*.py``), under a name of
their own: imported as ``conftest``, they broke when the suites were collected with tests/,
whose conftest.py took that name (ImportError: cannot import name 'median_s').

Environment:
    CSL_BENCH_DEVICES  comma-separated devices (default: cpu, plus cuda when available)
    CSL_BENCH_ROUNDS   timed rounds per benchmark (default 30)
"""

from __future__ import annotations

import os

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
