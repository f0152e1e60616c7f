"""csl_fast.train: seeded, tracked training loop over tensors."""

import math
import sys

import numpy as np
import pytest
import torch

import csl_fast
from csl_fast.train import mlp, predict, train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _data(n=50):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_deterministic_and_tracked():
    x, y = _data()
    runs = []
    for _ in range(2):
        model = mlp(4, 3, (8,), seed=1)
        t = csl_fast.CSLTracker(50, 3)
        res = train(
            model,
            x,
            y,
            epochs=3,
            batch_size=16,
            tracker=t,
            input_grads=True,
            eval_each_epoch=True,
            seed=2,
        )
        runs.append((model[1].weight.detach().clone(), t.csl.clone()))
        assert len(res.epoch_loss) == 3 and res.train_time > 0
        assert torch.equal(t.csl_count, torch.full((50,), 3.0))
        assert torch.equal(t.eval_count, torch.full((50,), 3.0))
        assert t.epoch == 3 and t.input_grad_history.shape == (3, 50)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_fits_and_predict_and_callback():
    x, y = _data(30)
    model = mlp(4, 3, (32,), seed=0)
    seen = []
    train(model, x, y, epochs=150, lr=0.1, batch_size=30, callback=lambda e, m: seen.append(e))
    assert seen == list(range(150))
    assert bool((predict(model, x).argmax(1) == y).all())  # memorizes 30 random labels


def test_errors():
    x, y = _data()
    with pytest.raises(ValueError):
        train(mlp(4, 3), x, y[:3], epochs=1)
    with pytest.raises(ValueError):
        train(mlp(4, 3), x, y, epochs=1, input_grads=True)
    with pytest.raises(ValueError):
        train(mlp(4, 3), x, y, epochs=1, optimizer="lbfgs")
    # batch_size=-5 trained on nothing and returned losses of 0; 0 met range()'s error
    for kwargs in ({"batch_size": -5}, {"batch_size": 0}, {"epochs": -1}):
        with pytest.raises(ValueError, match=r"must be an int >= "):
            train(mlp(4, 3), x, y, **{"epochs": 1, **kwargs})
    with pytest.raises(TypeError, match=r"tracker must be a csl_fast\.CSLTracker, got Tensor"):
        train(mlp(4, 3), x, y, epochs=1, tracker=torch.zeros(len(y)))
    with pytest.raises(TypeError, match=r"x must be a torch\.Tensor, got list"):
        train(mlp(4, 3), x.tolist(), y, epochs=1)
    # a negative or NaN std trained without noise, silently
    for noise in (-0.1, math.nan, math.inf, "0.1", True):
        with pytest.raises(ValueError, match=r"input_noise must be a finite std >= 0"):
            train(mlp(4, 3), x, y, epochs=1, input_noise=noise)
    # range() took a negative batch size as no batches: [0, 0] logits for 50 rows
    for bs in (-1, 0):
        with pytest.raises(ValueError, match=r"predict: batch_size must be an int >= 1"):
            predict(mlp(4, 3), x, batch_size=bs)


def test_input_noise_of_any_real_number_type_trains():
    x, y = _data()
    want = train(mlp(4, 3, seed=0), x, y, epochs=1, input_noise=0.05).epoch_loss
    for noise in (np.float32(0.05), torch.tensor(0.05, dtype=torch.float64)):
        got = train(mlp(4, 3, seed=0), x, y, epochs=1, input_noise=noise).epoch_loss
        assert got == pytest.approx(want, rel=1e-5)  # (float32 0.05 is 0.05 + 7e-10)


