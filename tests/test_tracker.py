"""CSLTracker against a plain-PyTorch, one-presentation-at-a-time oracle.

Every statistic is recomputed from the logits in float64 with textbook formulas and a
Python loop over presentations in batch order (the tracker's documented rule for
duplicate indices), for every backend available here, across several epochs with
duplicate indices, ``ignore_index`` rows and a non-finite row.
"""

from __future__ import annotations

import copy
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import csl_fast
from csl_fast import CSLTracker, Stat, TrackerFileError, TrackerStateError, tracker_file
from csl_fast.stats import NUM_STATS

BACKENDS = csl_fast.available_backends("cpu")
IGNORE = -1


class Oracle:
    """Plain-PyTorch bookkeeping, one presentation at a time."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.epoch = 0
        self.train = [[] for _ in range(n)]  # (epoch, loss, p_y, margin, correct, gn, maxp)
        self.eval = [[] for _ in range(n)]
        self.ig = [[] for _ in range(n)]  # (epoch, sq)
        self.ig_first = -1
        self.loss_hist, self.eval_hist, self.ig_hist = [], [], []
        self._eval_pass = [[] for _ in range(n)]

    @staticmethod
    def rows(logits: torch.Tensor, target: torch.Tensor):
        z = logits.detach().double()
        out = []
        for i in range(z.shape[0]):
            y = int(target[i])
            if y == IGNORE:
                out.append(None)
                continue
            loss = F.cross_entropy(z[i : i + 1], target[i : i + 1].long()).item()
            if not math.isfinite(loss):
                out.append(None)
                continue
            p = z[i].softmax(0)
            onehot = F.one_hot(torch.tensor(y), z.shape[1]).double()
            others = torch.cat([z[i, :y], z[i, y + 1 :]])
            margin = (z[i, y] - others.max()).item() if others.numel() else 0.0
            out.append(
                {
                    "loss": loss,
                    "p": p[y].item(),
                    "margin": margin,
                    "correct": int(z[i].argmax()) == y,
                    "gn": ((p - onehot) ** 2).sum().item(),
                    "maxp": p.max().item(),
                }
            )
        return out

    def train_batch(self, logits, target, index):
        for r, i in zip(self.rows(logits, target), index.tolist(), strict=True):
            if r is not None:
                self.train[i].append((self.epoch, r))

    def eval_batch(self, logits, target, index):
        for r, i in zip(self.rows(logits, target), index.tolist(), strict=True):
            if r is not None:
                self.eval[i].append(r)
                self._eval_pass[i].append(r["loss"])

    def input_grad(self, index, sq):
        for s, i in zip(sq, index.tolist(), strict=True):
            if s is not None and math.isfinite(s):
                self.ig[i].append((self.epoch, s))
                if self.ig_first < 0:
                    self.ig_first = self.epoch

    def end_epoch(self):
        e = self.epoch

        def mean(xs):
            return sum(xs) / len(xs) if xs else math.nan

        self.loss_hist.append([mean([r["loss"] for ep, r in p if ep == e]) for p in self.train])
        if self.ig_first >= 0:
            self.ig_hist.append([mean([s for ep, s in g if ep == e]) for g in self.ig])
        self.epoch += 1

    def end_eval_pass(self):
        def mean(xs):
            return sum(xs) / len(xs) if xs else math.nan

        self.eval_hist.append([mean(xs) for xs in self._eval_pass])
        self._eval_pass = [[] for _ in range(self.n)]

    def expected(self) -> dict[str, list]:
        ex = {k: [] for k in ("csl_sum", "csl_count", "last_loss", "last_max_prob")}
        ex.update({k: [] for k in ("grad_norm_sum", "margin_sum", "p_true_sum", "p_true_sq_sum")})
        ex.update({k: [] for k in ("last_correct", "forgetting", "learned_epoch")})
        for pres in self.train:
            rs = [r for _, r in pres]
            ex["csl_sum"].append(sum(r["loss"] for r in rs))
            ex["csl_count"].append(len(rs))
            ex["last_loss"].append(rs[-1]["loss"] if rs else 0.0)
            ex["last_max_prob"].append(rs[-1]["maxp"] if rs else 0.0)
            ex["grad_norm_sum"].append(sum(r["gn"] for r in rs))
            ex["margin_sum"].append(sum(r["margin"] for r in rs))
            ex["p_true_sum"].append(sum(r["p"] for r in rs))
            ex["p_true_sq_sum"].append(sum(r["p"] ** 2 for r in rs))
            prev, forget, start = False, 0, -1
            for ep, r in pres:
                if prev and not r["correct"]:
                    forget += 1
                if r["correct"] and not prev:
                    start = ep
                if not r["correct"]:
                    start = -1
                prev = r["correct"]
            ex["last_correct"].append(prev)
            ex["forgetting"].append(forget)
            ex["learned_epoch"].append(start)
        ex["eval_csl_sum"] = [sum(r["loss"] for r in rs) for rs in self.eval]
        ex["eval_count"] = [len(rs) for rs in self.eval]
        ex["eval_last_loss"] = [rs[-1]["loss"] if rs else 0.0 for rs in self.eval]
        ex["eval_last_max_prob"] = [rs[-1]["maxp"] if rs else 0.0 for rs in self.eval]
        ex["eval_last_correct"] = [rs[-1]["correct"] if rs else False for rs in self.eval]
        ex["input_grad_sq_sum"] = [sum(s for _, s in g) for g in self.ig]
        ex["input_grad_norm_sum"] = [sum(math.sqrt(s) for _, s in g) for g in self.ig]
        ex["input_grad_count"] = [len(g) for g in self.ig]
        return ex


def assert_tracker_matches(tracker: CSLTracker, oracle: Oracle) -> None:
    for name, values in oracle.expected().items():
        got = getattr(tracker, name)
        want = torch.tensor(values, dtype=torch.float64)
        if got.dtype in (torch.bool, torch.int32):
            assert torch.equal(got.long(), want.long()), name
        else:
            torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-5, msg=name)
    if tracker.history:
        for name, rows in (
            ("loss_history", oracle.loss_hist),
            ("eval_loss_history", oracle.eval_hist),
        ):
            want = torch.tensor(rows, dtype=torch.float64).reshape(-1, oracle.n)
            got = getattr(tracker, name).double()
            torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-3, equal_nan=True, msg=name)
    want = torch.tensor(oracle.ig_hist, dtype=torch.float64).reshape(-1, oracle.n)
    got = tracker.input_grad_history.double()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, equal_nan=True)
    assert tracker.input_grad_first_epoch == oracle.ig_first
    assert tracker.epoch == oracle.epoch


def per_sample_input_grads(model, x, y):
    """Squared norms of d loss_i / d x_i from one float64 autograd call per row."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    out = []
    for i in range(x.shape[0]):
        if int(y[i]) == IGNORE:
            out.append(None)
            continue
        xi = x[i : i + 1].detach().double().requires_grad_(True)
        logits = torch.func.functional_call(model, params, (xi,))
        (g,) = torch.autograd.grad(F.cross_entropy(logits, y[i : i + 1]), xi)
        out.append(g.square().sum().item())
    return out


