"""Tracker states holding what no tracker holds (csl_fast.tracker_state): values out of
range, tensors a copy cannot read, tensors that require grad. Each is refused whole, in a
state dict and in a file, with the tracker left bit-identical; what a tracker can hold
(NaN and inf sums, the -1 "none yet") still loads."""

from __future__ import annotations

import warnings

import pytest
import torch

import csl_fast
from csl_fast import CSLTracker, TrackerFileError, TrackerStateError, tracker_file
from csl_fast.tracker_file import VERSION_BUFFERS, UnverifiedTrackerFileWarning

N = 6


def _trained(history: bool = False) -> CSLTracker:
    g = torch.Generator().manual_seed(0)
    t = CSLTracker(N, 3, history=history)
    idx = torch.tensor([0, 1, 2, 3, 1])
    csl_fast.accumulate(torch.randn(5, 3, generator=g), idx % 3, idx, t)
    t.end_epoch()
    return t


def _snapshot(t: CSLTracker) -> dict[str, torch.Tensor]:
    state = t.state_dict()
    out = {k: v.clone() for k, v in state.pop("buffers").items()}
    out.update({"h/" + k: v.clone() for k, v in state.pop("histories").items()})
    out["meta"] = state
    return out


def _assert_unchanged(before: dict, t: CSLTracker) -> None:
    after = _snapshot(t)
    assert before.pop("meta") == after.pop("meta")
    for k, v in before.items():
        assert v.dtype == after[k].dtype and torch.equal(
            v.view(torch.uint8), after[k].view(torch.uint8)
        ), k


def _refused(state: dict, match: str) -> None:
    target = _trained()
    target.csl_sum.add_(7)  # differs from the state in every sample
    before = _snapshot(target)
    with pytest.raises(TrackerStateError, match=match):
        target.load_state_dict(state)
    _assert_unchanged(before, target)


_IMPOSSIBLE = {
    "csl_count": [-1.0, 0.5, float("nan"), float("inf")],
    "eval_count": [-2.0],
    "input_grad_count": [1.25],
    "forgetting": [-1],
    "suggest_votes": [-1],
    "suggest_hits": [-3],
    "learned_epoch": [-2],
    "suggest_label": [-2],
}


@pytest.mark.parametrize("name", list(_IMPOSSIBLE))
def test_values_no_tracker_holds_are_refused(tmp_path, monkeypatch, name):
    # save refuses such a state itself (test_tracker_file.py): write it unchecked to see
    # that a damaged file is refused too
    monkeypatch.setattr(tracker_file, "validate_state", lambda *_: None)
    for value in _IMPOSSIBLE[name]:
        t = _trained()
        t.buffers()[name][N - 1] = value  # the last sample: earlier ones are fine
        state = t.state_dict()
        _refused(state, rf"'{name}' holds .* at sample {N - 1}")
        path = tmp_path / "bad.csl"
        t.save(path)
        with pytest.raises(TrackerFileError, match=name):
            CSLTracker.from_file(path)


@pytest.mark.parametrize("name", ["p_true_sum", "p_true_sq_sum", "grad_norm_sum", "last_max_prob"])
def test_non_finite_bounded_statistics_of_a_presented_sample_are_refused(tmp_path, name):
    """Each presentation adds at most 2 to these (or sets a probability): no run overflows
    them. NaN or inf at a presented sample loaded, saved and reloaded, and the sample then
    scored NaN and dropped out of the ranking."""
    for value in (float("nan"), float("inf"), float("-inf")):
        t = _trained()
        t.buffers()[name][1] = value  # sample 1: presented twice
        _refused(t.state_dict(), rf"'{name}' holds {value} at sample 1, not finite")
        with pytest.raises(TrackerStateError, match=rf"'{name}' holds {value} at sample 1"):
            t.save(tmp_path / "bad.csl")
        assert not (tmp_path / "bad.csl").exists()
    # (finite values whose sum overflows: the one-pass sum test falls back to each value)
    t = _trained()
    t.buffers()[name][:2] = 3e38
    CSLTracker(N, 3).load_state_dict(t.state_dict())