def test_a_raising_step_leaves_the_model_in_eval_mode():
    x, y = _data()
    model = mlp(4, 3).eval()

    def fail(epoch, m):
        raise RuntimeError("callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        train(model, x, y, epochs=1, callback=fail)
    assert not any(m.training for m in model.modules())


def test_dropout_is_reproduced_by_the_seed():
    """Dropout drew from the unseeded global generator: two runs of the same seed differed
    (and so did every baseline retrained on a dropout model)."""
    x, y = _data()
    runs = []
    for _ in range(2):
        model = mlp(4, 3, dropout=0.5, seed=1)
        train(model, x, y, epochs=3, seed=0)
        runs.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(runs[0], runs[1])


def test_mlp_seed_leaves_the_global_generator_alone():
    """The layers drew their first weights from the global generator before the fork."""
    torch.manual_seed(5)
    want = torch.rand(3)
    torch.manual_seed(5)
    mlp(4, 3, seed=1)
    assert torch.equal(torch.rand(3), want)
    torch.manual_seed(5)  # nor does a training run draw from it
    train(mlp(4, 3, seed=0), *_data(), epochs=1)
    assert torch.equal(torch.rand(3), want)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8])
def test_narrow_integer_labels_train_with_and_without_a_tracker(dtype):
    """int32 labels trained with a tracker (accumulate widens them) and failed without one,
    in F.cross_entropy's words; both runs train the same model on the same labels."""
    x, y = _data()
    losses = []
    for tracker in (None, csl_fast.CSLTracker(len(y), 3)):
        model = mlp(4, 3, (8,), seed=0)
        losses.append(train(model, x, y.to(dtype), epochs=2, tracker=tracker).epoch_loss)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_uint64_labels_past_int64_are_refused_not_wrapped():
    # .long() wrapped 2**64 - 100 to -100, the ignore_index: those rows went untrained
    x, y = _data()
    wide = y.numpy().astype(np.uint64)
    wide[0] = 2**64 - 100
    y = torch.from_numpy(wide)
    with pytest.raises(ValueError, match=r"labels past int64's range"):
        train(mlp(4, 3, (8,), seed=0), x, y, epochs=1)


