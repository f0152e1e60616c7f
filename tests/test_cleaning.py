"""csl_fast.clean (module csl_fast.cleaning): policies, budget, min_confidence, the CSV,
applying a plan, errors."""

import collections
import csv
import importlib
import io
import math
import os
import pkgutil
import warnings

import numpy as np
import pytest
import torch

import csl_fast
from csl_fast import detect
from csl_fast.cleaning import (
    CSV_COLUMNS,
    DEFAULT_MIN_CONFIDENCE,
    CleaningPlan,
    clean,
    evaluate_plan,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# Six samples; the rule "threshold > 1" flags 0, 2, 3, 5 (ranked 5, 2, 0, 3 by score).
SCORES = torch.tensor([3.0, 0.5, 9.0, 2.0, 0.1, 20.0])
LABELS = torch.tensor([0, 1, 2, 0, 1, 2])
SUGG_LABEL = torch.tensor([1, -1, 0, 2, 0, 1])
SUGG_CONF = torch.tensor([0.9, 0.0, 0.1, 0.6, 0.2, 1.0])


def _det():
    return detect.mislabeled(SCORES, rule="threshold", threshold=1.0)


def _plan(**kw):
    kw.setdefault("suggestions", (SUGG_LABEL, SUGG_CONF))
    return clean(SCORES, detection=_det(), **kw)


def test_csl_fast_clean_is_the_function_and_no_module_shadows_it():
    # The module is csl_fast.cleaning: a submodule named like the function would make
    # `import csl_fast.clean` and `csl_fast.clean` mean two different things (importing
    # the submodule rebinds the package attribute to the module).
    assert csl_fast.clean is clean and callable(csl_fast.clean)
    submodules = {info.name for info in pkgutil.iter_modules(csl_fast.__path__)}
    assert "cleaning" in submodules and "clean" not in submodules
    cleaning = importlib.import_module("csl_fast.cleaning")
    assert cleaning.clean is csl_fast.clean
    for name in cleaning.__all__:
        assert hasattr(cleaning, name), name


def test_relabel_confident_is_the_default_and_orders_rows_by_rank():
    plan = _plan()
    assert isinstance(plan, CleaningPlan) and plan.policy == "relabel-confident"
    assert plan.index.tolist() == [5, 2, 0, 3]
    assert plan.rank.tolist() == [1, 2, 3, 4]  # 1-based
    # confidence >= DEFAULT_MIN_CONFIDENCE relabels; 0.1 (sample 2) is dropped
    assert plan.actions == ["relabel", "drop", "relabel", "relabel"]
    assert plan.suggested_label.tolist() == [1, 0, 1, 2]
    assert plan.score.tolist() == [20.0, 9.0, 3.0, 2.0]
    assert (plan.num_dropped, plan.num_relabeled, len(plan)) == (1, 3, 4)
    text = repr(plan)  # a summary, not every tensor
    tally = "3 relabel, 1 drop, 0 keep"
    assert text.startswith(f"CleaningPlan(4 of {plan.num_samples} samples: {tally}")
    assert "tensor" not in text and "detection=Detection(" in text


def test_min_confidence_moves_rows_between_drop_and_relabel():
    assert _plan(min_confidence=0.95).actions == ["relabel", "drop", "drop", "drop"]
    assert _plan(min_confidence=0.0).actions == ["relabel"] * 4
    assert _plan(min_confidence=1.0).actions == ["relabel", "drop", "drop", "drop"]
    # at or above the threshold relabels (sample 3 has 0.6); between 0.1 and 0.6 the default
    assert _plan(min_confidence=0.6).actions == ["relabel", "drop", "relabel", "relabel"]
    assert _plan(min_confidence=0.61).actions == ["relabel", "drop", "relabel", "drop"]
    assert 0.1 < DEFAULT_MIN_CONFIDENCE <= 0.6


def test_no_suggestion_is_never_relabelled():
    det = detect.mislabeled(SCORES, rule="threshold", threshold=0.3)  # adds sample 1 (-1)
    plan = clean(SCORES, detection=det, suggestions=(SUGG_LABEL, SUGG_CONF), min_confidence=0)
    row = plan.index.tolist().index(1)
    assert plan.actions[row] == "drop" and math.isnan(float(plan.confidence[row]))


def test_drop_policy_needs_no_suggestions():
    plan = clean(SCORES, detection=_det(), policy="drop")
    assert plan.actions == ["drop"] * 4
    assert plan.suggested_label.tolist() == [-1] * 4
    # with suggestions they are shown, still dropped
    plan = _plan(policy="drop")
    assert plan.actions == ["drop"] * 4 and plan.suggested_label.tolist() == [1, 0, 1, 2]


def test_budget_keeps_the_most_suspicious_rows():
    plan = _plan(budget=2)
    assert plan.index.tolist() == [5, 2] and plan.rank.tolist() == [1, 2]
    assert len(_plan(budget=0)) == 0
    assert len(_plan(budget=100)) == 4


def test_review_takes_the_top_of_the_ranking_flagged_or_not():
    with pytest.warns(detect.DetectionWarning, match="largest is 20"):
        nothing = detect.mislabeled(SCORES, rule="threshold", threshold=100.0)
    assert len(nothing) == 0
    plan = clean(
        SCORES, detection=nothing, policy="review", budget=5, suggestions=(SUGG_LABEL, SUGG_CONF)
    )
    assert plan.index.tolist() == [5, 2, 0, 3, 1]
    # nothing flagged: every row is proposed as kept, its suggestion shown
    assert plan.actions == ["keep"] * 5
    assert plan.suggested_label.tolist() == SUGG_LABEL[[5, 2, 0, 3, 1]].tolist()
    assert len(clean(SCORES, detection=nothing, suggestions=(SUGG_LABEL, SUGG_CONF))) == 0


def test_review_drops_only_flagged_rows_and_keeps_unflagged_ones_without_a_case():
    # flagged: 5, 2, 0, 3 (threshold 1); the budget reaches into unflagged 1 and 4
    plan = _plan(policy="review", budget=6)
    assert plan.index.tolist() == [5, 2, 0, 3, 1, 4]
    assert plan.actions == ["relabel", "drop", "relabel", "relabel", "keep", "keep"]
    keep, labels = plan.apply(LABELS)
    assert keep.tolist() == [0, 1, 3, 4, 5] and labels[keep == 1].tolist() == [1]
    # an unflagged row is kept even with a confident suggestion: past the flagged set
    # those suggestions are rarely right (module docstring), the suggestion stays shown
    conf = SUGG_CONF.clone()
    conf[4] = 0.95
    plan = clean(
        SCORES, detection=_det(), policy="review", budget=6, suggestions=(SUGG_LABEL, conf)
    )
    assert plan.actions[-2:] == ["keep", "keep"]
    assert plan.suggested_label[-1] == 0 and plan.confidence[-1] == pytest.approx(0.95)


def test_evaluate_plan_judges_an_unflagged_keep_by_its_given_label():
    plan = _plan(policy="review", budget=6)  # rows 1 and 4 kept
    true = LABELS.clone()
    mislabeled = torch.zeros(6, dtype=torch.bool)
    mislabeled[4] = True
    true[4] = 2
    ev = evaluate_plan(plan, true, mislabeled)
    assert ev["kept"] == 2 and ev["keep_correct"] == 1
    # without the mask the given label cannot be judged: no figure rather than a wrong one
    assert evaluate_plan(plan, true)["keep_correct"] is None


def test_evaluate_plan_judges_a_review_keep_by_its_given_label_with_inputs_alone():
    # inputs= without labels= adds the flagged samples' duplicate groups whole; unflagged
    # sample 4, a copy of flagged 5, was then judged as a conflicting group's kept member
    # (by its suggestion, 0) though it keeps its given label 1, the true one: keep_correct
    # read 1 of 2 where the same rows without inputs= read 2 of 2
    x = torch.arange(6.0).reshape(6, 1)
    x[4] = x[5]
    plan = _plan(policy="review", budget=6, inputs=x)
    assert plan.actions == _plan(policy="review", budget=6).actions
    assert bool(plan.duplicates.flagged[4])
    clean_mask = torch.zeros(6, dtype=torch.bool)
    assert evaluate_plan(plan, LABELS, clean_mask)["keep_correct"] == 2
    assert evaluate_plan(plan, LABELS, clean_mask) == evaluate_plan(
        _plan(policy="review", budget=6), LABELS, clean_mask
    )
    assert not plan.grouped.any()


def test_review_skips_non_finite_scores():
    s = torch.tensor([1.0, float("nan"), 2.0])
    sugg = (torch.tensor([1, 1, 1]), torch.ones(3))
    plan = clean(s, rule="threshold", threshold=0.0, policy="review", budget=3, suggestions=sugg)
    assert plan.index.tolist() == [2, 0]


def test_csv_columns_and_values(tmp_path):
    path = tmp_path / "plan.csv"
    _plan().to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert (
        tuple(rows[0])
        == CSV_COLUMNS
        == (
            "index",
            "action",
            "suggested_label",
            "confidence",
            "score",
            "rank",
        )
    )
    assert rows[1:] == [
        ["5", "relabel", "1", "1.0", "20.0", "1"],
        ["2", "drop", "0", "0.1", "9.0", "2"],
        ["0", "relabel", "1", "0.9", "3.0", "3"],
        ["3", "relabel", "2", "0.6", "2.0", "4"],
    ]
    clean(SCORES, detection=_det(), policy="drop").to_csv(path)
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["suggested_label"], r["confidence"]) for r in rows] == [("", "")] * 4


