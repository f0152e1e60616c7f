"""Writes into one buffer or tracker from several threads take turns (csl_fast/buffer_locks.py,
csrc/buffer_locks.h): the one-call C++ step and record_loss's C++ op hold the same lock as
the Python paths, and every tracker method that writes holds its tracker's lock.

Each test is deterministic: a wrapped call that sleeps (releasing the GIL) counts how many
threads are inside it at once, or the test holds the lock itself and checks that a write
from another thread waits for it. Without the locks each of them fails."""

from __future__ import annotations

import sys
import threading

import pytest
import torch
from overlaps import Overlaps

import csl_fast
from csl_fast import CSLTracker, _ext, accumulate, record_loss
from csl_fast.buffer_locks import buffer_lock

pytestmark = pytest.mark.usefixtures("one_thread")


def _in_threads(*fns, calls=5):
    """Runs each of ``fns`` ``calls`` times in a thread of its own; re-raises any error."""
    errors = []

    def work(fn):
        try:
            for _ in range(calls):
                fn()
        except Exception as exc:  # surfaced below
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(fn,)) for fn in fns]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    assert not errors, errors


def _waits_for_the_lock(buf: torch.Tensor, write, written) -> None:
    """While this thread holds ``buf``'s lock, ``write()`` in another thread must not
    finish (``written()`` stays False); once released, it does."""
    done = threading.Event()
    errors = []

    def work():
        try:
            write()
        except Exception as exc:  # surfaced below
            errors.append(exc)
        done.set()

    with buffer_lock(buf):
        th = threading.Thread(target=work)
        th.start()
        # Ample time for an unlocked write of a few rows (microseconds).
        assert not done.wait(0.3), "the write did not wait for the buffer's lock"
        assert not written()
    th.join(30)
    assert done.is_set() and not errors, errors
    assert written()


def _batch(b=8, c=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, c, generator=g), torch.randint(0, c, (b,), generator=g)


@pytest.mark.skipif(_ext._C is None, reason="the compiled extension csl_fast._C is not built")
@pytest.mark.parametrize("sink", ["buffer", "tracker"])
def test_the_one_call_step_waits_for_the_buffer_lock(sink, monkeypatch):
    """The C++ step takes the lock the Python paths take (and waits without the GIL, or
    this test would hang): a step into a locked buffer waits."""
    completed = []
    real = _ext._C.step
    monkeypatch.setattr(_ext._C, "step", lambda *a: completed.append(1) or real(*a))
    x, t = _batch()
    if sink == "tracker":
        target = CSLTracker(8, 5)
        csl, count = target.training_buffers()
        kwargs = {}
    else:
        csl, count = torch.zeros(8), torch.zeros(8, dtype=torch.int64)
        target, kwargs = csl, {"count": count}
    accumulate(x, t, torch.arange(8), torch.zeros(8))  # first-call costs out of the way
    completed.clear()
    _waits_for_the_lock(
        csl,
        lambda: accumulate(x, t, torch.arange(8), target, **kwargs),
        lambda: bool(count.sum() > 0),
    )
    assert completed and count.tolist() == [1] * 8


@pytest.mark.parametrize("sink", ["buffer", "tracker"])
def test_record_loss_waits_for_the_buffer_lock(sink):
    """record_loss (its C++ op on the CPU) takes the same lock."""
    loss = torch.rand(8)
    if sink == "tracker":
        target = CSLTracker(8, 5, history=True)
        csl, count = target.training_buffers()
        kwargs = {}
    else:
        csl, count = torch.zeros(8), torch.zeros(8, dtype=torch.int64)
        target, kwargs = csl, {"count": count}
    record_loss(loss, torch.arange(8), torch.zeros(8))  # first-call costs out of the way
    _waits_for_the_lock(
        csl,
        lambda: record_loss(loss, torch.arange(8), target, **kwargs),
        lambda: bool(count.sum() > 0),
    )
    torch.testing.assert_close(csl, loss.to(csl.dtype))


