"""``csl_fast.merge``: several runs' trackers into one."""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import csl_fast
from csl_fast import CSLTracker, TrackerStateError

N, C = 10, 3


def _run(seed: int, epochs: int = 3, history: bool = True, dtype=torch.float32) -> CSLTracker:
    g = torch.Generator().manual_seed(seed)
    t = CSLTracker(N, C, dtype=dtype, history=history)
    for _ in range(epochs):
        idx = torch.randperm(N, generator=g)[: N - 2]  # two samples skipped each epoch
        target = idx % C
        logits = torch.randn(idx.numel(), C, generator=g) * 2
        csl_fast.accumulate(logits, target, idx, t)
        t.record_input_grad(idx, torch.rand(idx.numel(), generator=g))
        t.end_epoch()
    return t


def test_merge_sums_counts_and_means(tmp_path):
    runs = [_run(s) for s in range(3)]
    runs[2].save(tmp_path / "seed2.csl")
    merged = csl_fast.merge([runs[0], runs[1].state_dict(), tmp_path / "seed2.csl"])
    for name in ("csl_sum", "csl_count", "margin_sum", "p_true_sq_sum", "input_grad_sq_sum"):
        want = sum(r.buffers()[name] for r in runs)
        torch.testing.assert_close(merged.buffers()[name], want)
    # the runs' events, and one for each run that ended correct where the merge is not
    seen = torch.stack([r.csl_count > 0 for r in runs])
    ended = (torch.stack([r.last_correct for r in runs]) & seen).sum(0)
    allc = (torch.stack([r.last_correct for r in runs]) | ~seen).all(0) & seen.any(0)
    want = sum(r.forgetting for r in runs) + torch.where(allc, 0, ended)
    assert torch.equal(merged.forgetting, want.int())
    pooled = sum(r.csl_sum for r in runs) / sum(r.csl_count for r in runs)
    torch.testing.assert_close(merged.csl_mean, pooled, equal_nan=True)
    torch.testing.assert_close(
        merged.aum, sum(r.margin_sum for r in runs) / sum(r.csl_count for r in runs)
    )
    # Last values: mean over the runs that presented the sample; correct only if all were.
    seen = torch.stack([r.csl_count > 0 for r in runs])
    last = torch.stack([r.last_loss for r in runs])
    want = (last * seen).sum(0) / seen.sum(0).clamp(min=1)
    torch.testing.assert_close(merged.last_loss, want)
    allc = (torch.stack([r.last_correct for r in runs]) | ~seen).all(0) & seen.any(0)
    assert torch.equal(merged.last_correct, allc)
    le = torch.stack([r.learned_epoch for r in runs]).amax(0)
    assert torch.equal(merged.learned_epoch, torch.where(allc, le, -1))
    assert merged.epoch == 3
    torch.testing.assert_close(
        merged.loss_history.float(),
        torch.stack([r.loss_history.float() for r in runs]).nanmean(0),
        equal_nan=True,
        atol=1e-3,
        rtol=1e-3,
    )
    # Scores work on the merged tracker as on any tracker, and the inputs are untouched.
    assert merged.learning_time().shape == (N,)
    assert torch.equal(runs[0].csl_sum, _run(0).csl_sum)


def test_a_sample_one_run_learned_stays_learned():
    """Run A classified both samples correctly throughout, run B never: the merge read
    them as never learned (ever_correct False, forgetting's worst score), where a tracker
    fed both runs' batches counts one forgetting event and a learned sample."""
    y, idx = torch.tensor([0, 1]), torch.arange(2)
    right = torch.tensor([[3.0, 0.0], [0.0, 3.0]])

    def run(z):
        t = CSLTracker(2, 2)
        for _ in range(2):
            csl_fast.accumulate(z, y, idx, t)
            t.end_epoch()
        return t

    a, b = run(right), run(right.flip(1))
    for merged in (csl_fast.merge([a, b]), csl_fast.merge([b, a])):
        assert merged.ever_correct.all() and merged.forgetting.tolist() == [1, 1]
        assert not merged.last_correct.any()
    both = run(right)
    for _ in range(2):
        csl_fast.accumulate(right.flip(1), y, idx, both)
        both.end_epoch()
    assert both.forgetting.tolist() == [1, 1] and both.ever_correct.all()
    assert csl_fast.merge([a, a]).forgetting.tolist() == [0, 0]  # all correct: no event


