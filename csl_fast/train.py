r"""A tiny, generic, seeded training loop over in-memory tensors, with optional tracking.

Meant for small models on data that fits in memory (scikit-learn's digits, feature
vectors, the baselines' retraining in :mod:`csl_fast.baselines`, the CLI demo). For real
datasets write your own loop around :func:`csl_fast.accumulate` (see
:class:`csl_fast.CSLTracker`); this one shows the pattern::

    model = csl_fast.train.mlp(64, 10, seed=0)
    tracker = csl_fast.CSLTracker(len(y), num_classes=10)
    csl_fast.train.train(model, x, y, epochs=100, lr=0.05, tracker=tracker,
                         input_grads=True, eval_each_epoch=True)
    scores = csl_fast.scores(tracker)

Determinism: the minibatch order and the input noise come from a ``torch.Generator``
seeded with ``seed``, and dropout from the global generators seeded with it for the run;
the model's initialisation is the caller's (:func:`mlp` takes a seed). With the same model
initialisation and seed, two runs on the CPU are bitwise equal.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ._args import int64_labels, integer, integer_labels
from ._args import seed as seed_arg
from .accumulate import accumulate
from .eval_pass import progress_bar, score_epoch
from .model_modes import eval_mode
from .tracker import CSLTracker

__all__ = ["TrainResult", "mlp", "predict", "train"]


def mlp(
    in_features: int,
    num_classes: int,
    hidden: int | Sequence[int] = (256, 256),
    *,
    dropout: float = 0.0,
    seed: int | None = None,
) -> nn.Sequential:
    """A ReLU multilayer perceptron ``in -> hidden... -> num_classes`` (flattens its input).

    ``hidden``: the widths of the hidden layers (an int: one layer). ``dropout``: the
    probability in ``[0, 1)`` of a Dropout after each hidden layer (0: none). No BatchNorm
    (it would couple the samples of a batch and break per-sample input gradients).
    ``seed`` seeds the initialisation without touching the global RNG.
    """
    if not hasattr(hidden, "__iter__") or getattr(hidden, "ndim", None) == 0:
        # one width ("'int' object is not iterable"): checked below, where True (int(True)
        # built a layer of width 1) and 2.0 are refused by name
        hidden = (hidden,)
    # (torch's "empty(): argument 'size' failed to unpack" for None, "negative dimension")
    in_features = integer("csl_fast.train.mlp", "in_features", in_features, low=1)
    num_classes = integer("csl_fast.train.mlp", "num_classes", num_classes, low=1)
    hidden = tuple(integer("csl_fast.train.mlp", "hidden", h, low=1) for h in hidden)
    # a negative or NaN one built no Dropout, silently
    dropout = _real("csl_fast.train.mlp", "dropout", dropout, "probability in [0, 1)", 1)
    if seed is None:
        return _mlp(in_features, num_classes, hidden, dropout)
    seed = seed_arg("csl_fast.train.mlp", seed)
    # the layers draw their initial weights as they are built: inside the fork
    with _seeded(seed, torch.device("cpu")):
        return _mlp(in_features, num_classes, hidden, dropout)


def _mlp(
    in_features: int, num_classes: int, hidden: Sequence[int], dropout: float
) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


@dataclass
class TrainResult:
    """What :func:`train` returns besides the trained model (trained in place).

    Attributes:
        epoch_loss: mean training loss of each epoch, over the labelled rows (those
            whose label is not -100, ``F.cross_entropy``'s ``ignore_index``); NaN for an
            epoch without any.
        epoch_time: wall-clock seconds of each epoch's training steps (the eval pass and
            the callback excluded).
        eval_time: total seconds spent in eval passes.
        callback_time: total seconds spent in the callback.
    """

    epoch_loss: list[float] = field(default_factory=list)
    epoch_time: list[float] = field(default_factory=list)
    eval_time: float = 0.0
    callback_time: float = 0.0

    @property
    def train_time(self) -> float:
        """Total seconds of training steps."""
        return float(sum(self.epoch_time))


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float = 0.05,
    batch_size: int = 128,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    optimizer: str = "sgd",
    input_noise: float = 0.0,
    tracker: CSLTracker | None = None,
    input_grads: bool = False,
    eval_each_epoch: bool = False,
    callback: Callable[[int, nn.Module], None] | None = None,
    seed: int = 0,
    progress: bool | str = False,
) -> TrainResult:
    r"""Train ``model`` in place with minibatch SGD (or Adam) on ``(x, y)``.

    Args:
        model: maps ``[B, ...]`` inputs to ``[B, C]`` logits.
        x: ``[N, ...]`` inputs the model takes (float features, or integer token ids for
            an embedding); ``y``: ``[N]`` integer labels (widened to int64),
            or, without a tracker, ``[N, C]`` float class probabilities. Both on the
            model's device. Row ``i`` has dataset index ``i`` (what the
            tracker records).
        epochs: passes over the data; each pass visits every sample once in a fresh random
            order (the last batch may be smaller).
        lr, momentum, weight_decay: SGD hyperparameters (``momentum`` ignored by Adam).
        optimizer: ``"sgd"`` or ``"adam"``.
        input_noise: std of Gaussian noise added to each training batch (a simple
            augmentation; 0 = none). The eval pass always sees clean inputs.
        tracker: a :class:`csl_fast.CSLTracker` of ``N`` samples; the loss is computed with
            :func:`csl_fast.accumulate` so every per-sample statistic is recorded, and
            :meth:`~csl_fast.CSLTracker.end_epoch` is called after each epoch. Without a
            tracker the loss is plain ``F.cross_entropy``.
        input_grads: also record per-sample input-gradient norms (``tracker.watch``;
            needed for learning time and loss sensitivity): the gradient of each labelled
            sample's own loss (the batch mean's is scaled back by the batch's labelled
            rows); rows labelled -100 are not recorded. Needs floating-point ``x``
            (integer token ids have no gradient: refused before training).
        eval_each_epoch: after each epoch, score every training sample in eval mode
            (:func:`csl_fast.score_epoch`: the eval-pass CSL).
        callback: ``callback(epoch, model)`` after each epoch (after the eval pass), e.g.
            a :class:`csl_fast.baselines.curvature.CurvatureAccumulator`.
        seed: seeds the minibatch order, the input noise and dropout (the global
            generators, given back as they were after training).
        progress: show a tqdm bar over epochs (a string is used as its description).

    Returns:
        a :class:`TrainResult` with per-epoch losses and timings. The model is left in
        eval mode, also when training raises. Each epoch starts with ``model.train()``,
        which puts every submodule in training mode, as a plain PyTorch loop does: a
        backbone frozen with ``.eval()`` (its BatchNorm statistics fixed) needs a
        ``train()`` override that keeps it in eval mode. Grad is enabled while it trains,
        so it also trains when called under ``torch.no_grad``; ``torch.inference_mode`` is
        refused.
    """
    # a negative batch size trained on nothing and returned losses of 0 without a word
    epochs = integer("csl_fast.train", "epochs", epochs, low=0)
    seed = seed_arg("csl_fast.train", seed)  # torch's "an integer is required" for np.int64
    batch_size = integer("csl_fast.train", "batch_size", batch_size, low=1)
    input_noise = _real("csl_fast.train", "input_noise", input_noise, "std >= 0 (0: no noise)")
    # a NaN one trained the weights into NaN, and the tracker skipped every loss
    lr = _real("csl_fast.train", "lr", lr, "learning rate >= 0")
    # (checked here, not by the optimizer or the loop: True and 1e300 raised torch's
    # "Boolean alpha only supported" / "cannot be converted to type float without
    # overflow" after the first batch was recorded, a NaN momentum trained into NaN, and
    # a callback that is no function failed after a whole epoch was recorded)
    momentum = _real("csl_fast.train", "momentum", momentum, "momentum >= 0")
    weight_decay = _real("csl_fast.train", "weight_decay", weight_decay, "weight decay >= 0")
    if callback is not None and not callable(callback):
        raise TypeError(
            "csl_fast.train: callback must be a function callback(epoch, model) or None, "
            f"got {type(callback).__name__} {callback!r}"
        )
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(
                f"csl_fast.train: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
        if t.dim() == 0:  # (an IndexError from x.shape[0])
            raise ValueError(
                f"csl_fast.train: {name} must have one row per sample ([N, ...]), got a 0-d tensor"
            )
    if tracker is not None and not isinstance(tracker, CSLTracker):
        raise TypeError(
            f"csl_fast.train: tracker must be a csl_fast.CSLTracker, got {type(tracker).__name__}"
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"csl_fast.train: x has {x.shape[0]} rows but y has {y.shape[0]} labels")
    if torch.is_inference_mode_enabled():
        raise RuntimeError(
            "csl_fast.train: called under torch.inference_mode, where nothing can be "
            "trained; call it outside (under torch.no_grad it trains: grad is enabled inside)"
        )
    if (input_grads or eval_each_epoch) and tracker is None:
        raise ValueError("csl_fast.train: input_grads/eval_each_epoch need a tracker")
    if input_grads and not x.is_floating_point():
        # (refused here, not at the first step by watch, whose advice, to watch the
        # embedding's output, needs a loop of one's own)
        raise TypeError(
            f"csl_fast.train: input_grads=True needs floating-point inputs, got x of dtype "
            f"{x.dtype}: integer inputs (token ids) have no gradient. Train with "
            "input_grads=False, or in your own loop watch the first floating-point tensor "
            "made from them: x = tracker.watch(model.embed(tokens), idx)"
        )
    if input_noise > 0 and not x.is_floating_point():
        # (torch's "normal_kernel_cpu" not implemented for 'Long', at the first step)
        raise TypeError(
            f"csl_fast.train: input_noise={input_noise} needs floating-point inputs, got x "
            f"of dtype {x.dtype}: integer inputs (token ids) take no Gaussian noise. Train "
            "with input_noise=0"
        )
    if tracker is not None and tracker.num_samples != x.shape[0]:
        raise ValueError(
            f"csl_fast.train: the tracker has {tracker.num_samples} samples but x has "
            f"{x.shape[0]} rows"
        )
    # inputs with autograd history (features from a backbone run without no_grad; soft
    # targets from a teacher) were backpropagated into: the first step wrote the caller's
    # gradients and the second failed with "Trying to backward through the graph a second
    # time"
    x, y = x.detach(), _targets(y, tracker).detach()
    n = x.shape[0]
    labels = int(y.max()) + 1 if n and not y.is_floating_point() else None
    params = [p for p in model.parameters() if p.requires_grad]
    for name, value in (("lr", lr), ("weight_decay", weight_decay)):
        for dtype in {p.dtype for p in params if p.is_floating_point()}:
            if value > torch.finfo(dtype).max:  # the optimizer's step overflows
                raise ValueError(
                    f"csl_fast.train: {name}={value} is past the largest {dtype} "
                    f"({torch.finfo(dtype).max:.4g}) the model's parameters hold; give a "
                    "smaller one"
                )
    if optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(
            params, lr=lr, momentum=momentum, weight_decay=weight_decay
        )
    elif optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"csl_fast.train: optimizer must be 'sgd' or 'adam', got {optimizer!r}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    all_index = torch.arange(n, device=x.device)
    result = TrainResult()
    epochs_iter: range | object = range(epochs)
    if progress:
        tqdm = progress_bar("csl_fast.train")
        desc = progress if isinstance(progress, str) else "train"
        epochs_iter = tqdm(range(epochs), desc=desc, leave=False)
    # Dropout draws its masks from the global generators: seeded here (and given back
    # after), so that the same seed reproduces a model with dropout too.
    # (grad on: a baseline's retraining called from an evaluation under no_grad failed
    # with "element 0 of tensors does not require grad")
    with (
        torch.enable_grad(),
        _seeded(seed, x.device),
        _left_in_eval(model),
    ):
        for epoch in epochs_iter:  # type: ignore[union-attr]
            model.train()
            t0 = time.perf_counter()
            perm = torch.randperm(n, generator=gen).to(x.device)
            total = torch.zeros((), device=x.device)
            rows = torch.zeros((), dtype=torch.long, device=x.device)  # those with a label
            for start in range(0, n, batch_size):
                idx = perm[start : start + batch_size]
                xb = x[idx]
                if input_noise > 0:
                    noise = torch.randn(xb.shape, generator=gen, dtype=xb.dtype)
                    xb = xb + input_noise * noise.to(xb.device)
                yb = y[idx]
                if input_grads:
                    # accumulate's 'mean' divides by the labelled rows only: the default
                    # scale B made every labelled sample's squared norm (B / labelled)**2
                    # times too large, and recorded a 0 for each ignored one. (A batch
                    # without a label: scale 0 and nothing recorded, no division.)
                    labelled_rows = yb != -100
                    xb = tracker.watch(  # type: ignore[union-attr]
                        xb.detach().clone(),
                        idx,
                        labelled_rows.sum(),
                        valid=labelled_rows,
                    )
                logits = model(xb)
                if labels is not None:  # the first step: a model too narrow for the labels
                    _check_width(logits, labels)
                    labels = None
                if tracker is not None:
                    loss = accumulate(logits, yb, idx, tracker)
                else:
                    loss = F.cross_entropy(logits, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                # weighted by the rows the mean was over: ignore_index rows are not, and
                # an all-ignored batch's NaN mean counted toward every row
                if y.is_floating_point():  # class probabilities: every row counts
                    total += loss.detach() * idx.numel()
                    rows += idx.numel()
                else:
                    labelled = yb.ne(-100).sum()
                    total += torch.where(labelled > 0, loss.detach() * labelled, 0.0)
                    rows += labelled
            if tracker is not None:
                tracker.end_epoch()
            result.epoch_time.append(time.perf_counter() - t0)
            result.epoch_loss.append(float(total) / int(rows) if int(rows) else math.nan)
            if eval_each_epoch:
                t1 = time.perf_counter()
                batches = [
                    (x[s : s + 1024], y[s : s + 1024], all_index[s : s + 1024])
                    for s in range(0, n, 1024)
                ]
                score_epoch(model, batches, tracker)  # type: ignore[arg-type]
                result.eval_time += time.perf_counter() - t1
            if callback is not None:
                t2 = time.perf_counter()
                callback(epoch, model)
                result.callback_time += time.perf_counter() - t2
    return result


def _targets(y: torch.Tensor, tracker: CSLTracker | None) -> torch.Tensor:
    """``y`` as F.cross_entropy takes it: ``[N]`` int64 class indices, or (without a
    tracker) ``[N, C]`` float class probabilities; anything else failed in its words
    ("expected target dtype to be Long or Byte"), which name neither train nor the fix."""
    if y.is_floating_point() and y.dim() == 2:
        if tracker is not None:
            # accumulate's refusal named csl= and count=, which train() does not take
            raise ValueError(
                "csl_fast.train: y holds class probabilities (a float tensor), which a "
                "tracker cannot record (its statistics need one class per sample); pass "
                "class indices (y.argmax(1)) to train with a tracker, or train without one"
            )
        return y
    shape = f"{y.dtype} of shape {tuple(y.shape)}"
    if integer_labels(y.dtype) and y.dim() == 2:
        raise ValueError(
            f"csl_fast.train: y must be [N] integer class indices, got {shape}; "
            "one-hot labels? pass y.argmax(1)"
        )
    if not integer_labels(y.dtype) or y.dim() != 1:
        fix = "pass y.long()" if y.dim() == 1 else "pass [N] labels"
        raise ValueError(
            f"csl_fast.train: y must be [N] integer class indices (or, without a tracker, "
            f"[N, C] float class probabilities), got {shape}; {fix}"
        )
    # F.cross_entropy takes int64 (and uint8) class indices only: int32 labels trained
    # with a tracker (accumulate widens them) and failed without one
    return int64_labels("csl_fast.train", y)  # (uint64 past int64: refused, not wrapped)


def _real(fn: str, name: str, value: object, what: str, below: float = math.inf) -> float:
    """A number in ``[0, below)`` as a float: a Python or NumPy number or a 0-d tensor; a
    negative or NaN std trained without noise, silently, and True as a std of 1."""
    v = value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0 <= v < below:
        finite = "finite " if below == math.inf else ""
        raise ValueError(f"{fn}: {name} must be a {finite}{what}, got {value!r}")
    return float(v)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """The CPU generator, and ``device``'s own where it is an accelerator (CUDA, MPS,
    XPU), seeded with ``seed`` inside, and given back as they were after. Not
    ``torch.manual_seed``: it reseeds every GPU's generator, which ``fork_rng`` saves only
    for the devices it is given, so the caller's CUDA random stream was left reset to
    ``seed``."""
    kind = device.type
    gpu = None if kind in ("cpu", "meta") else getattr(torch, kind, None)  # cuda, mps, xpu
    if not hasattr(gpu, "manual_seed"):
        gpu = None
    with torch.random.fork_rng(
        devices=[device] if gpu else [], device_type=kind if gpu else "cuda"
    ):
        torch.default_generator.manual_seed(seed)
        if gpu is not None:  # (dropout there draws from it)
            with torch.cuda.device(device) if kind == "cuda" else contextlib.nullcontext():
                gpu.manual_seed(seed)
        yield


@contextlib.contextmanager
def _left_in_eval(model: nn.Module) -> Iterator[None]:
    # also when a step or callback raises: a model given in eval mode came back training
    try:
        yield
    finally:
        model.eval()


def _check_width(logits: torch.Tensor, labels: int) -> None:
    # F.cross_entropy said only "Target 2 is out of bounds", from deep in a baseline's folds
    if logits.dim() != 2 or logits.shape[1] < labels:
        raise ValueError(
            f"csl_fast.train: the model returns logits of shape {tuple(logits.shape)}, but y "
            f"holds labels up to {labels - 1}: it needs [B, C] logits with C >= {labels} "
            "(build it with as many outputs as classes)"
        )


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
    """``[N, C]`` float32 logits of ``model`` in eval mode (training mode restored);
    ``[0, 0]`` for an empty ``x`` (no forward pass tells ``C``)."""
    # range() took a negative batch size as "no batches" ([0, 0] logits of 10 rows)
    batch_size = integer("csl_fast.predict", "batch_size", batch_size, low=1)
    # (None: "'NoneType' object has no attribute 'modules'" / "... 'shape'")
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"csl_fast.predict: model must be a torch.nn.Module, got {type(model).__name__}"
        )
    if not isinstance(x, torch.Tensor) or x.dim() == 0:
        got = "a 0-d tensor" if isinstance(x, torch.Tensor) else type(x).__name__
        raise TypeError(f"csl_fast.predict: x must be a torch.Tensor of [N, ...] inputs, got {got}")
    with eval_mode(model):
        out = [model(x[s : s + batch_size]).float() for s in range(0, x.shape[0], batch_size)]
    if not out:
        return torch.empty(0, 0)
    return torch.cat(out)