def make_batches(n, batch, steps, classes, features, seed, nan_row=True):
    g = torch.Generator().manual_seed(seed)
    batches = []
    for s in range(steps):
        x = torch.randn(batch, features, generator=g) * 2
        y = torch.randint(0, classes, (batch,), generator=g)
        y[torch.rand(batch, generator=g) < 0.2] = IGNORE
        idx = torch.randint(0, n, (batch,), generator=g)  # n < batch * steps: duplicates
        if nan_row and s == 1:
            x[0] = float("nan")
            y[0] = 0
        batches.append((x, y, idx))
    return batches


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_statistic_matches_plain_pytorch(backend):
    tiny = backend == "triton"
    n, batch, steps, classes, features, epochs = (
        (6, 5, 2, 3, 3, 2) if tiny else (13, 11, 4, 4, 5, 3)
    )
    model = torch.nn.Linear(features, classes)
    with torch.no_grad():
        model.weight.mul_(3)
    tracker = CSLTracker(n, classes, history=True, backend=backend)
    oracle = Oracle(n)
    for epoch in range(epochs):
        for x, y, idx in make_batches(n, batch, steps, classes, features, seed=epoch):
            valid = y != IGNORE
            x = x.clone()
            x = tracker.watch(x, idx, reduction_scale=valid.sum(), valid=valid)
            logits = model(x)
            loss = csl_fast.accumulate(
                logits, y, idx, tracker, ignore_index=IGNORE, backend=backend
            )
            loss.backward()
            model.zero_grad()
            oracle.train_batch(logits, y, idx)
            oracle.input_grad(idx, per_sample_input_grads(model, x, y))
        tracker.end_epoch()
        oracle.end_epoch()
        eval_batches = make_batches(n, batch, 2, classes, features, seed=100 + epoch, nan_row=False)
        csl_fast.score_epoch(model, eval_batches, tracker, ignore_index=IGNORE)
        for x, y, idx in eval_batches:
            oracle.eval_batch(model(x), y, idx)
        oracle.end_eval_pass()
    assert_tracker_matches(tracker, oracle)
    assert tracker.eval_passes == epochs
    assert (tracker.forgetting > 0).any() or tiny  # the data does exercise forgetting
    assert (tracker.csl_count > 1).any()


def _stats(loss, correct, valid, margin=None):
    b = len(loss)
    s = torch.zeros(len(Stat), b)
    s[Stat.LOSS] = torch.tensor(loss, dtype=torch.float32)
    s[Stat.CORRECT] = torch.tensor(correct, dtype=torch.float32)
    s[Stat.VALID] = torch.tensor(valid, dtype=torch.float32)
    s[Stat.P_TRUE] = torch.exp(-s[Stat.LOSS])
    s[Stat.MARGIN] = torch.tensor(margin or [0.0] * b)
    return s * s[Stat.VALID]


def test_duplicate_rule_is_batch_order():
    t = CSLTracker(4)
    # sample 1: correct, incorrect, (ignored), correct -> one forgetting event, streak from 0
    # sample 2: correct, correct; sample 3: only an ignored row; sample 0: incorrect
    idx = torch.tensor([1, 2, 1, 3, 1, 2, 1, 0])
    loss = [0.1, 0.2, 0.3, 9.0, 9.0, 0.4, 0.5, 0.6]
    correct = [1, 1, 0, 1, 1, 1, 1, 0]
    valid = [1, 1, 1, 0, 0, 1, 1, 1]
    t.update(idx, _stats(loss, correct, valid))
    assert t.forgetting.tolist() == [0, 1, 0, 0]
    assert t.learned_epoch.tolist() == [-1, 0, 0, -1]
    assert t.last_correct.tolist() == [False, True, True, False]
    torch.testing.assert_close(t.last_loss, torch.tensor([0.6, 0.5, 0.4, 0.0]))
    torch.testing.assert_close(t.csl_sum, torch.tensor([0.6, 0.9, 0.6, 0.0]))
    assert t.csl_count.tolist() == [1, 3, 2, 0]
    t.end_epoch()
    # epoch 1: sample 2 stays correct (streak keeps epoch 0); sample 1 incorrect then
    # correct (streak restarts at 1); sample 0 becomes correct
    t.update(
        torch.tensor([2, 1, 1, 0]),
        _stats([0.1, 2.0, 0.2, 0.3], [1, 0, 1, 1], [1, 1, 1, 1]),
    )
    assert t.forgetting.tolist() == [0, 2, 0, 0]
    assert t.learned_epoch.tolist() == [1, 1, 0, -1]
    assert t.threshold_learning_time().tolist() == [1, 1, 0, 2]  # never: epoch + 1
    assert t.ever_correct.tolist() == [True, True, True, False]
    t.update(torch.tensor([2, 2]), _stats([3.0, 3.0], [0, 1], [1, 0]))
    assert t.learned_epoch.tolist() == [1, 1, -1, -1]
    assert t.forgetting.tolist() == [0, 2, 1, 0]


