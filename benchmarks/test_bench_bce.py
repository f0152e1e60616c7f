"""Multi-label binary cross entropy, forward + backward: ``csl_fast.accumulate_bce`` per
backend against the eager reference that records the same CSL
(``F.binary_cross_entropy_with_logits(reduction='none')``, ``index_add_`` of each sample's
summed loss, ``.mean().backward()``), each with no per-(sample, label) buffer, with
``label_csl``, and with ``label_csl`` and ``label_prob`` (what ``CSLTracker(num_labels=L)``
records), and ``F.binary_cross_entropy_with_logits`` alone (no CSL). One benchmark group per
(device, dtype, B x L).

``python -m pytest benchmarks/test_bench_bce.py`` times it with pytest-benchmark (each
implementation's rounds in a row). ``python benchmarks/test_bench_bce.py`` measures the
same cases with the rounds interleaved (every implementation once per round, shuffled:
drifting load on a shared machine hits them alike), on one thread by default
(``CSL_BENCH_THREADS``; ``CSL_BENCH_ROUNDS``, default 30), and writes medians and ratios
with machine, commit and date to ``benchmarks/results/bce-<device>-<date>.md`` and
``.json``: the committed figures."""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from bench_suite import DEVICES, median_s, run_benchmark, synced
from tqdm import tqdm

import csl_fast

SHAPES = {
    "cpu": [(256, 10), (256, 100), (64, 1000), (512, 1000)],
    "cuda": [(4096, 100), (1024, 1000), (8192, 1000)],
}
DTYPES = {"cpu": [torch.float32], "cuda": [torch.float32, torch.bfloat16]}
REF = "reference eager"
PLAIN = "F.bce alone (no CSL)"
CASES = [
    (dev, b, n_labels, dt)
    for dev in DEVICES
    for b, n_labels in SHAPES[dev.split(":")[0]]
    for dt in DTYPES[dev.split(":")[0]]
]
# The per-entry buffers recorded: none, label_csl, and a num_labels tracker's two.
SUFFIXES = ("", " + label_csl", " + label_csl + label_prob")
IMPLS = [
    *(f"accumulate_bce[{b}]{s}" for b in ("cpu", "triton", "cuda") for s in SUFFIXES),
    *(f"{REF}{s}" for s in SUFFIXES),
    PLAIN,
]


class BceCase:
    """Inputs and one callable per implementation for a (device, B, L, dtype) case."""

    def __init__(self, device: str, batch: int, labels: int, dtype: torch.dtype):
        n = 4 * batch  # dataset size: the buffers are [N] and [N, L]
        self.z = (torch.randn(batch, labels, device=device) * 2).to(dtype).requires_grad_(True)
        self.y = (torch.rand(batch, labels, device=device) < 0.2).to(dtype)
        self.idx = torch.randint(0, n, (batch,), device=device)
        self.csl = torch.zeros(n, device=device)
        self.label_csl = torch.zeros(n, labels, device=device)
        self.label_prob = torch.zeros(n, labels, device=device)

    def run(self, impl: str) -> torch.Tensor:
        label, prob = "label_csl" in impl, "label_prob" in impl
        if impl == PLAIN:
            loss = F.binary_cross_entropy_with_logits(self.z, self.y)
        elif impl.startswith(REF):
            per_entry = F.binary_cross_entropy_with_logits(self.z, self.y, reduction="none")
            values = per_entry.detach().float()
            self.csl.index_add_(0, self.idx, values.sum(1))
            if label:
                self.label_csl.index_add_(0, self.idx, values)
            if prob:
                self.label_prob.index_add_(0, self.idx, torch.exp(-values))
            loss = per_entry.mean()
        else:
            backend = impl.split("[")[1].split("]")[0]
            loss = csl_fast.accumulate_bce(
                self.z, self.y, self.idx, self.csl, label_csl=self.label_csl if label else None,
                label_prob=self.label_prob if prob else None, backend=backend,
            )  # fmt: skip
        loss.backward()
        self.z.grad = None
        return loss.detach()


def _backend(impl: str) -> str | None:
    return impl.split("[")[1].split("]")[0] if impl.startswith("accumulate_bce") else None


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("device", "batch", "labels", "dtype"),
    CASES,
    ids=[f"{d}-{b}x{n}-{str(t).split('.')[1]}" for d, b, n, t in CASES],
)
def test_bce(benchmark, device, batch, labels, dtype, impl):
    backend = _backend(impl)
    if backend is not None and backend not in csl_fast.available_backends(device):
        pytest.skip(f"backend {backend} does not run on {device} here")
    case = BceCase(device, batch, labels, dtype)
    want = F.binary_cross_entropy_with_logits(case.z.detach().float(), case.y.float())
    torch.testing.assert_close(case.run(impl).float(), want, rtol=2e-2, atol=1e-3)
    benchmark.group = f"bce {device} {str(dtype).split('.')[1]} {batch}x{labels}"
    benchmark.extra_info.update(impl=impl)
    run_benchmark(benchmark, lambda: case.run(impl), device)
    med = median_s(benchmark)
    if med:
        benchmark.extra_info["median_s"] = med


