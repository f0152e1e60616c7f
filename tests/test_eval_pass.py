"""csl_fast.score_epoch: eval-pass CSL with the same kernel, kept apart, mode restored."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)
    import csl_fast
from csl_fast import CSLTracker

BACKENDS = csl_fast.available_backends("cpu")


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))


def _batches(n=9, b=4, passes=1):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(n, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    out = []
    for _ in range(passes):
        perm = torch.randperm(n, generator=g)
        out += [(x[p], y[p], p) for p in perm.split(b)]
    return x, y, out


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_pass_matches_plain_pytorch(backend):
    model = _model()
    model.train()
    x, y, batches = _batches(n=5 if backend == "triton" else 9, passes=2)
    t = CSLTracker(len(x), 3, history=True, backend=backend)
    csl_fast.score_epoch(model, batches, t)
    assert model.training
    model.eval()
    with torch.no_grad():
        logits = model(x).double()
    loss = F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(t.eval_csl_sum.double(), 2 * loss, rtol=1e-5, atol=1e-6)
    assert t.eval_count.tolist() == [2.0] * len(x)
    torch.testing.assert_close(t.eval_last_loss.double(), loss, rtol=1e-5, atol=1e-6)
    p = logits.softmax(1)
    torch.testing.assert_close(t.eval_last_max_prob.double(), p.max(1).values, rtol=1e-5, atol=1e-6)
    assert torch.equal(t.eval_last_correct, logits.argmax(1) == y)
    # in-training buffers untouched
    assert t.csl_sum.abs().sum() == 0 and t.csl_count.sum() == 0
    assert t.eval_passes == 1
    torch.testing.assert_close(t.eval_loss_history[0].double(), loss, rtol=2e-3, atol=1e-3)
    torch.testing.assert_close(t.eval_csl_mean.double(), loss, rtol=1e-5, atol=1e-6)


def test_restores_eval_mode_and_survives_errors():
    model = _model().eval()
    _, _, batches = _batches()
    t = CSLTracker(9, 3)
    pytest.importorskip("tqdm")  # progress=True
    csl_fast.score_epoch(model, batches, t, progress=True)
    assert not model.training
    model.train()

    def bad(batch):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        csl_fast.score_epoch(model, batches, t, unpack=bad)
    assert model.training
    assert t.eval_passes == 1


def test_dict_batches_forward_and_ignore_index():
    model = _model()
    x, y, batches = _batches()
    y = y.clone()
    y[0] = -100
    dicts = [{"input": {"features": xb}, "target": y[i], "index": i} for xb, _, i in batches]
    t = CSLTracker(9, 3)
    csl_fast.score_epoch(model, dicts, t, forward=lambda m, inp: m(inp["features"]))
    assert t.eval_count[0] == 0 and t.eval_count[1:].eq(1).all()
    with pytest.raises(KeyError, match="unpack"):
        csl_fast.score_epoch(model, [{"x": x}], t)
    with pytest.raises(ValueError, match="logits"):
        csl_fast.score_epoch(model, batches, t, forward=lambda m, inp: m(inp)[None])


def test_a_tracker_takes_logits_of_its_own_class_count():
    """A model of 3 outputs scored into a tracker made for 2 classes is refused, naming
    both counts, before the pass records anything."""
    _, _, batches = _batches()
    t = CSLTracker(9, 2)
    with pytest.raises(ValueError, match=r"score_epoch: the logits have C = 3 classes .* "
                       r"num_classes=2"):  # fmt: skip
        csl_fast.score_epoch(_model(), batches, t)
    assert t.eval_count.sum() == 0


def test_list_targets_and_indices_are_taken():
    # a collate_fn that returns Python lists raised AttributeError: 'list' has no 'to'
    model = torch.nn.Linear(4, 3)
    x, y = torch.randn(5, 4), [0, 2, 1, 1, 0]
    tracker = CSLTracker(8, 3)
    csl_fast.score_epoch(model, [(x, y, [7, 1, 2, 3, 4])], tracker)
    assert tracker.eval_count.tolist() == [0, 1, 1, 1, 1, 0, 0, 1]
    want = F.cross_entropy(model(x), torch.tensor(y), reduction="none").detach()
    torch.testing.assert_close(tracker.eval_csl_sum[[7, 1, 2, 3, 4]], want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_targets_as_in_training(backend):
    """uint8 class indices, which training takes, were refused on the CPU backend as
    "class probabilities"; float targets were truncated on the reference (1.7 -> 1)."""
    model = _model()
    x, y, _ = _batches(n=4)
    want = CSLTracker(4, 3, backend=backend)
    csl_fast.score_epoch(model, [(x, y, torch.arange(4))], want)
    got = CSLTracker(4, 3, backend=backend)
    csl_fast.score_epoch(model, [(x, y.to(torch.uint8), torch.arange(4))], got)
    assert torch.equal(got.eval_csl_sum, want.eval_csl_sum)
    bad = CSLTracker(4, 3, backend=backend)
    with pytest.raises(TypeError, match="targets must be class indices"):
        csl_fast.score_epoch(model, [(x, y.float() + 0.7, torch.arange(4))], bad)
    assert bad.eval_passes == 0 and not bad.eval_count.any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_index_out_of_range_writes_nothing(backend):
    """The reference and Triton backends skipped the bad row and recorded the others, and
    the pass was closed; the C++ backend refused it. Now every backend refuses it."""
    model = _model()
    x, y, _ = _batches(n=4)
    t = CSLTracker(4, 3, backend=backend)
    for index in (torch.tensor([0, 1, 2, 4]), torch.tensor([0, -1, 2, 3])):
        with pytest.raises(IndexError, match="outside"):
            csl_fast.score_epoch(model, [(x, y, index)], t)
    # unsigned indices (taken elsewhere): a raw NotImplementedError ("lt_cpu" not
    # implemented for 'UInt64'), in range too with validate=True
    for dtype in (torch.uint16, torch.uint32, torch.uint64):
        with pytest.raises(IndexError, match=r"index\[3\] = 4 is outside"):
            csl_fast.score_epoch(model, [(x, y, torch.tensor([0, 1, 2, 4]).to(dtype))], t)
    assert t.eval_passes == 0 and not t.eval_count.any()
    index = torch.arange(4).to(torch.uint64)
    csl_fast.score_epoch(model, [(x, y, index)], t, validate=True)
    assert t.eval_passes == 1 and t.eval_count.eq(1).all()
    # a float or bool index met the range check first: torch.iinfo's own TypeError
    for index in (torch.arange(4.0), torch.ones(4, dtype=torch.bool), torch.arange(4.0) + 0j):
        with pytest.raises(TypeError, match="index must hold integer dataset indices"):
            csl_fast.score_epoch(model, [(x, y, index)], t, validate=True)
    # int32 targets with an ignore_index past int32: the check compared in int32, 2**32 + 1
    # read as 1, and let target 1's rows through to the kernel ("csl_fast: target[1]...")
    bad = torch.tensor([0, 1, 2, 0], dtype=torch.int32) * 2
    with pytest.raises(IndexError, match=r"csl_fast.score_epoch: target\[2\] = 4 is outside"):
        csl_fast.score_epoch(model, [(x, bad, torch.arange(4))], t, ignore_index=2**32 + 4)
    assert t.eval_passes == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_target_out_of_range_writes_nothing(backend):
    """On the Triton backend a target of C made its row NaN: the row was skipped and the
    pass counted, without a word, where the C++ kernel and accumulate raise."""
    model = _model()
    x, y, _ = _batches(n=4)
    t = CSLTracker(4, 3, backend=backend)
    for bad in (3, -1):
        target = y.clone()
        target[2] = bad
        with pytest.raises(IndexError, match=rf"target\[2\] = {bad} is outside"):
            csl_fast.score_epoch(model, [(x, target, torch.arange(4))], t)
    assert t.eval_passes == 0 and not t.eval_count.any()
    # ignore_index is not a bad target
    target = y.clone()
    target[2] = -100
    csl_fast.score_epoch(model, [(x, target, torch.arange(4))], t)
    assert t.eval_count.tolist() == [1, 1, 0, 1]


def test_a_frozen_submodule_stays_in_eval_mode():
    """A backbone frozen with .eval() came back in train mode (model.train(True) sets every
    submodule), so its BatchNorm updated its running statistics from the next step on."""
    model = torch.nn.Sequential(
        torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8)), torch.nn.Linear(8, 3)
    )
    model.train()
    model[0].eval()
    modes = [m.training for m in model.modules()]
    _, _, batches = _batches()
    csl_fast.score_epoch(model, batches, CSLTracker(9, 3))
    assert [m.training for m in model.modules()] == modes
    running = model[0][1].running_mean.clone()
    model(torch.randn(4, 5))
    assert torch.equal(model[0][1].running_mean, running)


@pytest.mark.parametrize("history", [False, True])
def test_an_interrupted_pass_leaves_the_eval_buffers_as_they_were(history):
    """A pass stopped part way kept its first batches, so running it again counted them
    twice; the eval buffers are now as before the pass, and the retry counts each once."""
    model = _model()
    _, _, batches = _batches(n=9, b=3)
    tracker = CSLTracker(9, 3, history=history)
    csl_fast.score_epoch(model, batches, tracker)
    before = {k: v.clone() for k, v in tracker.state_dict()["buffers"].items()}

    def flaky():
        yield from batches[:2]
        raise RuntimeError("loader failed")

    with pytest.raises(RuntimeError, match="loader failed"):
        csl_fast.score_epoch(model, flaky(), tracker)
    after = tracker.state_dict()["buffers"]
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert tracker.eval_passes == 1
    csl_fast.score_epoch(model, batches, tracker)
    assert tracker.eval_count.tolist() == [2.0] * 9


def test_an_empty_loader_is_not_counted_as_a_pass():
    """Counted, it made final_loss and in_confidence NaN for every sample (read from the
    eval buffers once a pass exists), without a word."""
    model = _model()
    x, y, _ = _batches()
    tracker = CSLTracker(9, 3)
    csl_fast.accumulate(model(x), y, torch.arange(9), tracker)
    before = csl_fast.scores(tracker)
    with pytest.warns(RuntimeWarning, match="yielded no batch"):
        csl_fast.score_epoch(model, [], tracker)
    assert tracker.eval_passes == 0
    after = csl_fast.scores(tracker)
    assert after.keys() == before.keys()
    for name in ("final_loss", "in_confidence"):
        torch.testing.assert_close(after[name], before[name])


@pytest.mark.parametrize(
    "batch",
    [
        lambda x, y: (x, torch.full_like(y, -100), torch.arange(9)),  # every target ignored
        lambda x, y: (x[:0], y[:0], torch.arange(0)),  # empty batches
    ],
    ids=["all ignored", "empty"],
)
def test_a_pass_that_scored_no_row_is_not_counted(batch):
    """Batches, but no row scored: counted, the pass made final_loss and in_confidence NaN
    for every sample, as an empty loader did before it was refused."""
    model = _model()
    x, y, _ = _batches()
    tracker = CSLTracker(9, 3)
    csl_fast.accumulate(model(x), y, torch.arange(9), tracker)
    before = csl_fast.scores(tracker, ["final_loss", "in_confidence"])
    with pytest.warns(RuntimeWarning, match="no row of its batches was scored"):
        csl_fast.score_epoch(model, [batch(x, y)], tracker)
    assert tracker.eval_passes == 0
    after = csl_fast.scores(tracker, ["final_loss", "in_confidence"])
    for name, value in before.items():
        torch.testing.assert_close(after[name], value)


def test_a_namedtuple_input_reaches_the_model_as_one():
    """default_collate keeps a namedtuple of inputs; rebuilt from a generator it raised
    TypeError before the model ran."""
    import collections

    pair = collections.namedtuple("Pair", ["image", "extra"])

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(5, 3)

        def forward(self, inp):
            return self.fc(inp.image + inp.extra)

    x, y, batches = _batches()
    tracker = CSLTracker(9, 3)
    loader = [(pair(x[i], -x[i] * 0.5), y[i], i) for _, _, i in batches]
    csl_fast.score_epoch(Net(), loader, tracker)
    assert tracker.eval_passes == 1 and tracker.eval_count.tolist() == [1.0] * 9


def test_a_mapping_input_keeps_its_type():
    """A transformers BatchEncoding (a UserDict read by attribute) reached the model as a
    plain dict: AttributeError 'dict' object has no attribute 'input_ids'."""
    import collections

    class Encoding(collections.UserDict):
        def __getattr__(self, key):
            try:
                return self.data[key]
            except KeyError:
                raise AttributeError(key) from None

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(5, 3)

        def forward(self, enc):
            return self.fc(enc.input_ids)

    x, y, batches = _batches()
    tracker = CSLTracker(9, 3)
    loader = [(Encoding(input_ids=x[i]), y[i], i) for _, _, i in batches]
    csl_fast.score_epoch(Net(), loader, tracker)
    assert tracker.eval_passes == 1 and tracker.eval_count.tolist() == [1.0] * 9


def test_a_sequence_models_token_logits_get_their_own_message():
    class Tokens(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 4, 3)

    _, _, batches = _batches()
    with pytest.raises(ValueError, match=r"not the tokens of a sequence model.*record_loss"):
        csl_fast.score_epoch(Tokens(), batches, CSLTracker(9, 3))


@pytest.mark.parametrize("output", ["dict", "tuple"])
def test_a_model_that_returns_no_tensor_is_told_to_pass_forward(output):
    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(5, 3)

        def forward(self, x):
            z = self.linear(x)
            return {"logits": z} if output == "dict" else (z, None)

    _, _, batches = _batches()
    with pytest.raises(TypeError, match=f"returned a {output}.*pass forward="):
        csl_fast.score_epoch(Wrapped(), batches, CSLTracker(9, 3))


def test_int16_targets_are_refused_by_score_epoch_itself():
    # they passed its check and the kernel blamed class-probability targets
    t = csl_fast.CSLTracker(4, 3)
    batch = (torch.randn(4, 2), torch.tensor([0, 1, 2, 0], dtype=torch.int16), torch.arange(4))
    with pytest.raises(
        TypeError, match=r"int64, int32 or uint8, as in training\), got torch.int16"
    ):
        csl_fast.score_epoch(torch.nn.Linear(2, 3), [batch], t)


def test_a_plain_function_as_the_model_is_refused_with_a_fix():
    t = csl_fast.CSLTracker(4, 3)
    batch = (torch.randn(4, 2), torch.tensor([0, 1, 2, 0]), torch.arange(4))
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module .* got function"):
        csl_fast.score_epoch(lambda x: torch.zeros(len(x), 3), [batch], t)


class _Cast(torch.nn.Module):
    def __init__(self, dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x):
        return x.to(self.dtype)


@pytest.mark.parametrize(
    ("kwargs", "model", "error", "match"),
    [
        # "'NoneType' object has no attribute 'history'"
        ({"tracker": None}, None, TypeError, "tracker must be a csl_fast.CSLTracker"),
        ({"tracker": torch.zeros(4)}, None, TypeError, "tracker must be a csl_fast.CSLTracker"),
        # a comparison error; PyTorch's schema message for 1.5
        ({"ignore_index": None}, None, TypeError, "ignore_index must be an int, got NoneType"),
        ({"ignore_index": 1.5}, None, TypeError, "ignore_index must be an int, got float"),
        ({"validate": "no"}, None, TypeError, "validate must be True, False or None"),  # (True)
        # the kernel's "not implemented for 'Long'"
        ({}, _Cast(torch.int64), TypeError, "returned torch.int64 logits; expected float32"),
        ({}, _Cast(torch.bool), TypeError, "returned torch.bool logits"),
    ],
)
def test_arguments_are_checked_as_accumulate_checks_them(kwargs, model, error, match):
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4))
    args = {"tracker": CSLTracker(4, 3), **kwargs}
    with pytest.raises(error, match=match):
        csl_fast.score_epoch(model or torch.nn.Identity(), [batch], args.pop("tracker"), **args)


@pytest.mark.parametrize(
    ("loader", "kwargs", "error", "match"),
    [
        # torch's "Expected one of cpu, cuda, ..." / "Torch not compiled with CUDA enabled"
        ("batches", {"device": "bogus"}, ValueError, r"cannot allocate on device 'bogus'"),
        ("batches", {"device": object()}, ValueError, r"cannot allocate on device <object"),
        # "'NoneType' object is not iterable"
        (None, {}, TypeError, r"loader must be an iterable of \(x, y, index\) batches"),
        (3, {}, TypeError, r"loader must be an iterable .* got int"),
    ],
)
def test_device_and_loader_are_checked_by_name(loader, kwargs, error, match):
    batch = (torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4))
    tracker = CSLTracker(4, 3)
    with pytest.raises(error, match=r"^csl_fast\.score_epoch: " + match):
        csl_fast.score_epoch(
            torch.nn.Identity(), [batch] if loader == "batches" else loader, tracker, **kwargs
        )
    assert tracker.eval_passes == 0


@pytest.mark.parametrize("validate", [None, False])
def test_out_of_range_values_are_said_of_score_epoch(validate):
    # the default path showed the kernel's "csl_fast: target[2] ..." and the tracker's
    # "csl_fast.CSLTracker: index[2] ...", a method the user never called
    tracker = csl_fast.CSLTracker(4, num_classes=3)
    logits = torch.randn(4, 3)
    for y, index, what in (
        (torch.tensor([0, 1, 5, 0]), torch.arange(4), r"target\[2\] = 5"),
        (torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 9, 2]), r"index\[2\] = 9"),
    ):
        with pytest.raises(IndexError, match=rf"^csl_fast.score_epoch: {what}"):
            csl_fast.score_epoch(
                torch.nn.Identity(), [(logits, y, index)], tracker, validate=validate
            )
        assert not tracker.eval_count.any()


def test_loaders_that_record_what_was_not_meant_are_warned_of():
    """The training loader reused (drop_last=True: each pass left samples out, and the
    summed eval_csl grew with how often each was scored), and a validation set's
    IndexedDataset (its indices 0..M-1 named training samples) recorded without a word.
    A Subset of the tracked set keeps its indices: no warning."""
    from torch.utils.data import ConcatDataset, DataLoader, Subset, TensorDataset

    from csl_fast.data import IndexedDataset

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 5, generator=g), torch.randint(0, 3, (10,), generator=g)
    train = IndexedDataset(TensorDataset(x, y))
    tracker = CSLTracker(10, 3)
    with pytest.warns(RuntimeWarning, match=r"drop_last=True\): 2 of the 10 samples its"):
        csl_fast.score_epoch(_model(), DataLoader(train, batch_size=4, drop_last=True), tracker)
    # what the sampler yields, not the data set: 8 of 10 here, 2 dropped
    sampled = DataLoader(train, batch_size=3, sampler=range(8), drop_last=True)
    with pytest.warns(RuntimeWarning, match=r"2 of the 8 samples its sampler yields"):
        csl_fast.score_epoch(_model(), sampled, tracker)
    val = IndexedDataset(TensorDataset(x[:6], y[:6]))
    with pytest.warns(RuntimeWarning, match=r"holds an IndexedDataset of 6 samples .* tracks 10"):
        csl_fast.score_epoch(_model(), DataLoader(val, batch_size=4), tracker)
    both = ConcatDataset([Subset(train, range(4)), val])  # val's 0..5 named samples 0..5 again
    with pytest.warns(RuntimeWarning, match=r"holds 2 IndexedDatasets, whose indices all start"):
        csl_fast.score_epoch(_model(), DataLoader(both, batch_size=4), tracker)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        part = Subset(train, range(0, 10, 2))
        csl_fast.score_epoch(_model(), DataLoader(part, batch_size=5, drop_last=True), tracker)
        csl_fast.score_epoch(_model(), DataLoader(train, batch_size=4), tracker)


def test_a_multi_label_tracker_is_refused_before_anything_is_recorded():
    # class indices (the multi-hot rows' argmax) were scored as softmax cross entropy, and
    # the tracker adopted num_classes and softmax scores of a sigmoid model
    tracker = CSLTracker(4, num_labels=3)
    batches = [(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.arange(4))]
    with pytest.raises(ValueError, match=r"records 3 labels per sample .* accumulate_bce"):
        csl_fast.score_epoch(torch.nn.Identity(), batches, tracker)
    assert tracker.num_classes is None and tracker.eval_passes == 0


def test_scores_warn_of_samples_the_passes_after_training_left_out():
    """Scored all, trained, then scored half: the other half kept the untrained model's
    final_loss, silently (the tracker-wide rule takes the eval values while no training
    came after the last pass). A held-out loader scored after the training one, with no
    training between, leaves nothing behind: no warning (it warned every epoch)."""
    t = CSLTracker(8, 3)
    idx = torch.arange(8)
    y = idx % 3
    model = torch.nn.Linear(3, 3)
    x = torch.randn(8, 3)

    def quiet_scores():
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return csl_fast.scores(t, ["final_loss", "in_confidence"])

    csl_fast.score_epoch(model, [(x, y, idx)], t)
    csl_fast.score_epoch(model, [(x[:4], y[:4], idx[:4])], t)  # no training since
    quiet_scores()
    csl_fast.accumulate(model(x), y, idx, t)
    csl_fast.score_epoch(model, [(x[:4], y[:4], idx[:4])], t)
    with pytest.warns(RuntimeWarning, match="4 samples scored by an eval pass before training"):
        csl_fast.scores(t, ["final_loss"])
    for _ in range(2):  # two loaders over disjoint samples after each epoch
        csl_fast.accumulate(model(x[:6]), y[:6], idx[:6], t)
        csl_fast.score_epoch(model, [(x[:6], y[:6], idx[:6])], t)
        csl_fast.score_epoch(model, [(x[6:], y[6:], idx[6:])], t)
        quiet_scores()


def test_a_loader_that_only_indexes_is_taken_as_iter_takes_it():
    # (__getitem__ and __len__ without __iter__: refused as "not iterable", which it is)
    class Batches:
        def __init__(self, batches):
            self.batches = batches

        def __len__(self):
            return len(self.batches)

        def __getitem__(self, i):
            return self.batches[i]

    t = CSLTracker(4, 3)
    idx = torch.arange(4)
    csl_fast.score_epoch(torch.nn.Identity(), Batches([(torch.randn(4, 3), idx % 3, idx)]), t)
    assert t.eval_passes == 1 and bool((t.eval_count == 1).all())