def test_max_prob_and_derived_statistics():
    t = CSLTracker(3)
    logits = torch.tensor([[5.0, 1.0, -2.0], [0.0, 80.0, -80.0], [1.0, 1.0, 1.0]])
    y = torch.tensor([0, 2, 1])
    csl_fast.accumulate(logits, y, torch.arange(3), t, backend="reference")
    p = logits.double().softmax(1)
    torch.testing.assert_close(t.last_max_prob.double(), p.max(1).values, rtol=1e-5, atol=1e-6)
    assert t.last_correct.tolist() == [True, False, False]  # ties: the first index wins
    csl_fast.accumulate(logits * 0.5, y, torch.arange(3), t, backend="reference")
    py = torch.stack([p[range(3), y], (logits * 0.5).double().softmax(1)[range(3), y]])
    torch.testing.assert_close(t.confidence.double(), py.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        t.variability.double(), py.std(0, correction=0), rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(t.csl_mean, t.csl_sum / 2)
    torch.testing.assert_close(t.aum, t.margin_sum / 2)
    assert torch.isnan(CSLTracker(2).csl_mean).all()


def test_suggestions_of_a_losses_only_run_do_not_warn():
    # record_loss keeps no suggestion: "the confidence is underestimated" of none at all
    t = CSLTracker(4, history=True)
    for _ in range(2):
        csl_fast.record_loss(torch.rand(4), torch.arange(4), t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        label, _ = t.suggestions()
    assert label.tolist() == [-1] * 4


def test_learning_time_of_a_float64_tracker_keeps_float64_digits():
    """The released form's fraction was an int64 / int64 division, done in float32: 1/3
    came out 0.33333331 in a float64 score."""
    t = CSLTracker(2, num_classes=2, dtype=torch.float64)
    for row in ([1.0, 0.6], [0.01, 0.6], [0.01, 0.6]):
        t.record_input_grad(torch.tensor([0, 1]), torch.tensor(row, dtype=torch.float64))
        t.end_epoch()
    got = t.learning_time()
    assert got.dtype == torch.float64
    assert abs(got[0].item() - 1 / 3) < 1e-15


def test_learning_time_both_forms():
    t = CSLTracker(3)
    # epoch 0: no records; epochs 1..3 with records (sample 2 missing in epoch 2)
    t.end_epoch()
    per_epoch = [[4.0, 1.0, 9.0], [2.0, 0.5, None], [0.5, 3.0, 1.0]]
    for row in per_epoch:
        for i, v in enumerate(row):
            if v is not None:  # two records per epoch with mean v
                t.record_input_grad(torch.tensor([i, i]), torch.tensor([v - 0.25, v + 0.25]))
        t.end_epoch()
    assert t.input_grad_first_epoch == 1
    h = torch.tensor(
        [[v if v is not None else math.nan for v in r] for r in per_epoch],
        dtype=torch.float64,
    )
    torch.testing.assert_close(t.input_grad_history.double(), h, equal_nan=True)
    # paper form: first epoch whose running mean is <= tau; never -> t.epoch (sample 0's
    # epoch-3 mean is 0.5, but its running mean there is 6.5 / 3)
    assert t.learning_time("paper", tau=1.0).tolist() == [4.0, 1.0, 4.0]
    assert t.learning_time("paper", tau=2.5).tolist() == [3.0, 1.0, 4.0]
    assert t.learning_time("paper", tau=0.1).tolist() == [4.0, 4.0, 4.0]
    # released code's form, computed by hand
    running = [[4.0, 3.0, 6.5 / 3], [1.0, 0.75, 4.5 / 3], [9.0, math.nan, 5.0]]
    vals = [v for r in running for v in r if not math.isnan(v)]
    tau = sum(vals) / len(vals)
    want = [
        1 - sum(v < tau for v in r if not math.isnan(v)) / sum(not math.isnan(v) for v in r)
        for r in running
    ]
    torch.testing.assert_close(t.learning_time().double(), torch.tensor(want, dtype=torch.float64))
    want2 = [
        1 - sum(v < 2.0 for v in r if not math.isnan(v)) / sum(not math.isnan(v) for v in r)
        for r in running
    ]
    torch.testing.assert_close(
        t.learning_time(tau=2.0).double(), torch.tensor(want2, dtype=torch.float64)
    )
    with pytest.raises(ValueError, match="tau"):
        t.learning_time("paper")
    # NaN (or a string) passed as tau read as "never learned" for every sample (paper) or
    # 1.0 for every recorded one (code); a 0-d tensor is a number
    for form in ("paper", "code"):
        for bad in (math.nan, math.inf, "x", True):
            with pytest.raises(ValueError, match="tau must be a finite number"):
                t.learning_time(form, tau=bad)
        assert torch.equal(
            t.learning_time(form, tau=torch.tensor(1.0)), t.learning_time(form, tau=1.0)
        )
    # a sample without any input-gradient record has no learning time in either form (the
    # paper form gave it t.epoch, as if it were never learned)
    u = CSLTracker(4)
    u.record_input_grad(torch.tensor([0, 1]), torch.tensor([0.5, 2.0]))
    u.end_epoch()
    for form in ("paper", "code"):
        got = u.learning_time(form, tau=1.0)
        assert got[2:].isnan().all() and got[:2].isfinite().all(), (form, got)
    # nor before any epoch with records is closed (the paper form raised an IndexError
    # from amin over an empty history)
    fresh = CSLTracker(3)
    for _ in range(2):
        for form in ("paper", "code"):
            assert fresh.learning_time(form, tau=1.0).isnan().all(), form
        fresh.end_epoch()


def test_a_mean_loss_past_float16_is_warned_about_in_the_history():
    t = CSLTracker(3, history=True)
    csl_fast.record_loss(torch.tensor([1.2e5, 5.0, 3.0]), torch.arange(3), t)
    with pytest.warns(RuntimeWarning, match=r"loss_history: 1 sample\(s\).*65504"):
        t.end_epoch()
    assert t.loss_history[0].tolist() == [math.inf, 5.0, 3.0]
    assert t.csl_mean.tolist() == [1.2e5, 5.0, 3.0]
    csl_fast.record_loss(torch.tensor([1.0, math.inf, 6e4]), torch.arange(3), t)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # inf losses are not recorded; 6e4 fits
        t.end_epoch()
    # past 65504 but rounding to it (the warning counted these, whose row held 65504)
    fresh = CSLTracker(3, history=True)
    csl_fast.record_loss(torch.tensor([65510.0, 65519.0, 65520.0]), torch.arange(3), fresh)
    with pytest.warns(RuntimeWarning, match=r"loss_history: 1 sample\(s\)"):
        fresh.end_epoch()
    assert fresh.loss_history[0].tolist() == [65504.0, 65504.0, math.inf]


def test_memory_statement():
    n = 1000
    assert CSLTracker(n).nbytes() == 90 * n
    assert CSLTracker(n, dtype=torch.float64).nbytes() == 158 * n
    assert CSLTracker(n, history=True).nbytes() == (90 + 16) * n
    assert "90 bytes per sample" in CSLTracker.__doc__


def test_a_bool_size_is_refused(tmp_path):
    """num_classes=True was taken as 1, and save() then wrote a file load refused."""
    for kwargs in ({"num_classes": True}, {"num_labels": True}):
        with pytest.raises(ValueError, match="an int >= 1, got True"):
            CSLTracker(4, **kwargs)
    with pytest.raises(ValueError, match="num_samples"):
        CSLTracker(True)


def test_an_unknown_backend_is_refused_when_the_tracker_is_made():
    # it was taken, and the first training step failed inside accumulate
    with pytest.raises(ValueError, match=r"CSLTracker: backend must be 'auto' or one of"):
        CSLTracker(4, backend="bogus")
    assert CSLTracker(4, backend="reference").backend == "reference"


def test_an_unavailable_device_is_refused_plainly(monkeypatch):
    # a CUDA-less torch raised AssertionError("Torch not compiled with CUDA enabled")
    real = torch.empty

    def no_cuda(*args, **kwargs):
        if "cuda" in str(kwargs.get("device", "")):
            raise AssertionError("Torch not compiled with CUDA enabled")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", no_cuda)
    with pytest.raises(ValueError, match=r"cannot allocate on device 'cuda'.*create the tracker"):
        CSLTracker(4, 3, device="cuda")
    with pytest.raises(ValueError, match="cannot allocate on device 'nonsense'"):
        CSLTracker(4, 3, device="nonsense")


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((2**62, 4), {}, r"num_samples = 4611686018427387904 gives buffers of"),
        ((2**60,), {}, r"num_samples = 1152921504606846976 gives buffers of"),
        ((16,), {"num_labels": 2**62}, r"num_samples = 16 x num_labels = 4611686018427387904"),
    ],
)
def test_sizes_past_what_a_tensor_holds_are_refused_by_name(args, kwargs, match):
    # torch's "Storage size calculation overflowed with sizes=[...]"
    with pytest.raises(ValueError, match=r"^CSLTracker: " + match + r".* at most 2\*\*63 bytes"):
        CSLTracker(*args, **kwargs)


def test_record_checks_device_and_shapes():
    t = CSLTracker(4)
    with pytest.raises(ValueError, match="entries"):
        t.record(torch.tensor([0, 1]), torch.zeros(len(Stat), 3))
    with pytest.raises(TypeError, match="integer"):
        t.record(torch.tensor([0.0]), torch.zeros(len(Stat), 1))
    t.record(torch.zeros(0, dtype=torch.long), torch.zeros(len(Stat), 0))  # empty batch


