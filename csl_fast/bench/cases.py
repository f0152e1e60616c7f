"""Op-level cases: cross entropy forward + backward with CSL recording against the
reference eager path, torch.compile, plain ``F.cross_entropy`` and Liger-Kernel; and the
input-gradient norms + scatter against their PyTorch reference."""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .harness import (
    _add_ratios,
    _dt,
    _free,
    _stat_fields,
    _why,
    compare,
    compiled_backends,
    extra_peak_bytes,
    n_buffers,
)

#: Cross-entropy shapes (B, C) and logits dtype per device.
CE_SHAPES = {
    "cpu": [(256, 10), (256, 1000), (64, 32000)],
    "cuda": [(128, 100), (1024, 1000), (4096, 32000), (8192, 128256)],
}


CE_DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


#: Input-gradient shapes and dtypes per device.
GRAD_SHAPES = {
    "cpu": [((256, 3, 32, 32), torch.float32), ((32, 3, 224, 224), torch.float32)],
    "cuda": [
        ((256, 3, 32, 32), torch.bfloat16),
        ((256, 3, 224, 224), torch.bfloat16),
        ((256, 3, 224, 224), torch.float32),
    ],
}


REF = "reference eager"


REF_COMPILE = "torch.compile(reference)"


EAGER_CE = "F.cross_entropy alone (no CSL)"


LIGER = "Liger CE (no CSL)"


def fused_name(backend: str, inplace: bool = False) -> str:
    return f"csl_fast[{backend}]" + (" in place" if inplace else "")


def _reference_forward(x, t, idx, csl):
    losses = F.cross_entropy(x, t, reduction="none")
    csl.index_add_(0, idx, losses.detach().to(csl.dtype))
    return losses.mean()


def _liger_loss():
    """Liger-Kernel's cross-entropy module, or the reason it is unavailable."""
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except Exception:
        try:
            from liger_kernel.transformers import LigerCrossEntropyLoss
        except Exception as exc:
            return None, f"Liger-Kernel not importable ({_why(exc)})"
    return LigerCrossEntropyLoss(), None


