"""Groups of identical inputs: ids, label conflicts, whole-group flags, carried counts,
each against a plain Python loop over the samples."""

import numpy as np
import pytest
import torch

from csl_fast import detect
from csl_fast import duplicate_groups as dg


def _loop_groups(rows: list) -> list[list[int]]:
    seen: dict = {}
    for i, r in enumerate(rows):
        seen.setdefault(r, []).append(i)
    return sorted((g for g in seen.values() if len(g) > 1), key=lambda g: g[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
@pytest.mark.parametrize("seed", [0, 1])
def test_group_ids_match_a_loop(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (300, 4), generator=g).to(dtype)  # 81 distinct rows: many groups
    x = x.reshape(300, 2, 2).transpose(1, 2)  # non-contiguous [N, 2, 2]
    want = _loop_groups([tuple(r.reshape(-1).tolist()) for r in x])
    ids = dg.group_ids(x)
    assert dg.exact_duplicate_groups(x) == want
    assert dg.num_groups(ids) == len(want)
    for k, members in enumerate(want):
        assert torch.nonzero(ids == k).flatten().tolist() == members
    assert int((ids >= 0).sum()) == sum(map(len, want))


def test_group_ids_compare_bits_and_edge_cases():
    x = torch.tensor([[0.0, 1.0], [-0.0, 1.0], [float("nan"), 2.0], [float("nan"), 2.0]])
    assert dg.exact_duplicate_groups(x) == [[2, 3]]  # -0.0 != 0.0 bitwise; NaN == same NaN
    assert dg.group_ids(torch.empty(0, 3)).numel() == 0
    assert dg.exact_duplicate_groups(torch.empty(0, 3)) == []
    ids = dg.group_ids(torch.arange(5.0))  # no duplicates
    assert ids.tolist() == [-1] * 5 and dg.group_lists(ids) == []
    assert dg.whole_groups(torch.ones(5, dtype=torch.bool), ids).tolist() == [False] * 5
    # one-byte floats met a bare KeyError (no same-size integer to compare bits by)
    x8 = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]).to(torch.float8_e4m3fn)
    assert dg.exact_duplicate_groups(x8) == [[0, 1]]


@pytest.mark.parametrize(
    "convert",
    [lambda x: x.tolist(), lambda x: x.numpy(), lambda x: list(x), lambda x: list(x.numpy())],
    ids=["list", "ndarray", "list of tensors", "list of arrays"],
)
def test_exact_duplicate_groups_takes_what_duplicates_takes(convert):
    # a list or an array, which detect.duplicates(inputs=) takes, raised "'list' object
    # has no attribute 'shape'"
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0]])
    assert detect.exact_duplicate_groups(convert(x)) == [[0, 2]]


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        (None, TypeError, r"inputs must be a tensor, a NumPy array or a list .* got None"),
        ("abc", TypeError, r"inputs must be a tensor, a NumPy array or a list .* got str"),
        (torch.tensor(1.0), ValueError, r"inputs must be \[N, \.\.\.\], one row per sample"),
    ],
)
def test_exact_duplicate_groups_refuses_what_is_no_rows(value, error, message):
    with pytest.raises(error, match=r"exact_duplicate_groups: " + message):
        detect.exact_duplicate_groups(value)