def test_csv_score_round_trips_exactly(tmp_path):
    s = torch.tensor([0.1, 1 / 3, 2.0 / 7.0], dtype=torch.float64)
    plan = clean(s, rule="threshold", threshold=0.0, policy="drop")
    plan.to_csv(tmp_path / "p.csv")
    with open(tmp_path / "p.csv", newline="") as f:
        got = {int(r["index"]): float(r["score"]) for r in csv.DictReader(f)}
    assert got == {i: float(s[i]) for i in range(3)}


def test_empty_plan_writes_only_the_header(tmp_path):
    with pytest.warns(detect.DetectionWarning, match="nothing flagged"):
        plan = clean(SCORES, rule="threshold", threshold=100.0, policy="drop")
    plan.to_csv(tmp_path / "e.csv")
    assert (tmp_path / "e.csv").read_text() == ",".join(CSV_COLUMNS) + "\n"


def test_to_dataframe_is_one_based():
    pytest.importorskip("pandas")
    df = _plan().to_dataframe()
    assert list(df.columns) == list(CSV_COLUMNS)
    assert df["rank"].tolist() == [1, 2, 3, 4]
    det = detect.mislabeled(SCORES, rule="fraction", fraction=0.5)
    assert det.to_dataframe()["rank"].tolist() == [1, 2, 3, 4, 5, 6]  # counted as the plan's


def test_apply_drops_and_relabels():
    keep, labels = _plan().apply(LABELS)
    assert keep.tolist() == [0, 1, 3, 4, 5]  # 2 dropped
    assert labels.tolist() == [1, 1, 2, 1, 1]  # 0 -> 1, 3 -> 2, 5 -> 1
    assert keep.dtype == labels.dtype == torch.int64
    keep, labels = clean(SCORES, detection=_det(), policy="drop").apply(LABELS.numpy())
    assert keep.tolist() == [1, 4] and labels.tolist() == [1, 1]
    # the given labels are not modified
    assert LABELS.tolist() == [0, 1, 2, 0, 1, 2]


