"""What recording costs as the dataset grows: one eager CPU training call (forward and
backward) of ``F.cross_entropy`` alone, of ``csl_fast.accumulate`` into a CSL buffer with
counts, and into a ``CSLTracker`` (every free statistic), at B = 1024, C = 10, for
dataset sizes N from 50,000 to 10 million.

The arithmetic of a call does not depend on N; where its B writes land does. A shuffled
loader's indices are random, and a tracker keeps about 20 ``[N]`` buffers (90 bytes per
sample): at N = 50,000 they stay in the CPU's caches, at 10 million each write is a miss.
The indices here are random (a shuffled loader) or consecutive (a loader in dataset
order); every buffer page is touched before timing, as after a first epoch. The cases
run in rotating order for several rounds; each figure is the median over rounds of the
median call time over repetitions.

    python benchmarks/record_scale.py                  # N = 50k, 1M, 10M; 2 threads
    python benchmarks/record_scale.py --sizes 50000 --rounds 3 --out /tmp/record_scale
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/record_scale.py --out .../record_scale_thp

A tracker asks for transparent huge pages for its own buffers (``csl_fast.huge_pages``):
where the kernel allows them (``/sys/kernel/mm/transparent_hugepage/enabled``: ``always``
or ``madvise``) one TLB entry covers 2 MiB of a buffer instead of 4 KiB.
``THP_MEM_ALLOC_ENABLE=1`` (read by PyTorch when it starts) does the same for all of
PyTorch's CPU allocations of 2 MiB and more, the plain CSL buffer here included. A
second tracker, made with the advice switched off, runs beside the first; the results file
says how many MiB of huge pages each got.

Writes ``benchmarks/results/record_scale.json`` and ``.md`` (date, machine, commit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from run_meta import add_force, at_least_one, refuse_overwrite, results_files, write_results  # noqa: E402

import csl_fast  # noqa: E402

B, C = 1024, 10
BATCHES, REPS = 32, 7  # distinct batches cycled per repetition; repetitions per round


def _cases(n: int, order: str, huge: dict) -> dict[str, Callable[[int], None]]:
    """``{case: call(k)}`` running training call ``k`` (forward and backward) of a case;
    ``huge`` gets the KiB of huge pages under each tracker's and the plain CSL buffer."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(B, C, generator=g) * 3 for _ in range(BATCHES)]
    target = [torch.randint(0, C, (B,), generator=g) for _ in range(BATCHES)]
    if order == "random":
        index = [torch.randint(0, n, (B,), generator=g) for _ in range(BATCHES)]
    else:
        start = torch.randint(0, max(n - B, 1), (BATCHES,), generator=g)
        index = [torch.arange(int(s), int(s) + B) % n for s in start]
    csl, count = torch.zeros(n), torch.zeros(n)
    tracker = csl_fast.CSLTracker(n, C)  # creation writes every page, as zeros() does
    with mock.patch.object(csl_fast.huge_pages, "advise", lambda buf: False):
        small = csl_fast.CSLTracker(n, C)  # as before csl_fast asked for huge pages
    huge.update(tracker=_huge_kib(tracker.csl_sum), small=_huge_kib(small.csl_sum))
    huge["buffer"] = _huge_kib(csl)

    def step(loss_of: Callable[[torch.Tensor, int], torch.Tensor]) -> Callable[[int], None]:
        def call(k: int) -> None:
            z = logits[k].detach().requires_grad_(True)
            loss_of(z, k).backward()

        return call

    return {
        "F.cross_entropy": step(lambda z, k: F.cross_entropy(z, target[k])),
        "accumulate, buffer + count": step(
            lambda z, k: csl_fast.accumulate(z, target[k], index[k], csl, count=count)
        ),
        "accumulate, tracker": step(
            lambda z, k: csl_fast.accumulate(z, target[k], index[k], tracker)
        ),
        "accumulate, tracker not advised": step(
            lambda z, k: csl_fast.accumulate(z, target[k], index[k], small)
        ),
    }


def _median_call_us(call: Callable[[int], None]) -> float:
    times = []
    for _ in range(REPS):
        t0 = time.perf_counter()
        for k in range(BATCHES):
            call(k)
        times.append((time.perf_counter() - t0) / BATCHES * 1e6)
    return statistics.median(times)