def test_bad_index_or_stats_leave_the_tracker_as_it_was():
    """record (history=True) and record_sequences called directly on the CPU with an index
    outside [0, N): refused before anything is written. They added the epoch sums (and,
    for sequences, the margin, gradient-norm and confidence sums) of the in-range rows
    first, then record_last refused the batch, leaving it half recorded. float64 token
    statistics are taken (record_last's float32 is formed here); [6, B, T] ones refused."""
    stats = torch.ones(len(Stat), 2)
    t = CSLTracker(4, history=True, backend="cpu")
    with pytest.raises(IndexError, match="outside"):
        t.record(torch.tensor([0, 9]), stats)
    with pytest.raises(IndexError, match="outside"):
        t.record_sequences(torch.tensor([0, 9]), stats[:, :, None].expand(-1, -1, 3))
    # a uint64 index past 2**63 - 1 is named as given (it wrapped to a negative one)
    with pytest.raises(IndexError, match=rf"index\[1\] = {2**63 + 5} is outside"):
        t.record(torch.tensor([0, 2**63 + 5], dtype=torch.uint64), stats)
    fresh = CSLTracker(4, history=True, backend="cpu").buffers()
    for name, b in t.buffers().items():
        assert torch.equal(b, fresh[name]), name
    with pytest.raises(
        ValueError, match=r"\[NUM_STATS, B, T\] .*got torch.float32 of shape \(6, 2, 3\)"
    ):
        t.record_sequences(torch.tensor([0, 1]), torch.ones(len(Stat) - 1, 2, 3))
    tok = torch.rand(len(Stat), 2, 3, dtype=torch.float64)
    tok[Stat.VALID] = 1.0
    want = CSLTracker(4, history=True, backend="cpu")
    want.record_sequences(torch.tensor([0, 3]), tok.float())
    t.record_sequences(torch.tensor([0, 3]), tok)
    for name, b in want.buffers().items():
        torch.testing.assert_close(t.buffers()[name], b, msg=name)


def _primed(backend, history=False):
    t = CSLTracker(6, 3, backend=backend, history=history)
    t.update(torch.arange(4), _stats([0.5, 1.0, 2.0, 0.1], [1, 0, 0, 1], [1, 1, 1, 1]))
    return t, {k: v.clone() for k, v in t.buffers().items()}


def _unchanged(t, before):
    return [k for k, v in t.buffers().items() if not torch.equal(v, before[k])]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("history", [False, True])
def test_refused_calls_leave_the_tracker_unchanged(backend, history):
    """Statistics of the wrong layout are refused before any buffer is written (the
    reference backend once added csl_sum, then failed on row VALID of a [3, B] stats)."""
    stats, index = _stats([0.3, 0.2], [1, 1], [1, 1]), torch.tensor([1, 5])
    for what, bad in (
        ("3 rows", stats[:3]),
        ("6 rows", stats[:6]),
        ("float64", stats.double()),
        ("1-D", stats[0]),
    ):
        for method in ("update", "record", "record_eval"):
            t, before = _primed(backend, history)
            with pytest.raises(ValueError, match=rf"CSLTracker\.{method}: stats must be float32"):
                getattr(t, method)(index, bad)
            assert not _unchanged(t, before), (what, method)
    t, before = _primed(backend, history)
    with pytest.raises(ValueError, match=r"\[NUM_STATS, B, T\]"):
        t.record_sequences(index, stats[:3, :, None])
    with pytest.raises(ValueError, match=r"valid must be a bool \[B = 2\]"):
        t.record_input_grad(index, torch.ones(2), torch.ones(3, dtype=torch.bool))
    # a list raised "'list' object has no attribute 'dim'"; a negative squared norm made
    # loss_sensitivity NaN for good
    with pytest.raises(TypeError, match=r"valid must be a bool \[B\] tensor, got list"):
        t.record_input_grad(index, torch.ones(2), [True, False])
    with pytest.raises(ValueError, match=r"sq_norms\[1\] = -\S+ is negative"):
        t.record_input_grad(index, torch.tensor([4.0, -1e-8]))
    assert not _unchanged(t, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "norms",
    [torch.full((2,), 3 + 4j), torch.ones(2, dtype=torch.bool), torch.full((2,), 7)],
    ids=["complex", "bool", "int"],
)
def test_record_input_grad_refuses_norms_that_are_not_real_floats(backend, norms):
    # a complex norm lost its imaginary part in the cast (9 recorded for |3+4j|^2 = 25),
    # bool and int ones were recorded as their values, without a word
    t, before = _primed(backend)
    with pytest.raises(TypeError, match=r"sq_norms must be a real floating-point \[B\] tensor"):
        t.record_input_grad(torch.tensor([1, 5]), norms)
    assert not _unchanged(t, before)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("other", [3.0, 7.0, -2.0, -1.5, float("nan"), float("inf")])
