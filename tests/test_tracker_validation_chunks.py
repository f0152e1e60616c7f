"""State validation's fast path (csl_fast.tracker_state._check_values and
csl_fast.tracker_invariants.check_invariants): whole-chunk reductions over large chunks
first, and the elementwise walk a small chunk at a time only where one fails. A state
with a bad entry in the middle of a large buffer is refused with the message the walk
alone gives (same field, same first sample), and a good one is accepted."""

from __future__ import annotations

import warnings

import pytest
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    from test_tracker_invariants import _EDITS, C, _fed

from csl_fast import CSLTracker, TrackerStateError, tracker_invariants, tracker_state

REPEAT = 40  # copies of the fed 12-sample state: N = 480, many chunks of each size
MIDDLE = 23  # the copy an edit goes into


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    """Chunks small enough that N = 480 spans many of each: walks of 16 samples, passes
    of 4 walks (64) and value reductions of 128."""
    monkeypatch.setattr(tracker_invariants, "_CHUNK", 16)
    monkeypatch.setattr(tracker_invariants, "_CHUNKS_PER_PASS", 4)
    monkeypatch.setattr(tracker_state, "_VALUE_CHUNK", 128)


def _walk_only(monkeypatch) -> None:
    """Validation as the elementwise walk alone (no reduction trusted, passes of one
    walk chunk): the reference."""
    monkeypatch.setattr(tracker_state, "_values_ok", lambda *_: False)
    monkeypatch.setattr(tracker_invariants, "_CHUNKS_PER_PASS", 1)


def _tiled(t: CSLTracker) -> dict:
    """``t``'s state repeated REPEAT times along the samples."""
    state = t.state_dict()
    n = t.num_samples
    buffers = {k: v.repeat(REPEAT, *([1] * (v.dim() - 1))) for k, v in state["buffers"].items()}
    histories = {k: h.repeat(1, REPEAT) for k, h in state["histories"].items()}
    state.update(num_samples=n * REPEAT, buffers=buffers, histories=histories)
    return state


def _load(state: dict) -> str | None:
    try:
        CSLTracker(state["num_samples"], C, history=True).load_state_dict(state)
    except TrackerStateError as exc:
        return str(exc)
    return None


def _both(monkeypatch, state: dict) -> tuple[str | None, str | None]:
    fast = _load(state)
    with monkeypatch.context() as m:
        _walk_only(m)
        walk = _load(state)
    return fast, walk


def test_a_good_large_state_loads_both_ways(monkeypatch):
    assert _both(monkeypatch, _tiled(_fed(0))) == (None, None)


@pytest.mark.parametrize("case", list(_EDITS))
def test_an_invariant_broken_mid_buffer_is_refused_with_the_walks_message(monkeypatch, case):
    edit, _ = _EDITS[case]
    t = _fed(0)
    i = edit(t)
    good = _tiled(_fed(0))
    bad = _tiled(t)
    n = t.num_samples
    # only the middle copy keeps the edit
    state = {**good, "buffers": dict(good["buffers"])}
    for k, v in bad["buffers"].items():
        if not torch.equal(v, good["buffers"][k]):
            mixed = good["buffers"][k].clone()
            mixed[MIDDLE * n : (MIDDLE + 1) * n] = v[MIDDLE * n : (MIDDLE + 1) * n]
            state["buffers"][k] = mixed
    fast, walk = _both(monkeypatch, state)
    assert walk is not None and f"at sample {MIDDLE * n + i}" in walk
    assert fast == walk


def test_two_breaks_in_one_pass_name_the_first_walk_chunks(monkeypatch):
    """A pass of several walk chunks where a check made early breaks late in it and a
    check made late breaks early: the walk names the early sample's field."""
    state = _tiled(_fed(0))
    b = dict(state["buffers"])
    late, early = 5 * 64 + 40, 5 * 64 + 3  # same pass, different walk chunks
    b["csl_sum"] = b["csl_sum"].clone()
    b["csl_count"] = b["csl_count"].clone()
    b["csl_count"][late], b["csl_sum"][late] = 0.0, 1.5  # (checked first)
    b["suggest_votes"] = b["suggest_votes"].clone()
    b["suggest_votes"][early] = b["suggest_hits"][early] + 1  # (checked later)
    state["buffers"] = b
    fast, walk = _both(monkeypatch, state)
    assert walk is not None and "'suggest_votes' holds" in walk and f"sample {early}" in walk
    assert fast == walk


def _value_cases():
    big = 2**31
    return {
        "negative count": ("csl_count", -1.0, None),
        "fractional count": ("eval_count", 0.5, None),
        "NaN count": ("epoch_count", float("nan"), None),
        "inf count": ("input_grad_count", float("inf"), None),
        "float64 count past float32": ("csl_count", 1e300, torch.float64),
        "NaN probability sum": ("p_true_sum", float("nan"), None),
        "inf grad norm sum": ("grad_norm_sum", float("inf"), None),
        "float64 probability past float32": ("p_true_sq_sum", 1e300, torch.float64),
        "learned epoch below -1": ("learned_epoch", -2, None),
        "negative forgetting": ("forgetting", -1, None),
        "int64 forgetting past int32": ("forgetting", big, torch.int64),
        "int16 votes below 0": ("suggest_votes", -3, torch.int16),
        "uint64 hits past int32": ("suggest_hits", big, torch.uint64),
    }


@pytest.mark.parametrize("case", list(_value_cases()))
@pytest.mark.parametrize("where", [0, 200, 479])
def test_a_bad_value_mid_buffer_is_refused_with_the_walks_message(monkeypatch, case, where):
    name, value, dtype = _value_cases()[case]
    state = _tiled(_fed(0))
    b = dict(state["buffers"])
    v = b[name].to(dtype) if dtype is not None else b[name].clone()
    v[where] = value
    v[where + 1 :: 97] = value  # (later bad samples: the first is named)
    b[name] = v
    state["buffers"] = b
    fast, walk = _both(monkeypatch, state)
    assert walk is not None and f"state buffer {name!r} holds" in walk
    assert f"at sample {where}," in walk
    assert fast == walk


def test_values_of_other_dtypes_in_range_load(monkeypatch):
    state = _tiled(_fed(0))
    b = dict(state["buffers"])
    b["forgetting"] = b["forgetting"].to(torch.uint8)
    b["suggest_hits"] = b["suggest_hits"].to(torch.int64)
    b["csl_count"] = b["csl_count"].to(torch.float64)
    b["p_true_sum"] = b["p_true_sum"].to(torch.float16)
    state["buffers"] = b
    assert _both(monkeypatch, state) == (None, None)


@pytest.mark.parametrize("name", ["learned_epoch", "suggest_label"])
@pytest.mark.parametrize("where", [0, 200, 479])
def test_an_integer_past_its_bound_mid_buffer_names_the_first(name, where):
    """_check_at_most's one-reduction pass falls back to naming the first sample."""
    state = _tiled(_fed(0))
    epoch = state["epoch"]
    value, why = (
        (epoch + 1, f"past the state's epoch={epoch} (in progress)")
        if name == "learned_epoch"
        else (C, f"past num_classes={C}")
    )
    b = dict(state["buffers"])
    v = b[name].clone()
    v[where] = value
    v[where + 1 :: 97] = value + 1
    b[name] = v
    state["buffers"] = b
    assert _load(state) == (
        f"CSLTracker: state buffer {name!r} holds {value} at sample {where}, {why}; no "
        "tracker holds that: the state was edited or damaged, restore it from a copy"
    )
