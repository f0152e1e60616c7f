"""accumulate on sequences: logits [B*T, V] (or, as F.cross_entropy reads them, [B, V, T]),
target [B, T], index [B]."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_no_worse_than_torch

import csl_fast
from csl_fast import CSLTracker

B, T, V = 3, 11, 13


def _backends():
    # The Triton interpreter is exercised on the smallest case only (it is slow).
    return [b for b in csl_fast.available_backends("cpu") if b != "triton"]


def _batch(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g).to(dtype)
    target = torch.randint(0, V, (B, T), generator=g)
    target[0, 4:] = -100  # right padding
    target[1, :2] = -100  # prompt tokens
    target[2, :] = -100  # nothing supervised
    index = torch.tensor([5, 0, 5])
    return logits, target, index


def _token_losses(logits, target):
    return F.cross_entropy(
        logits.double().reshape(-1, V), target.reshape(-1), reduction="none"
    ).view(target.shape)


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("flat", [False, True], ids=["BVT", "BT_V"])
def test_loss_grad_and_csl(backend, reduction, flat):
    """[B*T, V] logits, or the transpose(1, 2) idiom ([B, V, T], read as F.cross_entropy
    reads K-dimensional input): per-sequence CSL either way."""
    logits, target, index = _batch()
    x = logits.reshape(-1, V) if flat else logits.transpose(1, 2)
    x = x.clone().requires_grad_(True)
    csl, count = torch.zeros(6, dtype=torch.float64), torch.zeros(6)
    loss = csl_fast.accumulate(
        x, target, index, csl, count=count, reduction=reduction, backend=backend
    )
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.cross_entropy(ref_x, target.reshape(-1) if flat else target, reduction=reduction)
    if reduction == "none":
        assert loss.shape == target.shape
        ref = ref.view(target.shape)
    up = torch.randn_like(ref)
    (loss * up).sum().backward()
    (ref * up).sum().backward()
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-5, atol=1e-6)
    tok = _token_losses(logits, target)
    expect = torch.zeros(6, dtype=torch.float64).index_add_(0, index, tok.sum(1))
    torch.testing.assert_close(csl, expect, rtol=1e-5, atol=1e-5)
    n = (target != -100).sum(1).float()
    assert count.tolist() == torch.zeros(6).index_add_(0, index, n).tolist()
    mean = csl / count.double().clamp(min=1)
    torch.testing.assert_close(mean[0], tok[1][target[1] != -100].mean(), rtol=1e-5, atol=1e-6)


def test_triton_interpreter_matches():
    if "triton" not in csl_fast.available_backends("cpu"):
        pytest.skip("Triton runs on CPU tensors only with TRITON_INTERPRET=1")
    logits, target, index = _batch()
    out = {}
    for backend in ("triton", "reference"):
        csl, count = torch.zeros(6), torch.zeros(6)
        x = logits.clone().requires_grad_(True)
        flat = x.flatten(0, 1)
        csl_fast.accumulate(flat, target, index, csl, count=count, backend=backend).backward()
        out[backend] = (csl, count, x.grad)
    for a, b in zip(out["triton"], out["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _within_twice_torch(ours, theirs, exact, what):
    """Our error against float64 is at most twice PyTorch's own same-dtype error (the
    project's rule; no absolute floor, which at bf16 would be coarser than the error)."""
    err_ours = (ours.double() - exact).abs().max()
    err_torch = (theirs.double() - exact).abs().max()
    assert err_torch > 0, f"{what}: PyTorch is exact here, the bound would say nothing"
    assert err_ours <= 2 * err_torch, f"{what}: error {err_ours:.3g}, torch's {err_torch:.3g}"


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_tokens_no_worse_than_torch(backend, seed):
    """bf16 logits: loss and gradient within twice PyTorch's bf16 error against float64;
    the float32 CSL within twice (plus float32 rounding) that of PyTorch's float32 sums."""
    logits, target, index = _batch(torch.bfloat16, seed)
    x = logits.clone().requires_grad_(True)
    csl = torch.zeros(6)
    loss = csl_fast.accumulate(x.flatten(0, 1), target, index, csl, backend=backend)
    loss.backward()
    ref_x = logits.clone().requires_grad_(True)
    ref = F.cross_entropy(ref_x.reshape(-1, V), target.reshape(-1))
    ref.backward()
    exact_x = logits.double().requires_grad_(True)
    exact = F.cross_entropy(exact_x.reshape(-1, V), target.reshape(-1))
    exact.backward()
    assert loss.dtype == torch.bfloat16
    _within_twice_torch(loss, ref, exact.detach(), "loss")
    _within_twice_torch(x.grad, ref_x.grad, exact_x.grad, "grad")
    tok32 = F.cross_entropy(logits.float().reshape(-1, V), target.reshape(-1), reduction="none")
    torch_csl = torch.zeros(6).index_add_(0, index, tok32.view(B, T).sum(1))
    exact_csl = torch.zeros(6, dtype=torch.float64).index_add_(
        0, index, _token_losses(logits, target).sum(1)
    )
    assert_no_worse_than_torch(csl, torch_csl, exact_csl, "csl")


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sequence_whose_summed_loss_overflows_float32_is_not_recorded(backend, dtype):
    """Each token's loss (2e38) fits float32, their sum does not: it was recorded as inf
    and counted, and the sequence's CSL stayed inf for good."""
    logits = torch.zeros(2, 2, 2, dtype=dtype)  # [B, V, T]
    logits[0, 0, :], logits[0, 1, :] = -1e38, 1e38
    logits[1, 1, :] = 1.0
    target = torch.zeros(2, 2, dtype=torch.long)
    csl, count = torch.zeros(2, dtype=torch.float64), torch.zeros(2)
    csl_fast.accumulate(logits, target, torch.arange(2), csl, count=count, backend=backend)
    tracker = CSLTracker(2, 2)
    csl_fast.accumulate(logits, target, torch.arange(2), tracker, backend=backend)
    want = 2 * F.cross_entropy(torch.tensor([[0.0, 1.0]]), torch.tensor([0])).item()
    for got, n in ((csl, count), (tracker.csl_sum, tracker.csl_count)):
        assert n.tolist() == [0.0, 2.0] and got[0] == 0
        assert got[1].item() == pytest.approx(want, rel=1e-6)
    assert torch.isfinite(tracker.last_loss).all() and torch.isfinite(tracker.margin_sum).all()


