"""What the language-model extras (soft-capping, z-loss; issue 15 item 6) cost on the CPU:
per-call time with them off, to compare one tree with another (run this script with
``PYTHONPATH`` at each checkout in turn, alternating), and with them on, as a ratio to off.

    PYTHONPATH=. python benchmarks/extras_overhead.py --label after --rounds 5

Times are the minimum over many short repetitions (one thread), the estimate least moved
by other load on a shared machine. Prints one JSON line per round.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from run_meta import at_least_one

import csl_fast

SHAPES = [(64, 10), (256, 1000), (64, 32000)]


def _best_us(fn, calls: int, reps: int = 40) -> float:
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return round(best, 2)


def measure(extras: bool) -> dict[str, float]:
    torch.manual_seed(0)
    op = torch.ops.csl_fast.cross_entropy_fwd.default
    out = {}
    for b, c in SHAPES:
        z = torch.randn(b, c)
        t = torch.randint(0, c, (b,))
        i, csl = torch.arange(b), torch.zeros(b)
        calls = max(5, int(3e5 // (b * c)))
        out[f"op {b}x{c}"] = _best_us(lambda z=z, t=t: op(z, t, None, -100, 0.0, 1), calls)
        out[f"accumulate {b}x{c}"] = _best_us(
            lambda z=z, t=t, i=i, csl=csl: csl_fast.accumulate(z, t, i, csl), calls
        )
        if extras:
            out[f"accumulate {b}x{c} softcap+z-loss / off"] = round(
                _best_us(
                    lambda z=z, t=t, i=i, csl=csl: csl_fast.accumulate(
                        z, t, i, csl, softcap=30.0, z_loss_scale=1e-4
                    ),
                    calls,
                )
                / out[f"accumulate {b}x{c}"],
                2,
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="this tree")
    parser.add_argument("--rounds", type=at_least_one, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    extras = "softcap" in csl_fast.accumulate.__code__.co_varnames
    for _ in range(args.rounds):
        print(json.dumps({"label": args.label, **measure(extras)}), flush=True)


if __name__ == "__main__":
    main()