def test_record_loss_from_threads_loses_nothing():
    """Duplicate indices from four threads at once: every loss arrives."""
    tracker = CSLTracker(4, 3, history=True, dtype=torch.float64)
    csl, count = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.int64)
    loss = torch.rand(1024, dtype=torch.float64)
    index = torch.arange(1024) % 4
    _in_threads(
        *(lambda: record_loss(loss, index, csl, count=count) for _ in range(2)),
        *(lambda: record_loss(loss, index, tracker) for _ in range(2)),
        calls=50,
    )
    want = torch.zeros(4, dtype=torch.float64).index_add_(0, index, loss.float().double())
    assert count.tolist() == [2 * 50 * 256] * 4
    assert tracker.csl_count.tolist() == [2 * 50 * 256.0] * 4
    torch.testing.assert_close(csl, want * 100, rtol=1e-9, atol=0)
    torch.testing.assert_close(tracker.csl_sum, want * 100, rtol=1e-9, atol=0)
    torch.testing.assert_close(tracker.epoch_loss_sum, want * 100, rtol=1e-9, atol=0)


def _watched_step(tracker, x, index):
    """A forward and backward whose input gradient ``tracker.watch`` records."""
    z = tracker.watch(x.clone().requires_grad_(True), index)
    (z.square().sum(1) * 0.5).mean().backward()


def test_tracker_methods_that_write_take_turns(monkeypatch):
    """watch's hook (record_input_grad), end_epoch, end_eval_pass, update and record_eval
    from several threads at once: none overlaps another, and nothing is lost."""
    overlaps = Overlaps()
    tracker = CSLTracker(8, 5, history=True)
    # The kernels each method runs, and end_epoch's per-epoch means.
    for module, name in (
        ("csl_fast.ops", "record_input_grad"),
        ("csl_fast.ops", "scatter_stats"),
        ("csl_fast.tracker", "_mean_or_nan"),
    ):
        real = getattr(sys.modules[module], name)
        monkeypatch.setattr(sys.modules[module], name, overlaps.wrap(real))
    x = torch.randn(8, 3)
    stats = csl_fast.reference.row_statistics(*_batch(), -100)
    _in_threads(
        lambda: _watched_step(tracker, x, torch.arange(8)),
        lambda: _watched_step(tracker, x, torch.arange(8)),
        tracker.end_epoch,
        tracker.end_eval_pass,
        lambda: tracker.update(torch.arange(8), stats),
        lambda: tracker.record_eval(torch.arange(8), stats),
    )
    assert overlaps.most == 1
    assert tracker.epoch == 5 and tracker.eval_passes == 5
    assert tracker.input_grad_count.tolist() == [10.0] * 8
    assert tracker.csl_count.tolist() == [5.0] * 8 and tracker.eval_count.tolist() == [5.0] * 8


def test_save_holds_the_lock_while_it_reads_not_while_it_fsyncs(tmp_path, monkeypatch):
    """save held the tracker's lock through both fsyncs: a recording thread waited for the
    disk (4 s for fsyncs of 2 s each)."""
    import os

    from csl_fast import atomic_file

    t = CSLTracker(8, 3)
    accumulate(torch.randn(8, 3), torch.arange(8) % 3, torch.arange(8), t)
    free: list[bool] = []
    fsync = os.fsync

    def spy(fd):
        took = threading.Event()

        def take():
            with buffer_lock(t.csl_sum):
                took.set()

        threading.Thread(target=take, daemon=True).start()
        free.append(took.wait(2))
        fsync(fd)

    monkeypatch.setattr(atomic_file.os, "fsync", spy)
    t.save(tmp_path / "run.csl")
    assert free and all(free)
    assert torch.equal(csl_fast.load(tmp_path / "run.csl").csl_sum, t.csl_sum)


def test_a_subclass_that_skipped_the_trackers_init_is_told_so():
    # the "called on the class?" TypeError named a CSLTracker instance "not a CSLTracker"
    class Partial(csl_fast.CSLTracker):
        def __init__(self) -> None:  # (no super().__init__)
            pass

        def end_epoch(self) -> None:  # an override of a locked method
            super().end_epoch()

    for call in (lambda t: t.load("run.csl"), lambda t: t.end_epoch()):
        with pytest.raises(AttributeError, match=r"Partial has no buffers: its __init__ did"):
            call(Partial())
    with pytest.raises(TypeError, match=r"called on the class\?.*CSLTracker\.from_file"):
        csl_fast.CSLTracker.load("run.csl")
