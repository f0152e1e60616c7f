"""``CSLTracker.sync`` across 2 gloo processes on the CPU against a single-process run.

Both sides see the same presentations: ``DistributedSampler`` shards each epoch, rank ``r``
splits its shard into batches, and the single-process reference processes global step
``t`` as rank 0's batch ``t`` followed by rank 1's batch ``t`` (the order a single process
would see if the two ranks' batches were one batch). Logits depend on (epoch, rank, step),
are biased toward the label more each epoch (so correctness changes and forgetting
happens), include ``ignore_index`` rows and one non-finite row; input-gradient norms and an
eval pass are recorded too. float64 trackers, so sums agree to rounding.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DistributedSampler

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import csl_fast
from csl_fast import CSLTracker, distributed, ops
from csl_fast.distributed import (
    DEFAULT_TIMEOUT,
    SyncError,
    SyncTimeoutError,
    get_timeout,
    is_distributed,
    mark_synced,
    recorded_since,
    set_timeout,
    training_mark,
)
from csl_fast.reference import REDUCTIONS
from csl_fast.scores import eval_is_latest

WORLD = 2
C = 3
IGNORE = -100


def _spawn(fn, args: tuple, nprocs: int = WORLD, timeout: float = 120.0) -> None:
    """Fork ``nprocs`` workers ``fn(rank, *args)``; a worker that stalls fails the test
    (its processes killed) instead of hanging CI."""
    # fork: the children inherit the imported torch and csl_fast (spawn re-imports them,
    # which takes longer than the test itself). Nothing here has touched CUDA.
    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, start_method="fork", join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{fn.__name__}: the workers did not finish within {timeout:g} s")


def _steps(n: int, epoch: int, batch: int, overlap: bool = False) -> list[list[torch.Tensor]]:
    """``steps[t][r]``: rank ``r``'s index batch at step ``t`` (empty when it has none).

    ``overlap=False``: ``DistributedSampler`` shards. ``overlap=True``: every rank sees a
    permutation of the whole dataset each epoch (every sample on both ranks, at unrelated
    steps), which exercises the ownership rule where ranks meet."""
    shards = []
    for r in range(WORLD):
        if overlap:
            g = torch.Generator().manual_seed(10 * epoch + r)
            idx = torch.randperm(n, generator=g)
        else:
            s = DistributedSampler(range(n), num_replicas=WORLD, rank=r, shuffle=True, seed=7)
            s.set_epoch(epoch)
            idx = torch.tensor(list(s), dtype=torch.int64)
        shards.append(list(idx.split(batch)))
    t_max = max(len(s) for s in shards)
    empty = torch.empty(0, dtype=torch.int64)
    return [[s[t] if t < len(s) else empty for s in shards] for t in range(t_max)]


def _batch(idx: torch.Tensor, epoch: int, rank: int, step: int):
    g = torch.Generator().manual_seed(1000 * epoch + 100 * rank + step)
    b = idx.numel()
    target = idx % C
    logits = torch.randn(b, C, generator=g, dtype=torch.float64) * 1.5
    logits[torch.arange(b), target] += 0.6 * epoch
    target = torch.where(idx == 3, torch.full_like(target, IGNORE), target)  # never valid
    if epoch == 1 and step == 0 and b > 1:
        logits[1, 0] = float("nan")  # one non-finite row: not recorded
    sq = torch.rand(b, generator=g, dtype=torch.float64)
    return logits, target, sq


def _record(tracker: CSLTracker, idx, epoch: int, rank: int, step: int) -> None:
    if idx.numel() == 0:
        return
    logits, target, sq = _batch(idx, epoch, rank, step)
    csl_fast.accumulate(logits, target, idx, tracker, ignore_index=IGNORE)
    tracker.record_input_grad(idx, sq, valid=target != IGNORE)


def _eval_pass(tracker: CSLTracker, n: int, epoch: int, ranks: list[int]) -> None:
    for r in ranks:
        s = DistributedSampler(range(n), num_replicas=WORLD, rank=r, shuffle=False)
        idx = torch.tensor(list(s), dtype=torch.int64)
        logits, target, _ = _batch(idx, 50 + epoch, r, 0)
        _, stats = ops.cross_entropy_fwd(logits, target, None, IGNORE, 0.0, REDUCTIONS["none"])
        tracker.record_eval(idx, stats)
    tracker.end_eval_pass()


def _reference(n: int, batch: int, epochs: int, overlap=False, rank_major=False) -> CSLTracker:
    """Single process, global step ``t`` = rank 0's batch ``t`` then rank 1's; or, with
    ``rank_major``, all of rank 0's epoch then all of rank 1's (the documented rule)."""
    ref = CSLTracker(n, C, dtype=torch.float64, history=True)
    for e in range(epochs):
        steps = _steps(n, e, batch, overlap)
        order = [(t, r) for t in range(len(steps)) for r in range(WORLD)]
        if rank_major:
            order.sort(key=lambda tr: (tr[1], tr[0]))
        for t, r in order:
            _record(ref, steps[t][r], e, r, t)
        ref.end_epoch()
        _eval_pass(ref, n, e, list(range(WORLD)))
    return ref


def _train_rank(tracker, rank, n, batch, epochs, mid_sync=False, overlap=False) -> None:
    for e in epochs:
        for t, per_rank in enumerate(_steps(n, e, batch, overlap)):
            _record(tracker, per_rank[rank], e, rank, t)
            if mid_sync and e == 1 and t == 0:
                tracker.sync()  # a hand-made sync mid-epoch must not change the result
        tracker.end_epoch()  # syncs
        if e == 1:
            tracker.sync()
            tracker.sync()  # twice: no double counting
        _eval_pass(tracker, n, e, [rank])
    tracker.sync()  # make the last eval pass global


def _worker(rank: int, init: str, out: str, n: int, batch: int, epochs: int, mode: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        assert is_distributed()
        tracker = CSLTracker(n, C, dtype=torch.float64, history=True)
        if mode == "plain":
            _train_rank(tracker, rank, n, batch, range(epochs), mid_sync=True)
        elif mode == "overlap":
            _train_rank(tracker, rank, n, batch, range(epochs), overlap=True)
        else:
            _train_rank(tracker, rank, n, batch, range(epochs - 1))
            path = os.path.join(out, "ckpt.csl")
            if rank == 0:
                tracker.save(path)
            dist.barrier()
            resumed = CSLTracker.from_file(path)
            _record(resumed, _steps(n, epochs - 1, batch)[0][rank], epochs - 1, rank, 0)
            try:  # loaded state + local presentations, never marked: must refuse to guess
                resumed.sync()
                raise AssertionError("sync of an unmarked resumed tracker did not raise")
            except RuntimeError as exc:
                assert "mark_synced" in str(exc)
            tracker = CSLTracker.from_file(path)
            mark_synced(tracker)
            _train_rank(tracker, rank, n, batch, range(epochs - 1, epochs))
        torch.save(tracker.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


# eval_loss_history rows are appended by end_eval_pass, which (unlike end_epoch) does not
# sync first: under torch.distributed they hold each rank's local means.
_NOT_SYNCED = {"eval_loss_history"}


# The suggested-label vote is the owner's: exact only where one rank presented a sample in
# a sync window (DistributedSampler without padding); elsewhere the ranks must still agree.
_VOTES = ("suggest_label", "suggest_votes", "suggest_hits")


def _assert_same(state: dict, ref: CSLTracker, rank: int, votes: bool = True) -> None:
    want = ref.state_dict()
    for key in (
        "epoch", "eval_passes", "eval_pass_presentations", "input_grad_first_epoch", "num_samples"
    ):  # fmt: skip
        assert state[key] == want[key], (rank, key)
    for name, buf in want["buffers"].items():
        if name in _VOTES and not votes:
            continue
        got = state["buffers"][name]
        if buf.is_floating_point():
            torch.testing.assert_close(got, buf, rtol=1e-12, atol=1e-12, msg=f"{rank} {name}")
        else:
            assert torch.equal(got, buf), (rank, name, got, buf)
    for name, hist in want["histories"].items():
        if name not in _NOT_SYNCED:
            torch.testing.assert_close(state["histories"][name], hist, equal_nan=True)


def _run(tmp_path, n: int, batch: int, epochs: int, mode: str = "plain") -> CSLTracker:
    init = f"file://{tmp_path / 'pg_init'}"
    args = (init, str(tmp_path), n, batch, epochs, mode)
    _spawn(_worker, args)
    overlap = mode == "overlap"
    ref = _reference(n, batch, epochs, overlap=overlap, rank_major=overlap)
    states = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for r, state in enumerate(states):
        _assert_same(state, ref, r, votes=mode == "plain")
        # A synced state keeps every relation between buffers a loaded state is checked for.
        CSLTracker(n, C, dtype=torch.float64, history=True).load_state_dict(state)
        for name in _VOTES:
            assert torch.equal(state["buffers"][name], states[0]["buffers"][name]), (r, name)
    return ref


def test_sync_equals_single_process(tmp_path):
    """Even shards (N = 40 = 2 x 20), batches of 6 (uneven last batch per rank), a mid-epoch
    sync and repeated syncs."""
    ref = _run(tmp_path, n=40, batch=6, epochs=4)
    # With DistributedSampler, time order and the documented (rank, batch order) order agree.
    _assert_same(_reference(40, 6, 4, rank_major=True).state_dict(), ref, -1)
    assert int(ref.forgetting.sum()) > 0  # the scenario exercises forgetting
    assert int((ref.learned_epoch > 0).sum()) > 0
    assert float(ref.csl_count[3]) == 0  # ignore_index sample never counted


def test_sync_padding_uneven_last_batch_and_resume(tmp_path):
    """N = 13 on 2 ranks: DistributedSampler pads one repeat per epoch (14 presentations),
    batches of 4 give 4 + 3 per rank; the last epoch resumes from a checkpoint."""
    ref = _run(tmp_path, n=13, batch=4, epochs=3, mode="resume")
    _assert_same(_reference(13, 4, 3, rank_major=True).state_dict(), ref, -1)
    shown = torch.cat([i for e in range(3) for step in _steps(13, e, 4) for i in step])
    assert shown.numel() == 3 * 14
    nan_rows = 2  # epoch 1, step 0, row 1 on each rank
    expected = shown.numel() - int((shown == 3).sum()) - nan_rows
    assert float(ref.csl_count.sum()) == expected
    assert float(ref.csl_count.max()) >= 4  # a padding repeat: twice in one epoch
    # The suggested-label vote is exact for every sample no epoch showed on both ranks.
    single = torch.ones(13, dtype=torch.bool)
    for e in range(3):
        ranks = [torch.cat([step[r] for step in _steps(13, e, 4)]) for r in range(WORLD)]
        single &= ~(torch.isin(torch.arange(13), ranks[0]) & torch.isin(torch.arange(13), ranks[1]))
    assert 8 <= int(single.sum()) < 13
    got = torch.load(tmp_path / "rank0.pt", weights_only=True)["buffers"]
    for name in _VOTES:
        assert torch.equal(got[name][single], ref.buffers()[name][single]), name


def test_sync_where_ranks_meet(tmp_path):
    """Every sample on both ranks each epoch: last values, forgetting and learned epoch
    follow the documented order (window, rank, batch order)."""
    ref = _run(tmp_path, n=12, batch=5, epochs=4, mode="overlap")
    assert int(ref.forgetting.sum()) > 0


def test_sync_is_a_noop_without_a_process_group():
    t = CSLTracker(5, C)
    assert not is_distributed()
    assert t.sync() is False
    idx = torch.tensor([0, 1, 1])
    csl_fast.accumulate(torch.randn(3, C), torch.tensor([0, 1, 2]), idx, t)
    before = {k: v.clone() for k, v in t.buffers().items()}
    t.end_epoch()
    for k, v in before.items():
        if not k.startswith("epoch_"):
            assert torch.equal(t.buffers()[k], v), k


def test_a_group_that_is_no_process_group_is_refused_by_name():
    # "'int' object has no attribute 'size'" from inside torch under a process group, and
    # silently nothing without one (end_epoch alone said what was wrong)
    from csl_fast.distributed import sync

    t = CSLTracker(5, C)
    for call in (
        lambda: t.sync(5),
        lambda: sync(t, "g"),
        lambda: mark_synced(t, 5),
        lambda: is_distributed(5),
        lambda: t.end_epoch(5),
    ):
        with pytest.raises(TypeError, match=r"group must be a torch\.distributed process group"):
            call()
    assert t.sync(timeout=3.0) is False  # the method takes the module function's timeout


def test_recorded_since_sees_recordings_alone():
    t = CSLTracker(5, C)
    mark = training_mark(t)
    csl_fast.score_epoch(
        torch.nn.Identity(), [(torch.randn(2, C), torch.tensor([0, 1]), torch.arange(2))], t
    )
    assert not recorded_since(t, mark)  # the eval buffers are not the training ones
    csl_fast.accumulate(torch.randn(2, C), torch.tensor([0, 1]), torch.arange(2), t)
    assert recorded_since(t, mark)


def _mark_worker(rank: int, init: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    t = CSLTracker(6, C)
    csl_fast.accumulate(torch.randn(2, C), torch.tensor([0, 1]), torch.arange(2) + 2 * rank, t)
    t.end_epoch()  # synced: an eval loop starts here
    mark = training_mark(t)
    z = torch.randn(3, C)
    csl_fast.score_epoch(
        torch.nn.Identity(), [(z, torch.tensor([0, 1, 2]), torch.arange(3) + rank)], t
    )
    t.sync()  # after an eval pass, as docs/distributed.md says: it rewrites every buffer
    result = {
        "version moved": training_mark(t)[1] != mark[1],
        "after sync": recorded_since(t, mark),
        "eval pass latest": eval_is_latest(t),
    }
    csl_fast.accumulate(torch.randn(1, C), torch.tensor([0]), torch.tensor([5]), t)
    result["after a recording"] = recorded_since(t, mark)
    mark = training_mark(t)  # a recording, then a sync: the recording is still seen
    csl_fast.accumulate(torch.randn(1, C), torch.tensor([1]), torch.tensor([4]), t)
    t.sync()
    result["recorded, then synced"] = recorded_since(t, mark)
    result["eval pass latest after training"] = eval_is_latest(t)
    # a pass after each rank's training, synced after it: each rank counted only its own
    # presentations when its pass ended, fewer than the synced total
    csl_fast.accumulate(torch.randn(1, C), torch.tensor([0]), torch.tensor([rank]), t)
    csl_fast.score_epoch(
        torch.nn.Identity(), [(z, torch.tensor([0, 1, 2]), torch.arange(3) + rank)], t
    )
    t.sync()
    result["eval pass after unsynced training latest"] = eval_is_latest(t)
    # one rank trains after a pass: the model every rank shares moved since
    csl_fast.score_epoch(
        torch.nn.Identity(), [(z, torch.tensor([0, 1, 2]), torch.arange(3) + rank)], t
    )
    if rank == 0:
        csl_fast.accumulate(torch.randn(1, C), torch.tensor([0]), torch.tensor([5]), t)
    t.sync()
    result["eval pass latest after one rank trained"] = eval_is_latest(t)
    with open(os.path.join(out, f"mark{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_a_sync_is_not_read_as_a_recording(tmp_path):
    """CSLCallback refuses an eval loop that recorded into the training tracker by its
    version counters, which a sync in the loop moved too: a DDP validation that synced
    after its eval pass raised that it had recorded into the training tracker."""
    _spawn(_mark_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path)))
    for rank in range(WORLD):
        result = json.loads((tmp_path / f"mark{rank}.json").read_text())
        assert result == {
            "version moved": True,
            "after sync": False,
            "after a recording": True,
            "recorded, then synced": True,
            "eval pass latest": True,
            "eval pass latest after training": False,
            "eval pass after unsynced training latest": True,
            "eval pass latest after one rank trained": False,
        }


def _attempt(msgs: list, call, named: bool = False) -> None:
    """Run ``call``, appending "no error" or its SyncError (``named``: with the type)."""
    try:
        call()
        msgs.append("no error")
    except SyncError as exc:
        msgs.append(f"{type(exc).__name__}: {exc}" if named else str(exc))


def _disagree_worker(rank: int, init: str, out: str):
    """Trackers and calls that differ between the ranks: every rank must raise the same
    SyncError (no gloo abort), and the group must still work afterwards."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    msgs = []

    def attempt(call) -> None:
        _attempt(msgs, call)

    other = torch.float64 if rank else torch.float32
    attempt(CSLTracker(10, C, dtype=other).end_epoch)
    attempt(CSLTracker(10, C, history=bool(rank)).end_epoch)
    attempt(CSLTracker(10 + rank, C).sync)
    t = CSLTracker(10, C)
    t.eval_passes = rank
    attempt(t.sync)
    t = CSLTracker(10, C)
    attempt(t.sync if rank == 0 else lambda: mark_synced(t))
    t = CSLTracker(10, C)
    t.csl_count[0] = 1.0 + rank  # a different checkpoint on each rank
    attempt(lambda: mark_synced(t))
    attempt(CSLTracker(10, C, num_labels=2 if rank else None).sync)
    attempt(CSLTracker(10, C + rank).end_epoch)
    t = CSLTracker(10, C if rank else None)  # None: unknown, agrees with any
    attempt(t.sync)
    msgs.append(t.num_classes)
    t = CSLTracker(10, C)
    t.epoch = rank  # one rank closed an epoch the other did not
    attempt(t.sync)
    # sync() on one rank, end_epoch() on the other: both passed as "sync()", and the
    # ranks went on at different epochs
    t = CSLTracker(10, C)
    attempt(t.sync if rank == 0 else t.end_epoch)
    msgs.append(t.epoch)
    # the same trackers still sync afterwards
    t = CSLTracker(10, C)
    t.csl_sum[rank] += 1.5
    t.csl_count[rank] += 1
    assert t.sync()
    msgs.append(t.csl_sum[:3].tolist())
    with open(os.path.join(out, f"msgs{rank}.json"), "w") as f:
        json.dump(msgs, f)
    dist.destroy_process_group()


