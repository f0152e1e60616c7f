#!/usr/bin/env python
"""Device kernels that one eager ``csl_fast.accumulate(...)`` forward + backward issues with
the Triton backend, per case (logits dtype, reduction, plain CSL tensor or ``CSLTracker``).

Below large vocabularies a call's cost on a GPU is host time, mostly one launch per kernel
(tens of microseconds each on the H200 VM of benchmarks/results/nvidia-h200-2026-11-30.md),
so the count is the figure to keep down.

- On a GPU: the CUDA kernels ``torch.profiler`` records (``ProfilerActivity.CUDA``).
- Without one (``TRITON_INTERPRET=1``, CPU tensors): the ATen ops that would launch a kernel
  on a GPU (leaf ops of the CPU profile that are not views, allocations or metadata) plus
  the Triton launches. An estimate: a CUDA ``sort`` is several kernels, and the CPU and
  CUDA implementations of a composite op may split differently.

    python benchmarks/launch_count.py            # a table per case
    python benchmarks/launch_count.py --json F   # also the per-op counts, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # run from a checkout without installing

import csl_fast  # noqa: E402
from benchmarks.run_meta import add_force, refuse_overwrite, write_atomic  # noqa: E402  (loaded by path in tests)

SHAPE = (8, 10)
NUM_SAMPLES = 32

#: ATen ops that launch no kernel: views, allocations, metadata.
_NO_KERNEL = {
    "aten::empty",
    "aten::empty_strided",
    "aten::empty_like",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::as_strided",
    "aten::view",
    "aten::_unsafe_view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::alias",
    "aten::detach",
    "aten::detach_",
    "aten::t",
    "aten::transpose",
    "aten::permute",
    "aten::expand",
    "aten::expand_as",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::select",
    "aten::slice",
    "aten::unbind",
    "aten::split",
    "aten::chunk",
    "aten::narrow",
    "aten::resolve_conj",
    "aten::resolve_neg",
    "aten::lift_fresh",
    "aten::result_type",
    "aten::is_nonzero",
    "aten::_has_compatible_shallow_copy_type",
    "aten::resize_",
    "aten::set_",
    # No-ops when they reach no copy_ below them (the dtype or layout already right).
    "aten::to",
    "aten::contiguous",
}


#: Composite ops counted through the ops they call (``to`` -> ``copy_``, ``zeros`` ->
#: ``fill_``, ``item`` -> ``_local_scalar_dense``, a device-to-host copy); none when
#: they call none (a ``to`` or ``contiguous`` that is a no-op).
_COMPOSITE = {
    "aten::to",
    "aten::_to_copy",
    "aten::contiguous",
    "aten::clone",
    "aten::zeros",
    "aten::zeros_like",
    "aten::ones",
    "aten::ones_like",
    "aten::full",
    "aten::full_like",
    "aten::new_zeros",
    "aten::new_ones",
    "aten::new_full",
    "aten::__and__",
    "aten::__or__",
    "aten::item",
    "aten::is_nonzero",
}


def _cpu_kernels(events) -> Counter:
    """The outermost kernel-launching ATen op of each call tree, outside the interpreter:
    one for ``sum`` however the CPU implements it, through composites to what they call."""

    def counted(e) -> bool:
        if not e.name.startswith("aten::") or e.name in _NO_KERNEL or e.name in _COMPOSITE:
            return False
        p = e.cpu_parent
        while p is not None:
            if p.name == _INTERPRETER or counted(p):
                return False
            p = p.cpu_parent
        return True

    return Counter(e.name for e in events if counted(e))


_INTERPRETER = "launch_count::interpreted_launch"


class _TritonLaunches:
    """Counts interpreted Triton launches (``InterpretedFunction.run``) by kernel name."""

    def __enter__(self) -> Counter:
        from triton.runtime.interpreter import InterpretedFunction

        self.cls, self.run = InterpretedFunction, InterpretedFunction.run
        self.counts: Counter = Counter()
        counts, run = self.counts, self.run

        def counted(fn, *args, **kwargs):
            counts["triton::" + fn.fn.__name__] += 1
            # The interpreter's own copies of the arguments are no device kernels.
            with torch.profiler.record_function(_INTERPRETER):
                return run(fn, *args, **kwargs)

        InterpretedFunction.run = counted
        return self.counts

    def __exit__(self, *exc) -> None:
        self.cls.run = self.run


def count_case(dtype: torch.dtype, reduction: str, tracker: bool, device: str) -> Counter:
    """Kernels of one ``accumulate`` + ``backward`` (after a warm-up call)."""
    b, c = SHAPE
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(b, c, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    t = torch.randint(0, c, (b,), generator=gen).to(device)
    idx = torch.randint(0, NUM_SAMPLES, (b,), generator=gen).to(device)
    if tracker:
        dest = csl_fast.CSLTracker(NUM_SAMPLES, c, device=device, backend="triton")
    else:
        dest = torch.zeros(NUM_SAMPLES, device=device)

    # The upstream gradient made beforehand: no kernel of the caller's in the count.
    grad_out = torch.ones(b if reduction == "none" else (), device=device, dtype=dtype)

    def call():
        # validate=False: the default on CUDA tensors (the range check reads them on the host).
        loss = csl_fast.accumulate(
            z, t, idx, dest, reduction=reduction, backend="triton", validate=False
        )
        loss.backward(grad_out)
        z.grad = None

    call()  # warm-up: compilation, lazy initialisation
    acts = torch.profiler.ProfilerActivity
    gpu = device == "cuda"
    profile = torch.profiler.profile(activities=[acts.CUDA if gpu else acts.CPU])
    with _TritonLaunches() as launched, profile as prof:
        call()
        if gpu:
            torch.cuda.synchronize()
    if gpu:
        return Counter(
            e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
        )
    return _cpu_kernels(prof.events()) + launched


CASES = [
    (dtype, reduction, tracker)
    for tracker in (False, True)
    for dtype in (torch.float32, torch.bfloat16)
    for reduction in ("mean", "sum", "none")
]


def count_all(device: str) -> dict[str, Counter]:
    return {
        f"{str(d).removeprefix('torch.')} {r} {'tracker' if k else 'csl'}": count_case(
            d, r, k, device
        )
        for d, r, k in CASES
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="write the per-op counts here")
    add_force(p)
    args = p.parse_args()
    refuse_overwrite(p, args.force, args.json, option="--json")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counts = count_all(device)
    where = torch.cuda.get_device_name() if device == "cuda" else "CPU, TRITON_INTERPRET=1"
    print(f"# Kernels per accumulate + backward, Triton backend ({where}, {SHAPE[0]}x{SHAPE[1]})\n")
    print("| case | kernels | of which |\n|---|---|---|")
    for case, c in counts.items():
        ops = ", ".join(f"{k.split('::')[-1]} x{v}" for k, v in sorted(c.items()))
        print(f"| {case} | {sum(c.values())} | {ops} |")
    if args.json:
        write_atomic(args.json, json.dumps({k: dict(v) for k, v in counts.items()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