def test_a_runner_up_class_past_num_classes_is_refused(backend, other, tmp_path):
    """Stats of a model with more outputs than the tracker's classes stored a suggested
    label past num_classes: accepted silently, then every save refused the tracker."""
    stats = _stats([0.3, 0.2], [0, 0], [1, 1])
    stats[Stat.OTHER_ARGMAX] = torch.tensor([1.0, other])
    for method in ("update", "record", "record_eval"):
        t, before = _primed(backend)
        with pytest.raises(ValueError, match=rf"{method}: stats row OTHER_ARGMAX .* column 1"):
            getattr(t, method)(torch.tensor([1, 2]), stats)
        assert not _unchanged(t, before), method
    stats[Stat.OTHER_ARGMAX] = torch.tensor([-1.0, 2.0])  # -1: a row without a runner-up
    t = CSLTracker(6, 3, backend=backend)
    t.update(torch.tensor([1, 2]), stats)
    t.end_epoch()
    t.save(tmp_path / "t.pt")
    back = CSLTracker(6, 3)
    back.load(tmp_path / "t.pt")
    assert back.suggest_label[1:3].tolist() == [-1, 2]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tracker_made_without_num_classes_takes_the_logits_class_count(backend):
    """num_classes=None was "metadata": left out, detection lost its doubt view and its
    firm-loss test (which compare with chance, 1 / C) with no warning."""
    from csl_fast.info import fast_step_fallbacks

    fallbacks = fast_step_fallbacks()[0]
    t = CSLTracker(8, backend=backend)
    index = torch.tensor([0, 3, 3, 7])
    csl_fast.accumulate(torch.randn(4, 5), torch.tensor([0, 4, 1, 2]), index, t)
    assert t.num_classes == 5
    # then the one-call step on the CPU, with the same results as a tracker made with C
    ref = CSLTracker(8, 5, backend=backend)
    ref.load_state_dict(t.state_dict())
    z, y = torch.randn(4, 5), torch.tensor([1, 1, 0, 4])
    for tracker in (t, ref):
        csl_fast.accumulate(z, y, index, tracker)
    assert all(torch.equal(t.buffers()[k], v) for k, v in ref.buffers().items())
    assert fast_step_fallbacks()[0] == fallbacks
    with pytest.raises(ValueError, match=r"C = 6 classes but .* num_classes=5"):
        csl_fast.accumulate(torch.randn(4, 6), y, index, t)
    eval_only = CSLTracker(8, backend=backend)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), index)]
    csl_fast.score_epoch(torch.nn.Identity(), batches, eval_only)
    assert eval_only.num_classes == 3
    # sequences (one sample, many positions) keep their margin-only view: a vocabulary's
    # chance level would pin none of them
    seq = CSLTracker(2, backend=backend)
    z = torch.randn(2, 5, 3)
    csl_fast.accumulate(z, torch.zeros(2, 3, dtype=torch.long), torch.tensor([0, 1]), seq)
    assert seq.num_classes is None and bool((seq.csl_count > 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_refused_call_leaves_a_tracker_without_num_classes_unset(backend):
    """The class count was taken before the call's checks: a refused call (here an index
    past N, a target past C) set it, it was saved with the state, and the next correct
    call, with other logits, was refused for not matching it."""
    z, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    for call in (
        lambda t: csl_fast.accumulate(z, y, torch.tensor([0, 1, 2, 99]), t),
        lambda t: csl_fast.accumulate(z, torch.tensor([0, 1, 2, 7]), torch.arange(4), t),
        lambda t: csl_fast.linear_cross_entropy(
            torch.randn(4, 2), torch.randn(5, 2), y, torch.tensor([0, 1, 2, 99]), t
        ),
        lambda t: csl_fast.score_epoch(
            torch.nn.Identity(),
            [(z, y, torch.arange(4)), (z, y, torch.tensor([0, 1, 2, 99]))],
            t,
        ),
    ):
        t = CSLTracker(8, backend=backend)
        with pytest.raises(IndexError):
            call(t)
        assert t.num_classes is None and t.state_dict()["num_classes"] is None
        csl_fast.accumulate(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4), t)
        assert t.num_classes == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_index_past_n(backend):
    """By default every backend refuses it before writing on CPU tensors (the reference and
    Triton once skipped it there, recording the other rows); with validate=False the C++
    kernels still refuse it and the others skip it, as the GPU kernels do (the reference's
    index_add_ once raised with csl_sum already added into, and faults a GPU)."""
    stats = _stats([0.3, 0.2, 0.7], [1, 1, 0], [1, 1, 1])
    index = torch.tensor([1, 6, 2])
    calls = {
        "update": lambda t, i, s, **kw: t.update(i, s, **kw),
        "record": lambda t, i, s, **kw: t.record(i, s, **kw),
        "record_eval": lambda t, i, s, **kw: t.record_eval(i, s, **kw),
        "record_sequences": lambda t, i, s, **kw: t.record_sequences(
            i, s[:, :, None].repeat(1, 1, 2), **kw
        ),
        "record_input_grad": lambda t, i, s, **kw: t.record_input_grad(i, s[0], **kw),
    }
    for name, call in calls.items():
        for validate in (None, False):
            t, before = _primed(backend, history=True)
            if backend == "cpu" or validate is None:
                with pytest.raises(IndexError, match=r"index.* = 6 is outside"):
                    call(t, index, stats, validate=validate)
                assert not _unchanged(t, before), name
                continue
            call(t, index, stats, validate=validate)
            want, _ = _primed(backend, history=True)
            keep = torch.tensor([True, False, True])
            call(want, index[keep], stats[:, keep])
            assert not _unchanged(t, want.buffers()), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_statistics_of_any_layout_are_taken(backend):
    """Non-contiguous stats (a transposed [B, NUM_STATS] buffer) were refused by update and
    record_eval on the C++ backend as "must be a contiguous float32 [7, B] tensor ..., got
    [7, 4]", a shape they had, while record took them."""
    stats = _stats([0.3, 0.2, 0.7], [1, 1, 0], [1, 1, 1])
    strided = stats.t().contiguous().t()
    assert not strided.is_contiguous() and torch.equal(strided, stats)
    index = torch.tensor([1, 4, 2])
    for name in ("update", "record_eval", "record"):
        want, _ = _primed(backend, history=True)
        got, _ = _primed(backend, history=True)
        getattr(want, name)(index, stats)
        getattr(got, name)(index, strided)
        assert not _unchanged(got, want.buffers()), name


def test_device_without_an_index(device):
    """device="cuda" is the current GPU: its statistics report cuda:0 and must be taken."""
    t = CSLTracker(4, 3, device=device)
    assert t.device == torch.zeros(0, device=device).device
    t.record(torch.tensor([0, 2], device=device), torch.ones(len(Stat), 2, device=device))
    assert t.last_loss[[0, 2]].tolist() == [1.0, 1.0]


# ----------------------------------------------------------------------------- state
def _run(tracker, model, opt, epochs, start=(0, 0), stop=None, data=None):
    """Train ``model`` with ``tracker`` from (epoch, step) ``start`` up to ``stop``."""
    n = tracker.num_samples
    for epoch in range(start[0], epochs):
        batches = data[epoch]
        for step, (x, y, idx) in enumerate(batches):
            if (epoch, step) < start:
                continue
            if stop is not None and (epoch, step) >= stop:
                return
            x = tracker.watch(x.clone(), idx)
            loss = csl_fast.accumulate(model(x), y, idx, tracker, ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
        tracker.end_epoch()
        csl_fast.score_epoch(model, data["eval"], tracker, ignore_index=IGNORE)
    assert n == tracker.num_samples


def _all_state(tracker):
    sd = tracker.state_dict()
    return {**sd["buffers"], **sd["histories"]}, {
        k: v for k, v in sd.items() if k not in ("buffers", "histories")
    }


def test_resume_is_bitwise_equal(tmp_path):
    n, classes, features, epochs = 17, 3, 4, 3
    data = {e: make_batches(n, 8, 4, classes, features, seed=10 + e) for e in range(epochs)}
    data["eval"] = [(torch.randn(n, features), torch.randint(0, classes, (n,)), torch.arange(n))]

    def fresh():
        torch.manual_seed(1)
        model = torch.nn.Sequential(
            torch.nn.Linear(features, 8), torch.nn.Tanh(), torch.nn.Linear(8, classes)
        )
        return model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

    model, opt = fresh()
    straight = CSLTracker(n, classes, history=True)
    _run(straight, model, opt, epochs, data=data)

    model, opt = fresh()
    first = CSLTracker(n, classes, history=True)
    _run(first, model, opt, epochs, stop=(1, 2), data=data)  # stop mid-epoch
    first.save(tmp_path / "run.csl")
    # or inside the training checkpoint, read back by torch.load's default weights_only
    ckpt = {"model": model.state_dict(), "opt": opt.state_dict(), "csl": first.state_dict()}
    torch.save(ckpt, tmp_path / "model.pt")
    del first

    model, opt = fresh()
    ckpt = torch.load(tmp_path / "model.pt")
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    resumed = CSLTracker(n, classes, history=True)
    resumed.load(tmp_path / "run.csl")
    from_ckpt = CSLTracker(n, classes, history=True)
    from_ckpt.load_state_dict(ckpt["csl"])
    (a, meta_a), (b, meta_b) = _all_state(from_ckpt), _all_state(resumed)
    assert meta_a == meta_b and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    _run(resumed, model, opt, epochs, start=(1, 2), data=data)

    (a, meta_a), (b, meta_b) = _all_state(straight), _all_state(resumed)
    assert meta_a == meta_b
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    assert straight.input_grad_history.shape[0] == epochs

    again = CSLTracker.from_file(tmp_path / "run.csl")
    assert again.history and again.num_classes == classes and again.epoch == 1


def test_state_dict_roundtrip_in_memory():
    t = CSLTracker(5, 2)
    t.update(torch.tensor([0, 0, 3]), _stats([1.0, 2.0, 3.0], [1, 0, 1], [1, 1, 1]))
    t.end_epoch()
    u = CSLTracker(5)
    u.load_state_dict(t.state_dict())
    for k, v in t.buffers().items():
        assert torch.equal(v, u.buffers()[k]), k
    assert u.epoch == 1 and u.num_classes == 2


def test_load_called_on_the_class_points_to_from_file(tmp_path):
    # CSLTracker.load(path) took the path for the tracker: AttributeError "'str' object
    # has no attribute '_buffers'" from the lock, with nothing to say what to call
    path = tmp_path / "t.csl"
    CSLTracker(10).save(path)
    with pytest.raises(TypeError, match=r"CSLTracker\.load .* str.*CSLTracker\.from_file\(path\)"):
        CSLTracker.load(path.as_posix())
    with pytest.raises(TypeError, match=r"tracker\.end_epoch") as raised:
        CSLTracker.end_epoch("t")
    assert "from_file" not in str(raised.value)


def test_file_errors(tmp_path):
    t = CSLTracker(10, 3)
    t.update(torch.tensor([1, 2]), _stats([1.0, 2.0], [1, 0], [1, 1]))
    path = tmp_path / "t.csl"
    t.save(path)
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]

    with pytest.raises(TrackerFileError, match="num_samples=10"):
        CSLTracker(11).load(path)
    with pytest.raises(TrackerFileError, match="num_classes"):
        CSLTracker(10, 4).load(path)
    with pytest.raises(FileNotFoundError):
        CSLTracker(10).load(tmp_path / "missing.csl")

    state = t.state_dict()
    state["version"] = 99
    torch.save(state, tmp_path / "newer.csl")
    with pytest.raises(TrackerFileError, match="newer csl_fast"):
        CSLTracker(10).load(tmp_path / "newer.csl")
    with pytest.raises(TrackerStateError, match="newer csl_fast"):
        CSLTracker(10).load_state_dict(state)

    data = path.read_bytes()
    (tmp_path / "trunc.csl").write_bytes(data[: len(data) // 2])
    (tmp_path / "text.csl").write_text("hello")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.csl")
    for name in ("trunc.csl", "text.csl", "foreign.csl"):
        with pytest.raises(TrackerFileError):
            CSLTracker(10).load(tmp_path / name)
        with pytest.raises(TrackerFileError):
            CSLTracker.from_file(tmp_path / name)
    assert issubclass(TrackerFileError, ValueError)

    u = CSLTracker(10, 3)
    u.load(path)
    assert torch.equal(u.csl_sum, t.csl_sum)


def test_crash_mid_save_keeps_old_file(tmp_path, monkeypatch):
    t = CSLTracker(6)
    t.update(torch.tensor([1]), _stats([1.5], [1], [1]))
    path = tmp_path / "t.csl"
    t.save(path)
    before = path.read_bytes()
    t.update(torch.tensor([2]), _stats([2.5], [1], [1]))

    real_bytes = tracker_file._tensor_bytes
    calls = []

    def crashing_bytes(t):  # the third tensor never gets written
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt("power cut")
        return real_bytes(t)

    monkeypatch.setattr(tracker_file, "_tensor_bytes", crashing_bytes)
    with pytest.raises(KeyboardInterrupt):
        t.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["t.csl"]
    u = CSLTracker(6)
    u.load(path)
    assert u.csl_sum.tolist() == [0, 1.5, 0, 0, 0, 0]


def test_one_compiled_graph_serves_every_epoch():
    """torch.compile(fullgraph=True) of a step into a tracker: the epoch stamp is read at
    run time (a 0-d tensor), so end_epoch() does not recompile the step (it did every
    epoch, until the recompile limit of 8 raised), and the stamps are eager's."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    g = torch.Generator().manual_seed(11)
    n, c, epochs = 16, 3, 10
    logits = [torch.randn(n, c, generator=g) * 3 for _ in range(epochs)]
    y = torch.randint(0, c, (n,), generator=g)
    idx = torch.randperm(n, generator=g)
    eager, compiled = CSLTracker(n, c), CSLTracker(n, c)

    def step(t, z):
        return csl_fast.accumulate(z, y, idx, t)

    fast = torch.compile(step, backend="aot_eager", fullgraph=True)
    for z in logits:
        step(eager, z.clone().requires_grad_(True)).backward()
        fast(compiled, z.clone().requires_grad_(True)).backward()
        eager.end_epoch()
        compiled.end_epoch()
    assert counters["stats"]["unique_graphs"] == 1
    assert compiled.learned_epoch.max() > 1  # stamps past the first epochs were written
    for name, buf in eager.buffers().items():
        torch.testing.assert_close(compiled.buffers()[name], buf, msg=name)


def test_a_reference_tracker_compiles_with_fullgraph():
    """The reference backend's suggested-label vote read its number of rounds on the host,
    which a traced graph cannot: torch.compile(fullgraph=True) into
    CSLTracker(backend="reference"), and into every tracker where the extension does not
    load, failed with a data-dependent-expression error. Duplicate indices, several
    misclassified presentations each: the vote's rounds matter."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(12)
    n, c = 6, 4
    y = torch.randint(0, c, (24,), generator=g)
    idx = torch.randint(0, n, (24,), generator=g)
    eager = CSLTracker(n, c, backend="reference")
    compiled = CSLTracker(n, c, backend="reference")

    def step(t, z):
        return csl_fast.accumulate(z, y, idx, t)

    fast = torch.compile(step, backend="aot_eager", fullgraph=True)
    for _ in range(3):
        z = torch.randn(24, c, generator=g) * 3
        step(eager, z.clone().requires_grad_(True)).backward()
        fast(compiled, z.clone().requires_grad_(True)).backward()
        eager.end_epoch()
        compiled.end_epoch()
    assert int(eager.buffers()["suggest_votes"].abs().sum()) > 0
    for name, buf in eager.buffers().items():
        torch.testing.assert_close(compiled.buffers()[name], buf, msg=name)


def test_sizes_and_epochs_take_integers_of_numpy_and_refuse_the_rest():
    """CSLTracker(np.int64(10)) was refused as "not an int"; tracker.epoch = -3 went into
    the epoch stamps, 2.5 was truncated; set_timeout(True) set a 1-second wait."""
    import numpy as np

    from csl_fast import distributed

    t = CSLTracker(np.int64(10), 3)
    assert t.num_samples == 10 and type(t.num_samples) is int
    t.epoch = np.int64(2)
    assert t.epoch == 2 and int(t._epoch_t) == 2
    for bad in (-3, 2.5, True):
        with pytest.raises(ValueError, match="epoch must be an int >= 0"):
            t.epoch = bad
    assert t.epoch == 2
    with pytest.raises(ValueError, match="seconds must be > 0, got True"):
        distributed.set_timeout(True)


@pytest.mark.parametrize("history", [False, True])
def test_an_epoch_past_the_bound_save_applies_is_refused_when_set(history):
    """tracker.epoch = 2**31 + 5 was accepted: the C++ kernels stamped learned_epoch with
    it cast to int32 (negative: "never learned"), the reference raised an overflow, and
    only save() refused the state. The setter now refuses it, naming save()'s bound."""
    t = CSLTracker(2, 2, history=history)
    bound = 2**22 if history else 2**31
    for bad in (bound, 2**31 + 5):
        with pytest.raises(ValueError, match=rf"epoch must be .* below {bound} = 2\*\*"):
            t.epoch = bad
    assert t.epoch == 0 and int(t._epoch_t) == 0
    t.epoch = bound - 1  # the largest epoch save() keeps
    x, y = torch.tensor([[3.0, 0.0], [0.0, 3.0]]), torch.tensor([0, 1])
    csl_fast.accumulate(x, y, torch.arange(2), t)
    assert t.learned_epoch.tolist() == [bound - 1] * 2
    # end_epoch past it is refused before it appends a row or zeroes the epoch's sums
    t.watch(torch.randn(2, 3), torch.arange(2)).sum().backward()  # an input-gradient record
    before = copy.deepcopy(t.state_dict())
    with pytest.raises(ValueError, match=rf"below {bound}"):
        t.end_epoch()
    after = t.state_dict()
    for key in ("buffers", "histories"):
        for name, value in before[key].items():
            got = after[key][name]
            same = (
                torch.equal(value, got)
                if isinstance(value, torch.Tensor)
                else len(value) == len(got)
            )
            assert same, name


def _recording_paths():
    x, y = torch.tensor([[3.0, 0.0], [0.0, 3.0], [1.0, 2.0]]), torch.tensor([0, 1, 1])
    i = torch.tensor([0, 1, 0])
    st = csl_fast.ops.cross_entropy_fwd(x, y, None, -100, 0.0, 0, backend="reference")[1]

    def watch(t):
        x_in = t.watch(torch.randn(3, 2, requires_grad=True), i)
        (x_in.sum() * 2).backward()

    return {
        "record": lambda t: t.record(i, st),
        "update": lambda t: t.update(i, st),
        "record_sequences": lambda t: t.record_sequences(
            i[:2], st[:, :2, None].expand(-1, 2, 3).contiguous()
        ),
        "record_eval": lambda t: t.record_eval(i, st),
        "score_epoch": lambda t: csl_fast.score_epoch(torch.nn.Identity(), [(x, y, i)], t),
        "record_input_grad": lambda t: t.record_input_grad(i, torch.rand(3)),
        "watch": watch,
    }


_PATHS = ("record", "update", "record_sequences", "record_eval", "score_epoch")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", [*_PATHS, "record_input_grad", "watch"])
def test_every_buffer_a_recording_writes_has_its_version_bumped(backend, path):
    """The C++ ops write through data pointers: tracker.record/update/record_sequences,
    record_eval (score_epoch's eval buffers), record_input_grad and watch left the version
    counters of what they wrote unchanged (accumulate and record_loss bumped them), so a
    graph that had saved such a buffer silently back-propagated its new values."""
    t = CSLTracker(2, num_classes=2, backend=backend, history=True)
    before = {name: (b.clone(), b._version) for name, b in t.buffers().items()}
    _recording_paths()[path](t)
    written = [name for name, b in t.buffers().items() if not torch.equal(b, before[name][0])]
    assert written
    assert [name for name in written if t.buffers()[name]._version == before[name][1]] == []


def test_a_graph_that_saved_an_input_grad_sum_refuses_to_use_its_new_values():
    t = CSLTracker(2, num_classes=2)
    a = torch.ones(2, requires_grad=True)
    out = (a * t.input_grad_sq_sum).sum()  # saves the live buffer for backward
    t.record_input_grad(torch.arange(2), torch.tensor([4.0, 9.0]))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward()


def _with_threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("path", ["accumulate", "record_input_grad"])
def test_reference_sums_are_in_row_order_whatever_the_thread_count(path):
    """The reference backend (and the fallback without the extension) added a tracker's
    sums with index_put_(accumulate=True), which on the CPU adds float32 rows with atomics
    from 32,768 rows on: grad_norm_sum, p_true_sq_sum, the epoch and input-gradient sums
    differed bitwise between 1 and 2 threads (README: "On the CPU every update is
    sequential in row order")."""
    g = torch.Generator().manual_seed(0)
    rows = 40_000  # (one large batch, e.g. of an eval or scoring pass; ~20 rows a sample)
    x, y = torch.randn(rows, 3, generator=g), torch.randint(0, 3, (rows,), generator=g)
    i, sq = torch.randint(0, 2000, (rows,), generator=g), torch.rand(rows, generator=g)

    def run():
        t = CSLTracker(2000, num_classes=3, backend="reference", history=True)
        if path == "accumulate":
            csl_fast.accumulate(x, y, i, t, backend="reference")
        else:
            t.record_input_grad(i, sq)
        return t.buffers()

    one = _with_threads(1, run)
    for _ in range(3):  # (the atomics' order, and so their sums, varied from run to run)
        two = _with_threads(2, run)
        assert [name for name, buf in one.items() if not torch.equal(two[name], buf)] == []


def test_assigning_a_buffer_name_is_refused():
    # it bound a new attribute beside the buffer: reads went to it, while the recorders,
    # save() and state_dict() kept the buffer
    t = CSLTracker(4, 3)
    with pytest.raises(AttributeError, match=r"csl_sum is a live buffer.*\.zero_\(\)"):
        t.csl_sum = torch.zeros(4)
    with pytest.raises(AttributeError, match="load_state_dict"):
        t.csl_count = t.csl_count.double()
    assert t.csl_sum is t.buffers()["csl_sum"]
    t.num_classes = 3  # other attributes as before
    t.epoch = 1
    assert t.epoch == 1


def test_a_tracker_sent_to_another_process_is_a_copy_there():
    """torch.multiprocessing (spawn, forkserver) sent the buffers in shared memory: a
    worker's writes reached the parent's buffers but not its epoch (2 presentations at
    epoch 0), as with fork they reach nothing. Now it is a copy in both cases."""
    import pickle
    from multiprocessing.reduction import ForkingPickler

    import torch.multiprocessing  # (registers the shared-memory reductions)

    t = CSLTracker(4, 3)
    csl_fast.accumulate(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4), t)
    sent = pickle.loads(ForkingPickler.dumps(t))
    assert not any(b.is_shared() for b in sent.buffers().values())
    csl_fast.accumulate(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4), sent)
    sent.end_epoch()
    assert t.csl_count.tolist() == [1.0] * 4 and t.epoch == 0
    assert sent.csl_count.tolist() == [2.0] * 4 and sent.epoch == 1
    # a plain pickle round trip is unchanged
    back = pickle.loads(pickle.dumps(t))
    assert torch.equal(back.csl_sum, t.csl_sum) and back.epoch == t.epoch


@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
def test_an_index_past_the_tracker_names_num_samples(backend):
    """A tracker sized to a Subset (CSLCallback(num_samples=len(subset))): the C++ path's
    first check is the tracker's, which named only record_last, an op the user never
    called."""
    t = CSLTracker(5, 3, backend=backend)
    with pytest.raises(IndexError, match=r"index\[1\] = 7 is outside \[0, N = 5\).*Indexed"):
        csl_fast.accumulate(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0, 7]), t)
    assert t.csl_count.sum() == 0


