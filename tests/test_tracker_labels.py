"""The per-(sample, label) CSL buffer of ``CSLTracker(num_labels=L)``: allocation, memory,
state dict, file, merge and distributed sync, like every other buffer."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import csl_fast
from csl_fast import CSLTracker, TrackerFileError, TrackerStateError
from csl_fast.distributed import SyncError
from csl_fast.tracker_state import FORMAT_VERSION

N, L = 13, 5


def _filled(seed: int = 0, **kwargs) -> CSLTracker:
    """A label tracker with random per-entry CSL and presentations of every sample."""
    g = torch.Generator().manual_seed(seed)
    t = CSLTracker(N, num_labels=L, **kwargs)
    idx = torch.arange(N)
    for _ in range(3):
        entry = torch.rand(N, L, generator=g, dtype=t.dtype)
        t.label_csl.index_put_((idx,), entry, accumulate=True)
        t.label_prob.index_put_((idx,), torch.exp(-entry), accumulate=True)
        csl_fast.record_loss(entry.sum(1), idx, t)
    t.end_epoch()
    return t


def test_buffer_shape_default_and_none():
    t = CSLTracker(N, num_labels=L)
    assert t.num_labels == L
    assert t.label_csl.shape == (N, L) and t.label_csl.dtype == torch.float32
    assert t.label_csl is t.buffers()["label_csl_sum"]  # live: recorders add into it
    assert not t.label_csl.any()
    assert torch.isnan(t.label_csl_mean).all()  # never presented
    plain = CSLTracker(N)
    assert plain.num_labels is None and plain.label_csl is None and plain.label_csl_mean is None
    assert "label_csl_sum" not in plain.buffers()
    assert "num_labels=5" in repr(t) and "num_labels" not in repr(plain)
    assert CSLTracker(N, num_labels=L, dtype=torch.float64).label_csl.dtype == torch.float64


def test_memory_is_8_bytes_per_label_and_sample():
    extra = CSLTracker(1000, num_labels=50).nbytes() - CSLTracker(1000).nbytes()
    assert extra == 2 * 4 * 50 * 1000  # label_csl and label_prob
    extra64 = (
        CSLTracker(1000, num_labels=50, dtype=torch.float64).nbytes()
        - CSLTracker(1000, dtype=torch.float64).nbytes()
    )
    assert extra64 == 2 * 8 * 50 * 1000


@pytest.mark.parametrize("bad", [0, -1, 2.0, True, "5"])
def test_bad_num_labels_is_refused(bad):
    with pytest.raises(ValueError, match="num_labels must be None or an int >= 1"):
        CSLTracker(N, num_labels=bad)


def test_label_csl_mean():
    t = _filled()
    want = t.label_csl / t.csl_count[:, None]
    torch.testing.assert_close(t.label_csl_mean, want)
    torch.testing.assert_close(t.label_csl.sum(1), t.csl_sum, rtol=1e-5, atol=1e-5)


def test_state_dict_round_trip_and_mismatch():
    t = _filled()
    state = t.state_dict()
    assert state["num_labels"] == L
    u = CSLTracker(N, num_labels=L)
    u.load_state_dict(state)
    assert torch.equal(u.label_csl, t.label_csl)
    with pytest.raises(TrackerStateError, match="num_labels=5 but this tracker has num_labels=4"):
        CSLTracker(N, num_labels=4).load_state_dict(state)
    with pytest.raises(TrackerStateError, match="num_labels=5 but this tracker has num_labels=No"):
        CSLTracker(N).load_state_dict(state)
    bad = dict(state, buffers=dict(state["buffers"], label_csl_sum=torch.zeros(N)))
    before = u.label_csl.clone()
    with pytest.raises(TrackerStateError, match=r"label_csl_sum.*\[N = 13, L = 5\]"):
        u.load_state_dict(bad)
    assert torch.equal(u.label_csl, before)  # unchanged on error
    with pytest.raises(TrackerStateError, match="num_labels"):
        u.load_state_dict(dict(state, num_labels=0))


def test_state_without_num_labels_reads_as_none():
    """States (and files) written before per-label buffers existed have no num_labels."""
    t = _filled()
    plain = CSLTracker(N)
    old = {k: v for k, v in CSLTracker(N).state_dict().items() if k != "num_labels"}
    plain.load_state_dict(old)
    state = {k: v for k, v in t.state_dict().items() if k != "num_labels"}
    with pytest.raises(TrackerStateError, match="num_labels=None but this tracker has"):
        CSLTracker(N, num_labels=L).load_state_dict(state)
    assert plain.num_labels is None


def test_file_round_trip(tmp_path):
    t = _filled(dtype=torch.float64)
    path = tmp_path / "run.csl"
    t.save(path)
    raw = path.read_bytes()
    header = json.loads(raw[16 : 16 + int.from_bytes(raw[8:16], "little")])
    assert header["num_labels"] == L and header["version"] == FORMAT_VERSION == 3
    assert ["buffers/label_csl_sum", "float64", [N, L]] in header["tensors"]
    assert ["buffers/label_prob_sum", "float64", [N, L]] in header["tensors"]
    u = CSLTracker.from_file(path)
    assert u.num_labels == L and u.dtype == torch.float64
    assert torch.equal(u.label_csl, t.label_csl) and torch.equal(u.label_prob, t.label_prob)
    v = CSLTracker(N, num_labels=L, dtype=torch.float64)
    v.load(path)
    assert torch.equal(v.label_csl, t.label_csl) and torch.equal(v.label_prob, t.label_prob)
    with pytest.raises(TrackerFileError, match="num_labels"):
        CSLTracker(N).load(path)
    # A plain tracker's file still loads as before (and says num_labels: null).
    CSLTracker(N).save(tmp_path / "plain.csl")
    assert CSLTracker.from_file(tmp_path / "plain.csl").label_csl is None


def test_merge_adds_label_csl_and_refuses_mixed_labels():
    a, b = _filled(0), _filled(1)
    m = csl_fast.merge([a, b])
    assert m.num_labels == L
    torch.testing.assert_close(m.label_csl, a.label_csl + b.label_csl)
    with pytest.raises(TrackerStateError, match="different num_labels"):
        csl_fast.merge([a, CSLTracker(N)])
    assert csl_fast.merge([CSLTracker(N), CSLTracker(N)]).label_csl is None


# -------------------------------------------------------------------- distributed sync
def _sync_worker(rank: int, init: str, out: str, labels: list[int]):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        t = CSLTracker(N, num_labels=labels[rank], dtype=torch.float64)
        idx = torch.arange(rank, N, 2)  # each rank presents its own shard
        entry = torch.arange(idx.numel() * labels[rank], dtype=torch.float64).view(idx.numel(), -1)
        t.label_csl.index_put_((idx,), entry + rank, accumulate=True)
        csl_fast.record_loss(entry.sum(1), idx, t)
        try:
            t.end_epoch()  # syncs
            t.label_csl[0, 0] += 100.0  # a second window: only the deltas (2 x 100) add
            t.sync()
        except SyncError as exc:
            with open(os.path.join(out, f"err{rank}.txt"), "w") as f:
                f.write(str(exc))
            return
        torch.save(t.state_dict(), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _run_sync(tmp_path, labels):
    init = f"file://{tmp_path / 'pg_init'}"
    mp.start_processes(
        _sync_worker, args=(init, str(tmp_path), labels), nprocs=2, start_method="fork"
    )


def test_sync_adds_label_csl(tmp_path):
    _run_sync(tmp_path, [L, L])
    want = torch.zeros(N, L, dtype=torch.float64)
    for rank in range(2):
        idx = torch.arange(rank, N, 2)
        want[idx] += torch.arange(idx.numel() * L, dtype=torch.float64).view(-1, L) + rank
    want[0, 0] += 200.0
    for rank in range(2):
        state = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(state["buffers"]["label_csl_sum"], want, rtol=0, atol=0)
        assert state["buffers"]["csl_count"].eq(1).all()


def test_sync_refuses_different_num_labels(tmp_path):
    _run_sync(tmp_path, [L, L + 1])
    for rank in range(2):
        said = (tmp_path / f"err{rank}.txt").read_text()
        assert f"num_labels (rank 0: {L}, rank 1: {L + 1})" in said


def test_version_2_state_and_file_load_without_probabilities(tmp_path):
    """Version 2 had one per-label buffer: its states and files load with label_prob NaN
    (unknown so far, and after more training too), which detection does not use."""
    from test_tracker_file import _write_v2

    t = _filled()
    state = t.state_dict()
    state["version"] = 2
    del state["buffers"]["label_prob_sum"]
    u = CSLTracker(N, num_labels=L)
    u.load_state_dict(state)
    assert torch.equal(u.label_csl, t.label_csl) and u.label_prob.isnan().all()
    _write_v2(tmp_path / "v2.csl", state)
    v = CSLTracker.from_file(tmp_path / "v2.csl")
    assert torch.equal(v.label_csl, t.label_csl) and v.label_prob.isnan().all()
    logits, target = torch.randn(N, L), (torch.rand(N, L) < 0.3).float()
    csl_fast.accumulate_bce(logits, target, torch.arange(N), v)  # resumed: still unknown
    assert v.label_prob.isnan().all() and not v.label_csl.isnan().any()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", csl_fast.detect.DetectionWarning)  # 13 x 5 entries
        det = csl_fast.detect_losses.mislabeled_entries(v)
    assert det.diagnostics["doubt"].startswith("not recorded")
    fresh = CSLTracker(N, num_labels=L).state_dict()  # nothing presented: the sums are 0
    fresh["version"] = 2
    del fresh["buffers"]["label_prob_sum"]
    w = CSLTracker(N, num_labels=L)
    w.load_state_dict(fresh)
    assert torch.equal(w.label_prob, torch.zeros(N, L))
    del state["buffers"]["label_csl_sum"]  # but version 2 had label_csl_sum
    with pytest.raises(TrackerStateError, match=r"lacks entries.*label_csl_sum"):
        CSLTracker(N, num_labels=L).load_state_dict(state)