def test_ranks_that_disagree_all_raise_the_same_clear_error(tmp_path):
    init = f"file://{tmp_path / 'pg_init'}"
    _spawn(_disagree_worker, (init, str(tmp_path)))
    got = [json.loads((tmp_path / f"msgs{r}.json").read_text()) for r in range(WORLD)]
    assert got[0] == got[1]
    msgs = got[0]
    wanted = [
        "dtype (rank 0: float32, rank 1: float64)",
        "history (rank 0: False, rank 1: True)",
        "num_samples (rank 0: 10, rank 1: 11)",
        "eval_passes (rank 0: 0, rank 1: 1)",
        "call (rank 0: sync(), rank 1: mark_synced())",
        "csl_count total (rank 0: 1.0, rank 1: 2.0)",
        "num_labels (rank 0: None, rank 1: 2)",
        "num_classes (rank 0: 3, rank 1: 4)",
    ]
    for msg, want in zip(msgs, wanted, strict=False):
        assert want in msg, (want, msg)
        assert "end_epoch()" in msg
    # history adds buffers: beside it, the buffer set's hash told the user nothing
    assert "buffer set" not in msgs[1]
    assert "num_samples (" not in msgs[5]
    assert "num_labels" in msgs[6].split(". Every rank")[1]  # the advice names it too
    assert "num_classes" in msgs[7].split(". Every rank")[1]
    assert "num_samples (" not in msgs[7] and "buffer set" not in msgs[7]
    assert msgs[8:10] == ["no error", C]
    assert "epoch (rank 0: 0, rank 1: 1)" in msgs[10] and "end_epoch()" in msgs[10]
    assert "call (rank 0: sync(), rank 1: end_epoch())" in msgs[11] and msgs[12] == 0
    assert msgs[13] == [1.5, 1.5, 0.0]