@pytest.mark.parametrize("backend", csl_fast.available_backends("cpu"))
def test_statistics_that_require_grad_leave_the_buffers_out_of_autograd(backend):
    """Norms from autograd.grad(create_graph=True) or statistics of live logits pulled the
    buffers written with PyTorch ops (history sums, token sums, the non-C++ input-gradient
    path) into autograd: each step's graph stayed alive in the tracker."""
    from csl_fast import reference

    t = CSLTracker(6, 3, backend=backend, history=True)
    logits = torch.randn(4, 3, requires_grad=True)
    target, idx = torch.tensor([0, 1, 2, 0]), torch.tensor([0, 2, 4, 5])
    stats = reference.row_statistics(logits * 2, target, -100)
    assert stats.requires_grad
    t.update(idx, stats)
    t.record_eval(idx, stats)
    t.record_input_grad(idx, (logits**2).sum(1))
    t.record_sequences(idx, stats[:, :, None].expand(-1, -1, 2))
    t.end_epoch()
    t.end_eval_pass()
    for name, buf in t.buffers().items():
        assert not buf.requires_grad, name
    for name in ("loss_history", "eval_loss_history", "input_grad_history"):
        assert not getattr(t, name).requires_grad, name


def test_numpy_integer_sizes_are_taken():
    # num_samples took them already; num_classes = labels.max() + 1 in NumPy was refused
    t = CSLTracker(np.int64(4), np.int64(3), num_labels=np.int32(5))
    assert (t.num_samples, t.num_classes, t.num_labels) == (4, 3, 5)
    assert type(t.num_classes) is int and type(t.num_labels) is int