@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))  # (tiny: Triton too)
def test_a_float64_csl_gets_the_float64_sum_of_token_losses(backend):
    """The per-sequence sums were taken in float32 before the scatter, whatever the buffers:
    a float64 CSL (or a float64 tracker's) lost two token losses of ~1e-9 beside one of
    ~0.3, and an int64 count of a 2**24 + 3-position volume came out 2**24 + 4
    (tests/test_stats.py tests the sums on such a row)."""
    logits = torch.zeros(1, 2, 3)  # [N, C, T]: token losses softplus(z_1 - z_0)
    logits[0, 1] = torch.tensor([-1.0, -21.0, -21.0])
    target = torch.zeros(1, 3, dtype=torch.long)
    index = torch.tensor([0])
    tokens = csl_fast.accumulate(logits, target, index, torch.zeros(1), reduction="none")
    want = sum(tokens[0].double().tolist())
    assert torch.tensor(want).float() == tokens[0].sum()  # float32 misses them
    csl, count = torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int64)
    csl_fast.accumulate(logits, target, index, csl, count=count, backend=backend)
    tracker = CSLTracker(1, 2, dtype=torch.float64)
    csl_fast.accumulate(logits, target, index, tracker, backend=backend)
    for got, n in ((csl, count), (tracker.csl_sum, tracker.csl_count)):
        assert got.item() == pytest.approx(want, rel=1e-15, abs=0) and n.item() == 3
    # float32 buffers as before: the float32 sum
    csl32, count32 = torch.zeros(1), torch.zeros(1)
    csl_fast.accumulate(logits, target, index, csl32, count=count32, backend=backend)
    assert csl32.item() == tokens[0].sum().item() and count32.item() == 3