def _available(device: str) -> list[str]:
    have = csl_fast.available_backends(device)
    return [i for i in IMPLS if _backend(i) is None or _backend(i) in have]


def measure(device, batch, labels, dtype, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of every implementation, the rounds interleaved (each round runs
    every implementation once, in a shuffled order) so that drifting machine load hits
    them alike."""
    case = BceCase(device, batch, labels, dtype)
    impls = _available(device)
    fns = {i: synced(lambda i=i: case.run(i), device) for i in impls}
    for fn in fns.values():
        for _ in range(3):
            fn()
    times: dict[str, list[float]] = {i: [] for i in impls}
    order = list(impls)
    for _ in range(rounds):
        random.shuffle(order)
        for i in order:
            start = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - start)
    return times


def _median_iqr(ts: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(ts, n=4)
    return statistics.median(ts), q[2] - q[0]


def _report(results: dict[str, dict[str, list[float]]], meta: dict) -> str:
    lines = [
        "# accumulate_bce: forward + backward against the eager reference",
        "",
        f"- date {meta['date']}, commit {meta['commit']}",
        f"- machine: {meta['machine']}; load average at start {meta['load_start']}, "
        f"at end {meta['load_end']}",
        f"- command: `python benchmarks/test_bench_bce.py` ({meta['rounds']} interleaved "
        "rounds per case, medians; IQR/median in brackets)",
        "",
        "Reference eager = `F.binary_cross_entropy_with_logits(reduction='none')` + "
        "`csl.index_add_(0, idx, loss.sum(1))` (+ `label_csl.index_add_(0, idx, loss)`, + "
        "`label_prob.index_add_(0, idx, exp(-loss))`) + `.mean().backward()`: the same "
        "buffers as `accumulate_bce` records. Speedup = the reference's median (with the "
        "row's buffers) / this median; "
        "vs F.bce alone = this median / the median of `F.binary_cross_entropy_with_logits` "
        "alone (no CSL): the cost of recording.",
        "",
    ]
    for group, times in results.items():
        medians = {i: _median_iqr(ts)[0] for i, ts in times.items()}
        lines += [f"## {group}", "", "| impl | median | speedup vs reference | vs F.bce alone |"]
        lines.append("|---|---|---|---|")
        for impl, ts in times.items():
            med, iqr = _median_iqr(ts)
            ref = medians.get(REF + next(s for s in reversed(SUFFIXES) if impl.endswith(s)))
            plain = medians.get(PLAIN)
            speed = f"{ref / med:.2f}x" if ref else ""
            over = f"{med / plain:.2f}x" if plain else ""
            lines.append(f"| {impl} | {med * 1e6:.1f} µs ({iqr / med:.0%}) | {speed} | {over} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    from run_meta import add_force, refuse_overwrite, results_files, run_meta, write_atomic

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("CSL_BENCH_THREADS", "1")),
        help="CPU threads (default CSL_BENCH_THREADS or 1: a shared machine's other jobs)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=int(os.environ.get("CSL_BENCH_ROUNDS", "30")),
        help="interleaved rounds (default CSL_BENCH_ROUNDS or 30)",
    )
    parser.add_argument(
        "--out", type=Path, help="results file stem (default results/bce-DEVICE-DATE)"
    )
    add_force(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rounds = args.rounds
    meta = run_meta()
    device = "-".join(sorted({d.split(":")[0] for d in DEVICES}))
    here = Path(__file__).resolve().parent
    stem = args.out or here / "results" / f"bce-{device}-{meta['date'][:10]}"
    refuse_overwrite(parser, args.force, *results_files(stem))
    meta.update(load_start=[round(x, 2) for x in os.getloadavg()], rounds=rounds)
    results = {}
    for device, batch, labels, dtype in tqdm(CASES, desc="bce cases"):
        group = f"{device} {str(dtype).split('.')[1]} {batch} x {labels}"
        results[group] = measure(device, batch, labels, dtype, rounds)
    meta["load_end"] = [round(x, 2) for x in os.getloadavg()]
    text, data = _report(results, meta) + "\n", {"meta": meta, "seconds": results}
    md, js = results_files(stem)
    write_atomic(md, text)
    write_atomic(js, json.dumps(data, indent=1) + "\n")
    print(f"wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