def _timeout_worker(rank: int, init: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    if rank == 1:  # skips end_epoch, then leaves
        time.sleep(2.5)
        os._exit(0)
    set_timeout(1.0)
    start = time.monotonic()
    try:
        CSLTracker(10, C).end_epoch()
        result = {"error": None}
    except SyncTimeoutError as exc:
        result = {"error": str(exc), "seconds": time.monotonic() - start}
    set_timeout(None)
    with open(os.path.join(out, "timeout.json"), "w") as f:
        json.dump(result, f)
    os._exit(0)  # the group is unusable after a timeout: no destroy


def test_rank_that_skips_end_epoch_times_out_with_a_clear_error(tmp_path):
    init = f"file://{tmp_path / 'pg_init'}"
    _spawn(_timeout_worker, (init, str(tmp_path)))
    result = json.loads((tmp_path / "timeout.json").read_text())
    assert result["error"] is not None
    assert "within 1 s" in result["error"] and "skipped tracker.end_epoch()" in result["error"]
    assert "set_timeout" in result["error"] and "CSL_FAST_SYNC_TIMEOUT" in result["error"]
    assert 1.0 <= result["seconds"] < 3.0


def test_timeout_setting(monkeypatch):
    monkeypatch.delenv("CSL_FAST_SYNC_TIMEOUT", raising=False)
    assert get_timeout() == DEFAULT_TIMEOUT
    monkeypatch.setenv("CSL_FAST_SYNC_TIMEOUT", "12.5")
    assert get_timeout() == 12.5
    set_timeout(3)
    try:
        assert get_timeout() == 3.0
    finally:
        set_timeout(None)
    assert get_timeout() == 12.5
    monkeypatch.setenv("CSL_FAST_SYNC_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="CSL_FAST_SYNC_TIMEOUT"):
        get_timeout()
    with pytest.raises(ValueError, match="> 0"):
        set_timeout(0)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda t: distributed.sync(None), TypeError, r"sync: tracker must be a csl_fast"),
        (lambda t: distributed.sync({}), TypeError, r"sync: tracker must be a .*got dict"),
        (
            lambda t: distributed.sync_epoch(torch.zeros(3)),
            TypeError,
            r"sync_epoch: tracker must be a csl_fast\.CSLTracker, got Tensor",
        ),
        (lambda t: mark_synced(None), TypeError, r"mark_synced: tracker must be a csl_fast"),
        (lambda t: distributed.sync(t, timeout="30"), ValueError, r"sync: timeout must be > 0"),
        (lambda t: distributed.sync(t, timeout=-1.0), ValueError, r"timeout must be > 0"),
        (lambda t: distributed.sync(t, timeout=float("nan")), ValueError, r"> 0, got nan"),
        (lambda t: t.sync(timeout=1j), ValueError, r"sync: timeout must be > 0, got 1j"),
        (lambda t: mark_synced(t, timeout="30"), ValueError, r"mark_synced: timeout must be"),
    ],
)
def test_sync_arguments_are_checked_in_a_single_process_too(call, error, message):
    # checked only under an initialised process group: a single process returned False
    # (or, mark_synced(None), raised "'NoneType' object has no attribute '__dict__'"),
    # and the job failed only once it ran distributed
    assert not is_distributed()
    with pytest.raises(error, match=message):
        call(CSLTracker(8, 3))


