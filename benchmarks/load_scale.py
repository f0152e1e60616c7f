"""What reading a tracker file costs at N = 1 and 10 million samples: wall and CPU time
and the peak memory growth per sample, for each way a tracker file is read.

- ``CSLTracker.from_file``: the payload is read straight into the new tracker's buffers.
- ``read_file + from_state``: the whole payload into tensors of its own, then a new
  tracker restored from them (what ``from_file`` did until 2026-12-02).
- ``tracker.load`` into an existing tracker: the file is read and verified whole before
  the tracker changes, so the file's size sits beside the tracker for a moment.
- ``csl_fast.merge`` of two files (two trackers read, one merged tracker out).

The file is a 10-class tracker after two epochs of ``csl_fast.accumulate`` on random
logits, saved to a temporary folder; each case runs in a fresh Python process, its peak resident
set reset just before the call (Linux ``/proc/self/clear_refs``), on 2 threads.

    python benchmarks/load_scale.py                 # N = 1M and 10M, needs ~3 GB free RAM
    python benchmarks/load_scale.py --sizes 100000

Writes ``benchmarks/results/load_scale.json`` and ``.md`` (date, machine, commit).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from run_meta import add_force, at_least_one, refuse_overwrite, results_files, write_results  # noqa: E402

CASES = ("from_file", "read_file + from_state", "load into a tracker", "merge of two files")


def _peak_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _run_case(case: str, path: str, threads: int) -> dict:
    """One case in this process (the child): seconds and peak growth of the call."""
    import torch

    import csl_fast
    from csl_fast import tracker_file

    torch.set_num_threads(threads)
    n = tracker_file.read_file(path)["num_samples"] if case == "load into a tracker" else 0
    existing = csl_fast.CSLTracker(n, 10) if n else None
    calls = {
        "from_file": lambda: csl_fast.CSLTracker.from_file(path),
        "read_file + from_state": lambda: tracker_file.from_state(
            csl_fast.CSLTracker, tracker_file.read_file(path)
        ),
        "load into a tracker": lambda: existing.load(path),
        "merge of two files": lambda: csl_fast.merge([path, path]),
    }
    with open("/proc/self/clear_refs", "w") as f:  # "5" resets VmHWM to VmRSS
        f.write("5")
    base = _peak_kb()
    t0, c0 = time.perf_counter(), time.process_time()
    out = calls[case]()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    del out
    return {"wall_s": wall, "cpu_s": cpu, "peak_growth_kb": _peak_kb() - base}


def _recorded_tracker(n: int, epochs: int = 2, batch: int = 1 << 16):
    """A 10-class tracker after ``epochs`` epochs of ``csl_fast.accumulate`` on random
    logits, every sample presented once per epoch in shuffled batches."""
    import torch

    import csl_fast

    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 10, (n,), generator=g)
    tracker = csl_fast.CSLTracker(n, 10)
    for _ in range(epochs):
        order = torch.randperm(n, generator=g)
        for idx in order.split(batch):
            logits = torch.randn(len(idx), 10, generator=g) * 3
            csl_fast.accumulate(logits, target[idx], idx, tracker)
        tracker.end_epoch()
    return tracker


def measure(n: int, folder: Path, threads: int) -> dict:
    path = folder / f"tracker_{n}.csl"
    tracker = _recorded_tracker(n)
    tracker.save(path)
    del tracker
    size = path.stat().st_size
    row = {"n": n, "file_bytes_per_sample": size / n, "cases": {}}
    for case in CASES:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--case",
                case,
                "--file",
                str(path),
                "--threads",
                f"{threads}",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        got = json.loads(out.stdout.strip().splitlines()[-1])
        got["peak_bytes_per_sample"] = got.pop("peak_growth_kb") * 1024 / n
        row["cases"][case] = got
        print(
            f"N={n:,} {case}: {got['wall_s']:.2f} s ({got['cpu_s']:.2f} CPU s), "
            f"+{got['peak_bytes_per_sample']:.0f} B/sample",
            flush=True,
        )
    row["load_average_1min"] = os.getloadavg()[0]
    path.unlink()
    return row


def _markdown(rows: list, meta: dict) -> str:
    lines = [
        "# Reading a tracker file",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. "
        f"`{meta['command']}`: a 10-class tracker file after two epochs of random "
        "logits (float32; "
        "bytes per sample in the second column), each way of reading it in a fresh process: "
        "wall seconds (CPU seconds of all threads) and the peak resident-set growth of the "
        "call in bytes per sample (Linux `/proc/self/clear_refs`). *read_file + from_state* "
        "is what `from_file` did before it read the payload into the new tracker's buffers; "
        "*load into a tracker* reads into an existing tracker, which changes only after the "
        "whole file is verified; *merge of two files* reads the file twice and returns one "
        "merged tracker.",
        "",
        "| N | file, B/sample | " + " | ".join(CASES) + " | load |",
        "|---|---|" + "---|" * len(CASES) + "---|",
    ]
    for r in rows:
        cells = [
            f"{c['wall_s']:.2f} s ({c['cpu_s']:.2f}), +{c['peak_bytes_per_sample']:.0f} B"
            for c in (r["cases"][case] for case in CASES)
        ]
        lines.append(
            f"| {r['n']:,} | {r['file_bytes_per_sample']:.0f} | "
            + " | ".join(cells)
            + f" | {r['load_average_1min']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=at_least_one, nargs="+", default=[1_000_000, 10_000_000])
    p.add_argument("--threads", type=at_least_one, default=2)
    p.add_argument("--dir", default=None, help="folder for the temporary tracker files")
    p.add_argument("--out", default=str(HERE / "results" / "load_scale"))
    p.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, *results_files(args.out))
    if args.case:
        print(json.dumps(_run_case(args.case, args.file, args.threads)))
        return
    import torch  # (run_meta imported it already)

    # the children measure on --threads; so the header's thread count says (it gave torch's
    # default of this process, which never used it)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rows = [measure(n, Path(folder), args.threads) for n in args.sizes]
    print(write_results(args.out, rows, _markdown))


if __name__ == "__main__":
    main()
