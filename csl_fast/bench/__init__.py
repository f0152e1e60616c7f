"""Measurement code for csl_fast's benchmarks: one implementation, three front ends.

- ``benchmarks/run.py`` runs every section and writes ``benchmarks/results/<device>-<date>``
  ``.md`` and ``.json`` (:func:`run_full`, :func:`write_report`);
- ``benchmarks/test_bench_*.py`` are pytest-benchmark suites over the same cases
  (:class:`CrossEntropyCase`, :class:`InputGradCase`, :class:`TrainingCase`);
- ``csl-fast bench`` prints a short overhead report in under a minute on a CPU
  (:func:`run_short`).

What is measured (see ``benchmarks/README.md`` for the full method):

- **cross entropy**, forward + backward: the fused op (every available compiled backend)
  against the *reference eager path* (``F.cross_entropy(reduction="none")``, ``index_add_``
  of the per-row losses into a CSL buffer, ``.mean().backward()``), ``torch.compile`` of that
  reference, plain ``F.cross_entropy`` forward + backward without any CSL, and Liger-Kernel's
  cross entropy (CUDA only, when importable). Time (median of interleaved repetitions),
  GB/s counting one read and one write of the logits, and extra peak memory.
- **input-gradient norms**: ``csl_fast.ops.input_grad_norms`` + ``index_add_`` against
  ``grad.flatten(1).pow(2).sum(1)`` + ``index_add_``.
- **training steps** of an MLP, a small CNN and a 32000-class classifier: plain
  ``F.cross_entropy`` against csl_fast tracking and against per-step host logging; and
  the **tracking cost**, the part of a step those variants differ in, timed apart from
  the model (whole-step medians cannot resolve it).
- **tracker memory** per sample.

Method: every timed candidate is checked against the reference before it is timed;
inputs rotate over several distinct buffers; candidates of one comparison are timed
round-robin (interleaved, rotating the order), so drifting machine load hits them alike;
on CUDA each sample is timed with CUDA events after a 256 MiB write that evicts the L2.

Layout (imports point down only): ``harness`` (timing, memory, units) <- ``cases`` (op-level
cases), ``training`` (workloads, steps), ``lm`` (linear cross entropy), ``env`` (machine and
versions) <- ``targets`` <- ``report`` <- ``runner`` (the full and the short run).
"""

from __future__ import annotations

from . import lm
from .cases import (
    CE_DTYPE,
    CE_SHAPES,
    EAGER_CE,
    GRAD_SHAPES,
    LIGER,
    REF,
    REF_COMPILE,
    CrossEntropyCase,
    InputGradCase,
    bench_cross_entropy,
    bench_input_grad,
    fused_name,
)
from .env import device_slug, environment
from .harness import (
    GiB,
    MiB,
    Stats,
    Timer,
    _add_ratios,
    _dt,
    _fmt_time,
    _why,
    compare,
    compiled_backend,
    compiled_backends,
    copy_bandwidth,
    extra_peak_bytes,
    n_buffers,
    sync,
)
from .report import markdown, report_stem, summary_table, write_report
from .runner import SECTIONS, run_full, run_short
from .targets import targets
from .training import (
    CSL_VARIANTS,
    LARGE_C,
    SHORT_VARIANTS,
    STEP_CSL,
    STEP_FULL,
    STEP_HOST,
    STEP_PLAIN,
    STEP_TRACKER,
    STEP_VARIANTS,
    STEP_XGRAD,
    WORKLOADS,
    TrainingCase,
    bench_tracker_memory,
    bench_tracking_cost,
    bench_training,
    make_workload,
)

# The private helpers below are re-exported for benchmarks/ and tests/test_bench.py.
__all__ = [
    "CE_DTYPE",
    "CE_SHAPES",
    "CSL_VARIANTS",
    "EAGER_CE",
    "GRAD_SHAPES",
    "LARGE_C",
    "LIGER",
    "REF",
    "REF_COMPILE",
    "SECTIONS",
    "SHORT_VARIANTS",
    "STEP_CSL",
    "STEP_FULL",
    "STEP_HOST",
    "STEP_PLAIN",
    "STEP_TRACKER",
    "STEP_VARIANTS",
    "STEP_XGRAD",
    "WORKLOADS",
    "CrossEntropyCase",
    "GiB",
    "InputGradCase",
    "MiB",
    "Stats",
    "Timer",
    "TrainingCase",
    "_add_ratios",
    "_dt",
    "_fmt_time",
    "_why",
    "bench_cross_entropy",
    "bench_input_grad",
    "bench_tracker_memory",
    "bench_tracking_cost",
    "bench_training",
    "compare",
    "compiled_backend",
    "compiled_backends",
    "copy_bandwidth",
    "device_slug",
    "environment",
    "extra_peak_bytes",
    "fused_name",
    "lm",
    "make_workload",
    "markdown",
    "n_buffers",
    "report_stem",
    "run_full",
    "run_short",
    "summary_table",
    "sync",
    "targets",
    "write_report",
]