def test_a_bad_timeout_variable_fails_only_where_a_collective_waits(monkeypatch):
    # (read by the single-process checks, it failed every end_epoch of a run without
    # torch.distributed, after a whole epoch was recorded)
    monkeypatch.setenv("CSL_FAST_SYNC_TIMEOUT", "30s")
    t = CSLTracker(8, 3)
    csl_fast.accumulate(torch.randn(8, 3), torch.arange(8) % 3, torch.arange(8), t)
    t.end_epoch()
    assert t.epoch == 1 and distributed.sync(t) is False
    mark_synced(t)


def _shard(scenario: str, n: int, world: int, epoch: int, rank: int) -> list[torch.Tensor]:
    """Rank ``rank``'s index batches (of 3) in ``epoch``: ``DistributedSampler`` with its
    padding or with ``drop_last``, or (``"any"``) a random subset of any size, overlapping
    the other ranks', and nothing at all on the last rank every other epoch."""
    if scenario == "any":
        if rank == world - 1 and epoch % 2 == 0:
            return []
        g = torch.Generator().manual_seed(100 * epoch + rank)
        k = int(torch.randint(0, n + 1, (1,), generator=g))
        idx = torch.randperm(n, generator=g)[:k]
    else:
        s = DistributedSampler(
            range(n), world, rank, shuffle=True, seed=3, drop_last=scenario == "drop_last"
        )
        s.set_epoch(epoch)
        idx = torch.tensor(list(s), dtype=torch.int64)
    return list(idx.split(3))


