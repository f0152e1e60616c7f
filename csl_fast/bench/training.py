"""Training workloads (MLP, small CNN, a 32000-class classifier) and whole SGD steps in
each tracking variant; the tracking cost timed apart from the model; tracker memory."""

from __future__ import annotations

import itertools
import tracemalloc
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .harness import Stats, _free, _stat_fields, compare, compiled_backend

WORKLOADS = ("mlp", "cnn", "large_class")


LARGE_C = 32000


STEP_PLAIN = "plain F.cross_entropy"


STEP_CSL = "csl_fast.accumulate (CSL only)"


STEP_TRACKER = "csl_fast CSLTracker (all dynamics)"


STEP_XGRAD = "plain + dL/dx computed (no tracking)"


STEP_FULL = "csl_fast full: CSLTracker + watch"


STEP_HOST = "host logging (AUM/Cartography style)"


STEP_VARIANTS = (STEP_PLAIN, STEP_CSL, STEP_TRACKER, STEP_XGRAD, STEP_FULL, STEP_HOST)


SHORT_VARIANTS = (STEP_PLAIN, STEP_TRACKER, STEP_FULL, STEP_HOST)


#: What a difference from the plain step shows when there is none: the plain step was
#: skipped (it raised, e.g. out of memory) or not among the variants asked for.
NO_PLAIN = "n/a (no plain baseline)"


def vs_plain(value: float | None, fmt: Callable[[float], str]) -> str:
    """``fmt(value)`` for a difference from the plain step (``overhead_pct``, ``cost_s``...),
    :data:`NO_PLAIN` where it is None."""
    return NO_PLAIN if value is None else fmt(value)


def fmt_overhead(pct: float | None) -> str:
    return vs_plain(pct, "{:+.1f}%".format)


#: The variants that run csl_fast: they need a compiled backend (see :class:`TrainingCase`).
CSL_VARIANTS = (STEP_CSL, STEP_TRACKER, STEP_FULL)


