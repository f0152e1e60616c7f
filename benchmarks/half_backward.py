"""Forward + backward of ``accumulate`` on float16/bfloat16 CPU logits, beside PyTorch, and
the half-precision backward alone: the one elementwise pass against the recompute it
replaced.

The gradient of float16/bfloat16 logits is rounded once after the upstream scale
(``ops._RoundOnceCrossEntropy``). Backward used to recompute it by running the fused
forward kernel again on float32 chunks of the saved logits; it is now one elementwise pass
over the half logits from the forward's statistics (``csl_fast::cross_entropy_bwd``). For
each shape this script times, one thread, interleaved rounds, medians:

- ``accumulate`` (into a tensor) and ``F.cross_entropy`` + ``index_add_`` (the unfused
  equivalent), forward and backward, 'mean', and their ratio;
- for float16/bfloat16, backward alone on the same saved tensors: the old recompute
  (:func:`_recompute`, kept here as it was) and the new pass, and their ratio; the same
  with the language-model extras (soft-cap 30, z-loss 1e-4: ``csl_fast.ops_extras``);
- for float16/bfloat16, forward alone: the kernel the forward ran before, which also
  formed the gradient that backward no longer uses (``cross_entropy_fwd``), against the one
  it runs now (``cross_entropy_fwd_stats``), and ``accumulate``'s whole forward on logits
  that require grad: time and extra peak memory (the profiler's CPU allocations,
  :func:`csl_fast.bench.harness.extra_peak_bytes`). ``--forward-only`` runs this part
  alone.

    python benchmarks/half_backward.py [--rounds 7] [--forward-only] [--out FILE.md]
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
from run_meta import add_force, at_least_one, refuse_overwrite, write_atomic

import csl_fast
from csl_fast import ops_backward
from csl_fast.bench.harness import extra_peak_bytes

SHAPES = ((64, 10), (256, 1000), (32, 32000))
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
IGNORE = -100


def _ours(x, t, idx, csl) -> None:
    z = x.clone().requires_grad_(True)
    csl_fast.accumulate(z, t, idx, csl, backend="cpu").backward()


def _theirs(x, t, idx, csl) -> None:
    z = x.clone().requires_grad_(True)
    loss = F.cross_entropy(z, t, reduction="none")
    csl.index_add_(0, idx, loss.detach().float())
    loss.mean().backward()


def _recompute(logits, target, scale, extras=(0.0, 0.0)) -> torch.Tensor:
    """The backward this replaced (csl_fast 32af4e0, ``ops._recompute_scaled``): the fused
    forward (with ``extras`` = (softcap, z_loss_scale): the extra one) run again on float32
    chunks of the logits (1 << 20 values), scaled, rounded."""
    out = torch.empty_like(logits)
    rows = max(1, (1 << 20) // max(logits.shape[1], 1))
    for start in range(0, logits.shape[0], rows):
        part = logits[start : start + rows].float()
        args = (part, target[start : start + rows], None, IGNORE, 0.0, 0)
        if extras != (0.0, 0.0):
            grad = torch.ops.csl_fast.cross_entropy_fwd_extra.default(*args, *extras)[1]
        else:
            grad = torch.ops.csl_fast.cross_entropy_fwd.default(*args)[1]
        out[start : start + rows] = grad.mul_(scale)
    return out


def _one_pass(logits, target, stats, scale, extras=(0.0, 0.0)) -> torch.Tensor:
    args = (logits, target, None, stats, scale, IGNORE, 0.0, *extras)
    return ops_backward.cross_entropy_bwd(*args, backend="cpu")


EXTRAS = (30.0, 1e-4)


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _medians(fns, calls: int, rounds: int) -> list[float]:
    for fn in fns:
        _time(fn, 3)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for k, fn in enumerate(fns):
            times[k].append(_time(fn, calls))
    return [statistics.median(t) for t in times]


def _forward_rows(rounds: int, g: torch.Generator) -> list[tuple]:
    """(B, C, dtype, (us, peak bytes) of the kernel with gradient, of the one without, of
    accumulate's forward) per shape and half dtype."""
    rows = []
    for b, c in SHAPES:
        for dtype in DTYPES[:2]:
            x = torch.randn(b, c, generator=g).to(dtype)
            t = torch.randint(0, c, (b,), generator=g)
            idx = torch.arange(b)
            csl = torch.zeros(b)
            z = x.clone().requires_grad_(True)
            args = (x, t, None, IGNORE, 0.0, 0)
            with_grad = functools.partial(torch.ops.csl_fast.cross_entropy_fwd.default, *args)
            stats_only = functools.partial(
                torch.ops.csl_fast.cross_entropy_fwd_stats.default, *args
            )
            forward = functools.partial(csl_fast.accumulate, z, t, idx, csl, backend="cpu")
            fns = (with_grad, stats_only, forward)
            times = _medians(fns, max(3, 20_000 // c), rounds)
            peaks = [extra_peak_bytes(fn, "cpu") for fn in fns]
            rows.append((b, c, str(dtype).removeprefix("torch."), x.nbytes, times, peaks))
    return rows


def _forward_lines(rows: list[tuple]) -> list[str]:
    lines = [
        "",
        "## forward alone, logits requiring grad: kernel with gradient (before) vs without (now)",
        "",
        "Extra peak memory in KiB (and in logits-sized buffers).",
        "",
        "| B x C | dtype | with gradient (us) | without (us) | speed-up | with gradient, peak "
        "| without, peak | accumulate forward (us) | accumulate forward, peak |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def peak(nbytes, logits_bytes):
        return "n/a" if nbytes is None else f"{nbytes / 1024:.1f} ({nbytes / logits_bytes:.2f})"

    for b, c, dt, nbytes, (old_us, new_us, fwd_us), peaks in rows:
        old_p, new_p, fwd_p = (peak(p, nbytes) for p in peaks)
        cells = (f"{old_us:.1f}", f"{new_us:.1f}", f"{old_us / new_us:.2f}x", old_p, new_p)
        lines.append(f"| {b} x {c} | {dt} | " + " | ".join(cells) + f" | {fwd_us:.1f} | {fwd_p} |")
    return lines


def _backward_lines(step_rows, bwd_rows, extra_rows) -> list[str]:
    lines = [
        "",
        "## accumulate, forward + backward ('mean')",
        "",
        "| B x C | dtype | accumulate (us) | F.cross_entropy + index_add_ (us) | ratio |",
        "|---|---|---|---|---|",
    ]
    for b, c, dt, ours_us, theirs_us in step_rows:
        lines.append(f"| {b} x {c} | {dt} | {ours_us:.1f} | {theirs_us:.1f} | "
                     f"{ours_us / theirs_us:.2f} |")  # fmt: skip
    for title, rows in (
        ("backward alone: recompute (before) vs one elementwise pass (now)", bwd_rows),
        (f"with the extras (softcap {EXTRAS[0]:g}, z_loss_scale {EXTRAS[1]:g}): backward alone",
         extra_rows),
    ):  # fmt: skip
        lines += [
            "",
            f"## {title}",
            "",
            "| B x C | dtype | recompute (us) | one pass (us) | speed-up |",
            "|---|---|---|---|---|",
        ]
        for b, c, dt, old_us, new_us in rows:
            lines.append(f"| {b} x {c} | {dt} | {old_us:.1f} | {new_us:.1f} | "
                         f"{old_us / new_us:.1f}x |")  # fmt: skip
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=at_least_one, default=7)
    parser.add_argument("--forward-only", action="store_true")
    parser.add_argument("--out", type=Path)
    add_force(parser)
    args = parser.parse_args()
    refuse_overwrite(parser, args.force, args.out)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    root = Path(csl_fast.__file__).resolve().parents[1]
    commit = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    step_rows, bwd_rows, extra_rows = [], [], []
    for b, c in () if args.forward_only else SHAPES:
        for dtype in DTYPES:
            x = torch.randn(b, c, generator=g).to(dtype)
            t = torch.randint(0, c, (b,), generator=g)
            idx = torch.arange(b)
            csl = torch.zeros(b)
            calls = max(3, 20_000 // c)
            ours = functools.partial(_ours, x, t, idx, csl)
            theirs = functools.partial(_theirs, x, t, idx, csl)
            dt = str(dtype).removeprefix("torch.")
            step_rows.append((b, c, dt, *_medians((ours, theirs), calls, args.rounds)))
            if dtype == torch.float32:
                continue
            stats = torch.ops.csl_fast.cross_entropy_fwd_stats(x, t, None, IGNORE, 0.0, 0)[1]
            scale = torch.tensor(1.0 / b)
            old = functools.partial(_recompute, x, t, scale)
            new = functools.partial(_one_pass, x, t, stats, scale)
            torch.testing.assert_close(new(), old(), rtol=0, atol=2 * torch.finfo(dtype).eps)
            bwd_rows.append((b, c, dt, *_medians((old, new), calls, args.rounds)))
            if c < 1000:
                continue
            fwd = torch.ops.csl_fast.cross_entropy_fwd_extra_stats
            stats = fwd(x, t, None, IGNORE, 0.0, 0, *EXTRAS)[1]
            old = functools.partial(_recompute, x, t, scale, EXTRAS)
            new = functools.partial(_one_pass, x, t, stats, scale, EXTRAS)
            torch.testing.assert_close(new(), old(), rtol=0, atol=2 * torch.finfo(dtype).eps)
            extra_rows.append((b, c, dt, *_medians((old, new), calls, args.rounds)))
    forward_rows = _forward_rows(args.rounds, g)
    lines = [
        f"# Half-precision cross entropy on CPU logits, commit {commit}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch {torch.__version__}, "
        f"one thread, median of {args.rounds} interleaved rounds; load average "
        f"{Path('/proc/loadavg').read_text().split()[0]} after.",
    ]
    lines += _forward_lines(forward_rows)
    if not args.forward_only:
        lines += _backward_lines(step_rows, bwd_rows, extra_rows)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        write_atomic(args.out, text)


if __name__ == "__main__":
    main()