def _world_worker(rank, world, init, out, scenario, n, epochs):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        tracker = CSLTracker(n, C, dtype=torch.float64, history=True)
        for e in range(epochs):
            for t, idx in enumerate(_shard(scenario, n, world, e, rank)):
                _record(tracker, idx, e, rank, t)
            tracker.end_epoch()
        assert tracker.sync() is (world > 1)
        torch.save(tracker.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("world", [1, 3])
@pytest.mark.parametrize("scenario", ["padding", "drop_last", "any"])
def test_sync_world_sizes_uneven_and_empty_ranks(tmp_path, world, scenario):
    """World sizes 1 and 3 on N = 10 (3 does not divide it): DistributedSampler's padding
    and drop_last, and shards of any size that overlap, with a rank that sees nothing;
    the synced trackers equal one process over (epoch, rank, batch order)."""
    n, epochs = 10, 4
    _spawn(_world_worker, (world, f"file://{tmp_path / 'pg_init'}", str(tmp_path), scenario, n,
                           epochs), nprocs=world)  # fmt: skip
    ref = CSLTracker(n, C, dtype=torch.float64, history=True)
    for e in range(epochs):
        for r in range(world):
            for t, idx in enumerate(_shard(scenario, n, world, e, r)):
                _record(ref, idx, e, r, t)
        ref.end_epoch()
    for r in range(world):
        state = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        # The vote is the owner's (documented): exact unless a sample met on several ranks.
        _assert_same(state, ref, r, votes=scenario == "drop_last" or world == 1)


def _subgroup_worker(rank: int, init: str, out: str, own: bool):
    """Ranks 0 and 1 form one data-parallel group, rank 2 another (as with two pipeline
    stages): end_epoch(group) and sync(group) combine within the group only. Without a
    group of its own (``own`` False), rank 2 passes what dist.new_group([0, 1]) gave it,
    GroupMember.NON_GROUP_MEMBER (an int: it was refused as not a process group)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=3)
    try:
        groups = [dist.new_group([0, 1]), dist.new_group([2])]
        group = groups[rank // 2 if own else 0]
        tracker = CSLTracker(3, C)
        idx = torch.tensor([rank])
        csl_fast.accumulate(torch.zeros(1, C), torch.tensor([0]), idx, tracker)
        tracker.end_epoch(group)
        counts = [tracker.csl_count.tolist()]
        csl_fast.accumulate(torch.zeros(1, C), torch.tensor([0]), idx, tracker)
        tracker.sync(group)
        counts.append(tracker.csl_count.tolist())
        with open(os.path.join(out, f"sub{rank}.json"), "w") as f:
            json.dump(counts, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("own", [True, False])
def test_end_epoch_combines_only_the_ranks_of_its_group(tmp_path, own):
    _spawn(_subgroup_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path), own), nprocs=3)
    got = [json.loads((tmp_path / f"sub{r}.json").read_text()) for r in range(3)]
    pair, alone = [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    assert got == [[pair, [2.0, 2.0, 0.0]]] * 2 + [[alone, [0.0, 0.0, 2.0]]]


def _overflow_worker(rank: int, init: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        t = CSLTracker(4, C)
        t.csl_count[2] = 2.0**32  # presentations enough for the events
        t.forgetting[2] = 2**30 + 1  # on each rank: 2**31 + 2 together
        before = t.forgetting.clone()
        try:
            t.sync()
            msg = "no error"
        except SyncError as exc:
            msg = str(exc)
        msg += f" | unchanged: {torch.equal(t.forgetting, before)}"
        with open(os.path.join(out, f"overflow{rank}.txt"), "w") as f:
            f.write(msg)
    finally:
        dist.destroy_process_group()


def test_a_forgetting_count_past_int32_over_the_ranks_is_refused_on_every_rank(tmp_path):
    """The ranks' forgetting deltas were all-reduced in int32: 2 x (2**30 + 1) wrapped to
    -2147483646 and became the sample's forgetting count on every rank, silently."""
    _spawn(_overflow_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path)))
    for r in range(WORLD):
        assert (tmp_path / f"overflow{r}.txt").read_text() == (
            "csl_fast.distributed.sync: sample 2's forgetting count over the ranks is "
            "2147483650, past 2**31 - 1 = 2147483647, the most a tracker's int32 forgetting "
            "counter holds; this tracker is left as it was | unchanged: True"
        )


