"""Cross-buffer consistency of tracker states (csl_fast.tracker_invariants): every way of
feeding and combining trackers gives states that load, and a state whose buffers disagree
(a sum without a presentation, more forgetting events than presentations, a learned epoch
without a correct last presentation, an inconsistent vote, history rows without
presentations) is refused by field and sample, from a state dict and from a file."""

from __future__ import annotations

import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import csl_fast
from csl_fast import CSLTracker, TrackerFileError, TrackerStateError, tracker_file

N, C, B = 12, 4, 40
UNSEEN = N - 1  # never presented, scored or input-gradient recorded


def _fed(
    seed: int,
    dtype=torch.float32,
    history: bool = True,
    epochs: int = 3,
    sequences: bool = False,
) -> CSLTracker:
    """A tracker fed every way there is, over samples 0..N-2: class indices with weights,
    label smoothing, ignored rows, non-finite rows and duplicates (or, ``sequences``,
    sequences with ignored tokens and an all-ignored sequence, also through
    linear_cross_entropy: a tracker holds one kind); soft targets into its sums;
    record_loss with negative and NaN losses; input gradients with invalid rows; eval
    passes (into a tracker of rows)."""
    g = torch.Generator().manual_seed(seed)
    t = CSLTracker(N, C, dtype=dtype, history=history)
    model = torch.nn.Linear(3, C)
    for _ in range(epochs):
        idx = torch.randint(0, UNSEEN, (B,), generator=g)
        target = torch.randint(0, C, (B,), generator=g)
        target[::7] = -100
        logits = torch.randn(B, C, generator=g) * 3
        logits[3, 1] = float("nan")
        logits[5, 0] = float("inf")
        if sequences:
            _feed_sequences(t, g)
        else:
            csl_fast.accumulate(
                logits, target, idx, t, weight=torch.rand(C, generator=g), label_smoothing=0.1
            )
        probs = torch.softmax(torch.randn(B, C, generator=g), 1)
        csl_fast.accumulate(logits, probs, idx, t.csl_sum, count=t.csl_count)
        loss = torch.randn(B, generator=g) * 5
        loss[::5] = float("nan")
        csl_fast.record_loss(loss, idx, t)
        t.record_input_grad(idx, torch.rand(B, generator=g), torch.rand(B, generator=g) > 0.3)
        x = torch.randn(8, 3, generator=g)
        batch = (x, torch.randint(0, C, (8,), generator=g), torch.randperm(UNSEEN, generator=g)[:8])
        if not sequences:  # (an eval pass scores rows, which a tracker of sequences refuses)
            csl_fast.score_epoch(model, [batch], t)
            fit = torch.arange(0, UNSEEN, 2)  # and every other sample ends the epoch fitted
            csl_fast.accumulate(torch.eye(C)[fit % C] * 5, fit % C, fit, t)
        t.end_epoch()
    return t


def _feed_sequences(t: CSLTracker, g: torch.Generator) -> None:
    seq_idx = torch.randint(0, UNSEEN, (5,), generator=g)
    seq_target = torch.randint(0, C, (5, 6), generator=g)
    seq_target[:, ::3] = -100
    seq_target[2] = -100  # a sequence without a valid token: not a presentation
    csl_fast.accumulate(torch.randn(30, C, generator=g), seq_target, seq_idx, t)
    hidden = torch.randn(5, 6, 3, generator=g)  # sequences through the fused LM head
    csl_fast.linear_cross_entropy(hidden, torch.randn(C, 3, generator=g), seq_target, seq_idx, t)


def _flipping() -> CSLTracker:
    """Sample 0 presented 9 times a batch, alternately correct and wrong: the most
    forgetting events its presentations allow (4 a batch, then correct)."""
    t = CSLTracker(2, 2)
    logits = torch.tensor([[5.0, 0.0], [0.0, 5.0]]).repeat(5, 1)[:9]
    for _ in range(3):
        csl_fast.accumulate(
            logits, torch.zeros(9, dtype=torch.long), torch.zeros(9, dtype=torch.long), t
        )
    return t


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("history", [False, True])
def test_every_way_of_feeding_and_combining_gives_states_that_load(tmp_path, dtype, history):
    runs = [_fed(s, dtype, history, epochs=2 + s) for s in range(3)]
    csl_fast.accumulate(torch.randn(4, C), torch.arange(4), torch.arange(4), runs[1])  # mid-epoch
    texts = [_fed(s, dtype, history, epochs=2 + s, sequences=True) for s in range(2)]
    merged = [csl_fast.merge(runs), csl_fast.merge(runs[::-1]), csl_fast.merge(texts)]
    for t in [*runs, *texts, *merged]:
        CSLTracker(N, C, dtype=t.dtype, history=t.history).load_state_dict(t.state_dict())
        t.save(tmp_path / "run.csl")
        CSLTracker.from_file(tmp_path / "run.csl")
    flip = _flipping()
    assert (flip.forgetting[0], flip.csl_count[0], flip.last_correct[0]) == (12, 27.0, True)
    CSLTracker(2, 2).load_state_dict(flip.state_dict())
    labels = CSLTracker(N, num_labels=3)
    csl_fast.accumulate_bce(
        torch.randn(B, 3), torch.rand(B, 3), torch.randint(0, UNSEEN, (B,)), labels
    )
    CSLTracker(N, num_labels=3).load_state_dict(labels.state_dict())