def test_the_sums_of_a_diverging_run_load():
    """Losses near 3.4e38 (a float32 run diverging) are finite and recorded, and two sum to
    inf; a margin between logits of +-3e38 is inf itself: such sums load."""
    t = CSLTracker(1, 2)
    for _ in range(2):
        csl_fast.accumulate(torch.tensor([[3e38, -3e38]]), torch.tensor([0]), torch.arange(1), t)
        csl_fast.accumulate(
            torch.tensor([[1.7e38, -1.7e38]]), torch.tensor([1]), torch.arange(1), t
        )
    assert t.csl_sum.isinf().all() and t.margin_sum.isinf().all() and t.csl_count.item() == 4
    u = CSLTracker(1, 2)
    u.load_state_dict(t.state_dict())
    assert torch.equal(u.p_true_sum, t.p_true_sum) and u.csl_sum.isinf().all()


def test_int64_values_past_int32_are_refused_not_wrapped():
    state = _trained().state_dict()
    state["buffers"] = dict(state["buffers"])
    state["buffers"]["forgetting"] = torch.full((N,), 2**32 + 1)  # would copy as 1
    _refused(state, "'forgetting' holds 4294967297")


_WIDTHS = [
    torch.int8, torch.int16, torch.uint8, torch.uint16, torch.uint32, torch.uint64, torch.int64
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "dtype"),
    [(n, d) for n in ("forgetting", "suggest_votes", "suggest_hits") for d in _WIDTHS]
    + [(n, d) for n in ("learned_epoch", "suggest_label") for d in _WIDTHS if d.is_signed],
)
def test_integer_buffers_of_any_width_load(name, dtype):
    # against int16 or int8 the int32 maximum wrapped to -1: every count read as past it;
    # uint16 has no comparison ("lt_cpu" not implemented for 'UInt16'), and the
    # invariants' comparisons between buffers no promotion of uint16/32/64
    t = _trained()
    state = t.state_dict()
    state["buffers"] = dict(state["buffers"])
    state["buffers"][name] = state["buffers"][name].to(dtype)
    u = CSLTracker(N, 3)
    u.load_state_dict(state)
    assert torch.equal(u.buffers()[name], t.buffers()[name])


def test_a_uint64_value_past_int64_is_shown_as_it_is():
    state = _trained().state_dict()
    state["buffers"] = dict(state["buffers"])
    big = torch.zeros(N, dtype=torch.int64)
    big[0] = -1
    state["buffers"]["forgetting"] = big.view(torch.uint64)  # 2**64 - 1, which read "holds -1"
    _refused(state, "'forgetting' holds 18446744073709551615 at sample 0")


def test_values_a_tracker_can_hold_load(tmp_path):
    t = _trained()
    t.csl_sum[0] = float("nan")  # margins can overflow to inf, then inf - inf
    t.margin_sum[1] = float("inf")
    t.margin_sum[2] = float("-inf")
    t.forgetting[3] = 2**31 - 1
    t.csl_count[3] = 2.0**32  # presentations enough for those forgetting events
    t.csl_count[4] = 2.0**40
    t.learned_epoch[5] = -1
    t.suggest_label[5] = -1
    u = CSLTracker(N, 3)
    u.load_state_dict(t.state_dict())
    path = tmp_path / "ok.csl"
    t.save(path)
    v = CSLTracker.from_file(path)
    for name, buf in t.buffers().items():
        assert torch.equal(u.buffers()[name].nan_to_num(), buf.nan_to_num()), name
        assert torch.equal(v.buffers()[name].nan_to_num(), buf.nan_to_num()), name


def test_tensors_a_copy_cannot_read_are_refused_before_any_copy():
    """A sparse or meta tensor made copy_ fail after the buffers before it were
    overwritten: the tracker was left half-loaded."""
    cases = {
        "meta buffer": (
            "buffers",
            "eval_last_correct",
            torch.zeros(N, dtype=torch.bool, device="meta"),
        ),
        "sparse buffer": ("buffers", "eval_last_max_prob", torch.zeros(N).to_sparse()),
        "meta history": ("histories", "loss_history", torch.zeros(0, N, device="meta")),
    }
    for where, name, value in cases.values():
        state = _trained().state_dict()
        state[where] = dict(state[where])
        state[where][name] = value
        _refused(state, rf"'{name}' (is on the meta device|has layout torch.sparse_coo)")


