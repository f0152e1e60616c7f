"""What a distributed sync costs in memory and time: the peak resident-set growth of each
rank during the first ``end_epoch()`` (which also allocates the synced baseline the
tracker keeps) and during a later one, for W CPU processes over gloo, one default float32
tracker of N samples each (10 classes; 1,000 presentations per rank before each sync).

    python benchmarks/sync_memory.py                    # N = 2 million, W = 2 and 4
    python benchmarks/sync_memory.py --n 200000 --worlds 2

Writes ``benchmarks/results/sync_memory.json`` and ``.md`` (date, machine, commit). Linux
only: the peak is reset before each sync (``/proc/self/clear_refs``).

Each rank fixes glibc's mmap threshold at 128 KiB first (``mallopt(M_MMAP_THRESHOLD)``, what
``MALLOC_MMAP_THRESHOLD_=131072`` does; ``--mmap-threshold 0`` leaves glibc's defaults), and
the results record it. With glibc's default, dynamic threshold the multi-MiB temporaries
freed by the first sync stay in the heap, resident, and a later sync reuses them without
growing the resident set: at N = 2 million, W = 2 that read 219 and 225 MiB of growth where
the later sync allocates 318-319 MiB (a probe run for the change, not kept in a results
file). With the fixed threshold every such block is mapped fresh and
unmapped when freed, so the growth counts what each sync allocates.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from run_meta import (  # noqa: E402
    add_force,
    at_least,
    at_least_one,
    refuse_overwrite,
    results_files,
    write_results,
)

import csl_fast  # noqa: E402

#: glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD).
M_MMAP_THRESHOLD = -3
#: The threshold each rank sets (bytes): freed blocks above it go back to the OS.
MMAP_THRESHOLD = 128 * 1024


def _fix_mmap_threshold(threshold: int) -> bool:
    """Set glibc's mmap threshold to ``threshold`` bytes in this process (a fixed threshold
    also turns off glibc's dynamic raising of it); False where that is not possible."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def _peak_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _synced(tracker: csl_fast.CSLTracker) -> tuple[float, float]:
    """``(peak growth in MiB, seconds)`` of one ``end_epoch()``."""
    dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to VmRSS
        f.write("5")
    before = _peak_kib()
    t0 = time.perf_counter()
    tracker.end_epoch()
    return (_peak_kib() - before) / 1024, time.perf_counter() - t0


def _rank(rank: int, world: int, init: str, n: int, threshold: int, queue: mp.Queue) -> None:
    """Puts ``(rank, rows)``, or ``(rank, why it failed)``: an uncaught error ended the rank
    without a word, and the parent waited for its rows (the other ranks in the sync)."""
    try:
        _measure_rank(rank, world, init, n, threshold, queue)
    except Exception as exc:
        queue.put((rank, f"rank {rank}: {type(exc).__name__}: {exc}"))


def _measure_rank(
    rank: int, world: int, init: str, n: int, threshold: int, queue: mp.Queue
) -> None:
    if threshold and not _fix_mmap_threshold(threshold):
        queue.put(
            (
                rank,
                f"mallopt(M_MMAP_THRESHOLD, {threshold}) failed: not glibc? "
                "(--mmap-threshold 0 runs with the allocator's defaults)",
            )
        )
        return
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    tracker = csl_fast.CSLTracker(n, 10)
    rows = []
    for _ in range(2):
        idx = torch.arange(rank, n, world)[:1000]
        csl_fast.accumulate(torch.randn(idx.numel(), 10), idx % 10, idx, tracker)
        rows.append(_synced(tracker))
    queue.put((rank, rows))
    dist.destroy_process_group()


def _collect(queue: mp.Queue, procs: list) -> dict:
    """Each rank's rows by rank; a RuntimeError with the first failure (a rank's error, or
    a rank that died without a word) as soon as there is one, instead of waiting for rows
    that never come."""
    got: dict = {}
    deadline = time.monotonic() + 600
    while len(got) < len(procs):
        try:
            rank, rows = queue.get(timeout=1)
        except Empty:
            dead = [r for r, p in enumerate(procs) if r not in got and p.exitcode]
            if dead:
                code = procs[dead[0]].exitcode
                raise RuntimeError(f"rank {dead[0]} exited with code {code}") from None
            if time.monotonic() > deadline:
                raise RuntimeError("no rows from every rank after 600 s") from None
            continue
        if isinstance(rows, str):
            raise RuntimeError(rows)
        got[rank] = rows
    return got