def test_merge_one_run_is_a_copy():
    run = _run(5)
    merged = csl_fast.merge([run])
    for name, buf in run.buffers().items():
        assert torch.equal(merged.buffers()[name], buf), name
    assert merged.buffers()["csl_sum"].data_ptr() != run.csl_sum.data_ptr()
    # a merge of 3 runs alone: its last values were weighed by 3 and divided by 3 again,
    # an ulp off
    state = csl_fast.merge([_run(5), _run(6), _run(7)]).state_dict()
    seen = state["buffers"]["csl_count"] > 0
    # values whose x * 3 / 3 is not x in float32 (1 in 6 of uniform ones)
    values = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    odd = values[values * 3 / 3 != values][:N]
    state["buffers"] = dict(state["buffers"], last_loss=torch.where(seen, odd, 0))
    merged = CSLTracker(N, C, history=True)
    merged.load_state_dict(state)
    assert merged.runs == 3
    again = csl_fast.merge([merged])
    for name, buf in merged.buffers().items():
        assert torch.equal(again.buffers()[name], buf), name


def test_merge_aligns_histories_and_mixes_dtypes():
    a = _run(0, epochs=2, dtype=torch.float64)
    b = _run(1, epochs=4, history=False)
    merged = csl_fast.merge([a, b])
    assert merged.dtype == torch.float64 and not merged.history
    assert merged.epoch == 4
    ig = merged.input_grad_history
    assert ig.shape == (4, N)
    torch.testing.assert_close(ig[2:], b.input_grad_history[2:], equal_nan=True)


def test_merge_refuses_different_n():
    with pytest.raises(TrackerStateError, match=r"different numbers of samples N = \[10, 11\]"):
        csl_fast.merge([CSLTracker(10), CSLTracker(11)])
    with pytest.raises(
        TrackerStateError, match=r"num_classes \(tracker 0: 3, tracker 1: None, tracker 2: 4\)"
    ):
        csl_fast.merge([CSLTracker(10, 3), CSLTracker(10), CSLTracker(10, 4)])
    assert csl_fast.merge([CSLTracker(10), CSLTracker(10, 4)]).num_classes == 4
    with pytest.raises(TrackerStateError, match="no trackers"):
        csl_fast.merge([])
    with pytest.raises(TypeError, match="expected CSLTrackers"):
        csl_fast.merge([42])


def test_merge_refuses_a_single_path_or_state(tmp_path):
    t = CSLTracker(N, C)
    t.save(tmp_path / "run.csl")
    for single in ("run.csl", tmp_path / "run.csl", t, t.state_dict()):
        with pytest.raises(TypeError, match=r"expected a list .* pass a list"):
            csl_fast.merge(single)
    state = t.state_dict()
    state["num_samples"] = str(N)  # a str, not an int: a type error, not "N=10 vs N=10"
    with pytest.raises(TrackerStateError, match="'num_samples' must be an int >= 0, got str '10'"):
        csl_fast.merge([t, state])


@pytest.mark.parametrize(
    ("trackers", "device", "error", "match"),
    [
        # torch's "Expected one of cpu, cuda, ..." and "Cannot access accelerator device"
        ("two", "bogus", ValueError, r"cannot allocate on device 'bogus' .*; merge on 'cpu'"),
        ("two", 3, ValueError, r"cannot allocate on device 3"),
        # "'NoneType' object is not iterable"
        (None, None, TypeError, r"expected a list of trackers, .* got NoneType"),
        (5, None, TypeError, r"expected a list of trackers, .* got int"),
    ],
)
def test_merge_checks_its_device_and_runs_by_name(trackers, device, error, match):
    if trackers == "two":
        trackers = [CSLTracker(N, C), CSLTracker(N, C)]
    with pytest.raises(error, match=r"^csl_fast\.merge: " + match):
        csl_fast.merge(trackers, device=device)


def test_merge_suggested_label_votes():
    """Majority-vote summaries: the same candidate adds up; different candidates keep the
    one with more votes and the difference."""
    runs = [CSLTracker(4, C) for _ in range(3)]
    for t, (label, votes, hits) in zip(
        runs,
        [([1, 2, -1, 0], [3, 2, 0, 1], [4, 2, 0, 1]),
         ([1, 0, 2, 0], [1, 5, 2, 1], [1, 6, 3, 1]),
         ([-1, 0, -1, 1], [0, 1, 0, 3], [0, 1, 0, 3])],
        strict=True,
    ):  # fmt: skip
        t.suggest_label.copy_(torch.tensor(label))
        t.suggest_votes.copy_(torch.tensor(votes))
        t.suggest_hits.copy_(torch.tensor(hits))
        t.csl_count.fill_(10)  # presentations enough for those votes
    merged = csl_fast.merge(runs)
    assert merged.suggest_label.tolist() == [1, 0, 2, 1]
    assert merged.suggest_votes.tolist() == [4, 4, 2, 1]
    assert merged.suggest_hits.tolist() == [5, 7, 3, 3]