def test_a_state_that_requires_grad_loads_detached():
    """Copying a tensor that requires grad made the buffers part of an autograd graph,
    and accumulate then refused them."""
    state = _trained(history=True).state_dict()
    state["buffers"] = {
        k: v.float().requires_grad_() if v.is_floating_point() else v
        for k, v in state["buffers"].items()
    }
    state["histories"] = {k: v.float().requires_grad_() for k, v in state["histories"].items()}
    t = CSLTracker(N, 3, history=True)
    t.load_state_dict(state)
    assert not any(b.requires_grad for b in t.buffers().values())
    assert not t.loss_history.requires_grad
    idx = torch.tensor([0, 1])
    csl_fast.accumulate(torch.randn(2, 3), idx, idx, t)


def test_history_rows_the_state_cannot_have_are_refused():
    """Loss-curve rows in a history=False state, or input-gradient rows with
    input_grad_first_epoch=-1, were kept, and learning_time read them."""
    for name in ("loss_history", "eval_loss_history", "input_grad_history"):
        state = _trained().state_dict()  # history=False, no input gradient recorded
        state["histories"] = dict(state["histories"])
        state["histories"][name] = torch.rand(2, N)
        _refused(state, rf"'{name}' has 2 rows but the state has")


def test_history_rows_that_do_not_match_the_epochs_are_refused():
    """A history=True state with more or fewer loss-curve rows than closed epochs (eval
    passes), or more input-gradient rows than epochs since the first record, loaded: the
    next end_epoch appended its row at the wrong epoch."""
    state = _trained(history=True).state_dict()  # epoch 1, one loss row, no eval pass
    for name, rows in (("loss_history", 2), ("loss_history", 0), ("eval_loss_history", 1)):
        bad = dict(state, histories={**state["histories"], name: torch.rand(rows, N)})
        u = CSLTracker(N, 3, history=True)
        with pytest.raises(TrackerStateError, match=rf"'{name}' has {rows} rows but the state"):
            u.load_state_dict(bad)
    t = _trained()
    t.record_input_grad(torch.arange(N), torch.ones(N))  # first record in epoch 1
    t.end_epoch()
    bad = t.state_dict()
    bad["histories"] = {**bad["histories"], "input_grad_history": torch.rand(2, N)}
    _refused(bad, r"'input_grad_history' has 2 rows but the state has epoch=2 and input_grad")


def test_learned_epoch_past_the_epoch_is_refused():
    """A learned epoch past the epoch in progress loaded (no presentation is stamped so)."""
    t = _trained()  # epoch 1
    t.learned_epoch[N - 1] = 2
    _refused(
        t.state_dict(), rf"'learned_epoch' holds 2 at sample {N - 1}, past the state's epoch=1"
    )
    t.learned_epoch[N - 1] = 1  # a presentation in the epoch in progress
    t.last_correct[N - 1], t.csl_count[N - 1] = True, 1.0  # (which was correct)
    CSLTracker(N, 3).load_state_dict(t.state_dict())


def test_a_suggested_label_past_the_classes_is_refused():
    """A suggested label >= num_classes loaded (suggestions() then named a class the
    model does not have), also from a state without num_classes into a tracker with it."""
    t = _trained()
    t.suggest_hits[N - 1], t.csl_count[N - 1] = 1, 1.0  # a presentation that voted
    t.suggest_label[N - 1] = 3
    _refused(t.state_dict(), rf"'suggest_label' holds 3 at sample {N - 1}, past num_classes=3")
    unknown = dict(t.state_dict(), num_classes=None)
    _refused(unknown, "past num_classes=3")
    CSLTracker(N).load_state_dict(unknown)  # no C to compare with
    t.suggest_label[N - 1] = 2
    CSLTracker(N, 3).load_state_dict(t.state_dict())


def test_a_count_past_the_trackers_float_range_is_refused():
    """A float64 count of 1e39 (finite) loaded into a float32 tracker as inf."""
    state = _trained().state_dict()
    state["buffers"] = {
        **state["buffers"],
        "csl_count": torch.full((N,), 1e39, dtype=torch.float64),
    }
    _refused(state, "'csl_count' holds 1e[+]39 at sample 0, not a finite .* torch.float32")
    CSLTracker(N, 3, dtype=torch.float64).load_state_dict(state)  # holds 1e39


