"""Transparent huge pages under a tracker's CPU buffers (csl_fast.huge_pages)."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch

import csl_fast
from csl_fast import huge_pages
from csl_fast.tracker_buffers import _MINUS_ONE

MIB = 1 << 20


def _thp_mode() -> str:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "absent"
    return text[text.find("[") + 1 : text.find("]")]


needs_thp = pytest.mark.skipif(
    not sys.platform.startswith("linux") or _thp_mode() not in ("always", "madvise"),
    reason=f"transparent huge pages are {_thp_mode()} here",
)


def _vm_flags(ptr: int) -> list[str]:
    """The VmFlags of the mapping holding address ``ptr`` in /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split(" ", 1)[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= ptr < hi
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    raise AssertionError(f"no mapping holds {ptr:#x}")


def _middle(buf: torch.Tensor) -> int:
    return buf.data_ptr() + buf.numel() * buf.element_size() // 2


@needs_thp
def test_advice_marks_the_buffer_and_leaves_it_writable():
    buf = torch.empty(16 * MIB // 4)
    assert huge_pages.advise(buf)
    assert "hg" in _vm_flags(_middle(buf))
    buf.copy_(torch.arange(buf.numel(), dtype=buf.dtype))
    assert torch.equal(buf, torch.arange(buf.numel(), dtype=buf.dtype))


@needs_thp
def test_memory_faulted_in_before_is_dropped_so_new_writes_fault_huge_pages():
    # The allocator may reuse memory an earlier allocation touched; the advice drops it.
    buf = torch.full((16 * MIB // 4,), 7.0)
    assert huge_pages.advise(buf)
    page = huge_pages._madvise()[1]
    first = -(-buf.data_ptr() // page) * page
    offset = (first - buf.data_ptr()) // buf.element_size()
    assert buf[offset : offset + page // buf.element_size()].eq(0).all()


def test_small_non_cpu_and_unsupported_are_refused(monkeypatch):
    assert not huge_pages.advise(torch.empty(1000))
    assert not huge_pages.advise(torch.empty(16 * MIB // 4, device="meta"))
    monkeypatch.setattr(huge_pages, "_madvise", lambda: None)
    assert not huge_pages.advise(torch.empty(16 * MIB // 4))


@needs_thp
def test_tracker_buffers_are_advised_and_initialised():
    n = 2 * MIB  # 8 MiB per float32 / int32 buffer
    tracker = csl_fast.CSLTracker(n, num_classes=10)
    for name, buf in tracker.buffers().items():
        if buf.numel() * buf.element_size() >= 4 * MIB:
            assert "hg" in _vm_flags(_middle(buf)), name
        expected = -1 if name in _MINUS_ONE else 0
        assert buf.eq(expected).all(), name


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE here")
def test_trackers_made_while_not_asked_do_not_ask(monkeypatch):
    calls = []

    def fake_madvise(addr, length, advice):
        calls.append(advice)
        return 0

    monkeypatch.setattr(huge_pages, "_madvise", lambda: (fake_madvise, 2 * MIB))
    with huge_pages.not_asked():
        csl_fast.CSLTracker(2 * MIB, num_classes=10)
        assert not huge_pages.advise(torch.empty(16 * MIB // 4))
    assert calls == []
    assert huge_pages.advise(torch.empty(16 * MIB // 4))
    assert calls == [mmap.MADV_HUGEPAGE, mmap.MADV_DONTNEED]


def test_the_cli_reads_trackers_without_asking(tmp_path, capsys, monkeypatch):
    """CLI commands only read a tracker: no huge pages for it (they pay off in recording)."""
    from cli_calls import run_main

    path = tmp_path / "run.csl"
    t = csl_fast.CSLTracker(50, num_classes=3)
    csl_fast.accumulate(torch.randn(50, 3), torch.randint(0, 3, (50,)), torch.arange(50), t)
    t.end_epoch()
    t.save(path)
    asked = []
    real = huge_pages.advise
    monkeypatch.setattr(
        huge_pages, "advise", lambda buf: asked.append(huge_pages._ASKING.get()) or real(buf)
    )
    code, _, err = run_main(capsys, "rank", str(path), "--top", "3")
    assert code == 0, err
    assert asked and not any(asked)
