"""The runner-up statistic (``Stat.OTHER_ARGMAX``) and the tracker's suggested labels.

- every cross-entropy kernel (C++ CPU narrow and wide rows, in place too; Triton in the
  interpreter; the reference) gives the runner-up a plain loop over the logits defines;
- the majority vote over the runner-up, as a plain Python loop over presentations in
  batch order (several epochs, duplicate indices within a batch, invalid rows), equals
  bitwise what every backend's ``record_last`` keeps, and what a tracker fed through
  ``csl_fast.accumulate`` keeps (the one-call CPU step, the reference backend);
- ``CSLTracker.suggestions()``: label, confidence (its definition by a plain loop, and
  that it does not fall when training goes on past memorisation), memory, state round
  trip.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import csl_fast
from csl_fast import _ext, ops, reference
from csl_fast.stats import NUM_STATS, Stat, float64_sums

needs_cpp = pytest.mark.skipif(_ext._C is None, reason="the C++ extension is not built")


def _runner_up(z: torch.Tensor, y: torch.Tensor, ignore_index: int = -100) -> list[float]:
    """The first j != y at max_{j != y} z_j, by a loop; -1 for ignored, non-finite or C == 1."""
    out = []
    for row, t in zip(z.double().tolist(), y.tolist(), strict=True):
        if t == ignore_index:
            out.append(-1.0)
            continue
        others = [(v, j) for j, v in enumerate(row) if j != t]
        finite = all(math.isfinite(v) or v == -math.inf for v in row) and row[t] > -math.inf
        if not others or not finite:
            out.append(-1.0)
            continue
        best = max(v for v, _ in others)
        out.append(float(next(j for v, j in others if v == best)))
    return out


def _logits(batch: int, classes: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    # Small integers: many ties, so the first-index rule is exercised.
    z = torch.randint(-3, 4, (batch, classes)).to(dtype)
    y = torch.randint(0, classes, (batch,))
    return z, y


def _ce_backends() -> list[str]:
    names = ["reference"]
    if _ext._C is not None:
        names.append("cpu")
    return names


@pytest.mark.parametrize("backend", _ce_backends())
@pytest.mark.parametrize("classes", [1, 2, 10, 32, 33, 97, 1025])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_runner_up_matches_a_loop(backend, classes, dtype):
    z, y = _logits(37, classes, dtype)
    y[3] = -100
    _, stats = ops.cross_entropy_fwd(z, y, None, -100, 0.0, 0, backend=backend)
    assert stats.shape == (NUM_STATS, 37)
    assert stats[Stat.OTHER_ARGMAX].tolist() == _runner_up(z, y)


@needs_cpp
@pytest.mark.parametrize("classes", [1, 7, 32, 33, 300])
def test_runner_up_in_place_and_strided(classes):
    z, y = _logits(21, classes, torch.float32)
    want = _runner_up(z, y)
    _, stats = ops.cross_entropy_fwd_inplace(z.clone(), y, None, -100, 0.0, 1, backend="cpu")
    assert stats[Stat.OTHER_ARGMAX].tolist() == want
    wide = torch.zeros(21, 2 * classes)
    wide[:, ::2] = z
    _, stats = ops.cross_entropy_fwd(wide[:, ::2], y, None, -100, 0.0, 1, backend="cpu")
    assert stats[Stat.OTHER_ARGMAX].tolist() == want


@pytest.mark.parametrize("backend", _ce_backends())
def test_runner_up_of_invalid_and_extreme_rows(backend):
    inf, nan = math.inf, math.nan
    z = torch.tensor(
        [
            [-inf, 2.0, -inf, -inf],  # every other logit -inf: the first other column
            [1.0, nan, 0.0, 0.0],  # NaN: not valid
            [inf, 0.0, 0.0, 0.0],  # +inf: not valid
            [0.0, 5.0, 5.0, 1.0],  # tie after y
            [5.0, 5.0, 0.0, 5.0],  # tie before and after y: the first
        ]
    )
    y = torch.tensor([1, 0, 1, 0, 1])
    _, stats = ops.cross_entropy_fwd(z, y, None, -100, 0.0, 0, backend=backend)
    assert stats[Stat.OTHER_ARGMAX].tolist() == [0.0, -1.0, -1.0, 1.0, 0.0]
    assert stats[Stat.VALID].tolist() == [1.0, 0.0, 0.0, 1.0, 1.0]


# The interpreter evaluates both sides of tl.where: masked-off lanes raise numpy warnings.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_runner_up_triton_interpreted():
    triton_ce = pytest.importorskip("csl_fast._triton.cross_entropy")
    from csl_fast._triton._registry import is_interpreted

    if not is_interpreted(triton_ce._ce_fwd_kernel):
        pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1")
    for classes, config in ((1, None), (10, None), (33, None), (50, (False, 1, 16, 4))):
        z, y = _logits(9, classes, torch.float32)
        y[2] = -100
        for inplace in (False, True):
            zz = z.clone()
            _, stats = triton_ce._launch(
                zz, y, None, -100, 0.0, 0, None if inplace else torch.empty_like(z), config
            )
            assert stats[Stat.OTHER_ARGMAX].tolist() == _runner_up(z, y), (classes, config)


# ---------------------------------------------------------------------------- the vote
def _vote_loop(
    batches: list[tuple[torch.Tensor, torch.Tensor]], n: int, steps: dict | None = None
) -> tuple[list[int], list[int], list[int]]:
    """The suggestion buffers by a plain loop over presentations in batch order; ``steps``
    counts the candidate changes (after a first one) and the decrements."""
    label, votes, hits = [-1] * n, [0] * n, [0] * n
    steps = {} if steps is None else steps
    for index, stats in batches:
        for i, j in enumerate(index.tolist()):
            r = int(stats[Stat.OTHER_ARGMAX, i])
            if stats[Stat.VALID, i] <= 0 or stats[Stat.CORRECT, i] > 0 or r < 0:
                continue
            if label[j] == r:
                votes[j] += 1
                hits[j] += 1
            elif votes[j] == 0:
                steps["change"] = steps.get("change", 0) + (label[j] >= 0)
                label[j], votes[j], hits[j] = r, 1, 1
            else:
                steps["down"] = steps.get("down", 0) + 1
                votes[j] -= 1
    return label, votes, hits


def _fit_loop(
    batches: list[tuple[torch.Tensor, torch.Tensor]], epochs: list[int], n: int
) -> tuple[list[float], list[int]]:
    """Each sample's valid presentations and the epoch its final correct streak began in
    (-1: incorrect at its last presentation or never presented), by a plain loop."""
    count, learned, correct = [0.0] * n, [-1] * n, [False] * n
    for (index, stats), epoch in zip(batches, epochs, strict=True):
        for i, j in enumerate(index.tolist()):
            if stats[Stat.VALID, i] <= 0:
                continue
            count[j] += 1
            now = bool(stats[Stat.CORRECT, i] > 0)
            if not now:
                learned[j] = -1
            elif not correct[j]:
                learned[j] = epoch
            correct[j] = now
    return count, learned


def _confidence_loop(
    label: list[int],
    votes: list[int],
    hits: list[int],
    count: list[float],
    learned: list[int],
    epochs: int,
) -> list[float]:
    """The suggestions' confidence by its definition: the candidate's votes over the
    presentations before the final correct streak (count * learned / epochs; all of them
    when not fitted), at least the votes cast since the candidate took over and at least 3."""
    out = []
    for j in range(len(label)):
        if label[j] < 0:
            out.append(math.nan)
            continue
        before = count[j] * learned[j] / epochs if learned[j] >= 0 and epochs else count[j]
        out.append(hits[j] / max(before, 2 * hits[j] - votes[j], 3))
    return out


def _batches(n: int, classes: int, epochs: int, batch: int) -> list[tuple[torch.Tensor, ...]]:
    """Random presentations: duplicates within batches, ~15% invalid rows, runner-ups
    concentrated on a per-sample class so that the vote's candidate both holds and flips."""
    g = torch.Generator().manual_seed(3)
    favourite = torch.randint(0, classes, (n,), generator=g)
    out = []
    for _ in range(epochs):
        for _ in range(max(1, n // batch)):
            index = torch.randint(0, n, (batch,), generator=g)
            stats = torch.zeros(NUM_STATS, batch)
            stats[Stat.VALID] = (torch.rand(batch, generator=g) > 0.15).float()
            noise = torch.randint(0, classes, (batch,), generator=g)
            keep = torch.rand(batch, generator=g) < 0.45
            r = torch.where(keep, favourite[index], noise).float()
            stats[Stat.OTHER_ARGMAX] = torch.where(stats[Stat.VALID] > 0, r, -1.0)
            stats[Stat.LOSS] = torch.rand(batch, generator=g) * stats[Stat.VALID]
            stats[Stat.CORRECT] = (torch.rand(batch, generator=g) > 0.5).float()
            stats[Stat.CORRECT] *= stats[Stat.VALID]
            out.append((index, stats))
    return out


def _record_backends() -> list[str]:
    names = ["reference"]
    if _ext._C is not None:
        names.append("cpu")
    try:
        from csl_fast._triton._registry import is_interpreted
        from csl_fast._triton.cross_entropy import _ce_fwd_kernel

        if is_interpreted(_ce_fwd_kernel):
            names.append("triton")
    except ImportError:
        pass
    return names


@pytest.mark.parametrize("backend", _record_backends())
def test_vote_matches_a_loop_over_epochs_with_duplicates(backend):
    n, classes = 13, 5
    batches = _batches(n, classes, epochs=6, batch=24)
    steps: dict = {}
    want = _vote_loop(batches, n, steps)
    state = [torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.bool)]
    suggest = (
        torch.full((n,), -1, dtype=torch.int32),
        torch.zeros(n, dtype=torch.int32),
        torch.zeros(n, dtype=torch.int32),
    )
    for epoch, (index, stats) in enumerate(batches):
        ops.record_last(
            stats, index, None, epoch, *state, None, None, suggest=suggest, backend=backend
        )
    assert [t.tolist() for t in suggest] == list(want)
    # The data exercises every branch, candidate changes included.
    assert steps["change"] > 3 and steps["down"] > 10


@needs_cpp
def test_record_vote_op_matches_a_loop():
    """csl_fast::record_vote (the vote alone; its CUDA kernel serves the cuda backend)."""
    n = 13
    batches = _batches(n, 5, epochs=4, batch=24)
    want = _vote_loop(batches, n)
    suggest = (
        torch.full((n,), -1, dtype=torch.int32),
        torch.zeros(n, dtype=torch.int32),
        torch.zeros(n, dtype=torch.int32),
    )
    for index, stats in batches:
        torch.ops.csl_fast.record_vote(stats, index, *suggest)
    assert [t.tolist() for t in suggest] == list(want)
    with pytest.raises(IndexError, match="outside"):
        torch.ops.csl_fast.record_vote(batches[0][1], batches[0][0] + n, *suggest)
    with pytest.raises(TypeError, match="suggest_votes must be Int"):
        torch.ops.csl_fast.record_vote(
            batches[0][1], batches[0][0], suggest[0], suggest[1].long(), suggest[2]
        )
    # a float index was truncated (1.7 voted for sample 1), as scatter_stats refuses it
    for dtype in (torch.float32, torch.bool, torch.int16):
        with pytest.raises(TypeError, match="index must be int64 or int32"):
            torch.ops.csl_fast.record_vote(batches[0][1], batches[0][0].to(dtype), *suggest)
        with pytest.raises(TypeError, match="index must be int64 or int32"):
            last = (torch.zeros(n), torch.zeros(n), torch.zeros(n, dtype=torch.bool))
            torch.ops.csl_fast.record_last(
                batches[0][1], batches[0][0].to(dtype), None, 0, *last, *([None] * 10)
            )


@pytest.mark.parametrize("backend", _record_backends())
def test_vote_needs_all_three_buffers(backend):
    stats = torch.zeros(NUM_STATS, 2)
    state = [torch.zeros(3), torch.zeros(3), torch.zeros(3, dtype=torch.bool)]
    label = torch.full((3,), -1, dtype=torch.int32)
    fn = {
        "cpu": lambda *a: torch.ops.csl_fast.record_last.default(*a),
        "reference": reference.record_last,
        "triton": lambda *a: torch.ops.csl_fast.record_last_triton.default(*a),
    }[backend]
    with pytest.raises((ValueError, RuntimeError), match="together"):
        fn(stats, torch.zeros(2, dtype=torch.long), None, 0, *state, *[None] * 6, label, None, None)


@pytest.mark.parametrize("backend", _ce_backends())
def test_tracker_suggestions_through_accumulate(backend):
    """A short training-like sequence through csl_fast.accumulate (on the CPU backend the
    one-call C++ step): the tracker's buffers equal the loop over the kernels' stats."""
    n, classes = 17, 6
    g = torch.Generator().manual_seed(5)
    tracker = csl_fast.CSLTracker(n, classes, backend=backend)
    labels = torch.randint(0, classes, (n,), generator=g)
    seen = []
    for epoch in range(5):
        for _ in range(3):
            index = torch.randint(0, n, (8,), generator=g)  # duplicates within a batch
            z = torch.randn(8, classes, generator=g)
            y = labels[index].clone()
            # from epoch 2 on, even samples are mostly classified right (a fit to time)
            fit = (index % 2 == 0) & (torch.rand(8, generator=g) < 0.8) & (epoch >= 2)
            z[torch.arange(8), y] += 4.0 * fit
            z.requires_grad_()
            y[0] = -100
            csl_fast.accumulate(z, y, index, tracker, backend=backend).backward()
            _, stats = ops.cross_entropy_fwd(z.detach(), y, None, -100, 0.0, 1, backend=backend)
            seen.append((index, stats))
        tracker.end_epoch()
    label, votes, hits = _vote_loop(seen, n)
    assert tracker.suggest_label.tolist() == label
    assert tracker.suggest_votes.tolist() == votes
    assert tracker.suggest_hits.tolist() == hits
    got_label, conf = tracker.suggestions()
    assert got_label.dtype == torch.int64 and got_label.tolist() == label
    epochs = [k // 3 for k in range(len(seen))]
    count, learned = _fit_loop(seen, epochs, n)
    assert tracker.csl_count.tolist() == count
    assert tracker.learned_epoch.tolist() == learned
    want = _confidence_loop(label, votes, hits, count, learned, tracker.epoch)
    for j in range(n):
        if label[j] < 0:
            assert math.isnan(conf[j])
        else:
            assert conf[j].item() == pytest.approx(want[j], rel=1e-6)
            assert 0 < conf[j] <= 1
    # The data exercises both normalisers: fitted samples and ones still doubted.
    assert any(e >= 0 for e in learned) and any(
        e < 0 and c > 0 for e, c in zip(learned, count, strict=True)
    )


def test_suggestions_recover_the_majority_runner_up():
    """A class that is the runner-up of most presentations is the suggestion, with the
    fraction of presentations as its confidence when it never lost the lead."""
    tracker = csl_fast.CSLTracker(2, 4, backend="reference")
    for t in range(10):
        stats = torch.zeros(NUM_STATS, 2)
        stats[Stat.VALID] = 1.0
        # sample 0: runner-up 2 except every third presentation; sample 1: never valid.
        stats[Stat.OTHER_ARGMAX, 0] = 3.0 if t % 3 == 1 else 2.0
        stats[Stat.VALID, 1] = 0.0
        stats[Stat.OTHER_ARGMAX, 1] = -1.0
        tracker.update(torch.tensor([0, 1]), stats)
    with pytest.warns(RuntimeWarning, match="closed no epoch"):  # (exact: never fitted)
        label, conf = tracker.suggestions()
    assert label.tolist() == [2, -1]
    assert conf[0].item() == pytest.approx(7 / 10)
    assert math.isnan(conf[1])


def _present(tracker: csl_fast.CSLTracker, runner_up: list[float], correct: list[bool]):
    """One presentation of every sample, with these runner-ups and correctness."""
    stats = torch.zeros(NUM_STATS, len(runner_up))
    stats[Stat.VALID] = 1.0
    stats[Stat.OTHER_ARGMAX] = torch.tensor(runner_up)
    stats[Stat.CORRECT] = torch.tensor(correct, dtype=torch.float32)
    tracker.update(torch.arange(len(runner_up)), stats)


@pytest.mark.parametrize("after", [0, 4, 60])
def test_confidence_does_not_fall_after_memorisation(after):
    """A flipped sample predicted as its true class (3) for 8 epochs, then memorised;
    a clean one doubted at 3 of its first 6 epochs before it was learned; one never fitted.
    Their confidences are the same however long training goes on past memorisation
    (the old definition, hits / presentations, fell as 1 / presentations)."""
    tracker = csl_fast.CSLTracker(3, 4, backend="reference")
    for epoch in range(8 + after):
        early = epoch < 8
        runner_up = [3.0 if early else 1.0, 2.0 if epoch in (1, 5) else 0.0, 1.0]
        correct = [not early, epoch not in (1, 5) and epoch >= 2, False]
        _present(tracker, runner_up, correct)
        tracker.end_epoch()
    label, conf = tracker.suggestions()
    assert label.tolist() == [3, 2, 1]
    # sample 1: a vote for 0 at epoch 0, one for 2 at epoch 1 cancels it, one for 2 at
    # epoch 5 makes 2 the candidate (h = v = 1); its final streak began at epoch 6.
    assert conf.tolist() == pytest.approx([1.0, 1 / 6, 1.0])


def test_confidence_without_epochs_is_the_share_of_presentations():
    """A tracker never told of an epoch has no streak timing: every presentation counts."""
    tracker = csl_fast.CSLTracker(1, 4, backend="reference")
    for t in range(6):
        _present(tracker, [2.0], [t >= 2])
    with pytest.warns(RuntimeWarning, match="closed no epoch"):
        label, conf = tracker.suggestions()
    assert label.tolist() == [2] and conf.item() == pytest.approx(2 / 6)


def test_suggestions_of_a_tracker_without_epochs_warn_once_also_through_clean():
    """With end_epoch() never called every presentation counts, fitted or not: the
    confidence fell silently (4 passes, 2 of 3 votes before the fit read as 0.5, not 2/3);
    csl_fast.clean warned, and must not warn twice now that suggestions() does."""
    tracker = csl_fast.CSLTracker(1, 4, backend="reference")
    for t in range(4):
        _present(tracker, [2.0], [t >= 2])
    with pytest.warns(RuntimeWarning) as said:
        tracker.suggestions()
    assert [str(w.message) for w in said] == [
        "CSLTracker.suggestions: the confidence is underestimated: the tracker closed no "
        "epoch although it presented a sample up to 4 times (tracker.end_epoch() was never "
        "called); call it after each training epoch (csl_fast.train.train and the "
        "integrations do)"
    ]
    assert said[0].filename == __file__
    det = csl_fast.detect.mislabeled(torch.ones(1), rule="fraction", fraction=1.0)
    with pytest.warns(RuntimeWarning) as said:
        csl_fast.clean(tracker, detection=det)
    assert len(said) == 1 and str(said[0].message).startswith("csl_fast.clean: the sugg")
    tracker.end_epoch()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        tracker.suggestions()


def test_suggestion_memory_and_initial_state():
    tracker = csl_fast.CSLTracker(1000)
    assert tracker.nbytes() == 90 * 1000  # the class docstring's figure
    for name in ("suggest_label", "suggest_votes", "suggest_hits"):
        assert tracker.buffers()[name].dtype == torch.int32
    assert (tracker.suggest_label == -1).all()
    label, conf = tracker.suggestions()
    assert (label == -1).all() and conf.isnan().all()


def test_suggestions_survive_a_state_round_trip(tmp_path):
    tracker = csl_fast.CSLTracker(3, 4, backend="reference")
    stats = torch.zeros(NUM_STATS, 3)
    stats[Stat.VALID] = 1.0
    stats[Stat.OTHER_ARGMAX] = torch.tensor([2.0, 0.0, 3.0])
    tracker.update(torch.tensor([0, 1, 1]), stats)
    path = tmp_path / "t.csl"
    tracker.save(path)
    loaded = csl_fast.CSLTracker.from_file(path)
    for name in ("suggest_label", "suggest_votes", "suggest_hits"):
        assert torch.equal(loaded.buffers()[name], tracker.buffers()[name]), name
    assert loaded.suggest_label.tolist() == [2, 0, -1]


def test_stat_enum_matches_csrc_stats_h():
    """csl_fast/stats.py and csrc/stats.h describe one layout: each entry of the header's
    ``enum Stat`` (``kCamelCase = value``) is the ``Stat`` member of that name and value,
    and back, with ``kNumStats = NUM_STATS``. Parsed from the source: no build needed."""
    import re
    from pathlib import Path

    header = (Path(__file__).parents[1] / "csrc" / "stats.h").read_text()
    block = re.search(r"enum\s+Stat\b[^{]*\{(.*?)\};", header, re.S)
    assert block, "csrc/stats.h has no `enum Stat ... { ... };`"
    body = re.sub(r"//[^\n]*|/\*.*?\*/", "", block[1], flags=re.S)
    entries = {name: int(value) for name, value in re.findall(r"\bk(\w+)\s*=\s*(\d+)", body)}
    names = re.findall(r"\bk(\w+)", body)
    assert sorted(names) == sorted(entries), "every csrc/stats.h entry needs an explicit value"
    assert entries.pop("NumStats", None) == NUM_STATS == len(Stat)
    python = {"".join(part.capitalize() for part in s.name.split("_")): int(s) for s in Stat}
    assert entries == python


def test_a_version_1_state_loads_without_suggestions():
    """Files written before the vote existed hold no suggest_* buffers: they load with
    no suggestion (label -1, no votes)."""
    tracker = csl_fast.CSLTracker(3, 4, backend="reference")
    state = tracker.state_dict()
    state["version"] = 1
    state["buffers"] = {k: v for k, v in state["buffers"].items() if not k.startswith("suggest")}
    fresh = csl_fast.CSLTracker(3, 4)
    fresh.suggest_label.fill_(2)
    fresh.suggest_votes.fill_(5)
    fresh.load_state_dict(state)
    assert fresh.suggest_label.tolist() == [-1, -1, -1]
    assert fresh.suggest_votes.tolist() == [0, 0, 0] and fresh.suggest_hits.tolist() == [0, 0, 0]


def test_sequences_make_no_suggestion():
    tracker = csl_fast.CSLTracker(4, 5)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    target = torch.randint(0, 5, (2, 3))
    csl_fast.accumulate(logits.flatten(0, 1), target, torch.tensor([1, 3]), tracker).backward()
    assert tracker.csl_count[1] == 3  # recorded, as three tokens
    assert (tracker.suggest_label == -1).all() and (tracker.suggest_votes == 0).all()


def test_merge_combines_votes_as_majority_summaries():
    runs = []
    for label, votes, hits in (
        ([2, 1, -1, 3], [3, 1, 0, 2], [4, 1, 0, 2]),
        ([2, 0, 1, 3], [1, 2, 2, 2], [1, 2, 2, 5]),
    ):
        t = csl_fast.CSLTracker(4, 4)
        t.suggest_label.copy_(torch.tensor(label))
        t.suggest_votes.copy_(torch.tensor(votes))
        t.suggest_hits.copy_(torch.tensor(hits))
        t.csl_count.fill_(10)  # presentations enough for those votes
        runs.append(t)
    merged = csl_fast.merge(runs)
    # same candidate: votes and hits add; different: more votes wins with the difference,
    # a tie keeps the first run's; no candidate: the other run's.
    assert merged.suggest_label.tolist() == [2, 0, 1, 3]
    assert merged.suggest_votes.tolist() == [4, 1, 2, 4]
    assert merged.suggest_hits.tolist() == [5, 2, 2, 7]


@pytest.mark.parametrize("backend", _ce_backends())
@pytest.mark.parametrize("offset", [1e3, 1e6, 1e30])
def test_the_gradient_norm_of_huge_logits(backend, offset):
    # the reference took p = exp(z - logsumexp(z)); at large offsets logsumexp loses
    # log C to rounding, and every p with it (16x the norm at 1e30)
    g = torch.Generator().manual_seed(0)
    z = (offset + torch.randn(5, 7, generator=g, dtype=torch.float64)).float()
    y = torch.randint(0, 7, (5,), generator=g)
    zd = z.double().requires_grad_(True)
    torch.nn.functional.cross_entropy(zd, y, reduction="sum").backward()
    want = (zd.grad**2).sum(1)
    stats = ops.cross_entropy_fwd(z, y, None, -100, 0.0, 0, backend=backend)[1]
    torch.testing.assert_close(stats[Stat.GRAD_NORM_SQ].double(), want, rtol=1e-4, atol=1e-6)


def test_a_tracker_refuses_more_classes_than_its_votes_hold():
    # OTHER_ARGMAX is a float32: at C = 2**24 + 4 suggested labels came out as other
    # classes, one equal to num_classes, and save() then refused the tracker
    with pytest.raises(ValueError, match=r"exact only up to C = 2\*\*24"):
        csl_fast.CSLTracker(2, num_classes=2**24 + 1)
    z = torch.zeros(1, 2**24 + 1).expand(2, -1)
    with pytest.raises(ValueError, match=r"the logits have C = 16777217 classes"):
        csl_fast.accumulate(z, torch.tensor([0, 1]), torch.arange(2), csl_fast.CSLTracker(2))
    csl = torch.zeros(2)  # a plain buffer keeps no votes: any C
    csl_fast.accumulate(z, torch.tensor([0, 1]), torch.arange(2), csl)
    torch.testing.assert_close(csl, torch.full((2,), math.log(2**24 + 1)))


def test_a_vote_or_two_is_not_read_as_a_confident_suggestion():
    """A clean sample misclassified at its first presentation only, then fitted, had
    confidence 1/1 and csl_fast.clean relabelled it to the wrong class at full confidence
    (an audit: 15 clean samples of a 2-epoch run)."""
    y = torch.zeros(2, dtype=torch.long)
    tracker = csl_fast.CSLTracker(2, 3)
    wrong, right = torch.tensor([0.0, 0.0, 5.0]), torch.tensor([5.0, 0.0, 0.0])
    for epoch in range(5):
        # sample 0 predicted as class 2 in epoch 1 only, sample 1 in epochs 1-3
        rows = [wrong if epoch < 1 else right, wrong if epoch < 3 else right]
        csl_fast.accumulate(torch.stack(rows), y, torch.arange(2), tracker)
        tracker.end_epoch()
    label, conf = tracker.suggestions()
    assert label.tolist() == [2, 2] and tracker.suggest_hits.tolist() == [1, 3]
    assert conf.tolist() == pytest.approx([1 / 3, 1.0])
    det = csl_fast.detect.mislabeled(torch.ones(2), rule="fraction", fraction=1.0)
    assert csl_fast.clean(tracker, detection=det).actions == ["drop", "relabel"]


@pytest.mark.parametrize("positions", [3, 2**24 + 3])
def test_float64_sums_count_exactly_past_float32(positions):
    """A sample's valid positions were summed in float32 before the scatter: a volume of
    2**24 + 3 positions counted 2**24 + 4, even into an int64 count."""
    ones = torch.ones(2, positions)
    ones[1, :2] = 0
    got = float64_sums(ones)
    assert got.dtype == torch.float64 and got.tolist() == [positions, positions - 2]
    # up to 4096 positions a float64 sum of every entry
    assert float64_sums(torch.tensor([[1.0, 2.0**-30, 2.0**-30]])).item() == 1 + 2.0**-29
    assert float64_sums(torch.zeros(3, 0)).tolist() == [0.0, 0.0, 0.0]
