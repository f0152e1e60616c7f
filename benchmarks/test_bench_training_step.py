"""Whole SGD training steps (MLP, small CNN, 32000-class classifier): plain
F.cross_entropy against csl_fast tracking and per-step host logging; and the part of a
step the variants differ in (loss, backward into the logits, recording), timed apart from
the model. Compare the medians within a group; ``benchmarks/run.py`` reports the
overheads in percent and the tracking cost per step."""

from __future__ import annotations

import os

import pytest
from bench_suite import DEVICES, run_benchmark

from csl_fast import bench

ROUNDS = int(os.environ.get("CSL_BENCH_STEP_ROUNDS", "15"))
_cache: dict[tuple, bench.TrainingCase] = {}


def _case(device, workload) -> bench.TrainingCase:
    key = (device, workload)
    if key not in _cache:
        _cache.clear()
        _cache[key] = bench.TrainingCase(workload, device)
    return _cache[key]


@pytest.mark.parametrize("variant", bench.STEP_VARIANTS)
@pytest.mark.parametrize("workload", bench.WORKLOADS)
@pytest.mark.parametrize("device", DEVICES)
def test_training_step(benchmark, device, workload, variant):
    case = _case(device, workload)
    err = case.check()
    assert err is None, err
    benchmark.group = f"training_step {device} {workload} B={case.batch} C={case.classes}"
    benchmark.extra_info["variant"] = variant
    run_benchmark(benchmark, case.step_fn(variant), device, rounds=ROUNDS, warmup=2)


@pytest.mark.parametrize("variant", bench.STEP_VARIANTS)
@pytest.mark.parametrize("workload", bench.WORKLOADS)
@pytest.mark.parametrize("device", DEVICES)
def test_tracking_cost(benchmark, device, workload, variant):
    case = _case(device, workload)
    benchmark.group = f"tracking_cost {device} {workload} B={case.batch} C={case.classes}"
    benchmark.extra_info["variant"] = variant
    recorded = (case.csl.sum().item(), case.tracker.csl_sum.sum().item())
    run_benchmark(
        benchmark, case.step_fn(variant, loss_only=True), device, rounds=5 * ROUNDS, warmup=5
    )
    # what was timed is the variant's recording, not a step that skipped it: the CSL of
    # the buffer (or tracker) it records into grew, and the plain variants' did not
    now = (case.csl.sum().item(), case.tracker.csl_sum.sum().item())
    into = {bench.STEP_CSL: 0}.get(variant, 1) if variant in bench.CSL_VARIANTS else None
    for where in (0, 1):
        assert (now[where] > recorded[where]) == (where == into), (variant, where)


@pytest.mark.parametrize("device", DEVICES)
def test_tracker_memory(device):
    """Not timed: the tracker's documented footprint (README: 90 bytes per sample in
    float32), exactly: a change either way must update the README."""
    rows = bench.bench_tracker_memory(device, num_samples=10_000)
    by = {r["what"]: r["bytes_per_sample"] for r in rows}
    assert by["CSLTracker float32"] == 90, by