def measure(n: int, world: int, mmap_threshold: int = MMAP_THRESHOLD) -> dict:
    """One run of W ranks; ``mmap_threshold`` 0 leaves glibc's allocator as it is (which
    under-states a later sync's temporaries, see the module docstring)."""
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        init = f"file://{folder}/pg"
        procs = [
            ctx.Process(target=_rank, args=(r, world, init, n, mmap_threshold, queue))
            for r in range(world)
        ]
        for p in procs:
            p.start()
        try:
            got = _collect(queue, procs)
        except RuntimeError:
            for p in procs:
                p.terminate()  # (a failed rank's peers wait in the sync for it)
            raise
        finally:
            for p in procs:
                p.join(60)
    first = [got[r][0] for r in range(world)]
    later = [got[r][1] for r in range(world)]
    return {
        "n": n,
        "world": world,
        "tracker_mib": csl_fast.CSLTracker(1000, 10).nbytes() / 1000 * n / 2**20,
        "first_sync_peak_mib": [round(m) for m, _ in first],
        "first_sync_s": max(s for _, s in first),
        "later_sync_peak_mib": [round(m) for m, _ in later],
        "later_sync_s": max(s for _, s in later),
        "load_average_1min": os.getloadavg()[0],
        # glibc's mmap threshold each rank fixed, in bytes (None: glibc's dynamic default).
        "malloc_mmap_threshold": mmap_threshold or None,
    }


def _markdown(rows: list, meta: dict) -> str:
    lines = [
        "# Memory and time of a distributed sync",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. "
        "`python benchmarks/sync_memory.py`: W CPU processes over gloo, each with a default "
        "float32 tracker of N samples (10 classes), 1,000 presentations per rank before "
        "each `end_epoch()`. Peak resident-set growth of each rank during the sync, in MiB "
        "(the first sync also allocates the baseline the tracker keeps, 74 bytes per "
        "sample), and the slowest rank's seconds. " + _threshold_note(rows),
        "",
        "| N | W | tracker, MiB | first sync: peak MiB per rank | s | later sync: peak MiB "
        "per rank | s | load |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['world']} | {r['tracker_mib']:.0f} | "
            f"{', '.join(map(str, r['first_sync_peak_mib']))} | {r['first_sync_s']:.2f} | "
            f"{', '.join(map(str, r['later_sync_peak_mib']))} | {r['later_sync_s']:.2f} | "
            f"{r['load_average_1min']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _threshold_note(rows: list) -> str:
    fixed = {r.get("malloc_mmap_threshold") for r in rows}
    if fixed == {None}:
        return (
            "glibc's default (dynamic) mmap threshold: freed multi-MiB blocks stay resident "
            "and are reused, so the later sync's growth under-states what it allocates."
        )
    return (
        "Each rank fixed glibc's mmap threshold at "
        + " / ".join(f"{t // 1024} KiB" for t in sorted(t for t in fixed if t))
        + " (`mallopt(M_MMAP_THRESHOLD)`, as `MALLOC_MMAP_THRESHOLD_` does), so freed "
        "multi-MiB blocks go back to the OS and each sync's temporaries show in its growth. "
        "Every such block is then mapped fresh and faulted in, which the seconds include: "
        "compare them only with runs at the same threshold."
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=at_least_one, default=2_000_000, help="samples")
    p.add_argument("--worlds", type=at_least(2), nargs="+", default=[2, 4], help="ranks per run")
    p.add_argument("--out", default=str(HERE / "results" / "sync_memory"))
    p.add_argument(
        "--mmap-threshold",
        type=int,
        default=MMAP_THRESHOLD,
        help=f"glibc mmap threshold each rank fixes, bytes (default {MMAP_THRESHOLD}; 0: "
        "glibc's dynamic default, which under-states a later sync)",
    )
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, *results_files(args.out))
    rows = []
    for world in args.worlds:
        try:
            rows.append(measure(args.n, world, args.mmap_threshold))
        except RuntimeError as exc:
            sys.exit(f"sync_memory.py: {exc}")
        print(rows[-1], flush=True)
    print(write_results(args.out, rows, _markdown))


if __name__ == "__main__":
    main()
