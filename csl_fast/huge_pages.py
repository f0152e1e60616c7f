"""Transparent huge pages for a tracker's CPU buffers.

A shuffled loader writes each batch's samples at random places in about 20 ``[N]``
buffers. At millions of samples every such write misses the cache, and with 4 KiB pages
it also misses the TLB. One 2 MiB page per TLB entry removes that second miss, about half
of what recording adds at 10 million samples (``benchmarks/results/record_scale*.md``).
PyTorch asks the kernel for huge pages only when ``THP_MEM_ALLOC_ENABLE=1`` is set before
it starts; the tracker asks for its own buffers, which are allocated once and live as long
as the run.

The advice is ``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned interior of a new buffer,
then ``MADV_DONTNEED`` on the same range: the allocator may hand back memory an earlier,
freed allocation had faulted in on small pages, and a new buffer's contents are not
needed, so dropping them makes the first write fault huge pages in. It uses no memory
beyond the buffer, is a no-op where the kernel's mode is ``never`` or the platform is not Linux,
and is dropped silently where the kernel refuses it: it changes speed, never a value.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from functools import cache
from typing import Any

import torch

_FALLBACK_PAGE = 2 << 20
_ASKING = ContextVar("csl_fast_huge_pages", default=True)


@contextlib.contextmanager
def not_asked() -> Iterator[None]:
    """Trackers made inside stay on the allocator's pages. For code that only reads a
    tracker (the CLI): huge pages pay off in the random writes of recording, and on some
    machines (virtual ones whose host backs memory lazily) faulting them in the first time
    costs seconds at millions of samples (``benchmarks/results/load_scale.md``)."""
    token = _ASKING.set(False)
    try:
        yield
    finally:
        _ASKING.reset(token)


@cache
def _madvise() -> tuple[Any, int] | None:
    """``(libc madvise, huge page size)``, or None where there is none."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    try:
        with open("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size") as f:
            page = int(f.read())
    except (OSError, ValueError):
        page = _FALLBACK_PAGE
    return fn, page


def advise(buf: torch.Tensor) -> bool:
    """Ask for huge pages under the page-aligned interior of ``buf``'s memory.

    Call it on a freshly allocated CPU tensor (``torch.empty``) before writing to it: the
    interior's contents are dropped (it reads as zeros afterwards).

    Returns:
        True if the kernel accepted the advice for a range of at least one huge page;
        False for a non-CPU or small tensor, a platform without transparent huge pages,
        inside :func:`not_asked`, or a refusal.
    """
    found = _madvise()
    if found is None or buf.device.type != "cpu" or not _ASKING.get():
        return False
    fn, page = found
    start = buf.data_ptr()
    end = start + buf.numel() * buf.element_size()
    first, last = -(-start // page) * page, end // page * page
    if last <= first:
        return False
    return (
        fn(first, last - first, mmap.MADV_HUGEPAGE) == 0
        and fn(first, last - first, mmap.MADV_DONTNEED) == 0
    )