def _set(name: str, sample: int, value, *more: tuple[str, object]) -> callable:
    """An edit setting ``name`` (and the ``more`` (name, value) pairs) at ``sample``."""

    def edit(t: CSLTracker) -> int:
        for n, v in ((name, value), *more):
            t.buffers()[n][sample] = v
        return sample

    return edit


def _presented(t: CSLTracker, correct: bool) -> int:
    """A sample presented at least twice whose last presentation is (not) correct."""
    ok = (t.csl_count >= 2) & (t.last_correct == correct)
    return int(ok.nonzero()[0, 0])


def _edit_presented(name: str, value, correct: bool = False) -> callable:
    """An edit setting ``name`` to ``value(tracker, i)`` at a presented sample ``i``."""

    def edit(t: CSLTracker) -> int:
        i = _presented(t, correct)
        t.buffers()[name][i] = value(t, i)
        return i

    return edit


_EDITS = {
    "sum without a presentation": (
        _set("csl_sum", UNSEEN, 2.5),
        r"'csl_sum' holds 2.5 at sample {i}, whose csl_count is 0",
    ),
    "NaN sum without a presentation": (
        _set("margin_sum", UNSEEN, float("nan")),
        r"'margin_sum' holds nan at sample {i}, whose csl_count is 0",
    ),
    "last loss without a presentation": (
        _set("last_loss", UNSEEN, 0.25),
        r"'last_loss' holds 0.25 at sample {i}, whose csl_count is 0",
    ),
    "eval correct without an eval record": (
        _set("eval_last_correct", UNSEEN, True),
        r"'eval_last_correct' holds True at sample {i}, whose eval_count is 0",
    ),
    "input-gradient sum without a record": (
        _set("input_grad_norm_sum", UNSEEN, 1.0),
        r"'input_grad_norm_sum' holds 1.0 at sample {i}, whose input_grad_count is 0",
    ),
    "epoch count past the total": (
        _edit_presented("epoch_count", lambda t, i: t.csl_count[i] + 1),
        r"'epoch_count' holds \d+.0 at sample {i}, more than its csl_count \d+.0",
    ),
    "learned epoch while wrong": (
        _edit_presented("learned_epoch", lambda t, i: 1),
        r"'learned_epoch' holds 1 at sample {i} where 'last_correct' is False",
    ),
    "no learned epoch while correct": (
        _edit_presented("learned_epoch", lambda t, i: -1, correct=True),
        r"'learned_epoch' holds -1 at sample {i} where 'last_correct' is True",
    ),
    "correct without a presentation": (
        _set("last_correct", UNSEEN, True, ("learned_epoch", 0)),
        r"'forgetting' holds 0 at sample {i} with last_correct=True and csl_count 0.0",
    ),
    "more forgetting than presentations": (
        _edit_presented("forgetting", lambda t, i: int(t.csl_count[i]) + 1),
        r"'forgetting' holds \d+ at sample {i} with last_correct=False and csl_count \d+.0",
    ),
    "hits without a candidate": (
        _set("suggest_hits", UNSEEN, 1),
        r"'suggest_hits' holds 1 at sample {i} where 'suggest_label' is -1",
    ),
    "more votes than hits": (
        _edit_presented("suggest_votes", lambda t, i: int(t.suggest_hits[i]) + 1),
        r"'suggest_votes' holds \d+ at sample {i}, more than its suggest_hits",
    ),
    "more hits than presentations": (
        _edit_presented("suggest_hits", lambda t, i: int(t.csl_count[i]) + 1),
        r"'suggest_hits' holds \d+ at sample {i}, more than its csl_count",
    ),
}