class CrossEntropyCase:
    """Forward + backward of cross entropy over logits ``[B, C]``, every candidate.

    ``impls[name](x, t, idx, csl)`` runs forward and backward for a leaf ``x`` (its
    gradient lands in ``x.grad``); ``has_csl[name]`` says whether it also adds the per-row
    losses into ``csl``. ``skipped[name]`` holds why a candidate is not offered here.
    """

    def __init__(
        self,
        batch: int,
        classes: int,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        backends: list[str] | None = None,
        compile: bool = True,
        liger: bool = True,
        buffers: int | None = None,
        num_samples: int = 100_000,
        seed: int = 0,
    ):

        self.batch, self.classes, self.dtype = batch, classes, dtype
        self.device = torch.device(device)
        self.logits_bytes = batch * classes * torch.finfo(dtype).bits // 8
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        nbuf = buffers or n_buffers(self.logits_bytes, dev)
        self.inputs = []
        for _ in range(nbuf):
            x = torch.randn(batch, classes, generator=gen, device=dev, dtype=dtype).mul_(2)
            t = torch.randint(0, classes, (batch,), generator=gen, device=dev)
            idx = torch.randperm(num_samples, generator=gen, device=dev)[:batch]
            self.inputs.append((x.requires_grad_(True), t, idx))
        self.csl = torch.zeros(num_samples, dtype=torch.float32, device=self.device)
        self.impls: dict[str, Callable] = {}
        self.has_csl: dict[str, bool] = {}
        self.skipped: dict[str, str] = {}

        # Every compiled backend this device is meant to measure: timed when it can run,
        # else a skipped row with the reason (never the reference under csl_fast's name).
        status = {b: None for b in backends} if backends else compiled_backends(self.device)
        self.in_place: set[str] = set()
        for b, why in status.items():
            if why is not None:
                self.skipped[fused_name(b)] = why
                continue
            self._add(fused_name(b), _fused(b), True)
            self._add(fused_name(b, inplace=True), _fused(b, inplace=True), True)
            self.in_place.add(fused_name(b, inplace=True))
        self._add(REF, _ref_eager, True)
        if compile:
            self._add_compiled()
        else:
            self.skipped[REF_COMPILE] = "not requested (--no-compile / short run)"
        self._add(EAGER_CE, _eager_ce, False)
        if self.device.type != "cuda":
            self.skipped[LIGER] = "Liger-Kernel is Triton on CUDA only"
        elif liger:
            mod, why = _liger_loss()
            if mod is None:
                self.skipped[LIGER] = why
            else:
                self._add(LIGER, _liger_impl(mod), False)
                self.in_place.add(LIGER)  # (its gradient overwrites the logits too)
        else:
            self.skipped[LIGER] = "not requested"

    def _add(self, name, fn, has_csl):
        self.impls[name] = fn
        self.has_csl[name] = has_csl

    def _add_compiled(self):
        try:
            torch._dynamo.reset()  # a fresh cache per shape: no silent fallback to eager
            compiled = torch.compile(_reference_forward, dynamic=False, fullgraph=True)
        except Exception as exc:
            self.skipped[REF_COMPILE] = f"torch.compile failed: {_why(exc)}"
            return

        def run(x, t, idx, csl):
            loss = compiled(x, t, idx, csl)
            loss.backward()
            return loss

        self._add(REF_COMPILE, run, True)

    @property
    def bytes_moved(self) -> int:
        """One read and one write of the logits."""
        return 2 * self.logits_bytes

    def timed(self, name: str) -> Callable[[], None]:
        """One forward + backward of ``name``, on the next input buffer of the rotation (a
        copy of its own for a candidate that writes its gradient over the logits: on the
        shared buffers it left the others timed on gradient values, std 1e-4 for 2)."""
        inputs = self.inputs
        if name in self.in_place:
            inputs = [(x.detach().clone().requires_grad_(True), t, i) for x, t, i in inputs]
        impl, cyc, csl = self.impls[name], itertools.cycle(inputs), self.csl

        def call():
            x, t, idx = next(cyc)
            impl(x, t, idx, csl)
            x.grad = None

        return call

    def check(self, name: str) -> str | None:
        """None when ``name`` matches F.cross_entropy in float32 (loss, logits gradient and,
        when it records one, the CSL increment), else what differs."""
        x0, t, idx = self.inputs[0]
        x = x0.detach().clone().requires_grad_(True)
        csl = torch.zeros_like(self.csl)
        try:
            loss = self.impls[name](x, t, idx, csl)
            if loss is None:
                return "returned no loss"
            loss = loss.detach().float()
            grad = x.grad
        except Exception as exc:
            return f"raised {_why(exc)}"
        z = x0.detach().float().requires_grad_(True)
        rows = F.cross_entropy(z, t, reduction="none")
        rows.mean().backward()
        ref_csl = torch.zeros_like(csl).index_add_(0, idx, rows.detach())
        tol = 1e-4 if self.dtype in (torch.float32, torch.float64) else 3e-2
        errs = []
        for what, ours, exact in (
            ("loss", loss, rows.detach().mean()),
            ("grad", grad, z.grad),
            *((("csl", csl, ref_csl),) if self.has_csl[name] else ()),
        ):
            if ours is None:
                errs.append(f"{what} missing")
                continue
            err = (ours.float() - exact).abs().max().item() if exact.numel() else 0.0
            scale = max(exact.abs().max().item() if exact.numel() else 0.0, 1e-30)
            if not err <= tol * scale:
                errs.append(f"{what}: max error {err:.3g} > {tol:g} x {scale:.3g}")
        return "; ".join(errs) or None

    def peak(self, name: str) -> int | None:
        """Extra peak bytes of one forward + backward beyond the inputs and the logits
        gradient it must return (one logits-sized buffer, except in place)."""
        fn = self.timed(name)
        got = extra_peak_bytes(fn, self.device)
        if got is None or name in self.in_place:
            return got
        return got - self.logits_bytes


