"""What a distributed sync costs in memory and time: the peak resident-set growth of each
rank during the first ``end_epoch()`` (which also allocates the synced baseline the
tracker keeps) and during a later one, for W CPU processes over gloo, one default float32
tracker of N samples each (10 classes; 1,000 presentations per rank before each sync).

    python benchmarks/sync_memory.py                    # N = 2 million, W = 2 and 4
    python benchmarks/sync_memory.py --n 200000 --worlds 2

Writes ``benchmarks/results/sync_memory.json`` and ``.md`` (date, machine, commit). Linux
only: the peak is reset before each sync (``/proc/self/clear_refs``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from run_meta import write_results  # noqa: E402

import csl_fast  # noqa: E402


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


def _rank(rank: int, world: int, init: str, n: int, queue: mp.Queue) -> None:
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


def measure(n: int, world: int) -> dict:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as folder:
        init = f"file://{folder}/pg"
        procs = [ctx.Process(target=_rank, args=(r, world, init, n, queue)) for r in range(world)]
        for p in procs:
            p.start()
        got = dict(queue.get(timeout=600) for _ in range(world))
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
        "sample), and the slowest rank's seconds.",
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=2_000_000)
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--out", default=str(HERE / "results" / "sync_memory"))
    args = p.parse_args()
    rows = []
    for world in args.worlds:
        rows.append(measure(args.n, world))
        print(rows[-1], flush=True)
    print(write_results(args.out, rows, _markdown))


if __name__ == "__main__":
    main()