def test_merge_pads_input_gradient_rows_of_epochs_without_records():
    """A run with input gradients for 2 epochs merged with a 5-epoch run without any gave
    2 rows for epochs 0..4: the merged tracker's next epoch landed at row 2 (epoch 2)."""
    idx = torch.arange(4)
    runs = []
    for epochs, grads in ((2, True), (5, False)):
        t = CSLTracker(4, 3)
        for e in range(epochs):
            csl_fast.accumulate(torch.randn(4, 3), idx % 3, idx, t)
            if grads:
                t.record_input_grad(idx, torch.full((4,), e + 1.0))
            t.end_epoch()
        runs.append(t)
    merged = csl_fast.merge(runs)
    assert (merged.epoch, merged.input_grad_first_epoch) == (5, 0)
    merged.record_input_grad(idx, torch.full((4,), 99.0))
    merged.end_epoch()
    want = torch.tensor([1.0, 2.0, *[float("nan")] * 3, 99.0])[:, None].expand(6, 4)
    torch.testing.assert_close(merged.input_grad_history, want, equal_nan=True)


@pytest.mark.parametrize("name", ["forgetting", "suggest_votes", "suggest_hits"])
def test_merged_int32_counters_past_int32_are_refused_by_name(name):
    """Three runs' forgetting counts of 2**30 merged to 3 * 2**30, cast to int32: it
    wrapped to -2**30, and the merge failed with "holds -1073741824 ... the state was
    edited or damaged" (the merged vote counts wrapped silently)."""
    runs = [CSLTracker(4, C) for _ in range(3)]
    for t in runs:
        t.csl_count[2] = 2.0**32  # presentations enough for these counts
        t.buffers()[name][2] = 2**30
        t.suggest_label[2] = 1  # one candidate: the runs' votes add
        t.suggest_hits[2] = 2**30
    want = 3 * 2**30
    with pytest.raises(
        TrackerStateError,
        match=rf"sample 2's merged {name} is {want} \(the sum over the runs\), past 2\*\*31 - 1 "
        rf"= 2147483647, the most a tracker's int32 {name} counter holds; merge fewer runs",
    ):
        csl_fast.merge(runs)
    merged = csl_fast.merge([runs[0], CSLTracker(4, C)])  # 2**30 + 0 fits
    assert merged.buffers()[name][2] == 2**30


def test_a_tracker_being_recorded_into_is_merged_between_two_steps():
    """merge read a live tracker without its lock: with another thread recording, the
    merged run held half a step (counts behind sums), or was refused as damaged."""
    import threading

    from csl_fast.buffer_locks import buffer_lock

    t = _run(0)
    held, release, done = threading.Event(), threading.Event(), threading.Event()
    merged: list[CSLTracker] = []

    def writer() -> None:  # a step under the tracker's lock, as accumulate takes it
        with buffer_lock(t.csl_sum):
            held.set()
            release.wait(10)
            t.csl_sum.add_(1.0)
            t.csl_count.add_(1.0)

    def merger() -> None:
        merged.append(csl_fast.merge([t]))
        done.set()

    threads = [threading.Thread(target=writer), threading.Thread(target=merger)]
    threads[0].start()
    assert held.wait(10)
    threads[1].start()
    assert not done.wait(0.3)  # it waits for the step to end
    release.set()
    for th in threads:
        th.join(10)
    assert torch.equal(merged[0].csl_sum, t.csl_sum)
    assert torch.equal(merged[0].csl_count, t.csl_count)


def _full_run(seed: int, epochs: int = 4) -> CSLTracker:
    """A float64 run presenting every sample each epoch, with an eval pass per epoch."""
    g = torch.Generator().manual_seed(seed)
    t = CSLTracker(N, C, dtype=torch.float64, history=True)
    for _ in range(epochs):
        idx = torch.randperm(N, generator=g)
        target = idx % C
        logits = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
        csl_fast.accumulate(logits, target, idx, t)
        t.record_input_grad(idx, torch.rand(N, generator=g))
        t.end_epoch()
        logits = torch.randn(N, C, generator=g, dtype=torch.float64) * 2
        t.record_eval(idx, csl_fast.reference.row_statistics(logits, target, -100))
        t.end_eval_pass()
    return t