def _load_worker(rank: int, init: str, out: str):
    """Loads that sync could not tell from presentations: a checkpoint of epoch 0 (saved
    after a sync), and an older checkpoint loaded into a tracker synced since."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    msgs = []

    def attempt(t: CSLTracker) -> None:
        try:
            t.sync()
            msgs.append(t.csl_count.tolist())
        except SyncError as exc:
            msgs.append(str(exc))

    try:
        one = torch.zeros(1, C), torch.tensor([0])
        t = CSLTracker(4, C)
        csl_fast.accumulate(*one, torch.tensor([rank]), t)
        t.sync()
        path = os.path.join(out, "epoch0.csl")
        if rank == 0:
            t.save(path)  # csl_count [1, 1, 0, 0]
        dist.barrier()
        attempt(CSLTracker.from_file(path))  # was [2, 2, 0, 0]: the file once per rank
        t.end_epoch()
        t.end_epoch()
        older = t.state_dict()  # epoch 2
        older = {**older, "buffers": {k: v.clone() for k, v in older["buffers"].items()}}
        csl_fast.accumulate(*one, torch.tensor([rank]), t)
        t.end_epoch()  # synced at epoch 2: csl_count [2, 2, 0, 0]
        t.load_state_dict(older)
        attempt(t)  # was [0, 0, 0, 0]: base + 2 x (older - base)
        mark_synced(t)
        csl_fast.accumulate(*one, torch.tensor([2 + rank]), t)
        attempt(t)
        u = CSLTracker(4, C)
        if rank == 1:
            u.load_state_dict(CSLTracker(4, C).state_dict())
        attempt(u)
        # two checkpoints of one setup at one epoch (another seed: equal count totals):
        # mark_synced passed, and the ranks went on with different trackers
        v = CSLTracker(4, C)
        logits = torch.zeros(1, C)
        logits[0, 0] = float(rank)
        csl_fast.accumulate(logits, torch.tensor([0]), torch.tensor([0]), v)
        try:
            mark_synced(v)
            msgs.append("marked")
        except SyncError as exc:
            msgs.append(str(exc))
        # a wait that is not a number of seconds > 0, refused before any collective
        for bad in (0, -5.0, True, float("nan"), "10"):
            for call in (mark_synced, csl_fast.distributed.sync):
                try:
                    call(t, timeout=bad)
                    msgs.append("waited")
                except ValueError as exc:
                    msgs.append(str(exc))
        with open(os.path.join(out, f"load{rank}.json"), "w") as f:
            json.dump(msgs, f)
    finally:
        dist.destroy_process_group()


def test_sync_after_a_load_without_mark_synced_raises_on_every_rank(tmp_path):
    _spawn(_load_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path)))
    got = [json.loads((tmp_path / f"load{r}.json").read_text()) for r in range(WORLD)]
    assert got[0] == got[1]
    for msg in got[0][:2]:
        assert "was loaded" in msg and "mark_synced(tracker) on every rank" in msg, msg
    assert got[0][2] == [1.0, 1.0, 1.0, 1.0]
    assert "loaded, not marked (rank 0: False, rank 1: True)" in got[0][3]
    assert "differ in state checksum (rank 0: hash" in got[0][4], got[0][4]
    assert len(got[0]) == 5 + 10
    for msg, call in zip(got[0][5:], ["mark_synced", "sync"] * 5, strict=True):
        assert f"csl_fast.distributed.{call}: timeout must be > 0, got" in msg


def _device_worker(rank: int, init: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    set_timeout(20.0)  # a hang would be a timeout, not an error naming the device
    msgs = []

    def attempt(call) -> None:
        _attempt(msgs, call, named=True)

    try:
        meta = CSLTracker(4, C, device="meta")
        attempt(meta.sync)  # was a timeout blaming a rank that skipped end_epoch()
        attempt(lambda: mark_synced(meta))  # was "Cannot copy out of meta tensor"
        attempt(CSLTracker(4, C, device="meta" if rank else "cpu").end_epoch)
        # A process group that asks for NCCL where torch has no CUDA (was an
        # AssertionError "Torch not compiled with CUDA enabled" from torch.cuda).
        get_backend, available = dist.get_backend, torch.cuda.is_available
        dist.get_backend, torch.cuda.is_available = (lambda group=None: "nccl"), (lambda: False)
        try:
            attempt(CSLTracker(4, C).sync)
        finally:
            dist.get_backend, torch.cuda.is_available = get_backend, available
        assert CSLTracker(4, C).sync()  # the group still works
        with open(os.path.join(out, f"dev{rank}.json"), "w") as f:
            json.dump(msgs, f)
    finally:
        set_timeout(None)
        dist.destroy_process_group()


def test_meta_trackers_and_nccl_without_cuda_raise_clear_errors(tmp_path):
    _spawn(_device_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path)))
    got = [json.loads((tmp_path / f"dev{r}.json").read_text()) for r in range(WORLD)]
    assert got[0] == got[1]
    sync, mark, mixed, nccl = got[0]
    assert sync.startswith("SyncError: csl_fast.distributed.sync: the tracker lives on the")
    assert "'meta' device" in sync and "device='cpu'" in sync
    assert mark.startswith("SyncError: csl_fast.distributed.mark_synced: the tracker lives")
    assert "meta device (rank 0: False, rank 1: True)" in mixed
    assert "uses NCCL, which needs CUDA" in nccl and "backend 'gloo'" in nccl


# Every correctness sequence of a sample (1 = correct): before the window (rank 0, epoch
# 0), then in one window of epoch 1 on rank 0 (up to 2 presentations) and on rank 1 (up to 3).
_SEQS = [
    (before, a, b)
    for before in [(), (0,), (1,), (1, 0), (0, 1)]
    for a in [s for k in range(3) for s in itertools.product((0, 1), repeat=k)]
    for b in [s for k in range(4) for s in itertools.product((0, 1), repeat=k)]
]


def _present_all(tracker: CSLTracker, which: int, tokens: int = 1) -> None:
    """Present each sample's ``_SEQS[i][which]``, presentation ``j`` in batch ``j``; with
    ``tokens`` > 1 as sequences of that many tokens, all right or all wrong."""
    for j in range(3):
        idx = [i for i, seq in enumerate(_SEQS) if len(seq[which]) > j]
        if idx:
            correct = torch.tensor([_SEQS[i][which][j] for i in idx])
            logits = torch.zeros(len(idx), tokens, C)
            logits[torch.arange(len(idx)), :, 1 - correct] = 5.0  # the label is class 0
            target = torch.zeros(len(idx), tokens, dtype=torch.int64)
            if tokens == 1:
                logits, target = logits[:, 0], target[:, 0]
            else:
                logits = logits.flatten(0, 1)  # [B*T, C] logits and [B, T] targets
            csl_fast.accumulate(logits, target, torch.tensor(idx), tracker)


def _seams_worker(rank: int, init: str, out: str, tokens: int = 1):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        t = CSLTracker(len(_SEQS), C)
        if rank == 0:
            _present_all(t, 0, tokens)
        t.end_epoch()
        _present_all(t, 1 + rank, tokens)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t.sync()
        state = {k: t.buffers()[k] for k in ("forgetting", "learned_epoch", "last_correct")}
        state["warnings"] = [str(w.message) for w in caught]
        torch.save(state, os.path.join(out, f"seams{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_forgetting_at_the_seams_is_off_by_at_most_one_where_sync_warns(tmp_path):
    """The documented limit, over every sequence: exact unless rank 1 presented a sample
    twice or more after rank 0 presented it; there forgetting is off by at most one,
    learned_epoch and last_correct exact, and sync warns with the count."""
    _spawn(_seams_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path)))
    ref = CSLTracker(len(_SEQS), C)
    _present_all(ref, 0)
    ref.end_epoch()
    _present_all(ref, 1)
    _present_all(ref, 2)
    got = torch.load(tmp_path / "seams0.pt", weights_only=True)
    unsure = torch.tensor([len(a) > 0 and len(b) > 1 for _, a, b in _SEQS])
    off = got["forgetting"] - ref.forgetting
    assert int(off.abs().max()) == 1 and not off[~unsure].any()
    assert torch.equal(got["learned_epoch"], ref.learned_epoch)
    assert torch.equal(got["last_correct"], ref.last_correct)
    (msg,) = got["warnings"]
    warned = int(msg.removeprefix("csl_fast.distributed.sync: ").split()[0])
    assert int((off != 0).sum()) <= warned <= int(unsure.sum()), msg
    assert "a sync() on every rank between the repeats" in msg


def test_sequences_at_the_seams_are_off_by_at_most_one(tmp_path):
    """A sequence's csl_count counts its tokens, so sync cannot tell how often one rank
    presented it: a window one presentation explains is taken as one. Where rank 1
    presented a sample at most once the result is exact; elsewhere forgetting is off by at
    most one, and only windows one presentation cannot explain are warned about."""
    _spawn(_seams_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path), 2))
    ref = CSLTracker(len(_SEQS), C)
    _present_all(ref, 0, 2)
    ref.end_epoch()
    _present_all(ref, 1, 2)
    _present_all(ref, 2, 2)
    got = torch.load(tmp_path / "seams0.pt", weights_only=True)
    repeated = torch.tensor([len(a) > 0 and len(b) > 1 for _, a, b in _SEQS])
    off = got["forgetting"] - ref.forgetting
    assert int(off.abs().max()) <= 1 and not off[~repeated].any()
    assert torch.equal(got["learned_epoch"], ref.learned_epoch)
    assert torch.equal(got["last_correct"], ref.last_correct)
    (msg,) = got["warnings"]
    warned = int(msg.removeprefix("csl_fast.distributed.sync: ").split()[0])
    assert warned == sum(map(_unexplained_after_a_change, _SEQS)), msg


def _unexplained_after_a_change(seq: tuple) -> bool:
    """Whether rank 1's window of ``seq`` cannot be one presentation, after rank 0 changed
    the sample's state: what sync warns about for sequences."""
    before, a, b = seq
    s0 = bool(before) and before[-1] == 1
    if not a or a[-1] == s0 or not b:
        return False
    states = [s0, *(x == 1 for x in b)]
    forgot = sum(p and not q for p, q in itertools.pairwise(states))
    last = states[-1]
    return not ((forgot == 0 and not (s0 and not last)) or (forgot == 1 and s0 and not last))


