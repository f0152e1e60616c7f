"""Forward + backward of ``accumulate`` on float16/bfloat16 CPU logits, beside PyTorch.

Since the half-precision gradient is recomputed in backward from the saved logits (rounded
once: ``ops._RoundOnceCrossEntropy``), backward runs the kernel a second time on float32
chunks. This script measures what that costs: for each shape, ``accumulate`` (into a
tensor) and ``F.cross_entropy`` + ``index_add_`` (the unfused equivalent), forward and
backward, one thread, interleaved rounds; figures are medians and the ratio ours / PyTorch.

    python benchmarks/half_backward.py [--rounds 7] [--out FILE.md]

Run it with ``PYTHONPATH=<tree>`` on two trees to compare them (the results file names
the commit it imported).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import csl_fast

SHAPES = ((64, 10), (256, 1000), (32, 32000))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _ours(x, t, idx, csl) -> None:
    z = x.clone().requires_grad_(True)
    csl_fast.accumulate(z, t, idx, csl, backend="cpu").backward()


def _theirs(x, t, idx, csl) -> None:
    z = x.clone().requires_grad_(True)
    loss = F.cross_entropy(z, t, reduction="none")
    csl.index_add_(0, idx, loss.detach().float())
    loss.mean().backward()


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    root = Path(csl_fast.__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    rows = []
    for b, c in SHAPES:
        for dtype in DTYPES:
            x = torch.randn(b, c, generator=g).to(dtype)
            t = torch.randint(0, c, (b,), generator=g)
            idx = torch.arange(b)
            csl = torch.zeros(b)

            ours = functools.partial(_ours, x, t, idx, csl)
            theirs = functools.partial(_theirs, x, t, idx, csl)

            calls = max(3, 20_000 // c)
            for fn in (ours, theirs):
                _time(fn, 3)
            a, p = [], []
            for _ in range(args.rounds):
                a.append(_time(ours, calls))
                p.append(_time(theirs, calls))
            rows.append((b, c, str(dtype).removeprefix("torch."), statistics.median(a),
                         statistics.median(p)))  # fmt: skip
    lines = [
        f"# accumulate forward + backward on CPU logits, commit {commit}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"one thread, median of {args.rounds} interleaved rounds; load average "
        f"{Path('/proc/loadavg').read_text().split()[0]} after.",
        "",
        "| B x C | dtype | accumulate (us) | F.cross_entropy + index_add_ (us) | ratio |",
        "|---|---|---|---|---|",
    ]
    for b, c, dt, ours_us, theirs_us in rows:
        lines.append(f"| {b} x {c} | {dt} | {ours_us:.1f} | {theirs_us:.1f} | "
                     f"{ours_us / theirs_us:.2f} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
