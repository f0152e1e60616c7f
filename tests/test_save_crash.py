"""Crash consistency of ``CSLTracker.save``: a child process saving in a loop is killed
(SIGKILL) at random points, at least 20 times. The file at the path must always be the
previous or the new complete state, and the next save must remove the temp files the
killed saves left."""

from __future__ import annotations

import os
import random
import signal
import time

import pytest

from csl_fast import CSLTracker

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

N = 64
KILLS = 24


def _tracker(k: int) -> CSLTracker:
    """State number ``k``: every float buffer holds k, the epoch counter is k."""
    t = CSLTracker(N, 4)
    for buf in t.buffers().values():
        if buf.is_floating_point():
            buf.fill_(float(k))
    t.epoch = k
    t.input_grad_first_epoch = 0  # (its input-gradient counts say it has records)
    return t


def _check_complete(path) -> int:
    t = CSLTracker.from_file(path)
    k = t.epoch
    for name, buf in t.buffers().items():
        if buf.is_floating_point():
            assert bool((buf == k).all()), (name, k)
    return k


def _child(path: str, first: int) -> None:
    """Save states first, first + 1, ... forever (until killed)."""
    try:
        trackers = [_tracker(first + i) for i in range(4)]
        k = 0
        while True:
            t = trackers[k % 4]
            t.save(path)
            k += 1
            t.epoch += 4
            for buf in t.buffers().values():
                if buf.is_floating_point():
                    buf.fill_(float(t.epoch))
    finally:
        os._exit(1)


def _temps(folder) -> list[str]:
    return [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_kill_during_save_keeps_a_complete_file(tmp_path):
    path = tmp_path / "run.csl"
    _tracker(0).save(path)
    rng = random.Random(1234)
    seen = set()
    orphans = 0
    start = time.monotonic()
    for _ in range(KILLS):
        before = _check_complete(path)
        pid = os.fork()
        if pid == 0:
            _child(str(path), before + 1)
        # up to 0.1 s: on a loaded machine a forked child may not finish a save in 0.03 s
        time.sleep(rng.uniform(0.0, 0.1))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        after = _check_complete(path)  # a complete state, never a torn one
        assert after >= before
        seen.add(after)
        orphans += len(_temps(tmp_path))
    assert len(seen) > 1  # the child did replace the file
    _tracker(10**6).save(path)  # the next save removes every orphan of the killed writers
    assert _temps(tmp_path) == []
    assert _check_complete(path) == 10**6
    assert time.monotonic() - start < 30
    print(f"{KILLS} kills, {len(seen)} distinct states seen, {orphans} orphaned temp files")


def test_kill_before_rename_leaves_temp_that_next_save_removes(tmp_path):
    path = tmp_path / "run.csl"
    _tracker(1).save(path)
    pid = os.fork()
    if pid == 0:
        try:
            os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)  # die before the rename
            _tracker(2).save(path)
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    assert len(_temps(tmp_path)) == 1
    assert _check_complete(path) == 1
    _tracker(3).save(path)
    assert _temps(tmp_path) == [] and _check_complete(path) == 3


def test_two_processes_saving_to_one_path(tmp_path):
    """Concurrent writers: neither removes the other's temp file in flight, every load in
    between sees a complete state, and nothing is left over."""
    path = tmp_path / "run.csl"
    _tracker(0).save(path)
    pids = []
    for first in (1, 10_001):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                t = _tracker(first)
                for _ in range(25):
                    t.save(path)
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    for _ in range(10):
        _check_complete(path)
    codes = [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]
    assert codes == [0, 0]
    assert _check_complete(path) in (1, 10_001)
    assert _temps(tmp_path) == []
