"""The timing harness: interleaved repetitions, CUDA events with an L2 flush, the
input-buffer rotation, extra peak memory, and the units and row fields every section shares."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

MiB = 1 << 20


GiB = 1 << 30


#: The compiled backends a run on each device type is meant to measure, in the order
#: ``backend="auto"`` prefers them. The pure-PyTorch reference is never timed under
#: csl_fast's name: without these, csl_fast's rows are skipped with the reason.
MEASURED_BACKENDS = {"cpu": ("cpu",), "cuda": ("triton", "cuda")}


def compiled_backends(device: torch.device | str) -> dict[str, str | None]:
    """Each compiled backend of :data:`MEASURED_BACKENDS` for ``device``: None when it can
    run there, else why not (e.g. the compiled extension failed to load)."""
    from .._ext import backend_status

    dev = torch.device(device)
    status = backend_status(dev)
    return {b: status.get(b, "unknown backend") for b in MEASURED_BACKENDS.get(dev.type, ())}


def compiled_backend(device: torch.device | str) -> tuple[str | None, str | None]:
    """``(backend, None)``: the compiled backend csl_fast's rows run on ``device`` (the first
    of :data:`MEASURED_BACKENDS` that can), or ``(None, why)`` when none can."""
    status = compiled_backends(device)
    for b, why in status.items():
        if why is None:
            return b, None
    reasons = "; ".join(f"{b}: {why}" for b, why in status.items()) or "none for this device"
    return None, f"no compiled csl_fast backend ({reasons}); the reference fallback is not timed"


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
                # Wait for the flush: queued ahead of the start event, it would let the
                # host's work for the first call run under it, unseen by the events.
                torch.cuda.synchronize(self.device)
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

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        # Its Kineto backend logs profiler_start/profiler_stop lines from C++ to fd 2 (24
        # of the 33 lines csl-fast bench wrote to stderr): silenced there only, so that
        # what fn itself says (a warning, shown once per process) still reaches stderr.
        with stderr_fd_silenced():
            prof.start()
        try:
            fn()
        finally:
            with stderr_fd_silenced():
                prof.stop()
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


@contextlib.contextmanager
def stderr_fd_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block: C++ code that logs straight to
    it, past ``sys.stderr`` (torch's profiler), is silenced only there. An exception raised
    inside still propagates, after fd 2 is restored."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


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