def test_load_state_dict_given_the_wrong_thing_says_what_it_got_and_the_fix(tmp_path):
    state = _trained().state_dict()
    path = tmp_path / "run.csl"
    _trained().save(path)
    mixups = {
        "a training checkpoint": (
            {"model": {}, "tracker": state, "epoch": 1},
            r"holds a tracker state at ckpt\['tracker'\].*pass ckpt\['tracker'\]",
        ),
        "a path": (str(path), r"got a path \('.*run\.csl'\).*tracker\.load\(path\)"),
        "a PathLike": (path, r"got a path.*tracker\.load\(path\)"),
        "a tracker": (_trained(), r"got a CSLTracker object.*other\.state_dict\(\)"),
        "another dict": ({"weights": torch.zeros(2)}, r"keys \['weights'\].*tracker\.state_dict"),
    }
    for given, match in mixups.values():
        _refused(given, match)
    # from_state (csl_fast.merge of states) gives the same messages
    with pytest.raises(TrackerStateError, match=r"pass ckpt\['tracker'\]"):
        tracker_file.from_state(CSLTracker, {"tracker": state})


def test_a_num_classes_mismatch_says_the_fix(tmp_path):
    state = _trained().state_dict()
    target = CSLTracker(N, 4)
    fix = r"num_classes=3 but this tracker has num_classes=4; create the tracker with the same"
    with pytest.raises(TrackerStateError, match=fix):
        target.load_state_dict(state)
    _trained().save(tmp_path / "run.csl")
    with pytest.raises(TrackerFileError, match=fix):
        target.load(tmp_path / "run.csl")
    taker = CSLTracker(N)  # num_classes=None, as the message offers, takes the state's
    taker.load_state_dict(state)
    assert taker.num_classes == 3


def test_num_classes_past_what_a_tracker_holds_is_refused(tmp_path):
    """num_classes = 2**24 + 1 (the constructor refuses it) loaded into a num_classes=None
    tracker, which then saved a file no reader reopened; and a file whose header said so
    failed with the constructor's ValueError before its checksum was checked."""
    state = dict(_trained().state_dict(), num_classes=2**24 + 1)
    taker = CSLTracker(N)
    with pytest.raises(
        TrackerStateError, match=r"'num_classes' must be None or an int from 1 to 2\*\*24"
    ):
        taker.load_state_dict(state)
    assert taker.num_classes is None
    with pytest.raises(TrackerStateError, match="from 1 to 2"):
        tracker_file.from_state(CSLTracker, state)
    path = tmp_path / "run.csl"
    _trained().save(path)
    raw = path.read_bytes()
    size = int.from_bytes(raw[8:16], "little")
    header = raw[16 : 16 + size].replace(b'"num_classes":3', b'"num_classes":99999999', 1)
    assert len(header) > size  # a consistent header whose checksum was not recomputed
    path.write_bytes(raw[:8] + len(header).to_bytes(8, "little") + header + raw[16 + size :])
    for read in (csl_fast.load, CSLTracker(N).load, lambda p: csl_fast.merge([p])):
        with pytest.raises(TrackerFileError, match="the checksum does not match"):
            read(path)


def test_a_buffer_of_the_wrong_dtype_kind_is_named_in_good_english():
    state = _trained().state_dict()
    state["buffers"] = {**state["buffers"], "forgetting": state["buffers"]["forgetting"].float()}
    _refused(state, r"'forgetting' has dtype torch.float32, not an int dtype")


def test_history_rows_of_no_values_cost_no_memory_and_have_a_bound():
    # an N = 0 tracker's [E, 0] histories hold no bytes, so a file of ~1.5 KB could claim
    # any E: 10**6 rows took 1.8 GB to load (a tensor each), 2**31 - 1 an OOM
    tracker = csl_fast.CSLTracker(0, 3, history=True)
    state = tracker.state_dict()
    rows = 10**6
    state.update(epoch=rows, eval_passes=rows)
    for name in ("loss_history", "eval_loss_history"):
        state["histories"][name] = torch.empty(rows, 0, dtype=torch.float16)
    loaded = csl_fast.CSLTracker(0, 3, history=True)
    loaded.load_state_dict(state)
    history = loaded._histories["loss_history"]
    assert len(history) == rows and len({id(r) for r in history}) == 1
    state.update(epoch=2**31 - 1, eval_passes=2**31 - 1)
    with pytest.raises(
        csl_fast.TrackerStateError, match=r"'epoch' must be an int in \[0, 4194304\)"
    ):
        loaded.load_state_dict(state)


