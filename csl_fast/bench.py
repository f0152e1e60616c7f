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
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MiB = 1 << 20
GiB = 1 << 30

#: Cross-entropy shapes (B, C) and logits dtype per device.
CE_SHAPES = {
    "cpu": [(256, 10), (256, 1000), (64, 32000)],
    "cuda": [(128, 100), (1024, 1000), (4096, 32000), (8192, 128256)],
}
CE_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
#: Input-gradient shapes and dtypes per device.
GRAD_SHAPES = {
    "cpu": [((256, 3, 32, 32), torch.float32), ((32, 3, 224, 224), torch.float32)],
    "cuda": [
        ((256, 3, 32, 32), torch.bfloat16),
        ((256, 3, 224, 224), torch.bfloat16),
        ((256, 3, 224, 224), torch.float32),
    ],
}
WORKLOADS = ("mlp", "cnn", "large_class")
LARGE_C = 32000

REF = "reference eager"
REF_COMPILE = "torch.compile(reference)"
EAGER_CE = "F.cross_entropy alone (no CSL)"
LIGER = "Liger CE (no CSL)"


def fused_name(backend: str, inplace: bool = False) -> str:
    return f"csl_fast[{backend}]" + (" in place" if inplace else "")


# ----------------------------------------------------------------------------- timing
def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclasses.dataclass
class Stats:
    """Seconds per call over the repetitions of one candidate."""

    median: float
    q1: float
    q3: float
    min: float
    reps: int
    inner: int

    @classmethod
    def of(cls, samples: list[float], inner: int) -> Stats:
        s = sorted(samples)
        q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
        return cls(statistics.median(s), q[0], q[2], s[0], len(s), inner)

    @property
    def noise(self) -> float:
        """Interquartile range over median."""
        return (self.q3 - self.q1) / self.median if self.median > 0 else float("nan")


class Timer:
    """Times ``inner`` calls of a function: wall clock on the CPU; CUDA events on a GPU,
    optionally after evicting the L2 cache (a 256 MiB write, not timed)."""

    def __init__(self, device: torch.device | str, flush_l2: bool = True):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._flush = None
        if self.cuda:
            if flush_l2:
                self._flush = torch.empty(256 * MiB, dtype=torch.int8, device=self.device)
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)

    def sample(self, fn: Callable[[], Any], inner: int = 1) -> float:
        if self.cuda:
            if self._flush is not None:
                self._flush.zero_()
            self._start.record()
            for _ in range(inner):
                fn()
            self._end.record()
            self._end.synchronize()
            return self._start.elapsed_time(self._end) / 1e3 / inner
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - t0) / inner


def compare(
    candidates: dict[str, Callable[[], Any]],
    device: torch.device | str,
    *,
    reps: int = 30,
    warmup: int = 3,
    min_sample_s: float = 2e-3,
    budget_s: float | None = None,
    flush_l2: bool = True,
    wall_clock: bool = False,
) -> tuple[dict[str, Stats], dict[str, str]]:
    """Time candidates round-robin; returns ``(stats, failures)``.

    Each repetition times every candidate once, in an order rotated by one each time, so
    slow drifts of machine load hit all candidates alike. On the CPU a sample is ``inner``
    calls (calibrated so a sample lasts at least ``min_sample_s``); on CUDA one call
    (``wall_clock=True``: wall time with a synchronisation, for whole training steps).
    A candidate that raises while warming up is dropped and reported in ``failures``.
    """
    device = torch.device(device)
    timer = Timer(device, flush_l2=flush_l2 and not wall_clock)
    failures: dict[str, str] = {}
    live: dict[str, Callable[[], Any]] = {}
    for name, fn in candidates.items():
        try:
            for _ in range(warmup):
                fn()
            sync(device)
            live[name] = fn
        except Exception as exc:
            failures[name] = _why(exc)
    if wall_clock and device.type == "cuda":

        def wrap(fn):
            def run():
                fn()
                torch.cuda.synchronize()

            return run

        live = {k: wrap(v) for k, v in live.items()}
        timer = Timer("cpu")
    inner: dict[str, int] = {}
    for name, fn in live.items():
        if timer.cuda or min_sample_s <= 0:
            inner[name] = 1
        else:
            one = min(timer.sample(fn) for _ in range(2))
            inner[name] = max(1, min(200, math.ceil(min_sample_s / max(one, 1e-7))))
    samples: dict[str, list[float]] = {k: [] for k in live}
    names = list(live)
    deadline = None if budget_s is None else time.perf_counter() + budget_s
    for r in range(reps):
        k = r % max(len(names), 1)
        for name in names[k:] + names[:k]:
            samples[name].append(timer.sample(live[name], inner[name]))
        if deadline is not None and r >= 2 and time.perf_counter() > deadline:
            break
    return {k: Stats.of(v, inner[k]) for k, v in samples.items()}, failures


