#!/usr/bin/env python
"""Where the GPU time of ``csl_fast.accumulate`` goes: each kernel of the fused cross entropy
timed alone, beside PyTorch's, with its memory traffic; and the host side of one small call
(kernel launches and wall time per call).

``benchmarks/run.py`` times whole calls against their alternatives; this script splits them,
so that a slow call can be traced to a kernel (bandwidth) or to the host (launches, Python).
For each shape (bfloat16 unless stated), CUDA-event medians (``triton.testing.do_bench``,
L2 flushed between runs) of:

- ``copy``: ``logits.clone()``, the bandwidth ceiling (one read, one write);
- ``F.ce fwd`` / ``F.ce fwd+bwd``: PyTorch, no CSL;
- ``stats[b]``: the forward the half-precision path runs, loss + statistics, no gradient
  (``cross_entropy_fwd_stats``), one read;
- ``bwd[b]``: its backward, one elementwise pass (``cross_entropy_bwd``), one read and one
  write;
- ``fwd+grad[b]``: the float32 path's forward, which also writes the gradient (one or two
  reads, one write);
- ``accumulate[b] fwd+bwd``: the whole call into a CSL tensor, ``mean``.

GB/s counts the logits bytes each one must move at least (listed per row). Then, at a small
shape, the CUDA kernels one call launches (``torch.profiler``) and its wall time per call,
with and without a synchronisation, against ``F.cross_entropy`` + ``index_add_``.

    python benchmarks/gpu_kernels.py --out OUTDIR              # on a CUDA machine
    python benchmarks/gpu_kernels.py --out OUTDIR --dry-run    # CPU, tiny shapes: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without installing

import csl_fast  # noqa: E402
from benchmarks.run_meta import add_force, refuse_overwrite, run_meta, write_atomic  # noqa: E402  (loaded by path in tests)
from csl_fast import ops, ops_backward  # noqa: E402

SHAPES = [
    ((8192, 128256), torch.bfloat16),
    ((4096, 32000), torch.bfloat16),
    ((4096, 32000), torch.float32),
    ((1024, 1000), torch.bfloat16),
]
SMALL = (128, 100)


DEV = "cuda"


def _bench(fn) -> float:
    """Median milliseconds per call."""
    if DEV == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=40, return_mode="median")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _shape_rows(shape, dtype, backends) -> list[dict]:
    b, c = shape
    g = torch.Generator(device=DEV).manual_seed(0)
    z = (torch.randn(b, c, device=DEV, generator=g) * 3).to(dtype)
    t = torch.randint(0, c, (b,), device=DEV, generator=g)
    idx = torch.randint(0, b, (b,), device=DEV, generator=g)
    csl = torch.zeros(b, device=DEV)
    one = z.numel() * z.element_size()
    rows = []

    def add(name, ms, passes):
        rows.append(
            {
                "shape": f"{b}x{c}",
                "dtype": str(dtype).removeprefix("torch."),
                "what": name,
                "ms": ms,
                "passes": passes,
                "GB/s": passes * one / (ms * 1e-3) / 1e9,
            }
        )

    add("copy", _bench(lambda: z.clone()), 2)
    add("F.ce fwd", _bench(lambda: F.cross_entropy(z, t)), 2)
    zg = z.detach().requires_grad_(True)

    def fce():
        F.cross_entropy(zg, t).backward()
        zg.grad = None

    add("F.ce fwd+bwd", _bench(fce), 4)
    for be in backends:
        with torch.no_grad():
            add(
                f"stats[{be}]",
                _bench(lambda be=be: ops.cross_entropy_fwd(z, t, None, -100, 0.0, 1, be)),
                1,
            )
            _, stats = ops.cross_entropy_fwd(z, t, None, -100, 0.0, 1, be)
        if dtype in (torch.float16, torch.bfloat16):
            scale = torch.full((1,), 1.0 / b, device=DEV)
            add(
                f"bwd[{be}]",
                _bench(
                    lambda be=be, stats=stats, scale=scale: ops_backward.cross_entropy_bwd(
                        z, t, None, stats, scale, -100, 0.0, backend=be
                    )
                ),
                2,
            )
        else:
            add(
                f"fwd+grad[{be}]",
                _bench(lambda be=be: ops.cross_entropy_fwd_with_grad(z, t, None, -100, 0.0, 1, be)),
                2,
            )

        def acc(be=be):
            csl_fast.accumulate(zg, t, idx, csl, backend=be).backward()
            zg.grad = None

        add(f"accumulate[{be}] fwd+bwd", _bench(acc), 3)
    return rows


def _host_seconds(fn, n: int) -> float:
    """Seconds per call the host spends issuing ``fn`` (after a warm-up; no sync inside)."""
    for _ in range(20):
        fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t0) / n
    _sync()
    return host


def _host_rows(backends, n) -> tuple[list[dict], dict]:
    b, c = SMALL
    z = torch.randn(b, c, device=DEV, requires_grad=True)
    t = torch.randint(0, c, (b,), device=DEV)
    idx = torch.randint(0, 1000, (b,), device=DEV)
    csl = torch.zeros(1000, device=DEV)

    def plain():
        loss = F.cross_entropy(z, t, reduction="none")
        csl.index_add_(0, idx, loss.detach())
        loss.mean().backward()

    calls = {"F.ce + index_add_": plain}
    for be in backends:
        calls[f"accumulate[{be}]"] = lambda be=be: csl_fast.accumulate(
            z, t, idx, csl, backend=be
        ).backward()
    rows, launches = [], {}
    for name, fn in calls.items():
        host = _host_seconds(fn, n)
        walls = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n // 5):
                fn()
            _sync()
            walls.append((time.perf_counter() - t0) / (n // 5))
        activity = torch.profiler.ProfilerActivity
        with torch.profiler.profile(
            activities=[activity.CUDA if DEV == "cuda" else activity.CPU]
        ) as prof:
            fn()
            _sync()
        on_device = (
            torch.autograd.DeviceType.CUDA if DEV == "cuda" else torch.autograd.DeviceType.CPU
        )
        kernels = Counter(e.name for e in prof.events() if e.device_type == on_device)
        launches[name] = dict(kernels)
        rows.append(
            {
                "call": name,
                "host us/call (no sync)": host * 1e6,
                "wall us/call (synced)": statistics.median(walls) * 1e6,
                "GPU kernels": sum(kernels.values()),
            }
        )
    return rows, launches


def _dispatch_rows(backends, n) -> list[dict]:
    """Host cost of one small forward (loss + statistics, no grad) through each layer: the
    Python entry point, the registered op (dispatcher), and for Triton the op's body alone
    (device guard + launch, no dispatcher), beside ``F.cross_entropy``'s forward."""
    from csl_fast._triton import cross_entropy as tce

    b, c = SMALL
    z = torch.randn(b, c, device=DEV)
    t = torch.randint(0, c, (b,), device=DEV)
    args = (z, t, None, -100, 0.0, 1)
    calls = {"F.cross_entropy fwd": lambda: F.cross_entropy(z, t)}
    for be in backends:
        calls[f"ops.cross_entropy_fwd[{be}]"] = lambda be=be: ops.cross_entropy_fwd(*args, be)
        name = ops._FWD_STATS_OPS[be]
        calls[f"torch.ops.csl_fast.{name}"] = lambda name=name: getattr(
            torch.ops.csl_fast, name
        ).default(*args)
        if be == "triton":
            body = tce.cross_entropy_fwd_stats_triton._init_fn
            calls["Triton op body (no dispatcher)"] = lambda body=body: body(*args)
    with torch.no_grad():
        return [{"call": k, "host us/call": _host_seconds(f, n) * 1e6} for k, f in calls.items()]