def test_merging_a_merge_with_more_runs_equals_merging_every_run_at_once(tmp_path):
    a, b, c, d = (_full_run(seed) for seed in range(4))
    every = csl_fast.merge([a, b, c, d])
    ab = csl_fast.merge([a, b])
    ab.save(tmp_path / "ab.csl")  # the runs count survives the file
    for nested in (
        csl_fast.merge([ab, c, d]),
        csl_fast.merge([tmp_path / "ab.csl", csl_fast.merge([c, d])]),
    ):
        assert nested.runs == every.runs == 4
        for name, buf in every.buffers().items():
            if name.startswith("suggest_"):  # a majority vote's summaries merge by order
                continue
            torch.testing.assert_close(nested.buffers()[name], buf, msg=name, rtol=1e-12, atol=0)
        for name in ("loss_history", "eval_loss_history", "input_grad_history"):
            torch.testing.assert_close(getattr(nested, name), getattr(every, name), msg=name)
    assert ab.runs == 2 and a.runs == 1 and "runs=2" in repr(ab)


def test_runs_of_a_state_are_checked_and_default_to_one():
    state = _run(0).state_dict()
    del state["runs"]  # a state saved before merges counted their runs
    t = CSLTracker(N, C, history=True)
    t.load_state_dict(state)
    assert t.runs == 1
    for bad in (0, -1, 2.0, True, 2**31):
        with pytest.raises(
            TrackerStateError, match=r"field 'runs' must be an int in \[1, 2\*\*31\)"
        ):
            t.load_state_dict({**state, "runs": bad})
    assert t.runs == 1


def _scored(t: CSLTracker) -> CSLTracker:
    x, idx = torch.randn(N, C, generator=torch.Generator().manual_seed(5)), torch.arange(N)
    csl_fast.score_epoch(torch.nn.Identity(), [(x, idx % C, idx)], t)
    return t


def test_a_merge_is_trained_after_its_last_eval_pass_where_a_run_was():
    # (the merged final_loss came from the eval passes however old a run's was)
    from csl_fast.scores import eval_is_latest

    trained_after = _scored(_run(0))
    csl_fast.accumulate(
        torch.randn(2, C), torch.tensor([0, 1]), torch.tensor([0, 1]), trained_after
    )
    assert eval_is_latest(_scored(_run(1))) and not eval_is_latest(trained_after)
    assert eval_is_latest(csl_fast.merge([_scored(_run(1)), _scored(_run(2)), _run(3)]))
    assert not eval_is_latest(csl_fast.merge([_scored(_run(1)), trained_after]))
    unknown = _scored(_run(1))
    unknown.eval_pass_presentations = None  # (a file saved before it was kept)
    merged = csl_fast.merge([unknown, _scored(_run(2))])
    assert merged.eval_pass_presentations is not None and eval_is_latest(merged)
    assert csl_fast.merge([unknown, _run(2)]).eval_pass_presentations is None


def test_a_merge_of_runs_that_did_not_all_see_a_sample_merges_again():
    """Run A learns sample 0, B and B2 never see it, C gets it wrong. merge([A, B, B2])
    stands for 3 runs but one presentation of it: merging it with C added 3 forgetting
    events (one per run, as if each had seen it), which its count of 2 cannot hold, and
    the merge refused its own result as damaged."""

    def run(present, correct):
        t = CSLTracker(2, 2)
        if present:
            z = torch.tensor([[5.0, -5.0]]) if correct else torch.tensor([[-5.0, 5.0]])
            csl_fast.accumulate(z, torch.tensor([0]), torch.tensor([0]), t)
        t.end_epoch()
        return t

    a, b, b2, c = run(True, True), run(False, False), run(False, False), run(True, False)
    flat = csl_fast.merge([a, b, b2, c])
    nested = csl_fast.merge([csl_fast.merge([a, b, b2]), c])
    # (the last values are weighed by runs, which a merge does not keep per sample:
    # inexact there, as documented)
    for name in ("csl_sum", "csl_count", "forgetting", "last_correct", "learned_epoch"):
        assert torch.equal(nested.buffers()[name], flat.buffers()[name]), name
    assert nested.forgetting.tolist() == [1, 0]