def _why(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = next((line for line in text if line.strip()), "")
    return f"{type(exc).__name__}: {first[:300]}"


def n_buffers(nbytes: int, device: torch.device | str) -> int:
    """How many distinct input buffers to rotate through: enough that one cycle exceeds
    the caches (64 MiB on the CPU, 128 MiB on CUDA), at most 64 and at most ~2 GiB
    (~512 MiB on the CPU) in all, at least 2."""
    dev = torch.device(device)
    target = (128 if dev.type == "cuda" else 64) * MiB
    cap = (2 * GiB if dev.type == "cuda" else 512 * MiB) // max(nbytes, 1)
    return int(max(2, min(64, cap, math.ceil(target / max(nbytes, 1)))))


def copy_bandwidth(device: torch.device | str, nbytes: int | None = None, reps: int = 20) -> dict:
    """Device-to-device (or memory-to-memory) copy bandwidth, counting a read and a write."""
    dev = torch.device(device)
    nbytes = nbytes or (GiB if dev.type == "cuda" else 64 * MiB)
    src = torch.empty(nbytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    stats, _ = compare({"copy": lambda: dst.copy_(src)}, dev, reps=reps, flush_l2=False)
    s = stats["copy"]
    return {"bytes": nbytes, "median_s": s.median, "gbps": 2 * nbytes / s.median / 1e9}


# ----------------------------------------------------------------------------- memory
def extra_peak_bytes(fn: Callable[[], Any], device: torch.device | str) -> int | None:
    """Peak bytes allocated by PyTorch during ``fn()`` above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of the profiler's
    allocation events (``profile_memory=True``), i.e. tensors from PyTorch's CPU
    allocator; ``None`` when the profiler cannot record them.
    """
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated(dev) - base)
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    except Exception:
        return None
    if not events:
        return None
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        if e.device_type() == torch.autograd.DeviceType.CPU:
            cur += e.nbytes()
            peak = max(peak, cur)
    return int(peak)


# ----------------------------------------------------------------------- cross entropy
def _reference_forward(x, t, idx, csl):
    losses = F.cross_entropy(x, t, reduction="none")
    csl.index_add_(0, idx, losses.detach().to(csl.dtype))
    return losses.mean()


def _liger_loss():
    """Liger-Kernel's cross-entropy module, or the reason it is unavailable."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except Exception:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except Exception as exc:
            return None, f"Liger-Kernel not importable ({_why(exc)})"
    return LigerCrossEntropyLoss(), None


class CrossEntropyCase:
    """Forward + backward of cross entropy over logits ``[B, C]``, every candidate.

    ``impls[name](x, t, idx, csl)`` runs forward and backward for a leaf ``x`` (its
    gradient lands in ``x.grad``); ``has_csl[name]`` says whether it also adds the per-row
    losses into ``csl``. ``skipped[name]`` holds why a candidate is not offered here.
    """

    def __init__(
        self,
        batch: int,
        classes: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        backends: list[str] | None = None,
        compile: bool = True,
        liger: bool = True,
        buffers: int | None = None,
        num_samples: int = 100_000,
        seed: int = 0,
    ):
        import csl_fast

        self.batch, self.classes, self.dtype = batch, classes, dtype
        self.device = torch.device(device)
        self.logits_bytes = batch * classes * torch.finfo(dtype).bits // 8
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        nbuf = buffers or n_buffers(self.logits_bytes, dev)
        self.inputs = []
        for _ in range(nbuf):
            x = torch.randn(batch, classes, generator=gen, device=dev, dtype=dtype).mul_(2)
            t = torch.randint(0, classes, (batch,), generator=gen, device=dev)
            idx = torch.randperm(num_samples, generator=gen, device=dev)[:batch]
            self.inputs.append((x.requires_grad_(True), t, idx))
        self.csl = torch.zeros(num_samples, dtype=torch.float32, device=self.device)
        self.impls: dict[str, Callable] = {}
        self.has_csl: dict[str, bool] = {}
        self.skipped: dict[str, str] = {}

        avail = backends or [
            b
            for b in csl_fast.available_backends(self.device)
            if b != "reference" and not (b == "triton" and self.device.type != "cuda")
        ]
        self.in_place: set[str] = set()
        for b in avail:
            self._add(fused_name(b), _fused(b), True)
            self._add(fused_name(b, inplace=True), _fused(b, inplace=True), True)
            self.in_place.add(fused_name(b, inplace=True))
        if self.device.type == "cuda" and "triton" not in avail and backends is None:
            self.skipped[fused_name("triton")] = _status(self.device, "triton")
        if self.device.type == "cuda" and "cuda" not in avail and backends is None:
            self.skipped[fused_name("cuda")] = _status(self.device, "cuda")
        self._add(REF, _ref_eager, True)
        if compile:
            self._add_compiled()
        else:
            self.skipped[REF_COMPILE] = "not requested (--no-compile / short run)"
        self._add(EAGER_CE, _eager_ce, False)
        if self.device.type != "cuda":
            self.skipped[LIGER] = "Liger-Kernel is Triton on CUDA only"
        elif liger:
            mod, why = _liger_loss()
            if mod is None:
                self.skipped[LIGER] = why
            else:
                self._add(LIGER, _liger_impl(mod), False)
        else:
            self.skipped[LIGER] = "not requested"

    def _add(self, name, fn, has_csl):
        self.impls[name] = fn
        self.has_csl[name] = has_csl

    def _add_compiled(self):
        try:
            torch._dynamo.reset()  # a fresh cache per shape: no silent fallback to eager
            compiled = torch.compile(_reference_forward, dynamic=False, fullgraph=True)
        except Exception as exc:
            self.skipped[REF_COMPILE] = f"torch.compile failed: {_why(exc)}"
            return

        def run(x, t, idx, csl):
            loss = compiled(x, t, idx, csl)
            loss.backward()
            return loss

        self._add(REF_COMPILE, run, True)

    @property
    def bytes_moved(self) -> int:
        """One read and one write of the logits."""
        return 2 * self.logits_bytes

    def timed(self, name: str) -> Callable[[], None]:
        """One forward + backward of ``name``, on the next input buffer of the rotation."""
        impl, cyc, csl = self.impls[name], itertools.cycle(self.inputs), self.csl

        def call():
            x, t, idx = next(cyc)
            impl(x, t, idx, csl)
            x.grad = None

        return call

    def check(self, name: str) -> str | None:
        """None when ``name`` matches F.cross_entropy in float32 (loss, logits gradient and,
        when it records one, the CSL increment), else what differs."""
        x0, t, idx = self.inputs[0]
        x = x0.detach().clone().requires_grad_(True)
        csl = torch.zeros_like(self.csl)
        try:
            loss = self.impls[name](x, t, idx, csl)
            if loss is None:
                return "returned no loss"
            loss = loss.detach().float()
            grad = x.grad
        except Exception as exc:
            return f"raised {_why(exc)}"
        z = x0.detach().float().requires_grad_(True)
        rows = F.cross_entropy(z, t, reduction="none")
        rows.mean().backward()
        ref_csl = torch.zeros_like(csl).index_add_(0, idx, rows.detach())
        tol = 1e-4 if self.dtype in (torch.float32, torch.float64) else 3e-2
        errs = []
        for what, ours, exact in (
            ("loss", loss, rows.detach().mean()),
            ("grad", grad, z.grad),
            *((("csl", csl, ref_csl),) if self.has_csl[name] else ()),
        ):
            if ours is None:
                errs.append(f"{what} missing")
                continue
            err = (ours.float() - exact).abs().max().item() if exact.numel() else 0.0
            scale = max(exact.abs().max().item() if exact.numel() else 0.0, 1e-30)
            if not err <= tol * scale:
                errs.append(f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}")
        return "; ".join(errs) or None

    def peak(self, name: str) -> int | None:
        """Extra peak bytes of one forward + backward beyond the inputs and the logits
        gradient it must return (one logits-sized buffer, except in place)."""
        fn = self.timed(name)
        got = extra_peak_bytes(fn, self.device)
        if got is None or name in self.in_place:
            return got
        return got - self.logits_bytes


def _status(device, backend):
    from ._ext import backend_status

    return backend_status(device)[backend] or "unavailable"


def _fused(backend: str, inplace: bool = False):
    import csl_fast

    def run(x, t, idx, csl):
        # In place needs logits made by the graph, not the leaf: a view costs nothing.
        # Like Liger's, the gradient then overwrites the input buffer; the rotation makes
        # each buffer's values drift, which does not change the work done.
        z = x.view_as(x) if inplace else x
        loss = csl_fast.accumulate(z, t, idx, csl, backend=backend, inplace_grad=inplace)
        loss.backward()
        return loss

    return run


def _ref_eager(x, t, idx, csl):
    loss = _reference_forward(x, t, idx, csl)
    loss.backward()
    return loss


def _eager_ce(x, t, idx, csl):
    loss = F.cross_entropy(x, t)
    loss.backward()
    return loss


def _liger_impl(mod):
    def run(x, t, idx, csl):
        # Liger writes the gradient into its input during the forward, so it runs on the
        # leaf itself; the rotation makes each buffer's values drift, which does not change
        # the work done.
        loss = mod(x, t)
        loss.backward()
        return loss

    return run


def bench_cross_entropy(
    device: torch.device | str,
    shapes: list[tuple[int, int]] | None = None,
    dtype: torch.dtype | None = None,
    *,
    reps: int = 50,
    budget_s: float | None = 20.0,
    compile: bool = True,
    liger: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """One row per (shape, candidate): time, GB/s, extra peak memory, correctness."""
    dev = torch.device(device)
    shapes = shapes or CE_SHAPES[dev.type]
    dtype = dtype or CE_DTYPE[dev.type]
    rows = []
    for batch, classes in shapes:
        log(f"cross entropy {batch}x{classes} {_dt(dtype)} on {dev.type}")
        case = CrossEntropyCase(batch, classes, dtype, dev, compile=compile, liger=liger)
        checks = {}
        for name in list(case.impls):
            t0 = time.perf_counter()
            checks[name] = case.check(name)
            if name == REF_COMPILE:
                log(f"  compiled the reference in {time.perf_counter() - t0:.1f}s")
            if checks[name] is not None and checks[name].startswith("raised"):
                case.skipped[name] = checks[name]
                del case.impls[name]
        stats, failed = compare(
            {n: case.timed(n) for n in case.impls}, dev, reps=reps, budget_s=budget_s
        )
        case.skipped.update(failed)
        for name, s in stats.items():
            peak = case.peak(name)
            rows.append(
                {
                    "batch": batch,
                    "classes": classes,
                    "dtype": _dt(dtype),
                    "device": dev.type,
                    "impl": name,
                    "csl": case.has_csl[name],
                    **_stat_fields(s),
                    "gbps": case.bytes_moved / s.median / 1e9,
                    "logits_bytes": case.logits_bytes,
                    "extra_peak_bytes": peak,
                    "extra_peak_logits": None if peak is None else peak / case.logits_bytes,
                    "correct": checks[name] is None,
                    "check_error": checks[name],
                    "buffers": len(case.inputs),
                }
            )
        for name, why in case.skipped.items():
            rows.append(
                {
                    "batch": batch,
                    "classes": classes,
                    "dtype": _dt(dtype),
                    "device": dev.type,
                    "impl": name,
                    "skipped": why,
                }
            )
        del case
        _free(dev)
    _add_ratios(rows, ("batch", "classes"))
    return rows


def _stat_fields(s: Stats) -> dict:
    return {
        "median_s": s.median,
        "q1_s": s.q1,
        "q3_s": s.q3,
        "min_s": s.min,
        "noise_iqr": s.noise,
        "reps": s.reps,
        "calls_per_sample": s.inner,
    }


def _add_ratios(rows: list[dict], key: tuple[str, ...]) -> None:
    """``speedup_vs``: other candidate's median / this one's, for every timed pair."""
    groups: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if "median_s" in r:
            groups.setdefault(tuple(r[k] for k in key), {})[r["impl"]] = r["median_s"]
    for r in rows:
        if "median_s" in r:
            g = groups[tuple(r[k] for k in key)]
            r["speedup_vs"] = {n: t / r["median_s"] for n, t in g.items() if n != r["impl"]}


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _free(dev: torch.device) -> None:
    import gc

    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ input-gradient norms
class InputGradCase:
    """Per-sample squared norms of a batch gradient ``[B, ...]`` scattered into an ``[N]``
    buffer: csl_fast's kernel against ``grad.flatten(1).pow(2).sum(1)`` + ``index_add_``."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        compile: bool = False,
        num_samples: int = 100_000,
        seed: int = 0,
    ):
        from ._ext import available_backends

        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        self.inputs = []
        for _ in range(n_buffers(self.nbytes, dev)):
            g = torch.randn(shape, generator=gen, device=dev, dtype=dtype).mul_(1e-3)
            idx = torch.randperm(num_samples, generator=gen, device=dev)[: shape[0]]
            self.inputs.append((g, idx))
        self.buf = torch.zeros(num_samples, dtype=torch.float32, device=self.device)
        self.scale = float(shape[0])
        self.impls: dict[str, Callable] = {}
        self.skipped: dict[str, str] = {}
        for b in available_backends(self.device):
            if b == "reference" or (b == "triton" and self.device.type != "cuda"):
                continue
            self.impls[fused_name(b)] = _norms_fused(b, self.scale)
        self.impls[REF] = _norms_ref(self.scale)
        if compile:
            try:
                torch._dynamo.reset()
                self.impls[REF_COMPILE] = torch.compile(
                    _norms_ref(self.scale), dynamic=False, fullgraph=True
                )
            except Exception as exc:
                self.skipped[REF_COMPILE] = f"torch.compile failed: {_why(exc)}"
        else:
            self.skipped[REF_COMPILE] = "not requested"

    def timed(self, name: str) -> Callable[[], None]:
        impl, cyc, buf = self.impls[name], itertools.cycle(self.inputs), self.buf

        def call():
            g, idx = next(cyc)
            impl(g, idx, buf)

        return call

    def check(self, name: str) -> str | None:
        g, idx = self.inputs[0]
        buf = torch.zeros_like(self.buf, dtype=torch.float64)
        out = torch.zeros_like(self.buf)
        try:
            self.impls[name](g, idx, out)
        except Exception as exc:
            return f"raised {_why(exc)}"
        exact = (g.double().flatten(1) * self.scale).square().sum(1)
        buf.index_add_(0, idx, exact)
        tol = 1e-5 if self.dtype in (torch.float32, torch.float64) else 2e-2
        err = (out.double() - buf).abs().max().item()
        scale = max(buf.abs().max().item(), 1e-30)
        return None if err <= tol * scale else f"max error {err:.3g} > {tol:g} x {scale:.3g}"