def test_history_false_input_gradient_epochs_have_the_row_bound(tmp_path, monkeypatch):
    # From input_grad_first_epoch on a tracker keeps an input-gradient row per epoch, and a
    # load pads the missing ones with NaN. The 2**22 bound above applied to history=True
    # states only: a history=False file of 1.8 KB claiming 2**24 epochs since its first
    # record loaded as 2**24 padded rows (2**31 - 1: ~17 GB of list). Here 2**22 rows
    # (which the unfixed load built: 32 MB of list) must be refused before anything is built.
    state = dict(_trained().state_dict(), epoch=2**22, input_grad_first_epoch=0)
    bound = r"'input_grad_first_epoch' = 0 is 4194304 epochs .* below 2\*\*22 = 4194304"
    _refused(state, bound)
    # a file too (save refuses such a state itself: write it unchecked)
    t = _trained()
    t.epoch, t.input_grad_first_epoch = 2**22, 0
    monkeypatch.setattr(tracker_file, "validate_state", lambda *_: None)
    path = tmp_path / "epochs.csl"
    t.save(path)
    for read in (CSLTracker.from_file, _trained().load):
        with pytest.raises(TrackerFileError, match=bound):
            read(path)
    # without input-gradient records (no rows) a history=False state may claim any epoch
    state = dict(_trained().state_dict(), epoch=2**31 - 1)
    CSLTracker(N, 3).load_state_dict(state)


def test_padded_input_gradient_rows_are_float32_whatever_the_default_dtype():
    # A state lacking trailing input-gradient rows (a merge of runs of unequal length)
    # is padded with NaN rows on load; they took torch's default dtype, so under
    # torch.set_default_dtype(torch.float64) the history mixed float32 and float64 rows
    # and state_dict() and save() wrote it as float64.
    t = CSLTracker(N, 3)
    t.record_input_grad(torch.arange(N), torch.rand(N))
    for _ in range(3):
        t.end_epoch()
    state = t.state_dict()
    state["histories"] = dict(state["histories"])
    state["histories"]["input_grad_history"] = state["histories"]["input_grad_history"][:1]
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        u = CSLTracker(N, 3)
        u.load_state_dict(state)
    finally:
        torch.set_default_dtype(default)
    rows = u._histories["input_grad_history"]
    assert [r.dtype for r in rows] == [torch.float32] * 3
    assert rows[2].isnan().all()
    assert u.state_dict()["histories"]["input_grad_history"].dtype == torch.float32


class _Tagged(CSLTracker):
    """A subclass whose constructor takes other arguments than CSLTracker's."""

    def __init__(self, num_samples, num_classes, *, run_name):
        super().__init__(num_samples, num_classes)
        self.run_name = run_name


def test_a_version1_state_loads_into_a_subclass_with_its_own_constructor(tmp_path):
    # The initial values of the buffers a version 1 state lacks (suggest_*) were read from
    # a new one-sample tracker built as type(tracker)(1, dtype=..., history=...,
    # num_labels=...): a subclass whose constructor takes other arguments failed with
    # "TypeError: __init__() got an unexpected keyword argument 'dtype'".
    t = _trained()
    state = t.state_dict()
    state["version"] = 1
    state["buffers"] = {k: v for k, v in state["buffers"].items() if k in VERSION_BUFFERS[1]}
    for k in ("sequences", "runs"):
        state.pop(k)
    u = _Tagged(N, 3, run_name="b")
    u.suggest_votes.fill_(4)
    u.load_state_dict(state)
    assert u.suggest_label.tolist() == [-1] * N and u.suggest_votes.tolist() == [0] * N
    assert torch.equal(u.csl_sum, t.csl_sum) and u.run_name == "b"
    path = tmp_path / "v1.csl"
    torch.save(state, path)
    with pytest.warns(UnverifiedTrackerFileWarning):
        _Tagged(N, 3, run_name="c").load(path)


def test_num_labels_in_a_version1_state_is_refused_before_a_tracker_is_built(tmp_path, request):
    # Version 1 predates per-label buffers, so a version 1 state's [N, L] buffers were
    # filled, not read: an 85 KB version 1 file with N = 1000 and num_labels = 2**20 made
    # from_file build a tracker of 8 GiB (any num_labels: any size). Here L = 4.
    state = _trained().state_dict()
    state.update(version=1, num_labels=4)
    state["buffers"] = {k: v for k, v in state["buffers"].items() if k in VERSION_BUFFERS[1]}
    why = r"'num_labels' is 4 in a state of format version 1, written before per-label"
    target = CSLTracker(N, 3, num_labels=4)
    with pytest.raises(TrackerStateError, match=why):
        target.load_state_dict(state)
    path = tmp_path / "v1.csl"
    torch.save(state, path)
    built = request.getfixturevalue("trackers_built")  # (the loads above build them)
    with pytest.raises(TrackerFileError, match=why):
        CSLTracker.from_file(path)
    assert built == []
    # (what every version 1 state holds, num_labels absent or None, still loads)
    state.update(num_labels=None)
    CSLTracker(N, 3).load_state_dict(state)