def test_conflicting_and_whole_groups_match_a_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 4, (200, 3), generator=g)
    y = torch.randint(0, 2, (200,), generator=g)
    flagged = torch.rand(200, generator=g) < 0.1
    ids = dg.group_ids(x)
    groups = dg.group_lists(ids)
    want_conflict = [len(set(y[m].tolist())) > 1 for m in groups]
    assert dg.conflicting(ids, y).tolist() == want_conflict
    assert 0 < sum(want_conflict) < len(groups)  # both kinds present: the test can fail
    for allowed in (None, dg.conflicting(ids, y)):
        want = torch.zeros(200, dtype=torch.bool)
        for k, m in enumerate(groups):
            if bool(flagged[m].any()) and (allowed is None or bool(allowed[k])):
                want[m] = True
        assert torch.equal(dg.whole_groups(flagged, ids, allowed), want)
    # multi-label rows: a group conflicts when any entry differs
    yl = torch.zeros(200, 3)
    yl[groups[0][1], 2] = 1.0
    assert dg.conflicting(ids, yl).tolist() == [True] + [False] * (len(groups) - 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_label_conflicts_skip_unlabelled_positions(seed):
    # [N, T] token labels were compared bit for bit, -100 included: a copy whose prompt is
    # masked "conflicted" with the unmasked one, and clean() dropped both
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 3, (150, 2), generator=g)  # 9 distinct rows: large groups
    y = torch.randint(0, 2, (150, 4), generator=g)
    y[torch.rand(150, 4, generator=g) < 0.93] = -100
    ids = dg.group_ids(x)
    want = []
    for m in dg.group_lists(ids):
        cols = [{v for v in y[m, t].tolist() if v >= 0} for t in range(4)]
        want.append(any(len(c) > 1 for c in cols))
    assert dg.conflicting(ids, y).tolist() == want
    assert dg.conflicting(ids, y.int()).tolist() == want
    assert 0 < sum(want) < len(want)  # both kinds present: the test can fail
    # a masked prompt is no conflict; an unmasked position that differs is, whichever
    # member comes first
    pair = torch.tensor([[1], [1], [1]])
    ids = dg.group_ids(pair)
    assert dg.conflicting(ids, torch.tensor([[3, 5], [-100, 5], [3, -100]])).tolist() == [False]
    assert dg.conflicting(ids, torch.tensor([[-100, 5], [3, 5], [4, -100]])).tolist() == [True]


def test_count_carried_through_groups():
    x = torch.tensor([[1.0], [1.0], [2.0], [2.0], [2.0], [3.0], [4.0]])
    ids = dg.group_ids(x)  # groups {0, 1}, {2, 3, 4}; 5, 6 alone
    ranking = torch.tensor([5, 2, 0, 6, 1, 3, 4])
    assert [dg.count_through_groups(ranking, ids, m) for m in range(5)] == [0, 0, 3, 5, 5]
    conflict = torch.tensor([True, False])
    assert dg.carry_count(ranking, ids, 3, (1, 4), conflict) == (2, (0, 2))


def test_check_rows_errors():
    with pytest.raises(ValueError, match="labels= needs inputs="):
        dg.check_rows(3, None, torch.zeros(3))
    with pytest.raises(ValueError, match="inputs must have one row per sample"):
        dg.check_rows(3, torch.zeros(4, 2), None)
    with pytest.raises(ValueError, match="labels must have one row per sample"):
        dg.check_rows(3, torch.zeros(3, 2), torch.tensor(1))


@pytest.mark.parametrize(
    "inputs, error, match",
    [
        (torch.zeros(3, 2, device="meta"), ValueError, "meta tensor"),
        (torch.zeros(3, 2).to_sparse(), ValueError, "sparse"),
        (torch.zeros(3, 0), ValueError, "rows of inputs are empty"),
    ],
)
def test_check_rows_refuses_what_cannot_be_compared(inputs, error, match):
    with pytest.raises(error, match=match):
        dg.check_rows(3, inputs, None)
    with pytest.raises(error, match=match):
        detect.duplicates(torch.rand(3), inputs=inputs)


def test_numpy_arrays_and_lists_are_taken_as_clean_takes_them():
    """clean(inputs=, labels=) took NumPy arrays and lists; detect.duplicates refused them."""
    x, y = np.array([[0.0], [0.0], [1.0]]), np.array([0, 1, 1])
    want = detect.duplicates(torch.rand(3), inputs=torch.from_numpy(x), labels=torch.from_numpy(y))
    for inputs, labels in ((x, y), (x.tolist(), y.tolist())):
        det = detect.duplicates(torch.rand(3), inputs=inputs, labels=labels)
        assert torch.equal(det.flagged, want.flagged) and det.groups == [[0, 1]]
    with pytest.raises(TypeError, match="duplicates: inputs must be a tensor, a NumPy array"):
        detect.duplicates(torch.rand(3), inputs=[[0.0], "a", None])