def _norms_fused(backend: str, scale: float):
    from . import ops

    def run(g, idx, buf):
        buf.index_add_(0, idx, ops.input_grad_norms(g, scale, backend=backend))

    return run


def _norms_ref(scale: float):
    def run(g, idx, buf):
        buf.index_add_(0, idx, (g.flatten(1).pow(2).sum(1) * (scale * scale)).float())

    return run


def bench_input_grad(
    device: torch.device | str,
    shapes: list[tuple[tuple[int, ...], torch.dtype]] | None = None,
    *,
    reps: int = 50,
    budget_s: float | None = 10.0,
    compile: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    dev = torch.device(device)
    rows = []
    for shape, dtype in shapes or GRAD_SHAPES[dev.type]:
        log(f"input-grad norms {'x'.join(map(str, shape))} {_dt(dtype)} on {dev.type}")
        case = InputGradCase(shape, dtype, dev, compile=compile)
        checks = {n: case.check(n) for n in case.impls}
        stats, failed = compare(
            {n: case.timed(n) for n in case.impls}, dev, reps=reps, budget_s=budget_s
        )
        case.skipped.update(failed)
        key = "x".join(map(str, shape))
        for name, s in stats.items():
            rows.append(
                {
                    "shape": key,
                    "dtype": _dt(dtype),
                    "device": dev.type,
                    "impl": name,
                    **_stat_fields(s),
                    "gbps": case.nbytes / s.median / 1e9,
                    "correct": checks[name] is None,
                    "check_error": checks[name],
                }
            )
        for name, why in case.skipped.items():
            rows.append(
                {
                    "shape": key,
                    "dtype": _dt(dtype),
                    "device": dev.type,
                    "impl": name,
                    "skipped": why,
                }
            )
        del case
        _free(dev)
    _add_ratios(rows, ("shape", "dtype"))
    return rows


# ------------------------------------------------------------------------ training steps
STEP_PLAIN = "plain F.cross_entropy"
STEP_CSL = "csl_fast.accumulate (CSL only)"
STEP_TRACKER = "csl_fast CSLTracker (all dynamics)"
STEP_XGRAD = "plain + dL/dx computed (no tracking)"
STEP_FULL = "csl_fast full: CSLTracker + watch"
STEP_HOST = "host logging (AUM/Cartography style)"
STEP_VARIANTS = (STEP_PLAIN, STEP_CSL, STEP_TRACKER, STEP_XGRAD, STEP_FULL, STEP_HOST)
SHORT_VARIANTS = (STEP_PLAIN, STEP_TRACKER, STEP_FULL, STEP_HOST)


def make_workload(kind: str, device: torch.device | str, seed: int = 0):
    """``(model, input_shape, batch, classes)`` for a named workload on ``device``.

    mlp: CIFAR-sized input (3x32x32) -> 1024 -> 1024 -> 10 (4096 wide on CUDA);
    cnn: three 3x3 convolutions (32/64/128 channels, no BatchNorm so input-gradient rows
    stay per-sample) + linear, 10 classes; large_class: 512 -> 512 -> 32000 (1024 on CUDA).
    """
    cuda = torch.device(device).type == "cuda"
    torch.manual_seed(seed)
    if kind == "mlp":
        h = 4096 if cuda else 1024
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(3072, h),
            nn.ReLU(),
            nn.Linear(h, h),
            nn.ReLU(),
            nn.Linear(h, 10),
        )
        shape, batch, classes = (3, 32, 32), (1024 if cuda else 256), 10
    elif kind == "cnn":
        w = 2 if cuda else 1
        model = nn.Sequential(
            nn.Conv2d(3, 32 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32 * w, 64 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64 * w, 128 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128 * w, 10),
        )
        shape, batch, classes = (3, 32, 32), (256 if cuda else 64), 10
    elif kind == "large_class":
        f = 1024 if cuda else 512
        model = nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, LARGE_C))
        shape, batch, classes = (f,), (2048 if cuda else 128), LARGE_C
    else:
        raise ValueError(f"unknown workload {kind!r}; pick one of {WORKLOADS}")
    return model.to(device), shape, batch, classes