def test_apply_dataset_matches_apply():
    x = torch.arange(6.0)
    base = [(x[i], int(LABELS[i]), i) for i in range(6)]
    plan = _plan()
    ds = plan.apply_dataset(base)
    keep, labels = plan.apply(LABELS)
    assert len(ds) == keep.numel()
    for j in range(len(ds)):
        xi, yi, idx = ds[j]
        assert idx == int(keep[j]) and yi == int(labels[j]) and float(xi) == float(keep[j])
    with pytest.raises(ValueError, match="5 samples"):
        plan.apply_dataset(base[:5])
    # sample 0 is relabelled, but its item has no label slot: refused before any epoch
    with pytest.raises(TypeError, match="label_position"):
        plan.apply_dataset([0.0] * 6)


def test_samples_the_run_never_trained_on_stay_out_of_the_cleaned_set():
    """A tracker over a base dataset of which the run trained on a Subset: the cleaned
    set took the held-out samples in, without a word."""
    t = csl_fast.CSLTracker(6, num_classes=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = torch.randn(4, 3, generator=g)
        csl_fast.accumulate(logits, LABELS[:4], torch.arange(4), t)  # 4 and 5 held out
        t.end_epoch()
    plan = clean(t, policy="drop", rule="fraction", fraction=0.2)
    assert plan.presented.tolist() == [True] * 4 + [False] * 2
    with pytest.warns(UserWarning, match="2 of the 6 samples were never presented"):
        keep, _ = plan.apply(LABELS)
    assert set(keep.tolist()) <= {0, 1, 2, 3} and len(keep) == 4 - plan.num_dropped
    with pytest.warns(UserWarning, match="never presented"):
        ds = plan.apply_dataset([(i, int(LABELS[i])) for i in range(6)])
    assert [ds[j][0] for j in range(len(ds))] == keep.tolist()


def test_sequences_with_no_supervised_token_are_not_called_held_out():
    """Sequences presented every epoch with every token ignore_index were "never presented
    in training (held out, or never reached)": the tracker counts supervised tokens, and
    cannot tell them from held-out ones, so the warning names both."""
    n, t, v = 8, 5, 4
    tracker = csl_fast.CSLTracker(n, num_classes=v)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        target = torch.randint(0, v, (n, t), generator=g)
        target[:2] = -100  # samples 0 and 1: presented, nothing supervised
        csl_fast.accumulate(torch.randn(n * t, v, generator=g), target, torch.arange(n), tracker)
        tracker.end_epoch()
    plan = clean(tracker, policy="drop", rule="fraction", fraction=0.2)
    with pytest.warns(UserWarning) as said:
        plan.apply(torch.zeros(n, t, dtype=torch.long))
    assert (
        "2 of the 8 samples were never presented in training with a supervised token (every "
        "token ignore_index, held out, or never reached)" in str(said[0].message)
    )


def test_apply_dataset_relabels_namedtuple_items():
    Sample = collections.namedtuple("Sample", "x y")
    plan = _plan()
    ds = plan.apply_dataset([Sample(float(i), int(LABELS[i])) for i in range(6)])
    labels = plan.apply(LABELS).labels
    got = [ds[j] for j in range(len(ds))]
    assert all(type(item) is Sample for item in got)
    assert [item.y for item in got] == labels.tolist()


def test_apply_dataset_keeps_the_label_type_so_a_dataloader_batches_it():
    # a relabelled item's label became an int among tensor labels: default_collate stacks a
    # batch by its first item's type and raised "expected Tensor as element 1" whenever a
    # batch began with an untouched item (at random under shuffle=True)
    keep, labels = _plan().apply(LABELS)
    x = torch.arange(6.0)
    for ds in (
        torch.utils.data.TensorDataset(x, LABELS.int()),
        [(x[i], np.int32(LABELS[i])) for i in range(6)],
        [(x[i], LABELS[i].numpy()) for i in range(6)],
    ):
        cleaned = _plan().apply_dataset(ds)
        first = type(ds[0][1])
        assert all(type(cleaned[j][1]) is first for j in range(len(cleaned)))
        loader = torch.utils.data.DataLoader(cleaned, batch_size=len(cleaned), shuffle=True)
        bx, by = next(iter(loader))
        order = torch.searchsorted(keep, bx.long())
        assert torch.equal(by.long(), labels[order])
    assert _plan().apply_dataset(torch.utils.data.TensorDataset(x, LABELS.int()))[0][1].dtype == (
        torch.int32
    )
    with pytest.raises(TypeError, match=r"shape \(3,\), not one class index"):
        _plan().apply_dataset([(x[i], torch.eye(3)[LABELS[i]]) for i in range(6)])


def test_apply_dataset_takes_dict_items_by_key_and_refuses_slices():
    # dict items ({"input": x, "label": y}, as a Hugging Face dataset yields) had no way in:
    # label_position had to be an int, and a key was refused as "not a tuple/list"
    keep, labels = _plan().apply(LABELS)
    x = torch.arange(6.0)
    base = [{"input": x[i], "label": int(LABELS[i]), "id": i} for i in range(6)]
    cleaned = _plan().apply_dataset(base, label_position="label")
    got = [cleaned[j] for j in range(len(cleaned))]
    assert [g["id"] for g in got] == keep.tolist()
    assert [g["label"] for g in got] == labels.tolist()
    assert base[0]["label"] == 0  # the dataset's own items are not edited
    assert cleaned[-1] == cleaned[len(cleaned) - 1]
    with pytest.raises(
        TypeError, match=r"without the key 1 \(its keys: \['input', 'label', 'id'\]\)"
    ):
        _plan().apply_dataset(base)
    with pytest.raises(TypeError, match="label_position must be an int"):
        _plan().apply_dataset(base, label_position=True)
    with pytest.raises(TypeError, match="index it with one int"):
        cleaned[1:3]


def test_retrain_on_applied_plan_is_one_call():
    # the plan's output feeds csl_fast.train directly
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, generator=g)
    keep, labels = _plan().apply(LABELS)
    model = csl_fast.train.mlp(3, 3, (8,), seed=0)
    res = csl_fast.train.train(model, x[keep], labels, epochs=2, batch_size=4)
    assert len(res.epoch_loss) == 2