def test_merging_onto_the_meta_device_is_refused_by_name():
    # "Tensor.item() cannot be called on meta tensors", from inside the merge
    with pytest.raises(ValueError, match="cannot merge onto device 'meta'"):
        csl_fast.merge([_run(0), _run(1)], device="meta")
    # an input there got the load's advice, "load it into a tracker on 'cpu'"
    with pytest.raises(ValueError, match="merge: tracker 1 is on the meta device"):
        csl_fast.merge([_run(0), CSLTracker(N, C, device="meta")])


def _losses_only_run(labels: int | None = None) -> CSLTracker:
    t = CSLTracker(N, num_labels=labels)
    for _ in range(2):
        if labels is None:
            csl_fast.record_loss(torch.full((N,), 0.05), torch.arange(N), t)
        else:
            logits = torch.randn(N, labels, generator=torch.Generator().manual_seed(0))
            csl_fast.accumulate_bce(logits, (logits > 0).float(), torch.arange(N), t)
        t.end_epoch()
    return t


def test_a_losses_only_run_is_not_merged_with_a_softmax_run():
    """Its presentations have no margin, probability or correctness: pooled with a softmax
    run's they halved its AUM and confidence and read its learned samples as forgotten."""
    soft, losses = _run(0), _losses_only_run()
    bce = CSLTracker(N)
    csl_fast.accumulate_bce(torch.randn(N), torch.ones(N), torch.arange(N), bce)
    for other in (losses, bce):
        with pytest.raises(TrackerStateError, match=r"trackers \[1\] recorded losses only"):
            csl_fast.merge([soft, other, CSLTracker(N)])
    # runs of one kind still merge: losses only (rows or labels), or beside an empty run
    merged = csl_fast.merge([losses, _losses_only_run(), CSLTracker(N)])
    assert torch.equal(merged.csl_count, 2 * losses.csl_count)
    assert csl_fast.merge([_losses_only_run(2), _losses_only_run(2)]).num_labels == 2
    assert torch.equal(csl_fast.merge([soft, CSLTracker(N, C)]).margin_sum, soft.margin_sum)


def test_merge_keeps_the_settings_its_trackers_agree_on(tmp_path):
    a = CSLTracker(N, C, deterministic=True, backend="reference")
    a.save(tmp_path / "a.csl")
    merged = csl_fast.merge([a, tmp_path / "a.csl", a.state_dict()])
    assert (merged.backend, merged.deterministic) == ("reference", True)
    differ = csl_fast.merge([a, CSLTracker(N, C, deterministic=False, backend="reference")])
    assert (differ.backend, differ.deterministic) == ("reference", None)
    # a backend chosen for another device type ("cuda" merged onto the CPU) would fail at
    # the merge's first eval pass; a meta tracker stands in for a GPU one (merge refuses it)
    settings = importlib.import_module("csl_fast.merge")._settings
    on_meta = CSLTracker(N, C, device="meta", deterministic=True, backend="reference")
    assert settings([on_meta], torch.device("cpu")) == {"deterministic": True}


def _loss_run(value: float, epochs: int) -> CSLTracker:
    t = CSLTracker(2, history=True)
    for _ in range(epochs):
        csl_fast.record_loss(torch.full((2,), float(value)), torch.arange(2), t)
        t.end_epoch()
    return t


def test_merging_a_merge_of_runs_of_different_lengths_warns_of_its_history_rows():
    """A merge keeps no per-row run count: merge([b, c]) of 4 and 2 epochs weighs its rows
    2 and 3 by both runs, so merge([a, merge([b, c])]) had row 2 at 3.0, not (1 + 4) / 2."""
    a, b, c = _loss_run(1, 3), _loss_run(4, 4), _loss_run(7, 2)
    bc = csl_fast.merge([b, c])  # alone, its rows are right: no warning
    with pytest.warns(RuntimeWarning, match=r"tracker 1 \(2 runs: loss_history\): a merged"):
        csl_fast.merge([a, bc])
    even = csl_fast.merge([b, _loss_run(5, 4)])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        nested = csl_fast.merge([a, even])
    flat = csl_fast.merge([a, b, _loss_run(5, 4)])
    torch.testing.assert_close(nested.loss_history, flat.loss_history)