def _host_log(
    logits: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    log: dict[int, list[tuple[float, float, float, float]]],
) -> None:
    """What AUM / Dataset Cartography do: per-sample values computed on the device, copied
    to the host every step, recorded in a Python loop."""
    with torch.no_grad():
        z = logits.detach().float()
        z_y = z.gather(1, y[:, None])[:, 0]
        other = z.scatter(1, y[:, None], float("-inf")).amax(1)
        loss = F.cross_entropy(z, y, reduction="none")
        vals = torch.stack([loss, torch.exp(-loss), z_y - other, z.argmax(1) == y])
        vals = vals.cpu().tolist()
    for j, i in enumerate(idx.cpu().tolist()):
        log.setdefault(i, []).append((vals[0][j], vals[1][j], vals[2][j], vals[3][j]))


class TrainingCase:
    """Whole SGD steps of one workload in each tracking variant (one shared model)."""

    def __init__(
        self,
        kind: str,
        device: torch.device | str,
        *,
        num_samples: int = 50_000,
        batches: int = 4,
        seed: int = 0,
    ):
        import csl_fast

        self.kind, self.device = kind, torch.device(device)
        self.model, shape, self.batch, self.classes = make_workload(kind, self.device, seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.data = [
            (
                torch.randn(self.batch, *shape, generator=gen).to(self.device),
                torch.randint(0, self.classes, (self.batch,), generator=gen).to(self.device),
                torch.randperm(num_samples, generator=gen)[: self.batch].to(self.device),
            )
            for _ in range(batches)
        ]
        self.num_samples = num_samples
        self.csl = torch.zeros(num_samples, device=self.device)
        self.tracker = csl_fast.CSLTracker(num_samples, self.classes, device=self.device)
        self.host_log: dict[int, list[tuple[float, float, float, float]]] = {}

    def step_fn(self, variant: str, loss_only: bool = False) -> Callable[[], None]:
        """One training step in ``variant``.

        ``loss_only``: only the part the variants differ in, apart from the model: the loss
        on the model's logits of the batch (a fresh leaf each call) and its backward, the
        recording, and for the variants that need dL/dx (``STEP_XGRAD``, ``STEP_FULL``) a
        backward of a fixed gradient into a fresh leaf of the input, through
        :meth:`csl_fast.CSLTracker.watch` for ``STEP_FULL``. (What the model's own backward
        into its input costs is the same in both and is left out.)"""
        import csl_fast

        if variant not in STEP_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; pick from {STEP_VARIANTS}")
        model, opt, tracker, csl = self.model, self.opt, self.tracker, self.csl
        host_log = self.host_log
        plain_loss = variant in (STEP_PLAIN, STEP_XGRAD, STEP_HOST)
        into = csl if variant == STEP_CSL else tracker

        def loss_of(logits, y, idx):
            if plain_loss:
                return F.cross_entropy(logits, y)
            return csl_fast.accumulate(logits, y, idx, into)

        def input_leaf(x, idx):
            if variant == STEP_FULL:
                return tracker.watch(x.detach(), idx)
            if variant == STEP_XGRAD:
                return x.detach().requires_grad_(True)
            return x

        if loss_only:
            with torch.no_grad():
                data = [(x, y, idx, model(x), torch.ones_like(x)) for x, y, idx in self.data]
            cyc = itertools.cycle(data)

            def step():
                x, y, idx, logits, dx = next(cyc)
                z = logits.detach().requires_grad_(True)
                loss_of(z, y, idx).backward()
                if variant in (STEP_XGRAD, STEP_FULL):
                    input_leaf(x, idx).backward(dx)
                if variant == STEP_HOST:
                    _host_log(z, y, idx, host_log)

        else:
            cyc = itertools.cycle(self.data)

            def step():
                x, y, idx = next(cyc)
                logits = model(input_leaf(x, idx))
                loss_of(logits, y, idx).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if variant == STEP_HOST:
                    _host_log(logits, y, idx, host_log)

        return step

    def check(self) -> str | None:
        """The tracked step's loss equals F.cross_entropy on the same batch, and the
        tracker's CSL equals F.cross_entropy's per-row losses at the batch's indices."""
        import csl_fast

        x, y, idx = self.data[0]
        tracker = csl_fast.CSLTracker(self.num_samples, self.classes, device=self.device)
        with torch.no_grad():
            logits = self.model(x)
            ours = csl_fast.accumulate(logits, y, idx, tracker)
            rows = F.cross_entropy(logits, y, reduction="none")
        errs = []
        if not torch.allclose(ours, rows.mean(), rtol=1e-4, atol=1e-6):
            errs.append(f"loss {ours.item():.6g} != {rows.mean().item():.6g}")
        if not torch.allclose(tracker.csl_sum[idx], rows, rtol=1e-4, atol=1e-5):
            errs.append("tracker CSL differs from F.cross_entropy per-row losses")
        return "; ".join(errs) or None


def _step_rows(
    kind: str,
    dev: torch.device,
    variants: tuple[str, ...],
    fields: Callable[[Stats, Stats | None], dict],
    *,
    loss_only: bool,
    what: str,
    log: Callable[[str], None],
    **timing: Any,
) -> list[dict]:
    """Time ``variants`` of one workload round-robin (whole steps, or their ``loss_only``
    part) and return one row per variant: the timing plus ``fields(stats, plain)`` (and, for
    whole steps, the workload's correctness check), or ``skipped`` with the reason."""
    case = TrainingCase(kind, dev)
    log(f"{what} {kind} (B={case.batch}, C={case.classes}) on {dev.type}")
    checked = {} if loss_only else {"check_error": case.check()}
    stats, failed = compare(
        {v: case.step_fn(v, loss_only=loss_only) for v in variants},
        dev,
        wall_clock=True,
        **timing,
    )
    plain = stats.get(STEP_PLAIN)
    head = {"workload": kind, "batch": case.batch, "classes": case.classes, "device": dev.type}
    rows = [
        {**head, "variant": v, **_stat_fields(s), **fields(s, plain), **checked}
        for v, s in stats.items()
    ]
    rows += [
        {"workload": kind, "device": dev.type, "variant": v, "skipped": why}
        for v, why in failed.items()
    ]
    del case
    _free(dev)
    return rows


def bench_training(
    device: torch.device | str,
    workloads: tuple[str, ...] = WORKLOADS,
    variants: tuple[str, ...] = STEP_VARIANTS,
    *,
    reps: int = 20,
    budget_s: float | None = 30.0,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    def fields(s: Stats, plain: Stats | None) -> dict:
        return {
            "overhead_pct": None if plain is None else (s.median / plain.median - 1) * 100,
            "overhead_ms": None if plain is None else (s.median - plain.median) * 1e3,
        }

    rows = []
    for kind in workloads:
        rows += _step_rows(
            kind,
            torch.device(device),
            variants,
            fields,
            loss_only=False,
            what="training step",
            log=log,
            reps=reps,
            warmup=2,
            min_sample_s=0.0,
            budget_s=budget_s,
        )
    return rows


def bench_tracking_cost(
    device: torch.device | str,
    workloads: tuple[str, ...] = WORKLOADS,
    *,
    reps: int = 200,
    budget_s: float | None = 10.0,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """What tracking adds to a step, timed apart from the model.

    A whole step's median moves by more than a millisecond between runs on a CPU (a few
    percent of the step), so sub-millisecond differences between variants cannot be read
    off whole steps. The variants only differ from the loss on, so this times that part
    alone (:meth:`TrainingCase.step_fn` with ``loss_only``) on each workload's real
    logits, interleaved over many repetitions: ``cost`` = variant - plain."""

    def fields(s: Stats, plain: Stats | None) -> dict:
        return {"cost_s": None if plain is None else s.median - plain.median}

    rows = []
    for kind in workloads:
        rows += _step_rows(
            kind,
            torch.device(device),
            STEP_VARIANTS,
            fields,
            loss_only=True,
            what="tracking cost",
            log=log,
            reps=reps,
            warmup=5,
            budget_s=budget_s,
        )
    return rows


# ------------------------------------------------------------------------ tracker memory
def bench_tracker_memory(device: torch.device | str, num_samples: int = 100_000) -> list[dict]:
    """Bytes per sample of :class:`csl_fast.CSLTracker` configurations, and of a host-side
    Python log (dict of per-sample lists of tuples, as AUM/Cartography-style code keeps)."""
    import csl_fast

    rows = []
    for label, kw in (
        ("CSLTracker float32", {}),
        ("CSLTracker float64", {"dtype": torch.float64}),
        ("CSLTracker float32, history=True", {"history": True}),
    ):
        tr = csl_fast.CSLTracker(num_samples, 10, device=device, **kw)
        rows.append({"what": label, "bytes_per_sample": tr.nbytes() / num_samples, "grows": "no"})
        del tr
    rows.append(
        {
            "what": "CSLTracker input-gradient history",
            "bytes_per_sample": 4.0,
            "grows": "per epoch, once input gradients are recorded",
        }
    )
    rows.append(
        {
            "what": "CSLTracker history=True loss curves",
            "bytes_per_sample": 2.0,
            "grows": "per epoch (and per eval pass)",
        }
    )
    n = 20_000
    src = torch.rand(4, n, dtype=torch.float64)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    log: dict[int, list[tuple[float, float, float, float]]] = {}
    sizes = []
    for _epoch in range(2):
        vals = src.tolist()  # fresh Python floats, as .tolist() makes every step
        for i in range(n):
            log.setdefault(i, []).append((vals[0][i], vals[1][i], vals[2][i], vals[3][i]))
        del vals
        sizes.append(tracemalloc.get_traced_memory()[0] - base)
    tracemalloc.stop()
    first, second = sizes[0], sizes[1] - sizes[0]
    rows.append(
        {
            "what": "host log: dict of lists of 4-float tuples (first epoch)",
            "bytes_per_sample": first / n,
            "grows": f"+{second / n:.0f} B per sample per epoch",
        }
    )
    return rows


# --------------------------------------------------------------------------- environment
def environment(device: torch.device | str) -> dict:
    dev = torch.device(device)
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cpu_model": _cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": _loadavg(),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception as exc:
        env["triton"] = f"not importable ({_why(exc)})"
    try:
        from importlib.metadata import version

        import liger_kernel  # noqa: F401

        env["liger_kernel"] = version("liger-kernel")
    except Exception:
        env["liger_kernel"] = None
    import csl_fast

    from ._ext import EXTENSION_ERROR, backend_status

    env["csl_fast"] = csl_fast.__version__
    env["extension_error"] = EXTENSION_ERROR
    env["backends"] = backend_status(dev)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        env.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / GiB, 1),
            sm=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            driver=_nvidia_smi("driver_version"),
        )
    env.update(_git())
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _loadavg():
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except Exception:
        return None


def _git() -> dict:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*args):
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
            return out.stdout.strip() if out.returncode == 0 else None
        except Exception:
            return None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"git_commit": commit, "git_dirty": bool(dirty) if commit else None}


