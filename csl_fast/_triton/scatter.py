"""Scatter per-row statistics into dataset-sized buffers (Triton).

``csl_fast::scatter_stats_triton`` has the semantics of :func:`csl_fast.reference.scatter_stats`:
``csl[index[i]] += stats[LOSS, i]`` and ``count[index[i]] += stats[VALID, i]``, duplicate
indices adding up. ``csl`` is float32 or float64; ``count`` float32, float64, int32 or int64.
Values are converted to the buffer's dtype before they are added.

Two modes:

* ``deterministic=False`` (default): one relaxed ``atomic_add`` per row and buffer. Correct
  with duplicate indices, but with duplicates the order of the float additions (hence the
  last bits of the result) can change from run to run. Cost: B atomics, nothing else.
* ``deterministic=True``: a stable ``torch.sort`` of ``index`` (O(B log B), a few extra
  small launches and a ``[B]`` int64 permutation), then one Triton pass in which the first
  row of each run of equal indices reads ``csl[k]``, adds the run's values one by one in
  original row order and writes the result back (no atomics: each index has one writer).
  The result is bitwise reproducible and equal to a sequential ``index_add_`` in row order.
  A run of ``r`` duplicates costs ``r`` dependent steps in one lane, so a batch whose rows
  all share one index is serial.

An index outside a buffer's ``[0, N)`` is skipped for that buffer, as by the CUDA C++
kernels and :func:`csl_fast._triton.record_last_triton`: nothing is written outside the
buffers. Range checks that raise are the caller's (``csl_fast.accumulate(validate=True)``,
which reads the indices on the host).

Triton's interpreter has no bfloat16/float16 atomics; neither is an allowed buffer dtype, so
no fallback is needed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ..stats import NUM_STATS
from ._registry import register

#: Rows per program.
BLOCK = 1024


@triton.jit
def _scatter_atomic_kernel(
    stats_ptr,
    index_ptr,
    csl_ptr,
    count_ptr,
    B,
    N_CSL,
    N_CNT,
    stride_sr,
    stride_sc,
    stride_csl,
    stride_cnt,
    HAS_CSL: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < B
    sr = tl.cast(stride_sr, tl.int64)  # 5 * stride_sr wraps in int32 from B = 2**31 / 5 on
    key = tl.load(index_ptr + offs, mask=mask, other=0).to(tl.int64)
    if HAS_CSL:
        ok = mask & (key >= 0) & (key < N_CSL)  # out-of-range indices are skipped
        v = tl.load(stats_ptr + offs * stride_sc, mask=ok, other=0.0)
        tl.atomic_add(
            csl_ptr + key * stride_csl, v.to(csl_ptr.dtype.element_ty), mask=ok, sem="relaxed"
        )
    if HAS_COUNT:
        ok = mask & (key >= 0) & (key < N_CNT)
        c = tl.load(stats_ptr + 5 * sr + offs * stride_sc, mask=ok, other=0.0)
        tl.atomic_add(
            count_ptr + key * stride_cnt, c.to(count_ptr.dtype.element_ty), mask=ok, sem="relaxed"
        )


@triton.jit
def _scatter_sorted_kernel(
    stats_ptr,
    sorted_ptr,
    perm_ptr,
    csl_ptr,
    count_ptr,
    B,
    N_CSL,
    N_CNT,
    stride_sr,
    stride_sc,
    stride_csl,
    stride_cnt,
    HAS_CSL: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < B
    sr = tl.cast(stride_sr, tl.int64)  # 5 * stride_sr wraps in int32 from B = 2**31 / 5 on
    key = tl.load(sorted_ptr + offs, mask=mask, other=0).to(tl.int64)
    prev = tl.load(sorted_ptr + offs - 1, mask=mask & (offs > 0), other=0).to(tl.int64)
    start = mask & ((offs == 0) | (key != prev))
    # A run whose index is outside a buffer is walked but neither read nor written there.
    if HAS_CSL:
        ok_csl = start & (key >= 0) & (key < N_CSL)
        acc_csl = tl.load(csl_ptr + key * stride_csl, mask=ok_csl, other=0.0)
    if HAS_COUNT:
        ok_cnt = start & (key >= 0) & (key < N_CNT)
        acc_cnt = tl.load(count_ptr + key * stride_cnt, mask=ok_cnt, other=0)
    pos = offs
    run = start
    while tl.max(run.to(tl.int32), 0) > 0:
        row = tl.load(perm_ptr + pos, mask=run, other=0).to(tl.int64)
        if HAS_CSL:
            v = tl.load(stats_ptr + row * stride_sc, mask=run, other=0.0).to(
                csl_ptr.dtype.element_ty
            )
            acc_csl = tl.where(run, acc_csl + v, acc_csl)
        if HAS_COUNT:
            c = tl.load(stats_ptr + 5 * sr + row * stride_sc, mask=run, other=0.0)
            c = c.to(count_ptr.dtype.element_ty)
            acc_cnt = tl.where(run, acc_cnt + c, acc_cnt)
        pos = pos + 1
        nxt = tl.load(sorted_ptr + pos, mask=run & (pos < B), other=0).to(tl.int64)
        run = run & (pos < B) & (nxt == key)
    if HAS_CSL:
        tl.store(csl_ptr + key * stride_csl, acc_csl, mask=ok_csl)
    if HAS_COUNT:
        tl.store(count_ptr + key * stride_cnt, acc_cnt, mask=ok_cnt)


_INDEX_DTYPES = (torch.int64, torch.int32)
_COUNT_DTYPES = (torch.float32, torch.float64, torch.int32, torch.int64)


def check_stats_index(op: str, stats: torch.Tensor, index: torch.Tensor) -> int:
    """``stats`` float32 ``[NUM_STATS, B]`` and ``index`` int64/int32 ``[B]`` on its device,
    as the C++ ops require (csrc/checks.h): the kernels read row ``k`` of ``stats`` at
    ``k * stride(0)`` and ``B`` entries of each, so a shorter one would be read past its
    end. Returns ``B``."""
    if stats.dim() != 2 or stats.shape[0] != NUM_STATS or stats.dtype != torch.float32:
        raise ValueError(
            f"csl_fast.{op}: stats must be the float32 [{NUM_STATS}, B] statistics of the "
            f"fused cross entropy, got {stats.dtype} {tuple(stats.shape)}"
        )
    batch = stats.shape[1]
    if index.dim() != 1 or index.shape[0] != batch:
        raise ValueError(
            f"csl_fast.{op}: index must be 1-D with one dataset index per batch row (stats "
            f"has B = {batch} columns), got shape {tuple(index.shape)}"
        )
    if index.dtype not in _INDEX_DTYPES:
        raise TypeError(
            f"csl_fast.{op}: index must hold int64 or int32 dataset indices, got "
            f"{index.dtype}; convert it with index.long()"
        )
    check_device(op, "index", index, stats.device)
    return batch


def check_device(op: str, name: str, t: torch.Tensor, device: torch.device) -> None:
    """A kernel reads every pointer on one device."""
    if t.device != device:
        raise ValueError(
            f"csl_fast.{op}: {name} is on {t.device} but stats are on {device}; move it "
            f"with .to({str(device)!r})"
        )


def _check_buffer(
    name: str, buf: torch.Tensor, dtypes: tuple[torch.dtype, ...], device: torch.device
) -> None:
    if buf.dtype not in dtypes:
        raise TypeError(
            f"csl_fast.scatter_stats_triton: {name} must be a tensor of dtype "
            f"{' or '.join(str(d) for d in dtypes)}, got {buf.dtype}; allocate it with "
            "torch.zeros(num_samples, dtype=torch.float32)"
        )
    # Any stride >= 1: stride 0 (an expanded tensor) would add every sample into one entry.
    if buf.dim() != 1 or (buf.shape[0] > 1 and buf.stride(0) < 1):
        raise ValueError(
            f"csl_fast.scatter_stats_triton: {name} must be a 1-D tensor of one entry per "
            f"dataset sample (not an expanded view), got shape {tuple(buf.shape)} and "
            f"strides {tuple(buf.stride())}"
        )
    check_device("scatter_stats_triton", name, buf, device)


def _fake_scatter(stats, index, deterministic, csl, count):
    return None


@register(
    "csl_fast::scatter_stats_triton",
    kernel=_scatter_atomic_kernel,
    mutates_args=("csl", "count"),
    fake=_fake_scatter,
)
def scatter_stats_triton(
    stats: torch.Tensor,
    index: torch.Tensor,
    deterministic: bool,
    csl: torch.Tensor | None,
    count: torch.Tensor | None,
) -> None:
    """``csl[index[i]] += stats[0, i]``, ``count[index[i]] += stats[5, i]`` (see module doc).

    Args:
        stats: float32 ``[NUM_STATS, B]`` from ``cross_entropy_fwd_triton`` (any strides).
        index: ``[B]`` int32/int64 dataset indices in ``[0, N)``; duplicates allowed; an
            index outside a buffer is skipped for that buffer.
        deterministic: sort-based, bitwise reproducible mode instead of atomics.
        csl: float32/float64 ``[N]`` buffer (any stride), updated in place (or None).
        count: float32/float64/int32/int64 ``[N]`` buffer (any stride), updated in place (or None).
    """
    batch = check_stats_index("scatter_stats_triton", stats, index)
    if csl is not None:
        _check_buffer("csl", csl, _COUNT_DTYPES[:2], stats.device)
    if count is not None:
        _check_buffer("count", count, _COUNT_DTYPES, stats.device)
        if csl is not None and count.shape[0] != csl.shape[0]:
            raise ValueError(
                f"csl_fast.scatter_stats_triton: count has {count.shape[0]} entries but csl "
                f"has {csl.shape[0]}; both need one entry per dataset sample"
            )
    if batch == 0 or (csl is None and count is None):
        return
    dummy = csl if csl is not None else count
    grid = (triton.cdiv(batch, BLOCK),)
    sizes_strides = (
        csl.shape[0] if csl is not None else 0,
        count.shape[0] if count is not None else 0,
        stats.stride(0),
        stats.stride(1),
        csl.stride(0) if csl is not None else 0,
        count.stride(0) if count is not None else 0,
    )
    common = dict(HAS_CSL=csl is not None, HAS_COUNT=count is not None, BLOCK=BLOCK, num_warps=4)
    if deterministic:
        sorted_index, perm = torch.sort(index, stable=True)
        wrap_triton(_scatter_sorted_kernel)[grid](
            stats,
            sorted_index,
            perm,
            csl if csl is not None else dummy,
            count if count is not None else dummy,
            batch,
            *sizes_strides,
            **common,
        )
    else:
        wrap_triton(_scatter_atomic_kernel)[grid](
            stats,
            index.contiguous(),
            csl if csl is not None else dummy,
            count if count is not None else dummy,
            batch,
            *sizes_strides,
            **common,
        )