@pytest.mark.parametrize("case", list(_EDITS))
def test_buffers_that_disagree_are_refused_by_field_and_sample(tmp_path, monkeypatch, case):
    edit, match = _EDITS[case]
    t = _fed(0)
    i = edit(t)
    # A torch.save of state_dict() while another thread records is the other cause (its
    # tensors are live); the message names it and the fix, save().
    pattern = (
        "CSLTracker: state buffer "
        + match.format(i=i)
        + r".*the state was edited or damaged.*another thread was recording.*tracker\.save\(\)"
    )
    target = CSLTracker(N, C, history=True)
    with pytest.raises(TrackerStateError, match=pattern):
        target.load_state_dict(t.state_dict())
    assert not target.csl_count.any()  # unchanged
    with pytest.raises(TrackerStateError, match="not written"):
        t.save(tmp_path / "bad.csl")
    # a file damaged after a good save: written unchecked here
    monkeypatch.setattr(tracker_file, "validate_state", lambda *_: None)
    t.save(tmp_path / "bad.csl")
    with pytest.raises(TrackerFileError, match=r"bad.csl.*" + match.format(i=i)):
        CSLTracker.from_file(tmp_path / "bad.csl")


def test_history_rows_without_presentations_are_refused():
    """A loss-curve (or input-gradient) row holding a value for a sample that was not
    recorded in that epoch loaded, and learning_time / the curves read it."""
    for name, count in (("loss_history", "csl_count"), ("input_grad_history", "input_grad_count")):
        state = _fed(0).state_dict()
        rows = state["histories"][name].clone()
        rows[0, UNSEEN] = 1.0
        state["histories"] = {**state["histories"], name: rows}
        with pytest.raises(
            TrackerStateError,
            match=rf"state history '{name}' has 1 rows holding a value \(not NaN\) at sample "
            rf"{UNSEEN}, more than the 0.0 {count} less 0.0 .* of the epochs in it",
        ):
            CSLTracker(N, C, history=True).load_state_dict(state)


def test_input_gradients_before_the_first_record_are_refused():
    t = CSLTracker(N, C)
    t.input_grad_count[2] = 1.0
    with pytest.raises(
        TrackerStateError,
        match=r"'input_grad_count' holds 1.0 at sample 2 but input_grad_first_epoch is -1",
    ):
        CSLTracker(N, C).load_state_dict(t.state_dict())


def test_counts_past_float32s_exact_range_are_not_compared():
    """Past 2**24 a float32 count stops growing by one, so it may be below the true
    number of presentations: forgetting and hits are not compared with it there."""
    t = CSLTracker(3, C)
    t.csl_count[:] = 2.0**24
    t.last_correct[:] = True
    t.learned_epoch[:] = 0
    t.forgetting[:] = 2**24
    t.suggest_label[:], t.suggest_votes[:], t.suggest_hits[:] = 1, 2**25, 2**25
    CSLTracker(3, C).load_state_dict(t.state_dict())
    t.csl_count[1] = 2.0**24 - 1
    with pytest.raises(TrackerStateError, match="'forgetting' holds 16777216 at sample 1"):
        CSLTracker(3, C).load_state_dict(t.state_dict())


def _seam_worker(rank: int, init: str, out: str) -> None:
    """Sample 0 correct on rank 0 (epoch 0); in epoch 1 wrong on rank 0, then wrong and
    correct on rank 1 in one batch: rank 1 presented it several times in a window where
    rank 0 did too, so sync cannot place rank 1's first presentation and counts a
    forgetting event at the seam that a single process would not."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        t = CSLTracker(2, 2, history=True)
        right, wrong = [5.0, 0.0], [0.0, 5.0]
        batches = {(0, 0): [right], (1, 0): [wrong], (1, 1): [wrong, right]}
        for epoch in range(2):
            rows = batches.get((epoch, rank), [])
            if rows:
                zero = torch.zeros(len(rows), dtype=torch.long)
                csl_fast.accumulate(torch.tensor(rows), zero, zero, t)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # "off by one per rank"
                t.end_epoch()
        t.save(f"{out}/rank{rank}.csl")
    finally:
        dist.destroy_process_group()


def test_a_sync_that_cannot_place_a_ranks_first_presentation_gives_a_state_that_loads(tmp_path):
    """The loose bound forgetting + last_correct <= csl_count is the one a sync keeps: here
    it counts 2 forgetting events over 4 presentations ending correct (a single process
    counts 1), past the tight 2 * forgetting + last_correct <= csl_count, and its state
    must still save (on every rank) and load."""
    from test_distributed import _spawn

    _spawn(_seam_worker, (f"file://{tmp_path / 'pg_init'}", str(tmp_path)))
    for rank in range(2):
        t = CSLTracker.from_file(tmp_path / f"rank{rank}.csl")
        assert (t.csl_count[0], t.last_correct[0], t.learned_epoch[0]) == (4.0, True, 1)
        assert t.forgetting[0] == 2  # the seam's extra event
        CSLTracker(2, 2, history=True).load_state_dict(t.state_dict())