def test_a_list_of_per_sample_tensors_is_stacked():
    # what a Dataset yields: it was refused with "only one element tensors can be converted"
    x = [torch.tensor([0.0, 1.0]), torch.tensor([0.0, 1.0]), torch.tensor([2.0, 1.0])]
    y = [torch.tensor(0), torch.tensor(1), torch.tensor(1)]
    det = detect.duplicates(torch.rand(3), inputs=x, labels=y)
    assert det.groups == [[0, 1]] and det.flagged.tolist() == [True, True, False]
    arrays = [v.numpy() for v in x]
    assert detect.duplicates(torch.rand(3), inputs=arrays, labels=y).groups == [[0, 1]]
    # tensor([c]) per sample, as many Datasets yield a label: [N] labels, not [N, 1] rows
    y1 = [torch.tensor([0]), torch.tensor([1]), torch.tensor([1])]
    assert dg.as_rows("t", "labels", y1).shape == (3,)
    assert detect.duplicates(torch.rand(3), inputs=x, labels=y1).groups == [[0, 1]]
    with pytest.raises(TypeError, match=r"stack its rows"):
        detect.duplicates(torch.rand(3), inputs=[torch.zeros(2), torch.zeros(3), torch.zeros(2)])


def test_a_negative_label_is_no_label():
    # an unlabelled copy (ignore_index -100) of a labelled sample was a "conflict"
    x = torch.tensor([[0.0], [0.0], [1.0], [1.0], [1.0], [2.0], [2.0]])
    y = torch.tensor([3, -100, 1, -100, 2, -100, -100])
    ids = dg.group_ids(x)
    assert dg.conflicting(ids, y).tolist() == [False, True, False]
    det = detect.duplicates(torch.rand(7), inputs=x, labels=y)
    assert det.groups == [[2, 3, 4]]
    # unsigned labels have no negative values: compared as they are
    assert dg.conflicting(ids, y.clamp(min=0).to(torch.uint8)).tolist() == [True, True, False]


def test_no_samples_no_groups():
    # reshape(0, -1) raised "cannot reshape tensor of 0 elements" on the labels
    empty = torch.zeros(0, 2)
    assert dg.conflicting(dg.group_ids(empty), torch.zeros(0, dtype=torch.long)).numel() == 0
    det = detect.duplicates(torch.zeros(0), inputs=empty, labels=torch.zeros(0, dtype=torch.long))
    assert len(det) == 0 and det.groups == []


def test_labels_a_classifiers_tracker_cannot_hold_are_refused_as_clean_refuses_them():
    """Float labels (0.2 vs 0.7) and labels past the tracker's classes were flagged as a
    conflict; csl_fast.clean refused the same labels."""
    import csl_fast

    tracker = csl_fast.CSLTracker(3, 5)
    csl_fast.accumulate(torch.randn(3, 5), torch.tensor([0, 1, 1]), torch.arange(3), tracker)
    x = torch.tensor([[0.0], [0.0], [1.0]])
    float_labels = torch.tensor([0.2, 0.7, 0.0])
    with pytest.raises(ValueError, match=r"duplicates: labels must be integer class indices"):
        detect.duplicates(tracker, inputs=x, labels=float_labels)
    past = torch.tensor([99, 1, 1])
    for fn, name in ((detect.duplicates, "detect.duplicates"), (csl_fast.clean, "clean")):
        with pytest.raises(ValueError, match=rf"{name}: labels must be class indices in \[0, 5\)"):
            fn(tracker, inputs=x, labels=past)
    # a tracker with no classes (multi-label, binary BCE) compares float target rows by bits
    assert detect.duplicates(torch.rand(3), inputs=x, labels=float_labels).groups == [[0, 1]]


def test_a_list_of_python_floats_is_compared_in_float64():
    # (torch.as_tensor made them float32: rows 0.1 and 0.1 + 1e-12 were one group)
    rows = [[0.1, 1.0], [0.1 + 1e-12, 1.0], [0.5, 2.0], [0.5, 2.0]]
    assert detect.exact_duplicate_groups(rows) == [[2, 3]]


