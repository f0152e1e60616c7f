"""Accuracy of csl_fast.accumulate_bce against float64, as a ratio to PyTorch's own error.

For every CPU-runnable backend (C++ ``cpu``, ``reference``; ``triton`` under
``TRITON_INTERPRET=1`` on smaller shapes), dtype, reduction and option set, the loss and
the logits gradient (random upstream gradient) of ``accumulate_bce`` and of
``F.binary_cross_entropy_with_logits`` in the same dtype are compared with
``F.binary_cross_entropy_with_logits`` in float64; the table gives the largest ratio
``max|ours - exact| / max|torch - exact|`` over seeds and shapes (the tests require at most
2 plus a floor scaled to the dtype, tests/tolerances.py). ``python benchmarks/bce_accuracy.py``
writes ``benchmarks/results/bce-accuracy.md``.
"""

from __future__ import annotations

import argparse
import itertools
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from run_meta import add_force, refuse_overwrite, run_meta, write_atomic
from tqdm import tqdm

import csl_fast

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
SHAPES = [(64, 10), (16, 1000), (3, 4097)]
OPTIONS = ["none", "weight [L]", "pos_weight [L]", "weight [B, 1] + pos_weight [L]"]
REDUCTIONS = ["mean", "sum", "none"]
SEEDS = range(3)


def _loss_grad(z, y, weight, pos_weight, reduction, upstream, backend=None):
    z = z.detach().clone().requires_grad_(True)
    if backend is None:
        loss = F.binary_cross_entropy_with_logits(
            z, y, weight=weight, pos_weight=pos_weight, reduction=reduction
        )
    else:
        csl = torch.zeros(z.shape[0], dtype=torch.float64)
        loss = csl_fast.accumulate_bce(
            z, y, torch.arange(z.shape[0]), csl, weight=weight, pos_weight=pos_weight,
            reduction=reduction, backend=backend,
        )  # fmt: skip
    (grad,) = torch.autograd.grad(loss, z, upstream)
    return loss.detach().double(), grad.double()


def _ratio(ours, theirs, exact) -> float:
    err_ours = (ours - exact).abs().max().item()
    err_torch = (theirs - exact).abs().max().item()
    if err_ours == 0:
        return 0.0
    return err_ours / err_torch if err_torch > 0 else float("inf")


def main() -> None:
    default_out = Path(__file__).resolve().parent / "results" / "bce-accuracy.md"
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=default_out, help="the Markdown table")
    add_force(parser)
    args = parser.parse_args()
    refuse_overwrite(parser, args.force, args.out)
    backends = [b for b in ("cpu", "reference") if b in csl_fast.available_backends("cpu")]
    if os.environ.get("TRITON_INTERPRET") == "1":
        backends.append("triton")
    worst: dict[tuple, list[float]] = {}
    grid = list(itertools.product(backends, DTYPES, REDUCTIONS, OPTIONS, SHAPES, SEEDS))
    for backend, dtype, reduction, option, (b, n), seed in tqdm(grid, desc="accuracy"):
        if backend == "triton" and b * n > 5000:
            continue  # the interpreter is slow
        torch.manual_seed(seed)
        z = (torch.randn(b, n) * 4).to(dtype)
        y = torch.rand(b, n).to(dtype)
        y[: b // 2] = (y[: b // 2] > 0.5).to(dtype)  # hard and soft targets
        wd = torch.float64 if dtype == torch.float64 else torch.float32
        weight = torch.rand(n, dtype=wd) + 0.5 if option == "weight [L]" else None
        if option.startswith("weight [B, 1]"):
            weight = torch.rand(b, 1, dtype=wd) + 0.5
        pos_weight = torch.rand(n, dtype=wd) * 3 + 0.2 if "pos_weight" in option else None
        upstream = (torch.randn(b, n) if reduction == "none" else torch.tensor(1.7)).to(dtype)
        w64, pw64 = (None if t is None else t.double() for t in (weight, pos_weight))
        exact = _loss_grad(z.double(), y.double(), w64, pw64, reduction, upstream.double())
        theirs = _loss_grad(z, y, weight, pos_weight, reduction, upstream)
        ours = _loss_grad(z, y, weight, pos_weight, reduction, upstream, backend)
        key = (backend, str(dtype).split(".")[1])
        ratios = worst.setdefault(key, [0.0, 0.0])
        for k in range(2):
            if dtype == torch.float64:  # PyTorch is the exact value: a relative difference
                value = ((ours[k] - exact[k]).abs().max() / exact[k].abs().max()).item()
            else:
                value = _ratio(ours[k], theirs[k], exact[k])
            ratios[k] = max(ratios[k], value)
    meta = run_meta()
    lines = [
        "# accumulate_bce: error against float64 relative to PyTorch's own",
        "",
        f"- date {meta['date']}, commit {meta['commit']}, machine: {meta['machine']}",
        "- command: `python benchmarks/bce_accuracy.py` (`TRITON_INTERPRET=1` adds the Triton "
        "kernels, in the interpreter, on the shapes up to 5000 entries)",
        f"- grid: reductions {REDUCTIONS}; options {OPTIONS}; shapes {SHAPES}; "
        f"seeds {list(SEEDS)}; logits N(0, 16), targets half hard, half soft; random upstream "
        "gradient",
        "",
        "Largest ratio over the grid of `max|ours - exact| / max|torch - exact|` (PyTorch: "
        "`F.binary_cross_entropy_with_logits` in the same dtype; exact: in float64); below 1 "
        "is more accurate than PyTorch. float64 rows: PyTorch's float64 is the exact value, "
        "so they give the largest relative difference `max|ours - exact| / max|exact|` "
        "instead.",
        "",
        "| backend | dtype | loss | gradient |",
        "|---|---|---|---|",
    ]
    for (backend, dtype), (loss, grad) in worst.items():
        fmt = (lambda v: f"{v:.1e} (rel.)") if dtype == "float64" else (lambda v: f"{v:.2f}")
        lines.append(f"| {backend} | {dtype} | {fmt(loss)} | {fmt(grad)} |")
    write_atomic(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
