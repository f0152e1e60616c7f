"""Benchmark of the language-model head: :func:`csl_fast.linear_cross_entropy` against
``F.cross_entropy(hidden @ weight.T)`` (eager and ``torch.compile``) and Liger-Kernel's fused
linear cross entropy, forward + backward, time and peak memory.

Used by ``benchmarks/test_bench_linear_cross_entropy.py`` (pytest-benchmark) and by the
``linear_cross_entropy`` section of :func:`csl_fast.bench.runner.run_full`; that section
alone: ``python benchmarks/run.py --sections linear_cross_entropy``.

Each returned row is a dict: ``device, dtype, tokens, hidden, vocab, chunk_size, impl,
records_csl`` and either the timing fields of :func:`csl_fast.bench.harness._stat_fields`
(``median_s``, ...), ``peak_bytes`` (extra peak memory during one forward + backward above
the inputs, :func:`csl_fast.bench.harness.extra_peak_bytes`), ``peak_vs_eager``, ``speedup_vs``
(other candidate's median / this one's), ``max_abs_err_loss`` against eager -- or
``skipped`` with the reason. Shapes: ``LCE_SHAPES[device type]``; on a GPU the issue's grid
(tokens 8192 and 16384, hidden 4096, V 32000 and 128256, bfloat16), scaled down on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ..linear_cross_entropy import default_chunk_size, linear_cross_entropy
from .harness import (
    MiB,
    _add_ratios,
    _dt,
    _free,
    _stat_fields,
    _why,
    compare,
    compiled_backend,
    extra_peak_bytes,
)

#: (tokens, hidden, vocab) per device type.
LCE_SHAPES = {
    "cpu": [(512, 128, 8000), (1024, 128, 32000)],
    "cuda": [
        (8192, 4096, 32000),
        (16384, 4096, 32000),
        (8192, 4096, 128256),
        (16384, 4096, 128256),
    ],
}
LCE_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
#: Tokens per sequence: CSL is recorded per sequence of this many tokens.
SEQ_LEN = {"cpu": 128, "cuda": 2048}

OURS = "csl_fast.linear_cross_entropy (+CSL)"
#: The same with weight-dtype gradient accumulators (less memory, rounding per chunk).
OURS_LOWMEM = "csl_fast.linear_cross_entropy (+CSL, accum_dtype=weight dtype)"
EAGER = "eager F.cross_entropy(h @ W.T)"
COMPILED = "torch.compile(F.cross_entropy(h @ W.T))"
LIGER = "Liger fused linear CE"
IMPLS = (OURS, OURS_LOWMEM, EAGER, COMPILED, LIGER)


def _eager(h, w, t):
    return F.cross_entropy((h @ w.t()).float() if h.dtype == torch.float64 else h @ w.t(), t)


def _liger():
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import (
            LigerFusedLinearCrossEntropyLoss,
        )
    except Exception as exc:
        return None, f"Liger-Kernel not importable ({_why(exc)})"
    return LigerFusedLinearCrossEntropyLoss(), None


class LinearCECase:
    """One shape: leaf ``hidden [tokens, H]`` and ``weight [V, H]``, targets ``[B, T]`` with
    some ignored tokens, a CSL buffer of ``B`` sequences. ``impls[name]()`` runs forward +
    backward (gradients land in ``.grad``, reset to None first); ``skipped[name]`` says
    why a candidate is not offered."""

    def __init__(
        self,
        tokens: int,
        hidden: int,
        vocab: int,
        device: torch.device | str,
        dtype: torch.dtype | None = None,
        *,
        compile: bool = True,
        liger: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        kind = self.device.type
        self.dtype = dtype or LCE_DTYPE[kind]
        self.shape = (tokens, hidden, vocab)
        seq = min(SEQ_LEN.get(kind, 128), tokens)
        g = torch.Generator(device="cpu").manual_seed(0)
        self.h = (torch.randn(tokens, hidden, generator=g) / hidden**0.25).to(
            self.device, self.dtype
        )
        self.w = (torch.randn(vocab, hidden, generator=g) / hidden**0.25).to(
            self.device, self.dtype
        )
        self.h.requires_grad_(True)
        self.w.requires_grad_(True)
        t = torch.randint(0, vocab, (tokens // seq, seq), generator=g)
        t[:, : seq // 8] = -100  # prompt tokens
        self.t = t.to(self.device)
        self.index = torch.arange(self.t.shape[0], device=self.device)
        self.csl = torch.zeros(self.t.shape[0], device=self.device)
        # On the CPU the scaled-down shapes fall under the default rule's 32 Mi-element
        # floor (one chunk); use 8 chunks, as the GPU grid has 8 to 32.
        self.chunk_size = chunk_size or (
            default_chunk_size(tokens, hidden, vocab) if kind == "cuda" else max(16, tokens // 8)
        )
        self.impls: dict[str, Callable[[], Any]] = {}
        self.skipped: dict[str, str] = {}
        self._reference: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.has_csl = {
            OURS: True,
            OURS_LOWMEM: True,
            EAGER: False,
            COMPILED: False,
            LIGER: False,
        }
        flat_t = self.t.reshape(-1)

        def step(fn):
            def run():
                self.h.grad = self.w.grad = None
                loss = fn()
                loss.backward()
                return loss

            return run

        # csl_fast's rows run the compiled backend by name, or are skipped with the reason.
        backend, no_backend = compiled_backend(self.device)
        self.backend = backend
        if backend is None:
            self.skipped[OURS] = self.skipped[OURS_LOWMEM] = str(no_backend)
        else:

            def ours(**extra):
                args = (self.h, self.w, self.t, self.index, self.csl)
                kwargs = {"chunk_size": self.chunk_size, "backend": backend, **extra}
                return step(lambda: linear_cross_entropy(*args, **kwargs))

            self.impls[OURS] = ours()
        if backend is not None and self.dtype != torch.float32:
            self.impls[OURS_LOWMEM] = ours(accum_dtype=self.w.dtype)
        elif backend is not None:
            self.skipped[OURS_LOWMEM] = "float32 weights: the same as the default"
        self.impls[EAGER] = step(lambda: _eager(self.h, self.w, flat_t))
        if compile:
            compiled = torch.compile(_eager)
            self.impls[COMPILED] = step(lambda: compiled(self.h, self.w, flat_t))
        else:
            self.skipped[COMPILED] = "torch.compile disabled"
        mod, why = _liger() if liger else (None, "Liger disabled")
        if mod is not None and kind != "cuda":
            mod, why = None, "Liger-Kernel runs on CUDA only"
        if mod is not None:
            self.impls[LIGER] = step(lambda: mod(self.w, self.h, flat_t))
        else:
            self.skipped[LIGER] = why

    @property
    def logits_bytes(self) -> int:
        tokens, _, vocab = self.shape
        return tokens * vocab * torch.empty((), dtype=self.dtype).element_size()

    def check(self, name: str) -> tuple[float, str | None]:
        """``(max abs loss difference, what differs)`` of candidate ``name`` against eager
        in float32: the loss, both gradients and, for a candidate that records CSL, the
        per-sequence CSL it adds, each within a relative tolerance of the reference's
        largest entry (1e-4, 3e-2 in 16 bits); what differs is None when all match. Raises
        what the candidate raises."""
        if self._reference is None:
            h = self.h.detach().float().requires_grad_(True)
            w = self.w.detach().float().requires_grad_(True)
            flat = self.t.reshape(-1)
            rows = F.cross_entropy(h @ w.t(), flat, reduction="none")
            loss = rows.sum() / (flat != -100).sum()
            loss.backward()
            per_sequence = rows.detach().view(self.t.shape).sum(1)
            self._reference = (loss.detach(), h.grad, w.grad, per_sequence)
        before = self.csl.clone()
        loss = self.impls[name]().detach().float()
        tol = 1e-4 if self.dtype in (torch.float32, torch.float64) else 3e-2
        errs = []
        got = (loss, self.h.grad, self.w.grad)
        # (the CSL each "+CSL" candidate records too: one that recorded nothing passed)
        names, wants = ("loss", "hidden grad", "weight grad"), self._reference[:3]
        if self.has_csl[name]:
            got, names = (*got, self.csl - before), (*names, "CSL")
            wants = self._reference
        for what, ours, exact in zip(names, got, wants, strict=True):
            if ours is None:
                errs.append(f"{what} missing")
                continue
            err = (ours.float() - exact).abs().max().item()
            scale = max(exact.abs().max().item(), 1e-30)
            if not err <= tol * scale:  # (NaN too)
                errs.append(f"{what} off by {err:.3g} (tolerance {tol * scale:.3g})")
        self.h.grad = self.w.grad = None
        return float((loss - self._reference[0]).abs()), "; ".join(errs) or None

    def peak(self, name: str) -> int | None:
        self.h.grad = self.w.grad = None
        _free(self.device)
        return extra_peak_bytes(self.impls[name], self.device)


def bench_linear_cross_entropy(
    device: torch.device | str,
    *,
    reps: int = 20,
    budget_s: float | None = 30.0,
    compile: bool = True,
    liger: bool = True,
    shapes: list[tuple[int, int, int]] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """Rows (see the module docstring) for every shape of ``LCE_SHAPES[device type]``."""
    dev = torch.device(device)
    rows: list[dict] = []
    for tokens, hidden, vocab in shapes or LCE_SHAPES[dev.type]:
        case = LinearCECase(tokens, hidden, vocab, dev, compile=compile, liger=liger)
        common = {
            "device": str(dev),
            "dtype": _dt(case.dtype),
            "tokens": tokens,
            "hidden": hidden,
            "vocab": vocab,
            "chunk_size": case.chunk_size,
            "logits_bytes": case.logits_bytes,
        }
        shape_rows = {}
        for name in IMPLS:
            row = {**common, "impl": name, "records_csl": case.has_csl[name]}
            if name not in case.impls:
                row["skipped"] = case.skipped.get(name, "not offered")
            else:
                # (every candidate checked, loss and gradients, before it is timed, as the
                # cross-entropy section does: the loss alone was compared, to no tolerance)
                try:
                    row["max_abs_err_loss"], wrong = case.check(name)
                except Exception as exc:
                    row["skipped"] = f"raised while checking: {_why(exc)}"
                    row["correct"], row["check"] = False, row["skipped"]
                    case.impls.pop(name)
                else:
                    row["correct"] = wrong is None
                    if wrong is not None:
                        row["check"] = wrong
                    try:
                        row["peak_bytes"] = case.peak(name)
                    except Exception as exc:  # pragma: no cover - device dependent
                        row["peak_bytes"] = None
                        row["peak_error"] = _why(exc)
            shape_rows[name] = row
        stats, failures = compare(case.impls, dev, reps=reps, budget_s=budget_s)
        for name, row in shape_rows.items():
            if name in stats:
                row.update(_stat_fields(stats[name]))
            elif name in failures:
                row["skipped"] = failures[name]
        eager_peak = shape_rows[EAGER].get("peak_bytes")
        for row in shape_rows.values():
            p = row.get("peak_bytes")
            row["peak_vs_eager"] = p / eager_peak if p is not None and eager_peak else None
        rows.extend(shape_rows.values())
        log(f"linear_cross_entropy {tokens}x{hidden}x{vocab}: done")
        del case
        _free(dev)
    _add_ratios(rows, ("device", "dtype", "tokens", "hidden", "vocab"))
    return rows


def markdown(rows: list[dict]) -> str:
    """A markdown table of :func:`bench_linear_cross_entropy`'s rows."""
    out = [
        "| tokens x hidden x V | dtype | impl | CSL | correct | median | vs eager | peak | "
        "peak / eager |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        shape = f"{r['tokens']} x {r['hidden']} x {r['vocab']}"
        if "median_s" not in r:
            out.append(
                f"| {shape} | {r['dtype']} | {r['impl']} | | | skipped: {r.get('skipped')} | | | |"
            )
            continue
        sp = r.get("speedup_vs", {}).get(EAGER)
        pk = r.get("peak_bytes")
        ratio = r.get("peak_vs_eager")
        out.append(
            f"| {shape} | {r['dtype']} | {r['impl']} | {'yes' if r['records_csl'] else 'no'} | "
            f"{'yes' if r.get('correct', True) else '**NO**: ' + r.get('check', '')} | "
            f"{r['median_s'] * 1e3:.2f} ms | {'' if sp is None else f'{sp:.2f}x'} | "
            f"{'n/a' if pk is None else f'{pk / MiB:.1f} MiB'} | "
            f"{'' if ratio is None else f'{ratio:.2f}'} |"
        )
    return "\n".join(out)