def test_errors():
    with pytest.raises(ValueError, match="policy"):
        _plan(policy="fix")
    with pytest.raises(ValueError, match="min_confidence"):
        _plan(min_confidence=1.5)
    with pytest.raises(ValueError, match="budget"):
        _plan(budget=-1)
    with pytest.raises(TypeError, match="budget"):
        _plan(budget=2.5)
    with pytest.raises(TypeError, match="budget"):
        _plan(budget="3")
    with pytest.raises(TypeError, match="min_confidence"):
        _plan(min_confidence="0.5")
    # the docstring offered seed=, which mislabeled() refused under its own name
    with pytest.raises(TypeError, match=r"csl_fast.clean: unexpected keyword .*\['seed'\]"):
        clean(SCORES, policy="drop", seed=0)
    with pytest.raises(ValueError, match="needs budget"):
        _plan(policy="review")
    with pytest.raises(ValueError, match="suggested labels"):
        clean(SCORES, detection=_det())  # a score tensor has no suggestions
    with pytest.raises(ValueError, match=r"\[N\] = \[6\]"):
        _plan(suggestions=(SUGG_LABEL[:5], SUGG_CONF[:5]))
    with pytest.raises(TypeError, match="integers"):
        _plan(suggestions=(SUGG_LABEL.float(), SUGG_CONF))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _plan(suggestions=(SUGG_LABEL, SUGG_CONF * 2))
    with pytest.raises(TypeError, match="pair"):
        _plan(suggestions=SUGG_LABEL)
    with pytest.raises(TypeError, match="detection="):
        clean(SCORES, detection=_det(), rule="fraction", fraction=0.1, policy="drop")
    plan = _plan()
    with pytest.raises(ValueError, match=r"\[N\] = \[6\]"):
        plan.apply(LABELS[:5])
    with pytest.raises(TypeError, match="integers"):
        plan.apply(LABELS.float())


def test_default_detection_and_mapping_source():
    mapping = {"csl": SCORES, "aum": -SCORES}
    plan = clean(mapping, policy="drop", rule="fraction", fraction=0.5)
    assert plan.index.tolist() == [5, 2, 0]
    assert plan.detection.score_name == "csl"
    plan = clean(mapping, score="aum", policy="drop", rule="fraction", fraction=0.5)
    assert plan.index.tolist() == [4, 1, 3]
    # score= with another score's detection was ignored: the plan ranked by the detection's
    det = csl_fast.detect.mislabeled(mapping, "aum", rule="fraction", fraction=0.5)
    assert clean(mapping, detection=det, score="aum", policy="drop").index.tolist() == [4, 1, 3]
    with pytest.raises(ValueError, match="score='csl' but the detection ranks by 'aum'"):
        clean(mapping, detection=det, score="csl", policy="drop")


def test_nan_confidence_where_no_suggestion_is_accepted():
    conf = SUGG_CONF.clone()
    conf[1] = float("nan")  # sample 1 has no suggestion (-1): its confidence is ignored
    plan = _plan(suggestions=(SUGG_LABEL, conf), budget=None)
    assert len(plan) == 4
    assert np.isfinite(plan.confidence.numpy()).all()


def test_tracker_source_uses_its_suggestions():
    g = torch.Generator().manual_seed(0)
    n, c = 120, 3
    y = torch.arange(n) % c
    x = torch.randn(n, 6, generator=g) * 0.5
    x[torch.arange(n), y] += 2.5
    noisy, flipped = csl_fast.corrupt.flip_labels(y, 0.1, c, seed=0)
    tracker = csl_fast.CSLTracker(n, c)
    model = csl_fast.train.mlp(6, c, (32,), seed=0)
    csl_fast.train.train(model, x, noisy, epochs=30, lr=1e-2, optimizer="adam", tracker=tracker)
    plan = clean(tracker, policy="review", budget=20)
    label, conf = tracker.suggestions()
    assert torch.equal(plan.suggested_label, label[plan.index])
    # NaN where a sample has no suggestion (never misclassified)
    torch.testing.assert_close(
        plan.confidence, conf[plan.index].float(), rtol=0, atol=0, equal_nan=True
    )
    relabel = (label[plan.index] >= 0) & (conf[plan.index] >= DEFAULT_MIN_CONFIDENCE)
    flagged = torch.zeros(n, dtype=torch.bool)
    flagged[plan.detection.indices] = True
    assert torch.equal(plan.relabel, relabel & flagged[plan.index])
    assert torch.equal(plan.kept, ~flagged[plan.index])
    # the flipped samples lead the ranking and their suggestions are mostly the true class
    top = plan.index[flipped[plan.index]]
    assert top.numel() >= 8
    assert (label[top] == y[top]).float().mean() >= 0.8


def test_numpy_numbers_are_numbers():
    # np.float32(0.5) was refused as "min_confidence must be in [0, 1], got 0.5"
    assert _plan(min_confidence=np.float32(0.61)).actions == _plan(min_confidence=0.61).actions
    plan = _plan(budget=np.int64(2))
    assert plan.index.tolist() == [5, 2] and type(plan.budget) is int
    with pytest.raises(ValueError, match="min_confidence must be a number in"):
        _plan(min_confidence=math.nan)


def test_a_detection_of_another_dataset_is_refused():
    with pytest.raises(ValueError, match="ranks 6 samples but the source has 10"):
        clean(torch.rand(10), detection=_det(), suggestions=(SUGG_LABEL, SUGG_CONF))
    with pytest.raises(ValueError, match="source has 7"):
        clean({"csl": torch.rand(7)}, detection=_det(), policy="drop")
    with pytest.raises(TypeError, match=r"detection must be a csl_fast\.detect\.Detection"):
        clean(SCORES, detection=[5, 2], policy="drop")


