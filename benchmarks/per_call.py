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

Each child reports what it imported: ``csl_fast.__file__``, the compiled extension's file
(``csl_fast._ext._C.__file__``) and ``csl_fast._ext.EXTENSION_ERROR``. Before timing, and
again for every timed child, the run stops with an error unless the package and the
extension both come from inside that tree and the extension loaded: a tree without
``csl_fast`` would silently import another copy (this checkout's, through an editable
install), and a tree without a built ``_C`` would time another tree's extension (the
editable install's import hook hands it out) or the pure-PyTorch fallback.
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

from run_meta import (
    add_force,
    at_least_one,
    commit,
    cpu_model,
    refuse_overwrite,
    run_meta,
    write_atomic,
)

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


def _identity() -> dict:
    """What this process imported: the csl_fast package, its compiled extension, the error."""
    import csl_fast
    from csl_fast import _ext

    c = getattr(_ext, "_C", None)
    return {
        "_module": csl_fast.__file__,
        "_extension": getattr(c, "__file__", None) if c is not None else None,
        "_extension_error": getattr(_ext, "EXTENSION_ERROR", None),
    }


def check_identity(name: str, tree: str, ident: dict) -> None:
    """Stop (SystemExit) unless the child for tree ``name`` imported csl_fast and its
    compiled extension from inside ``tree`` and the extension loaded."""
    root = Path(tree).resolve()

    def inside(f: str | None) -> bool:
        return f is not None and Path(f).resolve().is_relative_to(root)

    problems = []
    if not inside(ident.get("_module")):
        problems.append(f"csl_fast was imported from {ident.get('_module')}, not from the tree")
    if ident.get("_extension_error"):
        problems.append(f"its compiled extension did not load: {ident['_extension_error']}")
    elif not inside(ident.get("_extension")):
        problems.append(
            f"its compiled extension csl_fast._C came from {ident.get('_extension')}, not from "
            "the tree (an editable install's import hook hands out its own build)"
        )
    if problems:
        raise SystemExit(
            f"per_call.py: tree {name} ({root}): "
            + "; ".join(problems)
            + ". Build the extension in that tree (`python setup.py build_ext --inplace`) "
            "and point --tree at the folder that holds its csl_fast/."
        )


def _child(identify: bool = False) -> None:
    if identify:
        print(json.dumps(_identity()))
        return
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
    out.update(_identity())
    print(json.dumps(out))


def _run_child(name: str, path: str, *extra: str) -> dict:
    """Run this script as a child in ``path`` (``PYTHONPATH=path``); its JSON line."""
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", *extra],
        env=env,
        capture_output=True,
        text=True,
        cwd=path,
    )
    if res.returncode:
        raise SystemExit(f"{name} ({path}) failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _commit(path: Path) -> str:
    """The tree's commit (``-dirty`` when it differs from it), or its ``COMMIT`` stamp."""
    found = commit(path) if path.is_dir() else "unknown"
    stamp = path / "COMMIT"
    return stamp.read_text().strip() if found == "unknown" and stamp.exists() else found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of a source tree")
    parser.add_argument("--rounds", type=at_least_one, default=5)
    parser.add_argument("--out", type=Path, help="write a markdown table (and .json beside it)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--identify", action="store_true", help=argparse.SUPPRESS)
    add_force(parser)
    args = parser.parse_args()
    if args.child:
        _child(identify=args.identify)
        return
    if args.out is not None:
        # found when the table was written, after every round had been timed
        if args.out.is_dir():
            parser.error(
                f"--out {args.out}: a folder; give a file, e.g. {args.out / 'per_call.md'}"
            )
        refuse_overwrite(parser, args.force, args.out, args.out.with_suffix(".json"))
        args.out.parent.mkdir(parents=True, exist_ok=True)
    here = Path(__file__).resolve().parents[1]
    trees = [t.split("=", 1) for t in args.tree] or [["this checkout", str(here)]]
    load_before = os.getloadavg()
    runs: dict[str, list[dict]] = {name: [] for name, _ in trees}
    try:
        from tqdm import tqdm
    except ImportError:  # progress is a convenience

        def tqdm(x, **_):
            return x

    for name, path in trees:  # before any timing: each tree imports itself
        check_identity(name, path, _run_child(name, path, "--identify"))
    for r in tqdm(range(args.rounds), desc="rounds"):
        order = trees[r % len(trees) :] + trees[: r % len(trees)]
        for name, path in order:
            result = _run_child(name, path)
            check_identity(name, path, result)
            runs[name].append(result)
    load_after = os.getloadavg()
    cases = list(dict.fromkeys(k for rs in runs.values() for r in rs for k in r if k[0] != "_"))
    table = {
        name: {c: statistics.median(r[c] for r in rs) if c in rs[0] else None for c in cases}
        for name, rs in runs.items()
    }
    meta = run_meta()
    lines = _markdown(trees, table, cases, load_before, load_after, args.rounds, meta)
    print("\n".join(lines))
    if args.out:
        write_atomic(args.out, "\n".join(lines) + "\n")
        meta = {
            **meta,  # the JSON had no date, machine or command
            "trees": {name: {"path": p, "commit": _commit(Path(p))} for name, p in trees},
            "median_us": table,
            "runs_us": runs,
            "load_before": load_before,
            "load_after": load_after,
        }
        write_atomic(args.out.with_suffix(".json"), json.dumps(meta, indent=1) + "\n")


def _markdown(trees, table, cases, load_before, load_after, rounds, meta) -> list[str]:
    import torch

    names = [name for name, _ in trees]
    lines = [
        f"# Per-call cost of eager CPU calls, B = {B}, C = {C}, N = {N}",
        "",
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__}, one intra-op "
        f"thread, {meta['date']}; load average "
        f"{load_before[0]:.1f} before, {load_after[0]:.1f} after. Median over {rounds} rounds "
        f"(child processes, rotating order) of the median of {REPS} x {CALLS} calls; "
        # it read "--tree this checkout=..." for a run given no --tree
        f"forward only (logits require grad, no backward). Command: `{meta['command']}`.",
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