def test_tracker_per_sequence_statistics():
    logits, target, index = _batch()
    tracker = CSLTracker(6, V)
    csl_fast.accumulate(logits.flatten(0, 1), target, index, tracker)
    tok = _token_losses(logits, target)
    valid = target != -100
    assert tracker.csl_count.tolist() == [9.0, 0, 0, 0, 0, 4.0]
    torch.testing.assert_close(tracker.csl_sum[5].double(), tok[0].sum(), rtol=1e-5, atol=1e-5)
    # last_loss: the sequence's summed token loss (the all-ignored sequence is no
    # presentation, so sample 5 keeps sequence 0's value).
    torch.testing.assert_close(tracker.last_loss[5].double(), tok[0].sum(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tracker.last_loss[0].double(), tok[1].sum(), rtol=1e-5, atol=1e-5)
    # per-token means over csl_count
    z = logits[0][valid[0]].double()
    y = target[0][valid[0]]
    p = z.softmax(-1)
    p_y = p.gather(1, y[:, None]).squeeze(1)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    others = z.scatter(1, y[:, None], -float("inf")).amax(1)
    torch.testing.assert_close(tracker.aum[5].double(), (z_y - others).mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(tracker.confidence[5].double(), p_y.mean(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        tracker.variability[5].double(), p_y.std(unbiased=False), rtol=1e-4, atol=1e-5
    )
    torch.testing.assert_close(
        tracker.last_max_prob[5].double(), p.amax(1).mean(), rtol=1e-5, atol=1e-6
    )
    assert not bool(tracker.last_correct.any())  # random logits: no exact match


def test_tracker_exact_match_and_forgetting():
    """A sequence is correct when every supervised token is the argmax."""
    target = torch.tensor([[1, 2, 3, -100], [0, 0, 1, 1]])
    index = torch.tensor([0, 1])
    good = F.one_hot(target.clamp(min=0), 4).float() * 10
    bad = good.clone()
    bad[0, 1] = torch.tensor([0.0, 0, 0, 10])  # one wrong token in sequence 0
    tracker = CSLTracker(2, 4)
    csl_fast.accumulate(good.flatten(0, 1), target, index, tracker)
    assert tracker.last_correct.tolist() == [True, True]
    tracker.end_epoch()
    csl_fast.accumulate(bad.flatten(0, 1), target, index, tracker)
    assert tracker.last_correct.tolist() == [False, True]
    assert tracker.forgetting.tolist() == [1, 0]
    assert tracker.learned_epoch.tolist() == [-1, 0]


def test_record_sequences_equals_rowwise_sums():
    """csl_sum/csl_count/grad_norm_sum of a sequence equal the row-wise recording of its
    tokens under one index."""
    logits, target, index = _batch()
    seq, rows = CSLTracker(6, V), CSLTracker(6, V)
    csl_fast.accumulate(logits.flatten(0, 1), target, index, seq)
    csl_fast.accumulate(logits.reshape(-1, V), target.reshape(-1), index.repeat_interleave(T), rows)
    for name in ("csl_sum", "csl_count", "grad_norm_sum", "margin_sum", "p_true_sum"):
        torch.testing.assert_close(seq.buffers()[name], rows.buffers()[name], rtol=1e-5, atol=1e-5)


def test_an_empty_batch_of_sequences():
    """[0, V] logits with a [0, T] target (B = 0) were refused as a misshapen row target,
    where [0, V, T] logits and B = 2, T = 0 were taken; and then, with T == V, as one-hot
    labels (the check of a target of the logits' shape came first)."""
    csl = torch.zeros(4)
    for logits, target, index in (
        (torch.randn(0, V), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
        (torch.randn(0, V), torch.zeros(0, V, dtype=torch.long), torch.zeros(0, dtype=torch.long)),
        (
            torch.randn(0, V, 3),
            torch.zeros(0, 3, dtype=torch.long),
            torch.zeros(0, dtype=torch.long),
        ),
        (torch.randn(0, V), torch.zeros(2, 0, dtype=torch.long), torch.tensor([0, 1])),
    ):
        want = F.cross_entropy(logits.reshape(-1, V), target.reshape(-1))
        torch.testing.assert_close(
            csl_fast.accumulate(logits, target, index, csl), want, equal_nan=True
        )
    assert not csl.any()


def test_record_sequences_refuses_statistics_of_another_dtype():
    # int64 statistics were written as if they were the fused op's float32 ones
    t = CSLTracker(4, V)
    for bad in (torch.ones(csl_fast.stats.NUM_STATS, 2, 3, dtype=torch.int64), torch.ones(3, 2)):
        with pytest.raises(ValueError, match=r"token_stats must be float32 \(or float64\)"):
            t.record_sequences(torch.tensor([0, 1]), bad)
    fresh = CSLTracker(4, V).buffers()
    assert all(torch.equal(buf, fresh[name]) for name, buf in t.buffers().items())


def test_ambiguous_and_bad_shapes():
    logits, target, index = _batch()
    flat = logits.flatten(0, 1)
    csl = torch.zeros(6)
    with pytest.raises(ValueError, match="index must be 1-D with B = 3 entries, one"):
        csl_fast.accumulate(flat, target, index.repeat(2), csl)
    with pytest.raises(ValueError, match=r"needs \[B\*T, V\] logits with B\*T = 30 rows"):
        csl_fast.accumulate(flat, target[:, :-1], index, csl)
    # [B, T, V] logits are read as F.cross_entropy reads them ([N, C, d]): with a [B, T]
    # target that is an error naming the sequence forms, never a silent re-reading.
    with pytest.raises(ValueError, match=r"logits.flatten\(0, 1\).*transpose\(1, 2\)"):
        csl_fast.accumulate(logits, target, index, csl)
    # [B, 1] targets with [B, C] logits stay an error (one-token sequences or a misshapen
    # per-row target), which names both unambiguous forms (README: "is refused: pass ...")
    for backend in ("cpu", "reference"):
        with pytest.raises(ValueError, match=r"target must be 1-D.*unsqueeze\(-1\).*squeeze\(1\)"):
            csl_fast.accumulate(logits[:, 0], target[:, :1], index, csl, backend=backend)
    assert not csl.any()  # the refused calls wrote nothing
    # One-token sequences are [B, V, 1] logits (K-dimensional, d = 1): only sequence 0's
    # first token is supervised (sequence 1 starts with prompt tokens, 2 has none).
    csl_fast.accumulate(logits[:, :1].transpose(1, 2), target[:, :1], index, csl)
    want = torch.zeros(6, dtype=torch.float64)
    want[5] = _token_losses(logits, target)[0, 0]
    torch.testing.assert_close(csl.double(), want, rtol=1e-6, atol=1e-6)

    class RowsOnly:
        def __init__(self):
            self.buffers = torch.zeros(6), torch.zeros(6)

        def training_buffers(self):
            return self.buffers

        def record(self, index, stats):
            raise AssertionError("a sequence batch must not reach the per-row record")

    rows_only = RowsOnly()
    with pytest.raises(TypeError, match="record_sequences"):
        csl_fast.accumulate(flat, target, index, rows_only)
    assert not any(b.any() for b in rows_only.buffers)  # refused before writing


def test_two_d_path_unchanged():
    logits = torch.randn(5, 4)
    target = torch.tensor([0, 1, 2, 3, -100])
    index = torch.tensor([0, 1, 1, 2, 3])
    csl = torch.zeros(4)
    loss = csl_fast.accumulate(logits, target, index, csl, reduction="none")
    assert loss.shape == (5,)
    expect = torch.zeros(4).index_add_(0, index, F.cross_entropy(logits, target, reduction="none"))
    torch.testing.assert_close(csl, expect)


def test_a_tracker_marks_itself_fed_by_sequences_and_keeps_the_mark(tmp_path):
    """``tracker.sequences``: set by the first batch of sequences (not by rows), kept by
    the state, the file and merge; a state from before the flag reads as rows."""
    rows = CSLTracker(6, num_classes=V)
    csl_fast.accumulate(torch.randn(4, V), torch.randint(0, V, (4,)), torch.arange(4), rows)
    assert not rows.sequences and "sequences" not in repr(rows)
    logits, target, index = _batch()
    seqs = CSLTracker(6)
    csl_fast.accumulate(logits.reshape(-1, V), target, index, seqs)
    assert seqs.sequences and "sequences=True" in repr(seqs)
    seqs.save(tmp_path / "s.csl")
    assert CSLTracker.from_file(tmp_path / "s.csl").sequences
    fresh = CSLTracker(6)
    fresh.load_state_dict(seqs.state_dict())
    assert fresh.sequences
    fresh.load_state_dict(CSLTracker(6).state_dict())  # a load replaces the mark
    assert not fresh.sequences
    old = seqs.state_dict()
    del old["sequences"]
    fresh.load_state_dict(old)
    assert not fresh.sequences
    with pytest.raises(csl_fast.TrackerStateError, match="field 'sequences' must be a bool"):
        fresh.load_state_dict({**seqs.state_dict(), "sequences": 1})
    plain = CSLTracker(6)
    assert csl_fast.merge([plain, seqs]).sequences
    assert not csl_fast.merge([plain, plain]).sequences
    # rows and sequences count different units: pooled, csl_mean mixed them silently
    with pytest.raises(csl_fast.TrackerStateError, match=r"trackers \[1\] recorded sequences"):
        csl_fast.merge([rows, seqs])
    # nor rows an eval pass alone scored, which a tracker of sequences refuses itself: the
    # merge took them, with num_classes from the eval head and the rows' eval losses
    scored = CSLTracker(6)
    batch = (torch.randn(4, 2), torch.tensor([0, 1, 2, 0]), torch.arange(4))
    csl_fast.score_epoch(torch.nn.Linear(2, 3), [batch], scored)
    with pytest.raises(csl_fast.TrackerStateError, match=r"and trackers \[1\] one row per"):
        csl_fast.merge([seqs, scored])
    # one position per sample ([N, C, 1] logits) is a row, not a sequence
    one = CSLTracker(6)
    csl_fast.accumulate(torch.randn(4, V, 1), torch.randint(0, V, (4, 1)), torch.arange(4), one)
    assert not one.sequences and one.csl_count[:4].eq(1).all()
    # nor is an empty batch of the sequence layout: it recorded no sample at all
    empty = (torch.randn(0, V, 3), torch.zeros(0, 3, dtype=torch.long), torch.zeros(0).long())
    csl_fast.accumulate(*empty, one)
    assert not one.sequences
    # a tracker pickled before the flag existed reads as rows (the class's value)
    old = pickle.loads(pickle.dumps(seqs))
    del old.__dict__["sequences"]
    assert not old.sequences and "sequences" not in repr(old)
    old.save(tmp_path / "old.csl")


@pytest.mark.parametrize("positions", [(1,), (1, 1)])
def test_samples_of_one_position_are_recorded_as_classifications(positions):
    """``[N, C, 1]`` logits are ``[N, C]`` with a trailing dimension: the tracker gets the
    same state (a suggested-label vote, ``num_classes`` from C) as for the 2-D call, where
    a sequence of one token used to cast no vote and leave ``num_classes`` unset."""
    g = torch.Generator().manual_seed(7)
    n, c = 9, 5
    index = torch.tensor([4, 0, 8, 4, 2, 7, 1, 3, 6])
    flat_tracker, shaped_tracker = CSLTracker(n), CSLTracker(n)
    for _ in range(3):
        z = torch.randn(n, c, generator=g)
        y = torch.randint(0, c, (n,), generator=g)
        zk = z.reshape(n, c, *positions).clone().requires_grad_(True)
        yk = y.reshape(n, *positions)
        z2 = z.clone().requires_grad_(True)
        loss_k = csl_fast.accumulate(zk, yk, index, shaped_tracker)
        loss_2 = csl_fast.accumulate(z2, y, index, flat_tracker)
        loss_k.backward()
        loss_2.backward()
        torch.testing.assert_close(loss_k, loss_2)
        torch.testing.assert_close(zk.grad.reshape(n, c), z2.grad)
        flat_tracker.end_epoch()
        shaped_tracker.end_epoch()
    assert shaped_tracker.num_classes == flat_tracker.num_classes == c
    assert not shaped_tracker.sequences
    want = flat_tracker.state_dict()
    for name, value in shaped_tracker.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, want[name], rtol=0, atol=0, msg=name)
    assert (flat_tracker.suggestions()[0] >= 0).any()


def test_one_token_sequences_into_a_tracker_of_sequences_stay_sequences():
    """A [B, V, 1] batch (a short last batch of the transpose(1, 2) layout) into a tracker
    that recorded sequences: no suggested label, as linear_cross_entropy records it."""
    logits, target, index = _batch()
    tracker = CSLTracker(6)
    csl_fast.accumulate(logits.transpose(1, 2), target, index, tracker)
    assert tracker.sequences and tracker.num_classes is None
    short = torch.randn(2, V, 1)
    csl_fast.accumulate(short, torch.tensor([[1], [2]]), torch.tensor([1, 4]), tracker)
    assert tracker.num_classes is None
    assert (tracker.suggestions()[0] == -1).all()
    assert tracker.csl_count[4] == 1


def test_a_tracker_of_sequences_suggests_no_labels_whatever_its_first_batch():
    # a first batch of one-token sequences ([B, V, 1]) was recorded as classification rows
    # and voted: review offered "relabel to 2" (a vocabulary token) for whole sequences
    g = torch.Generator().manual_seed(0)
    tracker = csl_fast.CSLTracker(8)
    for epoch in range(2):
        csl_fast.accumulate(
            torch.randn(4, 6, 1, generator=g), torch.randint(0, 6, (4, 1), generator=g),
            torch.arange(4), tracker,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            csl_fast.accumulate(
                torch.randn(4, 6, 3, generator=g), torch.randint(0, 6, (4, 3), generator=g),
                torch.arange(4, 8), tracker,
            )  # fmt: skip
        # the rows it voted as are said once, at the first batch of sequences
        said = [str(w.message) for w in caught if "recorded classification rows" in str(w.message)]
        assert len(said) == (epoch == 0), said
        tracker.end_epoch()
    assert tracker.sequences
    label, confidence = tracker.suggestions()
    assert label.eq(-1).all() and confidence.isnan().all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = csl_fast.clean(tracker, policy="review", budget=4)
    assert not plan.relabel.any()


def _one_row_batch(n=3):
    g = torch.Generator().manual_seed(n)
    z = torch.randn(n, V, generator=g)
    y = torch.randint(0, V, (n,), generator=g)
    return z, y, torch.arange(n)


@pytest.mark.parametrize("num_classes", [None, V])  # V: the one-call C++ step may take it
def test_classification_rows_into_a_tracker_of_sequences_are_refused(num_classes):
    """A tracker of sequences refuses rows of one class each ([N, C] logits, stats of rows)
    by name and records nothing: taken, they were ranked by CSL per position with the
    sequences and lost their suggested labels."""
    logits, target, index = _batch()
    tracker = CSLTracker(6, num_classes=num_classes)
    csl_fast.accumulate(logits.reshape(-1, V), target, index, tracker)
    assert tracker.sequences
    before = {k: v.clone() for k, v in tracker.state_dict()["buffers"].items()}
    assert "csl_count" in before and "suggest_label" in before
    z, y, i = _one_row_batch()
    stats = csl_fast.reference.row_statistics(z, y, -100)
    calls = {
        "csl_fast.accumulate": lambda: csl_fast.accumulate(z, y, i, tracker),
        "csl_fast.linear_cross_entropy": lambda: csl_fast.linear_cross_entropy(
            z, torch.eye(V), y, index=i, csl=tracker
        ),
        "CSLTracker.update": lambda: tracker.update(i, stats),
        "CSLTracker.record": lambda: tracker.record(i, stats),
    }
    for api, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{api}: this tracker recorded sequences"):
            call()
    for name, value in tracker.state_dict()["buffers"].items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    # one-token sequences stay welcome, as the messages say
    csl_fast.accumulate(z[:, :, None], y[:, None], i, tracker)
    csl_fast.linear_cross_entropy(z, torch.eye(V), y[:, None], index=i, csl=tracker)
    assert tracker.csl_count[:3].tolist() == (before["csl_count"][:3] + 2).tolist()


@pytest.mark.parametrize("num_classes", [None, V])
def test_an_eval_pass_of_rows_into_a_tracker_of_sequences_is_refused(num_classes):
    # score_epoch and record_eval took classification rows into a tracker of sequences:
    # num_classes went from None to the head's C, final_loss became one row's eval loss
    # instead of the sequence's summed one, and the next training step was refused with
    # "the tracker was made with num_classes=3"
    logits, target, index = _batch()
    tracker = CSLTracker(6, num_classes=num_classes)
    csl_fast.accumulate(logits.reshape(-1, V), target, index, tracker)
    before = {k: v.clone() for k, v in tracker.state_dict()["buffers"].items()}
    z, y, i = _one_row_batch()
    head = torch.nn.Linear(V, 3)  # another width than the vocabulary's
    calls = {
        "csl_fast.score_epoch": lambda: csl_fast.score_epoch(head, [(z, y % 3, i)], tracker),
        "CSLTracker.record_eval": lambda: tracker.record_eval(
            i, csl_fast.reference.row_statistics(z, y, -100)
        ),
    }
    for api, call in calls.items():
        with pytest.raises(ValueError, match=rf"^{api}: this tracker recorded sequences"):
            call()
    assert tracker.num_classes == num_classes and tracker.eval_passes == 0
    for name, value in tracker.state_dict()["buffers"].items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, msg=name)
    csl_fast.accumulate(logits.reshape(-1, V), target, index, tracker)  # training goes on


def test_an_eval_pass_into_a_tracker_of_sequences_says_how_to_score_sequences():
    # refused before any batch is read, a loader of sequences was called "classification
    # rows, one class per sample" and told to record them into a second tracker; the advice
    # for sequences (score them yourself, record_loss) was never reached
    logits, target, index = _batch()
    tracker = CSLTracker(6, num_classes=V)
    csl_fast.accumulate(logits.reshape(-1, V), target, index, tracker)
    model = torch.nn.Sequential(torch.nn.Embedding(V, 4), torch.nn.Linear(4, V))
    loader = [(torch.randint(0, V, (B, T)), target, index)]  # sequences, [B, T] targets
    with pytest.raises(ValueError, match=r"tracker\.sequences is True") as info:
        csl_fast.score_epoch(model, loader, tracker, forward=lambda m, x: m(x).transpose(1, 2))
    said = str(info.value)
    assert "csl_fast.record_loss into a tracker of their own" in said
    assert "this batch is classification rows" not in said and "second CSLTracker" not in said


def test_eval_rows_then_sequences_warn_as_training_rows_do():
    # a tracker whose rows came from an eval pass alone took its first batch of sequences
    # without a word (only rows voted in training were said), keeping the rows' final_loss
    tracker = CSLTracker(6)
    z, y, i = _one_row_batch()
    csl_fast.score_epoch(torch.nn.Identity(), [(z, y, i)], tracker)
    logits, target, index = _batch()
    with pytest.warns(UserWarning, match=r"classification rows in an eval pass .*score_epoch"):
        csl_fast.accumulate(logits.reshape(-1, V), target, index, tracker)
    assert tracker.sequences
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        csl_fast.accumulate(logits.reshape(-1, V), target, index, tracker)


def test_rows_then_sequences_warn_once_and_a_run_of_sequences_does_not():
    tracker = CSLTracker(6, num_classes=V)
    for _ in range(3):  # chance-level logits: some row is misclassified and votes
        csl_fast.accumulate(*_one_row_batch(), tracker)
    logits, target, index = _batch()
    with pytest.warns(UserWarning, match="recorded classification rows before this first"):
        csl_fast.accumulate(logits.reshape(-1, V), target, index, tracker)
    assert tracker.sequences
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        csl_fast.accumulate(logits.reshape(-1, V), target, index, tracker)
        fresh = CSLTracker(6)
        csl_fast.accumulate(logits.reshape(-1, V), target, index, fresh)


def test_record_sequences_reads_only_the_valid_finite_tokens_of_hand_made_statistics():
    # a token with VALID = 0 added its margin to the sequence's, and a NaN loss made the
    # sequence's last loss NaN, where update() of the same columns records neither
    from csl_fast.stats import NUM_STATS, Stat

    tokens = torch.zeros(NUM_STATS, 1, 3)
    tokens[Stat.VALID] = torch.tensor([1.0, 1.0, 0.0])
    tokens[Stat.LOSS] = torch.tensor([0.5, float("nan"), 7.0])
    tokens[Stat.MARGIN] = torch.tensor([1.0, 1.0, 100.0])
    tokens[Stat.OTHER_ARGMAX] = -1
    t = CSLTracker(2, num_classes=5)
    t.record_sequences(torch.tensor([0]), tokens)
    assert t.margin_sum.tolist() == [1.0, 0.0] and t.last_loss.tolist() == [0.5, 0.0]


def test_a_batch_of_sequences_with_no_supervised_token_does_not_make_a_tracker_of_them():
    # it recorded nothing, yet set tracker.sequences: a later batch of rows, the tracker's
    # only records, was refused as "classification rows" into a tracker of sequences
    tracker = CSLTracker(6, num_classes=V)
    logits, target, index = _batch()
    csl_fast.accumulate(logits.reshape(-1, V), torch.full_like(target, -100), index, tracker)
    assert not tracker.sequences and not bool(tracker.csl_count.any())
    z, y, i = _one_row_batch()
    csl_fast.accumulate(z, y, i, tracker)
    assert tracker.csl_count[i].tolist() == [1.0] * len(i)
    supervised = CSLTracker(6, num_classes=V)
    csl_fast.accumulate(logits.reshape(-1, V), target, index, supervised)
    assert supervised.sequences
