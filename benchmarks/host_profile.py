#!/usr/bin/env python
"""Where the host time of one small ``csl_fast.accumulate`` call goes on a GPU: the Python
functions (``cProfile``) and the torch ops (``torch.profiler``, self CPU time) of a
training step's loss, forward and backward, per backend, into a CSL tensor and into a
``CSLTracker``, beside ``F.cross_entropy`` + ``index_add_``.

``benchmarks/gpu_kernels.py`` measured the host cost per call (2026-12-04, H200: about
1.35 ms for the Triton backend, 0.59 ms for CUDA, 0.24 ms for ``F.cross_entropy`` +
``index_add_``, at 1024 x 1000); this names the functions and ops it is spent in.

    python benchmarks/host_profile.py --out OUTDIR                 # on a CUDA machine
    python benchmarks/host_profile.py --out OUTDIR --device cpu    # a smoke run
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without installing

import csl_fast  # noqa: E402
from benchmarks.run_meta import (  # noqa: E402  (loaded by path in tests)
    add_force,
    at_least_one,
    command,
    device_arg,
    refuse_overwrite,
    write_atomic,
)
from csl_fast.bench.env import environment  # noqa: E402

B, C = 1024, 1000


def _cases(device: str) -> dict:
    n = 4 * B
    z = torch.randn(B, C, device=device, dtype=torch.bfloat16 if device == "cuda" else None)
    y = torch.randint(0, C, (B,), device=device)
    idx = torch.randperm(n, device=device)[:B]
    csl = torch.zeros(n, device=device, dtype=torch.float64)
    cases = {
        "F.cross_entropy + index_add_": lambda: _plain(z, y, idx, csl),
    }
    for backend in csl_fast.available_backends(device):
        if backend == "reference":
            continue
        tracker = csl_fast.CSLTracker(n, C, device=device, backend=backend)
        cases[f"accumulate[{backend}] csl tensor"] = lambda b=backend: _fused(z, y, idx, csl, b)
        cases[f"accumulate[{backend}] tracker"] = lambda b=backend, t=tracker: _fused(
            z, y, idx, t, b
        )
    return cases


def _plain(z, y, idx, csl):
    x = z.detach().requires_grad_(True)
    loss = F.cross_entropy(x, y, reduction="none")
    csl.index_add_(0, idx, loss.detach().double())
    loss.mean().backward()


def _fused(z, y, idx, csl, backend):
    x = z.detach().requires_grad_(True)
    csl_fast.accumulate(x, y, idx, csl, backend=backend).backward()


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", type=device_arg, default="cuda")
    ap.add_argument("--calls", type=at_least_one, default=200)
    ap.add_argument("--top", type=at_least_one, default=18)
    add_force(ap)
    args = ap.parse_args()
    refuse_overwrite(ap, args.force, os.path.join(args.out, "host-profile.md"))
    os.makedirs(args.out, exist_ok=True)
    env = environment(args.device)
    machine = env.get("gpu") or env["cpu_model"]
    lines = [
        f"# Host profile of one call, {B} x {C}, {args.device} ({machine})",
        "",
        f"- date {env['date']}, commit {env.get('git_commit')}, torch {env['torch']}, triton "
        f"{env['triton']}, {env['cpu_cores']} CPU cores, load average at start "
        f"{env['loadavg_start']}",
        f"- command: `{command()}`",
        "",
    ]
    summary = ["| call | host us/call (no sync) |", "|---|---|"]
    for name, fn in _cases(args.device).items():
        for _ in range(20):  # compilation, caches, allocator
            fn()
        _sync(args.device)
        t0 = time.perf_counter()
        for _ in range(args.calls):
            fn()
        host_us = (time.perf_counter() - t0) / args.calls * 1e6
        _sync(args.device)
        summary.append(f"| {name} | {host_us:.0f} |")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(args.calls):
            fn()
        prof.disable()
        _sync(args.device)
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text)
        stats.sort_stats("tottime").print_stats(args.top)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as tp:
            for _ in range(20):
                fn()
            _sync(args.device)
        ops = tp.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
        body = text.getvalue().split("\n", 3)[-1]  # (drop pstats' header of file names)
        lines += [f"## {name}: {host_us:.0f} us per call", "", "```", body.strip(), "```", ""]
        lines += ["torch ops, 20 calls:", "", "```", ops.strip(), "```", ""]
        print(f"{name}: {host_us:.0f} us/call", flush=True)
    report = "\n".join([*lines[:5], *summary, "", *lines[5:]])
    write_atomic(os.path.join(args.out, "host-profile.md"), report + "\n")
    print("\n".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