def test_the_vote_survives_regrouping_only_with_a_majority():
    """As documented: a majority class is the suggestion however the runs are grouped;
    without one, a merge merged again may keep another candidate."""

    def voted(label: int, votes: int) -> CSLTracker:
        t = CSLTracker(1, C)
        t.suggest_label.fill_(label)
        t.suggest_votes.fill_(votes)
        t.suggest_hits.fill_(votes)
        t.csl_count.fill_(10)
        return t

    def both(runs):
        flat = csl_fast.merge(runs)
        nested = csl_fast.merge([runs[0], csl_fast.merge(runs[1:])])
        return int(flat.suggest_label), int(nested.suggest_label)

    assert both([voted(1, 3), voted(2, 1), voted(1, 2)]) == (1, 1)  # 5 of 6 votes
    assert both([voted(1, 3), voted(2, 2), voted(0, 2)]) == (0, 1)  # no majority of 7


def test_folded_integer_rules_equal_the_stacked_ones():
    """merge folds its integer rules run by run: the result equals them computed over
    the stacked runs (forgetting, learned_epoch, last_correct), six runs and a merge."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        from test_tracker_invariants import _fed

        inputs = [_fed(0), _fed(1, torch.float64), _fed(2, epochs=5), _fed(3, epochs=1)]
        inputs += [csl_fast.merge([_fed(4), _fed(5)]), _fed(6)]
        m = csl_fast.merge(inputs)
    runs = inputs  # (merge leaves them as they were; the merged one weighs 2 runs)
    stack = lambda name, dt: torch.stack([t.buffers()[name].to(dt) for t in runs])  # noqa: E731
    weight = torch.tensor([t.runs for t in runs])[:, None]
    seen = stack("csl_count", torch.float64) > 0
    runs_seen = torch.where(seen, weight, 0).sum(0)
    correct = stack("last_correct", torch.bool)
    all_correct = (runs_seen > 0) & (correct | ~seen).all(0)
    le = torch.where(seen, stack("learned_epoch", torch.int32), -1).amax(0)
    room = stack("csl_count", torch.float64) - stack("forgetting", torch.float64)
    ended = torch.minimum(weight.to(room.dtype), room).to(torch.int64)
    forgetting = stack("forgetting", torch.int64).sum(0)
    forgetting += torch.where(all_correct, 0, torch.where(correct & seen, ended, 0).sum(0))
    assert torch.equal(m.last_correct, all_correct)
    assert torch.equal(m.learned_epoch, torch.where(all_correct, le, -1).to(torch.int32))
    assert torch.equal(m.forgetting, forgetting.to(torch.int32))
    assert int(m.forgetting.sum()) > 0 and bool((m.learned_epoch >= 0).any())


def test_merging_one_run_twice_warns_and_names_the_inputs(tmp_path):
    """The same file twice, or the per-rank saves of a synced job (identical), doubled
    every sum and count without a word."""
    a, b = _run(0), _run(1)
    a.save(tmp_path / "rank0.csl")
    a.save(tmp_path / "rank1.csl")
    with pytest.warns(RuntimeWarning, match=r"inputs 0 and 1 \(one run, merged 2 times\)") as w:
        csl_fast.merge([tmp_path / "rank0.csl", tmp_path / "rank1.csl"])
    assert "per-rank saves of a synced torch.distributed job" in str(w[0].message)
    assert "load one of them (csl_fast.load(path))" in str(w[0].message)
    with pytest.warns(RuntimeWarning, match=r"inputs 0 and 2 \(one run, merged 2 times\) hold"):
        csl_fast.merge([a, b, tmp_path / "rank0.csl"])
    three = r"inputs 0, 1 and 3 \(one run, merged 3 times\); "
    with pytest.warns(RuntimeWarning, match=three) as w:
        merged = csl_fast.merge([a, a, b, a, b])
    assert "; inputs 2 and 4 (one run, merged 2 times) hold" in str(w[0].message)
    assert merged.runs == 5  # a warning: the merge is as before


def test_distinct_or_empty_runs_merge_without_the_identical_states_warning(monkeypatch):
    empty = CSLTracker(N, C)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        csl_fast.merge([_run(0), _run(1)])
        csl_fast.merge([empty, CSLTracker(N, C)])  # nothing recorded: nothing doubled
        # equal checksums are confirmed buffer by buffer before anything is said
        merge_module = importlib.import_module("csl_fast.merge")
        monkeypatch.setattr(merge_module, "state_checksum", lambda t: 0)
        csl_fast.merge([_run(0), _run(1)])
