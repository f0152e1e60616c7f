"""Fixed cost of one eager CPU call: ``accumulate`` and ``record_loss`` at B = 64, C = 10.

At ten classes the arithmetic of a call is a few microseconds, so what a call costs is its
fixed overhead (argument checks, locks, op dispatch, version bumps). This script times one
call of each entry point, single-threaded, in several source trees of the project in the
same run: each tree is imported in its own child process (``PYTHONPATH=<tree>``, its
compiled extension built in place), the children run in rotating order for several rounds,
and each figure is the median over rounds of a child's median over repetitions.

    python benchmarks/per_call.py [--tree NAME=PATH ...] [--rounds 5] [--out FILE.md]

Without ``--tree`` it times this checkout only. The results file names the machine, the
date, each tree's commit and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

B, C, N = 64, 10, 50_000
CALLS, REPS, WARMUP = 500, 9, 200


def _cases():
    """(name, zero-argument call) for every case the imported csl_fast offers."""
    import torch

    import csl_fast

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    index = torch.randint(0, N, (B,), generator=g)
    target = torch.randint(0, C, (B,), generator=g)
    logits = torch.randn(B, C, generator=g).requires_grad_(True)
    low = torch.randn(B, C, generator=g).bfloat16().requires_grad_(True)
    loss = torch.rand(B, generator=g)
    csl, count = torch.zeros(N), torch.zeros(N, dtype=torch.int64)
    tracker = csl_fast.CSLTracker(N, C)
    acc = csl_fast.accumulate
    cases = {
        "accumulate, tensor + count": lambda: acc(logits, target, index, csl, count=count),
        "accumulate, tracker": lambda: acc(logits, target, index, tracker),
        "accumulate, bfloat16, tensor + count": lambda: acc(low, target, index, csl, count=count),
    }
    record = getattr(csl_fast, "record_loss", None)
    if record is not None:
        loss_tracker = csl_fast.CSLTracker(N, C)
        cases["record_loss, tensor + count"] = lambda: record(loss, index, csl, count=count)
        cases["record_loss, tracker"] = lambda: record(loss, index, loss_tracker)
    return cases


def _child() -> None:
    cases = _cases()
    out = {}
    for fn in cases.values():
        for _ in range(WARMUP):
            fn()
    times = {name: [] for name in cases}
    for _ in range(REPS):
        for name, fn in cases.items():  # interleaved, so drift hits every case alike
            start = time.perf_counter()
            for _ in range(CALLS):
                fn()
            times[name].append((time.perf_counter() - start) / CALLS)
    for name, ts in times.items():
        out[name] = statistics.median(ts) * 1e6
    import csl_fast

    out["_module"] = csl_fast.__file__
    print(json.dumps(out))


def _commit(path: Path) -> str:
    try:
        return subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (subprocess.CalledProcessError, OSError):
        stamp = path / "COMMIT"
        return stamp.read_text().strip() if stamp.exists() else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, help="write a markdown table (and .json beside it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child()
        return
    here = Path(__file__).resolve().parents[1]
    trees = [t.split("=", 1) for t in args.tree] or [["this checkout", str(here)]]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a convenience

        def tqdm(x, **_):
            return x

    for r in tqdm(range(args.rounds), desc="rounds"):
        order = trees[r % len(trees) :] + trees[: r % len(trees)]
        for name, path in order:
            env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
            res = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child"],
                env=env,
                capture_output=True,
                text=True,
                cwd=path,
            )
            if res.returncode:
                raise SystemExit(f"{name} ({path}) failed:\n{res.stderr}")
            runs[name].append(json.loads(res.stdout.strip().splitlines()[-1]))
    load_after = os.getloadavg()
    cases = list(dict.fromkeys(k for rs in runs.values() for r in rs for k in r if k[0] != "_"))
    table = {
        name: {c: statistics.median(r[c] for r in rs) if c in rs[0] else None for c in cases}
        for name, rs in runs.items()
    }
    lines = _markdown(trees, table, cases, load_before, load_after, args.rounds)
    print("\n".join(lines))
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")
        meta = {
            "trees": {name: {"path": p, "commit": _commit(Path(p))} for name, p in trees},
            "median_us": table,
            "runs_us": runs,
            "load_before": load_before,
            "load_after": load_after,
        }
        args.out.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")


def _markdown(trees, table, cases, load_before, load_after, rounds) -> list[str]:
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    names = [name for name, _ in trees]
    lines = [
        f"# Per-call cost of eager CPU calls, B = {B}, C = {C}, N = {N}",
        "",
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, one intra-op thread, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after. Median over {rounds} rounds "
        f"(child processes, rotating order) of the median of {REPS} x {CALLS} calls; "
        "forward only (logits require grad, no backward). Command: "
        "`python benchmarks/per_call.py " + " ".join(f"--tree {n}=..." for n in names) + "`.",
        "",
        "Trees: " + "; ".join(f"{name} = {_commit(Path(p))}" for name, p in trees) + ".",
        "",
        "| call | " + " | ".join(f"{n} (µs)" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for c in cases:
        cells = ["—" if table[n][c] is None else f"{table[n][c]:.1f}" for n in names]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