def test_apply_and_to_csv_refuse_plainly(tmp_path):
    plan = _plan()
    for bad in (None, "abc"):
        with pytest.raises(TypeError, match=r"labels must be int \[N\] = \[6\]"):
            plan.apply(bad)
    with pytest.raises(ValueError, match="meta"):
        plan.apply(torch.zeros(6, dtype=torch.long, device="meta"))
    # complex labels were cast to their truncated real part, with torch's warning only
    for bad in (torch.arange(6) + 0.7 + 3j, torch.ones(6, dtype=torch.bool)):
        with pytest.raises(TypeError, match="labels must be integers"):
            plan.apply(bad)
    with pytest.raises(FileNotFoundError, match=r"folder .*missing.* does not exist"):
        plan.to_csv(tmp_path / "missing" / "plan.csv")


def test_to_csv_interrupted_keeps_the_previous_plan(tmp_path, monkeypatch):
    """The plan was written row by row into the file itself: an error part way (a full
    disk, Ctrl-C) left a shorter plan, cut mid-row, where the previous one had been."""
    path = tmp_path / "plan.csv"
    _plan().to_csv(path)
    before = path.read_bytes()
    import csl_fast.cleaning as cleaning

    columns = CleaningPlan._columns
    calls = []

    def interrupted(self, start, stop):  # the first row written, then Ctrl-C
        calls.append(start)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return columns(self, start, stop)

    monkeypatch.setattr(cleaning, "PLAN_CSV_CHUNK", 1)
    monkeypatch.setattr(CleaningPlan, "_columns", interrupted)
    with pytest.raises(KeyboardInterrupt):
        clean(SCORES, detection=_det(), policy="drop").to_csv(path)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["plan.csv"]
    monkeypatch.undo()
    with pytest.raises(IsADirectoryError, match="is a folder; give a file name"):
        _plan().to_csv(tmp_path)


def test_a_loss_only_tracker_cannot_relabel_silently():
    # its suggestions are all -1, so relabel-confident dropped every row without a word
    t = csl_fast.CSLTracker(6)
    csl_fast.record_loss(SCORES, torch.arange(6), t)
    with pytest.raises(ValueError, match=r"recorded losses only.*policy='drop'"):
        clean(t, detection=_det(), policy="relabel-confident")
    assert clean(t, detection=_det(), policy="drop").actions == ["drop"] * 4
    assert len(clean(t, detection=_det(), policy="review", budget=2)) == 2


def test_a_sequence_tracker_cannot_relabel_silently():
    """A sequence's label is its token string: no suggestion exists, and the default
    policy turned into drop-all without a word."""
    from sequence_runs import sequence_tracker

    t, bad = sequence_tracker()
    with pytest.raises(ValueError, match=r"recorded sequences.*policy='drop'"):
        clean(t, policy="relabel-confident")
    plan = clean(t, policy="drop")
    assert plan.detection.score_name == "csl_mean"
    assert plan.actions == ["drop"] * len(plan) and int(bad[plan.index].sum()) >= 28


def test_evaluate_plan_refuses_what_it_would_misread():
    plan = _plan()
    assert evaluate_plan(plan, LABELS, LABELS == 0)["mislabeled"] == 2
    # class labels or NaN for a mask counted as positives, 0.5-offset labels as all wrong
    with pytest.raises(ValueError, match="bool mask"):
        evaluate_plan(plan, LABELS, LABELS)
    with pytest.raises(ValueError, match="bool mask"):
        evaluate_plan(plan, None, torch.tensor([math.nan, 0, 0, 0, 0, 0]))
    with pytest.raises(TypeError, match="integer class labels"):
        evaluate_plan(plan, LABELS.float() + 0.5)
    assert evaluate_plan(plan, LABELS.double()) == evaluate_plan(plan, LABELS)


def test_suggestions_beyond_the_trackers_classes_are_refused():
    # suggestions= with a tracker source was not checked against its num_classes: a plan
    # relabelled samples to class 99 of a 3-class run
    t = csl_fast.CSLTracker(6, 3)
    csl_fast.accumulate(
        torch.randn(6, 3, generator=torch.Generator().manual_seed(0)), LABELS, torch.arange(6), t
    )
    label = torch.tensor([1, -1, 0, 3, 0, 1])
    with pytest.raises(ValueError, match=r"classes in \[0, 3\) .* got up to 3"):
        clean(t, detection=_det(), suggestions=(label, SUGG_CONF))
    label[3] = 2
    plan = clean(t, detection=_det(), suggestions=(label, SUGG_CONF))
    assert plan.suggested_label.tolist() == [1, 0, 1, 2]
    # compact unsigned suggestions (no -1 there: every sample has one): torch has no
    # comparisons for uint16/uint32, which crashed the check
    label = torch.tensor([1, 2, 0, 2, 0, 1])
    want = clean(t, detection=_det(), suggestions=(label, SUGG_CONF)).rows()
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        plan = clean(t, detection=_det(), suggestions=(label.to(dtype), SUGG_CONF))
        assert plan.rows() == want
    with pytest.raises(ValueError, match="past int64's range"):
        big = torch.tensor([2**63, 0, 0, 0, 0, 0], dtype=torch.uint64)
        clean(t, detection=_det(), suggestions=(big, SUGG_CONF))


def test_csv_confidence_reads_back_as_the_value_the_decision_used(tmp_path):
    # written with 4 decimals, a drop at confidence 0.39996 under min_confidence 0.4 read
    # "0.4000": the table contradicted its own threshold
    conf = torch.tensor([0.39996, 0.0, 0.1, 0.6, 0.2, 0.99996])
    plan = clean(SCORES, detection=_det(), suggestions=(SUGG_LABEL, conf), min_confidence=0.4)
    plan.to_csv(tmp_path / "plan.csv")
    with open(tmp_path / "plan.csv", encoding="utf-8") as f:
        back = list(csv.DictReader(f))
    assert [r["action"] for r in back] == plan.actions
    for r, want in zip(back, plan.rows(), strict=True):
        assert np.float32(r["confidence"]) == np.float32(want["confidence"])
        assert (np.float32(r["confidence"]) >= np.float32(0.4)) == (r["action"] == "relabel")
        assert float(r["score"]) == want["score"] and int(r["rank"]) == want["rank"]
        assert int(r["index"]) == want["index"]
        assert int(r["suggested_label"]) == want["suggested_label"]
    assert back[3]["confidence"] == "0.6"  # shortest, not 0.6000000238418579