def device_slug(env: dict) -> str:
    if env["device"] == "cuda":
        name = env.get("gpu", "cuda")
    else:
        name = f"cpu-{env['cpu_model']}-{env['cpu_cores']}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# ------------------------------------------------------------------------------ targets
def targets(results: dict) -> list[dict]:
    """Each target of issues 2, 3 and 7 that this run's data can decide: met / missed."""
    out = []
    dev = results["env"]["device"]
    ce = [r for r in results.get("cross_entropy", []) if "median_s" in r]

    def find(rows, **kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items())]

    fused = sorted({r["impl"] for r in ce if r["impl"].startswith("csl_fast[")})
    if dev == "cpu":
        for r in find(ce, batch=256, classes=1000, impl=fused_name("cpu")):
            s = r["speedup_vs"].get(REF)
            if s is None:
                continue
            out.append(
                _target(
                    "fused CPU op >= 1.5x the reference eager path, 256x1000 fwd+bwd",
                    s,
                    s is not None and s >= 1.5,
                    f"{s:.2f}x",
                )
            )
    else:
        copy = results.get("copy_bandwidth", {}).get("gbps")
        for impl in fused:
            for r in find(ce, impl=impl):
                shape = f"{r['batch']}x{r['classes']}"
                sv = r["speedup_vs"]
                if EAGER_CE in sv:
                    big = r["classes"] >= LARGE_C
                    need = 2.0 if big else 1.0
                    out.append(
                        _target(
                            f"{impl} {shape}: >= {need:g}x eager F.cross_entropy fwd+bwd",
                            sv[EAGER_CE],
                            sv[EAGER_CE] >= need,
                            f"{sv[EAGER_CE]:.2f}x",
                        )
                    )
                for other in (REF_COMPILE, LIGER):
                    if other in sv:
                        out.append(
                            _target(
                                f"{impl} {shape}: >= {other}",
                                sv[other],
                                sv[other] >= 1.0,
                                f"{sv[other]:.2f}x",
                            )
                        )
                if r["classes"] >= LARGE_C and copy:
                    frac = r["gbps"] / copy
                    out.append(
                        _target(
                            f"{impl} {shape}: >= 80% of copy bandwidth",
                            frac,
                            frac >= 0.8,
                            f"{r['gbps']:.0f} GB/s = {frac:.0%} of {copy:.0f}",
                        )
                    )
                if r.get("extra_peak_bytes") is not None:
                    e = r["extra_peak_logits"]
                    allowed = 0 if impl.endswith(" in place") else 1
                    # Slack of 64 bytes per row: the per-row statistics and losses.
                    ok = r["extra_peak_bytes"] <= allowed * r["logits_bytes"] + 64 * r["batch"]
                    out.append(
                        _target(
                            f"{impl} {shape}: extra peak memory <= {allowed} logits buffer",
                            e,
                            ok,
                            f"{e:.2f} logits ({_fmt_bytes(r['extra_peak_bytes'])})",
                        )
                    )
    if dev == "cuda" and results.get("linear_cross_entropy"):
        from . import bench_lm  # imports this module

        for r in results["linear_cross_entropy"]:
            if r.get("impl") in (bench_lm.OURS, bench_lm.OURS_LOWMEM) and "median_s" in r:
                shape = f"{r['tokens']}x{r['hidden']}x{r['vocab']}"
                if r["impl"] == bench_lm.OURS_LOWMEM:
                    shape += " (weight-dtype accumulators)"
                peak, sp = r.get("peak_vs_eager"), r.get("speedup_vs", {}).get(bench_lm.EAGER)
                if peak is not None and sp is not None:
                    out.append(
                        _target(
                            f"linear CE {shape}: peak <= 1/4 of eager's at eager's speed or better",
                            peak,
                            peak <= 0.25 and sp >= 1.0,
                            f"peak {peak:.2f}x eager's at {sp:.2f}x eager's speed",
                        )
                    )
    steps = [r for r in results.get("training", []) if "median_s" in r]
    costs = [r for r in results.get("tracking_cost", []) if "median_s" in r]
    if dev == "cpu":
        for kind in ("mlp", "cnn"):
            plain = find(steps, workload=kind, variant=STEP_PLAIN)
            for r in find(steps, workload=kind, variant=STEP_TRACKER):
                o = r["overhead_pct"]
                shown = f"{o:+.1f}% (step medians, IQR {r['noise_iqr']:.0%})"
                # The same overhead from the part of the step that differs, timed alone:
                # far less noisy than a difference of two whole-step medians.
                cost = find(costs, workload=kind, variant=STEP_TRACKER)
                if cost and plain:
                    share = cost[0]["cost_s"] / plain[0]["median_s"] * 100
                    shown += f"; tracking cost alone {share:+.2f}% of the plain step"
                out.append(
                    _target(f"{kind}: {STEP_TRACKER} step overhead <= 1%", o, o <= 1.0, shown)
                )
            # Input-gradient norms are made of dL/dx, the model's backward into its input:
            # with `watch` a step costs that (STEP_XGRAD) plus what csl_fast adds to it.
            full = find(steps, workload=kind, variant=STEP_FULL)
            xgrad = find(steps, workload=kind, variant=STEP_XGRAD)
            cost_full = find(costs, workload=kind, variant=STEP_FULL)
            cost_xgrad = find(costs, workload=kind, variant=STEP_XGRAD)
            if full and xgrad and cost_full and cost_xgrad:
                added = cost_full[0]["cost_s"] - cost_xgrad[0]["cost_s"]
                share = added / xgrad[0]["median_s"] * 100
                out.append(
                    _target(
                        f"{kind}: {STEP_FULL}: csl_fast's cost <= 1% of the step with dL/dx",
                        share,
                        share <= 1.0,
                        f"{share:+.2f}% ({_fmt_signed(added)}); whole step "
                        f"{full[0]['overhead_pct']:+.1f}% over plain, of which computing "
                        f"dL/dx alone {xgrad[0]['overhead_pct']:+.1f}%",
                    )
                )
    for kind in WORKLOADS:
        tr = find(costs, workload=kind, variant=STEP_TRACKER)
        host = find(costs, workload=kind, variant=STEP_HOST)
        if tr and host:
            a, b = tr[0]["cost_s"], host[0]["cost_s"]
            ratio = float("inf") if a <= 0 else b / a
            out.append(
                _target(
                    f"{kind}: tracker cost >= 10x cheaper than host logging",
                    ratio,
                    a <= b / 10,
                    f"{_fmt_signed(a)} vs {_fmt_signed(b)} per step"
                    f" ({'tracker not slower than plain' if a <= 0 else f'{ratio:.1f}x'})",
                )
            )
    return out