def test_computed_once_finds_the_groups_of_one_tensor_once(monkeypatch):
    """Within computed_once (a CLI command), the groups of the same unchanged inputs are
    computed once, and equal to a fresh computation; a changed tensor, another tensor, or
    a call outside it computes them again."""
    calls = []
    real = dg._group_ids
    monkeypatch.setattr(dg, "_group_ids", lambda x: calls.append(1) or real(x))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [1.0, 2.0], [5.0, 6.0], [3.0, 4.0]])
    want = real(x)
    with dg.computed_once():
        a = dg.group_ids(x)
        b = dg.group_ids(x)
        assert len(calls) == 1 and torch.equal(a, want) and torch.equal(b, want)
        a[:] = 7  # the caller's copy: the next answer is unchanged
        assert torch.equal(dg.group_ids(x), want) and len(calls) == 1
        assert torch.equal(dg.group_ids(x.clone()), want) and len(calls) == 2
        x[3] = x[0]  # changed in place: found again
        assert dg.group_ids(x).tolist() == [0, 1, 0, 0, 1] and len(calls) == 3
        x.data = torch.arange(10.0).view(5, 2)  # another storage, version 0 again
        assert dg.group_ids(x).tolist() == [-1] * 5 and len(calls) == 4
    dg.group_ids(x)
    assert len(calls) == 5


def test_rank_report_and_clean_find_the_groups_once(tmp_path, monkeypatch):
    import csl_fast
    from csl_fast.cli import main
    from csl_fast.report import RunSamples

    n = 60
    g = torch.Generator().manual_seed(0)
    t = csl_fast.CSLTracker(n, 3)
    y = torch.arange(n) % 3
    for _ in range(3):
        csl_fast.accumulate(torch.randn(n, 3, generator=g), y, torch.arange(n), t)
        t.end_epoch()
    inputs = torch.randn(n, 4, generator=g)
    inputs[10:20] = inputs[:10]
    t.save(tmp_path / "tracker.csl")
    RunSamples(labels=y.numpy(), inputs=inputs.numpy()).save(tmp_path / "samples.npz")
    calls = []
    real = dg._group_ids
    monkeypatch.setattr(dg, "_group_ids", lambda x: calls.append(1) or real(x))
    run = str(tmp_path)
    for cmd in (
        ["rank", run, "--csv", "--output", str(tmp_path / "r.csv")],
        ["report", run, "--out", str(tmp_path / "rep")],
        ["clean", run, "--out", str(tmp_path / "c.csv")],
    ):
        calls.clear()
        assert main([*cmd, "-q"]) == 0
        assert len(calls) == 1, cmd


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float16, torch.int8, torch.uint8, torch.bool, torch.complex64]
)
@pytest.mark.parametrize("collide", [False, True])
def test_hashed_groups_equal_unique_dim(monkeypatch, dtype, collide):
    """The rows are classed by a hash, checked row by row; a collision (every weight 1 here:
    [1, 2] and [2, 1] hash alike) falls back to unique(dim=0). The ids are the same."""
    if collide:
        monkeypatch.setattr(dg, "_hash_weights", lambda d: torch.ones(d, dtype=torch.int64))
    monkeypatch.setattr(dg, "_BLOCK", 7)  # column and row blocks of a few
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 3, (300, 2, 3), generator=g).to(dtype)
    x[50:60] = x[:10]
    with pytest.raises(RuntimeError, match="0 sized dimensions"):
        dg.group_ids(x.reshape(300, -1)[:, :0])
    views = (x, x[:, 0, 0], x[:1], x[:0], x.flip(0)[:, 1], x.transpose(1, 2))
    hashed = [dg.group_ids(y) for y in views]
    monkeypatch.setattr(dg, "_partition", dg._unique_rows)  # (as before the hash)
    for y, ids in zip(views, hashed, strict=True):
        assert torch.equal(ids, dg.group_ids(y))