def _table(rows: list[dict]) -> str:
    keys = list(rows[0])
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes")
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, args.out / "gpu-kernels.md", args.out / "gpu-kernels.json")
    global DEV
    shapes, backends, calls = SHAPES, ["triton", "cuda"], 300
    if args.dry_run:
        DEV, shapes, backends, calls = (
            "cpu",
            [((4, 300), torch.bfloat16), ((4, 30), torch.float32)],
            ["cpu"],
            10,
        )
    elif not torch.cuda.is_available():
        print("gpu_kernels.py needs a CUDA device (or --dry-run)", file=sys.stderr)
        return 2
    backends = [b for b in backends if b in csl_fast.available_backends(DEV)]
    rows = []
    for shape, dtype in shapes:
        rows += _shape_rows(shape, dtype, backends)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    host, launches = _host_rows(backends, calls)
    dispatch = _dispatch_rows(backends, calls)
    args.out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name() if DEV == "cuda" else "CPU dry run"
    meta = run_meta()  # (the commit and command line: the report had neither)
    head = (
        f"# Kernel split: {where}\n\n- torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}, {meta['date']} (started "
        f"{meta['started']}), commit {meta['commit']}, {meta['machine']}\n"
        f"- command: `{meta['command']}`\n"
    )
    launches_md = "\n".join(
        f"- {name}: " + ", ".join(f"{k} x{v}" for k, v in sorted(ks.items()))
        for name, ks in launches.items()
    )
    text = (
        f"{head}\n## Kernels\n\n{_table(rows)}\n\n## Host side at {SMALL[0]}x{SMALL[1]} "
        f"float32\n\n{_table(host)}\n\nKernels launched per call:\n\n{launches_md}\n\n"
        f"Host cost of one forward by layer (no sync, float32 {SMALL[0]}x{SMALL[1]}):\n\n"
        f"{_table(dispatch)}\n"
    )
    write_atomic(args.out / "gpu-kernels.md", text)
    write_atomic(
        args.out / "gpu-kernels.json",
        json.dumps(
            {"meta": meta, "kernels": rows, "host": host}
            | {"launches": launches, "dispatch": dispatch},
            indent=1,
        ),
    )
    print(_table(rows))
    print(_table(host))
    print(_table(dispatch))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