def _huge_kib(buf: torch.Tensor) -> int:
    """KiB of transparent huge pages in the memory mapping holding ``buf``'s middle byte
    (``AnonHugePages`` in ``/proc/self/smaps``; advice splits a mapping at its page-aligned
    ends); 0 where there is no such file."""
    ptr, inside = buf.data_ptr() + buf.numel() * buf.element_size() // 2, False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head = line.split(" ", 1)[0]
                if "-" in head and ":" not in head:
                    lo, hi = (int(x, 16) for x in head.split("-"))
                    inside = lo <= ptr < hi
                elif inside and head == "AnonHugePages:":
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(n: int, order: str, rounds: int) -> dict:
    huge: dict[str, int] = {}
    cases = _cases(n, order, huge)
    names = list(cases)
    for call in cases.values():  # warm-up: first calls, lazy initialisation
        for k in range(BATCHES):
            call(k)
    seen: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seen[name].append(_median_call_us(cases[name]))
    us = {name: statistics.median(v) for name, v in seen.items()}
    base = us["F.cross_entropy"]
    return {
        "n": n,
        "order": order,
        "us_per_call": us,
        "ns_per_sample_over_cross_entropy": {
            name: (v - base) * 1e3 / B for name, v in us.items() if name != "F.cross_entropy"
        },
        "load_average_1min": os.getloadavg()[0],
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", ""),
        "transparent_hugepage": _thp_mode(),
        "huge_page_kib": huge,
    }


def _thp_mode() -> str:
    """The kernel's transparent-huge-page mode (the bracketed word), or "unknown"."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else "unknown"


def _markdown(rows: list, meta: dict) -> str:
    names = list(rows[0]["us_per_call"])
    lines = [
        "# Recording cost against the dataset size",
        "",
        f"{meta['date']}, commit {meta['commit']}, {meta['machine']}. "
        f"`{meta['command']}`: one eager training call (forward and backward) "
        f"at B = {B}, C = {C}, float32, µs per call (median of rounds of medians); in "
        "brackets, what recording adds per sample of the batch over `F.cross_entropy` alone. "
        "Indices random (a shuffled loader) or consecutive (a loader in dataset order). "
        f"THP_MEM_ALLOC_ENABLE={rows[0]['THP_MEM_ALLOC_ENABLE'] or 'unset'} (PyTorch's CPU "
        "allocations on transparent huge pages when 1), the kernel's transparent huge pages: "
        f"{rows[0]['transparent_hugepage']}. A tracker asks for huge pages for its own "
        "buffers (`csl_fast.huge_pages`); *not advised*: a tracker made with that advice "
        "switched off, as csl_fast made them before it. The last column gives the MiB of "
        "huge pages under the `csl_sum` of the tracker, of the one not advised, and under the "
        "plain CSL buffer (`/proc/self/smaps`).",
        "",
        "| N | indices | " + " | ".join(names) + " | load | huge pages, MiB |",
        "|---|---|" + "---|" * len(names) + "---|---|",
    ]
    for r in rows:
        cells = []
        for name in names:
            extra = r["ns_per_sample_over_cross_entropy"].get(name)
            tail = "" if extra is None else f" ({extra:+.0f} ns/sample)"
            cells.append(f"{r['us_per_call'][name]:.0f}{tail}")
        lines.append(
            f"| {r['n']:,} | {r['order']} | "
            + " | ".join(cells)
            + f" | {r['load_average_1min']:.1f}"
            + " | {tracker:.0f}, {small:.0f}, {buffer:.0f} |".format(
                **{k: v / 1024 for k, v in r["huge_page_kib"].items()}
            )
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", type=at_least_one, nargs="+", default=[50_000, 1_000_000, 10_000_000])
    p.add_argument("--rounds", type=at_least_one, default=5)
    p.add_argument("--threads", type=at_least_one, default=2)
    p.add_argument("--out", default=str(HERE / "results" / "record_scale"))
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, *results_files(args.out))
    torch.set_num_threads(args.threads)
    rows = []
    for n in args.sizes:
        for order in ("random", "consecutive"):
            rows.append(measure(n, order, args.rounds))
            us = rows[-1]["us_per_call"]
            print(f"N={n:,} {order}: " + ", ".join(f"{k} {v:.0f} us" for k, v in us.items()))
    print(write_results(args.out, rows, _markdown))


if __name__ == "__main__":
    main()