def _fused(backend: str, inplace: bool = False):
    import csl_fast

    def run(x, t, idx, csl):
        # In place needs logits made by the graph, not the leaf: a view costs nothing.
        # Like Liger's, the gradient then overwrites the input buffer (a copy of its own:
        # CrossEntropyCase.timed), whose values drift, which does not change the work done.
        z = x.view_as(x) if inplace else x
        loss = csl_fast.accumulate(z, t, idx, csl, backend=backend, inplace_grad=inplace)
        loss.backward()
        return loss

    return run


def _ref_eager(x, t, idx, csl):
    loss = _reference_forward(x, t, idx, csl)
    loss.backward()
    return loss


def _eager_ce(x, t, idx, csl):
    loss = F.cross_entropy(x, t)
    loss.backward()
    return loss


def _liger_impl(mod):
    def run(x, t, idx, csl):
        # Liger writes the gradient into its input during the forward, so it runs on the
        # leaf itself; the rotation makes each buffer's values drift, which does not change
        # the work done.
        loss = mod(x, t)
        loss.backward()
        return loss

    return run


def bench_cross_entropy(
    device: torch.device | str,
    shapes: list[tuple[int, int]] | None = None,
    dtype: torch.dtype | None = None,
    *,
    reps: int = 50,
    budget_s: float | None = 20.0,
    compile: bool = True,
    liger: bool = True,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """One row per (shape, candidate): time, GB/s, extra peak memory, correctness."""
    dev = torch.device(device)
    shapes = shapes or CE_SHAPES[dev.type]
    dtype = dtype or CE_DTYPE[dev.type]
    rows = []
    for batch, classes in shapes:
        log(f"cross entropy {batch}x{classes} {_dt(dtype)} on {dev.type}")
        case = CrossEntropyCase(batch, classes, dtype, dev, compile=compile, liger=liger)
        checks = {}
        for name in list(case.impls):
            t0 = time.perf_counter()
            checks[name] = case.check(name)
            if name == REF_COMPILE:
                log(f"  compiled the reference in {time.perf_counter() - t0:.1f}s")
            if checks[name] is not None and checks[name].startswith("raised"):
                case.skipped[name] = checks[name]
                del case.impls[name]
        stats, failed = compare(
            {n: case.timed(n) for n in case.impls}, dev, reps=reps, budget_s=budget_s
        )
        case.skipped.update(failed)
        head = {"batch": batch, "classes": classes, "dtype": _dt(dtype), "device": dev.type}
        for name, s in stats.items():
            peak = case.peak(name)
            rows.append(
                {
                    **head,
                    "impl": name,
                    "csl": case.has_csl[name],
                    **_stat_fields(s),
                    "gbps": case.bytes_moved / s.median / 1e9,
                    "logits_bytes": case.logits_bytes,
                    "extra_peak_bytes": peak,
                    "extra_peak_logits": None if peak is None else peak / case.logits_bytes,
                    "correct": checks[name] is None,
                    "check_error": checks[name],
                    "buffers": len(case.inputs),
                }
            )
        rows += _skipped_rows(head, case.skipped, checks)
        del case
        _free(dev)
    _add_ratios(rows, ("batch", "classes"))
    return rows


def _skipped_rows(head: dict, skipped: dict[str, str], checks: dict[str, str | None]) -> list[dict]:
    """A row per candidate not timed; one whose check failed or raised says so, since a
    failed check is an error of the run, not a skip."""
    rows = []
    for name, why in skipped.items():
        row = {**head, "impl": name, "skipped": why}
        if checks.get(name) is not None:
            row.update(correct=False, check_error=checks[name])
        rows.append(row)
    return rows


class InputGradCase:
    """Per-sample squared norms of a batch gradient ``[B, ...]`` scattered into an ``[N]``
    buffer: csl_fast's kernel against ``grad.flatten(1).pow(2).sum(1)`` + ``index_add_``."""

    def __init__(
        self,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        compile: bool = False,
        num_samples: int = 100_000,
        seed: int = 0,
    ):
        self.shape, self.dtype, self.device = shape, dtype, torch.device(device)
        self.nbytes = math.prod(shape) * torch.finfo(dtype).bits // 8
        dev = self.device
        gen = torch.Generator(device=dev).manual_seed(seed)
        self.inputs = []
        for _ in range(n_buffers(self.nbytes, dev)):
            g = torch.randn(shape, generator=gen, device=dev, dtype=dtype).mul_(1e-3)
            idx = torch.randperm(num_samples, generator=gen, device=dev)[: shape[0]]
            self.inputs.append((g, idx))
        self.buf = torch.zeros(num_samples, dtype=torch.float32, device=self.device)
        self.scale = float(shape[0])
        self.impls: dict[str, Callable] = {}
        self.skipped: dict[str, str] = {}
        for b, why in compiled_backends(self.device).items():
            if why is not None:
                self.skipped[fused_name(b)] = why
            else:
                self.impls[fused_name(b)] = _norms_fused(b, self.scale)
        self.impls[REF] = _norms_ref(self.scale)
        if compile:
            try:
                torch._dynamo.reset()
                self.impls[REF_COMPILE] = torch.compile(
                    _norms_ref(self.scale), dynamic=False, fullgraph=True
                )
            except Exception as exc:
                self.skipped[REF_COMPILE] = f"torch.compile failed: {_why(exc)}"
        else:
            self.skipped[REF_COMPILE] = "not requested"

    def timed(self, name: str) -> Callable[[], None]:
        impl, cyc, buf = self.impls[name], itertools.cycle(self.inputs), self.buf

        def call():
            g, idx = next(cyc)
            impl(g, idx, buf)

        return call

    def check(self, name: str) -> str | None:
        g, idx = self.inputs[0]
        buf = torch.zeros_like(self.buf, dtype=torch.float64)
        out = torch.zeros_like(self.buf)
        try:
            self.impls[name](g, idx, out)
        except Exception as exc:
            return f"raised {_why(exc)}"
        exact = (g.double().flatten(1) * self.scale).square().sum(1)
        buf.index_add_(0, idx, exact)
        tol = 1e-5 if self.dtype in (torch.float32, torch.float64) else 2e-2
        err = (out.double() - buf).abs().max().item()
        scale = max(buf.abs().max().item(), 1e-30)
        return None if err <= tol * scale else f"max error {err:.3g} > {tol:g} x {scale:.3g}"


def _norms_fused(backend: str, scale: float):
    from .. import ops

    def run(g, idx, buf):
        buf.index_add_(0, idx, ops.input_grad_norms(g, scale, backend=backend))

    return run


def _norms_ref(scale: float):
    def run(g, idx, buf):
        buf.index_add_(0, idx, (g.flatten(1).pow(2).sum(1) * (scale * scale)).float())

    return run


def bench_input_grad(
    device: torch.device | str,
    shapes: list[tuple[tuple[int, ...], torch.dtype]] | None = None,
    *,
    reps: int = 50,
    budget_s: float | None = 10.0,
    compile: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    dev = torch.device(device)
    rows = []
    for shape, dtype in shapes or GRAD_SHAPES[dev.type]:
        log(f"input-grad norms {'x'.join(map(str, shape))} {_dt(dtype)} on {dev.type}")
        case = InputGradCase(shape, dtype, dev, compile=compile)
        checks = {n: case.check(n) for n in case.impls}
        stats, failed = compare(
            {n: case.timed(n) for n in case.impls}, dev, reps=reps, budget_s=budget_s
        )
        case.skipped.update(failed)
        head = {"shape": "x".join(map(str, shape)), "dtype": _dt(dtype), "device": dev.type}
        for name, s in stats.items():
            rows.append(
                {
                    **head,
                    "impl": name,
                    **_stat_fields(s),
                    "gbps": case.nbytes / s.median / 1e9,
                    "correct": checks[name] is None,
                    "check_error": checks[name],
                }
            )
        rows += _skipped_rows(head, case.skipped, checks)
        del case
        _free(dev)
    _add_ratios(rows, ("shape", "dtype"))
    return rows