def test_the_presentations_at_the_last_eval_pass_are_kept_and_checked(tmp_path):
    t = CSLTracker(4, 3)
    idx = torch.arange(4)
    csl_fast.score_epoch(torch.nn.Identity(), [(torch.randn(4, 3), idx % 3, idx)], t)
    csl_fast.accumulate(torch.randn(4, 3), idx % 3, idx, t)  # training after the pass
    assert t.eval_pass_presentations == 0.0
    path = tmp_path / "t.csl"
    t.save(path)
    for loaded in (CSLTracker.from_file(path), CSLTracker(4, 3)):
        if loaded.eval_passes == 0:
            loaded.load_state_dict(t.state_dict())
        assert loaded.eval_pass_presentations == 0.0
    state = t.state_dict()
    del state["eval_pass_presentations"]  # a state saved before it was kept: unknown
    loaded = CSLTracker(4, 3)
    loaded.load_state_dict(state)
    assert loaded.eval_pass_presentations is None
    for bad in (-1.0, float("nan"), float("inf"), True, "3"):
        with pytest.raises(TrackerStateError, match=r"'eval_pass_presentations' must be a number"):
            loaded.load_state_dict({**state, "eval_pass_presentations": bad})


def test_a_tracker_pickled_before_the_presentations_were_kept_saves_and_merges(tmp_path):
    # (its state_dict, save and merge raised AttributeError; scores() read it as unknown)
    import pickle

    t = CSLTracker(4, 3)
    idx = torch.arange(4)
    csl_fast.accumulate(torch.randn(4, 3), idx % 3, idx, t)
    csl_fast.score_epoch(torch.nn.Identity(), [(torch.randn(4, 3), idx % 3, idx)], t)
    del t.__dict__["eval_pass_presentations"]
    old = pickle.loads(pickle.dumps(t))
    assert old.eval_pass_presentations is None
    old.save(tmp_path / "old.csl")
    assert csl_fast.merge([old, old]).eval_pass_presentations is None


def test_an_eval_pass_closes_on_a_meta_tracker():
    # (the presentations at the pass were read from counts the meta device does not hold)
    t = CSLTracker(4, 3, device="meta")
    t.end_eval_pass()
    assert t.eval_passes == 1 and t.eval_pass_presentations is None


def test_a_float8_state_is_refused_by_name():
    # the invariant checks' min() is not implemented for float8: NotImplementedError
    tracker = csl_fast.CSLTracker(6, 3)
    state = tracker.state_dict()
    state["buffers"] = {
        k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v
        for k, v in state["buffers"].items()
    }
    with pytest.raises(TrackerStateError, match=r"float8_e4m3fn, not a float dtype \(float16"):
        csl_fast.CSLTracker(6, 3).load_state_dict(state)


def test_a_state_with_infinite_margin_sums_loads_with_a_warning_at_the_callers_line():
    """Before the margin was capped, a row whose label held the only finite logit made
    the sample's margin sum +inf for good; such a state loads, said so, and the advice in
    the warning gives those samples a finite AUM."""
    t = csl_fast.CSLTracker(3, 3)
    csl_fast.accumulate(torch.randn(3, 3), torch.tensor([0, 1, 2]), torch.arange(3), t)
    t.end_epoch()
    state = t.state_dict()
    state["buffers"]["margin_sum"] = state["buffers"]["margin_sum"].clone()
    state["buffers"]["margin_sum"][1] = float("inf")
    fresh = csl_fast.CSLTracker(3, 3)
    with pytest.warns(RuntimeWarning, match=r"1 samples' margin sums are \+inf") as said:
        fresh.load_state_dict(state)
    assert said[0].filename == __file__
    fresh.margin_sum.clamp_(max=1000 * fresh.csl_count.max().item())
    assert torch.isfinite(fresh.aum).all() and fresh.aum[1] == 1000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        csl_fast.CSLTracker(3, 3).load_state_dict(t.state_dict())  # finite: no warning