def test_a_relabel_row_without_a_suggestion_is_refused_by_apply():
    # relabel is a public field: set True on the row of sample 1 (no suggestion, -1), apply
    # gave sample 1 the label -1 and apply_dataset put -1 in its item
    plan = _plan(policy="review", budget=6)
    row = plan.index.tolist().index(1)
    assert plan.suggested_label[row] == -1
    plan.relabel[row] = True
    with pytest.raises(ValueError, match=r"samples \[1\] relabel but have no suggested label"):
        plan.apply(LABELS)
    with pytest.raises(ValueError, match=r"apply_dataset: rows for samples \[1\]"):
        plan.apply_dataset([(float(i), int(LABELS[i])) for i in range(6)])


def test_a_loss_only_tracker_is_cleaned_by_the_tail_rule_as_the_cli_does():
    """clean's default detection for a tracker of losses is detect_losses' tail rule, the
    one csl-fast clean uses: the cross-entropy rule (its valley, without the views it
    needs) dropped 0 of 20 corrupted targets where the CLI dropped 20."""
    from csl_fast import detect_losses
    from csl_fast.cli_commands import detection_for

    g = torch.Generator().manual_seed(0)
    losses = torch.exp(torch.randn(400, generator=g) * 0.5)
    losses[:30] *= 30  # corrupted targets: a tail beyond the bulk's model
    t = csl_fast.CSLTracker(400)
    for _ in range(3):
        csl_fast.record_loss(losses, torch.arange(400), t)
    plan = clean(t, policy="drop")
    want = detect_losses.corrupted_targets(t)
    assert len(want) > 0
    assert sorted(plan.index.tolist()) == sorted(want.flagged.nonzero().flatten().tolist())
    assert torch.equal(detection_for(t, "csl").flagged, want.flagged)