def _target(what: str, value, met: bool, shown: str) -> dict:
    return {"target": what, "value": value, "met": bool(met), "shown": shown}


# ------------------------------------------------------------------------------ running
SECTIONS = (
    "copy_bandwidth",
    "cross_entropy",
    "training",
    "tracking_cost",
    "input_grad",
    "memory",
    "linear_cross_entropy",
)


def run_full(
    device: torch.device | str,
    *,
    reps: int = 50,
    step_reps: int = 20,
    compile: bool = True,
    liger: bool = True,
    sections: tuple[str, ...] = SECTIONS,
    budget_scale: float = 1.0,
    log: Callable[[str], None] = lambda s: None,
    on_section: Callable[[dict], None] | None = None,
) -> dict:
    """Every section on ``device``; returns the results dict :func:`write_report` takes.

    ``on_section(results)`` is called after each section (e.g. to write a partial report,
    so a run cut short by a time limit still leaves its finished sections behind)."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    results: dict[str, Any] = {"env": environment(dev), "errors": {}}
    results["env"]["settings"] = {
        "reps": reps,
        "step_reps": step_reps,
        "compile": compile,
        "budget_scale": budget_scale,
    }

    def checkpoint():
        if on_section is not None:
            results["targets"] = targets(results)
            on_section(results)

    def section(name, fn, parts=(None,)):
        """Run ``fn(part)`` for each part (e.g. each shape), appending rows, and write a
        partial report after each part."""
        if name not in sections:
            return
        t = time.perf_counter()
        for part in parts:
            try:
                got = fn(part)
                if isinstance(got, list):
                    results.setdefault(name, []).extend(got)
                else:
                    results[name] = got
            except Exception as exc:
                import traceback

                key = name if part is None else f"{name} {part}"
                results["errors"][key] = traceback.format_exc()
                log(f"section {key} failed: {_why(exc)}")
            checkpoint()
        log(f"section {name}: {time.perf_counter() - t:.1f}s")

    section("copy_bandwidth", lambda _: copy_bandwidth(dev))
    section(
        "cross_entropy",
        lambda shape: bench_cross_entropy(
            dev,
            [shape],
            reps=reps,
            budget_s=20 * budget_scale,
            compile=compile,
            liger=liger,
            log=log,
        ),
        CE_SHAPES[dev.type],
    )
    section(
        "training",
        lambda kind: bench_training(
            dev, (kind,), reps=step_reps, budget_s=40 * budget_scale, log=log
        ),
        WORKLOADS,
    )
    section(
        "tracking_cost",
        lambda kind: bench_tracking_cost(dev, (kind,), budget_s=10 * budget_scale, log=log),
        WORKLOADS,
    )
    section(
        "input_grad",
        lambda shape: bench_input_grad(dev, [shape], reps=reps, budget_s=8 * budget_scale, log=log),
        GRAD_SHAPES[dev.type],
    )
    section("memory", lambda _: bench_tracker_memory(dev))
    from . import bench_lm  # imports this module: load it only when the section runs

    section(
        "linear_cross_entropy",
        lambda shape: bench_lm.bench_linear_cross_entropy(
            dev,
            shapes=[shape],
            reps=max(3, reps // 5),
            budget_s=30 * budget_scale,
            compile=compile,
            liger=liger,
            log=log,
        ),
        bench_lm.LCE_SHAPES[dev.type],
    )
    results["env"]["loadavg_end"] = _loadavg()
    results["env"]["wall_s"] = round(time.perf_counter() - t0, 1)
    results["targets"] = targets(results)
    return results


def run_short(device: torch.device | str | None = None, quiet: bool = False) -> str:
    """A short overhead report (< 1 min on a CPU): the cross-entropy comparison without
    torch.compile, the MLP training step and its tracking cost, tracker memory. Returns
    the markdown; prints it unless ``quiet``."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    log = (lambda s: None) if quiet else (lambda s: print(f"[bench] {s}", file=sys.stderr))
    results: dict[str, Any] = {"env": environment(dev), "errors": {}}
    shapes = CE_SHAPES[dev.type]
    results["cross_entropy"] = bench_cross_entropy(
        dev, shapes, reps=15, budget_s=3.0, compile=False, liger=True, log=log
    )
    results["training"] = bench_training(
        dev, ("mlp",), SHORT_VARIANTS, reps=6, budget_s=8.0, log=log
    )
    results["tracking_cost"] = bench_tracking_cost(dev, ("mlp",), reps=60, budget_s=3.0, log=log)
    results["memory"] = bench_tracker_memory(dev)
    results["targets"] = targets(results)
    text = markdown(results, short=True)
    if not quiet:
        print(text)
    return text


