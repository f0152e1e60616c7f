#!/usr/bin/env python
"""Time the Triton cross-entropy kernel over launch configurations, on a GPU.

    python benchmarks/triton_sweep.py --out DIR [--budget-s 90] [--max-configs 6]

``csl_fast._triton.cross_entropy._config`` picks, from the class count alone, whether a row
stays on chip (fused) or takes two passes, the rows per program, the block width and the
warps. Those choices were made without a GPU at hand; this sweep measures the alternatives
at the benchmark shapes (bfloat16 logits, B x C = 128x100, 1024x1000, 4096x32000,
8192x128256) so the heuristic can follow data. Each configuration is checked against the
default one before it is timed; configurations are timed round-robin with the L2 evicted
before each sample (:func:`csl_fast.bench.compare`). Writes ``triton-sweep.md`` and
``.json`` into DIR and prints the table. Every candidate is a separate Triton compilation
(about a second each), so ``--max-configs`` keeps the default and an evenly spread subset
of the rest, and ``--shapes`` picks shapes: ``benchmarks/gpu_check.sh`` runs a small sweep
in a fixed budget.

``--device cpu`` runs a tiny smoke version under ``TRITON_INTERPRET=1`` (what the tests do).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.run_meta import add_force, refuse_overwrite, write_atomic  # noqa: E402  (loaded by path in tests)

#: (B, C) per device; bfloat16 on a GPU, float32 in the interpreter.
SHAPES = {
    "cuda": [(128, 100), (1024, 1000), (4096, 32000), (8192, 128256)],
    "cpu": [(5, 10), (3, 40)],
}


def configs(num_classes: int, device: str) -> list[tuple[bool, int, int, int]]:
    """Candidate ``(fused, rows, block, num_warps)``; the default (``_config``) first."""
    from csl_fast._triton import cross_entropy as ce

    default = ce._config(num_classes)
    pow2 = ce._next_pow2(num_classes)
    out = [default]
    if device == "cpu":
        # The interpreter ignores warps: two layouts are enough to exercise the code.
        return [*out, (False, 1, max(1, pow2 // 4), 4)]
    if pow2 <= 4 * ce.MAX_FUSED_BLOCK:
        for rows in (1, 2, 4, 8, 16):
            for warps in (2, 4, 8, 16, 32):
                per_thread = rows * pow2 // (32 * warps)
                if rows * pow2 <= 32768 and 4 <= per_thread <= 64:
                    out.append((True, rows, pow2, warps))
    if pow2 >= 1024:
        for block in (1024, 2048, 4096, 8192):
            for warps in (4, 8, 16):
                if block < pow2 and 4 <= block // (32 * warps) <= 32:
                    out.append((False, 1, block, warps))
    seen: set = set()
    return [c for c in out if not (c in seen or seen.add(c))]


def launch(logits, target, cfg, grad):
    """The op's own launch (mean reduction, no weights) with configuration ``cfg``:
    ``(grad, loss, stats)``."""
    from csl_fast._triton import cross_entropy as ce

    loss, stats = ce._launch(logits, target, None, -100, 0.0, 1, grad, config=cfg)
    return grad, loss, stats


def spread(cands: list, max_configs: int | None) -> list:
    """The default (first) and at most ``max_configs - 1`` others, evenly spaced over the
    rest (so small and large tiles and warp counts both stay in)."""
    if max_configs is None or len(cands) <= max_configs:
        return cands
    rest = cands[1:]
    k = max(0, max_configs - 1)
    picks = sorted({round(i * (len(rest) - 1) / max(k - 1, 1)) for i in range(k)}) if k else []
    return [cands[0], *(rest[i] for i in picks)]


def sweep_shape(
    batch: int, num_classes: int, device: str, budget_s: float, max_configs: int | None = None
) -> list[dict]:
    import torch

    from csl_fast import bench

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dev = torch.device(device)
    nbytes = batch * num_classes * dtype.itemsize
    nbuf = bench.n_buffers(nbytes, dev) if device == "cuda" else 1
    gen = torch.Generator(device="cpu").manual_seed(0)
    inputs = [
        (
            (torch.randn(batch, num_classes, generator=gen) * 3).to(dev, dtype),
            torch.randint(0, num_classes, (batch,), generator=gen).to(dev),
        )
        for _ in range(nbuf)
    ]

    def new_grad():
        return torch.empty(batch, num_classes, dtype=dtype, device=dev)

    def run_once(cfg, k=0):
        return launch(*inputs[k], cfg, new_grad())

    cands = spread(configs(num_classes, device), max_configs)
    want = run_once(cands[0])
    rows, fns = [], {}
    for cfg in cands:
        name = "fused={} rows={} block={} warps={}".format(*cfg)
        row = {"shape": f"{batch}x{num_classes}", "dtype": str(dtype)[6:], "config": name}
        row.update(fused=cfg[0], rows=cfg[1], block=cfg[2], num_warps=cfg[3])
        row["default"] = cfg == cands[0]
        try:
            got = run_once(cfg)
            for g, w, what in zip(got, want, ("grad", "loss", "stats"), strict=True):
                torch.testing.assert_close(
                    g, w, rtol=1e-2, atol=1e-5, msg=lambda m, what=what: f"{what}: {m}"
                )
        except Exception as exc:  # a configuration that fails to compile or to match
            row["skipped"] = bench._why(exc)
            rows.append(row)
            continue
        grad = new_grad()
        state = {"k": 0}

        def fn(cfg=cfg, grad=grad, state=state):
            state["k"] = (state["k"] + 1) % nbuf
            launch(*inputs[state["k"]], cfg, grad)

        fns[name] = fn
        rows.append(row)
    stats, failed = bench.compare(fns, dev, reps=30, warmup=2, budget_s=budget_s)
    for row in rows:
        s = stats.get(row["config"])
        if s is not None:
            row.update(median_s=s.median, noise_iqr=s.noise, gbps=2 * nbytes / s.median / 1e9)
        elif row["config"] in failed:
            row["skipped"] = failed[row["config"]]
    base = next((r for r in rows if r["default"] and "median_s" in r), None)
    for row in rows:
        if base and "median_s" in row:
            row["vs_default"] = base["median_s"] / row["median_s"]
    return rows


def markdown(results: dict[str, Any]) -> str:
    from csl_fast import bench

    env = results["env"]
    dirty = " (dirty tree)" if env.get("git_dirty") else ""
    lines = [
        f"# Triton cross-entropy launch configurations: {env.get('gpu') or env['device']}",
        "",
        f"- date {env['date']}, commit {str(env.get('git_commit'))[:12]}{dirty}",
        f"- torch {env['torch']}, triton {env.get('triton')}",
        "",
        "The op's forward (it also writes the gradient and statistics), mean reduction; "
        "GB/s counts one read and one write of the logits. 'vs default' > 1: faster than "
        "what `_config` picks now.",
        "",
        "| shape | dtype | config | median (IQR/median) | GB/s | vs default |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        mark = " (default)" if r["default"] else ""
        if "median_s" not in r:
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r['config']}{mark} | "
                f"skipped: {r.get('skipped')} | | |"
            )
            continue
        lines.append(
            f"| {r['shape']} | {r['dtype']} | {r['config']}{mark} | "
            f"{bench._fmt_time(r['median_s'])} ({r['noise_iqr']:.0%}) | {r['gbps']:.0f} | "
            f"{r.get('vs_default', float('nan')):.2f}x |"
        )
    best = {}
    for r in results["rows"]:
        if "median_s" in r and (
            r["shape"] not in best or r["median_s"] < best[r["shape"]]["median_s"]
        ):
            best[r["shape"]] = r
    lines += ["", "Best per shape:", ""]
    lines += [
        f"- {s}: {r['config']} ({r.get('vs_default', 1):.2f}x the default)" for s, r in best.items()
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, or cpu for an interpreted smoke run")
    p.add_argument("--out", required=True, help="folder for triton-sweep.md and .json")
    p.add_argument("--budget-s", type=float, default=90.0, help="time for the whole sweep")
    p.add_argument(
        "--max-configs", type=int, default=None, help="candidates per shape (default: all)"
    )
    p.add_argument(
        "--shapes",
        default=None,
        help="comma-separated BxC shapes (default: the benchmark shapes of the device)",
    )
    add_force(p)
    args = p.parse_args(argv)
    refuse_overwrite(
        p,
        args.force,
        os.path.join(args.out, "triton-sweep.md"),
        os.path.join(args.out, "triton-sweep.json"),
    )
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"

    from csl_fast import bench

    t0 = time.perf_counter()
    shapes = SHAPES[args.device]
    if args.shapes:
        shapes = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    results: dict[str, Any] = {"env": bench.environment(args.device), "rows": []}
    os.makedirs(args.out, exist_ok=True)
    for i, (b, c) in enumerate(shapes):
        left = args.budget_s - (time.perf_counter() - t0)
        if left <= 0:
            print(f"[sweep] out of time before {b}x{c}", file=sys.stderr)
            break
        print(f"[sweep] {b}x{c}", file=sys.stderr, flush=True)
        share = left / (len(shapes) - i) / 2  # half for compiling and checking, half timing
        results["rows"] += sweep_shape(b, c, args.device, share, args.max_configs)
        text, data = markdown(results), json.dumps(results, indent=1, default=str)
        write_atomic(os.path.join(args.out, "triton-sweep.md"), text)
        write_atomic(os.path.join(args.out, "triton-sweep.json"), data)
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