def _padded_sequences_worker(rank: int, init: str, out: str):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    try:
        n, tokens = 3, 2  # 3 samples on 2 ranks: the sampler repeats one on rank 1
        idx = torch.tensor(list(DistributedSampler(range(n), WORLD, rank, shuffle=False)))
        t = CSLTracker(n, C)
        target = (idx[:, None] + torch.arange(tokens)) % C
        logits = torch.nn.functional.one_hot(target, C).double() * 5  # every token right
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            csl_fast.accumulate(logits.flatten(0, 1), target, idx, t)
            t.end_epoch()
        state = {k: t.buffers()[k] for k in ("forgetting", "csl_count", "last_correct")}
        state["warnings"] = [str(w.message) for w in caught]
        torch.save(state, os.path.join(out, f"padded{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sequences_repeated_by_the_sampler_sync_without_a_warning(tmp_path):
    """DistributedSampler's padding repeats a sample on another rank, never on one rank
    twice: sequences synced that way are exact and not warned about (each repeat was)."""
    _spawn(_padded_sequences_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path)))
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"padded{rank}.pt", weights_only=True)
        assert got["warnings"] == []
        assert got["csl_count"].tolist() == [4, 2, 2]  # tokens, sample 0 presented twice
        assert got["forgetting"].tolist() == [0, 0, 0]
        assert got["last_correct"].all()