# ----------------------------------------------------------------------------- reporting
def _fmt_time(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    return f"{s * 1e6:.1f} µs"


def _fmt_signed(s: float) -> str:
    return ("-" if s < 0 else "+") + _fmt_time(abs(s))


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "n/a"
    sign = "-" if b < 0 else ""
    b = abs(b)
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if b >= size:
            return f"{sign}{b / size:.1f} {unit}"
    return f"{sign}{b:.0f} B"


def markdown(results: dict, short: bool = False) -> str:
    env = results["env"]
    dev = env["device"]
    lines = []
    title = "csl_fast overhead report (short)" if short else "csl_fast benchmarks"
    what = env.get("gpu") or f"{env['cpu_model']}, {env['cpu_cores']} cores"
    lines += [
        f"# {title}: {dev} ({what})",
        "",
        f"- date {env['date']}, commit {(env.get('git_commit') or 'unknown')[:12]}"
        f"{' (dirty tree)' if env.get('git_dirty') else ''}",
        f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}"
        + (f", CUDA {env.get('cuda')}, driver {env.get('driver')}" if dev == "cuda" else "")
        + f", Liger-Kernel {env.get('liger_kernel') or 'not installed'}",
        f"- torch threads {env['torch_threads']}; load average at start {env['loadavg_start']}"
        + (f", at end {env['loadavg_end']}" if env.get("loadavg_end") else ""),
        "",
    ]
    if results.get("copy_bandwidth"):
        c = results["copy_bandwidth"]
        lines += [
            f"Copy bandwidth ({_fmt_bytes(c['bytes'])} `dst.copy_(src)`, read + write): "
            f"**{c['gbps']:.1f} GB/s**.",
            "",
        ]
    if results.get("targets"):
        lines += ["## Targets", "", "| target | measured | |", "|---|---|---|"]
        for t in results["targets"]:
            lines.append(
                f"| {t['target']} | {t['shown']} | {'met' if t['met'] else '**missed**'} |"
            )
        lines.append("")
    ce = results.get("cross_entropy")
    if ce:
        lines += [
            "## Cross entropy, forward + backward",
            "",
            "Median time per call (IQR/median in brackets); speedup = reference eager time / "
            "this time; GB/s counts one read + one write of the logits; extra peak = peak "
            "bytes allocated during the call beyond the inputs and the returned logits "
            "gradient (for 'in place', `inplace_grad=True`, beyond the inputs alone) ("
            + (
                "`torch.cuda.max_memory_allocated`"
                if dev == "cuda"
                else "PyTorch CPU allocations seen by the profiler"
            )
            + "), in logits-sized buffers. "
            "Reference eager = `F.cross_entropy(reduction='none')` + `index_add_` + "
            "`.mean().backward()`.",
            "",
        ]
        for key, rows in _group(ce, ("batch", "classes", "dtype")).items():
            b, c, dt = key
            lines += [
                f"### {b} x {c}, {dt}",
                "",
                "| impl | CSL | median (IQR/median) | min | vs reference | vs F.cross_entropy "
                "alone | GB/s | extra peak | correct |",
                "|---|---|---|---|---|---|---|---|---|",
            ]
            for r in rows:
                if "skipped" in r:
                    lines.append(f"| {r['impl']} | | skipped: {r['skipped']} | | | | | | |")
                    continue
                sv = r["speedup_vs"]
                vs_ref = "1.00x" if r["impl"] == REF else _x(sv.get(REF))
                vs_ce = "1.00x" if r["impl"] == EAGER_CE else _x(sv.get(EAGER_CE))
                ep = r["extra_peak_logits"]
                lines.append(
                    f"| {r['impl']} | {'yes' if r['csl'] else 'no'} | {_fmt_time(r['median_s'])}"
                    f" ({r['noise_iqr']:.0%}) | {_fmt_time(r['min_s'])} | {vs_ref} | {vs_ce} | "
                    f"{r['gbps']:.1f} | "
                    f"{'n/a' if ep is None else f'{ep:.2f}'} | "
                    f"{'yes' if r['correct'] else 'NO: ' + str(r['check_error'])} |"
                )
            lines.append("")
    ig = results.get("input_grad")
    if ig:
        lines += [
            "## Input-gradient norms + scatter",
            "",
            "Reference = `grad.flatten(1).pow(2).sum(1)` + `index_add_`; GB/s counts one "
            "read of the gradient.",
            "",
            "| shape | dtype | impl | time | vs reference | GB/s | correct |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in ig:
            if "skipped" in r:
                lines.append(
                    f"| {r['shape']} | {r['dtype']} | {r['impl']} | skipped: {r['skipped']} | | | |"
                )
                continue
            vs = "1.00x" if r["impl"] == REF else _x(r["speedup_vs"].get(REF))
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r['impl']} | {_fmt_time(r['median_s'])} "
                f"({r['noise_iqr']:.0%}) | {vs} | {r['gbps']:.1f} | "
                f"{'yes' if r['correct'] else 'NO: ' + str(r['check_error'])} |"
            )
        lines.append("")
    tr = results.get("training")
    if tr:
        lines += [
            "## Whole training steps (SGD, float32)",
            "",
            "Median step time (IQR/median); overhead against the plain step. "
            "Full tracking = `CSLTracker` + `accumulate` + `watch` (input-gradient norms, "
            "which needs dL/dx: the 'plain + dL/dx' row is that cost alone).",
            "",
        ]
        for kind, rows in _group(tr, ("workload",)).items():
            r0 = next((r for r in rows if "batch" in r), {})
            lines += [
                f"### {kind[0]} (B={r0.get('batch')}, C={r0.get('classes')})",
                "",
                "| variant | step | overhead | |",
                "|---|---|---|---|",
            ]
            for r in rows:
                if "skipped" in r:
                    lines.append(f"| {r['variant']} | skipped: {r['skipped']} | | |")
                    continue
                lines.append(
                    f"| {r['variant']} | {_fmt_time(r['median_s'])} ({r['noise_iqr']:.0%}) | "
                    f"{r['overhead_pct']:+.1f}% | {r['overhead_ms']:+.2f} ms |"
                )
            if r0.get("check_error"):
                lines.append(f"\ncheck failed: {r0['check_error']}")
            lines.append("")
    cost = results.get("tracking_cost")
    if cost:
        lines += [
            "## Tracking cost per step",
            "",
            "Only what the variants differ in, timed apart from the model on each "
            "workload's logits: the loss, its backward into the logits and the recording "
            "(for the two dL/dx variants also a backward of a fixed gradient into a leaf of "
            "the input, watched in the full variant), interleaved over many repetitions "
            "(whole-step medians are too noisy to resolve sub-millisecond differences). "
            "Cost = variant - plain `F.cross_entropy`; the host-logging cost over the "
            "tracker's is the '10x cheaper' target; full minus 'plain + dL/dx' is what "
            "csl_fast adds to a step that computes dL/dx.",
            "",
            "| workload | variant | loss part (IQR/median) | cost per step | per sample |",
            "|---|---|---|---|---|",
        ]
        for r in cost:
            if "skipped" in r:
                lines.append(f"| {r['workload']} | {r['variant']} | skipped: {r['skipped']} | | |")
                continue
            lines.append(
                f"| {r['workload']} (B={r['batch']}, C={r['classes']}) | {r['variant']} | "
                f"{_fmt_time(r['median_s'])} ({r['noise_iqr']:.0%}) | {_fmt_signed(r['cost_s'])} | "
                f"{_fmt_signed(r['cost_s'] / r['batch'])} |"
            )
        lines.append("")
    mem = results.get("memory")
    if mem:
        lines += [
            "## Tracker memory per sample",
            "",
            "| what | bytes per sample | grows |",
            "|---|---|---|",
        ]
        for r in mem:
            lines.append(f"| {r['what']} | {r['bytes_per_sample']:.0f} | {r['grows']} |")
        lines.append("")
    if results.get("linear_cross_entropy"):
        from . import bench_lm

        lines += [
            "## Linear cross entropy (language-model head)",
            "",
            "Forward + backward from the hidden states to the loss (gradients of the hidden "
            "states and the weight); peak = extra memory above the inputs during one call.",
            "",
            bench_lm.markdown(results["linear_cross_entropy"]),
            "",
        ]
    for name, tb in results.get("errors", {}).items():
        lines += [f"## Section {name} FAILED", "", "```", tb.strip()[-2000:], "```", ""]
    return "\n".join(lines)