def test_seeds_leave_the_gpu_generators_alone(monkeypatch):
    """torch.manual_seed inside fork_rng(devices=[]) reseeded every GPU's generator for
    good: a user's CUDA random stream was reset to mlp's or train's seed. Seen here through
    the call that does it, which needs no GPU."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", calls.append)
    train(mlp(4, 3, seed=1), *_data(), epochs=1, seed=2)
    assert calls == []


def test_a_model_narrower_than_the_labels_is_named():
    x, y = _data()
    with pytest.raises(ValueError, match=r"logits of shape \(\d+, 2\).*C >= 3"):
        train(mlp(4, 2), x, y, epochs=1)


@pytest.mark.parametrize("tracked", [False, True])
def test_epoch_loss_is_the_mean_over_labelled_rows(tracked):
    # weighted by every row, ignore_index ones included: 1.0785 for 1.0815, and NaN for
    # the whole epoch when one batch held no label
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 5, generator=g), torch.arange(64) % 3
    y[40:] = -100
    model = mlp(5, 3, (8,), seed=1)
    want = torch.nn.functional.cross_entropy(model(x), y).item()
    tracker = csl_fast.CSLTracker(64, 3) if tracked else None
    got = train(model, x, y, epochs=1, lr=0.0, momentum=0.0, batch_size=16, tracker=tracker)
    assert got.epoch_loss[0] == pytest.approx(want, rel=1e-6)
    y[3:] = -100  # batches without a label
    got = train(model, x, y, epochs=1, lr=0.0, momentum=0.0, batch_size=16)
    want = torch.nn.functional.cross_entropy(model(x), y).item()
    assert got.epoch_loss[0] == pytest.approx(want, rel=1e-6)
    y[:] = -100
    assert math.isnan(train(model, x, y, epochs=1, batch_size=16).epoch_loss[0])


def test_input_grads_are_each_labelled_samples_own_with_ignored_rows():
    # train() watched at the default scale B, without valid: with -100 labels every
    # labelled row's squared norm came out (B / labelled)**2 times too large
    # and each ignored row got a record of 0 (loss_sensitivity 0 instead of NaN)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 3, generator=g), torch.arange(12) % 3
    y[::2] = -100
    y[8:] = -100  # 4 labelled rows of 12
    model = mlp(3, 3, (6,), seed=0)
    tracker = csl_fast.CSLTracker(12, 3)
    train(
        model, x, y, epochs=1, lr=0.0, momentum=0.0, batch_size=4, tracker=tracker, input_grads=True
    )
    xx = x.clone().requires_grad_()
    losses = torch.nn.functional.cross_entropy(model(xx), y, reduction="none")
    want = torch.stack(
        [
            torch.autograd.grad(losses[i], xx, retain_graph=True)[0][i].square().sum()
            for i in range(12)
        ]
    )
    labelled = y != -100
    assert torch.allclose(tracker.input_grad_sq_sum[labelled], want[labelled], rtol=1e-5)
    assert torch.equal(tracker.input_grad_count, labelled.float())
    assert not bool(tracker.input_grad_sq_sum.isnan().any())
    assert bool(tracker.loss_sensitivity[~labelled].isnan().all())
    # every row ignored: no division by zero, nothing recorded
    y[:] = -100
    tracker = csl_fast.CSLTracker(12, 3)
    train(model, x, y, epochs=1, batch_size=4, tracker=tracker, input_grads=True)
    assert not bool(tracker.input_grad_count.any()) and not bool(tracker.input_grad_sq_sum.any())


def test_input_grads_of_integer_inputs_refused_before_training():
    # watch refused the token ids at the first step, advising to watch the embedding's
    # output, which a train() caller cannot do; by then the optimizer had been built
    tokens = torch.randint(0, 10, (6, 5), generator=torch.Generator().manual_seed(0))
    nn = torch.nn
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 3))
    before = [p.detach().clone() for p in model.parameters()]
    tracker = csl_fast.CSLTracker(6, 3)
    with pytest.raises(TypeError, match="input_grads=True needs floating-point inputs"):
        train(model, tokens, torch.arange(6) % 3, epochs=1, tracker=tracker, input_grads=True)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not bool(tracker.csl_count.any())


def test_input_noise_on_integer_inputs_refused_before_training():
    # torch's "normal_kernel_cpu" not implemented for 'Long' came from the first step
    tokens = torch.randint(0, 10, (6, 5), generator=torch.Generator().manual_seed(0))
    nn = torch.nn
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(20, 3))
    with pytest.raises(TypeError, match=r"input_noise=0\.1 needs floating-point inputs"):
        train(model, tokens, torch.arange(6) % 3, epochs=1, input_noise=0.1)
    train(model, tokens, torch.arange(6) % 3, epochs=1)  # (without noise they train)


def test_progress_without_tqdm_says_how_to_get_it(monkeypatch):
    # a bare ModuleNotFoundError, where score_epoch said what to install
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    x, y = _data()
    with pytest.raises(ImportError, match=r"train\(progress=True\) needs tqdm: pip install tqdm"):
        train(mlp(4, 3), x, y, epochs=1, progress=True)


@pytest.mark.parametrize(
    ("kw", "error", "message"),
    [
        ({"callback": "not callable"}, TypeError, r"callback must be a function"),
        ({"weight_decay": True}, ValueError, r"weight_decay must be a finite weight decay >= 0"),
        ({"weight_decay": -1.0}, ValueError, r"weight_decay must be a finite weight decay"),
        ({"weight_decay": 1e300}, ValueError, r"weight_decay=1e\+300 is past the largest"),
        ({"lr": 1e300}, ValueError, r"lr=1e\+300 is past the largest torch\.float32"),
        ({"momentum": "0.9"}, ValueError, r"momentum must be a finite momentum >= 0"),
        ({"momentum": math.nan}, ValueError, r"momentum must be a finite momentum >= 0"),
    ],
)
def test_optimizer_arguments_and_callback_are_checked_before_anything_is_recorded(
    kw, error, message
):
    # checked by the optimizer or the loop, they failed in torch's words (or a NaN
    # momentum trained into NaN) after the tracker had recorded a batch, or, for the
    # callback, a whole epoch
    x, y = _data()
    tracker = csl_fast.CSLTracker(x.shape[0], 3)
    with pytest.raises(error, match=message):
        train(mlp(4, 3), x, y, epochs=2, tracker=tracker, **kw)
    assert tracker.epoch == 0
    assert int((tracker.buffers()["csl_count"] > 0).sum()) == 0


def test_learning_rates_and_mlp_arguments_are_checked():
    x, y = _data()
    # a NaN rate trained the weights into NaN; a string failed in torch's words
    for lr in (math.nan, -0.1, math.inf, "0.1", None):
        with pytest.raises(ValueError, match=r"lr must be a finite learning rate >= 0"):
            train(mlp(4, 3), x, y, epochs=1, lr=lr)
    train(mlp(4, 3), x, y, epochs=1, lr=np.float32(0.1))
    # a negative or NaN dropout built no Dropout, silently
    for p in (-0.5, math.nan, 1.0, "0.5"):
        with pytest.raises(ValueError, match=r"mlp: dropout must be a probability in \[0, 1\)"):
            mlp(4, 3, dropout=p)
    # an int is one hidden layer ("'int' object is not iterable")
    widths = [m.out_features for m in mlp(4, 3, hidden=16) if isinstance(m, torch.nn.Linear)]
    assert widths == [16, 3]


def test_class_probability_targets_train():
    # where() took the Python int of their row count: a TypeError after the first step
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, generator=g), torch.randn(10, 2, generator=g).softmax(1)
    model = mlp(3, 2, (4,), seed=0)
    want = torch.nn.functional.cross_entropy(model(x), y).item()
    got = train(model, x, y, epochs=1, lr=0.0, momentum=0.0, batch_size=4)
    assert got.epoch_loss[0] == pytest.approx(want, rel=1e-6)


def test_class_probability_targets_with_a_tracker_are_refused_in_train_words():
    # accumulate's refusal advised csl= and count=, which train() does not take
    x = torch.randn(10, 3)
    y = torch.randn(10, 2).softmax(1)
    with pytest.raises(
        ValueError, match=r"train: y holds class probabilities .* \(y\.argmax\(1\)\)"
    ):
        train(mlp(3, 2), x, y, epochs=1, tracker=csl_fast.CSLTracker(10))


def test_seeds_are_checked_as_everywhere_in_the_package():
    x, y = torch.randn(8, 2), torch.arange(8) % 2
    a = train(mlp(2, 2, (4,), seed=np.int64(3)), x, y, epochs=1, seed=np.int64(5))
    b = train(mlp(2, 2, (4,), seed=3), x, y, epochs=1, seed=5)
    assert a.epoch_loss == b.epoch_loss  # torch said "an integer is required"
    with pytest.raises(ValueError, match=r"csl_fast.train: seed must be in \[-2\*\*63"):
        train(mlp(2, 2, (4,)), x, y, epochs=1, seed=2**64)
    with pytest.raises(ValueError, match=r"csl_fast.train.mlp: seed must be in"):
        mlp(2, 2, seed=2**64)  # "Overflow when unpacking long long"


def test_trains_under_no_grad_and_refuses_inference_mode():
    x, y = torch.randn(8, 2), torch.arange(8) % 2
    want = train(mlp(2, 2, (4,), seed=0), x, y, epochs=2).epoch_loss
    with torch.no_grad():  # "element 0 of tensors does not require grad"
        assert train(mlp(2, 2, (4,), seed=0), x, y, epochs=2).epoch_loss == want
    model = mlp(2, 2, (4,), seed=0)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"under torch\.inference_mode"):
        train(model, x, y, epochs=2)


def test_targets_of_the_wrong_kind_are_named_with_the_fix():
    # F.cross_entropy's and the first layer's words named neither train nor the fix
    x, y = _data()
    model = mlp(4, 3)
    with pytest.raises(ValueError, match=r"train: y must be \[N\] integer .*float32 .*y\.long\(\)"):
        train(model, x, y.float(), epochs=1)
    with pytest.raises(ValueError, match=r"one-hot labels\? pass y\.argmax\(1\)"):
        train(model, x, torch.nn.functional.one_hot(y, 3), epochs=1)
    # integer inputs are a model's business (token ids into an embedding train)
    bag = torch.nn.EmbeddingBag(10, 3)
    ids = torch.randint(0, 10, (len(y), 4), generator=torch.Generator().manual_seed(1))
    train(bag, ids, y, epochs=1)


def test_inputs_with_autograd_history_train_without_touching_the_callers_graph():
    # features from a backbone run without no_grad: the first step wrote the backbone's
    # grads, the second failed with "Trying to backward through the graph a second time"
    raw, y = _data()
    backbone = torch.nn.Linear(4, 4)
    feats = backbone(raw)
    train(mlp(4, 3, (8,), seed=0), feats, y, epochs=2, batch_size=16)
    assert backbone.weight.grad is None
    # input_grads differentiates each batch itself, also of an x that requires grad
    x = raw.clone().requires_grad_()
    tracker = csl_fast.CSLTracker(50, 3)
    train(mlp(4, 3, (8,), seed=0), x, y, epochs=2, tracker=tracker, input_grads=True)
    assert x.grad is None and bool(tracker.input_grad_count.eq(2).all())


def test_soft_targets_with_autograd_history_are_not_backpropagated_into():
    # a teacher's probabilities computed with grad: the first step wrote the teacher's
    # gradients and the second failed ("backward through the graph a second time")
    x, _ = _data()
    teacher = torch.nn.Linear(4, 3)
    soft = torch.softmax(teacher(x), 1)
    train(mlp(4, 3, (8,), seed=0), x, soft, epochs=2, batch_size=16)
    assert teacher.weight.grad is None


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        # IndexError: tuple index out of range
        (
            lambda x, y: train(mlp(4, 3), torch.tensor(1.0), y, epochs=1),
            ValueError,
            r"x must have one row",
        ),
        (
            lambda x, y: train(mlp(4, 3), x, torch.tensor(1), epochs=1),
            ValueError,
            r"y must have one row",
        ),
        # "'NoneType' object has no attribute 'shape'" / "... 'modules'"
        (lambda x, y: predict(mlp(4, 3), None), TypeError, r"x must be a torch\.Tensor"),
        (lambda x, y: predict(None, x), TypeError, r"model must be a torch\.nn\.Module"),
        # torch's "empty(): argument 'size' failed to unpack" / "negative dimension -1"
        (lambda x, y: mlp(None, 4), TypeError, r"in_features must be an int, got NoneType"),
        (lambda x, y: mlp(5, -1), ValueError, r"num_classes must be an int >= 1, got -1"),
        (lambda x, y: mlp(5, 3, (8, -2)), ValueError, r"hidden must be an int >= 1, got -2"),
        # True built one layer of width 1; 2.0 raised "'float' object is not iterable"
        (lambda x, y: mlp(5, 3, True), TypeError, r"hidden must be an int, got bool"),
        (lambda x, y: mlp(5, 3, 2.0), TypeError, r"hidden must be an int, got float"),
    ],
)
def test_train_predict_and_mlp_arguments_are_refused_by_name(call, error, match):
    x, y = _data()
    with pytest.raises(error, match=r"^csl_fast\.(train|train\.mlp|predict): " + match):
        call(x, y)


@pytest.mark.parametrize("width", [torch.tensor(8), np.array(8), np.int64(8)], ids=repr)
def test_mlp_takes_one_hidden_width_as_a_0d_tensor_or_array(width):
    # ("iteration over a 0-d tensor": they have __iter__, and were read as lists of widths)
    widths = [m.out_features for m in mlp(5, 3, width) if isinstance(m, torch.nn.Linear)]
    assert widths == [8, 3]