def test_an_entry_detection_is_refused_with_what_to_do():
    """A detection of (sample, label) entries said "the detection ranks 17970 samples but
    the source has 1797", though it was made from that source."""
    from csl_fast import detect_losses

    n, labels = 50, 4
    t = csl_fast.CSLTracker(n, num_labels=labels)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        logits = torch.randn(n, labels, generator=g)
        target = (torch.rand(n, labels, generator=g) < 0.3).float()
        csl_fast.accumulate_bce(logits, target, torch.arange(n), t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        det = detect_losses.mislabeled_entries(t, rule="fraction", fraction=0.05)
    with pytest.raises(ValueError, match=r"ranks \(sample, label\) entries .* acts on samples"):
        clean(t, policy="drop", detection=det)


def test_plans_and_detections_compare_by_identity():
    # the dataclasses' generated == compared tensor fields: "Boolean value of Tensor with
    # more than one value is ambiguous", from ==, != and `in`
    import copy

    plan, det = _plan(), _det()
    for obj in (plan, det):
        other = copy.deepcopy(obj)
        assert obj == obj and obj != other and obj not in [other] and obj in [other, obj]


def test_the_detections_warning_points_at_the_callers_line():
    # it named csl_fast/cleaning.py, the line that called the detector
    t = csl_fast.CSLTracker(60, 3)
    for _ in range(3):
        logits = torch.tensor([[2.0, 0.0, 0.0]]).repeat(60, 1)
        csl_fast.accumulate(logits, torch.zeros(60, dtype=torch.long), torch.arange(60), t)
        t.end_epoch()
    with pytest.warns(detect.DetectionWarning) as rec:
        csl_fast.clean(t)
    assert [os.path.basename(w.filename) for w in rec] == ["test_cleaning.py"]


def test_a_run_of_eval_passes_alone_keeps_the_samples_they_scored():
    # every sample counted as never presented: the cleaned set was empty, and the warning
    # said "never presented in training" of samples an eval pass had scored
    t = csl_fast.CSLTracker(6, num_classes=3)
    g = torch.Generator().manual_seed(0)
    batch = (torch.randn(4, 3, generator=g), LABELS[:4], torch.arange(4))  # 4 and 5 unscored
    csl_fast.score_epoch(torch.nn.Identity(), [batch], t)
    plan = clean(t, score="eval_csl", policy="drop", rule="fraction", fraction=0.25)
    assert plan.presented.tolist() == [True] * 4 + [False] * 2
    with pytest.warns(UserWarning, match="2 of the 6 samples were never scored by an eval pass"):
        keep, _ = plan.apply(LABELS)
    assert set(keep.tolist()) <= {0, 1, 2, 3} and len(keep) == 4 - plan.num_dropped > 0


def test_a_plan_that_relabels_nothing_applies_to_any_targets():
    # a drop plan (every plan of a losses-only run) refused regression targets (floats)
    # and multi-hot labels ([N, L]), which it has no reason to read
    plan = _plan(policy="drop")
    assert plan.num_dropped > 0 and plan.num_relabeled == 0
    want = plan.apply(LABELS).keep
    values = torch.linspace(0, 1, 6)
    multi_hot = torch.eye(6, 4)
    for targets in (values, multi_hot, values.numpy()):
        keep, kept = plan.apply(targets)
        assert keep.tolist() == want.tolist()
        torch.testing.assert_close(kept, torch.as_tensor(targets)[want])
    assert plan.apply(LABELS.int()).labels.dtype == torch.int64  # (class indices as before)
    relabelling = _plan()
    assert relabelling.num_relabeled > 0
    with pytest.raises(TypeError, match="labels must be integers"):
        relabelling.apply(values)


def test_a_review_worklist_keeps_unflagged_held_out_samples_an_eval_pass_scored():
    """A run trained on samples 0-199 of 300 with eval passes over the held-out 200-299,
    ranked by eval_csl: the worklist is of held-out samples, and every unflagged row was
    "drop" (reason "unseen", the rule for never-presented members of duplicate groups),
    not "keep" as the docs say; evaluate_plan counted them as clean samples dropped."""
    g = torch.Generator().manual_seed(0)
    n, classes = 300, 3
    true = torch.randint(0, classes, (n,), generator=g)
    given = true.clone()
    given[200:210] = (true[200:210] + 1) % classes
    t = csl_fast.CSLTracker(n, classes)
    held = torch.arange(200, n)
    for epoch in range(4):
        logits = torch.randn(n, classes, generator=g)
        logits[torch.arange(n), true] += 1.0 + epoch
        csl_fast.accumulate(logits[:200], given[:200], torch.arange(200), t)
        t.end_epoch()
        csl_fast.score_epoch(torch.nn.Identity(), [(logits[held], given[held], held)], t)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", detect.DetectionWarning)
        plan = clean(t, score="eval_csl", policy="review", budget=40)
    flagged = plan.detection.flagged[plan.index]
    assert len(plan) == 40 and bool((plan.index >= 200).all()) and not bool(flagged.all())
    assert plan.kept.tolist() == (~flagged).tolist()
    assert not bool(plan.drop_reasons()["unseen"][~flagged].any())
    counts = evaluate_plan(plan, true, mislabeled=given != true)
    assert counts["kept"] == int((~flagged).sum()) and counts["drop_clean"] == 0


def test_a_row_the_detection_does_not_rank_has_no_rank_in_the_plan():
    """Sample 5, identical to 0 with another label, was never trained on: its row (the
    conflicting group's) has no score, but the CSV gave it a rank number, 6, as if the
    detection had ranked it after the others; now the rank is empty (None, <NA>)."""
    pytest.importorskip("pandas")
    x = torch.tensor([[0.0], [1.0], [2.0], [3.0], [4.0], [0.0]])
    y = torch.tensor([0, 1, 2, 0, 1, 1])
    t = csl_fast.CSLTracker(6, num_classes=3)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits = torch.randn(5, 3, generator=g)
        csl_fast.accumulate(logits, y[:5], torch.arange(5), t)
        t.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = clean(t, inputs=x, labels=y, policy="drop")
    rows = {r["index"]: r for r in plan.rows()}
    assert math.isnan(rows[5]["score"]) and rows[5]["rank"] is None
    assert rows[0]["rank"] == int(plan.detection.ranked.tolist().index(0)) + 1
    assert plan.rank[plan.index == 5].item() == -1
    buf = io.StringIO()
    plan.to_csv(buf)
    line = next(r for r in csv.DictReader(io.StringIO(buf.getvalue())) if r["index"] == "5")
    assert line["rank"] == "" and line["score"] == "nan"
    df = plan.to_dataframe()
    assert df["rank"].dtype == "Int64" and df["rank"].isna().tolist() == [
        i == 5 for i in plan.index.tolist()
    ]


@pytest.mark.parametrize("plan", [None, torch.zeros(3), {"rows": []}])
def test_evaluate_plan_refuses_what_is_no_plan_by_name(plan):
    # "'NoneType' object has no attribute 'num_samples'"
    with pytest.raises(TypeError, match=r"evaluate_plan: plan must be a CleaningPlan"):
        evaluate_plan(plan, torch.zeros(3, dtype=torch.long))


def _old_rows(plan):  # the per-row dicts that rows(), to_csv and to_dataframe replaced
    out = []
    for i, action, lab, conf, s, r in zip(
        plan.index.tolist(),
        plan.actions,
        plan.suggested_label.tolist(),
        plan.confidence.tolist(),
        plan.score.tolist(),
        plan.rank.tolist(),
        strict=True,
    ):
        out.append(
            {
                "index": i,
                "action": action,
                "suggested_label": lab if lab >= 0 else None,
                "confidence": conf if lab >= 0 and math.isfinite(conf) else None,
                "score": s,
                "rank": r if r > 0 else None,
            }
        )
    return out


def _old_csv(plan):
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for row in _old_rows(plan):
        w.writerow(
            [
                row["index"],
                row["action"],
                "" if row["suggested_label"] is None else row["suggested_label"],
                "" if row["confidence"] is None else str(np.float32(row["confidence"])),
                repr(float(row["score"])),
                "" if row["rank"] is None else row["rank"],
            ]
        )
    return buf.getvalue()


@pytest.mark.parametrize("case", ["relabel", "drop", "review", "empty", "no_suggestions"])
def test_rows_csv_and_dataframe_equal_the_per_row_formatting(monkeypatch, case):
    """rows(), to_csv and to_dataframe are built column by column (to_csv a chunk at a
    time): the same values, bytes and dtypes as the per-row dicts they replaced."""
    import csl_fast.cleaning as cleaning

    monkeypatch.setattr(cleaning, "PLAN_CSV_CHUNK", 2)
    conf = torch.tensor([0.39996, 0.0, 1e-5, 0.6, 0.2, 1.0])
    if case == "review":
        plan = _plan(policy="review", budget=6, suggestions=(SUGG_LABEL, conf))
    elif case == "empty":
        plan = _plan(policy="review", budget=0)
    else:
        policy = "drop" if case == "drop" else "relabel-confident"
        plan = _plan(policy=policy, suggestions=(SUGG_LABEL, conf))
    if len(plan):
        plan.confidence[-1] = float("nan")  # (no confidence: an empty cell)
    if case == "no_suggestions":
        plan.suggested_label.fill_(-1)
        plan.rank.fill_(-1)
    want = _old_rows(plan)
    assert plan.rows() == want
    assert [type(v) for r in plan.rows() for v in r.values()] == [
        type(v) for r in want for v in r.values()
    ]
    buf = io.StringIO()
    plan.to_csv(buf)
    assert buf.getvalue() == _old_csv(plan)
    pd = pytest.importorskip("pandas")
    old = pd.DataFrame(want, columns=list(CSV_COLUMNS))
    old["rank"] = old["rank"].astype("Int64")
    pd.testing.assert_frame_equal(plan.to_dataframe(), old, check_dtype=True, check_exact=True)


def test_default_policy_drops_on_two_classes_with_a_warning_and_relabels_when_asked():
    """On two classes every flagged sample's suggestion is "the other class", confidently,
    so a clean sample flagged by mistake got a wrong label (make_classification, 24
    flips: 41 relabels, 18 right, 24 wrong labels became 27)."""
    from flip_runs import flipped_run

    from csl_fast.cleaning import RelabelWarning

    tracker, _ = flipped_run(2, classes=2)
    with pytest.warns(RelabelWarning, match=r"dropped \(policy drop\).*policy='relabel-confident'"):
        plan = clean(tracker)
    assert plan.policy == "drop" and len(plan) > 0 and plan.num_relabeled == 0
    with pytest.warns(RelabelWarning, match="policy='relabel-confident' relabels, but two classes"):
        asked = clean(tracker, policy="relabel-confident")
    assert asked.policy == "relabel-confident" and asked.num_relabeled > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RelabelWarning)
        assert clean(tracker, policy="drop").policy == "drop"
        # three classes: relabelling stays the default, without a word
        assert clean(flipped_run(3)[0]).num_relabeled > 0