def make_workload(kind: str, device: torch.device | str, seed: int = 0):
    """``(model, input_shape, batch, classes)`` for a named workload on ``device``.

    mlp: CIFAR-sized input (3x32x32) -> 1024 -> 1024 -> 10 (4096 wide on CUDA);
    cnn: three 3x3 convolutions (32/64/128 channels, no BatchNorm so input-gradient rows
    stay per-sample) + linear, 10 classes; large_class: 512 -> 512 -> 32000 (1024 on CUDA).
    """
    cuda = torch.device(device).type == "cuda"
    torch.manual_seed(seed)
    if kind == "mlp":
        h = 4096 if cuda else 1024
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(3072, h),
            nn.ReLU(),
            nn.Linear(h, h),
            nn.ReLU(),
            nn.Linear(h, 10),
        )
        shape, batch, classes = (3, 32, 32), (1024 if cuda else 256), 10
    elif kind == "cnn":
        w = 2 if cuda else 1
        model = nn.Sequential(
            nn.Conv2d(3, 32 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32 * w, 64 * w, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64 * w, 128 * w, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(128 * w, 10),
        )
        shape, batch, classes = (3, 32, 32), (256 if cuda else 64), 10
    elif kind == "large_class":
        f = 1024 if cuda else 512
        model = nn.Sequential(nn.Linear(f, f), nn.ReLU(), nn.Linear(f, LARGE_C))
        shape, batch, classes = (f,), (2048 if cuda else 128), LARGE_C
    else:
        raise ValueError(f"unknown workload {kind!r}; pick one of {WORKLOADS}")
    return model.to(device), shape, batch, classes


def _host_log(
    logits: torch.Tensor,
    y: torch.Tensor,
    idx: torch.Tensor,
    log: dict[int, list[tuple[float, float, float, float]]],
) -> None:
    """What AUM / Dataset Cartography do: per-sample values computed on the device, copied
    to the host every step, recorded in a Python loop."""
    with torch.no_grad():
        z = logits.detach().float()
        z_y = z.gather(1, y[:, None])[:, 0]
        other = z.scatter(1, y[:, None], float("-inf")).amax(1)
        loss = F.cross_entropy(z, y, reduction="none")
        vals = torch.stack([loss, torch.exp(-loss), z_y - other, z.argmax(1) == y])
        vals = vals.cpu().tolist()
    for j, i in enumerate(idx.cpu().tolist()):
        log.setdefault(i, []).append((vals[0][j], vals[1][j], vals[2][j], vals[3][j]))


class TrainingCase:
    """Whole SGD steps of one workload in each tracking variant (one shared model).

    ``backend``: the kernel backend csl_fast's variants (:data:`CSL_VARIANTS`) run, passed to
    ``accumulate`` and the tracker by name. None (the default): the compiled backend for the
    device (:func:`~csl_fast.bench.harness.compiled_backend`); without one, :attr:`backend` is
    None, :attr:`no_backend` says why, and those variants cannot be built, so the pure-PyTorch
    fallback is never timed under csl_fast's name."""

    def __init__(
        self,
        kind: str,
        device: torch.device | str,
        *,
        num_samples: int = 50_000,
        batches: int = 4,
        seed: int = 0,
        backend: str | None = None,
    ):
        import csl_fast

        self.kind, self.device = kind, torch.device(device)
        self.no_backend: str | None = None
        if backend is None:
            backend, self.no_backend = compiled_backend(self.device)
        self.backend = backend
        self.model, shape, self.batch, self.classes = make_workload(kind, self.device, seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=1e-3, momentum=0.9)
        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.data = [
            (
                torch.randn(self.batch, *shape, generator=gen).to(self.device),
                torch.randint(0, self.classes, (self.batch,), generator=gen).to(self.device),
                torch.randperm(num_samples, generator=gen)[: self.batch].to(self.device),
            )
            for _ in range(batches)
        ]
        self.num_samples = num_samples
        self.csl = torch.zeros(num_samples, device=self.device)
        self.tracker = csl_fast.CSLTracker(
            num_samples, self.classes, device=self.device, backend=backend or "reference"
        )
        self.host_log: dict[int, list[tuple[float, float, float, float]]] = {}

    def step_fn(self, variant: str, loss_only: bool = False) -> Callable[[], None]:
        """One training step in ``variant``.

        ``loss_only``: only the part the variants differ in, apart from the model: the loss
        on the model's logits of the batch (a fresh leaf each call) and its backward, the
        recording, and for the variants that need dL/dx (``STEP_XGRAD``, ``STEP_FULL``) a
        backward of a fixed gradient into a fresh leaf of the input, through
        :meth:`csl_fast.CSLTracker.watch` for ``STEP_FULL``. (What the model's own backward
        into its input costs is the same in both and is left out.)"""
        import csl_fast

        if variant not in STEP_VARIANTS:
            raise ValueError(f"unknown variant {variant!r}; pick from {STEP_VARIANTS}")
        if variant in CSL_VARIANTS and self.backend is None:
            raise RuntimeError(f"{variant}: {self.no_backend}")
        backend = self.backend
        model, opt, tracker, csl = self.model, self.opt, self.tracker, self.csl
        host_log = self.host_log
        plain_loss = variant in (STEP_PLAIN, STEP_XGRAD, STEP_HOST)
        into = csl if variant == STEP_CSL else tracker

        def loss_of(logits, y, idx):
            if plain_loss:
                return F.cross_entropy(logits, y)
            return csl_fast.accumulate(logits, y, idx, into, backend=backend)

        def input_leaf(x, idx):
            if variant == STEP_FULL:
                return tracker.watch(x.detach(), idx)
            if variant == STEP_XGRAD:
                return x.detach().requires_grad_(True)
            return x

        if loss_only:
            with torch.no_grad():
                data = [(x, y, idx, model(x), torch.ones_like(x)) for x, y, idx in self.data]
            cyc = itertools.cycle(data)

            def step():
                x, y, idx, logits, dx = next(cyc)
                z = logits.detach().requires_grad_(True)
                loss_of(z, y, idx).backward()
                if variant in (STEP_XGRAD, STEP_FULL):
                    input_leaf(x, idx).backward(dx)
                if variant == STEP_HOST:
                    _host_log(z, y, idx, host_log)

        else:
            cyc = itertools.cycle(self.data)

            def step():
                x, y, idx = next(cyc)
                logits = model(input_leaf(x, idx))
                loss_of(logits, y, idx).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if variant == STEP_HOST:
                    _host_log(logits, y, idx, host_log)

        return step

    def check(self) -> str | None:
        """The tracked step's loss equals F.cross_entropy on the same batch, and the
        tracker's CSL equals F.cross_entropy's per-row losses at the batch's indices."""
        import csl_fast

        x, y, idx = self.data[0]
        backend = self.backend or "reference"
        tracker = csl_fast.CSLTracker(
            self.num_samples, self.classes, device=self.device, backend=backend
        )
        with torch.no_grad():
            logits = self.model(x)
            ours = csl_fast.accumulate(logits, y, idx, tracker, backend=backend)
            rows = F.cross_entropy(logits, y, reduction="none")
        errs = []
        if not torch.allclose(ours, rows.mean(), rtol=1e-4, atol=1e-6):
            errs.append(f"loss {ours.item():.6g} != {rows.mean().item():.6g}")
        if not torch.allclose(tracker.csl_sum[idx], rows, rtol=1e-4, atol=1e-5):
            errs.append("tracker CSL differs from F.cross_entropy per-row losses")
        return "; ".join(errs) or None


def _step_rows(
    kind: str,
    dev: torch.device,
    variants: tuple[str, ...],
    fields: Callable[[Stats, Stats | None], dict],
    *,
    loss_only: bool,
    what: str,
    log: Callable[[str], None],
    **timing: Any,
) -> list[dict]:
    """Time ``variants`` of one workload round-robin (whole steps, or their ``loss_only``
    part) and return one row per variant: the timing plus ``fields(stats, plain)`` (and, for
    whole steps, the workload's correctness check), or ``skipped`` with the reason."""
    case = TrainingCase(kind, dev)
    log(f"{what} {kind} (B={case.batch}, C={case.classes}) on {dev.type}")
    checked = {} if loss_only else {"check_error": case.check()}
    # Without a compiled backend csl_fast's variants are skipped with the reason.
    missing = {v: case.no_backend for v in variants if v in CSL_VARIANTS and case.backend is None}
    stats, failed = compare(
        {v: case.step_fn(v, loss_only=loss_only) for v in variants if v not in missing},
        dev,
        wall_clock=True,
        **timing,
    )
    plain = stats.get(STEP_PLAIN)
    head = {"workload": kind, "batch": case.batch, "classes": case.classes, "device": dev.type}
    rows = [
        {
            **head,
            "variant": v,
            # The backend csl_fast's variants ran on (None for the others).
            "backend": case.backend if v in CSL_VARIANTS else None,
            **_stat_fields(s),
            **fields(s, plain),
            **checked,
        }
        for v, s in stats.items()
    ]
    rows += [
        {"workload": kind, "device": dev.type, "variant": v, "skipped": why}
        for v, why in {**missing, **failed}.items()
    ]
    del case
    _free(dev)
    return rows


def bench_training(
    device: torch.device | str,
    workloads: tuple[str, ...] = WORKLOADS,
    variants: tuple[str, ...] = STEP_VARIANTS,
    *,
    reps: int = 20,
    budget_s: float | None = 30.0,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    def fields(s: Stats, plain: Stats | None) -> dict:
        return {
            "overhead_pct": None if plain is None else (s.median / plain.median - 1) * 100,
            "overhead_ms": None if plain is None else (s.median - plain.median) * 1e3,
        }

    rows = []
    for kind in workloads:
        rows += _step_rows(
            kind,
            torch.device(device),
            variants,
            fields,
            loss_only=False,
            what="training step",
            log=log,
            reps=reps,
            warmup=2,
            min_sample_s=0.0,
            budget_s=budget_s,
        )
    return rows


def bench_tracking_cost(
    device: torch.device | str,
    workloads: tuple[str, ...] = WORKLOADS,
    *,
    reps: int = 200,
    budget_s: float | None = 10.0,
    log: Callable[[str], None] = lambda s: None,
) -> list[dict]:
    """What tracking adds to a step, timed apart from the model.

    A whole step's median moves by more than a millisecond between runs on a CPU (a few
    percent of the step), so sub-millisecond differences between variants cannot be read
    off whole steps. The variants only differ from the loss on, so this times that part
    alone (:meth:`TrainingCase.step_fn` with ``loss_only``) on each workload's real
    logits, interleaved over many repetitions: ``cost`` = variant - plain."""

    def fields(s: Stats, plain: Stats | None) -> dict:
        return {"cost_s": None if plain is None else s.median - plain.median}

    rows = []
    for kind in workloads:
        rows += _step_rows(
            kind,
            torch.device(device),
            STEP_VARIANTS,
            fields,
            loss_only=True,
            what="tracking cost",
            log=log,
            reps=reps,
            warmup=5,
            budget_s=budget_s,
        )
    return rows


def bench_tracker_memory(device: torch.device | str, num_samples: int = 100_000) -> list[dict]:
    """Bytes per sample of :class:`csl_fast.CSLTracker` configurations, and of a host-side
    Python log (dict of per-sample lists of tuples, as AUM/Cartography-style code keeps)."""
    import csl_fast

    rows = []
    for label, kw in (
        ("CSLTracker float32", {}),
        ("CSLTracker float64", {"dtype": torch.float64}),
        ("CSLTracker float32, history=True", {"history": True}),
    ):
        tr = csl_fast.CSLTracker(num_samples, 10, device=device, **kw)
        rows.append({"what": label, "bytes_per_sample": tr.nbytes() / num_samples, "grows": "no"})
        del tr
    rows.append(
        {
            "what": "CSLTracker input-gradient history",
            "bytes_per_sample": 4.0,
            "grows": "per epoch, once input gradients are recorded",
        }
    )
    rows.append(
        {
            "what": "CSLTracker history=True loss curves",
            "bytes_per_sample": 2.0,
            "grows": "per epoch (and per eval pass)",
        }
    )
    n = 20_000
    src = torch.rand(4, n, dtype=torch.float64)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    log: dict[int, list[tuple[float, float, float, float]]] = {}
    sizes = []
    for _epoch in range(2):
        vals = src.tolist()  # fresh Python floats, as .tolist() makes every step
        for i in range(n):
            log.setdefault(i, []).append((vals[0][i], vals[1][i], vals[2][i], vals[3][i]))
        del vals
        sizes.append(tracemalloc.get_traced_memory()[0] - base)
    tracemalloc.stop()
    first, second = sizes[0], sizes[1] - sizes[0]
    rows.append(
        {
            "what": "host log: dict of lists of 4-float tuples (first epoch)",
            "bytes_per_sample": first / n,
            "grows": f"+{second / n:.0f} B per sample per epoch",
        }
    )
    return rows