@pytest.mark.parametrize("dtype", [torch.uint8, torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_indices_are_taken_by_update_and_record_eval(dtype):
    # the tracker's CPU range check compared them, which PyTorch does not implement for
    # uint16/32/64: NotImplementedError where the int64 conversion had worked
    from csl_fast.stats import NUM_STATS, Stat

    t = CSLTracker(5, 3)
    stats = torch.zeros(NUM_STATS, 2)
    stats[Stat.VALID] = 1.0
    t.update(torch.tensor([0, 4]).to(dtype), stats)
    t.record_eval(torch.tensor([1, 4]).to(dtype), stats)
    assert t.csl_count.tolist() == [1, 0, 0, 0, 1] and t.eval_count.tolist() == [0, 1, 0, 0, 1]


def test_a_tracker_made_or_loaded_under_inference_mode_trains_outside_it(tmp_path):
    """Tensors made under inference_mode are inference tensors, which PyTorch lets be
    updated in place only inside it: a tracker made there (an eval script that later
    fine-tunes) failed at end_epoch with PyTorch's bare error, and a tracker loaded there
    at its next step."""
    g = torch.Generator().manual_seed(3)
    n, c = 6, 3
    steps = [
        (torch.randn(4, c, generator=g), torch.randint(0, c, (4,), generator=g)) for _ in range(3)
    ]
    idx = torch.tensor([0, 2, 5, 2])
    want = CSLTracker(n, c, history=True)
    for z, y in steps:
        csl_fast.accumulate(z, y, idx, want)
        want.end_epoch()
    path = str(tmp_path / "t.csl")
    with torch.inference_mode():
        got = CSLTracker(n, c, history=True)
        csl_fast.accumulate(*steps[0], idx, got)
        got.end_epoch()
        got.save(path)
        loaded = CSLTracker.from_file(path)
        again = CSLTracker(n, c, history=True)
        again.load(path)
    for tracker in (got, loaded, again):
        assert not any(b.is_inference() for b in tracker.buffers().values())
        for z, y in steps[1:]:
            csl_fast.accumulate(z.clone().requires_grad_(True), y, idx, tracker).backward()
            tracker.end_epoch()
        for name, buf in want.buffers().items():
            torch.testing.assert_close(tracker.buffers()[name], buf, msg=name)
        torch.testing.assert_close(tracker.loss_history, want.loss_history, equal_nan=True)


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_tracker_copied_under_inference_mode_is_used_inside_and_outside_it(how):
    # the copies held inference tensors, which the tracker's methods (run with inference
    # mode off since a6c2714) could not write: PyTorch's bare "Inplace update to inference
    # tensor outside InferenceMode"
    import copy
    import pickle

    base = CSLTracker(4, 3, history=True)
    csl_fast.accumulate(torch.randn(3, 3), torch.tensor([0, 1, 2]), torch.tensor([0, 1, 2]), base)
    base.end_epoch()
    blob = pickle.dumps(base)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4))]
    with torch.inference_mode():
        t = pickle.loads(blob) if how == "pickle" else copy.deepcopy(base)
        csl_fast.score_epoch(torch.nn.Linear(3, 3), batches, t)
        t.end_epoch()
    csl_fast.accumulate(torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0, 3]), t)
    t.end_epoch()
    assert (t.epoch, t.eval_passes) == (3, 1) and t.csl_count.tolist() == [2.0, 1.0, 1.0, 1.0]


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_hand_made_stats_record_only_their_valid_finite_columns(backend):
    """update/record/record_eval of stats made by hand: a VALID = 0 column with values
    reached the sums (csl_sum 5 at a count of 0, a state no load accepts) and a column of
    NaN statistics or a valid one with an infinite loss poisoned them for good."""
    good = csl_fast.reference.row_statistics(
        torch.tensor([[2.0, 0.0, 0.0]]), torch.tensor([0]), -100
    )
    stats = torch.zeros(NUM_STATS, 4)
    stats[:, 0] = torch.tensor([5.0, 0.2, 1.5, 0.0, 0.3, 0.0, 1.0])  # VALID = 0, values
    stats[:, 1] = torch.tensor([float("nan")] * 5 + [0.0, 2.0])  # VALID = 0, NaN
    stats[:, 2] = good[:, 0]
    stats[Stat.LOSS, 2] = float("inf")  # VALID = 1, loss not finite
    stats[:, 3] = good[:, 0]
    index = torch.arange(4)
    want = CSLTracker(4, num_classes=3, backend=backend)
    want.update(index[3:], good)
    want.record_eval(index[3:], good)
    for record in ("update", "record"):
        t = CSLTracker(4, num_classes=3, backend=backend)
        getattr(t, record)(index, stats)
        t.record_eval(index, stats)
        for name, value in want.buffers().items():
            if record == "record" and name in ("csl_sum", "csl_count", "epoch_loss_sum"):
                continue  # (record leaves these to the fused op)
            torch.testing.assert_close(t.buffers()[name], value, rtol=0, atol=0, msg=name)
        if record == "update":  # (record alone counts nothing: no load takes its sums)
            CSLTracker(4, num_classes=3).load_state_dict(t.state_dict())