def _x(v: float | None) -> str:
    return "" if v is None else f"{v:.2f}x"


def _group(rows: list[dict], key: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault(tuple(r.get(k) for k in key), []).append(r)
    return out


def summary_table(results: dict) -> str:
    """A few lines for a terminal: fused vs reference per shape, step overheads, targets."""
    lines = []
    for r in results.get("cross_entropy", []):
        if "median_s" in r and r["impl"].startswith("csl_fast["):
            sv = r["speedup_vs"]
            lines.append(
                f"CE {r['batch']:>5}x{r['classes']:<6} {r['dtype']:<8} {r['impl']:<15} "
                f"{_fmt_time(r['median_s']):>10}  vs ref {_x(sv.get(REF)):>6}  "
                f"vs F.ce {_x(sv.get(EAGER_CE)):>6}  vs compile {_x(sv.get(REF_COMPILE)) or '-':>6}"
                f"  vs liger {_x(sv.get(LIGER)) or '-':>6}  {r['gbps']:7.1f} GB/s"
            )
    for r in results.get("training", []):
        if "median_s" in r and r["variant"] != STEP_PLAIN:
            lines.append(f"step {r['workload']:<12} {r['variant']:<40} {r['overhead_pct']:+7.1f}%")
    for r in results.get("tracking_cost", []):
        if "median_s" in r and r["variant"] != STEP_PLAIN:
            lines.append(
                f"cost {r['workload']:<12} {r['variant']:<40} {_fmt_signed(r['cost_s']):>9}/step"
            )
    met = [t for t in results.get("targets", []) if t["met"]]
    missed = [t for t in results.get("targets", []) if not t["met"]]
    lines.append(f"targets: {len(met)} met, {len(missed)} missed")
    lines += [f"  MISSED {t['target']}: {t['shown']}" for t in missed]
    if results.get("errors"):
        lines.append(f"FAILED sections: {', '.join(results['errors'])}")
    return "\n".join(lines)


def write_report(results: dict, out_dir: str) -> tuple[str, str]:
    """Write ``<device-slug>-<date>.md`` and ``.json`` into ``out_dir``; return the paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = f"{device_slug(results['env'])}-{results['env']['date'][:10]}"
    md, js = os.path.join(out_dir, stem + ".md"), os.path.join(out_dir, stem + ".json")
    with open(md, "w", encoding="utf-8") as f:
        f.write(markdown(results))
    with open(js, "w", encoding="utf-8") as f:
        json.dump(_jsonable(results), f, indent=1)
    return md, js


def _jsonable(o):
    """Strict JSON: non-finite floats become strings, unknown objects their str()."""
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if o is None or isinstance(o, (bool, int, float, str)):
        return o
    return str(o)
