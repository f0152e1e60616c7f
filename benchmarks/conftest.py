"""Shared fixtures of the pytest-benchmark suites (``python -m pytest benchmarks``).

The suites time the same cases as ``benchmarks/run.py`` (built by ``csl_fast.bench``), one
candidate per test, grouped by op, shape, dtype and device. ``run.py`` is the reference
measurement (it interleaves candidates, which resists drifting machine load); these suites
plug csl_fast into pytest-benchmark's tooling (``--benchmark-compare``, histograms, CI).

Their helpers and settings (``CSL_BENCH_DEVICES``, ``CSL_BENCH_ROUNDS``) are in
``bench_suite.py``.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