def test_two_classes_in_use_counts_the_labels_when_given():
    from flip_runs import flipped_run

    from csl_fast.cleaning import binary_policy, two_classes_in_use

    padded, labels = flipped_run(4, classes=2)
    assert not two_classes_in_use(padded)  # num_classes=4: the tracker has no labels
    assert two_classes_in_use(padded, labels)
    assert not two_classes_in_use(padded, labels[:5])  # not the [N] class labels
    assert binary_policy(padded, None, labels)[0] == "drop"
    assert binary_policy(padded, "relabel-confident", labels)[0] == "relabel-confident"
    assert binary_policy(padded, None) == (None, None)
    assert not two_classes_in_use({"csl": torch.rand(120)}, labels)


def test_the_default_policy_drops_where_there_are_no_suggestions():
    """clean(loss_only_tracker) raised an error naming policy='relabel-confident', which
    the user never passed; csl-fast clean drops there, and now so does clean."""
    t = csl_fast.CSLTracker(6)
    csl_fast.record_loss(SCORES, torch.arange(6), t)
    plan = clean(t, detection=_det())
    assert plan.policy == "drop" and plan.actions == ["drop"] * 4
    with pytest.warns(detect.DetectionWarning, match="nothing flagged"):
        assert clean(t).policy == "drop"


def _two_class_run():
    """A run of two labels on 4 outputs (flips 0-11) and its labels."""
    from flip_runs import flipped_run

    return flipped_run(4, classes=2)


def test_clean_reads_the_classes_in_use_the_detection_recorded():
    """Given the labels through detect.mislabeled(t, labels=y), the only way clean took
    them without inputs, clean relabelled on two classes in use, silently (it counted the
    tracker's outputs); clean(t, labels=y) warned that it drops, then refused the call."""
    from csl_fast.cleaning import RelabelWarning

    t, y = _two_class_run()
    det = detect.mislabeled(t, labels=y)
    assert det.diagnostics["classes_in_use"] == 2 and len(det) > 0
    with pytest.warns(RelabelWarning, match=r"dropped \(policy drop\)"):
        plan = clean(t, detection=det)
    assert plan.policy == "drop" and plan.num_relabeled == 0
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"detection=csl_fast\.detect\.mislabeled"):
            clean(t, labels=y)
    assert not [w for w in said if issubclass(w.category, RelabelWarning)]
    # labels given to clean come first: three in use, so relabelling stays the default
    three = torch.arange(120) % 3
    assert (
        clean(
            t, detection=det, policy=None, inputs=torch.arange(120.0)[:, None], labels=three
        ).policy
        == "relabel-confident"
    )


def test_the_two_class_default_still_resolves_conflicting_groups():
    """It dropped every member of every conflicting duplicate group, which surely holds a
    wrong label (relabel-confident resolved 36 of 40 members to the true label)."""
    from csl_fast.cleaning import RelabelWarning

    t, y = _two_class_run()
    x = torch.arange(120.0)
    x[61:73] = torch.arange(12.0)  # flip i and clean 61 + i: same input, other label
    x = x[:, None]
    with pytest.warns(RelabelWarning, match="conflicting duplicate group"):
        plan = clean(t, inputs=x, labels=y)
    with pytest.warns(RelabelWarning, match="policy='relabel-confident' relabels"):
        asked = clean(t, policy="relabel-confident", inputs=x, labels=y)
    assert plan.policy == "drop" and plan.groups_resolved and int(plan.grouped.sum()) == 24
    grouped = plan.grouped
    got = [a for a, g in zip(plan.actions, grouped.tolist(), strict=True) if g]
    want = [a for a, g in zip(asked.actions, asked.grouped.tolist(), strict=True) if g]
    assert got == want and got.count("relabel") == 12 and got.count("keep") == 12
    # each flip is relabelled to its true class, the label of its clean duplicate
    relabelled = plan.index[plan.relabel]
    assert sorted(relabelled.tolist()) == list(range(12))
    assert torch.equal(plan.suggested_label[plan.relabel], 1 - y[relabelled])
    # the flagged samples outside the groups: dropped, not relabelled
    assert all(a == "drop" for a, g in zip(plan.actions, grouped.tolist(), strict=True) if not g)
    # an explicit drop still drops every member
    dropped = clean(t, policy="drop", inputs=x, labels=y)
    assert not dropped.groups_resolved and dropped.num_dropped == len(dropped)


def test_review_on_two_classes_warns_of_its_relabels():
    """policy='review' proposed relabels on two classes without a word, where the default
    drops with a RelabelWarning: they are as right as the flagged set is precise."""
    from flip_runs import flipped_run

    from csl_fast.cleaning import RelabelWarning

    t, _ = flipped_run(2, classes=2)
    with pytest.warns(RelabelWarning, match="policy='review' proposes relabels, but two"):
        plan = clean(t, policy="review", budget=20)
    assert plan.policy == "review" and plan.num_relabeled > 0