def _unsynced_save_worker(rank: int, init: str, out: str):
    """What save / state_dict warn about at each point of a DDP loop (each rank records
    its own samples: rank r's are 2r and 2r + 1)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    t = CSLTracker(6, C)
    model = torch.nn.Identity()
    idx = torch.tensor([0, 1]) + 2 * rank
    z = torch.randn(2, C)
    got = {}

    def check(point: str) -> None:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            t.save(os.path.join(out, f"t{rank}.csl"))
            t.state_dict()
        got[point] = [str(m.message) for m in w if m.category is distributed.UnsyncedStateWarning]

    check("fresh")
    csl_fast.accumulate(z, idx % C, idx, t)
    check("mid-epoch")
    t.end_epoch()
    check("after end_epoch")
    csl_fast.score_epoch(model, [(z, idx % C, idx)], t)
    check("after an eval pass")
    t.sync()
    check("after sync")
    synced = t
    t = copy.deepcopy(synced)  # its version counters restart
    check("a deep copy")
    t = synced
    csl_fast.accumulate(z, idx % C, idx, t)
    csl_fast.score_epoch(model, [(z, idx % C, idx)], t)
    t.end_epoch()
    check("eval pass, then end_epoch")
    loaded = CSLTracker.from_file(os.path.join(out, f"t{rank}.csl"))
    mark_synced(loaded)
    t = loaded
    check("loaded and marked")
    with open(os.path.join(out, f"unsynced{rank}.json"), "w") as f:
        json.dump(got, f)
    dist.destroy_process_group()


def test_save_and_state_dict_warn_of_records_not_synced(tmp_path):
    """Saved on rank 0 mid-epoch, or after the last eval pass without a sync, the state
    held rank 0's part of those records only, without a word."""
    _spawn(_unsynced_save_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path)))
    for rank in range(WORLD):
        got = json.loads((tmp_path / f"unsynced{rank}.json").read_text())
        warned = {point: len(msgs) for point, msgs in got.items()}
        assert warned == {
            "fresh": 0,
            "mid-epoch": 2,  # save and state_dict
            "after end_epoch": 0,
            "after an eval pass": 2,
            "after sync": 0,
            "a deep copy": 0,
            "eval pass, then end_epoch": 0,
            "loaded and marked": 0,
        }
        train, evals = got["mid-epoch"][0], got["after an eval pass"][1]
        assert train.startswith(f"csl_fast: CSLTracker.save() on rank {rank} of 2")
        assert "recorded training presentations since its last sync" in train
        assert evals.startswith(f"csl_fast: CSLTracker.state_dict() on rank {rank} of 2")
        assert "recorded eval presentations since its last sync" in evals
        assert "Call tracker.sync() on every rank (a collective) before saving" in evals


def _save_unsynced_worker(rank, init, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=1)
    try:
        t = CSLTracker(4, C)
        csl_fast.accumulate(torch.randn(2, C), torch.tensor([0, 1]), torch.arange(2), t)
        with warnings.catch_warnings():
            warnings.simplefilter("error", distributed.UnsyncedStateWarning)
            t.save(os.path.join(out, "t.csl"))
            t.state_dict()
    finally:
        dist.destroy_process_group()


def test_save_in_a_single_process_does_not_warn(tmp_path):
    """Nothing can be missing with one process: no group, or a group of one (torchrun
    --nproc_per_node=1)."""
    t = CSLTracker(4, C)
    csl_fast.accumulate(torch.randn(2, C), torch.tensor([0, 1]), torch.arange(2), t)
    with warnings.catch_warnings():
        warnings.simplefilter("error", distributed.UnsyncedStateWarning)
        t.save(tmp_path / "t.csl")
        t.state_dict()
    _spawn(_save_unsynced_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path)), nprocs=1)
    assert (tmp_path / "t.csl").exists()
